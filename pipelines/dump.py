"""Stage 3: dump DiT features for every (timestep, chunk) to Zarr, in worker processes, resumably.

Work is split into chunks of images; a worker owns whole chunks and, per chunk, encodes the images once
and runs one forward pass per pending timestep, capturing every requested block and site at once.
Finished (timestep, chunk) pairs have completion records and are never recomputed.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from pipelines.backbone import Backbone, encode_images, load_backbone
from pipelines.config import DumpConfig
from pipelines.errors import AselectError
from pipelines.features import ATTN_MAP, SITES, TOKEN_SITES, extract
from pipelines.streamed import HfrStream, hfr_per_image
from storage.datasets import DATASET_STORE
from storage.features import FeatureLayout, create_store, finished_items, write_item

log = logging.getLogger("aselect.dump")
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DumpResult:
    """What one dump attempt did."""

    items_total: int
    items_computed: int
    items_reused: int  # finished by an earlier attempt
    forward_passes: int
    images_timesteps: int  # images x timesteps computed in this attempt
    bytes_written: int
    seconds: float

    @property
    def rate(self) -> float:
        """Images x timesteps per second in this attempt."""
        return self.images_timesteps / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
#                                           Planning
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; the same config runs on both."""
    if device == "cuda" and not torch.cuda.is_available():
        raise AselectError("dump.device: 'cuda' requested but no CUDA device is available")
    return torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def plan_layout(backbone: Backbone, samples: np.ndarray, cfg: DumpConfig, hfr: HfrStream | None = None,
                keep_maps: bool = False) -> FeatureLayout:
    """The dump's shape, checked against the backbone (timesteps and blocks in range).

    With `hfr` (a streamed calibration) the dump keeps per-image HFR of `hfr.sites` and no pooled features;
    the maps HFR reads are stored only with `keep_maps`.
    """
    train_steps = int(backbone.scheduler.config.num_train_timesteps)
    late = [t for t in cfg.timesteps if t >= train_steps]
    if late:
        raise AselectError(f"dump.timesteps {late} must be < the scheduler's num_train_timesteps ({train_steps})")
    depth = backbone.num_layers
    layers = tuple(cfg.blocks) if cfg.blocks is not None else tuple(range(depth))
    if max(layers) >= depth:
        raise AselectError(f"dump.blocks {list(layers)}: the backbone has {depth} blocks (0..{depth - 1})")
    config = backbone.transformer.config
    side = int(config.sample_size) // int(config.patch_size)
    width = int(config.num_attention_heads) * int(config.attention_head_dim)
    common = dict(timesteps=tuple(sorted(cfg.timesteps)), layers=layers, samples=tuple(int(i) for i in samples),
                  width=width, tokens=side * side, chunk=cfg.images_per_chunk)
    if hfr is None:
        return FeatureLayout(**common, sites=tuple(s for s in TOKEN_SITES if s in cfg.sites), spatial=cfg.spatial,
                             attn_map=ATTN_MAP in cfg.sites)
    token_sites = tuple(s for s in TOKEN_SITES if s in hfr.sites)
    return FeatureLayout(**common, sites=token_sites if keep_maps else (), spatial=keep_maps and bool(token_sites),
                         attn_map=keep_maps and ATTN_MAP in hfr.sites, pooled=False,
                         hfr_sites=tuple(s for s in SITES if s in hfr.sites), hfr_cutoff=hfr.cutoff,
                         hfr_exclude_dc=hfr.exclude_dc)


# ---------------------------------------------------------------------------------------------
#                                       One chunk of work
# ---------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    """Per-process state: the model, the open stores and the config, loaded once per process."""

    backbone: Backbone
    images: zarr.Array
    group: zarr.Group
    stage_path: Path
    layout: FeatureLayout
    cfg: DumpConfig
    device: torch.device


_WORKER: _Worker | None = None


def _init_worker(model_dir: str, dataset_path: str, stage_path: str, layout: FeatureLayout, cfg: DumpConfig,
                 threads: int, backbone: Backbone | None = None) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    backbone = backbone or load_backbone(model_dir)
    backbone.transformer.to(device).eval()
    if backbone.vae is not None:
        backbone.vae.to(device).eval()
    images = zarr.open_group(Path(dataset_path) / DATASET_STORE, mode="r")["images"]
    group = zarr.open_group(Path(stage_path) / "features.zarr", mode="r+")
    _WORKER = _Worker(backbone, images, group, Path(stage_path), layout, cfg, device)


def _run_chunk(ci: int, timestep_indices: list[int]) -> tuple[int, list[int], int]:
    """Encode one chunk once, then one forward pass per pending timestep; returns bytes written."""
    w = _WORKER
    assert w is not None, "worker not initialised"
    rows = w.layout.chunk_slice(ci)
    sample_ids = list(w.layout.samples[rows])
    pixels = torch.from_numpy(w.images.get_orthogonal_selection((np.asarray(sample_ids),)))
    x0 = encode_images(w.backbone, pixels.to(w.device))
    written = 0
    layout = w.layout
    layers, sites = layout.layers, [*layout.sites] + ([ATTN_MAP] if layout.attn_map else [])
    reducers = {"hfr": partial(hfr_per_image, cutoff=layout.hfr_cutoff, exclude_dc=layout.hfr_exclude_dc)}
    for ti in timestep_indices:
        feats = extract(w.backbone, x0, sample_ids, layout.timesteps[ti], layers, sites, w.cfg.seed,
                        autocast=AUTOCAST[w.cfg.autocast] if w.device.type == "cuda" else None,
                        reduce_sites=layout.hfr_sites, reducers=reducers if layout.hfr_sites else None)
        pooled = spatial = attn = hfr = None
        if layout.sites:
            tokens = torch.stack([torch.stack([feats[(layer, s)] for s in layout.sites]) for layer in layers])
            # tokens: (L, S, B, T, D) -> pooled (L, S, B, D)
            if layout.pooled:
                pooled = tokens.mean(dim=3).cpu().numpy()
            if layout.spatial:
                spatial = tokens.to(torch.float16).cpu().numpy()
        if layout.attn_map:
            attn = torch.stack([feats[(layer, ATTN_MAP)] for layer in layers]).to(torch.float16).cpu().numpy()
        if layout.hfr_sites:  # (L, S_hfr, B) per-image scalars
            hfr = torch.stack([torch.stack([feats[(layer, s, "hfr")] for s in layout.hfr_sites])
                               for layer in layers]).cpu().numpy()
        written += write_item(w.group, w.stage_path, layout, ti, ci, pooled, spatial, attn, hfr)
    return ci, timestep_indices, written


# ---------------------------------------------------------------------------------------------
#                                          The dump
# ---------------------------------------------------------------------------------------------


def run_dump(model_dir: str, dataset_path: Path, stage_path: Path, layout: FeatureLayout, cfg: DumpConfig,
             progress: Callable[[int, int], None] | None = None, backbone: Backbone | None = None) -> DumpResult:
    """Compute every unfinished (timestep, chunk) of `layout` into the stage's Zarr store.

    `backbone`, when the caller already loaded it from `model_dir`, is reused by an in-process dump
    (workers=1) instead of being loaded a second time; worker processes always load their own.
    """
    started = time.perf_counter()
    create_store(stage_path, layout)
    done = finished_items(stage_path)
    pending: dict[int, list[int]] = {}
    for ti, ci in layout.work_items():
        if (ti, ci) not in done:
            pending.setdefault(ci, []).append(ti)
    total = len(layout.work_items())
    reused = total - sum(len(v) for v in pending.values())
    log.info("dump: %d (timestep, chunk) items, %d already finished, %d to compute with %d worker(s)",
             total, reused, total - reused, cfg.workers)
    cores = os.cpu_count() or 1
    threads = max(1, cores // cfg.workers)  # workers x threads <= cores
    init_args = (model_dir, str(dataset_path), str(stage_path), layout, cfg, threads)
    bar = tqdm(total=total, initial=reused, desc="dump", unit="item", disable=None)
    finished, written, image_steps = reused, 0, 0

    def account(ci: int, tis: list[int], nbytes: int) -> None:
        nonlocal finished, written, image_steps
        finished += len(tis)
        written += nbytes
        rows = layout.chunk_slice(ci)
        image_steps += (rows.stop - rows.start) * len(tis)
        bar.update(len(tis))
        if progress is not None:
            progress(finished, total)

    try:
        _compute(pending, cfg, init_args, backbone, account)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise AselectError(f"{stage_path}: disk full while writing features ({exc.strerror}); finished chunks "
                               f"are kept: free space and rerun to resume") from None
        raise
    finally:
        bar.close()
    computed = total - reused
    return DumpResult(items_total=total, items_computed=computed, items_reused=reused, forward_passes=computed,
                      images_timesteps=image_steps, bytes_written=written,
                      seconds=round(time.perf_counter() - started, 3))


def _compute(pending: dict[int, list[int]], cfg: DumpConfig, init_args: tuple, backbone: Backbone | None,
             account: Callable[..., None]) -> None:
    """Run the pending chunks in this process (workers=1) or in spawned worker processes."""
    if cfg.workers == 1:
        saved_threads = torch.get_num_threads()
        _init_worker(*init_args, backbone=backbone)
        try:
            for ci, tis in pending.items():
                account(*_run_chunk(ci, tis))
        finally:
            torch.set_num_threads(saved_threads)
    elif pending:
        # spawn: a forked child would inherit torch's thread pools and any Prefect/Dask threads
        with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=init_args) as pool:
            futures = [pool.submit(_run_chunk, ci, tis) for ci, tis in pending.items()]
            for future in as_completed(futures):
                account(*future.result())
