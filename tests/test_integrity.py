"""Never silently wrong: verified stage data, damage found and repaired, degenerate numbers refused, locks explained."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from aselect.pipelines.backbone import load_backbone
from aselect.pipelines.config import DumpConfig
from aselect.pipelines.dump import plan_layout, run_dump
from aselect.pipelines.select import select
from aselect.pipelines.streamed import HfrStream
from aselect.storage.errors import AselectError
from aselect.storage.features import (
    FEATURES_STORE,
    FeatureLayout,
    create_store,
    finished_items,
    item_damage,
    open_features,
    write_item,
)
from aselect.storage.stages import StageDir, Workdir

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
#                                   Stages know what they finished
# ---------------------------------------------------------------------------------------------


def finished_stage(tmp_path: Path) -> StageDir:
    stage = StageDir(tmp_path / "probe" / "k1", "probe", "k1")
    stage.begin({})
    (stage.path / "metrics.json").write_text('{"value": 0.9}\n')
    (stage.path / "sub").mkdir()
    (stage.path / "sub" / "weights.bin").write_bytes(b"\x01" * 64)
    stage.complete("done")
    return stage


def test_a_complete_stage_records_its_files_and_finds_them_changed(tmp_path: Path) -> None:
    stage = finished_stage(tmp_path)
    files = stage.read_manifest()["files"]
    assert sorted(files) == ["metrics.json", "sub/weights.bin"] and files["sub/weights.bin"][0] == 64
    assert stage.damage() == [] and stage.damage(full=True) == []
    (stage.path / "sub" / "weights.bin").write_bytes(b"\x02" * 64)  # same size, other bytes
    assert stage.damage() == [] and stage.damage(full=True) == ["sub/weights.bin"]
    (stage.path / "metrics.json").unlink()
    assert stage.damage() == ["metrics.json"]
    assert Workdir(tmp_path).stages()[0].status == "damaged"
    stage.reopen()  # a stage without per-item records starts over
    assert stage.status() == "missing"


def test_a_manifest_that_is_not_an_object_is_a_partial_stage(tmp_path: Path) -> None:
    stage = finished_stage(tmp_path)
    stage.manifest_path.write_text("[1, 2, 3]\n")
    assert stage.status() == "partial" and "a JSON list" in stage.read_manifest()["summary"]
    assert stage.damage() == []


# ---------------------------------------------------------------------------------------------
#                          A damaged dump recomputes only the damaged items
# ---------------------------------------------------------------------------------------------


def dump_into(tiny: tuple[str, Path], stage: Path, hfr: HfrStream | None = None):
    model_dir, data = tiny
    cfg = DumpConfig(timesteps=[0, 50, 400, 900], images_per_chunk=32)
    layout = plan_layout(load_backbone(model_dir), np.arange(120), cfg, hfr=hfr)
    return run_dump(model_dir, data, stage, layout, cfg)


@pytest.mark.parametrize("hfr", [None, HfrStream(sites=("attn",))], ids=["pooled", "streamed-hfr"])
def test_a_removed_or_altered_chunk_is_recomputed_not_read_as_zeros(tiny, tmp_path: Path, hfr) -> None:
    dump_into(tiny, tmp_path, hfr)
    name = "pooled" if hfr is None else "hfr"
    clean = open_features(tmp_path)[name][:]
    record = json.loads((tmp_path / "done" / "t001-c00002").read_text())
    (chunk,) = record["files"]
    assert chunk == f"{FEATURES_STORE}/{name}/c/1/0/0/2" + ("/0" if hfr is None else "")
    (tmp_path / chunk).unlink()
    assert (1, 2) not in finished_items(tmp_path) and item_damage(tmp_path)[(1, 2)] == [chunk]
    again = dump_into(tiny, tmp_path, hfr)
    assert again.items_computed == 1 and again.items_reused == 15
    np.testing.assert_array_equal(open_features(tmp_path)[name][:], clean)
    # same size, other bytes: only the sha256 check sees it
    path = tmp_path / chunk
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert (1, 2) in finished_items(tmp_path) and (1, 2) not in finished_items(tmp_path, full=True)


def test_every_chunk_is_stored_even_one_equal_to_the_fill_value(tmp_path: Path) -> None:
    layout = FeatureLayout(timesteps=(0,), layers=(0, 1), sites=("block",), samples=tuple(range(8)), width=4,
                           tokens=4, chunk=8, spatial=False, attn_map=False)
    group = create_store(tmp_path, layout)
    written, files = write_item(group, tmp_path, layout, 0, 0, np.zeros((2, 1, 8, 4), np.float32), None, None)
    assert written == 2 * 8 * 4 * 4 and files == [f"{FEATURES_STORE}/pooled/c/0/0/0/0/0"]
    assert (tmp_path / files[0]).is_file()  # all zeros = the fill value, stored anyway
    assert finished_items(tmp_path) == {(0, 0)}


# ---------------------------------------------------------------------------------------------
#                             Degenerate numbers are refused, not selected
# ---------------------------------------------------------------------------------------------


def test_nan_weights_fail_where_features_are_produced(tiny, tmp_path: Path) -> None:
    model_dir, data = tiny
    backbone = load_backbone(model_dir)
    with torch.no_grad():
        backbone.transformer.transformer_blocks[1].ff.net[2].weight.fill_(float("nan"))
    cfg = DumpConfig(timesteps=[0, 500], images_per_chunk=32)
    layout = plan_layout(backbone, np.arange(120), cfg)
    with pytest.raises(AselectError) as caught:
        run_dump(model_dir, data, tmp_path, layout, cfg, backbone=backbone)
    assert str(caught.value) == (f"{model_dir}: non-finite features (pooled) at t=0, layer 1: the backbone's weights "
                                 f"or the inputs hold NaN or inf")
    assert finished_items(tmp_path) == set()


def table(scores: list[float], scorer: str = "hfr") -> list[dict]:
    return [{"timestep": 10 * i, "layer": 0, "site": "attn", "scorer": scorer, "score": score}
            for i, score in enumerate(scores)]


@pytest.mark.parametrize(("policy", "scorer"), [("aselect", "hfr"), ("oracle", "probe"), ("fewshot", "fewshot")])
def test_a_table_without_signal_is_an_error_not_a_tie_break(policy: str, scorer: str) -> None:
    params = {"hfr_site": "attn", "layers": [0]} if policy == "aselect" else {}
    with pytest.raises(AselectError, match=f"every '{scorer}' score is 0.25: the scores carry no signal"):
        select(policy, table([0.25] * 5, scorer), **params)
    with pytest.raises(AselectError, match=f"all 3 '{scorer}' scores are non-finite"):
        select(policy, table([float("nan")] * 3, scorer), **params)
    assert select(policy, table([0.25, 0.5, 0.25], scorer), **params).timestep == 10


def test_a_feature_block_outside_the_calibration_is_named() -> None:
    rows = [{**r, "layer": layer} for layer in (0, 1) for r in table([0.1, 0.3, 0.2])]
    with pytest.raises(AselectError, match=r"select.feature_layer 5: must be 'argmax' or one of the calibrated "
                                           r"layers \[0, 1\]"):
        select("aselect", rows, hfr_site="attn", feature_layer=5)


# ---------------------------------------------------------------------------------------------
#                                    Locks say who holds them
# ---------------------------------------------------------------------------------------------


def test_waiting_for_a_lock_says_who_holds_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stage = StageDir(tmp_path / "dump" / "k1", "dump", "k1")
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with stage.lock():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    threading.Timer(0.5, release.set).start()
    with caplog.at_level(logging.INFO, logger="aselect.stage"), stage.lock():
        pass
    thread.join()
    waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waiting and waiting[0].startswith("dump k1: waiting for the run that holds its lock (pid ")
    assert " since 20" in waiting[0] and any("lock acquired after" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
#                                    The CLI: pipes and verify
# ---------------------------------------------------------------------------------------------


def test_inspect_survives_a_closed_pipe(tmp_path: Path) -> None:
    for i in range(3):
        finished_stage(tmp_path / f"w{i}")
    proc = subprocess.Popen([sys.executable, "-m", "aselect", "inspect", "--workdir", str(tmp_path / "w0")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_verify_names_damaged_stages_and_exits_1(tmp_path: Path) -> None:
    stage = finished_stage(tmp_path)
    cmd = [sys.executable, "-m", "aselect", "verify", "--workdir", str(tmp_path)]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "probe      k1  ok" in ok.stdout
    assert "1 complete stages checked, 0 damaged" in ok.stdout
    (stage.path / "sub" / "weights.bin").write_bytes(b"\x03" * 64)
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "DAMAGED: sub/weights.bin" in bad.stdout, bad.stdout + bad.stderr


def test_verify_checks_a_stage_that_inspect_already_shows_as_damaged(tmp_path: Path) -> None:
    stage = finished_stage(tmp_path)
    (stage.path / "sub" / "weights.bin").write_bytes(b"short")  # resized: `inspect` says damaged
    assert Workdir(tmp_path).stages()[0].status == "damaged"
    cmd = [sys.executable, "-m", "aselect", "verify", "--workdir", str(tmp_path)]
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "DAMAGED: sub/weights.bin" in bad.stdout, bad.stdout + bad.stderr
    assert "1 complete stages checked, 1 damaged" in bad.stdout
