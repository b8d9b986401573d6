"""Stage 5 (domain): a policy turns a score table into one (timestep, layer, site) and says why.

A score table is a list of rows {"timestep", "layer", "site", "scorer", "score"}, one per scored pair and scorer.
Policies: `oracle` (best probe score), `fewshot` (best few-shot proxy), `rankme` (highest effective rank of
pooled features, label-free), `fixed` (the configured pair; an empty
table is allowed) and `aselect` (A-SelecT: the timestep where HFR, averaged over a band of layers, peaks).
Ties go to the lowest timestep, then the lowest layer, then the earliest site in SITE_ORDER.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from aselect.pipelines.scoring import get_scorer
from aselect.storage.errors import AselectError

# pipelines.features.SITES, repeated here so selection does not import torch and diffusers
SITE_ORDER = ("block", "attn", "mlp", "query", "key", "value", "attn_map")
ROW_KEYS = ("timestep", "layer", "site", "scorer", "score")

PairKey = tuple[int, int, str]  # (timestep, layer, site) values, as a table row names them


@dataclass
class Selection:
    """The chosen pair, its score, the runner-up, one sentence of why, and the table it was chosen from."""

    policy: str
    timestep: int
    layer: int
    site: str
    score: float
    runner_up: dict | None  # {"timestep", "layer", "site", "score"} of the second-best candidate
    reason: str
    table: list[dict]
    # aselect: how stable the choice is when the calibration images are resampled (see `bootstrap_confidence`)
    confidence: dict | None = None
    # aselect: what calibration cost and why it stopped where it did (pipelines.plan.SearchOutcome.record)
    calibration: dict | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (manifests, artifacts)."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------
#                                         Score tables
# ---------------------------------------------------------------------------------------------


def pair_order(pair: PairKey) -> tuple:
    """Sort key of a pair: timestep, then layer, then site (known sites in SITE_ORDER, others by name after)."""
    t, layer, site = pair
    site_rank = (SITE_ORDER.index(site), "") if site in SITE_ORDER else (len(SITE_ORDER), site)
    return (t, layer, site_rank)


def normalise_table(table: Sequence[dict]) -> list[dict]:
    """Rows with plain Python types (JSON-ready); a row missing a key or with a bad value is an error."""
    rows = []
    for i, row in enumerate(table):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise AselectError(f"score table row {i}: missing {', '.join(missing)}")
        try:
            rows.append({"timestep": int(row["timestep"]), "layer": int(row["layer"]), "site": str(row["site"]),
                         "scorer": str(row["scorer"]), "score": float(row["score"])})
        except (TypeError, ValueError) as exc:
            raise AselectError(f"score table row {i}: {exc}") from None
    if not rows:
        raise AselectError("the score table is empty: nothing to select from")
    return rows


def candidates(rows: list[dict]) -> list[PairKey]:
    """Every (timestep, layer, site) in the table, in tie-break order."""
    return sorted({(r["timestep"], r["layer"], r["site"]) for r in rows}, key=pair_order)


def scores_of(rows: list[dict], scorer: str) -> dict[PairKey, float]:
    """{pair: score} of one scorer; non-finite scores (failed scoring) are left out."""
    scores: dict[PairKey, float] = {}
    for r in rows:
        if r["scorer"] != scorer or not math.isfinite(r["score"]):
            continue
        pair = (r["timestep"], r["layer"], r["site"])
        if pair in scores:
            raise AselectError(f"score table has two '{scorer}' scores for t={pair[0]} layer {pair[1]} site {pair[2]}")
        scores[pair] = r["score"]
    return scores


def require_signal(policy: str, rows: list[dict], scorer: str, values: dict) -> None:
    """A policy never tie-breaks its way to a "choice": all scores non-finite, or all equal, is an error."""
    total = sum(1 for r in rows if r["scorer"] == scorer)
    if total and not values:
        raise AselectError(f"policy '{policy}': all {total} '{scorer}' scores are non-finite (NaN or inf): "
                           f"nothing to select from; check the backbone and the features")
    if len(values) > 1:
        lo, hi = min(values.values()), max(values.values())
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            raise AselectError(f"policy '{policy}': every '{scorer}' score is {hi:.6g}: the scores carry no signal "
                               f"to select from (a constant backbone, or a cutoff above every frequency?)")


def ranked(scores: dict[PairKey, float], higher_is_better: bool = True) -> list[PairKey]:
    """Pairs best first; ties in tie-break order."""
    sign = -1.0 if higher_is_better else 1.0
    return sorted(scores, key=lambda p: (sign * scores[p], pair_order(p)))


def _pair_dict(pair: PairKey, score: float) -> dict:
    return {"timestep": pair[0], "layer": pair[1], "site": pair[2], "score": score}


def _describe(pair: PairKey) -> str:
    return f"t={pair[0]} layer {pair[1]} site {pair[2]}"


# ---------------------------------------------------------------------------------------------
#                                         Policies
# ---------------------------------------------------------------------------------------------


def _best_by(policy: str, rows: list[dict], scorer: str) -> Selection:
    """The pair with the best `scorer` score, and the second best as runner-up."""
    direction = get_scorer(scorer).higher_is_better
    scores = scores_of(rows, scorer)
    require_signal(policy, rows, scorer, scores)
    if not scores:
        have = ", ".join(sorted({r["scorer"] for r in rows}))
        raise AselectError(f"policy '{policy}' needs '{scorer}' scores; the table has: {have}")
    order = ranked(scores, direction)
    best = order[0]
    runner = _pair_dict(order[1], scores[order[1]]) if len(order) > 1 else None
    word = "highest" if direction else "lowest"
    tail = f"; runner-up {_describe(order[1])}, {scores[order[1]]:.3f}" if runner else ""
    reason = f"{scorer} score {scores[best]:.3f} is the {word} of {len(scores)} candidates{tail}"
    return Selection(policy, best[0], best[1], best[2], scores[best], runner, reason, rows)


def _oracle(rows: list[dict], *, scorer: str | None = None) -> Selection:
    """Exhaustive oracle: best probe_seg score when the table has one, else best probe score."""
    if scorer is None:
        present = {r["scorer"] for r in rows}
        scorer = "probe_seg" if "probe_seg" in present else "probe"
    return _best_by("oracle", rows, scorer)


def _fewshot(rows: list[dict], *, scorer: str | None = None) -> Selection:
    """Best few-shot proxy score: `fewshot` (classification), else a segmentation probe on the few labelled images."""
    if scorer is None:
        present = {r["scorer"] for r in rows}
        scorer = "probe_seg" if "probe_seg" in present and "fewshot" not in present else "fewshot"
    return _best_by("fewshot", rows, scorer)


def _fixed(rows: list[dict], *, timestep: int | None = None, layer: int | None = None, site: str | None = None,
           scorer: str | None = None) -> Selection:
    """The configured pair, which must be one of the table's candidates."""
    if timestep is None or layer is None or site is None:
        raise AselectError("policy 'fixed' needs timestep, layer and site")
    pair = (int(timestep), int(layer), str(site))
    if not rows:  # nothing was scored: the pair is taken as given (the A-SelecT flow's `fixed` path)
        return Selection("fixed", pair[0], pair[1], pair[2], math.nan, None,
                         f"fixed by configuration: {_describe(pair)} (not scored)", rows)
    pairs = candidates(rows)
    if pair not in pairs:
        ts = sorted({p[0] for p in pairs})
        ls = sorted({p[1] for p in pairs})
        ss = sorted({p[2] for p in pairs}, key=lambda s: pair_order((0, 0, s)))
        raise AselectError(f"policy 'fixed': {_describe(pair)} is not in the score table "
                           f"(timesteps {ts}, layers {ls}, sites {ss})")
    # report the oracle's score of the pair when there is one: it says what the fixed choice costs
    present = sorted({r["scorer"] for r in rows if (r["timestep"], r["layer"], r["site"]) == pair})
    if scorer is None:
        scorer = next((s for s in ("probe_seg", "probe", "fewshot", "hfr") if s in present), present[0])
    score = scores_of(rows, scorer).get(pair, math.nan)
    reason = f"fixed by configuration: {_describe(pair)} ({scorer} {score:.3f})"
    return Selection("fixed", pair[0], pair[1], pair[2], score, None, reason, rows)


def middle_third(layers: Sequence[int]) -> list[int]:
    """The middle third of the sorted layers (never empty): 6 layers -> [2, 3], 12 -> [4, 5, 6, 7]."""
    ordered = sorted(set(layers))
    cut = len(ordered) // 3
    return ordered[cut:len(ordered) - cut]


def _hfr_curve(rows: list[dict], hfr_site: str, layers: Sequence[int] | None
               ) -> tuple[dict[tuple[int, int], float], list[int], list[int], dict[int, float]]:
    """HFR of `hfr_site` per (t, layer), the layers present, the band averaged over, and the band's mean per t."""
    hfr = {(t, layer): s for (t, layer, site), s in scores_of(rows, "hfr").items() if site == hfr_site}
    require_signal("aselect", [r for r in rows if r["site"] == hfr_site], "hfr", hfr)
    if not hfr:
        sites = sorted({r["site"] for r in rows if r["scorer"] == "hfr"})
        raise AselectError(f"policy 'aselect' needs 'hfr' scores of site '{hfr_site}'; "
                           f"the table has hfr for sites: {', '.join(sites) or 'none'}")
    present = sorted({layer for _, layer in hfr})
    band = middle_third(present) if layers is None else sorted({int(layer) for layer in layers})
    absent = [layer for layer in band if layer not in present]
    if not band or absent:
        raise AselectError(f"policy 'aselect': layers {absent or band} have no hfr scores "
                           f"(site '{hfr_site}' has layers {present})")
    curve: dict[int, float] = {}
    for t in sorted({t for t, _ in hfr}):
        gaps = [layer for layer in band if (t, layer) not in hfr]
        if gaps:  # a partial mean would compare timesteps over different layers
            raise AselectError(f"policy 'aselect': no finite hfr at t={t} for layers {gaps}")
        curve[t] = sum(hfr[(t, layer)] for layer in band) / len(band)
    return hfr, present, band, curve


def aselect_curve(table: Sequence[dict], hfr_site: str = "attn_map", layers: Sequence[int] | None = None
                  ) -> dict[int, float]:
    """The curve the aselect policy maximises: {t: HFR of `hfr_site` averaged over `layers`} (default: middle third)."""
    return _hfr_curve(normalise_table(table), hfr_site, layers)[3]


def _aselect(rows: list[dict], *, hfr_site: str = "attn_map", layers: Sequence[int] | None = None,
             feature_site: str = "block", feature_layer: int | str = "argmax") -> Selection:
    """A-SelecT: t* = argmax over t of HFR (of `hfr_site`) averaged over `layers`; features at (t*, layer, site)."""
    hfr, present, band, curve = _hfr_curve(rows, hfr_site, layers)
    order = sorted(curve, key=lambda t: (-curve[t], t))

    if feature_layer != "argmax" and (isinstance(feature_layer, bool) or not isinstance(feature_layer, int)
                                      or feature_layer not in present):
        raise AselectError(f"select.feature_layer {feature_layer!r}: must be 'argmax' or one of the calibrated "
                           f"layers {present}")

    def layer_at(t: int) -> int:
        if feature_layer == "argmax":  # the band's layer with the highest HFR at t (ties: lowest layer)
            return min(band, key=lambda layer: (-hfr[(t, layer)], layer))
        return feature_layer

    best = order[0]
    chosen = layer_at(best)
    runner = None
    tail = "only timestep scored"
    if len(order) > 1:
        second = order[1]
        runner = {"timestep": second, "layer": layer_at(second), "site": feature_site, "score": curve[second]}
        tail = f"runner-up t={second}, {curve[second]:.3f}"
    reason = (f"HFR of {hfr_site} averaged over layers {band} peaks at t={best} ({curve[best]:.3f}; {tail}); "
              f"features: layer {chosen} site {feature_site}")
    return Selection("aselect", best, chosen, feature_site, curve[best], runner, reason, rows)


def _hybrid(rows: list[dict], *, hfr_site: str = "attn_map", layers: Sequence[int] | None = None,
            scorer: str | None = None) -> Selection:
    """Label-free t, labelled feature: t* as `_aselect` picks it from the HFR rows, then the (layer, site) with the
    best few-shot score at t* (the table's `fewshot` or `probe_seg` rows, scored at t* alone)."""
    t_star = _aselect([r for r in rows if r["scorer"] == "hfr"], hfr_site=hfr_site, layers=layers)
    labelled = [r for r in rows if r["scorer"] != "hfr"]
    if scorer is None:
        present = {r["scorer"] for r in labelled}
        scorer = "probe_seg" if "probe_seg" in present and "fewshot" not in present else "fewshot"
    at_t = [r for r in labelled if r["timestep"] == t_star.timestep and r["scorer"] == scorer]
    if not at_t:
        raise AselectError(f"policy 'hybrid': no '{scorer}' scores at the HFR choice t={t_star.timestep}")
    best = _best_by("hybrid", at_t, scorer)
    reason = (f"{t_star.reason.split('; features:')[0]}; features: layer {best.layer} site {best.site} at "
              f"t={best.timestep} ({best.reason})")
    return Selection("hybrid", best.timestep, best.layer, best.site, best.score, best.runner_up, reason, rows)


def _rankme(rows: list[dict]) -> Selection:
    """Label-free, not spectral: the pair whose pooled features have the highest effective rank (RankMe)."""
    return _best_by("rankme", rows, "rankme")


POLICIES: dict[str, Callable[..., Selection]] = {
    "oracle": _oracle,
    "fewshot": _fewshot,
    "rankme": _rankme,
    "fixed": _fixed,
    "aselect": _aselect,
    "hybrid": _hybrid,
}


def bootstrap_confidence(policy: str, table: list[dict], per_image: np.ndarray, params: dict[str, Any],
                         resamples: int = 200, seed: int = 0) -> dict[str, Any]:
    """How often the policy picks the same (timestep, layer) when the calibration images are resampled.

    `per_image` (rows, n) holds each table row's per-image values (its score is their mean). Each resample draws
    n images with replacement and recomputes every row's mean; no new forward passes. Returns the shares of
    resamples that agree with the selection on these images: `timestep`, `layer`, and `value` (both).
    """
    values = np.asarray(per_image, dtype=np.float64)
    if values.ndim != 2 or len(values) != len(table) or values.shape[1] == 0:
        raise AselectError(f"bootstrap: per-image values of shape {values.shape} do not match "
                           f"{len(table)} table rows")
    n = values.shape[1]

    def pick(scores: np.ndarray) -> tuple[int, int]:
        rows = [{**row, "score": float(score)} for row, score in zip(table, scores, strict=True)]
        chosen = select(policy, rows, **params)
        return chosen.timestep, chosen.layer

    reference = pick(values.mean(axis=1))
    rng = np.random.default_rng(seed)
    same_t = same_l = same = 0
    for _ in range(resamples):
        t, layer = pick(values[:, rng.integers(0, n, n)].mean(axis=1))
        same_t += t == reference[0]
        same_l += layer == reference[1]
        same += (t, layer) == reference
    share = (lambda k: round(k / resamples, 4)) if resamples else (lambda k: math.nan)
    return {"value": share(same), "timestep": share(same_t), "layer": share(same_l),
            "resamples": int(resamples), "images": n, "seed": int(seed),
            "selected": {"timestep": reference[0], "layer": reference[1]}}


# Below this share of bootstrap resamples agreeing on the pair (timestep and layer), the HFR curve does not single
# out one on these images. In the benchmark every label-free HFR choice below it lost several points, while most
# above it were within 2 points of the oracle (docs/results.md has the figures).
LOW_CONFIDENCE = 0.9


# Leave-one-config-out on the bundled benchmark configs, the few-shot probe's held-out regret was below the
# label-free default's (docs/results.md; the figures live there, not here). Logged with every label-free choice.
LABELS_ADVICE = ("the label-free choice (select.policy=aselect); where the calibration images have labels, "
                 "select.policy=fewshot had the lower held-out regret in the bundled benchmark (docs/results.md)")


def unstable_choice_advice(selection: dict[str, Any]) -> str | None:
    """A one-line warning when an aselect choice is unstable under resampling of its calibration images, else None."""
    share = (selection.get("confidence") or {}).get("value")
    if share is None or share >= LOW_CONFIDENCE:
        return None
    return (f"aselect: only {100 * share:.0f}% of bootstrap resamples of the calibration images pick "
            f"t={selection['timestep']} layer {selection.get('layer')}: the label-free choice is unstable on these "
            f"images; with a few labels, select.policy=fewshot is the safer selector (docs/results.md)")


def select(policy: str, table: list[dict], **params: object) -> Selection:
    """Apply a selection policy to a score table."""
    if policy not in POLICIES:
        raise AselectError(f"unknown selection policy '{policy}'; known: {', '.join(POLICIES)}")
    fn = POLICIES[policy]
    known = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise AselectError(f"policy '{policy}' got unknown parameter(s) {', '.join(unknown)}; "
                           f"it takes: {', '.join(known)}")
    rows = [] if policy == "fixed" and not table else normalise_table(table)
    return fn(rows, **params)
