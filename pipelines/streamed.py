"""Label-free statistics reduced inside the forward pass: only per-image scalars leave the device.

A-SelecT's calibration needs one number per (image, timestep, layer, site), not the maps it is computed from.
At DiT-XL/2 shape a stored token map costs 165 MB per image and site; its HFR costs 8 bytes. The capture hooks
(pipelines/features.py) hand each captured map to `hfr_per_image` as soon as the block has produced it, on the
device where it lives, and drop the map.

The math is `pipelines.scoring`'s (same frequency masks, cutoff, DC rule and flat-map rule), in torch. Precision:
the FFT and the power sums run in float64 on every device (cuFFT and pocketfft both support it), so a streamed
value equals the stored-map reference to ~1e-12 on the same features; the maps themselves come out of the forward
pass in its own dtype (float32 on CPU, bf16/fp16 under CUDA autocast).

Signals (`SIGNALS`, `calibrate.signal`). The injected noise is itself high-frequency, so plain HFR can rise with t
for the wrong reason. Besides the published signal, three variants of ours separate the image's structure from
the noise, at the price of more forward passes per (image, t) (`HfrStream.inputs_per_image`):
- `plain`: A-SelecT as published (our reconstruction): HFR of the features of one noised copy of the image.
- `mean`: HFR of the features averaged over K noise draws; the average keeps what the image fixes and shrinks
  what the noise draws change (by 1/K in power).
- `debiased`: the noise term removed from the power spectrum. With K draws, the power of the draw-mean is
  P(K) = S + N/K and the mean per-draw power is P(1) = S + N, so S = (K P(K) - P(1)) / (K - 1), an unbiased
  estimate of the power the image fixes; HFR of S.
- `noise_relative`: HFR of the image's features over HFR of the features of the same noise with no image
  (x_0 = 0) at the same t: how much high-frequency structure the image adds to what the noise alone gives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from aselect.pipelines.probe import grid_side
from aselect.pipelines.scoring import FLAT_POWER, HfrBand, hfr_masks

HFR_SLICE = 1 << 22  # map elements per FFT slice: ~100 MB of float64 + complex128 temporaries
Signal = Literal["plain", "mean", "debiased", "noise_relative"]
MULTI_DRAW = ("mean", "debiased")  # signals that take K noise draws per (image, t)


class HfrStream(BaseModel):
    """What the calibration dump reduces in its forward pass: an HFR signal of these sites, with these knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: tuple[str, ...] = Field(min_length=1)  # token sites (block, attn, mlp) and/or attn_map
    cutoff: float = Field(0.5, ge=0.0)
    exclude_dc: bool = True
    band: HfrBand = "radial"  # which frequencies are high: `pipelines.scoring.high_frequency_mask`
    signal: Signal = "plain"
    draws: int = Field(1, ge=1)  # noise draws per (image, t): K for `mean` / `debiased`, else 1

    @model_validator(mode="after")
    def _draws_fit_signal(self) -> HfrStream:
        if self.signal in MULTI_DRAW and self.draws < 2:
            raise ValueError(f"signal {self.signal!r} averages noise draws: draws must be >= 2 (got {self.draws})")
        if self.signal not in MULTI_DRAW and self.draws != 1:
            raise ValueError(f"signal {self.signal!r} takes one noise draw (got draws={self.draws})")
        return self

    @property
    def inputs_per_image(self) -> int:
        """Forward-pass inputs per (image, t): K noise draws, the image and its noise-only twin, or one."""
        return self.draws if self.signal in MULTI_DRAW else 2 if self.signal == "noise_relative" else 1

    def expand_inputs(self, x0: torch.Tensor) -> torch.Tensor:
        """The forward pass's clean inputs for images x0 (B, ...): inputs_per_image each, image-major."""
        if self.signal == "noise_relative":  # each image next to its noise-only twin (x_0 = 0)
            return torch.stack([x0, torch.zeros_like(x0)], dim=1).flatten(0, 1)
        return x0 if self.draws == 1 else x0.repeat_interleave(self.draws, dim=0)

    def expand_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """`draw_noise(..., draws=self.draws)` laid out like `expand_inputs`: the twin gets its image's noise."""
        return noise.repeat_interleave(2, dim=0) if self.signal == "noise_relative" else noise


def _masks(h: int, w: int, cutoff: float, band: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """scoring.py's "high" and "non-DC" masks as float64 tensors on the device."""
    high, non_dc = hfr_masks(h, w, cutoff, band)
    return torch.from_numpy(high).to(device, torch.float64), torch.from_numpy(non_dc).to(device, torch.float64)


def _band_power(maps: torch.Tensor, cutoff: float, band: str = "radial") -> torch.Tensor:
    """Power of maps (b, h, w, c) in three bands per (map, channel) -> (3, b, c) float64: above the cutoff,
    every non-DC frequency, everything."""
    b, h, w, c = maps.shape
    high, non_dc = _masks(h, w, cutoff, band, maps.device)
    out = torch.zeros((3, b, c), dtype=torch.float64, device=maps.device)
    step = max(1, HFR_SLICE // (h * w * c))
    for start in range(0, b, step):  # slices bound memory; each is one batched FFT
        spectrum = torch.fft.fft2(maps[start:start + step].to(torch.float64), dim=(1, 2))
        power = spectrum.real ** 2 + spectrum.imag ** 2
        out[0, start:start + step] = torch.einsum("bhwc,hw->bc", power, high)
        out[1, start:start + step] = torch.einsum("bhwc,hw->bc", power, non_dc)
        out[2, start:start + step] = power.sum(dim=(1, 2))
    return out


def _ratio(bands: torch.Tensor, exclude_dc: bool) -> torch.Tensor:
    """HFR from band powers (3, ...): flat (or all-zero) maps score 0, as in scoring.py; non-finite ones NaN."""
    num, ac, total = bands
    den = ac if exclude_dc else total
    valid = (ac > FLAT_POWER * total) & (den > 0)
    ratio = torch.where(valid, num / torch.where(valid, den, torch.ones_like(den)), 0.0)
    # a non-finite map has no HFR: NaN, never the 0 of a flat map (the dump refuses NaN features)
    return torch.where(torch.isfinite(total), ratio, torch.nan)


def _per_map(maps: torch.Tensor, cutoff: float, exclude_dc: bool, band: str = "radial") -> torch.Tensor:
    """HFR of maps (b, h, w, c) per (map, channel) -> (b, c), float64; the grid is on dims 1-2."""
    return _ratio(_band_power(maps, cutoff, band), exclude_dc)


def hfr_per_image(features: torch.Tensor, site: str, cutoff: float = 0.5, exclude_dc: bool = True,
                  band: str = "radial") -> torch.Tensor:
    """Per-image HFR (B,) float64 of token features (B, T, D), or of attention maps (B, T, T) for `attn_map`.

    Tokens: each channel reshaped to the h x w patch grid, averaged over channels. Attention maps: each query's
    probabilities over the h x w key grid, averaged over queries. The mean over images of these values is
    `pipelines.scoring.hfr_of_tokens` / `hfr_of_attention` of the same features.
    """
    return _per_map(_as_maps(features, site), float(cutoff), exclude_dc, band).mean(dim=1)


def _as_maps(features: torch.Tensor, site: str) -> torch.Tensor:
    """Token features (B, T, D) -> (B, h, w, D) maps over the patch grid; attention maps (B, Tq, Tk) ->
    (B, h, w, Tq), one map per query over the key grid."""
    b, t, x = features.shape
    side = grid_side(t)
    if site == "attn_map":
        return features.reshape(b, t, side, side).permute(0, 2, 3, 1)
    return features.reshape(b, side, side, x)


# ---------------------------------------------------------------------------------------------
#                                  Signals over several inputs
# ---------------------------------------------------------------------------------------------


def _plain(maps: torch.Tensor, cutoff: float, exclude_dc: bool, band: str) -> torch.Tensor:
    return _per_map(maps[:, 0], cutoff, exclude_dc, band).mean(dim=1)


def _mean(maps: torch.Tensor, cutoff: float, exclude_dc: bool, band: str) -> torch.Tensor:
    return _per_map(maps.to(torch.float64).mean(dim=1), cutoff, exclude_dc, band).mean(dim=1)


def _debiased(maps: torch.Tensor, cutoff: float, exclude_dc: bool, band: str) -> torch.Tensor:
    b, k = maps.shape[:2]
    one = _band_power(maps.flatten(0, 1), cutoff, band).view(3, b, k, -1).mean(dim=2)  # P(1) = S + N
    mean = _band_power(maps.to(torch.float64).mean(dim=1), cutoff, band)  # P(K) = S + N / K
    signal = (k * mean - one) / (k - 1)
    # Per-channel estimates of S are noisy and can be near zero or negative: a ratio of channel sums weights
    # channels by their signal power instead of letting a tiny denominator dominate the mean.
    num, ac, total = signal.sum(dim=2).clamp(min=0.0)
    num = torch.minimum(num, ac if exclude_dc else total)
    return _ratio(torch.stack([num, ac, total]), exclude_dc)


def _noise_relative(maps: torch.Tensor, cutoff: float, exclude_dc: bool, band: str) -> torch.Tensor:
    image, noise_only = (_per_map(maps[:, i], cutoff, exclude_dc, band).mean(dim=1) for i in (0, 1))
    ratio = torch.where(noise_only > 0, image / torch.where(noise_only > 0, noise_only, 1.0), 0.0)
    # NaN in either input stays NaN (NaN > 0 is false, which would pass a broken map off as a flat one)
    return torch.where(torch.isfinite(image) & torch.isfinite(noise_only), ratio, torch.nan)


SignalFn = Callable[[torch.Tensor, float, bool, str], torch.Tensor]  # maps (B, K, h, w, c) -> per-image (B,)
SIGNALS: dict[str, tuple[SignalFn, str]] = {
    "plain": (_plain, "A-SelecT as published: HFR of one noised copy"),
    "mean": (_mean, "ours: HFR of the features averaged over K noise draws"),
    "debiased": (_debiased, "ours: HFR of the noise-debiased power spectrum, (K P(K) - P(1)) / (K - 1)"),
    "noise_relative": (_noise_relative, "ours: HFR over the same noise's HFR with no image (x_0 = 0)"),
}


def signal_per_image(features: torch.Tensor, site: str, stream: HfrStream) -> torch.Tensor:
    """Per-image values (B,) of `stream.signal` from features of B x inputs_per_image inputs, image-major
    (`plain` equals `hfr_per_image`)."""
    k = stream.inputs_per_image
    maps = _as_maps(features, site)
    maps = maps.view(maps.shape[0] // k, k, *maps.shape[1:])
    return SIGNALS[stream.signal][0](maps, float(stream.cutoff), stream.exclude_dc, stream.band)
