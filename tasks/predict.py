"""The predict task: a finished run applied to image files, its results written as they come. Never cached: each
call reads new images, and a killed call leaves an earlier output table as it was."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from aselect.pipelines.predict import describe, load_run, predict_to
from aselect.tasks.stage import ProgressArtifact

LOG_EVERY = 10.0  # seconds between progress lines


def default_out(workdir: str | Path, task: str, as_json: bool) -> Path:
    """Where results go without `out`: `<workdir>/predictions.csv` (`.jsonl`), or `<workdir>/masks/` for masks."""
    return Path(workdir) / ("masks" if task == "segmentation" else f"predictions.{'jsonl' if as_json else 'csv'}")


@task(name="predict", cache_policy=NO_CACHE)
def predict(paths: list[str], workdir: str, run: str | None = None, out: str | None = None, as_json: bool = False,
            skip_bad: bool = False) -> dict[str, Any]:
    """Predict image files and folders with a finished run of `workdir` and write the table (and masks) to `out`."""
    logger = get_run_logger()
    loaded = load_run(workdir, run)
    target = Path(out) if out else default_out(workdir, loaded.task, as_json)
    logger.info("predict: run %s (%s, %s %s probe) on %s -> %s", loaded.key, loaded.flow, loaded.probe, loaded.task,
                ", ".join(paths), target)
    bar = ProgressArtifact("predict-progress", f"predict with run {loaded.key[:12]}")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        bar.update(done / max(total, 1), force=done == total)
        if done == total or time.monotonic() - last[0] >= LOG_EVERY:
            last[0] = time.monotonic()
            logger.info("predict: %d/%d files", done, total)

    summary = predict_to(loaded, paths, target, as_json=as_json, skip_bad=skip_bad,
                         on_skip=lambda message: logger.warning("skipped %s", message), progress=progress,
                         label="out")
    logger.info("predict: %s", describe(summary))
    return summary
