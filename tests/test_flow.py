"""The `aselect-pipeline` flow end to end on the smoke config, against a real local Prefect server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from flows.pipeline import aselect_pipeline


def stages_by_name(result: dict) -> dict[str, dict]:
    return {s["name"]: s for s in result["stages"]}


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str) -> Path:
    """One smoke run shared by the tests below (they only add runs on top of it)."""
    workdir = tmp_path_factory.mktemp("smoke-work")
    first = aselect_pipeline(config="smoke", workdir=str(workdir))
    assert [s["name"] for s in first["stages"]] == ["ingest", "backbone", "dump"]
    assert all(s["status"] == "Completed" and not s["cached"] for s in first["stages"]), first
    return workdir


def test_second_run_is_cached_and_recomputes_nothing(smoke_workdir: Path) -> None:
    manifests = {p: p.read_text() for p in smoke_workdir.glob("*/*/manifest.json")}
    again = aselect_pipeline(config="smoke", workdir=str(smoke_workdir))
    assert all(s["status"] == "Cached" and s["cached"] for s in again["stages"]), again
    assert all(s["seconds"] >= 0 for s in again["stages"])
    assert {p: p.read_text() for p in smoke_workdir.glob("*/*/manifest.json")} == manifests  # nothing rewritten


def test_ingest_writes_labelled_zarr(smoke_workdir: Path) -> None:
    stage = next(smoke_workdir.glob("ingest/*"))
    group = zarr.open_group(stage / "data.zarr", mode="r")
    assert group["images"].shape == (200, 1, 8, 8) and group["images"].dtype == np.uint8
    assert group["images"].metadata.dimension_names == ("sample", "channel", "y", "x")
    assert group["train_idx"].shape[0] + group["test_idx"].shape[0] == 200
    assert group.attrs["class_names"] == [str(i) for i in range(10)]


def test_deleting_a_stage_recomputes_it_and_keeps_the_rest(smoke_workdir: Path) -> None:
    model_dir = next(smoke_workdir.glob("backbone/*"))
    shutil.rmtree(model_dir)
    rerun = stages_by_name(aselect_pipeline(config="smoke", workdir=str(smoke_workdir)))
    assert rerun["ingest"]["cached"] and not rerun["backbone"]["cached"]
    assert rerun["backbone"]["status"] == "Completed" and (model_dir / "manifest.json").exists()
    # keys come from configs, not outputs: the dump keyed on the backbone stays valid (retraining is seeded)
    assert rerun["backbone"]["key"] == model_dir.name and rerun["dump"]["cached"]

    ingest_dir = next(smoke_workdir.glob("ingest/*"))
    images_before = zarr.open_group(ingest_dir / "data.zarr", mode="r")["images"][:]
    shutil.rmtree(ingest_dir)
    rerun = stages_by_name(aselect_pipeline(config="smoke", workdir=str(smoke_workdir)))
    assert not rerun["ingest"]["cached"] and rerun["ingest"]["key"] == ingest_dir.name
    # the recomputed dataset is identical, so the backbone keyed on it stays valid and cached
    assert np.array_equal(zarr.open_group(ingest_dir / "data.zarr", mode="r")["images"][:], images_before)
    assert rerun["backbone"]["cached"]


def test_changing_a_backbone_parameter_keeps_ingest(smoke_workdir: Path) -> None:
    result = stages_by_name(aselect_pipeline(config="smoke", overrides=["backbone.pretrain.steps=12"],
                                             workdir=str(smoke_workdir)))
    assert result["ingest"]["cached"] and not result["backbone"]["cached"] and not result["dump"]["cached"]
    manifest = json.loads((Path(result["backbone"]["path"]) / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["loss_curve"][-1][0] == 12


def test_dump_stage_records_its_accounting(smoke_workdir: Path) -> None:
    manifest = json.loads(next(smoke_workdir.glob("dump/*/manifest.json")).read_text())
    accounting = manifest["accounting"]
    assert accounting["items_total"] == 4 * 4  # 4 timesteps x ceil(200 / 64) chunks
    assert accounting["forward_passes"] == accounting["items_computed"] == 16
    assert accounting["bytes_written"] > 0 and accounting["images_timesteps_per_second"] > 0
    assert manifest["layout"]["timesteps"] == [0, 100, 500, 900]


def test_cli_run_json_and_inspect(run_cli, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    proc = run_cli("run", "smoke", "--workdir", str(workdir), "--set", "backbone.pretrain.steps=4", "--json",
                   check=True)
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object; logs go to stderr
    assert [s["name"] for s in result["stages"]] == ["ingest", "backbone", "dump"]
    assert set(result) >= {"stages", "selection", "metrics"}
    assert set(result["stages"][0]) >= {"name", "key", "status", "cached", "seconds", "path"}

    listing = json.loads(run_cli("inspect", "--workdir", str(workdir), "--json", check=True).stdout)
    assert {(s["name"], s["status"]) for s in listing["stages"]} == {
        ("ingest", "complete"), ("backbone", "complete"), ("dump", "complete")}
    shown = json.loads(run_cli("inspect", "backbone", "--workdir", str(workdir), "--json", check=True).stdout)
    assert shown["key"] == result["stages"][1]["key"] and "samples.png" in shown["files"]
    text = run_cli("inspect", "--workdir", str(workdir), check=True).stdout
    assert "ingest" in text and "complete" in text


def test_cli_errors_are_one_line_without_traceback(run_cli, tmp_path: Path) -> None:
    proc = run_cli("run", "smoke", "--set", "ingest.sourse=digits", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("aselect: error: ")
    assert "ingest.sourse: unknown key" in proc.stderr and "Traceback" not in proc.stderr

    empty = tmp_path / "images"
    (empty / "cats").mkdir(parents=True)
    (empty / "dogs").mkdir()
    proc = run_cli("run", "smoke", "--set", "ingest.source=imagefolder", "--set", f"ingest.root={empty}",
                   "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{empty}/cats: empty class folder" in proc.stderr.strip().splitlines()[-1]
