"""Stage 1 task: ingest a dataset source into a Zarr group."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from aselect.pipelines.config import IngestConfig
from aselect.pipelines.ingest import INGEST_VERSION, load_dataset, source_fingerprint
from aselect.storage.datasets import write_dataset
from aselect.storage.stages import StageRef, Workdir, stage_key
from aselect.tasks.stage import ProgressArtifact


def plan_ingest(workdir: Workdir, cfg: IngestConfig) -> StageRef:
    """The ingest stage's key: its config section, the source's content fingerprint and code version."""
    key = stage_key("ingest", cfg.model_dump(mode="json"), {}, INGEST_VERSION, extra=source_fingerprint(cfg))
    return workdir.stage("ingest", key).ref()


@task(name="ingest")
def ingest(stage: StageRef, cfg: IngestConfig) -> dict[str, Any]:
    """Read the configured image source into the stage's Zarr group."""
    logger = get_run_logger()
    stage_dir = stage.dir
    with stage_dir.lock():
        if stage_dir.is_complete():  # another run finished it while we waited for the lock
            return {"summary": stage_dir.read_manifest()["summary"]}
        stage_dir.begin({"config": cfg.model_dump(mode="json")})
        progress = ProgressArtifact("ingest-progress", f"ingest {cfg.source}")
        dataset = load_dataset(cfg, progress=lambda done, total: progress.update(done / max(total, 1)))
        write_dataset(dataset, stage_dir.path)
        n, c, h, w = dataset.images.shape
        summary = (f"{cfg.source}: {n} images {c}x{h}x{w}, {len(dataset.class_names)} classes, "
                   f"{len(dataset.train_idx)} train / {len(dataset.test_idx)} test"
                   + (f", masks {len(dataset.mask_class_names or [])} classes" if dataset.masks is not None else "")
                   + (f", {len(dataset.skipped)} skipped" if dataset.skipped else ""))
        stage_dir.complete(summary, counts={
            "images": n, "classes": len(dataset.class_names), "train": len(dataset.train_idx),
            "test": len(dataset.test_idx), "skipped": len(dataset.skipped),
            "masks": len(dataset.mask_class_names or []) if dataset.masks is not None else 0,
        }, skipped=dataset.skipped[:100], class_names=dataset.class_names)
        progress.update(1.0, force=True)
    logger.info("ingest %s: %s", stage.key, summary)
    return {"summary": summary}
