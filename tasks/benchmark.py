"""Benchmark tasks: time the dump and the Dask scoring at fractions of the dataset; never cached (they measure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from aselect.pipelines import plan
from aselect.pipelines.benchmark import measure_scaling
from aselect.pipelines.config import RunConfig
from aselect.storage.datasets import read_masks, read_split
from aselect.storage.stages import StageRef
from aselect.tasks.backbone import backbone_dir
from aselect.tasks.score import scorer_params
from aselect.tasks.stage import ProgressArtifact


@task(name="scaling", cache_policy=NO_CACHE)
def scaling(cfg: RunConfig, dataset: StageRef, model: StageRef, scratch: Path) -> dict[str, Any]:
    """Dump and score the exhaustive grid at `bench.scaling_fractions` of N, and score at N per worker count."""
    logger = get_run_logger()
    labels, _, _ = read_split(dataset.dir.path)
    masks = read_masks(dataset.dir.path)
    grid, scorer = plan.exhaustive(cfg.dump, segmentation=masks is not None)
    progress = ProgressArtifact("scaling-progress", f"scaling of dump and scoring on {cfg.name}")
    result = measure_scaling(backbone_dir(model), dataset.dir.path, grid, scorer, scorer_params(cfg.score, scorer),
                             labels, masks, cfg.bench.scaling_fractions, cfg.bench.scaling_workers, scratch,
                             progress=progress.update)
    progress.update(1.0, force=True)
    logger.info("scaling %s: dump ratios %s, scoring speedup %s with %d workers", cfg.name,
                [p["dump_ratio_to_full"] for p in result["points"]], result["dask_speedup"], result["speedup_workers"])
    return result
