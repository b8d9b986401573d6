"""Online features for the attentive probe: the selected pair's token maps computed on demand through the frozen
backbone, for data or models where K stored noise draws do not fit the disk (`probe.online`).

Draw k of image i is noised exactly as the selected-pair dump with `dump.draw = k` noises it (seeded per
(image, t, draw)), encoded in the dump's batches of `images_per_chunk` images and stored as float16 as the dump
stores it, so an online probe sees the values a K-draw probe reads from disk.

No Prefect.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aselect.pipelines.backbone import encode_images
from aselect.pipelines.config import DumpConfig
from aselect.pipelines.dump import resolve_autocast, resolve_device
from aselect.pipelines.features import draw_noise, extract, sensor_noise
from aselect.pipelines.models import Backbone
from aselect.storage.errors import AselectError

logger = logging.getLogger("aselect.probe")


@dataclass
class OnlineFeatures:
    """Token maps (N, T, D) of the pair (t, layer, site) for every image of `images` (uint8 (N, C, H, W), row i =
    image i), any draw, computed when read; `forward_passes` counts the images run through the backbone."""

    backbone: Backbone
    images: Any  # a Zarr array or ndarray; rows are read with get_orthogonal_selection or fancy indexing
    timestep: int
    layer: int
    site: str
    dump: DumpConfig  # seed, sensor_noise, autocast, device and images_per_chunk of the pair's dump
    forward_passes: int = 0
    _shape: tuple[int, int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.dump.device)
        self.autocast = resolve_autocast(self.dump.autocast, self.device)
        self.backbone.transformer.to(self.device).eval()
        if self.backbone.vae is not None:
            self.backbone.vae.to(self.device).eval()

    @property
    def shape(self) -> tuple[int, int, int]:
        """(N, T, D), from one image's forward pass (made once)."""
        if self._shape is None:
            one = self._forward(np.asarray([0]), draw=0)
            self._shape = (int(self.images.shape[0]), *one.shape[1:])
        return self._shape

    def _pixels(self, rows: np.ndarray) -> np.ndarray:
        if hasattr(self.images, "get_orthogonal_selection"):
            return np.asarray(self.images.get_orthogonal_selection((rows,)))
        return np.asarray(self.images[rows])

    def compute(self, rows: np.ndarray, draw: int, kept: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """Token maps of image rows `rows` in noise draw `draw`, float32 holding the dump's float16 values.

        Each forward pass is one of the dump's chunks (images_per_chunk consecutive images), whichever of its rows
        were asked for: a row's values depend, in the last bits, on the batch it ran in. `kept` (chunk index ->
        maps) keeps computed chunks for the next call."""
        rows = np.asarray(rows, dtype=np.int64)
        step = self.dump.images_per_chunk
        found: dict[int, np.ndarray] = {}
        for chunk in np.unique(rows // step):
            start = int(chunk) * step
            ids = np.arange(start, min(start + step, int(self.images.shape[0])))
            maps = kept.get(int(chunk)) if kept is not None else None
            if maps is None:
                maps = self._forward(ids, draw)
                if kept is not None:
                    kept[int(chunk)] = maps
            for row in rows[(rows >= start) & (rows < start + step)]:
                found[int(row)] = maps[int(row) - start]
        if not len(rows):
            return np.zeros((0, *self.shape[1:]), dtype=np.float32)
        return np.stack([found[int(r)] for r in rows])

    def _forward(self, rows: np.ndarray, draw: int) -> np.ndarray:
        """One forward pass over image rows `rows` (one dump chunk), as the dump's chunk loop runs it."""
        ids = [int(i) for i in rows]
        pixels = torch.from_numpy(np.ascontiguousarray(self._pixels(np.asarray(ids))))
        amp = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None \
            else contextlib.nullcontext()
        with torch.no_grad(), amp:
            noisy = sensor_noise(pixels.shape[1:], ids, self.dump.sensor_noise, self.dump.seed) \
                if self.dump.sensor_noise else None
            x0 = encode_images(self.backbone, pixels.to(self.device), noisy)
        noise = draw_noise(x0.shape[1:], ids, self.timestep, self.dump.seed, draws=1, first_draw=draw)
        with torch.no_grad():
            feats = extract(self.backbone, x0, ids, self.timestep, [self.layer], [self.site], self.dump.seed,
                            autocast=self.autocast, noise=noise)
        maps = feats[(self.layer, self.site)].to(torch.float16)
        if not torch.isfinite(maps).all():
            raise AselectError(f"probe.online: non-finite features at t={self.timestep} layer {self.layer} "
                               f"{self.site} (draw {draw})")
        self.forward_passes += len(ids)
        return maps.cpu().numpy().astype(np.float32)

    def draw(self, k: int, cache: bool = False) -> OnlineDraw:
        """Draw k as an array-like the attentive probe indexes like a stored draw."""
        return OnlineDraw(self, int(k), cache)


class OnlineDraw:
    """One noise draw of `OnlineFeatures`: `draw[rows]` (rows an int array or a slice, optionally with a token
    index) computes those images' maps. `cache=True` keeps the chunks computed (evaluation reads its rows every
    epoch: as much memory as a stored draw read whole)."""

    dtype = np.dtype(np.float32)
    ndim = 3

    def __init__(self, source: OnlineFeatures, k: int, cache: bool) -> None:
        self.source, self.k, self.cache = source, k, cache
        self._kept: dict[int, np.ndarray] = {}  # chunk index -> its maps

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.source.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        maps = self.source.compute(rows, self.k, self._kept if self.cache else None)
        return maps[(slice(None), *rest)] if rest else maps


class TrainingDraws(Sequence):
    """Draw e - 1 for epoch e: every epoch sees fresh noise (`len` = epochs, so the probe's draw cycle never
    repeats)."""

    def __init__(self, source: OnlineFeatures, epochs: int) -> None:
        self.source, self.epochs = source, int(epochs)
        self._current: FullDraw | None = None

    def __len__(self) -> int:
        return self.epochs

    def __getitem__(self, k: int) -> OnlineDraw:  # type: ignore[override]
        if not 0 <= k < self.epochs:
            raise IndexError(k)
        if self._current is None or self._current.k != k:  # one draw in memory: the epoch's, computed once
            self._current = FullDraw(self.source, k)
        return self._current


class FullDraw(OnlineDraw):
    """A draw computed for every image on first read (a chunk at a time, as the dump does) and held: an epoch
    reads each training row once, in random batches."""

    def __init__(self, source: OnlineFeatures, k: int) -> None:
        super().__init__(source, k, cache=False)
        self._all: np.ndarray | None = None

    def __getitem__(self, index: Any) -> np.ndarray:
        if self._all is None:
            self._all = self.source.compute(np.arange(len(self)), self.k)
        return self._all[index]
