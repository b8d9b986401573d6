"""The `aselect-pipeline` flow end to end on the smoke config, against a real local Prefect server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from aselect.flows.benchmark import DEFAULT_CONFIGS
from aselect.flows.pipeline import aselect_exhaustive, aselect_pipeline
from aselect.pipelines.benchmark import readme_section
from aselect.storage.features import open_features
from aselect.storage.stages import Workdir

ROOT = Path(__file__).resolve().parent.parent

ASELECT_STAGES = ["ingest", "backbone", "calibrate", "score", "select", "dump", "probe"]


def stages_by_name(result: dict) -> dict[str, dict]:
    return {s["name"]: s for s in result["stages"]}


FIRST: dict[str, Path] = {}  # stage name -> directory of the first smoke run


def first_stage(name: str) -> Path:
    return FIRST[name]


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str) -> Path:
    """One smoke run shared by the tests below (they only add runs on top of it)."""
    workdir = tmp_path_factory.mktemp("smoke-work")
    first = aselect_pipeline(config="smoke", workdir=str(workdir))
    assert [s["name"] for s in first["stages"]] == ASELECT_STAGES
    assert all(s["status"] == "Completed" and not s["cached"] for s in first["stages"]), first
    FIRST.update({s["name"]: Path(s["path"]) for s in first["stages"]})
    return workdir


def test_second_run_is_cached_and_recomputes_nothing(smoke_workdir: Path) -> None:
    manifests = {p: p.read_text() for p in smoke_workdir.glob("*/*/manifest.json")}
    again = aselect_pipeline(config="smoke", workdir=str(smoke_workdir))
    assert all(s["status"] == "Cached" and s["cached"] for s in again["stages"]), again
    assert all(s["seconds"] >= 0 for s in again["stages"])
    assert {p: p.read_text() for p in smoke_workdir.glob("*/*/manifest.json")} == manifests  # nothing rewritten


def test_ingest_writes_labelled_zarr(smoke_workdir: Path) -> None:
    stage = first_stage("ingest")
    group = zarr.open_group(stage / "data.zarr", mode="r")
    assert group["images"].shape == (200, 1, 8, 8) and group["images"].dtype == np.uint8
    assert group["images"].metadata.dimension_names == ("sample", "channel", "y", "x")
    assert group["train_idx"].shape[0] + group["test_idx"].shape[0] == 200
    assert group.attrs["class_names"] == [str(i) for i in range(10)]


def test_deleting_a_stage_recomputes_it_and_keeps_the_rest(smoke_workdir: Path) -> None:
    model_dir = first_stage("backbone")
    shutil.rmtree(model_dir)
    rerun = stages_by_name(aselect_pipeline(config="smoke", workdir=str(smoke_workdir)))
    assert rerun["ingest"]["cached"] and not rerun["backbone"]["cached"]
    assert rerun["backbone"]["status"] == "Completed" and (model_dir / "manifest.json").exists()
    # keys come from configs, not outputs: the dump keyed on the backbone stays valid (retraining is seeded)
    assert rerun["backbone"]["key"] == model_dir.name and rerun["calibrate"]["cached"] and rerun["probe"]["cached"]

    ingest_dir = first_stage("ingest")
    images_before = zarr.open_group(ingest_dir / "data.zarr", mode="r")["images"][:]
    shutil.rmtree(ingest_dir)
    rerun = stages_by_name(aselect_pipeline(config="smoke", workdir=str(smoke_workdir)))
    assert not rerun["ingest"]["cached"] and rerun["ingest"]["key"] == ingest_dir.name
    # the recomputed dataset is identical, so the backbone keyed on it stays valid and cached
    assert np.array_equal(zarr.open_group(ingest_dir / "data.zarr", mode="r")["images"][:], images_before)
    assert rerun["backbone"]["cached"]


def test_changing_a_scorer_or_policy_parameter_keeps_dumps_and_pretraining(smoke_workdir: Path) -> None:
    # HFR is reduced inside the calibration's forward pass, so its knobs re-run calibration (C x T forward
    # passes), never pretraining
    rescored = stages_by_name(aselect_pipeline(config="smoke", overrides=["score.hfr_cutoff=0.7"],
                                               workdir=str(smoke_workdir)))
    assert all(rescored[name]["cached"] for name in ("ingest", "backbone"))
    assert not rescored["calibrate"]["cached"] and not rescored["score"]["cached"] and not rescored["select"]["cached"]
    # a bootstrap knob re-runs only the selection and what follows it
    resampled = stages_by_name(aselect_pipeline(config="smoke", overrides=["select.bootstrap=50"],
                                                workdir=str(smoke_workdir)))
    assert all(resampled[name]["cached"] for name in ("ingest", "backbone", "calibrate", "score"))
    assert not resampled["select"]["cached"]
    assert json.loads((Path(resampled["select"]["path"]) / "selection.json").read_text())["confidence"][
        "resamples"] == 50
    reselected = stages_by_name(aselect_pipeline(config="smoke", overrides=["select.feature_site=mlp"],
                                                 workdir=str(smoke_workdir)))
    assert all(reselected[name]["cached"] for name in ("ingest", "backbone", "calibrate", "score"))
    assert not reselected["select"]["cached"] and not reselected["probe"]["cached"]


def test_a_probe_over_its_memory_budget_streams_from_the_dump_to_the_same_result(smoke_workdir: Path) -> None:
    loaded = aselect_pipeline(config="smoke", workdir=str(smoke_workdir))
    streamed = aselect_pipeline(config="smoke", overrides=["probe.memory_budget_mb=0"], workdir=str(smoke_workdir))
    stages = stages_by_name(streamed)
    assert all(stages[name]["cached"] for name in ("ingest", "backbone", "calibrate", "score", "select", "dump"))
    assert not stages["probe"]["cached"]
    metrics = json.loads((Path(stages["probe"]["path"]) / "metrics.json").read_text())
    assert metrics["details"]["streamed"] and "streamed" not in loaded["metrics"]["details"]
    assert metrics["details"]["C"] == loaded["metrics"]["details"]["C"]
    assert abs(streamed["metrics"]["value"] - loaded["metrics"]["value"]) <= 0.01


def test_changing_a_backbone_parameter_keeps_ingest(smoke_workdir: Path) -> None:
    result = stages_by_name(aselect_pipeline(config="smoke", overrides=["backbone.pretrain.steps=12"],
                                             workdir=str(smoke_workdir)))
    assert result["ingest"]["cached"] and not result["backbone"]["cached"] and not result["calibrate"]["cached"]
    manifest = json.loads((Path(result["backbone"]["path"]) / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["loss_curve"][-1][0] == 12


def test_aselect_path_calibrates_then_dumps_only_the_selected_pair(smoke_workdir: Path) -> None:
    calibration = json.loads((first_stage("calibrate") / "manifest.json").read_text())
    # calibrate.timesteps (every 100th) is its own grid, denser than dump.timesteps; of the 64 images asked for,
    # calibrate.budget (half of the exhaustive run's 200 images x 4 dump timesteps) leaves 400 // (10 x 2) = 20
    assert calibration["layout"]["timesteps"] == list(range(0, 1000, 100)) and calibration["layout"]["samples"] == 20
    record = calibration["calibration"]
    assert record["capped"] and record["ceiling"] == 64 and record["forward_passes"] == 400 == record["budget"]
    # HFR streamed in the forward pass: per-image scalars only, no token maps, no pooled features
    assert calibration["layout"]["hfr_sites"] == ["attn"] and not calibration["layout"]["spatial"]
    assert not calibration["layout"]["pooled"] and calibration["layout"]["sites"] == []
    assert calibration["accounting"]["bytes_per_image"] == 10 * 2 * 1 * 8  # timesteps x layers x sites x float64
    assert calibration["accounting"]["batches"] == 10  # 10 timesteps x 1 chunk
    # the default signal, noise_relative, runs each image and its noise-only twin in the same batch
    assert calibration["accounting"]["images_timesteps"] == 2 * 20 * 10
    selection = json.loads((first_stage("select") / "selection.json").read_text())
    hfr_rows = [r for r in selection["table"] if r["scorer"] == "hfr"]
    assert len(hfr_rows) == 10 * 2 and {r["site"] for r in hfr_rows} == {"attn"}  # every (timestep, layer)
    assert selection["runner_up"]["timestep"] != selection["timestep"] and selection["reason"]
    confidence = selection["confidence"]
    assert confidence["resamples"] == 200 and confidence["images"] == 20 and 0.0 <= confidence["value"] <= 1.0
    assert confidence["selected"] == {"timestep": selection["timestep"], "layer": selection["layer"]}
    assert confidence["value"] <= min(confidence["timestep"], confidence["layer"])
    assert (first_stage("select") / "heatmap-hfr-attn.png").stat().st_size > 1000
    features = json.loads((first_stage("dump") / "manifest.json").read_text())
    assert features["layout"]["timesteps"] == [selection["timestep"]]
    assert features["layout"]["layers"] == [selection["layer"]] and features["layout"]["sites"] == [selection["site"]]
    assert features["accounting"]["items_total"] == 4  # 1 timestep x ceil(200 / 64) chunks
    metrics = json.loads((first_stage("probe") / "metrics.json").read_text())
    assert metrics["metric"] == "top1" and 0.0 <= metrics["value"] <= 1.0


def test_a_selected_timestep_outside_the_dump_grid_is_dumped_for_every_image(smoke_workdir: Path) -> None:
    result = aselect_pipeline(config="smoke", overrides=["calibrate.timesteps=[250, 650]"], workdir=str(smoke_workdir))
    stages = stages_by_name(result)
    assert result["selection"]["timestep"] in (250, 650)  # neither is in dump.timesteps [0, 100, 500, 900]
    features = json.loads((Path(stages["dump"]["path"]) / "manifest.json").read_text())
    assert features["layout"]["timesteps"] == [result["selection"]["timestep"]]
    assert features["accounting"]["images_timesteps"] == 200 and result["metrics"]["metric"] == "top1"


def test_hybrid_takes_hfrs_timestep_and_probes_only_that_timestep_for_the_feature(smoke_workdir: Path) -> None:
    label_free = aselect_pipeline(config="smoke", workdir=str(smoke_workdir))
    result = aselect_pipeline(config="smoke", overrides=["select.policy=hybrid"], workdir=str(smoke_workdir))
    stages = result["stages"]
    assert [s["name"] for s in stages] == ["ingest", "backbone", "calibrate", "score", "calibrate", "score",
                                           "select", "dump", "probe"]
    hfr, features = (json.loads((Path(s["path"]) / "manifest.json").read_text()) for s in stages[2:5:2])
    assert stages[2]["cached"] and stages[3]["cached"]  # the HFR calibration is the default run's
    selection = result["selection"]
    assert selection["policy"] == "hybrid" and selection["timestep"] == label_free["selection"]["timestep"]
    # the few-shot look: the 64 labelled calibration images at that one timestep, every layer and pooled site
    assert features["layout"]["timesteps"] == [selection["timestep"]] and features["layout"]["samples"] == 64
    assert features["layout"]["layers"] == [0, 1] and features["layout"]["sites"] == ["block", "attn", "mlp"]
    assert hfr["layout"]["hfr_sites"] == ["attn"]
    rows = json.loads((Path(stages[5]["path"]) / "manifest.json").read_text())
    table = json.loads((Path(stages[6]["path"]) / "selection.json").read_text())["table"]
    fewshot = {(r["layer"], r["site"]): r["score"] for r in table if r["scorer"] == "fewshot"}
    assert len(fewshot) == rows["pairs"] == 6 and fewshot[(selection["layer"], selection["site"])] == max(
        fewshot.values())
    assert selection["confidence"]["selected"] == {"timestep": selection["timestep"]}
    assert result["cost"]["forward_passes"] == selection["calibration"]["forward_passes"] + 64 + 200
    again = aselect_pipeline(config="smoke", overrides=["select.policy=hybrid"], workdir=str(smoke_workdir))
    assert all(s["cached"] for s in again["stages"]) and again["selection"] == selection


def test_calibration_reduces_only_the_layers_the_policy_reads(smoke_workdir: Path) -> None:
    def calibrated_layers(result: dict) -> list[int]:
        path = Path(stages_by_name(result)["calibrate"]["path"])
        return json.loads((path / "manifest.json").read_text())["layout"]["layers"]

    band = aselect_pipeline(config="smoke", overrides=["select.layers=[0]"], workdir=str(smoke_workdir))
    assert calibrated_layers(band) == [0] and band["selection"]["layer"] == 0  # the forward pass stops at layer 0
    every = aselect_pipeline(config="smoke", overrides=["select.layers=[0]", "calibrate.layers=all"],
                             workdir=str(smoke_workdir))
    assert calibrated_layers(every) == [0, 1] and every["selection"]["timestep"] == band["selection"]["timestep"]


def test_exhaustive_path_reuses_ingest_and_backbone_and_picks_the_probe_best(smoke_workdir: Path) -> None:
    result = aselect_exhaustive(config="smoke", workdir=str(smoke_workdir))
    stages = stages_by_name(result)
    assert list(stages) == ["ingest", "backbone", "dump", "score", "select", "probe"]
    assert stages["ingest"]["cached"] and stages["backbone"]["cached"] and not stages["dump"]["cached"]
    table = stages_by_name(result)["score"]
    rows = json.loads((Path(table["path"]) / "scores.json").read_text())
    assert len(rows) == 4 * 2 * 3 and {r["scorer"] for r in rows} == {"probe"}
    best = max(rows, key=lambda r: r["score"])
    assert (result["selection"]["timestep"], result["selection"]["layer"], result["selection"]["site"]) == (
        best["timestep"], best["layer"], best["site"])
    assert result["cost"]["forward_passes"] == 200 * 4 and result["cost"]["probe_fits"] >= 24 * 3  # images x t
    assert result["metrics"]["metric"] == "top1"


def test_a_damaged_stage_is_found_and_recomputed_not_served(smoke_workdir: Path) -> None:
    calibration, probe = first_stage("calibrate"), first_stage("probe")
    hfr = open_features(calibration)["hfr"][:]
    chunk = next(iter(json.loads((calibration / "done" / "t003-c00000").read_text())["files"]))
    (calibration / chunk).unlink()  # a calibration chunk removed after the stage finished
    (probe / "metrics.json").write_text("{}")  # a probe result truncated
    rerun = stages_by_name(aselect_pipeline(config="smoke", workdir=str(smoke_workdir)))
    assert rerun["ingest"]["cached"] and rerun["backbone"]["cached"]
    assert not rerun["calibrate"]["cached"] and "resumed (9/10 items reused)" in rerun["calibrate"]["summary"]
    assert not rerun["probe"]["cached"] and json.loads((probe / "metrics.json").read_text())["metric"] == "top1"
    assert np.array_equal(open_features(calibration)["hfr"][:], hfr)  # the item recomputed bit-identically
    assert all(Workdir(smoke_workdir).stage(s["name"], s["key"]).damage(full=True) == [] for s in rerun.values())


def test_a_copied_workdir_reads_only_itself(smoke_workdir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(smoke_workdir, copy, ignore=shutil.ignore_patterns(".locks", "bench"))
    manifests = "".join(p.read_text() for p in copy.glob("*/*/manifest.json"))
    assert str(smoke_workdir) not in manifests  # workdir-relative paths only
    moved = tmp_path / "moved"
    copy.rename(moved)
    # a new calibration loads the backbone: from the moved workdir, the original's model being gone
    original_model = first_stage("backbone") / "model"
    hidden = original_model.with_name("model.hidden")
    original_model.rename(hidden)
    try:
        result = stages_by_name(aselect_pipeline(config="smoke", overrides=["calibrate.images=32"],
                                                 workdir=str(moved)))
    finally:
        hidden.rename(original_model)
    assert result["backbone"]["cached"] and not result["calibrate"]["cached"]
    assert Path(result["calibrate"]["path"]).is_relative_to(moved)


def test_results_page_section_is_generated_from_the_committed_json() -> None:
    report = json.loads((ROOT / "bench" / "results.json").read_text())
    page = (ROOT / "docs" / "results.md").read_text()
    assert readme_section(report) in page
    # make bench's configs (the Makefile's BENCH_CONFIGS), every one a bundled benchmark config
    (line,) = [x for x in (ROOT / "Makefile").read_text().splitlines() if x.startswith("BENCH_CONFIGS ?=")]
    bench_configs = line.split("?=")[1].split()
    assert [c["config"] for c in report["configs"]] == bench_configs
    assert set(bench_configs) <= set(DEFAULT_CONFIGS)
