"""Dump throughput: forward-with-hooks alone vs the full Zarr dump, and peak RSS for N vs 4N images.

    .venv/bin/python bench/dump_throughput.py [--images N] [--timesteps 0,100,...]

Prints both rates (images x timesteps per second), their ratio (goal >= 0.90), and the peak RSS of a dump
of N and of 4N images, each in a fresh process (goal: nearly flat, i.e. streamed, not accumulated).
Uses a random DiT-T/2 on 16x16 digits (the digits config's shapes); throughput does not depend on training.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.backbone import build_dit, encode_images, load_backbone, make_scheduler  # noqa: E402
from pipelines.config import DumpConfig, IngestConfig  # noqa: E402
from pipelines.dump import plan_layout, run_dump  # noqa: E402
from pipelines.features import extract  # noqa: E402
from pipelines.ingest import load_dataset  # noqa: E402
from storage.datasets import write_dataset  # noqa: E402


def prepare(root: Path, images: int) -> tuple[str, Path]:
    """A random DiT-T/2 in aselect's layout and `images` digits at 16x16 in a dataset store."""
    torch.manual_seed(0)
    build_dit("DiT-T/2", image_size=16, channels=1, num_classes=10).save_pretrained(root / "model" / "transformer")
    make_scheduler(1000, "linear").save_pretrained(root / "model" / "scheduler")
    (root / "data").mkdir()
    dataset = load_dataset(IngestConfig(source="digits", image_size=16))
    if images > len(dataset.labels):  # tile the 1,797 digits for larger runs
        reps = -(-images // len(dataset.labels))
        dataset.images = np.tile(dataset.images, (reps, 1, 1, 1))[:images]
        dataset.labels = np.tile(dataset.labels, reps)[:images]
    else:
        dataset.images, dataset.labels = dataset.images[:images], dataset.labels[:images]
    dataset.train_idx, dataset.test_idx = np.arange(images), np.arange(0)
    write_dataset(dataset, root / "data")
    return str(root / "model"), root / "data"


def forward_only(model_dir: str, data: Path, cfg: DumpConfig, images: int) -> float:
    """(a) the same forwards and pooling as the dump, with hooks, writing nothing: image-timesteps/s."""
    import zarr

    backbone = load_backbone(model_dir)
    layout = plan_layout(backbone, np.arange(images), cfg)
    pixels = zarr.open_group(data / "data.zarr", mode="r")["images"]
    started = time.perf_counter()
    for ci in range(layout.num_chunks):
        rows = layout.chunk_slice(ci)
        x0 = encode_images(backbone, torch.from_numpy(pixels[rows]))
        for t in layout.timesteps:
            feats = extract(backbone, x0, list(range(rows.start, rows.stop)), t, layout.layers, cfg.sites, cfg.seed)
            torch.stack([torch.stack([feats[(layer, s)] for s in layout.sites]) for layer in layout.layers]).mean(3)
    return images * len(layout.timesteps) / (time.perf_counter() - started)


def full_dump(model_dir: str, data: Path, cfg: DumpConfig, images: int, stage: Path) -> dict:
    """(b) the full dump into a fresh stage directory."""
    layout = plan_layout(load_backbone(model_dir), np.arange(images), cfg)
    result = run_dump(model_dir, data, stage, layout, cfg)
    return {"rate": result.rate, "bytes": result.bytes_written, "seconds": result.seconds}


def child(args: argparse.Namespace) -> None:
    """Run only the dump in this fresh process (data prepared by the parent) and print its peak RSS."""
    cfg = DumpConfig(timesteps=args.timesteps, images_per_chunk=args.chunk)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports: torch, diffusers, zarr
    out = full_dump(args.model, Path(args.data), cfg, args.images, Path(args.stage))
    out["rss_before_dump_mib"] = before
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1797)
    parser.add_argument("--timesteps", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 10, 25, 50, 100, 200, 300, 500, 700, 900])
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    cfg = DumpConfig(timesteps=args.timesteps, images_per_chunk=args.chunk)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = prepare(Path(tmp), args.images)
        forward_only(model_dir, data, cfg, min(args.images, 128))  # warm-up
        rate_a = forward_only(model_dir, data, cfg, args.images)
        dumped = full_dump(model_dir, data, cfg, args.images, Path(tmp) / "stage")
    print(f"images {args.images}, timesteps {len(args.timesteps)}, chunk {args.chunk}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"(a) forward + hooks, no storage : {rate_a:8.1f} image-timesteps/s")
    print(f"(b) full dump to Zarr           : {dumped['rate']:8.1f} image-timesteps/s "
          f"({dumped['bytes'] / 2**20:.1f} MiB in {dumped['seconds']:.1f} s)")
    print(f"ratio (b)/(a)                   : {dumped['rate'] / rate_a:8.3f}   (goal >= 0.90)")

    rss = {}
    for n in (args.images // 4, args.images):
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, data = prepare(Path(tmp), n)
            cmd = [sys.executable, __file__, "--child", "--images", str(n), "--chunk", str(args.chunk),
                   "--timesteps", ",".join(map(str, args.timesteps)), "--model", model_dir, "--data", str(data),
                   "--stage", str(Path(tmp) / "stage")]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rss[n] = json.loads(done.stdout.splitlines()[-1])
    small, large = rss[args.images // 4], rss[args.images]
    print(f"peak RSS, N={args.images // 4:<5}            : {small['peak_rss_mib']:8.1f} MiB "
          f"(after imports, before the dump: {small['rss_before_dump_mib']:.1f} MiB)")
    print(f"peak RSS, 4N={args.images:<5}           : {large['peak_rss_mib']:8.1f} MiB "
          f"(after imports, before the dump: {large['rss_before_dump_mib']:.1f} MiB)")
    print(f"ratio 4N/N                      : {large['peak_rss_mib'] / small['peak_rss_mib']:8.3f}   "
          "(goal: nearly flat, ~1.0)")


if __name__ == "__main__":
    main()
