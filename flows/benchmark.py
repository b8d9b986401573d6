"""The `aselect-benchmark` flow: every selector against the exhaustive oracle, measured in one run.

Per config: ingest and the backbone come from the workdir (cached; pretraining is not a selection cost),
then every selector runs its path in a fresh workdir, so the seconds compared were all spent in this run.
Results: `<workdir>/bench/results.json`, `results.md`, `cost-vs-regret.png` and `<config>-metric-vs-t.png`
(the previous run's JSON is kept as `previous.json` and compared against), and the `benchmark-results` artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from aselect.flows.pipeline import ConfigName, aselect_exhaustive, aselect_pipeline, resolve_run_config, run_foundation
from aselect.pipelines.backbone import load_backbone
from aselect.pipelines.benchmark import (
    Selector,
    attentive_pairs,
    attentive_report,
    best_pair_at,
    check_reused_config,
    confidence_curve,
    config_report,
    flag_regressions,
    hfr_probe_spearman,
    leave_one_config_out,
    leave_one_config_out_by_probe,
    measured_stamp,
    oracle_timesteps,
    pixel_baseline,
    probe_vs_timestep,
    reused_reports,
    selector_row,
    selectors,
    split_regret,
    to_markdown,
)
from aselect.pipelines.cluster import dask_client
from aselect.pipelines.config import RunConfig
from aselect.pipelines.models import VARIANTS, Backbone, build_dit, build_mmdit, make_scheduler, save_backbone
from aselect.pipelines.plan import hfr_stream
from aselect.pipelines.plots import cost_vs_regret, metric_vs_timestep
from aselect.storage.code import code_digest
from aselect.storage.datasets import read_dataset
from aselect.storage.stages import StageRef, Workdir, self_digest, write_json_atomic
from aselect.tasks.backbone import ModelInfo, backbone_dir
from aselect.tasks.benchmark import scaling as scaling_task
from aselect.tasks.ingest import DatasetCounts
from aselect.tasks.probe import plan_probe, probe
from aselect.tasks.score import read_per_image, read_rows
from aselect.tasks.select import policy_params
from aselect.tasks.stage import StageCost, StageReport, plan_and_run

REPORT_TASKS = ("ingest", "backbone", "dump", "score", "select", "probe", "benchmark")  # what a report runs
DEFAULT_CONFIGS = ("digits", "digits-noisy", "digits-mmdit", "textures-mmdit", "digits-latent-mmdit", "shapes",
                   "textures", "digits-latent", "mnist5k", "mnist32")
BENCH_WORK = ".bench-work"  # fresh per-config workdirs (a dot directory: `aselect inspect` skips it)


def _score_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The score table of a run's score stage."""
    stage = next(s for s in summary["stages"] if s["name"] == "score")
    return read_rows(StageRef(stage["name"], stage["key"], stage["path"]))


def _machine() -> dict[str, Any]:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"cores": os.cpu_count(), "torch": torch.__version__, "device": device, "python": platform.python_version()}


def bench_config(name: str, cfg: RunConfig, measure_scaling: bool, out: Path, keep_work: bool) -> dict[str, Any]:
    """Every selector on config `name` (resolved: `cfg`), in a fresh workdir seeded with the cached dataset and
    backbone."""
    logger = get_run_logger()
    began = time.perf_counter()
    main = Workdir(cfg.workdir)
    main.check_writable()
    foundation: list[StageReport] = []
    dataset, model = run_foundation(cfg, main, foundation)
    fresh = Workdir(main.root / BENCH_WORK / cfg.name)
    shutil.rmtree(fresh.root, ignore_errors=True)
    fresh.check_writable()
    dataset, model = fresh.adopt(dataset), fresh.adopt(model)
    depth = ModelInfo.of(model).num_layers
    rows, summaries, chosen = [], {}, selectors(cfg, depth)
    # One Dask cluster serves every selector's scoring, so its start-up is in no selector's cost.
    dask = cfg.dask
    with dask_client(dask.address, dask.workers, dask.threads_per_worker, dask.connect_seconds) as client:
        # scoring only: the selectors' dumps run as the config says (in process, unless it names a cluster)
        shared = [f"dask.address={client.scheduler.address}", f"dask.dump={str(bool(dask.address)).lower()}"]
        for selector in chosen:
            logger.info("bench %s: %s", cfg.name, selector.label)
            run = aselect_exhaustive if selector.exhaustive else aselect_pipeline
            started = time.perf_counter()
            summary = run(config=name, overrides=[*selector.overrides, *shared], workdir=str(fresh.root))
            rows.append(selector_row(selector, summary, time.perf_counter() - started))
            summaries[selector.name] = summary
    measured = scaling_task(cfg, dataset, model, fresh.root / "scaling") if measure_scaling else None
    oracle_rows, hfr_rows = _score_rows(summaries["oracle"]), _score_rows(summaries["aselect"])
    for selector, row in zip(chosen, rows, strict=True):  # does HFR rank the grid the way the oracle's probe does?
        if selector.hfr_site:
            row["spearman_hfr_vs_probe"] = hfr_probe_spearman(_score_rows(summaries[selector.name]), oracle_rows,
                                                              selector.hfr_site)
    metric_site = cfg.select.feature_site if any(r["site"] == cfg.select.feature_site for r in oracle_rows) \
        else oracle_rows[0]["site"]
    curves = metric_vs_timestep(oracle_rows, hfr_rows, out / f"{cfg.name}-metric-vs-t.png", metric_site=metric_site,
                                hfr_site=cfg.select.hfr_site, metric_name=oracle_rows[0]["scorer"])
    counts = DatasetCounts.of(dataset)
    # what the default's calibration spent: its C and the timesteps its search scored (the record says)
    spent = summaries["aselect"]["selection"].get("calibration") or {}
    candidates = len(cfg.calibrate.candidate_timesteps(cfg.dump))
    calibration_images = spent.get("images", min(cfg.calibrate.fixed_images(), counts.train))
    grid = {"family": ModelInfo.of(model).family, "timesteps": spent.get("timesteps_scored", candidates),
            "candidate_timesteps": candidates, "oracle_timesteps": len(oracle_timesteps(cfg)),
            "images": counts.images, "calibration_images": calibration_images,
            "calibration_inputs": hfr_stream(cfg).inputs_per_image}
    curve = _confidence_curve(cfg, chosen, summaries, calibration_images)
    _split_regrets(cfg, fresh, dataset, rows, summaries["oracle"], oracle_rows)
    attentive = _attentive(name, cfg, fresh, rows, summaries["aselect"]) if cfg.bench.attentive_timesteps else None
    baselines = _baselines(name, cfg, fresh, dataset, model, summaries["oracle"]["selection"])
    if not keep_work:
        shutil.rmtree(fresh.root, ignore_errors=True)
    return config_report(cfg.name, rows, measured, {"metric vs t": str(curves)}, grid, curve, baselines,
                         probe_vs_timestep(oracle_rows), round(time.perf_counter() - began, 1), attentive)


def _attentive(name: str, cfg: RunConfig, work: Workdir, rows: list[dict[str, Any]],
               default: dict[str, Any]) -> dict[str, Any]:
    """The attentive protocol: the attentive probe on each of `attentive_pairs` (a fixed-pair run each, its token
    maps dumped in `work`; nothing is scored, so no Dask), and the report of what it changes (`attentive_report`)."""
    logger = get_run_logger()
    epochs = cfg.bench.attentive_epochs
    runs = []
    for pair in attentive_pairs(cfg.bench.attentive_timesteps, rows):
        logger.info("bench %s: attentive probe at t=%s layer %s %s (%s)", cfg.name, pair["timestep"], pair["layer"],
                    pair["site"], ", ".join(pair["roles"]))
        summary = aselect_pipeline(config=name, workdir=str(work.root), overrides=[
            "select.policy=fixed", f"select.timestep={pair['timestep']}", f"select.layer={pair['layer']}",
            f"select.site={pair['site']}", "probe.kind=attentive", f"probe.epochs={epochs}"])
        runs.append({**pair, "value": round(float(summary["metrics"]["value"]), 4),
                     "forward_passes": summary["cost"]["forward_passes"],
                     "compute_seconds": summary["cost"]["compute_seconds"]})
    # what the default spent before its pair's dump and probe: the label-free calibration, scoring and selection
    spent = [StageCost.of(StageRef(s["name"], s["key"], s["path"])) for s in default["stages"]
             if s["name"] in ("calibrate", "score", "select")]
    calibration = {"forward_passes": sum(c.forward_passes for c in spent),
                   "compute_seconds": sum(c.seconds for c in spent)}
    return attentive_report(runs, rows, epochs, calibration)


def _split_regrets(cfg: RunConfig, work: Workdir, dataset: StageRef, rows: list[dict[str, Any]],
                   oracle: dict[str, Any], oracle_rows: list[dict[str, Any]]) -> None:
    """Each selector's regret as timestep regret + feature regret: the best pair at its timestep (by the oracle's
    probe score) is probed on the oracle's dump, which holds every pair of the candidate grid."""
    grid = next(s for s in oracle["stages"] if s["name"] == "dump")
    features = StageRef(grid["name"], grid["key"], grid["path"])
    oracle_value = float(oracle["metrics"]["value"])
    probed: dict[tuple, float] = {}
    for row in rows:
        pair = best_pair_at(oracle_rows, row["timestep"])
        if pair is not None and pair == (row["timestep"], row["layer"], row["site"]):
            probed[pair] = row["value"]
        if pair is not None and pair not in probed:
            selection = dict(zip(("timestep", "layer", "site"), pair, strict=True))
            reports: list[StageReport] = []
            plan_and_run(probe, plan_probe, work, reports, cfg=cfg.probe, features=features, dataset=dataset,
                         selection=selection)
            probed[pair] = float(reports[-1].result["metrics"]["value"])
        split_regret(row, oracle_value, probed.get(pair) if pair else None)


def _baselines(name: str, cfg: RunConfig, work: Workdir, dataset: StageRef, model: StageRef,
               oracle_pair: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The probe on raw pixels, and on a random-weight DiT of the same shape at the oracle's pair."""
    data = read_dataset(dataset.dir.path)
    patch = VARIANTS[cfg.backbone.variant]["patch_size"] if cfg.backbone.kind == "pretrain" else 1
    if cfg.backbone.kind == "pretrain" and cfg.backbone.latent is not None:  # a token covers patch x down pixels
        patch *= 2 ** (len(cfg.backbone.latent.vae_blocks) - 1)
    pixels = pixel_baseline(data.images, data.labels, data.train_idx, data.test_idx, data.masks, patch,
                            cfg.probe.cs, cfg.probe.val_fraction, cfg.probe.seed, cfg.dump.sensor_noise, cfg.dump.seed,
                            mask_class_names=data.mask_class_names)
    out = {"pixels": {"label": "raw pixels (no DiT)", **pixels}}
    if cfg.backbone.kind != "pretrain":
        return out
    random_dir = work.root / "random-dit"
    torch.manual_seed(cfg.backbone.pretrain.seed)
    if cfg.backbone.pretrain_family == "sd3":  # an untrained MMDiT under the trained one's VAE and empty prompt
        trained = load_backbone(backbone_dir(model))
        side, channels = int(trained.transformer.config.sample_size), int(trained.transformer.config.in_channels)
        untrained = build_mmdit(cfg.backbone.variant, side, channels)
        save_backbone(Backbone(transformer=untrained, scheduler=trained.scheduler, vae=trained.vae,
                               source="random-dit", conditioning=trained.conditioning), random_dir)
    elif cfg.backbone.latent is None:
        build_dit(cfg.backbone.variant, cfg.ingest.image_size, cfg.ingest.channels, len(data.class_names)) \
            .save_pretrained(random_dir / "transformer")
        make_scheduler(cfg.backbone.num_train_timesteps, cfg.backbone.beta_schedule).save_pretrained(
            random_dir / "scheduler")
    else:  # latent: the trained VAE encodes, an untrained DiT on its latents
        trained = load_backbone(backbone_dir(model))
        side, latent_channels = int(trained.transformer.config.sample_size), int(trained.vae.config.latent_channels)
        untrained = build_dit(cfg.backbone.variant, side, latent_channels, len(data.class_names))
        save_backbone(Backbone(transformer=untrained, scheduler=trained.scheduler, vae=trained.vae,
                               source="random-dit"), random_dir)
    t, layer, site = oracle_pair["timestep"], oracle_pair["layer"], oracle_pair["site"]
    # a loaded DiT brings its own VAE (the trained one, for a latent config): no latent section
    summary = aselect_pipeline(config=name, workdir=str(work.root), overrides=[
        "backbone.kind=load", f"backbone.path={random_dir}", "backbone.latent=null", "select.policy=fixed",
        f"select.timestep={t}",
        f"select.layer={layer}", f"select.site={site}"])
    kind = "MMDiT" if cfg.backbone.pretrain_family == "sd3" else "DiT"
    out["random_dit"] = {"label": f"random-weight {cfg.backbone.variant} ({kind} init, untrained), at the oracle's "
                                  f"pair t={t} layer {layer} {site}",
                         "metric": summary["metrics"]["metric"], "value": round(float(summary["metrics"]["value"]), 4)}
    return out


def _confidence_curve(cfg: RunConfig, chosen: list[Selector], summaries: dict[str, Any],
                      calibration_images: int) -> list[dict[str, Any]]:
    """Confidence vs C, bootstrapped from the per-image HFR of the curve selector's calibration."""
    source = next((s for s in chosen if s.curve), None)
    if source is None:
        return []
    stage = next(s for s in summaries[source.name]["stages"] if s["name"] == "score")
    ref = StageRef(stage["name"], stage["key"], stage["path"])
    per_image = read_per_image(ref)
    if per_image is None:
        return []
    sizes = [*cfg.bench.confidence_images, calibration_images]
    return confidence_curve(read_rows(ref), per_image, policy_params(cfg.select), sizes,
                            cfg.select.bootstrap or 200, cfg.select.bootstrap_seed)


def bench_code() -> str:
    """The digest of the code a config's report comes from: this flow, the pipeline flows and every stage task
    (with what they import from pipelines/ and storage/)."""
    return code_digest(__name__, "aselect.flows.pipeline", *(f"aselect.tasks.{stage}" for stage in REPORT_TASKS))


def _config_report(name: str, workdir: str | None, scaling: bool, out: Path, keep_work: bool,
                   reused: dict[str, dict[str, Any]], command: str) -> dict[str, Any]:
    """One config's report: from `reused` (earlier results the user named), else kept under `<out>/configs/` by a
    key of its resolved config and its code (`bench_code`), so a rerun after an interruption (or with more configs)
    measures only the configs not finished yet, and a code change measures them again."""
    logger = get_run_logger()
    cfg = resolve_run_config(name, None, workdir)
    if cfg.name in reused:
        check_reused_config(cfg, reused)
        report = reused[cfg.name]
        stamp = report["measured"]
        logger.info("bench %s: reusing the report measured %s by bench code %s%s", cfg.name, stamp["generated"],
                    stamp["bench_code"][:8], "" if "config_digest" in stamp else " (its config was not recorded)")
        return report
    digest = hashlib.sha256(json.dumps([bench_code(), scaling, cfg.model_dump(mode="json", exclude={"workdir"})],
                                       sort_keys=True).encode()).hexdigest()[:16]
    saved = out / "configs" / f"{cfg.name}-{digest}.json"
    if saved.is_file():
        kept = _read_checked(saved)
        if kept is not None:
            logger.info("bench %s: finished in an earlier run (%s); reusing its report", cfg.name, saved)
            return kept
        logger.warning("bench %s: %s is damaged (its checksum does not match); measuring the config again",
                       cfg.name, saved)
    report = bench_config(name, cfg, scaling, out, keep_work)
    header = {"generated": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine(),
              "bench_code": bench_code(), "command": command}
    report["measured"] = measured_stamp(header, cfg)
    saved.parent.mkdir(exist_ok=True)
    write_json_atomic(saved, report | {REPORT_CHECKSUM: self_digest(report)})
    return report


REPORT_CHECKSUM = "digest"  # a kept config report's sha256 of the rest of it (`self_digest`)


def _read_checked(path: Path) -> dict[str, Any] | None:
    """A kept config report, or None when it cannot be read or no longer matches its checksum."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get(REPORT_CHECKSUM) != self_digest(kept):
        return None
    kept.pop(REPORT_CHECKSUM)
    return kept


@flow(name="aselect-benchmark")
def aselect_benchmark(configs: list[ConfigName] | None = None, workdir: str | None = None, scaling: bool = True,
                      keep_work: bool = False, command: str | None = None,
                      reuse: list[str] | None = None) -> dict[str, Any]:
    """Run every selector and the oracle on each config (taking the reports of configs found in the `reuse`
    results files as they are); write the report and flag regressions."""
    logger = get_run_logger()
    names = list(configs or DEFAULT_CONFIGS)
    command = command or f"aselect bench {' '.join(names)}"
    reused = reused_reports([Path(p) for p in reuse or []])
    first = resolve_run_config(names[0], None, workdir)
    main = Workdir(first.workdir)
    main.check_writable()  # before `bench/` is made in it, so a new workdir is checked while empty
    out = main.root / "bench"
    out.mkdir(parents=True, exist_ok=True)
    reports = [_config_report(name, workdir, scaling, out, keep_work, reused, command) for name in names]
    results, previous_path = out / "results.json", out / "previous.json"
    previous = json.loads(results.read_text()) if results.exists() else None
    if results.exists():
        results.replace(previous_path)
    picture = cost_vs_regret(reports, out / "cost-vs-regret.png")
    report = {"bench_code": bench_code(), "generated": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": _machine(), "command": command, "configs": reports,
              "regressions": flag_regressions(reports, previous if isinstance(previous, dict) else None),
              "leave_one_config_out": leave_one_config_out(reports),
              "leave_one_config_out_by_probe": leave_one_config_out_by_probe(reports),
              "pictures": {"cost vs regret": str(picture)}}
    write_json_atomic(results, report)
    markdown = to_markdown(report) + f"\nCost vs regret: `{picture}`\n"
    (out / "results.md").write_text(markdown)
    artifacts = {
        "benchmark-results": lambda: create_markdown_artifact(
            key="benchmark-results", markdown=markdown, description="every selector against the exhaustive oracle"),
        "benchmark-selectors": lambda: create_table_artifact(
            key="benchmark-selectors", description="one row per (config, selector)",
            table=[{"config": c["config"], **{k: v for k, v in r.items() if k != "cost_ratio"},
                    "cost_ratio_compute": r["cost_ratio"]["compute_seconds"]}
                   for c in reports for r in c["selectors"]]),
    }
    for key, create in artifacts.items():
        try:
            create()
        except Exception as exc:  # artifacts are a convenience; results.json and results.md say the same
            logger.warning("benchmark artifact %s not written (%s: %s); %s has the same", key,
                           type(exc).__name__, exc, results)
    for flag in report["regressions"]:
        logger.warning("regression: %s", flag)
    for c in reports:
        for goal_name, goal in c["goals"].items():
            if not goal["met"]:
                logger.warning("%s: goal %s (%s) not met: measured %s", c["config"], goal_name, goal["goal"],
                               goal["measured"])
    return report | {"results": str(results), "markdown": str(out / "results.md")}


if __name__ == "__main__":
    aselect_benchmark()
