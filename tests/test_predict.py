"""Using a finished run: the probe stage saves its linear probe (no pickle), `aselect.load_run` finds a run's stages,
recomputes the selected features of images exactly as the run's dump did, and predicts with the saved probe; the
`aselect predict` command does the same for image files.

The fast tests need no run; the slow ones run the smoke config (and a tiny shapes config for segmentation) in-process
against the session's Prefect server, then check that the API reproduces the probe stage's own test metric exactly."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from aselect.pipelines.predict import CONTENT_INDEX, PALETTE, image_files, load_run, read_images, write_mask_png
from aselect.pipelines.probe import (
    LINEAR_META,
    LINEAR_WEIGHTS,
    array_rows,
    classification_probe,
    classification_probe_streamed,
    iou_from_confusion,
    load_linear,
    predict_class_proba,
    predict_classes,
    predict_token_masks,
    save_linear,
    segmentation_probe,
    segmentation_probe_streamed,
)
from aselect.pipelines.threads import torch_threads
from aselect.storage.datasets import read_dataset
from aselect.storage.errors import AselectError
from aselect.storage.features import PairReader

ROOT = Path(__file__).resolve().parent.parent
FIXED_T100 = ["select.policy=fixed", "select.timestep=100", "select.layer=1", "select.site=block"]


def predict_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`aselect predict ...` as a subprocess (it needs no Prefect server), one torch thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "aselect", "predict", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("aselect: error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last


def save_png(image: np.ndarray, path: Path) -> None:
    """A uint8 (C, H, W) image as a PNG (grey or RGB)."""
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(path)


# ---------------------------------------------------------------------------------------------
#                         1. The saved linear probe (fast, no run)
# ---------------------------------------------------------------------------------------------


def _classes_data(k: int, n: int = 160, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(k, size=n)
    x = rng.normal(size=(n, d)).astype(np.float32) + y[:, None].astype(np.float32) * 0.7
    return x, y


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("streamed", [False, True])
def test_a_saved_classification_probe_predicts_bit_for_bit_what_was_scored(tmp_path: Path, k: int,
                                                                           streamed: bool) -> None:
    x, y = _classes_data(k)
    if streamed:
        result = classification_probe_streamed(array_rows(x, 32), np.arange(120), y[:120], np.arange(120, 160),
                                               y[120:], Cs=(0.1, 1.0))
    else:
        result = classification_probe(x[:120], y[:120], x[120:], y[120:], Cs=(0.1, 1.0))
    assert result.fitted is not None and "fitted" not in result.record()
    save_linear(tmp_path, result.fitted, {"task": "classification", "C": result.details["C"]})
    # no pickle: the weights are plain float64 tensors, the rest JSON
    tensors = load_file(str(tmp_path / LINEAR_WEIGHTS))
    assert tensors["coef"].dtype == np.float64 and tensors["classes"].tolist() == list(range(k))
    meta = json.loads((tmp_path / LINEAR_META).read_text())
    assert meta["model"] == ("streamed" if streamed else "sklearn") and meta["in_dim"] == 12
    probe, loaded_meta = load_linear(tmp_path)
    assert loaded_meta == meta
    test = x[120:]
    assert np.array_equal(predict_classes(probe, test), predict_classes(result.fitted, test))
    assert np.array_equal(predict_class_proba(probe, test), predict_class_proba(result.fitted, test))
    assert float(np.mean(predict_classes(probe, test) == y[120:])) == result.value


@pytest.mark.parametrize("streamed", [False, True])
def test_a_saved_segmentation_probe_predicts_the_masks_it_was_scored_on(tmp_path: Path, streamed: bool) -> None:
    rng = np.random.default_rng(1)
    n, side, d, k = 24, 4, 6, 3
    masks = rng.integers(k, size=(n, side, side)).repeat(2, axis=1).repeat(2, axis=2)  # 8x8 masks, 2x2 patches
    tokens = rng.normal(size=(n, side * side, d)).astype(np.float32)
    tokens[..., 0] += masks[:, ::2, ::2].reshape(n, -1) * 1.5  # the class shows in one channel
    train, test = np.arange(18), np.arange(18, 24)
    if streamed:
        result = segmentation_probe_streamed(array_rows(tokens, 5), side * side, train, masks[train], test,
                                             masks[test], k, Cs=(1.0,))
    else:
        result = segmentation_probe(tokens[train], masks[train], tokens[test], masks[test], k, Cs=(0.1, 1.0))
    save_linear(tmp_path, result.fitted, {"task": "segmentation", "mask_size": [8, 8]})
    probe, _ = load_linear(tmp_path)
    pred = predict_token_masks(probe, tokens[test], 8, 8)
    assert np.array_equal(pred, predict_token_masks(result.fitted, tokens[test], 8, 8))
    confusion = np.bincount((masks[test] * k + pred).ravel(), minlength=k * k).reshape(k, k)
    assert iou_from_confusion(confusion)[0] == result.value


def test_an_unreadable_saved_probe_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(AselectError, match="no readable linear probe"):
        load_linear(tmp_path)
    (tmp_path / LINEAR_META).write_text("{}")
    (tmp_path / LINEAR_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(AselectError, match="no readable linear probe"):
        load_linear(tmp_path)


# ---------------------------------------------------------------------------------------------
#                          2. Images, imports, errors (fast, no run)
# ---------------------------------------------------------------------------------------------


def test_read_images_decodes_files_and_folders_as_ingest_does(tmp_path: Path) -> None:
    from aselect.pipelines.ingest import _read_image

    rng = np.random.default_rng(0)
    (tmp_path / "b" / "deep").mkdir(parents=True)
    rgb = rng.integers(0, 256, size=(3, 12, 10), dtype=np.uint8)
    save_png(rgb, tmp_path / "b" / "deep" / "x.png")
    save_png(rng.integers(0, 256, size=(1, 8, 8), dtype=np.uint8), tmp_path / "a.png")
    (tmp_path / "b" / "notes.txt").write_text("not an image")  # in a folder: not an image file, left out
    (tmp_path / "b" / ".hidden.png").write_bytes(b"")
    images, names = read_images([tmp_path / "b", tmp_path / "a.png", tmp_path / "a.png"], size=8, channels=1)
    # sorted by path, duplicates once: an image's position (its noise index) does not depend on the argument order
    assert names == [str(tmp_path / "a.png"), str(tmp_path / "b" / "deep" / "x.png")]
    assert images.shape == (2, 1, 8, 8) and images.dtype == np.uint8
    assert np.array_equal(images[1, 0], _read_image(tmp_path / "b" / "deep" / "x.png", "L", 8))
    rgb_images, _ = read_images([tmp_path], size=8, channels=3)
    assert rgb_images.shape == (2, 3, 8, 8)
    assert image_files([tmp_path / "b"]) == [tmp_path / "b" / "deep" / "x.png"]


def test_read_images_names_the_unreadable_file_in_one_line_or_skips_it(tmp_path: Path) -> None:
    save_png(np.zeros((1, 8, 8), dtype=np.uint8), tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(AselectError) as error:
        read_images([tmp_path], size=8, channels=1)
    assert str(error.value).startswith(f"{tmp_path / 'broken.png'}: cannot read image") and "\n" not in str(error.value)
    skipped: list[str] = []
    images, names = read_images([tmp_path], size=8, channels=1, skip_bad=True, skipped=skipped)
    assert names == [str(tmp_path / "good.png")] and len(images) == 1
    assert len(skipped) == 1 and skipped[0].startswith(str(tmp_path / "broken.png"))
    with pytest.raises(AselectError, match="no such file or directory"):
        read_images([tmp_path / "missing.png"], size=8, channels=1)
    with pytest.raises(AselectError, match="not an image file"):
        (tmp_path / "x.txt").write_text("x")
        read_images([tmp_path / "x.txt"], size=8, channels=1)


def test_import_aselect_stays_light_and_exposes_load_run_lazily() -> None:
    code = ("import sys, aselect; heavy = [m for m in ('prefect', 'torch') if m in sys.modules]; "
            "from aselect.pipelines.predict import load_run; "
            "assert aselect.load_run is load_run and 'load_run' in dir(aselect); "
            "print(heavy, 'prefect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False"]  # no torch or Prefect on `import aselect`, no Prefect after
    with pytest.raises(AttributeError):
        import aselect

        aselect.no_such_name  # noqa: B018


def test_a_workdir_without_a_finished_run_is_a_one_line_error(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    save_png(np.zeros((1, 8, 8), dtype=np.uint8), image)
    assert_one_line_error(predict_cli(str(image), "--workdir", str(tmp_path / "nowhere")), "no such workdir")
    partial = tmp_path / "work" / "probe" / "0123456789abcdef"
    partial.mkdir(parents=True)
    (partial / "manifest.json").write_text(json.dumps({"stage": "probe", "status": "partial"}))
    assert_one_line_error(predict_cli(str(image), "--workdir", str(tmp_path / "work")), "no finished run")
    with pytest.raises(AselectError, match="0123: probe stage 0123456789abcdef is partial"):
        load_run(tmp_path / "work", run="0123")
    with pytest.raises(AselectError, match="no run with that key"):
        load_run(tmp_path / "work", run="fff")


def test_mask_pngs_hold_class_ids_with_a_palette(tmp_path: Path) -> None:
    mask = np.array([[0, 1], [2, 4]], dtype=np.int64)
    write_mask_png(mask, tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P" and np.array_equal(np.asarray(img), mask)
    # the training masks' palette, and where it is shorter than the ids, the default colours after it
    write_mask_png(mask, tmp_path / "own.png", [9, 8, 7, 6, 5, 4])
    with Image.open(tmp_path / "own.png") as img:
        assert np.array_equal(np.asarray(img), mask)
        assert img.getpalette() == [9, 8, 7, 6, 5, 4, *(v for colour in PALETTE[2:5] for v in colour)]


# ---------------------------------------------------------------------------------------------
#                          3. Finished smoke runs (slow: whole pipelines)
# ---------------------------------------------------------------------------------------------


def _pipeline(workdir: Path, config: str = "smoke", *overrides: str) -> dict:
    from aselect.flows.pipeline import aselect_pipeline

    return aselect_pipeline(config=config, overrides=list(overrides), workdir=str(workdir))


def _exhaustive(workdir: Path, *overrides: str) -> dict:
    from aselect.flows.pipeline import aselect_exhaustive

    return aselect_exhaustive(config="smoke", overrides=list(overrides), workdir=str(workdir))


def _probe_stage(result: dict) -> dict:
    return next(s for s in result["stages"] if s["name"] == "probe")


@pytest.fixture(scope="module")
def smoke_runs(prefect_api_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`aselect run smoke` (A-SelecT), the same with a fixed t=100 pair (noise that matters), with a streamed probe,
    `aselect run smoke --exhaustive`, and with `probe.kind=attentive probe.epochs=3` last (the newest run): one
    workdir, one torch thread."""
    workdir = tmp_path_factory.mktemp("predict-work")
    with torch_threads(1):
        runs = {"aselect": _pipeline(workdir, "smoke", "backbone.threads=1"),
                "fixed": _pipeline(workdir, "smoke", "backbone.threads=1", *FIXED_T100),
                "streamed": _pipeline(workdir, "smoke", "backbone.threads=1", *FIXED_T100,
                                      "probe.memory_budget_mb=0"),
                "exhaustive": _exhaustive(workdir, "backbone.threads=1"),
                "attentive": _pipeline(workdir, "smoke", "backbone.threads=1", "probe.kind=attentive",
                                       "probe.epochs=3")}
    return {"workdir": workdir, **{name: _probe_stage(result)["key"] for name, result in runs.items()},
            "results": runs}


def _test_split(run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = read_dataset(run.stages["ingest"])
    return np.asarray(data.images[data.test_idx]), data.test_idx, data.labels[data.test_idx]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["aselect", "fixed"])
def test_features_of_the_runs_test_images_equal_its_dumped_pair_features(smoke_runs: dict, name: str) -> None:
    run = load_run(smoke_runs["workdir"], run=smoke_runs[name])
    assert run.key == smoke_runs[name] and run.probe == "linear" and run.task == "classification"
    same = json.dumps(run.selection, sort_keys=True) == json.dumps(smoke_runs["results"][name]["selection"],
                                                                   sort_keys=True)
    assert same  # as JSON: a fixed pair's score is NaN
    assert set(run.stages) == {"ingest", "backbone", "dump", "select", "probe"}
    images, test_idx, _ = _test_split(run)
    sel = run.selection
    reader = PairReader(run.stages["dump"], sel["timestep"], sel["layer"], sel["site"], spatial=False)
    position = {int(s): i for i, s in enumerate(reader.samples)}
    dumped = reader.read_all()[[position[int(i)] for i in test_idx]]
    features = run.features(images, indices=test_idx)
    assert features.shape == dumped.shape == (len(test_idx), 32) and features.dtype == np.float32
    np.testing.assert_allclose(features, dumped, rtol=1e-5, atol=1e-6)
    # without indices an image is looked up by its pixels: the run's own images get their dataset index's noise
    assert np.array_equal(run.noise_indices(images), test_idx)
    np.testing.assert_allclose(run.features(images), dumped, rtol=1e-5, atol=1e-6)
    # any other image: an index from its pixels alone, above every dataset index, whatever comes with it
    changed = images.copy()
    changed[:, :, 0, 0] ^= 1
    ids = run.noise_indices(changed)
    assert (ids >= CONTENT_INDEX).all() and len(set(ids.tolist())) == len(ids)
    assert np.array_equal(run.noise_indices(changed[::-1]), ids[::-1])
    np.testing.assert_allclose(run.features(changed[3:4]), run.features(changed)[3:4], rtol=1e-5, atol=1e-6)
    if sel["timestep"] > 0:  # the noise follows the index: the dataset's index for a changed image is other noise
        assert not np.allclose(run.features(changed, indices=test_idx), run.features(changed), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["aselect", "fixed", "streamed", "exhaustive"])
def test_top1_through_the_api_equals_the_probe_stage_metric_exactly(smoke_runs: dict, name: str) -> None:
    run = load_run(smoke_runs["workdir"], run=smoke_runs[name][:6])  # a key prefix names the run
    assert run.flow == ("aselect-exhaustive" if name == "exhaustive" else "aselect-pipeline")
    images, test_idx, labels = _test_split(run)
    prediction = run.predict(images, indices=test_idx)
    assert prediction.classes.shape == labels.shape and prediction.probabilities.shape == (len(labels), 10)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(prediction.probabilities.argmax(axis=1), prediction.classes)
    assert float(np.mean(prediction.classes == labels)) == run.metrics["value"] == \
        smoke_runs["results"][name]["metrics"]["value"]
    assert run.metrics["details"].get("streamed", False) == (name == "streamed")


@pytest.mark.slow
def test_cli_predict_on_pngs_equals_the_api_on_the_same_arrays(smoke_runs: dict, tmp_path: Path) -> None:
    run = load_run(smoke_runs["workdir"], run=smoke_runs["fixed"])
    images, test_idx, _ = _test_split(run)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for image, index in zip(images, test_idx, strict=True):
        save_png(image, folder / f"{index:04d}.png")
    read, names = run.read_images([folder])
    assert np.array_equal(read, images)  # sorted by name = dataset order: the PNGs decode to the stored pixels
    expected = run.predict(read)  # implicit indices: each image's dataset index, found by its pixels

    out = tmp_path / "predictions.csv"
    proc = predict_cli(str(folder), "--workdir", str(smoke_runs["workdir"]), "--run", run.key, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(names)} images with run {run.key}" in proc.stderr.strip().splitlines()[-1]
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [r["path"] for r in rows] == names
    assert [r["class"] for r in rows] == [run.class_names[c] for c in expected.classes]
    # the run's own test images, as files: exactly the probe stage's top-1
    labels = [run.class_names[c] for c in run.predict(images, indices=test_idx).classes]
    assert [r["class"] for r in rows] == labels
    truth = np.asarray(_test_split(run)[2])
    assert float(np.mean(np.array([run.class_names.index(r["class"]) for r in rows]) == truth)) == \
        run.metrics["value"]
    np.testing.assert_allclose([[float(r[f"p_{c}"]) for c in run.class_names] for r in rows],
                               expected.probabilities, rtol=1e-6, atol=1e-9)

    lines = predict_cli(str(folder), "--workdir", str(smoke_runs["workdir"]), "--run", run.key, "--json")
    assert lines.returncode == 0, lines.stderr[-3000:]
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [r["class_id"] for r in records] == expected.classes.tolist()
    assert [list(r["probabilities"].values()) for r in records] == expected.probabilities.tolist()


@pytest.mark.slow
def test_cli_predict_bad_inputs_are_one_line_errors(smoke_runs: dict, tmp_path: Path) -> None:
    workdir = str(smoke_runs["workdir"])
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    save_png(np.zeros((1, 8, 8), dtype=np.uint8), good)
    bad.write_bytes(b"GIF89a not really")
    assert_one_line_error(predict_cli(str(good), str(bad), "--workdir", workdir), f"{bad}: cannot read image")
    assert_one_line_error(predict_cli(str(good), "--workdir", workdir, "--run", "ffffffffffff"),
                          "run ffffffffffff: no run with that key")
    skipping = predict_cli(str(good), str(bad), "--workdir", workdir, "--skip-bad")
    assert skipping.returncode == 0, skipping.stderr[-3000:]
    assert f"aselect: skipped {bad}: cannot read image" in skipping.stderr
    assert [r["path"] for r in csv.DictReader(skipping.stdout.splitlines())] == [str(good)]


@pytest.mark.slow
def test_the_attentive_probe_reproduces_its_stage_top1_through_the_api(smoke_runs: dict) -> None:
    run = load_run(smoke_runs["workdir"])  # no key: the newest finished run, the attentive one
    assert run.key == smoke_runs["attentive"] and run.probe == "attentive" and len(run.noise) == 1
    images, test_idx, labels = _test_split(run)
    sel = run.selection
    reader = PairReader(run.stages["dump"], sel["timestep"], sel["layer"], sel["site"], spatial=True)
    position = {int(s): i for i, s in enumerate(reader.samples)}
    features = run.features(images, indices=test_idx)
    assert features.shape == (len(test_idx), 16, 32)
    np.testing.assert_allclose(features, reader.read_all()[[position[int(i)] for i in test_idx]], rtol=1e-3,
                               atol=1e-4)  # float16, as stored
    with torch_threads(1):
        prediction = run.predict(images, indices=test_idx)
    # the stage's top-1: a float32 mean of the hits, as pipelines.attentive computes it
    top1 = float(torch.from_numpy(prediction.classes == labels).float().mean())
    assert top1 == run.metrics["value"] == smoke_runs["results"]["attentive"]["metrics"]["value"]


# ---------------------------------------------------------------------------------------------
#                               4. Segmentation (slow: two tiny runs)
# ---------------------------------------------------------------------------------------------

SHAPES = ["ingest.num_images=60", "ingest.image_size=16", "backbone.variant=DiT-XS/2", "backbone.threads=1",
          "backbone.pretrain.steps=20", "backbone.pretrain.checkpoint_every=10", "backbone.pretrain.batch_size=16",
          "dump.images_per_chunk=64", "dask.workers=1", *FIXED_T100]


@pytest.mark.slow
def test_segmentation_masks_reproduce_the_stage_miou_and_the_cli_writes_them_as_pngs(
        prefect_api_url: str, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    with torch_threads(1):
        linear = _probe_stage(_pipeline(workdir, "shapes", *SHAPES))["key"]
        attentive = _probe_stage(_pipeline(workdir, "shapes", *SHAPES, "probe.kind=attentive", "probe.epochs=3",
                                           "probe.noise_draws=2"))["key"]
        for key, kind, draws in ((linear, "linear", 1), (attentive, "attentive", 2)):
            run = load_run(workdir, run=key)
            assert (run.task, run.probe, len(run.noise), run.mask_size) == ("segmentation", kind, draws, (16, 16))
            data = read_dataset(run.stages["ingest"])
            prediction = run.predict(np.asarray(data.images[data.test_idx]), indices=data.test_idx)
            k = len(run.class_names)
            truth = data.masks[data.test_idx].astype(np.int64)
            confusion = np.bincount((truth * k + prediction.masks).ravel(), minlength=k * k).reshape(k, k)
            assert iou_from_confusion(confusion)[0] == run.metrics["value"], kind

    folder, masks = tmp_path / "pngs", tmp_path / "masks"
    folder.mkdir()
    run = load_run(workdir, run=linear)
    data = read_dataset(run.stages["ingest"])
    for index in data.test_idx:
        save_png(np.asarray(data.images[index]), folder / f"{index:04d}.png")
    assert_one_line_error(predict_cli(str(folder), "--workdir", str(workdir), "--run", linear), "--out")
    proc = predict_cli(str(folder), "--workdir", str(workdir), "--run", linear, "--out", str(masks))
    assert proc.returncode == 0, proc.stderr[-3000:]
    images, names = run.read_images([folder])
    expected = run.predict(images)
    rows = list(csv.DictReader(proc.stdout.splitlines()))
    assert [r["path"] for r in rows] == names
    for row, mask in zip(rows, expected.masks, strict=True):
        with Image.open(row["mask"]) as img:
            assert img.mode == "P" and np.array_equal(np.asarray(img), mask)


# ---------------------------------------------------------------------------------------------
#                    5. Streaming: batches and the output written as it goes
# ---------------------------------------------------------------------------------------------


def _classified(n: int, k: int = 3, seed: int = 0):
    from aselect.pipelines.predict import Prediction

    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(k), size=n)
    return Prediction("classification", [f"c{i}" for i in range(k)], classes=probabilities.argmax(axis=1),
                      probabilities=probabilities)


def test_the_prediction_table_is_replaced_whole_or_left_as_it_was(tmp_path: Path) -> None:
    from aselect.pipelines.predict import PredictionWriter

    out = tmp_path / "predictions.csv"
    out.write_text("an earlier table\n")
    first, second = _classified(4), _classified(3, seed=1)
    with pytest.raises(RuntimeError), PredictionWriter("classification", first.class_names, table=out) as writer:
        writer.write([f"a{i}.png" for i in range(4)], first)
        raise RuntimeError("stopped between batches")
    assert out.read_text() == "an earlier table\n" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]

    with PredictionWriter("classification", first.class_names, table=out, keep=5) as writer:
        writer.write([f"a{i}.png" for i in range(4)], first)
        assert out.read_text() == "an earlier table\n"  # rows go to the temporary file until the end
        writer.write([f"b{i}.png" for i in range(3)], second)
    rows = list(csv.DictReader(out.read_text().splitlines()))
    classes = np.concatenate([first.classes, second.classes])
    assert [r["path"] for r in rows] == [*(f"a{i}.png" for i in range(4)), *(f"b{i}.png" for i in range(3))]
    assert [r["class"] for r in rows] == [f"c{c}" for c in classes]
    np.testing.assert_allclose([[float(r[f"p_c{i}"]) for i in range(3)] for r in rows],
                               np.concatenate([first.probabilities, second.probabilities]), rtol=1e-7)
    assert writer.rows == 7 and len(writer.head) == 5 and sum(writer.counts.values()) == 7
    assert writer.counts == {f"c{c}": int(np.sum(classes == c)) for c in set(classes.tolist())}


def test_a_killed_prediction_leaves_the_earlier_table(tmp_path: Path) -> None:
    out = tmp_path / "predictions.jsonl"
    out.write_text("an earlier table\n")
    code = ("import os, signal; import numpy as np; from pathlib import Path; "
            "from aselect.pipelines.predict import Prediction, PredictionWriter; "
            f"w = PredictionWriter('classification', ['c0', 'c1'], table=Path({str(out)!r}), as_json=True); "
            "w.write(['a.png', 'b.png'], Prediction('classification', ['c0', 'c1'], classes=np.array([0, 1]), "
            "probabilities=np.array([[0.9, 0.1], [0.2, 0.8]]))); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert out.read_text() == "an earlier table\n"
    left = [p for p in tmp_path.iterdir() if p != out]
    assert len(left) == 1 and left[0].name.startswith(f".{out.name}.")  # the unfinished rows, hidden beside it
    assert [json.loads(line)["path"] for line in left[0].read_text().splitlines()] == ["a.png", "b.png"]


def test_masks_are_written_per_batch_numbered_across_batches_when_stems_collide(tmp_path: Path) -> None:
    from aselect.pipelines.predict import Prediction, PredictionWriter, mask_names

    paths = ["x/a.png", "y/a.png", "y/b.png"]
    masks = np.random.default_rng(0).integers(3, size=(3, 4, 4))
    out, stream = tmp_path / "masks", io.StringIO()
    with PredictionWriter("segmentation", ["bg", "p", "q"], stream=stream, masks=out, as_json=True,
                          numbered=True) as writer:
        for rows in (slice(0, 2), slice(2, 3)):
            writer.write(paths[rows], Prediction("segmentation", ["bg", "p", "q"], masks=masks[rows]))
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [Path(r["mask"]).name for r in records] == mask_names(paths) == ["00000-a.png", "00001-a.png",
                                                                             "00002-b.png"]
    for record, mask in zip(records, masks, strict=True):
        with Image.open(record["mask"]) as img:
            assert np.array_equal(np.asarray(img), mask)
        assert list(record["fractions"].values()) == (np.bincount(mask.ravel(), minlength=3) / 16).tolist()
    assert sorted(p.name for p in out.iterdir()) == mask_names(paths)  # no temporary files left


def test_image_batches_hold_batch_size_readable_images_and_count_skips(tmp_path: Path) -> None:
    from aselect.pipelines.predict import image_batches

    for i in range(5):
        save_png(np.full((1, 8, 8), i, dtype=np.uint8), tmp_path / f"{i}.png")
    (tmp_path / "2b.png").write_bytes(b"broken")
    skipped: list[str] = []
    files = image_files([tmp_path])
    batches = list(image_batches(files, 8, 1, 2, skip_bad=True, on_skip=skipped.append))
    assert [(len(images), done) for images, _, done in batches] == [(2, 2), (2, 5), (1, 6)]
    assert [int(images[k, 0, 0, 0]) for images, _, _ in batches for k in range(len(images))] == [0, 1, 2, 3, 4]
    assert len(skipped) == 1 and skipped[0].startswith(str(tmp_path / "2b.png"))
    with pytest.raises(AselectError, match="2b.png: cannot read image"):
        list(image_batches(files, 8, 1, 2))


@pytest.mark.slow
def test_predict_files_in_batches_equals_one_predict_call_bit_for_bit(smoke_runs: dict, tmp_path: Path) -> None:
    from aselect.pipelines.predict import predict_to

    run = load_run(smoke_runs["workdir"], run=smoke_runs["fixed"])  # t=100: each image's noise index matters
    data = read_dataset(run.stages["ingest"])
    folder = tmp_path / "pngs"
    folder.mkdir()
    for index in range(140):
        save_png(np.asarray(data.images[index]), folder / f"{index:04d}.png")
    (folder / "0070-broken.png").write_bytes(b"broken")  # sorts between two batches' images
    images, names = run.read_images([folder], skip_bad=True, skipped=[])
    expected = run.predict(images)
    skipped: list[str] = []
    progress: list[tuple[int, int]] = []
    batches = list(run.predict_files([folder], batch_size=run.noise[0].batch, skip_bad=True,
                                     on_skip=skipped.append, progress=lambda done, total: progress.append((done,
                                                                                                           total))))
    assert [len(b[0]) for b in batches] == [64, 64, 12] and [n for b in batches for n in b[0]] == names
    assert np.array_equal(np.concatenate([b[1].classes for b in batches]), expected.classes)
    assert np.array_equal(np.concatenate([b[1].probabilities for b in batches]), expected.probabilities)
    assert progress[0] == (0, 141) and progress[-1] == (141, 141) and progress == sorted(progress)
    assert len(skipped) == 1 and "0070-broken.png: cannot read image" in skipped[0]

    stream = io.StringIO()
    summary = predict_to(run, [folder], None, as_json=True, skip_bad=True, stream=stream, batch_size=64)
    assert [json.loads(line)["class_id"] for line in stream.getvalue().splitlines()] == expected.classes.tolist()
    assert (summary["images"], summary["skipped"], summary["run"]) == (140, 1, run.key)
    assert summary["counts"] == {run.class_names[c]: int(np.sum(expected.classes == c))
                                 for c in set(expected.classes.tolist())}
    with pytest.raises(AselectError, match="no readable images"):
        list(run.predict_files([folder / "0070-broken.png"], skip_bad=True, on_skip=skipped.append))


@pytest.mark.slow
def test_a_run_on_a_loaded_backbone_refuses_to_predict_once_its_source_files_change(smoke_runs: dict,
                                                                                    tmp_path: Path) -> None:
    source = tmp_path / "model"
    shutil.copytree(load_run(smoke_runs["workdir"], run=smoke_runs["fixed"]).model_path, source)
    workdir = tmp_path / "w"
    with torch_threads(1):
        _pipeline(workdir, "smoke", "backbone.kind=load", f"backbone.path={source}", *FIXED_T100)
    assert load_run(workdir).model_path == str(source)
    weights = next(source.rglob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # replaced by a file of the same size
    with pytest.raises(AselectError) as excinfo:
        load_run(workdir)
    assert str(excinfo.value).startswith(f"{source}: the backbone's files changed since backbone stage")
    shutil.rmtree(source)
    with pytest.raises(AselectError) as excinfo:
        load_run(workdir)
    assert str(excinfo.value).startswith(f"{source}: missing; backbone stage") and "\n" not in str(excinfo.value)
