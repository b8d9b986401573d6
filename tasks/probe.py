"""Stage 6 task: train and evaluate the downstream probe on the selected pair's features."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.states import State

from aselect.pipelines.config import ProbeConfig
from aselect.pipelines.probe import (
    classification_probe,
    classification_probe_streamed,
    segmentation_probe,
    segmentation_probe_streamed,
)
from aselect.storage.code import code_digest
from aselect.storage.datasets import read_mask_class_names, read_masks, read_split
from aselect.storage.features import PairReader
from aselect.storage.stages import StageDir, StageRef, Workdir, stage_key, write_json_atomic
from aselect.tasks.stage import Finished, stage_body

METRICS_JSON = "metrics.json"


def plan_probe(workdir: Workdir, cfg: ProbeConfig, features: StageRef, selection: dict[str, Any],
               dataset: StageRef | None = None) -> StageRef:
    """The probe's key: its section, the features it reads and the selected pair. Not `dataset` (labels, masks,
    split): the dump's key holds the dataset's."""
    pair = {k: selection[k] for k in ("timestep", "layer", "site")}
    key = stage_key("probe", {**cfg.model_dump(mode="json"), "pair": pair}, {"features": features.key},
                    code_digest(__name__))
    return workdir.stage("probe", key).ref()


def stream_window(cfg: ProbeConfig, row_nbytes: int) -> int:
    """Rows a streamed probe reads at a time: a quarter of the budget (float64 copies are made of each batch)."""
    return max(16, int(cfg.memory_budget_mb * 2**20 / 4 / max(row_nbytes, 1)))


@task(name="probe")
def probe(stage: StageRef, cfg: ProbeConfig, features: StageRef, dataset: StageRef,
          selection: dict[str, Any]) -> State:
    """Classification top-1 (pooled features) or segmentation mIoU (token maps) on the test split."""

    def work(stage_dir: StageDir) -> Finished:
        labels, train_idx, test_idx = read_split(dataset.dir.path)
        masks = read_masks(dataset.dir.path)
        segmentation = masks is not None
        reader = PairReader(features.dir.path, selection["timestep"], selection["layer"], selection["site"],
                            spatial=segmentation)
        position = {int(s): i for i, s in enumerate(reader.samples)}
        train = np.asarray([position[int(i)] for i in train_idx])
        test = np.asarray([position[int(i)] for i in test_idx])
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
