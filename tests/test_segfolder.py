"""Segmentation folders (`ingest.source: segfolder`): the reader, its one-line errors, the ignore index in the
segmentation probes, and one end-to-end run whose predicted mask PNGs reproduce the probe stage's mIoU."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aselect.pipelines.config import IngestConfig
from aselect.pipelines.ingest import MASK_IGNORE, SegFolderReader, ingest_dataset, load_dataset, source_fingerprint
from aselect.pipelines.predict import load_run
from aselect.pipelines.probe import (
    IGNORE_ID,
    array_rows,
    iou_from_confusion,
    patch_fractions,
    predict_token_masks,
    segmentation_probe,
    segmentation_probe_streamed,
)
from aselect.storage.datasets import read_dataset
from aselect.storage.errors import AselectError

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["circle", "rectangle", "triangle"]  # mask id = index + 1; 0 = background
MASK_PALETTE = [v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)]  # RGB triples


# ---------------------------------------------------------------------------------------------
#                                            Helpers
# ---------------------------------------------------------------------------------------------


def save_mask(mask: np.ndarray, path: Path, palette: bool | list[int] = False) -> Path:
    """Class ids (H, W) as an 8-bit grey PNG, or a palette PNG whose indices are the ids (colours: `palette`, or
    MASK_PALETTE for True)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8), mode="L")
    if palette:
        image = image.convert("P")  # no quantisation: "L" -> "P" keeps each value as its index
        image.putpalette(MASK_PALETTE if palette is True else palette)
    image.save(path)
    return path


def save_image(pixels: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def shapes_folder(root: Path, n: int, size: int = 16, seed: int = 0, classes: bool = True) -> Path:
    """`n` images of random skimage shapes with their masks; a few pixels per mask are the ignore index (255)."""
    from skimage.draw import random_shapes

    rng = np.random.default_rng(seed)
    for i in range(n):
        image = np.full((size, size), 255, dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            kind = int(rng.integers(len(KINDS)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer, _ = random_shapes((size, size), max_shapes=1, min_shapes=1, min_size=size // 4,
                                         max_size=size * 3 // 4, shape=KINDS[kind], channel_axis=None,
                                         intensity_range=(0, 200), rng=rng)
            hit = layer != 255
            image[hit], mask[hit] = layer[hit], kind + 1
        mask[rng.random((size, size)) < 0.05] = 255  # unlabelled pixels, as Pascal VOC's object borders
        save_image(image, root / "images" / f"img{i:03d}.png")
        save_mask(mask, root / "masks" / f"img{i:03d}.png", palette=i % 2 == 1)
    if classes:
        (root / "classes.txt").write_text("\n".join(["background", *KINDS]) + "\n")
    return root


def seg_cfg(root: Path, **kw) -> IngestConfig:
    return IngestConfig(source="segfolder", root=root, image_size=kw.pop("image_size", 8), **kw)


def raises_one_line(cfg: IngestConfig, pattern: str) -> str:
    with pytest.raises(AselectError, match=pattern) as info:
        load_dataset(cfg)
    assert "\n" not in str(info.value)
    return str(info.value)


def tiny_pair(root: Path, stem: str, mask: np.ndarray, image_size: tuple[int, int] | None = None,
              suffix: str = ".png") -> None:
    """One grey image (of the mask's size unless given) and its mask."""
    h, w = image_size or mask.shape
    save_image(np.full((h, w), 100, dtype=np.uint8), root / "images" / f"{stem}{suffix}")
    save_mask(mask, root / "masks" / f"{stem}.png")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return shapes_folder(tmp_path / "seg", 12)


# ---------------------------------------------------------------------------------------------
#                                            Reader
# ---------------------------------------------------------------------------------------------


def test_a_segfolder_reads_like_the_bundled_segmentation_sources(folder: Path) -> None:
    ds = load_dataset(seg_cfg(folder, image_size=8))
    n = 12
    assert ds.images.shape == (n, 1, 8, 8) and ds.images.dtype == np.uint8
    assert ds.masks.shape == (n, 8, 8) and ds.masks.dtype == np.uint8
    assert ds.mask_class_names == ds.class_names == ["background", *KINDS]
    assert np.array_equal(np.union1d(ds.train_idx, ds.test_idx), np.arange(n))
    # masks: nearest-neighbour resizing keeps ids (no blends), the ignore index stays the stored ignore value
    for i in range(n):
        with Image.open(folder / "masks" / f"img{i:03d}.png") as img:
            raw = np.asarray(img)
        expected = np.asarray(Image.fromarray(raw).resize((8, 8), Image.Resampling.NEAREST))
        assert np.array_equal(ds.masks[i], expected)
        counts = np.bincount(expected[expected != 255], minlength=4)
        assert ds.labels[i] == counts.argmax()  # the most common non-ignored class
    assert (ds.masks == MASK_IGNORE).any() and set(np.unique(ds.masks)) <= {0, 1, 2, 3, MASK_IGNORE}
    assert MASK_IGNORE == IGNORE_ID  # ingest stores what the probes ignore
    assert ds.mask_palette == MASK_PALETTE  # the palette masks' colours (the grey ones have none)


def test_the_mask_palette_is_the_one_the_palette_masks_share(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    for i in range(4):
        tiny_pair(root, f"s{i}", np.full((4, 4), i % 2, dtype=np.uint8))
    assert load_dataset(seg_cfg(root, image_size=4)).mask_palette is None  # grey masks: no colours to keep
    short = [10, 20, 30, 40, 50, 60]  # two entries; the longer palette below extends it
    save_mask(np.zeros((4, 4)), root / "masks" / "s0.png", palette=short)
    save_mask(np.ones((4, 4)), root / "masks" / "s1.png", palette=short + [70, 80, 90])
    assert load_dataset(seg_cfg(root, image_size=4)).mask_palette == short + [70, 80, 90]
    save_mask(np.zeros((4, 4)), root / "masks" / "s2.png", palette=[1, 2, 3])  # disagrees on id 0's colour
    assert load_dataset(seg_cfg(root, image_size=4)).mask_palette is None


def test_without_classes_txt_names_are_the_ids_seen_and_ignore_index_is_remapped(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    for i in range(6):
        mask = np.full((4, 4), i % 3, dtype=np.uint8)
        mask[0, 0] = 0  # class 0 in every mask
        mask[3, 3] = 7  # the configured ignore value
        tiny_pair(root, f"s{i}", mask)
    ds = load_dataset(seg_cfg(root, image_size=4, ignore_index=7))
    assert ds.mask_class_names == ["class_0", "class_1", "class_2"]
    assert np.all(ds.masks[:, 3, 3] == MASK_IGNORE) and (ds.masks[:, :3] < 3).all()
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2]
    # 255 is not ignored when ignore_index is 7: without classes.txt it is not a class id either
    tiny_pair(root, "s9", np.full((4, 4), 255, dtype=np.uint8))
    raises_one_line(seg_cfg(root, image_size=4, ignore_index=7),
                    rf"^{re.escape(str(root / 'masks' / 's9.png'))}: mask values 255 are not class ids")


def test_streaming_segfolder_ingest_equals_the_in_memory_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 folder: Path) -> None:
    import aselect.pipelines.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "DATASET_CHUNK", 5)
    monkeypatch.setattr("aselect.storage.datasets.DATASET_CHUNK", 5)
    (folder / "images" / "img004.png").write_bytes(b"not a png")
    cfg = seg_cfg(folder, skip_bad=True, limit=8)
    expected = load_dataset(cfg)
    batches = []
    monkeypatch.setattr(ingest_module.DatasetWriter, "append",
                        lambda self, images, masks=None, _orig=ingest_module.DatasetWriter.append:
                        (batches.append((len(images), len(masks))), _orig(self, images, masks))[1])
    ingest_dataset(cfg, tmp_path / "stage")
    stored = read_dataset(tmp_path / "stage")
    assert max(b for b, _ in batches) == 5 and sum(b for b, _ in batches) == 11  # one batch decoded at a time
    assert all(b == m for b, m in batches)
    assert stored.images.shape == (8, 1, 8, 8) and stored.masks.shape == (8, 8, 8)
    for name in ("images", "masks", "labels", "train_idx", "test_idx"):
        assert np.array_equal(getattr(stored, name), getattr(expected, name)), name
    assert stored.mask_class_names == expected.mask_class_names and len(stored.skipped) == 1
    assert stored.mask_palette == expected.mask_palette == MASK_PALETTE


def test_split_files_fix_the_split_and_leave_out_unlisted_images(folder: Path, tmp_path: Path) -> None:
    full = load_dataset(seg_cfg(folder))
    (folder / "splits").mkdir()
    (folder / "splits" / "train.txt").write_text("img000\nimg002\nimg003\n\nimg005\nimg007\n")
    (folder / "splits" / "test.txt").write_text("img001\nimg004\n")
    cfg = seg_cfg(folder)
    for ds in (load_dataset(cfg), ingest_dataset(cfg, tmp_path / "stage")):
        assert len(ds.labels) == 7 and ds.masks.shape[0] == 7
        assert ds.train_idx.tolist() == [0, 2, 3, 5, 6] and ds.test_idx.tolist() == [1, 4]  # rows: 0,1,2,3,4,5,7
    stored = read_dataset(tmp_path / "stage")
    assert np.array_equal(stored.masks, full.masks[[0, 1, 2, 3, 4, 5, 7]])
    # the splits are part of the ingest key's content
    before = source_fingerprint(cfg)
    (folder / "splits" / "test.txt").write_text("img001\nimg006\n")
    assert source_fingerprint(cfg) != before


# ---------------------------------------------------------------------------------------------
#                                        One-line errors
# ---------------------------------------------------------------------------------------------


def test_root_is_required_for_segfolder() -> None:
    with pytest.raises(ValueError, match="root is required when source is 'segfolder'"):
        IngestConfig(source="segfolder")
    with pytest.raises(ValueError, match="ignore_index"):
        IngestConfig(source="segfolder", root="x", ignore_index=256)


def test_layout_errors_name_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(root))}: segfolder root does not exist")
    (root / "images").mkdir(parents=True)
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(root / 'masks'))}: missing masks folder")
    (root / "masks").mkdir()
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(root / 'images'))}: no images")
    with pytest.raises(AselectError, match="missing images folder"):
        source_fingerprint(seg_cfg(tmp_path))  # the key is not built over a broken layout


def test_unpaired_files_fail_or_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    for i in range(4):
        tiny_pair(root, f"s{i}", np.full((4, 4), i % 2, dtype=np.uint8))
    save_image(np.zeros((4, 4), dtype=np.uint8), root / "images" / "lonely.jpg")
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(root / 'images' / 'lonely.jpg'))}: image without a mask")
    (root / "images" / "lonely.jpg").unlink()
    save_mask(np.zeros((4, 4)), root / "masks" / "orphan.png")
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(root / 'masks' / 'orphan.png'))}: mask without an image")
    save_image(np.zeros((4, 4), dtype=np.uint8), root / "images" / "lonely.jpg")
    ds = load_dataset(seg_cfg(root, skip_bad=True))
    assert len(ds.labels) == 4 and len(ds.skipped) == 2
    save_image(np.zeros((4, 4), dtype=np.uint8), root / "images" / "s0.jpg")  # a second image for masks/s0.png
    raises_one_line(seg_cfg(root, skip_bad=True), r"s0\.png: same stem as s0\.jpg")


def test_bad_masks_name_the_file(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    for i in range(4):
        tiny_pair(root, f"s{i}", np.full((6, 6), i % 2, dtype=np.uint8))
    (root / "classes.txt").write_text("background\nthing\n")
    mask = root / "masks" / "s1.png"

    tiny_pair(root, "s1", np.zeros((6, 6), dtype=np.uint8), image_size=(8, 6))
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(mask))}: mask is 6x6 but its image s1\.png is 6x8")
    tiny_pair(root, "s1", np.array([[0, 1, 2], [255, 3, 0], [0, 0, 0]], dtype=np.uint8))
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(mask))}: mask values 2, 3 are not class ids "
                                   rf"\(classes\.txt has 2 classes, ids 0\.\.1\) and not ingest\.ignore_index=255")
    Image.new("RGB", (6, 6)).save(mask)
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(mask))}: mask must be a mode L or P PNG of class ids, got "
                                   r"mode RGB")
    Image.new("L", (6, 6)).save(mask, format="JPEG")
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(mask))}: mask is JPEG, not PNG")
    mask.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(mask))}: cannot read mask")
    ds = load_dataset(seg_cfg(root, skip_bad=True))  # an unreadable pair is skipped and recorded
    assert len(ds.labels) == 3 and ds.skipped[0].startswith(f"{mask}: cannot read mask")
    (root / "images" / "s2.png").write_bytes(b"")
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(root / 'images' / 's2.png'))}: zero-byte image file")


def test_bad_classes_and_splits_files_name_the_line(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    for i in range(4):
        tiny_pair(root, f"s{i}", np.full((4, 4), i % 2, dtype=np.uint8))
    classes = root / "classes.txt"
    classes.write_text("a\n\nb\n")
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(classes))}:2: empty class name")
    classes.write_text("a\nb\na\n")
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(classes))}:3: class name 'a' repeats line 1")
    classes.write_text("a\nb\n")
    splits = root / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("s0\ns1\n")
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(splits / 'test.txt'))}: missing \(train\.txt is there")
    (splits / "test.txt").write_text("s2\nnope\n")
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(splits / 'test.txt'))}:2: no image with stem 'nope' in "
                                   rf"{re.escape(str(root / 'images'))}")
    (splits / "test.txt").write_text("s2\ns1\n")
    raises_one_line(seg_cfg(root), rf"^{re.escape(str(splits / 'test.txt'))}:2: 's1' is in train\.txt too")
    (splits / "test.txt").write_text("s3\n")
    (root / "masks" / "s3.png").write_bytes(b"garbage" * 4)
    raises_one_line(seg_cfg(root, skip_bad=True), rf"^{re.escape(str(splits / 'test.txt'))}: none of its images")


def test_every_pixel_ignored_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    for i in range(4):
        tiny_pair(root, f"s{i}", np.full((4, 4), 255, dtype=np.uint8))
    reader = SegFolderReader(seg_cfg(root))
    with pytest.raises(AselectError, match=r"every mask pixel is ingest\.ignore_index=255"):
        list(reader.batches(8))


# ---------------------------------------------------------------------------------------------
#                                 The ignore index in the probes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
def test_ignored_pixels_are_neither_fitted_nor_scored(streamed: bool) -> None:
    rng = np.random.default_rng(3)
    n, side, d, k = 30, 4, 6, 3
    masks = rng.integers(k, size=(n, side, side)).repeat(2, axis=1).repeat(2, axis=2)  # 8x8, 2x2 patches
    tokens = rng.normal(size=(n, side * side, d)).astype(np.float32)
    tokens[..., 0] += masks[:, ::2, ::2].reshape(n, -1) * 1.5
    ignored = masks.copy()
    ignored[rng.random(masks.shape) < 0.2] = IGNORE_ID
    ignored[:, :2, :2] = IGNORE_ID  # a whole patch per image with no labelled pixel
    # the ignore value adds no class and no count: fractions are those of the labelled pixels
    fractions = patch_fractions(ignored, side, k)
    assert fractions.shape == (n, side * side, k) and np.allclose(fractions[:, 0], 0.0)
    train, test = np.arange(22), np.arange(22, 30)
    if streamed:
        result = segmentation_probe_streamed(array_rows(tokens, 5), side * side, train, ignored[train], test,
                                             ignored[test], k, Cs=(1.0,))
    else:
        result = segmentation_probe(tokens[train], ignored[train], tokens[test], ignored[test], k, Cs=(1.0,))
    pred = predict_token_masks(result.fitted, tokens[test], 8, 8)
    truth = ignored[test]
    labelled = truth != IGNORE_ID
    confusion = np.bincount((truth * k + pred)[labelled], minlength=k * k).reshape(k, k)
    assert iou_from_confusion(confusion)[0] == pytest.approx(result.value, abs=1e-12)
    assert confusion.sum() == labelled.sum() < truth.size
    # the same probe scored on all pixels would differ: ignored pixels really are left out
    everything = np.bincount((masks[test] * k + pred).ravel(), minlength=k * k).reshape(k, k)
    assert everything.sum() > confusion.sum()


def test_the_attentive_segmenter_trains_and_scores_only_labelled_pixels(tmp_path: Path) -> None:
    import torch

    from aselect.pipelines.attentive import HEAD_KEYS, AttentiveHead, attentive_segmenter
    from aselect.pipelines.config import ProbeConfig
    from aselect.pipelines.probe import upsample_bilinear
    from aselect.pipelines.threads import torch_threads

    rng = np.random.default_rng(0)
    n, side, d, k = 48, 4, 8, 3
    patch = rng.integers(k, size=(n, side, side))
    x = (2.0 * rng.normal(size=(k, d)))[patch.reshape(n, -1)] + 0.3 * rng.normal(size=(n, side * side, d))
    masks = patch.repeat(2, axis=1).repeat(2, axis=2)
    masks[rng.random(masks.shape) < 0.2] = IGNORE_ID
    masks[:, :2, :2] = IGNORE_ID  # every image has one patch with no labelled pixel
    cfg = ProbeConfig(kind="attentive", width=16, blocks=1, heads=2, mlp_ratio=2.0, learning_rate=0.003, epochs=3,
                      batch_size=8)
    train, test = np.arange(36), np.arange(36, 48)
    with torch_threads(1):
        result, state, config = attentive_segmenter([x.astype(np.float32)], masks, train, test, k, cfg, tmp_path)
        head = AttentiveHead(**{key: config[key] for key in HEAD_KEYS})
        head.load_state_dict(state)
        head.eval()
        with torch.no_grad():
            logits = head(torch.from_numpy(x[test].astype(np.float32))).double()
    assert all(np.isfinite(loss) for _, loss, _ in result.details["curve"])
    probs = torch.softmax(logits, dim=-1).numpy().reshape(len(test), side, side, k).transpose(0, 3, 1, 2)
    pred = upsample_bilinear(probs, 8, 8).argmax(axis=1)
    truth = masks[test]
    labelled = truth != IGNORE_ID
    confusion = np.bincount((truth * k + pred)[labelled], minlength=k * k).reshape(k, k)
    assert iou_from_confusion(confusion)[0] == pytest.approx(result.value, abs=1e-12)


# ---------------------------------------------------------------------------------------------
#                           End to end: run, predict, mIoU (slow: a run)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_segfolder_run_predicts_masks_whose_miou_is_the_probe_stages(run_cli, tmp_path: Path) -> None:
    root = shapes_folder(tmp_path / "seg", 60, size=16)
    stems = sorted(p.stem for p in (root / "images").iterdir())
    # test = the first 15 stems: dataset rows 0..14, so `aselect predict` on them (sorted, positions 0..14)
    # noises each image as the dump did
    (root / "splits").mkdir()
    (root / "splits" / "test.txt").write_text("\n".join(stems[:15]) + "\n")
    (root / "splits" / "train.txt").write_text("\n".join(stems[15:]) + "\n")
    workdir = tmp_path / "work"
    overrides = ["ingest.source=segfolder", f"ingest.root={root}", "ingest.image_size=16", "backbone.threads=1",
                 "dump.sites=[block]", "calibrate.sites=[attn]", "calibrate.images=32"]
    proc = run_cli("run", "smoke", *[a for o in overrides for a in ("--set", o)], "--workdir", str(workdir),
                   "--json", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["metrics"]["metric"] == "miou"
    run = load_run(workdir)
    assert (run.task, run.class_names, run.metrics["value"]) == ("segmentation", ["background", *KINDS],
                                                                 result["metrics"]["value"])
    data = read_dataset(run.stages["ingest"])
    assert data.test_idx.tolist() == list(range(15)) and (data.masks == MASK_IGNORE).any()
    assert run.mask_palette == data.mask_palette == MASK_PALETTE

    images, out = tmp_path / "test-images", tmp_path / "pred"
    images.mkdir()
    for stem in stems[:15]:
        (images / f"{stem}.png").write_bytes((root / "images" / f"{stem}.png").read_bytes())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pred = subprocess.run([sys.executable, "-m", "aselect", "predict", str(images), "--workdir", str(workdir),
                           "--out", str(out)], cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert pred.returncode == 0, pred.stderr[-3000:]
    rows = list(csv.DictReader(pred.stdout.splitlines()))
    assert [Path(r["path"]).stem for r in rows] == stems[:15]
    k = 1 + len(KINDS)
    confusion = np.zeros((k, k), dtype=np.int64)
    for row in rows:
        with Image.open(row["mask"]) as img:
            assert img.mode == "P" and img.getpalette() == MASK_PALETTE  # coloured as the training masks
            predicted = np.asarray(img).astype(np.int64)
        with Image.open(root / "masks" / f"{Path(row['path']).stem}.png") as img:
            truth = np.asarray(img).astype(np.int64)  # 16 px: the ingested size, no resizing
        labelled = truth != 255
        confusion += np.bincount((truth * k + predicted)[labelled], minlength=k * k).reshape(k, k)
    assert abs(iou_from_confusion(confusion)[0] - result["metrics"]["value"]) < 1e-6
