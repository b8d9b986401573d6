"""Stage 1 task: ingest a dataset source into a Zarr group."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from prefect import task
from prefect.states import State

from aselect.pipelines.config import IngestConfig
from aselect.pipelines.ingest import ingest_dataset, source_fingerprint
from aselect.storage.code import code_digest
from aselect.storage.stages import StageDir, StageRef, Workdir, stage_key
from aselect.tasks.stage import Finished, ProgressArtifact, stage_body


@dataclass(frozen=True)
class DatasetCounts:
    """What an ingest stage recorded of its dataset's size (`masks`: mask classes, 0 for classification)."""

    images: int
    classes: int
    train: int
    test: int
    skipped: int
    masks: int

    @classmethod
    def of(cls, stage: StageRef) -> DatasetCounts:
        """The counts in a finished ingest stage's manifest."""
        counts = (stage.dir.read_manifest() or {}).get("counts", {})
        return cls(**{f.name: int(counts.get(f.name, 0)) for f in fields(cls)})

    @property
    def segmentation(self) -> bool:
        """Datasets with per-pixel masks are evaluated by segmentation mIoU, the others by top-1."""
        return self.masks > 0


def plan_ingest(workdir: Workdir, cfg: IngestConfig) -> StageRef:
    """The ingest stage's key: its config section, the source's content fingerprint and its code."""
    key = stage_key("ingest", cfg.model_dump(mode="json"), {}, code_digest(__name__), extra=source_fingerprint(cfg))
    return workdir.stage("ingest", key).ref()


@task(name="ingest")
def ingest(stage: StageRef, cfg: IngestConfig) -> State:
    """Read the configured image source into the stage's Zarr group."""

    def work(stage_dir: StageDir) -> Finished:
        progress = ProgressArtifact("ingest-progress", f"ingest {cfg.source}")
        dataset = ingest_dataset(cfg, stage_dir.path, lambda done, total: progress.update(done / max(total, 1)))
        progress.update(1.0, force=True)
        n, c, h, w = dataset.images.shape
        summary = (f"{cfg.source}: {n} images {c}x{h}x{w}, {len(dataset.class_names)} classes, "
                   f"{len(dataset.train_idx)} train / {len(dataset.test_idx)} test"
                   + (f", masks {len(dataset.mask_class_names or [])} classes" if dataset.masks is not None else "")
                   + (f", {len(dataset.skipped)} skipped" if dataset.skipped else ""))
        counts = DatasetCounts(images=n, classes=len(dataset.class_names), train=len(dataset.train_idx),
                               test=len(dataset.test_idx), skipped=len(dataset.skipped),
                               masks=len(dataset.mask_class_names or []) if dataset.masks is not None else 0)
        return Finished(summary, {"counts": asdict(counts), "skipped": dataset.skipped[:100],
                                  "class_names": dataset.class_names})

    return stage_body(stage, {"config": cfg.model_dump(mode="json")}, work)
