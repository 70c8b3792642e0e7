"""Beam search state of one request: which beams continue after each step, and the finished hypotheses.

The engine runs a request's live beams as sequences of the continuous batch (forks share their
parent's KV blocks). When every live beam has its next-token log-probabilities, `select` ranks all
their candidates (the best tokens of each beam, 2 × width of them or more with several stop tokens,
by cumulative logprob) and decides:

- patience None, transformers' generate(num_beams=width, early_stopping=False): a candidate that ends
  (end-of-sequence token, or the token limit) becomes a hypothesis only when it ranks among the first
  `width` candidates; the best `width` hypotheses are kept; the search stops once `width` hypotheses are
  kept and the best live beam, normalised at its current length, cannot beat the worst of them.
- patience p, openai-whisper's BeamSearchDecoder: the first `width` candidates that do not end continue,
  ending candidates ranked above the last of them finish, the first round(width × p) finished hypotheses
  are kept and the search stops once there are that many; at the token limit, live beams fill up the
  hypotheses to `width`.

A hypothesis scores cum_logprob / output_tokens ** length_penalty (its end token counted).
"""
from dataclasses import dataclass, field

from hark.engine.request import Sequence
from hark.outputs import Logprob


@dataclass
class Candidate:
    seq: Sequence          # the beam it extends
    token: int
    logprob: float         # of the token
    rank: int              # of the token among its beam's candidates, from 1
    cum_logprob: float     # of the beam with the token

    @property
    def logprob_entry(self) -> dict[int, Logprob]:
        return {self.token: Logprob(self.logprob, self.rank)}


@dataclass
class Hypothesis:
    token_ids: list[int]   # generated tokens, the end token included
    logprobs: list | None  # per token, when the request asked for them
    cum_logprob: float
    score: float
    finish_reason: str
    stop_reason: int | None = None


@dataclass(eq=False)
class BeamSearch:
    width: int
    length_penalty: float
    patience: float | None
    stop_ids: set[int]                  # tokens that end a beam (stop_token_ids, and EOS unless ignore_eos)
    stop_token_ids: set[int] = field(default_factory=set)   # those reported as stop_reason
    live: list[Sequence] = field(default_factory=list)
    pending: dict[Sequence, tuple[list[float], list[int]]] = field(default_factory=dict)   # this step's candidates
    hypotheses: list[Hypothesis] = field(default_factory=list)
    done: bool = False
    admitted: bool = False              # the scheduler reserved its `width` sequence seats

    @property
    def num_candidates(self) -> int:
        """Candidates taken per beam (and in all, transformers' rule): enough that `width` of them go on
        even when every beam's best tokens end it."""
        return max(2, 1 + len(self.stop_ids)) * self.width

    @property
    def ready(self) -> bool:
        """Every live beam has reported its candidates for this step."""
        return bool(self.live) and all(s in self.pending for s in self.live)

    def score(self, cum_logprob: float, length: int) -> float:
        return cum_logprob / max(1, length) ** self.length_penalty

    def candidates(self) -> list[Candidate]:
        """The pending candidates of all live beams, best cumulative logprob first (ties: beam order)."""
        out = []
        for seq in self.live:
            values, ids = self.pending[seq]
            out += [Candidate(seq, t, lp, r, seq.cumulative_logprob + lp)
                    for r, (lp, t) in enumerate(zip(values, ids), start=1) if lp != float("-inf")]
        self.pending.clear()
        return sorted(out, key=lambda c: -c.cum_logprob)

    def select(self, candidates: list[Candidate], at_limit: bool) -> list[Candidate]:
        """Records the hypotheses this step finishes; returns the candidates that continue as beams.
        at_limit: the new tokens reach the token limit (every candidate ends)."""
        if self.patience is None:
            chosen = self._select_transformers(candidates, at_limit)
        else:
            chosen = self._select_whisper(candidates, at_limit)
        if not chosen:
            self.done = True
        return [] if self.done else chosen

    def _hypothesis(self, c: Candidate, reason: str) -> Hypothesis:
        tokens = c.seq.output_token_ids + [c.token]
        logprobs = None if c.seq.logprobs is None else c.seq.logprobs + [c.logprob_entry]
        stop = c.token if c.token in self.stop_token_ids else None
        return Hypothesis(tokens, logprobs, c.cum_logprob, self.score(c.cum_logprob, len(tokens)), reason, stop)

    def _select_transformers(self, candidates: list[Candidate], at_limit: bool) -> list[Candidate]:
        chosen = []
        for rank, c in enumerate(candidates[:self.num_candidates]):
            ends = at_limit or c.token in self.stop_ids
            if ends:
                if rank < self.width:
                    self.hypotheses.append(self._hypothesis(c, "stop" if c.token in self.stop_ids else "length"))
            elif len(chosen) < self.width:
                chosen.append(c)
        self.hypotheses = sorted(self.hypotheses, key=lambda h: -h.score)[:self.width]
        if len(self.hypotheses) == self.width and chosen:
            best_live = self.score(chosen[0].cum_logprob, chosen[0].seq.num_output_tokens + 1)
            self.done = best_live <= self.hypotheses[-1].score
        return chosen

    def _select_whisper(self, candidates: list[Candidate], at_limit: bool) -> list[Candidate]:
        max_hypotheses = max(1, round(self.width * self.patience))
        chosen, ended = [], []
        for c in candidates:
            if c.token in self.stop_ids:
                ended.append(c)
            else:
                chosen.append(c)
                if len(chosen) == self.width:
                    break
        for c in ended:
            if len(self.hypotheses) < max_hypotheses:
                self.hypotheses.append(self._hypothesis(c, "stop"))
        self.done = len(self.hypotheses) >= max_hypotheses
        if at_limit and not self.done:
            for c in chosen[:max(0, self.width - len(self.hypotheses))]:
                self.hypotheses.append(self._hypothesis(c, "length"))
            self.done = True
        return chosen

    def results(self) -> list[Hypothesis]:
        """The hypotheses, best score first, at most `width`."""
        return sorted(self.hypotheses, key=lambda h: -h.score)[:self.width]

