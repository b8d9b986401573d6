"""Stage keys cover the code that computes each stage: editing it recomputes that stage and what reads it, with
no version constant to remember; docstrings, comments and formatting change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

import aselect.pipelines.scoring as scoring
import aselect.pipelines.streamed as streamed
from aselect.pipelines.config import load_config
from aselect.pipelines.plan import calibration, hfr_stream
from aselect.storage.code import code_digest, code_modules, module_file
from aselect.storage.stages import StageRef, Workdir
from aselect.tasks.backbone import plan_backbone
from aselect.tasks.dump import plan_dump
from aselect.tasks.ingest import plan_ingest
from aselect.tasks.probe import plan_probe
from aselect.tasks.score import plan_score
from aselect.tasks.select import plan_select

SELECTION = {"timestep": 0, "layer": 2, "site": "block"}


def chain_keys(workdir: Workdir) -> dict[str, str]:
    """The keys of the A-SelecT path of the smoke config, planned without running anything."""
    cfg = load_config("smoke")
    ingest = plan_ingest(workdir, cfg.ingest)
    backbone = plan_backbone(workdir, cfg.backbone, ingest)
    plan = calibration(cfg, segmentation=False, layers=None)
    calibrate = plan_dump(workdir, plan.dump, ingest, backbone, name="calibrate",
                          calibration_images=cfg.calibrate.images, hfr=hfr_stream(cfg))
    score = plan_score(workdir, cfg.score, plan.scorer, calibrate)
    select = plan_select(workdir, cfg.select, [score])
    pair = plan_dump(workdir, cfg.dump.model_copy(update={"timesteps": [0], "layers": [2], "sites": ["block"]}),
                     ingest, backbone)
    probe = plan_probe(workdir, cfg.probe, pair, SELECTION)
    refs: list[StageRef] = [ingest, backbone, calibrate, score, select, pair, probe]
    return dict(zip(["ingest", "backbone", "calibrate", "score", "select", "dump", "probe"],
                    [r.key for r in refs], strict=True))


def edited_copy(tmp_path: Path, module, edit) -> Path:
    """A copy of a module's source with `edit` applied (the test must change something)."""
    source = module_file(module.__name__).read_text()
    changed = edit(source)
    assert changed != source
    copy = tmp_path / Path(module.__file__).name
    copy.write_text(changed)
    return copy


def test_editing_the_hfr_reduction_changes_its_stage_and_the_stages_after_it(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    work = Workdir(tmp_path / "work")
    before = chain_keys(work)
    # One line of the HFR band rule (the streamed reduction and the reference both use it): the high band starts
    # at the cutoff instead of above it.
    line = "return band_frequency(h, w, band) > cutoff"
    assert line in module_file(scoring.__name__).read_text(), "the test's edit no longer applies to scoring.py"
    copy = edited_copy(tmp_path, scoring, lambda s: s.replace(line, line.replace(">", ">="), 1))
    monkeypatch.setattr(scoring, "__file__", str(copy))
    after = chain_keys(work)
    changed = {name for name in before if before[name] != after[name]}
    # The calibration computes HFR and everything downstream of it reads its values; ingest and the (expensive)
    # pretrained backbone do not run that code. The dump and probe of a given pair are keyed by the pair, not by
    # how it was chosen: the same pair's features are the same features.
    assert {"calibrate", "score", "select"} <= changed
    assert not changed & {"ingest", "backbone"}


def test_docstrings_comments_and_formatting_do_not_change_a_key(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    work = Workdir(tmp_path / "work")
    before = chain_keys(work)
    copy = edited_copy(tmp_path, streamed, lambda s: s.replace('"""', '"""Reworded. ', 1)
                       .replace("\n\n\n", "\n\n\n# a comment\n\n", 1) + "\n\n# trailing remark\n")
    monkeypatch.setattr(streamed, "__file__", str(copy))
    assert chain_keys(work) == before


def test_each_stage_hashes_the_code_it_runs_and_not_other_stages() -> None:
    modules = {stage: set(code_modules(f"aselect.tasks.{stage}"))
               for stage in ("ingest", "backbone", "dump", "score", "select", "probe")}
    assert {"aselect.pipelines.ingest", "aselect.storage.datasets"} <= modules["ingest"]
    assert {"aselect.pipelines.pretrain", "aselect.pipelines.models"} <= modules["backbone"]
    assert {"aselect.pipelines.dump", "aselect.pipelines.streamed", "aselect.pipelines.features"} <= modules["dump"]
    assert {"aselect.pipelines.grid", "aselect.pipelines.scoring"} <= modules["score"]
    assert "aselect.pipelines.select" in modules["select"]
    assert "aselect.pipelines.probe" in modules["probe"]
    # Pretraining does not rerun when the dump, scoring or selection code changes.
    assert not modules["backbone"] & {"aselect.pipelines.dump", "aselect.pipelines.streamed",
                                      "aselect.pipelines.select", "aselect.pipelines.grid"}
    for stage, names in modules.items():  # another stage's task module is not followed
        assert names & {f"aselect.tasks.{s}" for s in modules} == {f"aselect.tasks.{stage}"}
        assert "aselect.pipelines.config" not in names  # its effect is the config values, already in the key
    assert code_digest("aselect.tasks.dump") != code_digest("aselect.tasks.probe")


def test_an_input_the_planner_does_not_know_fails_instead_of_leaving_the_key(tmp_path: Path) -> None:
    from aselect.tasks.ingest import ingest
    from aselect.tasks.stage import plan_and_run

    with pytest.raises(TypeError, match="unexpected keyword argument 'resolution'"):
        plan_and_run(ingest, plan_ingest, Workdir(tmp_path), [], cfg=load_config("smoke").ingest, resolution=64)
    assert not (tmp_path / "ingest").exists()  # nothing ran
