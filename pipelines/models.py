"""Transformer size variants registered by name, building them (DiT or MMDiT, and a small VAE), noise schedules,
and the Backbone container.

Two families share one interface: `dit` (DiTTransformer2DModel, class-conditional, DDPM) and `sd3` (the MMDiT of
Stable Diffusion 3, SD3Transformer2DModel, text-conditional, rectified flow). Every family speaks one timestep
convention: t in [0, num_train_timesteps), 0 = clean (A-SelecT's).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
)

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
    # MMDiT sizes (family sd3). Any name builds either family; these say which one they were made for.
    "MMDiT-XS/2": _variant(2, 2, 16, 2),
    "MMDiT-T/2": _variant(6, 4, 32, 2),
    "SD3-Medium": _variant(24, 24, 64, 2),  # stabilityai/stable-diffusion-3-medium's transformer: 24 x 1536
}
FAMILIES = ("dit", "sd3")


def _xavier_linear(module: torch.nn.Module) -> None:
    """Xavier-uniform weights and zero biases for a Linear layer (apply over a model)."""
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def _init_weights(model: DiTTransformer2DModel) -> None:
    """DiT-paper init: xavier linears, N(0, 0.02) embeddings, zeroed adaLN modulation and output layer."""

    # Why: adaLN-Zero makes every block start as the identity, which trains markedly faster than
    # diffusers' default (PyTorch) init for these small models.
    model.apply(_xavier_linear)
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


def build_mmdit(variant: str, sample_size: int, channels: int, text_dim: int | None = None,
                pooled_dim: int | None = None) -> SD3Transformer2DModel:
    """A randomly initialised SD3 MMDiT of a registered size on a `sample_size` grid of `channels`.

    `text_dim` (joint_attention_dim: the width of the prompt embeddings) and `pooled_dim` (pooled_projection_dim)
    default to the model width, which is what a tiny class-conditional MMDiT trained here uses.
    """
    if variant not in VARIANTS:
        raise AselectError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    kwargs = VARIANTS[variant]
    if sample_size % kwargs["patch_size"]:
        raise AselectError(
            f"{variant}: input size {sample_size} is not a multiple of patch size {kwargs['patch_size']}"
        )
    width = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=kwargs["patch_size"], in_channels=channels, out_channels=channels,
        num_layers=kwargs["num_layers"], attention_head_dim=kwargs["attention_head_dim"],
        num_attention_heads=kwargs["num_attention_heads"], joint_attention_dim=text_dim or width,
        caption_projection_dim=width, pooled_projection_dim=pooled_dim or width,
        pos_embed_max_size=sample_size // kwargs["patch_size"],
    )


def init_mmdit(model: SD3Transformer2DModel) -> None:
    """DiT-paper init for an MMDiT: xavier linears, zeroed adaLN modulations and output layer (blocks start as the
    identity, which trains these small models much faster)."""
    model.apply(_xavier_linear)
    for block in model.transformer_blocks:
        for norm in (block.norm1, block.norm1_context):
            torch.nn.init.zeros_(norm.linear.weight)
            torch.nn.init.zeros_(norm.linear.bias)
    for layer in (model.norm_out.linear, model.proj_out):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


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


def random_sd3_backbone(variant: str = "SD3-Medium", image_size: int = 512, vae_blocks: tuple[int, ...] = SD_VAE_BLOCKS,
                        latent_channels: int = 16, text_dim: int = 4096, pooled_dim: int = 2048,
                        text_tokens: int = 333, seed: int = 0) -> Backbone:
    """A random-weight SD3 pipeline's shapes, nothing downloaded: `SD3-Medium` at 512 px is the published setting.

    An SD-shaped AutoencoderKL with 16 latent channels (8x down: 64x64 latents), the 24 x 1536 MMDiT with patch 2
    (32x32 = 1024 image tokens), and empty-prompt embeddings of SD3's shapes (77 CLIP + 256 T5 tokens x 4096,
    pooled 2048) filled with small random values. Scale checks (bench/) use it.
    """
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
                        block_out_channels=tuple(vae_blocks), layers_per_block=2,
                        norm_num_groups=min(32, min(vae_blocks)), sample_size=image_size,
                        scaling_factor=1.5305, shift_factor=0.0609)
    latent = image_size // 2 ** (len(vae_blocks) - 1)
    transformer = build_mmdit(variant, latent, latent_channels, text_dim, pooled_dim)
    conditioning = Conditioning(prompt_embeds=torch.randn(1, text_tokens, text_dim) * 0.1,
                                pooled_prompt_embeds=torch.randn(1, pooled_dim) * 0.1)
    return Backbone(transformer=transformer.eval(), scheduler=make_flow_scheduler(), vae=vae.eval(),
                    source=f"random {variant} latent {image_size}px", conditioning=conditioning)


SD3_PIPELINE = "StableDiffusion3Pipeline"
CONDITIONING_FILE = "conditioning.safetensors"  # an MMDiT's empty-prompt embeddings (and class embeddings)


def save_backbone(backbone: Backbone, directory: Path) -> Path:
    """Write a backbone as a diffusers pipeline directory (transformer/, vae/, scheduler/, model_index.json).

    DiT: a DiTPipeline. MMDiT: a StableDiffusion3Pipeline without text encoders, and its conditioning beside it.
    """
    directory = Path(directory)
    if backbone.family == "dit":
        from diffusers import DiTPipeline

        DiTPipeline(transformer=backbone.transformer, vae=backbone.vae, scheduler=backbone.scheduler
                    ).save_pretrained(directory)
        return directory
    for name, part in (("transformer", backbone.transformer), ("vae", backbone.vae),
                       ("scheduler", backbone.scheduler)):
        if part is not None:
            part.save_pretrained(directory / name)
    library = {"transformer": ["diffusers", "SD3Transformer2DModel"],
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "vae": ["diffusers", "AutoencoderKL"] if backbone.vae is not None else [None, None]}
    nothing = [None, None]
    index = {"_class_name": SD3_PIPELINE, "_diffusers_version": _diffusers_version(), **library,
             **{name: nothing for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                           "tokenizer_2", "tokenizer_3", "image_encoder", "feature_extractor")}}
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    if backbone.conditioning is not None:
        backbone.conditioning.save(directory / CONDITIONING_FILE)
    return directory


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def make_scheduler(num_train_timesteps: int, beta_schedule: str, clip_sample: bool = True) -> DDPMScheduler:
    """The DDPM noise schedule q(x_t | x_0) for training (epsilon prediction; x_0 clipped for pixel space)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=clip_sample,  # pixel space lives in [-1, 1]; VAE latents do not
    )


def make_flow_scheduler(num_train_timesteps: int = 1000, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    """The rectified-flow schedule x_t = sigma * eps + (1 - sigma) * x_0, sigmas shifted as SD3 does (shift 3)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


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
#                                   Noise schedules, one convention
# ---------------------------------------------------------------------------------------------

Scheduler = DDPMScheduler | FlowMatchEulerDiscreteScheduler


@dataclass(frozen=True)
class NoisePoint:
    """Where paper timestep t (0 = clean) sits in a backbone's own schedule."""

    t: int
    index: int  # the scheduler's index: DDPM's timestep itself; flow matching's num_train_timesteps - t
    model_timestep: float  # what the transformer is given: DDPM's t; flow matching's sigma * num_train_timesteps
    sigma: float | None = None  # flow matching: x_t = sigma * eps + (1 - sigma) * x_0
    alpha_bar: float | None = None  # DDPM: x_t = sqrt(alpha_bar) * x_0 + sqrt(1 - alpha_bar) * eps

    def record(self) -> dict:
        """The JSON form the run and the selection record carry."""
        out = {"t": self.t, "scheduler_index": self.index, "model_timestep": round(self.model_timestep, 4)}
        if self.sigma is not None:
            out["sigma"] = round(self.sigma, 6)
        if self.alpha_bar is not None:
            out["alpha_bar"] = round(self.alpha_bar, 6)
        return out


def noise_point(scheduler: Scheduler, t: int) -> NoisePoint:
    """Paper t -> the schedule: DDPM maps t to its alpha_bar; flow matching to sigma through the scheduler's own
    (shifted) sigma table, whose index counts down from pure noise (index = num_train_timesteps - t, so SD3's
    index 950 is t = 50, sigma ~0.14 at shift 3); t = 0 is the clean input (sigma 0, the table's terminal)."""
    steps = int(scheduler.config.num_train_timesteps)
    if not 0 <= int(t) < steps:
        raise AselectError(f"timestep {t} is outside [0, {steps})")
    t = int(t)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        index = steps - t
        if t == 0:
            return NoisePoint(t=0, index=steps, model_timestep=0.0, sigma=0.0)
        sigma = float(scheduler.sigmas[index])
        return NoisePoint(t=t, index=index, model_timestep=sigma * steps, sigma=sigma)
    return NoisePoint(t=t, index=t, model_timestep=float(t), alpha_bar=float(scheduler.alphas_cumprod[t]))


def scheduler_from_config(config: dict) -> Scheduler:
    """The scheduler a backbone's recorded config describes (its `_class_name`)."""
    cls = FlowMatchEulerDiscreteScheduler if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler" \
        else DDPMScheduler
    return cls.from_config(config)


# ---------------------------------------------------------------------------------------------
#                                           Backbone
# ---------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """An MMDiT's fixed conditioning: the empty prompt's embeddings (and, for one trained here, per-class pooled
    embeddings for sampling). Feature extraction always uses the empty prompt: no label information."""

    prompt_embeds: torch.Tensor  # (1, L, joint_attention_dim)
    pooled_prompt_embeds: torch.Tensor  # (1, pooled_projection_dim)
    class_pooled: torch.Tensor | None = None  # (classes + 1, pooled_projection_dim): index `classes` = empty

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"prompt_embeds": self.prompt_embeds, "pooled_prompt_embeds": self.pooled_prompt_embeds}
        if self.class_pooled is not None:
            tensors["class_pooled"] = self.class_pooled
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(path))

    def batch(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled) repeated for a batch of n."""
        return (self.prompt_embeds.to(device, dtype).expand(n, -1, -1),
                self.pooled_prompt_embeds.to(device, dtype).expand(n, -1))


@dataclass
class Backbone:
    """A loaded DiT or MMDiT with the noise schedule it was trained under (and its VAE for latent models)."""

    transformer: DiTTransformer2DModel | SD3Transformer2DModel
    scheduler: Scheduler  # the noise schedule used for q(x_t | x_0)
    vae: AutoencoderKL | None  # None for pixel-space models
    source: str  # directory or hub id it came from
    conditioning: Conditioning | None = None  # sd3: the empty prompt the features are computed under
    input_size: int | None = None  # sd3: the pixel size fed (default: sample_size x the VAE's downsampling)

    @property
    def family(self) -> Literal["dit", "sd3"]:
        """`sd3` for an MMDiT (SD3Transformer2DModel), else `dit`."""
        return "sd3" if isinstance(self.transformer, SD3Transformer2DModel) else "dit"

    @property
    def flow(self) -> bool:
        """True when the noise is rectified flow (sigma), False for DDPM (alpha_bar)."""
        return isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler)

    @property
    def kind(self) -> Literal["pixel", "latent"]:
        """'latent' when the model works on VAE latents, else 'pixel'."""
        return "pixel" if self.vae is None else "latent"

    @property
    def null_class(self) -> int:
        """The class-dropout (unconditional) label index (DiT); an MMDiT's empty prompt has none: -1."""
        return int(self.transformer.config.num_embeds_ada_norm) if self.family == "dit" else -1

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (1 for pixel-space models)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The pixel size the backbone is fed."""
        if self.input_size is not None:
            return int(self.input_size)
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    @property
    def token_grid(self) -> int:
        """Image tokens per side."""
        return self.image_size // self.vae_scale_factor // int(self.transformer.config.patch_size)

    @property
    def width(self) -> int:
        """Channels of every token site (heads x head dim)."""
        config = self.transformer.config
        return int(config.num_attention_heads) * int(config.attention_head_dim)

    @property
    def image_channels(self) -> int:
        """Channels of the pixel images the backbone expects."""
        cfg = self.transformer.config if self.vae is None else self.vae.config
        return int(cfg.in_channels)

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.transformer.config.num_layers)

    @property
    def num_train_timesteps(self) -> int:
        """t ranges over [0, this)."""
        return int(self.scheduler.config.num_train_timesteps)

    def noise_point(self, t: int) -> NoisePoint:
        """Paper t in this backbone's schedule."""
        return noise_point(self.scheduler, t)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """x_t of the schedule: DDPM's q(x_t | x_0), or rectified flow's sigma * eps + (1 - sigma) * x_0."""
        if self.flow:
            sigma = self.noise_point(t).sigma
            return sigma * noise + (1.0 - sigma) * x0
        steps = torch.full((len(x0),), int(t), dtype=torch.long, device=x0.device)
        return self.scheduler.add_noise(x0, noise, steps)

    def forward(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The transformer's prediction for x_t at paper t, unconditioned: DiT's null class, MMDiT's empty prompt."""
        n = len(x_t)
        if self.family == "dit":
            labels = torch.full((n,), self.null_class, dtype=torch.long, device=x_t.device)
            steps = torch.full((n,), int(t), dtype=torch.long, device=x_t.device)
            return self.transformer(x_t, timestep=steps, class_labels=labels).sample
        if self.conditioning is None:
            raise AselectError(f"{self.source}: an MMDiT needs prompt embeddings (none were loaded)")
        prompt, pooled = self.conditioning.batch(n, x_t.device, x_t.dtype)
        steps = torch.full((n,), self.noise_point(t).model_timestep, dtype=x_t.dtype, device=x_t.device)
        return self.transformer(hidden_states=x_t, encoder_hidden_states=prompt, pooled_projections=pooled,
                                timestep=steps).sample
