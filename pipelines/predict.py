"""Use what a finished run selected: its backbone's features at the selected (timestep, layer, site) of new images,
and its probe's predictions on them. No Prefect.

- `load_run(workdir, run=None)`: a finished run of a workdir. A run is named by its probe stage (the last stage of
  `aselect-pipeline` and `aselect-exhaustive` alike): the newest complete one, or the one whose key starts with
  `run`. From the probe's manifest come the selection and the dump(s) it read; from the dump's, its noise settings
  and the ingest and backbone stages; the select stage is the one that recorded the same selection.
- `Run.features(images, indices)`: the selected features of uint8 images (N, C, H, W), computed as the run's dump
  computed them: images of another size or mode are converted as ingest converts image files, encoded, noised to
  the selected t and passed through the backbone; pooled (N, D) float32 for a linear classification probe, token
  maps (N, T, D) otherwise (rounded through float16, as the dump stores them).
- `Run.predict(images, indices)`: class ids and per-class probabilities, or per-pixel masks.
- `read_images(paths, size, channels)`: files and folders decoded by ingest's rules (`Run.read_images` fills in the
  run's size and channels).
- `Run.predict_files(paths)`: the same predictions for many files, read and predicted a batch at a time.
- `predict_to(run, paths, out)`: `predict_files` written as it goes (`PredictionWriter`: CSV or JSON lines, mask
  PNGs), for the `aselect predict` command and the `aselect-predict` flow alike.

Noise. The dump noises dataset image i at timestep t with a generator seeded by (dump seed, i, t, draw)
(`pipelines.features.noise_seed`). `indices[k]` says which image index image k is noised as. The default
(`Run.noise_indices`) follows the image's pixels: an image of the run's own dataset (the same uint8 pixels after
decoding) is noised as its dataset index, so its features and prediction are the run's; any other image as an
index derived from its pixels alone, so a prediction does not depend on the other images of the call or their
order. The attentive probe averages its logits over the noise draws it trained on (`probe.noise_draws`), as its
stage evaluated it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from aselect.pipelines.backbone import backbone_fingerprint
from aselect.pipelines.ingest import IMAGE_SUFFIXES, _read_image
from aselect.pipelines.probe import (
    EVAL_BATCH,
    FittedProbe,
    grid_side,
    load_linear,
    predict_class_proba,
    predict_classes,
    predict_token_masks,
    upsample_bilinear,
)
from aselect.storage.datasets import DATASET_STORE, open_images, read_dataset_info
from aselect.storage.errors import AselectError
from aselect.storage.stages import StageDir, Workdir

log = logging.getLogger("aselect.predict")

MODEL_DIR = "model"  # a backbone stage's model directory (tasks.backbone.MODEL_DIR)
HEAD_DIR = "head"  # the attentive probe's head in its stage (tasks.probe.HEAD_DIR)
METRICS_JSON = "metrics.json"
SELECTION_JSON = "selection.json"
TOKEN_SITES = ("block", "attn", "mlp", "query", "key", "value")
STREAM_IMAGES = 256  # images decoded at once by `Run.predict_files` (rounded to the dump's batch)
KEY_BLOCK = 1024  # dataset images read at once to look images up by their pixels
# Noise index of an image not in the run's dataset: this plus 48 bits of its pixels' digest, above any dataset index.
CONTENT_INDEX = 2**48


def pixel_digest(image: np.ndarray) -> bytes:
    """A digest of a uint8 image's shape and pixels: how an image is recognised whatever its file or position."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha256(repr(image.shape).encode() + image.tobytes()).digest()
HEAD_ROWS = 10  # rows a prediction summary keeps
SKIPPED_LISTED = 20  # skipped files a prediction summary names
Progress = Callable[[int, int], None]  # (images done, total)
Skip = Callable[[str], None]  # one line per file left out (with skip_bad)


# ---------------------------------------------------------------------------------------------
#                                         Images
# ---------------------------------------------------------------------------------------------


def image_files(paths: Iterable[str | Path], skip_bad: bool = False, skipped: list[str] | None = None,
                on_skip: Skip | None = None) -> list[Path]:
    """The image files named by `paths`: files as given, folders searched recursively for .png/.jpg/.jpeg (hidden
    entries skipped); without duplicates and sorted by path, so the order (and the noise index of each image) does
    not depend on the order of the arguments. A missing path or a file that is no image fails in one line, or is
    recorded in `skipped` (or passed to `on_skip`) with `skip_bad`."""
    sink = on_skip or _sink(skipped)
    found: set[Path] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                         and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif not path.exists():
            _report(f"{path}: no such file or directory", skip_bad, sink)
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            _report(f"{path}: not an image file (expected .png, .jpg or .jpeg)", skip_bad, sink)
        else:
            found.add(path)
    return sorted(found, key=str)


def _sink(skipped: list[str] | None) -> Skip:
    return skipped.append if skipped is not None else lambda message: log.warning("skipped %s", message)


def _report(message: str, skip_bad: bool, sink: Skip) -> None:
    if not skip_bad:
        raise AselectError(message)
    sink(message)


def image_batches(files: Sequence[str | Path], size: int, channels: int, batch_size: int, skip_bad: bool = False,
                  on_skip: Skip | None = None) -> Iterator[tuple[np.ndarray, list[str], int]]:
    """Image files decoded as `read_images` decodes them, `batch_size` readable images at a time (the last batch
    may hold fewer): yields uint8 (n, channels, size, size), their paths, and how many of `files` are done so far
    (skipped ones included). Only one batch is in memory at a time."""
    mode = "L" if channels == 1 else "RGB"
    sink = on_skip or _sink(None)
    images: list[np.ndarray] = []
    names: list[str] = []
    for done, path in enumerate(files, 1):
        try:
            images.append(_read_image(Path(path), mode, size))
        except AselectError as exc:
            _report(str(exc), skip_bad, sink)
        else:
            names.append(str(path))
        if images and (len(images) == batch_size or done == len(files)):
            stacked = np.stack(images)
            yield (stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)), names, done
            images, names = [], []


def _no_images(paths: Sequence[str | Path]) -> AselectError:
    return AselectError(f"{', '.join(str(p) for p in paths) or 'no paths'}: no readable images")


def read_images(paths: Iterable[str | Path], size: int, channels: int, skip_bad: bool = False,
                skipped: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Image files and folders (`image_files`) decoded as ingest decodes an image folder: EXIF orientation applied,
    converted to grey (`channels` 1) or RGB, resized bilinearly to size x size. Returns uint8 (N, channels, size,
    size) and each image's path. An unreadable file fails in one line naming it; with `skip_bad` it is left out
    (and its reason appended to `skipped`)."""
    paths = list(paths)
    sink = _sink(skipped)
    files = image_files(paths, skip_bad, on_skip=sink)
    for images, names, _ in image_batches(files, size, channels, max(len(files), 1), skip_bad, sink):
        return images, names
    raise _no_images(paths)


def conform_images(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 images (N, C, H, W) as the dataset holds them: those of another size or channel count are converted
    (grey/RGB/RGBA by PIL, as ingest converts files) and resized bilinearly to size x size."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise AselectError(f"expected uint8 images of shape (N, C, H, W), got {images.dtype} {images.shape}")
    if images.shape[1:] == (channels, size, size):
        return images
    if images.shape[1] not in (1, 3, 4):
        raise AselectError(f"images have {images.shape[1]} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(images), channels, size, size), dtype=np.uint8)
    for i, image in enumerate(images):
        img = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).convert(mode)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)
        out[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return out


# ---------------------------------------------------------------------------------------------
#                                         The run
# ---------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """What a run's probe says about some images: class ids (N,) and probabilities (N, K) for classification, masks
    (N, H, W) of class ids for segmentation; `class_names[k]` names class id k."""

    task: str  # "classification" | "segmentation"
    class_names: list[str]
    classes: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    masks: np.ndarray | None = None


@dataclass(frozen=True)
class NoiseSetting:
    """How one of the run's dumps noised (and computed) its features."""

    seed: int
    draw: int
    sensor_noise: float
    autocast: str
    batch: int  # images per forward pass (the dump's images_per_chunk)

    @classmethod
    def of(cls, dump: StageDir) -> NoiseSetting:
        config = (_manifest(dump).get("inputs") or {}).get("config") or {}
        return cls(int(config.get("seed", 0)), int(config.get("draw", 0)), float(config.get("sensor_noise", 0.0)),
                   str(config.get("autocast", "auto")), int(config.get("images_per_chunk", 64)))


@dataclass
class Run:
    """A finished run: its selection, the stages it came from, and what applies its probe to new images."""

    key: str  # its probe stage's key
    selection: dict[str, Any]
    task: str  # "classification" | "segmentation"
    probe: str  # "linear" | "attentive"
    class_names: list[str]  # names of the class ids predicted (mask class names for segmentation)
    image_size: int
    channels: int
    mask_size: tuple[int, int] | None
    metrics: dict[str, Any]
    stages: dict[str, Path]  # ingest, backbone, dump (draw 0; none for an online probe), select (when found), probe
    model_path: str
    noise: list[NoiseSetting]  # one per noise draw the probe read (draw 0 first)
    device: str = "auto"
    mask_palette: list[int] | None = None  # RGB triples of the training masks' palette (palette PNG masks only)
    _backbone: Any = field(default=None, repr=False)
    _fitted: tuple[Any, dict] | None = field(default=None, repr=False)
    _dataset_keys: dict[bytes, int] | None = field(default=None, repr=False)  # pixel digest -> dataset index

    # ---- what the probe needs --------------------------------------------------------------

    @property
    def pooled(self) -> bool:
        """Whether the probe reads mean-pooled features (the linear classification probe) rather than token maps."""
        return self.probe == "linear" and self.task == "classification"

    @property
    def flow(self) -> str:
        """The flow that made the run: the exhaustive oracle's selection has policy `oracle`."""
        return "aselect-exhaustive" if self.selection.get("policy") == "oracle" else "aselect-pipeline"

    def fitted(self) -> tuple[Any, dict]:
        """The probe as saved in its stage: (FittedProbe, linear.json) or (AttentiveHead, head.json)."""
        if self._fitted is None:
            probe_dir = self.stages["probe"]
            if self.probe == "attentive":
                from aselect.pipelines.attentive import load_head

                self._fitted = load_head(probe_dir / HEAD_DIR)
            elif not (probe_dir / "linear.json").is_file():
                raise AselectError(f"{probe_dir}: no saved linear probe (linear.json): the stage finished before "
                                   f"probes were saved; `aselect run` with the run's config fits and saves one")
            else:
                self._fitted = load_linear(probe_dir)
        return self._fitted

    def backbone(self) -> Any:
        """The run's backbone, loaded once, on the run's device."""
        if self._backbone is None:
            from aselect.pipelines.backbone import load_backbone

            backbone = load_backbone(self.model_path)
            device = self._torch_device()
            backbone.transformer.to(device).eval()
            if backbone.vae is not None:
                backbone.vae.to(device).eval()
            self._backbone = backbone
        return self._backbone

    def _torch_device(self) -> Any:
        import torch

        if self.device not in ("auto", "cuda"):
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda")
        if self.device == "cuda":
            raise AselectError("device 'cuda' requested but no CUDA device is available")
        return torch.device("cpu")

    # ---- images -> features ----------------------------------------------------------------

    def read_images(self, paths: Iterable[str | Path], skip_bad: bool = False,
                    skipped: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        """`read_images` at the run's image size and channels."""
        return read_images(paths, self.image_size, self.channels, skip_bad, skipped)

    def noise_indices(self, images: np.ndarray) -> np.ndarray:
        """The index each uint8 image (N, C, H, W) is noised as: its index in the run's dataset when its pixels are
        there, else CONTENT_INDEX + a number read from its pixels' digest (never a dataset index)."""
        if self._dataset_keys is None:  # read once, a block of images at a time
            stored = open_images(self.stages["ingest"])
            self._dataset_keys = {}
            for start in range(0, stored.shape[0], KEY_BLOCK):
                for k, image in enumerate(np.asarray(stored[start:start + KEY_BLOCK])):
                    self._dataset_keys.setdefault(pixel_digest(image), start + k)
        keys = [pixel_digest(image) for image in images]
        return np.array([self._dataset_keys.get(key, CONTENT_INDEX + int.from_bytes(key[:6], "big")) for key in keys],
                        dtype=np.int64)

    def _indices(self, images: np.ndarray, indices: Sequence[int] | np.ndarray | None) -> np.ndarray:
        n = len(images)
        if indices is None:
            return self.noise_indices(images)
        indices = np.asarray(indices, dtype=np.int64).ravel()
        if len(indices) != n:
            raise AselectError(f"indices: {len(indices)} given for {n} images")
        if n and indices.min() < 0:
            raise AselectError(f"indices must be >= 0, got {int(indices.min())}")
        return indices

    def _batch_features(self, pixels: np.ndarray, indices: np.ndarray, setting: NoiseSetting) -> np.ndarray:
        """Features of one batch, as the dump's `_run_chunk` computes and stores them."""
        import torch

        from aselect.pipelines.backbone import encode_images
        from aselect.pipelines.features import Reduction, draw_noise, extract, sensor_noise

        backbone, device = self.backbone(), self._torch_device()
        autocast = None if device.type != "cuda" else {"auto": torch.bfloat16, "bf16": torch.bfloat16,
                                                       "fp16": torch.float16}.get(setting.autocast)
        amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        ids = [int(i) for i in indices]
        x = torch.from_numpy(np.ascontiguousarray(pixels))
        with torch.no_grad(), amp:
            noisy = sensor_noise(x.shape[1:], ids, setting.sensor_noise, setting.seed) if setting.sensor_noise \
                else None
            x0 = encode_images(backbone, x.to(device), noisy)
        t, layer, site = int(self.selection["timestep"]), int(self.selection["layer"]), self.selection["site"]
        noise = draw_noise(x0.shape[1:], ids, t, setting.seed, draws=1, first_draw=setting.draw)
        if self.pooled:
            mean = Reduction([site], lambda features, _: features.mean(dim=1, dtype=torch.float32))
            feats = extract(backbone, x0, ids, t, [layer], [], setting.seed, autocast=autocast,
                            reductions={"mean": mean}, noise=noise)
            return feats[(layer, site, "mean")].to(torch.float32).cpu().numpy()
        feats = extract(backbone, x0, ids, t, [layer], [site], setting.seed, autocast=autocast, noise=noise)
        return feats[(layer, site)].to(torch.float16).cpu().numpy().astype(np.float32)  # stored as float16

    def features(self, images: np.ndarray, indices: Sequence[int] | np.ndarray | None = None, draw: int = 0,
                 batch_size: int | None = None) -> np.ndarray:
        """The selected (t, layer, site) features of uint8 images (N, C, H, W), each noised as image `indices[k]`
        (default: `noise_indices`) was in noise draw `draw` of the run's dump: pooled (N, D) for the linear
        classification probe, token maps (N, T, D) otherwise."""
        images = conform_images(images, self.image_size, self.channels)
        indices = self._indices(images, indices)
        setting = self._setting(draw)
        step = batch_size or setting.batch
        return np.concatenate([self._batch_features(images[i:i + step], indices[i:i + step], setting)
                               for i in range(0, len(images), step)])

    def _setting(self, draw: int) -> NoiseSetting:
        for setting in self.noise:
            if setting.draw == draw:
                return setting
        base = self.noise[0]
        return NoiseSetting(base.seed, int(draw), base.sensor_noise, base.autocast, base.batch)

    # ---- features -> predictions -----------------------------------------------------------

    def predict(self, images: np.ndarray, indices: Sequence[int] | np.ndarray | None = None,
                batch_size: int | None = None, progress: Progress | None = None) -> Prediction:
        """The probe's prediction for uint8 images (N, C, H, W) noised as in `features`: class ids and per-class
        probabilities (classification), or per-pixel class ids at the dataset's mask size (segmentation)."""
        images = conform_images(images, self.image_size, self.channels)
        indices = self._indices(images, indices)
        model, _ = self.fitted()
        step = batch_size or self.noise[0].batch
        parts: list[tuple[np.ndarray, np.ndarray | None]] = []
        for start in range(0, len(images), step):
            rows = slice(start, start + step)
            if self.probe == "attentive":
                parts.append(self._attentive(model, images[rows], indices[rows]))
            else:
                parts.append(self._linear(model, images[rows], indices[rows]))
            if progress is not None:
                progress(min(start + step, len(images)), len(images))
        out = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0,), dtype=np.int64)
        if self.task == "segmentation":
            return Prediction(self.task, list(self.class_names), masks=out)
        probabilities = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, len(self.class_names)))
        return Prediction(self.task, list(self.class_names), classes=out, probabilities=probabilities)

    @property
    def stream_batch(self) -> int:
        """Images `predict_files` decodes and predicts at once: a multiple of the dump's batch near `STREAM_IMAGES`,
        so every forward pass holds the images one `predict` call over all of them would give it."""
        batch = self.noise[0].batch
        return batch * max(1, STREAM_IMAGES // batch)

    def predict_files(self, paths: Iterable[str | Path], batch_size: int | None = None, skip_bad: bool = False,
                      on_skip: Skip | None = None, progress: Progress | None = None
                      ) -> Iterator[tuple[list[str], Prediction]]:
        """`predict` on image files and folders (`image_files`), read and predicted `batch_size` images at a time
        (default `stream_batch`), so memory does not grow with their number: yields each batch's paths and
        prediction. Each image is noised as `noise_indices` says, so the predictions equal `predict` on
        `read_images(paths)`. `progress` gets (files done, files) before the first batch and after each."""
        paths = list(paths)
        predicted = yield from self._stream(image_files(paths, skip_bad, on_skip=on_skip), batch_size, skip_bad,
                                            on_skip, progress)
        if not predicted:
            raise _no_images(paths)

    def _stream(self, files: Sequence[Path], batch_size: int | None, skip_bad: bool, on_skip: Skip | None,
                progress: Progress | None) -> Generator[tuple[list[str], Prediction], None, int]:
        """`predict_files` on files already found; returns how many images it predicted."""
        step = batch_size or self.stream_batch
        if progress is not None:
            progress(0, len(files))
        position = 0
        for images, names, done in image_batches(files, self.image_size, self.channels, step, skip_bad, on_skip):
            prediction = self.predict(images)
            position += len(images)
            if progress is not None:
                progress(done, len(files))
            yield names, prediction
        if progress is not None:
            progress(len(files), len(files))  # files skipped after the last batch
        return position

    def _linear(self, probe: FittedProbe, pixels: np.ndarray, indices: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray | None]:
        x = self._batch_features(pixels, indices, self.noise[0])
        if self.task == "segmentation":
            height, width = self.mask_size
            return predict_token_masks(probe, x, height, width).astype(np.int64), None
        if probe.model is None:  # training saw one class
            classes = np.full(len(x), probe.classes[0], dtype=np.int64)
            proba = np.ones((len(x), 1))
        else:
            classes, proba = predict_classes(probe, x).astype(np.int64), predict_class_proba(probe, x)
        full = np.zeros((len(x), len(self.class_names)), dtype=np.float64)
        full[:, probe.classes] = proba
        return classes, full

    def _attentive(self, head: Any, pixels: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits averaged over the probe's noise draws (as `pipelines.attentive._averaged_logits`), then argmax
        (classification) or softmax, bilinear upsampling to the mask size and argmax (segmentation)."""
        import torch

        total = None
        for setting in self.noise:
            maps = self._batch_features(pixels, indices, setting)
            with torch.no_grad():
                logits = torch.cat([head(torch.from_numpy(maps[i:i + EVAL_BATCH]))
                                    for i in range(0, len(maps), EVAL_BATCH)])
            total = logits if total is None else total + logits
        logits = total / len(self.noise)
        if self.task == "classification":
            return logits.argmax(dim=1).numpy().astype(np.int64), torch.softmax(logits.double(), dim=1).numpy()
        height, width = self.mask_size
        probs = torch.softmax(logits.double(), dim=-1).numpy()
        side, classes = grid_side(probs.shape[1]), probs.shape[2]
        probs = probs.reshape(len(probs), side, side, classes).transpose(0, 3, 1, 2)
        return upsample_bilinear(probs, height, width).argmax(axis=1).astype(np.int64), None


# ---------------------------------------------------------------------------------------------
#                                     Finding a run
# ---------------------------------------------------------------------------------------------


def _manifest(stage: StageDir) -> dict[str, Any]:
    return stage.read_manifest() or {}


def _finished(work: Workdir, name: str, key: str | None, needed_by: str, full: bool | None = False) -> StageDir:
    """A complete upstream stage, verified (`_verified` with `full`), or a one-line error naming it."""
    if not key:
        raise AselectError(f"{needed_by}: its manifest names no {name} stage")
    stage = work.stage(name, key)
    if not stage.is_complete():
        raise AselectError(f"{stage.path}: the {name} stage this run read is {stage.status()}; `aselect run` with "
                           f"the run's config computes it again")
    return _verified(stage, full)


def _verified(stage: StageDir, full: bool | None = None) -> StageDir:
    """`stage`, once its files match what it recorded when it finished (`StageDir.damage`: `full=None` is the
    check a pipeline run makes before reusing a stage, sizes and the sha256 of small files; False, sizes and the
    manifest's digest, for stages of which only the manifest and metadata are read). A missing or changed file is
    a one-line error naming it: a run reopens such a stage, so `aselect run` computes it again."""
    damaged = stage.damage(full=full)
    if damaged:
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise AselectError(f"{stage.path / damaged[0]}: missing or changed since the {stage.name} stage finished"
                           f"{more}; `aselect run` with the run's config computes it again")
    return stage


def _pick_probe(work: Workdir, run: str | None) -> StageDir:
    infos = work.stages("probe")
    if run is None:
        # newest first; a damaged newest run is refused (`_verified`), never passed over for an older one
        done = [i for i in infos if i.status in ("complete", "damaged")]
        if not done:
            raise AselectError(f"{work.root}: no finished run (no complete probe stage); `aselect run` makes one")
        return work.stage("probe", done[0].key)
    matches = [i for i in infos if i.key.startswith(run)]
    if not matches:
        raise AselectError(f"run {run}: no run with that key in {work.root} (a run is named by its probe stage's "
                           f"key; `aselect inspect probe` lists them)")
    if len(matches) > 1:
        raise AselectError(f"run {run}: {len(matches)} runs have keys starting with it "
                           f"({', '.join(i.key for i in matches[:4])}); give more of the key")
    info = matches[0]
    if info.status not in ("complete", "damaged"):  # damaged: `_verified` names the file
        raise AselectError(f"run {run}: probe stage {info.key} is {info.status} (it has not finished; `aselect run` "
                           f"with its config finishes it)")
    return work.stage("probe", info.key)


def _model_path(backbone: StageDir) -> str:
    """Where the backbone stage's model is loaded from (as `tasks.backbone.ModelInfo.of`); a loaded model's source
    files must be those the stage loaded (the fingerprint its key hashed, sizes and times of the weights)."""
    manifest = _manifest(backbone)
    recorded, source = manifest.get("source_fingerprint"), manifest.get("source")
    if manifest.get("kind") == "load" and source and str(recorded).startswith("dir:"):  # a hub id's cache: no check
        if not Path(source).expanduser().is_dir():
            raise AselectError(f"{source}: missing; backbone stage {backbone.key} loaded its model from there")
        if backbone_fingerprint(source) != recorded:
            raise AselectError(f"{source}: the backbone's files changed since backbone stage {backbone.key} loaded "
                               f"them; `aselect run` with the run's config loads them again")
    inside = manifest.get("kind", "load") == "pretrain" or manifest.get("model_path") == MODEL_DIR
    return str(backbone.path / MODEL_DIR) if inside else str(manifest.get("model_path", backbone.path / MODEL_DIR))


def _select_stage(work: Workdir, selection: dict[str, Any]) -> Path | None:
    """The newest complete select stage that recorded this selection, verified (None when none is left)."""
    wanted = _canonical(selection)  # as JSON: a fixed pair's score is NaN, which equals nothing as a float
    for info in work.stages("select"):
        stage = work.stage("select", info.key)
        if info.status in ("complete", "damaged") and _canonical(_manifest(stage).get("selection")) == wanted:
            return _verified(stage).path
    return None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def load_run(workdir: str | Path = "aselect-work", run: str | None = None, device: str = "auto") -> Run:
    """The newest finished run of `workdir` (its newest complete probe stage), or the one whose probe stage key
    starts with `run`. `device`: where the backbone runs (`auto`: CUDA when present, as `dump.device`)."""
    work = Workdir(workdir)
    if not work.root.is_dir():
        raise AselectError(f"{work.root}: no such workdir")
    probe = _verified(_pick_probe(work, run))  # its manifest (the selection), head or linear probe, metrics
    manifest = _manifest(probe)
    inputs = manifest.get("inputs") or {}
    selection = inputs.get("selection") or {}
    if not all(k in selection for k in ("timestep", "layer", "site")):
        raise AselectError(f"{probe.manifest_path}: no selection (timestep, layer, site) in its inputs")
    if selection["site"] not in TOKEN_SITES:
        raise AselectError(f"{probe.manifest_path}: site {selection['site']!r} is not a token site")
    upstream = inputs.get("upstream") or {}
    where = str(probe.manifest_path)
    online = inputs.get("online")
    if isinstance(online, dict):  # probe.online: no dump ran; the probe's inputs name what it computed from
        config = online.get("dump") or {}
        draws = int((inputs.get("config") or {}).get("noise_draws", 1))
        noise = [NoiseSetting(int(config.get("seed", 0)), k, float(config.get("sensor_noise", 0.0)),
                              str(config.get("autocast", "auto")), int(config.get("images_per_chunk", 64)))
                 for k in range(draws)]
        ingest = _finished(work, "ingest", online.get("ingest"), where)
        backbone = _finished(work, "backbone", online.get("backbone"), where, full=None)  # the weights it loads
        dump_path = None
    else:
        dumps = [_finished(work, "dump", upstream.get("features"), where)]
        dumps += [_finished(work, "dump", upstream[f"draw{k}"], where) for k in range(1, len(upstream))
                  if f"draw{k}" in upstream]
        noise = [NoiseSetting.of(d) for d in dumps]
        dump_inputs = _manifest(dumps[0]).get("inputs") or {}
        dump_upstream = dump_inputs.get("upstream") or {}
        ingest = _finished(work, "ingest", dump_upstream.get("ingest"), str(dumps[0].manifest_path))
        backbone = _finished(work, "backbone", dump_upstream.get("backbone"), str(dumps[0].manifest_path), full=None)
        dump_path = dumps[0].path

    info = read_dataset_info(ingest.path)
    _, channels, height, width = info.image_shape
    segmentation = info.mask_shape is not None
    names = info.mask_class_names if segmentation else info.class_names
    mask_size = info.mask_shape
    try:
        metrics = json.loads((probe.path / METRICS_JSON).read_text())
    except (OSError, ValueError):
        metrics = {"metric": manifest.get("metric"), "value": manifest.get("value"), "details": {}}
    stages = {"ingest": ingest.path, "backbone": backbone.path, "probe": probe.path}
    if dump_path is not None:
        stages["dump"] = dump_path
    select = _select_stage(work, selection)
    if select is not None:
        stages["select"] = select
    kind = (inputs.get("config") or {}).get("kind", "linear")
    result = Run(key=probe.key, selection=selection, task="segmentation" if segmentation else "classification",
                 probe=kind, class_names=names, image_size=int(height), channels=int(channels),
                 mask_size=mask_size, metrics=metrics, stages=stages, model_path=_model_path(backbone),
                 noise=noise, device=device, mask_palette=info.mask_palette if segmentation else None)
    if height != width:
        raise AselectError(f"{ingest.path / DATASET_STORE}: images are {height}x{width}, not square")
    result.fitted()  # a probe that cannot be applied fails here, in one line, before any image is read
    return result


# ---------------------------------------------------------------------------------------------
#                                       Writing results
# ---------------------------------------------------------------------------------------------

# class 0 (background, for the bundled segmentation sets) black, then distinct colours, repeating
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (128, 128, 128), (255, 255, 255)]


def write_mask_png(mask: np.ndarray, path: Path, palette: Sequence[int] | None = None) -> None:
    """A mask (H, W) of class ids as a palette PNG: each pixel's value is its class id, the palette colours them:
    `palette` (RGB triples, the training masks' own), else PALETTE; ids past a short `palette` get PALETTE's
    colours. Written through a temporary file beside it, so a killed run leaves no half-written PNG."""
    from PIL import Image

    mask = np.asarray(mask)
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise AselectError(f"{path}: class ids in [{mask.min()}, {mask.max()}] do not fit a palette PNG (0..255)")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    colours = [v for i in range(256) for v in PALETTE[i % len(PALETTE)]]
    if palette:
        needed = 3 * (int(mask.max()) + 1) if mask.size else 0
        colours = [int(v) for v in palette] + colours[len(palette):needed]  # no id without a colour
    image.putpalette(colours)
    tmp = _temporary(path)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temporary(path: Path) -> Path:
    """A fresh hidden name beside `path`: on its file system, so `os.replace` swaps it in whole."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def stems_collide(paths: Sequence[str | Path]) -> bool:
    """Whether two of `paths` share a stem, so their masks are numbered (`mask_name`)."""
    stems = [Path(p).stem for p in paths]
    return len(set(stems)) != len(stems)


def mask_name(path: str | Path, position: int, numbered: bool) -> str:
    """The mask file of the image at `position`: `<stem>.png`, or `<position>-<stem>.png` when stems collide."""
    stem = Path(path).stem
    return f"{position:05d}-{stem}.png" if numbered else f"{stem}.png"


def mask_names(paths: Sequence[str]) -> list[str]:
    """File names for the masks of `paths`: `<stem>.png`, or `<position>-<stem>.png` for all when two stems
    collide."""
    numbered = stems_collide(paths)
    return [mask_name(p, i, numbered) for i, p in enumerate(paths)]


class PredictionWriter:
    """Predictions written batch by batch, as rows of CSV or JSON lines. Classification: `path`, `class`,
    `p_<class>`... (JSON: `path`, `class`, `class_id`, `probabilities`). Segmentation: each mask as a palette PNG in
    `masks` (coloured by `palette`, see `write_mask_png`), and a row naming it with the fraction of pixels per class
    (`f_<class>`..., JSON `fractions`). Rows go to `stream`, or to the file `table` through a temporary file beside it
    that replaces it on `commit`: a run that fails or is killed leaves an earlier `table` as it was. Keeps the first
    rows (`head`) and, for classification, the images per predicted class (`counts`)."""

    def __init__(self, task: str, class_names: Sequence[str], *, table: Path | None = None,
                 stream: TextIO | None = None, masks: Path | None = None, as_json: bool = False,
                 numbered: bool = False, keep: int = HEAD_ROWS, palette: Sequence[int] | None = None) -> None:
        if (table is None) == (stream is None):
            raise ValueError("PredictionWriter: give one of table and stream")
        if task == "segmentation" and masks is None:
            raise ValueError("PredictionWriter: segmentation needs the masks directory")
        self.task, self.class_names, self.masks = task, list(class_names), masks
        self.table, self.as_json, self.numbered, self.keep = table, as_json, numbered, keep
        self.palette = palette
        self.rows = 0
        self.head: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}
        self._tmp: Path | None = None
        if masks is not None:
            masks.mkdir(parents=True, exist_ok=True)
        if table is not None:
            table.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = _temporary(table)
            self._out: TextIO = open(self._tmp, "x", newline="")  # noqa: SIM115 (closed by commit or discard)
        else:
            self._out = stream
        self._csv = csv.writer(self._out, lineterminator="\n")
        if not as_json:
            first, prefix = ("class", "p_") if task == "classification" else ("mask", "f_")
            self._csv.writerow(["path", first, *(f"{prefix}{name}" for name in self.class_names)])
        self._open = True

    def write(self, names: Sequence[str], prediction: Prediction) -> None:
        """One batch's rows (and mask PNGs); the rows reach the stream or temporary file before it returns."""
        names_ = self.class_names
        if self.task == "classification":
            for name, cls, probs in zip(names, prediction.classes, prediction.probabilities, strict=True):
                label = names_[int(cls)]
                if self.as_json:
                    self._out.write(json.dumps({"path": name, "class": label, "class_id": int(cls),
                                                "probabilities": dict(zip(names_, map(float, probs), strict=True))})
                                    + "\n")
                else:
                    self._csv.writerow([name, label, *(f"{p:.8g}" for p in probs)])
                self.counts[label] = self.counts.get(label, 0) + 1
                self._row({"path": name, "class": label, "probability": round(float(probs[int(cls)]), 6)})
        else:
            assert self.masks is not None
            for name, mask in zip(names, prediction.masks, strict=True):
                file = self.masks / mask_name(name, self.rows, self.numbered)
                write_mask_png(mask, file, self.palette)
                fractions = np.bincount(mask.ravel(), minlength=len(names_)) / mask.size
                if self.as_json:
                    self._out.write(json.dumps({"path": name, "mask": str(file), "fractions": dict(
                        zip(names_, map(float, fractions), strict=True))}) + "\n")
                else:
                    self._csv.writerow([name, str(file), *(f"{f:.6g}" for f in fractions)])
                self._row({"path": name, "mask": str(file), "largest": names_[int(fractions.argmax())]})
        self._out.flush()

    def _row(self, summary: dict[str, Any]) -> None:
        if len(self.head) < self.keep:
            self.head.append(summary)
        self.rows += 1

    def commit(self) -> None:
        """Finish: the temporary file, flushed to disk, replaces `table`."""
        if not self._open:
            return
        self._open = False
        self._out.flush()
        if self._tmp is not None and self.table is not None:
            os.fsync(self._out.fileno())
            self._out.close()
            os.replace(self._tmp, self.table)

    def discard(self) -> None:
        """Give up: the temporary file goes, `table` stays as it was (mask PNGs already written stay)."""
        if not self._open:
            return
        self._open = False
        if self._tmp is not None:
            self._out.close()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self.commit() if kind is None else self.discard()


def check_out(task: str, out: Path | None, label: str = "--out") -> None:
    """Fail in one line when `out` cannot take a run's output: segmentation writes mask PNGs into a directory,
    classification one table file."""
    if task == "segmentation" and out is None:
        raise AselectError(f"{label}: a segmentation run writes one mask PNG per image; give a directory")
    if out is not None and task == "segmentation" and out.exists() and not out.is_dir():
        raise AselectError(f"{out}: not a directory (a segmentation run writes one mask PNG per image into {label})")
    if out is not None and task == "classification" and out.is_dir():
        raise AselectError(f"{out}: is a directory (a classification run writes one CSV or JSON-lines file)")


def predict_to(run: Run, paths: Iterable[str | Path], out: Path | None, *, as_json: bool = False,
               skip_bad: bool = False, stream: TextIO | None = None, on_skip: Skip | None = None,
               progress: Progress | None = None, batch_size: int | None = None, label: str = "--out"
               ) -> dict[str, Any]:
    """Predict image files and folders with `run` batch by batch (`Run.predict_files`) and write the results as
    they come (`PredictionWriter`): a classification table to the file `out`, or to `stream` without one;
    segmentation masks into the directory `out` and their table to `stream`, or without one to `predictions.csv`
    (`.jsonl`) in `out`. Returns a summary: the run, images, skipped files, where the output went, the selection,
    the probe's metric, the first rows and the images per predicted class."""
    check_out(run.task, out, label)
    paths = list(paths)
    skipped: list[str] = []

    def skip(message: str) -> None:
        skipped.append(message)
        if on_skip is not None:
            on_skip(message)

    files = image_files(paths, skip_bad, on_skip=skip)
    if not files:
        raise _no_images(paths)
    segmentation = run.task == "segmentation"
    table = out if not segmentation else None if stream is not None else \
        out / f"predictions.{'jsonl' if as_json else 'csv'}"
    with PredictionWriter(run.task, run.class_names, table=table, stream=None if table else stream,
                          masks=out if segmentation else None, as_json=as_json,
                          numbered=segmentation and stems_collide(files), palette=run.mask_palette) as writer:
        for names, prediction in run._stream(files, batch_size, skip_bad, skip, progress):
            writer.write(names, prediction)
        if not writer.rows:
            raise _no_images(paths)
    metrics = run.metrics
    return {"run": run.key, "flow": run.flow, "task": run.task, "probe": run.probe, "images": writer.rows,
            "skipped": len(skipped), "skipped_files": skipped[:SKIPPED_LISTED],
            "out": str(out) if out is not None else None, "table": str(table) if table is not None else None,
            "selection": dict(run.selection), "metric": {"name": metrics.get("metric"), "value": metrics.get("value")},
            "head": writer.head, "counts": writer.counts}


def describe(summary: dict[str, Any]) -> str:
    """One line about a `predict_to` summary: images, the run and its selection, skips, where the output went."""
    sel, metric = summary["selection"], summary["metric"]
    return (f"{summary['images']} images with run {summary['run']} (t={sel['timestep']} layer {sel['layer']} "
            f"{sel['site']}, {summary['probe']} {summary['task']} probe, {metric['name']} {metric['value'] or 0:.4f} "
            f"on its test split)" + (f", {summary['skipped']} skipped" if summary["skipped"] else "")
            + f" -> {summary['out'] or 'stdout'}")
