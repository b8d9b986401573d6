"""Run configuration: one pydantic section per stage, loaded from YAML with `--set` overrides."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aselect.storage.errors import AselectError

CONFIG_PACKAGE = "aselect.configs"  # the repository's configs/, installed as package data


class Section(BaseModel):
    """Base for every config section: unknown keys are rejected, values are immutable, numbers are finite."""

    # NaN and infinity (YAML's .nan, .inf) in any float, list or mapping of floats: refused before any stage
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# numpy's RandomState and scikit-learn's random_state take seeds in 0 .. 2**32 - 1: every `*seed*` key is one.
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


# ---------------------------------------------------------------------------------------------
#                                         Stage sections
# ---------------------------------------------------------------------------------------------


class IngestConfig(Section):
    """Stage 1: where images come from and how they are normalised and split."""

    source: Literal["digits", "mnist5k", "shapes", "textures", "imagefolder", "segfolder"] = "digits"
    # imagefolder: root/class_name/*.png|jpg|jpeg; segfolder: root/images/*.png|jpg|jpeg, root/masks/<stem>.png
    root: Path | None = None
    image_size: int = Field(16, ge=4, le=1024)
    channels: Literal[1, 3] = 1
    limit: int | None = Field(None, ge=4)  # keep at most this many images (stratified)
    num_images: int = Field(1000, ge=4)  # shapes and textures only: how many images to draw
    max_shapes: int = Field(3, ge=1, le=10)  # shapes and textures only: objects per image, 1..max
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    seed: Seed = 0
    skip_bad: bool = False  # imagefolder, segfolder: skip unreadable files (counted) instead of failing
    ignore_index: int = Field(255, ge=0, le=255)  # segfolder: the mask value of unlabelled pixels (Pascal VOC's)

    @model_validator(mode="after")
    def _root_only_for_folders(self) -> IngestConfig:
        folder = self.source in ("imagefolder", "segfolder")
        if folder and self.root is None:
            raise ValueError(f"root is required when source is {self.source!r}")
        if not folder and self.root is not None:
            raise ValueError(f"root is only used by sources 'imagefolder' and 'segfolder', not {self.source!r}")
        return self


class PretrainConfig(Section):
    """How the tiny pixel-space DiT is trained (DDPM epsilon objective, class dropout)."""

    steps: int = Field(3000, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    warmup_steps: int = Field(100, ge=0)
    checkpoint_every: int = Field(500, ge=1)
    seed: Seed = 0
    sample_steps: int = Field(50, ge=1)  # DDIM steps for the sample grid
    guidance_scale: float = Field(2.0, ge=1.0)


class LatentConfig(Section):
    """Latent pretraining: a small AutoencoderKL trained first, then the DiT on its scaled latents."""

    # Encoder/decoder block widths; n blocks downsample by 2**(n-1), as in Stable Diffusion's VAE.
    vae_blocks: list[int] = Field(default_factory=lambda: [32, 64], min_length=1, max_length=6)
    latent_channels: int = Field(4, ge=1)
    steps: int = Field(1500, ge=1)  # VAE training steps
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    kl_weight: float = Field(1e-6, ge=0.0)  # relative to the reconstruction loss summed over pixels, as in LDM
    seed: Seed = 0

    @field_validator("vae_blocks")
    @classmethod
    def _widths_positive(cls, value: list[int]) -> list[int]:
        if any(w < 1 for w in value):
            raise ValueError(f"block widths must be >= 1 (got {value})")
        return value

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.vae_blocks) - 1)


class BackboneConfig(Section):
    """Stage 2: load a diffusers DiT or SD3-family MMDiT (local dir or hub id), or pretrain a tiny one."""

    kind: Literal["pretrain", "load"] = "pretrain"
    # dit: DiTTransformer2DModel + DDPM; sd3: SD3Transformer2DModel (MMDiT) + rectified flow, under the empty
    # prompt. load: detected from the directory when unset (and checked when set); pretrain: unset means dit.
    family: Literal["dit", "sd3"] | None = None
    path: str | None = None  # load only: local directory or hub id
    variant: str = "DiT-T/2"  # pretrain only: a name registered in pipelines.models (its shape, either family)
    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"  # pretrain dit only
    flow_shift: float = Field(3.0, gt=0.0)  # pretrain sd3 only: the sigma shift of its rectified flow (SD3's 3)
    # load sd3 only: a safetensors file with prompt_embeds (1, L, joint_attention_dim) and pooled_prompt_embeds
    # (1, pooled_projection_dim), used instead of encoding "" with the directory's text encoders
    prompt_embeds: str | None = None
    image_size: int | None = Field(None, ge=8)  # load sd3 only: pixels fed (default: the model's sample size)
    use_t5: bool = False  # load sd3 only: also encode with text_encoder_3 (the published setting drops T5)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    latent: LatentConfig | None = None  # pretrain only: None = a pixel-space model; else a latent one behind a VAE
    threads: int | None = Field(None, ge=1)  # torch threads; default: all cores

    @model_validator(mode="after")
    def _path_only_for_load(self) -> BackboneConfig:
        if self.kind == "load" and not self.path:
            raise ValueError("path is required when kind is 'load'")
        if self.kind == "load" and self.latent is not None:
            raise ValueError("latent is only used by kind 'pretrain' (a loaded model brings its own VAE)")
        if self.kind == "pretrain":
            from aselect.pipelines.models import VARIANTS  # late: keeps config import light

            if self.variant not in VARIANTS:
                raise ValueError(f"unknown variant {self.variant!r}; known: {', '.join(VARIANTS)}")
            for name in ("prompt_embeds", "image_size"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is only used by kind 'load' (a pretrained model is fed "
                                     f"ingest.image_size and conditions itself)")
        if self.family == "dit" and (self.prompt_embeds or self.image_size or self.use_t5):
            raise ValueError("prompt_embeds, image_size and use_t5 are for family 'sd3' (an MMDiT), not 'dit'")
        return self

    @property
    def pretrain_family(self) -> str:
        """The family a pretrained model has: dit unless sd3 is asked for."""
        return self.family or "dit"


# Feature sites (pipelines.features): token sites have a pooled form; attention maps do not.
TokenSite = Literal["block", "attn", "mlp", "query", "key", "value"]
SiteName = Literal["block", "attn", "mlp", "query", "key", "value", "attn_map"]

DEFAULT_TIMESTEPS = (0, 10, 25, 50, 100, 200, 300, 500, 700, 900)
# A pretrained tiny DiT attends over every token pair: past a 32x32 grid a CPU step takes minutes.
MAX_PRETRAIN_TOKENS = 1024


# A dump chunk (every layer and site of `images_per_chunk` images at one timestep) is one buffer for the blosc
# codec, which refuses buffers past 2 GiB (its limit less its 16-byte header). The smallest dump a config makes
# (one pooled pair, float32) has at least 4 bytes per image; pipelines.dump checks each dump's own chunk.
MAX_CHUNK_BYTES = 2**31 - 1 - 16


def _check_timesteps(name: str, values: list[int]) -> None:
    """Non-negative and unique (timesteps or layer indices)."""
    if any(v < 0 for v in values):
        raise ValueError(f"{name} must be >= 0 (got {values})")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates (got {values})")


class DumpConfig(Section):
    """Stage 3: which DiT features to capture at which timesteps, and how to stream them to Zarr."""

    timesteps: list[int] = Field(default_factory=lambda: list(DEFAULT_TIMESTEPS), min_length=1)
    layers: list[int] | None = None  # transformer block indices; default: every layer
    sites: list[SiteName] = Field(default_factory=lambda: ["block", "attn", "mlp"], min_length=1)
    spatial: bool = False  # also keep per-token maps (float16), for segmentation probes
    images_per_chunk: int = Field(64, ge=1, le=MAX_CHUNK_BYTES // 4)
    workers: int = Field(1, ge=1)  # processes, each owning whole chunks
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CUDA only: `auto` runs the forward pass in bf16 on CUDA (fp32 on the CPU); `none` keeps fp32 everywhere
    autocast: Literal["auto", "none", "bf16", "fp16"] = "auto"
    seed: Seed = 0  # noise seed; each (image, timestep) gets its own stream
    # Which noise draw: draw k is seeded per (image, timestep, k); 0 is the draw every dump and calibration uses.
    # The attentive probe's probe.noise_draws K dumps the selected pair with draws 0..K-1.
    draw: int = Field(0, ge=0)
    # Std of Gaussian sensor noise added to every image ([-1, 1] pixel units, one fixed draw per image, before the
    # VAE) ahead of the DiT: features of noisy photographs from a DiT pretrained on clean ones. 0: none.
    sensor_noise: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _unique_non_negative(self) -> DumpConfig:
        for name in ("timesteps", "layers"):
            _check_timesteps(name, getattr(self, name) or [])
        if self.layers is not None and not self.layers:
            raise ValueError("layers must not be empty (omit it for every layer)")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites has duplicates (got {self.sites})")
        return self


class TimestepRange(Section):
    """`{start, stop, step}`: the timesteps start, start + step, ... below stop (Python's range)."""

    start: int = Field(0, ge=0)
    stop: int = Field(ge=1)
    step: int = Field(ge=1)

    @model_validator(mode="after")
    def _not_empty(self) -> TimestepRange:
        if self.start >= self.stop:
            raise ValueError(f"start {self.start} must be below stop {self.stop}")
        return self

    def values(self) -> list[int]:
        return list(range(self.start, self.stop, self.step))


class CalibrateConfig(Section):
    """A-SelecT path: the label-free calibration pass over the candidate timesteps on a small subset.

    HFR is reduced inside the forward pass: per (image, timestep, layer, site) one number is kept, never
    the token or attention maps unless `keep_maps` asks for them. How many images and which timesteps are
    scored scale with the data (docs/method.md#calibration-size-and-the-timestep-search).
    """

    # The stratified subset of the train split (C). `auto`: rounds of 16 images until the bootstrap choice is
    # stable (`stable_share`), at most min(images_max, ceil(images_fraction x N train images)); an integer: that
    # many. The aselect policy caps either at `budget`; few-shot and RankMe read `auto` as images_max.
    images: int | Literal["auto"] = "auto"
    images_max: int = Field(256, ge=16)
    images_fraction: float = Field(0.125, gt=0.0, le=1.0)
    stable_share: float = Field(0.95, gt=0.0, le=1.0)  # share of bootstrap resamples agreeing on (t, layer)
    # aselect: calibration's forward passes stay within this share of the exhaustive run's (its images x
    # dump.timesteps); the selection record says when it capped C. null: no cap.
    budget: float | None = Field(0.5, gt=0.0, lt=1.0)
    # `coarse`: score every ~10th candidate, then the candidates around the three best, finer each level, down to
    # every candidate; `full`: every candidate.
    search: Literal["coarse", "full"] = "coarse"
    # The candidate timesteps A-SelecT searches: a list, or {start, stop, step}; default: dump.timesteps.
    # Calibration is a reduction over a small subset, so it can afford a far denser grid than the dump.
    timesteps: list[int] | None = None
    # What HFR is computed on. `attn` (self-attention output token maps) had the lowest regret across the
    # bundled configs (docs/results.md); attention maps (`attn_map`) had the worst on digits.
    sites: list[SiteName] = Field(default_factory=lambda: ["attn"], min_length=1)
    keep_maps: bool = False  # also store the token / attention maps (float16) the HFR was computed from
    # The label-free signal (pipelines.streamed.SIGNALS): `plain` is A-SelecT as published; `mean`, `debiased`
    # (K = `draws` noise draws per image and t, K times the forward passes) and `noise_relative` (2 inputs per
    # image) are ours and separate the image's structure from the injected noise. Default `noise_relative`: the
    # lowest worst-case regret chosen leave-one-config-out (docs/results.md), far below plain HFR's.
    signal: Literal["plain", "mean", "debiased", "noise_relative"] = "noise_relative"
    draws: int = Field(8, ge=2)  # K for `mean` and `debiased`
    # Which layers calibration runs the DiT to and reduces: default (None) the layers the aselect policy reads
    # (select.layers, else the middle third, plus an int select.feature_layer), so the forward pass stops after
    # the deepest of them; `all` for every layer (heatmaps over the whole depth); or a list.
    layers: list[int] | Literal["all"] | None = None

    @field_validator("images", mode="before")
    @classmethod
    def _images_form(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 8:
                raise ValueError("Input should be greater than or equal to 8, or 'auto'")
            return value
        if value != "auto":
            raise ValueError("must be 'auto' or an integer of at least 8")
        return value

    @field_validator("timesteps", mode="before")
    @classmethod
    def _range_form(cls, value: Any) -> Any:
        if isinstance(value, dict):  # {start, stop, step} -> the list it stands for
            try:
                return TimestepRange.model_validate(value).values()
            except ValidationError as exc:
                raise ValueError(validation_messages(exc)) from None
        return value

    @field_validator("timesteps")
    @classmethod
    def _timesteps_valid(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if not value:
                raise ValueError("must not be empty (omit it to use dump.timesteps)")
            _check_timesteps("timesteps", value)
        return value

    @field_validator("layers")
    @classmethod
    def _layers_valid(cls, value: list[int] | str | None) -> list[int] | str | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("must not be empty (omit it for the layers the policy reads, or say all)")
            _check_timesteps("layers", value)
        return value

    @model_validator(mode="after")
    def _sites_unique(self) -> CalibrateConfig:
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites has duplicates (got {self.sites})")
        if self.keep_maps and self.signal != "plain":
            raise ValueError(f"keep_maps stores the maps of one input per image: only with signal 'plain' "
                             f"(got {self.signal!r})")
        return self

    def signal_draws(self) -> int:
        """Noise draws per (image, t) the signal takes: `draws` for mean and debiased, else 1."""
        return self.draws if self.signal in ("mean", "debiased") else 1

    def fixed_images(self) -> int:
        """C for a calibration that does not grow in rounds (few-shot, RankMe): `images`, or images_max for auto."""
        return self.images_max if self.images == "auto" else self.images

    def candidate_timesteps(self, dump: DumpConfig) -> list[int]:
        """The timesteps calibration may score, ascending."""
        return sorted(dump.timesteps if self.timesteps is None else self.timesteps)


CONNECT_SECONDS = 10.0  # an address nobody answers at fails in one line after this, not after retries


class DaskConfig(Section):
    """The pipeline's Dask cluster: an existing scheduler by address (scoring and the dump both run on it), or
    LocalClusters started per stage (scoring: `workers`; the dump: `dump.workers` when above 1)."""

    address: str | None = None  # e.g. tcp://127.0.0.1:8786
    connect_seconds: float = Field(CONNECT_SECONDS, gt=0)  # no scheduler answering at `address` within this: an error
    workers: int = Field(2, ge=1)  # local scoring cluster: worker processes
    threads_per_worker: int = Field(1, ge=1)  # local scoring cluster: threads per worker
    # Abstract resources each dump task needs on an existing cluster, e.g. {GPU: 1} for workers started with
    # `dask worker --resources GPU=1`: one chunk per GPU at a time.
    resources: dict[str, float] = Field(default_factory=dict)
    dump: bool = True  # with an address: run the dump there too (false: only scoring)
    # torch threads in each dump task on an existing cluster (None: torch's default, all cores of the host)
    torch_threads: int | None = Field(None, ge=1)


class ScoreConfig(Section):
    """Stage 4: scorer parameters (each scorer is registered by name in pipelines.scoring)."""

    hfr_cutoff: float = Field(0.5, gt=0.0, lt=1.5)  # radial frequency threshold, 1 = Nyquist
    hfr_exclude_dc: bool = True
    # Which frequencies count as low: `radial` (|f| <= cutoff, a disc) or `axis` (|f_x| and |f_y| <= cutoff each,
    # a square: the per-axis 1-D band, the authors' LOW_FREQ_1D reading)
    hfr_band: Literal["radial", "axis"] = "radial"
    probe_folds: int = Field(3, ge=2)
    probe_c: float = Field(1.0, gt=0.0)


class SelectConfig(Section):
    """Stage 5: how scores become one (timestep, layer, site)."""

    # `hybrid`: t from HFR (label-free, as `aselect`), then layer and site by the few-shot probe at that t alone
    policy: Literal["aselect", "oracle", "fixed", "fewshot", "rankme", "hybrid"] = "aselect"
    hfr_site: SiteName = "attn"  # must be among calibrate.sites
    layers: list[int] | None = None  # layers HFR is averaged over; default: the middle third
    feature_site: TokenSite = "block"
    feature_layer: Literal["argmax"] | int = "argmax"
    timestep: int | None = None  # fixed policy
    layer: int | None = None  # fixed policy
    site: TokenSite | None = None  # fixed policy
    # aselect: resample the calibration images this many times (no new forward passes) and record the share
    # of resamples that pick the same timestep and layer (`confidence`); 0 turns it off.
    bootstrap: int = Field(200, ge=0)
    bootstrap_seed: Seed = 0
    # `aselect-published`: A-SelecT as the authors configured it, expanded once the backbone is known
    # (RunConfig.resolved): plain HFR of `query`, axis band, cutoff 0.15, argmax over t, features `query` of one
    # fixed block at their relative depth (block 9 of 24). It sets the keys it names, whatever they were.
    preset: Literal["aselect-published"] | None = None

    @model_validator(mode="after")
    def _fixed_needs_a_pair(self) -> SelectConfig:
        if self.policy == "fixed" and None in (self.timestep, self.layer, self.site):
            raise ValueError("policy 'fixed' needs timestep, layer and site")
        if self.preset is not None and self.policy != "aselect":
            raise ValueError(f"preset {self.preset!r} is an aselect selection (got policy {self.policy!r})")
        return self


LINEAR_PROBE_KEYS = ("cs", "memory_budget_mb")  # what only the linear probe reads
# what only the attentive probe reads
ATTENTIVE_PROBE_KEYS = ("width", "blocks", "heads", "mlp_ratio", "learning_rate", "weight_decay", "epochs",
                        "batch_size", "noise_draws", "online", "threads", "preset")
# The authors' attentive probe (their CUB run): width 800, 2 blocks of 8 heads, AdamW lr 0.003, weight decay 0.001,
# batch 8, 100 epochs at most; the best validation epoch on a 10% split of train is kept.
PAPER_PROBE = {"width": 800, "blocks": 2, "heads": 8, "mlp_ratio": 4.0, "learning_rate": 0.003,
               "weight_decay": 0.001, "batch_size": 8, "epochs": 100, "val_fraction": 0.1}


class ProbeConfig(Section):
    """Stage 6: the downstream probe on the selected pair's features."""

    # linear: logistic regression on mean-pooled features (per-token for segmentation); attentive: a small
    # transformer head on the token features (a CLS token for classification), trained with AdamW
    kind: Literal["linear", "attentive"] = "linear"
    # `paper`: the authors' attentive-probe values (PAPER_PROBE) for the keys below that are not set explicitly
    preset: Literal["paper"] | None = None
    cs: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0],
                                                      min_length=1)  # linear: C grid
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: Seed = 0
    # Train features bigger than this (as float32) are not loaded: the probe streams them from the dump a batch at
    # a time (same objective and optimum, one pass per L-BFGS step, so slower). 0 always streams. Linear only.
    memory_budget_mb: float = Field(2048.0, ge=0.0)
    # attentive only: the head (per-token projection to `width`, `blocks` pre-norm transformer blocks)
    width: int = Field(128, ge=8)
    blocks: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    learning_rate: float = Field(0.001, gt=0.0)  # AdamW, cosine schedule
    weight_decay: float = Field(0.001, ge=0.0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    # Noise draws at the selected t: the selected pair is dumped K times (draw k seeded per (image, t, k); draw 0 is
    # the one every dump uses); the epochs take the draws in turn, evaluation averages the logits over the K draws.
    noise_draws: int = Field(1, ge=1, le=64)
    # attentive only: compute the selected pair's features inside the training loop through the frozen backbone
    # instead of dumping them: epoch e trains on a fresh draw e - 1, evaluation averages draws 0..noise_draws-1
    # (the same values a dump of those draws holds; nothing the size of the dataset's features is written)
    online: bool = False
    # attentive only: torch threads while it trains. 1 is the fastest for the default head on a shared CPU, and a
    # resumed probe is bit-identical only under the thread count it started with.
    threads: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _paper_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") == "paper":
            data = {**PAPER_PROBE, **data}  # explicit keys win
        return data

    @model_validator(mode="after")
    def _head_divides(self) -> ProbeConfig:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.preset == "paper" and self.kind != "attentive":
            raise ValueError("preset 'paper' is the attentive probe's: set kind: attentive")
        if self.noise_draws > 1 and self.kind != "attentive":
            raise ValueError(f"noise_draws {self.noise_draws}: extra noise draws train the attentive probe; set "
                             f"kind: attentive (the linear probe reads draw 0)")
        if self.online and self.kind != "attentive":
            raise ValueError("online: features computed in the training loop are the attentive probe's; set kind: "
                             "attentive")
        return self


class BenchConfig(Section):
    """`aselect bench`: which selectors run next to A-SelecT and the oracle, and the scaling measurements."""

    hfr_variants: list[SiteName] = Field(default_factory=lambda: ["attn_map", "block", "mlp"])  # besides hfr_site
    # Label-free signals (calibrate.signal) besides the configured one, each on hfr_site. Default: `plain`, A-SelecT
    # as published. `mean` and `debiased` take K forward passes per (image, t) and had higher regret than
    # noise_relative where they were benchmarked (list them here to measure them again), so they are opt-in.
    hfr_signals: list[Literal["plain", "mean", "debiased", "noise_relative"]] = Field(
        default_factory=lambda: ["plain"])
    fewshot: bool = True  # the few-shot probe on the calibration subset as a selector
    rankme: bool = True  # RankMe (label-free, not spectral) on the calibration subset as a selector
    # "A commonly used pair": t=100 of 1000 and the middle layer, the usual hand-picked choice for DiT/DDPM
    # features. None -> the middle layer.
    fixed_timestep: int = Field(100, ge=0)
    fixed_layer: int | None = Field(None, ge=0)
    fixed_site: TokenSite = "block"
    scaling_fractions: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0], min_length=1)
    scaling_workers: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    # The oracle's candidate timesteps: `calibrate` = the grid A-SelecT searched (so the cost ratio is the one a
    # user saves), `dump` = dump.timesteps.
    oracle_grid: Literal["calibrate", "dump"] = "calibrate"
    # Calibration sizes C of the confidence-vs-C curve: one calibration of the largest C (an extra A-SelecT
    # selector when it exceeds calibrate.images), bootstrapped at each smaller C; empty: no curve.
    confidence_images: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 256])
    # The attentive protocol (the authors' probe: `probe.kind: attentive` with the config's probe section, for
    # `attentive_epochs` epochs) on the default's and the linear oracle's pairs, and the attentive oracle: that
    # probe at each of these timesteps at the linear oracle's layer and site. Empty: not measured.
    attentive_timesteps: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 50, 100, 200, 500])
    attentive_epochs: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _fractions_in_range(self) -> BenchConfig:
        if any(c < 2 for c in self.confidence_images):
            raise ValueError(f"confidence_images must be >= 2 (got {self.confidence_images})")
        bad = [f for f in self.scaling_fractions if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"scaling_fractions must be in (0, 1] (got {bad})")
        if any(w < 1 for w in self.scaling_workers):
            raise ValueError(f"scaling_workers must be >= 1 (got {self.scaling_workers})")
        return self


class RunConfig(Section):
    """A whole run: a name, a workdir and one section per stage."""

    name: str = "run"
    workdir: Path = Path("aselect-work")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    dump: DumpConfig = Field(default_factory=DumpConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)

    @model_validator(mode="after")
    def _dump_fits_backbone(self) -> RunConfig:
        if self.select.policy in ("aselect", "hybrid") and self.select.hfr_site not in self.calibrate.sites:
            raise ValueError(f"select.hfr_site {self.select.hfr_site!r} must be one of calibrate.sites "
                             f"{self.calibrate.sites}")
        # A loaded checkpoint is only known at run time; the dump stage checks it then.
        grids = {"dump.timesteps": self.dump.timesteps,
                 "calibrate.timesteps": self.calibrate.candidate_timesteps(self.dump),
                 "bench.attentive_timesteps": self.bench.attentive_timesteps}
        for name, values in grids.items():
            too_late = [t for t in values if t >= self.backbone.num_train_timesteps]
            if self.backbone.kind == "pretrain" and too_late:
                shown = too_late if len(too_late) <= 5 else [*too_late[:5], "..."]
                raise ValueError(f"{name} {shown} must be < backbone.num_train_timesteps "
                                 f"({self.backbone.num_train_timesteps})")
        if self.backbone.kind == "pretrain":
            self._fits_variant()
        return self

    def resolved(self, depth: int, token_grid: int) -> RunConfig:
        """This run with `select.preset` expanded for a backbone of `depth` blocks and a `token_grid`-wide grid."""
        if self.select.preset is None:
            return self
        block = published_block(depth)
        return self.model_copy(update={
            "calibrate": self.calibrate.model_copy(update={"signal": "plain", "sites": ["query"]}),
            "score": self.score.model_copy(update={"hfr_cutoff": published_cutoff(token_grid), "hfr_band": "axis"}),
            "select": self.select.model_copy(update={"hfr_site": "query", "layers": [block], "feature_layer": block,
                                                     "feature_site": "query"}),
        })

    def _fits_variant(self) -> None:
        """Block indices within the pretrained variant's depth, and a token grid it can train on."""
        from aselect.pipelines.models import VARIANTS

        variant = self.backbone.variant
        depth, patch = VARIANTS[variant]["num_layers"], VARIANTS[variant]["patch_size"]
        feature_layer = None if self.select.feature_layer == "argmax" else self.select.feature_layer
        calibrated = self.calibrate.layers if isinstance(self.calibrate.layers, list) else None
        for name, value in (("dump.layers", self.dump.layers), ("calibrate.layers", calibrated),
                            ("select.layers", self.select.layers),
                            ("select.layer", self.select.layer), ("select.feature_layer", feature_layer),
                            ("bench.fixed_layer", self.bench.fixed_layer)):
            values = value if isinstance(value, list) else [] if value is None else [value]
            if any(v >= depth or v < 0 for v in values):
                raise ValueError(f"{name} {value}: {variant} has {depth} layers (0..{depth - 1})")
        latent, down = self.backbone.latent, 1
        if latent is not None:  # the DiT's input grid is the VAE's latent grid
            down = latent.downsample
            if self.ingest.image_size % down:
                raise ValueError(f"ingest.image_size {self.ingest.image_size} is not divisible by the downsampling "
                                 f"{down} of backbone.latent.vae_blocks {latent.vae_blocks} (2**(blocks - 1))")
            side = self.ingest.image_size // down
            if side % patch:
                raise ValueError(f"backbone.latent.vae_blocks {latent.vae_blocks} makes {side}x{side} latents "
                                 f"from ingest.image_size {self.ingest.image_size}, not a multiple of {variant}'s "
                                 f"patch size {patch}")
        width = VARIANTS[variant]["num_attention_heads"] * VARIANTS[variant]["attention_head_dim"]
        per_image = 4 * width  # one pooled float32 row: the least any dump of this run stores per image
        chunk = self.dump.images_per_chunk
        if chunk * per_image > MAX_CHUNK_BYTES:
            raise ValueError(f"dump.images_per_chunk {chunk}: a chunk of {variant}'s pooled features ({width} float32 "
                             f"per image) would be {chunk * per_image / 2**30:.1f} GiB, past the codec's 2 GiB "
                             f"buffer; at most {MAX_CHUNK_BYTES // per_image}")
        tokens = (self.ingest.image_size // down // patch) ** 2
        if tokens > MAX_PRETRAIN_TOKENS:
            raise ValueError(f"ingest.image_size {self.ingest.image_size} makes {tokens} tokens per image with "
                             f"{variant} (patch {patch}{f', latent downsampling {down}' if down > 1 else ''}); "
                             f"pretraining here supports up to {MAX_PRETRAIN_TOKENS} "
                             f"(image_size <= {int(MAX_PRETRAIN_TOKENS ** 0.5) * patch * down})")


PUBLISHED_CUTOFF = 0.15  # the authors' CUTOFF
PUBLISHED_DEPTH = 9 / 24  # their block: 9 of SD3-Medium's 24


def published_block(depth: int) -> int:
    """The authors' block at the same relative depth (9 of 24; our rule for other depths)."""
    return min(depth - 1, int(PUBLISHED_DEPTH * depth + 0.5))


def published_cutoff(token_grid: int) -> float:
    """0.15, or on grids too small for it (below 14 tokens a side, 0.15 leaves no low frequency but DC) the
    lowest non-DC frequency, 2 / grid (our rule)."""
    return max(PUBLISHED_CUTOFF, 2.0 / token_grid)


# ---------------------------------------------------------------------------------------------
#                                           Loading
# ---------------------------------------------------------------------------------------------


# YAML aliases are references: a few nested ones expand to billions of values ("billion laughs") once a validator
# or `--set` walks them. A config uses a handful at most.
MAX_YAML_ALIASES = 100
MAX_YAML_VALUES = 100_000  # scalars, lists and mappings in one document, every alias expanded
MAX_EXTENDS = 32  # files in one `extends:` chain


class YamlTooLarge(yaml.YAMLError):
    """A document with too many aliases, or one that expands past MAX_YAML_VALUES."""


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses more than MAX_YAML_ALIASES aliases, or a document past MAX_YAML_VALUES values."""

    aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise YamlTooLarge(f"more than {MAX_YAML_ALIASES} YAML aliases (*name)")
        return super().compose_node(parent, index)

    def construct_document(self, node: yaml.Node) -> Any:
        # Counted on the node graph before any Python object exists: an alias is a shared node, counted each time
        # it is reached, so the count is what the document expands to (a recursive alias never ends: refused).
        count, stack = 0, [node]
        while stack:
            item = stack.pop()
            count += 1
            if count > MAX_YAML_VALUES:
                raise YamlTooLarge(f"the YAML expands past {MAX_YAML_VALUES} values (nested aliases)")
            if isinstance(item, yaml.SequenceNode):
                stack.extend(item.value)
            elif isinstance(item, yaml.MappingNode):
                stack.extend(n for pair in item.value for n in pair)
        return super().construct_document(node)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, bounded: aliases and the expanded size are limited (YamlTooLarge), and so is nesting."""
    try:
        return yaml.load(text, Loader=BoundedLoader)  # a SafeLoader subclass: plain data only
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise YamlTooLarge("the YAML is nested too deeply") from None


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path as given, or a bundled config by name (`digits` -> configs/digits.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise AselectError(f"{path}: config file not found")
        return path
    bundled = bundled_configs()
    if str(name_or_path) not in bundled:
        raise AselectError(f"{name_or_path}: no such config file or bundled config (bundled: {', '.join(bundled)})")
    return bundled[str(name_or_path)]


def bundled_configs() -> dict[str, Path]:
    """Bundled config name -> its file, wherever aselect is installed (editable or not)."""
    files = (Path(str(entry)) for entry in resources.files(CONFIG_PACKAGE).iterdir())
    return {path.stem: path for path in sorted(files) if path.suffix == ".yaml"}


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML."""
    dotted, sep, raw = assignment.partition("=")
    if not sep or not dotted.strip():
        raise AselectError(f"--set {assignment!r}: expected section.key=value")
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise AselectError(f"--set {assignment!r}: {key} is not a section")
        node = child
    try:
        node[keys[-1]] = load_yaml(raw) if raw.strip() else None
    except YamlTooLarge as exc:
        raise AselectError(f"--set {assignment!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise AselectError(f"--set {assignment!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)})"
                           ) from None


def format_validation_error(origin: str, error: ValidationError) -> str:
    """One line: `origin: key.path: message (got value)` for each problem, joined by '; '."""
    return f"{origin}: {validation_messages(error)}"


# Keys an earlier release spelled differently: say the new name instead of "unknown key".
RENAMED_KEYS = {"dump.blocks": "dump.layers", "calibrate.blocks": "calibrate.layers", "score.dask": "dask"}


def validation_messages(error: ValidationError) -> str:
    """`key.path: message (got value)` for each problem, joined by '; '."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            renamed = RENAMED_KEYS.get(where)
            message = f"renamed to {renamed}" if renamed else "unknown key"
        got = item.get("input")
        shown = "" if item["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{where}: {message}{shown}")
    return "; ".join(parts)


def _read_yaml(path: Path) -> dict[str, Any]:
    """One config file's mapping, or a one-line error naming the file."""
    try:
        data = load_yaml(path.read_text()) or {}
    except YamlTooLarge as exc:
        raise AselectError(f"{path}: {exc}") from None
    except UnicodeDecodeError:
        raise AselectError(f"{path}: not a text file (expected a YAML config)") from None
    except OSError as exc:
        raise AselectError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise AselectError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise AselectError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, section by section (nested mappings merge; anything else replaces)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config's mapping with its `extends:` chain applied (a bundled name or a path, relative to the file)."""
    data = _read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise AselectError(f"{path}: extends: expected a config name or path, got {base!r}")
    local = path.parent / base
    base_path = resolve_config_path(local if local.suffix in (".yaml", ".yml") and local.is_file() else base)
    chain = seen + (path.resolve(),)
    if base_path.resolve() in chain:
        raise AselectError(f"{path}: extends: {base!r} extends itself (a cycle)")
    if len(chain) >= MAX_EXTENDS:
        names = [p.name for p in (*chain, base_path)]
        shown = " -> ".join(names if len(names) <= 6 else [*names[:3], "...", *names[-2:]])
        raise AselectError(f"{chain[0]}: extends: a chain of more than {MAX_EXTENDS} files ({shown})")
    parent = _read_with_bases(base_path, chain)
    parent.pop("name", None)  # a config's name is its own
    return _merged(parent, data)


def load_config(name_or_path: str | Path = "digits", overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (on top of the one it `extends:`), apply `--set` overrides and validate it."""
    path = resolve_config_path(name_or_path)
    data = _read_with_bases(path)
    for assignment in overrides:
        apply_override(data, assignment)
    data.setdefault("name", path.stem)
    origin = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise AselectError(format_validation_error(origin, exc)) from None
