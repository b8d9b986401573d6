"""Tests for pipelines.backbone: size variants, load layouts, load errors, pretraining, kill/resume."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded, even by accident

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, UNet2DModel
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file

from pipelines.backbone import (
    VARIANTS,
    Backbone,
    build_dit,
    encode_images,
    load_backbone,
    make_scheduler,
    pretrain,
    sample_images,
    save_grid,
)
from pipelines.config import BackboneConfig, PretrainConfig
from pipelines.errors import AselectError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
#                                            Helpers
# ---------------------------------------------------------------------------------------------


def bars(n: int = 64, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A tiny two-class dataset: horizontal bars (class 0) and vertical bars (class 1), jittered."""
    rng = np.random.default_rng(0)
    images = np.zeros((n, 1, size, size), dtype=np.uint8)
    labels = np.arange(n) % 2
    for i, label in enumerate(labels):
        at = rng.integers(1, size - 2)
        if label:
            images[i, 0, :, at : at + 2] = 255
        else:
            images[i, 0, at : at + 2, :] = 255
    return images, labels


def xs_config(steps: int, every: int = 1000) -> BackboneConfig:
    """The smoke-test config: DiT-XS/2, small batches, one thread (bit-identical reruns)."""
    return BackboneConfig(
        kind="pretrain",
        variant="DiT-XS/2",
        pretrain=PretrainConfig(steps=steps, batch_size=16, warmup_steps=10, checkpoint_every=every),
        threads=1,
    )


def tiny_dit(in_channels: int = 1, sample_size: int = 8, out_channels: int | None = None) -> torch.nn.Module:
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=1,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=3,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------------------------------------
#                                       Variants & building
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, hidden, layers, patch",
    [("DiT-XS/2", 32, 2, 2), ("DiT-T/2", 128, 6, 2), ("DiT-T/4", 128, 6, 4)],
)
def test_build_dit_variants(name: str, hidden: int, layers: int, patch: int) -> None:
    model = build_dit(name, image_size=16, channels=1, num_classes=10)
    assert model.inner_dim == hidden
    assert len(model.transformer_blocks) == layers
    assert model.config.patch_size == patch
    assert model.config.out_channels == 1 and model.config.num_embeds_ada_norm == 10
    # adaLN-Zero init: the untrained model predicts exactly zero noise.
    t, y = torch.tensor([0, 999]), torch.tensor([0, 10])
    out = model(torch.randn(2, 1, 16, 16), timestep=t, class_labels=y)
    assert out.sample.shape == (2, 1, 16, 16)
    assert torch.count_nonzero(out.sample) == 0


def test_paper_variant_sizes() -> None:
    hidden = {n: v["num_attention_heads"] * v["attention_head_dim"] for n, v in VARIANTS.items()}
    assert hidden["DiT-S/2"] == 384 and hidden["DiT-B/2"] == 768
    assert hidden["DiT-L/2"] == 1024 and hidden["DiT-XL/2"] == 1152
    layers = [VARIANTS[n]["num_layers"] for n in ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2")]
    assert layers == [12, 12, 24, 28]


def test_unknown_variant() -> None:
    assert "DiT-Q/3" not in VARIANTS
    with pytest.raises(AselectError, match="unknown DiT variant 'DiT-Q/3'"):
        build_dit("DiT-Q/3", 16, 1, 10)
    with pytest.raises(ValidationError, match="unknown variant"):
        BackboneConfig(kind="pretrain", variant="DiT-Q/3")
    with pytest.raises(AselectError, match="not a multiple of patch size 4"):
        build_dit("DiT-T/4", 18, 1, 10)


# ---------------------------------------------------------------------------------------------
#                                         Loading layouts
# ---------------------------------------------------------------------------------------------


def test_latent_dit_pipeline_directory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    transformer = tiny_dit(in_channels=4, sample_size=8, out_channels=8)  # learned sigma, like DiT-XL/2
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(tmp_path)

    backbone = load_backbone(str(tmp_path))
    assert isinstance(backbone, Backbone)
    assert backbone.kind == "latent" and backbone.source == str(tmp_path)
    assert backbone.image_size == 16 and backbone.image_channels == 3
    assert backbone.null_class == 3 and backbone.num_layers == 1
    assert type(backbone.scheduler).__name__ == "DDPMScheduler"

    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    latents = encode_images(backbone, images)
    assert latents.shape == (2, 4, 8, 8)
    # Grey and differently sized images are adapted to the backbone's input.
    assert encode_images(backbone, torch.zeros(2, 1, 12, 12, dtype=torch.uint8)).shape == (2, 4, 8, 8)

    null = torch.full((2,), backbone.null_class)
    with torch.no_grad():
        out = backbone.transformer(latents, timestep=torch.tensor([10, 500]), class_labels=null).sample
    assert out.shape == (2, 8, 8, 8)

    samples = sample_images(backbone, [0, 1], steps=2, guidance_scale=1.5, seed=0)
    assert samples.shape == (2, 3, 16, 16) and samples.dtype == np.uint8


def test_pixel_layout_pretrain_output(tmp_path: Path) -> None:
    """Layout (b): transformer/ + scheduler/, no model_index.json, no vae."""
    tiny_dit().save_pretrained(tmp_path / "transformer")
    make_scheduler(500, "squaredcos_cap_v2").save_pretrained(tmp_path / "scheduler")

    backbone = load_backbone(str(tmp_path))
    assert backbone.kind == "pixel" and backbone.vae is None
    assert backbone.image_size == 8 and backbone.image_channels == 1 and backbone.null_class == 3
    assert backbone.scheduler.config.num_train_timesteps == 500
    assert backbone.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    images = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    images[..., ::2] = 255
    x = encode_images(backbone, images)
    assert x.shape == (1, 1, 8, 8) and set(x.unique().tolist()) == {-1.0, 1.0}


def test_pixel_layout_bare_transformer(tmp_path: Path) -> None:
    """Layout (c): a bare transformer directory gets the default DDPM linear 1000-step schedule."""
    model = tiny_dit()
    model.save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert backbone.kind == "pixel"
    assert backbone.scheduler.config.num_train_timesteps == 1000
    assert backbone.scheduler.config.beta_schedule == "linear"
    for name, tensor in model.state_dict().items():
        assert torch.equal(backbone.transformer.state_dict()[name], tensor), name
    images = np.full((3, 1, 8, 8), 255, dtype=np.uint8)
    assert torch.equal(encode_images(backbone, torch.from_numpy(images)), torch.ones(3, 1, 8, 8))


def test_legacy_transformer2d_class_name(tmp_path: Path) -> None:
    """Hub DiTs converted before DiTTransformer2DModel existed say Transformer2DModel + ada_norm_zero."""
    tiny_dit().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["_class_name"] = "Transformer2DModel"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_backbone(str(tmp_path)).num_layers == 1


def test_hub_id_resolved_from_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someorg--tiny-dit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tiny_dit().save_pretrained(repo / "snapshots" / commit)

    backbone = load_backbone("someorg/tiny-dit")
    assert backbone.source == "someorg/tiny-dit" and backbone.kind == "pixel"
    with pytest.raises(AselectError, match="someorg/absent-dit: .*not in the local Hugging Face cache"):
        load_backbone("someorg/absent-dit")


# ---------------------------------------------------------------------------------------------
#                                          Load errors
# ---------------------------------------------------------------------------------------------


def test_error_missing_directory(tmp_path: Path) -> None:
    expected = f"{tmp_path / 'nope'}: backbone directory does not exist"
    with pytest.raises(AselectError, match=re.escape(expected)):
        load_backbone(str(tmp_path / "nope"))


def test_error_config_not_a_dit(tmp_path: Path) -> None:
    UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(tmp_path)
    expected = f"{tmp_path / 'config.json'}: _class_name is 'UNet2DModel', expected DiTTransformer2DModel"
    with pytest.raises(AselectError, match=re.escape(expected)):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize("text, problem", [("{not json", "invalid JSON"), ("[1, 2]", "invalid JSON")])
def test_error_config_invalid_json(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(AselectError, match=re.escape(f"{tmp_path / 'config.json'}: {problem}")):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize("layout", ["bare", "pretrain-output"])
def test_error_truncated_weights(tmp_path: Path, layout: str) -> None:
    where = tmp_path if layout == "bare" else tmp_path / "transformer"
    tiny_dit().save_pretrained(where)
    weights_file = where / "diffusion_pytorch_model.safetensors"
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(AselectError, match=re.escape(f"{where}: cannot load weights (")) as info:
        load_backbone(str(tmp_path))
    assert "\n" not in str(info.value)


def test_error_missing_weights(tmp_path: Path) -> None:
    tiny_dit().save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(AselectError, match=re.escape(f"{tmp_path}: cannot load weights (no ")):
        load_backbone(str(tmp_path))


def test_error_no_layout(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    expected = f"{tmp_path}: not a DiT directory (expected model_index.json, transformer/ or config.json)"
    with pytest.raises(AselectError, match=re.escape(expected)):
        load_backbone(str(tmp_path))


# ---------------------------------------------------------------------------------------------
#                                   Pretraining, sampling, resume
# ---------------------------------------------------------------------------------------------


def test_pretrain_learns_and_saves_a_loadable_model(tmp_path: Path) -> None:
    images, labels = bars()
    calls: list[tuple[int, int, float]] = []
    result = pretrain(images, labels, 2, xs_config(200), tmp_path, progress=lambda *a: calls.append(a))

    assert result.steps == 200 and result.resumed_from == 0 and result.seconds > 0
    assert 50 <= len(result.loss_curve) <= 101 and result.loss_curve[-1][0] == 200
    losses = [loss for _, loss in result.loss_curve]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert len(calls) >= 50 and calls[-1][:2] == (200, 200)

    backbone = load_backbone(str(tmp_path / "model"))
    assert backbone.kind == "pixel" and backbone.null_class == 2 and backbone.image_size == 8
    assert not (tmp_path / "checkpoints").exists()

    samples = sample_images(backbone, [0, 1, 0, 1], steps=5, guidance_scale=2.0, seed=0)
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == np.uint8
    assert np.array_equal(samples, sample_images(backbone, [0, 1, 0, 1], steps=5, guidance_scale=2.0, seed=0))
    save_grid(samples, tmp_path / "grid.png", nrow=2)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.mode == "L" and grid.size == (2 * 8 * 8 + 3 * 2 * 8,) * 2  # 8x upscaled, 2px padding

    # A finished model is reused, not retrained.
    calls.clear()
    again = pretrain(images, labels, 2, xs_config(200), tmp_path, progress=lambda *a: calls.append(a))
    assert again == result and not calls


CHILD = """
import sys, time
from pathlib import Path
import test_backbone as T
from pipelines.backbone import pretrain

out = Path(sys.argv[1])

def hang_late(step, total, loss):
    # Simulate a crash late in the run: stop making progress until SIGKILLed.
    if step >= 160:
        (out / "hung").touch()
        time.sleep(600)

images, labels = T.bars()
pretrain(images, labels, 2, T.xs_config(300, every=50), out, progress=hang_late)
"""


def test_kill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    killed.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(killed)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (killed / "hung").exists():
            assert child.poll() is None, f"pretrain child exited early: {child.stderr.read()}"
            assert time.monotonic() < deadline, "pretrain child never reached step 160"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (killed / "checkpoints").glob("step-*.pt"))
    assert checkpoints == ["step-0000100.pt", "step-0000150.pt"]  # only the latest 2 are kept
    assert not (killed / "model").exists()
    (killed / "checkpoints" / "step-0000200.pt").write_bytes(b"torn write")  # unreadable: must be skipped

    images, labels = bars()
    resumed = pretrain(images, labels, 2, xs_config(300, every=50), killed)
    reference = pretrain(images, labels, 2, xs_config(300, every=50), fresh)
    assert resumed.resumed_from == 150 and reference.resumed_from == 0
    assert resumed.loss_curve == reference.loss_curve

    got, want = weights(killed / "model" / "transformer"), weights(fresh / "model" / "transformer")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
