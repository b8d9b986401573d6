"""Feature capture and the chunked, resumable Zarr dump (stage 3), on a tiny random DiT."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import aselect.pipelines.dump as dump_module
from aselect.pipelines.backbone import load_backbone
from aselect.pipelines.config import DumpConfig
from aselect.pipelines.dump import plan_layout, resolve_autocast, run_dump
from aselect.pipelines.features import AttentionMapProcessor, extract
from aselect.pipelines.streamed import HfrStream
from aselect.storage.errors import AselectError
from aselect.storage.features import FEATURES_STORE, finished_items, open_features

ROOT = Path(__file__).resolve().parents[1]


STREAM = HfrStream(sites=("attn", "attn_map"), cutoff=0.5)


def dump_into(tiny: tuple[str, Path], stage: Path, hfr: HfrStream | None = None, keep_maps: bool = False,
              **overrides: object):
    model_dir, data = tiny
    cfg = DumpConfig(**{"timesteps": [0, 50, 400, 900], "images_per_chunk": 32, **overrides})
    layout = plan_layout(load_backbone(model_dir), np.arange(120), cfg, hfr=hfr, keep_maps=keep_maps)
    return run_dump(model_dir, data, stage, layout, cfg), layout


def arrays(stage: Path) -> dict[str, np.ndarray]:
    group = open_features(stage)
    return {name: group[name][:] for name in ("pooled", "spatial", "attn_map", "hfr") if name in group}


def test_dump_writes_labelled_arrays(tiny, tmp_path: Path) -> None:
    result, layout = dump_into(tiny, tmp_path, sites=["block", "attn", "mlp", "attn_map"], spatial=True)
    assert result.items_total == 4 * 4 and result.items_computed == 16 and result.batches == 16
    assert result.images_timesteps == 4 * 120 and result.bytes_written > 0
    got = arrays(tmp_path)
    assert got["pooled"].shape == (4, 2, 3, 120, 32)  # (timestep, layer, site, sample, feature)
    assert got["spatial"].shape == (4, 2, 3, 120, 16, 32) and got["spatial"].dtype == np.float16
    np.testing.assert_allclose(got["spatial"].astype(np.float32).mean(axis=4), got["pooled"], atol=2e-2)
    # attention probabilities: every query's row over the key grid sums to one
    np.testing.assert_allclose(got["attn_map"].astype(np.float32).sum(axis=-1), 1.0, atol=1e-2)
    # different timesteps give different features
    assert not np.allclose(got["pooled"][0], got["pooled"][-1])

    ds = xr.open_zarr(tmp_path / FEATURES_STORE, consolidated=False)
    assert ds["pooled"].dims == ("timestep", "layer", "site", "sample", "feature")
    assert list(ds["timestep"].values) == [0, 50, 400, 900] and list(ds["site"].values) == ["block", "attn", "mlp"]
    assert ds["pooled"].sel(timestep=400, site="mlp").shape == (2, 120, 32)
    lazy = da.from_zarr(str(tmp_path / FEATURES_STORE), component="pooled")
    np.testing.assert_array_equal(lazy[2].compute(), got["pooled"][2])


def test_rerun_of_a_finished_dump_computes_nothing(tiny, tmp_path: Path) -> None:
    dump_into(tiny, tmp_path)
    before = arrays(tmp_path)
    again, _ = dump_into(tiny, tmp_path)
    assert again.items_computed == 0 and again.items_reused == again.items_total
    assert all(np.array_equal(before[k], v) for k, v in arrays(tmp_path).items())


@pytest.mark.parametrize("hfr", [None, STREAM], ids=["pooled", "streamed-hfr"])
def test_two_workers_give_bit_identical_features(tiny, tmp_path: Path, hfr: HfrStream | None) -> None:
    dump_into(tiny, tmp_path / "one", hfr=hfr)
    result, _ = dump_into(tiny, tmp_path / "two", hfr=hfr, workers=2)
    assert result.items_computed == 16
    one, two = arrays(tmp_path / "one"), arrays(tmp_path / "two")
    assert set(one) == set(two) == ({"pooled"} if hfr is None else {"hfr"})
    assert all(np.array_equal(one[name], two[name]) for name in one)


@pytest.mark.parametrize("hfr", [None, STREAM], ids=["pooled", "streamed-hfr"])
def test_chunk_size_does_not_change_features(tiny, tmp_path: Path, hfr: HfrStream | None) -> None:
    dump_into(tiny, tmp_path / "c32", hfr=hfr)
    dump_into(tiny, tmp_path / "c50", hfr=hfr, images_per_chunk=50)
    small, large = arrays(tmp_path / "c32"), arrays(tmp_path / "c50")
    assert set(small) == set(large) and all(np.array_equal(small[name], large[name]) for name in small)


KILLABLE = """
import sys, time
import numpy as np
import aselect.pipelines.dump as dump
from aselect.pipelines.backbone import load_backbone
from aselect.pipelines.config import DumpConfig
real_write = dump.write_item
def slow_write(*args, **kwargs):  # slow each item down so the test can kill the dump mid-way
    written = real_write(*args, **kwargs)
    time.sleep(0.15)
    return written
dump.write_item = slow_write
from aselect.pipelines.streamed import HfrStream
model_dir, data, stage, streamed = sys.argv[1:5]
cfg = DumpConfig(timesteps=[0, 50, 400, 900], images_per_chunk=32)
hfr = HfrStream(sites=("attn", "attn_map"), cutoff=0.5) if streamed == "1" else None
layout = dump.plan_layout(load_backbone(model_dir), np.arange(120), cfg, hfr=hfr)
dump.run_dump(model_dir, dump.Path(data), dump.Path(stage), layout, cfg)
"""


@pytest.mark.parametrize("hfr", [None, STREAM], ids=["pooled", "streamed-hfr"])
def test_killed_dump_resumes_without_recomputing_finished_chunks(tiny, tmp_path: Path, hfr: HfrStream | None) -> None:
    model_dir, data = tiny
    stage = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, model_dir, str(data), str(stage), str(int(bool(hfr)))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(finished_items(stage)) < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = finished_items(stage)
    assert 5 <= len(finished_before) < 16, "the dump should have been killed mid-way"

    resumed, _ = dump_into(tiny, stage, hfr=hfr)
    assert resumed.items_reused == len(finished_before)
    assert resumed.items_computed == 16 - len(finished_before)
    dump_into(tiny, tmp_path / "clean", hfr=hfr)
    got, clean = arrays(stage), arrays(tmp_path / "clean")
    assert set(got) == set(clean) and all(np.array_equal(got[name], clean[name]) for name in clean)


def test_capture_cuts_the_forward_but_matches_a_full_pass(tiny) -> None:
    model_dir, _ = tiny
    backbone = load_backbone(model_dir)
    x0 = torch.randn(4, 1, 8, 8)
    cut = extract(backbone, x0, [0, 1, 2, 3], 300, layers=[0], sites=["block"], seed=0)
    full = extract(backbone, x0, [0, 1, 2, 3], 300, layers=[0, 1], sites=["block"], seed=0)
    assert torch.equal(cut[(0, "block")], full[(0, "block")])
    # a different seed or timestep gives different noise
    other = extract(backbone, x0, [0, 1, 2, 3], 300, layers=[0], sites=["block"], seed=1)
    assert not torch.equal(cut[(0, "block")], other[(0, "block")])


def test_attention_map_processor_leaves_outputs_unchanged(tiny) -> None:
    model_dir, _ = tiny
    backbone = load_backbone(model_dir)
    x = torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([10, 500]), torch.tensor([10, 10])
    reference = backbone.transformer(x, timestep=t, class_labels=y).sample
    sink: dict[int, torch.Tensor] = {}
    for layer, block in enumerate(backbone.transformer.transformer_blocks):
        block.attn1.set_processor(AttentionMapProcessor(sink, layer))
    torch.testing.assert_close(backbone.transformer(x, timestep=t, class_labels=y).sample, reference)
    assert sink[1].shape == (2, 16, 16)


@pytest.mark.parametrize(("cutoff", "message"), [
    (1.45, r"score\.hfr_cutoff 1\.45: no frequency of the 4x4 token grid is above it \(the highest is 1\.414\)"),
    (0.3, r"score\.hfr_cutoff 0\.3: every non-DC frequency of the 4x4 token grid is above it \(the lowest is 0\.500\)"),
])
def test_an_hfr_cutoff_outside_the_token_grid_is_refused(tiny, cutoff: float, message: str) -> None:
    hfr = HfrStream(sites=("attn",), cutoff=cutoff, exclude_dc=True)
    with pytest.raises(AselectError, match=message):
        plan_layout(load_backbone(tiny[0]), np.arange(10), DumpConfig(), hfr=hfr)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"timesteps": [0, 1000]}, r"dump\.timesteps \[1000\] must be < the scheduler's num_train_timesteps \(1000\)"),
    ({"layers": [0, 5]}, r"dump\.layers \[0, 5\]: the backbone has 2 layers \(0\.\.1\)"),
])
def test_out_of_range_timesteps_and_layers_are_refused(tiny, overrides: dict, message: str) -> None:
    with pytest.raises(AselectError, match=message):
        plan_layout(load_backbone(tiny[0]), np.arange(10), DumpConfig(**overrides))


def test_a_calibration_timestep_past_the_schedule_names_the_calibration_key(tiny) -> None:
    with pytest.raises(AselectError, match=r"^calibrate\.timesteps \(dump\.timesteps when unset\) \[1500\] must be <"):
        plan_layout(load_backbone(tiny[0]), np.arange(10), DumpConfig(timesteps=[0, 1500]), hfr=STREAM,
                    stage="calibrate")


def test_a_chunk_larger_than_the_data_holds_the_data_once(tiny, tmp_path: Path) -> None:
    # a chunk of 16 million images on 120: one chunk of 120 rows, the same values as a chunk of exactly 120
    _, layout = dump_into(tiny, tmp_path / "huge", images_per_chunk=16_777_215)
    _, exact = dump_into(tiny, tmp_path / "exact", images_per_chunk=120)
    assert layout.chunk == exact.chunk == 120
    huge = open_features(tmp_path / "huge")["pooled"]
    assert huge.chunks[3] == 120
    np.testing.assert_array_equal(huge[:], arrays(tmp_path / "exact")["pooled"])


def test_half_written_chunk_without_record_is_rewritten(tiny, tmp_path: Path) -> None:
    dump_into(tiny, tmp_path)
    good = arrays(tmp_path)["pooled"]
    group = zarr.open_group(tmp_path / FEATURES_STORE, mode="r+")
    group["pooled"][1, :, :, 32:64, :] = 123.0  # garbage, as if a write was cut short...
    (tmp_path / "done" / "t001-c00001").unlink()  # ...before its completion record
    again, _ = dump_into(tiny, tmp_path)
    assert again.items_computed == 1
    assert np.array_equal(arrays(tmp_path)["pooled"], good)


def test_disk_full_fails_in_one_line_and_resumes_after_space_is_freed(tiny, tmp_path: Path) -> None:
    """A dump into a 1 MiB tmpfs (the full dump needs ~4 MiB) stops with a clear error and resumes once it grows."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); needs root and CAP_SYS_ADMIN")
    full = {"sites": ["block", "attn", "mlp", "attn_map"], "spatial": True}
    try:
        stage = small / "dump"
        with pytest.raises(AselectError) as excinfo:
            dump_into(tiny, stage, **full)
        message = str(excinfo.value)
        assert "\n" not in message and message.startswith(f"{stage}: disk full while writing features")
        finished = finished_items(stage)
        assert 0 < len(finished) < 16
        subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
        result, _ = dump_into(tiny, stage, **full)
        assert result.items_reused == len(finished) and result.items_computed == 16 - len(finished)
        dump_into(tiny, tmp_path / "reference", **full)
        got, want = arrays(stage), arrays(tmp_path / "reference")
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# ---------------------------------------------------------------------------------------------
#                     The writer thread: overlap, bounded memory, errors, CUDA knobs
# ---------------------------------------------------------------------------------------------


def test_the_next_forward_pass_runs_while_the_previous_item_is_written(tiny, tmp_path: Path, monkeypatch) -> None:
    """Item k's write waits until the forward pass of item k+1 has started: only overlap lets it finish."""
    forwards: list[int] = []
    next_forward = threading.Event()
    real_extract, real_write = dump_module.extract, dump_module.write_item

    def extract_and_count(*args, **kwargs):
        forwards.append(args[3])
        if len(forwards) >= 2:
            next_forward.set()
        return real_extract(*args, **kwargs)

    def write_after_next_forward(group, stage_path, layout, ti, ci, *rest, **kwargs):
        if (ti, ci) == (0, 0):
            assert next_forward.wait(timeout=30), "the compute thread waited for the write: no overlap"
        return real_write(group, stage_path, layout, ti, ci, *rest, **kwargs)

    monkeypatch.setattr(dump_module, "extract", extract_and_count)
    monkeypatch.setattr(dump_module, "write_item", write_after_next_forward)
    result, _ = dump_into(tiny, tmp_path)
    assert result.items_computed == 16 and len(forwards) == 16
    assert set(result.phases) >= {"forward", "write", "record", "noise", "wait"} and result.phases["write"] > 0


def test_a_stalled_writer_stops_the_compute_thread_after_two_items(tiny, tmp_path: Path, monkeypatch) -> None:
    """Memory stays flat: with the writer stuck, at most `depth` items wait and one more is computed."""
    forwards: list[int] = []
    release = threading.Event()
    real_extract, real_write = dump_module.extract, dump_module.write_item

    def extract_and_count(*args, **kwargs):
        forwards.append(args[3])
        return real_extract(*args, **kwargs)

    def stuck_write(*args, **kwargs):
        release.wait(timeout=60)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(dump_module, "extract", extract_and_count)
    monkeypatch.setattr(dump_module, "write_item", stuck_write)
    worker = threading.Thread(target=dump_into, args=(tiny, tmp_path))
    worker.start()
    time.sleep(3.0)  # far longer than 16 forward passes of the tiny DiT take
    stalled_at = len(forwards)
    release.set()
    worker.join(timeout=120)
    assert stalled_at <= 4, f"{stalled_at} forward passes ran while the writer was stuck"
    assert len(forwards) == 16 and len(finished_items(tmp_path)) == 16


def test_a_failed_write_stops_the_dump_and_keeps_what_was_recorded(tiny, tmp_path: Path, monkeypatch) -> None:
    real_write = dump_module.write_item
    calls = []

    def fail_on_the_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.EIO, "input/output error")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(dump_module, "write_item", fail_on_the_fifth)
    with pytest.raises(OSError, match="input/output error"):
        dump_into(tiny, tmp_path)
    assert len(finished_items(tmp_path)) == 4  # the items before the failure, recorded; none after it
    monkeypatch.setattr(dump_module, "write_item", real_write)
    resumed, _ = dump_into(tiny, tmp_path)
    assert resumed.items_reused == 4 and resumed.items_computed == 12


def test_cuda_out_of_memory_names_the_key_and_keeps_finished_items(tiny, tmp_path: Path, monkeypatch) -> None:
    real_extract = dump_module.extract
    calls = []

    def out_of_memory_on_the_sixth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(dump_module, "extract", out_of_memory_on_the_sixth)
    with pytest.raises(AselectError) as caught:
        dump_into(tiny, tmp_path)
    message = str(caught.value)
    assert message.startswith("dump.images_per_chunk: 32 images do not fit") and "\n" not in message
    assert len(finished_items(tmp_path)) == 5  # every item computed before the failure was written


def test_autocast_auto_is_bf16_on_cuda_and_full_precision_on_the_cpu() -> None:
    assert DumpConfig().autocast == "auto"
    assert resolve_autocast("auto", torch.device("cpu")) is None
    assert resolve_autocast("bf16", torch.device("cpu")) is None  # CUDA only
    assert resolve_autocast("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_autocast("fp16", torch.device("cuda")) is torch.float16
    assert resolve_autocast("none", torch.device("cuda")) is None


def test_sensor_noise_is_one_fixed_draw_per_image_in_every_dump(tiny, tmp_path: Path) -> None:
    from aselect.pipelines.backbone import encode_images
    from aselect.pipelines.benchmark import pixel_baseline
    from aselect.pipelines.features import sensor_noise
    from aselect.storage.datasets import read_dataset

    clean, _ = dump_into(tiny, tmp_path / "clean", timesteps=[0, 400])
    dump_into(tiny, tmp_path / "noisy", timesteps=[0, 400], sensor_noise=0.5)
    dump_into(tiny, tmp_path / "rechunked", timesteps=[0, 400], sensor_noise=0.5, images_per_chunk=7)
    clean, noisy, rechunked = (arrays(tmp_path / n)["pooled"] for n in ("clean", "noisy", "rechunked"))
    # the noise depends on the image, not on its chunk; and it changes what the DiT sees
    np.testing.assert_array_equal(noisy, rechunked)
    assert np.abs(noisy - clean).mean() > 1e-3
    # the DiT's input is exactly the clean pixels plus that image's draw, the same draw the pixel baseline takes
    model_dir, data_dir = tiny
    data = read_dataset(data_dir)
    draw = sensor_noise(data.images.shape[1:], [3, 5], 0.5, seed=0)
    assert 0.4 < float(draw.std()) < 0.6
    np.testing.assert_array_equal(draw[1], sensor_noise(data.images.shape[1:], [5], 0.5, seed=0)[0])
    backbone = load_backbone(model_dir)
    unit = torch.from_numpy(data.images[[3, 5]]).float() / 127.5 - 1.0
    torch.testing.assert_close(encode_images(backbone, torch.from_numpy(data.images[[3, 5]]), draw), unit + draw)
    args = (data.labels, data.train_idx, data.test_idx, None, 2, [1.0], 0.2, 0)
    assert pixel_baseline(data.images, *args)["value"] > pixel_baseline(data.images, *args, noise_std=3.0)["value"]
