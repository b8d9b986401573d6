"""Which Zarr codec for dumped features: encode + write throughput and compression ratio, measured in one run.

    .venv/bin/python bench/feature_codecs.py [--model DIR] [--chunks 12] [--repeats 3]

Features are real DiT outputs on 16x16 digits (a random DiT-T/2, or `--model`, e.g. a pretrained backbone's
model/ directory), in the dump's own chunk shapes: `pooled` float32 (1, L, S, 64, D) and `spatial` float16
(1, L, S, 64, T, D). Each codec writes `--chunks` chunks to a fresh store on this disk (best of `--repeats`),
then reads them back. `write_empty_chunks` is on, as in the dump (no fill-value comparison per chunk).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402
from zarr.codecs import BloscCodec, ZstdCodec  # noqa: E402

from aselect.pipelines.backbone import encode_images, load_backbone  # noqa: E402
from aselect.pipelines.config import IngestConfig  # noqa: E402
from aselect.pipelines.features import extract  # noqa: E402
from aselect.pipelines.ingest import load_dataset  # noqa: E402
from aselect.pipelines.models import Backbone, build_dit, make_scheduler  # noqa: E402
from aselect.storage.stages import dir_size  # noqa: E402

CODECS = {
    "none": None,
    "zstd-0 (zarr default)": ZstdCodec(level=0),
    "zstd-1": ZstdCodec(level=1),
    "blosc-lz4-shuffle": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc-lz4-bitshuffle": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
    "blosc-zstd1-bitshuffle": BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
}


def features(model: str | None) -> dict[str, np.ndarray]:
    """One chunk of pooled and spatial features as the dump writes them."""
    if model:
        backbone = load_backbone(model)
    else:
        torch.manual_seed(0)
        backbone = Backbone(build_dit("DiT-T/2", 16, 1, 10).eval(), make_scheduler(1000, "linear"), None, "random")
    data = load_dataset(IngestConfig(source="digits", image_size=16))
    x0 = encode_images(backbone, torch.from_numpy(data.images[:64]))
    layers, sites = list(range(backbone.num_layers)), ["block", "attn", "mlp"]
    feats = extract(backbone, x0, range(64), 100, layers, sites, seed=0)
    tokens = torch.stack([torch.stack([feats[(layer, s)] for s in sites]) for layer in layers])[None]
    return {"pooled float32": tokens.mean(dim=4).numpy(), "spatial float16": tokens.half().numpy()}


def measure(chunk: np.ndarray, codec: object, chunks: int, repeats: int) -> dict[str, float]:
    best_write, best_read, ratio = 0.0, 0.0, 0.0
    for _ in range(repeats):
        root = Path(tempfile.mkdtemp(dir=ROOT))  # this disk, not a tmpfs
        try:
            array = zarr.open_group(root, mode="w").create_array(
                "x", shape=(chunks, *chunk.shape[1:]), chunks=chunk.shape, dtype=chunk.dtype, fill_value=0.0,
                compressors=codec, config={"write_empty_chunks": True})
            started = time.perf_counter()
            for i in range(chunks):
                array[i:i + 1] = chunk
            best_write = max(best_write, chunks * chunk.nbytes / (time.perf_counter() - started) / 2**20)
            started = time.perf_counter()
            array[:]
            best_read = max(best_read, chunks * chunk.nbytes / (time.perf_counter() - started) / 2**20)
            ratio = chunks * chunk.nbytes / dir_size(root)
        finally:
            shutil.rmtree(root)
    return {"write_mib_s": best_write, "read_mib_s": best_read, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'array':16s} {'codec':24s} {'write MiB/s':>12s} {'read MiB/s':>11s} {'ratio':>6s}")
    for name, chunk in features(args.model).items():
        for codec_name, codec in CODECS.items():
            m = measure(chunk, codec, args.chunks, args.repeats)
            print(f"{name:16s} {codec_name:24s} {m['write_mib_s']:12.0f} {m['read_mib_s']:11.0f} {m['ratio']:6.2f}")


if __name__ == "__main__":
    main()
