"""What a prompt becomes once processed: token ids plus the multimodal items (audio, images, video) it carries."""
from dataclasses import dataclass, field

import torch


@dataclass
class MultiModalItem:
    """One audio clip (or 30 s chunk of one), image or video of a prompt, as its model's encoder takes it."""
    features: torch.Tensor      # what the model's embed_multimodal needs, e.g. log-mel [n_mels, n_frames]
    num_frames: int             # valid mel frames (the rest is padding)
    hash: str                   # content hash, or the user's uuid for the item
    num_embeds: int             # placeholder tokens this item occupies in the prompt (0 for Whisper)
    duration_s: float
    embeddings: torch.Tensor | None = None   # precomputed LM-space embeddings [num_embeds, H]: no encoder
    # bool [num_embeds]: the prompt positions that take the item's embeddings, in order (None: all); the
    # others keep their token's embedding (MiniCPM-o's chunk markers between them)
    is_embed: torch.Tensor | None = None
    grid_thw: tuple[int, int, int] | None = None   # images / video: the (frames, rows, columns) patch grid
    fps: float | None = None                        # video: frames per second of the frames given


@dataclass
class ProcessedPrompt:
    prompt_token_ids: list[int]
    mm_items: list[MultiModalItem] = field(default_factory=list)
    placeholder_offsets: list[int] = field(default_factory=list)
    encoder_prompt_token_ids: list[int] | None = None
    prompt: str | None = None


@dataclass
class PromptPositions:
    """Rotary positions of a model whose positions are not just token indices (M-RoPE): the
    prompt's [3, L] position ids, and `delta` such that a generated token at index p >= L has
    position p + delta on every axis. The model computes them (`prompt_positions`)."""
    prompt: torch.Tensor
    delta: int = 0

    def rows(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions of token indices start..end-1."""
        n = self.prompt.shape[1]
        if end <= n:
            return self.prompt[:, start:end]
        generated = torch.arange(max(start, n) + self.delta, end + self.delta).expand(3, -1)
        return generated if start >= n else torch.cat((self.prompt[:, start:], generated), dim=1)
