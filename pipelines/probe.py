"""Stage 6 (domain): downstream linear probes on the selected (timestep, layer, site) features.

- classification: standardised pooled features -> logistic regression, C picked on a validation split -> top-1.
- segmentation: standardised token features -> per-token logistic regression -> probabilities upsampled bilinearly
  to pixels -> mIoU.
- streamed (features larger than `probe.memory_budget_mb`): the same two probes fitted from feature rows read a batch
  at a time; the fit minimises scikit-learn's own objective with the same L-BFGS, so it lands on the same optimum.
- saved: every probe's final fit (`ProbeResult.fitted`) is written without pickle (`save_linear`: weights in
  safetensors, the rest in JSON) and read back (`load_linear`) to the same scikit-learn objects, so a prediction from
  the saved probe is the one the probe stage scored.

Pure numpy / scikit-learn / scipy: no Prefect, Dask, Zarr or torch, so it runs anywhere a scorer runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logsumexp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from aselect.storage.errors import AselectError
from aselect.storage.faults import failpoint

MAX_ITER = 1000
EVAL_BATCH = 64  # images per upsampling batch: bounds memory at EVAL_BATCH * K * H * W floats
IGNORE_ID = 255  # a mask pixel with this value has no class (ingest's MASK_IGNORE): never fitted nor scored
UNLABELLED = -100  # the label of a patch whose pixels are all ignored (torch cross_entropy's ignore_index)


@dataclass
class ProbeResult:
    """A probe's headline metric and what led to it; `fitted` is the final fit the metric was scored with (the linear
    probes'; None for others), left out of `record`."""

    metric: str  # "top1" | "miou"
    value: float
    details: dict = field(default_factory=dict)
    fitted: FittedProbe | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict:
        """The JSON-able result: metric, value, details (what metrics.json holds)."""
        return {"metric": self.metric, "value": self.value, "details": self.details}


# ---------------------------------------------------------------------------------------------
#                                         Shared helpers
# ---------------------------------------------------------------------------------------------


def blas_threads(threads: int | None) -> contextlib.AbstractContextManager:
    """Cap BLAS / OpenMP threads (None: leave them); the cap is process-wide, not per Python thread."""
    # on a busy host, oversubscribed OpenMP threads spin: a 0.1 s lbfgs fit was measured taking 6-9 s with 2
    # threads on 2 shared cores, so probes default to one thread and parallelism comes from running pairs at once
    return threadpool_limits(limits=threads) if threads is not None else contextlib.nullcontext()


def _logistic(C: float) -> LogisticRegression:
    """Multinomial logistic regression (lbfgs): deterministic, no solver randomness to seed."""
    return LogisticRegression(C=float(C), max_iter=MAX_ITER)


def _fit_quietly(model: LogisticRegression, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    # an unconverged probe is still a valid (slightly weaker) probe: don't flood worker logs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def split_indices(n: int, val_fraction: float, seed: int, stratify: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val index split; stratified when every class has at least two members."""
    if not 0.0 < val_fraction < 1.0:
        raise AselectError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise AselectError(f"cannot split {n} samples into train and validation (val_fraction={val_fraction})")
    if stratify is not None:
        _, counts = np.unique(stratify, return_counts=True)
        if counts.min() < 2 or n_val < len(counts) or n - n_val < len(counts):
            stratify = None  # too few per class to stratify: fall back to a plain seeded split
    idx = np.arange(n)
    fit_idx, val_idx = train_test_split(idx, test_size=n_val, random_state=seed, shuffle=True, stratify=stratify)
    return np.sort(fit_idx), np.sort(val_idx)


def _sorted_cs(Cs: Sequence[float]) -> list[float]:
    cs = sorted({float(c) for c in Cs})
    if not cs or any(c <= 0 for c in cs):
        raise AselectError(f"Cs must be a non-empty list of positive numbers, got {list(Cs)}")
    return cs


def _best_c(val_scores: dict[float, float]) -> float:
    """Highest validation score; ties go to the smallest C (the most regularised probe)."""
    return max(sorted(val_scores), key=lambda c: (val_scores[c], -c))


def _choose_c(cs: list[float], n_train: int, val_fraction: float, seed: int, stratify: np.ndarray | None,
              score: Callable[[np.ndarray, np.ndarray, float], float]) -> tuple[float, dict[float, float]]:
    """C with the best `score(fit_idx, val_idx, C)` on a seeded validation split of train (one C: no split)."""
    val_scores: dict[float, float] = {}
    if len(cs) > 1:
        fit_idx, val_idx = split_indices(n_train, val_fraction, seed, stratify=stratify)
        for c in cs:
            val_scores[c] = score(fit_idx, val_idx, c)
            failpoint("fit")
    return (_best_c(val_scores) if val_scores else cs[0]), val_scores


# ---------------------------------------------------------------------------------------------
#                                     Classification probe
# ---------------------------------------------------------------------------------------------


def fit_linear(train_x: np.ndarray, train_y: np.ndarray, C: float) -> FittedProbe:
    """One standardised logistic regression fitted on train (the scaler sees train only)."""
    scaler = StandardScaler().fit(train_x)
    model = _fit_quietly(_logistic(C), scaler.transform(train_x), train_y)
    return FittedProbe(scaler, model, model.classes_)


def linear_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, C: float) -> float:
    """Top-1 of one standardised logistic regression fitted on train (the scaler sees train only)."""
    return _top1(fit_linear(train_x, train_y, C), test_x, test_y)


def _top1(probe: FittedProbe, test_x: np.ndarray, test_y: np.ndarray) -> float:
    return float(np.mean(predict_classes(probe, test_x) == test_y))


def predict_classes(probe: FittedProbe, x: np.ndarray) -> np.ndarray:
    """Class ids of pooled features (n, D) under a fitted classification probe (the probe's own `predict`)."""
    return probe.model.predict(probe.transform(x))


def predict_class_proba(probe: FittedProbe, x: np.ndarray) -> np.ndarray:
    """Probabilities (n, len(probe.classes)) of pooled features (n, D), columns in `probe.classes` order."""
    return probe.model.predict_proba(probe.transform(x))


def classification_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                         Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), val_fraction: float = 0.2,
                         seed: int = 0, threads: int | None = 1) -> ProbeResult:
    """Standardised features -> logistic regression; C picked on a validation split of train, refit on train, top-1."""
    train_x, test_x = _as_matrix(train_x, "train_x"), _as_matrix(test_x, "test_x")
    train_y, test_y = np.asarray(train_y).ravel(), np.asarray(test_y).ravel()
    _check_rows(train_x, train_y, "train")
    _check_rows(test_x, test_y, "test")
    if len(np.unique(train_y)) < 2:
        raise AselectError("classification probe needs at least two classes in the training labels")
    cs = _sorted_cs(Cs)

    def score(fit_idx: np.ndarray, val_idx: np.ndarray, c: float) -> float:
        if len(np.unique(train_y[fit_idx])) < 2:
            raise AselectError("classification probe: the validation split left fewer than two training classes")
        return linear_top1(train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx], c)

    with blas_threads(threads):
        best, val_scores = _choose_c(cs, len(train_y), val_fraction, seed, train_y, score)
        fitted = fit_linear(train_x, train_y, best)
        top1 = _top1(fitted, test_x, test_y)
        failpoint("fit")
    details = {"C": best, "val_scores": {str(c): s for c, s in val_scores.items()}, "fits": len(val_scores) + 1,
               "train_size": int(len(train_y)), "test_size": int(len(test_y)),
               "classes": int(len(np.unique(train_y)))}
    return ProbeResult(metric="top1", value=top1, details=details, fitted=fitted)


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise AselectError(f"{name}: expected features of shape (n, D), got {x.shape}")
    return x.astype(np.float32, copy=False)  # float16 dumps: sklearn's lbfgs takes float32 as is


def _check_rows(x: np.ndarray, y: np.ndarray, name: str) -> None:
    if len(x) != len(y):
        raise AselectError(f"{name}: {len(x)} feature rows but {len(y)} labels")
    if len(x) == 0:
        raise AselectError(f"{name}: no samples")


# ---------------------------------------------------------------------------------------------
#                                     Segmentation probe
# ---------------------------------------------------------------------------------------------


def grid_side(tokens: int) -> int:
    """Side of the square patch grid for a token count (tokens are row-major on an h x h grid)."""
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise AselectError(f"{tokens} tokens do not form a square grid")
    return side


def patch_fractions(masks: np.ndarray, side: int, num_classes: int) -> np.ndarray:
    """Per-patch class fractions (n, side * side, K) of integer masks (n, H, W); patches row-major; IGNORE_ID
    pixels count for no class."""
    n, height, width = masks.shape
    if height % side or width % side:
        raise AselectError(f"mask size {height}x{width} is not a multiple of the {side}x{side} token grid")
    ph, pw = height // side, width // side
    rows = np.arange(height)[:, None] // ph
    cols = np.arange(width)[None, :] // pw
    patch = (rows * side + cols)[None] + (np.arange(n) * side * side)[:, None, None]  # (n, H, W) global patch id
    # one bincount over (patch, class) instead of a dense one-hot (n, H, W, K)
    ids, labelled = (patch * num_classes + masks).ravel(), masks.ravel() != IGNORE_ID
    counts = np.bincount(ids if labelled.all() else ids[labelled], minlength=n * side * side * num_classes)
    return counts.reshape(n, side * side, num_classes) / float(ph * pw)


def bilinear_matrix(size_out: int, size_in: int) -> np.ndarray:
    """(size_out, size_in) 1-D bilinear weights, matching torch interpolate(mode='bilinear', align_corners=False)."""
    scale = size_in / size_out
    src = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    frac = src - i0
    weights = np.zeros((size_out, size_in))
    np.add.at(weights, (np.arange(size_out), i0), 1.0 - frac)
    np.add.at(weights, (np.arange(size_out), i1), frac)
    return weights


def upsample_bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of (n, K, h, w) maps to (n, K, H, W): separable, two small matmuls."""
    ay = bilinear_matrix(height, maps.shape[-2])
    ax = bilinear_matrix(width, maps.shape[-1])
    return np.einsum("Yh,nkhw,Xw->nkYX", ay, maps, ax, optimize=True)


def _check_segmentation(tokens: np.ndarray, masks: np.ndarray, num_classes: int, name: str) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    tokens, masks = np.asarray(tokens), np.asarray(masks)
    if tokens.ndim != 3:
        raise AselectError(f"{name}: expected token features (n, T, D), got {tokens.shape}")
    if masks.ndim != 3 or len(masks) != len(tokens):
        raise AselectError(f"{name}: expected masks (n, H, W) for {len(tokens)} images, got {masks.shape}")
    if masks.size and (masks.min() < 0 or ((masks >= num_classes) & (masks != IGNORE_ID)).any()):
        raise AselectError(f"{name}: mask values must be class ids in [0, {num_classes}) or {IGNORE_ID} (ignored), "
                           f"got [{masks.min()}, {masks.max()}]")
    return tokens, masks.astype(np.int64, copy=False)


@dataclass
class FittedProbe:
    """A fitted linear probe (pooled features, or per token): scaler (None: the model standardises), model (None when
    training saw a single class) and its classes."""

    scaler: StandardScaler | None
    model: LogisticRegression | LinearProbe | None
    classes: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Feature rows (n, D) as the model takes them: float32, standardised by the scaler when there is one."""
        x = np.asarray(x, dtype=np.float32)
        return self.scaler.transform(x) if self.scaler is not None else x


_TokenProbe = FittedProbe  # its name when it was per-token only


def patch_labels(masks: np.ndarray, tokens: int, num_classes: int) -> np.ndarray:
    """(n, T) token labels: each patch's majority class (ties -> lowest class id), UNLABELLED where every pixel of
    the patch is ignored."""
    fractions = patch_fractions(masks, grid_side(tokens), num_classes)
    return np.where(fractions.any(axis=2), fractions.argmax(axis=2), UNLABELLED)


def mask_class_count(masks: np.ndarray, names: Sequence[str] | None = None) -> int:
    """The number of mask classes: len(names) where the dataset names them, else the highest id in `masks` other
    than IGNORE_ID, plus one (an ignored pixel is no class)."""
    if names:
        return len(names)
    masks = np.asarray(masks)
    labelled = masks[masks != IGNORE_ID]
    if not labelled.size:
        raise AselectError(f"masks: every pixel is ignored ({IGNORE_ID}); no class to count")
    return int(labelled.max()) + 1


def _fit_token_probe(tokens: np.ndarray, masks: np.ndarray, num_classes: int, C: float) -> FittedProbe:
    n, T, D = tokens.shape
    x = tokens.reshape(n * T, D).astype(np.float32)
    y = patch_labels(masks, T, num_classes).reshape(n * T)
    if (y == UNLABELLED).any():  # patches with no labelled pixel are not fitted
        x, y = x[y != UNLABELLED], y[y != UNLABELLED]
    if not len(y):
        raise AselectError(f"segmentation probe: every pixel of the {n} training masks is ignored ({IGNORE_ID})")
    scaler = StandardScaler().fit(x)
    classes = np.unique(y)
    if len(classes) < 2:  # nothing to discriminate: predict the only class everywhere
        return _TokenProbe(scaler, None, classes)
    model = _fit_quietly(_logistic(C), scaler.transform(x), y)
    return _TokenProbe(scaler, model, model.classes_)


def predict_token_masks(probe: FittedProbe, tokens: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per-pixel class ids (b, height, width) of token features (b, T, D) under a fitted segmentation probe: token
    probabilities, upsampled bilinearly to the mask size, argmax over the classes training saw."""
    nb, T, D = tokens.shape
    side = grid_side(T)
    if probe.model is None:
        return np.full((nb, height, width), probe.classes[0], dtype=np.int64)
    x = probe.transform(tokens.reshape(nb * T, D))
    # probabilities, not logits: bounded scores stop one over-confident neighbour token from taking over
    # the pixels near its patch border (synthetic patch masks: pixel accuracy 0.87 with logits, 0.94 with probs)
    probs = probe.model.predict_proba(x)
    probs = probs.reshape(nb, side, side, len(probe.classes)).transpose(0, 3, 1, 2)
    # only the seen classes are upsampled: an unseen class is never predicted (score -inf)
    return probe.classes[upsample_bilinear(probs, height, width).argmax(axis=1)]


def _confusion(probe: FittedProbe, token_batches: Iterable[np.ndarray], masks: np.ndarray,
               num_classes: int) -> np.ndarray:
    """(K, K) pixel confusion matrix, rows = ground truth, columns = prediction; tokens (b, T, D) a batch at a time,
    in the order of `masks`."""
    height, width = masks.shape[1:]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    start = 0
    for tokens in token_batches:
        nb = len(tokens)
        pred = predict_token_masks(probe, tokens, height, width)
        gt = masks[start:start + nb]
        start += nb
        cells = (gt * num_classes + pred)[gt != IGNORE_ID]  # ignored pixels are not scored
        confusion += np.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return confusion


def _in_batches(tokens: np.ndarray) -> Iterator[np.ndarray]:
    """An in-memory token array as EVAL_BATCH-image batches (bounds the upsampled maps' memory)."""
    for start in range(0, len(tokens), EVAL_BATCH):
        yield tokens[start:start + EVAL_BATCH]


def iou_from_confusion(confusion: np.ndarray) -> tuple[float, dict[str, float], float]:
    """mIoU over classes present in ground truth or prediction, per-class IoU, and pixel accuracy."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    present = union > 0
    per_class = {str(c): float(tp[c] / union[c]) for c in np.flatnonzero(present)}  # str keys: JSON round-trips
    miou = float(np.mean(list(per_class.values()))) if per_class else 0.0
    total = confusion.sum()
    return miou, per_class, float(tp.sum() / total) if total else 0.0


def _miou(train_tokens: np.ndarray, train_masks: np.ndarray, test_tokens: np.ndarray, test_masks: np.ndarray,
          num_classes: int, C: float) -> tuple[float, dict[str, float], float]:
    probe = _fit_token_probe(train_tokens, train_masks, num_classes, C)
    return iou_from_confusion(_confusion(probe, _in_batches(test_tokens), test_masks, num_classes))


def segmentation_probe(train_tokens: np.ndarray, train_masks: np.ndarray, test_tokens: np.ndarray,
                       test_masks: np.ndarray, num_classes: int, Cs: Sequence[float] = (0.1, 1.0),
                       val_fraction: float = 0.2, seed: int = 0, threads: int | None = 1) -> ProbeResult:
    """Per-token linear probe: token features -> class probabilities, upsampled (bilinear) to pixels, test mIoU."""
    num_classes = int(num_classes)
    if num_classes < 1:
        raise AselectError(f"num_classes must be positive, got {num_classes}")
    train_tokens, train_masks = _check_segmentation(train_tokens, train_masks, num_classes, "train")
    test_tokens, test_masks = _check_segmentation(test_tokens, test_masks, num_classes, "test")
    if len(train_tokens) == 0 or len(test_tokens) == 0:
        raise AselectError("segmentation probe needs at least one train and one test image")
    if train_tokens.shape[1:] != test_tokens.shape[1:]:
        raise AselectError(f"train tokens {train_tokens.shape[1:]} and test tokens {test_tokens.shape[1:]} differ")
    cs = _sorted_cs(Cs)

    def score(fit_idx: np.ndarray, val_idx: np.ndarray, c: float) -> float:
        return _miou(train_tokens[fit_idx], train_masks[fit_idx], train_tokens[val_idx], train_masks[val_idx],
                     num_classes, c)[0]

    with blas_threads(threads):  # the split is by image, not by token: an image's tokens are not independent
        best, val_scores = _choose_c(cs, len(train_tokens), val_fraction, seed, None, score)
        fitted = _fit_token_probe(train_tokens, train_masks, num_classes, best)
        miou, per_class, pixel_acc = iou_from_confusion(_confusion(fitted, _in_batches(test_tokens), test_masks,
                                                                   num_classes))
        failpoint("fit")
    details = {"C": best, "val_scores": {str(c): s for c, s in val_scores.items()}, "fits": len(val_scores) + 1,
               "per_class_iou": per_class, "pixel_accuracy": pixel_acc, "num_classes": num_classes,
               "train_size": int(len(train_tokens)), "test_size": int(len(test_tokens))}
    return ProbeResult(metric="miou", value=miou, details=details, fitted=fitted)


# ---------------------------------------------------------------------------------------------
#                                Probes that stream from disk
# ---------------------------------------------------------------------------------------------
# Features bigger than the probe's memory budget are read a batch of rows at a time. The fit minimises exactly
# scikit-learn's LogisticRegression objective (mean log-loss + ||W||^2 / (2 C n), intercept unpenalised; binomial
# for two classes, multinomial above) with the same L-BFGS settings, each objective evaluation one pass over the
# rows: a convex problem with one optimum, so the streamed probe matches the in-memory one up to solver tolerance.

Rows = Callable[[np.ndarray], Iterable[np.ndarray]]  # sorted row positions -> their rows, a batch at a time, in order
Passes = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]  # one pass over (x (b, D), y (b,)) batches


@dataclass
class LinearProbe:
    """A fitted standardised logistic regression (what `fit_streamed_logistic` returns)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (1, D) binomial or (K, D) multinomial, on standardised features
    intercept: np.ndarray
    classes_: np.ndarray

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = self._logits(x)
        if self.coef.shape[0] == 1:
            p1 = expit(z[:, 0])
            return np.stack([1.0 - p1, p1], axis=1)
        return np.exp(z - logsumexp(z, axis=1, keepdims=True))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(axis=1)]


def fit_streamed_logistic(passes: Passes, C: float, max_iter: int = MAX_ITER) -> LinearProbe:
    """Standardise and fit a logistic regression from batches, holding one batch (plus the weights) in memory."""
    # 1. standardisation statistics and classes in one pass (float64 sums, population variance as StandardScaler)
    n, total, squares, seen = 0, 0.0, 0.0, set()
    for x, y in passes():
        x = np.asarray(x, dtype=np.float64)
        n, total, squares = n + len(x), total + x.sum(axis=0), squares + (x * x).sum(axis=0)
        seen.update(np.unique(y).tolist())
    mean = total / n
    scale = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0  # constant features: as StandardScaler, left unscaled
    classes = np.asarray(sorted(seen))
    if len(classes) < 2:
        raise AselectError("streamed probe needs at least two classes in the training labels")
    rows, d, l2 = (1 if len(classes) == 2 else len(classes)), len(mean), 1.0 / (float(C) * n)

    # 2. L-BFGS on the full objective; each evaluation streams every batch once
    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = w[:rows * d].reshape(rows, d), w[rows * d:]
        loss, grad_w, grad_b = 0.0, np.zeros_like(weights), np.zeros_like(bias)
        for x, y in passes():
            xs = (np.asarray(x, dtype=np.float64) - mean) / scale
            target = np.searchsorted(classes, y)
            z = xs @ weights.T + bias
            if rows == 1:
                positive = (target == 1).astype(np.float64)
                loss += float(np.sum(np.logaddexp(0.0, z[:, 0]) - positive * z[:, 0]))
                residual = (expit(z[:, 0]) - positive)[:, None]
            else:
                norm = logsumexp(z, axis=1)
                loss += float(np.sum(norm - z[np.arange(len(z)), target]))
                residual = np.exp(z - norm[:, None])
                residual[np.arange(len(z)), target] -= 1.0
            grad_w += residual.T @ xs
            grad_b += residual.sum(axis=0)
        value = loss / n + 0.5 * l2 * float(np.sum(weights * weights))
        return value, np.concatenate([(grad_w / n + l2 * weights).ravel(), grad_b / n])

    result = minimize(objective, np.zeros(rows * d + rows), jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "maxls": 50, "gtol": 1e-4, "ftol": 64 * np.finfo(float).eps})
    w = result.x
    return LinearProbe(mean, scale, w[:rows * d].reshape(rows, d), w[rows * d:], classes)


def _batches_of(rows: Rows, positions: np.ndarray, labels: np.ndarray) -> Passes:
    """A `Passes` over the rows at `positions` (sorted) with their labels."""
    def one_pass() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        start = 0
        for x in rows(positions):
            yield x, labels[start:start + len(x)]
            start += len(x)
    return one_pass


def _streamed_top1(probe: LinearProbe, rows: Rows, positions: np.ndarray, labels: np.ndarray) -> float:
    correct = sum(int(np.sum(probe.predict(x) == y)) for x, y in _batches_of(rows, positions, labels)())
    return correct / len(labels)


def classification_probe_streamed(rows: Rows, train_pos: np.ndarray, train_y: np.ndarray, test_pos: np.ndarray,
                                  test_y: np.ndarray, Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
                                  val_fraction: float = 0.2, seed: int = 0) -> ProbeResult:
    """`classification_probe` on rows read a batch at a time: same C selection, same objective, top-1."""
    train_y, test_y = np.asarray(train_y).ravel(), np.asarray(test_y).ravel()
    if len(train_pos) != len(train_y) or len(test_pos) != len(test_y) or not len(train_y) or not len(test_y):
        raise AselectError(f"streamed probe: {len(train_pos)}/{len(test_pos)} train/test rows but "
                           f"{len(train_y)}/{len(test_y)} labels")
    if len(np.unique(train_y)) < 2:
        raise AselectError("classification probe needs at least two classes in the training labels")
    cs = _sorted_cs(Cs)

    def score(fit_idx: np.ndarray, val_idx: np.ndarray, c: float) -> float:
        probe = fit_streamed_logistic(_batches_of(rows, train_pos[fit_idx], train_y[fit_idx]), c)
        return _streamed_top1(probe, rows, train_pos[val_idx], train_y[val_idx])

    best, val_scores = _choose_c(cs, len(train_y), val_fraction, seed, train_y, score)
    probe = fit_streamed_logistic(_batches_of(rows, train_pos, train_y), best)
    top1 = _streamed_top1(probe, rows, test_pos, test_y)
    failpoint("fit")
    details = {"C": best, "val_scores": {str(c): s for c, s in val_scores.items()}, "fits": len(val_scores) + 1,
               "train_size": int(len(train_y)), "test_size": int(len(test_y)),
               "classes": int(len(np.unique(train_y))), "streamed": True}
    return ProbeResult(metric="top1", value=top1, details=details, fitted=FittedProbe(None, probe, probe.classes_))


def _token_passes(rows: Rows, positions: np.ndarray, token_labels: np.ndarray) -> Passes:
    """A `Passes` over the token rows of the images at `positions`: (b * T, D) features, (b * T,) labels."""
    def one_pass() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        start = 0
        for tokens in rows(positions):
            nb, T, D = tokens.shape
            x, y = tokens.reshape(nb * T, D), token_labels[start:start + nb].reshape(nb * T)
            start += nb
            labelled = y != UNLABELLED  # patches with no labelled pixel are not fitted
            yield (x, y) if labelled.all() else (x[labelled], y[labelled])
    return one_pass


def _streamed_token_probe(rows: Rows, fit_pos: np.ndarray, fit_masks: np.ndarray, num_classes: int, tokens: int,
                          C: float) -> FittedProbe:
    labels = patch_labels(fit_masks, tokens, num_classes)
    classes = np.unique(labels[labels != UNLABELLED])
    if not len(classes):
        raise AselectError(f"streamed segmentation probe: every pixel of the {len(fit_pos)} training masks is "
                           f"ignored ({IGNORE_ID})")
    if len(classes) < 2:  # nothing to discriminate: predict the only class everywhere
        return FittedProbe(None, None, classes)
    model = fit_streamed_logistic(_token_passes(rows, fit_pos, labels), C)
    return FittedProbe(None, model, model.classes_)


def _streamed_miou(rows: Rows, fit_pos: np.ndarray, fit_masks: np.ndarray, eval_pos: np.ndarray,
                   eval_masks: np.ndarray, num_classes: int, tokens: int, C: float) -> tuple[float, dict, float]:
    probe = _streamed_token_probe(rows, fit_pos, fit_masks, num_classes, tokens, C)
    return iou_from_confusion(_confusion(probe, rows(eval_pos), eval_masks, num_classes))


def segmentation_probe_streamed(rows: Rows, tokens: int, train_pos: np.ndarray, train_masks: np.ndarray,
                                test_pos: np.ndarray, test_masks: np.ndarray, num_classes: int,
                                Cs: Sequence[float] = (0.1, 1.0), val_fraction: float = 0.2,
                                seed: int = 0) -> ProbeResult:
    """`segmentation_probe` on token maps (n, T, D) read a batch of images at a time."""
    num_classes = int(num_classes)
    train_masks, test_masks = np.asarray(train_masks).astype(np.int64), np.asarray(test_masks).astype(np.int64)
    if len(train_pos) != len(train_masks) or len(test_pos) != len(test_masks) or not len(train_pos) \
            or not len(test_pos):
        raise AselectError(f"streamed segmentation probe: {len(train_pos)}/{len(test_pos)} train/test images but "
                           f"{len(train_masks)}/{len(test_masks)} masks")
    cs = _sorted_cs(Cs)

    def score(fit_idx: np.ndarray, val_idx: np.ndarray, c: float) -> float:
        return _streamed_miou(rows, train_pos[fit_idx], train_masks[fit_idx], train_pos[val_idx],
                              train_masks[val_idx], num_classes, tokens, c)[0]

    best, val_scores = _choose_c(cs, len(train_pos), val_fraction, seed, None, score)
    fitted = _streamed_token_probe(rows, train_pos, train_masks, num_classes, tokens, best)
    miou, per_class, pixel_acc = iou_from_confusion(_confusion(fitted, rows(test_pos), test_masks, num_classes))
    failpoint("fit")
    details = {"C": best, "val_scores": {str(c): s for c, s in val_scores.items()}, "fits": len(val_scores) + 1,
               "per_class_iou": per_class, "pixel_accuracy": pixel_acc, "num_classes": num_classes,
               "train_size": int(len(train_pos)), "test_size": int(len(test_pos)), "streamed": True}
    return ProbeResult(metric="miou", value=miou, details=details, fitted=fitted)


def array_rows(features: np.ndarray, batch: int) -> Rows:
    """`Rows` over an in-memory array (tests, and a reference for the Zarr reader): `batch` rows at a time."""
    def read(positions: np.ndarray) -> Iterator[np.ndarray]:
        for start in range(0, len(positions), batch):
            yield np.asarray(features[positions[start:start + batch]], dtype=np.float32)
    return read


# ---------------------------------------------------------------------------------------------
#                                   A fitted probe on disk
# ---------------------------------------------------------------------------------------------
# No pickle: the arrays go to safetensors (float64, lossless for the float32 weights scikit-learn fits on float32
# features; the original dtypes are recorded and restored), the rest to JSON. Loading rebuilds the same
# StandardScaler / LogisticRegression (or LinearProbe), so predictions come from the code path the probe was scored
# with, bit for bit.

LINEAR_WEIGHTS = "linear.safetensors"
LINEAR_META = "linear.json"
LINEAR_FORMAT = 1
LINEAR_TENSORS = {"sklearn": ("coef", "intercept"), "streamed": ("mean", "scale", "coef", "intercept")}  # + classes


def save_linear(directory: Path, probe: FittedProbe, meta: dict[str, Any]) -> None:
    """Write directory/linear.safetensors and directory/linear.json: `meta` (task, class names, C, selection, ...)
    plus what rebuilding the probe needs (`model`: sklearn | streamed | constant, `in_dim`, `classes`, `dtypes`)."""
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    model = probe.model
    if probe.scaler is not None:
        arrays["scaler_mean"], arrays["scaler_scale"] = probe.scaler.mean_, probe.scaler.scale_
    if isinstance(model, LogisticRegression):
        kind = "sklearn"
        arrays["coef"], arrays["intercept"] = model.coef_, model.intercept_
    elif isinstance(model, LinearProbe):
        kind = "streamed"
        arrays.update(mean=model.mean, scale=model.scale, coef=model.coef, intercept=model.intercept)
    elif model is None:
        kind = "constant"  # training saw one class: it is predicted everywhere
    else:
        raise TypeError(f"save_linear: cannot save a {type(model).__name__}")
    dtypes = {name: str(np.asarray(value).dtype) for name, value in arrays.items()}
    tensors = {name: np.ascontiguousarray(value, dtype=np.float64) for name, value in arrays.items()}
    tensors["classes"] = np.ascontiguousarray(probe.classes, dtype=np.int64)
    width = next((len(tensors[k]) for k in ("scaler_mean", "mean") if k in tensors), None)
    record = {**meta, "format": LINEAR_FORMAT, "model": kind, "in_dim": width,
              "classes": [int(c) for c in probe.classes], "dtypes": dtypes}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, info = directory / LINEAR_WEIGHTS, directory / LINEAR_META
    save_file(tensors, str(weights.with_name(f".{weights.name}.tmp")))
    info.with_name(f".{info.name}.tmp").write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
    os.replace(weights.with_name(f".{weights.name}.tmp"), weights)
    os.replace(info.with_name(f".{info.name}.tmp"), info)


def load_linear(directory: Path) -> tuple[FittedProbe, dict[str, Any]]:
    """The probe `save_linear` wrote (the same scikit-learn objects, or LinearProbe) and its linear.json."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    try:
        meta = json.loads((directory / LINEAR_META).read_text())
        tensors = load_file(str(directory / LINEAR_WEIGHTS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise AselectError(f"{directory}: no readable linear probe ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:160]})") from None
    if not isinstance(meta, dict) or meta.get("model") not in ("sklearn", "streamed", "constant") \
            or "classes" not in tensors:
        raise AselectError(f"{directory / LINEAR_META}: not a saved linear probe (no model kind or classes)")
    dtypes = meta.get("dtypes", {})
    known = {"classes", "scaler_mean", "scaler_scale", *LINEAR_TENSORS.get(meta["model"], ())}
    if unexpected := sorted(set(tensors) - known):  # a file that is not what save_linear wrote for this kind
        raise AselectError(f"{directory / LINEAR_WEIGHTS}: unexpected tensor {unexpected[0]!r} "
                           f"({meta['model']} probe)")

    def array(name: str) -> np.ndarray:
        if name not in tensors:
            raise AselectError(f"{directory / LINEAR_WEIGHTS}: no {name!r} tensor ({meta['model']} probe)")
        return tensors[name].astype(dtypes.get(name, "float64"))

    classes = tensors["classes"].astype(np.int64)
    scaler = None
    if "scaler_mean" in tensors:
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = array("scaler_mean"), array("scaler_scale")
        scaler.var_ = scaler.scale_ ** 2
        scaler.n_features_in_ = len(scaler.mean_)
        scaler.n_samples_seen_ = 0
    model: LogisticRegression | LinearProbe | None = None
    if meta["model"] == "sklearn":
        model = _logistic(float(meta.get("C", 1.0)))
        model.coef_, model.intercept_, model.classes_ = array("coef"), array("intercept"), classes
        model.n_features_in_, model.n_iter_ = model.coef_.shape[1], np.zeros(1, dtype=np.int32)
    elif meta["model"] == "streamed":
        model = LinearProbe(array("mean"), array("scale"), array("coef"), array("intercept"), classes)
    width = meta.get("in_dim")
    coef = getattr(model, "coef_", getattr(model, "coef", None))
    if coef is not None and width is not None and coef.shape[-1] != width:
        raise AselectError(f"{directory / LINEAR_WEIGHTS}: weights of width {coef.shape[-1]} do not fit in_dim {width}")
    return FittedProbe(scaler, model, classes), meta
