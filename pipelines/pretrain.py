"""Pretraining a tiny model here (pixel space, or latent behind a VAE trained first), and sampling from it.

Family dit: a class-conditional DiT, DDPM epsilon objective. Family sd3: an SD3 MMDiT with rectified flow
(x_t = sigma * eps + (1 - sigma) * x_0, velocity target eps - x_0), class-conditional through its pooled projection
(a learned embedding per class, the last one the "empty prompt"), one zero prompt token; saved in the SD3 pipeline
layout with its conditioning, so it loads like any StableDiffusion3Pipeline directory without text encoders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.models.embeddings import LabelEmbedding
from PIL import Image
from tqdm.auto import tqdm

from aselect.pipelines.backbone import (
    load_model_part,
    model_device,
    quiet_diffusers,
    short_error,
    to_uint8,
    to_unit,
)
from aselect.pipelines.config import BackboneConfig, LatentConfig
from aselect.pipelines.models import (
    Backbone,
    Conditioning,
    build_dit,
    build_mmdit,
    build_vae,
    init_mmdit,
    make_flow_scheduler,
    make_scheduler,
    save_backbone,
)
from aselect.pipelines.threads import torch_threads
from aselect.pipelines.training import latest_good_checkpoint, save_checkpoint, warmup_cosine
from aselect.storage.code import code_digest
from aselect.storage.errors import AselectError
from aselect.storage.faults import failpoint
from aselect.storage.stages import damaged_files, file_digest, files_entry_error

logger = logging.getLogger("aselect.backbone")

# Class-dropout probability for classifier-free guidance (DiT paper, and diffusers' LabelEmbedding default).
CLASS_DROPOUT = 0.1


# ---------------------------------------------------------------------------------------------
#                                          Pretraining
# ---------------------------------------------------------------------------------------------


@dataclass
class VAEResult:
    """What the VAE phase of a latent pretraining run did."""

    steps: int
    reused: bool  # loaded from a run that was killed after its VAE phase, not trained again
    loss_curve: list[tuple[int, float]]  # (step, mean loss over the preceding window), ~100 points max
    seconds: float  # of the training, when it ran (a reused VAE keeps the original's)
    scaling_factor: float  # 1 / std of the train set's latent means


@dataclass
class PretrainResult:
    """What a pretraining run did."""

    steps: int
    resumed_from: int  # step of the checkpoint it resumed from (0 = fresh start)
    loss_curve: list[tuple[int, float]]  # (step, mean loss over the preceding window), ~100 points max
    seconds: float
    vae: VAEResult | None = None  # latent runs only


def _step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def _fingerprint(images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: BackboneConfig) -> dict:
    """Everything that changes the trained weights; checkpoints and final models must match it."""
    data = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    data.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    train = cfg.pretrain.model_dump(exclude={"checkpoint_every", "sample_steps", "guidance_scale"})
    return dict(
        code=code_digest(__name__),  # a checkpoint from other training code is not resumed
        variant=cfg.variant,
        shape=list(images.shape),
        num_classes=num_classes,
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        data=data.hexdigest()[:16],
        **train,
        # only when set, so pixel-space fingerprints (and the models they guard) stay as they were
        **({"latent": cfg.latent.model_dump()} if cfg.latent is not None else {}),
        **({"family": "sd3", "flow_shift": cfg.flow_shift} if cfg.pretrain_family == "sd3" else {}),
    )


def _vae_fingerprint(fingerprint: dict) -> dict:
    """The part of a latent run's fingerprint that the VAE depends on (not the DiT's settings)."""
    return {key: fingerprint[key] for key in ("code", "shape", "data", "latent")}


class ClassMMDiT(torch.nn.Module):
    """An MMDiT conditioned on a class through its pooled projection (row `classes` = the empty prompt), with one
    zero prompt token: what a tiny text-to-image model trained on labels looks like."""

    def __init__(self, transformer: torch.nn.Module, num_classes: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.classes = torch.nn.Embedding(num_classes + 1, int(transformer.config.pooled_projection_dim))
        torch.nn.init.normal_(self.classes.weight, std=0.02)

    def forward(self, x_t: torch.Tensor, model_timestep: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt(len(x_t)).to(x_t)
        return self.transformer(hidden_states=x_t, encoder_hidden_states=prompt, pooled_projections=self.classes(y),
                                timestep=model_timestep).sample

    def prompt(self, n: int) -> torch.Tensor:
        return torch.zeros(n, 1, int(self.transformer.config.joint_attention_dim))

    def conditioning(self) -> Conditioning:
        """The empty prompt (the last class row, one zero token) and every class's pooled embedding."""
        table = self.classes.weight.detach().float().cpu()
        return Conditioning(prompt_embeds=self.prompt(1), pooled_prompt_embeds=table[-1:].clone(), class_pooled=table)


def flow_sigmas(scheduler: FlowMatchEulerDiscreteScheduler) -> torch.Tensor:
    """sigma for every paper t in [0, N): the scheduler's shifted table read at index N - t (t = 0: sigma 0)."""
    table = torch.cat([scheduler.sigmas.float(), torch.zeros(1)])
    steps = int(scheduler.config.num_train_timesteps)
    return table[steps - torch.arange(steps)]


@dataclass
class _LossTrack:
    """Per-step bookkeeping both training loops share: the non-finite-loss check, the loss curve (~100 points,
    each the mean of its window), the bar and the progress callback (~every 1%); `record` says when to log."""

    total: int
    bar: tqdm
    progress: Callable[[int, int, float], None] | None
    failure: str  # "<what>: loss became {loss} at step {step}; try a lower <knob>"
    curve: list[tuple[int, float]] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # losses since the last curve point (checkpointed)

    def record(self, step: int, loss: float) -> bool:
        """Book one step's loss; True when a log line is due (~every 10%, and the last step)."""
        if not math.isfinite(loss):
            raise AselectError(self.failure.format(loss=loss, step=step))
        last = step == self.total
        self.window.append(loss)
        self.bar.update(1)
        if step % max(1, self.total // 100) == 0 or last:
            self.curve.append((step, float(np.mean(self.window))))
            self.window = []
            self.bar.set_postfix(loss=f"{loss:.4f}")
            if self.progress is not None:
                self.progress(step, self.total, loss)
        return step % max(1, self.total // 10) == 0 or last


DONE_FILE = "done.json"  # written last into a saved model or VAE: its fingerprint, result and files' digests


def _digests(directory: Path) -> dict[str, list]:
    """[size, sha256] of every file under `directory` but its done.json (what `_damage` checks before a reuse)."""
    return {p.relative_to(directory).as_posix(): file_digest(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != DONE_FILE}


def _damage(directory: Path, done: dict) -> str:
    """Why a saved model or VAE cannot be reused as its done.json describes it ('' when every file matches)."""
    files = done.get("files")
    if not isinstance(files, dict) or not files or any(files_entry_error(v) for v in files.values()):
        return f"{DONE_FILE} lists no file digests"
    bad = damaged_files(directory, files, full=True)
    return f"{', '.join(bad[:3])} missing or changed since it was saved" if bad else ""


def _save_model(out_dir: Path, model: DiTTransformer2DModel | ClassMMDiT,
                scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler, done: dict,
                vae: AutoencoderKL | None = None) -> None:
    """Write out_dir/model (transformer/, scheduler/, done.json; latent: a DiTPipeline dir; MMDiT: an SD3 pipeline
    dir with its conditioning) via a temp dir."""
    final, tmp = out_dir / "model", out_dir / "model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(model, ClassMMDiT):
        save_backbone(Backbone(transformer=model.transformer, scheduler=scheduler, vae=vae, source=str(final),
                               conditioning=model.conditioning()), tmp)
    elif vae is None:
        model.save_pretrained(tmp / "transformer")
        scheduler.save_pretrained(tmp / "scheduler")
    else:  # + vae/ and model_index.json: what real latent DiT checkpoints look like
        save_backbone(Backbone(transformer=model, scheduler=scheduler, vae=vae, source=str(final)), tmp)
    (tmp / DONE_FILE).write_text(json.dumps({**done, "files": _digests(tmp)}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _finished(out_dir: Path, fingerprint: dict) -> PretrainResult | None:
    """The stored result if out_dir/model is a finished model for this fingerprint."""
    model_dir = out_dir / "model"
    if not (model_dir / "transformer" / "config.json").is_file() or not (model_dir / "done.json").is_file():
        return None
    try:
        done = json.loads((model_dir / "done.json").read_text())
        if done.get("fingerprint") != fingerprint:
            logger.warning("%s: trained with a different config or dataset; retraining", model_dir)
            return None
        if damage := _damage(model_dir, done):
            logger.warning("%s: %s; retraining", model_dir, damage)
            return None
        vae = done.get("vae")
        return PretrainResult(
            steps=done["steps"],
            resumed_from=done["resumed_from"],
            loss_curve=[(int(s), float(v)) for s, v in done["loss_curve"]],
            seconds=done["seconds"],
            vae=None if vae is None else _vae_result(vae),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s: unreadable record of the finished model, retraining (%s)", model_dir / "done.json",
                       short_error(exc))
        return None


def pretrain(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    cfg: BackboneConfig,
    out_dir: Path,
    progress: Callable[[int, int, float], None] | None = None,
) -> PretrainResult:
    """Train a tiny class-conditional DiT (DDPM epsilon) or MMDiT (rectified flow), with null-class dropout, on
    pixels or VAE latents."""
    images, labels, out_dir = np.asarray(images), np.asarray(labels), Path(out_dir)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise AselectError(
            f"pretrain: expected square uint8 images (N, C, H, W), got {images.dtype} {images.shape}"
        )
    if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= num_classes:
        raise AselectError(
            f"pretrain: expected {len(images)} labels in [0, {num_classes}), got shape {labels.shape}"
        )
    if cfg.latent is not None and images.shape[2] % cfg.latent.downsample:
        raise AselectError(
            f"pretrain: image size {images.shape[2]} is not divisible by the downsampling "
            f"{cfg.latent.downsample} of backbone.latent.vae_blocks {cfg.latent.vae_blocks}"
        )
    fingerprint = _fingerprint(images, labels, num_classes, cfg)
    if (result := _finished(out_dir, fingerprint)) is not None:
        logger.info("%s: already trained (%d steps); reusing", out_dir / "model", result.steps)
        return result

    with torch_threads(cfg.threads):
        data = to_unit(torch.from_numpy(np.ascontiguousarray(images)))  # the whole (small) set in [-1, 1]
        if cfg.latent is None:
            return _train(data, labels, num_classes, cfg, out_dir, fingerprint, progress)
        # Latent: the VAE first (saved, so a killed run never trains it again), then the DiT on its latents.
        # Progress runs over both phases: VAE steps, then DiT steps.
        grand = cfg.latent.steps + cfg.pretrain.steps
        vae_progress = None if progress is None else (lambda s, _t, loss: progress(s, grand, loss))
        vae, vae_result, latents = _vae_phase(data, cfg.latent, out_dir, _vae_fingerprint(fingerprint),
                                              vae_progress)
        dit_progress = None if progress is None else (
            lambda s, _t, loss: progress(cfg.latent.steps + s, grand, loss))
        return _train(latents, labels, num_classes, cfg, out_dir, fingerprint, dit_progress, vae, vae_result)


def _train(
    data: torch.Tensor,
    labels: np.ndarray,
    num_classes: int,
    cfg: BackboneConfig,
    out_dir: Path,
    fingerprint: dict,
    progress: Callable[[int, int, float], None] | None,
    vae: AutoencoderKL | None = None,
    vae_result: VAEResult | None = None,
) -> PretrainResult:
    """Train the model on `data` (float (N, C, S, S): [-1, 1] pixels, or the scaled latents of `vae`)."""
    pcfg, total = cfg.pretrain, cfg.pretrain.steps
    _, channels, size, _ = data.shape
    what = "images" if vae is None else "latents"
    flow = cfg.pretrain_family == "sd3"

    # 1. Model, noise schedule, optimiser (init is seeded so a fresh run is reproducible).
    torch.manual_seed(pcfg.seed)
    if flow:
        transformer = build_mmdit(cfg.variant, size, channels)
        init_mmdit(transformer)
        model = ClassMMDiT(transformer, num_classes).train()
    else:
        model = build_dit(cfg.variant, size, channels, num_classes).train()
    # diffusers' LabelEmbedding drops labels with p=0.1 in train mode, but every block (and the output
    # layer) has its own embedder and draws its own mask, so a sample is almost never null in all of
    # them. Turn that off and drop labels once per sample below, as the DiT paper does, so the null
    # class learns a true unconditional prediction for classifier-free guidance.
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    if flow:
        scheduler = make_flow_scheduler(cfg.num_train_timesteps, cfg.flow_shift)
        sigmas = flow_sigmas(scheduler)
    else:
        scheduler = make_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, clip_sample=vae is None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pcfg.learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(pcfg.warmup_steps, pcfg.steps))

    # 2. Labels (the data is already one float tensor), and the null class for label dropout.
    targets = torch.from_numpy(labels.astype(np.int64))
    null = torch.full_like(targets[:1], num_classes)

    # 3. Resume from the newest usable checkpoint.
    ckpt_dir = out_dir / "checkpoints"
    start, loss_curve, window_losses = 0, [], []
    if (state := latest_good_checkpoint(ckpt_dir, "step", fingerprint)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        start, loss_curve = int(state["step"]), [tuple(p) for p in state["loss_curve"]]
        window_losses = list(state["window_losses"])
        logger.info("resuming pretraining from %s", ckpt_dir / f"step-{start:07d}.pt")
    logger.info(
        "pretraining %s on %d %s %dx%dx%d, %d classes: steps %d..%d, batch %d, %d threads",
        cfg.variant,
        len(data),
        what,
        channels,
        size,
        size,
        num_classes,
        start + 1,
        total,
        pcfg.batch_size,
        torch.get_num_threads(),
    )

    # 4. Train. Step s draws everything random from a generator seeded by (seed, s), so resuming at any
    #    checkpoint replays exactly the same batches, timesteps, noise and label drops.
    began = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc="pretrain", unit="step", disable=not sys.stderr.isatty())
    track = _LossTrack(total, bar, progress, "pretrain: loss became {loss} at step {step}; try a lower learning_rate",
                       loss_curve, window_losses)
    for step in range(start + 1, total + 1):
        gen = torch.Generator().manual_seed(_step_seed(pcfg.seed, step))
        idx = torch.randint(len(data), (pcfg.batch_size,), generator=gen)
        t = torch.randint(scheduler.config.num_train_timesteps, (pcfg.batch_size,), generator=gen)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(pcfg.batch_size, generator=gen) < CLASS_DROPOUT
        y = torch.where(drop, null, targets[idx])
        torch.manual_seed(_step_seed(pcfg.seed, step))  # any other RNG use in forward is replayed too

        if flow:  # rectified flow: x_t on the line from x_0 to the noise, the velocity eps - x_0 as target
            sigma = sigmas[t].view(-1, 1, 1, 1)
            xt = sigma * noise + (1.0 - sigma) * x0
            pred = model(xt, sigmas[t] * cfg.num_train_timesteps, y)
            loss = F.mse_loss(pred, noise - x0)
        else:
            xt = scheduler.add_noise(x0, noise, t)
            pred = model(xt, timestep=t, class_labels=y).sample
            loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()

        if track.record(step, loss.item()):
            rate = (step - start) / (time.perf_counter() - began)
            logger.info("pretrain step %d/%d: loss %.4f (%.1f steps/s)", step, total, track.curve[-1][1], rate)
        if step % pcfg.checkpoint_every == 0 and step < total:
            save_checkpoint(
                ckpt_dir,
                f"step-{step:07d}.pt",
                dict(
                    step=step,
                    fingerprint=fingerprint,
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    lr_schedule=lr_schedule.state_dict(),
                    loss_curve=track.curve,
                    window_losses=track.window,
                ),
            )
        failpoint("pretrain")
    bar.close()

    # 5. Save a load_backbone-compatible directory (layout b, or a DiTPipeline directory with the VAE);
    #    checkpoints and the separately saved VAE are then redundant.
    seconds = time.perf_counter() - began
    result = PretrainResult(steps=total, resumed_from=start, loss_curve=track.curve, seconds=seconds,
                            vae=vae_result)
    _save_model(out_dir, model.eval(), scheduler, dict(fingerprint=fingerprint, **asdict(result)), vae)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    shutil.rmtree(out_dir / VAE_DIR, ignore_errors=True)
    logger.info("pretrained %s%s in %.0f s; saved %s", cfg.variant, " (MMDiT)" if flow else "", seconds,
                out_dir / "model")
    return result


# ---------------------------------------------------------------------------------------------
#                                    Latent pretraining: the VAE
# ---------------------------------------------------------------------------------------------

VAE_DIR = "vae"  # out_dir/vae: the trained VAE, kept until the DiT phase has finished


def _vae_result(data: dict) -> VAEResult:
    """A VAEResult from its JSON form."""
    return VAEResult(steps=int(data["steps"]), reused=bool(data["reused"]),
                     loss_curve=[(int(s), float(v)) for s, v in data["loss_curve"]],
                     seconds=float(data["seconds"]), scaling_factor=float(data["scaling_factor"]))


@torch.no_grad()
def _latent_means(vae: AutoencoderKL, data: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The posterior means of `data` ([-1, 1] pixels), unscaled, in fixed batches (so reruns match)."""
    vae.eval()
    return torch.cat([vae.encode(data[i : i + batch]).latent_dist.mean for i in range(0, len(data), batch)])


def _saved_vae(out_dir: Path, fingerprint: dict) -> tuple[AutoencoderKL, VAEResult] | None:
    """The VAE a killed run saved before its DiT phase, if it was trained for this fingerprint."""
    done_file = out_dir / VAE_DIR / "done.json"
    if not done_file.is_file():
        return None
    try:
        done = json.loads(done_file.read_text())
        if done.get("fingerprint") != fingerprint:
            logger.warning("%s: VAE trained with a different config or dataset; retraining", out_dir / VAE_DIR)
            return None
        if damage := _damage(out_dir / VAE_DIR, done):
            logger.warning("%s: %s; retraining", out_dir / VAE_DIR, damage)
            return None
        result = _vae_result(done["result"])
        vae = load_model_part(AutoencoderKL, out_dir, VAE_DIR)
    except (OSError, ValueError, KeyError, TypeError, AselectError) as exc:
        logger.warning("%s: unusable saved VAE, retraining (%s)", out_dir / VAE_DIR, short_error(exc))
        return None
    return vae, VAEResult(**{**asdict(result), "reused": True})


def _save_vae(out_dir: Path, vae: AutoencoderKL, fingerprint: dict, result: VAEResult) -> None:
    """Write out_dir/vae (config, weights, done.json) via a temp dir so it appears whole."""
    final, tmp = out_dir / VAE_DIR, out_dir / f"{VAE_DIR}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    (tmp / DONE_FILE).write_text(json.dumps(dict(fingerprint=fingerprint, result=asdict(result), files=_digests(tmp)),
                                            indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _vae_phase(
    data: torch.Tensor,
    latent: LatentConfig,
    out_dir: Path,
    fingerprint: dict,
    progress: Callable[[int, int, float], None] | None,
) -> tuple[AutoencoderKL, VAEResult, torch.Tensor]:
    """The VAE (trained, or reused from a killed run) and the train set's latents, mean * scaling_factor."""
    # 1. A VAE saved by an earlier run of this config is never trained again.
    if (saved := _saved_vae(out_dir, fingerprint)) is not None:
        vae, result = saved
        logger.info("reusing the VAE trained earlier (%s, %d steps)", out_dir / VAE_DIR, result.steps)
        means = _latent_means(vae, data)
    else:
        # 2. Train it, then scale latents to unit std as Stable Diffusion does (its 0.18215 was found
        #    the same way), so the DiT's noise schedule sees the signal-to-noise ratios it was designed for.
        vae, loss_curve, seconds = _train_vae(data, latent, progress)
        means = _latent_means(vae, data)
        vae.register_to_config(scaling_factor=1.0 / float(means.std()))
        result = VAEResult(steps=latent.steps, reused=False, loss_curve=loss_curve, seconds=seconds,
                           scaling_factor=float(vae.config.scaling_factor))
        _save_vae(out_dir, vae, fingerprint, result)
    vae.requires_grad_(False)
    # 3. The DiT's training set: latent means (deterministic, like encode_images' features), scaled.
    latents = means * float(vae.config.scaling_factor)
    logger.info("encoded %d images to latents %s (scaling_factor %.4f, std %.3f)", len(data),
                "x".join(map(str, latents.shape[1:])), vae.config.scaling_factor, float(latents.std()))
    return vae, result, latents


def _train_vae(
    data: torch.Tensor, latent: LatentConfig, progress: Callable[[int, int, float], None] | None
) -> tuple[AutoencoderKL, list[tuple[int, float]], float]:
    """Train an AutoencoderKL on `data` ([-1, 1] pixels): reconstruction MSE + kl_weight * KL."""
    total, (_, channels, size, _) = latent.steps, data.shape

    # 1. Model and optimiser (init is seeded so a run is reproducible); warmup, then cosine decay.
    torch.manual_seed(latent.seed)
    vae = build_vae(channels, size, latent).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=latent.learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total // 20, total))
    logger.info("training a VAE (blocks %s, %d latent channels, %dx down) on %d images %dx%dx%d: "
                "%d steps, batch %d, %d threads", latent.vae_blocks, latent.latent_channels, latent.downsample,
                len(data), channels, size, size, total, latent.batch_size, torch.get_num_threads())

    # 2. Train. Step s draws its batch and posterior sample from a generator seeded by (seed, s).
    began = time.perf_counter()
    bar = tqdm(total=total, desc="vae", unit="step", disable=not sys.stderr.isatty())
    track = _LossTrack(total, bar, progress, "pretrain VAE: loss became {loss} at step {step}; try a lower "
                                             "backbone.latent.learning_rate")
    for step in range(1, total + 1):
        gen = torch.Generator().manual_seed(_step_seed(latent.seed, step))
        x = data[torch.randint(len(data), (latent.batch_size,), generator=gen)]
        torch.manual_seed(_step_seed(latent.seed, step))

        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        # Both terms per pixel: kl_weight then weighs KL against summed reconstruction error, as in LDM.
        kl = posterior.kl().mean() / x[0].numel()
        loss = mse + latent.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()

        if track.record(step, loss.item()):
            rate = step / (time.perf_counter() - began)
            logger.info("VAE step %d/%d: loss %.4f (reconstruction MSE %.4f, KL %.1f) (%.1f steps/s)", step,
                        total, track.curve[-1][1], mse.item(), kl.item() * x[0].numel(), rate)
    bar.close()
    seconds = time.perf_counter() - began
    logger.info("trained the VAE in %.0f s", seconds)
    return vae.eval(), track.curve, seconds


# ---------------------------------------------------------------------------------------------
#                                          Sampling
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(
    backbone: Backbone, class_labels: list[int], steps: int, guidance_scale: float, seed: int
) -> np.ndarray:
    """Samples (uint8 (B,C,H,W)) with classifier-free guidance against the null class: DDIM for a DiT, Euler
    along the flow for an MMDiT trained here (its per-class pooled embeddings)."""
    if backbone.family == "sd3":
        return _sample_flow(backbone, class_labels, steps, guidance_scale, seed)
    model, device = backbone.transformer.eval(), model_device(backbone)
    # "trailing" spacing starts at the last (pure-noise) timestep even with few DDIM steps.
    overrides = dict(timestep_spacing="trailing")
    if backbone.vae is not None:
        overrides["clip_sample"] = False  # latents are not confined to [-1, 1]
    with quiet_diffusers():
        ddim = DDIMScheduler.from_config(backbone.scheduler.config, **overrides)
    ddim.set_timesteps(steps)

    # 1. Start from seeded Gaussian noise in the model's input space.
    n, channels, size = len(class_labels), int(model.config.in_channels), int(model.config.sample_size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, channels, size, size), generator=gen).to(device, model.dtype)
    y = torch.tensor(class_labels, dtype=torch.long, device=device)
    guided = guidance_scale != 1.0
    if guided:
        y = torch.cat([y, torch.full_like(y, backbone.null_class)])

    # 2. Denoise: eps = eps_null + g * (eps_cond - eps_null).
    for t in ddim.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        tt = torch.full((len(model_in),), int(t), device=device, dtype=torch.long)
        eps = model(model_in, timestep=tt, class_labels=y).sample[:, :channels]  # drop learned sigma if any
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        x = ddim.step(eps, t, x).prev_sample

    # 3. Back to pixels.
    return _to_pixels(backbone, x)


def _to_pixels(backbone: Backbone, x: torch.Tensor) -> np.ndarray:
    """Model space -> uint8 pixels (through the VAE for latent models, undoing its shift and scale)."""
    if backbone.vae is not None:
        shift = float(backbone.vae.config.get("shift_factor") or 0.0)
        x = backbone.vae.decode(x.to(backbone.vae.dtype) / backbone.vae.config.scaling_factor + shift).sample
    return to_uint8(x)


def _sample_flow(backbone: Backbone, class_labels: list[int], steps: int, guidance_scale: float,
                 seed: int) -> np.ndarray:
    """Euler steps along an MMDiT's flow, v = v_empty + g * (v_class - v_empty)."""
    conditioning = backbone.conditioning
    if conditioning is None or conditioning.class_pooled is None:
        raise AselectError(f"{backbone.source}: class samples need the per-class embeddings of a model trained here")
    model, device = backbone.transformer.eval(), model_device(backbone)
    with quiet_diffusers():
        euler = FlowMatchEulerDiscreteScheduler.from_config(backbone.scheduler.config)
    euler.set_timesteps(steps)
    n, channels, size = len(class_labels), int(model.config.in_channels), int(model.config.sample_size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, channels, size, size), generator=gen).to(device, model.dtype)
    table = conditioning.class_pooled.to(device, model.dtype)
    pooled = torch.cat([table[class_labels], table[-1:].expand(n, -1)])
    prompt = conditioning.prompt_embeds.to(device, model.dtype).expand(2 * n, -1, -1)
    for t in euler.timesteps:
        tt = torch.full((2 * n,), float(t), device=device, dtype=model.dtype)
        v = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=prompt, pooled_projections=pooled,
                  timestep=tt).sample
        cond, uncond = v.chunk(2)
        x = euler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
    return _to_pixels(backbone, x)


def save_grid(images: np.ndarray, path: Path, nrow: int) -> None:
    """Write a uint8 (B,C,H,W) batch as one PNG grid (upscaled so 16 px images are visible)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or not len(images):
        raise AselectError(
            f"save_grid: expected uint8 (B, 1|3, H, W) images, got {images.dtype} {images.shape}"
        )
    b, c, h, w = images.shape
    ncol, pad = max(1, min(nrow, b)), 2
    nrows = math.ceil(b / ncol)
    grid = np.zeros((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = img.transpose(1, 2, 0)
    scale = max(1, 64 // max(h, w))  # nearest-neighbour upscaling keeps pixels crisp
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)  # 2-D -> "L", H x W x 3 -> "RGB"
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
