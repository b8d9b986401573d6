"""Stage 6 (domain): the attentive probe A-SelecT's authors evaluate with, a small transformer head on token features.

- head: per-channel standardisation (fitted on the training rows of draw 0), Linear(D -> width) on every token, a
  learnable CLS token prepended (classification), `blocks` pre-norm transformer blocks (no qkv bias), a final
  LayerNorm, then Linear(width -> classes) on the CLS output (classification) or on every token (segmentation).
  The head adds no position embedding of its own: DiT tokens carry theirs.
- training: AdamW, linear warmup (5% of the steps) then cosine decay to zero, per step; the best validation epoch
  is kept (ties: the earlier one) and scored once on test. A batch with no labelled token (segmentation, every pixel
  ignored) takes no step.
- noise draws: the K feature draws of the selected pair; epoch e (counted from 1) trains on draw (e - 1) mod K,
  validation and test average the logits over all K draws.
- resumable: a checkpoint after every epoch (work_dir/checkpoints, deleted when training has finished); a resumed
  run ends bit-identical to an uninterrupted one (same thread count).

No Prefect; torch on CPU, with the thread count the caller set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from aselect.pipelines.config import ProbeConfig
from aselect.pipelines.probe import (
    EVAL_BATCH,
    IGNORE_ID,
    UNLABELLED,
    ProbeResult,
    grid_side,
    iou_from_confusion,
    patch_labels,
    split_indices,
    upsample_bilinear,
)
from aselect.pipelines.training import latest_good_checkpoint, load_state_strictly, save_checkpoint, warmup_cosine
from aselect.storage.code import code_digest
from aselect.storage.errors import AselectError
from aselect.storage.faults import failpoint

logger = logging.getLogger("aselect.probe")

STD_FLOOR = 1e-6
WARMUP_FRACTION = 0.05
KEEP_CHECKPOINTS = 2
# the ProbeConfig fields that change what the attentive probe trains (the fingerprint of its checkpoints)
ATTENTIVE_FIELDS = ("width", "blocks", "heads", "mlp_ratio", "learning_rate", "weight_decay", "epochs",
                    "batch_size", "noise_draws", "online", "val_fraction", "seed")
HEAD_KEYS = ("in_dim", "classes", "width", "blocks", "heads", "mlp_ratio", "cls_token")


# ---------------------------------------------------------------------------------------------
#                                           The head
# ---------------------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); no qkv bias, no dropout."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width, bias=False)
        self.proj = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width)
        hidden = max(1, int(round(width * mlp_ratio)))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, w)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class AttentiveHead(torch.nn.Module):
    """Standardisation, Linear(in_dim -> width) per token, [CLS], pre-norm blocks, LayerNorm, Linear(-> classes).

    The standardisation is part of the head (buffers `feature_mean`, `feature_std`, (in_dim,)): it takes the raw
    token features and its state dict carries the transform with the weights."""

    def __init__(self, in_dim: int, classes: int, width: int, blocks: int, heads: int, mlp_ratio: float,
                 cls_token: bool = True) -> None:
        super().__init__()
        if min(in_dim, classes, width, blocks, heads) < 1 or not mlp_ratio > 0:
            raise AselectError(f"attentive head: in_dim {in_dim}, classes {classes}, width {width}, blocks {blocks}, "
                               f"heads {heads} must be positive and mlp_ratio {mlp_ratio} above 0")
        if width % heads:
            raise AselectError(f"attentive head: width {width} is not divisible by heads {heads}")
        self.config = {"in_dim": int(in_dim), "classes": int(classes), "width": int(width), "blocks": int(blocks),
                       "heads": int(heads), "mlp_ratio": float(mlp_ratio), "cls_token": bool(cls_token)}
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.embed = torch.nn.Linear(in_dim, width)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, width)) if cls_token else None
        self.blocks = torch.nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(blocks))
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, classes)
        self.apply(_init)
        if self.cls is not None:
            torch.nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, in_dim) raw features -> (B, classes) from the CLS token, or (B, T, classes) without one."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.feature_mean.numel():
            raise AselectError(f"attentive head: expected tokens (B, T, {self.feature_mean.numel()}), "
                               f"got {tuple(tokens.shape)}")
        x = self.embed((tokens.float() - self.feature_mean) / self.feature_std)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.out(x[:, 0] if self.cls is not None else x)


def _init(module: torch.nn.Module) -> None:
    """ViT-style init: truncated-normal linears (std 0.02), zero biases, unit LayerNorms."""
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    elif isinstance(module, torch.nn.LayerNorm):
        torch.nn.init.ones_(module.weight)
        torch.nn.init.zeros_(module.bias)


def save_head(directory: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """Write directory/head.safetensors (the state, standardisation included) and directory/head.json (config)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, meta = directory / "head.safetensors", directory / "head.json"
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(weights) + ".tmp")
    meta.with_suffix(".json.tmp").write_text(json.dumps(config, indent=1, sort_keys=True))
    os.replace(str(weights) + ".tmp", weights)
    os.replace(meta.with_suffix(".json.tmp"), meta)


def load_head(directory: Path) -> tuple[AttentiveHead, dict]:
    """The head saved by `save_head` (eval mode) and its config."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "head.json").read_text())
        state = load_file(str(directory / "head.safetensors"))
    except (OSError, ValueError) as exc:
        raise AselectError(f"{directory}: no readable attentive head ({type(exc).__name__}: {exc})") from exc
    missing = [key for key in HEAD_KEYS if key not in config]
    if missing:
        raise AselectError(f"{directory / 'head.json'}: missing {', '.join(missing)}")
    head = AttentiveHead(**{key: config[key] for key in HEAD_KEYS})
    load_state_strictly(head, state, directory / "head.safetensors")  # one line naming a missing/extra tensor
    return head.eval(), config


# ---------------------------------------------------------------------------------------------
#                                        Input checks
# ---------------------------------------------------------------------------------------------


def _check_draws(draws: Sequence[np.ndarray]) -> tuple[int, int, int]:
    """(N, T, D) of the draws, all of one shape and floating point."""
    if not len(draws):
        raise AselectError("attentive probe: no feature draws given")
    shapes = {tuple(np.shape(d)) for d in draws}
    if len(shapes) > 1:
        raise AselectError(f"attentive probe: draws of different shapes {sorted(shapes)}")
    shape = shapes.pop()
    if len(shape) != 3 or 0 in shape:
        raise AselectError(f"attentive probe: expected token features (N, T, D) per draw, got {shape}")
    bad = [str(d.dtype) for d in draws if not np.issubdtype(d.dtype, np.floating)]
    if bad:
        raise AselectError(f"attentive probe: features must be floating point, got {bad[0]}")
    return shape


def _check_rows(rows: np.ndarray, n: int, name: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or not len(rows) or not np.issubdtype(rows.dtype, np.integer):
        raise AselectError(f"attentive probe: {name} must be a non-empty 1-D array of row positions, "
                           f"got {rows.dtype} {rows.shape}")
    if rows.min() < 0 or rows.max() >= n:
        raise AselectError(f"attentive probe: {name} positions must be in [0, {n}), got [{rows.min()}, {rows.max()}]")
    return rows.astype(np.int64)


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise AselectError(f"attentive probe: {n} feature rows but labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise AselectError(f"attentive probe: labels must be class ids >= 0, got {labels.dtype} "
                           f"min {labels.min()}")
    return labels.astype(np.int64)


def _check_masks(masks: np.ndarray, n: int, tokens: int, classes: int) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) != n:
        raise AselectError(f"attentive probe: expected masks (N, H, W) for {n} images, got {masks.shape}")
    if not np.issubdtype(masks.dtype, np.integer) or masks.min() < 0 or \
            ((masks >= classes) & (masks != IGNORE_ID)).any():
        raise AselectError(f"attentive probe: mask values must be class ids in [0, {classes}) or {IGNORE_ID} "
                           f"(ignored), got {masks.dtype} [{masks.min()}, {masks.max()}]")
    side = grid_side(tokens)
    if masks.shape[1] % side or masks.shape[2] % side:
        raise AselectError(f"attentive probe: mask size {masks.shape[1]}x{masks.shape[2]} is not a multiple of "
                           f"the {side}x{side} token grid")
    return masks.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------
#                                  Features, fingerprint, checkpoints
# ---------------------------------------------------------------------------------------------


def _batch(draw: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """The token features of `rows` of one draw, float32 on CPU."""
    return torch.from_numpy(np.asarray(draw[rows], dtype=np.float32))


def _standardisation(draw: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (population, floor STD_FLOOR) over the tokens of `rows`, float64 sums, a batch of
    rows at a time."""
    count, total, squares = 0, 0.0, 0.0
    for start in range(0, len(rows), EVAL_BATCH):
        x = np.asarray(draw[rows[start:start + EVAL_BATCH]], dtype=np.float64)
        x = x.reshape(-1, x.shape[-1])
        count, total, squares = count + len(x), total + x.sum(axis=0), squares + (x * x).sum(axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise AselectError("attentive probe: the training features of draw 0 contain NaN or inf")
    std = np.maximum(std, STD_FLOOR)
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


def _fingerprint(cfg: ProbeConfig, draws: Sequence[np.ndarray], targets: np.ndarray, train: np.ndarray,
                 classes: int, task: str) -> dict:
    """Everything that changes the trained head; a checkpoint with another fingerprint is not resumed."""
    n, t, d = np.shape(draws[0])
    data = hashlib.sha256(np.ascontiguousarray(targets).tobytes())
    data.update(np.ascontiguousarray(train, dtype=np.int64).tobytes())
    sample = hashlib.sha256()
    for draw in draws:  # a strided sample: ~16 rows x ~16 tokens x every channel of each draw
        part = np.ascontiguousarray(draw[::max(1, n // 16), ::max(1, t // 16)])
        sample.update(str(part.dtype).encode())
        sample.update(part.tobytes())
    return dict(code=code_digest(__name__), task=task, **{key: getattr(cfg, key) for key in ATTENTIVE_FIELDS},
                draws=len(draws), rows=int(n), tokens=int(t), channels=int(d), classes=int(classes),
                targets=data.hexdigest()[:16], features=sample.hexdigest()[:16])


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


# ---------------------------------------------------------------------------------------------
#                                     Training (both tasks)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _averaged_logits(head: AttentiveHead, draws: Sequence[np.ndarray], rows: np.ndarray) -> torch.Tensor:
    """Logits of `rows` averaged over every draw ((n, classes), or (n, T, classes) without CLS)."""
    head.eval()
    total = None
    for draw in draws:
        logits = torch.cat([head(_batch(draw, rows[i:i + EVAL_BATCH])) for i in range(0, len(rows), EVAL_BATCH)])
        total = logits if total is None else total + logits
    return total / len(draws)


def _train(head: AttentiveHead, draws: Sequence[np.ndarray], targets: torch.Tensor, fit_rows: np.ndarray,
           score: Callable[[AttentiveHead], float], cfg: ProbeConfig, fingerprint: dict, work_dir: Path,
           progress: Callable[[int, int], None] | None, what: str,
           train_draws: Sequence[np.ndarray] | None = None) -> tuple[dict, dict]:
    """Train `head` on `fit_rows` (targets: (N,) class ids or (N, T) token labels), score it after every epoch,
    checkpoint, resume. Epoch e trains on `train_draws` (default `draws`) [(e - 1) mod its length]. Returns the best
    epoch's state and the training details; the head holds the best state."""
    training = draws if train_draws is None else train_draws
    epochs, batch, k = cfg.epochs, cfg.batch_size, len(draws)
    steps_per_epoch = math.ceil(len(fit_rows) / batch)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    total_steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(max(1, int(round(WARMUP_FRACTION * total_steps))), total_steps))
    tokens = int(np.shape(draws[0])[1])

    ckpt_dir = Path(work_dir) / "checkpoints"
    start, curve, best_state, best_score, best_epoch, seconds, seen = 0, [], None, -math.inf, 0, 0.0, 0
    if (state := latest_good_checkpoint(ckpt_dir, "epoch", fingerprint)) is not None:
        head.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, curve, best_state = int(state["epoch"]), [list(p) for p in state["curve"]], state["best_state"]
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
        seconds, seen = float(state["train_seconds"]), int(state["train_tokens"])
        logger.info("attentive %s probe: resuming after epoch %d of %d", what, start, epochs)
    parameters = sum(p.numel() for p in head.parameters() if p.requires_grad)
    logger.info("attentive %s probe: %d parameters, %d fit rows, %d draws, epochs %d..%d, batch %d, %d threads",
                what, parameters, len(fit_rows), k, start + 1, epochs, batch, torch.get_num_threads())

    log_every = max(1, epochs // 10)
    for epoch in range(start + 1, epochs + 1):
        draw = training[(epoch - 1) % len(training)]  # fresh noise: a new draw every epoch, cycling
        order = torch.randperm(len(fit_rows), generator=torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch)))
        rows = fit_rows[order.numpy()]
        head.train()
        losses, trained, began = [], 0, time.perf_counter()
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            if bool((targets[chunk] == UNLABELLED).all()):
                continue  # no labelled token: cross_entropy's mean over zero tokens is NaN, so no step at all
            logits = head(_batch(draw, chunk))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[chunk].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            value = loss.item()
            if not math.isfinite(value):
                raise AselectError(f"attentive probe: loss became {value} in epoch {epoch}; try a lower "
                                   f"probe.learning_rate (now {cfg.learning_rate})")
            losses.append(value * len(chunk))
            trained += len(chunk)
            seen += len(chunk) * tokens
        seconds += time.perf_counter() - began
        val = float(score(head))
        curve.append([epoch, float(sum(losses) / trained), val])
        if val > best_score:  # ties keep the earlier epoch
            best_score, best_epoch = val, epoch
            best_state = {key: tensor.detach().clone() for key, tensor in head.state_dict().items()}
        save_checkpoint(ckpt_dir, f"epoch-{epoch:04d}.pt",
                        dict(epoch=epoch, fingerprint=fingerprint, model=head.state_dict(),
                             optimizer=optimizer.state_dict(), schedule=schedule.state_dict(), best_state=best_state,
                             best_score=best_score, best_epoch=best_epoch, curve=curve, train_seconds=seconds,
                             train_tokens=seen), keep=KEEP_CHECKPOINTS)
        failpoint("probe-epoch")
        if epoch % log_every == 0 or epoch == epochs:
            logger.info("attentive %s probe epoch %d/%d: loss %.4f, val %.4f, %.0f tokens/s", what, epoch, epochs,
                        curve[-1][1], val, seen / max(seconds, 1e-9))
        if progress is not None:
            progress(epoch, epochs)

    if best_state is None:  # every validation score was NaN
        raise AselectError(f"attentive {what} probe: no epoch had a finite validation score")
    head.load_state_dict(best_state)
    details = {"curve": curve, "best_epoch": best_epoch, "epochs": epochs, "draws": k, "parameters": parameters,
               "tokens_per_second": seen / max(seconds, 1e-9), "fits": 1,
               "evaluation": f"logits averaged over {k} draws", "val_score": best_score, "resumed_from": start,
               "online": train_draws is not None,
               "fit_size": int(len(fit_rows))}
    return best_state, details


def _finish(work_dir: Path) -> None:
    shutil.rmtree(Path(work_dir) / "checkpoints", ignore_errors=True)


def _head_config(head: AttentiveHead, task: str, tokens: int, best_epoch: int) -> dict:
    return {**head.config, "task": task, "tokens": int(tokens), "best_epoch": int(best_epoch)}


# ---------------------------------------------------------------------------------------------
#                                       Classification
# ---------------------------------------------------------------------------------------------


def attentive_classifier(draws: Sequence[np.ndarray], labels: np.ndarray, train: np.ndarray, test: np.ndarray,
                         cfg: ProbeConfig, work_dir: Path, progress: Callable[[int, int], None] | None = None,
                         train_draws: Sequence[np.ndarray] | None = None
                         ) -> tuple[ProbeResult, dict[str, torch.Tensor], dict]:
    """Attentive probe, classification: top-1 on `test` of the best validation epoch's head.

    draws[k]: (N, T, D) float16/float32 token features of every image for noise draw k (row i = image i);
    labels (N,) class ids; train/test: row positions. A stratified validation split of train (`split_indices`)
    picks the epoch; epoch e (from 1) trains on draws[(e - 1) % K]; validation and test average the logits over all
    K draws. `train_draws` (the online probe's fresh draw per epoch) replace `draws` for training and for the
    standardisation (their draw 0 is the same as draws[0]). Returns the result (metric top1), the best head's state
    dict (with the standardisation, 'feature_mean'/'feature_std') and the head's config (JSON-able, what
    `save_head` / `load_head` take)."""
    n, tokens, channels = _check_draws(draws)
    labels = _check_labels(labels, n)
    train, test = _check_rows(train, n, "train"), _check_rows(test, n, "test")
    classes = int(labels.max()) + 1
    if len(np.unique(labels[train])) < 2:
        raise AselectError("attentive probe needs at least two classes in the training labels")
    fit_idx, val_idx = split_indices(len(train), cfg.val_fraction, cfg.seed, stratify=labels[train])
    fit_rows, val_rows = train[fit_idx], train[val_idx]
    fingerprint = _fingerprint(cfg, draws, labels, train, classes, "classification")

    torch.manual_seed(cfg.seed)
    head = AttentiveHead(channels, classes, cfg.width, cfg.blocks, cfg.heads, cfg.mlp_ratio, cls_token=True)
    head.feature_mean, head.feature_std = _standardisation((draws if train_draws is None else train_draws)[0],
                                                           fit_rows)
    targets = torch.from_numpy(labels)

    def top1(model: AttentiveHead, rows: np.ndarray) -> float:
        return float((_averaged_logits(model, draws, rows).argmax(dim=1) == targets[rows]).float().mean())

    state, details = _train(head, draws, targets, fit_rows, lambda model: top1(model, val_rows), cfg, fingerprint,
                            work_dir, progress, "classification", train_draws)
    value = top1(head, test)
    _finish(work_dir)
    details.update(train_size=int(len(train)), val_size=int(len(val_rows)), test_size=int(len(test)),
                   classes=classes, tokens=tokens)
    logger.info("attentive classification probe: test top-1 %.4f (best epoch %d, val %.4f)", value,
                details["best_epoch"], details["val_score"])
    return (ProbeResult(metric="top1", value=value, details=details), state,
            _head_config(head, "classification", tokens, details["best_epoch"]))


# ---------------------------------------------------------------------------------------------
#                                        Segmentation
# ---------------------------------------------------------------------------------------------


def _confusion(logits: torch.Tensor, masks: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) pixel confusion (rows ground truth) of token logits (n, T, classes): softmax, upsampled
    bilinearly to the mask size, argmax: as the linear segmentation probe does with its probabilities."""
    n, tokens, _ = logits.shape
    side, (height, width) = grid_side(tokens), masks.shape[1:]
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for start in range(0, n, EVAL_BATCH):
        probs = torch.softmax(logits[start:start + EVAL_BATCH].double(), dim=-1).numpy()
        probs = probs.reshape(len(probs), side, side, classes).transpose(0, 3, 1, 2)
        pred = upsample_bilinear(probs, height, width).argmax(axis=1)
        gt = masks[start:start + EVAL_BATCH]
        cells = (gt * classes + pred)[gt != IGNORE_ID]  # ignored pixels are not scored
        confusion += np.bincount(cells, minlength=classes * classes).reshape(classes, classes)
    return confusion


def attentive_segmenter(draws: Sequence[np.ndarray], masks: np.ndarray, train: np.ndarray, test: np.ndarray,
                        classes: int, cfg: ProbeConfig, work_dir: Path,
                        progress: Callable[[int, int], None] | None = None,
                        train_draws: Sequence[np.ndarray] | None = None
                        ) -> tuple[ProbeResult, dict[str, torch.Tensor], dict]:
    """Attentive probe, segmentation: the same blocks without CLS and a per-token linear head, trained on each
    patch's majority class; test mIoU of the best validation epoch's head.

    draws[k]: (N, T, D) token features (T a square grid, row-major); masks (N, H, W) class ids in [0, classes),
    H and W multiples of the grid side. Token logits (averaged over all K draws) -> softmax -> bilinear upsampling
    to the mask size -> argmax; mIoU over the classes present in ground truth or prediction (`iou_from_confusion`,
    as the linear probe). The validation split (by image) is not stratified. Returns as `attentive_classifier`."""
    n, tokens, channels = _check_draws(draws)
    classes = int(classes)
    if classes < 1:
        raise AselectError(f"attentive probe: classes must be positive, got {classes}")
    masks = _check_masks(masks, n, tokens, classes)
    train, test = _check_rows(train, n, "train"), _check_rows(test, n, "test")
    fit_idx, val_idx = split_indices(len(train), cfg.val_fraction, cfg.seed)
    fit_rows, val_rows = train[fit_idx], train[val_idx]
    fingerprint = _fingerprint(cfg, draws, masks, train, classes, "segmentation")

    torch.manual_seed(cfg.seed)
    head = AttentiveHead(channels, classes, cfg.width, cfg.blocks, cfg.heads, cfg.mlp_ratio, cls_token=False)
    head.feature_mean, head.feature_std = _standardisation((draws if train_draws is None else train_draws)[0],
                                                           fit_rows)
    # (N, T) token labels: each patch's majority class (ties: the lowest id), as the linear probe trains on
    token_labels = np.zeros((n, tokens), dtype=np.int64)
    # patches with every pixel ignored are UNLABELLED, cross_entropy's default ignore_index: not trained on
    token_labels[train] = patch_labels(masks[train], tokens, classes)
    if (token_labels[fit_rows] == UNLABELLED).all():
        raise AselectError(f"attentive segmentation probe: every pixel of the {len(fit_rows)} training masks is "
                           f"ignored ({IGNORE_ID})")
    targets = torch.from_numpy(token_labels)

    def miou(model: AttentiveHead, rows: np.ndarray) -> tuple[float, dict[str, float], float]:
        return iou_from_confusion(_confusion(_averaged_logits(model, draws, rows), masks[rows], classes))

    state, details = _train(head, draws, targets, fit_rows, lambda model: miou(model, val_rows)[0], cfg,
                            fingerprint, work_dir, progress, "segmentation", train_draws)
    value, per_class, pixel_accuracy = miou(head, test)
    _finish(work_dir)
    details.update(train_size=int(len(train)), val_size=int(len(val_rows)), test_size=int(len(test)),
                   num_classes=classes, per_class_iou=per_class, pixel_accuracy=pixel_accuracy, tokens=tokens)
    logger.info("attentive segmentation probe: test mIoU %.4f (best epoch %d, val %.4f)", value,
                details["best_epoch"], details["val_score"])
    return (ProbeResult(metric="miou", value=value, details=details), state,
            _head_config(head, "segmentation", tokens, details["best_epoch"]))
