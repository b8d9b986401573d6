"""Nothing damaged is reused silently: stages, dump items, checkpoints and weights are checked before they are
used, and a directory that is not a workdir is refused in one line."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel
from PIL import Image
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from aselect.flows.cli import main
from aselect.pipelines.attentive import AttentiveHead, load_head, save_head
from aselect.pipelines.backbone import load_backbone, load_model_part
from aselect.pipelines.predict import load_run
from aselect.pipelines.probe import LINEAR_WEIGHTS, fit_linear, load_linear, save_linear
from aselect.pipelines.training import latest_good_checkpoint, save_checkpoint
from aselect.storage import stages as stages_module
from aselect.storage.datasets import Dataset, write_dataset
from aselect.storage.errors import AselectError
from aselect.storage.features import FeatureLayout, create_store, finished_items, write_item
from aselect.storage.stages import MANIFEST, WORKDIR_MARKER, StageDir, Workdir, reuse_hash_limit, write_json_atomic
from aselect.tasks.stage import verify_before_reuse


def flip(path: Path, offset: int = -1) -> None:
    """Change one byte of a file, keeping its size (only a sha256 check sees it)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def finished_stage(root: Path, name: str = "probe", key: str = "0123456789abcdef") -> StageDir:
    stage = Workdir(root).stage(name, key)
    stage.begin({})
    (stage.path / "metrics.json").write_text('{"value": 0.58}\n')
    (stage.path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    stage.complete("top1 0.5800")
    return stage


def dump_stage(root: Path, items: int = 3) -> StageDir:
    """A complete dump-like stage: a real Zarr store with one completion record per item."""
    stage = Workdir(root).stage("dump", "fedcba9876543210")
    stage.begin({})
    layout = FeatureLayout(timesteps=(0,), layers=(0,), sites=("block",), samples=tuple(range(4 * items)), width=4,
                           tokens=4, chunk=4, spatial=False, attn_map=False)
    group = create_store(stage.path, layout)
    for ci in range(items):
        write_item(group, stage.path, layout, 0, ci, np.full((1, 1, 4, 4), ci + 1, np.float32), None, None)
    stage.complete("dumped")
    return stage


# ---------------------------------------------------------------------------------------------
#                               A reuse checks what the stage recorded
# ---------------------------------------------------------------------------------------------


def test_a_same_size_change_to_a_small_file_is_found_before_reuse(tmp_path: Path, caplog) -> None:
    stage = finished_stage(tmp_path)
    assert stage.damage(full=None) == [] and verify_before_reuse(stage) == []
    (stage.path / "metrics.json").write_text('{"value": 0.98}\n')  # same size, another number
    assert stage.damage() == [] and stage.damage(full=None) == ["metrics.json"]
    with caplog.at_level(logging.WARNING, logger="aselect.stage"):
        assert verify_before_reuse(stage) == ["metrics.json"]
    assert "probe 0123456789abcdef: metrics.json missing or changed since the stage finished" in caplog.text
    assert stage.status() == "missing"  # a stage without per-item records starts over


def test_a_changed_manifest_is_damage(tmp_path: Path) -> None:
    stage = finished_stage(tmp_path)
    text = stage.manifest_path.read_text()
    stage.manifest_path.write_text(text.replace("top1 0.5800", "top1 0.9800"))
    assert stage.damage() == [MANIFEST]
    stage.manifest_path.write_text(text)
    assert stage.damage() == []


def test_hashing_every_file_depends_on_what_recomputing_costs() -> None:
    assert reuse_hash_limit(10 * 2**20, 0.0) is True  # small: always hashed whole
    big = 100 * 2**30
    assert reuse_hash_limit(big, 60.0) == stages_module.SMALL_FILE  # sizes, and the small files' sha256
    assert reuse_hash_limit(big, 100_000.0) is True  # hours of compute: hashing is cheap next to them


def test_a_large_file_of_a_cheap_stage_is_checked_by_size(tmp_path: Path, monkeypatch) -> None:
    stage = finished_stage(tmp_path)
    flip(stage.path / "weights.bin")
    monkeypatch.setattr(stages_module, "HASH_BYTES_PER_SECOND", 1)  # as if hashing took hours
    monkeypatch.setattr(stages_module, "SMALL_FILE", 100)
    assert stage.damage(full=None) == [] and stage.damage(full=True) == ["weights.bin"]


def test_a_changed_chunk_is_recomputed_alone(tmp_path: Path) -> None:
    stage = dump_stage(tmp_path)
    record = json.loads((stage.path / "done" / "t000-c00001").read_text())
    (chunk,) = record["files"]
    flip(stage.path / chunk)
    assert stage.damage(full=None) == [chunk] and finished_items(stage.path) == {(0, 0), (0, 1), (0, 2)}
    verify_before_reuse(stage)
    assert stage.status() == "partial" and finished_items(stage.path) == {(0, 0), (0, 2)}  # only it recomputed


def test_damage_no_record_vouches_for_starts_the_dump_over(tmp_path: Path) -> None:
    stage = dump_stage(tmp_path)
    metadata = "features.zarr/pooled/zarr.json"
    assert metadata in stage.read_manifest()["files"]
    flip(stage.path / metadata, offset=5)
    verify_before_reuse(stage)
    assert stage.status() == "missing"


def test_a_partial_dump_drops_its_damaged_items_before_resuming(tmp_path: Path) -> None:
    stage = dump_stage(tmp_path)
    stage.reopen()  # as a killed attempt leaves it: partial, with records
    (stage.path / "done" / "t000-c00002").write_text('{"bytes": 64, "files": "not a table"}\n')
    flip(stage.path / next(iter(json.loads((stage.path / "done" / "t000-c00000").read_text())["files"])))
    assert sorted(verify_before_reuse(stage)) == ["done/t000-c00002", "features.zarr/pooled/c/0/0/0/0/0"]
    assert finished_items(stage.path) == {(0, 1)}


@pytest.mark.parametrize(("field", "value", "named"), [
    ("files", "abc", "field 'files' is \"abc\", expected an object"),
    ("files", {"metrics.json": "abc"}, "field 'files' entry 'metrics.json' is \"abc\", not [size, sha256]"),
    ("files", {"metrics.json": [-1, "0" * 64]}, "field 'files' entry 'metrics.json' has size -1"),
    ("files", {"metrics.json": [16, "xyz"]}, "field 'files' entry 'metrics.json' has sha256 \"xyz\""),
    ("status", 1, "field 'status' is 1, expected a string"),
    ("started", "yesterday", "field 'started' is \"yesterday\", expected an integer or a number"),
    ("attempts", True, "field 'attempts' is true, expected an integer"),
])
def test_a_manifest_field_of_the_wrong_type_is_one_line(tmp_path: Path, field: str, value, named: str) -> None:
    stage = finished_stage(tmp_path)
    manifest = json.loads(stage.manifest_path.read_text())
    stage.manifest_path.write_text(json.dumps({**manifest, field: value}))
    for call in (stage.status, lambda: stage.damage(full=True), lambda: Workdir(tmp_path).stages()):
        with pytest.raises(AselectError) as caught:
            call()
        assert str(caught.value).startswith(f"{stage.manifest_path}: {named}") and "\n" not in str(caught.value)


def test_a_manifest_field_of_the_wrong_type_is_one_line_from_inspect_and_verify(tmp_path: Path, capsys) -> None:
    stage = finished_stage(tmp_path)
    manifest = json.loads(stage.manifest_path.read_text())
    stage.manifest_path.write_text(json.dumps({**manifest, "files": {"metrics.json": [16, 7]}}))
    for command in ("inspect", "verify"):
        assert main([command, "--workdir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err == (f"aselect: error: {stage.manifest_path}: field 'files' entry 'metrics.json' has sha256 7, not "
                       f"64 hex digits; remove the stage directory {stage.path} to compute it again\n"), err


# ---------------------------------------------------------------------------------------------
#                                       A workdir is a workdir
# ---------------------------------------------------------------------------------------------


def test_only_aselect_workdirs_are_inspected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(AselectError, match=r"empty: not an aselect workdir \(no \.aselect-workdir"):
        Workdir(tmp_path / "empty").check_readable()
    system = tmp_path / "etc"
    (system / "etc" / "rc2.d").mkdir(parents=True)
    assert Workdir(system).stages() == []
    with pytest.raises(AselectError, match="not an aselect workdir"):
        Workdir(system).check_readable()
    cache = tmp_path / "cache"  # another program's cache keyed by 16 hex digits: not stages without manifests
    (cache / "objects" / "0123456789abcdef").mkdir(parents=True)
    with pytest.raises(AselectError, match="not an aselect workdir"):
        Workdir(cache).check_readable()
    old = tmp_path / "old"  # a workdir from before the marker: its stages make it one
    finished_stage(old)
    (old / WORKDIR_MARKER).unlink()
    Workdir(old).check_readable()
    fresh = Workdir(tmp_path / "fresh")
    fresh.check_writable()
    marker = (fresh.root / WORKDIR_MARKER).read_bytes()
    fresh.check_readable()
    fresh.check_writable()
    assert (fresh.root / WORKDIR_MARKER).read_bytes() == marker  # written once, never rewritten


def test_a_run_refuses_a_directory_that_is_not_a_workdir(tmp_path: Path) -> None:
    home = tmp_path / "home"  # another program's files: a run must not scatter stages among them
    (home / "Documents").mkdir(parents=True)
    (home / ".bashrc").write_text("export PS1='$ '\n")
    with pytest.raises(AselectError) as caught:
        Workdir(home).check_writable()
    assert str(caught.value) == (f"{home}: not an aselect workdir (it holds other files, no {WORKDIR_MARKER} and no "
                                 f"stage directories); pass a new or empty directory, or the --workdir of a run")
    assert sorted(p.name for p in home.iterdir()) == [".bashrc", "Documents"]  # nothing written there
    (tmp_path / "dotted" / ".git").mkdir(parents=True)  # hidden entries are files too
    with pytest.raises(AselectError, match="not an aselect workdir"):
        Workdir(tmp_path / "dotted").check_writable()


def test_a_run_accepts_a_new_empty_or_aselect_directory_and_marks_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "killed").mkdir()  # a run killed inside its own check leaves its write test behind
    (tmp_path / "killed" / ".write-test-4242").touch()
    marked = tmp_path / "marked"
    finished_stage(marked)
    shutil.rmtree(marked / "probe")
    (marked / "predictions.csv").write_text("path,class\n")  # a workdir holds what predict wrote into it
    old = tmp_path / "old"  # from before the marker: its stage directories make it a workdir
    finished_stage(old)
    (old / WORKDIR_MARKER).unlink()
    for root in (tmp_path / "new" / "deeper", empty, tmp_path / "killed", marked, old):
        Workdir(root).check_writable()
        assert (root / WORKDIR_MARKER).is_file(), root


def test_a_symlink_loop_is_one_line(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(AselectError, match=r"loop: workdir path is a symlink loop$"):
        Workdir(loop)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads through permissions")
def test_an_unreadable_workdir_is_one_line(tmp_path: Path) -> None:
    finished_stage(tmp_path / "w")
    (tmp_path / "w").chmod(0o000)
    try:
        with pytest.raises(AselectError, match="workdir is not readable"):
            Workdir(tmp_path / "w").check_readable()
    finally:
        (tmp_path / "w").chmod(0o700)


def test_inspect_and_verify_refuse_what_is_not_a_workdir(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for command in ("inspect", "verify"):
        for where, says in (("empty", "not an aselect workdir"), ("loop", "workdir path is a symlink loop")):
            assert main([command, "--workdir", str(tmp_path / where)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"aselect: error: {tmp_path / where}: {says}") and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------
#                          A finished run is verified before it is used
# ---------------------------------------------------------------------------------------------

SELECTION = {"timestep": 100, "layer": 1, "site": "block", "policy": "fixed"}


def finished_run(root: Path) -> dict[str, StageDir]:
    """The stages `load_run` reads of a finished linear classification run (the backbone is not loaded until
    features are asked for, so its weights here are only bytes)."""
    work = Workdir(root)

    def stage(name: str, key: str, inputs: dict, write, **details) -> StageDir:
        made = work.stage(name, key * 16)
        made.begin(inputs)
        write(made.path)
        made.complete(f"{name} finished", **details)
        return made

    def weights(path: Path) -> None:
        (path / "model").mkdir()
        (path / "model" / "weights.safetensors").write_bytes(bytes(range(256)) * 4)

    rng = np.random.default_rng(0)
    data = Dataset(np.zeros((8, 1, 8, 8), np.uint8), np.arange(8) % 2, ["a", "b"], np.arange(4), np.arange(4, 8))
    probe = fit_linear(rng.normal(size=(20, 4)).astype(np.float32), np.arange(20) % 2, 1.0)
    ingest = stage("ingest", "1", {}, lambda path: write_dataset(data, path))
    backbone = stage("backbone", "2", {}, weights, kind="pretrain", model_path="model")
    dump = stage("dump", "3", {"upstream": {"ingest": ingest.key, "backbone": backbone.key}, "config": {"seed": 0}},
                 lambda path: None)
    select = stage("select", "4", {}, lambda path: write_json_atomic(path / "selection.json", SELECTION),
                   selection=SELECTION)
    probe_stage = stage("probe", "5", {"selection": SELECTION, "upstream": {"features": dump.key},
                                       "config": {"kind": "linear"}},
                        lambda path: save_linear(path, probe, {"task": "classification"}))
    return {"ingest": ingest, "backbone": backbone, "dump": dump, "select": select, "probe": probe_stage}


def test_a_flipped_byte_in_a_finished_runs_probe_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    stages = finished_run(tmp_path / "w")
    run = load_run(tmp_path / "w")
    assert run.key == stages["probe"].key and run.stages["select"] == stages["select"].path
    weights = stages["probe"].path / LINEAR_WEIGHTS
    original = weights.read_bytes()
    flip(weights)  # same size: loads, with another number in it
    expected = (f"{weights}: missing or changed since the probe stage finished; `aselect run` with the run's config "
                f"computes it again")
    for pick in (None, stages["probe"].key[:6]):
        with pytest.raises(AselectError) as caught:
            load_run(tmp_path / "w", run=pick)
        assert str(caught.value) == expected
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "x.png"), "--workdir", str(tmp_path / "w")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"aselect: error: {expected}\n" and captured.out == ""
    weights.write_bytes(original + b"\0")  # resized: a damaged newest run is refused, not passed over
    with pytest.raises(AselectError, match=rf"^{weights}: missing or changed since the probe stage finished"):
        load_run(tmp_path / "w")
    weights.write_bytes(original)
    assert load_run(tmp_path / "w").key == run.key


@pytest.mark.parametrize(("name", "file"), [("backbone", "model/weights.safetensors"),
                                            ("select", "selection.json"), ("dump", MANIFEST)])
def test_what_a_finished_run_reads_besides_its_probe_is_verified(tmp_path: Path, name: str, file: str) -> None:
    stages = finished_run(tmp_path / "w")
    flip(stages[name].path / file, offset=-4)  # in the last value: JSON stays JSON
    with pytest.raises(AselectError) as caught:
        load_run(tmp_path / "w")
    assert str(caught.value).startswith(f"{stages[name].path / file}: missing or changed since the {name} stage "
                                        f"finished; `aselect run`")


# ---------------------------------------------------------------------------------------------
#                                 Checkpoints: the newest good one
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_that_fails_its_checksum_is_skipped_for_the_previous(tmp_path: Path, caplog) -> None:
    for step in (1, 2, 3):
        state = {"fingerprint": {"a": 1}, "step": step, "weights": torch.arange(4096.0)}
        save_checkpoint(tmp_path, f"step-{step:07d}.pt", state, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002.pt", "step-0000003.pt"]
    newest = latest_good_checkpoint(tmp_path, "step", {"a": 1})
    assert newest["step"] == 3 and torch.equal(newest["weights"], torch.arange(4096.0))
    flip(tmp_path / "step-0000003.pt", offset=len((tmp_path / "step-0000003.pt").read_bytes()) // 2)
    with caplog.at_level(logging.WARNING, logger="aselect.training"):
        assert latest_good_checkpoint(tmp_path, "step", {"a": 1})["step"] == 2
    assert (f"{tmp_path / 'step-0000003.pt'}: checkpoint skipped for the previous one (its sha256 differs"
            in caplog.text)
    torch.save({"fingerprint": {"a": 1}, "step": 2}, tmp_path / "step-0000002.pt")  # no sha256: not trusted
    assert latest_good_checkpoint(tmp_path, "step", {"a": 1}) is None
    assert "not an aselect checkpoint with its sha256" in caplog.text
    assert latest_good_checkpoint(tmp_path / "none", "step", {"a": 1}) is None


# ---------------------------------------------------------------------------------------------
#                                   Weights load tensor for tensor
# ---------------------------------------------------------------------------------------------


def edit_tensors(path: Path, drop: str | None = None, add: str | None = None) -> None:
    tensors = load_file(str(path))
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(2)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_transformer_missing_a_tensor_is_refused(tiny, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(tiny[0], tmp_path / "model"))
    weights = model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    name = sorted(load_file(str(weights)))[3]
    edit_tensors(weights, drop=name)
    with pytest.raises(AselectError) as caught:
        load_backbone(str(model_dir))
    assert str(caught.value) == f"{weights}: no tensor {name!r} (weights must match the model exactly)"
    edit_tensors(weights, add="extra.weight")
    with pytest.raises(AselectError, match=r"no tensor .*; unexpected tensor 'extra.weight'"):
        load_model_part(DiTTransformer2DModel, model_dir, "transformer")


def test_a_head_or_linear_probe_with_other_tensors_is_refused(tmp_path: Path) -> None:
    head = AttentiveHead(4, 3, 8, 1, 2, 2.0)
    save_head(tmp_path / "head", head.state_dict(), {**head.config, "task": "classification"})
    weights = tmp_path / "head" / "head.safetensors"
    edit_tensors(weights, drop="embed.bias")
    with pytest.raises(AselectError, match=rf"^{weights}: no tensor 'embed.bias' \("):
        load_head(tmp_path / "head")
    rng = np.random.default_rng(0)
    probe = fit_linear(rng.normal(size=(20, 4)).astype(np.float32), np.arange(20) % 2, 1.0)
    save_linear(tmp_path / "linear", probe, {"task": "classification"})
    load_linear(tmp_path / "linear")
    path = tmp_path / "linear" / LINEAR_WEIGHTS
    save_numpy({**load_numpy(str(path)), "coef_2": np.zeros(2)}, str(path))
    with pytest.raises(AselectError, match=rf"^{path}: unexpected tensor 'coef_2' \(sklearn probe\)$"):
        load_linear(tmp_path / "linear")


# ---------------------------------------------------------------------------------------------
#                              End to end: damage found, repaired, reported
# ---------------------------------------------------------------------------------------------


def stages_by_name(result: dict) -> dict[str, dict]:
    return {s["name"]: s for s in result["stages"]}


@pytest.fixture(scope="module")
def smoke(prefect_api_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """One smoke run with Prefect told to persist results by default (its result store is returned too)."""
    workdir, results = tmp_path_factory.mktemp("reuse-work"), tmp_path_factory.mktemp("prefect-results")
    return workdir, rerun(workdir, results), results


def rerun(workdir: Path, results: Path) -> dict:
    """The smoke pipeline on `workdir`, in this process; Prefect persists results to `results` by default."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings

    from aselect.flows.pipeline import aselect_pipeline

    with temporary_settings(updates={PREFECT_RESULTS_PERSIST_BY_DEFAULT: True, PREFECT_LOCAL_STORAGE_PATH: results}):
        return aselect_pipeline(config="smoke", workdir=str(workdir))


@pytest.mark.slow
def test_a_flipped_dump_chunk_is_recomputed_and_the_probe_gets_the_original_values(smoke, caplog) -> None:
    workdir, first, results = smoke
    stages = stages_by_name(first)
    dump = Path(stages["dump"]["path"])
    (chunk,) = json.loads((dump / "done" / "t000-c00001").read_text())["files"]
    original = (dump / chunk).read_bytes()
    flip(dump / chunk, offset=len(original) // 2)
    shutil.rmtree(stages["probe"]["path"])  # the probe reads the dump again
    with caplog.at_level(logging.WARNING, logger="aselect.stage"):
        again = rerun(workdir, results)
    assert f"{chunk} missing or changed since the stage finished" in caplog.text
    by_name = stages_by_name(again)
    assert not by_name["dump"]["cached"] and "resumed (3/4 items reused)" in by_name["dump"]["summary"]
    assert (dump / chunk).read_bytes() == original
    assert again["metrics"] == first["metrics"]


@pytest.mark.slow
def test_flipped_backbone_weights_are_retrained_not_reused(smoke) -> None:
    workdir, first, results = smoke
    weights = Path(stages_by_name(first)["backbone"]["path"]) / "model" / "transformer"
    weights = weights / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    flip(weights, offset=len(original) - 64)  # inside the last tensor: loads, with other values
    again = stages_by_name(rerun(workdir, results))
    assert not again["backbone"]["cached"] and weights.read_bytes() == original  # retrained bit-identically
    assert all(again[name]["cached"] for name in ("ingest", "calibrate", "score", "select", "dump", "probe"))


@pytest.mark.slow
def test_the_reported_metric_is_the_verified_metrics_json(smoke) -> None:
    workdir, first, results = smoke
    persisted = [p for p in results.rglob("*") if p.is_file()]
    assert persisted  # Prefect persisted what it was told to, by default: the flows' own results
    for path in persisted:  # a byte of every result Prefect keeps changed: nothing reads them back
        flip(path, offset=len(path.read_bytes()) // 2)
    probe = Path(stages_by_name(first)["probe"]["path"])
    metrics = (probe / "metrics.json").read_text()
    value = f"{first['metrics']['value']}"
    changed = value[:-1] + ("1" if value[-1] != "1" else "2")  # the same length: the size check cannot see it
    (probe / "metrics.json").write_text(metrics.replace(value, changed, 1))
    again = rerun(workdir, results)
    assert not stages_by_name(again)["probe"]["cached"]
    assert again["metrics"] == json.loads((probe / "metrics.json").read_text()) == first["metrics"]
    assert main(["verify", "--workdir", str(workdir)]) == 0
