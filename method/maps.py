"""Anomaly maps (Sec. 3.3): the Gaussian smoothing of upsampled patch scores, computed in torch as
scipy.ndimage.gaussian_filter computes it. (A map resized back onto its original image: image_io.resize_map.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _border_indices(n: int, radius: int, mode: str) -> torch.Tensor:
    """Source index of each position of a length-n axis padded by `radius` on both sides, for
    scipy.ndimage's border modes at any n, even n <= radius (repeated reflections):
    'mirror' reflects about the edge sample (d c b | a b c d | c b a), 'reflect' about the
    edge itself (c b a | a b c d | d c b)."""
    i = torch.arange(-radius, n + radius)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1) if mode == "mirror" else 2 * n
    i = i.remainder(period)
    return torch.where(i < n, i, period - i - int(mode == "reflect"))


def gaussian_blur(maps: torch.Tensor, sigma: float, mode: str = "mirror") -> torch.Tensor:
    """Separable Gaussian smoothing of [B, 1, H, W] maps, kernel radius int(4 sigma + 0.5), as
    scipy.ndimage.gaussian_filter(sigma, mode=mode, truncate=4) computes it, for maps of any size."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    h, w = maps.shape[-2:]
    rows = _border_indices(h, radius, mode).to(maps.device)
    cols = _border_indices(w, radius, mode).to(maps.device)
    maps = F.conv2d(maps[..., cols], kernel.view(1, 1, 1, -1))
    return F.conv2d(maps[..., rows, :], kernel.view(1, 1, -1, 1))
