"""Which adapter each row of the running forward pass uses, for the LoRA linears to read.

The runner sorts a batch's sequences by adapter, so the rows of one adapter are one run and each
LoRA linear does one pair of low-rank products per adapter. A linear sees either all T rows of the
step or, in the last layer, only the rows whose hidden state the forward returns (meta.output_rows);
the two counts always differ, so the row count says which. by_row_blocks narrows the rows further to
a window while it computes a block. The rows are per thread: each engine thread runs its own model.
"""
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

Run = tuple[int, int, int]        # (adapter id, first row, end row); adapter id 0 (no adapter) is left out


def runs_of(adapter_ids: list[int]) -> list[Run]:
    runs, start = [], 0
    for i in range(1, len(adapter_ids) + 1):
        if i == len(adapter_ids) or adapter_ids[i] != adapter_ids[start]:
            if adapter_ids[start]:
                runs.append((adapter_ids[start], start, i))
            start = i
    return runs


@dataclass
class AdapterRows:
    spaces: dict[int, list[Run]]                  # row count -> its runs (all rows; the output rows)
    window: tuple[int, int] | None = field(default=None)   # (row count narrowed, first row of the window)

    @classmethod
    def of(cls, adapter_ids: list[int], output_rows: list[int] | None) -> "AdapterRows":
        spaces = {len(adapter_ids): runs_of(adapter_ids)}
        if output_rows is not None:
            assert len(output_rows) != len(adapter_ids), "output rows that are all rows are computed in order"
            spaces[len(output_rows)] = runs_of([adapter_ids[r] for r in output_rows])
        return cls(spaces)

    def runs(self, num_rows: int) -> list[Run]:
        """The runs of the num_rows rows a linear is given now, counted from 0."""
        if self.window is None:
            if num_rows not in self.spaces:
                raise RuntimeError(f"a LoRA linear got {num_rows} rows; this step has {sorted(self.spaces)}")
            return self.spaces[num_rows]
        total, first = self.window
        end = first + num_rows
        return [(a, max(s, first) - first, min(e, end) - first)
                for a, s, e in self.spaces[total] if s < end and e > first]


_local = threading.local()


def active_rows() -> AdapterRows | None:
    return getattr(_local, "rows", None)


@contextmanager
def adapter_rows(rows: AdapterRows | None):
    """Makes `rows` the active rows of this thread for the forward pass run inside."""
    saved, _local.rows = active_rows(), rows
    try:
        yield
    finally:
        _local.rows = saved


@contextmanager
def row_window(num_rows: int, first: int):
    """Inside: linears are given rows first.. of the num_rows rows (by_row_blocks' blocks)."""
    rows = active_rows()
    if rows is None:
        yield
        return
    saved, rows.window = rows.window, (num_rows, first)
    try:
        yield
    finally:
        rows.window = saved
