"""Benchmark (domain): selectors against the exhaustive oracle, cost side by side, and how dump and scoring scale.

No Prefect here. flows/benchmark.py runs the two flows once per selector and hands their run summaries
(`flows.pipeline.run_summary`) to `selector_row` and `config_report`; `measure_scaling` times the dump and
the Dask scoring at fractions of the dataset; `to_markdown` renders the whole report, `readme_section` the
generated section of the results page (docs/results.md) and `write_results_page` writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aselect.pipelines.config import DumpConfig, RunConfig, published_block
from aselect.storage.errors import AselectError
from aselect.storage.stages import canonical_json

log = logging.getLogger("aselect.bench")

COST_GOAL = 21.0  # the paper: ~21x less compute than exhaustive timestep search
REGRET_GOAL_POINTS = 1.0
DASK_SPEEDUP_GOAL = 1.7  # scoring with 2 workers vs 1
REGRESSION_POINTS = 1.0  # a drop larger than this against the previous run is flagged
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"

# ---------------------------------------------------------------------------------------------
#                                          Selectors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """One way of picking (t, l, s): a name, a sentence, and the `--set` overrides that make a run use it."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()
    exhaustive: bool = False
    hfr_site: str | None = None  # A-SelecT selectors: the feature HFR is computed on
    curve: bool = False  # its calibration feeds the confidence-vs-C curve
    label_free: bool = True  # a candidate default: it needs no labels (not the oracle or the few-shot probe)


def _signal_words(signal: str, cfg: RunConfig) -> str:
    """How a selector's label names its HFR signal: `plain` is the paper's, the others are ours."""
    if signal == "plain":
        return "plain"
    return f"our {signal}" + (f" (K={cfg.calibrate.draws})" if signal in ("mean", "debiased") else "")


def curve_images(cfg: RunConfig) -> int | None:
    """The calibration size the confidence-vs-C curve is bootstrapped from (None: no curve)."""
    return max(cfg.bench.confidence_images) if cfg.bench.confidence_images else None


def oracle_timesteps(cfg: RunConfig) -> list[int]:
    """The oracle's candidate timesteps: A-SelecT's own candidates, or the dump grid (`bench.oracle_grid`)."""
    if cfg.bench.oracle_grid == "calibrate":
        return cfg.calibrate.candidate_timesteps(cfg.dump)
    return sorted(cfg.dump.timesteps)


def selectors(cfg: RunConfig, depth: int) -> list[Selector]:
    """A-SelecT as configured (and with the curve's larger calibration), its HFR feature variants, few-shot,
    a fixed common pair, and the oracle on the same candidate timesteps."""
    site, configured = cfg.select.hfr_site, cfg.calibrate.signal
    largest = curve_images(cfg)
    # The curve is bootstrapped from one calibration of the largest C: the default's own when it calibrates a fixed
    # C at least that large (it may still be capped by calibrate.budget: the curve then ends at the C it used);
    # else (`auto`, or a smaller C) a calibration of that many images, uncapped, for the curve alone.
    fixed = cfg.calibrate.images if cfg.calibrate.images != "auto" else None
    own_curve = largest is not None and fixed is not None and largest <= fixed
    out = [Selector("aselect", f"A-SelecT, {_signal_words(configured, cfg)} HFR of {site} (default)",
                    ("select.policy=aselect",), hfr_site=site, curve=own_curve)]
    if largest is not None and not own_curve:
        out.append(Selector(f"aselect-c{largest}", f"A-SelecT, {_signal_words(configured, cfg)} HFR of {site}, "
                                                   f"{largest} calibration images",
                            ("select.policy=aselect", f"calibrate.images={largest}", "calibrate.budget=null"),
                            hfr_site=site, curve=True))
    for variant in cfg.bench.hfr_variants:
        if variant != site:
            out.append(Selector(f"aselect-{variant}", f"A-SelecT, {_signal_words(configured, cfg)} HFR of {variant}",
                                ("select.policy=aselect", f"calibrate.sites=[{variant}]",
                                 f"select.hfr_site={variant}"), hfr_site=variant))
    for signal in cfg.bench.hfr_signals:
        if signal != configured:
            label = (f"A-SelecT as published (plain HFR of {site})" if signal == "plain"
                     else f"A-SelecT, {_signal_words(signal, cfg)} HFR of {site}")
            out.append(Selector(f"aselect-{signal}", label,
                                ("select.policy=aselect", f"calibrate.signal={signal}"), hfr_site=site))
    # A label-free feature choice: the default's HFR t, then the feature at a fixed relative depth (the authors'
    # 9 of 24) instead of the HFR-argmax layer of the band
    block = published_block(depth)
    out.append(Selector("aselect-depth", f"A-SelecT, {_signal_words(configured, cfg)} HFR of {site} for t, then "
                                         f"{cfg.select.feature_site} of layer {block} (the authors' relative depth "
                                         f"9/24)", ("select.policy=aselect", f"select.feature_layer={block}"),
                        hfr_site=site))
    out.append(Selector("aselect-published", "A-SelecT as the authors configured it (plain HFR of query, axis "
                                             "band, cutoff 0.15, the block at 9/24 depth)",
                        ("select.policy=aselect", "select.preset=aselect-published"), hfr_site="query"))
    if cfg.bench.fewshot:
        out.append(Selector("fewshot", f"few-shot probe on the {cfg.calibrate.fixed_images()} calibration images",
                            ("select.policy=fewshot",), label_free=False))
        out.append(Selector("hybrid", f"hybrid: the default's HFR t, then layer and site by the few-shot probe on "
                                      f"{cfg.calibrate.fixed_images()} calibration images at that t",
                            ("select.policy=hybrid",), label_free=False))
    if cfg.bench.rankme:
        out.append(Selector("rankme", f"RankMe (label-free effective rank) on the {cfg.calibrate.fixed_images()} "
                                      f"calibration images", ("select.policy=rankme",)))
    layer = depth // 2 if cfg.bench.fixed_layer is None else cfg.bench.fixed_layer
    t, fixed_site = cfg.bench.fixed_timestep, cfg.bench.fixed_site
    out.append(Selector("fixed", f"fixed t={t} layer {layer} {fixed_site} (common hand-picked pair)",
                        ("select.policy=fixed", f"select.timestep={t}", f"select.layer={layer}",
                         f"select.site={fixed_site}")))
    grid = ",".join(str(t) for t in oracle_timesteps(cfg))
    out.append(Selector("oracle", "exhaustive grid, best probe score (oracle)", (f"dump.timesteps=[{grid}]",),
                        exhaustive=True, label_free=False))
    return out


def confidence_curve(table: list[dict[str, Any]], per_image: np.ndarray, policy_params: dict[str, Any],
                     sizes: Sequence[int], resamples: int, seed: int = 0, subsets: int = 8) -> list[dict[str, Any]]:
    """Bootstrap confidence of the aselect choice at each calibration size C, from one calibration of the largest.

    At each C below the pool, `subsets` random C-image subsets (seeded) are each bootstrapped and their shares
    averaged (one subset's curve is too noisy to read a threshold from); at C = pool the pool itself, so that
    point is the selection's own bootstrap. `agrees`: the share of subsets whose choice is the pool's choice.
    """
    from aselect.pipelines.select import bootstrap_confidence

    pool = per_image.shape[1]
    full = bootstrap_confidence("aselect", table, per_image, policy_params, resamples=0)["selected"]
    rng = np.random.default_rng(seed)
    points = []
    for size in sorted({int(c) for c in sizes if int(c) <= pool}):
        draws = [np.arange(pool)] if size == pool else [np.sort(rng.permutation(pool)[:size]) for _ in range(subsets)]
        runs = [bootstrap_confidence("aselect", table, per_image[:, cols], policy_params, resamples, seed)
                for cols in draws]
        points.append({"images": size, "subsets": len(runs), "resamples": resamples,
                       **{k: round(float(np.mean([r[key] for r in runs])), 4)
                          for k, key in (("confidence", "value"), ("timestep", "timestep"), ("layer", "layer"))},
                       "agrees": round(float(np.mean([r["selected"] == full for r in runs])), 4),
                       "selected": runs[0]["selected"] if len(runs) == 1 else None})
    return points


def smallest_confident(curve: list[dict[str, Any]], threshold: float = 0.9, share: str = "timestep") -> int | None:
    """The smallest C from which the bootstrap share (`timestep` by default) stays >= `threshold` at every larger C
    of the curve (None when even the largest C falls short).

    The timestep share, not the pair's: A-SelecT selects a timestep, and where two layers tie at it (digits:
    layers 2 and 3 at t=60 differ by 0.0004 in HFR) no number of images makes the layer choice stable.
    """
    smallest = None
    for point in sorted(curve, key=lambda p: p["images"], reverse=True):
        if point[share] < threshold:
            break
        smallest = point["images"]
    return smallest


# ---------------------------------------------------------------------------------------------
#                                     Rows and the report
# ---------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b > 0 else None


def selector_row(selector: Selector, summary: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """What one selector picked, what it scored on the test split and what it cost (pretraining excluded)."""
    sel, met, cost = summary["selection"], summary["metrics"], summary["cost"]
    return {"selector": selector.name, "label": selector.label, "label_free": selector.label_free,
            "timestep": sel["timestep"], "layer": sel["layer"],
            "site": sel["site"], "metric": met["metric"], "value": round(float(met["value"]), 4),
            "confidence": (sel.get("confidence") or {}).get("value"),
            "forward_passes": cost["forward_passes"], "probe_fits": cost["probe_fits"],
            "compute_seconds": cost["compute_seconds"], "wall_seconds": round(wall_seconds, 2),
            "cached_stages": cost["cached_stages"]}


def pixel_baseline(images: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
                   masks: np.ndarray | None, patch: int, cs: Sequence[float], val_fraction: float,
                   seed: int, noise_std: float = 0.0, noise_seed: int = 0,
                   mask_class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The downstream probe on raw pixels, no DiT: flattened images (classification), or each patch x patch
    block of pixels as a token on the DiT's own grid (segmentation, one class per name of `mask_class_names`, else
    per labelled mask id). What DiT features must beat. `noise_std`: the dump's sensor noise, the same draw per
    image the DiT saw."""
    from aselect.pipelines.features import sensor_noise
    from aselect.pipelines.probe import classification_probe, mask_class_count, segmentation_probe

    x = images.astype(np.float32) / 255.0  # (N, C, H, W)
    if noise_std:  # [-1, 1] units -> [0, 1] units
        x = x + sensor_noise(x.shape[1:], range(len(x)), noise_std, noise_seed).numpy() / 2
    if masks is None:
        flat = x.reshape(len(x), -1)
        result = classification_probe(flat[train_idx], labels[train_idx], flat[test_idx], labels[test_idx],
                                      Cs=cs, val_fraction=val_fraction, seed=seed)
    else:
        n, c, h, w = x.shape
        tokens = (x.reshape(n, c, h // patch, patch, w // patch, patch).transpose(0, 2, 4, 1, 3, 5)
                  .reshape(n, (h // patch) * (w // patch), c * patch * patch))
        result = segmentation_probe(tokens[train_idx], masks[train_idx], tokens[test_idx], masks[test_idx],
                                    mask_class_count(masks, mask_class_names), Cs=cs, val_fraction=val_fraction,
                                    seed=seed)
    return {"metric": result.metric, "value": round(float(result.value), 4)}


def best_pair_at(oracle_rows: list[dict[str, Any]], timestep: int) -> tuple[int, int, str] | None:
    """The pair the oracle's (cross-validated, train-split) probe score ranks best among those at `timestep`."""
    at = [r for r in oracle_rows if r["timestep"] == timestep and math.isfinite(r["score"])]
    if not at:
        return None
    best = max(at, key=lambda r: (r["score"], -r["layer"]))
    return best["timestep"], best["layer"], best["site"]


def split_regret(row: dict[str, Any], oracle_value: float, best_at_t_value: float | None) -> None:
    """Regret = timestep regret (oracle - best pair at the selected t) + feature regret (that - the selection)."""
    if best_at_t_value is None:
        row["timestep_regret_points"] = row["feature_regret_points"] = None
        return
    row["timestep_regret_points"] = round(100 * (oracle_value - best_at_t_value), 2)
    row["feature_regret_points"] = round(100 * (best_at_t_value - row["value"]), 2)


def probe_vs_timestep(oracle_rows: list[dict[str, Any]], margin: float = 0.005) -> dict[str, Any] | None:
    """Where the oracle's best probe score (over layers and sites) peaks in t, and whether that peak is interior:
    above both ends of the grid by more than `margin` (a testbed where t matters, unlike a score falling with t)."""
    best: dict[int, float] = {}
    for r in oracle_rows:
        if math.isfinite(r["score"]):
            best[r["timestep"]] = max(best.get(r["timestep"], -math.inf), r["score"])
    if len(best) < 3:
        return None
    ts = sorted(best)
    peak = max(ts, key=lambda t: (best[t], -t))
    interior = ts[0] < peak < ts[-1] and best[peak] - max(best[ts[0]], best[ts[-1]]) > margin
    return {"best_timestep": peak, "best_score": round(best[peak], 4), "score_at_smallest_t": round(best[ts[0]], 4),
            "smallest_t": ts[0], "interior_maximum": interior}


# ---------------------------------------------------------------------------------------------
#                     The attentive protocol: the authors' probe on the same pairs
# ---------------------------------------------------------------------------------------------


def attentive_pairs(timesteps: Sequence[int], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pairs the attentive protocol probes: `timesteps` at the linear oracle's layer and site (the attentive
    oracle's grid), the linear oracle's own pair, the default's pair, and every other selector's pair (so each
    candidate default has an attentive regret too); each once, with every role it plays."""
    by_name = {r["selector"]: r for r in rows}
    oracle, default = by_name["oracle"], by_name["aselect"]
    pairs: dict[tuple, list[str]] = {}
    for t in sorted(set(timesteps)):
        pairs.setdefault((int(t), oracle["layer"], oracle["site"]), []).append("grid")
    pairs.setdefault((oracle["timestep"], oracle["layer"], oracle["site"]), []).append("linear oracle")
    pairs.setdefault((default["timestep"], default["layer"], default["site"]), []).append("default")
    for r in rows:
        if r["selector"] not in ("oracle", "aselect"):
            pairs.setdefault((r["timestep"], r["layer"], r["site"]), []).append(r["selector"])
    return [{"timestep": t, "layer": layer, "site": site, "roles": roles}
            for (t, layer, site), roles in pairs.items()]


def attentive_report(runs: list[dict[str, Any]], rows: list[dict[str, Any]], epochs: int,
                     calibration: dict[str, float]) -> dict[str, Any]:
    """The attentive protocol's verdict from its runs (`attentive_pairs` with `value`, `forward_passes`,
    `compute_seconds` each): the attentive oracle (the best pair probed: the grid at the linear oracle's layer and
    site, that oracle's pair, every selector's pair), where the grid peaks in t, each selector's regret under it
    (the default's beside its linear regret), each pair's linear and attentive metric, and A-SelecT's cost against
    the attentive grid search's. `calibration`: the default's label-free part (forward passes, compute seconds)
    spent before its one attentive probe."""
    by_name = {r["selector"]: r for r in rows}
    searched = [r for r in runs if {"grid", "linear oracle"} & set(r["roles"])]
    best = max(runs, key=lambda r: (r["value"], -r["timestep"]))
    default = next(r for r in runs if "default" in r["roles"])
    profile = probe_vs_timestep([{"timestep": r["timestep"], "score": r["value"]} for r in searched])
    linear = {(r["timestep"], r["layer"], r["site"]): r["value"] for r in rows}
    attentive = {(r["timestep"], r["layer"], r["site"]): r["value"] for r in runs}
    oracle_cost = {k: round(sum(r[k] for r in searched), 3) for k in ("forward_passes", "compute_seconds")}
    aselect_cost = {k: round(calibration[k] + default[k], 3) for k in ("forward_passes", "compute_seconds")}
    selectors = {}
    for r in rows:
        value = attentive.get((r["timestep"], r["layer"], r["site"]))
        if value is not None:
            selectors[r["selector"]] = {"value": value, "regret_points": round(100 * (best["value"] - value), 2)}
    return {
        "epochs": epochs,
        "pairs": [{**r, "linear_value": linear.get((r["timestep"], r["layer"], r["site"]))} for r in runs],
        "oracle": {k: best[k] for k in ("timestep", "layer", "site", "value")},
        "profile": profile,
        "default": {k: default[k] for k in ("timestep", "layer", "site", "value")},
        "regret_points": round(100 * (best["value"] - default["value"]), 2),
        "linear_regret_points": round(100 * (by_name["oracle"]["value"] - by_name["aselect"]["value"]), 2),
        "selectors": selectors,
        "cost_ratio": {"probe_trainings": len(searched),
                       **{k: _ratio(oracle_cost[k], aselect_cost[k]) for k in oracle_cost}},
        "cost": {"oracle": oracle_cost, "aselect": aselect_cost},
    }


def attentive_lines(config: dict[str, Any]) -> list[str]:
    """The results page's lines for one config's attentive protocol (none when it was not measured)."""
    a = config.get("attentive")
    if not a:
        return []
    o, d = a["oracle"], a["default"]
    lines = [f"- attentive probe ({a['epochs']} epochs; linear -> attentive per pair): "
             + "; ".join(f"t={p['timestep']} layer {p['layer']} {p['site']} "
                         f"{'n/a' if p['linear_value'] is None else format(p['linear_value'], '.4f')} -> "
                         f"{p['value']:.4f}" for p in a["pairs"]),
             f"- attentive oracle (the best pair probed) t={o['timestep']} layer {o['layer']} {o['site']} "
             f"{o['value']:.4f}"
             + (f" ({_profile(a['profile'])})" if a.get("profile") else "")
             + f"; A-SelecT's pair {d['value']:.4f}: regret {a['regret_points']:.2f} points attentive, "
               f"{a['linear_regret_points']:.2f} linear; {a['cost_ratio']['probe_trainings']} attentive trainings "
               f"for the oracle against 1, {a['cost_ratio']['forward_passes']}x the forward passes, "
               f"{a['cost_ratio']['compute_seconds']}x the compute seconds"]
    return lines


# selectors that read labels of the calibration images, reported beside the label-free defaults
LABELLED_REFERENCES = {"fewshot": "Few-shot (labelled, on the calibration images)",
                       "hybrid": "Hybrid (HFR's t, the few-shot probe's layer and site at it)"}


def leave_one_config_out(configs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Each label-free candidate default chosen on the other configs and scored on the one left out.

    A default is chosen by the lowest worst-case regret over the configs it may see (ties: mean regret, then
    name). Per held-out config: the choice made without it, its regret there, and whether it beats the raw-pixel
    probe there. `shipped` is the choice on every config; its in-sample numbers are no evidence, the held-out
    ones are. Few-shot (labelled) is reported beside for comparison.
    """
    if len(configs) < 2:
        return None
    regrets = {c["config"]: {r["selector"]: r["regret_points"] for r in c["selectors"]} for c in configs}
    values = {c["config"]: {r["selector"]: r["value"] for r in c["selectors"]} for c in configs}
    labelled = {r["selector"] for c in configs for r in c["selectors"]
                if not r.get("label_free", r["selector"] not in ("oracle", *LABELLED_REFERENCES))}
    names = set.intersection(*(set(v) for v in regrets.values())) - labelled
    if not names:
        return None

    def rank(on: list[str]) -> list[str]:
        return sorted(names, key=lambda n: (max(regrets[c][n] for c in on),
                                            sum(regrets[c][n] for c in on) / len(on), n))

    everyone = [c["config"] for c in configs]
    held_out = []
    for c in configs:
        name = c["config"]
        chosen = rank([o for o in everyone if o != name])[0]
        pixels = (c.get("baselines") or {}).get("pixels")
        held_out.append({"config": name, "family": (c.get("grid") or {}).get("family", "dit"), "chosen": chosen,
                         "regret_points": regrets[name][chosen], "value": values[name][chosen],
                         "beats_pixels": None if pixels is None else values[name][chosen] > pixels["value"]})
    held = [h["regret_points"] for h in held_out]
    # per backbone family: each held-out config's default is still chosen on every other config, of any family
    families = {h["family"]: [g["regret_points"] for g in held_out if g["family"] == h["family"]] for h in held_out}
    table = [{"selector": n, "mean": round(sum(regrets[c][n] for c in everyone) / len(everyone), 2),
              "worst": max(regrets[c][n] for c in everyone), "per_config": {c: regrets[c][n] for c in everyone}}
             for n in rank(everyone)]
    out = {"candidates": table, "held_out": held_out, "held_out_mean": round(sum(held) / len(held), 2),
           "held_out_worst": max(held), "shipped": table[0]["selector"], "goal_points": REGRET_GOAL_POINTS,
           "per_family": {f: {"configs": len(r), "held_out_mean": round(sum(r) / len(r), 2), "held_out_worst": max(r)}
                          for f, r in sorted(families.items())}}
    for reference in LABELLED_REFERENCES:  # labelled selectors: no default is chosen among them, they are compared
        if all(reference in r for r in regrets.values()):
            few = [regrets[c][reference] for c in everyone]
            out[reference] = {"mean": round(sum(few) / len(few), 2), "worst": max(few),
                              "beats_held_out_default": max(few) < out["held_out_worst"]}
    return out


PROBE_VIEWS = {"attentive": "the attentive probe", "worst of both": "the worse of the linear and attentive probes"}


def under_probe(configs: list[dict[str, Any]], view: str) -> list[dict[str, Any]]:
    """The configs with each selector's regret under another probe (`PROBE_VIEWS`), for `leave_one_config_out`:
    `attentive` (its attentive protocol's regret; no raw-pixel baseline, which is probed linearly) or `worst of both`
    (the larger of its linear and attentive regrets). Only configs whose attentive protocol ran, and only the
    selectors it probed."""
    out = []
    for c in configs:
        attentive = (c.get("attentive") or {}).get("selectors")
        if not attentive:
            continue
        rows = []
        for r in c["selectors"]:
            a = attentive.get(r["selector"])
            if a is None:
                continue
            if view == "attentive":
                rows.append({**r, "regret_points": a["regret_points"], "value": a["value"]})
            else:
                rows.append({**r, "regret_points": max(r["regret_points"], a["regret_points"])})
        out.append({**c, "selectors": rows, "baselines": {} if view == "attentive" else c.get("baselines", {})})
    return out


def leave_one_config_out_by_probe(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """`leave_one_config_out` under each of `PROBE_VIEWS` (None where fewer than two configs have attentive rows)."""
    return {view: leave_one_config_out(under_probe(configs, view)) for view in PROBE_VIEWS}


def forward_pass_ceiling(timesteps: int, images: int, calibration_images: int,
                         oracle_timesteps: int | None = None, inputs_per_image: int = 1) -> float:
    """Exhaustive / A-SelecT forward passes: T_o*N / (K*C*T + N), T the timesteps calibration scored (the search's,
    at most the candidates), K the signal's DiT inputs per (image, t); on one grid (T_o = T) below both T and
    N / (K*C)."""
    t_oracle = timesteps if oracle_timesteps is None else oracle_timesteps
    return round(t_oracle * images / (inputs_per_image * calibration_images * timesteps + images), 2)


def config_report(config: str, rows: list[dict[str, Any]], scaling: dict[str, Any] | None,
                  pictures: dict[str, str], grid: dict[str, int],
                  curve: list[dict[str, Any]] | None = None,
                  baselines: dict[str, dict[str, Any]] | None = None,
                  t_profile: dict[str, Any] | None = None, seconds: float | None = None,
                  attentive: dict[str, Any] | None = None) -> dict[str, Any]:
    """Regret against the oracle and cost ratios (exhaustive / selector) for one config, and the goals.

    `grid` is {"timesteps", "oracle_timesteps", "images", "calibration_images"}: what bounds the forward-pass
    ratio. `curve` is the confidence-vs-C curve (`confidence_curve`).
    """
    oracle = next(r for r in rows if r["selector"] == "oracle")
    for row in rows:
        row["regret_points"] = round(100 * (oracle["value"] - row["value"]), 2)
        row["cost_ratio"] = {k: _ratio(oracle[k], row[k]) for k in ("forward_passes", "compute_seconds",
                                                                     "wall_seconds")}
    default = next(r for r in rows if r["selector"] == "aselect")
    ratio, passes = default["cost_ratio"]["compute_seconds"], default["cost_ratio"]["forward_passes"]
    goals = {
        "cost": {"goal": f">= {COST_GOAL:g}x cheaper (compute seconds)", "measured": ratio,
                 "met": ratio is not None and ratio >= COST_GOAL,
                 "forward_pass_ceiling": forward_pass_ceiling(grid["timesteps"], grid["images"],
                                                              grid["calibration_images"],
                                                              grid.get("oracle_timesteps"),
                                                              grid.get("calibration_inputs", 1))},
        "cost_forward_passes": {"goal": f">= {COST_GOAL:g}x fewer forward passes", "measured": passes,
                                "met": passes is not None and passes >= COST_GOAL},
        "regret": {"goal": f"<= {REGRET_GOAL_POINTS:g} point", "measured": default["regret_points"],
                   "met": default["regret_points"] <= REGRET_GOAL_POINTS},
    }
    if scaling and scaling.get("dask_speedup") is not None:
        speedup = scaling["dask_speedup"]
        goals["dask"] = {"goal": f">= {DASK_SPEEDUP_GOAL:g}x with 2 workers", "measured": speedup,
                         "met": speedup >= DASK_SPEEDUP_GOAL}
    if curve:
        smallest = smallest_confident(curve)
        goals["confidence"] = {"goal": f"same timestep in >= 90% of bootstrap resamples at C = "
                                       f"{grid['calibration_images']}",
                               "measured": next((p["timestep"] for p in curve
                                                 if p["images"] == grid["calibration_images"]), None),
                               "met": smallest is not None and smallest <= grid["calibration_images"],
                               "smallest_confident_images": smallest}
    for baseline in (baselines or {}).values():
        baseline["regret_points"] = round(100 * (oracle["value"] - baseline["value"]), 2)
        baseline["beaten_by_default"] = default["value"] > baseline["value"]
    return {"config": config, "metric": oracle["metric"], "grid": grid, "selectors": rows, "goals": goals,
            "scaling": scaling, "pictures": pictures, "confidence_curve": curve or [], "baselines": baselines or {},
            "probe_vs_t": t_profile, "seconds": seconds, "attentive": attentive}


def flag_regressions(configs: list[dict[str, Any]], previous: dict[str, Any] | None) -> list[str]:
    """Lines naming every (config, selector) whose metric fell by more than REGRESSION_POINTS since last run."""
    if not previous:
        return []
    before = {(c["config"], r["selector"]): r for c in previous.get("configs", []) for r in c["selectors"]}
    flags = []
    for c in configs:
        for row in c["selectors"]:
            old = before.get((c["config"], row["selector"]))
            if old and 100 * (old["value"] - row["value"]) > REGRESSION_POINTS:
                flags.append(f"{c['config']} {row['selector']}: {row['metric']} {old['value']:.4f} -> "
                             f"{row['value']:.4f}")
    return flags


def hfr_probe_spearman(hfr_rows: list[dict[str, Any]], probe_rows: list[dict[str, Any]], site: str) -> float | None:
    """Rank correlation over (t, l) between HFR of `site` and the oracle's probe score of that site (else `block`)."""
    from scipy.stats import spearmanr

    probed = {r["site"] for r in probe_rows}
    probe_site = site if site in probed else "block"
    probe = {(r["timestep"], r["layer"]): r["score"] for r in probe_rows if r["site"] == probe_site}
    pairs = [(r["score"], probe[(r["timestep"], r["layer"])]) for r in hfr_rows
             if r["scorer"] == "hfr" and r["site"] == site and (r["timestep"], r["layer"]) in probe]
    if len(pairs) < 3:
        return None
    value = float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)
    return round(value, 3) if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
#                                           Scaling
# ---------------------------------------------------------------------------------------------


def measure_scaling(model_dir: str, dataset_path: Path, grid: DumpConfig, scorer: str, params: dict[str, Any],
                    labels: np.ndarray, masks: np.ndarray | None, fractions: Sequence[float],
                    workers: Sequence[int], scratch: Path,
                    progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Seconds to dump and to score the grid at fractions of the dataset, and scoring at N with each worker count.

    Every measurement starts from an empty store in `scratch` (removed afterwards): nothing is cached.
    Scoring is timed on an already started, warmed-up Dask cluster, so cluster start-up is not in the ratio; one
    cluster of the most workers serves every fraction, the other worker counts get theirs at the full N only.
    """
    from aselect.pipelines.backbone import load_backbone  # torch and diffusers: only when measuring
    from aselect.pipelines.cluster import dask_client
    from aselect.pipelines.dump import plan_layout, run_dump
    from aselect.pipelines.grid import candidate_pairs, score_grid
    from aselect.pipelines.ingest import calibration_subset
    from aselect.storage.features import FEATURES_STORE

    backbone = load_backbone(model_dir)
    total = len(labels)
    fractions = sorted(set(fractions))
    most = max(workers)
    steps, done = len(fractions) + len(workers) - 1, 0
    points = []
    scoring_by_workers: dict[int, float] = {}
    with dask_client(None, most, 1) as widest:
        widest.run(_warm_up)  # imports on each worker, outside the timing
        for fraction in fractions:
            n = max(2, round(fraction * total))
            samples = calibration_subset(labels, np.arange(total), n, grid.seed)
            out = scratch / f"n{n}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            layout = plan_layout(backbone, samples, grid)
            dumped = run_dump(model_dir, dataset_path, out, layout, grid, backbone=backbone)
            store = out / FEATURES_STORE
            pairs = candidate_pairs(store, None if scorer == "probe_seg" else ["block", "attn", "mlp"])
            truth = {"labels": labels[samples], "masks": masks[samples] if masks is not None else None}
            for count in (workers if fraction == fractions[-1] else [most]):
                with contextlib.nullcontext(widest) if count == most else dask_client(None, count, 1) as client:
                    client.run(_warm_up)  # a no-op where already warm
                    started = time.perf_counter()
                    score_grid(client, store, scorer, pairs, params, **truth)
                    seconds = round(time.perf_counter() - started, 3)
                if fraction == fractions[-1]:
                    scoring_by_workers[count] = seconds
                if count == most:
                    score_seconds = seconds
                done += 1
                if progress:
                    progress(done / steps)
                log.info("scaling: %d images, %d pairs, %d workers: dump %.1f s, scoring %.1f s", n, len(pairs), count,
                         dumped.seconds, seconds)
            points.append({"fraction": fraction, "images": n, "dump_seconds": dumped.seconds,
                           "score_seconds": score_seconds, "pairs": len(pairs), "score_workers": most})
            shutil.rmtree(out, ignore_errors=True)
    full = points[-1]
    for p in points:
        p["dump_ratio_to_full"] = _ratio(p["dump_seconds"], full["dump_seconds"])
        p["score_ratio_to_full"] = _ratio(p["score_seconds"], full["score_seconds"])
    one = scoring_by_workers.get(1)
    speedup = _ratio(one, scoring_by_workers[most]) if one is not None and most > 1 else None
    return {"points": points, "scoring_seconds_by_workers": {str(k): v for k, v in sorted(scoring_by_workers.items())},
            "dask_speedup": speedup, "speedup_workers": most}


def _warm_up() -> None:
    import sklearn.linear_model  # noqa: F401
    import torch  # noqa: F401


# ---------------------------------------------------------------------------------------------
#                                         Rendering
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _verdict(goal: dict[str, Any]) -> str:
    return "met" if goal["met"] else "**not met**"


def _split(r: dict[str, Any]) -> str:
    t, f = r.get("timestep_regret_points"), r.get("feature_regret_points")
    return "-" if t is None else f"{t:.2f} + {f:.2f}"


def selector_table(c: dict[str, Any]) -> list[str]:
    lines = [f"| selector | pair | {c['metric']} | regret (pts) | = timestep + feature regret | confidence | "
             f"forward passes | probe fits | compute s | wall s | exhaustive / this (forward passes) | "
             f"exhaustive / this (compute s) | Spearman HFR vs probe |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in c["selectors"]:
        lines.append(f"| {r['label']} | t={r['timestep']} layer {r['layer']} {r['site']} | {r['value']:.4f} | "
                     f"{r['regret_points']:.2f} | {_split(r)} | {_fmt(r.get('confidence'), 2)} | "
                     f"{r['forward_passes']} | "
                     f"{r['probe_fits']} | {r['compute_seconds']:.1f} | {r['wall_seconds']:.1f} | "
                     f"{_fmt(r['cost_ratio']['forward_passes'], 2, 'x')} | "
                     f"{_fmt(r['cost_ratio']['compute_seconds'], 2, 'x')} | "
                     f"{_fmt(r.get('spearman_hfr_vs_probe'), 2)} |")
    return lines


def curve_table(curve: list[dict[str, Any]]) -> list[str]:
    """Confidence vs calibration size C: bootstrap shares, and whether C images pick what the whole pool picks."""
    lines = ["| C | subsets | same t | same layer | same t and layer | subsets choosing as all images do |",
             "| --- | --- | --- | --- | --- | --- |"]
    for p in curve:
        lines.append(f"| {p['images']} | {p['subsets']} | {p['timestep']:.2f} | {p['layer']:.2f} | "
                     f"{p['confidence']:.2f} | {p['agrees']:.2f} |")
    return lines


def scaling_table(s: dict[str, Any]) -> list[str]:
    lines = ["| images | dump s | dump / dump at N | scoring s | scoring / scoring at N |",
             "| --- | --- | --- | --- | --- |"]
    for p in s["points"]:
        lines.append(f"| {p['images']} ({p['fraction']:g} N) | {p['dump_seconds']:.1f} | "
                     f"{_fmt(p['dump_ratio_to_full'], 2)} | {p['score_seconds']:.1f} | "
                     f"{_fmt(p['score_ratio_to_full'], 2)} |")
    by = s["scoring_seconds_by_workers"]
    workers = ", ".join(f"{w} worker{'s' if w != '1' else ''} {sec:.1f} s" for w, sec in by.items())
    lines += ["", f"Scoring at N ({s['points'][-1]['pairs']} pairs): {workers}; speedup "
                  f"{_fmt(s['dask_speedup'], 2, 'x')}."]
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    """The full benchmark report: per config, every selector, the goals and the scaling measurements."""
    m = report["machine"]
    lines = [f"# aselect benchmark ({report['generated']})", "",
             f"Machine: {m['cores']} cores, torch {m['torch']}, {m['device']}. Command: `{report['command']}`.",
             f"{measured_words(report)}.",
             "Costs exclude ingest and pretraining (shared by every selector). "
             "Forward passes count DiT inputs x timesteps (noise_relative runs 2 inputs per image).", ""]
    for c in report["configs"]:
        lines += [f"## {c['config']} ({c['metric']})", ""] + selector_table(c) + [""]
        for name, goal in c["goals"].items():
            lines.append(f"- goal {name} ({goal['goal']}): measured {goal['measured']}, {_verdict(goal)}")
        g = c["grid"]
        searched = (f"{g['timesteps']} of {g['candidate_timesteps']}" if g.get("candidate_timesteps", g["timesteps"])
                    != g["timesteps"] else f"{g['timesteps']}")
        lines.append(f"- grid: A-SelecT searched {searched} timesteps, the oracle "
                     f"{g.get('oracle_timesteps', g['timesteps'])}; N={g['images']} images, "
                     f"C={g['calibration_images']} calibration images, K={g.get('calibration_inputs', 1)} DiT "
                     f"inputs per calibration image and t: the forward-pass ratio can be at most "
                     f"T_o*N/(K*C*T+N) = {c['goals']['cost']['forward_pass_ceiling']}x")
        if c.get("probe_vs_t"):
            lines.append(f"- probe score vs t: {_profile(c['probe_vs_t'])}")
        lines += attentive_lines(c)
        if c.get("seconds") is not None:
            lines.append(f"- this config took {c['seconds'] / 60:.1f} min in this run (pretraining included when it "
                         f"was not cached)")
        for b in c.get("baselines", {}).values():
            lines.append(f"- baseline {b['label']}: {b['metric']} {b['value']:.4f} (regret {b['regret_points']:.2f}; "
                         f"the A-SelecT default {'beats' if b['beaten_by_default'] else 'does not beat'} it)")
        if c.get("confidence_curve"):
            curve = c["confidence_curve"]
            lines += ["", f"Confidence vs calibration size C ({_resamples_words(curve)} at each C, one calibration "
                          "of the largest C; measured in this run):", ""] + curve_table(curve)
        if c["scaling"]:
            lines += ["", "Scaling (measured in this run, fresh stores):", ""] + scaling_table(c["scaling"])
        if c["pictures"]:
            lines += ["", "Pictures: " + ", ".join(f"{k} `{v}`" for k, v in c["pictures"].items())]
        lines.append("")
    for table in loco_tables(report):
        lines += table + [""]
    lines.append("Regressions against the previous run: " + ("; ".join(report["regressions"]) or "none"))
    return "\n".join(lines) + "\n"


def _resamples_words(curve: list[dict[str, Any]]) -> str:
    """`200 bootstrap resamples`, from the curve's own points (reports written before they recorded it: the
    config's `select.bootstrap`)."""
    counts = sorted({p["resamples"] for p in curve if p.get("resamples")})
    return (f"{'/'.join(str(n) for n in counts)} bootstrap resamples" if counts
            else "the config's `select.bootstrap` bootstrap resamples")


def _subsets_words(curves: list[list[dict[str, Any]]]) -> str:
    """`8 random C-image subsets`, from the curves' points below the whole calibration."""
    counts = sorted({p["subsets"] for curve in curves for p in curve[:-1] if p.get("subsets")})
    n = "/".join(str(k) for k in counts) or "several"
    return f"{n} random C-image subset{'' if counts == [1] else 's'}"


def _profile(p: dict[str, Any]) -> str:
    shape = "an interior maximum" if p["interior_maximum"] else "no interior maximum"
    return (f"best {p['best_score']:.4f} at t={p['best_timestep']} vs {p['score_at_smallest_t']:.4f} at "
            f"t={p['smallest_t']}: {shape}")


def loco_table(loco: dict[str, Any], probe: str = "the linear probe") -> list[str]:
    """Leave-one-config-out: the default each held-out config would have got, and every candidate's regrets."""
    title = "" if probe == "the linear probe" else f", under {probe}"
    lines = [f"### Choosing the default leave-one-config-out{title}", "",
             f"Each label-free candidate's regret (points) per config under {probe}; a default is the candidate with "
             "the lowest worst-case regret on the configs it was chosen on.", "",
             "| held-out config | default chosen on the others | its regret there (pts) | beats raw pixels there |",
             "| --- | --- | --- | --- |"]
    for h in loco["held_out"]:
        pixels = "-" if h["beats_pixels"] is None else "yes" if h["beats_pixels"] else "**no**"
        lines.append(f"| {h['config']} | {h['chosen']} | {h['regret_points']:.2f} | {pixels} |")
    verdict = "met" if loco["held_out_worst"] <= loco["goal_points"] else "**not met**"
    lines += ["", f"Held out: mean regret {loco['held_out_mean']:.2f}, worst {loco['held_out_worst']:.2f} "
                  f"(goal <= {loco['goal_points']:g}: {verdict}). Chosen on every config: `{loco['shipped']}`."]
    if len(loco.get("per_family") or {}) > 1:
        lines.append("Held out, by backbone family: " + "; ".join(
            f"{FAMILY_WORDS.get(f, f)} ({p['configs']} configs) mean {p['held_out_mean']:.2f}, worst "
            f"{p['held_out_worst']:.2f}" for f, p in loco["per_family"].items()) + ".")
    for reference, words in LABELLED_REFERENCES.items():
        if loco.get(reference):
            f = loco[reference]
            lines.append(f"{words}: mean {f['mean']:.2f}, worst {f['worst']:.2f}"
                         + (" -- better than any label-free default held out." if f["beats_held_out_default"]
                            else "."))
    configs = list(loco["candidates"][0]["per_config"])
    lines += ["", "| candidate | " + " | ".join(configs) + " | mean | worst |",
              "| --- |" + " --- |" * (len(configs) + 2)]
    for cand in loco["candidates"]:
        cells = " | ".join(f"{cand['per_config'][c]:.2f}" for c in configs)
        lines.append(f"| {cand['selector']} | {cells} | {cand['mean']:.2f} | {cand['worst']:.2f} |")
    return lines


def loco_tables(report: dict[str, Any]) -> list[list[str]]:
    """Every leave-one-config-out table of a report: under the linear probe, then under each of `PROBE_VIEWS`."""
    views = [(report.get("leave_one_config_out"), "the linear probe")]
    views += [(loco, PROBE_VIEWS[view]) for view, loco in (report.get("leave_one_config_out_by_probe") or {}).items()]
    return [loco_table(loco, probe) for loco, probe in views if loco]


RESULTS_PAGE = "docs/results.md"  # where `make bench` writes the results page (`aselect bench --readme`)


def _measured_on(report: dict[str, Any]) -> str:
    """`2 CPU cores, no GPU, 2026-11-27`: the machine and date a report was measured on."""
    m = report["machine"]
    return f"{m['cores']} CPU cores, {m['device']}, {report['generated'][:10]}"


# ---------------------------------------------------------------------------
# Reports measured by earlier runs (`aselect bench --reuse`)
# ---------------------------------------------------------------------------

RUN_FIELDS = ("generated", "machine", "bench_code", "command")  # what names the run that measured a report


def config_digest(cfg: RunConfig) -> str:
    """A resolved config's digest (its workdir left out): a reused report must come from the same config."""
    return hashlib.sha256(canonical_json(cfg.model_dump(mode="json", exclude={"workdir"})).encode()).hexdigest()[:16]


def measured_stamp(report: dict[str, Any], cfg: RunConfig | None = None) -> dict[str, Any]:
    """Which run measured a config's report: its date, machine, bench code and command (and the config's digest
    when known), taken from a whole benchmark report's header."""
    stamp = {k: report[k] for k in RUN_FIELDS}
    return stamp | ({"config_digest": config_digest(cfg)} if cfg is not None else {})


def check_reused_config(cfg: RunConfig, reused: dict[str, dict[str, Any]]) -> None:
    """Refuse, in one line, a reused report of `cfg` that recorded another version of it (a report from before
    config digests were recorded is taken as it is)."""
    recorded = reused.get(cfg.name, {}).get("measured", {}).get("config_digest")
    if recorded is not None and recorded != config_digest(cfg):
        raise AselectError(f"{cfg.name}: the reused report was measured on another version of this config "
                           f"({recorded} vs {config_digest(cfg)}); leave it out of --reuse to measure it again")


def reused_reports(paths: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Per config name, its report from earlier benchmark results (`results.json` files), each stamped with the
    run that measured it. A config found in two files is refused: which one to keep would be a guess."""
    found: dict[str, dict[str, Any]] = {}
    origin: dict[str, Path] = {}
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise AselectError(f"{path}: cannot read benchmark results to reuse "
                               f"({type(exc).__name__}: {exc})") from None
        header = (*RUN_FIELDS, "configs")
        if not isinstance(report, dict) or any(k not in report for k in header) \
                or not isinstance(report["configs"], list):
            raise AselectError(f"{path}: not benchmark results (a results.json written by `aselect bench` has "
                               f"{', '.join(header)})")
        for config in report["configs"]:
            if not isinstance(config, dict) or not isinstance(config.get("config"), str):
                raise AselectError(f"{path}: a config report without a `config` name")
            name = config["config"]
            if name in found:
                raise AselectError(f"{path}: config {name!r} is also in {origin[name]}; reuse it from one file only")
            found[name], origin[name] = config | {"measured": config.get("measured") or measured_stamp(report)}, path
    return found


def measured_groups(report: dict[str, Any]) -> list[tuple[dict[str, Any], list[str]]]:
    """The runs that measured a report's configs, in the report's order, each with the configs it measured; a
    config without a stamp was measured by the report's own run."""
    groups: list[tuple[dict[str, Any], list[str]]] = []
    for c in report["configs"]:
        stamp = c.get("measured") or measured_stamp(report)
        key = {k: stamp[k] for k in RUN_FIELDS}
        for seen, names in groups:
            if seen == key:
                names.append(c["config"])
                break
        else:
            groups.append((key, [c["config"]]))
    return groups


def measured_words(report: dict[str, Any]) -> str:
    """Where and when a report's figures were measured: one machine and date, or per run when configs come from
    several (`--reuse`)."""
    groups = measured_groups(report)
    if len(groups) <= 1:
        return f"Measured on {_measured_on(report)}"
    # each run's bench code stays in results.json (`measured`): the page names runs by their command
    runs = "; ".join(f"{', '.join(names)} on {_measured_on(stamp)} (`{stamp['command']}`)" for stamp, names in groups)
    return f"Measured by {len(groups)} runs: {runs}. Assembled on {report['generated'][:10]}"


FAMILY_WORDS = {"dit": "DiT, DDPM", "sd3": "MMDiT, flow"}


def _named(config: dict[str, Any]) -> str:
    """A config's name with its backbone family, when the report recorded it."""
    family = config.get("grid", {}).get("family")
    return f"{config['config']} ({FAMILY_WORDS.get(family, family)})" if family else config["config"]


def readme_section(report: dict[str, Any]) -> str:
    """The generated section of the results page: one table of every selector vs the oracle per config, the
    baselines, the default chosen leave-one-config-out, the goals, and the command that regenerates it."""
    command = report["command"] if "--readme" in report["command"] else f"{report['command']} --readme {RESULTS_PAGE}"
    lines = [README_START, "", f"{measured_words(report)}; generated from `bench/results.json` by:", "",
             "```sh", command, "```", "",
             "| config | selector | pair | metric | regret (pts) | = timestep + feature regret | confidence | "
             "forward passes | compute s | exhaustive / this (forward passes) | exhaustive / this (compute s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in report["configs"]:
        for r in c["selectors"]:
            lines.append(f"| {_named(c)} | {r['label']} | t={r['timestep']} layer {r['layer']} {r['site']} | "
                         f"{c['metric']} {r['value']:.4f} | {r['regret_points']:.2f} | {_split(r)} | "
                         f"{_fmt(r.get('confidence'), 2)} | {r['forward_passes']} | {r['compute_seconds']:.1f} | "
                         f"{_fmt(r['cost_ratio']['forward_passes'], 2, 'x')} | "
                         f"{_fmt(r['cost_ratio']['compute_seconds'], 2, 'x')} |")
    with_baselines = [c for c in report["configs"] if c.get("baselines")]
    if with_baselines:
        lines += ["", "Baselines (no DiT, or a DiT that learned nothing), probed like the selectors' features:", "",
                  "| config | baseline | metric | regret (pts) | A-SelecT default beats it |",
                  "| --- | --- | --- | --- | --- |"]
        for c in with_baselines:
            for b in c["baselines"].values():
                lines.append(f"| {c['config']} | {b['label']} | {b['metric']} {b['value']:.4f} | "
                             f"{b['regret_points']:.2f} | {'yes' if b['beaten_by_default'] else '**no**'} |")
    for table in loco_tables(report):
        lines += [""] + table
    profiles = [c for c in report["configs"] if c.get("probe_vs_t")]
    if profiles:
        lines += ["", "Where the oracle's probe score peaks in t, and what each config took in this run:", ""]
        for c in profiles:
            took = "" if c.get("seconds") is None else f"; {c['seconds'] / 60:.1f} min"
            lines.append(f"- {c['config']}: {_profile(c['probe_vs_t'])}{took}")
    lines += ["", "Goals (A-SelecT default):", ""]
    for c in report["configs"]:
        parts = [f"{name} {goal['measured']} ({goal['goal']}: {_verdict(goal)})" for name, goal in c["goals"].items()]
        g = c["grid"]
        lines.append(f"- {c['config']}: " + "; ".join(parts) + f". Ceiling of the forward-pass ratio with "
                     f"T={g['timesteps']} (oracle {g.get('oracle_timesteps', g['timesteps'])}), N={g['images']}, "
                     f"C={g['calibration_images']}, K={g.get('calibration_inputs', 1)}: "
                     f"{c['goals']['cost']['forward_pass_ceiling']}x")
    curves = [c for c in report["configs"] if c.get("confidence_curve")]
    if curves:
        sizes = sorted({p["images"] for c in curves for p in c["confidence_curve"]})
        resamples = _resamples_words([p for c in curves for p in c["confidence_curve"]])
        lines += ["", f"Stability of the A-SelecT choice vs calibration size C: share of {resamples} of C images that "
                      f"pick the same timestep / the same (timestep, layer) pair, averaged over "
                      f"{_subsets_words([c['confidence_curve'] for c in curves])} of one calibration:", "",
                  "| config | " + " | ".join(f"C={n}" for n in sizes) + " |",
                  "| --- |" + " --- |" * len(sizes)]
        for c in curves:
            at = {p["images"]: p for p in c["confidence_curve"]}
            cells = [f"{at[n]['timestep']:.2f} / {at[n]['confidence']:.2f}" if n in at else "-" for n in sizes]
            lines.append(f"| {c['config']} | " + " | ".join(cells) + " |")
    scaled = [c for c in report["configs"] if c["scaling"]]
    if scaled:
        lines += ["", "Scaling (dump and scoring seconds at fractions of the N images, relative to all N; scoring "
                  "speedup with the most Dask workers over 1):", ""]
        for c in scaled:
            s = c["scaling"]
            fractions = ", ".join(f"{p['fraction']:g} N" for p in s["points"])
            dumps = ", ".join(_fmt(p["dump_ratio_to_full"], 2) for p in s["points"])
            scores = ", ".join(_fmt(p["score_ratio_to_full"], 2) for p in s["points"])
            workers = s.get("speedup_workers") or max(int(w) for w in s["scoring_seconds_by_workers"])
            lines.append(f"- {c['config']} (at {fractions}): dump {dumps}; scoring {scores}; {workers}-worker "
                         f"speedup {_fmt(s['dask_speedup'], 2, 'x')}")
    lines += ["", README_END]
    return "\n".join(lines)


def results_page(report: dict[str, Any]) -> str:
    """A whole results page: a title, and the generated section (which names the machine and date)."""
    return ("# Benchmark results\n\nEvery selector against the exhaustive linear-probe oracle. The section between "
            "the `bench:start` and `bench:end` markers is generated by `aselect bench --readme`; a rerun replaces "
            f"only that section.\n\n{readme_section(report)}\n")


def results_json_copy(page: Path) -> Path:
    """Where `aselect bench --readme PAGE` copies results.json: `bench/` beside the page, or beside `docs/` for a
    page in a `docs/` folder (docs/results.md -> bench/results.json)."""
    root = page.parent.parent if page.parent.name == "docs" else page.parent
    return root / "bench" / "results.json"


def write_results_page(page: Path, report: dict[str, Any]) -> None:
    """Write the results page: replace the section between the bench markers when `page` has them, else write
    the whole page (`results_page`)."""
    text = page.read_text() if page.is_file() else ""
    start, end = text.find(README_START), text.find(README_END)
    if 0 <= start < end:
        page.write_text(text[:start] + readme_section(report) + text[end + len(README_END):])
        return
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(results_page(report))
