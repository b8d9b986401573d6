"""The attentive probe (pipelines/attentive.py): it reads where a pattern sits among the tokens (which a linear probe
on pooled features cannot), segments, reruns and resumes bit-identically, cycles the noise draws, and round-trips."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

import aselect.pipelines.attentive as attentive
from aselect.pipelines.attentive import (
    AttentiveHead,
    attentive_classifier,
    attentive_segmenter,
    load_head,
    save_head,
)
from aselect.pipelines.config import ProbeConfig
from aselect.pipelines.probe import classification_probe
from aselect.pipelines.threads import torch_threads
from aselect.storage.errors import AselectError

CLASSES = 4


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as a caller on shared cores sets it (two spin on a busy 2-core host); restored after."""
    with torch_threads(1):
        yield


def position_task(n: int = 240, tokens: int = 8, dim: int = 16, seed: int = 0, noise: float = 0.2,
                  amp: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Token features whose class is only WHERE a bump sits: every token carries its (fixed) position code plus
    noise, and one token, at a class-dependent position, also the same bump vector. The mean over tokens is the
    same for every class, so mean pooling removes all class information."""
    rng = np.random.default_rng(seed)
    position = rng.normal(size=(tokens, dim))
    bump = rng.normal(size=dim)
    bump *= amp / np.linalg.norm(bump)
    where = np.linspace(0, tokens - 1, CLASSES).round().astype(int)
    labels = rng.permutation(np.arange(n) % CLASSES)
    x = position[None] + noise * rng.normal(size=(n, tokens, dim))
    x[np.arange(n), where[labels]] += bump
    return x.astype(np.float32), labels


def patch_task(n: int = 96, side: int = 4, dim: int = 8, classes: int = 3, pixels: int = 4, seed: int = 0,
               noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Patch-aligned masks (n, side * pixels, side * pixels); a token = its class's code + a position code + noise."""
    rng = np.random.default_rng(seed)
    code, position = 2.0 * rng.normal(size=(classes, dim)), rng.normal(size=(side * side, dim))
    patch = rng.integers(classes, size=(n, side, side))
    masks = patch.repeat(pixels, axis=1).repeat(pixels, axis=2)
    x = code[patch.reshape(n, -1)] + position[None] + noise * rng.normal(size=(n, side * side, dim))
    return x.astype(np.float32), masks


def probe_cfg(**overrides) -> ProbeConfig:
    values = dict(kind="attentive", width=32, blocks=2, heads=2, mlp_ratio=2.0, learning_rate=0.003, epochs=20,
                  batch_size=16)
    return ProbeConfig(**{**values, **overrides})


SPLIT = (np.arange(160), np.arange(160, 240))


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
#                                         Quality
# ---------------------------------------------------------------------------------------------


def test_attentive_head_reads_token_positions_that_pooling_loses(tmp_path, caplog):
    x, y = position_task()
    train, test = SPLIT
    calls = []
    with caplog.at_level(logging.INFO, logger="aselect.probe"):
        result, state, config = attentive_classifier([x], y, train, test, probe_cfg(), tmp_path,
                                                     progress=lambda e, total: calls.append((e, total)))
    pooled = classification_probe(x[train].mean(axis=1), y[train], x[test].mean(axis=1), y[test])
    assert result.metric == "top1" and result.value >= 0.9
    assert pooled.value <= 0.4  # chance is 0.25
    details = result.details
    assert details["epochs"] == 20 and len(details["curve"]) == 20 and details["draws"] == 1
    assert [row[0] for row in details["curve"]] == list(range(1, 21))
    best = max(range(20), key=lambda i: (details["curve"][i][2], -i))
    assert details["best_epoch"] == best + 1  # the first epoch with the best validation top-1
    assert details["fits"] == 1 and details["evaluation"] == "logits averaged over 1 draws"
    assert details["parameters"] == sum(p.numel() for p in AttentiveHead(16, 4, 32, 2, 2, 2.0).parameters())
    assert details["tokens_per_second"] > 0
    assert calls == [(e, 20) for e in range(1, 21)]
    assert not (tmp_path / "checkpoints").exists()  # removed once training has finished
    # the standardisation: per channel, over the tokens of draw 0's fit rows (train minus the validation split)
    fit_rows = train[attentive.split_indices(len(train), 0.2, 0, stratify=y[train])[0]]
    fit = x[fit_rows].reshape(-1, 16).astype(np.float64)
    np.testing.assert_allclose(state["feature_mean"].numpy(), fit.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["feature_std"].numpy(), fit.std(axis=0), rtol=1e-5)
    assert config == {"in_dim": 16, "classes": 4, "width": 32, "blocks": 2, "heads": 2, "mlp_ratio": 2.0,
                      "cls_token": True, "task": "classification", "tokens": 8, "best_epoch": details["best_epoch"]}
    epoch_lines = [r.getMessage() for r in caplog.records if "tokens/s" in r.getMessage()]
    assert len(epoch_lines) == 10 and "epoch 20/20" in epoch_lines[-1]  # one line every 10% of the epochs


def test_segmentation_reaches_high_miou(tmp_path):
    x, masks = patch_task()
    cfg = probe_cfg(blocks=1, epochs=10, batch_size=8)
    result, state, config = attentive_segmenter([x], masks, np.arange(64), np.arange(64, 96), 3, cfg, tmp_path)
    assert result.metric == "miou" and result.value >= 0.9
    assert result.details["pixel_accuracy"] >= 0.95
    assert set(result.details["per_class_iou"]) == {"0", "1", "2"}
    assert config["cls_token"] is False and config["task"] == "segmentation"
    head = AttentiveHead(**{k: config[k] for k in attentive.HEAD_KEYS})
    head.load_state_dict(state)
    assert head(torch.from_numpy(x[:2])).shape == (2, 16, 3)  # per-token logits
    assert not (tmp_path / "checkpoints").exists()


def test_segmentation_batches_of_only_ignored_pixels_take_no_step(tmp_path):
    x, masks = patch_task(n=48)
    masks[::3] = attentive.IGNORE_ID  # every third image (train, validation and test) has no labelled pixel
    cfg = probe_cfg(blocks=1, epochs=3, batch_size=1)  # one image a batch: each ignored image is a whole batch
    first = attentive_segmenter([x], masks, np.arange(32), np.arange(32, 48), 3, cfg, tmp_path / "a")
    second = attentive_segmenter([x], masks, np.arange(32), np.arange(32, 48), 3, cfg, tmp_path / "b")
    curve = first[0].details["curve"]
    assert len(curve) == 3 and np.isfinite(np.array(curve, dtype=np.float64)).all()
    assert all(torch.isfinite(tensor).all() for tensor in first[1].values())
    assert np.isfinite(first[0].value) and first[0].value >= 0.5
    assert np.isfinite(first[0].details["pixel_accuracy"])
    assert_same_state(first[1], second[1])
    assert curve == second[0].details["curve"] and first[0].value == second[0].value


# ---------------------------------------------------------------------------------------------
#                                  Determinism and resuming
# ---------------------------------------------------------------------------------------------


def test_reruns_are_bit_identical(tmp_path):
    x, y = position_task()
    cfg = probe_cfg(epochs=3)
    first = attentive_classifier([x], y, *SPLIT, cfg, tmp_path / "a")
    second = attentive_classifier([x], y, *SPLIT, cfg, tmp_path / "b")
    assert_same_state(first[1], second[1])
    assert first[0].details["curve"] == second[0].details["curve"] and first[0].value == second[0].value


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, epochs: int) -> list[str]:
    """Make the `epochs`-th "probe-epoch" failpoint raise (as a kill there would stop the run); the hits."""
    hits = []

    def failpoint(name: str) -> None:
        hits.append(name)
        if name == "probe-epoch" and len(hits) == epochs:
            raise Interrupted(name)

    monkeypatch.setattr(attentive, "failpoint", failpoint)
    return hits


@pytest.mark.parametrize("segment", [False, True], ids=["classification", "segmentation"])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch, segment):
    if segment:
        x, targets = patch_task(n=48)
        cfg = probe_cfg(blocks=1, epochs=3, batch_size=8)

        def run(work):
            return attentive_segmenter([x], targets, np.arange(32), np.arange(32, 48), 3, cfg, work)
    else:
        x, targets = position_task()
        cfg = probe_cfg(epochs=3)

        def run(work):
            return attentive_classifier([x], targets, *SPLIT, cfg, work)

    uninterrupted = run(tmp_path / "a")
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupted):
        run(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["epoch-0001.pt"]
    monkeypatch.undo()
    resumed = run(tmp_path / "b")
    assert resumed[0].details["resumed_from"] == 1
    assert_same_state(uninterrupted[1], resumed[1])
    assert uninterrupted[0].details["curve"] == resumed[0].details["curve"]
    assert uninterrupted[0].value == resumed[0].value and uninterrupted[2] == resumed[2]
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_checkpoints_keep_the_newest_two_and_a_run_killed_after_its_last_epoch_only_evaluates(tmp_path,
                                                                                              monkeypatch):
    x, y = position_task()
    cfg = probe_cfg(epochs=3)
    reference = attentive_classifier([x], y, *SPLIT, cfg, tmp_path / "a")
    interrupt_after(monkeypatch, 3)
    with pytest.raises(Interrupted):
        attentive_classifier([x], y, *SPLIT, cfg, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["epoch-0002.pt", "epoch-0003.pt"]
    hits = interrupt_after(monkeypatch, 99)
    resumed = attentive_classifier([x], y, *SPLIT, cfg, tmp_path / "b")
    assert hits == [] and resumed[0].details["resumed_from"] == 3  # nothing trained again
    assert_same_state(reference[1], resumed[1])


def test_checkpoint_with_another_fingerprint_is_ignored(tmp_path, monkeypatch, caplog):
    x, y = position_task()
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupted):  # leaves epoch-0001.pt of a run with another learning rate
        attentive_classifier([x], y, *SPLIT, probe_cfg(epochs=3, learning_rate=0.01), tmp_path / "b")
    monkeypatch.undo()
    fresh = attentive_classifier([x], y, *SPLIT, probe_cfg(epochs=3), tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="aselect.probe"):
        other = attentive_classifier([x], y, *SPLIT, probe_cfg(epochs=3), tmp_path / "b")
    assert other[0].details["resumed_from"] == 0
    assert any("different config" in r.getMessage() for r in caplog.records)
    assert_same_state(fresh[1], other[1])

    # ... and so is one written for other data (another label), or for other features
    for labels, features in ((np.where(np.arange(len(y)) == 0, (y + 1) % CLASSES, y), x), (y, x + 1e-3)):
        interrupt_after(monkeypatch, 1)
        with pytest.raises(Interrupted):
            attentive_classifier([x], y, *SPLIT, probe_cfg(epochs=3), tmp_path / "c")
        monkeypatch.undo()
        moved = attentive_classifier([features], labels, *SPLIT, probe_cfg(epochs=3), tmp_path / "c")
        assert moved[0].details["resumed_from"] == 0


# ---------------------------------------------------------------------------------------------
#                                        Noise draws
# ---------------------------------------------------------------------------------------------


def test_epoch_e_trains_on_draw_e_mod_k_and_evaluation_averages_all_draws(tmp_path, monkeypatch):
    x, y = position_task()
    other = position_task(seed=0, noise=0.2)[0] + 0.3 * np.random.default_rng(7).normal(size=x.shape)
    draws = [x, other.astype(np.float32)]
    used = []
    batch = attentive._batch

    def spy(draw, rows):
        used.append((next(i for i, d in enumerate(draws) if d is draw), torch.is_grad_enabled()))
        return batch(draw, rows)

    monkeypatch.setattr(attentive, "_batch", spy)
    two = attentive_classifier(draws, y, *SPLIT, probe_cfg(epochs=3, noise_draws=2), tmp_path / "two")
    steps = 8  # 128 fit rows, batches of 16
    trained = [draw for draw, grad in used if grad]
    assert trained == [0] * steps + [1] * steps + [0] * steps
    assert {draw for draw, grad in used if not grad} == {0, 1}  # validation and test see both draws
    assert two[0].details["draws"] == 2 and two[0].details["evaluation"] == "logits averaged over 2 draws"
    monkeypatch.undo()

    one = attentive_classifier([x], y, *SPLIT, probe_cfg(epochs=3, noise_draws=1), tmp_path / "one")
    curve_one, curve_two = one[0].details["curve"], two[0].details["curve"]
    assert curve_one[0][1] == curve_two[0][1]  # epoch 1: the same draw 0, the same init and batches
    assert curve_one[1][1] != curve_two[1][1]  # epoch 2: draw 1


# ---------------------------------------------------------------------------------------------
#                                    Saving and loading
# ---------------------------------------------------------------------------------------------


def test_save_and_load_head_round_trip(tmp_path):
    x, y = position_task()
    _, state, config = attentive_classifier([x], y, *SPLIT, probe_cfg(epochs=2), tmp_path / "work")
    save_head(tmp_path / "head", state, config)
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["head.json", "head.safetensors"]
    head, loaded = load_head(tmp_path / "head")
    assert loaded == config and not head.training
    reference = AttentiveHead(**{k: config[k] for k in attentive.HEAD_KEYS}).eval()
    reference.load_state_dict(state)
    tokens = torch.from_numpy(x[SPLIT[1]].astype(np.float16))  # raw float16 features: the head standardises
    with torch.no_grad():
        assert torch.equal(head(tokens), reference(tokens))
    assert_same_state(head.state_dict(), state)


def test_load_head_of_a_missing_directory_is_one_line(tmp_path):
    with pytest.raises(AselectError, match="no readable attentive head") as info:
        load_head(tmp_path / "nowhere")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
#                                          Errors
# ---------------------------------------------------------------------------------------------


def test_head_shapes_and_width_must_divide_by_heads():
    tokens = torch.randn(3, 5, 6)
    assert AttentiveHead(6, 4, 16, 1, 4, 2.0)(tokens).shape == (3, 4)
    assert AttentiveHead(6, 4, 16, 1, 4, 2.0, cls_token=False)(tokens).shape == (3, 5, 4)
    with pytest.raises(AselectError, match="width 18 is not divisible by heads 4"):
        AttentiveHead(6, 4, 18, 1, 4, 2.0)


def _errors():
    x, y = position_task(n=40)
    train, test = np.arange(30), np.arange(30, 40)
    masks = np.zeros((40, 8, 8), dtype=np.int64)
    seg_x = np.zeros((40, 16, 4), dtype=np.float32)
    unchecked = ProbeConfig.model_construct(**{**probe_cfg().model_dump(), "width": 30, "heads": 4})
    return {
        "draw shapes": (lambda w: attentive_classifier([x, x[:, :4]], y, train, test, probe_cfg(), w),
                        "draws of different shapes"),
        "no draws": (lambda w: attentive_classifier([], y, train, test, probe_cfg(), w), "no feature draws"),
        "labels length": (lambda w: attentive_classifier([x], y[:-1], train, test, probe_cfg(), w),
                          "40 feature rows but labels of shape (39,)"),
        "float labels": (lambda w: attentive_classifier([x], y.astype(float), train, test, probe_cfg(), w),
                         "labels must be class ids"),
        "rows out of range": (lambda w: attentive_classifier([x], y, train, test + 5, probe_cfg(), w),
                              "test positions must be in [0, 40)"),
        "integer features": (lambda w: attentive_classifier([x.astype(np.int32)], y, train, test, probe_cfg(), w),
                             "features must be floating point"),
        "one class": (lambda w: attentive_classifier([x], np.zeros(40, dtype=int), train, test, probe_cfg(), w),
                      "at least two classes"),
        "width vs heads": (lambda w: attentive_classifier([x], y, train, test, unchecked, w),
                           "width 30 is not divisible by heads 4"),
        "nan features": (lambda w: attentive_classifier([np.full_like(x, np.nan)], y, train, test, probe_cfg(), w),
                         "contain NaN or inf"),
        "mask values": (lambda w: attentive_segmenter([seg_x], masks + 3, train, test, 3, probe_cfg(), w),
                        "mask values must be class ids in [0, 3)"),
        "mask count": (lambda w: attentive_segmenter([seg_x], masks[:-1], train, test, 3, probe_cfg(), w),
                       "expected masks"),
        "all ignored": (lambda w: attentive_segmenter([seg_x], masks + 255, train, test, 3, probe_cfg(), w),
                        "every pixel of the 24 training masks is ignored (255)"),
        "mask grid": (lambda w: attentive_segmenter([seg_x], np.zeros((40, 6, 6), int), train, test, 3, probe_cfg(),
                                                    w), "not a multiple of the 4x4 token grid"),
        "token grid": (lambda w: attentive_segmenter([x], masks, train, test, 3, probe_cfg(), w),
                       "do not form a square grid"),
    }


@pytest.mark.parametrize("case", list(_errors()))
def test_bad_inputs_raise_one_line_errors(tmp_path, case):
    call, message = _errors()[case]
    with pytest.raises(AselectError, match=re.escape(message)) as info:
        call(tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists()
