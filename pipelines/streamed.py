"""Label-free statistics reduced inside the forward pass: only per-image scalars leave the device.

A-SelecT's calibration needs one number per (image, timestep, block, site), not the maps it is computed from.
At DiT-XL/2 shape a stored token map costs 165 MB per image and site; its HFR costs 8 bytes. The capture hooks
(pipelines/features.py) hand each captured map to `hfr_per_image` as soon as the block has produced it, on the
device where it lives, and drop the map.

The math is `pipelines.scoring`'s (same radial frequency, cutoff, DC rule and flat-map rule), in torch. Precision:
the FFT and the power sums run in float64 on every device (cuFFT and pocketfft both support it), so a streamed
value equals the stored-map reference to ~1e-12 on the same features; the maps themselves come out of the forward
pass in its own dtype (float32 on CPU, bf16/fp16 under CUDA autocast).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from pipelines.probe import grid_side
from pipelines.scoring import FLAT_POWER, radial_frequency

STREAMED_VERSION = 1
HFR_SLICE = 1 << 22  # map elements per FFT slice: ~100 MB of float64 + complex128 temporaries


class HfrStream(BaseModel):
    """What the calibration dump reduces in its forward pass: HFR of these sites, with these knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: tuple[str, ...] = Field(min_length=1)  # token sites (block, attn, mlp) and/or attn_map
    cutoff: float = Field(0.5, ge=0.0)
    exclude_dc: bool = True


def _masks(h: int, w: int, cutoff: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rho = torch.from_numpy(radial_frequency(h, w)).to(device)
    return (rho > cutoff).to(torch.float64), (rho > 0).to(torch.float64)


def _per_map(maps: torch.Tensor, cutoff: float, exclude_dc: bool) -> torch.Tensor:
    """HFR of maps (b, h, w, c) per (map, channel) -> (b, c), float64; the grid is on dims 1-2."""
    b, h, w, c = maps.shape
    high, non_dc = _masks(h, w, cutoff, maps.device)
    out = torch.zeros((b, c), dtype=torch.float64, device=maps.device)
    step = max(1, HFR_SLICE // (h * w * c))
    for start in range(0, b, step):  # slices bound memory; each is one batched FFT
        spectrum = torch.fft.fft2(maps[start:start + step].to(torch.float64), dim=(1, 2))
        power = spectrum.real ** 2 + spectrum.imag ** 2
        total = power.sum(dim=(1, 2))
        ac = torch.einsum("bhwc,hw->bc", power, non_dc)
        num = torch.einsum("bhwc,hw->bc", power, high)
        den = ac if exclude_dc else total
        valid = (ac > FLAT_POWER * total) & (den > 0)  # flat (or all-zero) maps score 0, as in scoring.py
        ratio = torch.where(valid, num / torch.where(valid, den, torch.ones_like(den)), 0.0)
        # a non-finite map has no HFR: NaN, never the 0 of a flat map (the dump refuses NaN features)
        out[start:start + step] = torch.where(torch.isfinite(total), ratio, torch.nan)
    return out


def hfr_per_image(features: torch.Tensor, site: str, cutoff: float = 0.5, exclude_dc: bool = True) -> torch.Tensor:
    """Per-image HFR (B,) float64 of token features (B, T, D), or of attention maps (B, T, T) for `attn_map`.

    Tokens: each channel reshaped to the h x w patch grid, averaged over channels. Attention maps: each query's
    probabilities over the h x w key grid, averaged over queries. The mean over images of these values is
    `pipelines.scoring.hfr_of_tokens` / `hfr_of_attention` of the same features.
    """
    b, t, x = features.shape
    side = grid_side(t)
    if site == "attn_map":  # (B, Tq, Tk) -> (B, h, w, Tq): one map per query over the key grid
        maps = features.reshape(b, t, side, side).permute(0, 2, 3, 1)
    else:  # (B, T, D) -> (B, h, w, D): one map per channel over the patch grid
        maps = features.reshape(b, side, side, x)
    return _per_map(maps, float(cutoff), exclude_dc).mean(dim=1)
