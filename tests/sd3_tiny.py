"""A tiny, randomly initialised Stable Diffusion 3 pipeline written to disk, built without any download.

`build_sd3_pipeline` saves a `StableDiffusion3Pipeline` with `save_pretrained`, so the directory has the layout
a real SD3 checkout has (model_index.json plus one folder per component). The CLIP tokenizers come from a
byte-level BPE vocabulary written here (the 256 GPT-2 byte characters, the same with '</w>', a few merges and CLIP's
two special tokens); the optional T5 tokenizer is a tiny Unigram vocabulary of lowercase letters and digits.

Text widths: each CLIP encoder has hidden size `CLIP_HIDDEN` and projection `CLIP_PROJECTION`, so the pooled
embedding is `POOLED_DIM` = 2 * CLIP_PROJECTION wide and the CLIP token embeddings (2 * CLIP_HIDDEN wide) are
zero-padded to `JOINT_DIM`, the transformer's `joint_attention_dim` and the T5 encoder's `d_model`. Without T5
(the default) `text_encoder_3` and `tokenizer_3` are None and the pipeline puts zeros of width JOINT_DIM in place
of T5's tokens, as SD3 is documented to run without its T5 encoder.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import diffusers.utils.logging
import torch
import transformers.utils.logging
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

CLIP_HIDDEN = 8  # hidden size of each CLIP text encoder
CLIP_PROJECTION = 8  # text_projection width of each CLIP text encoder
POOLED_DIM = 2 * CLIP_PROJECTION  # pooled_projection_dim of the transformer
JOINT_DIM = 32  # joint_attention_dim of the transformer (>= 2 * CLIP_HIDDEN) and d_model of T5
CLIP_MAX_LENGTH = 77  # the pipeline pads CLIP prompts to tokenizer.model_max_length
T5_MAX_LENGTH = 512  # the pipeline caps max_sequence_length at 512
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>")]


@contextlib.contextmanager
def _quiet_save() -> Iterator[None]:
    """No "text_encoder_3=None cannot be saved" warnings nor "Writing model shards" bars while saving."""
    verbosity, bars = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


def _clip_tokenizer(work: Path) -> CLIPTokenizer:
    """A CLIP tokenizer from a vocab.json and merges.txt written under `work`; special tokens last, as in CLIP."""
    chars = _bytes_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(pair) for pair in MERGES), BOS, EOS]
    vocab_file, merges_file = work / "vocab.json", work / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=CLIP_MAX_LENGTH)


def _clip_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        projection_dim=CLIP_PROJECTION,
        num_hidden_layers=2,  # the pipeline reads the penultimate hidden state
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooling takes the first EOS position
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def _t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer over a Unigram vocabulary: <pad>, </s>, <unk>, '▁', then single letters and digits."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("▁" + c, -2.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _t5_encoder(vocab_size: int, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=JOINT_DIM,
        d_kv=8,
        d_ff=2 * JOINT_DIM,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def build_sd3_pipeline(root: Path, *, sample_size: int = 8, patch_size: int = 2, num_layers: int = 2,
                       heads: int = 2, head_dim: int = 8, latent_channels: int = 4, image_channels: int = 3,
                       vae_blocks: tuple[int, ...] = (8, 16), text_encoders: bool = True, t5: bool = False,
                       shift: float = 3.0, seed: int = 0) -> Path:
    """Write a tiny StableDiffusion3Pipeline directory at root and return root.

    `sample_size` is the transformer's latent size; images are `sample_size * 2 ** (len(vae_blocks) - 1)` pixels
    square. With `text_encoders=False` no text encoder or tokenizer is written (model_index.json lists them as
    null): such a pipeline needs `prompt_embeds` / `pooled_prompt_embeds` of shapes (B, T, JOINT_DIM) / (B,
    POOLED_DIM) and no classifier-free guidance. `t5` adds `text_encoder_3` / `tokenizer_3` (needs
    `text_encoders`). Each component is seeded from `seed`, the caller's torch RNG state is left untouched."""
    if t5 and not text_encoders:
        raise ValueError("t5=True needs text_encoders=True")
    if sample_size % patch_size:
        raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=latent_channels,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=JOINT_DIM,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=POOLED_DIM,
            out_channels=latent_channels,
            pos_embed_max_size=2 * (sample_size // patch_size),  # room for up to twice the default resolution
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=image_channels,
            out_channels=image_channels,
            down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
            up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
            block_out_channels=tuple(vae_blocks),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=min(math.gcd(*vae_blocks), 32),
            sample_size=sample_size * 2 ** (len(vae_blocks) - 1),
            scaling_factor=1.5305,  # SD3's latent normalisation: (z - shift_factor) * scaling_factor
            shift_factor=0.0609,
            use_quant_conv=False,  # SD3's VAE has neither quant conv
            use_post_quant_conv=False,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        parts: dict[str, object] = dict.fromkeys(
            ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"))
        with tempfile.TemporaryDirectory(prefix="sd3-tiny-vocab-") as work:  # vocab.json / merges.txt
            if text_encoders:
                tokenizer = _clip_tokenizer(Path(work))
                parts.update(tokenizer=tokenizer, tokenizer_2=tokenizer,
                             text_encoder=_clip_encoder(tokenizer, seed + 2),
                             text_encoder_2=_clip_encoder(tokenizer, seed + 3))
                if t5:
                    tokenizer_3 = _t5_tokenizer()
                    parts.update(tokenizer_3=tokenizer_3, text_encoder_3=_t5_encoder(len(tokenizer_3), seed + 4))
            pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler, **parts)
            with _quiet_save():
                pipe.save_pretrained(root)
    return root


def null_components(root: Path) -> dict[str, None]:
    """The components model_index.json at `root` lists as null, as `from_pretrained` keyword arguments.

    diffusers refuses to load a pipeline whose required components are null unless each is passed explicitly,
    so load with `StableDiffusion3Pipeline.from_pretrained(root, **null_components(root))`."""
    index = json.loads((Path(root) / "model_index.json").read_text(encoding="utf-8"))
    optional = set(StableDiffusion3Pipeline._optional_components)
    return {name: None for name, value in index.items()
            if isinstance(value, list) and value[0] is None and name not in optional}
