"""The aselect calibration's search: t coarse to fine, C in rounds until the choice is stable, within a budget of
the exhaustive run's forward passes; and a killed calibration resuming its finished rounds."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from test_faults import aselect, assert_same_stage, complete_stages, finish

from aselect.pipelines import plan
from aselect.pipelines.config import load_config
from aselect.pipelines.select import select

TIMESTEPS = list(range(0, 1000, 20))  # the bundled configs' 50 candidates
LAYERS, SITES = (2, 3), ("attn",)
PARAMS = {"hfr_site": "attn", "layers": list(LAYERS), "feature_layer": "argmax"}


def search(images: int, round_images: int, grow: bool, strides: tuple[int, ...], stable_share: float = 0.95,
           ceiling: int | None = None) -> plan.CalibrationSearch:
    return plan.CalibrationSearch(images=images, round_images=round_images, grow=grow, stable_share=stable_share,
                                  strides=strides, hfr_site="attn", layers=LAYERS, feature_layer="argmax",
                                  inputs_per_image=2, ceiling=ceiling or images, budget=None, exhaustive=0)


class Synthetic:
    """Per-image values (timestep, layer, site, image) of a curve plus per-image noise; counts what is measured."""

    def __init__(self, curve: np.ndarray, noise: float, images: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        layer_gain = np.array([1.0, 0.9])[None, :, None, None]  # layer 2 always above layer 3
        self.values = curve[:, None, None, None] * layer_gain + noise * rng.standard_normal(
            (len(curve), len(LAYERS), len(SITES), images))
        self.measured: set[tuple[int, int]] = set()  # (timestep index, image) computed

    def __call__(self, indices: list[int], rounds: int, round_images: int) -> np.ndarray:
        n = min(rounds * round_images, self.values.shape[-1])
        self.measured |= {(i, j) for i in indices for j in range(n)}
        return self.values[indices][..., :n]

    def choice(self, indices: list[int], images: int) -> tuple[int, int]:
        rows, _ = plan.hfr_rows([TIMESTEPS[i] for i in indices], LAYERS, SITES, self.values[indices][..., :images])
        chosen = select("aselect", rows, **PARAMS)
        return chosen.timestep, chosen.layer


def test_coarse_to_fine_finds_the_full_grid_peak_of_a_unimodal_curve_for_fewer_timesteps() -> None:
    strides = plan.search_strides(len(TIMESTEPS))
    assert strides == (5, 1) and len(plan.level_points(len(TIMESTEPS), strides, 0)) == 11
    bound = plan.search_bound(len(TIMESTEPS), strides)
    for peak in range(len(TIMESTEPS)):  # the peak anywhere: on the coarse grid, between its points, at the ends
        curve = 2.0 - np.abs(np.arange(len(TIMESTEPS)) - peak - 0.3) / len(TIMESTEPS)
        data = Synthetic(curve, noise=0.01, images=32, seed=peak)
        fixed = search(32, 32, grow=False, strides=strides)
        outcome = plan.run_search(fixed, TIMESTEPS, LAYERS, SITES, lambda i, r, data=data: data(i, r, 32))
        assert data.choice(outcome.scored, 32) == data.choice(list(range(len(TIMESTEPS))), 32), peak
        assert len(outcome.scored) <= bound < len(TIMESTEPS) and sum(outcome.levels) == len(outcome.scored)
        assert {i for i, _ in data.measured} == set(outcome.scored)  # nothing measured beyond what is scored
        record = outcome.record(fixed, len(TIMESTEPS))
        assert record["forward_passes"] == 32 * len(outcome.scored) * 2 < 32 * len(TIMESTEPS) * 2


def test_full_search_scores_every_candidate() -> None:
    assert plan.search_strides(len(TIMESTEPS), "full") == (1,) and plan.search_strides(10) == (1,)
    data = Synthetic(np.linspace(0.0, 1.0, len(TIMESTEPS)), noise=0.01, images=16)
    outcome = plan.run_search(search(16, 16, grow=False, strides=(1,)), TIMESTEPS, LAYERS, SITES,
                              lambda i, r: data(i, r, 16))
    assert outcome.scored == list(range(len(TIMESTEPS))) and outcome.levels == [len(TIMESTEPS)]


def test_auto_stops_after_one_round_on_a_stable_curve_and_grows_on_an_unstable_one() -> None:
    strides = plan.search_strides(len(TIMESTEPS))
    stable = Synthetic(np.exp(-((np.arange(50) - 20) / 6.0) ** 2), noise=0.05, images=128)
    grown = search(128, 16, grow=True, strides=strides, ceiling=128)
    outcome = plan.run_search(grown, TIMESTEPS, LAYERS, SITES, lambda i, r: stable(i, r, 16))
    assert (outcome.stopped, outcome.rounds, outcome.images) == ("stable", 1, 16) and outcome.shares[0] >= 0.95
    assert max(j for _, j in stable.measured) == 15  # no image of a later round was computed
    # two plateaus 0.1% apart under per-image noise 40x larger: no 16-image round settles it
    flat = np.where(np.arange(50) < 25, 1.0, 1.001)
    unstable = Synthetic(flat, noise=0.04, images=128, seed=1)
    outcome = plan.run_search(grown, TIMESTEPS, LAYERS, SITES, lambda i, r: unstable(i, r, 16))
    assert outcome.rounds > 1 and len(outcome.shares) == outcome.rounds
    assert outcome.stopped == "stable" or (outcome.stopped, outcome.images) == ("ceiling", 128)
    assert all(share < 0.95 for share in outcome.shares[:-1])
    assert max(j for _, j in unstable.measured) == outcome.images - 1


def test_the_round_order_keeps_class_proportions_in_every_round() -> None:
    labels = np.repeat([0, 1, 2], [64, 32, 32])
    order = plan.round_order(labels, seed=3)
    assert sorted(order) == list(range(len(labels))) and np.array_equal(order, plan.round_order(labels, seed=3))
    for end in range(16, len(labels) + 1, 16):
        counts = np.bincount(labels[order[:end]], minlength=3)
        assert abs(counts[0] - end / 2) <= 1 and abs(counts[1] - end / 4) <= 1, (end, counts)


@pytest.mark.parametrize("config", ["digits", "mnist5k", "smoke"])
def test_calibration_stays_within_half_the_exhaustive_forward_passes_for_any_n(config: str) -> None:
    """Worst case (every round, every refinement) of the default run against `--exhaustive`, N from 30 to 100,000.
    Up to a few thousand images the budget binds (a ratio near 1 / (budget + 1 / timesteps)); past the ceiling of
    C the advantage grows with N."""
    ratios = []
    for images in (30, 100, 200, 1000, 5000, 20000, 100000):
        cfg = load_config(config, ["calibrate.images=auto"])
        found = plan.calibration_search(cfg, images, int(0.75 * images), [0], segmentation=False)
        worst = found.images * plan.search_bound(len(cfg.calibrate.candidate_timesteps(cfg.dump)), found.strides) * 2
        exhaustive = images * len(cfg.dump.timesteps)
        assert found.exhaustive == exhaustive and worst <= found.budget == exhaustive // 2
        assert worst + images < exhaustive  # plus the selected pair's dump of every image
        assert found.images <= min(256, max(16, int(np.ceil(0.125 * 0.75 * images))))
        ratios.append(exhaustive / (worst + images))
    assert min(ratios) > 1.3 and ratios[3:] == sorted(ratios[3:]) and ratios[-1] > 2 * ratios[3]
    # an integer calibrate.images is capped by the same budget; none is not
    capped = plan.calibration_search(load_config(config, ["calibrate.images=256"]), 200, 150, [0], False)
    free = plan.calibration_search(load_config(config, ["calibrate.images=256", "calibrate.budget=null"]), 200, 150,
                                   [0], False)
    assert capped.images < capped.ceiling == free.images == 150 and not capped.grow


# ---------------------------------------------------------------------------------------------
#                                  End to end on the smoke config
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_default_run_spends_fewer_forward_passes_than_the_exhaustive_one(run_cli, tmp_path: Path) -> None:
    workdir = str(tmp_path / "w")
    cheap = json.loads(run_cli("run", "smoke", "--workdir", workdir, "--json", check=True).stdout)
    full = json.loads(run_cli("run", "smoke", "--workdir", workdir, "--exhaustive", "--json", check=True).stdout)
    assert cheap["cost"]["forward_passes"] < full["cost"]["forward_passes"]
    spent = cheap["selection"]["calibration"]
    assert spent["exhaustive_forward_passes"] == full["cost"]["forward_passes"]
    assert spent["forward_passes"] <= spent["budget"] == full["cost"]["forward_passes"] // 2
    assert cheap["cost"]["forward_passes"] == spent["forward_passes"] + 200  # plus the selected pair, every image
    assert cheap["selection"]["confidence"]["images"] == spent["images"]


# 2 timesteps 1 apart: their HFR differs by less than the noise draws do, so the choice needs rounds
ROUNDS = ("calibrate.images=auto", "calibrate.images_fraction=0.32", "calibrate.timesteps=[500, 501]")


@pytest.mark.slow
def test_a_killed_calibration_resumes_without_redoing_its_finished_rounds(prefect_api_url: str,
                                                                          tmp_path: Path) -> None:
    hits = tmp_path / "hits.log"
    code, out, err = finish(aselect(prefect_api_url, tmp_path / "ref", *ROUNDS, ASELECT_FAILPOINT_LOG=str(hits)))
    assert code == 0, err[-3000:]
    reference = json.loads(out)
    spent = reference["selection"]["calibration"]
    assert spent["rounds"] == 3 and spent["images"] == 48, spent  # 16 + 16 + 16: ceil(0.32 x 150 train images)
    # the calibration is the first dump: its items' records are the first `chunk` hits, 2 per item
    assert hits.read_text().split().count("chunk") >= 2 * 2 * 3
    workdir = tmp_path / "work"
    code, _, err = finish(aselect(prefect_api_url, workdir, *ROUNDS, ASELECT_FAILPOINT="chunk@5"))  # round 2's first
    assert code == -signal.SIGKILL, err[-2000:]
    code, out, err = finish(aselect(prefect_api_url, workdir, *ROUNDS))
    assert code == 0, err[-3000:]
    result = json.loads(out)
    assert result["selection"] == reference["selection"]
    stages = {s["name"]: Path(s["path"]) for s in result["stages"]}
    manifest = json.loads((stages["calibrate"] / "manifest.json").read_text())
    # round 1 (2 timesteps x 16 images x 2 inputs) was not computed again; rounds 2 and 3 were
    assert manifest["attempts"] == 2 and manifest["accounting"]["items_reused"] == 2
    assert manifest["accounting"]["images_timesteps"] == 2 * 2 * 32
    want = complete_stages(tmp_path / "ref")
    for name, path in complete_stages(workdir).items():
        assert_same_stage(path, want[name])
