"""Helpers shared by the benchmark scripts."""
import os
import resource
import time


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
