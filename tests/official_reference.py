"""Step-by-step reference of what the authors' released PatchCore code computes (IM224 WR50 baseline,
and, in the section "Every published run", the general chain of their six sample runs).

This module re-states, in plain torch / numpy / scipy / PIL, the computations of
amazon-science/patchcore-inspection (commit fcaa92f, ``src/patchcore``) for the configuration of
``sample_training.sh`` "IM224 Baseline": wideresnet50, ``-le layer2 -le layer3``, patchsize 3
(stride 1), pretrain_embed_dimension 1024, target_embed_dimension 1024, anomaly_scorer_num_nn 1,
``approx_greedy_coreset -p 0.1``, resize 256, imagesize 224. Nothing here is imported from that
repository or from the rest of this project; it is a test oracle, verified numerically against
their code, outside this repository: identical embeddings, scores, maps, masks and sampler indices on random weights.

Pipeline, with the class / step of theirs each part mirrors
--------------------------------------------------------------
0. Backbone side effect (``PatchCore.load`` -> ``NetworkFeatureAggregator.feature_dimensions``):
   while building the model they push ONE all-ones image of shape ``input_shape`` through the
   backbone, which is still in train mode (torchvision constructors return train-mode modules).
   Train-mode BatchNorm therefore updates its running statistics once (momentum 0.1) for every BN
   layer up to and including layer3 (the forward hook on layer3 raises and stops the pass, so
   layer4 is untouched). ``_embed`` then switches the backbone to eval mode. Hence the features
   they use come from "pretrained weights + one BN-stat update on a constant image", in eval mode.
   ``official_backbone_side_effect`` reproduces this; ``official_backbone_features`` then returns
   the eval-mode outputs of layer2 (last Bottleneck of layer2) and layer3.
1. ``PatchMaker.patchify``: ``torch.nn.Unfold(kernel 3, stride 1, padding 1, dilation 1)``
   (zero padding) -> view ``[B, C, 3, 3, L]`` -> permute to ``[B, L, C, 3, 3]``; the L patch
   positions are row-major over the feature map. Within a patch the flattened order is
   ``c * 9 + 3 * ki + kj`` where kernel cell ``(ki, kj)`` is the spatial offset ``(ki - 1, kj - 1)``.
2. ``PatchCore._embed`` resampling of the layer3 patches onto the layer2 grid: the unfolded
   layer3 tensor is viewed as ``[B, h, w, C, 3, 3]``, permuted to ``[B, C, 3, 3, h, w]``, each of the
   ``B * C * 9`` planes is upsampled with ``F.interpolate(mode="bilinear", align_corners=False)``
   to ``(H, W)`` (layer2's grid; patchify keeps the size since padding is 1), and permuted back to
   ``[B, H * W, C, 3, 3]``. Note: the unfolded patches are interpolated, not the feature map.
3. ``common.Preprocessing`` / ``MeanMapper`` (one per layer): each patch's ``C * 9`` vector is
   reduced with ``F.adaptive_avg_pool1d(.., 1024)``; results are stacked to ``[N, 2, 1024]``.
4. ``common.Aggregator``: the stacked ``[N, 2 * 1024]`` vector (layer2 block first) is reduced with
   ``F.adaptive_avg_pool1d(.., 1024)``. Output: ``[B * H * W, 1024]`` float32, image-major, then
   row-major over the 28 x 28 layer2 grid (for 224 input).
5. ``common.NearestNeighbourScorer`` with ``FaissNN`` (``faiss.IndexFlatL2``): the patch score is
   the SQUARED Euclidean distance to the nearest memory-bank row (mean over the k = 1 neighbours),
   as computed by faiss in float32. No square root is taken anywhere in scoring.
6. ``PatchCore._predict``: image score = ``PatchMaker.score`` = max over the image's H * W patch
   scores (unpatch_scores is only a reshape to ``[B, H * W, 1]``). No normalisation here.
7. ``common.RescaleSegmentor``: patch scores ``[B, H, W]`` -> ``F.interpolate(size=input_shape[-2:],
   mode="bilinear", align_corners=False)`` -> ``scipy.ndimage.gaussian_filter(sigma=4)`` per image
   with scipy defaults (order 0, mode "reflect", truncate 4.0, i.e. a 33-tap kernel), on float32.
8. ``bin/run_patchcore.py`` (after predict, before metrics): image scores are min-max normalised
   over the test set and the anomaly maps are min-max normalised with ONE global min / max over
   all test maps, per model, then averaged over ensemble members (identity for one model). Both
   are monotone, so the AUROCs are unaffected; the F1-optimal threshold lives on that scale.
9. ``datasets/mvtec.py`` mask transform ``Resize(256)`` (torchvision default BILINEAR on the PIL
   image; PIL itself forces NEAREST for modes "1" and "P") -> ``CenterCrop(224)`` -> ``ToTensor``;
   ``metrics.compute_pixelwise_retrieval_metrics`` then uses ``ground_truth.astype(int)``, which
   truncates, so only pixels whose resized value is exactly 255 (1.0) are positives. Pixel AUROC is
   ``sklearn.metrics.roc_auc_score`` over all pixels of all test images flattened together.
10. ``sampler.ApproximateGreedyCoresetSampler`` (``official_approx_greedy_coreset``).

Closed forms of steps 1-4 (what ``PatchCore.aggregate_patches`` computes for protocol official; tests/test_official.py checks it)
-------------------------------------------------------------
``adaptive_avg_pool1d`` from length L to n uses bin i = ``[floor(i L / n), ceil((i + 1) L / n))``.

* layer2 MeanMapper, L = 512 * 9 = 4608 -> 1024 (L / n = 4.5): bin 2m = flat indices
  ``9m .. 9m+4`` and bin 2m+1 = ``9m+4 .. 9m+8``, five entries each, all from channel m. So
  ``pre2[2m]   = (1/5) * [x(-1,-1) + x(-1,0) + x(-1,+1) + x(0,-1) + x(0,0)]`` and
  ``pre2[2m+1] = (1/5) * [x(0,0) + x(0,+1) + x(+1,-1) + x(+1,0) + x(+1,+1)]``,
  with ``x(dy, dx) = layer2[m, y+dy, x+dx]`` (0 outside the map): the upper and lower "halves"
  of the 3x3 neighbourhood, both containing the centre.
* layer3 MeanMapper, L = 1024 * 9 = 9216 -> 1024 (L / n = 9, exact): ``pre3[c]`` = plain mean of
  the 9 cells of channel c, then (interpolation is linear and acts per cell) bilinearly upsampled:
  ``pre3[c] = Up(box3(layer3[c]))`` where ``box3`` is the zero-padded 3x3 mean
  (``avg_pool2d(k=3, s=1, p=1, count_include_pad=True)``) on the 14x14 grid and ``Up`` is
  ``F.interpolate(bilinear, align_corners=False)`` to 28x28.
* Aggregator, L = 2 * 1024 = 2048 -> 1024 (L / n = 2, exact): ``out[j] = (v[2j] + v[2j+1]) / 2``
  with ``v = [pre2, pre3]``. Bins never straddle the two layers, so layer2 and layer3 stay
  SEPARATE: dims 0..511 come only from layer2, dims 512..1023 only from layer3:

  ``out[j]       = (1/10) * [sum_{dy,dx in {-1,0,1}} layer2[j, y+dy, x+dx] + layer2[j, y, x]]``,
  j = 0..511 (every layer2 channel; the 3x3 zero-padded sum with the centre counted twice), and

  ``out[512 + k] = Up( box3( (layer3[2k] + layer3[2k+1]) / 2 ) )[y, x]``, k = 0..511
  (adjacent layer3 channel pairs averaged, 3x3 zero-padded mean, bilinear upsampling).

  For H = 2h the upsampling is, per axis, ``U[2i] = 0.25 u[i-1] + 0.75 u[i]`` (``U[0] = u[0]``) and
  ``U[2i+1] = 0.75 u[i] + 0.25 u[i+1]`` (``U[2h-1] = u[h-1]``): source coordinate
  ``s = max((t + 0.5) * h / H - 0.5, 0)``, neighbours ``floor(s)`` and ``min(floor(s) + 1, h - 1)``.

Sampler (``ApproximateGreedyCoresetSampler``, their defaults 10 starting points, 128 dims)
-------------------------------------------------------------------------------------------
Features (float32, [N, 1024]) are projected by a fresh ``torch.nn.Linear(1024, 128, bias=False)``
(default init: kaiming_uniform(a=sqrt 5) = U(-1/32, 1/32) drawn from torch's global CPU generator,
then moved to the device). ``np.random.choice(N, 10, replace=False)`` (numpy's global legacy RNG)
picks starting points; every point's initial score is its MEAN Euclidean distance (not squared) to
them; then ``int(N * percentage)`` times: pick ``argmax`` (first on ties), append it, and replace
each score by ``min(score, dist(point, picked))``. The starting points are not themselves selected
unless chosen by the argmax. Their ``run`` returns ``features[indices]`` (original 1024-d rows).
RNG: ``run_patchcore.py`` calls ``utils.fix_seeds(seed)`` (random, numpy, torch, cuda) per dataset,
but between that call and the sampler the torch generator is also consumed by the backbone
construction (random init before the pretrained weights are loaded) and by the DataLoader
iterator's base-seed draw, so the projection of a real run is not "manual_seed(seed) then Linear";
the numpy starting points are ``RandomState(seed).choice(...)`` (nothing else draws from numpy).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

PATCHSIZE = 3
EMBED_DIM = 1024  # pretrain_embed_dimension == target_embed_dimension == 1024 in the baseline
SMOOTHING_SIGMA = 4

__all__ = [
    "official_layer_embeddings",
    "official_network_features",
    "official_image_scores_and_maps_k",
    "official_ensemble",
    "official_backbone_side_effect",
    "official_backbone_features",
    "official_embeddings",
    "official_patch_scores",
    "official_image_scores_and_maps",
    "official_mask",
    "official_projection_weight",
    "official_approx_greedy_coreset",
]


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------
def _resnet_to_layer3(backbone: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    x = backbone.layer1(x)
    l2 = backbone.layer2(x)
    l3 = backbone.layer3(l2)
    return l2, l3


def official_backbone_side_effect(backbone: torch.nn.Module, input_shape=(3, 224, 224)) -> torch.nn.Module:
    """Mirror the side effect of ``PatchCore.load`` on a torchvision ResNet (in place, returned).

    ``NetworkFeatureAggregator.feature_dimensions(input_shape)`` runs ``torch.ones([1, *input_shape])``
    through the backbone in whatever mode it is in (train mode for a freshly built torchvision
    model), under ``no_grad``, up to the forward hook on layer3. In train mode this updates the
    running mean / var of every BatchNorm in conv1 .. layer3 once (momentum 0.1, unbiased var).
    """
    with torch.no_grad():
        _resnet_to_layer3(backbone, torch.ones([1, *input_shape], dtype=torch.float32))
    return backbone


def official_backbone_features(backbone: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer2 and layer3 outputs as ``PatchCore._embed`` obtains them (after ``.eval()``, ``no_grad``).

    Their hooks sit on the last Bottleneck of ``layer2`` / ``layer3``, i.e. the layer outputs.
    Returns ``([B, 512, H/8, W/8], [B, 1024, H/16, W/16])`` float32.
    """
    backbone.eval()
    with torch.no_grad():
        return _resnet_to_layer3(backbone, images.to(torch.float32))


# --------------------------------------------------------------------------------------------
# Embedding (PatchMaker.patchify, _embed's resampling, Preprocessing/MeanMapper, Aggregator)
# --------------------------------------------------------------------------------------------
def _patchify(fmap: torch.Tensor, patchsize: int = PATCHSIZE, stride: int = 1):
    """``PatchMaker.patchify(.., return_spatial_info=True)``: ``[B, L, C, p, p]`` and the patch grid."""
    pad = int((patchsize - 1) / 2)
    cols = F.unfold(fmap, kernel_size=patchsize, dilation=1, padding=pad, stride=stride)  # [B, C*p*p, L]
    grid = [int((s + 2 * pad - (patchsize - 1) - 1) / stride + 1) for s in fmap.shape[-2:]]
    batch, chans = fmap.shape[:2]
    cols = cols.reshape(batch, chans, patchsize, patchsize, -1)
    return cols.permute(0, 4, 1, 2, 3), grid


def _resample_patches(patches: torch.Tensor, grid, target_grid) -> torch.Tensor:
    """``PatchCore._embed`` loop body: bilinear (align_corners=False) resize of unfolded patches."""
    batch = patches.shape[0]
    x = patches.reshape(batch, grid[0], grid[1], *patches.shape[2:])  # [B, h, w, C, p, p]
    x = x.permute(0, 3, 4, 5, 1, 2)  # [B, C, p, p, h, w]
    lead = x.shape[:-2]
    x = x.reshape(-1, 1, grid[0], grid[1])
    x = F.interpolate(x, size=(target_grid[0], target_grid[1]), mode="bilinear", align_corners=False)
    x = x.reshape(*lead, target_grid[0], target_grid[1])  # [B, C, p, p, H, W]
    x = x.permute(0, 4, 5, 1, 2, 3)  # [B, H, W, C, p, p]
    return x.reshape(batch, -1, *x.shape[-3:])  # [B, H*W, C, p, p]


def _mean_map(patches: torch.Tensor, dim: int) -> torch.Tensor:
    """``MeanMapper``: flatten each patch (C*p*p) and adaptive-average-pool it to ``dim`` values."""
    return F.adaptive_avg_pool1d(patches.reshape(len(patches), 1, -1), dim).squeeze(1)


def official_embeddings(
    layer2: torch.Tensor, layer3: torch.Tensor, pretrain_dim: int = EMBED_DIM, target_dim: int = EMBED_DIM
) -> torch.Tensor:
    return official_layer_embeddings([layer2, layer3], PATCHSIZE, pretrain_dim, target_dim)


def official_layer_embeddings(features: list, patchsize: int, pretrain_dim: int, target_dim: int) -> torch.Tensor:
    """Patch embeddings exactly as ``PatchCore._embed`` builds them from the two feature maps.

    Mirrors ``PatchMaker.patchify`` (3x3 unfold, zero padding 1, stride 1) on both layers, the
    bilinear (align_corners=False) resampling of layer3's unfolded patches onto layer2's patch grid,
    ``Preprocessing`` (one ``MeanMapper`` = ``adaptive_avg_pool1d`` to ``pretrain_dim`` per layer),
    the stack to ``[N, 2, pretrain_dim]`` and ``Aggregator`` (``adaptive_avg_pool1d`` to
    ``target_dim``).

    Args: the layers' maps in their order (``[B, C_i, h_i, w_i]``, float32), e.g. layer2 ``[B, 512, H, W]`` and
    layer3 ``[B, 1024, h, w]``; the first layer's patch grid is every layer's.
    Returns: float32 tensor ``[B * H * W, target_dim]`` in their order: image-major, then patch
    positions row-major over the first layer's H x W grid (index ``b * H * W + y * W + x``).
    """
    with torch.no_grad():
        unfolded = [_patchify(f.to(torch.float32), patchsize) for f in features]
        first, grid = unfolded[0]
        patches = [first] + [_resample_patches(p, g, grid) for p, g in unfolded[1:]]  # every layer on the first one's grid
        per_layer = [p.reshape(-1, *p.shape[-3:]) for p in patches]  # [B*H*W, C, p, p] each
        stacked = torch.stack([_mean_map(p, pretrain_dim) for p in per_layer], dim=1)  # [N, layers, pretrain_dim]
        pooled = F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), target_dim)
        return pooled.reshape(len(pooled), -1)


# --------------------------------------------------------------------------------------------
# Scoring (NearestNeighbourScorer/FaissNN, PatchMaker.score, RescaleSegmentor)
# --------------------------------------------------------------------------------------------
def official_patch_scores(embeddings, bank, backend: str = "faiss", chunk: int = 4096, n_nearest: int = 1) -> np.ndarray:
    """What ``NearestNeighbourScorer.predict(..)[0]`` returns for ``anomaly_scorer_num_nn=n_nearest``.

    Their ``FaissNN`` uses ``faiss.IndexFlatL2``, which returns SQUARED L2 distances; the patch score
    is their mean over the n_nearest neighbours (``np.mean(query_distances, axis=-1)``), and the same
    patch scores make the image score and the map. No square root anywhere.

    Args: ``embeddings`` ``[M, D]``, ``bank`` ``[K, D]`` (tensor or ndarray).
    ``backend="faiss"`` (default): literally their CPU ``IndexFlatL2`` search on float32 (returns
    float32; bit-identical to their scorer, including faiss's float32 ``|x|^2 + |y|^2 - 2 x.y``
    rounding, which was up to ~7e-5 of the largest score, ~1.5e-4 relative on a small score, in
    the verification). ``backend="torch"``: the exact squared distance to the nearest bank row in
    float64 (returns float64). Their published runs used ``--faiss_on_gpu`` (GpuIndexFlatL2), whose
    rounding differs again at that level. Returns ``[M]`` ndarray.
    """
    if backend == "faiss":
        import faiss

        q = np.ascontiguousarray(_as_numpy(embeddings), dtype=np.float32)
        b = np.ascontiguousarray(_as_numpy(bank), dtype=np.float32)
        index = faiss.IndexFlatL2(b.shape[-1])
        index.add(b)
        dist, _ = index.search(q, n_nearest)
        return np.mean(dist, axis=-1)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}")
    q = torch.as_tensor(_as_numpy(embeddings), dtype=torch.float64)
    b = torch.as_tensor(_as_numpy(bank), dtype=torch.float64)
    b_sq = (b * b).sum(1)
    out = []
    for start in range(0, len(q), chunk):
        qc = q[start : start + chunk]
        d = (qc * qc).sum(1, keepdim=True) - 2.0 * qc @ b.T + b_sq[None]
        out.append(d.topk(n_nearest, dim=1, largest=False).values.clamp_min(0.0).mean(dim=1))
    return torch.cat(out).numpy()


def official_image_scores_and_maps(patch_scores, grid, image_size) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (``PatchMaker.unpatch_scores`` + ``PatchMaker.score``) and ``RescaleSegmentor`` maps.

    Args: ``patch_scores`` ``[B, H*W]`` (or ``[B*H*W]``) in the patch order of
    ``official_embeddings``; ``grid`` ``(H, W)``; ``image_size`` int or ``(S_h, S_w)``.
    Image score: max over the image's patch scores (no normalisation). Map: patch grid
    ``[B, H, W]`` -> bilinear, align_corners=False, to the image size -> per image
    ``scipy.ndimage.gaussian_filter(sigma=4)`` (mode "reflect", truncate 4.0). The dtype given is
    kept (theirs is float32, as faiss returns). Returns ``(scores [B], maps [B, S_h, S_w])`` ndarrays.
    """
    scores = torch.as_tensor(_as_numpy(patch_scores))
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    batch = scores.numel() // (grid[0] * grid[1])
    scores = scores.reshape(batch, grid[0] * grid[1])
    image_scores = scores.max(dim=-1).values.numpy()
    with torch.no_grad():
        up = F.interpolate(scores.reshape(batch, 1, grid[0], grid[1]), size=size, mode="bilinear", align_corners=False)
    maps = np.stack([scipy.ndimage.gaussian_filter(m, sigma=SMOOTHING_SIGMA) for m in up[:, 0].numpy()])
    return image_scores, maps


# --------------------------------------------------------------------------------------------
# Ground-truth masks (CategoryDataset.transform_mask + metrics' astype(int))
# --------------------------------------------------------------------------------------------
def official_mask(mask_pil: Image.Image, resize: int = 256, image_size: int = 224) -> np.ndarray:
    """Labels their pixel metrics see for a ground-truth mask image.

    Mirrors ``CategoryDataset.transform_mask`` = ``Resize(resize)`` (shorter side -> ``resize``,
    longer side ``int(resize * long / short)``; torchvision's default BILINEAR, which on a PIL image
    is ``PIL.Image.resize`` with its support-scaled (antialiasing) bilinear filter; PIL uses NEAREST
    for modes "1" and "P" regardless), ``CenterCrop(image_size)`` (offset
    ``int(round((size - crop) / 2))``), ``ToTensor`` (uint8 / 255 in float32; mode "1" gives 0/1;
    "I", "I;16" and "F" are not divided), followed by ``.astype(int)`` in
    ``metrics.compute_pixelwise_retrieval_metrics`` (truncation: only exactly 1.0 becomes 1).
    Returns an int ndarray ``[image_size, image_size]`` (single-band masks only).
    """
    if len(mask_pil.getbands()) != 1:
        raise ValueError(f"single-band mask expected, got mode {mask_pil.mode!r}")
    w, h = mask_pil.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    img = mask_pil if (new_w, new_h) == (w, h) else mask_pil.resize((new_w, new_h), Image.BILINEAR)
    if image_size > new_w or image_size > new_h:
        raise ValueError("crop larger than the resized mask (torchvision would pad); not supported")
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    nptype = {"I": np.int32, "I;16": np.int16, "F": np.float32}.get(img.mode, np.uint8)
    arr = np.array(img, nptype, copy=True)
    if img.mode == "1":
        arr = arr * 255
    if arr.dtype == np.uint8:
        arr = (torch.from_numpy(arr).to(torch.float32) / 255).numpy()
    return arr.astype(int)


# --------------------------------------------------------------------------------------------
# Coreset (sampler.ApproximateGreedyCoresetSampler)
# --------------------------------------------------------------------------------------------
def official_projection_weight(
    seed: int | None, in_dim: int = EMBED_DIM, out_dim: int = 128, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Weight ``[out_dim, in_dim]`` of their ``torch.nn.Linear(in_dim, out_dim, bias=False)`` mapper.

    Default Linear init is ``kaiming_uniform_(a=sqrt(5))``: U(-b, b) with
    ``b = sqrt(2 / (1 + a^2)) * sqrt(3 / in_dim)`` (= 1/32 for 1024), one ``uniform_`` call on a CPU
    tensor. ``seed`` reproduces "``torch.manual_seed(seed)``, then build the Linear"; alternatively
    pass the ``generator`` whose state the global generator would have.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    a = math.sqrt(5)
    bound = math.sqrt(2.0 / (1 + a**2)) * math.sqrt(3.0 / in_dim)
    weight = torch.empty(out_dim, in_dim, dtype=torch.float32)
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)
    return weight


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``GreedyCoresetSampler._compute_batchwise_differences``: Euclidean (sqrt of clamped expansion)."""
    aa = a.unsqueeze(1).bmm(a.unsqueeze(2)).reshape(-1, 1)
    bb = b.unsqueeze(1).bmm(b.unsqueeze(2)).reshape(1, -1)
    ab = a.mm(b.T)
    return (-2 * ab + aa + bb).clamp(0, None).sqrt()


def official_approx_greedy_coreset(
    features,
    percentage: float,
    seed: int | None = 0,
    *,
    projection: torch.Tensor | None = None,
    start_points=None,
    number_of_starting_points: int = 10,
    dimension_to_project_features_to: int = 128,
) -> np.ndarray:
    """Indices chosen by ``ApproximateGreedyCoresetSampler(percentage, device).run(features)``.

    Args:
        features: ``[N, D]`` float32 (their memory bank before subsampling, ndarray or tensor).
        percentage: in (0, 1) (``BaseSampler`` raises otherwise); ``int(N * percentage)`` picks.
        seed: stands for ``patchcore.utils.fix_seeds(seed)`` immediately before ``run`` with
            nothing else drawing random numbers: projection = ``official_projection_weight(seed)``
            and starting points = ``np.random.RandomState(seed).choice(N, 10, replace=False)``
            (same stream as ``np.random.seed(seed); np.random.choice(..)``).
        projection: optional explicit ``[128, D]`` mapper weight (overrides the seed for it).
        start_points: optional explicit starting indices (override the seed for them).
    Returns: int64 ndarray of selected row indices into ``features``, in selection order (their
    ``run`` returns ``features[indices]``). Runs on CPU in float32 like theirs with device cpu.
    """
    if not 0 < percentage < 1:
        raise ValueError("Percentage value not in (0, 1).")
    feats = torch.as_tensor(_as_numpy(features))
    n = len(feats)
    with torch.no_grad():
        if feats.shape[1] == dimension_to_project_features_to:
            reduced = feats
        else:
            if projection is None:
                projection = official_projection_weight(seed, feats.shape[1], dimension_to_project_features_to)
            reduced = F.linear(feats, projection.to(feats.dtype))
        if start_points is None:
            k = int(np.clip(number_of_starting_points, None, n))
            start_points = np.random.RandomState(seed).choice(n, k, replace=False)
        start_points = [int(i) for i in start_points]
        score = _pairwise_dist(reduced, reduced[start_points]).mean(dim=-1).reshape(-1, 1)
        picked = []
        for _ in range(int(n * percentage)):
            idx = int(torch.argmax(score).item())
            picked.append(idx)
            score = torch.minimum(score, _pairwise_dist(reduced, reduced[idx : idx + 1]))
    return np.array(picked, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Every published run: any backbone and layers (NetworkFeatureAggregator), and ensembles (run_patchcore.py)
# --------------------------------------------------------------------------------------------
class _Reached(Exception):
    pass


def _hooked(backbone: torch.nn.Module, layers: list[str], outputs: dict) -> list:
    """``NetworkFeatureAggregator.__init__``: a forward hook per layer, found as they find it (``a.b`` is
    ``_modules[a]._modules[b]``, an index when numeric); on the last Bottleneck of a Sequential; the hook of
    the last layer in their list raises, which stops the forward pass there."""
    handles = []
    for layer in layers:
        if "." in layer:
            block, index = layer.split(".")
            module = backbone.__dict__["_modules"][block]
            module = module[int(index)] if index.isnumeric() else module.__dict__["_modules"][index]
        else:
            module = backbone.__dict__["_modules"][layer]
        if isinstance(module, torch.nn.Sequential):
            module = module[-1]

        def hook(mod, inputs, output, name=layer, last=layer == layers[-1]):
            outputs[name] = output
            if last:
                raise _Reached

        handles.append(module.register_forward_hook(hook))
    return handles


def official_network_features(backbone: torch.nn.Module, layers: list[str], images: torch.Tensor, train: bool = False) -> list:
    """The layers' outputs as their NetworkFeatureAggregator returns them, in their list's order: the network's own
    forward(), stopped at the last layer. ``train=True`` is their build-time probe (``feature_dimensions``: one
    all-ones image in train mode, so BatchNorm statistics update once); else eval mode, as ``_embed`` runs."""
    outputs: dict = {}
    handles = _hooked(backbone, layers, outputs)
    backbone.train(train)
    try:
        with torch.no_grad():
            backbone(images.to(torch.float32))
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[layer] for layer in layers]


def official_image_scores_and_maps_k(embeddings, bank, n_nearest: int, grid, image_size) -> tuple[np.ndarray, np.ndarray]:
    """``PatchCore._predict`` with ``anomaly_scorer_num_nn = n_nearest``: the mean of the n nearest squared
    distances per patch (faiss), its max per image, and the maps from the same patch scores."""
    patch_scores = official_patch_scores(embeddings, bank, n_nearest=n_nearest)
    return official_image_scores_and_maps(patch_scores, grid, image_size)


def official_ensemble(scores: list, maps: list) -> tuple[np.ndarray, np.ndarray]:
    """``bin/run_patchcore.py`` after every member's predict on the whole test set: each member's image scores
    min-max normalised over the test set, its maps with one min and max over all of its maps, then the
    members' mean. Returns (scores [N], maps [N, H, W])."""
    scores = np.array(scores)
    low, high = scores.min(axis=-1).reshape(-1, 1), scores.max(axis=-1).reshape(-1, 1)
    scores = np.mean((scores - low) / (high - low), axis=0)
    maps = np.array(maps)
    low = maps.reshape(len(maps), -1).min(axis=-1).reshape(-1, 1, 1, 1)
    high = maps.reshape(len(maps), -1).max(axis=-1).reshape(-1, 1, 1, 1)
    return scores, np.mean((maps - low) / (high - low), axis=0)


def _as_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
