"""The two flows over the same stages.

- `aselect-pipeline` (A-SelecT): ingest -> backbone -> calibrate (a small subset grown in rounds, t searched
  coarse to fine) -> score HFR -> select -> dump only the selected pair for every image -> probe.
- `aselect-exhaustive` (the oracle): ingest -> backbone -> dump the whole grid for every image
  -> score every pair with a linear probe -> select the best -> probe.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from aselect.pipelines import plan
from aselect.pipelines.config import RunConfig, load_config
from aselect.pipelines.select import middle_third, select
from aselect.storage.errors import AselectError
from aselect.storage.stages import StageRef, Workdir
from aselect.tasks.backbone import ModelInfo, backbone, plan_backbone
from aselect.tasks.calibrate import calibrate, plan_calibrate
from aselect.tasks.dump import dump, plan_dump
from aselect.tasks.ingest import DatasetCounts, ingest, plan_ingest
from aselect.tasks.probe import plan_probe, probe
from aselect.tasks.score import plan_score, score
from aselect.tasks.select import plan_select, select_pair
from aselect.tasks.stage import StageCost, StageReport, plan_and_run

# Flow parameters: Prefect turns these pydantic types into the deployment's parameter schema, so a
# malformed override is refused when the run is submitted; a well-formed but wrong one (unknown key,
# bad value) fails the run at its start with the config loader's one-line error.
Override = Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*=.*$", description="section.key=value")]
ConfigName = Annotated[str, Field(min_length=1, description="a bundled config name or a YAML path")]

# pipelines/ logs to `aselect.*`; Prefect attaches its handlers to it (PREFECT_LOGGING_EXTRA_LOGGERS)
# but not a level, and the root's WARNING would hide progress lines.
logging.getLogger("aselect").setLevel(logging.INFO)


def resolve_run_config(config: str, overrides: list[str] | None, workdir: str | None) -> RunConfig:
    """The config a run uses: the file or bundled name, `--set` overrides, then `--workdir`."""
    cfg = load_config(config, list(overrides or []))
    return cfg.model_copy(update={"workdir": Path(workdir)}) if workdir else cfg


def is_segmentation(dataset: StageRef) -> bool:
    """Datasets with per-pixel masks are evaluated by segmentation mIoU, the others by top-1."""
    return DatasetCounts.of(dataset).segmentation


def run_summary(cfg: RunConfig, work: Workdir, flow_name: str, reports: list[StageReport]) -> dict[str, Any]:
    """The JSON a run prints: the flow, stages, the selection (its `policy` too), the metric and what it cost."""
    selection = next((r.result["selection"] for r in reports if r.name == "select"), None)
    metrics = next((dict(r.result["metrics"]) for r in reports if r.name == "probe"), None)
    # What selecting and evaluating cost; ingest and the backbone are left out (every flow shares them).
    # Forward passes count images x timesteps; compute seconds are the stages' own recorded seconds, whether
    # or not this run recomputed them; wall seconds are this run's time in its stages (small when cached).
    cost = {"forward_passes": 0, "probe_fits": 0, "compute_seconds": 0.0, "wall_seconds": 0.0, "cached_stages": 0}
    for r in reports:
        if r.name in ("ingest", "backbone"):
            continue
        stage_cost = StageCost.of(StageRef(r.name, r.key, r.path))
        cost["forward_passes"] += stage_cost.forward_passes
        cost["probe_fits"] += stage_cost.probe_fits
        cost["compute_seconds"] += stage_cost.seconds
        cost["wall_seconds"] += r.seconds
        cost["cached_stages"] += int(r.cached)
    cost["compute_seconds"] = round(cost["compute_seconds"], 3)
    cost["wall_seconds"] = round(cost["wall_seconds"], 3)
    return {"config": cfg.name, "flow": flow_name, "workdir": str(work.root), "stages": [r.as_dict() for r in reports],
            "selection": selection, "metrics": metrics, "cost": cost}


def _start(config: str, overrides: list[str] | None, workdir: str | None, label: str) -> tuple[RunConfig, Workdir]:
    """Resolve the config and check the workdir before any stage runs."""
    cfg = resolve_run_config(config, overrides, workdir)
    work = Workdir(cfg.workdir)
    work.check_writable()
    get_run_logger().info("%s: config %s, workdir %s", label, cfg.name, work.root)
    return cfg, work


def run_foundation(cfg: RunConfig, work: Workdir, reports: list[StageReport]) -> tuple[StageRef, StageRef]:
    """Stages 1-2, shared by both flows."""
    dataset = plan_and_run(ingest, plan_ingest, work, reports, cfg=cfg.ingest)
    model = plan_and_run(backbone, plan_backbone, work, reports, cfg=cfg.backbone, dataset=dataset)
    return dataset, model


def _select_and_probe(cfg: RunConfig, work: Workdir, reports: list[StageReport], select_cfg: Any,
                      scores: list[StageRef], table: list[dict], dataset: StageRef, model: StageRef,
                      features: StageRef | None) -> None:
    """Stages 5-6; `features=None` dumps the selected pair first (the A-SelecT path)."""
    plan_and_run(select_pair, plan_select, work, reports, cfg=select_cfg, table=table, scores=scores,
                 schedule=ModelInfo.of(model).scheduler)
    selection = reports[-1].result["selection"]
    draws: list[StageRef] = []
    online = None
    if cfg.probe.kind == "attentive" and cfg.probe.online:
        # nothing dumped: the probe computes the pair's token maps as this dump would; its key names them
        online = plan.selected_pair(cfg.dump, selection, segmentation=True)
        features = plan_dump(work, cfg=online, dataset=dataset, model=model)
    elif cfg.probe.kind == "attentive":
        # the attentive probe reads token maps of the selected pair, one dump per noise draw (draw 0 first)
        pair_cfg = plan.selected_pair(cfg.dump, selection, segmentation=True)
        draws = [plan_and_run(dump, plan_dump, work, reports, cfg=pair_cfg.model_copy(update={"draw": k}),
                              dataset=dataset, model=model, dask=cfg.dask) for k in range(cfg.probe.noise_draws)]
        features = draws[0]
    elif features is None:
        pair_cfg = plan.selected_pair(cfg.dump, selection, is_segmentation(dataset))
        features = plan_and_run(dump, plan_dump, work, reports, cfg=pair_cfg, dataset=dataset, model=model,
                                dask=cfg.dask)
    plan_and_run(probe, plan_probe, work, reports, cfg=cfg.probe, features=features, dataset=dataset,
                 selection=selection, draws=draws[1:], model=model, online=online)


def hfr_band(cfg: RunConfig, model: StageRef) -> list[int]:
    """The layers the aselect policy averages HFR over: `select.layers`, else the middle third of the DiT."""
    depth = ModelInfo.of(model).num_layers
    return sorted(cfg.select.layers) if cfg.select.layers else middle_third(range(depth))


def calibration_layers(cfg: RunConfig, model: StageRef) -> list[int] | None:
    """Layers the A-SelecT calibration reduces (None: every layer): by default only those its policy reads, so the
    forward pass stops after the deepest of them."""
    if cfg.calibrate.layers == "all":
        return None
    if cfg.calibrate.layers is not None:
        return sorted(cfg.calibrate.layers)
    fixed = [] if cfg.select.feature_layer == "argmax" else [int(cfg.select.feature_layer)]
    return sorted({*hfr_band(cfg, model), *fixed})


def _calibrate_and_score(cfg: RunConfig, work: Workdir, reports: list[StageReport], dataset: StageRef,
                         model: StageRef) -> StageRef:
    """Stages 3-4 of the cheap flow: the candidate timesteps (`calibrate.timesteps`) on the calibration subset.

    `aselect` streams HFR (label-free) of the `calibrate.sites` token or attention maps: the forward hooks reduce
    each map to one number per image, and scoring averages them; it searches t coarse to fine and adds images in
    rounds until its choice is stable, within `calibrate.budget` of the exhaustive run's forward passes
    (`plan.calibration_search`). `fewshot` dumps pooled features (token maps for segmentation) of the same few
    images at every candidate and scores a probe with their labels (nearest class mean for classification, a
    per-token probe for segmentation).
    """
    segmentation = is_segmentation(dataset)
    calib = plan.calibration(cfg, segmentation, calibration_layers(cfg, model))
    calib_cfg, hfr, scorer, keep_maps = calib.dump, calib.hfr, calib.scorer, calib.keep_maps
    if hfr is None:
        calibration = plan_and_run(dump, plan_dump, work, reports, stage_name="calibrate", cfg=calib_cfg,
                                   dataset=dataset, model=model, calibration_images=cfg.calibrate.fixed_images(),
                                   hfr=hfr, keep_maps=keep_maps, dask=cfg.dask)
    else:
        counts = DatasetCounts.of(dataset)
        search = plan.calibration_search(cfg, counts.images, counts.train, hfr_band(cfg, model), segmentation)
        calibration = plan_and_run(calibrate, plan_calibrate, work, reports, cfg=calib_cfg, dataset=dataset,
                                   model=model, search=search, hfr=hfr, keep_maps=keep_maps, dask=cfg.dask)
    return plan_and_run(score, plan_score, work, reports, cfg=cfg.score, scorer=scorer, features=calibration,
                        dataset=dataset, dask=cfg.dask)


def _fewshot_at(cfg: RunConfig, work: Workdir, reports: list[StageReport], dataset: StageRef, model: StageRef,
                timestep: int) -> StageRef:
    """The hybrid policy's second look: the few-shot calibration (pooled features of `calibrate.images` labelled
    images; token maps for segmentation) at the one timestep HFR chose, every layer and pooled site, scored."""
    few = cfg.model_copy(update={"select": cfg.select.model_copy(update={"policy": "fewshot"})})
    calib = plan.calibration(few, is_segmentation(dataset), None)
    features = plan_and_run(dump, plan_dump, work, reports, stage_name="calibrate",
                            cfg=calib.dump.model_copy(update={"timesteps": [timestep]}), dataset=dataset,
                            model=model, calibration_images=cfg.calibrate.fixed_images(), dask=cfg.dask)
    return plan_and_run(score, plan_score, work, reports, cfg=cfg.score, scorer=calib.scorer, features=features,
                        dataset=dataset, dask=cfg.dask)


@flow(name="aselect-pipeline")
def aselect_pipeline(config: ConfigName = "digits", overrides: list[Override] | None = None,
                     workdir: str | None = None) -> dict[str, Any]:
    """A-SelecT: pick (t, l, s) by HFR on a calibration subset, then dump and probe only that pair.

    `select.policy` swaps the selector: `fewshot` probes the calibration subset with its labels instead of
    HFR, `hybrid` takes t from HFR and the layer and site from that probe at t, `fixed` takes the configured pair
    without scoring anything.
    """
    cfg, work = _start(config, overrides, workdir, "A-SelecT")
    if cfg.select.policy == "oracle":
        raise AselectError("select.policy 'oracle' is the exhaustive path: run it with --exhaustive "
                           "(the aselect-exhaustive flow)")
    reports: list[StageReport] = []
    # 1-2. ingest, backbone; a select.preset needs the backbone's depth and token grid
    dataset, model = run_foundation(cfg, work, reports)
    info = ModelInfo.of(model)
    cfg = cfg.resolved(info.num_layers, info.token_grid)
    # 3-4. calibrate: the candidate timesteps and layers on a small subset; score it (HFR, or the few-shot probe)
    if cfg.select.policy == "fixed":
        scored, table = [], []
    else:
        scored = [_calibrate_and_score(cfg, work, reports, dataset, model)]
        table = reports[-1].result["rows"]
    # The HFR band is named explicitly: the middle third of the whole DiT, not of the layers calibration reduced.
    select_cfg = cfg.select
    if select_cfg.policy in ("aselect", "hybrid") and select_cfg.layers is None:
        select_cfg = select_cfg.model_copy(update={"layers": hfr_band(cfg, model)})
    if select_cfg.policy == "hybrid":  # 3-4 again: the few-shot probe at HFR's t alone picks layer and site
        t_star = select("aselect", table, hfr_site=select_cfg.hfr_site, layers=select_cfg.layers).timestep
        scored.append(_fewshot_at(cfg, work, reports, dataset, model, t_star))
        table = [*table, *reports[-1].result["rows"]]
    # 5-6. select, dump the selected pair for every image, probe
    _select_and_probe(cfg, work, reports, select_cfg, scored, table, dataset, model, None)
    return run_summary(cfg, work, "aselect-pipeline", reports)


@flow(name="aselect-exhaustive")
def aselect_exhaustive(config: ConfigName = "digits", overrides: list[Override] | None = None,
                       workdir: str | None = None) -> dict[str, Any]:
    """The oracle: dump the whole grid for every image, probe-score every pair, keep the best."""
    cfg, work = _start(config, overrides, workdir, "exhaustive")
    reports: list[StageReport] = []
    # 1-2. ingest, backbone
    dataset, model = run_foundation(cfg, work, reports)
    # 3. dump the grid for every image (token maps too for segmentation)
    grid_cfg, scorer = plan.exhaustive(cfg.dump, is_segmentation(dataset))
    grid = plan_and_run(dump, plan_dump, work, reports, cfg=grid_cfg, dataset=dataset, model=model, dask=cfg.dask)
    # 4. score every pair with the labelled probe (train split only)
    scores = plan_and_run(score, plan_score, work, reports, cfg=cfg.score, scorer=scorer, features=grid,
                          dataset=dataset, dask=cfg.dask)
    # 5-6. select the best pair, probe it from the same dump
    oracle = cfg.select.model_copy(update={"policy": "oracle"})
    _select_and_probe(cfg, work, reports, oracle, [scores], reports[-1].result["rows"], dataset, model, grid)
    return run_summary(cfg, work, "aselect-exhaustive", reports)


if __name__ == "__main__":
    aselect_pipeline()
