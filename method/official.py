"""What --protocol official computes differently from the paper, for the patch features: the authors'
released code's embedding chain, for any backbone, layers, patch size and dimensions.

The other differences sit where the step is computed: squared distances and scipy's default blur
border in patchcore.py's AnomalyScorer, the BatchNorm update at build time in backbone.py, the
masks in dataset.py, and the test-set normalisation of an ensemble in ensemble.py.
docs/architecture.md lists them all; tests/test_official.py checks each against a literal
re-implementation of the released code's steps (tests/official_reference.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _segments(channels: int, patch_size: int, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """adaptive_avg_pool1d of a patch's flattened [C, p, p] vector (index c * p^2 + q, q = row * p + col) down to
    `bins` values, as pieces: bin k averages indices floor(k L / bins) .. ceil((k + 1) L / bins) - 1 (L = C p^2),
    which fall into a few channels, each contributing a run q0 .. q1 - 1 of its p x p cells. Returns, per piece,
    its channel, its bin and its p x p mask of cells, and each bin's length."""
    cells, length = patch_size * patch_size, channels * patch_size * patch_size
    channel, which, masks, sizes = [], [], [], []
    for k in range(bins):
        start, end = (k * length) // bins, -((-(k + 1) * length) // bins)  # floor, ceil
        sizes.append(end - start)
        for c in range(start // cells, (end - 1) // cells + 1):
            q0, q1 = max(start - c * cells, 0), min(end - c * cells, cells)
            mask = torch.zeros(cells)
            mask[q0:q1] = 1
            channel.append(c)
            which.append(k)
            masks.append(mask.view(1, patch_size, patch_size))
    return torch.tensor(channel), torch.tensor(which), torch.stack(masks), torch.tensor(sizes, dtype=torch.float32)


def pooled_patches(feature: torch.Tensor, patch_size: int, bins: int) -> torch.Tensor:
    """The released code's unfold (p x p, zero padding, stride 1) then MeanMapper (adaptive_avg_pool1d of each
    patch's C p^2 values to `bins`), without unfolding: [B, C, h, w] -> [B, bins, h, w]. Each pooled value
    is a sum of a few masked p x p windows of single channels (_segments), taken with one grouped convolution."""
    channel, which, masks, sizes = (t.to(feature.device) for t in _segments(feature.shape[1], patch_size, bins))
    pieces = F.conv2d(feature[:, channel], masks.to(feature.dtype), padding=patch_size // 2, groups=len(channel))
    out = torch.zeros(feature.shape[0], bins, *feature.shape[-2:], dtype=feature.dtype, device=feature.device)
    return out.index_add_(1, which, pieces) / sizes.view(1, -1, 1, 1).to(feature.dtype)


def official_patches(features: list[torch.Tensor], patch_size: int, pretrain_dim: int, target_dim: int) -> torch.Tensor:
    """The released code's patch features: [B, N, target_dim] on the FIRST layer's grid (theirs, not the largest).

    Their chain per layer: unfold p x p with zero padding, resize the unfolded patches of a coarser layer
    bilinearly to the first layer's grid, and pool each patch's C p^2 values to pretrain_dim
    (adaptive_avg_pool1d); then the layers' vectors are stacked and pooled to target_dim. Pooling is a
    fixed linear map of the cells and the resize acts on each cell alike, so pooling first at the layer's
    own grid and resizing the pooled maps gives the same numbers (pooled_patches), without ever holding
    the C p^2 values of every patch. tests/test_official.py checks it against their chain written out.
    """
    grid = tuple(features[0].shape[-2:])
    per_layer = []
    for feature in features:
        pooled = pooled_patches(feature, patch_size, pretrain_dim)
        if tuple(pooled.shape[-2:]) != grid:
            pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
        per_layer.append(pooled.flatten(2).transpose(1, 2))  # [B, N, pretrain_dim]
    stacked = torch.cat(per_layer, dim=2)  # the layers' vectors end to end, as their stack then reshape lays them out
    b, n, _ = stacked.shape
    return F.adaptive_avg_pool1d(stacked.reshape(b * n, 1, -1), target_dim).reshape(b, n, target_dim)
