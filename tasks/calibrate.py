"""Stage 3 task of the aselect policy: calibrate in rounds, coarse to fine, within a share of the exhaustive cost.

The store is one calibration dump over the most images the search may use, in chunks of one round each; each
round and each finer level of the timestep search computes only its own (timestep, chunk) items, so a killed
calibration resumes from their completion records. `pipelines.plan.run_search` decides what to compute next.
"""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.states import State

from aselect.pipelines import plan
from aselect.pipelines.backbone import load_backbone
from aselect.pipelines.config import DaskConfig, DumpConfig
from aselect.pipelines.dump import DumpResult, plan_layout, run_dump
from aselect.pipelines.ingest import calibration_subset
from aselect.pipelines.streamed import HfrStream
from aselect.storage.code import code_digest
from aselect.storage.datasets import read_split
from aselect.storage.features import read_hfr
from aselect.storage.stages import StageDir, StageRef, Workdir, stage_key
from aselect.tasks.backbone import backbone_dir
from aselect.tasks.stage import Finished, ProgressArtifact, stage_body

NOT_IN_KEY = {"workers", "device"}  # where the forward passes run does not change the values


def plan_calibrate(workdir: Workdir, cfg: DumpConfig, dataset: StageRef, model: StageRef,
                   search: plan.CalibrationSearch, hfr: HfrStream, keep_maps: bool = False,
                   dask: DaskConfig | None = None, name: str = "calibrate") -> StageRef:
    """The calibration's key: its dump section (minus placement), the search, what is streamed, the upstreams.
    Not `dask`: where it runs does not change a value."""
    section = {**cfg.model_dump(mode="json", exclude=NOT_IN_KEY), "search": search.model_dump(mode="json"),
               "hfr": hfr.model_dump(mode="json"), "keep_maps": keep_maps}
    key = stage_key(name, section, {"ingest": dataset.key, "backbone": model.key}, code_digest(__name__), "streamed")
    return workdir.stage(name, key).ref()


def calibration_samples(labels: np.ndarray, train_idx: np.ndarray, search: plan.CalibrationSearch,
                        seed: int) -> np.ndarray:
    """The calibration store's images: a seeded stratified subset of the train split; for rounds, ordered so
    each round is stratified too (an integer C keeps the subset's sorted order)."""
    subset = calibration_subset(labels, train_idx, search.images, seed)
    return subset[plan.round_order(labels[subset], seed)] if search.grow else subset


@task(name="calibrate")
def calibrate(stage: StageRef, cfg: DumpConfig, dataset: StageRef, model: StageRef, search: plan.CalibrationSearch,
              hfr: HfrStream, keep_maps: bool = False, dask: DaskConfig | None = None) -> State:
    """Stream per-image HFR of the rounds and timesteps the search asks for; record what it spent and why."""

    def work(stage_dir: StageDir) -> Finished:
        labels, train_idx, _ = read_split(dataset.dir.path)
        samples = calibration_samples(labels, train_idx, search, cfg.seed)
        model_path = backbone_dir(model)
        model_backbone = load_backbone(model_path)
        # rounds: one chunk each, so a round's items are its own; one round (an integer C): the dump's chunks
        dump_cfg = cfg.model_copy(update={"images_per_chunk": search.round_images}) if search.grow else cfg
        layout = plan_layout(model_backbone, samples, dump_cfg, hfr=hfr, keep_maps=keep_maps, stage="calibrate")
        most = search.images * plan.search_bound(len(layout.timesteps), search.strides)
        progress = ProgressArtifact(f"{stage.name}-progress",
                                    f"{stage.name}: at most {search.images} images x {len(layout.timesteps)} "
                                    f"candidate timesteps")
        results: list[DumpResult] = []

        def measure(indices: list[int], rounds: int) -> np.ndarray:
            images = min(rounds * search.round_images, search.images)
            items = [(ti, ci) for ti in indices for ci in range(-(-images // layout.chunk))]
            results.append(run_dump(model_path, dataset.dir.path, stage_dir.path, layout, dump_cfg,
                                    backbone=model_backbone, dask=dask, items=items))
            progress.update(sum(r.images_timesteps for r in results) / max(1, most * layout.inputs_per_image))
            values, _ = read_hfr(stage_dir.path)  # (timestep, layer, hfr_site, sample)
            return values[indices][..., :images]

        outcome = plan.run_search(search, layout.timesteps, layout.layers, layout.hfr_sites, measure)
        progress.update(1.0, force=True)
        record = outcome.record(search, len(layout.timesteps))
        computed = sum(r.images_timesteps for r in results)
        written = sum(r.bytes_written for r in results)
        items = -(-outcome.images // layout.chunk) * len(outcome.scored)
        items_computed = sum(r.items_computed for r in results)
        signal = ("" if layout.hfr_signal == "plain"
                  else f" ({layout.hfr_signal}, {layout.inputs_per_image} inputs/image)")
        why = {"stable": f"choice stable after {outcome.rounds} round(s)", "fixed": "calibrate.images",
               "ceiling": "C's ceiling reached", "budget": "calibrate.budget reached"}[outcome.stopped]
        capped = f", capped at {search.images} by calibrate.budget" if record["capped"] else ""
        summary = (f"HFR{signal} of {len(layout.hfr_sites)} site(s) streamed, {outcome.images} images ({why}{capped}) "
                   f"x {len(outcome.scored)} of {len(layout.timesteps)} timesteps x {len(layout.layers)} layers: "
                   f"{record['forward_passes']} forward passes"
                   + (f" of {search.budget} budgeted" if search.budget is not None else "")
                   + (f", resumed ({items - items_computed}/{items} items reused)" if items_computed < items else ""))
        return Finished(summary, {"layout": {
            "timesteps": list(layout.timesteps), "layers": list(layout.layers), "sites": list(layout.sites),
            "attn_map": layout.attn_map, "spatial": layout.spatial, "pooled": layout.pooled,
            "hfr_sites": list(layout.hfr_sites), "samples": outcome.images, "width": layout.width,
            "tokens": layout.tokens, "chunk": layout.chunk,
        }, "accounting": {
            "items_total": items, "items_computed": items_computed, "items_reused": items - items_computed,
            "batches": sum(r.batches for r in results), "images_timesteps": computed, "bytes_written": written,
            # every image costs the same bytes per timestep, so this holds for a resumed calibration too
            "bytes_per_image": round(written / max(1, computed) * len(outcome.scored) * layout.inputs_per_image, 1),
            "dump_seconds": round(sum(r.seconds for r in results), 3), "workers": cfg.workers,
        }, "calibration": record}, {"calibration": record})

    inputs = {"config": cfg.model_dump(mode="json"), "search": search.model_dump(mode="json"),
              "hfr": hfr.model_dump(mode="json"), "keep_maps": keep_maps,
              "upstream": {"ingest": dataset.key, "backbone": model.key}}
    return stage_body(stage, inputs, work, reuse=lambda stage_dir: {
        "calibration": (stage_dir.read_manifest() or {}).get("calibration")})
