"""The `aselect-pipeline` flow: ingest -> backbone -> dump (score, select and probe follow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pipelines.config import RunConfig, load_config
from storage.stages import Workdir
from tasks.backbone import backbone, plan_backbone
from tasks.dump import dump, plan_dump
from tasks.ingest import ingest, plan_ingest
from tasks.stage import run_stage


def resolve_run_config(config: str, overrides: list[str] | None, workdir: str | None) -> RunConfig:
    """The config a run uses: the file or bundled name, `--set` overrides, then `--workdir`."""
    cfg = load_config(config, list(overrides or []))
    return cfg.model_copy(update={"workdir": Path(workdir)}) if workdir else cfg


@flow(name="aselect-pipeline")
def aselect_pipeline(config: str = "digits", overrides: list[str] | None = None,
                     workdir: str | None = None) -> dict[str, Any]:
    """Run the A-SelecT pipeline on a config; every stage is cached by its key in the workdir."""
    logger = get_run_logger()
    cfg = resolve_run_config(config, overrides, workdir)
    work = Workdir(cfg.workdir)
    work.check_writable()
    logger.info("config %s, workdir %s", cfg.name, work.root)

    # 1. ingest
    dataset = plan_ingest(work, cfg.ingest)
    reports = [run_stage(ingest, dataset, work, cfg=cfg.ingest)]
    # 2. backbone
    model = plan_backbone(work, cfg.backbone, dataset)
    reports.append(run_stage(backbone, model, work, cfg=cfg.backbone, dataset=dataset))
    # 3. dump features
    features = plan_dump(work, cfg.dump, dataset, model)
    reports.append(run_stage(dump, features, work, cfg=cfg.dump, dataset=dataset, model=model))

    return {
        "config": cfg.name,
        "workdir": str(work.root),
        "stages": [r.as_dict() for r in reports],
        "selection": None,
        "metrics": None,
    }


if __name__ == "__main__":
    aselect_pipeline()
