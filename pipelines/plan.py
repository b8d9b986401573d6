"""The plan of each flow and selection policy: which dump it takes and which scorer reads it, decided here alone.

- A-SelecT (`select.policy: aselect`): calibrate = streamed HFR (`calibrate.signal`) of `calibrate.sites` on the
  calibration subset at every candidate timestep, only the layers the policy reads; scorer `hfr`.
- Few-shot and RankMe (the other calibrated policies): pooled features (token maps for few-shot segmentation) of
  the same subset at the same timesteps; scorer `fewshot` / `probe_seg` / `rankme`.
- Exhaustive (the oracle): every pooled site (and token maps for segmentation) of the dump grid for every image;
  scorer `probe` / `probe_seg`.
- After a selection: the selected pair alone, for every image (token maps for segmentation).
The benchmark's selectors are these plans with `--set` overrides (pipelines/benchmark.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aselect.pipelines.config import DumpConfig, RunConfig
from aselect.pipelines.streamed import HfrStream

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
