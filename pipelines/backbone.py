"""Loading DiT backbones (diffusers directories, hub ids in the local cache), fingerprints, and encoding images."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from diffusers.utils import logging as diffusers_logging

from aselect.pipelines.models import Backbone, make_scheduler
from aselect.storage.errors import AselectError

logger = logging.getLogger("aselect.backbone")

# Class names in a transformer config.json that we accept as a DiT (old hub DiTs say Transformer2DModel).
DIT_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")


# ---------------------------------------------------------------------------------------------
#                                           Loading
# ---------------------------------------------------------------------------------------------

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' logging for a moment: config-mismatch chatter, and errors we re-raise."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def short_error(exc: BaseException) -> str:
    """A one-line, bounded description of an exception."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _read_json(path: Path) -> dict:
    """A JSON object from disk, or an AselectError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AselectError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AselectError(f"{path}: invalid JSON ({short_error(exc)})") from None
    if not isinstance(data, dict):
        raise AselectError(f"{path}: invalid JSON (expected an object, got {type(data).__name__})")
    return data


def _check_dit_config(path: Path) -> None:
    """Fail unless path (a config.json) describes a DiT transformer."""
    config = _read_json(path)
    name = config.get("_class_name")
    if name not in DIT_CLASS_NAMES:
        raise AselectError(f"{path}: _class_name is {name!r}, expected DiTTransformer2DModel")
    if name == "Transformer2DModel" and config.get("norm_type") != "ada_norm_zero":
        raise AselectError(f"{path}: a Transformer2DModel without norm_type 'ada_norm_zero' is not a DiT")


def _weights_reason(exc: BaseException) -> str:
    """The most telling message in an exception chain (diffusers wraps safetensors' own error twice)."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    root = next((e for e in chain if type(e).__module__.startswith("safetensors")), chain[0])
    return short_error(root)


def load_model_part(cls: type, directory: Path, subfolder: str | None) -> torch.nn.Module:
    """from_pretrained one component, mapping any failure to a one-line AselectError."""
    where = directory / subfolder if subfolder else directory
    if not any(where.glob("diffusion_pytorch_model*.safetensors")) and not any(where.glob("*.bin")):
        raise AselectError(f"{where}: cannot load weights (no diffusion_pytorch_model weights file)")
    try:
        with quiet_diffusers():
            model = cls.from_pretrained(directory, subfolder=subfolder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors, OSError, shape mismatch, ...: all mean "bad weights"
        raise AselectError(f"{where}: cannot load weights ({_weights_reason(exc)})") from None
    return model.eval().requires_grad_(False)


def _load_scheduler(directory: Path) -> DDPMScheduler:
    """The training noise schedule from scheduler/, as a DDPMScheduler (from_config keeps the betas)."""
    path = directory / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        logger.warning("%s: no scheduler config; assuming DDPM linear, 1000 steps", path.parent)
        return make_scheduler(1000, "linear")
    config = _read_json(path)
    try:
        with quiet_diffusers():
            return DDPMScheduler.from_config(config)
    except Exception as exc:  # noqa: BLE001 - an unusable schedule is a user-facing config problem
        raise AselectError(f"{path}: cannot build a DDPM schedule ({short_error(exc)})") from None


def _load_directory(directory: Path, source: str) -> Backbone:
    """Load one of the three accepted layouts from an existing directory."""
    index_file = directory / "model_index.json"
    if index_file.is_file() or (directory / "transformer").is_dir():
        # (a) a DiTPipeline directory, or (b) aselect's own pretraining output (no model_index, no vae).
        index = _read_json(index_file) if index_file.is_file() else {}
        wants_vae = isinstance(index.get("vae"), list) and None not in index["vae"]
        if wants_vae and not (directory / "vae").is_dir():
            raise AselectError(f"{directory / 'vae'}: missing (model_index.json lists a VAE)")
        _check_dit_config(directory / "transformer" / "config.json")
        transformer = load_model_part(DiTTransformer2DModel, directory, "transformer")
        vae = load_model_part(AutoencoderKL, directory, "vae") if (directory / "vae").is_dir() else None
        scheduler = _load_scheduler(directory)
    elif (directory / "config.json").is_file():
        # (c) a bare transformer directory: default DDPM schedule.
        _check_dit_config(directory / "config.json")
        transformer = load_model_part(DiTTransformer2DModel, directory, None)
        vae, scheduler = None, make_scheduler(1000, "linear")
    else:
        raise AselectError(
            f"{directory}: not a DiT directory (expected model_index.json, transformer/ or config.json)"
        )
    backbone = Backbone(transformer=transformer, scheduler=scheduler, vae=vae, source=source)
    if vae is not None and int(vae.config.latent_channels) != int(transformer.config.in_channels):
        raise AselectError(
            f"{directory}: VAE latent_channels {vae.config.latent_channels} != "
            f"transformer in_channels {transformer.config.in_channels}"
        )
    return backbone


def load_backbone(path_or_id: str) -> Backbone:
    """Load a diffusers DiT from a local directory (or a hub id, resolved offline from the local cache)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        backbone = _load_directory(path, str(path_or_id))
    elif path.exists():
        raise AselectError(f"{path}: not a directory (expected a DiT backbone directory)")
    elif HUB_ID.match(str(path_or_id)):
        from huggingface_hub import snapshot_download  # late: only hub ids need it

        try:
            local = snapshot_download(str(path_or_id), local_files_only=True)
        except Exception:  # noqa: BLE001 - every failure here means "not cached"
            raise AselectError(
                f"{path_or_id}: backbone directory does not exist, and as a hub id it is not in the local "
                "Hugging Face cache (nothing is downloaded at run time; download it beforehand)"
            ) from None
        backbone = _load_directory(Path(local), str(path_or_id))
    else:
        raise AselectError(f"{path}: backbone directory does not exist")
    logger.info(
        "loaded %s backbone from %s: %d layers, %d px x %d ch, null class %d",
        backbone.kind,
        path_or_id,
        backbone.num_layers,
        backbone.image_size,
        backbone.image_channels,
        backbone.null_class,
    )
    return backbone


def backbone_fingerprint(path_or_id: str) -> str:
    """What a loaded backbone's stage key hashes: config files' bytes and weight files' sizes and mtimes."""
    path = Path(path_or_id).expanduser()
    if not path.is_dir():
        load_backbone(path_or_id)  # raises the one-line error for missing directories and uncached ids
        return f"hub:{path_or_id}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        stat = file.stat()
        digest.update(rel.encode())
        # configs are small: hash their bytes; weights are large: their size and mtime say enough
        digest.update(file.read_bytes() if file.suffix == ".json" else f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"dir:{digest.hexdigest()}"


def describe(backbone: Backbone) -> dict:
    """A JSON-able summary for manifests: kind, depth, width, token grid, parameter count."""
    config = backbone.transformer.config
    width = int(config.num_attention_heads) * int(config.attention_head_dim)
    grid = int(config.sample_size) // int(config.patch_size)
    params = sum(p.numel() for p in backbone.transformer.parameters())
    vae, kind = None, backbone.kind
    if backbone.vae is not None:
        side, channels = int(config.sample_size), int(backbone.vae.config.latent_channels)
        vae = {"blocks": list(backbone.vae.config.block_out_channels), "latent_channels": channels,
               "downsample": backbone.vae_scale_factor, "latent_size": side,
               "scaling_factor": float(backbone.vae.config.scaling_factor),
               "parameters": sum(p.numel() for p in backbone.vae.parameters())}
        kind = f"latent ({backbone.image_size} px -> {channels}x{side}x{side})"
    return {
        "kind": backbone.kind, "source": backbone.source, "num_layers": backbone.num_layers, "width": width,
        "patch_size": int(config.patch_size), "token_grid": grid, "image_size": backbone.image_size,
        "image_channels": backbone.image_channels, "null_class": backbone.null_class, "parameters": params,
        "num_train_timesteps": int(backbone.scheduler.config.num_train_timesteps), "vae": vae,
        "short": f"{kind}, {backbone.num_layers} layers x {width}, {grid}x{grid} tokens, "
                 f"{params / 1e6:.2f}M params",
    }


# ---------------------------------------------------------------------------------------------
#                                      Images <-> model space
# ---------------------------------------------------------------------------------------------


def model_device(backbone: Backbone) -> torch.device:
    return next(backbone.transformer.parameters()).device


def to_unit(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise AselectError(
            f"expected uint8 images of shape (B, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [-1, 1] -> uint8 numpy."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def encode_images(backbone: Backbone, images: torch.Tensor, pixel_noise: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B,C,H,W) images -> the DiT's input space: [-1, 1] pixels or VAE latent mean * scaling_factor.

    `pixel_noise` (same shape as the images, [-1, 1] units) is added to the pixels first: sensor noise.
    """
    x = to_unit(images).to(model_device(backbone))
    if pixel_noise is not None:
        x = x + pixel_noise.to(x.device)
    # 1. Match the channels the backbone expects (grey <-> RGB), so e.g. digits can go through an RGB DiT.
    want = backbone.image_channels
    if x.shape[1] != want:
        if x.shape[1] == 1:
            x = x.expand(-1, want, -1, -1)
        elif want == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise AselectError(f"images have {x.shape[1]} channels; the backbone expects {want}")
    # 2. Match the spatial size (the DiT's positional embedding is fixed to one grid).
    size = backbone.image_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    # 3. Latent DiTs: encode with the VAE (the distribution mean, so features are deterministic).
    if backbone.vae is not None:
        x = x.to(backbone.vae.dtype)
        x = backbone.vae.encode(x).latent_dist.mean * backbone.vae.config.scaling_factor
    return x.to(backbone.transformer.dtype)
