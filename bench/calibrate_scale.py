"""Calibration at DiT-XL/2 scale: bytes per image and seconds, HFR streamed in the forward pass vs stored maps.

    .venv/bin/python bench/calibrate_scale.py [--variant DiT-XL/2] [--images 4] [--timesteps 100,500]
                                              [--sites attn] [--device auto] [--autocast auto]

Builds a random-weight latent DiT of the given size locally (DiT-XL/2: 28 layers x 1152, patch 2, 32x32
latents from 256 px RGB through an SD-shaped AutoencoderKL; nothing is downloaded), and calibrates a handful
of natural images (scikit-image's sample pictures) twice with the project's own dump code:

- `stored`: the former calibration, token maps of the HFR site kept as float16 (plus pooled features),
- `streamed`: HFR reduced to one float64 per (image, timestep, layer, site) inside the forward hooks.

Prints a line per mode and one JSON line. On CPU it is slow (DiT-XL/2 is 675M parameters) but exact; on CUDA the
same command measures the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from aselect.pipelines.config import DumpConfig  # noqa: E402
from aselect.pipelines.dump import plan_layout, resolve_autocast, resolve_device, run_dump  # noqa: E402
from aselect.pipelines.models import SD_VAE_BLOCKS, random_latent_backbone  # noqa: E402
from aselect.pipelines.streamed import HfrStream  # noqa: E402
from aselect.storage.stages import dir_size  # noqa: E402
from bench.common import natural_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--vae", choices=["sd", "small"], default="sd", help="sd: SD-shaped VAE; small: 4x fewer "
                        "channels (same 8x downsampling), for a quick check")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--timesteps", type=lambda s: [int(x) for x in s.split(",")], default=[100, 500])
    parser.add_argument("--sites", type=lambda s: s.split(","), default=["attn"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--autocast", choices=["auto", "none", "bf16", "fp16"], default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    blocks = SD_VAE_BLOCKS if args.vae == "sd" else tuple(c // 4 for c in SD_VAE_BLOCKS)
    backbone = random_latent_backbone(args.variant, args.image_size, vae_blocks=blocks)
    n = args.images
    token_sites = [s for s in args.sites if s != "attn_map"]
    base = DumpConfig(timesteps=args.timesteps, sites=args.sites, images_per_chunk=n, device=device.type,
                      autocast=args.autocast)
    modes = {
        # the former calibration: the maps HFR reads, stored (token maps float16 + pooled; attention maps float16)
        "stored": (base.model_copy(update={"spatial": bool(token_sites)}), None),
        "streamed": (base, HfrStream(sites=tuple(args.sites))),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        natural_dataset(n, args.image_size, root / "data")
        for mode, (cfg, hfr) in modes.items():
            stage = root / mode
            layout = plan_layout(backbone, np.arange(n), cfg, hfr=hfr)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            result = run_dump("unused: the backbone is passed in", root / "data", stage, layout, cfg, backbone=backbone)
            seconds = time.perf_counter() - started
            results[mode] = {"bytes_per_image": round(dir_size(stage) / n), "array_bytes_per_image":
                             round(result.bytes_written / n), "seconds": round(seconds, 2),
                             "seconds_per_image": round(seconds / n, 3),
                             "image_timesteps_per_second": round(result.rate, 2)}
            print(f"{mode:9s}: {results[mode]['bytes_per_image'] / 2**20:10.3f} MiB/image on disk "
                  f"({results[mode]['array_bytes_per_image'] / 2**10:.1f} KiB/image of array data), "
                  f"{seconds:.1f} s for {n} images x {len(args.timesteps)} timesteps", flush=True)
    config = backbone.transformer.config
    summary = {
        "variant": args.variant, "latent_grid": int(config.sample_size), "tokens": (int(config.sample_size) //
                                                                                   int(config.patch_size)) ** 2,
        "layers": int(config.num_layers), "width": int(config.num_attention_heads * config.attention_head_dim),
        "image_size": args.image_size, "vae": args.vae, "images": n, "timesteps": args.timesteps,
        "sites": args.sites, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "autocast": str(resolve_autocast(args.autocast, device)), **results,
        "bytes_ratio_stored_vs_streamed": round(results["stored"]["bytes_per_image"]
                                                / results["streamed"]["bytes_per_image"], 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
