"""Ingest memory: peak RSS of ingesting an image folder of N and 4N PNGs, each in a fresh process.

    .venv/bin/python bench/ingest_rss.py [--images 5000] [--size 64]

Writes N and 4N generated 64x64 RGB PNGs (coloured rectangles and discs on a gradient, three classes) to a temp
folder, then runs `pipelines.ingest.ingest_dataset` (streaming: one batch of decoded images in memory) in a
fresh process per size and reads its peak RSS. Goal: peak(4N) / peak(N) <= 1.2. The in-memory path
(`load_dataset`, which stacks every image) is measured the same way for comparison.
The last line is one JSON object.
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

import numpy as np

CLASSES = ("rectangles", "discs", "gradients")


def write_folder(root: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` PNGs spread over three class folders, drawn with numpy (cheap, compressible, all different)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        kind = i % len(CLASSES)
        angle = rng.uniform(0, np.pi)
        base = (np.cos(angle) * xx + np.sin(angle) * yy) / size
        image = np.stack([base * rng.uniform(60, 200) + rng.uniform(0, 50) for _ in range(3)], axis=-1)
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, size // 4))]
            square = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
            shape = square if kind == 0 else (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            if kind < 2:
                image[shape] = rng.uniform(0, 255, 3)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / CLASSES[kind] / f"{i:06d}.png")
    return root


def child(folder: str, stage: str, size: int, streaming: bool) -> None:
    """Ingest the folder in this fresh process and print peak RSS before and after."""
    from aselect.pipelines.config import IngestConfig
    from aselect.pipelines.ingest import ingest_dataset, load_dataset
    from aselect.storage.datasets import write_dataset

    cfg = IngestConfig(source="imagefolder", root=folder, image_size=size, channels=3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if streaming:
        ingest_dataset(cfg, Path(stage))
    else:
        write_dataset(load_dataset(cfg), Path(stage))
    print(json.dumps({"rss_before_mib": round(before, 1), "seconds": round(time.perf_counter() - start, 2),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def measure(folder: Path, size: int, streaming: bool) -> dict:
    with tempfile.TemporaryDirectory() as stage:
        cmd = [sys.executable, __file__, "--child", str(folder), stage, str(size), str(int(streaming))]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="N (the larger folder has 4N)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, stage, size, streaming = args.child
        child(folder, stage, int(size), streaming == "1")
        return
    out: dict = {"images": {}, "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.images, 4 * args.images):
            folder = write_folder(Path(tmp) / f"folder-{n}", n, args.size)
            out["images"][n] = {"streaming": measure(folder, args.size, True),
                                "in_memory": measure(folder, args.size, False)}
            print(f"{n} images: streaming {out['images'][n]['streaming']}, "
                  f"in memory {out['images'][n]['in_memory']}", flush=True)
    small, large = (out["images"][n] for n in (args.images, 4 * args.images))
    for path in ("streaming", "in_memory"):
        out[f"{path}_peak_ratio_4n_over_n"] = round(large[path]["peak_rss_mib"] / small[path]["peak_rss_mib"], 3)
    out["goal"] = "streaming peak ratio <= 1.2"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
