"""Stage 4 (domain): score one (timestep, layer, site) pair from features already in memory.

Scorers, by name (see `SCORERS`; add more with `register_scorer`):
- `hfr`: A-SelecT's High-Frequency Ratio, label-free; on token maps (n, T, D) or attention maps (n, T, T).
- `probe`: the exhaustive oracle for classification, k-fold linear-probe accuracy on pooled features (n, D).
- `fewshot`: a cheap labelled proxy, leave-one-out nearest-class-mean accuracy on pooled features (n, D).
- `rankme`: label-free, RankMe's effective rank of pooled features (n, D) (Garrido et al. 2023).
- `probe_seg`: the exhaustive oracle for segmentation, mIoU of the per-token probe on spatial tokens (n, T, D).

HFR (a reconstruction, see docs/method.md): per 2-D map, P = |FFT2|^2, rho = |f| / 0.5 with f in cycles per sample
(so rho is in [0, sqrt(2)]), HFR = sum_{rho > cutoff} P / sum_{rho > 0} P; maps without non-DC power score 0.
Band `axis` measures frequency per axis instead, max(|f_y|, |f_x|) / 0.5: a frequency is low when both axes are
<= cutoff (a square low-pass box, separable 1-D bands). `high_frequency_mask` owns the rule for both paths.

Pure numpy / scikit-learn: no Prefect, Dask or Zarr, so one Dask task can call `score_pair` on plain arrays.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.model_selection import StratifiedKFold

from aselect.pipelines.probe import (
    blas_threads,
    grid_side,
    linear_top1,
    mask_class_count,
    segmentation_probe,
    split_indices,
)
from aselect.storage.errors import AselectError

SCORER_THREADS: int | None = 1  # BLAS / OpenMP threads per score_pair call (None: leave the process setting)
FFT_BATCH = 1 << 21  # map elements per FFT batch: ~50 MB of float64 + complex128 temporaries
FLAT_POWER = 1e-24  # non-DC power below this share of the total is FFT round-off: the map is flat
TOKEN_KINDS = ("tokens", "block", "attn", "mlp", "query", "key", "value")  # token sites: (n, T, D) maps
ATTN_KINDS = ("attn_map",)
HfrBand = Literal["radial", "axis"]
HFR_BANDS: tuple[str, ...] = ("radial", "axis")


# ---------------------------------------------------------------------------------------------
#                                   High-frequency ratio
# ---------------------------------------------------------------------------------------------


def radial_frequency(h: int, w: int) -> np.ndarray:
    """rho = |f| / 0.5 on the (h, w) FFT grid, f in cycles per sample: 0 at DC, 1 at Nyquist on an axis."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    return np.sqrt(fx ** 2 + fy ** 2) / 0.5


def band_frequency(h: int, w: int, band: str = "radial") -> np.ndarray:
    """The frequency HFR's cutoff is compared with, on the (h, w) FFT grid: `radial` rho = |f| / 0.5, `axis`
    max(|f_y|, |f_x|) / 0.5; 0 at DC, 1 at Nyquist on an axis."""
    if band == "radial":
        return radial_frequency(h, w)
    if band == "axis":
        fy = np.abs(np.fft.fftfreq(h))[:, None]
        fx = np.abs(np.fft.fftfreq(w))[None, :]
        return np.maximum(fy, fx) / 0.5
    raise AselectError(f"hfr band must be one of {', '.join(HFR_BANDS)}, got {band!r}")


def high_frequency_mask(h: int, w: int, cutoff: float, band: str = "radial") -> np.ndarray:
    """Bool (h, w): the frequencies above the cutoff, HFR's numerator (`axis`: either axis above it)."""
    return band_frequency(h, w, band) > cutoff


def hfr_masks(h: int, w: int, cutoff: float, band: str = "radial") -> tuple[np.ndarray, np.ndarray]:
    """Bool (h, w) masks of HFR's "high" and "non-DC" frequencies."""
    return high_frequency_mask(h, w, cutoff, band), high_frequency_mask(h, w, 0.0, band)


def _hfr_values(maps: np.ndarray, cutoff: float, exclude_dc: bool, band: str = "radial") -> np.ndarray:
    """Per-map HFR of maps (m, h, w, c): the grid is on axes 1-2, so (n, T, D) tokens need no transposed copy."""
    m, h, w, c = maps.shape
    high, non_dc = (mask.astype(np.float64) for mask in hfr_masks(h, w, cutoff, band))
    out = np.zeros((m, c))
    step = max(1, FFT_BATCH // (h * w * c))
    for start in range(0, m, step):  # batches bound memory; each batch is one vectorised FFT
        spectrum = np.fft.fft2(maps[start:start + step].astype(np.float64), axes=(1, 2))
        power = spectrum.real ** 2 + spectrum.imag ** 2
        total = power.sum(axis=(1, 2))
        ac = np.einsum("mhwc,hw->mc", power, non_dc)
        num = np.einsum("mhwc,hw->mc", power, high)
        den = ac if exclude_dc else total
        flat = ac <= FLAT_POWER * total  # also catches all-zero maps (0 <= 0)
        out[start:start + step] = np.divide(num, den, out=np.zeros_like(num), where=~flat & (den > 0))
    return out


def _check_cutoff(cutoff: float) -> float:
    cutoff = float(cutoff)
    if not np.isfinite(cutoff) or cutoff < 0:
        raise AselectError(f"hfr cutoff must be a finite number >= 0, got {cutoff}")
    return cutoff


def high_frequency_ratio(maps: np.ndarray, cutoff: float = 0.5, exclude_dc: bool = True,
                         band: str = "radial") -> float:
    """HFR of real 2-D maps (..., h, w): high-frequency power share, averaged over all leading dims."""
    maps = np.asarray(maps)
    if maps.ndim < 2 or maps.size == 0:
        raise AselectError(f"hfr: expected non-empty maps (..., h, w), got shape {maps.shape}")
    h, w = maps.shape[-2:]
    return float(_hfr_values(maps.reshape(-1, h, w, 1), _check_cutoff(cutoff), exclude_dc, band).mean())


def hfr_of_tokens(tokens: np.ndarray, cutoff: float = 0.5, exclude_dc: bool = True,
                  band: str = "radial") -> float:
    """HFR of token features (n, T, D): each channel reshaped to the h x w patch grid."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 3 or tokens.size == 0:
        raise AselectError(f"hfr: expected token features (n, T, D), got shape {tokens.shape}")
    n, T, D = tokens.shape
    side = grid_side(T)
    return float(_hfr_values(tokens.reshape(n, side, side, D), _check_cutoff(cutoff), exclude_dc, band).mean())


def hfr_of_attention(attn: np.ndarray, cutoff: float = 0.5, exclude_dc: bool = True,
                     band: str = "radial") -> float:
    """HFR of attention maps (n, T, T): each query's probabilities over the h x w key grid."""
    attn = np.asarray(attn)
    if attn.ndim != 3 or attn.shape[1] != attn.shape[2] or attn.size == 0:
        raise AselectError(f"hfr: expected attention maps (n, T, T), got shape {attn.shape}")
    n, T, _ = attn.shape
    side = grid_side(T)
    return float(_hfr_values(attn.reshape(n * T, side, side, 1), _check_cutoff(cutoff), exclude_dc, band).mean())


# ---------------------------------------------------------------------------------------------
#                                         Registry
# ---------------------------------------------------------------------------------------------

NEEDS = ("pooled", "spatial", "attn_map", "spatial_or_attn")


@dataclass(frozen=True)
class Scorer:
    """A named score of one pair; `fn(features, labels=None, masks=None, **params) -> float`.

    needs_labels: ground truth is required: class labels (n,) for pooled scorers, masks (n, H, W) for spatial ones.
    needs: which array of the dump it reads: "pooled" (n, D), "spatial" (n, T, D), "attn_map" (n, T, T), or
    "spatial_or_attn" (either; hfr).
    """

    name: str
    needs_labels: bool
    needs: str
    fn: Callable[..., float]
    higher_is_better: bool = True


SCORERS: dict[str, Scorer] = {}


def register_scorer(scorer: Scorer, replace: bool = False) -> Scorer:
    """Add a scorer to the registry (a second one of the same name needs replace=True)."""
    if scorer.needs not in NEEDS:
        raise AselectError(f"scorer '{scorer.name}': needs must be one of {', '.join(NEEDS)}, got '{scorer.needs}'")
    if scorer.name in SCORERS and not replace:
        raise AselectError(f"scorer '{scorer.name}' is already registered")
    SCORERS[scorer.name] = scorer
    return scorer


def get_scorer(name: str) -> Scorer:
    """The registered scorer called `name`."""
    if name not in SCORERS:
        raise AselectError(f"unknown scorer '{name}'; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def scorer_param_names(scorer: Scorer) -> tuple[str, ...] | None:
    """Names of the keyword parameters a scorer takes (None: it takes any)."""
    params = inspect.signature(scorer.fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def score_pair(name: str, features: np.ndarray, labels: np.ndarray | None = None, masks: np.ndarray | None = None,
               **params: object) -> float:
    """Score one (timestep, layer, site) pair from its features (and ground truth when the scorer needs it).

    Runs with one BLAS / OpenMP thread (SCORER_THREADS): the scoring stage parallelises across pairs instead.
    """
    scorer = get_scorer(name)
    features = np.asarray(features)
    _check_features(scorer, features)
    labels, masks = _check_truth(scorer, len(features), labels, masks)
    known = scorer_param_names(scorer)
    unknown = sorted(set(params) - set(known)) if known is not None else []
    if unknown:
        raise AselectError(f"scorer '{name}' got unknown parameter(s) {', '.join(unknown)}; "
                           f"it takes: {', '.join(known) or 'none'}")
    with blas_threads(SCORER_THREADS):
        return float(scorer.fn(features, labels=labels, masks=masks, **params))


def _check_features(scorer: Scorer, features: np.ndarray) -> None:
    expected = {"pooled": "(n, D)", "spatial": "(n, T, D)", "attn_map": "(n, T, T)", "spatial_or_attn": "(n, T, D|T)"}
    ndim = 2 if scorer.needs == "pooled" else 3
    square = scorer.needs != "attn_map" or (features.ndim == 3 and features.shape[1] == features.shape[2])
    if features.ndim != ndim or not square or features.size == 0:
        raise AselectError(f"scorer '{scorer.name}' expects {scorer.needs} features {expected[scorer.needs]}, "
                           f"got shape {features.shape}")


def _check_truth(scorer: Scorer, n: int, labels: np.ndarray | None, masks: np.ndarray | None
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if len(labels) != n:
            raise AselectError(f"scorer '{scorer.name}': {n} samples but {len(labels)} labels")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim != 3 or len(masks) != n:
            raise AselectError(f"scorer '{scorer.name}': expected masks (n={n}, H, W), got shape {masks.shape}")
    if scorer.needs_labels:
        spatial = scorer.needs in ("spatial", "spatial_or_attn", "attn_map")
        if spatial and masks is None:
            raise AselectError(f"scorer '{scorer.name}' needs segmentation masks; the dataset has none")
        if not spatial and labels is None:
            raise AselectError(f"scorer '{scorer.name}' needs class labels; none were given")
    return labels, masks


# ---------------------------------------------------------------------------------------------
#                                         Scorers
# ---------------------------------------------------------------------------------------------


def _hfr_score(features: np.ndarray, labels: np.ndarray | None = None, masks: np.ndarray | None = None, *,
               kind: str | None = None, cutoff: float = 0.5, exclude_dc: bool = True, band: str = "radial") -> float:
    """HFR of token maps (kind "tokens" or a token site name) or attention maps (kind "attn_map")."""
    if kind is None:  # (n, T, T) could be either: only a non-square shape is unambiguous
        if features.shape[1] == features.shape[2]:
            raise AselectError(f"hfr: features of shape {features.shape} could be tokens or attention maps; "
                               f"pass kind='tokens' or kind='attn_map'")
        kind = "tokens"
    if kind in TOKEN_KINDS:
        return hfr_of_tokens(features, cutoff, exclude_dc, band)
    if kind in ATTN_KINDS:
        return hfr_of_attention(features, cutoff, exclude_dc, band)
    raise AselectError(f"hfr: unknown kind '{kind}'; known: {', '.join(TOKEN_KINDS + ATTN_KINDS)}")


def _folds(labels: np.ndarray, folds: int) -> int:
    """At most `folds`, and no more than the smallest class has members (StratifiedKFold's limit)."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise AselectError("probe: needs at least two classes in the labels")
    if counts.min() < 2:
        raise AselectError(f"probe: class {classes[counts.argmin()]} has a single sample; k-fold needs two or more")
    if int(folds) < 2:
        raise AselectError(f"probe: folds must be >= 2, got {folds}")
    return min(int(folds), int(counts.min()))


def _probe_score(features: np.ndarray, labels: np.ndarray | None = None, masks: np.ndarray | None = None, *,
                 C: float = 1.0, folds: int = 3, seed: int = 0) -> float:
    """Mean k-fold top-1 of a standardised logistic regression (scaler fitted per training fold)."""
    x = features.astype(np.float32, copy=False)
    splitter = StratifiedKFold(n_splits=_folds(labels, folds), shuffle=True, random_state=seed)
    scores = [linear_top1(x[fit], labels[fit], x[held], labels[held], C) for fit, held in splitter.split(x, labels)]
    return float(np.mean(scores))


def _fewshot_score(features: np.ndarray, labels: np.ndarray | None = None, masks: np.ndarray | None = None, *,
                   shots: int | None = None, seed: int = 0) -> float:
    """Leave-one-out nearest-class-mean accuracy on standardised features, in closed form (no solver)."""
    y = labels
    x = features.astype(np.float64)
    if shots is not None:  # a few labelled images per class, drawn with the seed
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:int(shots)] for c in np.unique(y)])
        x, y = x[np.sort(keep)], y[np.sort(keep)]
    x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)  # label-free: fit on all
    classes, index, counts = np.unique(y, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise AselectError("fewshot: needs at least two classes in the labels")
    means = np.zeros((len(classes), x.shape[1]))
    np.add.at(means, index, x)
    means /= counts[:, None]
    dist = (x ** 2).sum(1)[:, None] - 2 * x @ means.T + (means ** 2).sum(1)[None, :]
    # leaving x_i out moves its own class mean: |x_i - mu_c^{-i}|^2 = (n_c / (n_c - 1))^2 |x_i - mu_c|^2
    n_c = counts[index].astype(np.float64)
    rows = np.arange(len(y))
    own = np.maximum(dist[rows, index], 0.0)
    dist[rows, index] = np.where(n_c > 1, own * (n_c / np.maximum(n_c - 1, 1)) ** 2, np.inf)
    return float(np.mean(dist.argmin(axis=1) == index))


def _probe_seg_score(features: np.ndarray, labels: np.ndarray | None = None, masks: np.ndarray | None = None, *,
                     C: float = 1.0, val_fraction: float = 0.25, seed: int = 0,
                     num_classes: int | None = None) -> float:
    """mIoU of the per-token segmentation probe (one C) on a seeded train/val split of these images; `num_classes`
    defaults to the highest labelled mask id plus one."""
    k = mask_class_count(masks) if num_classes is None else int(num_classes)
    fit, held = split_indices(len(features), val_fraction, seed)
    result = segmentation_probe(features[fit], masks[fit], features[held], masks[held], k, Cs=(C,), seed=seed,
                                threads=None)  # score_pair already set the thread cap
    return result.value


def _rankme_score(features: np.ndarray, labels: np.ndarray | None = None, masks: np.ndarray | None = None, *,
                  eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023), label-free: exp of the entropy of the normalised singular values of the
    (n, D) feature matrix, the effective rank of the representation (higher: more dimensions in use)."""
    x = features.astype(np.float64)
    if not np.isfinite(x).all():
        return float("nan")
    singular = np.linalg.svd(x, compute_uv=False)
    if singular.sum() <= 0:
        return 0.0
    p = singular / singular.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


register_scorer(Scorer("hfr", needs_labels=False, needs="spatial_or_attn", fn=_hfr_score))
register_scorer(Scorer("rankme", needs_labels=False, needs="pooled", fn=_rankme_score))
register_scorer(Scorer("probe", needs_labels=True, needs="pooled", fn=_probe_score))
register_scorer(Scorer("fewshot", needs_labels=True, needs="pooled", fn=_fewshot_score))
register_scorer(Scorer("probe_seg", needs_labels=True, needs="spatial", fn=_probe_seg_score))
