"""Tests for pipelines.models, backbone and pretrain: sizes, load layouts and errors, pretraining, kill/resume."""

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

from aselect.pipelines.backbone import describe, encode_images, load_backbone
from aselect.pipelines.config import BackboneConfig, LatentConfig, PretrainConfig, load_config
from aselect.pipelines.models import VARIANTS, Backbone, build_dit, make_scheduler
from aselect.pipelines.pretrain import pretrain, sample_images, save_grid
from aselect.storage.code import code_digest
from aselect.storage.errors import AselectError

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


def latent_config(steps: int = 8, every: int = 1000, vae_steps: int = 16) -> BackboneConfig:
    """xs_config plus a tiny VAE phase: blocks [8, 16] (2x down), 4 latent channels."""
    return BackboneConfig(
        kind="pretrain",
        variant="DiT-XS/2",
        pretrain=PretrainConfig(steps=steps, batch_size=16, warmup_steps=2, checkpoint_every=every),
        latent=LatentConfig(vae_blocks=[8, 16], latent_channels=4, steps=vae_steps, batch_size=16),
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
    expected = f"{tmp_path}: not a backbone directory (expected model_index.json, transformer/ or config.json)"
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


def test_torch_threads_restores_the_count_it_found() -> None:
    from aselect.pipelines.threads import torch_threads

    found = torch.get_num_threads()
    with torch_threads(found + 2):
        assert torch.get_num_threads() == found + 2
        torch.set_num_threads(found + 1)  # whatever the work sets in between
    assert torch.get_num_threads() == found
    with pytest.raises(RuntimeError), torch_threads(found + 2):
        raise RuntimeError("the work failed")
    assert torch.get_num_threads() == found
    with torch_threads(None):
        assert torch.get_num_threads() == found


def test_backbone_stage_leaves_the_torch_thread_count_as_it_found_it(
        prefect_api_url: str, tiny: tuple[str, Path], tmp_path: Path) -> None:
    """A first run (pretraining with `backbone.threads`) and a cached rerun leave the process alike."""
    from prefect import flow

    from aselect.storage.stages import StageRef, Workdir
    from aselect.tasks.backbone import backbone, plan_backbone

    dataset = StageRef("ingest", "0123456789abcdef", str(tiny[1]))
    cfg = xs_config(4).model_copy(update={"pretrain": PretrainConfig(steps=4, batch_size=16, warmup_steps=1,
                                                                    checkpoint_every=1000, sample_steps=2)})
    stage = plan_backbone(Workdir(tmp_path), cfg, dataset)

    @flow(name="backbone-threads")
    def backbone_only() -> None:
        backbone(stage, cfg, dataset)

    found = torch.get_num_threads()
    process = found + 1  # neither what the stage sets (backbone.threads=1) nor torch's default here
    torch.set_num_threads(process)
    try:
        backbone_only()
        assert torch.get_num_threads() == process and stage.dir.is_complete()
        manifest = stage.dir.read_manifest()
        backbone_only()  # read back from the stage directory: no work, no thread change
        assert torch.get_num_threads() == process and stage.dir.read_manifest() == manifest
    finally:
        torch.set_num_threads(found)


CHILD = """
import sys, time
from pathlib import Path
import test_backbone as T
from aselect.pipelines.pretrain import pretrain

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
    # one flipped bit in the latest complete checkpoint: torch still loads it (other weights), so only its
    # checksum can tell, and the resume must start from the one before
    damaged = killed / "checkpoints" / "step-0000150.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    torch.load(damaged, map_location="cpu", weights_only=False)

    images, labels = bars()
    resumed = pretrain(images, labels, 2, xs_config(300, every=50), killed)
    reference = pretrain(images, labels, 2, xs_config(300, every=50), fresh)
    assert resumed.resumed_from == 100 and reference.resumed_from == 0
    assert resumed.loss_curve == reference.loss_curve

    got, want = weights(killed / "model" / "transformer"), weights(fresh / "model" / "transformer")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


# ---------------------------------------------------------------------------------------------
#                                  Latent pretraining (VAE + DiT)
# ---------------------------------------------------------------------------------------------


def test_latent_pretrain_saves_a_loadable_latent_backbone(tmp_path: Path) -> None:
    images, labels = bars(64, 16)
    calls: list[tuple[int, int, float]] = []
    result = pretrain(images, labels, 2, latent_config(), tmp_path, progress=lambda *a: calls.append(a))

    assert result.steps == 8 and result.resumed_from == 0 and result.vae is not None
    assert result.vae.steps == 16 and not result.vae.reused and result.vae.loss_curve[-1][0] == 16
    assert result.vae.loss_curve[-1][1] < result.vae.loss_curve[0][1]  # the VAE learns
    assert calls[-1][:2] == (24, 24)  # progress runs over both phases
    model_dir = tmp_path / "model"
    assert json.loads((model_dir / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    assert not (tmp_path / "vae").exists() and not (tmp_path / "checkpoints").exists()

    backbone = load_backbone(str(model_dir))
    assert backbone.kind == "latent" and backbone.image_size == 16 and backbone.image_channels == 1
    assert backbone.vae_scale_factor == 2 and backbone.null_class == 2
    assert backbone.transformer.config.in_channels == 4 and backbone.transformer.config.sample_size == 8
    assert backbone.scheduler.config.clip_sample is False  # latents are not confined to [-1, 1]
    info = describe(backbone)
    assert info["kind"] == "latent" and info["short"].startswith("DiT (DDPM), latent (16 px -> 4x8x8)")
    assert info["vae"]["scaling_factor"] == result.vae.scaling_factor == backbone.vae.config.scaling_factor

    # The recorded scaling_factor gives the train set's latents unit std, as the DiT was trained on.
    latents = encode_images(backbone, torch.from_numpy(images))
    assert latents.shape == (64, 4, 8, 8)
    assert abs(float(latents.std()) - 1.0) < 0.01
    samples = sample_images(backbone, [0, 1], steps=3, guidance_scale=2.0, seed=0)
    assert samples.shape == (2, 1, 16, 16) and samples.dtype == np.uint8

    # A finished model is reused, not retrained; changing the latent section retrains.
    assert pretrain(images, labels, 2, latent_config(), tmp_path) == result
    other = pretrain(images, labels, 2, latent_config(vae_steps=12), tmp_path)
    assert other.vae is not None and other.vae.steps == 12 and not other.vae.reused


LATENT_CHILD = """
import sys
from pathlib import Path
import test_backbone as T
from aselect.pipelines.pretrain import pretrain

images, labels = T.bars(64, 16)
pretrain(images, labels, 2, T.latent_config(steps=8, every=2), Path(sys.argv[1]))
"""


def test_latent_kill_after_vae_phase_resumes_without_retraining_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    killed.mkdir()
    # SIGKILL at the DiT's 3rd step (storage/faults.py): the VAE and the step-2 checkpoint are on disk.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               ASELECT_FAILPOINT="pretrain@3")
    child = subprocess.run([sys.executable, "-c", LATENT_CHILD, str(killed)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    vae_weights = killed / "vae" / "diffusion_pytorch_model.safetensors"
    assert vae_weights.is_file() and (killed / "vae" / "done.json").is_file()
    assert [p.name for p in (killed / "checkpoints").glob("step-*.pt")] == ["step-0000002.pt"]
    assert not (killed / "model").exists()
    saved, mtime = weights(killed / "vae"), vae_weights.stat().st_mtime_ns

    def no_retraining(*args: object, **kwargs: object) -> None:
        raise AssertionError("the VAE was trained again")

    images, labels = bars(64, 16)
    seen: list[int] = []  # the saved VAE's mtime at each DiT step (it is removed once the model is saved)
    with monkeypatch.context() as patch, caplog.at_level("INFO", logger="aselect.backbone"):
        patch.setattr("aselect.pipelines.pretrain._train_vae", no_retraining)
        resumed = pretrain(images, labels, 2, latent_config(steps=8, every=2), killed,
                           progress=lambda *a: seen.append(vae_weights.stat().st_mtime_ns))
    assert seen and set(seen) == {mtime}  # never rewritten
    assert "reusing the VAE trained earlier" in caplog.text
    assert resumed.resumed_from == 2 and resumed.vae is not None and resumed.vae.reused
    got = weights(killed / "model" / "vae")
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)

    # The resumed run is the uninterrupted one, bit for bit (one thread).
    reference = pretrain(images, labels, 2, latent_config(steps=8, every=2), fresh)
    assert resumed.loss_curve == reference.loss_curve
    assert resumed.vae.scaling_factor == reference.vae.scaling_factor
    got, want = weights(killed / "model" / "transformer"), weights(fresh / "model" / "transformer")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_latent_pretrain_rejects_indivisible_images(tmp_path: Path) -> None:
    images, labels = bars(8, 10)
    cfg = latent_config().model_copy(update={"latent": LatentConfig(vae_blocks=[8, 8, 16])})
    with pytest.raises(AselectError, match=r"^pretrain: image size 10 is not divisible by the downsampling 4 "):
        pretrain(images, labels, 2, cfg, tmp_path)


@pytest.mark.parametrize(("overrides", "pattern"), [
    (["ingest.image_size=30", "backbone.latent.vae_blocks=[8, 16, 32]"],
     r"ingest\.image_size 30 is not divisible by the downsampling 4 of backbone\.latent\.vae_blocks \[8, 16, 32\]"),
    (["ingest.image_size=36", "backbone.latent.vae_blocks=[8, 16, 32]"],
     r"backbone\.latent\.vae_blocks \[8, 16, 32\] makes 9x9 latents .* not a multiple of DiT-T/2's patch size 2"),
    (["ingest.image_size=256"], r"ingest\.image_size 256 makes 4096 tokens .*latent downsampling 2.*<= 128\)"),
    (["backbone.latent.vae_blocks=[]"], r"backbone\.latent\.vae_blocks: List should have at least 1 item"),
    (["backbone.latent.vae_blocks=[0, 8]"], r"backbone\.latent\.vae_blocks: block widths must be >= 1"),
    (["backbone.latent.kl_weights=0.1"], r"backbone\.latent\.kl_weights: unknown key"),
    (["backbone.kind=load", "backbone.path=x"], r"backbone: latent is only used by kind 'pretrain'"),
])
def test_latent_config_errors_are_one_line_naming_the_field(overrides: list[str], pattern: str) -> None:
    with pytest.raises(AselectError, match=pattern) as info:
        load_config("digits-latent", overrides)
    assert "\n" not in str(info.value)


def test_latent_section_changes_the_stage_key(tmp_path: Path) -> None:
    from aselect.storage.stages import StageRef, Workdir, stage_key
    from aselect.tasks.backbone import plan_backbone

    work, dataset = Workdir(tmp_path), StageRef("ingest", "0123456789abcdef", str(tmp_path / "ingest"))
    cfg = load_config("digits-latent").backbone
    pixel = cfg.model_copy(update={"latent": None})
    keys = {plan_backbone(work, c, dataset).key for c in (
        pixel, cfg, cfg.model_copy(update={"latent": cfg.latent.model_copy(update={"steps": 7})}))}
    assert len(keys) == 3
    # A pixel-space config keeps the key it had before `latent` existed (existing workdirs stay valid).
    unused = {"path", "threads", "latent", "family", "flow_shift", "prompt_embeds", "image_size", "use_t5"}
    before = stage_key("backbone", pixel.model_dump(mode="json", exclude=unused),
                       {"ingest": dataset.key}, code_digest("aselect.tasks.backbone"))
    assert plan_backbone(work, pixel, dataset).key == before


def test_digits_latent_config_shapes() -> None:
    cfg = load_config("digits-latent")
    assert cfg.ingest.image_size == 32 and cfg.backbone.variant == "DiT-T/2"
    assert cfg.backbone.latent is not None and cfg.backbone.latent.downsample == 2  # 16x16 latents
    assert 32 // cfg.backbone.latent.downsample // VARIANTS["DiT-T/2"]["patch_size"] == 8  # 8x8 tokens
