"""Torch's intra-op thread count, set for one piece of work and restored after it.

`torch.set_num_threads` changes the thread count for the rest of the process (and the threads it starts later),
not for the work at hand: a stage that set it and left it would make everything after it, in the same process,
run with other thread counts than a rerun that found the stage cached. Results are bit-identical only per
thread count, so whoever sets it restores it (`torch_threads`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Use `threads` intra-op threads for the duration (None: leave the count), then restore the count found,
    whatever the work set in between; torch is imported only when this is used."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
