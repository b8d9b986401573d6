"""Dump throughput on Dask: the same dump in this process, on 1 Dask worker and on 2, in one run.

    .venv/bin/python bench/dump_dask.py [--images 1797] [--timesteps 0,100,...] [--chunk 64]

A random DiT-T/2 on digits at 16x16 (the digits config's shapes), sites block/attn/mlp on every layer. Each
Dask run starts a LocalCluster of single-threaded worker processes and hands the dump its address (the path an
external cluster takes: one task per chunk, the backbone loaded once per worker); torch threads per worker =
cores / workers. Prints image-timesteps/s of each and the ratios 2 workers / 1 worker and 1 worker / in-process
(cluster start-up is outside the timings; loading the backbone in each worker is inside). Also checks that the
three dumps are byte-identical. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

from aselect.pipelines.backbone import load_backbone  # noqa: E402
from aselect.pipelines.config import DaskConfig, DumpConfig  # noqa: E402
from aselect.pipelines.dump import plan_layout, run_dump  # noqa: E402
from aselect.storage.features import open_features  # noqa: E402
from bench.dump_throughput import SITES, digits_data, digits_model  # noqa: E402


def dump_rate(model_dir: str, data: Path, stage: Path, cfg: DumpConfig, images: int,
              dask: DaskConfig | None) -> tuple[float, np.ndarray]:
    layout = plan_layout(load_backbone(model_dir), np.arange(images), cfg)
    started = time.perf_counter()
    result = run_dump(model_dir, data, stage, layout, cfg, dask=dask)
    seconds = time.perf_counter() - started
    return result.images_timesteps / seconds, open_features(stage)["pooled"][:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1797)
    parser.add_argument("--timesteps", default="0,10,25,50,100,200,300,500,700,900")
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args()
    timesteps = [int(t) for t in args.timesteps.split(",")]
    cfg = DumpConfig(timesteps=timesteps, sites=SITES, images_per_chunk=args.chunk, device="cpu")
    cores = os.cpu_count() or 1
    rates, features = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = digits_model(root), digits_data(root, args.images)
        rates["in_process"], features["in_process"] = dump_rate(model_dir, data, root / "here", cfg, args.images,
                                                                None)
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                              silence_logs=logging.WARNING) as cluster, Client(cluster):
                dask = DaskConfig(address=cluster.scheduler_address, torch_threads=max(1, cores // workers))
                name = f"dask_{workers}"
                rates[name], features[name] = dump_rate(model_dir, data, root / name, cfg, args.images, dask)
            print(f"{name}: {rates[name]:.1f} image-timesteps/s", flush=True)
    identical = all(np.array_equal(features["in_process"], f) for f in features.values())
    out = {"machine": f"{platform.machine()}, {cores} cores", "images": args.images, "timesteps": len(timesteps),
           "rates": {k: round(v, 1) for k, v in rates.items()},
           "ratio_2_over_1_workers": round(rates["dask_2"] / rates["dask_1"], 3),
           "ratio_1_worker_over_in_process": round(rates["dask_1"] / rates["in_process"], 3),
           "byte_identical": identical}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
