"""A-SelecT in one streamed pass: HFR reduced in the forward hooks, the dense candidate grid, bootstrap confidence."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from aselect.pipelines.backbone import load_backbone
from aselect.pipelines.benchmark import smallest_confident
from aselect.pipelines.config import CalibrateConfig, DumpConfig, load_config
from aselect.pipelines.dump import plan_layout, run_dump
from aselect.pipelines.features import SITES, Reduction, draw_noise, extract
from aselect.pipelines.grid import streamed_hfr_table
from aselect.pipelines.models import Backbone, build_dit, make_scheduler
from aselect.pipelines.plan import hfr_stream
from aselect.pipelines.scoring import hfr_masks, hfr_of_attention, hfr_of_tokens, high_frequency_mask
from aselect.pipelines.select import bootstrap_confidence, select, unstable_choice_advice
from aselect.pipelines.streamed import HfrStream, _masks, hfr_per_image, signal_per_image
from aselect.storage.datasets import DATASET_STORE
from aselect.storage.errors import AselectError
from aselect.storage.features import open_features, read_hfr
from aselect.tasks.score import scorer_params


def reference_hfr(features: np.ndarray, site: str, cutoff: float, exclude_dc: bool, band: str = "radial") -> float:
    """The stored-map path: pipelines.scoring's numpy HFR of the maps."""
    fn = hfr_of_attention if site == "attn_map" else hfr_of_tokens
    return fn(features, cutoff, exclude_dc, band)


# ---------------------------------------------------------------------------------------------
#                         Streamed HFR equals the stored-map reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "size"), [("DiT-XS/2", 8), ("DiT-T/2", 16)], ids=["smoke", "digits"])
@pytest.mark.parametrize(("cutoff", "exclude_dc", "band"), [
    (0.5, True, "radial"), (0.3, False, "radial"), (1.0, True, "radial"), (0.5, True, "axis"), (0.3, False, "axis"),
])
def test_streamed_hfr_equals_the_stored_map_reference(variant: str, size: int, cutoff: float,
                                                      exclude_dc: bool, band: str) -> None:
    torch.manual_seed(1)
    model = build_dit(variant, image_size=size, channels=1, num_classes=10).eval()
    for p in model.parameters():  # away from DiT's zero init, so every block and site carries its own maps
        p.data.add_(0.05 * torch.randn_like(p))
    backbone = Backbone(model, make_scheduler(1000, "linear"), None, "memory")
    x0 = torch.rand(5, 1, size, size) * 2 - 1
    reduction = {"hfr": Reduction(SITES, partial(hfr_per_image, cutoff=cutoff, exclude_dc=exclude_dc, band=band))}
    layers = list(range(backbone.num_layers))
    for t in (0, 300, 900):
        feats = extract(backbone, x0, range(5), t, layers, SITES, seed=0, reductions=reduction)
        for layer in layers:
            for site in SITES:
                streamed = feats[(layer, site, "hfr")]
                assert streamed.shape == (5,) and streamed.dtype == torch.float64
                expected = reference_hfr(feats[(layer, site)].numpy(), site, cutoff, exclude_dc, band)
                assert streamed.mean().item() == pytest.approx(expected, rel=1e-6, abs=1e-12), (t, layer, site)
                # per image, too: the mean over images is the mean of per-image values
                first = reference_hfr(feats[(layer, site)][:1].numpy(), site, cutoff, exclude_dc, band)
                assert streamed[0].item() == pytest.approx(first, rel=1e-6, abs=1e-12)


def test_streamed_hfr_keeps_the_flat_map_and_dc_rules() -> None:
    flat = torch.ones(2, 16, 3)  # constant maps: no non-DC power -> 0, as in scoring.py
    assert hfr_per_image(flat, "attn").tolist() == [0.0, 0.0]
    checker = torch.tensor([[(-1.0) ** (i + j) for j in range(4)] for i in range(4)]).reshape(1, 16, 1)
    assert hfr_per_image(checker, "block").item() == pytest.approx(1.0)  # all power at Nyquist
    assert hfr_per_image(checker + 1.0, "block", exclude_dc=False).item() == pytest.approx(0.5)
    with pytest.raises(AselectError, match="square grid"):
        hfr_per_image(torch.zeros(1, 15, 4), "attn")


@pytest.mark.parametrize("band", ["radial", "axis"])
@pytest.mark.parametrize(("cutoff", "exclude_dc"), [(0.15, True), (0.5, True), (0.3, False)])
def test_streamed_hfr_of_random_maps_equals_the_numpy_reference(band: str, cutoff: float, exclude_dc: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(3, 64, 5, generator=gen, dtype=torch.float64).cumsum(dim=1)  # 8 x 8 grid, mixed spectrum
    attn = torch.rand(3, 64, 64, generator=gen, dtype=torch.float64).softmax(dim=-1)
    for site, features in (("block", tokens), ("attn_map", attn)):
        streamed = hfr_per_image(features, site, cutoff, exclude_dc, band)
        expected = [reference_hfr(features[i:i + 1].numpy(), site, cutoff, exclude_dc, band) for i in range(3)]
        np.testing.assert_allclose(streamed.numpy(), expected, rtol=1e-12, atol=1e-15)
        stream = HfrStream(sites=(site,), cutoff=cutoff, exclude_dc=exclude_dc, band=band)
        torch.testing.assert_close(signal_per_image(features, site, stream), streamed, rtol=0, atol=0)
    # the torch masks are scoring.py's
    high, non_dc = _masks(8, 8, cutoff, band, torch.device("cpu"))
    np.testing.assert_array_equal(high.numpy(), high_frequency_mask(8, 8, cutoff, band))
    np.testing.assert_array_equal(non_dc.numpy(), hfr_masks(8, 8, cutoff, band)[1])


def test_axis_band_reaches_every_signal() -> None:
    maps = torch.randn(3, 64, 4, dtype=torch.float64)  # 8 x 8 tokens
    repeated = maps.repeat_interleave(3, dim=0)
    for band in ("radial", "axis"):
        plain = hfr_per_image(maps, "attn", 0.5, True, band)
        mean = signal_per_image(repeated, "attn", HfrStream(sites=("attn",), signal="mean", draws=3, band=band))
        torch.testing.assert_close(mean, plain)
        debiased = signal_per_image(repeated, "attn", HfrStream(sites=("attn",), signal="debiased", draws=3, band=band))
        np.testing.assert_allclose(debiased.numpy(), power_weighted_hfr(maps.reshape(3, 8, 8, 4).numpy(), 0.5, band),
                                   rtol=1e-9)
    assert not torch.equal(hfr_per_image(maps, "attn", band="axis"), hfr_per_image(maps, "attn"))


def test_the_band_is_threaded_from_the_config() -> None:
    cfg = load_config("smoke", ["score.hfr_band=axis", "score.hfr_cutoff=0.15"])
    assert hfr_stream(cfg).band == "axis" and hfr_stream(load_config("smoke")).band == "radial"
    assert scorer_params(cfg.score, "hfr") == {"cutoff": 0.15, "exclude_dc": True, "band": "axis"}
    with pytest.raises(ValueError, match="band"):
        HfrStream(sites=("attn",), band="square")


# ---------------------------------------------------------------------------------------------
#                           The calibration dump stores scalars, not maps
# ---------------------------------------------------------------------------------------------


def calibrate(tiny: tuple[str, Path], stage: Path, keep_maps: bool = False, sites=("attn", "attn_map"),
              **signal: object):
    model_dir, data = tiny
    cfg = DumpConfig(timesteps=[0, 200, 600, 900], images_per_chunk=32)
    stream = HfrStream(sites=tuple(sites), cutoff=0.5, **signal)
    layout = plan_layout(load_backbone(model_dir), np.arange(120), cfg, hfr=stream, keep_maps=keep_maps)
    return run_dump(model_dir, data, stage, layout, cfg), layout


def test_calibration_streams_per_image_hfr_and_stores_no_maps(tiny, tmp_path: Path) -> None:
    result, layout = calibrate(tiny, tmp_path)
    group = open_features(tmp_path)
    assert sorted(k for k in ("pooled", "spatial", "attn_map", "hfr") if k in group) == ["hfr"]
    hfr = group["hfr"]
    assert hfr.shape == (4, 2, 2, 120) and hfr.dtype == np.float64  # (timestep, layer, hfr_site, sample)
    assert hfr.metadata.dimension_names == ("timestep", "layer", "hfr_site", "sample")
    assert list(group["hfr_site"][:]) == ["attn", "attn_map"]
    # 8 bytes per (image, timestep, layer, site): nothing else is written per image
    assert result.bytes_written == 120 * 4 * 2 * 2 * 8

    # each stored value is the numpy reference HFR of that image's maps, recomputed bit-identically
    model_dir, data = tiny
    backbone = load_backbone(model_dir)


    pixels = torch.from_numpy(zarr.open_group(data / DATASET_STORE, mode="r")["images"][:3])
    x0 = (pixels.float() / 127.5 - 1.0)
    feats = extract(backbone, x0, [0, 1, 2], 600, [0, 1], ["attn", "attn_map"], seed=0)
    for li in (0, 1):
        for si, site in enumerate(("attn", "attn_map")):
            for i in range(3):
                expected = reference_hfr(feats[(li, site)][i:i + 1].numpy(), site, 0.5, True)
                assert hfr[2, li, si, i] == pytest.approx(expected, rel=1e-6)

    rows, per_image, samples = streamed_hfr_table(tmp_path, {"cutoff": 0.5, "exclude_dc": True})
    assert len(rows) == 4 * 2 * 2 and per_image.shape == (16, 120) and list(samples) == list(range(120))
    for row, values in zip(rows, per_image, strict=True):
        assert row["scorer"] == "hfr" and row["score"] == pytest.approx(values.mean())
    with pytest.raises(AselectError, match="streamed with"):
        streamed_hfr_table(tmp_path, {"cutoff": 0.3, "exclude_dc": True})


def test_a_calibration_with_the_axis_band_stores_its_band_and_refuses_another(tiny, tmp_path: Path) -> None:
    calibrate(tiny, tmp_path / "axis", sites=("attn",), band="axis")
    calibrate(tiny, tmp_path / "radial", sites=("attn",))
    values, layout = read_hfr(tmp_path / "axis")
    assert layout["hfr_band"] == "axis" and read_hfr(tmp_path / "radial")[1]["hfr_band"] == "radial"
    assert not np.array_equal(values, read_hfr(tmp_path / "radial")[0])
    rows, _, _ = streamed_hfr_table(tmp_path / "axis", {"cutoff": 0.5, "exclude_dc": True, "band": "axis"})
    assert [r["score"] for r in rows] == pytest.approx(values.mean(axis=-1).ravel().tolist())
    with pytest.raises(AselectError, match=r"streamed with .*'band': 'axis'"):
        streamed_hfr_table(tmp_path / "axis", {"cutoff": 0.5, "exclude_dc": True, "band": "radial"})
    with pytest.raises(AselectError, match=r"streamed with .*'band': 'radial'"):
        streamed_hfr_table(tmp_path / "radial", {"cutoff": 0.5, "exclude_dc": True, "band": "axis"})

    # the stored value is the axis-band reference HFR of that image's maps
    model_dir, data = tiny
    x0 = torch.from_numpy(zarr.open_group(data / DATASET_STORE, mode="r")["images"][:2]).float() / 127.5 - 1.0
    feats = extract(load_backbone(model_dir), x0, [0, 1], 600, [1], ["attn"], seed=0)
    for i in range(2):
        expected = reference_hfr(feats[(1, "attn")][i:i + 1].numpy(), "attn", 0.5, True, "axis")
        assert values[2, 1, 0, i] == pytest.approx(expected, rel=1e-6)

    # a store written before the band was recorded reads as radial, and is scored as such
    group = zarr.open_group(tmp_path / "radial" / "features.zarr", mode="r+")
    group.attrs["layout"] = {k: v for k, v in group.attrs["layout"].items() if k != "hfr_band"}
    assert read_hfr(tmp_path / "radial")[1]["hfr_band"] == "radial"
    streamed_hfr_table(tmp_path / "radial", {"cutoff": 0.5, "exclude_dc": True, "band": "radial"})


@pytest.mark.parametrize(("cutoff", "message"), [
    (1.0, r"score\.hfr_cutoff 1\.0 \(score\.hfr_band axis\): no frequency of the 4x4 token grid is above it "
          r"\(the highest is 1\.000\)"),
    (0.3, r"score\.hfr_cutoff 0\.3 \(score\.hfr_band axis\): every non-DC frequency of the 4x4 token grid is above "
          r"it \(the lowest is 0\.500\)"),
])
def test_an_axis_band_cutoff_outside_the_token_grid_is_refused(tiny, cutoff: float, message: str) -> None:
    backbone = load_backbone(tiny[0])
    with pytest.raises(AselectError, match=message):
        plan_layout(backbone, np.arange(10), DumpConfig(), hfr=HfrStream(sites=("attn",), cutoff=cutoff, band="axis"))
    layout = plan_layout(backbone, np.arange(10), DumpConfig(), hfr=HfrStream(sites=("attn",), cutoff=0.5, band="axis"))
    assert layout.hfr_band == "axis"
    assert plan_layout(backbone, np.arange(10), DumpConfig(), hfr=HfrStream(sites=("attn",), cutoff=1.0)).hfr_band \
        == "radial"  # the radial disc still has the diagonals above 1


def test_keep_maps_also_stores_the_maps(tiny, tmp_path: Path) -> None:
    result, layout = calibrate(tiny, tmp_path, keep_maps=True)
    group = open_features(tmp_path)
    assert {"hfr", "spatial", "attn_map"} <= set(group) and "pooled" not in group
    assert group["spatial"].shape == (4, 2, 1, 120, 16, 32)  # the token site HFR read
    streamed_only, _ = calibrate(tiny, tmp_path / "streamed")
    assert result.bytes_written > 50 * streamed_only.bytes_written
    np.testing.assert_array_equal(group["hfr"][:], open_features(tmp_path / "streamed")["hfr"][:])


# ---------------------------------------------------------------------------------------------
#                           Signals that separate the image from the noise
# ---------------------------------------------------------------------------------------------


def power_weighted_hfr(maps: np.ndarray, cutoff: float = 0.5, band: str = "radial") -> np.ndarray:
    """numpy: per image, high-band power over non-DC power, each summed over channels; maps (B, h, w, c)."""
    power = np.abs(np.fft.fft2(maps.astype(np.float64), axes=(1, 2))) ** 2
    high, non_dc = hfr_masks(*maps.shape[1:3], cutoff, band)
    return (power * high[..., None]).sum(axis=(1, 2, 3)) / (power * non_dc[..., None]).sum(axis=(1, 2, 3))


def test_signals_of_identical_inputs_reduce_to_plain_hfr() -> None:
    maps = torch.randn(3, 16, 8, dtype=torch.float64)  # 3 images, 4x4 tokens, 8 channels
    plain = hfr_per_image(maps, "attn")
    repeated = maps.repeat_interleave(4, dim=0)
    mean = signal_per_image(repeated, "attn", HfrStream(sites=("attn",), signal="mean", draws=4))
    torch.testing.assert_close(mean, plain)  # the mean of 4 equal copies is the copy
    # no noise between draws: S = P(1), so debiased is the power-weighted HFR of the map itself
    debiased = signal_per_image(repeated, "attn", HfrStream(sites=("attn",), signal="debiased", draws=4))
    expected = power_weighted_hfr(maps.reshape(3, 4, 4, 8).numpy())
    np.testing.assert_allclose(debiased.numpy(), expected, rtol=1e-9)
    twins = maps.repeat_interleave(2, dim=0)  # an image no different from its noise-only twin adds nothing
    relative = signal_per_image(twins, "attn", HfrStream(sites=("attn",), signal="noise_relative"))
    torch.testing.assert_close(relative, torch.ones(3, dtype=torch.float64))
    # a non-finite image or twin has no value (NaN), never the 0 of a flat map
    for broken in (0, 1):
        bad = twins.clone()
        bad[2 + broken, 0, 0] = float("nan")  # image 1's map (row 2) or its noise-only twin (row 3)
        values = signal_per_image(bad, "attn", HfrStream(sites=("attn",), signal="noise_relative"))
        assert torch.isnan(values[1]) and torch.isfinite(values[[0, 2]]).all()


def test_debiased_hfr_recovers_the_clean_spectrum_under_noise() -> None:
    rng = np.random.default_rng(0)
    b, k, side, c = 6, 16, 8, 64
    # clean maps: low-frequency structure (a smooth random field per channel), the same in every draw
    coarse = rng.normal(size=(b, 1, 2, 2, c))
    clean = np.kron(coarse, np.ones((1, 1, 4, 4, 1)))  # 2x2 blocks upsampled to 8x8
    noisy = clean + rng.normal(scale=1.5, size=(b, k, side, side, c))  # each draw its own white noise
    truth = power_weighted_hfr(clean[:, 0])
    features = torch.from_numpy(noisy.reshape(b * k, side * side, c))
    values = {signal: signal_per_image(features, "block", HfrStream(sites=("block",), signal=signal, draws=k))
              .numpy() for signal in ("mean", "debiased")}
    plain = hfr_per_image(features.view(b, k, side * side, c)[:, 0], "block").numpy()
    errors = {name: np.abs(v - truth).mean() for name, v in {"plain": plain, **values}.items()}
    # white noise puts ~3/4 of its power above the cutoff: plain HFR is mostly noise; averaging shrinks the
    # noise 16x; removing the noise term leaves the clean spectrum up to sampling error
    assert errors["plain"] > 0.3
    assert errors["debiased"] < 0.05 < errors["mean"] < errors["plain"]


def test_multi_draw_calibration_runs_k_inputs_per_image(tiny, tmp_path: Path) -> None:
    plain, _ = calibrate(tiny, tmp_path / "plain", sites=("attn",))
    mean, layout = calibrate(tiny, tmp_path / "mean", sites=("attn",), signal="mean", draws=2)
    assert layout.inputs_per_image == 2
    assert mean.images_timesteps == 2 * plain.images_timesteps == 2 * 120 * 4  # forward passes are counted
    stored = open_features(tmp_path / "mean")["hfr"]
    assert stored.shape == open_features(tmp_path / "plain")["hfr"].shape  # still one value per image

    # the stored value is the signal of K noised copies, draw 0 being the plain dump's own noise
    model_dir, data = tiny
    backbone = load_backbone(model_dir)
    noise = draw_noise((1, 8, 8), [0, 1, 2], 600, seed=0, draws=2)
    torch.testing.assert_close(noise[0::2], draw_noise((1, 8, 8), [0, 1, 2], 600, seed=0))
    x0 = torch.from_numpy(zarr.open_group(data / DATASET_STORE, mode="r")["images"][:3]).float() / 127.5 - 1.0
    feats = extract(backbone, x0.repeat_interleave(2, dim=0), [0, 0, 1, 1, 2, 2], 600, [0, 1], ["attn"], seed=0,
                    noise=noise)
    for li in (0, 1):
        expected = signal_per_image(feats[(li, "attn")], "attn", HfrStream(sites=("attn",), signal="mean", draws=2))
        np.testing.assert_allclose(stored[2, li, 0, :3], expected.numpy(), rtol=1e-6)

    again, _ = calibrate(tiny, tmp_path / "again", sites=("attn",), signal="mean", draws=2)
    np.testing.assert_array_equal(open_features(tmp_path / "again")["hfr"][:], stored[:])


def test_noise_relative_pairs_each_image_with_its_noise_only_twin(tiny, tmp_path: Path) -> None:
    calibrate(tiny, tmp_path, sites=("attn",), signal="noise_relative")
    stored = open_features(tmp_path)["hfr"]
    model_dir, data = tiny
    backbone = load_backbone(model_dir)
    x0 = torch.from_numpy(zarr.open_group(data / DATASET_STORE, mode="r")["images"][:2]).float() / 127.5 - 1.0
    noise = draw_noise((1, 8, 8), [0, 1], 200, seed=0)
    image = extract(backbone, x0, [0, 1], 200, [1], ["attn"], seed=0, noise=noise)[(1, "attn")]
    alone = extract(backbone, torch.zeros_like(x0), [0, 1], 200, [1], ["attn"], seed=0, noise=noise)[(1, "attn")]
    expected = hfr_per_image(image, "attn") / hfr_per_image(alone, "attn")
    np.testing.assert_allclose(stored[1, 1, 0, :2], expected.numpy(), rtol=1e-6)


def test_signal_knobs_are_checked() -> None:
    with pytest.raises(ValueError, match="draws must be >= 2"):
        HfrStream(sites=("attn",), signal="debiased", draws=1)
    with pytest.raises(ValueError, match="takes one noise draw"):
        HfrStream(sites=("attn",), draws=4)
    with pytest.raises(AselectError, match=r"calibrate: keep_maps .* only with signal 'plain' \(got 'mean'\)"):
        load_config("smoke", ["calibrate.signal=mean", "calibrate.keep_maps=true"])
    assert load_config("smoke", ["calibrate.signal=mean"]).calibrate.signal_draws() == 8
    assert load_config("smoke", ["calibrate.signal=noise_relative"]).calibrate.signal_draws() == 1


# ---------------------------------------------------------------------------------------------
#                                     The candidate grid
# ---------------------------------------------------------------------------------------------


def test_calibrate_timesteps_take_a_list_or_a_range() -> None:
    dump = DumpConfig()
    assert CalibrateConfig().candidate_timesteps(dump) == sorted(dump.timesteps)
    dense = CalibrateConfig.model_validate({"timesteps": {"start": 0, "stop": 1000, "step": 20}})
    assert dense.candidate_timesteps(dump) == list(range(0, 1000, 20)) and len(dense.candidate_timesteps(dump)) == 50
    assert CalibrateConfig(timesteps=[300, 5, 40]).candidate_timesteps(dump) == [5, 40, 300]
    cfg = load_config("smoke", ["calibrate.timesteps={start: 0, stop: 1000, step: 100}"])
    assert cfg.calibrate.candidate_timesteps(cfg.dump) == list(range(0, 1000, 100))


@pytest.mark.parametrize(("override", "message"), [
    ("calibrate.timesteps={start: 500, stop: 100, step: 10}", "start 500 must be below stop 100"),
    ("calibrate.timesteps={start: 0, stop: 2000, step: 100}", "calibrate.timesteps [1000, 1100, 1200, 1300, 1400"),
    ("calibrate.timesteps={start: 0, stop: 100, step: 0}",
     "calibrate.timesteps: step: Input should be greater than or equal to 1 (got 0)"),
    ("calibrate.timesteps=[5, 5]", "calibrate.timesteps: timesteps has duplicates"),
    ("calibrate.timesteps={start: 0, stop: 100}", "calibrate.timesteps: step: Field required"),
    ("calibrate.timesteps=[]", "calibrate.timesteps: must not be empty"),
])
def test_bad_calibrate_timesteps_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(AselectError, match=None) as caught:
        load_config("smoke", [override])
    assert message in str(caught.value) and "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
#                                    Bootstrap confidence
# ---------------------------------------------------------------------------------------------


def hfr_table(curve: dict[int, float], layers=(0, 1, 2)) -> list[dict]:
    return [{"timestep": t, "layer": layer, "site": "attn", "scorer": "hfr", "score": value + 0.01 * layer}
            for t, value in curve.items() for layer in layers]


def per_image_values(table: list[dict], noise: float, images: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray([[row["score"]] * images for row in table]) + noise * rng.standard_normal((len(table), images))


PARAMS = {"hfr_site": "attn", "layers": [1, 2], "feature_site": "block", "feature_layer": "argmax"}


def test_a_clear_peak_is_chosen_with_full_confidence() -> None:
    table = hfr_table({0: 0.30, 100: 0.50, 500: 0.20})
    conf = bootstrap_confidence("aselect", table, per_image_values(table, 0.01, 64), PARAMS, resamples=100)
    assert conf["value"] == conf["timestep"] == conf["layer"] == 1.0
    assert conf["selected"] == {"timestep": 100, "layer": 2} and conf["images"] == 64 and conf["resamples"] == 100


def test_a_flat_curve_gives_low_confidence_and_more_images_raise_it() -> None:
    table = hfr_table({0: 0.300, 100: 0.310, 500: 0.295})
    values = per_image_values(table, 0.1, 2048, seed=3)
    small = bootstrap_confidence("aselect", table, values[:, :16], PARAMS, resamples=200)
    large = bootstrap_confidence("aselect", table, values, PARAMS, resamples=200)
    assert small["timestep"] < 0.8 and small["images"] == 16
    assert large["timestep"] > 0.9 > small["timestep"]
    again = bootstrap_confidence("aselect", table, values[:, :16], PARAMS, resamples=200)
    assert again == small  # seeded: the same resamples every time
    # the selected pair is what the policy picks on the (first `images`) means
    means = [{**row, "score": float(v[:16].mean())} for row, v in zip(table, values, strict=True)]
    chosen = select("aselect", means, **PARAMS)
    assert small["selected"] == {"timestep": chosen.timestep, "layer": chosen.layer}


def test_an_unstable_choice_points_to_the_few_shot_selector() -> None:
    table = hfr_table({0: 0.3, 100: 0.3, 500: 0.3, 700: 0.3})  # a flat curve: resamples disagree on t
    values = per_image_values(table, 0.2, 16, seed=0)
    flat = bootstrap_confidence("aselect", table, values, PARAMS, resamples=200)
    chosen = {**flat["selected"], "confidence": flat}
    assert flat["timestep"] < 0.5
    assert f"pick t={chosen['timestep']} layer {chosen['layer']}" in unstable_choice_advice(chosen)
    assert "select.policy=fewshot" in unstable_choice_advice(chosen)
    peaked = hfr_table({0: 0.3, 100: 0.5, 500: 0.2})
    sure = bootstrap_confidence("aselect", peaked, per_image_values(peaked, 0.01, 64, seed=3), PARAMS)
    assert sure["value"] == 1.0 and unstable_choice_advice({"timestep": 100, "confidence": sure}) is None
    # a sure timestep with an unsure layer is an unsure pair: below 90% of resamples on both, the run says so
    unsure_layer = {"timestep": 100, "layer": 2, "confidence": {"value": 0.85, "timestep": 1.0, "layer": 0.85}}
    assert "only 85% of bootstrap resamples" in unstable_choice_advice(unsure_layer)
    assert unstable_choice_advice({"timestep": 100, "confidence": None}) is None  # fewshot, fixed, rankme


def test_bootstrap_refuses_mismatched_values() -> None:
    table = hfr_table({0: 0.3, 100: 0.5})
    with pytest.raises(AselectError, match="do not match 6 table rows"):
        bootstrap_confidence("aselect", table, np.zeros((5, 10)), PARAMS)
    with pytest.raises(AselectError, match=r"shape \(6, 0\) do not match"):
        bootstrap_confidence("aselect", table, np.zeros((6, 0)), PARAMS)


def test_smallest_confident_c_is_where_the_curve_stays_above_the_threshold() -> None:
    def curve(shares: dict[int, float]) -> list[dict]:
        return [{"images": c, "timestep": v, "confidence": v / 2} for c, v in shares.items()]

    # 24 reaches 0.9 once, but 32 falls back: the curve only stays above from 48 on
    assert smallest_confident(curve({16: 0.6, 24: 0.93, 32: 0.8, 48: 0.95, 64: 0.91})) == 48
    assert smallest_confident(curve({16: 0.6, 32: 0.95, 64: 0.85})) is None  # the largest C falls short
    assert smallest_confident(curve({16: 0.95, 32: 0.97})) == 16
    assert smallest_confident(curve({16: 0.95, 32: 0.97}), share="confidence") is None  # the pair's share
