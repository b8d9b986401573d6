"""Loading backbones (diffusers directories, hub ids in the local cache), fingerprints, and encoding images.

Two families (pipelines.models): a DiT (`DiTTransformer2DModel`, DDPM) and an SD3-family MMDiT
(`SD3Transformer2DModel`, rectified flow), told apart by the transformer's config.json. An MMDiT's features are
computed under the empty prompt, encoded once by the text encoders the directory holds (CLIP-L/G; T5 only when
asked: the published setting drops it and its part is zeros), or read from a safetensors file of
`prompt_embeds` / `pooled_prompt_embeds`.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
)
from diffusers.utils import logging as diffusers_logging

try:  # imported here, on the main thread (diffusers' lazy imports are not thread-safe); needs transformers
    from diffusers import StableDiffusion3Pipeline
except ImportError:  # pragma: no cover - transformers missing: only encoding the empty prompt needs it
    StableDiffusion3Pipeline = None

from aselect.pipelines.models import (
    CONDITIONING_FILE,
    Backbone,
    Conditioning,
    make_flow_scheduler,
    make_scheduler,
)
from aselect.pipelines.training import tensor_mismatch
from aselect.storage.errors import AselectError

logger = logging.getLogger("aselect.backbone")

# Class names in a transformer config.json that we accept as a DiT (old hub DiTs say Transformer2DModel).
DIT_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")
MMDIT_CLASS_NAMES = ("SD3Transformer2DModel",)
# A loaded MMDiT's backbone stage: a small directory naming the source, beside the conditioning it encoded.
SOURCE_FILE = "aselect-source.json"
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


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


def transformer_family(path: Path, expected: str | None = None) -> str:
    """`dit` or `sd3` from a transformer config.json, or an error naming the file (and a family that disagrees)."""
    config = _read_json(path)
    name = config.get("_class_name")
    if name in MMDIT_CLASS_NAMES:
        family = "sd3"
    elif name in DIT_CLASS_NAMES:
        if name == "Transformer2DModel" and config.get("norm_type") != "ada_norm_zero":
            raise AselectError(f"{path}: a Transformer2DModel without norm_type 'ada_norm_zero' is not a DiT")
        family = "dit"
    else:
        raise AselectError(f"{path}: _class_name is {name!r}, expected DiTTransformer2DModel (family dit) or "
                           f"SD3Transformer2DModel (family sd3)")
    if expected is not None and family != expected:
        raise AselectError(f"{path}: _class_name {name!r} is family {family}, but backbone.family is {expected}")
    return family


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
    weights = sorted(where.glob("diffusion_pytorch_model*.safetensors")) or sorted(where.glob("*.bin"))
    if not weights:
        raise AselectError(f"{where}: cannot load weights (no diffusion_pytorch_model weights file)")
    try:
        with quiet_diffusers():
            model, info = cls.from_pretrained(directory, subfolder=subfolder, local_files_only=True,
                                              output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - safetensors, OSError, shape mismatch, ...: all mean "bad weights"
        raise AselectError(f"{where}: cannot load weights ({_weights_reason(exc)})") from None
    # diffusers leaves a tensor the file lacks at its random init (and its warning is silenced above): refuse it
    _check_loading_info(weights[0] if len(weights) == 1 else where, info)
    return model.eval().requires_grad_(False)


def _check_loading_info(named: Path, info: dict) -> None:
    """Refuse weights that do not match the model exactly, from diffusers' or transformers' `output_loading_info`
    (missing, unexpected or mismatched tensors), in one line naming `named` and the first tensor."""
    mismatch = tensor_mismatch(named, info.get("missing_keys") or [], info.get("unexpected_keys") or [])
    if mismatch is not None:
        raise mismatch
    keys = info.get("mismatched_keys")
    if keys:  # (name, shape in the file, the model's shape): a list from diffusers, a set from transformers
        name, found, wanted = keys[0] if isinstance(keys, list) else min(keys, key=lambda k: k[0])
        raise AselectError(f"{named}: tensor {name!r} has shape {tuple(found)}, the model's is {tuple(wanted)}")


def _load_scheduler(directory: Path, family: str) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training noise schedule from scheduler/: DDPM for a DiT (from_config keeps the betas), rectified flow
    (FlowMatchEulerDiscreteScheduler, its shift) for an MMDiT."""
    path = directory / "scheduler" / "scheduler_config.json"
    flow = family == "sd3"
    if not path.is_file():
        logger.warning("%s: no scheduler config; assuming %s", path.parent,
                       "rectified flow, 1000 steps, shift 3" if flow else "DDPM linear, 1000 steps")
        return make_flow_scheduler() if flow else make_scheduler(1000, "linear")
    config = _read_json(path)
    cls = FlowMatchEulerDiscreteScheduler if flow else DDPMScheduler
    try:
        with quiet_diffusers():
            return cls.from_config(config)
    except Exception as exc:  # noqa: BLE001 - an unusable schedule is a user-facing config problem
        raise AselectError(f"{path}: cannot build a {'flow-matching' if flow else 'DDPM'} schedule "
                           f"({short_error(exc)})") from None


@dataclass(frozen=True)
class LoadOptions:
    """How an MMDiT is conditioned and fed (a DiT takes none of these)."""

    family: str | None = None  # expected family; None: detected
    prompt_embeds: str | None = None  # safetensors with prompt_embeds / pooled_prompt_embeds
    image_size: int | None = None  # pixels fed to an MMDiT
    use_t5: bool = False  # encode with text_encoder_3 too (published setting: no, its part is zeros)


def _load_directory(directory: Path, source: str, options: LoadOptions) -> Backbone:
    """Load one of the accepted layouts from an existing directory."""
    if (directory / SOURCE_FILE).is_file():  # a loaded MMDiT's backbone stage: source + its conditioning
        return _load_reference(directory)
    index_file = directory / "model_index.json"
    if index_file.is_file() or (directory / "transformer").is_dir():
        # (a) a DiTPipeline / StableDiffusion3Pipeline directory, or (b) aselect's own pretraining output
        index = _read_json(index_file) if index_file.is_file() else {}
        wants_vae = isinstance(index.get("vae"), list) and None not in index["vae"]
        if wants_vae and not (directory / "vae").is_dir():
            raise AselectError(f"{directory / 'vae'}: missing (model_index.json lists a VAE)")
        if not (directory / "transformer").is_dir():
            raise AselectError(f"{directory / 'transformer'}: missing (a pipeline directory needs its transformer)")
        family = transformer_family(directory / "transformer" / "config.json", options.family)
        cls = SD3Transformer2DModel if family == "sd3" else DiTTransformer2DModel
        transformer = load_model_part(cls, directory, "transformer")
        vae = load_model_part(AutoencoderKL, directory, "vae") if (directory / "vae").is_dir() else None
        scheduler = _load_scheduler(directory, family)
    elif (directory / "config.json").is_file():
        # (c) a bare transformer directory: the family's default schedule.
        family = transformer_family(directory / "config.json", options.family)
        cls = SD3Transformer2DModel if family == "sd3" else DiTTransformer2DModel
        transformer = load_model_part(cls, directory, None)
        vae, scheduler = None, make_flow_scheduler() if family == "sd3" else make_scheduler(1000, "linear")
    else:
        raise AselectError(
            f"{directory}: not a backbone directory (expected model_index.json, transformer/ or config.json)"
        )
    if vae is not None and int(vae.config.latent_channels) != int(transformer.config.in_channels):
        raise AselectError(
            f"{directory}: VAE latent_channels {vae.config.latent_channels} != "
            f"transformer in_channels {transformer.config.in_channels}"
        )
    if family == "dit":
        if options.prompt_embeds or options.image_size:
            raise AselectError(f"{directory}: a DiT takes no backbone.prompt_embeds or backbone.image_size "
                               f"(they are for an SD3-family MMDiT)")
        return Backbone(transformer=transformer, scheduler=scheduler, vae=vae, source=source)
    backbone = Backbone(transformer=transformer, scheduler=scheduler, vae=vae, source=source,
                        input_size=options.image_size)
    _check_input_size(backbone, directory)
    backbone.conditioning = _conditioning(directory, backbone, options)
    return backbone


def _check_input_size(backbone: Backbone, directory: Path) -> None:
    """An MMDiT's input: a whole number of patches, within its positional-embedding table."""
    config = backbone.transformer.config
    step = backbone.vae_scale_factor * int(config.patch_size)
    size = backbone.image_size
    if size % step:
        raise AselectError(f"backbone.image_size {size}: not a multiple of {step} (VAE downsampling x patch size "
                           f"of {directory})")
    most = int(config.pos_embed_max_size or 0) * step
    if most and size > most:
        raise AselectError(f"backbone.image_size {size}: {directory} embeds positions up to {most} px "
                           f"(pos_embed_max_size {config.pos_embed_max_size})")


def read_conditioning(path: Path, backbone: Backbone) -> Conditioning:
    """`prompt_embeds` (1, L, joint_attention_dim) and `pooled_prompt_embeds` (1, pooled_projection_dim) from a
    safetensors file, checked against the transformer's widths."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise AselectError(f"{path}: missing (backbone.prompt_embeds)") from None
    except (OSError, SafetensorError, ValueError) as exc:
        raise AselectError(f"{path}: not a readable safetensors file ({short_error(exc)})") from None
    missing = [k for k in ("prompt_embeds", "pooled_prompt_embeds") if k not in tensors]
    if missing:
        raise AselectError(f"{path}: no {' or '.join(missing)} tensor (has {', '.join(sorted(tensors)) or 'none'})")
    prompt, pooled = tensors["prompt_embeds"].float(), tensors["pooled_prompt_embeds"].float()
    prompt = prompt[None] if prompt.ndim == 2 else prompt[:1]
    pooled = pooled[None] if pooled.ndim == 1 else pooled[:1]
    config = backbone.transformer.config
    if prompt.ndim != 3 or prompt.shape[-1] != int(config.joint_attention_dim):
        raise AselectError(f"{path}: prompt_embeds has shape {tuple(tensors['prompt_embeds'].shape)}; the "
                           f"transformer expects (1, tokens, {config.joint_attention_dim}) (joint_attention_dim)")
    if pooled.ndim != 2 or pooled.shape[-1] != int(config.pooled_projection_dim):
        raise AselectError(f"{path}: pooled_prompt_embeds has shape {tuple(tensors['pooled_prompt_embeds'].shape)}; "
                           f"the transformer expects (1, {config.pooled_projection_dim}) (pooled_projection_dim)")
    if not (torch.isfinite(prompt).all() and torch.isfinite(pooled).all()):
        raise AselectError(f"{path}: prompt embeddings hold NaN or inf")
    return Conditioning(prompt, pooled, tensors.get("class_pooled"))


def _conditioning(directory: Path, backbone: Backbone, options: LoadOptions) -> Conditioning:
    """The empty prompt's embeddings: from backbone.prompt_embeds, else the directory's own conditioning file (an
    MMDiT trained here), else encoded by its text encoders."""
    if options.prompt_embeds:
        return read_conditioning(Path(options.prompt_embeds).expanduser(), backbone)
    if (directory / CONDITIONING_FILE).is_file():
        return read_conditioning(directory / CONDITIONING_FILE, backbone)
    encoders = [name for name in ("text_encoder", "text_encoder_2") if (directory / name).is_dir()]
    if len(encoders) < 2:
        raise AselectError(f"{directory}: no text encoders (text_encoder/ and text_encoder_2/) and no "
                           f"backbone.prompt_embeds file: the MMDiT cannot be conditioned on the empty prompt")
    return encode_empty_prompt(directory, backbone, options.use_t5)


@torch.no_grad()
def encode_empty_prompt(directory: Path, backbone: Backbone, use_t5: bool = False) -> Conditioning:
    """Encode "" once with the directory's CLIP encoders (and T5 with `use_t5`; else its part is zeros), as
    StableDiffusion3Pipeline.encode_prompt does without guidance; the encoders are freed afterwards."""
    if StableDiffusion3Pipeline is None:
        raise AselectError(f"{directory}: encoding the empty prompt needs the transformers package; install it, "
                           f"or give backbone.prompt_embeds")
    t5 = use_t5 and (directory / "text_encoder_3").is_dir()
    if use_t5 and not t5:
        raise AselectError(f"{directory / 'text_encoder_3'}: missing (backbone.use_t5 asks for the T5 encoder)")
    skip = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    try:
        with quiet_diffusers():
            from transformers.utils import logging as transformers_logging  # present: the pipeline imported

            diffusers_logging.disable_progress_bar()
            transformers_logging.disable_progress_bar()
            encoders = {name: _load_text_encoder(directory, name)
                        for name in ("text_encoder", "text_encoder_2", *(("text_encoder_3",) if t5 else ()))}
            pipe = StableDiffusion3Pipeline.from_pretrained(directory, transformer=backbone.transformer, vae=None,
                                                            local_files_only=True, **skip, **encoders)
            prompt, _, pooled, _ = pipe.encode_prompt(prompt="", prompt_2=None, prompt_3=None, device="cpu",
                                                      do_classifier_free_guidance=False)
    except AselectError:
        raise
    except Exception as exc:  # noqa: BLE001 - tokenizer/encoder files a user brought: one line naming them
        raise AselectError(f"{directory}: cannot encode the empty prompt with its text encoders "
                           f"({_weights_reason(exc)})") from None
    finally:
        diffusers_logging.enable_progress_bar()
    del pipe
    gc.collect()  # the text encoders are not needed again
    logger.info("encoded the empty prompt with %s: prompt_embeds %s, pooled %s", directory,
                tuple(prompt.shape), tuple(pooled.shape))
    return Conditioning(prompt.float().cpu(), pooled.float().cpu())


def _load_text_encoder(directory: Path, name: str) -> torch.nn.Module:
    """One text encoder of an SD3 directory, loaded strictly: transformers leaves a tensor its file lacks at its
    random init, which would change the prompt embedding without a word."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel  # present: the pipeline imported

    cls = T5EncoderModel if name == "text_encoder_3" else CLIPTextModelWithProjection
    where = directory / name
    model, info = cls.from_pretrained(where, local_files_only=True, output_loading_info=True)
    weights = sorted(where.glob("*.safetensors")) or sorted(where.glob("*.bin"))
    _check_loading_info(weights[0] if len(weights) == 1 else where, info)
    return model.eval().requires_grad_(False)


def write_reference(stage_model: Path, backbone: Backbone, source: str) -> None:
    """A loaded MMDiT's stage directory: the source it came from, the input size and the conditioning it used."""
    stage_model.mkdir(parents=True, exist_ok=True)
    backbone.conditioning.save(stage_model / CONDITIONING_FILE)
    (stage_model / SOURCE_FILE).write_text(json.dumps({"source": source, "image_size": backbone.input_size}))


def _load_reference(directory: Path) -> Backbone:
    """Load the MMDiT a backbone stage names, with the conditioning the stage stored (no text encoder runs)."""
    ref = _read_json(directory / SOURCE_FILE)
    if not isinstance(ref.get("source"), str):
        raise AselectError(f"{directory / SOURCE_FILE}: no 'source' path")
    options = LoadOptions(family="sd3", prompt_embeds=str(directory / CONDITIONING_FILE),
                          image_size=ref.get("image_size"))
    return load_backbone(ref["source"], options)


def load_backbone(path_or_id: str, options: LoadOptions | None = None) -> Backbone:
    """Load a diffusers DiT or MMDiT from a local directory (or a hub id, resolved offline from the local cache)."""
    options = options or LoadOptions()
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        backbone = _load_directory(path, str(path_or_id), options)
    elif path.exists():
        raise AselectError(f"{path}: not a directory (expected a backbone directory)")
    elif HUB_ID.match(str(path_or_id)):
        from huggingface_hub import snapshot_download  # late: only hub ids need it

        try:
            local = snapshot_download(str(path_or_id), local_files_only=True)
        except Exception:  # noqa: BLE001 - every failure here means "not cached"
            raise AselectError(
                f"{path_or_id}: backbone directory does not exist, and as a hub id it is not in the local "
                "Hugging Face cache (nothing is downloaded at run time; download it beforehand)"
            ) from None
        backbone = _load_directory(Path(local), str(path_or_id), options)
    else:
        raise AselectError(f"{path}: backbone directory does not exist")
    logger.info("loaded %s %s backbone from %s: %d layers, %d px x %d ch", backbone.kind, backbone.family,
                path_or_id, backbone.num_layers, backbone.image_size, backbone.image_channels)
    return backbone


def backbone_fingerprint(path_or_id: str, prompt_embeds: str | None = None) -> str:
    """What a loaded backbone's stage key hashes: config files' bytes and weight files' sizes and mtimes (and the
    bytes of a prompt-embeddings file)."""
    path = Path(path_or_id).expanduser()
    extra = ""
    if prompt_embeds:
        file = Path(prompt_embeds).expanduser()
        if not file.is_file():
            raise AselectError(f"{file}: missing (backbone.prompt_embeds)")
        extra = ":embeds:" + hashlib.sha256(file.read_bytes()).hexdigest()
    if not path.is_dir():
        load_backbone(path_or_id)  # raises the one-line error for missing directories and uncached ids
        return f"hub:{path_or_id}{extra}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        stat = file.stat()
        digest.update(rel.encode())
        # configs are small: hash their bytes; weights are large: their size and mtime say enough
        digest.update(file.read_bytes() if file.suffix == ".json" else f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"dir:{digest.hexdigest()}{extra}"


def describe(backbone: Backbone) -> dict:
    """A JSON-able summary for manifests: family, kind, depth, width, token grid, schedule, parameter count."""
    config = backbone.transformer.config
    width, grid = backbone.width, backbone.token_grid
    params = sum(p.numel() for p in backbone.transformer.parameters())
    vae, kind = None, backbone.kind
    if backbone.vae is not None:
        side, channels = backbone.image_size // backbone.vae_scale_factor, int(backbone.vae.config.latent_channels)
        vae = {"blocks": list(backbone.vae.config.block_out_channels), "latent_channels": channels,
               "downsample": backbone.vae_scale_factor, "latent_size": side,
               "scaling_factor": float(backbone.vae.config.scaling_factor),
               "shift_factor": float(backbone.vae.config.get("shift_factor") or 0.0),
               "parameters": sum(p.numel() for p in backbone.vae.parameters())}
        kind = f"latent ({backbone.image_size} px -> {channels}x{side}x{side})"
    model = "MMDiT (sd3, rectified flow)" if backbone.family == "sd3" else "DiT (DDPM)"
    out = {
        "family": backbone.family, "kind": backbone.kind, "source": backbone.source, "num_layers": backbone.num_layers,
        "width": width, "patch_size": int(config.patch_size), "token_grid": grid, "image_size": backbone.image_size,
        "image_channels": backbone.image_channels, "null_class": backbone.null_class, "parameters": params,
        "num_train_timesteps": backbone.num_train_timesteps, "vae": vae,
        "scheduler": {k: v for k, v in dict(backbone.scheduler.config).items() if _json_scalar(v)},
        "short": f"{model}, {kind}, {backbone.num_layers} layers x {width}, {grid}x{grid} tokens, "
                 f"{params / 1e6:.2f}M params",
    }
    if backbone.conditioning is not None:
        out["conditioning"] = {"prompt_embeds": list(backbone.conditioning.prompt_embeds.shape),
                               "pooled_prompt_embeds": list(backbone.conditioning.pooled_prompt_embeds.shape)}
    return out


def _json_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool) or (
        isinstance(value, list) and all(isinstance(v, str | int | float) for v in value) and len(value) < 16)


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
    """uint8 (B,C,H,W) images -> the model's input space: [-1, 1] pixels or VAE latent mean * scaling_factor.

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
    # 2. Match the spatial size (a DiT's positional embedding is fixed to one grid; an MMDiT's to the size fed).
    size = backbone.image_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    # 3. Latent models: encode with the VAE (the distribution mean, so features are deterministic), shifted and
    #    scaled as the pipeline does (SD3's VAE has a shift_factor; SD's and ours have none).
    if backbone.vae is not None:
        x = x.to(backbone.vae.dtype)
        shift = float(backbone.vae.config.get("shift_factor") or 0.0)
        x = (backbone.vae.encode(x).latent_dist.mean - shift) * backbone.vae.config.scaling_factor
    return x.to(backbone.transformer.dtype)
