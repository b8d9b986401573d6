"""Stage 4 task: score every (timestep, layer, site) of a dump with one scorer, in parallel on Dask."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.states import State

from aselect.pipelines import plan
from aselect.pipelines.cluster import dask_client
from aselect.pipelines.config import DaskConfig, ScoreConfig
from aselect.pipelines.grid import candidate_pairs, score_grid, streamed_hfr_table
from aselect.pipelines.scoring import get_scorer
from aselect.storage.code import code_digest
from aselect.storage.datasets import read_mask_class_names, read_masks, read_split
from aselect.storage.errors import AselectError
from aselect.storage.features import FEATURES_STORE, finished_items, has_streamed_hfr, read_hfr, read_samples
from aselect.storage.stages import StageDir, StageRef, Workdir, stage_key, write_json_atomic
from aselect.tasks.stage import Finished, ProgressArtifact, stage_body

SCORES_JSON = "scores.json"
PER_IMAGE = "per_image.npz"  # streamed HFR: one value per (row, calibration image)


def scorer_params(cfg: ScoreConfig, scorer: str) -> dict[str, Any]:
    """The parameters one scorer takes from the score section."""
    if scorer == "hfr":
        return {"cutoff": cfg.hfr_cutoff, "exclude_dc": cfg.hfr_exclude_dc, "band": cfg.hfr_band}
    if scorer == "probe":
        return {"folds": cfg.probe_folds, "C": cfg.probe_c}
    return {}


def probe_fits(cfg: ScoreConfig, scorer: str, pairs: int) -> int:
    """Linear probes trained to score `pairs` pairs: k folds each for `probe`, one each for `probe_seg`."""
    return pairs * {"probe": cfg.probe_folds, "probe_seg": 1}.get(scorer, 0)


def plan_score(workdir: Workdir, cfg: ScoreConfig, scorer: str, features: StageRef, dataset: StageRef | None = None,
               dask: DaskConfig | None = None) -> StageRef:
    """The score stage's key: the scorer, its parameters and the dump it reads. Not `dataset` (its labels and
    split): the dump's key holds the dataset's. Not `dask`: where scoring runs does not change a score."""
    section = {"scorer": scorer, "params": scorer_params(cfg, scorer)}
    key = stage_key("score", section, {"features": features.key}, code_digest(__name__))
    return workdir.stage("score", key).ref()


@task(name="score")
def score(stage: StageRef, cfg: ScoreConfig, scorer: str, features: StageRef, dataset: StageRef,
          dask: DaskConfig | None = None) -> State:
    """Score each pair of the dump as its own Dask task; labelled scorers see the train split only."""

    def work(stage_dir: StageDir) -> Finished:
        store = features.dir.path / FEATURES_STORE
        spec = get_scorer(scorer)
        labels = masks = rows = None
        calibration = None
        if spec.needs_labels:
            samples = read_samples(features.dir.path)
            all_labels, train_idx, _ = read_split(dataset.dir.path)
            rows = np.flatnonzero(np.isin(samples, train_idx))  # never score on test images
            labels = all_labels[samples[rows]]
            all_masks = read_masks(dataset.dir.path) if scorer == "probe_seg" else None
            masks = all_masks[samples[rows]] if all_masks is not None else None
        if scorer == "hfr" and has_streamed_hfr(features.dir.path):
            # reduced in the calibration's forward pass: the score is a mean of per-image values, no Dask
            table, per_image, samples = streamed_hfr_table(features.dir.path, scorer_params(cfg, scorer))
            table, per_image, samples = computed_part(features.dir.path, table, per_image, samples)
            write_per_image(stage_dir.path, per_image, samples)
            calibration = (features.dir.read_manifest() or {}).get("calibration")
            workers, how = 0, f"streamed per-image values of {per_image.shape[1]} images"
        else:
            pairs = candidate_pairs(store, plan.scored_sites(spec.needs))
            params = scorer_params(cfg, scorer)
            if scorer == "probe_seg" and (names := read_mask_class_names(dataset.dir.path)):
                params["num_classes"] = len(names)  # every class the dataset names, whichever these images hold
            progress = ProgressArtifact(f"score-{scorer}-progress", f"score {len(pairs)} pairs with {scorer}")
            cluster = dask or DaskConfig()
            with dask_client(cluster.address, cluster.workers, cluster.threads_per_worker,
                             cluster.connect_seconds) as client:
                workers = len(client.scheduler_info()["workers"])
                table = score_grid(client, store, scorer, pairs, params, labels=labels,
                                   masks=masks, rows=rows, progress=lambda done, total: progress.update(done / total))
            progress.update(1.0, force=True)
            how = f"{workers} Dask workers"
        write_json_atomic(stage_dir.path / SCORES_JSON, table)
        top = max(table, key=lambda r: r["score"])
        # "highest", not "best": for HFR the raw maximum is not the selection (the select stage decides).
        summary = (f"{scorer} on {len(table)} pairs with {how}; highest t={top['timestep']} "
                   f"l={top['layer']} {top['site']} ({top['score']:.4f})")
        manifest = {"scorer": scorer, "pairs": len(table), "dask_workers": workers,
                    "probe_fits": probe_fits(cfg, scorer, len(table)),
                    "task_seconds": round(sum(r["seconds"] for r in table), 3)}
        if calibration is not None:  # what the calibration it read spent, for the selection record
            manifest["calibration"] = calibration
        return Finished(summary, manifest, {"rows": table})

    inputs = {"scorer": scorer, "params": scorer_params(cfg, scorer), "upstream": {"features": features.key}}
    return stage_body(stage, inputs, work, reuse=lambda _: {"rows": read_rows(stage)},
                      artifact=lambda done: _table_artifact(scorer, done.result["rows"]))


def computed_part(stage_path: Path, table: list[dict[str, Any]], per_image: np.ndarray, samples: np.ndarray
                  ) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """The rows and images a calibration computed: a search that grows in rounds and scores t coarse to fine
    leaves the other (timestep, chunk) items of its store unwritten. Every kept timestep has the same images."""
    _, layout = read_hfr(stage_path)
    timesteps, chunk, n = layout["timesteps"], int(layout["chunk"]), len(samples)
    chunks: dict[int, set[int]] = {}
    for ti, ci in finished_items(stage_path):
        chunks.setdefault(int(timesteps[ti]), set()).add(ci)
    if len({frozenset(c) for c in chunks.values()}) > 1:
        raise AselectError(f"{stage_path}: its timesteps were calibrated on different images ("
                           + ", ".join(f"t={t}: chunks {sorted(c)}" for t, c in sorted(chunks.items())) + ")")
    done = sorted(next(iter(chunks.values()), set()))
    cols = np.concatenate([np.arange(ci * chunk, min((ci + 1) * chunk, n)) for ci in done]) if done else []
    if not done or (len(chunks) == len(timesteps) and len(cols) == n):
        return table, per_image, samples  # every item: nothing to leave out
    keep = [i for i, row in enumerate(table) if row["timestep"] in chunks]
    values = per_image[keep][:, cols]
    rows = [{**table[i], "score": float(v.mean())} for i, v in zip(keep, values, strict=True)]
    return rows, values, samples[cols]


def read_rows(stage: StageRef) -> list[dict[str, Any]]:
    """A finished score stage's table."""
    return json.loads((stage.dir.path / SCORES_JSON).read_text())


def write_per_image(stage_path: Path, values: np.ndarray, samples: np.ndarray) -> None:
    """Per-image scores (rows, images) aligned with scores.json, for the selection's bootstrap."""
    tmp = stage_path / f".{PER_IMAGE}.{os.getpid()}.tmp.npz"
    np.savez(tmp, values=values, samples=samples)
    os.replace(tmp, stage_path / PER_IMAGE)


def read_per_image(stage: StageRef) -> np.ndarray | None:
    """A score stage's per-image values (rows, images), or None when its scorer has none (probes)."""
    path = stage.dir.path / PER_IMAGE
    if not path.is_file():
        return None
    with np.load(path) as data:
        return data["values"]


def _table_artifact(scorer: str, table: list[dict[str, Any]]) -> None:
    """The score table as a Prefect table artifact (key `scores-<scorer>`); `stage_body` keeps it non-fatal."""
    create_table_artifact(key=f"scores-{scorer.replace('_', '-')}", table=table,
                          description=f"{scorer} score per (timestep, layer, site)")
