"""Zarr layout of dumped DiT features, with one completion record per (timestep, chunk).

features.zarr/
  pooled    float32 (timestep, layer, site, sample, feature)          token sites, mean over tokens
  spatial   float16 (timestep, layer, site, sample, token, feature)   only when spatial maps are kept
  attn_map  float16 (timestep, layer, sample, query, key)             only when attention maps are kept
  hfr       float64 (timestep, layer, hfr_site, sample)               per-image HFR reduced in the forward pass
  timestep, layer, site, hfr_site, sample, feature, token, query, key coordinate arrays (xarray shows labels)
done/t<ti>-c<ci>                                                      written after that chunk's data

Zarr skips chunks equal to the fill value, so a missing chunk file does not mean "not written":
only the `done/` records say what is finished. Each work item writes whole Zarr chunks of its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from aselect.storage.faults import failpoint
from aselect.storage.stages import RECORDS_DIR, damaged_files, file_digest, read_record

FEATURES_STORE = "features.zarr"
DONE_DIR = RECORDS_DIR
# Float features compress poorly (mantissas look random): measured with bench/feature_codecs.py on a trained DiT's
# features, blosc lz4 + bit-shuffle stores pooled float32 at 1.18x and float16 maps at 1.10x, and encodes faster
# than Zarr's default zstd (1.08x / 1.10x); no codec writes fastest but stores 10-18% more. One chunk per
# (timestep, image chunk) holding every layer and site is the write unit; sharding it into per-pair inner
# chunks read no faster for scoring (README, "Feature store").
FEATURE_ARRAY = {"fill_value": 0.0, "compressors": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")}
# Every chunk is stored, even one equal to the fill value: no fill-value comparison per chunk on the write path
# (it cost 4 s of a 41 s GPU dump), and a finished item's chunk is always on disk. Zarr does not persist this
# setting, so writes ask for it each time.
WRITE_EMPTY = {"write_empty_chunks": True}


@dataclass(frozen=True)
class FeatureLayout:
    """Shape of a dump: which timesteps, layers, sites and samples, and how samples are chunked."""

    timesteps: tuple[int, ...]
    layers: tuple[int, ...]
    sites: tuple[str, ...]  # token sites in `pooled` / `spatial`
    samples: tuple[int, ...]  # dataset indices, in dump order
    width: int  # feature dimension D
    tokens: int  # tokens per image T
    chunk: int  # images per chunk
    spatial: bool
    attn_map: bool
    pooled: bool = True  # store mean-pooled token features (a streamed calibration does not)
    hfr_sites: tuple[str, ...] = ()  # sites whose per-image HFR is streamed into `hfr`
    hfr_cutoff: float = 0.5
    hfr_exclude_dc: bool = True
    hfr_band: str = "radial"  # pipelines.scoring.HFR_BANDS: which frequencies count as high
    hfr_signal: str = "plain"  # pipelines.streamed.SIGNALS: how several inputs per image become one value
    inputs_per_image: int = 1  # forward-pass inputs per (image, t): noise draws, or the image and its twin

    @property
    def num_chunks(self) -> int:
        return -(-len(self.samples) // self.chunk)

    def chunk_slice(self, chunk_index: int) -> slice:
        return slice(chunk_index * self.chunk, min((chunk_index + 1) * self.chunk, len(self.samples)))

    def work_items(self) -> list[tuple[int, int]]:
        """Every (timestep index, chunk index) of the dump."""
        return [(ti, ci) for ti in range(len(self.timesteps)) for ci in range(self.num_chunks)]


def _marker(stage_path: Path, ti: int, ci: int) -> Path:
    return stage_path / DONE_DIR / f"t{ti:03d}-c{ci:05d}"


def create_store(stage_path: Path, layout: FeatureLayout) -> zarr.Group:
    """Create the arrays (or open them when a previous attempt already did, to resume)."""
    path = stage_path / FEATURES_STORE
    (stage_path / DONE_DIR).mkdir(parents=True, exist_ok=True)
    if (path / "zarr.json").exists():
        group = zarr.open_group(path, mode="r+")
        if _stored_layout(group.attrs.get("layout") or {}) == _layout_attrs(layout):
            return group
    group = zarr.open_group(path, mode="w")
    nt, nl, ns, n = len(layout.timesteps), len(layout.layers), len(layout.sites), len(layout.samples)
    d, tok, c = layout.width, layout.tokens, layout.chunk
    if ns and layout.pooled:
        group.create_array("pooled", shape=(nt, nl, ns, n, d), chunks=(1, nl, ns, c, d), dtype="float32",
                           dimension_names=("timestep", "layer", "site", "sample", "feature"), **FEATURE_ARRAY)
    if ns and layout.spatial:
        group.create_array("spatial", shape=(nt, nl, ns, n, tok, d), chunks=(1, nl, ns, c, tok, d), dtype="float16",
                           dimension_names=("timestep", "layer", "site", "sample", "token", "feature"), **FEATURE_ARRAY)
    if layout.attn_map:
        group.create_array("attn_map", shape=(nt, nl, n, tok, tok), chunks=(1, nl, c, tok, tok), dtype="float16",
                           dimension_names=("timestep", "layer", "sample", "query", "key"), **FEATURE_ARRAY)
    nh = len(layout.hfr_sites)
    if nh:
        group.create_array("hfr", shape=(nt, nl, nh, n), chunks=(1, nl, nh, c), dtype="float64",
                           dimension_names=("timestep", "layer", "hfr_site", "sample"), **FEATURE_ARRAY)
    coords = {"timestep": np.asarray(layout.timesteps, dtype=np.int64),
              "layer": np.asarray(layout.layers, dtype=np.int64),
              "site": np.asarray(layout.sites, dtype=object),  # variable-length strings: a Zarr v3 spec'd type
              "hfr_site": np.asarray(layout.hfr_sites, dtype=object),
              "sample": np.asarray(layout.samples, dtype=np.int64),
              "feature": np.arange(d, dtype=np.int64), "token": np.arange(tok, dtype=np.int64),
              "query": np.arange(tok, dtype=np.int64), "key": np.arange(tok, dtype=np.int64)}
    for name, values in coords.items():
        if len(values):
            dtype = str if values.dtype == object else values.dtype
            group.create_array(name, shape=values.shape, dtype=dtype, dimension_names=(name,))[:] = values
    group.attrs["layout"] = _layout_attrs(layout)
    return group


def _layout_attrs(layout: FeatureLayout) -> dict:
    return {"timesteps": list(layout.timesteps), "layers": list(layout.layers), "sites": list(layout.sites),
            "n": len(layout.samples), "width": layout.width, "tokens": layout.tokens, "chunk": layout.chunk,
            "spatial": layout.spatial, "attn_map": layout.attn_map, "pooled": layout.pooled,
            "hfr_sites": list(layout.hfr_sites), "hfr_cutoff": layout.hfr_cutoff,
            "hfr_exclude_dc": layout.hfr_exclude_dc, "hfr_band": layout.hfr_band, "hfr_signal": layout.hfr_signal,
            "inputs_per_image": layout.inputs_per_image}


# Layout attrs added after stores were first written, and what a store without them holds.
LAYOUT_DEFAULTS = {"hfr_band": "radial"}


def _stored_layout(attrs: dict) -> dict:
    """A store's layout attrs, with the defaults of attrs it predates."""
    return {**LAYOUT_DEFAULTS, **attrs}


def _records(stage_path: Path) -> dict[tuple[int, int], Path]:
    done = stage_path / DONE_DIR
    found = {}
    for marker in done.glob("t*-c*") if done.is_dir() else []:
        t, _, c = marker.name.partition("-")
        found[(int(t[1:]), int(c[1:]))] = marker
    return found


def item_damage(stage_path: Path, full: bool = False) -> dict[tuple[int, int], list[str]]:
    """For every completion record, the chunk files it vouches for that are missing or changed (size; also
    sha256 with `full`); an intact item maps to []."""
    return {item: _record_damage(stage_path, marker, full) for item, marker in _records(stage_path).items()}


def _record_damage(stage_path: Path, marker: Path, full: bool = False) -> list[str]:
    """What one completion record vouches for that is missing or changed (["its record"] if unreadable)."""
    record = read_record(marker)
    return damaged_files(stage_path, record.get("files", {}), full) if record else ["its record"]


def item_finished(stage_path: Path, ti: int, ci: int) -> bool:
    """Whether one item's completion record exists and its chunk files are intact (a rescheduled dump task asks
    this before computing, so an item another worker finished is not computed again)."""
    marker = _marker(stage_path, ti, ci)
    return marker.is_file() and not _record_damage(stage_path, marker)


def finished_items(stage_path: Path, full: bool = False) -> set[tuple[int, int]]:
    """(timestep index, chunk index) pairs whose completion record exists and whose chunk files are intact.

    An item whose chunks are missing or changed is not finished: it is computed again, never read back as
    Zarr's fill value.
    """
    return {item for item, bad in item_damage(stage_path, full).items() if not bad}


def write_item(group: zarr.Group, stage_path: Path, layout: FeatureLayout, ti: int, ci: int,
               pooled: np.ndarray | None, spatial: np.ndarray | None, attn_map: np.ndarray | None,
               hfr: np.ndarray | None = None, record: bool = True) -> tuple[int, list[str]]:
    """Write one (timestep, chunk) and then (unless `record=False`: the caller calls `write_record` after)
    its completion record; returns bytes of array data written and the chunk files (paths under the stage)."""
    rows = layout.chunk_slice(ci)
    written, files = 0, []
    for name, value, dtype in (("hfr", hfr, np.float64), ("pooled", pooled, np.float32),
                               ("spatial", spatial, np.float16), ("attn_map", attn_map, np.float16)):
        if value is not None:
            value = np.asarray(value, dtype=dtype)
            # axes (timestep, layer[, site], sample, ...): timestep ti, every layer (and site), this chunk's rows
            axes = 1 if name == "attn_map" else 2
            array = group[name]
            array.with_config(WRITE_EMPTY)[(ti, *[slice(None)] * axes, rows)] = value
            written += value.nbytes
            chunk = (ti, *[0] * axes, ci, *[0] * (value.ndim - axes - 1))  # the item is exactly one chunk
            files.append(f"{FEATURES_STORE}/{name}/{array.metadata.encode_chunk_key(chunk)}")
    if record:
        write_record(stage_path, ti, ci, written, files)
    return written, files


def write_record(stage_path: Path, ti: int, ci: int, written: int, files: list[str]) -> None:
    """The completion record of one (timestep, chunk), after its data: bytes, and [size, sha256] of its chunks.

    (The failpoints bracket it for crash tests.)
    """
    failpoint("chunk")
    record = {"bytes": written, "files": {rel: file_digest(stage_path / rel) for rel in files}}
    marker = _marker(stage_path, ti, ci)
    tmp = marker.with_name(f".{marker.name}.tmp")
    with open(tmp, "w") as fh:  # the data is written before the record that says so
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, marker)  # readers see no record or a whole one
    failpoint("chunk")


def open_store(store: str | Path, writable: bool = False) -> zarr.Group:
    """A dump's Zarr group by the store's own path (what Dask tasks and dump workers are handed)."""
    return zarr.open_group(str(store), mode="r+" if writable else "r")


def open_features(stage_path: Path) -> zarr.Group:
    """Open a finished dump read-only."""
    return open_store(stage_path / FEATURES_STORE)


def read_hfr(stage_path: Path) -> tuple[np.ndarray, dict]:
    """A streamed dump's per-image HFR (timestep, layer, hfr_site, sample) and its layout attrs."""
    group = open_features(stage_path)
    if "hfr" not in group:
        raise KeyError(f"{stage_path / FEATURES_STORE}: no streamed HFR in this dump")
    return np.asarray(group["hfr"][:], dtype=np.float64), _stored_layout(dict(group.attrs["layout"]))


def has_streamed_hfr(stage_path: Path) -> bool:
    """Whether a dump streamed per-image HFR (a calibration of the A-SelecT path)."""
    return bool(open_features(stage_path).attrs["layout"].get("hfr_sites"))


def read_samples(stage_path: Path) -> np.ndarray:
    """Dataset indices of a dump's samples, in dump order."""
    return np.asarray(open_features(stage_path)["sample"][:], dtype=np.int64)


class PairReader:
    """One (timestep, layer, site) slice of a finished dump: pooled (n, D), token maps (n, T, D) or, for the site
    `attn_map`, attention maps (n, T, T); read whole, as chosen rows, or a window of samples at a time (what a probe
    bigger than its memory budget streams from). `source`: the dump's stage directory or its features store."""

    def __init__(self, source: str | Path, timestep: int, layer: int, site: str, spatial: bool):
        source = Path(source)
        group = open_features(source) if (source / FEATURES_STORE).exists() else open_store(source)
        where = [list(group["timestep"][:]).index(timestep), list(group["layer"][:]).index(layer)]
        if site == "attn_map":  # its own array, with no site axis
            self.array = group["attn_map"]
        else:
            where.append(list(group["site"][:]).index(site))
            self.array = group["spatial" if spatial else "pooled"]
        self._where = tuple(where)
        self.samples = np.asarray(group["sample"][:], dtype=np.int64)  # dataset index of each row
        self.row_shape = tuple(int(v) for v in self.array.shape[len(where) + 1:])

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row once read as float32."""
        return 4 * int(np.prod(self.row_shape))

    def read_all(self) -> np.ndarray:
        """Every row as float32, in dump order."""
        return np.asarray(self.array[self._where], dtype=np.float32)

    def read(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The rows at these positions (all when None) as float32: one orthogonal selection."""
        if rows is None:
            return self.read_all()
        return np.asarray(self.array.get_orthogonal_selection((*self._where, np.asarray(rows))), dtype=np.float32)

    def windows(self, window: int) -> Callable[[np.ndarray], Iterator[np.ndarray]]:
        """A reader of sorted row positions that reads at most `window` consecutive rows at a time (float32)."""
        def read(positions: np.ndarray) -> Iterator[np.ndarray]:
            positions = np.asarray(positions, dtype=np.int64)
            if np.any(np.diff(positions) < 0):
                raise ValueError("PairReader.windows reads sorted positions only")
            bounds = np.searchsorted(positions, np.arange(0, len(self.samples) + window, window))
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                if hi > lo:
                    first = int(positions[lo])
                    block = self.array[(*self._where, slice(first, int(positions[hi - 1]) + 1))]
                    yield np.asarray(block[positions[lo:hi] - first], dtype=np.float32)
        return read
