"""Stage 2 task: load a diffusers DiT or MMDiT, or pretrain a tiny one on the ingested train split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.states import State

from aselect.pipelines import backbone as bb
from aselect.pipelines.config import BackboneConfig
from aselect.pipelines.pretrain import pretrain, sample_images, save_grid
from aselect.pipelines.threads import torch_threads
from aselect.storage.code import code_digest
from aselect.storage.datasets import read_dataset
from aselect.storage.stages import StageDir, StageRef, Workdir, stage_key
from aselect.tasks.stage import Finished, ProgressArtifact, stage_body

MODEL_DIR = "model"
LOAD_ONLY = ("prompt_embeds", "image_size", "use_t5")  # BackboneConfig keys only kind 'load' reads
SAMPLES_PNG = "samples.png"


def plan_backbone(workdir: Workdir, cfg: BackboneConfig, dataset: StageRef) -> StageRef:
    """The backbone's key: a pretrained model depends on the dataset; a loaded one on its files."""
    if cfg.kind == "pretrain":
        # load-only knobs and the other family's schedule knob change nothing a pretraining run does; a DiT's
        # section leaves the family out, as it did before there were two
        # (latent is left out while unset, so pixel-space runs keep the keys they had before it existed)
        unused = {"path", "threads", *LOAD_ONLY} | ({"latent"} if cfg.latent is None else set()) | (
            {"beta_schedule"} if cfg.pretrain_family == "sd3" else {"family", "flow_shift"})
        section = cfg.model_dump(mode="json", exclude=unused)
        if cfg.pretrain_family == "sd3":
            section["family"] = "sd3"
        key = stage_key("backbone", section, {"ingest": dataset.key}, code_digest(__name__))
    else:
        # the prompt embeddings a loaded MMDiT is conditioned on come from its text encoders (in the directory's
        # fingerprint) or from the prompt_embeds file (its bytes are hashed)
        section = cfg.model_dump(mode="json", include={"kind", "path", "family", "image_size", "use_t5"})
        key = stage_key("backbone", section, {}, code_digest(__name__),
                        extra=bb.backbone_fingerprint(cfg.path, cfg.prompt_embeds))
    return workdir.stage("backbone", key).ref()


@dataclass(frozen=True)
class ModelInfo:
    """What a backbone stage recorded: where downstream stages load the model from, and its depth."""

    path: str  # the trained model (inside the stage, so a moved or copied workdir reads its own), or the source
    num_layers: int
    kind: str  # "pretrain" or "load"
    family: str = "dit"  # "dit" or "sd3"
    scheduler: dict | None = None  # the noise schedule's config (maps paper t to sigma or alpha_bar)
    token_grid: int = 0  # image tokens per side

    @classmethod
    def of(cls, stage: StageRef) -> ModelInfo:
        """The model of a finished backbone stage."""
        manifest = stage.dir.read_manifest() or {}
        kind = manifest.get("kind", "load")
        family = manifest["model"].get("family", "dit")
        # pretrained, or a loaded MMDiT (the stage's model/ names the source beside the prompt embeddings it used)
        inside = kind == "pretrain" or manifest.get("model_path") == MODEL_DIR
        path = stage.dir.path / MODEL_DIR if inside else manifest.get("model_path", stage.dir.path / MODEL_DIR)
        described = manifest["model"]
        return cls(str(path), int(described["num_layers"]), kind, family, described.get("scheduler"),
                   int(described.get("token_grid", 0)))


def backbone_dir(stage: StageRef) -> str:
    """Where downstream stages load the backbone from (`ModelInfo.path`)."""
    return ModelInfo.of(stage).path


@task(name="backbone")
def backbone(stage: StageRef, cfg: BackboneConfig, dataset: StageRef) -> State:
    """Load the configured DiT, or pretrain one on the dataset's train split (with `backbone.threads` torch
    threads, restored afterwards: a cached rerun and a first run leave the process alike)."""

    def work(stage_dir: StageDir) -> Finished:
        with torch_threads(cfg.threads):
            if cfg.kind == "load":
                return _loaded(stage_dir, cfg)
            return _pretrained(stage_dir, cfg, dataset)

    return stage_body(stage, {"config": cfg.model_dump(mode="json"), "upstream": {"ingest": dataset.key}}, work)


def _loaded(stage_dir: StageDir, cfg: BackboneConfig) -> Finished:
    """Load (and check) the configured model; an MMDiT's empty-prompt embeddings are encoded once, here, and kept
    in the stage, so no later stage loads a text encoder."""
    options = bb.LoadOptions(family=cfg.family, prompt_embeds=cfg.prompt_embeds, image_size=cfg.image_size,
                             use_t5=cfg.use_t5)
    model = bb.load_backbone(cfg.path, options)
    described = bb.describe(model)
    model_path = cfg.path
    if model.family == "sd3":
        bb.write_reference(stage_dir.path / MODEL_DIR, model, str(Path(cfg.path).expanduser().resolve())
                           if Path(cfg.path).expanduser().exists() else cfg.path)
        model_path = MODEL_DIR
    return Finished(f"loaded {model.kind} {model.family} model from {cfg.path}: {described['short']}",
                    {"kind": "load", "model_path": model_path, "source": cfg.path, "model": described,
                     # what the key hashed of the source's files, so a later reader can tell they changed
                     "source_fingerprint": bb.backbone_fingerprint(cfg.path)})


def _pretrained(stage_dir: StageDir, cfg: BackboneConfig, dataset: StageRef) -> Finished:
    """Pretrain on the train split (resuming from checkpoints), then draw the sample grid."""
    data = read_dataset(dataset.dir.path)
    train = data.train_idx
    vae_steps = f"a VAE for {cfg.latent.steps} steps, then latent " if cfg.latent else ""
    progress = ProgressArtifact("pretrain-progress",
                                f"pretrain {vae_steps}{cfg.variant} for {cfg.pretrain.steps} steps")
    result = pretrain(data.images[train], data.labels[train], len(data.class_names), cfg, stage_dir.path,
                      progress=lambda step, total, loss: progress.update(step / total))
    progress.update(1.0, force=True)
    model = bb.load_backbone(str(stage_dir.path / MODEL_DIR))
    n_per_class = 8
    labels = [c for c in range(len(data.class_names)) for _ in range(n_per_class)]
    samples = sample_images(model, labels, cfg.pretrain.sample_steps, cfg.pretrain.guidance_scale, cfg.pretrain.seed)
    save_grid(samples, stage_dir.path / SAMPLES_PNG, nrow=n_per_class)
    last_loss = result.loss_curve[-1][1] if result.loss_curve else float("nan")
    described = {**bb.describe(model), "source": MODEL_DIR}  # inside the stage: the workdir can move
    details = {"kind": "pretrain", "model_path": MODEL_DIR, "model": described,
               "loss_curve": result.loss_curve, "resumed_from": result.resumed_from,
               "train_seconds": round(result.seconds, 2), "samples": SAMPLES_PNG}
    vae_note = ""
    if result.vae is not None:  # latent: the VAE phase's own record
        details["vae"] = {"steps": result.vae.steps, "reused": result.vae.reused,
                          "loss_curve": result.vae.loss_curve, "train_seconds": round(result.vae.seconds, 2),
                          "scaling_factor": result.vae.scaling_factor}
        vae_loss = result.vae.loss_curve[-1][1] if result.vae.loss_curve else float("nan")
        vae_note = (f" after a VAE ({result.vae.steps} steps, final loss {vae_loss:.4f}"
                    + (", reused" if result.vae.reused else "") + ")")
    summary = (f"pretrained {cfg.variant} ({bb.describe(model)['short']}) for {result.steps} steps, "
               f"final loss {last_loss:.4f}" + vae_note
               + (f", resumed from step {result.resumed_from}" if result.resumed_from else ""))
    return Finished(summary, details)
