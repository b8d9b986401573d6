"""Scoring (HFR, probe, fewshot, probe_seg), downstream probes and selection policies, on small synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aselect.pipelines.probe import (
    IGNORE_ID,
    array_rows,
    bilinear_matrix,
    classification_probe,
    classification_probe_streamed,
    fit_streamed_logistic,
    iou_from_confusion,
    mask_class_count,
    patch_fractions,
    segmentation_probe,
    segmentation_probe_streamed,
    upsample_bilinear,
)
from aselect.pipelines.scoring import (
    FLAT_POWER,
    SCORERS,
    get_scorer,
    hfr_masks,
    hfr_of_attention,
    hfr_of_tokens,
    high_frequency_mask,
    high_frequency_ratio,
    radial_frequency,
    score_pair,
)
from aselect.pipelines.select import middle_third, select
from aselect.storage.errors import AselectError


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def fraction_above(h: int, w: int, cutoff: float) -> float:
    """Share of non-DC frequency bins with rho > cutoff: the HFR of a flat (white) spectrum."""
    rho = radial_frequency(h, w)
    return float((rho > cutoff).sum() / (rho > 0).sum())


# ---------------------------------------------------------------------------------------------
#                                         HFR
# ---------------------------------------------------------------------------------------------

Y, X = np.mgrid[:16, :16]


def test_hfr_of_simple_maps():
    assert high_frequency_ratio(np.full((16, 16), 3.0)) == 0.0
    assert high_frequency_ratio(np.full((16, 16), 3.0), exclude_dc=False) == 0.0
    assert high_frequency_ratio(np.zeros((16, 16))) == 0.0
    assert high_frequency_ratio((-1.0) ** (X + Y)) == pytest.approx(1.0)  # checkerboard: rho = sqrt(2)
    assert high_frequency_ratio(np.cos(2 * np.pi * X / 16) + 5.0) == pytest.approx(0.0, abs=1e-12)  # rho = 0.125
    # 6 cycles over 16 samples: f = 0.375 cycles/sample, rho = 0.75 -> above a 0.5 cutoff, below 0.8
    stripes = np.cos(2 * np.pi * 6 * Y / 16)
    assert high_frequency_ratio(stripes, cutoff=0.5) == pytest.approx(1.0)
    assert high_frequency_ratio(stripes, cutoff=0.8) == pytest.approx(0.0, abs=1e-12)


def test_hfr_dc_handling_and_mean_over_leading_dims():
    checker = (-1.0) ** (X + Y)
    # an offset adds DC power only: excluded by default, in the denominator otherwise
    assert high_frequency_ratio(checker + 1.0) == pytest.approx(1.0)
    assert high_frequency_ratio(checker + 1.0, exclude_dc=False) == pytest.approx(0.5)
    stack = np.stack([np.ones((16, 16)), checker])[None]  # (1, 2, 16, 16): mean of 0 and 1
    assert high_frequency_ratio(stack) == pytest.approx(0.5)


def test_hfr_of_white_noise_matches_share_of_high_bins():
    noise = np.random.default_rng(0).normal(size=(64, 32, 32))
    for cutoff in (0.25, 0.5, 0.75, 1.0):
        assert high_frequency_ratio(noise, cutoff=cutoff) == pytest.approx(fraction_above(32, 32, cutoff), abs=0.05)


def test_hfr_decreases_with_cutoff():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(8, 16, 16)).cumsum(axis=1) + rng.normal(size=(8, 16, 16))  # mixed spectrum
    values = [high_frequency_ratio(maps, cutoff=c) for c in np.linspace(0.0, 1.5, 16)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[0] == pytest.approx(1.0) and values[-1] == 0.0


def test_hfr_of_tokens_reshapes_row_major_per_channel():
    rng = np.random.default_rng(2)
    n, side, D = 3, 8, 5
    y, x = np.mgrid[:side, :side]
    maps = rng.normal(size=(n, D, side, side))  # (sample, channel, row, col)
    maps[:, 0] = (-1.0) ** (x + y)  # channel 0: HFR 1
    maps[:, 1] = np.cos(2 * np.pi * x / side)  # channel 1: HFR 0
    tokens = maps.transpose(0, 2, 3, 1).reshape(n, side * side, D)  # token index = row * side + col
    assert hfr_of_tokens(tokens) == pytest.approx(high_frequency_ratio(maps), abs=1e-12)
    assert hfr_of_tokens(tokens.astype(np.float16)) == pytest.approx(high_frequency_ratio(maps), abs=1e-3)
    assert hfr_of_tokens(tokens[:, :, :2]) == pytest.approx(0.5)
    assert score_pair("hfr", tokens, kind="block") == hfr_of_tokens(tokens)
    with pytest.raises(AselectError) as excinfo:
        hfr_of_tokens(np.zeros((2, 15, 4)))
    assert "15 tokens" in one_line_error(excinfo)


def test_hfr_of_attention():
    n, T = 2, 64
    uniform = np.full((n, T, T), 1.0 / T, dtype=np.float16)
    assert hfr_of_attention(uniform) == 0.0
    # each query attends to itself only: a delta over the key grid has a flat spectrum
    identity = np.broadcast_to(np.eye(T), (n, T, T))
    assert hfr_of_attention(identity) == pytest.approx(fraction_above(8, 8, 0.5))
    assert score_pair("hfr", identity, kind="attn_map") == hfr_of_attention(identity)
    with pytest.raises(AselectError) as excinfo:  # (n, T, T) could also be tokens with D == T
        score_pair("hfr", identity)
    assert "kind=" in one_line_error(excinfo)


def test_axis_band_counts_a_frequency_low_when_both_axes_are_below_the_cutoff() -> None:
    # 20 x 20 maps: f = k / 20 cycles per sample, normalised k / 10
    y, x = np.mgrid[:20, :20]
    horizontal = np.cos(2 * np.pi * 3 * x / 20)  # (0, 0.3): high in both bands at cutoff 0.25
    diagonal = 2.0 * np.cos(2 * np.pi * 2 * (x + y) / 20)  # (0.2, 0.2), radial 0.283: high only for radial
    maps = horizontal + diagonal + 1.0
    # power of a cos of amplitude a: two peaks of (a N^2 / 2)^2, i.e. a^2 N^4 / 2; the offset's DC is N^4.
    # In units of N^4: horizontal 1/2, diagonal 4/2 = 2, DC 1.
    assert high_frequency_ratio(maps, cutoff=0.25) == pytest.approx(1.0)
    assert high_frequency_ratio(maps, cutoff=0.25, band="axis") == pytest.approx(0.5 / 2.5)
    assert high_frequency_ratio(maps, cutoff=0.25, exclude_dc=False) == pytest.approx(2.5 / 3.5)
    assert high_frequency_ratio(maps, cutoff=0.25, exclude_dc=False, band="axis") == pytest.approx(0.5 / 3.5)
    # the rule is per axis, so a transposed map scores the same
    assert high_frequency_ratio(maps.T, cutoff=0.25, band="axis") == pytest.approx(0.2)


def test_axis_band_masks_on_a_small_grid() -> None:
    # 4 x 4: per-axis normalised frequencies |fftfreq| / 0.5 = [0, 0.5, 1, 0.5]
    high = high_frequency_mask(4, 4, 0.5, "axis")
    low = np.ones((4, 4), dtype=bool)
    low[2, :] = low[:, 2] = False  # Nyquist on either axis is the only thing above 0.5
    np.testing.assert_array_equal(high, ~low)
    assert high_frequency_mask(4, 4, 0.5, "radial").sum() == 11  # the disc also drops the (0.5, 0.5) diagonals
    high, non_dc = hfr_masks(4, 6, 0.3, "axis")
    expected_non_dc = np.ones((4, 6), dtype=bool)
    expected_non_dc[0, 0] = False
    np.testing.assert_array_equal(non_dc, expected_non_dc)
    assert high.dtype == bool and not (high & ~non_dc).any()
    with pytest.raises(AselectError, match="hfr band must be one of radial, axis, got 'square'"):
        high_frequency_mask(4, 4, 0.5, "square")


def hfr_as_radial_was(maps: np.ndarray, cutoff: float, exclude_dc: bool) -> np.ndarray:
    """The radial band's HFR written out from radial_frequency: the formula the default must keep."""
    rho = radial_frequency(*maps.shape[1:3])
    high, non_dc = (rho > cutoff).astype(np.float64), (rho > 0).astype(np.float64)
    spectrum = np.fft.fft2(maps.astype(np.float64), axes=(1, 2))
    power = spectrum.real ** 2 + spectrum.imag ** 2
    total = power.sum(axis=(1, 2))
    ac = np.einsum("mhwc,hw->mc", power, non_dc)
    num = np.einsum("mhwc,hw->mc", power, high)
    den = ac if exclude_dc else total
    flat = ac <= FLAT_POWER * total
    return np.divide(num, den, out=np.zeros_like(num), where=~flat & (den > 0))


@pytest.mark.parametrize(("cutoff", "exclude_dc"), [(0.5, True), (0.3, False), (1.0, True)])
def test_radial_band_is_unchanged(cutoff: float, exclude_dc: bool) -> None:
    for h, w in ((4, 4), (8, 8), (5, 7)):
        np.testing.assert_array_equal(high_frequency_mask(h, w, cutoff), radial_frequency(h, w) > cutoff)
    tokens = np.random.default_rng(3).normal(size=(4, 64, 6))
    expected = float(hfr_as_radial_was(tokens.reshape(4, 8, 8, 6), cutoff, exclude_dc).mean())
    assert hfr_of_tokens(tokens, cutoff, exclude_dc) == expected  # bit-identical
    assert hfr_of_tokens(tokens, cutoff, exclude_dc, band="radial") == expected
    assert score_pair("hfr", tokens, kind="block", cutoff=cutoff, exclude_dc=exclude_dc, band="radial") == expected
    axis = score_pair("hfr", tokens, kind="block", cutoff=cutoff, exclude_dc=exclude_dc, band="axis")
    assert axis == hfr_of_tokens(tokens, cutoff, exclude_dc, band="axis") and axis != expected


# ---------------------------------------------------------------------------------------------
#                                   Labelled scorers
# ---------------------------------------------------------------------------------------------


def blobs(n: int = 240, d: int = 16, k: int = 3, spread: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k well separated Gaussian classes in d dims."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    centres = rng.normal(size=(k, d)) * 3.0
    return (centres[labels] + spread * rng.normal(size=(n, d))).astype(np.float32), labels


@pytest.mark.parametrize("name", ["probe", "fewshot"])
def test_labelled_scorers_separate_signal_from_chance(name):
    x, y = blobs()
    assert score_pair(name, x, y) > 0.9
    shuffled = np.random.default_rng(3).permutation(y)
    assert abs(score_pair(name, x, shuffled) - 1 / 3) < 0.12
    noise = np.random.default_rng(4).normal(size=x.shape)
    assert abs(score_pair(name, noise, y) - 1 / 3) < 0.12
    assert score_pair(name, x, shuffled, seed=5) == score_pair(name, x, shuffled, seed=5)


def test_fewshot_uses_a_few_shots_per_class():
    x, y = blobs(n=300)
    assert score_pair("fewshot", x, y, shots=5, seed=1) > 0.9
    assert score_pair("fewshot", x, y, shots=5, seed=1) == score_pair("fewshot", x, y, shots=5, seed=1)


def test_score_pair_errors_are_one_line():
    x, y = blobs(n=30)
    with pytest.raises(AselectError) as excinfo:
        score_pair("sharpness", x, y)
    message = one_line_error(excinfo)
    assert "unknown scorer 'sharpness'" in message and "probe" in message and "hfr" in message
    with pytest.raises(AselectError) as excinfo:
        get_scorer("nope")
    assert "known:" in one_line_error(excinfo)
    with pytest.raises(AselectError) as excinfo:
        score_pair("probe", x)
    assert "labels" in one_line_error(excinfo)
    with pytest.raises(AselectError) as excinfo:
        score_pair("probe", x, y, c=1.0)
    assert "unknown parameter(s) c" in one_line_error(excinfo)
    with pytest.raises(AselectError) as excinfo:
        score_pair("probe", x[:, None, :], y)
    assert "(n, D)" in one_line_error(excinfo)
    assert {"hfr", "probe", "fewshot", "probe_seg"} <= set(SCORERS)
    assert not get_scorer("hfr").needs_labels and get_scorer("probe_seg").needs == "spatial"


# ---------------------------------------------------------------------------------------------
#                                   Downstream probes
# ---------------------------------------------------------------------------------------------


def test_classification_probe_picks_c_and_generalises():
    x, y = blobs(n=300, seed=6)
    result = classification_probe(x[:200], y[:200], x[200:], y[200:], seed=0)
    assert result.metric == "top1" and result.value > 0.9
    assert result.details["C"] in (0.01, 0.1, 1.0, 10.0)
    assert set(result.details["val_scores"]) == {"0.01", "0.1", "1.0", "10.0"}
    again = classification_probe(x[:200], y[:200], x[200:], y[200:], seed=0)
    assert (again.value, again.details) == (result.value, result.details)


def segmentation_data(n: int, side: int = 4, patch: int = 4, k: int = 3, signal: float = 4.0, seed: int = 0,
                      classes: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens = one-hot of their patch's class (+ noise); masks = patch classes upsampled to pixels."""
    rng = np.random.default_rng(seed)
    grid = rng.choice(classes or np.arange(k), size=(n, side, side))
    d = 8
    tokens = rng.normal(size=(n, side * side, d))
    tokens[..., :k] += signal * np.eye(k)[grid.reshape(n, -1)]
    masks = grid.repeat(patch, axis=1).repeat(patch, axis=2).astype(np.uint8)
    return tokens.astype(np.float16), masks


def test_segmentation_probe_on_patch_classes():
    train_tokens, train_masks = segmentation_data(60, seed=0)
    test_tokens, test_masks = segmentation_data(20, seed=1)
    result = segmentation_probe(train_tokens, train_masks, test_tokens, test_masks, num_classes=3)
    assert result.metric == "miou" and result.value > 0.9
    assert result.details["pixel_accuracy"] > 0.9 and set(result.details["per_class_iou"]) == {"0", "1", "2"}
    # features that carry nothing about the masks
    noise = np.random.default_rng(2).normal(size=train_tokens.shape)
    chance = segmentation_probe(noise, train_masks, test_tokens, test_masks, num_classes=3)
    assert chance.value < 0.5
    # the same through the label-using scorer
    tokens, masks = segmentation_data(80, seed=3)
    assert score_pair("probe_seg", tokens, masks=masks) > 0.9


def test_segmentation_probe_with_a_class_absent_from_training():
    train_tokens, train_masks = segmentation_data(30, classes=(0, 1), seed=4)
    test_tokens, test_masks = segmentation_data(10, seed=5)
    result = segmentation_probe(train_tokens, train_masks, test_tokens, test_masks, num_classes=3, Cs=(1.0,))
    assert result.details["per_class_iou"]["2"] == 0.0  # never predicted, present in ground truth
    assert result.details["per_class_iou"]["0"] > 0.5 and np.isfinite(result.value)


def test_ignored_pixels_add_no_class_to_the_class_count(monkeypatch: pytest.MonkeyPatch) -> None:
    import aselect.pipelines.probe as probe_module
    import aselect.pipelines.scoring as scoring
    from aselect.pipelines.benchmark import pixel_baseline

    tokens, masks = segmentation_data(40, seed=3)
    masks[:, :2] = IGNORE_ID  # unlabelled rows of pixels in every mask
    assert mask_class_count(masks) == 3 and mask_class_count(masks, ["a", "b", "c", "d"]) == 4
    with pytest.raises(AselectError, match=r"every pixel is ignored \(255\)") as info:
        mask_class_count(np.full((2, 4, 4), IGNORE_ID, dtype=np.uint8))
    one_line_error(info)
    # the class count the probes are given: the scorer's, and the pixel baseline's (with and without names)
    given, real = [], probe_module.segmentation_probe

    def recording(*args, **kwargs):
        given.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "segmentation_probe", recording)
    monkeypatch.setattr(probe_module, "segmentation_probe", recording)
    assert score_pair("probe_seg", tokens, masks=masks) > 0.9
    images = np.random.default_rng(0).integers(0, 256, size=(40, 1, 16, 16), dtype=np.uint8)
    split = (np.arange(30), np.arange(30, 40))
    for names in (None, ["background", "a", "b", "c"]):
        baseline = pixel_baseline(images, np.zeros(40, dtype=np.int64), *split, masks, 4, (1.0,), 0.25, 0,
                                  mask_class_names=names)
        assert baseline["metric"] == "miou" and np.isfinite(baseline["value"])
    assert given == [3, 3, 4]


@pytest.mark.parametrize("classes", [10, 2])
def test_streamed_classification_probe_matches_the_in_memory_fit(classes: int) -> None:
    """Same objective, same L-BFGS: same C, same top-1, probabilities equal to solver tolerance (digits pixels)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    keep = y < classes
    x, y = x[keep].astype(np.float32), y[keep]
    train = np.setdiff1d(np.arange(len(y)), np.arange(0, len(y), 3))  # two thirds train, sorted
    test = np.arange(0, len(y), 3)
    memory = classification_probe(x[train], y[train], x[test], y[test], seed=0)
    rows = array_rows(x, batch=97)  # batches that do not divide the row counts
    streamed = classification_probe_streamed(rows, train, y[train], test, y[test], seed=0)
    assert streamed.details["C"] == memory.details["C"] and streamed.details["streamed"]
    assert abs(streamed.value - memory.value) <= 0.005, (streamed.value, memory.value)
    for c, v in memory.details["val_scores"].items():
        assert abs(streamed.details["val_scores"][c] - v) <= 0.01
    c = memory.details["C"]
    scaler = StandardScaler().fit(x[train])
    reference = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(x[train]), y[train])
    batches = [(x[train][i:i + 50], y[train][i:i + 50]) for i in range(0, len(train), 50)]
    ours = fit_streamed_logistic(lambda: iter(batches), c)
    gap = np.abs(ours.predict_proba(x[test]) - reference.predict_proba(scaler.transform(x[test]))).max()
    assert gap < 0.02, gap
    assert np.array_equal(ours.classes_, reference.classes_)


def test_streamed_segmentation_probe_matches_the_in_memory_fit() -> None:
    train_tokens, train_masks = segmentation_data(60, seed=0, signal=1.5)
    test_tokens, test_masks = segmentation_data(20, seed=1, signal=1.5)
    tokens = np.concatenate([train_tokens, test_tokens])
    memory = segmentation_probe(train_tokens, train_masks, test_tokens, test_masks, num_classes=3, seed=0)
    rows = array_rows(tokens, batch=7)
    streamed = segmentation_probe_streamed(rows, 16, np.arange(60), train_masks, np.arange(60, 80), test_masks,
                                           num_classes=3, seed=0)
    assert 0.5 < memory.value < 0.99  # not a trivially separable case
    assert streamed.details["C"] == memory.details["C"]
    assert abs(streamed.value - memory.value) <= 0.005, (streamed.value, memory.value)
    # a single training class predicts that class everywhere, streamed or not
    one_class = segmentation_probe_streamed(rows, 16, np.arange(2), np.zeros_like(train_masks[:2]), np.arange(60, 80),
                                            test_masks, num_classes=3, Cs=(1.0,))
    assert set(one_class.details["per_class_iou"]) == {"0", "1", "2"} and one_class.details["per_class_iou"]["1"] == 0


def test_patch_fractions_and_bilinear_upsampling():
    mask = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 0, 0], [2, 2, 0, 1]], dtype=np.uint8)[None]
    fractions = patch_fractions(mask, side=2, num_classes=3)
    assert fractions.shape == (1, 4, 3)
    np.testing.assert_allclose(fractions[0], [[0.75, 0.25, 0], [0, 1, 0], [0, 0, 1], [0.75, 0.25, 0]])
    maps = np.random.default_rng(6).normal(size=(2, 3, 4, 5))
    ours = upsample_bilinear(maps, 16, 20)
    theirs = torch.nn.functional.interpolate(torch.from_numpy(maps), size=(16, 20), mode="bilinear",
                                             align_corners=False).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    np.testing.assert_allclose(bilinear_matrix(8, 4).sum(axis=1), 1.0)
    miou, per_class, accuracy = iou_from_confusion(np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]]))
    assert per_class == {"0": 0.75, "1": 0.8} and miou == pytest.approx(0.775) and accuracy == 0.875


# ---------------------------------------------------------------------------------------------
#                                         Selection
# ---------------------------------------------------------------------------------------------

TIMESTEPS = (10, 25, 50)


def hfr_value(t: int, layer: int) -> float:
    """Attention HFR: the band [2, 3] peaks at t=25; layer 0 alone would pick t=50 (must be ignored)."""
    if layer == 0:
        return {10: 0.1, 25: 0.2, 50: 0.9}[t]
    base = {10: 0.30, 25: 0.40, 50: 0.35}[t]
    return base + (0.02 if layer == 3 else 0.0)


def score_table(with_seg: bool = False) -> list[dict]:
    rows = []
    for t in TIMESTEPS:
        for layer in range(6):
            rows.append({"timestep": t, "layer": layer, "site": "attn_map", "scorer": "hfr",
                         "score": hfr_value(t, layer)})
            for site in ("block", "mlp"):
                probe = 0.5 + 0.01 * layer + (0.3 if (t, layer, site) == (10, 4, "mlp") else 0.0)
                rows.append({"timestep": t, "layer": layer, "site": site, "scorer": "probe", "score": probe})
                rows.append({"timestep": t, "layer": layer, "site": site, "scorer": "fewshot",
                             "score": 1.0 - 0.1 * layer - t / 1000})
                if with_seg:
                    rows.append({"timestep": t, "layer": layer, "site": site, "scorer": "probe_seg",
                                 "score": 0.9 if (t, layer, site) == (50, 1, "block") else 0.2})
    return rows


def test_oracle_and_fewshot_pick_the_best_pair():
    oracle = select("oracle", score_table())
    assert (oracle.timestep, oracle.layer, oracle.site, oracle.score) == (10, 4, "mlp", pytest.approx(0.84))
    # the runner-up: layer 5 scores 0.55 everywhere; ties go to the lowest timestep, then site block before mlp
    assert oracle.runner_up == {"timestep": 10, "layer": 5, "site": "block", "score": pytest.approx(0.55)}
    assert "probe" in oracle.reason and len(oracle.table) == len(score_table())
    seg = select("oracle", score_table(with_seg=True))
    assert (seg.timestep, seg.layer, seg.site) == (50, 1, "block")
    fewshot = select("fewshot", score_table())
    assert (fewshot.timestep, fewshot.layer, fewshot.site) == (10, 0, "block")
    json.dumps(oracle.to_dict())


def test_aselect_averages_hfr_over_the_middle_blocks():
    assert middle_third(range(6)) == [2, 3] and middle_third(range(12)) == [4, 5, 6, 7] and middle_third([7]) == [7]
    chosen = select("aselect", score_table())
    assert (chosen.timestep, chosen.layer, chosen.site) == (25, 3, "block")
    assert chosen.score == pytest.approx(0.41)
    assert chosen.runner_up == {"timestep": 50, "layer": 3, "site": "block", "score": pytest.approx(0.36)}
    assert chosen.reason == ("HFR of attn_map averaged over layers [2, 3] peaks at t=25 (0.410; runner-up t=50, "
                             "0.360); features: layer 3 site block")
    # over all layers, layer 0's spike at t=50 wins; a fixed feature layer and site are taken as given
    wide = select("aselect", score_table(), layers=[0, 1, 2, 3, 4, 5], feature_layer=1, feature_site="mlp")
    assert (wide.timestep, wide.layer, wide.site) == (50, 1, "mlp")
    with pytest.raises(AselectError) as excinfo:
        select("aselect", score_table(), hfr_site="block")
    assert "hfr" in one_line_error(excinfo) and "attn_map" in str(excinfo.value)
    with pytest.raises(AselectError) as excinfo:
        select("aselect", score_table(), layers=[9])
    assert "[9]" in one_line_error(excinfo)


def test_hybrid_takes_t_from_hfr_and_the_feature_from_the_few_shot_probe_at_that_t():
    table = score_table()
    hybrid = select("hybrid", table)
    aselect, fewshot = select("aselect", table), select("fewshot", table)
    # HFR's t (25, not the few-shot best's 10), the few-shot best layer and site at t=25 (0, not HFR's 3)
    assert (aselect.timestep, aselect.layer) == (25, 3) and (fewshot.timestep, fewshot.layer) == (10, 0)
    assert (hybrid.policy, hybrid.timestep, hybrid.layer, hybrid.site) == ("hybrid", 25, 0, "block")
    assert hybrid.score == pytest.approx(1.0 - 0.025) and hybrid.runner_up["timestep"] == 25
    assert hybrid.reason.startswith("HFR of attn_map averaged over layers [2, 3] peaks at t=25")
    assert "features: layer 0 site block at t=25 (fewshot score 0.975" in hybrid.reason
    # its few-shot scores must include HFR's t
    elsewhere = [r for r in table if r["scorer"] != "fewshot" or r["timestep"] != 25]
    with pytest.raises(AselectError) as excinfo:
        select("hybrid", elsewhere)
    assert "no 'fewshot' scores at the HFR choice t=25" in one_line_error(excinfo)


def test_fixed_policy_validates_the_pair():
    fixed = select("fixed", score_table(), timestep=50, layer=2, site="mlp")
    assert (fixed.timestep, fixed.layer, fixed.site) == (50, 2, "mlp")
    assert fixed.score == pytest.approx(0.52) and fixed.runner_up is None
    with pytest.raises(AselectError) as excinfo:
        select("fixed", score_table(), timestep=75, layer=2, site="mlp")
    assert "t=75 layer 2 site mlp" in one_line_error(excinfo)
    with pytest.raises(AselectError) as excinfo:
        select("fixed", score_table(), timestep=50)
    assert "needs timestep, layer and site" in one_line_error(excinfo)


def test_ties_and_policy_errors():
    rows = [{"timestep": t, "layer": layer, "site": site, "scorer": "probe", "score": 0.7}
            for t in (50, 10) for layer in (1, 0) for site in ("mlp", "block")]
    rows.append({"timestep": 90, "layer": 0, "site": "block", "scorer": "probe", "score": 0.5})  # some signal
    tie = select("oracle", rows)  # an eight-way tie at the top
    assert (tie.timestep, tie.layer, tie.site) == (10, 0, "block")
    assert tie.runner_up["timestep"] == 10 and tie.runner_up["layer"] == 0 and tie.runner_up["site"] == "mlp"
    with pytest.raises(AselectError) as excinfo:
        select("greedy", rows)
    message = one_line_error(excinfo)
    assert "unknown selection policy 'greedy'" in message and "aselect" in message and "oracle" in message
    with pytest.raises(AselectError) as excinfo:
        select("aselect", score_table(), layer=3)
    assert "unknown parameter(s) layer" in one_line_error(excinfo)
    with pytest.raises(AselectError) as excinfo:
        select("fewshot", rows)
    assert "needs 'fewshot' scores" in one_line_error(excinfo)
    with pytest.raises(AselectError) as excinfo:
        select("oracle", [])
    assert "empty" in one_line_error(excinfo)


def test_rankme_is_the_effective_rank_of_pooled_features():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    for rank in (1, 5, 20):
        features = basis[:, :rank] @ basis[:rank, :] * 3.0  # `rank` equal singular values
        assert score_pair("rankme", features) == pytest.approx(rank, rel=1e-3)
    spread = score_pair("rankme", rng.standard_normal((200, 32)))
    assert 25 < spread < 32  # nearly full rank
    assert np.isnan(score_pair("rankme", np.full((8, 4), np.nan)))
    assert score_pair("rankme", np.zeros((8, 4))) == 0.0
