"""The plan of each flow and selection policy: which dump it takes and which scorer reads it, decided here alone.

- A-SelecT (`select.policy: aselect`): calibrate = streamed HFR (`calibrate.signal`) of `calibrate.sites` on the
  calibration subset, only the layers the policy reads; scorer `hfr`. Which timesteps are scored (coarse to
  fine) and how many images (rounds until the choice is stable, within a share of the exhaustive run's forward
  passes) is the `CalibrationSearch` below.
- Few-shot and RankMe (the other calibrated policies): pooled features (token maps for few-shot segmentation) of
  the same subset at the same timesteps; scorer `fewshot` / `probe_seg` / `rankme`.
- Exhaustive (the oracle): every pooled site (and token maps for segmentation) of the dump grid for every image;
  scorer `probe` / `probe_seg`.
- After a selection: the selected pair alone, for every image (token maps for segmentation).
The benchmark's selectors are these plans with `--set` overrides (pipelines/benchmark.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from aselect.pipelines.config import DumpConfig, RunConfig
from aselect.pipelines.select import aselect_curve, bootstrap_confidence
from aselect.pipelines.streamed import HfrStream

log = logging.getLogger("aselect.calibrate")

# what pooled scorers read (attention maps have no pooled form)
POOLED_SITES = ("block", "attn", "mlp", "query", "key", "value")


@dataclass(frozen=True)
class Calibration:
    """The cheap path's calibration dump, what its forward pass streams, and the scorer that reads it."""

    dump: DumpConfig
    hfr: HfrStream | None  # None: pooled features are stored instead
    scorer: str
    keep_maps: bool = False


def calibration(cfg: RunConfig, segmentation: bool, layers: list[int] | None) -> Calibration:
    """The calibration of `cfg.select.policy` (aselect, fewshot or rankme); `layers` those aselect reads."""
    timesteps = cfg.calibrate.candidate_timesteps(cfg.dump)
    if cfg.select.policy in ("fewshot", "rankme"):
        spatial = segmentation and cfg.select.policy == "fewshot"  # the few-shot segmentation probe reads maps
        dump = cfg.dump.model_copy(update={"timesteps": timesteps, "spatial": spatial,
                                           "sites": [s for s in cfg.dump.sites if s in POOLED_SITES]})
        scorer = "rankme" if cfg.select.policy == "rankme" else "probe_seg" if segmentation else "fewshot"
        return Calibration(dump, None, scorer)
    dump = cfg.dump.model_copy(update={"timesteps": timesteps, "sites": list(cfg.calibrate.sites), "spatial": False,
                                       "layers": layers})
    return Calibration(dump, hfr_stream(cfg), "hfr", keep_maps=cfg.calibrate.keep_maps)


def hfr_stream(cfg: RunConfig) -> HfrStream:
    """What an aselect calibration reduces in the forward pass: the signal of `calibrate.sites`, HFR's knobs."""
    return HfrStream(sites=tuple(cfg.calibrate.sites), cutoff=cfg.score.hfr_cutoff,
                     exclude_dc=cfg.score.hfr_exclude_dc, band=cfg.score.hfr_band, signal=cfg.calibrate.signal,
                     draws=cfg.calibrate.signal_draws())


def exhaustive(dump: DumpConfig, segmentation: bool) -> tuple[DumpConfig, str]:
    """The exhaustive path's dump (every pooled site; token maps too for segmentation) and the probe scoring it."""
    grid = dump.model_copy(update={"sites": [s for s in dump.sites if s in POOLED_SITES], "spatial": segmentation})
    return grid, "probe_seg" if segmentation else "probe"


def selected_pair(dump: DumpConfig, selection: dict[str, Any], segmentation: bool) -> DumpConfig:
    """The dump of the selected pair alone, for every image, whatever its timestep."""
    return dump.model_copy(update={"timesteps": [selection["timestep"]], "layers": [selection["layer"]],
                                   "sites": [selection["site"]], "spatial": segmentation})


def scored_sites(needs: str) -> list[str] | None:
    """The sites a scorer reading `needs` (pipelines.scoring.Scorer.needs) scores; None: every site."""
    return list(POOLED_SITES) if needs == "pooled" else None


# ---------------------------------------------------------------------------------------------
#                          The aselect calibration: how many images, which t
# ---------------------------------------------------------------------------------------------

ROUND_IMAGES = 16  # images per round of an `auto` calibration: one chunk of its store
COARSE_POINTS = 10  # timesteps per level of the coarse-to-fine search, about
REFINE_PEAKS = 3  # the best points of a level whose neighbourhoods the next level scores
# The stop rule's own bootstrap: fixed here, so select.bootstrap (the record's) never re-runs calibration.
STOP_RESAMPLES = 200
STOP_SEED = 0


class CalibrationSearch(BaseModel):
    """What an aselect calibration may compute, decided before it runs from the config and the dataset's size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: int = Field(ge=1)  # at most this many images: the calibration store's rows
    round_images: int = Field(ge=1)  # images per round (= images: one round, no stop rule)
    grow: bool  # `auto`: rounds until the bootstrap choice is stable
    stable_share: float
    strides: tuple[int, ...]  # candidate-index strides of the search's levels, coarse to 1
    hfr_site: str
    layers: tuple[int, ...]  # the band the policy averages HFR over
    feature_layer: int | str
    inputs_per_image: int
    ceiling: int  # C's ceiling from the config and N, before the budget
    budget: int | None  # forward passes calibration may spend; None: no cap
    exhaustive: int  # forward passes of the exhaustive run on the same dataset

    @property
    def params(self) -> dict[str, Any]:
        """The aselect policy's parameters that decide (t, layer)."""
        return {"hfr_site": self.hfr_site, "layers": list(self.layers), "feature_layer": self.feature_layer}


def search_strides(candidates: int, search: str = "coarse") -> tuple[int, ...]:
    """Strides of the search's levels: about COARSE_POINTS points first, then COARSE_POINTS / 2 times finer
    each level (a level scores about COARSE_POINTS points around each peak), down to every candidate."""
    if search == "full" or candidates <= COARSE_POINTS + 1:
        return (1,)
    strides = [max(1, round(candidates / COARSE_POINTS))]
    while strides[-1] > 1:
        strides.append(max(1, round(2 * strides[-1] / COARSE_POINTS)))
    return tuple(strides)


def level_points(candidates: int, strides: Sequence[int], level: int, peaks: Sequence[int] = ()) -> list[int]:
    """Candidate indices a level scores: every strides[0]-th (and the last) at level 0; at level l, the points
    strides[l] apart strictly within strides[l - 1] of each peak."""
    if level == 0:
        points = list(range(0, candidates, strides[0]))
        return points if points[-1] == candidates - 1 else [*points, candidates - 1]
    wide, step = strides[level - 1], strides[level]
    out = {p + sign * j for p in peaks for j in range(step, wide, step) for sign in (-1, 1)}
    return sorted(i for i in out if 0 <= i < candidates)


def search_bound(candidates: int, strides: Sequence[int]) -> int:
    """The most timesteps the search scores: level 0, plus REFINE_PEAKS neighbourhoods per later level."""
    total = len(level_points(candidates, strides, 0))
    for wide, step in zip(strides[:-1], strides[1:], strict=True):
        total += REFINE_PEAKS * 2 * (math.ceil(wide / step) - 1)
    return min(total, candidates)


def calibration_search(cfg: RunConfig, images: int, train: int, layers: Sequence[int],
                       segmentation: bool) -> CalibrationSearch:
    """The aselect calibration's search for a dataset of `images` images, `train` of them in the train split.

    C's ceiling: `calibrate.images`, or for `auto` min(images_max, max(ROUND_IMAGES, ceil(images_fraction x N))),
    never above N. The budget: `calibrate.budget` x the exhaustive run's forward passes (every image at every
    dump timestep, `exhaustive`); C is capped so that C x (the most timesteps the search scores) x inputs per
    image fits in it.
    """
    c = cfg.calibrate
    strides = search_strides(len(c.candidate_timesteps(cfg.dump)), c.search)
    inputs = hfr_stream(cfg).inputs_per_image
    exhaustive_passes = images * len(exhaustive(cfg.dump, segmentation)[0].timesteps)
    grow = c.images == "auto"
    wanted = min(c.images_max, max(ROUND_IMAGES, math.ceil(c.images_fraction * train))) if grow else int(c.images)
    ceiling = max(1, min(wanted, train))
    budget = None if c.budget is None else int(c.budget * exhaustive_passes)
    cap = ceiling
    if budget is not None:
        per_image = search_bound(len(c.candidate_timesteps(cfg.dump)), strides) * inputs
        cap = max(1, min(ceiling, budget // per_image))  # one image even when it alone is past the budget
    return CalibrationSearch(images=cap, round_images=min(ROUND_IMAGES, cap) if grow else cap, grow=grow,
                             stable_share=c.stable_share, strides=strides, hfr_site=cfg.select.hfr_site,
                             layers=tuple(sorted(layers)), feature_layer=cfg.select.feature_layer,
                             inputs_per_image=inputs, ceiling=ceiling, budget=budget, exhaustive=exhaustive_passes)


def round_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """An order of a calibration subset whose every prefix keeps its class proportions: classes interleaved by
    rank within the class (seeded shuffle per class), so each round of images is a stratified sample too."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels))
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        keys[rng.permutation(members)] = (np.arange(len(members)) + 0.5) / len(members)
    return np.lexsort((labels, keys))


def hfr_rows(timesteps: Sequence[int], layers: Sequence[int], sites: Sequence[str],
             values: np.ndarray) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Score-table rows of per-image HFR values (timestep, layer, site, image), and the values (rows, images)."""
    rows, per_image = [], []
    for ti, t in enumerate(timesteps):
        for li, layer in enumerate(layers):
            for si, site in enumerate(sites):
                per_image.append(values[ti, li, si])
                rows.append({"timestep": int(t), "layer": int(layer), "site": site, "scorer": "hfr",
                             "score": float(np.mean(values[ti, li, si]))})
    return rows, np.stack(per_image)


# computes (if not done) and returns per-image values (len(indices), layer, site, images) of the first `rounds`
Measure = Callable[[list[int], int], np.ndarray]


@dataclass
class SearchOutcome:
    """What a calibration search did: images and rounds used, why it stopped, the candidate indices scored."""

    images: int
    rounds: int
    stopped: str  # stable | ceiling | budget (rounds ran out) | fixed (an integer calibrate.images)
    scored: list[int]
    levels: list[int]  # timesteps scored per level
    shares: list[float] = field(default_factory=list)  # the stop rule's bootstrap share after each round

    def record(self, search: CalibrationSearch, candidates: int) -> dict[str, Any]:
        """The selection record's `calibration` entry."""
        return {"images": self.images, "rounds": self.rounds, "round_images": search.round_images,
                "stopped": self.stopped, "shares": self.shares, "stable_share": search.stable_share,
                "ceiling": search.ceiling, "capped": search.images < search.ceiling,
                "timesteps_scored": len(self.scored), "timesteps_candidates": candidates, "levels": self.levels,
                "forward_passes": self.images * len(self.scored) * search.inputs_per_image,
                "budget": search.budget, "exhaustive_forward_passes": search.exhaustive}


def run_search(search: CalibrationSearch, timesteps: Sequence[int], layers: Sequence[int], sites: Sequence[str],
               measure: Measure) -> SearchOutcome:
    """Calibrate in rounds on the coarse timesteps until the choice is stable (or C's cap), then score finer
    timesteps around the best ones with the same images. Deterministic: every decision reads only values that
    the same seeds reproduce, so a resumed search takes the same path and recomputes none of them."""
    n = len(timesteps)
    if search.images < search.ceiling and search.budget is not None:
        log.info("calibrate: C capped at %d images (of %d) by calibrate.budget: at most %d forward passes, %s of the "
                 "exhaustive run's %d", search.images, search.ceiling, search.budget,
                 f"{search.budget / search.exhaustive:.0%}", search.exhaustive)
    coarse = level_points(n, search.strides, 0)
    rounds_max = math.ceil(search.images / search.round_images)
    values: dict[int, np.ndarray] = {}
    shares: list[float] = []
    rounds = 0
    while True:
        rounds += 1
        values.update(zip(coarse, measure(coarse, rounds), strict=True))
        images = min(rounds * search.round_images, search.images)
        if not search.grow:
            stopped = "fixed"
            break
        rows, per_image = hfr_rows([timesteps[i] for i in coarse], layers, sites, np.stack([values[i] for i in coarse]))
        share = bootstrap_confidence("aselect", rows, per_image, search.params, STOP_RESAMPLES, STOP_SEED)["value"]
        shares.append(share)
        log.info("calibrate: round %d, %d images on %d timesteps: %.0f%% of %d bootstrap resamples agree", rounds,
                 images, len(coarse), 100 * share, STOP_RESAMPLES)
        if share >= search.stable_share:
            stopped = "stable"
            break
        if rounds == rounds_max:
            stopped = "budget" if search.images < search.ceiling else "ceiling"
            break
    levels = [len(coarse)]
    for level in range(1, len(search.strides)):
        scored = sorted(values)
        rows, _ = hfr_rows([timesteps[i] for i in scored], layers, sites, np.stack([values[i] for i in scored]))
        curve = aselect_curve(rows, search.hfr_site, search.layers)
        peaks = sorted(scored, key=lambda i: (-curve[timesteps[i]], i))[:REFINE_PEAKS]
        new = [i for i in level_points(n, search.strides, level, peaks) if i not in values]
        if new:
            values.update(zip(new, measure(new, rounds), strict=True))
        levels.append(len(new))
    return SearchOutcome(images=images, rounds=rounds, stopped=stopped, scored=sorted(values), levels=levels,
                         shares=shares)
