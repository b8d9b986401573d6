"""The tiny SD3 pipeline of `sd3_tiny`: its on-disk layout, that diffusers loads and runs it, and its seeding."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file
from sd3_tiny import CLIP_HIDDEN, CLIP_MAX_LENGTH, JOINT_DIM, POOLED_DIM, build_sd3_pipeline, null_components

MODELS = {"transformer", "vae", "scheduler"}
CLIP = {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
T5 = {"text_encoder_3", "tokenizer_3"}
T5_LENGTH = 256  # the pipeline's default max_sequence_length


def layout(root: Path) -> tuple[set[str], dict]:
    index = json.loads((root / "model_index.json").read_text())
    return {p.name for p in root.iterdir() if p.is_dir()}, index


def load(root: Path) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(root, local_files_only=True, **null_components(root))


def test_clip_only_pipeline_loads_encodes_and_runs(tmp_path: Path) -> None:
    start = time.perf_counter()
    root = build_sd3_pipeline(tmp_path / "sd3")
    assert time.perf_counter() - start < 5
    folders, index = layout(root)
    assert folders == MODELS | CLIP
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    assert null_components(root) == {"text_encoder_3": None, "tokenizer_3": None}
    with pytest.raises(ValueError, match="expected"):  # diffusers wants null required components passed
        StableDiffusion3Pipeline.from_pretrained(root, local_files_only=True)

    pipe = load(root)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == CLIP_MAX_LENGTH
    ids = pipe.tokenizer("the cat").input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(ids)[:2] == ["<|startoftext|>", "the</w>"]  # a merge applied
    assert ids[-1] == pipe.tokenizer.eos_token_id == pipe.text_encoder.config.eos_token_id
    assert pipe.vae_scale_factor == 2 and pipe.vae.config.shift_factor == 0.0609
    assert pipe.scheduler.config.shift == 3.0

    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt="", prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, device="cpu")
    assert embeds.shape == (1, CLIP_MAX_LENGTH + T5_LENGTH, JOINT_DIM) == (1, 333, 32)
    assert pooled.shape == (1, POOLED_DIM) == (1, 16)
    assert negative is None and negative_pooled is None
    assert embeds[:, :CLIP_MAX_LENGTH, : 2 * CLIP_HIDDEN].abs().sum() > 0  # the two CLIP encoders
    assert not embeds[:, :CLIP_MAX_LENGTH, 2 * CLIP_HIDDEN :].any()  # zero padding up to JOINT_DIM
    assert not embeds[:, CLIP_MAX_LENGTH:].any()  # zeros in place of T5

    size = 8 * pipe.vae_scale_factor
    image = pipe(prompt="", num_inference_steps=2, height=size, width=size, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, size, size, 3) and np.isfinite(image).all()


def test_t5_pipeline_loads_and_encodes(tmp_path: Path) -> None:
    root = build_sd3_pipeline(tmp_path / "sd3", t5=True)
    folders, index = layout(root)
    assert folders == MODELS | CLIP | T5
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert null_components(root) == {}
    pipe = load(root)
    assert pipe.text_encoder_3.config.d_model == JOINT_DIM
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt="a cat", prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, device="cpu",
        max_sequence_length=16)
    assert embeds.shape == (1, CLIP_MAX_LENGTH + 16, JOINT_DIM) and pooled.shape == (1, POOLED_DIM)
    assert embeds[:, CLIP_MAX_LENGTH:].abs().sum() > 0  # real T5 tokens this time


def test_transformer_only_pipeline_runs_on_given_embeddings(tmp_path: Path) -> None:
    root = build_sd3_pipeline(tmp_path / "sd3", text_encoders=False, sample_size=4, vae_blocks=(8, 8, 16))
    folders, index = layout(root)
    assert folders == MODELS
    assert all(index[name] == [None, None] for name in CLIP | T5)
    assert set(null_components(root)) == CLIP | T5
    pipe = load(root)
    assert pipe.vae_scale_factor == 4 and pipe.transformer.config.sample_size == 4
    image = pipe(prompt_embeds=torch.zeros(1, 5, JOINT_DIM), pooled_prompt_embeds=torch.zeros(1, POOLED_DIM),
                 guidance_scale=1.0, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_same_seed_same_weights(tmp_path: Path) -> None:
    rng = torch.get_rng_state()
    weights = [load_file(build_sd3_pipeline(tmp_path / str(i), seed=seed, text_encoders=False)
                         / "transformer" / "diffusion_pytorch_model.safetensors")
               for i, seed in enumerate((0, 0, 1))]
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
