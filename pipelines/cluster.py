"""The pipeline's Dask cluster: an existing scheduler (`dask.address`), or a LocalCluster of worker processes.

Scoring runs one task per (timestep, layer, site) pair on it, and the dump one task per image chunk (all its
pending timesteps) when `dump.workers` > 1 or a scheduler address is given. Tasks read and write the workdir
themselves, so every worker must see the same workdir path (one machine, or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from distributed import Client, LocalCluster

from aselect.pipelines.config import CONNECT_SECONDS
from aselect.storage.errors import AselectError


@contextlib.contextmanager
def dask_client(address: str | None, workers: int, threads_per_worker: int,
                connect_seconds: float = CONNECT_SECONDS) -> Iterator[Client]:
    """A client on an existing scheduler (`address`, given up after `connect_seconds`) or on a fresh local
    cluster of worker processes."""
    if address:
        try:
            client = Client(address, timeout=f"{connect_seconds}s")
        except (OSError, TimeoutError) as exc:
            raise AselectError(f"dask.address {address}: no Dask scheduler answered within {connect_seconds:g} s "
                               f"({type(exc).__name__})") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                      dashboard_address=None, silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        yield client
