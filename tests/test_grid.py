"""Dask scoring: one task per (timestep, layer, site), on a LocalCluster and on real scheduler/worker processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aselect.pipelines.backbone import load_backbone
from aselect.pipelines.cluster import dask_client
from aselect.pipelines.config import DumpConfig
from aselect.pipelines.dump import plan_layout, run_dump
from aselect.pipelines.grid import candidate_pairs, read_pair, score_grid
from aselect.pipelines.scoring import score_pair
from aselect.storage.datasets import read_split
from aselect.storage.features import FEATURES_STORE, PairReader

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def grid_store(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir, data = tiny
    stage = tmp_path_factory.mktemp("grid")
    cfg = DumpConfig(timesteps=[0, 300, 900], sites=["block", "mlp", "attn_map"], spatial=True, images_per_chunk=60)
    run_dump(model_dir, data, stage, plan_layout(load_backbone(model_dir), np.arange(120), cfg), cfg)
    return stage / FEATURES_STORE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pairs_cover_the_grid_and_read_only_their_slice(grid_store: Path) -> None:
    pairs = candidate_pairs(grid_store)
    assert len(pairs) == 3 * 2 * 3
    assert {p.site for p in pairs} == {"block", "mlp", "attn_map"}
    mlp = next(p for p in pairs if p.site == "mlp" and p.timestep == 300 and p.layer == 1)
    assert read_pair(str(grid_store), mlp, "pooled").shape == (120, 32)
    assert read_pair(str(grid_store), mlp, "spatial").shape == (120, 16, 32)
    attn = next(p for p in pairs if p.site == "attn_map")
    assert read_pair(str(grid_store), attn, "spatial").shape == (120, 16, 16)
    assert len(candidate_pairs(grid_store, ["block"])) == 6
    # chosen rows are those rows of the whole slice, read from the store directly or from its stage directory
    rows = np.array([2, 3, 40, 119])
    for pair, needs in ((mlp, "pooled"), (mlp, "spatial"), (attn, "spatial")):
        whole = read_pair(str(grid_store), pair, needs)
        np.testing.assert_array_equal(read_pair(str(grid_store), pair, needs, rows), whole[rows])
        stage = PairReader(grid_store.parent, pair.timestep, pair.layer, pair.site, spatial=needs == "spatial")
        np.testing.assert_array_equal(stage.read(rows), whole[rows])
    assert not np.array_equal(read_pair(str(grid_store), mlp, "pooled"), read_pair(str(grid_store), pairs[0], "pooled"))


def test_local_cluster_scores_match_in_process_scores(grid_store: Path, tiny) -> None:
    labels, _, _ = read_split(tiny[1])
    pairs = candidate_pairs(grid_store, ["block", "mlp"])
    with dask_client(None, workers=2, threads_per_worker=1) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        rows = score_grid(client, grid_store, "fewshot", pairs, {}, labels=labels)
    assert [(r["timestep"], r["layer"], r["site"]) for r in rows] == [(p.timestep, p.layer, p.site) for p in pairs]
    for row, pair in zip(rows, pairs, strict=True):
        expected = score_pair("fewshot", read_pair(str(grid_store), pair, "pooled"), labels=labels)
        assert row["score"] == pytest.approx(expected)


def test_scoring_on_real_scheduler_and_worker_processes(grid_store: Path) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1",
                               "--no-dashboard", "--host", "127.0.0.1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pairs = candidate_pairs(grid_store, ["attn_map", "block"])
        with dask_client(address, workers=1, threads_per_worker=1) as client:
            deadline = time.monotonic() + 60
            while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(client.scheduler_info()["workers"]) == 2
            rows = score_grid(client, grid_store, "hfr", pairs, {"cutoff": 0.5, "exclude_dc": True})
            workers = set(client.scheduler_info()["workers"])
        assert len(rows) == len(pairs) == 3 * 2 * 2
        assert all(0.0 <= r["score"] <= 1.0 for r in rows)
        assert {r["worker"] for r in rows} <= workers  # scored by the external worker processes
        attn = next(p for p in pairs if p.site == "attn_map")
        expected = score_pair("hfr", read_pair(str(grid_store), attn, "spatial"), kind="attn_map")
        row = next(r for r in rows if (r["timestep"], r["layer"], r["site"]) == (attn.timestep, attn.layer, "attn_map"))
        assert row["score"] == pytest.approx(expected)
    finally:
        for proc in (worker, scheduler):
            proc.terminate()
            proc.wait(timeout=30)
