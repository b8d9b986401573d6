"""The stage store: keys, manifests, status and the workdir checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aselect.storage.errors import AselectError
from aselect.storage.stages import Workdir, stage_key


def test_stage_key_depends_on_section_upstream_version_and_extra() -> None:
    base = stage_key("s", {"a": 1, "b": [1, 2]}, {"up": "k1"}, 1)
    assert base == stage_key("s", {"b": [1, 2], "a": 1}, {"up": "k1"}, 1)  # key order is irrelevant
    variants = {
        stage_key("s", {"a": 2, "b": [1, 2]}, {"up": "k1"}, 1),
        stage_key("s", {"a": 1, "b": [1, 2]}, {"up": "k2"}, 1),
        stage_key("s", {"a": 1, "b": [1, 2]}, {"up": "k1"}, 2),
        stage_key("s", {"a": 1, "b": [1, 2]}, {"up": "k1"}, 1, extra="content"),
        stage_key("t", {"a": 1, "b": [1, 2]}, {"up": "k1"}, 1),
    }
    assert base not in variants and len(variants) == 5


def test_status_goes_missing_partial_complete(tmp_path: Path) -> None:
    stage = Workdir(tmp_path).stage("ingest", "abc")
    assert stage.status() == "missing"
    stage.begin({"config": {"x": 1}})
    assert stage.status() == "partial"
    (stage.path / "data.bin").write_bytes(b"x" * 100)
    manifest = stage.complete("done", counts={"n": 1})
    assert stage.status() == "complete"
    assert manifest["bytes"] >= 100 and manifest["summary"] == "done" and manifest["counts"] == {"n": 1}
    assert manifest["inputs"] == {"config": {"x": 1}} and manifest["seconds"] >= 0
    stage.begin({"config": {"x": 1}})  # a rerun starts over as partial and counts the attempt
    assert stage.status() == "partial" and stage.read_manifest()["attempts"] == 2


def test_corrupt_manifest_is_partial_not_complete(tmp_path: Path) -> None:
    stage = Workdir(tmp_path).stage("ingest", "abc")
    stage.path.mkdir(parents=True)
    stage.manifest_path.write_text('{"status": "compl')
    assert stage.status() == "partial"


def test_listing_reports_each_stage(tmp_path: Path) -> None:
    work = Workdir(tmp_path)
    work.stage("ingest", "k1").begin({})
    work.stage("ingest", "k1").complete("one")
    work.stage("backbone", "k2").begin({})
    listed = {(i.name, i.key): i for i in work.stages()}
    assert listed[("ingest", "k1")].status == "complete" and listed[("ingest", "k1")].summary == "one"
    assert listed[("backbone", "k2")].status == "partial"
    assert [i.key for i in work.stages("backbone")] == ["k2"]


def test_workdir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "work"
    path.write_text("not a dir")
    with pytest.raises(AselectError, match=r"work: workdir path is a file, not a directory$"):
        Workdir(path).check_writable()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_workdir_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o500)
    try:
        with pytest.raises(AselectError, match=r"ro: workdir is not writable"):
            Workdir(path).check_writable()
    finally:
        path.chmod(0o700)
