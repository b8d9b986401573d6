"""Stage 3 task: dump DiT features for the configured timesteps, layers and sites to Zarr.

The same task serves three stages: `calibrate` (every candidate timestep on a small calibration subset),
`dump` (the exhaustive grid, or only the selected pair, for the whole dataset).
"""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.states import State

from aselect.pipelines.backbone import load_backbone
from aselect.pipelines.config import DaskConfig, DumpConfig
from aselect.pipelines.dump import plan_layout, run_dump
from aselect.pipelines.ingest import calibration_subset
from aselect.pipelines.streamed import HfrStream
from aselect.storage.code import code_digest
from aselect.storage.datasets import read_split
from aselect.storage.stages import StageDir, StageRef, Workdir, stage_key
from aselect.tasks.backbone import backbone_dir
from aselect.tasks.stage import Finished, ProgressArtifact, stage_body

# How work is spread does not change the features, so it does not change the key.
NOT_IN_KEY = {"workers", "device"}


def plan_dump(workdir: Workdir, cfg: DumpConfig, dataset: StageRef, model: StageRef, name: str = "dump",
              calibration_images: int | None = None, hfr: HfrStream | None = None,
              keep_maps: bool = False, dask: DaskConfig | None = None) -> StageRef:
    """The dump's key: its section (minus placement knobs), the sample subset, what is streamed, the upstreams.
    Not `dask`: where the dump runs does not change the features."""
    section = {**cfg.model_dump(mode="json", exclude=NOT_IN_KEY), "calibration_images": calibration_images}
    if hfr is not None:  # a streamed calibration: its reduction's knobs decide what is stored
        section |= {"hfr": hfr.model_dump(mode="json"), "keep_maps": keep_maps}
    key = stage_key(name, section, {"ingest": dataset.key, "backbone": model.key}, code_digest(__name__),
                    "streamed" if hfr is not None else "")
    return workdir.stage(name, key).ref()


@task(name="dump")
def dump(stage: StageRef, cfg: DumpConfig, dataset: StageRef, model: StageRef,
         calibration_images: int | None = None, hfr: HfrStream | None = None,
         keep_maps: bool = False, dask: DaskConfig | None = None) -> State:
    """Stream features of every (timestep, chunk) to the stage's Zarr store, resuming finished chunks.

    With `hfr` (the A-SelecT calibration) the forward hooks reduce each map to per-image HFR and only those
    scalars are stored, plus the maps themselves when `keep_maps` asks for them.
    """

    def work(stage_dir: StageDir) -> Finished:
        labels, train_idx, _ = read_split(dataset.dir.path)
        samples = (calibration_subset(labels, train_idx, calibration_images, cfg.seed)
                   if calibration_images else np.arange(len(labels)))
        model_path = backbone_dir(model)
        model_backbone = load_backbone(model_path)
        layout = plan_layout(model_backbone, samples, cfg, hfr=hfr, keep_maps=keep_maps, stage=stage.name)
        progress = ProgressArtifact(f"{stage.name}-progress",
                                    f"{stage.name}: {len(layout.timesteps)} timesteps x {len(samples)} images")
        result = run_dump(model_path, dataset.dir.path, stage_dir.path, layout, cfg,
                          progress=lambda done, total: progress.update(done / total), backbone=model_backbone,
                          dask=dask)
        progress.update(1.0, force=True)
        # every image of a dump costs the same bytes per timestep, so this holds for a resumed dump too
        per_image = (result.bytes_written / max(1, result.images_timesteps) * len(layout.timesteps)
                     * layout.inputs_per_image)
        signal = ("" if layout.hfr_signal == "plain"
                  else f" ({layout.hfr_signal}, {layout.inputs_per_image} inputs/image)")
        what = (f"HFR{signal} of {len(layout.hfr_sites)} site(s) streamed" + (", maps kept" if keep_maps else "")
                if layout.hfr_sites else f"{len(layout.sites) + layout.attn_map} sites")
        summary = (f"{len(layout.timesteps)} timesteps x {len(layout.layers)} layers x {what} x {len(samples)} "
                   f"images, {per_image / 1024:.1f} KiB/image, "
                   f"{result.rate:.0f} image-timesteps/s"
                   + (f", resumed ({result.items_reused}/{result.items_total} items reused)"
                      if result.items_reused else ""))
        return Finished(summary, {"layout": {
            "timesteps": list(layout.timesteps), "layers": list(layout.layers), "sites": list(layout.sites),
            "attn_map": layout.attn_map, "spatial": layout.spatial, "pooled": layout.pooled,
            "hfr_sites": list(layout.hfr_sites), "samples": len(samples), "width": layout.width,
            "tokens": layout.tokens, "chunk": layout.chunk,
        }, "accounting": {
            "items_total": result.items_total, "items_computed": result.items_computed,
            "items_reused": result.items_reused, "batches": result.batches,
            "images_timesteps": result.images_timesteps,
            "images_timesteps_per_second": round(result.rate, 2), "bytes_written": result.bytes_written,
            "bytes_per_image": round(per_image, 1),
            "dump_seconds": result.seconds, "workers": cfg.workers,
        }})

    inputs = {"config": cfg.model_dump(mode="json"), "calibration_images": calibration_images,
              "hfr": hfr.model_dump(mode="json") if hfr else None, "keep_maps": keep_maps,
              "upstream": {"ingest": dataset.key, "backbone": model.key}}
    return stage_body(stage, inputs, work)
