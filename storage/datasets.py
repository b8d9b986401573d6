"""Zarr layout of an ingested dataset: `images`, `labels`, optional `masks`, split indices, class names."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from aselect.storage.faults import failpoint

DATASET_STORE = "data.zarr"


@dataclass
class Dataset:
    """Images, labels and a fixed train/test split; masks only for segmentation sources."""

    images: np.ndarray  # uint8 (N, C, H, W); a lazy zarr.Array from read_dataset(lazy_images=True)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    train_idx: np.ndarray  # int64, sorted
    test_idx: np.ndarray  # int64, sorted; disjoint from train_idx, union = all
    masks: np.ndarray | None = None  # uint8 (N, H, W) per-pixel ids into mask_class_names
    mask_class_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # "path: reason" for each file or folder skipped
    mask_palette: list[int] | None = None  # RGB triples of the source's palette masks, so outputs colour the same


DATASET_CHUNK = 512  # images per Zarr chunk, and per decoded batch when a folder is ingested streaming


class DatasetWriter:
    """A dataset store built in a temp dir: image rows are appended as they are decoded (memory: one batch),
    then `commit` writes labels, split and names and renames the store into place, so it is never half there.

    With `subset_later`, rows go to a scratch array and `commit(keep=...)` copies the kept ones (a `limit` picked
    from labels only known once every file was read); otherwise they are written where they stay."""

    def __init__(self, stage_path: Path, image_shape: tuple[int, ...], masks_shape: tuple[int, ...] | None = None,
                 subset_later: bool = False):
        self.final = stage_path / DATASET_STORE
        self.tmp = stage_path / f".{DATASET_STORE}.tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.group = zarr.open_group(self.tmp, mode="w")
        self.rows = 0
        self.subset_later = subset_later
        prefix = "all_" if subset_later else ""
        self._arrays = {"images": self._growing(f"{prefix}images", image_shape, ("sample", "channel", "y", "x"))}
        if masks_shape is not None:
            self._arrays["masks"] = self._growing(f"{prefix}masks", masks_shape, ("sample", "y", "x"))

    def _growing(self, name: str, row_shape: tuple[int, ...], dims: tuple[str, ...]) -> zarr.Array:
        return self.group.create_array(name, shape=(0, *row_shape), chunks=(DATASET_CHUNK, *row_shape),
                                       dtype=np.uint8, dimension_names=dims)

    def append(self, images: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Add rows in dataset order (uint8 images (b, C, H, W), and masks (b, H, W) when the store has them)."""
        for name, rows in (("images", images), ("masks", masks)):
            if name in self._arrays:
                array = self._arrays[name]
                array.resize((self.rows + len(rows), *array.shape[1:]))
                array[self.rows:self.rows + len(rows)] = rows
        self.rows += len(images)

    def commit(self, labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray, class_names: list[str],
               keep: np.ndarray | None = None, mask_class_names: list[str] | None = None,
               skipped: list[str] | None = None, mask_palette: list[int] | None = None) -> Path:
        """Finish the store: `keep` (sorted row indices) subsets the appended rows; labels and split index it."""
        if keep is not None and not self.subset_later:
            raise ValueError("keep needs a DatasetWriter made with subset_later=True")
        failpoint("ingest")
        if self.subset_later:
            kept = np.arange(self.rows) if keep is None else np.asarray(keep, dtype=np.int64)
            for name, rows in self._arrays.items():
                self._copy_rows(name, rows, kept)
        failpoint("ingest")
        n = len(labels)
        self.group.create_array("labels", data=labels.astype(np.int64), chunks=(max(n, 1),),
                                dimension_names=("sample",))
        self.group.create_array("train_idx", data=train_idx.astype(np.int64), dimension_names=("train",))
        self.group.create_array("test_idx", data=test_idx.astype(np.int64), dimension_names=("test",))
        self.group.attrs.update({"class_names": list(class_names), "mask_class_names": list(mask_class_names or []),
                                 "skipped": list(skipped or []), "mask_palette": list(mask_palette or [])})
        failpoint("ingest")
        shutil.rmtree(self.final, ignore_errors=True)
        self.tmp.rename(self.final)
        return self.final

    def _copy_rows(self, name: str, rows: zarr.Array, keep: np.ndarray) -> None:
        """Copy the kept rows into `name`, reading each scratch chunk once (memory: about two chunks)."""
        out = self.group.create_array(name, shape=(len(keep), *rows.shape[1:]), chunks=rows.chunks, dtype=np.uint8,
                                      dimension_names=rows.metadata.dimension_names)
        written, buffer = 0, rows[:0]
        for start in range(0, self.rows, DATASET_CHUNK):
            wanted = keep[(keep >= start) & (keep < start + DATASET_CHUNK)]
            if len(wanted):  # a scratch chunk with nothing kept is not read
                buffer = np.concatenate([buffer, rows[start:start + DATASET_CHUNK][wanted - start]])
            last = start + DATASET_CHUNK >= self.rows
            while len(buffer) >= DATASET_CHUNK or (last and len(buffer)):
                piece, buffer = buffer[:DATASET_CHUNK], buffer[DATASET_CHUNK:]
                out[written:written + len(piece)] = piece
                written += len(piece)
        del self.group[rows.basename]


def write_dataset(dataset: Dataset, stage_path: Path) -> Path:
    """Write an in-memory dataset next to the stage manifest (through `DatasetWriter`: never half there)."""
    masks = dataset.masks
    writer = DatasetWriter(stage_path, dataset.images.shape[1:], None if masks is None else masks.shape[1:])
    for start in range(0, len(dataset.images), DATASET_CHUNK):
        rows = slice(start, start + DATASET_CHUNK)
        writer.append(dataset.images[rows], None if masks is None else masks[rows])
    return writer.commit(dataset.labels, dataset.train_idx, dataset.test_idx, dataset.class_names,
                         mask_class_names=dataset.mask_class_names, skipped=dataset.skipped,
                         mask_palette=dataset.mask_palette)


def read_dataset(stage_path: Path, lazy_images: bool = False) -> Dataset:
    """Read a stored dataset into memory (`lazy_images`: all but the images, left as the store's lazy array)."""
    group = zarr.open_group(stage_path / DATASET_STORE, mode="r")
    names = set(group.array_keys())
    return Dataset(
        images=group["images"] if lazy_images else group["images"][:],
        labels=group["labels"][:],
        class_names=list(group.attrs["class_names"]),
        train_idx=group["train_idx"][:],
        test_idx=group["test_idx"][:],
        masks=group["masks"][:] if "masks" in names else None,
        mask_class_names=list(group.attrs["mask_class_names"]) or None,
        skipped=list(group.attrs["skipped"]),
        mask_palette=_palette(group),
    )


def _palette(group: zarr.Group) -> list[int] | None:
    """The stored mask palette, or None (none recorded, or a store written without the attribute)."""
    return [int(v) for v in group.attrs.get("mask_palette") or []] or None


def read_split(stage_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, train indices and test indices only (no images)."""
    group = zarr.open_group(stage_path / DATASET_STORE, mode="r")
    return group["labels"][:], group["train_idx"][:], group["test_idx"][:]


def open_images(stage_path: Path) -> zarr.Array:
    """The dataset's uint8 images (N, C, H, W), opened lazily: readers take only the rows they need."""
    return zarr.open_group(stage_path / DATASET_STORE, mode="r")["images"]


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's shapes and names, without reading its arrays."""

    image_shape: tuple[int, ...]  # (N, C, H, W)
    class_names: list[str]
    mask_class_names: list[str]  # empty for classification
    mask_shape: tuple[int, ...] | None  # (H, W) of the masks; None for classification
    mask_palette: list[int] | None = None  # RGB triples of the source's palette masks; None: not palette PNGs


def read_dataset_info(stage_path: Path) -> DatasetInfo:
    """Shapes and class names of an ingested dataset."""
    group = zarr.open_group(stage_path / DATASET_STORE, mode="r")
    masks = "masks" in set(group.array_keys())
    return DatasetInfo(image_shape=tuple(int(v) for v in group["images"].shape),
                       class_names=list(group.attrs["class_names"]),
                       mask_class_names=list(group.attrs["mask_class_names"] or []),
                       mask_shape=tuple(int(v) for v in group["masks"].shape[1:]) if masks else None,
                       mask_palette=_palette(group))


def read_mask_class_names(stage_path: Path) -> list[str]:
    """Names of the mask ids (segmentation datasets; empty otherwise)."""
    return list(zarr.open_group(stage_path / DATASET_STORE, mode="r").attrs["mask_class_names"])


def read_masks(stage_path: Path) -> np.ndarray | None:
    """Per-pixel masks (N, H, W), or None for classification-only datasets."""
    group = zarr.open_group(stage_path / DATASET_STORE, mode="r")
    return group["masks"][:] if "masks" in set(group.array_keys()) else None
