"""Calibration at SD3-Medium scale: one (layer, site) pair, HFR streamed in the forward pass vs its dumped map.

    .venv/bin/python bench/sd3_scale.py [--images 2] [--device auto] [--layer 9] [--site query] [--timestep 50]
                                        [--weights fp32] [--autocast auto] [--json PATH]

Builds a random-weight SD3-Medium-shaped pipeline locally (`models.random_sd3_backbone`: the 24 x 1536 MMDiT,
patch 2, on 16-channel 64x64 latents of 512 px RGB through an SD-shaped AutoencoderKL with SD3's shift and
scale, empty-prompt embeddings of SD3's shapes, 333 x 4096 and pooled 2048; nothing is downloaded), encodes
natural images (scikit-image's sample pictures) with `backbone.encode_images`, and runs one forward pass per
image batch at one timestep, cut after `--layer`, with the project's own capture (`features.extract`) twice:

- `hfr`: the site's HFR reduced in the hooks (`streamed.signal_per_image`, signal plain): 8 bytes per image,
- `dump`: the site's token map kept as the dump stores it (float16) plus its pooled mean (float32).

Reports seconds per image of each (after a one-image warm-up; model construction and VAE encoding excluded,
the VAE's seconds per image separately), bytes kept per image and their ratio, and peak memory: on CUDA
`torch.cuda.max_memory_allocated` per mode; on the CPU the process RSS, sampled while each mode runs (the
model's weights dominate it). The last line is one JSON object (also written to `--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from aselect.pipelines.backbone import encode_images  # noqa: E402
from aselect.pipelines.dump import resolve_autocast, resolve_device  # noqa: E402
from aselect.pipelines.features import TOKEN_SITES, Reduction, extract  # noqa: E402
from aselect.pipelines.models import Backbone, random_sd3_backbone  # noqa: E402
from aselect.pipelines.scoring import HFR_BANDS  # noqa: E402
from aselect.pipelines.streamed import HfrStream, hfr_per_image, signal_per_image  # noqa: E402
from bench.common import natural_images  # noqa: E402

WEIGHTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2 ** 20


def rss_bytes() -> int:
    """The process's resident set size now (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """The highest process RSS seen while the block runs, sampled on a thread every `interval` seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.before = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssPeak:
        self.before = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _amp(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


def _token_mean(features: torch.Tensor, site: str) -> torch.Tensor:
    """Pooled features (B, T, D) -> (B, D) float32, as the dump pools them."""
    return features.mean(dim=1, dtype=torch.float32)


def run_hfr(backbone: Backbone, x0: torch.Tensor, ids: list[int], args: argparse.Namespace,
            stream: HfrStream, autocast: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The streamed calibration of the pair: per-image HFR (B,) float64, the map never leaves the hook."""
    reductions = {"hfr": Reduction((args.site,), partial(signal_per_image, stream=stream))}
    feats = extract(backbone, x0, ids, args.timestep, layers=[args.layer], sites=[], seed=0, autocast=autocast,
                    reductions=reductions)
    return {"hfr": feats[(args.layer, args.site, "hfr")].cpu()}


def run_dump(backbone: Backbone, x0: torch.Tensor, ids: list[int], args: argparse.Namespace,
             stream: HfrStream, autocast: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The dump of the pair: its token map (B, T, D) in float16 and pooled mean (B, D) float32, on the host."""
    reductions = {"mean": Reduction((args.site,), _token_mean)}
    feats = extract(backbone, x0, ids, args.timestep, layers=[args.layer], sites=[args.site], seed=0,
                    autocast=autocast, reductions=reductions)
    return {"spatial": feats[(args.layer, args.site)].to(torch.float16).cpu(),
            "pooled": feats[(args.layer, args.site, "mean")].cpu()}


def measure(name: str, fn: Callable[..., dict[str, torch.Tensor]], backbone: Backbone, warm: torch.Tensor,
            x0: torch.Tensor, args: argparse.Namespace, stream: HfrStream, autocast: torch.dtype | None,
            device: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
    """One warm-up image, then the timed batch: seconds and bytes per image, peak memory."""
    n = len(x0)
    fn(backbone, warm, [n], args, stream, autocast)  # warm-up: the image after the timed ones
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with RssPeak() as rss:
        started = time.perf_counter()
        out = fn(backbone, x0, list(range(n)), args, stream, autocast)
        _sync(device)
        seconds = time.perf_counter() - started
    kept = sum(t.numel() * t.element_size() for t in out.values())
    result = {"seconds": round(seconds, 3), "seconds_per_image": round(seconds / n, 3),
              "bytes_per_image": kept // n, "arrays": {k: [str(v.dtype).removeprefix("torch."), list(v.shape)]
                                                       for k, v in out.items()},
              "peak_rss_mib": round(rss.peak / MIB, 1), "rss_rise_mib": round((rss.peak - rss.before) / MIB, 1),
              "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / MIB) if device.type == "cuda"
              else None}
    memory = (f"peak GPU {result['peak_gpu_mib']} MiB" if device.type == "cuda" else
              f"peak RSS {result['peak_rss_mib']:.0f} MiB (+{result['rss_rise_mib']:.0f} MiB over the model)")
    print(f"{name:5s}: {result['seconds_per_image']:8.3f} s/image, {result['bytes_per_image']:>9,d} bytes/image "
          f"kept ({', '.join(f'{k} {d} {s}' for k, (d, s) in result['arrays'].items())}), {memory}", flush=True)
    return result, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="SD3-Medium")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--site", choices=TOKEN_SITES, default="query")
    parser.add_argument("--timestep", type=int, default=50)
    parser.add_argument("--cutoff", type=float, default=0.15)
    parser.add_argument("--band", choices=HFR_BANDS, default="axis")
    parser.add_argument("--weights", choices=list(WEIGHTS), default="fp32", help="the model's parameter dtype "
                        "(fp32: as the dump loads a checkpoint; bf16/fp16 halve the weights' memory)")
    parser.add_argument("--autocast", choices=["auto", "none", "bf16", "fp16"], default="auto",
                        help="as dump.autocast: auto is bf16 on CUDA, none on the CPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    autocast = resolve_autocast(args.autocast, device)
    with RssPeak() as built:
        started = time.perf_counter()
        backbone = random_sd3_backbone(args.variant, image_size=args.image_size)
        construct = time.perf_counter() - started
    if not 0 <= args.layer < backbone.num_layers:
        parser.error(f"--layer {args.layer}: {args.variant} has layers 0..{backbone.num_layers - 1}")
    params = sum(p.numel() for p in backbone.transformer.parameters())
    vae_params = sum(p.numel() for p in backbone.vae.parameters())
    print(f"built random {args.variant} ({params / 1e9:.2f}B transformer + {vae_params / 1e6:.0f}M VAE parameters) "
          f"in {construct:.1f} s; RSS {rss_bytes() / MIB:.0f} MiB (peak {built.peak / MIB:.0f} MiB)", flush=True)
    dtype = WEIGHTS[args.weights]
    for part in (backbone.transformer, backbone.vae):
        part.to(device).eval()
        if dtype != torch.float32:
            part.to(dtype)
    _sync(device)
    weights_gpu = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    print(f"device {device}, weights {args.weights}, autocast {autocast or 'none'}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    stream_args = {"sites": (args.site,), "cutoff": args.cutoff, "signal": "plain"}
    if "band" in HfrStream.model_fields:
        stream_args["band"] = args.band
    stream = HfrStream(**stream_args)

    # the VAE path, as the dump takes it (in the forward's precision): one warm-up image, then the batch
    n = args.images
    pixels = torch.from_numpy(natural_images(n + 1, args.image_size)).to(device)
    with torch.no_grad(), _amp(device, autocast):
        warm = encode_images(backbone, pixels[n:])
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with RssPeak() as vae_rss:
            started = time.perf_counter()
            x0 = encode_images(backbone, pixels[:n])
            _sync(device)
            encode = time.perf_counter() - started
    vae_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print(f"VAE  : {encode / n:8.3f} s/image encoding {args.image_size} px to {tuple(x0.shape[1:])} latents "
          f"(shift {backbone.vae.config.shift_factor}, scale {backbone.vae.config.scaling_factor}), "
          + (f"peak GPU {vae_gpu / MIB:.0f} MiB" if vae_gpu is not None else f"peak RSS {vae_rss.peak / MIB:.0f} MiB"),
          flush=True)

    results, outputs = {}, {}
    for name, fn in (("hfr", run_hfr), ("dump", run_dump)):
        results[name], outputs[name] = measure(name, fn, backbone, warm, x0, args, stream, autocast, device)
    # the pair is the same: HFR of the dumped float16 map against the streamed value
    stored = hfr_per_image(outputs["dump"]["spatial"].float(), args.site, args.cutoff, stream.exclude_dc,
                           getattr(stream, "band", "radial"))
    gap = float((stored - outputs["hfr"]["hfr"]).abs().max())
    ratio = results["dump"]["bytes_per_image"] / results["hfr"]["bytes_per_image"]
    print(f"ratio dump / hfr bytes: {ratio:,.0f}; dump / hfr seconds: "
          f"{results['dump']['seconds'] / results['hfr']['seconds']:.3f}; HFR of the dumped map vs streamed: "
          f"max |diff| {gap:.2e} (HFR {', '.join(f'{v:.4f}' for v in outputs['hfr']['hfr'].tolist())})")

    config = backbone.transformer.config
    side = backbone.token_grid
    summary = {
        "variant": args.variant, "image_size": args.image_size, "latent": list(x0.shape[1:]),
        "tokens": side * side, "text_tokens": int(backbone.conditioning.prompt_embeds.shape[1]),
        "layers": int(config.num_layers), "width": backbone.width, "parameters": params, "vae_parameters": vae_params,
        "images": n, "layer": args.layer, "site": args.site, "timestep": args.timestep,
        "sigma": backbone.noise_point(args.timestep).sigma, "hfr_stream": stream.model_dump(mode="json"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()], "weights": args.weights,
        "autocast": str(autocast).removeprefix("torch.") if autocast else "none",
        "construct_seconds": round(construct, 1), "vae_seconds_per_image": round(encode / n, 3),
        "rss_start_mib": round(built.before / MIB, 1), "construct_peak_rss_mib": round(built.peak / MIB, 1),
        "vae_peak_rss_mib": round(vae_rss.peak / MIB, 1),
        "vae_peak_gpu_mib": round(vae_gpu / MIB) if vae_gpu is not None else None,
        "weights_gpu_mib": round(weights_gpu / MIB) if weights_gpu is not None else None,
        **results, "bytes_ratio_dump_vs_hfr": round(ratio, 1),
        "seconds_ratio_dump_vs_hfr": round(results["dump"]["seconds"] / results["hfr"]["seconds"], 3),
        "peak_rss_process_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "hfr_values": [round(v, 6) for v in outputs["hfr"]["hfr"].tolist()], "hfr_stored_vs_streamed": gap,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
