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

    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    train_idx: np.ndarray  # int64, sorted
    test_idx: np.ndarray  # int64, sorted; disjoint from train_idx, union = all
    masks: np.ndarray | None = None  # uint8 (N, H, W) per-pixel ids into mask_class_names
    mask_class_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # "path: reason" for each file or folder skipped


def write_dataset(dataset: Dataset, stage_path: Path) -> Path:
    """Write a dataset next to the stage manifest; built in a temp dir and renamed, so never half there."""
    final = stage_path / DATASET_STORE
    tmp = stage_path / f".{DATASET_STORE}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(tmp, mode="w")
    n = len(dataset.labels)
    chunk = min(n, 512)
    group.create_array("images", data=dataset.images, chunks=(chunk, *dataset.images.shape[1:]),
                       dimension_names=("sample", "channel", "y", "x"))
    failpoint("ingest")
    group.create_array("labels", data=dataset.labels.astype(np.int64), chunks=(n,), dimension_names=("sample",))
    group.create_array("train_idx", data=dataset.train_idx.astype(np.int64), dimension_names=("train",))
    group.create_array("test_idx", data=dataset.test_idx.astype(np.int64), dimension_names=("test",))
    failpoint("ingest")
    if dataset.masks is not None:
        group.create_array("masks", data=dataset.masks, chunks=(chunk, *dataset.masks.shape[1:]),
                           dimension_names=("sample", "y", "x"))
    group.attrs.update({
        "class_names": list(dataset.class_names),
        "mask_class_names": list(dataset.mask_class_names or []),
        "skipped": list(dataset.skipped),
    })
    failpoint("ingest")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def read_dataset(stage_path: Path) -> Dataset:
    """Read a dataset written by `write_dataset` fully into memory."""
    group = zarr.open_group(stage_path / DATASET_STORE, mode="r")
    names = set(group.array_keys())
    return Dataset(
        images=group["images"][:],
        labels=group["labels"][:],
        class_names=list(group.attrs["class_names"]),
        train_idx=group["train_idx"][:],
        test_idx=group["test_idx"][:],
        masks=group["masks"][:] if "masks" in names else None,
        mask_class_names=list(group.attrs["mask_class_names"]) or None,
        skipped=list(group.attrs["skipped"]),
    )


def read_split(stage_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, train indices and test indices only (no images)."""
    group = zarr.open_group(stage_path / DATASET_STORE, mode="r")
    return group["labels"][:], group["train_idx"][:], group["test_idx"][:]


def open_images(stage_path: Path) -> zarr.Array:
    """The dataset's uint8 images (N, C, H, W), opened lazily: readers take only the rows they need."""
    return zarr.open_group(stage_path / DATASET_STORE, mode="r")["images"]


def read_mask_class_names(stage_path: Path) -> list[str]:
    """Names of the mask ids (segmentation datasets; empty otherwise)."""
    return list(zarr.open_group(stage_path / DATASET_STORE, mode="r").attrs["mask_class_names"])


def read_masks(stage_path: Path) -> np.ndarray | None:
    """Per-pixel masks (N, H, W), or None for classification-only datasets."""
    group = zarr.open_group(stage_path / DATASET_STORE, mode="r")
    return group["masks"][:] if "masks" in set(group.array_keys()) else None
