"""What the training loops here share (pretraining, the attentive probe): the learning-rate schedule and
atomic checkpoint files."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to zero at `total_steps`: a pure function of the step, so resume-safe."""
    # Decaying matters: at a constant rate the last steps' noise shows up as speckled samples.

    def factor(done: int) -> float:
        if done < warmup_steps:
            return (done + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (done - warmup_steps) / span)))

    return factor


def save_checkpoint(ckpt_dir: Path, name: str, state: dict, keep: int = 2) -> None:
    """Write ckpt_dir/`name` atomically (tmp + os.replace), then keep only the newest `keep` files of its kind
    (the same prefix before the first '-')."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / name
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    prefix = name.split("-", 1)[0]
    for old in sorted(ckpt_dir.glob(f"{prefix}-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
