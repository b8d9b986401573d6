"""Stage 3 (domain): noise images to x_t and capture transformer features at every block and site.

Sites, per transformer block `l` (for an MMDiT, always the image-token stream: context tokens are not features):
- `block`: the residual stream after the block, (B, T, D)
- `attn`: the self-attention output before its adaLN gate, (B, T, D)
- `mlp`: the feed-forward output before its adaLN gate, (B, T, D)
- `query`, `key`, `value`: the attention's projections of the (adaLN-modulated) block input, heads concatenated,
  (B, T, D), as the attention module computes them (`to_q`, `to_k`, `to_v`; before any q/k norm)
- `attn_map`: attention probabilities averaged over heads, (B, T, T) — query x key grid; captured by a
  diffusers attention processor, not by patching library internals. An MMDiT attends jointly over image and
  prompt tokens: its map is the image-query x image-key block of that softmax (the mass on prompt keys is left out).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor

from aselect.pipelines.models import Backbone

TOKEN_SITES = ("block", "attn", "mlp", "query", "key", "value")
PROJECTIONS = {"query": "to_q", "key": "to_k", "value": "to_v"}  # site -> the attention module's linear
ATTN_MAP = "attn_map"
SITES = (*TOKEN_SITES, ATTN_MAP)


# ---------------------------------------------------------------------------------------------
#                                         Noising
# ---------------------------------------------------------------------------------------------


def noise_seed(seed: int, image_index: int, timestep: int, draw: int = 0) -> int:
    """A seed per (image, timestep, draw): any chunk can be recomputed bit-identically, in any order.

    Draw 0 is the one noise every dump uses; draws 1.. are the extra ones a multi-draw calibration signal takes.
    """
    entropy = [seed, int(image_index), int(timestep), *([int(draw)] if draw else [])]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def draw_noise(shape: Sequence[int], image_indices: Sequence[int], timestep: int, seed: int,
               pin: bool = False, draws: int = 1, first_draw: int = 0) -> torch.Tensor:
    """Standard normal noise (B * draws, *shape) on the CPU, one generator per (image, timestep, draw), draws
    `first_draw` .. `first_draw + draws - 1`.

    Rows are image-major (image 0's draws first). Drawn on the CPU so that CPU and CUDA runs noise identically;
    `pin` puts it in page-locked memory, so the copy to the GPU is one asynchronous transfer per batch.
    """
    ids = range(first_draw, first_draw + draws)
    return _seeded_normal(shape, [noise_seed(seed, i, timestep, k) for i in image_indices for k in ids], pin)


def _seeded_normal(shape: Sequence[int], seeds: Sequence[int], pin: bool = False) -> torch.Tensor:
    """Standard normal rows (len(seeds), *shape) on the CPU, row r from its own generator seeded `seeds[r]`."""
    noise = torch.empty((len(seeds), *shape), pin_memory=pin)
    for row, row_seed in enumerate(seeds):
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(row_seed)), out=noise[row])
    return noise


SENSOR_STREAM = 0x5E4502  # keeps the sensor noise's streams apart from every (timestep, draw) stream


def sensor_noise(shape: Sequence[int], image_indices: Sequence[int], std: float, seed: int) -> torch.Tensor:
    """Gaussian read noise (B, *shape) of `std` in [-1, 1] pixel units, one generator per image: the same image
    gets the same noise in every dump, calibration and baseline (`dump.sensor_noise`)."""
    seeds = [np.random.SeedSequence([SENSOR_STREAM, seed, int(i)]).generate_state(1)[0] for i in image_indices]
    return _seeded_normal(shape, seeds) * std


def add_noise(backbone: Backbone, x0: torch.Tensor, image_indices: Sequence[int], timestep: int,
              seed: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_t of the backbone's schedule (DDPM or rectified flow) with noise drawn from one generator per image (or
    `draw_noise`'s, drawn ahead)."""
    if noise is None:
        noise = draw_noise(x0.shape[1:], image_indices, timestep, seed)
    noise = noise.to(device=x0.device, dtype=x0.dtype, non_blocking=True)
    return backbone.add_noise(x0, noise, timestep)


# ---------------------------------------------------------------------------------------------
#                                         Capture
# ---------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised after the last block we need, so deeper blocks and the output head are skipped."""


class AttentionMapProcessor(AttnProcessor):
    """Self-attention that also records its probabilities (mean over heads) into `sink[layer]`."""

    def __init__(self, sink: dict[int, torch.Tensor], layer: int) -> None:
        self.sink = sink
        self.layer = layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: object, **kwargs: object) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, T, T)
        self.sink[self.layer] = probs.view(batch, attn.heads, tokens, -1).mean(dim=1)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class JointAttentionMapProcessor:
    """An MMDiT's joint attention (image + prompt tokens, as diffusers' JointAttnProcessor2_0) that also records
    the image-query x image-key probabilities (mean over heads) into `sink[layer]`."""

    def __init__(self, sink: dict[int, torch.Tensor], layer: int) -> None:
        self.sink = sink
        self.layer = layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: object,
                 **kwargs: object) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, _ = hidden_states.shape

        def heads(x: torch.Tensor, norm: torch.nn.Module | None) -> torch.Tensor:
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        query = heads(attn.to_q(hidden_states), attn.norm_q)
        key = heads(attn.to_k(hidden_states), attn.norm_k)
        value = heads(attn.to_v(hidden_states), None)
        if encoder_hidden_states is not None:
            query = torch.cat([query, heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
            key = torch.cat([key, heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
            value = torch.cat([value, heads(attn.add_v_proj(encoder_hidden_states), None)], dim=2)
        probs = F.softmax(query @ key.transpose(-1, -2) * attn.scale, dim=-1)  # (B, heads, T + L, T + L)
        self.sink[self.layer] = probs[:, :, :tokens, :tokens].mean(dim=1)
        out = (probs @ value).transpose(1, 2).reshape(batch, -1, attn.heads * value.shape[-1]).to(query.dtype)
        image, context = out[:, :tokens], out[:, tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return image, context


Reducer = Callable[[torch.Tensor, str], torch.Tensor]  # (features of one site, site name) -> per-image values


class Reduction(NamedTuple):
    """A reduction computed in the forward hooks: `fn` applied to the maps of each of `sites`."""

    sites: Sequence[str]
    fn: Reducer


@dataclass
class FeatureCapture:
    """Forward hooks on the chosen blocks.

    `outputs[(layer, site)]` holds the last forward's features of `sites`; `reduced[(layer, site, name)]` holds
    each reduction's values of its sites, computed in the hook as soon as the block produced the map, so maps
    that are only reduced are never kept.
    """

    backbone: Backbone
    layers: Sequence[int]
    sites: Sequence[str]
    reductions: Mapping[str, Reduction] = field(default_factory=dict)
    outputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    reduced: dict[tuple[int, str, str], torch.Tensor] = field(default_factory=dict)

    def _put(self, layer: int, site: str, value: torch.Tensor) -> None:
        if site in self.sites:
            self.outputs[(layer, site)] = value
        with torch.autocast(value.device.type, enabled=False):  # reductions keep their own precision
            for name, (sites, reduce) in self.reductions.items():
                if site in sites:
                    self.reduced[(layer, site, name)] = reduce(value, site)

    @contextlib.contextmanager
    def attached(self) -> Iterator[FeatureCapture]:
        blocks = self.backbone.transformer.transformer_blocks
        mmdit = self.backbone.family == "sd3"
        handles, saved_processors, maps = [], {}, {}
        last = max(self.layers)
        wanted = set(self.sites).union(*(r.sites for r in self.reductions.values()))
        map_processor = JointAttentionMapProcessor if mmdit else AttentionMapProcessor

        def keep(layer: int, site: str):
            def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
                # an MMDiT's attention returns (image, prompt) outputs: the image stream comes first
                self._put(layer, site, output[0] if isinstance(output, tuple) else output)
            return hook

        def finish(layer: int):
            def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
                if "block" in wanted:  # an MMDiT block returns (prompt, image) streams
                    self._put(layer, "block", output[1] if mmdit else output)
                if ATTN_MAP in wanted:
                    self._put(layer, ATTN_MAP, maps.pop(layer))
                if layer == last:
                    raise _StopForward
            return hook

        try:
            for layer in self.layers:
                block = blocks[layer]
                attention = block.attn if mmdit else block.attn1
                if "attn" in wanted:
                    handles.append(attention.register_forward_hook(keep(layer, "attn")))
                if "mlp" in wanted:
                    handles.append(block.ff.register_forward_hook(keep(layer, "mlp")))
                for site, linear in PROJECTIONS.items():
                    if site in wanted:  # image tokens only: an MMDiT projects the prompt with add_*_proj
                        handles.append(getattr(attention, linear).register_forward_hook(keep(layer, site)))
                if ATTN_MAP in wanted:
                    saved_processors[layer] = attention.processor
                    attention.set_processor(map_processor(maps, layer))
                handles.append(block.register_forward_hook(finish(layer)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for layer, processor in saved_processors.items():
                (blocks[layer].attn if mmdit else blocks[layer].attn1).set_processor(processor)


@torch.no_grad()
def extract(backbone: Backbone, x0: torch.Tensor, image_indices: Sequence[int], timestep: int,
            layers: Sequence[int], sites: Sequence[str], seed: int,
            autocast: torch.dtype | None = None, reductions: Mapping[str, Reduction] | None = None,
            noise: torch.Tensor | None = None) -> dict[tuple, torch.Tensor]:
    """Features of x_t for one timestep: one forward pass (cut after the deepest requested block).

    Returns `{(layer, site): features}` (float32) for `sites`, and `{(layer, site, name): values}` for each
    reduction computed in the forward hooks on its sites. `noise` is `draw_noise`'s for these images and
    timestep when the caller drew it ahead.
    """
    # 1. noise the clean inputs with per-image seeds (DDPM or rectified flow, at paper t)
    x_t = add_noise(backbone, x0, image_indices, timestep, seed, noise)
    # 2. run the model with hooks (reducers run inside them), unconditioned (DiT: the null class; MMDiT: the empty
    #    prompt): features without label information; stop after the deepest block we need
    capture = FeatureCapture(backbone, sorted(set(layers)), list(sites), dict(reductions or {}))
    device_type = x0.device.type
    amp = torch.autocast(device_type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with capture.attached(), amp:
        try:
            backbone.forward(x_t, timestep)
        except _StopForward:
            pass
    return {**{key: value.float() for key, value in capture.outputs.items()}, **capture.reduced}
