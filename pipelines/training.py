"""What the training loops here share (pretraining, the attentive probe): the learning-rate schedule, atomic
checkpoint files with their checksums, and loading weights that must match a model tensor for tensor."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from aselect.storage.errors import AselectError

logger = logging.getLogger("aselect.training")
CHECKPOINT_FORMAT = "aselect-checkpoint-1"


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
    """Write ckpt_dir/`name` atomically (tmp + os.replace), then keep only the newest `keep` files of its kind (the
    same prefix before the first '-').

    The file holds the serialised `state` and its sha256, so a checkpoint changed on disk is told from a good one
    (`latest_good_checkpoint`) and the checkpoint directory holds nothing but checkpoints."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / name
    tmp = path.with_suffix(".pt.tmp")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    torch.save({"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, tmp)
    os.replace(tmp, path)
    prefix = name.split("-", 1)[0]
    for old in sorted(ckpt_dir.glob(f"{prefix}-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_checkpoint(path: Path) -> dict:
    """The state `save_checkpoint` wrote to `path`; ValueError saying why when the file is not one, or its state
    no longer matches the sha256 it was written with."""
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, written by another torch, or not a checkpoint at all
        raise ValueError(f"unreadable: {_reason(exc)}") from None
    if not isinstance(outer, dict) or outer.get("format") != CHECKPOINT_FORMAT \
            or not isinstance(outer.get("payload"), torch.Tensor):
        raise ValueError("not an aselect checkpoint with its sha256")
    payload = outer["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != outer.get("sha256"):
        raise ValueError("its sha256 differs from the one recorded when it was written")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - as above, for the state inside
        raise ValueError(f"unreadable state: {_reason(exc)}") from None
    if not isinstance(state, dict):
        raise ValueError(f"its state is a {type(state).__name__}, not a dict")
    return state


def latest_good_checkpoint(ckpt_dir: Path, prefix: str, fingerprint: dict) -> dict | None:
    """The newest checkpoint `<prefix>-*.pt` that loads, matches its sha256 and was written for `fingerprint`;
    each one skipped for an older one is logged with its reason. None when there is none."""
    for path in sorted(Path(ckpt_dir).glob(f"{prefix}-*.pt"), reverse=True):
        try:
            state = read_checkpoint(path)
        except ValueError as exc:
            logger.warning("%s: checkpoint skipped for the previous one (%s)", path, exc)
            continue
        if state.get("fingerprint") != fingerprint:
            logger.warning("%s: checkpoint from a different config, dataset or code, ignored", path)
            continue
        return state
    return None


def tensor_mismatch(where: Path | str, missing: Iterable[str], unexpected: Iterable[str]) -> AselectError | None:
    """A one-line error naming the first tensor a weights file lacks or has in excess (None when they match)."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    parts = [f"{what} tensor {names[0]!r}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
             for what, names in (("no", missing), ("unexpected", unexpected)) if names]
    return AselectError(f"{where}: " + "; ".join(parts) + " (weights must match the model exactly)") if parts else None


def load_state_strictly(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """`module.load_state_dict(state)`, with a one-line error naming the file and the tensor when the names or
    shapes differ."""
    expected = module.state_dict()
    error = tensor_mismatch(where, set(expected) - set(state), set(state) - set(expected))
    if error is not None:
        raise error
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise AselectError(f"{where}: tensor {name!r} has shape {tuple(state[name].shape)}, the model's is "
                               f"{tuple(tensor.shape)}")
    module.load_state_dict(state)
