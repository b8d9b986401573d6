"""Dump throughput: the bare forward pass, the forward pass with hooks, and the full Zarr dump, in one run.

    .venv/bin/python bench/dump_throughput.py [--images N] [--timesteps 0,100,...] [--chunk 64]
    .venv/bin/python bench/dump_throughput.py --variant DiT-XL/2 --latent [--images 16 --timesteps 100,500 --chunk 8]

Default: a random DiT-T/2 on 1,797 digits at 16x16 (the digits config's shapes), 10 timesteps, sites block/attn/mlp
on every layer; it also measures the peak RSS of a dump of N/4 and N images, each in a fresh process (goal: flat).
`--variant DiT-XL/2 --latent`: a random DiT-XL/2-shaped latent DiT (28 x 1152, patch 2, 32x32 latents of 256 px
RGB through an SD-shaped AutoencoderKL; built locally, nothing downloaded) on natural images.

Rates are image-timesteps per second:
- `bare`: the transformer alone on x_t, no hooks (autocast as the dump resolves it),
- `hooks`: `pipelines.features.extract` with hooks on every layer and site, pooling and the copy to the host,
- `dump`: `pipelines.dump.run_dump` end to end (VAE encoding, noise, forward, pooling, copies, Zarr, records).
The last line is one JSON object (ratios dump/bare and dump/hooks, device, peak memory, the dump's seconds per
phase: compute thread read/encode/noise/forward/pool/copy/wait, writer thread sync/write/record).
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
import zarr  # noqa: E402

from aselect.pipelines.backbone import encode_images, load_backbone  # noqa: E402
from aselect.pipelines.config import DumpConfig, IngestConfig  # noqa: E402
from aselect.pipelines.dump import PhaseTimes, plan_layout, resolve_autocast, resolve_device, run_dump  # noqa: E402
from aselect.pipelines.features import add_noise, extract  # noqa: E402
from aselect.pipelines.ingest import load_dataset  # noqa: E402
from aselect.pipelines.models import Backbone, build_dit, make_scheduler, random_latent_backbone  # noqa: E402
from aselect.storage.datasets import DATASET_STORE, write_dataset  # noqa: E402
from bench.common import natural_dataset  # noqa: E402

SITES = ["block", "attn", "mlp"]


def digits_data(root: Path, images: int) -> Path:
    """`images` digits at 16x16 (tiled past 1,797) in a dataset store."""
    (root / "data").mkdir(parents=True)
    dataset = load_dataset(IngestConfig(source="digits", image_size=16))
    reps = -(-images // len(dataset.labels))
    dataset.images = np.tile(dataset.images, (reps, 1, 1, 1))[:images]
    dataset.labels = np.tile(dataset.labels, reps)[:images]
    dataset.train_idx, dataset.test_idx = np.arange(images), np.arange(0)
    write_dataset(dataset, root / "data")
    return root / "data"


def digits_model(root: Path) -> str:
    """A random DiT-T/2 in aselect's layout (throughput does not depend on training)."""
    torch.manual_seed(0)
    build_dit("DiT-T/2", image_size=16, channels=1, num_classes=10).save_pretrained(root / "model" / "transformer")
    make_scheduler(1000, "linear").save_pretrained(root / "model" / "scheduler")
    return str(root / "model")


def _chunks(backbone: Backbone, data: Path, cfg: DumpConfig, images: int, device: torch.device):
    """Encoded chunks (x0 on the device, image ids), encoded once outside the timings."""
    pixels = zarr.open_group(data / DATASET_STORE, mode="r")["images"]
    for start in range(0, images, cfg.images_per_chunk):
        ids = list(range(start, min(start + cfg.images_per_chunk, images)))
        yield encode_images(backbone, torch.from_numpy(pixels[ids[0]:ids[-1] + 1]).to(device)), ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bare_rate(backbone: Backbone, chunks: list, cfg: DumpConfig, device: torch.device) -> float:
    """The transformer alone on x_t, no hooks: image-timesteps/s."""
    autocast = resolve_autocast(cfg.autocast, device)
    amp = torch.autocast(device.type, dtype=autocast) if autocast else torch.autocast(device.type, enabled=False)
    _sync(device)
    started = time.perf_counter()
    count = 0
    for x0, ids in chunks:
        labels = torch.full((len(ids),), backbone.null_class, device=device)
        for t in cfg.timesteps:
            x_t = add_noise(backbone, x0, ids, t, cfg.seed)
            with amp:
                backbone.transformer(x_t, timestep=torch.full((len(ids),), t, device=device), class_labels=labels)
            count += len(ids)
    _sync(device)
    return count / (time.perf_counter() - started)


def hooks_rate(backbone: Backbone, chunks: list, cfg: DumpConfig, device: torch.device) -> float:
    """Forward with hooks on every layer and site, pooling, and the copy to the host: image-timesteps/s."""
    layers = list(range(backbone.num_layers))
    autocast = resolve_autocast(cfg.autocast, device)
    started = time.perf_counter()
    count = 0
    for x0, ids in chunks:
        for t in cfg.timesteps:
            feats = extract(backbone, x0, ids, t, layers, SITES, cfg.seed, autocast=autocast)
            torch.stack([torch.stack([feats[(layer, s)] for s in SITES]) for layer in layers]).mean(3).cpu()
            count += len(ids)
    return count / (time.perf_counter() - started)


def dump_once(model_dir: str, backbone: Backbone | None, data: Path, cfg: DumpConfig, images: int,
              stage: Path) -> dict:
    """The full dump into a fresh stage directory."""
    backbone = backbone if backbone is not None else load_backbone(model_dir)
    layout = plan_layout(backbone, np.arange(images), cfg)
    result = run_dump(model_dir, data, stage, layout, cfg, backbone=backbone)
    return {"rate": result.rate, "bytes": result.bytes_written, "seconds": result.seconds, "phases": result.phases}


def child(args: argparse.Namespace) -> None:
    """Run only the dump in this fresh process (data prepared by the parent) and print its peak RSS."""
    cfg = DumpConfig(timesteps=args.timesteps, images_per_chunk=args.chunk)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports: torch, diffusers, zarr
    out = dump_once(args.model, None, Path(args.data), cfg, args.images, Path(args.stage))
    out["rss_before_dump_mib"] = before
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def peak_rss(args: argparse.Namespace) -> dict[int, dict]:
    """Peak RSS of a dump of N/4 and N images, each in a fresh process."""
    rss = {}
    for n in (args.images // 4, args.images):
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, data = digits_model(Path(tmp)), digits_data(Path(tmp), n)
            cmd = [sys.executable, __file__, "--child", "--images", str(n), "--chunk", str(args.chunk),
                   "--timesteps", ",".join(map(str, args.timesteps)), "--model", model_dir, "--data", str(data),
                   "--stage", str(Path(tmp) / "stage")]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rss[n] = json.loads(done.stdout.splitlines()[-1])
    return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default=None, help="a registered DiT size, e.g. DiT-XL/2 (default: digits)")
    parser.add_argument("--latent", action="store_true", help="with --variant: a latent DiT behind an SD-shaped VAE")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--timesteps", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--autocast", choices=["auto", "none", "bf16", "fp16"], default="auto")
    parser.add_argument("--no-rss", action="store_true", help="skip the N/4 vs N peak-RSS measurement")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    scale = args.variant is not None
    if scale and not args.latent:
        parser.error("--variant needs --latent (the scale check builds a latent DiT like DiT-XL/2's checkpoint)")
    args.images = args.images or (16 if scale else 1797)
    args.timesteps = args.timesteps or ([100, 500] if scale else [0, 10, 25, 50, 100, 200, 300, 500, 700, 900])
    args.chunk = args.chunk or (8 if scale else 64)
    if args.child:
        return child(args)

    device = resolve_device(args.device)
    cfg = DumpConfig(timesteps=args.timesteps, images_per_chunk=args.chunk, sites=SITES, device=device.type,
                     autocast=args.autocast)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if scale:
            backbone = random_latent_backbone(args.variant, args.image_size)
            model_dir, data = "in memory", natural_dataset(args.images, args.image_size, root / "data")
        else:
            model_dir, data = digits_model(root), digits_data(root, args.images)
            backbone = load_backbone(model_dir)
        backbone.transformer.to(device).eval()
        if backbone.vae is not None:
            backbone.vae.to(device).eval()
        chunks = list(_chunks(backbone, data, cfg, args.images, device))
        warm = DumpConfig(timesteps=args.timesteps[:1], images_per_chunk=args.chunk, sites=SITES,
                          autocast=args.autocast)
        bare_rate(backbone, chunks[:1], warm, device), hooks_rate(backbone, chunks[:1], warm, device)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rate_bare = bare_rate(backbone, chunks, cfg, device)
        rate_hooks = hooks_rate(backbone, chunks, cfg, device)
        del chunks
        dumped = dump_once(model_dir, backbone, data, cfg, args.images, root / "stage")
    what = (f"random {args.variant} latent, {args.image_size} px" if scale else "random DiT-T/2, digits 16x16")
    print(f"{what}: images {args.images}, timesteps {len(args.timesteps)}, chunk {args.chunk}, device {device}, "
          f"autocast {resolve_autocast(args.autocast, device)}, torch threads {torch.get_num_threads()}")
    print(f"bare forward, no hooks        : {rate_bare:8.1f} image-timesteps/s")
    print(f"forward + hooks + pool + copy : {rate_hooks:8.1f} image-timesteps/s")
    print(f"full dump to Zarr             : {dumped['rate']:8.1f} image-timesteps/s "
          f"({dumped['bytes'] / 2**20:.1f} MiB in {dumped['seconds']:.1f} s)")
    print(f"ratio dump / bare             : {dumped['rate'] / rate_bare:8.3f}   (goal on CUDA >= 0.80)")
    print(f"ratio dump / hooks            : {dumped['rate'] / rate_hooks:8.3f}   (goal on the CPU >= 0.90)")
    phases = PhaseTimes()
    phases.merge(dumped["phases"])
    busy = sum(dumped["phases"].values())
    print(f"dump seconds per phase        : {phases.describe()}; wall {dumped['seconds']:.2f}")
    summary = {"variant": args.variant or "DiT-T/2 (digits)", "latent": scale, "images": args.images,
               "timesteps": len(args.timesteps), "chunk": args.chunk, "bare": round(rate_bare, 2),
               "hooks": round(rate_hooks, 2), "dump": round(dumped["rate"], 2),
               "ratio_dump_vs_bare": round(dumped["rate"] / rate_bare, 3),
               "ratio_dump_vs_hooks": round(dumped["rate"] / rate_hooks, 3),
               "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "autocast": str(resolve_autocast(args.autocast, device)),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
               "dump_seconds": dumped["seconds"], "phases": dumped["phases"],
               "overlapped_seconds": round(busy - dumped["seconds"], 2)}
    if not scale and not args.no_rss:
        rss = peak_rss(args)
        small, large = rss[args.images // 4], rss[args.images]
        print(f"peak RSS, N={args.images // 4:<6}            : {small['peak_rss_mib']:8.1f} MiB "
              f"(after imports: {small['rss_before_dump_mib']:.1f} MiB)")
        print(f"peak RSS, 4N={args.images:<6}           : {large['peak_rss_mib']:8.1f} MiB "
              f"(after imports: {large['rss_before_dump_mib']:.1f} MiB)")
        summary["rss_ratio_4n_vs_n"] = round(large["peak_rss_mib"] / small["peak_rss_mib"], 3)
        print(f"ratio 4N/N                     : {summary['rss_ratio_4n_vs_n']:8.3f}   (goal: flat, ~1.0)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
