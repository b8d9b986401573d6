"""Stage 6 task: train and evaluate the downstream probe on the selected pair's features."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import numpy as np
from prefect import task

from aselect.pipelines.config import ProbeConfig
from aselect.pipelines.probe import PROBE_VERSION, classification_probe, segmentation_probe
from aselect.storage.datasets import read_mask_class_names, read_masks, read_split
from aselect.storage.features import open_features
from aselect.storage.stages import StageDir, StageRef, Workdir, stage_key, write_json_atomic
from aselect.tasks.stage import Finished, stage_body

METRICS_JSON = "metrics.json"


def plan_probe(workdir: Workdir, cfg: ProbeConfig, features: StageRef, selection: dict[str, Any]) -> StageRef:
    """The probe's key: its section, the features it reads and the selected pair."""
    pair = {k: selection[k] for k in ("timestep", "layer", "site")}
    key = stage_key("probe", {**cfg.model_dump(mode="json"), "pair": pair}, {"features": features.key},
                    PROBE_VERSION)
    return workdir.stage("probe", key).ref()


def pair_features(features: StageRef, selection: dict[str, Any], spatial: bool) -> tuple[np.ndarray, np.ndarray]:
    """(dataset indices, features) of the selected pair: pooled (n, D) or spatial (n, T, D)."""
    group = open_features(features.dir.path)
    ti = list(group["timestep"][:]).index(selection["timestep"])
    li = list(group["layer"][:]).index(selection["layer"])
    si = list(group["site"][:]).index(selection["site"])
    array = group["spatial" if spatial else "pooled"]
    return group["sample"][:], np.asarray(array[ti, li, si], dtype=np.float32)


@task(name="probe")
def probe(stage: StageRef, cfg: ProbeConfig, features: StageRef, dataset: StageRef,
          selection: dict[str, Any]) -> dict[str, Any]:
    """Classification top-1 (pooled features) or segmentation mIoU (token maps) on the test split."""

    def work(stage_dir: StageDir) -> Finished:
        labels, train_idx, test_idx = read_split(dataset.dir.path)
        masks = read_masks(dataset.dir.path)
        samples, x = pair_features(features, selection, spatial=masks is not None)
        position = {int(s): i for i, s in enumerate(samples)}
        train = np.asarray([position[int(i)] for i in train_idx])
        test = np.asarray([position[int(i)] for i in test_idx])
        if masks is None:
            result = classification_probe(x[train], labels[train_idx], x[test], labels[test_idx], Cs=cfg.cs,
                                          val_fraction=cfg.val_fraction, seed=cfg.seed)
        else:
            names = read_mask_class_names(dataset.dir.path)
            result = segmentation_probe(x[train], masks[train_idx], x[test], masks[test_idx], len(names), Cs=cfg.cs,
                                        val_fraction=cfg.val_fraction, seed=cfg.seed)
        metrics = asdict(result)
        write_json_atomic(stage_dir.path / METRICS_JSON, metrics)
        pair = f"t={selection['timestep']} layer {selection['layer']} {selection['site']}"
        summary = f"{result.metric} {result.value:.4f} on {len(test)} test images ({pair})"
        return Finished(summary, {"metric": result.metric, "value": result.value,
                                  "probe_fits": int(result.details.get("fits", len(cfg.cs) + 1))},
                        {"metrics": metrics})

    inputs = {"config": cfg.model_dump(mode="json"), "selection": selection, "upstream": {"features": features.key}}
    return stage_body(stage, inputs, work,
                      reuse=lambda stage_dir: {"metrics": json.loads((stage_dir.path / METRICS_JSON).read_text())})
