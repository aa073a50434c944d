"""What --protocol official computes differently from the paper, for the patch features: the authors'
released code's 1024-d features, in closed form, and the backbone it reproduces them for.

The other differences sit where the step is computed: squared distances and scipy's default blur
border in patchcore.py's AnomalyScorer, the BatchNorm update at build time in backbone.py, and the
masks in dataset.py. docs/architecture.md lists them all; tests/test_official.py checks each
against a literal re-implementation of the released code's steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_official_layers(features: list[torch.Tensor], backbone: str, layers: tuple[str, ...]) -> None:
    """The released code's baseline reads two layers of 512 and 1024 channels (WideResNet-50 layer2, layer3)."""
    widths = [f.shape[1] for f in features]
    if widths != [512, 1024]:
        raise ValueError(
            f"--protocol official reproduces the released code's baseline, whose two layers have 512 and 1024 "
            f"channels (wide_resnet50_2 layer2,layer3); {backbone} {list(layers)} have {widths}"
        )


def official_patches(features: list[torch.Tensor]) -> torch.Tensor:
    """The released code's 1024-d patch features, in closed form: [B, N, 1024].

    Their chain (unfold 3x3 with zero padding, layer3's unfolded patches resized bilinearly to
    layer2's grid, each layer's C*9 values adaptive-average-pooled to 1024, the two stacked and
    pooled to 1024 again) works out, for layer widths 512 and 1024, to:
      dims 0..511:    layer2, (3x3 zero-padded neighbourhood sum + the centre again) / 10;
      dims 512..1023: layer3 with adjacent channels averaged in pairs, 3x3 zero-padded mean,
                      upsampled bilinearly to layer2's grid.
    tests/test_official.py checks it against a literal re-implementation of their chain.
    """
    layer2, layer3 = features
    # the zero-padded 3x3 sum as 9 x the mean: divisor_override=1 would say it directly, but torch's ONNX exporter
    # drops divisor_override (torch 2.14: an exported graph then divides by 9 and no export check would pass)
    near2 = (F.avg_pool2d(layer2, 3, stride=1, padding=1, count_include_pad=True) * 9 + layer2) / 10
    pairs = (layer3[:, 0::2] + layer3[:, 1::2]) / 2
    near3 = F.avg_pool2d(pairs, 3, stride=1, padding=1, count_include_pad=True)
    near3 = F.interpolate(near3, size=layer2.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([near2, near3], dim=1).flatten(2).transpose(1, 2)
