"""DiT size variants registered by name, building them (and a small VAE), and the Backbone container."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

from aselect.storage.errors import AselectError

if TYPE_CHECKING:
    from aselect.pipelines.config import LatentConfig


# ---------------------------------------------------------------------------------------------
#                                       DiT size variants
# ---------------------------------------------------------------------------------------------


def _variant(layers: int, heads: int, head_dim: int, patch: int) -> dict:
    return dict(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim, patch_size=patch)


VARIANTS: dict[str, dict] = {
    # Tiny sizes for 16-64 px datasets on CPU.
    "DiT-XS/2": _variant(2, 2, 16, 2),  # hidden 32: smoke tests, seconds
    "DiT-T/2": _variant(6, 4, 32, 2),  # hidden 128: default for 16x16 digits (8x8 tokens)
    "DiT-T/4": _variant(6, 4, 32, 4),  # hidden 128, 4x fewer tokens than T/2
    # Paper sizes (Peebles & Xie 2023), named for completeness.
    "DiT-S/2": _variant(12, 6, 64, 2),
    "DiT-B/2": _variant(12, 12, 64, 2),
    "DiT-L/2": _variant(24, 16, 64, 2),
    "DiT-XL/2": _variant(28, 16, 72, 2),
}


def _init_weights(model: DiTTransformer2DModel) -> None:
    """DiT-paper init: xavier linears, N(0, 0.02) embeddings, zeroed adaLN modulation and output layer."""

    # Why: adaLN-Zero makes every block start as the identity, which trains markedly faster than
    # diffusers' default (PyTorch) init for these small models.
    def basic(module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)

    model.apply(basic)
    proj = model.pos_embed.proj.weight.data
    torch.nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
    torch.nn.init.zeros_(model.pos_embed.proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb  # diffusers gives every block its own timestep + label embedder
        torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def build_dit(variant: str, image_size: int, channels: int, num_classes: int) -> DiTTransformer2DModel:
    """A randomly initialised pixel-space DiT of a registered size (out_channels = channels, epsilon only)."""
    if variant not in VARIANTS:
        raise AselectError(f"unknown DiT variant {variant!r}; known: {', '.join(VARIANTS)}")
    kwargs = VARIANTS[variant]
    if image_size % kwargs["patch_size"]:
        raise AselectError(
            f"{variant}: image size {image_size} is not a multiple of patch size {kwargs['patch_size']}"
        )
    model = DiTTransformer2DModel(
        **kwargs,
        in_channels=channels,
        out_channels=channels,  # epsilon only; no learned sigma
        sample_size=image_size,
        num_embeds_ada_norm=num_classes,  # the null class gets index num_classes
    )
    _init_weights(model)
    return model


SD_VAE_BLOCKS = (128, 256, 512, 512)  # Stable Diffusion's AutoencoderKL: 8x down, 4 latent channels


def random_latent_backbone(variant: str = "DiT-XL/2", image_size: int = 256, channels: int = 3,
                           vae_blocks: tuple[int, ...] = SD_VAE_BLOCKS, num_classes: int = 1000,
                           seed: int = 0) -> Backbone:
    """A random-weight latent DiT with the shapes of a real checkpoint; nothing is downloaded.

    `DiT-XL/2` at 256 px is facebook/DiT-XL-2-256's shape: an SD-shaped AutoencoderKL (8x down, 4 latent
    channels) and a 28 x 1152 transformer with patch 2 on 32x32 latents (16x16 tokens), learned sigma
    (out_channels 8). Scale checks (bench/) use it; smaller `vae_blocks` and variants make test-sized ones.
    """
    torch.manual_seed(seed)
    groups = min(32, min(vae_blocks))
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
                        block_out_channels=tuple(vae_blocks), layers_per_block=2, norm_num_groups=groups,
                        sample_size=image_size, scaling_factor=0.18215)
    latent = image_size // 2 ** (len(vae_blocks) - 1)
    kwargs = VARIANTS[variant]
    transformer = DiTTransformer2DModel(**kwargs, in_channels=4, out_channels=8, sample_size=latent,
                                        num_embeds_ada_norm=num_classes)
    return Backbone(transformer=transformer.eval(), scheduler=make_scheduler(1000, "linear"), vae=vae.eval(),
                    source=f"random {variant} latent {image_size}px")


def save_backbone(backbone: Backbone, directory: Path) -> Path:
    """Write a backbone as a diffusers DiTPipeline directory (transformer/, vae/, scheduler/, model_index.json)."""
    from diffusers import DiTPipeline

    DiTPipeline(transformer=backbone.transformer, vae=backbone.vae, scheduler=backbone.scheduler).save_pretrained(
        directory)
    return directory


def make_scheduler(num_train_timesteps: int, beta_schedule: str, clip_sample: bool = True) -> DDPMScheduler:
    """The DDPM noise schedule q(x_t | x_0) for training (epsilon prediction; x_0 clipped for pixel space)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=clip_sample,  # pixel space lives in [-1, 1]; VAE latents do not
    )


def _vae_groups(blocks: list[int] | tuple[int, ...]) -> int:
    """GroupNorm groups that divide every block width: up to 32, at least 4 channels a group when possible."""
    width = math.gcd(*blocks)
    return max(d for d in range(1, 33) if width % d == 0 and width // d >= min(4, width))


def build_vae(channels: int, image_size: int, latent: LatentConfig) -> AutoencoderKL:
    """A randomly initialised Stable-Diffusion-style AutoencoderKL sized by `latent` (2**(n-1) x down)."""
    n = len(latent.vae_blocks)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=latent.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(latent.vae_blocks),
        layers_per_block=1,  # SD uses 2; 1 halves the CPU cost and is plenty for 16-64 px images
        norm_num_groups=_vae_groups(latent.vae_blocks),
        sample_size=image_size,
        scaling_factor=1.0,  # replaced by 1 / std of the train latents once trained
    )


# ---------------------------------------------------------------------------------------------
#                                           Backbone
# ---------------------------------------------------------------------------------------------


@dataclass
class Backbone:
    """A loaded DiT with the noise schedule it was trained under (and its VAE for latent DiTs)."""

    transformer: DiTTransformer2DModel
    scheduler: DDPMScheduler  # the noise schedule used for q(x_t | x_0)
    vae: AutoencoderKL | None  # None for pixel-space DiTs
    source: str  # directory or hub id it came from

    @property
    def kind(self) -> Literal["pixel", "latent"]:
        """'latent' when the DiT works on VAE latents, else 'pixel'."""
        return "pixel" if self.vae is None else "latent"

    @property
    def null_class(self) -> int:
        """The class-dropout (unconditional) label index."""
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (1 for pixel-space DiTs)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The pixel size the backbone expects."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    @property
    def image_channels(self) -> int:
        """Channels of the pixel images the backbone expects."""
        cfg = self.transformer.config if self.vae is None else self.vae.config
        return int(cfg.in_channels)

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.transformer.config.num_layers)
