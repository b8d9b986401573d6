"""Stage 5 task: turn score tables into one (timestep, layer, site), and record why."""

from __future__ import annotations

import json
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import State

from aselect.pipelines.config import SelectConfig
from aselect.pipelines.models import noise_point, scheduler_from_config
from aselect.pipelines.plots import score_heatmaps
from aselect.pipelines.select import (
    LABELS_ADVICE,
    bootstrap_confidence,
    select,
    unstable_choice_advice,
)
from aselect.storage.code import code_digest
from aselect.storage.stages import StageDir, StageRef, Workdir, stage_key, write_json_atomic
from aselect.tasks.score import read_per_image
from aselect.tasks.stage import Finished, stage_body

SELECTION_JSON = "selection.json"


def plan_select(workdir: Workdir, cfg: SelectConfig, scores: list[StageRef],
                table: list[dict[str, Any]] | None = None, schedule: dict[str, Any] | None = None) -> StageRef:
    """The selection's key: the policy section, the score stages it reads and the backbone's noise schedule (the
    record gives t's sigma or alpha_bar; a fixed pair reads no score stage). Not `table`: it is those stages'
    rows, covered by their keys."""
    key = stage_key("select", cfg.model_dump(mode="json"), {s.name + str(i): s.key for i, s in enumerate(scores)},
                    code_digest(__name__), extra=json.dumps(schedule, sort_keys=True))
    return workdir.stage("select", key).ref()


def noise_words(noise: dict[str, Any] | None) -> str:
    """` (sigma 0.136, scheduler index 950)` for a flow-matching backbone: where t sits in its schedule (a DDPM
    t is its own scheduler index; the record carries its alpha_bar)."""
    if not noise or "sigma" not in noise:
        return ""
    return f" (sigma {noise['sigma']:.3f}, scheduler index {noise['scheduler_index']})"


def policy_params(cfg: SelectConfig) -> dict[str, Any]:
    """The keyword arguments the configured policy takes."""
    if cfg.policy == "aselect":
        return {"hfr_site": cfg.hfr_site, "layers": cfg.layers, "feature_site": cfg.feature_site,
                "feature_layer": cfg.feature_layer}
    if cfg.policy == "hybrid":
        return {"hfr_site": cfg.hfr_site, "layers": cfg.layers}
    if cfg.policy == "fixed":
        return {"timestep": cfg.timestep, "layer": cfg.layer, "site": cfg.site}
    return {}


def _without_table(selection: dict[str, Any]) -> dict[str, Any]:
    """A selection as returned and put in the manifest: the full score table stays in selection.json only."""
    return {k: v for k, v in selection.items() if k != "table"}


def _confidence(cfg: SelectConfig, table: list[dict[str, Any]], scores: list[StageRef]) -> dict[str, Any] | None:
    """The bootstrap confidence of an aselect choice, when the score stage kept per-image values (streamed HFR).
    A hybrid choice's timestep is the aselect one: its HFR score stage comes first, and the record is the
    aselect choice's (the few-shot layer and site are not resampled)."""
    if cfg.policy not in ("aselect", "hybrid") or not cfg.bootstrap or not scores:
        return None
    if cfg.policy == "aselect" and len(scores) != 1:
        return None
    per_image = read_per_image(scores[0])
    if per_image is None:
        return None
    hfr = [row for row in table if row["scorer"] == "hfr"]
    aselect = cfg.model_copy(update={"policy": "aselect"})
    found = bootstrap_confidence("aselect", hfr, per_image, policy_params(aselect), cfg.bootstrap, cfg.bootstrap_seed)
    if cfg.policy == "hybrid":  # only t is HFR's: its share is the choice's confidence
        found.update(value=found["timestep"], selected={"timestep": found["selected"]["timestep"]})
    return found


def _calibration(cfg: SelectConfig, scores: list[StageRef]) -> dict[str, Any] | None:
    """What the aselect calibration spent (images, rounds, timesteps scored, forward passes, budget), as the
    score stage carried it from the calibration (the HFR one, first, for a hybrid choice)."""
    if cfg.policy not in ("aselect", "hybrid") or not scores:
        return None
    return (scores[0].dir.read_manifest() or {}).get("calibration")


@task(name="select")
def select_pair(stage: StageRef, cfg: SelectConfig, table: list[dict[str, Any]],
                scores: list[StageRef] | None = None, schedule: dict[str, Any] | None = None) -> State:
    """Apply the selection policy to the score table; aselect also records its bootstrap confidence. With the
    backbone's `schedule`, the record says where t sits in it (sigma or alpha_bar, the scheduler index)."""

    def work(stage_dir: StageDir) -> Finished:
        chosen = select(cfg.policy, table, **policy_params(cfg))
        chosen.confidence = _confidence(cfg, table, scores or [])
        chosen.calibration = _calibration(cfg, scores or [])
        selection = chosen.to_dict()
        if schedule is not None:
            selection["noise"] = noise_point(scheduler_from_config(schedule), selection["timestep"]).record()
        write_json_atomic(stage_dir.path / SELECTION_JSON, selection)
        pictures = [p.name for p in score_heatmaps(selection["table"], stage_dir.path, selection)]
        confidence = selection["confidence"]
        sure = (f"; confidence {confidence['value']:.2f} ({confidence['resamples']} bootstrap resamples of "
                f"{confidence['images']} images)" if confidence else "")
        spent = selection["calibration"]
        if spent:
            sure += (f"; calibration {spent['forward_passes']} forward passes, {spent['images']} images x "
                     f"{spent['timesteps_scored']} of {spent['timesteps_candidates']} timesteps")
        summary = (f"{cfg.policy}: t={selection['timestep']}{noise_words(selection.get('noise'))} layer "
                   f"{selection['layer']} {selection['site']} "
                   f"({selection['reason']}{sure})")
        return Finished(summary, {"selection": _without_table(selection), "pictures": pictures},
                        {"selection": _without_table(selection)})

    def reuse(stage_dir: StageDir) -> dict[str, Any]:
        return {"selection": _without_table(json.loads((stage_dir.path / SELECTION_JSON).read_text()))}

    def artifact(done: Finished) -> None:
        heatmaps = ", ".join(str(stage.dir.path / p) for p in done.manifest["pictures"])
        create_markdown_artifact(key="selection", description="the selected (timestep, layer, site)",
                                 markdown=f"## Selection\n\n{done.summary}\n\nrunner-up: "
                                          f"`{done.result['selection']['runner_up']}`\n\nheatmaps: {heatmaps}\n")

    state = stage_body(stage, {"config": cfg.model_dump(mode="json")}, work, reuse=reuse, artifact=artifact)
    advice = unstable_choice_advice(state.data["selection"])
    if advice:
        get_run_logger().warning(advice)
    elif cfg.policy == "aselect":
        get_run_logger().info(LABELS_ADVICE)
    return state
