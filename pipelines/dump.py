"""Stage 3: dump DiT features for every (timestep, chunk) to Zarr, in this process or on Dask, resumably.

Work is split into chunks of images; a worker owns whole chunks and, per chunk, encodes the images once
and runs one forward pass per pending timestep, capturing every requested layer and site at once.
Finished (timestep, chunk) pairs have completion records and are never recomputed. With `dump.workers` > 1
(a LocalCluster) or a scheduler address, each chunk is one Dask task; a worker process loads the backbone once
and keeps it for the chunks that follow.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import zarr
from distributed import as_completed as dask_as_completed
from tqdm.auto import tqdm

from aselect.pipelines.backbone import encode_images, load_backbone
from aselect.pipelines.cluster import dask_client
from aselect.pipelines.config import MAX_CHUNK_BYTES, DaskConfig, DumpConfig
from aselect.pipelines.features import (
    ATTN_MAP,
    SITES,
    TOKEN_SITES,
    Reduction,
    draw_noise,
    extract,
    sensor_noise,
)
from aselect.pipelines.models import Backbone
from aselect.pipelines.scoring import band_frequency, hfr_masks
from aselect.pipelines.streamed import MULTI_DRAW, HfrStream, signal_per_image
from aselect.pipelines.threads import torch_threads
from aselect.storage.datasets import open_images
from aselect.storage.errors import AselectError
from aselect.storage.features import (
    FEATURES_STORE,
    FeatureLayout,
    create_store,
    item_damage,
    item_finished,
    open_store,
    write_item,
    write_record,
)

log = logging.getLogger("aselect.dump")
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DumpResult:
    """What one dump attempt did."""

    items_total: int
    items_computed: int
    items_reused: int  # finished by an earlier attempt
    batches: int  # batched forward passes computed in this attempt: one per (timestep, chunk) item
    images_timesteps: int  # images x timesteps x inputs per image (forward-pass inputs) computed in this attempt
    bytes_written: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)  # PhaseTimes: seconds per phase, summed over items

    @property
    def rate(self) -> float:
        """Images x timesteps per second in this attempt."""
        return self.images_timesteps / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
#                                           Planning
# ---------------------------------------------------------------------------------------------


def resolve_autocast(autocast: str, device: torch.device) -> torch.dtype | None:
    """`auto` is bf16 on CUDA and full precision on the CPU; bf16/fp16 apply on CUDA only."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if autocast == "auto" else AUTOCAST[autocast]


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; the same config runs on both."""
    if device == "cuda" and not torch.cuda.is_available():
        raise AselectError("dump.device: 'cuda' requested but no CUDA device is available")
    return torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


# The config keys a calibration's grid comes from (pipelines.plan.calibration): `calibrate.timesteps`, which default
# to `dump.timesteps`, and for a streamed one `calibrate.layers`, which default to the layers select reads.
CALIBRATE_TIMESTEPS = "calibrate.timesteps (dump.timesteps when unset)"
CALIBRATE_LAYERS = "calibrate.layers (select.layers and select.feature_layer when unset)"


def plan_layout(backbone: Backbone, samples: np.ndarray, cfg: DumpConfig, hfr: HfrStream | None = None,
                keep_maps: bool = False, stage: str = "dump") -> FeatureLayout:
    """The dump's shape, checked against the backbone (timesteps and layers in range) and the codec (chunk size).

    With `hfr` (a streamed calibration) the dump keeps per-image HFR of `hfr.sites` and no pooled features;
    the maps HFR reads are stored only with `keep_maps`. `stage` (dump or calibrate) names the keys in errors.
    """
    timesteps_key = CALIBRATE_TIMESTEPS if stage == "calibrate" else "dump.timesteps"
    layers_key = CALIBRATE_LAYERS if stage == "calibrate" and hfr is not None else "dump.layers"
    train_steps = backbone.num_train_timesteps
    late = [t for t in cfg.timesteps if t >= train_steps]
    if late:
        raise AselectError(f"{timesteps_key} {late} must be < the scheduler's num_train_timesteps ({train_steps})")
    depth = backbone.num_layers
    layers = tuple(cfg.layers) if cfg.layers is not None else tuple(range(depth))
    if max(layers) >= depth:
        raise AselectError(f"{layers_key} {list(layers)}: the backbone has {depth} layers (0..{depth - 1})")
    side, width = backbone.token_grid, backbone.width
    common = dict(timesteps=tuple(sorted(cfg.timesteps)), layers=layers, samples=tuple(int(i) for i in samples),
                  width=width, tokens=side * side,
                  # a chunk past the images would only make the store allocate rows nothing fills
                  chunk=max(1, min(cfg.images_per_chunk, len(samples))))
    if hfr is None:
        return _chunk_fits(FeatureLayout(**common, sites=tuple(s for s in TOKEN_SITES if s in cfg.sites),
                                         spatial=cfg.spatial, attn_map=ATTN_MAP in cfg.sites))
    high, non_dc = hfr_masks(side, side, hfr.cutoff, hfr.band)
    freq = band_frequency(side, side, hfr.band)
    highest, lowest = float(freq.max()), float(freq[non_dc].min())
    band = "" if hfr.band == "radial" else f" (score.hfr_band {hfr.band})"
    if not high.any():  # HFR would be 0 for every map: a "selection" by tie-break
        raise AselectError(f"score.hfr_cutoff {hfr.cutoff}{band}: no frequency of the {side}x{side} token grid is "
                           f"above it (the highest is {highest:.3f}); lower it")
    if keep_maps and hfr.inputs_per_image > 1:
        raise AselectError(f"calibrate.keep_maps: signal {hfr.signal!r} runs {hfr.inputs_per_image} inputs per image; "
                           f"maps are kept only for signal 'plain'")
    if hfr.exclude_dc and (high == non_dc).all():  # every non-DC frequency is "high": HFR would be 1 everywhere
        raise AselectError(f"score.hfr_cutoff {hfr.cutoff}{band}: every non-DC frequency of the {side}x{side} token "
                           f"grid is above it (the lowest is {lowest:.3f}), so HFR is 1 for every map; raise it")
    token_sites = tuple(s for s in TOKEN_SITES if s in hfr.sites)
    return _chunk_fits(FeatureLayout(
        **common, sites=token_sites if keep_maps else (), spatial=keep_maps and bool(token_sites),
        attn_map=keep_maps and ATTN_MAP in hfr.sites, pooled=False, hfr_sites=tuple(s for s in SITES if s in hfr.sites),
        hfr_cutoff=hfr.cutoff, hfr_exclude_dc=hfr.exclude_dc, hfr_band=hfr.band, hfr_signal=hfr.signal,
        inputs_per_image=hfr.inputs_per_image))


def chunk_bytes_per_image(layout: FeatureLayout) -> dict[str, int]:
    """Bytes per image in one chunk of each array the dump writes (storage.features.create_store's chunks)."""
    nl, ns, d, tok = len(layout.layers), len(layout.sites), layout.width, layout.tokens
    per_image = {"pooled": nl * ns * d * 4 if layout.pooled else 0,
                 "spatial": nl * ns * tok * d * 2 if layout.spatial else 0,
                 "attn_map": nl * tok * tok * 2 if layout.attn_map else 0,
                 "hfr": nl * len(layout.hfr_sites) * 8}
    return {name: size for name, size in per_image.items() if size}


def _chunk_fits(layout: FeatureLayout) -> FeatureLayout:
    """`layout`, or a one-line error when a chunk of one of its arrays is past the codec's buffer limit."""
    for name, per_image in chunk_bytes_per_image(layout).items():
        if layout.chunk * per_image > MAX_CHUNK_BYTES:
            raise AselectError(f"dump.images_per_chunk {layout.chunk}: a chunk of {name} features ({per_image} bytes "
                               f"per image) would be {layout.chunk * per_image / 2**30:.1f} GiB, past the codec's "
                               f"2 GiB buffer; at most {MAX_CHUNK_BYTES // per_image} for this dump")
    return layout


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
                 threads: int | None, backbone: Backbone | None = None) -> None:
    """Load what this process's chunks need; `threads` is applied by the callers, around the work
    (`torch_threads`), so the count is restored when it ends."""
    global _WORKER
    device = resolve_device(cfg.device)
    backbone = backbone or load_backbone(model_dir)
    backbone.transformer.to(device).eval()
    if backbone.vae is not None:
        backbone.vae.to(device).eval()
    images = open_images(Path(dataset_path))
    group = open_store(Path(stage_path) / FEATURES_STORE, writable=True)
    _WORKER = _Worker(backbone, images, group, Path(stage_path), layout, cfg, device)


class PhaseTimes:
    """Seconds per phase of the dump, summed over items, from the compute thread and the writer thread."""

    COMPUTE = ("read", "encode", "forward", "pool", "copy", "wait")  # wait: the writer queue was full
    HELPER = ("noise",)  # drawn one timestep ahead on a helper thread
    WRITER = ("sync", "write", "record")  # sync: device-to-host copy done; write: Zarr codec + files; record: fsync

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = dict.fromkeys(self.COMPUTE + self.HELPER + self.WRITER, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if device is not None and device.type == "cuda":  # time the device's work, not its launch
                torch.cuda.synchronize(device)
            with self._lock:
                self.seconds[name] += time.perf_counter() - started

    def merge(self, other: dict[str, float]) -> None:
        with self._lock:
            for name, value in other.items():
                self.seconds[name] = self.seconds.get(name, 0.0) + value

    def summary(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in self.seconds.items()}

    def describe(self) -> str:
        """One line: seconds per phase, per thread."""
        groups = (("compute thread", self.COMPUTE), ("noise thread", self.HELPER), ("writer thread", self.WRITER))
        return "; ".join(f"{label} " + ", ".join(f"{k} {self.seconds[k]:.2f}" for k in keys)
                         + f" (sum {sum(self.seconds[k] for k in keys):.2f})" for label, keys in groups)


class _Writer:
    """Writes finished items on a background thread while the compute thread runs the next forward pass.

    At most `depth` items wait in memory (a full queue blocks the compute thread: memory stays flat). A failed
    write re-raises in the compute thread at its next `submit` or `collect`; items the writer finished are
    reported in submission order, so progress never counts an item whose completion record is not on disk.
    """

    def __init__(self, times: PhaseTimes, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="aselect-dump-writer")
        self._slots = threading.BoundedSemaphore(depth)
        self._queue: collections.deque[tuple[Future, tuple]] = collections.deque()
        self._times = times
        self._failed = False  # after a failed write, queued items are not written (the disk is the problem)

    def _guarded(self, fn: Callable[..., int], *args: object) -> int:
        if self._failed:
            raise RuntimeError("not written: an earlier write failed")
        try:
            return fn(*args)
        except BaseException:
            self._failed = True
            raise

    def submit(self, meta: tuple, fn: Callable[..., int], *args: object) -> None:
        with self._times.phase("wait"):
            self._slots.acquire()
        future = self._pool.submit(self._guarded, fn, *args)
        future.add_done_callback(lambda _: self._slots.release())
        self._queue.append((future, meta))

    def collect(self, block: bool = False) -> list[tuple[tuple, int]]:
        """(meta, bytes written) of the items finished so far, oldest first; `block` waits for all of them."""
        done = []
        while self._queue and (block or self._queue[0][0].done()):
            future, meta = self._queue.popleft()
            done.append((meta, future.result()))  # a failed write raises here
        return done

    def close(self) -> None:
        """Let every submitted write finish: items computed before a failure of the compute thread are kept."""
        self._pool.shutdown(wait=True)


def _amp(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _token_mean(features: torch.Tensor, site: str) -> torch.Tensor:
    """Mean over tokens (B, T, D) -> (B, D), accumulated in float32 whatever the forward's dtype."""
    return features.mean(dim=1, dtype=torch.float32)


def _gather(feats: dict[tuple, torch.Tensor], layers: tuple[int, ...], sites: tuple[str, ...] | list[str],
            reduction: str | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One (L, S, ...) tensor of per-(layer, site) outputs, filled in place (no stacked temporaries)."""
    key = (lambda layer, site: (layer, site, reduction)) if reduction else (lambda layer, site: (layer, site))
    first = feats[key(layers[0], sites[0])]
    out = torch.empty((len(layers), len(sites), *first.shape), dtype=dtype or first.dtype, device=first.device)
    for li, layer in enumerate(layers):
        for si, site in enumerate(sites):
            out[li, si].copy_(feats[key(layer, site)])
    return out


def _check_finite(arrays: dict[str, torch.Tensor | None], backbone: Backbone, timestep: int,
                  layers: tuple[int, ...]) -> None:
    """Refuse NaN or infinite features where they are produced: one line naming the backbone, timestep and layer."""
    for name, value in arrays.items():
        if value is None:
            continue
        finite = torch.isfinite(value.reshape(len(layers), -1)).all(dim=1)  # per layer (the leading axis)
        if not bool(finite.all()):
            layer = layers[int((~finite).nonzero()[0, 0])]
            raise AselectError(f"{backbone.source}: non-finite features ({name}) at t={timestep}, layer {layer}: "
                               f"the backbone's weights or the inputs hold NaN or inf")


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """Start a device-to-host copy into page-locked memory (a no-op on the CPU); the writer waits for it."""
    if tensor.device.type != "cuda":
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return out.copy_(tensor, non_blocking=True)


def _write(w: _Worker, ti: int, ci: int, arrays: dict[str, torch.Tensor | None], ready: torch.cuda.Event | None,
           times: PhaseTimes) -> int:
    """Runs on the writer thread: wait for the copies, write the arrays, then the completion record."""
    if ready is not None:
        with times.phase("sync"):
            ready.synchronize()
    numpy = {name: None if value is None else value.numpy() for name, value in arrays.items()}
    with times.phase("write"):
        written, files = write_item(w.group, w.stage_path, w.layout, ti, ci, numpy["pooled"], numpy["spatial"],
                                    numpy["attn_map"], numpy["hfr"], record=False)
    with times.phase("record"):  # checksums of the chunk files just written, then fsync
        write_record(w.stage_path, ti, ci, written, files)
    return written


def _run_chunk(ci: int, timestep_indices: list[int], writer: _Writer,
               times: PhaseTimes) -> Iterator[tuple[tuple, int]]:
    """Encode one chunk once, then one forward pass per pending timestep, each item handed to the writer.

    Yields (meta, bytes) of the items the writer has finished so far. The noise of the next timestep is drawn
    on a helper thread while the current forward pass runs.
    """
    w = _WORKER
    assert w is not None, "worker not initialised"
    layout, device = w.layout, w.device
    rows = layout.chunk_slice(ci)
    sample_ids = list(layout.samples[rows])
    # 1. read and encode the chunk once (pixels, or VAE latents)
    autocast = resolve_autocast(w.cfg.autocast, device)
    with times.phase("read"):
        pixels = torch.from_numpy(w.images.get_orthogonal_selection((np.asarray(sample_ids),)))
    with times.phase("encode", device), _amp(device, autocast):  # the VAE too runs in the forward's precision
        noisy = sensor_noise(pixels.shape[1:], sample_ids, w.cfg.sensor_noise, w.cfg.seed) if w.cfg.sensor_noise \
            else None
        x0 = encode_images(w.backbone, pixels.to(device), noisy)
    layers = layout.layers
    # Maps leave the forward pass only when they are stored; pooling and HFR are reductions in the hooks, so a
    # layer's maps are dropped as soon as the next layer runs (memory: one layer's maps, not all of them).
    kept = [*(layout.sites if layout.spatial else ())] + ([ATTN_MAP] if layout.attn_map else [])
    reductions = {}
    stream = None  # a streamed calibration: its signal decides the inputs per image and reduces them
    if layout.hfr_sites:
        draws = layout.inputs_per_image if layout.hfr_signal in MULTI_DRAW else 1
        stream = HfrStream(sites=layout.hfr_sites, cutoff=layout.hfr_cutoff, exclude_dc=layout.hfr_exclude_dc,
                           band=layout.hfr_band, signal=layout.hfr_signal, draws=draws)
        reductions["hfr"] = Reduction(layout.hfr_sites, partial(signal_per_image, stream=stream))
        x0 = stream.expand_inputs(x0)
    if layout.pooled and layout.sites:
        reductions["mean"] = Reduction(layout.sites, _token_mean)
    pin = device.type == "cuda"
    inputs = [i for i in sample_ids for _ in range(layout.inputs_per_image)]  # one entry per forward-pass input

    def noise_for(ti: int) -> torch.Tensor:
        started = time.perf_counter()
        noise = draw_noise(x0.shape[1:], sample_ids, layout.timesteps[ti], w.cfg.seed, pin=pin,
                           draws=stream.draws if stream else 1, first_draw=0 if stream else w.cfg.draw)
        if stream is not None:
            noise = stream.expand_noise(noise)
        times.merge({"noise": time.perf_counter() - started})
        return noise

    with ThreadPoolExecutor(1, thread_name_prefix="aselect-noise") as helper:
        upcoming = helper.submit(noise_for, timestep_indices[0]) if timestep_indices else None
        for k, ti in enumerate(timestep_indices):
            noise = upcoming.result()
            upcoming = helper.submit(noise_for, timestep_indices[k + 1]) if k + 1 < len(timestep_indices) else None
            # 2. one forward pass: hooks capture the sites and stream the reductions
            with times.phase("forward", device):
                feats = extract(w.backbone, x0, inputs, layout.timesteps[ti], layers, kept, w.cfg.seed,
                                autocast=autocast, reductions=reductions, noise=noise)
            # 3. gather per (layer, site) on the device: pooled (L, S, B, D), float16 maps, per-image HFR (L, S, B)
            arrays: dict[str, torch.Tensor | None] = dict.fromkeys(("pooled", "spatial", "attn_map", "hfr"))
            with times.phase("pool", device):
                if layout.pooled and layout.sites:
                    arrays["pooled"] = _gather(feats, layers, layout.sites, "mean")
                if layout.spatial:
                    arrays["spatial"] = _gather(feats, layers, layout.sites, None, torch.float16)
                if layout.attn_map:
                    arrays["attn_map"] = _gather(feats, layers, [ATTN_MAP], None, torch.float16)[:, 0]
                if layout.hfr_sites:
                    arrays["hfr"] = _gather(feats, layers, layout.hfr_sites, "hfr")
                del feats
                _check_finite(arrays, w.backbone, layout.timesteps[ti], layers)
            # 4. start the copies to the host; the writer thread waits for them, encodes and writes
            with times.phase("copy"):
                arrays = {name: None if value is None else _host(value) for name, value in arrays.items()}
                ready = None
                if pin:
                    ready = torch.cuda.Event()
                    ready.record()
            writer.submit((ci, [ti]), _write, w, ti, ci, arrays, ready, times)
            yield from writer.collect()


def _run_chunk_on_worker(init_args: tuple, ci: int, timestep_indices: list[int]
                         ) -> tuple[int, list[int], int, dict[str, float]]:
    """A Dask task: one chunk, written before it returns; (ci, timesteps computed, bytes, phase seconds).

    The worker process keeps its backbone between tasks of the same dump. A task rescheduled after its worker
    died skips the timesteps the dead worker had already recorded.
    """
    global _WORKER_ARGS
    # the dump's torch threads for this task only: a worker of an existing cluster runs other work too
    with torch_threads(init_args[5]):
        if _WORKER is None or _WORKER_ARGS != init_args:
            _init_worker(*init_args)
            _WORKER_ARGS = init_args
        stage_path = Path(init_args[2])
        pending = [ti for ti in timestep_indices if not item_finished(stage_path, ti, ci)]
        times = PhaseTimes()
        if not pending:
            return ci, pending, 0, times.seconds
        writer = _Writer(times)
        try:
            for _ in _run_chunk(ci, pending, writer, times):
                pass
            written = sum(nbytes for _, nbytes in writer.collect(block=True))
        finally:
            writer.close()
    return ci, pending, written, times.seconds


_WORKER_ARGS: tuple | None = None  # what this worker process's _WORKER was built from


# ---------------------------------------------------------------------------------------------
#                                          The dump
# ---------------------------------------------------------------------------------------------


def run_dump(model_dir: str, dataset_path: Path, stage_path: Path, layout: FeatureLayout, cfg: DumpConfig,
             progress: Callable[[int, int], None] | None = None, backbone: Backbone | None = None,
             dask: DaskConfig | None = None, items: Collection[tuple[int, int]] | None = None) -> DumpResult:
    """Compute every unfinished (timestep, chunk) of `layout` (of `items` alone when given) into the stage's Zarr
    store.

    In this process when `cfg.workers` is 1 and `dask` names no scheduler (or says `dump: false`); otherwise one
    Dask task per chunk, on a LocalCluster of `cfg.workers` processes or on the scheduler at `dask.address`.
    `backbone`, when the caller already loaded it from `model_dir`, is reused by an in-process dump instead of
    being loaded a second time; Dask workers load their own.
    """
    dask = dask or DaskConfig()
    remote = bool(dask.address) and dask.dump
    started = time.perf_counter()
    create_store(stage_path, layout)
    damage = item_damage(stage_path)
    for (ti, ci), bad in sorted(damage.items()):
        if bad:  # recomputed below, bit-identically
            log.warning("%s: item t%d-c%d is damaged (%s): computing it again", stage_path, ti, ci, ", ".join(bad))
    done = {item for item, bad in damage.items() if not bad}
    # a calibration that grows in rounds computes only the items each round asks for
    chosen = None if items is None else set(items)
    wanted = [item for item in layout.work_items() if chosen is None or item in chosen]
    pending: dict[int, list[int]] = {}
    for ti, ci in wanted:
        if (ti, ci) not in done:
            pending.setdefault(ci, []).append(ti)
    total = len(wanted)
    reused = total - sum(len(v) for v in pending.values())
    where = (f"the Dask cluster at {dask.address}" if remote else
             "this process" if cfg.workers == 1 else f"a local Dask cluster of {cfg.workers} worker processes")
    log.info("dump: %d (timestep, chunk) items, %d already finished, %d to compute in %s",
             total, reused, total - reused, where)
    # local: workers x threads <= this process's torch threads (the cores, or what OMP_NUM_THREADS allows)
    threads = dask.torch_threads if remote else max(1, torch.get_num_threads() // cfg.workers)
    init_args = (model_dir, str(dataset_path), str(stage_path), layout, cfg, threads)
    bar = tqdm(total=total, initial=reused, desc="dump", unit="item", disable=None)
    finished, written, image_steps = reused, 0, 0
    times = PhaseTimes()

    def account(ci: int, tis: list[int], nbytes: int, computed: int | None = None) -> None:
        """`tis` of chunk `ci` are finished, `computed` of them (default all) by this attempt's workers."""
        nonlocal finished, written, image_steps
        finished += len(tis)
        written += nbytes
        rows = layout.chunk_slice(ci)
        image_steps += (rows.stop - rows.start) * (len(tis) if computed is None else computed) * layout.inputs_per_image
        bar.update(len(tis))
        if progress is not None:
            progress(finished, total)

    try:
        if remote or cfg.workers > 1:
            _compute_on_dask(pending, dask.address if remote else None, dask.resources if remote else {},
                             cfg.workers, dask.connect_seconds, init_args, account, times)
        else:
            _compute_here(pending, init_args, backbone, account, times)
    except torch.cuda.OutOfMemoryError:
        raise AselectError(f"dump.images_per_chunk: {cfg.images_per_chunk} images do not fit in the GPU's memory "
                           f"(CUDA out of memory); lower it and rerun: finished chunks are kept") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise AselectError(f"{stage_path}: disk full while writing features ({exc.strerror}); finished chunks "
                               f"are kept: free space and rerun to resume") from None
        raise
    finally:
        bar.close()
    computed = total - reused
    seconds = round(time.perf_counter() - started, 3)
    if computed:
        log.info("dump: %.1f s; %s", seconds, times.describe())
    return DumpResult(items_total=total, items_computed=computed, items_reused=reused, batches=computed,
                      images_timesteps=image_steps, bytes_written=written, seconds=seconds, phases=times.summary())


def _compute_here(pending: dict[int, list[int]], init_args: tuple, backbone: Backbone | None,
                  account: Callable[..., None], times: PhaseTimes) -> None:
    """Run the pending chunks in this process (with the dump's torch threads, restored afterwards)."""
    with torch_threads(init_args[5]):
        _init_worker(*init_args, backbone=backbone)
        writer = _Writer(times)  # one writer across chunks: chunk k+1 computes while chunk k is written
        try:
            for ci, tis in pending.items():
                for meta, nbytes in _run_chunk(ci, tis, writer, times):
                    account(*meta, nbytes)
            for meta, nbytes in writer.collect(block=True):
                account(*meta, nbytes)
        finally:
            writer.close()


def _compute_on_dask(pending: dict[int, list[int]], address: str | None, resources: dict[str, float], workers: int,
                     connect_seconds: float, init_args: tuple, account: Callable[..., None],
                     times: PhaseTimes) -> None:
    """One Dask task per pending chunk (needing `resources` on each worker), on the scheduler at `address` or a
    LocalCluster of `workers` processes."""
    if not pending:
        return
    stage = Path(init_args[2]).name
    with dask_client(address, workers, 1, connect_seconds) as client:
        futures = {client.submit(_run_chunk_on_worker, init_args, ci, tis, key=f"dump-{stage}-c{ci:05d}",
                                 pure=False, resources=resources or None): tis for ci, tis in pending.items()}
        for future in dask_as_completed(futures):
            ci, computed, nbytes, seconds = future.result()
            # a task rescheduled after its worker died computes only what that worker had not recorded
            account(ci, futures[future], nbytes, computed=len(computed))
            times.merge(seconds)
