"""Stage 4 (domain): score every (timestep, layer, site) pair of a dump, one Dask task per pair.

Each task opens the feature store itself and reads only its pair's slice, so the scheduler ships
pair indices and small label arrays, never feature arrays. The cluster comes from `pipelines/cluster.py`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, as_completed

from aselect.pipelines.scoring import get_scorer, score_pair
from aselect.pipelines.threads import torch_threads
from aselect.storage.errors import AselectError
from aselect.storage.faults import failpoint
from aselect.storage.features import PairReader, open_store, read_hfr, read_samples

log = logging.getLogger("aselect.score")


@dataclass(frozen=True)
class Pair:
    """One candidate: indices into the dump's timestep/layer/site axes, and their labels."""

    ti: int
    li: int
    site: str
    timestep: int
    layer: int


# ---------------------------------------------------------------------------------------------
#                                           One pair
# ---------------------------------------------------------------------------------------------


def read_pair(store: str, pair: Pair, needs: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Only this pair's slice of the dump: pooled (n, D), spatial (n, T, D) or attn_map (n, T, T)."""
    return PairReader(store, pair.timestep, pair.layer, pair.site, spatial=needs != "pooled").read(rows)


def _score_one(store: str, pair: Pair, scorer: str, params: dict[str, Any], labels: np.ndarray | None,
               masks: np.ndarray | None, rows: np.ndarray | None) -> dict[str, Any]:
    """Runs on a Dask worker: read one pair, score it, return a table row."""
    from distributed import get_worker

    # one torch thread per task (one task per worker thread: no oversubscription inside a worker), restored
    # after it: a worker of an existing cluster runs other work too
    with torch_threads(1):
        needs = get_scorer(scorer).needs
        started = time.perf_counter()
        features = read_pair(store, pair, "pooled" if needs == "pooled" else "spatial", rows)
        extra = dict(params)
        if scorer == "hfr":
            extra["kind"] = "attn_map" if pair.site == "attn_map" else "tokens"
        value = score_pair(scorer, features, labels=labels, masks=masks, **extra)
    return {"timestep": pair.timestep, "layer": pair.layer, "site": pair.site, "scorer": scorer,
            "score": float(value), "seconds": round(time.perf_counter() - started, 4), "worker": get_worker().address}


# ---------------------------------------------------------------------------------------------
#                                          The grid
# ---------------------------------------------------------------------------------------------


def candidate_pairs(store: str | Path, sites: list[str] | None = None) -> list[Pair]:
    """Every (timestep, layer, site) in a dump, optionally restricted to some sites."""
    layout = open_store(store).attrs["layout"]
    all_sites = list(layout["sites"]) + (["attn_map"] if layout["attn_map"] else [])
    wanted = [s for s in all_sites if sites is None or s in sites]
    return [Pair(ti, li, site, t, layer)
            for ti, t in enumerate(layout["timesteps"]) for li, layer in enumerate(layout["layers"])
            for site in wanted]


def streamed_hfr_table(stage_path: Path, params: dict[str, Any]) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """HFR rows of a streamed calibration: each pair's score is the mean of its per-image values.

    Returns (rows in (timestep, layer, site) order, per-image values (rows, images) aligned with them, sample ids).
    No Dask: the values were reduced in the forward pass, what is left is a mean over a few hundred numbers.
    """
    started = time.perf_counter()
    values, layout = read_hfr(stage_path)
    wanted = {"cutoff": layout["hfr_cutoff"], "exclude_dc": layout["hfr_exclude_dc"], "band": layout["hfr_band"]}
    if {k: params.get(k, v) for k, v in wanted.items()} != wanted:
        raise AselectError(f"{stage_path}: HFR was streamed with {wanted}, scoring asks for {params}")
    rows, per_image = [], []
    for ti, t in enumerate(layout["timesteps"]):
        for li, layer in enumerate(layout["layers"]):
            for si, site in enumerate(layout["hfr_sites"]):
                per_image.append(values[ti, li, si])
                rows.append({"timestep": int(t), "layer": int(layer), "site": site, "scorer": "hfr",
                             "score": float(values[ti, li, si].mean()), "seconds": 0.0, "worker": "streamed"})
                failpoint("pair")
    seconds = round((time.perf_counter() - started) / max(1, len(rows)), 6)
    for row in rows:
        row["seconds"] = seconds
    return rows, np.stack(per_image), read_samples(stage_path)


def score_grid(client: Client, store: str | Path, scorer: str, pairs: list[Pair], params: dict[str, Any],
               labels: np.ndarray | None = None, masks: np.ndarray | None = None,
               rows: np.ndarray | None = None, progress: Any = None) -> list[dict[str, Any]]:
    """Score each pair as its own Dask task; rows come back in pair order."""
    spec = get_scorer(scorer)
    if spec.needs_labels and labels is None and masks is None:
        raise ValueError(f"scorer {scorer!r} needs labels")
    # small arrays go to the workers once, not once per task
    shared = {name: client.scatter(value, broadcast=True) if value is not None else None
              for name, value in (("labels", labels), ("masks", masks), ("rows", rows))}
    futures = {client.submit(_score_one, str(store), pair, scorer, params, shared["labels"], shared["masks"],
                             shared["rows"], pure=False): i for i, pair in enumerate(pairs)}
    results: list[dict[str, Any] | None] = [None] * len(pairs)
    for done, future in enumerate(as_completed(futures), start=1):
        results[futures[future]] = future.result()
        failpoint("pair")
        if progress is not None:
            progress(done, len(pairs))
    return [r for r in results if r is not None]
