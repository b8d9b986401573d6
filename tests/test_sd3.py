"""The SD3 family (MMDiT + rectified flow) with real parts: its timestep convention against diffusers' own
FlowMatchEulerDiscreteScheduler, loading StableDiffusion3Pipeline directories (the empty prompt, its errors), the
feature sites of an MMDiT, and whole runs (pretrained, loaded, exhaustive, cached, killed and resumed) against
the session's Prefect server.

Pipelines come from `sd3_tiny.build_sd3_pipeline`: tiny, random, written to disk offline. The end-to-end ones feed
the smoke config's 8x8 digits to a 4x4-latent MMDiT at `backbone.image_size=16` (8x8 latents, 4x4 tokens; its
positional table covers up to 16 px), so HFR has a token grid to look at.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file
from sd3_tiny import JOINT_DIM, POOLED_DIM, build_sd3_pipeline, null_components
from test_faults import aselect, stage_files  # one rule for "a stage's outputs, timings aside"

from aselect.pipelines.backbone import CONDITIONING_FILE, SOURCE_FILE, LoadOptions, describe, load_backbone
from aselect.pipelines.features import ATTN_MAP, JointAttentionMapProcessor, extract
from aselect.pipelines.models import Backbone, build_dit, build_mmdit, make_scheduler, noise_point
from aselect.pipelines.pretrain import flow_sigmas
from aselect.storage.errors import AselectError

CLIP_TOKENS, T5_TOKENS = 77, 256  # the pipeline's CLIP padding and default T5 length: 333 prompt tokens
# every SD3 run pins the pretraining threads (not part of any stage key): a run killed in a subprocess and
# resumed in this process train bit-identically
SD3 = ["backbone.family=sd3", "backbone.threads=1"]


def one_line(info: pytest.ExceptionInfo[AselectError], *parts: object) -> str:
    """The error's message, checked to be one line that names every one of `parts`."""
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert str(part) in message, f"{part!r} not in {message!r}"
    return message


def encode_with_diffusers(directory: Path, t5: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`StableDiffusion3Pipeline.encode_prompt("")` of a pipeline directory, without guidance (T5 left out unless
    asked: its part is then zeros), under no_grad as the pipeline's own `__call__` runs it (T5's attention takes
    another kernel with autograd on: ~1e-5 apart)."""
    skip = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(directory, local_files_only=True,
                                                    **{**null_components(directory), **skip})
    with torch.no_grad():
        prompt, negative, pooled, _ = pipe.encode_prompt(prompt="", prompt_2=None, prompt_3=None, device="cpu",
                                                         do_classifier_free_guidance=False)
    assert negative is None
    return prompt, pooled


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3 pipeline with both CLIP encoders: 4x4 latents (8 px by default), 4 latent channels, 2 blocks."""
    return build_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe", sample_size=4, vae_blocks=(8, 16))


@pytest.fixture(scope="module")
def sd3_backbone(sd3_dir: Path) -> Backbone:
    """`sd3_dir` loaded at 16 px: 8x8 latents, 4x4 = 16 image tokens, conditioned on the encoded empty prompt."""
    return load_backbone(str(sd3_dir), LoadOptions(image_size=16))


# ---------------------------------------------------------------------------------------------
#                             1. One timestep convention, two schedules
# ---------------------------------------------------------------------------------------------


def test_paper_t_maps_through_the_flow_schedulers_own_sigma_table() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    point = noise_point(scheduler, 50)
    assert point.t == 50 and point.index == 950 and point.alpha_bar is None
    assert point.sigma == float(scheduler.sigmas[950])
    assert point.sigma == pytest.approx(3 * 0.05 / (1 + 2 * 0.05), rel=1e-6)  # SD3's shift of sigma 0.05: ~0.136
    assert point.model_timestep == pytest.approx(float(scheduler.timesteps[950]), rel=1e-6)
    assert point.record() == {"t": 50, "scheduler_index": 950, "model_timestep": 136.3636, "sigma": 0.136364}

    clean = noise_point(scheduler, 0)
    assert clean.sigma == 0.0 and clean.model_timestep == 0.0 and clean.index == 1000  # the table's terminal
    last = noise_point(scheduler, 999)
    assert last.index == 1 and last.sigma == float(scheduler.sigmas[1]) and last.sigma < 1.0
    assert last.model_timestep == pytest.approx(float(scheduler.timesteps[1]), rel=1e-6)
    for bad in (-1, 1000, 5000):
        with pytest.raises(AselectError, match=rf"timestep {bad} is outside \[0, 1000\)"):
            noise_point(scheduler, bad)

    # the shift is the scheduler's, not a constant: unshifted, t=50 is sigma 0.05
    assert noise_point(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), 50).sigma == \
        pytest.approx(0.05, rel=1e-6)
    # pretraining noises with the same table the features are read at
    sigmas = flow_sigmas(scheduler)
    assert sigmas.shape == (1000,)
    assert [float(sigmas[t]) for t in (0, 1, 50, 500, 999)] == pytest.approx(
        [noise_point(scheduler, t).sigma for t in (0, 1, 50, 500, 999)], abs=1e-7)
    assert bool((sigmas[1:] > sigmas[:-1]).all())  # noisier as t grows


def test_paper_t_is_ddpms_own_timestep_and_alpha_bar() -> None:
    scheduler = make_scheduler(1000, "linear")
    assert isinstance(scheduler, DDPMScheduler)
    for t in (0, 50, 999):
        point = noise_point(scheduler, t)
        assert (point.index, point.model_timestep, point.sigma) == (t, float(t), None)
        assert point.alpha_bar == float(scheduler.alphas_cumprod[t])
    assert noise_point(scheduler, 50).record() == {"t": 50, "scheduler_index": 50, "model_timestep": 50.0,
                                                   "alpha_bar": round(float(scheduler.alphas_cumprod[50]), 6)}
    with pytest.raises(AselectError, match=r"timestep 1000 is outside \[0, 1000\)"):
        noise_point(scheduler, 1000)


def test_add_noise_is_rectified_flow_for_sd3_and_ddpm_for_dit() -> None:
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=generator), torch.randn(3, 4, 4, 4, generator=generator)
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    mmdit = Backbone(transformer=build_mmdit("MMDiT-XS/2", 4, 4), scheduler=flow, vae=None, source="test")
    assert mmdit.family == "sd3" and mmdit.flow
    for t in (50, 500, 999):
        sigma = float(flow.sigmas[1000 - t])
        torch.testing.assert_close(mmdit.add_noise(x0, eps, t), sigma * eps + (1 - sigma) * x0, rtol=0, atol=1e-6)
        # diffusers' own forward process at the same point of its training table
        torch.testing.assert_close(mmdit.add_noise(x0, eps, t), flow.scale_noise(x0, flow.timesteps[1000 - t:][:1],
                                                                                  eps), rtol=0, atol=1e-6)
    assert torch.equal(mmdit.add_noise(x0, eps, 0), x0)  # t = 0 is the clean input

    ddpm = make_scheduler(1000, "linear")
    dit = Backbone(transformer=build_dit("DiT-XS/2", 4, 4, 10), scheduler=ddpm, vae=None, source="test")
    assert dit.family == "dit" and not dit.flow
    for t in (0, 50, 999):
        want = ddpm.add_noise(x0, eps, torch.full((3,), t, dtype=torch.long))
        assert torch.equal(dit.add_noise(x0, eps, t), want)
        bar = float(ddpm.alphas_cumprod[t])
        torch.testing.assert_close(want, bar ** 0.5 * x0 + (1 - bar) ** 0.5 * eps, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
#                          2. Loading SD3 pipeline directories, and their errors
# ---------------------------------------------------------------------------------------------


def test_a_pipeline_directory_loads_conditioned_on_the_empty_prompt_as_diffusers_encodes_it(
        sd3_dir: Path, sd3_backbone: Backbone) -> None:
    backbone = load_backbone(str(sd3_dir))
    assert backbone.family == "sd3" and backbone.flow and backbone.kind == "latent"
    assert backbone.scheduler.config.shift == 3.0 and backbone.null_class == -1
    assert backbone.image_size == 8 and backbone.token_grid == 2  # sample_size 4 x the VAE's 2x
    prompt, pooled = encode_with_diffusers(sd3_dir)
    assert prompt.shape == (1, CLIP_TOKENS + T5_TOKENS, JOINT_DIM) and pooled.shape == (1, POOLED_DIM)
    got = backbone.conditioning
    assert got.prompt_embeds.shape == prompt.shape and got.pooled_prompt_embeds.shape == pooled.shape
    assert torch.equal(got.prompt_embeds, prompt) and torch.equal(got.pooled_prompt_embeds, pooled)
    assert got.prompt_embeds.abs().sum() > 0 and got.class_pooled is None
    info = describe(backbone)
    assert info["family"] == "sd3" and info["conditioning"] == {"prompt_embeds": [1, 333, JOINT_DIM],
                                                                "pooled_prompt_embeds": [1, POOLED_DIM]}
    # backbone.image_size: up to the positional table (4 patches a side x 2 px x patch 2 = 16 px)
    assert sd3_backbone.image_size == 16 and sd3_backbone.token_grid == 4
    assert describe(sd3_backbone)["short"].startswith("MMDiT (sd3, rectified flow), latent (16 px -> 4x8x8)")
    assert torch.equal(sd3_backbone.conditioning.prompt_embeds, prompt)


def test_t5_is_encoded_only_when_asked(tmp_path: Path) -> None:
    directory = build_sd3_pipeline(tmp_path / "t5", sample_size=4, vae_blocks=(8, 16), t5=True)
    without = load_backbone(str(directory)).conditioning
    assert not without.prompt_embeds[:, CLIP_TOKENS:].any()  # the published setting: T5's part is zeros
    assert torch.equal(without.prompt_embeds, encode_with_diffusers(directory)[0])
    with_t5 = load_backbone(str(directory), LoadOptions(use_t5=True)).conditioning
    prompt, pooled = encode_with_diffusers(directory, t5=True)
    assert with_t5.prompt_embeds[:, CLIP_TOKENS:].abs().sum() > 0
    assert torch.equal(with_t5.prompt_embeds, prompt) and torch.equal(with_t5.pooled_prompt_embeds, pooled)


def test_a_prompt_embeddings_file_conditions_the_mmdit_instead_of_its_text_encoders(sd3_dir: Path,
                                                                                      tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    prompt, pooled = torch.randn(1, 7, JOINT_DIM, generator=generator), torch.randn(1, POOLED_DIM, generator=generator)
    embeds = tmp_path / "empty-prompt.safetensors"
    save_file({"prompt_embeds": prompt, "pooled_prompt_embeds": pooled}, str(embeds))
    bare = build_sd3_pipeline(tmp_path / "bare", sample_size=4, vae_blocks=(8, 16), text_encoders=False)
    for directory in (bare, sd3_dir):  # without text encoders, and instead of the ones it has
        got = load_backbone(str(directory), LoadOptions(prompt_embeds=str(embeds))).conditioning
        assert torch.equal(got.prompt_embeds, prompt) and torch.equal(got.pooled_prompt_embeds, pooled)
    # unbatched tensors are taken as one prompt
    save_file({"prompt_embeds": prompt[0], "pooled_prompt_embeds": pooled[0]}, str(embeds))
    assert load_backbone(str(bare), LoadOptions(prompt_embeds=str(embeds))).conditioning.prompt_embeds.shape == \
        (1, 7, JOINT_DIM)


def test_an_mmdit_without_text_encoders_or_prompt_embeddings_is_one_line(tmp_path: Path) -> None:
    bare = build_sd3_pipeline(tmp_path / "bare", sample_size=4, vae_blocks=(8, 16), text_encoders=False)
    with pytest.raises(AselectError) as info:
        load_backbone(str(bare))
    one_line(info, bare, "no text encoders", "backbone.prompt_embeds")


@pytest.mark.parametrize(("tensors", "words"), [
    ({"prompt_embeds": (1, 5, 16), "pooled_prompt_embeds": (1, POOLED_DIM)},
     ["prompt_embeds has shape (1, 5, 16)", f"(1, tokens, {JOINT_DIM})"]),
    ({"prompt_embeds": (1, 5, JOINT_DIM), "pooled_prompt_embeds": (1, 8)},
     ["pooled_prompt_embeds has shape (1, 8)", f"(1, {POOLED_DIM})"]),
    ({"prompt_embeds": (1, 5, JOINT_DIM)}, ["no pooled_prompt_embeds tensor"]),
])
def test_prompt_embeddings_of_the_wrong_shape_are_one_line_naming_the_file(
        sd3_dir: Path, tmp_path: Path, tensors: dict, words: list[str]) -> None:
    embeds = tmp_path / "embeds.safetensors"
    save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, str(embeds))
    with pytest.raises(AselectError) as info:
        load_backbone(str(sd3_dir), LoadOptions(prompt_embeds=str(embeds)))
    one_line(info, embeds, *words)


def _set_class_name(directory: Path) -> Path:
    config = directory / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "FluxTransformer2DModel"}))
    return config


def _wider_vae(directory: Path) -> Path:
    other = build_sd3_pipeline(directory.parent / "other", sample_size=4, vae_blocks=(8, 16), latent_channels=8)
    shutil.rmtree(directory / "vae")
    shutil.copytree(other / "vae", directory / "vae")
    return directory


def _drop_a_tensor(part: str, filename: str):
    """Break a copy by removing one tensor from a component's weights file; the message must name both."""
    def spoil(directory: Path) -> Path:
        weights = directory / part / filename
        tensors = load_file(str(weights))
        name = sorted(tensors)[len(tensors) // 2]
        save_file({k: v for k, v in tensors.items() if k != name}, str(weights))
        return f"{weights}: no tensor {name!r}"
    return spoil


BROKEN = {
    # name: (break the copy, load options, what the message names besides the path it returns)
    "a text encoder missing a tensor": (_drop_a_tensor("text_encoder_2", "model.safetensors"), LoadOptions(),
                                        ["weights must match the model exactly"]),
    "the VAE missing a tensor": (_drop_a_tensor("vae", "diffusion_pytorch_model.safetensors"), LoadOptions(),
                                 ["weights must match the model exactly"]),
    "family dit asked": (lambda d: d / "transformer" / "config.json", LoadOptions(family="dit"),
                         ["'SD3Transformer2DModel' is family sd3", "backbone.family is dit"]),
    "foreign class name": (_set_class_name, LoadOptions(), ["'FluxTransformer2DModel'", "SD3Transformer2DModel"]),
    "no transformer": (lambda d: (shutil.rmtree(d / "transformer"), d / "transformer")[1], LoadOptions(),
                       ["missing"]),
    "vae latent channels": (_wider_vae, LoadOptions(), ["VAE latent_channels 8 != transformer in_channels 4"]),
    "t5 asked, none there": (lambda d: d / "text_encoder_3", LoadOptions(use_t5=True), ["missing", "use_t5"]),
    "image size past the positions": (lambda d: d, LoadOptions(image_size=24), ["backbone.image_size 24",
                                                                                "up to 16 px"]),
    "image size off the patch grid": (lambda d: d, LoadOptions(image_size=10), ["backbone.image_size 10",
                                                                                "not a multiple of 4"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_sd3_directories_fail_in_one_line_naming_the_file(sd3_dir: Path, tmp_path: Path, case: str) -> None:
    spoil, options, words = BROKEN[case]
    directory = Path(shutil.copytree(sd3_dir, tmp_path / "pipe"))
    named = spoil(directory)
    with pytest.raises(AselectError) as info:
        load_backbone(str(directory), options)
    one_line(info, named, *words)


def test_a_dit_directory_refuses_the_sd3_options_in_one_line(tmp_path: Path) -> None:
    build_dit("DiT-XS/2", 8, 1, 10).save_pretrained(tmp_path / "dit" / "transformer")
    make_scheduler(1000, "linear").save_pretrained(tmp_path / "dit" / "scheduler")
    directory = tmp_path / "dit"
    assert load_backbone(str(directory)).family == "dit"
    with pytest.raises(AselectError) as info:
        load_backbone(str(directory), LoadOptions(family="sd3"))
    one_line(info, directory / "transformer" / "config.json", "is family dit", "backbone.family is sd3")
    for options in (LoadOptions(image_size=16), LoadOptions(prompt_embeds=str(tmp_path / "x.safetensors"))):
        with pytest.raises(AselectError) as info:
            load_backbone(str(directory), options)
        one_line(info, directory, "a DiT takes no backbone.prompt_embeds or backbone.image_size")


def test_the_family_and_its_schedule_knob_key_a_pretrained_backbone(tmp_path: Path) -> None:
    from aselect.pipelines.config import load_config
    from aselect.storage.stages import StageRef, Workdir
    from aselect.tasks.backbone import plan_backbone

    work, dataset = Workdir(tmp_path), StageRef("ingest", "0123456789abcdef", str(tmp_path / "ingest"))

    def key(*overrides: str) -> str:
        return plan_backbone(work, load_config("smoke", list(overrides)).backbone, dataset).key

    dit, sd3 = key(), key("backbone.family=sd3")
    assert dit == key("backbone.family=dit") and sd3 != dit  # unset family is dit
    assert key("backbone.family=sd3", "backbone.flow_shift=1.0") != sd3
    assert key("backbone.family=sd3", "backbone.beta_schedule=squaredcos_cap_v2") == sd3  # DDPM's knob: unused
    assert key("backbone.flow_shift=1.0") == dit  # and the other way round
    assert key("backbone.family=sd3", "backbone.threads=1") == sd3


# ---------------------------------------------------------------------------------------------
#                                   3. Feature sites of an MMDiT
# ---------------------------------------------------------------------------------------------


def _latents(backbone: Backbone, n: int = 2, seed: int = 0) -> torch.Tensor:
    side = backbone.image_size // backbone.vae_scale_factor
    return torch.randn(n, int(backbone.transformer.config.in_channels), side, side,
                       generator=torch.Generator().manual_seed(seed))


def _attention_inputs(backbone: Backbone, layer: int) -> tuple[dict, torch.utils.hooks.RemovableHandle]:
    """A forward pre-hook of our own on block `layer`'s attention: the (modulated) image and prompt streams fed."""
    seen: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.update(image=kwargs["hidden_states"], prompt=kwargs["encoder_hidden_states"])

    attention = backbone.transformer.transformer_blocks[layer].attn
    return seen, attention.register_forward_pre_hook(grab, with_kwargs=True)


def _no_hooks_left(backbone: Backbone) -> None:
    for name, module in backbone.transformer.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"{name} kept a hook"
    for block in backbone.transformer.transformer_blocks:
        assert not isinstance(block.attn.processor, JointAttentionMapProcessor)


@pytest.mark.parametrize("layer", [0, 1])  # block 1 is the last: context_pre_only, the prompt stream ends there
def test_query_key_value_are_the_attention_projections_of_the_image_tokens(sd3_backbone: Backbone,
                                                                          layer: int) -> None:
    x0 = _latents(sd3_backbone)
    seen, handle = _attention_inputs(sd3_backbone, layer)
    try:
        feats = extract(sd3_backbone, x0, [0, 1], 100, [layer], ["query", "key", "value"], seed=0)
    finally:
        handle.remove()
    attention = sd3_backbone.transformer.transformer_blocks[layer].attn
    tokens, width = sd3_backbone.token_grid ** 2, sd3_backbone.width
    assert seen["image"].shape == (2, tokens, width)  # the image stream only: not the 333 prompt tokens
    assert seen["prompt"].shape[1] == CLIP_TOKENS + T5_TOKENS
    with torch.no_grad():
        for site, linear in (("query", attention.to_q), ("key", attention.to_k), ("value", attention.to_v)):
            assert feats[(layer, site)].shape == (2, tokens, width)
            torch.testing.assert_close(feats[(layer, site)], linear(seen["image"]), rtol=0, atol=0)
    assert not torch.allclose(feats[(layer, "query")], feats[(layer, "key")])
    _no_hooks_left(sd3_backbone)


def test_the_attention_map_processor_is_faithful_and_maps_image_queries_to_image_keys(
        sd3_backbone: Backbone) -> None:
    x0, t = _latents(sd3_backbone, n=3, seed=1), 300
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    x_t = sd3_backbone.add_noise(x0, noise, t)
    blocks = sd3_backbone.transformer.transformer_blocks
    with torch.no_grad():
        reference = sd3_backbone.forward(x_t, t)
        sink: dict[int, torch.Tensor] = {}
        saved = [block.attn.processor for block in blocks]
        for layer, block in enumerate(blocks):
            block.attn.set_processor(JointAttentionMapProcessor(sink, layer))
        try:
            mapped = sd3_backbone.forward(x_t, t)
        finally:
            for block, processor in zip(blocks, saved, strict=True):
                block.attn.set_processor(processor)
    torch.testing.assert_close(mapped, reference, rtol=1e-5, atol=1e-6)  # the same model output, every block
    tokens = sd3_backbone.token_grid ** 2
    assert sorted(sink) == [0, 1]
    for probs in sink.values():
        assert probs.shape == (3, tokens, tokens)
        rows = probs.sum(-1)
        assert bool((probs >= 0).all()) and bool((rows > 0).all()) and bool((rows <= 1 + 1e-6).all())
        assert bool((rows < 1).all())  # the prompt keys hold the rest of each row's mass

    # extract's attn_map is that block of the joint softmax, computed here from the attention's own inputs
    layer = 1
    seen, handle = _attention_inputs(sd3_backbone, layer)
    try:
        feats = extract(sd3_backbone, x0, [0, 1, 2], t, [layer], [ATTN_MAP], seed=0, noise=noise)
    finally:
        handle.remove()
    attention = blocks[layer].attn

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(3, -1, attention.heads, x.shape[-1] // attention.heads).transpose(1, 2)

    with torch.no_grad():
        query = torch.cat([heads(attention.to_q(seen["image"])), heads(attention.add_q_proj(seen["prompt"]))], 2)
        key = torch.cat([heads(attention.to_k(seen["image"])), heads(attention.add_k_proj(seen["prompt"]))], 2)
        joint = torch.softmax(query @ key.transpose(-1, -2) / (query.shape[-1] ** 0.5), dim=-1)
    torch.testing.assert_close(feats[(layer, ATTN_MAP)], joint[:, :, :tokens, :tokens].mean(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(feats[(layer, ATTN_MAP)], sink[layer], rtol=1e-5, atol=1e-7)  # same x_t as above
    _no_hooks_left(sd3_backbone)


def test_extract_stops_after_the_deepest_requested_block(sd3_backbone: Backbone) -> None:
    transformer = sd3_backbone.transformer
    calls: Counter[str] = Counter()
    # registered before extract's own hooks, so a block that runs is counted before extract may stop there
    watched = {f"block{i}": block for i, block in enumerate(transformer.transformer_blocks)}
    watched.update(norm_out=transformer.norm_out, proj_out=transformer.proj_out)
    handles = [module.register_forward_hook(lambda *_, name=name: calls.update([name]))
               for name, module in watched.items()]
    try:
        x0 = _latents(sd3_backbone)
        feats = extract(sd3_backbone, x0, [0, 1], 500, [0], ["block", "attn", "mlp", "query", ATTN_MAP], seed=0)
        assert calls == {"block0": 1}  # block 1 and the output head never ran
        assert sorted(feats) == [(0, s) for s in sorted(["block", "attn", "mlp", "query", ATTN_MAP])]
        calls.clear()
        extract(sd3_backbone, x0, [0, 1], 500, [1], ["block"], seed=0)
        assert calls == {"block0": 1, "block1": 1}  # the head is skipped even after the last block
        calls.clear()
        with torch.no_grad():
            sd3_backbone.forward(x0, 500)
        assert calls == {"block0": 1, "block1": 1, "norm_out": 1, "proj_out": 1}  # the hooks do count a full pass
    finally:
        for handle in handles:
            handle.remove()
    _no_hooks_left(sd3_backbone)


# ---------------------------------------------------------------------------------------------
#                             4. Whole runs on the Prefect test server
# ---------------------------------------------------------------------------------------------

def manifests(workdir: Path) -> dict[Path, str]:
    return {p: p.read_text() for p in workdir.glob("*/*/manifest.json")}


def by_name(result: dict) -> dict[str, dict]:
    return {s["name"]: s for s in result["stages"]}


def manifest(stage: dict) -> dict:
    return json.loads((Path(stage["path"]) / "manifest.json").read_text())


def flow_point(t: int, shift: float = 3.0) -> dict:
    return noise_point(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift), t).record()


@pytest.fixture(scope="module")
def sd3_smoke(prefect_api_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`smoke` with `backbone.family=sd3`: a tiny class-conditional MMDiT pretrained by rectified flow."""
    from aselect.flows.pipeline import aselect_pipeline

    workdir = tmp_path_factory.mktemp("sd3-smoke")
    return workdir, aselect_pipeline(config="smoke", overrides=SD3, workdir=str(workdir))


@pytest.mark.slow
def test_smoke_with_family_sd3_pretrains_an_mmdit_and_records_sigma(sd3_smoke: tuple[Path, dict]) -> None:
    _, result = sd3_smoke
    stages = by_name(result)
    assert list(stages) == ["ingest", "backbone", "calibrate", "score", "select", "dump", "probe"]
    assert all(s["status"] == "Completed" and not s["cached"] for s in stages.values()), result
    record = manifest(stages["backbone"])
    assert record["kind"] == "pretrain" and record["model"]["family"] == "sd3"
    assert record["model"]["scheduler"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert record["model"]["scheduler"]["shift"] == 3.0 and record["model"]["null_class"] == -1
    model_dir = Path(stages["backbone"]["path"]) / "model"
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    stored = load_file(model_dir / CONDITIONING_FILE)
    assert stored["class_pooled"].shape == (11, stored["pooled_prompt_embeds"].shape[-1])  # 10 digits + empty
    assert torch.equal(stored["class_pooled"][-1:], stored["pooled_prompt_embeds"])  # the empty prompt's row
    loaded = load_backbone(str(model_dir))
    assert loaded.family == "sd3" and loaded.flow and loaded.num_layers == 2 and loaded.image_size == 8
    selection = result["selection"]
    assert selection["noise"] == flow_point(selection["timestep"])
    assert "sigma" in selection["noise"] and "alpha_bar" not in selection["noise"]
    assert f"sigma {selection['noise']['sigma']:.3f}" in stages["select"]["summary"]
    assert result["metrics"]["metric"] == "top1" and 0.0 <= result["metrics"]["value"] <= 1.0


@pytest.mark.slow
def test_an_sd3_rerun_is_cached_and_returns_the_same_results(sd3_smoke: tuple[Path, dict]) -> None:
    from aselect.flows.pipeline import aselect_pipeline

    workdir, first = sd3_smoke
    before = manifests(workdir)
    again = aselect_pipeline(config="smoke", overrides=SD3, workdir=str(workdir))
    assert all(s["status"] == "Cached" and s["cached"] for s in again["stages"]), again
    assert [s["key"] for s in again["stages"]] == [s["key"] for s in first["stages"]]
    assert manifests(workdir) == before  # nothing rewritten
    assert again["selection"] == first["selection"] and again["metrics"] == first["metrics"]


@pytest.mark.slow
def test_sigkill_during_sd3_pretraining_resumes_to_identical_outputs(
        prefect_api_url: str, sd3_smoke: tuple[Path, dict], tmp_path: Path) -> None:
    from aselect.flows.pipeline import aselect_pipeline

    _, reference = sd3_smoke
    workdir = tmp_path / "killed"
    # the smoke config checkpoints every 10 steps: killed at step 15, a resume starts from step 10
    proc = aselect(prefect_api_url, workdir, *SD3, ASELECT_FAILPOINT="pretrain@15")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    (stage,) = workdir.glob("backbone/*")
    assert json.loads((stage / "manifest.json").read_text())["status"] == "partial"
    assert [p.name for p in (stage / "checkpoints").glob("step-*.pt")] == ["step-0000010.pt"]
    assert not (stage / "model").exists()

    resumed = aselect_pipeline(config="smoke", overrides=SD3, workdir=str(workdir))
    stages, want = by_name(resumed), by_name(reference)
    assert stages["ingest"]["cached"] and not stages["backbone"]["cached"]
    assert "resumed from step 10" in stages["backbone"]["summary"]
    assert manifest(stages["backbone"])["attempts"] == 2
    assert resumed["selection"] == reference["selection"] and resumed["metrics"] == reference["metrics"]
    for name, stage_report in want.items():  # every stage, byte for byte (JSON without timings)
        assert stages[name]["key"] == stage_report["key"], name
        got, expected = stage_files(Path(stages[name]["path"])), stage_files(Path(stage_report["path"]))
        assert sorted(got) == sorted(expected), name
        for rel, content in expected.items():
            assert got[rel] == content, f"{name}/{rel} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def loaded_sd3(prefect_api_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A workdir, a tiny SD3 pipeline directory with CLIP encoders, and the overrides that load it at 16 px (on
    100 of the smoke config's digits: half the forward passes)."""
    root = tmp_path_factory.mktemp("sd3-load")
    directory = build_sd3_pipeline(root / "pipe", sample_size=4, vae_blocks=(8, 16), seed=3)
    return root / "work", directory, ["ingest.limit=100", "backbone.kind=load", f"backbone.path={directory}",
                                      "backbone.image_size=16"]


def short_prompt(loaded: tuple[Path, Path, list[str]]) -> list[str]:
    """`loaded_sd3`'s overrides with a 4-token empty prompt from a `backbone.prompt_embeds` file: the encoded one
    is 333 tokens (CLIP's 77 padded, T5's 256 zeros), which dominate every forward pass next to the 16 image
    tokens. Its backbone stage is another one (the file's bytes are in its key)."""
    workdir, _, load = loaded
    embeds = workdir.parent / "short-prompt.safetensors"
    if not embeds.exists():
        generator = torch.Generator().manual_seed(4)
        save_file({"prompt_embeds": torch.randn(1, 4, JOINT_DIM, generator=generator) * 0.5,
                   "pooled_prompt_embeds": torch.randn(1, POOLED_DIM, generator=generator) * 0.5}, str(embeds))
    return [*load, f"backbone.prompt_embeds={embeds}"]


@pytest.mark.slow
def test_a_loaded_sd3_pipeline_runs_a_selection_from_its_stored_empty_prompt(
        loaded_sd3: tuple[Path, Path, list[str]]) -> None:
    from aselect.flows.pipeline import aselect_pipeline

    workdir, directory, load = loaded_sd3
    load = [*load, "calibrate.timesteps=[0, 100, 500, 900]", "calibrate.images=32"]  # 333 prompt tokens: fewer
    result = aselect_pipeline(config="smoke", overrides=load, workdir=str(workdir))
    stages = by_name(result)
    assert list(stages) == ["ingest", "backbone", "calibrate", "score", "select", "dump", "probe"]
    assert all(s["status"] in ("Completed", "Cached") for s in stages.values()), result
    assert not any(stages[name]["cached"] for name in ("calibrate", "score", "select", "dump", "probe"))
    record = manifest(stages["backbone"])
    assert record["kind"] == "load" and record["model_path"] == "model" and record["model"]["family"] == "sd3"
    assert record["model"]["image_size"] == 16 and record["model"]["token_grid"] == 4
    # the stage keeps the source and the empty prompt it encoded once: no later stage runs a text encoder
    model_dir = Path(stages["backbone"]["path"]) / "model"
    assert json.loads((model_dir / SOURCE_FILE).read_text()) == {"source": str(directory.resolve()),
                                                                 "image_size": 16}
    stored = load_file(model_dir / CONDITIONING_FILE)
    prompt, pooled = encode_with_diffusers(directory)
    assert torch.equal(stored["prompt_embeds"], prompt) and torch.equal(stored["pooled_prompt_embeds"], pooled)
    calibration = manifest(stages["calibrate"])["layout"]
    assert calibration["tokens"] == 16 and calibration["timesteps"] == [0, 100, 500, 900]
    selection = result["selection"]
    assert selection["policy"] == "aselect" and selection["noise"] == flow_point(selection["timestep"])
    assert result["metrics"]["metric"] == "top1"

    before = manifests(workdir)
    again = aselect_pipeline(config="smoke", overrides=load, workdir=str(workdir))
    assert all(s["status"] == "Cached" for s in again["stages"]), again
    assert manifests(workdir) == before
    assert again["selection"] == selection and again["metrics"] == result["metrics"]


@pytest.mark.slow
def test_a_fixed_query_pair_of_a_loaded_sd3_pipeline_dumps_its_features(
        loaded_sd3: tuple[Path, Path, list[str]]) -> None:
    from aselect.flows.pipeline import aselect_pipeline
    from aselect.pipelines.backbone import encode_images
    from aselect.storage.datasets import read_dataset
    from aselect.storage.features import PairReader

    workdir, _, _ = loaded_sd3
    fixed = ["select.policy=fixed", "select.site=query", "select.layer=1", "select.timestep=100"]
    result = aselect_pipeline(config="smoke", overrides=short_prompt(loaded_sd3) + fixed, workdir=str(workdir))
    stages = by_name(result)
    assert list(stages) == ["ingest", "backbone", "select", "dump", "probe"]
    selection = result["selection"]
    assert (selection["policy"], selection["timestep"], selection["layer"], selection["site"]) == (
        "fixed", 100, 1, "query")
    # t=100 is index 900 of the shifted table: sigma 3 * 0.1 / (1 + 2 * 0.1) = 0.25, model timestep 250
    assert selection["noise"] == {"t": 100, "scheduler_index": 900, "model_timestep": 250.0, "sigma": 0.25}
    assert "sigma 0.250, scheduler index 900" in stages["select"]["summary"]
    layout = manifest(stages["dump"])["layout"]
    assert (layout["timesteps"], layout["layers"], layout["sites"]) == ([100], [1], ["query"])
    # the dumped features are the query projection of the stage's backbone, mean over the 16 image tokens
    reader = PairReader(stages["dump"]["path"], 100, 1, "query", spatial=False)
    rows = np.arange(5)
    ids = reader.samples[rows]
    backbone = load_backbone(str(Path(stages["backbone"]["path"]) / "model"))
    assert backbone.image_size == 16 and backbone.conditioning.prompt_embeds.shape == (1, 4, JOINT_DIM)
    images = torch.from_numpy(read_dataset(Path(stages["ingest"]["path"])).images[ids])
    feats = extract(backbone, encode_images(backbone, images), list(ids), 100, [1], ["query"], seed=0)
    np.testing.assert_allclose(reader.read(rows), feats[(1, "query")].mean(1).numpy(), rtol=1e-4, atol=1e-5)
    assert result["metrics"]["metric"] == "top1"


@pytest.mark.slow
def test_the_exhaustive_flow_on_a_loaded_sd3_pipeline(loaded_sd3: tuple[Path, Path, list[str]]) -> None:
    from aselect.flows.pipeline import aselect_exhaustive

    workdir, _, _ = loaded_sd3
    grid = ["dump.timesteps=[0, 500]", "dump.sites=[block, query]"]  # 2 x 2 layers x 2 sites: 8 pairs
    result = aselect_exhaustive(config="smoke", overrides=short_prompt(loaded_sd3) + grid, workdir=str(workdir))
    stages = by_name(result)
    assert list(stages) == ["ingest", "backbone", "dump", "score", "select", "probe"]
    rows = json.loads((Path(stages["score"]["path"]) / "scores.json").read_text())
    assert len(rows) == 8 and {r["scorer"] for r in rows} == {"probe"}
    best = max(rows, key=lambda r: r["score"])
    selection = result["selection"]
    assert selection["policy"] == "oracle"
    assert (selection["timestep"], selection["layer"], selection["site"]) == (best["timestep"], best["layer"],
                                                                             best["site"])
    assert selection["noise"] == flow_point(selection["timestep"])
    assert result["cost"]["forward_passes"] == 100 * 2 and result["metrics"]["metric"] == "top1"
