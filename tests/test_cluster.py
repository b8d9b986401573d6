"""The pipeline on an external Dask cluster: a real scheduler and two real worker processes on 127.0.0.1.

One worker SIGKILLs itself in the middle of the dump; the dump finishes on the other, which computes nothing the
dead worker had recorded, and the features equal a run in this process byte for byte.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aselect.flows.pipeline import aselect_exhaustive
from aselect.pipelines.cluster import dask_client
from aselect.storage.features import open_features

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ITEMS = 13 * 4  # 200 images in chunks of 16 -> 13 chunks, x 4 timesteps
OVERRIDES = ["dump.images_per_chunk=16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A scheduler and two single-threaded workers without nannies (a killed worker stays dead); worker `a`
    SIGKILLs itself at its 3rd dump failpoint: one item recorded, the next one written but not recorded."""
    address = f"tcp://127.0.0.1:{free_port()}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("ASELECT_FAILPOINT")}
    logs = {name: tmp_path / f"worker-{name}.log" for name in "ab"}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":")[-1],
                               "--no-dashboard"], env=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for name, extra in (("a", {"ASELECT_FAILPOINT": "chunk@3"}), ("b", {})):
        env = {**base, **extra, "ASELECT_FAILPOINT_LOG": str(logs[name])}
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
                                       "--no-dashboard", "--host", "127.0.0.1", "--name", name], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        with dask_client(address, workers=1, threads_per_worker=1) as client:
            deadline = time.monotonic() + 90
            while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(client.scheduler_info()["workers"]) == 2
        yield address, logs["a"], logs["b"]
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait(timeout=30)


def test_a_run_on_an_external_cluster_survives_a_killed_worker_and_equals_a_local_run(
        prefect_api_url: str, tmp_path: Path, cluster: tuple[str, Path, Path]) -> None:
    address, log_a, log_b = cluster
    remote = aselect_exhaustive(config="smoke", overrides=[*OVERRIDES, f"dask.address={address}"],
                                workdir=str(tmp_path / "remote"))
    stages = {s["name"]: s for s in remote["stages"]}
    assert stages["dump"]["status"] == "Completed" and stages["score"]["status"] == "Completed"
    # worker a died at its 3rd hit: after recording its 1st item, before the record of its 2nd (data written)
    hits_a, hits_b = ([h for h in p.read_text().split() if h == "chunk"] for p in (log_a, log_b))
    assert hits_a == ["chunk"] * 3
    # every item but the one worker a recorded was written by worker b (two hits each: before and after its
    # record), its unrecorded 2nd item included; a recorded item computed again would add two more
    assert hits_b == ["chunk"] * (2 * (ITEMS - 1))
    score_manifest = Path(stages["score"]["path"]) / "manifest.json"
    assert '"dask_workers": 1' in score_manifest.read_text()  # scored on the surviving worker

    local = aselect_exhaustive(config="smoke", overrides=OVERRIDES, workdir=str(tmp_path / "local"))
    local_dump = Path({s["name"]: s for s in local["stages"]}["dump"]["path"])
    assert local_dump.name == Path(stages["dump"]["path"]).name  # where it ran is not part of the key
    remote_group, local_group = open_features(Path(stages["dump"]["path"])), open_features(local_dump)
    assert np.array_equal(remote_group["pooled"][:], local_group["pooled"][:])
    assert remote["selection"] == local["selection"] and remote["metrics"] == local["metrics"]
