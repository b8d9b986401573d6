"""Stage 6 task: train and evaluate the downstream probe on the selected pair's features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import State

from aselect.pipelines.attentive import attentive_classifier, attentive_segmenter, save_head
from aselect.pipelines.backbone import load_backbone
from aselect.pipelines.config import ATTENTIVE_PROBE_KEYS, LINEAR_PROBE_KEYS, DumpConfig, ProbeConfig
from aselect.pipelines.online import OnlineFeatures, TrainingDraws
from aselect.pipelines.plots import training_curve
from aselect.pipelines.probe import (
    LINEAR_META,
    ProbeResult,
    classification_probe,
    classification_probe_streamed,
    grid_side,
    save_linear,
    segmentation_probe,
    segmentation_probe_streamed,
)
from aselect.pipelines.threads import torch_threads
from aselect.storage.code import code_digest
from aselect.storage.datasets import open_images, read_dataset_info, read_mask_class_names, read_masks, read_split
from aselect.storage.errors import AselectError
from aselect.storage.features import PairReader
from aselect.storage.stages import StageDir, StageRef, Workdir, stage_key, write_json_atomic
from aselect.tasks.backbone import backbone_dir
from aselect.tasks.stage import Finished, ProgressArtifact, stage_body

METRICS_JSON = "metrics.json"
HEAD_DIR = "head"  # the attentive probe's trained head
CURVE_PNG = "training.png"  # its loss and validation score per epoch


def plan_probe(workdir: Workdir, cfg: ProbeConfig, features: StageRef, selection: dict[str, Any],
               dataset: StageRef | None = None, draws: list[StageRef] | None = None, model: StageRef | None = None,
               online: DumpConfig | None = None) -> StageRef:
    """The probe's key: its section, the features it reads (and the attentive probe's extra noise draws) and the
    selected pair. Not `dataset` (labels, masks, split), `model` or `online` (the online probe's pair dump
    settings): the features' dump key holds them, whether the dump ran or the probe computes its features."""
    pair = {k: selection[k] for k in ("timestep", "layer", "site")}
    upstream = {"features": features.key, **{f"draw{k + 1}": d.key for k, d in enumerate(draws or [])}}
    # the other kind's knobs change nothing this probe computes
    unused = set(ATTENTIVE_PROBE_KEYS if cfg.kind == "linear" else LINEAR_PROBE_KEYS)
    key = stage_key("probe", {**cfg.model_dump(mode="json", exclude=unused), "pair": pair}, upstream,
                    code_digest(__name__))
    return workdir.stage("probe", key).ref()


def stream_window(cfg: ProbeConfig, row_nbytes: int) -> int:
    """Rows a streamed probe reads at a time: a quarter of the budget (float64 copies are made of each batch)."""
    return max(16, int(cfg.memory_budget_mb * 2**20 / 4 / max(row_nbytes, 1)))


@task(name="probe")
def probe(stage: StageRef, cfg: ProbeConfig, features: StageRef, dataset: StageRef,
          selection: dict[str, Any], draws: list[StageRef] | None = None, model: StageRef | None = None,
          online: DumpConfig | None = None) -> State:
    """Classification top-1 (pooled features) or segmentation mIoU (token maps) on the test split; the attentive
    probe reads the token maps of `features` and of its extra noise `draws`, or (`probe.online`) computes them
    through `model` as the pair's dump `online` (not run; `features` is its key) would."""

    def work(stage_dir: StageDir) -> Finished:
        labels, train_idx, test_idx = read_split(dataset.dir.path)
        masks = read_masks(dataset.dir.path)
        segmentation = masks is not None
        if cfg.kind == "attentive" and cfg.online:
            if model is None or online is None:
                raise AselectError("probe.online: the probe needs the backbone and the pair's dump settings")
            return _attentive_online(stage_dir, cfg, model, online, features, selection, labels, masks,
                                     np.asarray(train_idx), np.asarray(test_idx), dataset)
        reader = PairReader(features.dir.path, selection["timestep"], selection["layer"], selection["site"],
                            spatial=segmentation or cfg.kind == "attentive")
        position = {int(s): i for i, s in enumerate(reader.samples)}
        train = np.asarray([position[int(i)] for i in train_idx])
        test = np.asarray([position[int(i)] for i in test_idx])
        if cfg.kind == "attentive":
            return _attentive(stage, stage_dir, cfg, reader, [features, *(draws or [])], selection, labels, masks,
                              train, test, dataset)
        streamed = len(train) * reader.row_nbytes > cfg.memory_budget_mb * 2**20
        options = {"Cs": cfg.cs, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
        classes = len(read_mask_class_names(dataset.dir.path)) if segmentation else 0
        if streamed:
            rows = reader.windows(stream_window(cfg, reader.row_nbytes))
            get_run_logger().info("probe: %.0f MiB of train features > probe.memory_budget_mb %g: streaming them "
                                  "from the dump", len(train) * reader.row_nbytes / 2**20, cfg.memory_budget_mb)
            if not segmentation:
                result = classification_probe_streamed(rows, train, labels[train_idx], test, labels[test_idx],
                                                       **options)
            else:
                result = segmentation_probe_streamed(rows, reader.row_shape[0], train, masks[train_idx], test,
                                                     masks[test_idx], classes, **options)
        else:
            x = reader.read_all()
            if not segmentation:
                result = classification_probe(x[train], labels[train_idx], x[test], labels[test_idx], **options)
            else:
                result = segmentation_probe(x[train], masks[train_idx], x[test], masks[test_idx], classes, **options)
        _save_linear(stage_dir, result, selection, dataset, masks, reader.row_shape, streamed)
        metrics = result.record()
        write_json_atomic(stage_dir.path / METRICS_JSON, metrics)
        pair = f"t={selection['timestep']} layer {selection['layer']} {selection['site']}"
        summary = f"{result.metric} {result.value:.4f} on {len(test)} test images ({pair})"
        return Finished(summary, {"metric": result.metric, "value": result.value,
                                  "probe_fits": int(result.details.get("fits", len(cfg.cs) + 1)),
                                  "linear": LINEAR_META},
                        {"metrics": metrics})

    upstream = {"features": features.key, **{f"draw{k + 1}": d.key for k, d in enumerate(draws or [])}}
    inputs = {"config": cfg.model_dump(mode="json"), "selection": selection, "upstream": upstream,
              "online": None if online is None else {"dump": online.model_dump(mode="json"),
                                                     "ingest": dataset.key, "backbone": model.key if model else None}}
    return stage_body(stage, inputs, work,
                      reuse=lambda stage_dir: {"metrics": json.loads((stage_dir.path / METRICS_JSON).read_text())})


def _attentive(stage: StageRef, stage_dir: StageDir, cfg: ProbeConfig, reader: PairReader, draws: list[StageRef],
               selection: dict[str, Any], labels: np.ndarray, masks: np.ndarray | None, train: np.ndarray,
               test: np.ndarray, dataset: StageRef) -> Finished:
    """Train the attentive head on the token maps of every noise draw (resuming from its epoch checkpoints), save
    it in the stage (head.safetensors + head.json), and evaluate it."""
    maps = [reader.read_all()]
    for extra in draws[1:]:
        maps.append(PairReader(extra.dir.path, selection["timestep"], selection["layer"], selection["site"],
                               spatial=True).read_all())
    progress = ProgressArtifact("probe-progress", f"attentive probe, {cfg.epochs} epochs on {len(draws)} draw(s)")
    report = lambda epoch, total: progress.update(epoch / total)  # noqa: E731 - one-line adapter
    with torch_threads(cfg.threads):
        if masks is None:
            result, state, head = attentive_classifier(maps, labels, train, test, cfg, stage_dir.path, report)
        else:
            classes = len(read_mask_class_names(dataset.dir.path))
            result, state, head = attentive_segmenter(maps, masks, train, test, classes, cfg, stage_dir.path,
                                                      report)
    progress.update(1.0, force=True)
    return _attentive_finish(stage_dir, cfg, result, state, head, selection, f"{len(draws)} noise draw(s)", {})


def _attentive_finish(stage_dir: StageDir, cfg: ProbeConfig, result: ProbeResult, state: dict, head: dict,
                      selection: dict[str, Any], noise: str, manifest: dict[str, Any]) -> Finished:
    """Save the trained head, its metrics and training curve in the stage; the stage's summary."""
    save_head(stage_dir.path / HEAD_DIR, state, {**head, "selection": {k: selection[k] for k in
                                                                       ("timestep", "layer", "site")}})
    metrics = result.record()
    write_json_atomic(stage_dir.path / METRICS_JSON, metrics)
    pair = f"t={selection['timestep']} layer {selection['layer']} {selection['site']}"
    details = result.details
    training_curve(details["curve"], stage_dir.path / CURVE_PNG, result.metric, details.get("best_epoch"))
    _curve_artifact(details["curve"], result.metric, details.get("best_epoch"), stage_dir.path / CURVE_PNG)
    summary = (f"{result.metric} {result.value:.4f} on {details.get('test_size')} test images ({pair}; attentive "
               f"probe, best epoch {details.get('best_epoch')} of {details.get('epochs')}, {noise}"
               + (f", resumed after epoch {details['resumed_from']}" if details.get("resumed_from") else "") + ")")
    return Finished(summary, {"metric": result.metric, "value": result.value, "probe_fits": 1, "head": HEAD_DIR,
                              "curve": CURVE_PNG, **manifest}, {"metrics": metrics})


def _attentive_online(stage_dir: StageDir, cfg: ProbeConfig, model: StageRef, pair: DumpConfig,
                      features: StageRef, selection: dict[str, Any], labels: np.ndarray, masks: np.ndarray | None,
                      train: np.ndarray, test: np.ndarray, dataset: StageRef) -> Finished:
    """The attentive head trained on features computed in the loop: a fresh draw per epoch, evaluation over draws
    0..noise_draws-1 (kept in memory for the validation and test rows only)."""
    source = OnlineFeatures(load_backbone(backbone_dir(model)), open_images(dataset.dir.path),
                            int(selection["timestep"]), int(selection["layer"]), selection["site"], pair)
    evaluation = [source.draw(k, cache=True) for k in range(cfg.noise_draws)]
    training = TrainingDraws(source, cfg.epochs)
    progress = ProgressArtifact("probe-progress", f"attentive probe, {cfg.epochs} epochs, features computed online")
    report = lambda epoch, total: progress.update(epoch / total)  # noqa: E731 - one-line adapter
    with torch_threads(cfg.threads):
        if masks is None:
            result, state, head = attentive_classifier(evaluation, labels, train, test, cfg, stage_dir.path, report,
                                                       train_draws=training)
        else:
            classes = len(read_mask_class_names(dataset.dir.path))
            result, state, head = attentive_segmenter(evaluation, masks, train, test, classes, cfg, stage_dir.path,
                                                      report, train_draws=training)
    progress.update(1.0, force=True)
    noise = {"features": features.key, "dump": pair.model_dump(mode="json")}
    extra = {"accounting": {"images_timesteps": source.forward_passes}, "online": noise}
    return _attentive_finish(stage_dir, cfg, result, state, head, selection, f"{cfg.epochs} fresh online draws",
                             extra)


def _save_linear(stage_dir: StageDir, result: ProbeResult, selection: dict[str, Any], dataset: StageRef,
                 masks: np.ndarray | None, row_shape: tuple[int, ...], streamed: bool) -> None:
    """The linear probe's final fit, in the stage (linear.safetensors + linear.json): what applying it to new images
    needs besides the backbone (`aselect predict`, `aselect.load_run`)."""
    info = read_dataset_info(dataset.dir.path)
    meta: dict[str, Any] = {"C": result.details["C"], "streamed": streamed, "features": "pooled",
                            "selection": {k: selection[k] for k in ("timestep", "layer", "site")}}
    if masks is None:
        meta.update(task="classification", class_names=info.class_names)
    else:
        tokens = int(row_shape[0])
        meta.update(task="segmentation", class_names=info.mask_class_names, features="tokens",
                    tokens=tokens, grid=grid_side(tokens), mask_size=[int(v) for v in masks.shape[1:]])
    meta["num_classes"] = len(meta["class_names"])
    save_linear(stage_dir.path, result.fitted, meta)


def _curve_artifact(curve: list, metric: str, best_epoch: int | None, picture: Path) -> None:
    """The training curve as a Prefect table artifact (the PNG sits in the stage)."""
    rows = "\n".join(f"| {int(e)} | {loss:.4f} | {score:.4f} |{' kept' if int(e) == best_epoch else ''}"
                     for e, loss, score in curve)
    try:
        create_markdown_artifact(key="probe-training", description="attentive probe: loss and validation per epoch",
                                 markdown=f"| epoch | train loss | validation {metric} |\n| --- | --- | --- |\n"
                                          f"{rows}\n\n![curve](file://{picture})\n")
    except Exception as exc:  # noqa: BLE001 - artifacts are a convenience: the PNG and metrics.json say the same
        get_run_logger().warning("probe: training-curve artifact not written (%s)", exc)
