"""What the bench scripts share: natural test images at any size, written as an ingested dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aselect.pipelines.ingest import Dataset
from aselect.storage.datasets import write_dataset

# scikit-image's sample pictures that ship with the package (others are downloaded on first use)
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "camera",
           "coins", "moon", "grass", "gravel", "brick", "clock", "horse", "cell")


def natural_images(count: int, size: int) -> np.ndarray:
    """`count` RGB uint8 images (N, 3, size, size): scikit-image's sample pictures, centre-cropped and resized."""
    from PIL import Image
    from skimage import data

    out = []
    for i in range(count):
        picture = np.asarray(getattr(data, SAMPLES[i % len(SAMPLES)])())
        if picture.ndim == 2:
            picture = np.stack([picture] * 3, axis=-1)
        h, w = picture.shape[:2]
        side = min(h, w)
        crop = picture[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2, :3]
        image = Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC)
        # more images than samples: shift and mirror, so every image differs
        image = image.rotate(7 * (i // len(SAMPLES)), resample=Image.Resampling.BILINEAR)
        if (i // len(SAMPLES)) % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(image).transpose(2, 0, 1))
    return np.stack(out).astype(np.uint8)


def natural_dataset(count: int, size: int, stage: Path) -> Path:
    """`natural_images` written as an ingest stage's dataset under `stage` (every image in the train split)."""
    images = natural_images(count, size)
    n = len(images)
    stage.mkdir(parents=True, exist_ok=True)
    write_dataset(Dataset(images=images, labels=np.zeros(n, dtype=np.int64), class_names=["image"],
                          train_idx=np.arange(n), test_idx=np.arange(0)), stage)
    return stage
