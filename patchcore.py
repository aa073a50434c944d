"""PatchCore: "Towards Total Recall in Industrial Anomaly Detection" (Roth et al., CVPR 2022).

A frozen ImageNet CNN turns every image into a grid of locally aware patch features
(Sec. 3.1, Eq. 1-2). A greedy coreset of the features of all normal training images
is the memory bank (Sec. 3.2, Alg. 1). A test patch's anomaly score is the distance to
its nearest memory patch; the image score is the largest patch score (Sec. 3.3, Eq. 6-7).

This file holds the method only: no files, no command line.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

WEIGHT_CHOICES = ("imagenet", "auto", "none")  # or a path to a local state_dict file
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class WeightsError(RuntimeError):
    """The backbone weights asked for cannot be had."""


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device '{device}': use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but this torch build sees no CUDA GPU: use --device cpu")
    return torch.device(device)


def load_backbone(name: str, weights: str, seed: int) -> tuple[torch.nn.Module, str, str]:
    """Build a torchvision classification network with the weights asked for.

    weights: 'imagenet' (torchvision's IMAGENET1K_V1, downloaded and cached), 'none'
    (random init from `seed`, for tests), 'auto' (imagenet, else random init with a
    warning) or a path to a local state_dict file.
    Returns (network, weights_spec, weights_description); the spec rebuilds the same weights.
    """
    if weights in ("imagenet", "auto"):
        imagenet = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:
            return torchvision.models.get_model(name, weights=imagenet), "imagenet", f"imagenet ({imagenet})"
        except OSError as err:  # URLError, HTTP errors and unreadable cache files are OSErrors
            if weights == "imagenet":
                raise WeightsError(
                    f"could not get ImageNet weights for {name} ({err}); on an offline machine pass "
                    "--weights PATH to a state_dict file, or --weights none for random init (tests only)"
                ) from err
            print(
                f"WARNING: ImageNet weights for {name} could not be had ({err}); using RANDOM INIT weights. "
                "Scores will be far below the paper's.",
                file=sys.stderr,
            )
            weights = "none"
    if weights == "none":
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            return torchvision.models.get_model(name, weights=None), "none", f"none (random init, seed {seed})"
    if not Path(weights).is_file():
        raise WeightsError(f"--weights {weights}: no such file; use imagenet, auto, none or the path of a state_dict file")
    return torchvision.models.get_model(name, weights=None), weights, f"file ({weights})"


def random_projection(in_dim: int, out_dim: int, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian [in_dim, out_dim] matrix scaled by 1/sqrt(out_dim): distances are kept in expectation."""
    return torch.randn(in_dim, out_dim, generator=generator) / math.sqrt(out_dim)


def squared_distances(points: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """||p - c||^2 for every row p. Both greedy variants use exactly this arithmetic, so their
    float32 distances, and therefore their selections, agree bit for bit."""
    return ((points - center) ** 2).sum(1)


def k_center_greedy_dense(points: torch.Tensor, n_select: int, start: int, block: int = 64) -> torch.Tensor:
    """Alg. 1 as one vectorised update per iteration: O(N x D) work each, no host sync (the GPU path).

    On CUDA, `block` iterations are captured once as a CUDA graph and replayed, so the
    per-iteration kernel-launch overhead goes; elsewhere the same step runs eagerly.
    """
    selected = torch.empty(n_select, dtype=torch.long, device=points.device)
    selected[0] = start
    min_dist = squared_distances(points, points[start])  # squared distance to the nearest selected point
    position = torch.ones(1, dtype=torch.long, device=points.device)  # where the next index goes

    def step() -> None:
        farthest = torch.argmax(min_dist).view(1)  # first index among ties
        selected.index_copy_(0, position, farthest)
        torch.minimum(min_dist, squared_distances(points, points[farthest]), out=min_dist)
        position.add_(1)

    remaining = n_select - 1
    progress = tqdm(total=remaining, desc="coreset", unit="pt", mininterval=1.0)
    if points.device.type == "cuda" and remaining >= 2 * block:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up before capture; these are real iterations
            for _ in range(block):
                step()
        torch.cuda.current_stream().wait_stream(side)
        remaining -= block
        progress.update(block)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run
            for _ in range(block):
                step()
        while remaining >= block:
            graph.replay()
            remaining -= block
            progress.update(block)
    for _ in range(remaining):
        step()
        progress.update(1)
    progress.close()
    return selected


def k_center_greedy_pruned(points: torch.Tensor, n_select: int, start: int, n_pivots: int = 16) -> torch.Tensor:
    """Alg. 1, exactly, touching only the points a new center can get closer to (the CPU path).

    Every point belongs to its nearest center j, and r_j is the largest distance in j's
    group. A new center c can only come closer to points of group j if d(j, c) < 2 r_j
    (triangle inequality), so other groups are skipped. d(j, c) itself is first bounded
    from below through a few pivot centers, |d(k, j) - d(k, c)| <= d(j, c), so that most
    centers are ruled out without a full distance. A slack of 1e-4 of the data's scale on
    the bounds covers float32 rounding. Same selection as k_center_greedy_dense.
    """
    n, dim = points.shape
    x = points.numpy()

    def center_distances(a: np.ndarray, c: np.ndarray) -> np.ndarray:  # for the bounds only
        diff = a - c
        return np.sqrt(np.einsum("ij,ij->i", diff, diff))

    selected = np.empty(n_select, np.int64)
    centers = np.empty((n_select, dim), np.float32)
    radius = np.zeros(n_select, np.float32)  # r_j, exact for every group
    pivot_dist = np.zeros((n_pivots, n_select), np.float32)  # d(pivot k, center j)
    selected[0], centers[0] = start, x[start]
    min_dist = squared_distances(points, points[start]).numpy()
    group = np.zeros(n, np.int64)
    radius[0] = np.sqrt(min_dist.max())
    slack = 1e-4 * float(radius[0]) + 1e-12
    n_piv = 1
    for i in tqdm(range(1, n_select), desc="coreset", unit="pt", mininterval=1.0):
        farthest = int(np.argmax(min_dist))  # first index among ties
        c = x[farthest]
        selected[i], centers[i] = farthest, c
        if n_piv < n_pivots:  # the first centers serve as pivots
            pivot_dist[n_piv, : i + 1] = center_distances(centers[: i + 1], c)
            n_piv += 1
        to_pivots = center_distances(centers[:n_piv], c)
        pivot_dist[:n_piv, i] = to_pivots
        lower = np.abs(pivot_dist[:n_piv, :i] - to_pivots[:, None]).max(0)
        maybe = np.flatnonzero(lower < 2 * radius[:i] + slack)
        near = maybe[center_distances(centers[maybe], c) < 2 * radius[maybe] + slack]
        in_near = np.zeros(i + 1, bool)
        in_near[near] = True
        touched = np.flatnonzero(in_near[group])
        if len(touched) > n // 4:  # little to prune (early on, or data without cluster structure): one dense pass
            dist = squared_distances(points, points[farthest]).numpy()[touched]
        else:
            dist = squared_distances(points[torch.from_numpy(touched)], points[farthest]).numpy()
        closer = dist < min_dist[touched]
        min_dist[touched[closer]] = dist[closer]
        group[touched[closer]] = i
        radius[near] = 0
        np.maximum.at(radius, group[touched], np.sqrt(min_dist[touched]))
    return torch.from_numpy(selected)


def exact_knn_torch(
    queries: torch.Tensor, bank: torch.Tensor, k: int, precision: str = "fp32", block_bytes: int = 2**28
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours by ||q||^2 - 2 q.m + ||m||^2, in query chunks whose fp32
    distance block stays under `block_bytes` (256 MiB) whatever the bank size.

    precision: 'fp32', 'tf32' (TF32 tensor-core matmul on Ampere and newer) or 'fp16' (the
    cross term in half precision, accumulated in fp32); norms and the rest stay in fp32.
    """
    bank_sq = (bank.float() ** 2).sum(1)
    bank_mm = bank.half() if precision == "fp16" else bank.float()
    rows = max(1, block_bytes // (4 * bank.shape[0]))  # query rows per chunk
    distances, indices = [], []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        for q in queries.split(rows):
            cross = (q.to(bank_mm.dtype) @ bank_mm.T).float()
            squared = (q.float() ** 2).sum(1, keepdim=True) - 2 * cross + bank_sq
            value, index = squared.topk(k, dim=1, largest=False)
            distances.append(value.clamp_min(0).sqrt())
            indices.append(index)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return torch.cat(distances), torch.cat(indices)


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


class _StopForward(Exception):
    """Raised by the hook of the deepest used layer: the rest of the network never runs."""


class PatchCore:
    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: tuple[str, ...] = ("layer2", "layer3"),
        device: str = "auto",
        coreset_ratio: float = 0.25,
        coreset_proj_dim: int = 128,
        weights: str = "imagenet",
        seed: int = 0,
        reweight_b: int = 0,
        blur_sigma: float = 4.0,
        feature_memory_gb: float = 8.0,
        amp: str = "none",
        search_precision: str = "fp32",
        search: str = "auto",
    ) -> None:
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.device = resolve_device(device)
        self.backbone_name = backbone
        self.layers = tuple(layers)
        self.coreset_ratio = coreset_ratio
        self.coreset_proj_dim = coreset_proj_dim
        self.seed = seed
        self.reweight_b = reweight_b  # 0: image score = max patch score; b > 0: Eq. 7 with b neighbours
        self.blur_sigma = blur_sigma  # 0: no smoothing of the anomaly map
        self.feature_memory_gb = feature_memory_gb  # fit(): full features kept in RAM up to this, else a second pass
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        if search_precision not in ("fp32", "tf32", "fp16"):
            raise ValueError(f"search_precision must be fp32, tf32 or fp16, got {search_precision!r}")
        self.amp = amp  # backbone autocast: none, bf16 or fp16
        self.search_precision = search_precision  # used by the torch search only; faiss is fp32
        if search not in ("auto", "faiss", "torch"):
            raise ValueError(f"search must be auto, faiss or torch, got {search!r}")
        self.search = search  # auto: faiss where it runs on the model's device, else the exact torch search

        network, self.weights_spec, self.weights = load_backbone(backbone, weights, seed)
        self.backbone = self._cut_after_last_layer(network)
        if self.weights_spec not in WEIGHT_CHOICES:
            self._load_state_dict_file(self.weights_spec)
        self.backbone_sha256 = self._fingerprint()
        self.backbone.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda":  # NHWC convolutions run faster on tensor cores
            self.backbone.to(memory_format=torch.channels_last)

        # feature_extractor: forward hooks collect the used layers' outputs.
        self._features: dict[str, torch.Tensor] = {}
        for name in self.layers:
            getattr(self.backbone, name).register_forward_hook(self._hook(name))

        self.feature_dim = sum(f.shape[1] for f in self.extract_features(torch.zeros(1, 3, 64, 64)))  # 1536
        self.memory_bank: torch.Tensor | None = None  # [M, C] coreset of training patch features
        self.index = None  # faiss.IndexFlatL2 over the memory bank

    # ------------------------------------------------------------------ backbone
    def _cut_after_last_layer(self, network: torch.nn.Module) -> torch.nn.Module:
        """Replace every child after the deepest used layer by Identity (layer4, avgpool, fc)."""
        names = [name for name, _ in network.named_children()]
        unknown = [layer for layer in self.layers if layer not in names]
        if unknown:
            raise ValueError(f"{self.backbone_name} has no layer(s) {unknown}; it has {names}")
        self._last_layer = max(self.layers, key=names.index)
        for name in names[names.index(self._last_layer) + 1 :]:
            setattr(network, name, torch.nn.Identity())
        return network

    def _load_state_dict_file(self, path: str) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: never runs pickled code
        except Exception as err:
            raise WeightsError(f"--weights {path}: not a readable state_dict file ({err})") from err
        if not isinstance(state, dict):
            raise WeightsError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict")
        used = self.backbone.state_dict().keys()
        dropped = tuple(self._dropped_prefixes())
        state = {k: v for k, v in state.items() if k in used or not k.startswith(dropped)}
        missing, unexpected = sorted(set(used) - set(state)), sorted(set(state) - set(used))
        if missing or unexpected:
            example = f"'{(missing or unexpected)[0]}'"
            raise WeightsError(
                f"--weights {path}: not a state_dict of {self.backbone_name} ({len(missing)} missing keys, {len(unexpected)} "
                f"unexpected, e.g. {example}); use torchvision's {self.backbone_name} checkpoint"
            )
        try:
            self.backbone.load_state_dict(state, strict=True)
        except RuntimeError as err:  # right keys, wrong shapes
            raise WeightsError(f"--weights {path}: not a state_dict of {self.backbone_name} ({str(err).splitlines()[-1].strip()})") from err

    def _dropped_prefixes(self) -> list[str]:
        names = [name for name, _ in self.backbone.named_children()]
        return [name + "." for name in names[names.index(self._last_layer) + 1 :]]

    def _fingerprint(self) -> str:
        """sha256 of the used backbone weights: evaluation checks it equals training's."""
        digest = hashlib.sha256()
        for key, value in self.backbone.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self._features[name] = output
            if name == self._last_layer:
                raise _StopForward

        return hook

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw feature maps of the used layers, e.g. [B,512,28,28] and [B,1024,14,14] for 224 px."""
        self._features = {}
        images = images.to(self.device, memory_format=torch.channels_last if self.device.type == "cuda" else torch.contiguous_format)
        try:
            with torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp], enabled=self.amp != "none"):
                self.backbone(images)
        except _StopForward:
            pass
        return [self._features[name].float().contiguous() for name in self.layers]

    @torch.no_grad()
    def aggregate_patches(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Locally aware patch features (Eq. 1-2): [B, N, C], N = H*W of the largest map.

        1. each layer: average over the 3x3 neighbourhood of every position (stride 1,
           border positions average over their in-image neighbours only);
        2. deeper maps upsampled bilinearly to the largest map's grid (28x28 for 224 px);
        3. channels concatenated (512 + 1024 = 1536 for layer2 + layer3).
        """
        grid = max((f.shape[-2:] for f in features), key=lambda hw: hw[0] * hw[1])
        maps = []
        for f in features:
            f = F.avg_pool2d(f, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            maps.append(f)
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)

    def _patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        features = self.extract_features(images)
        grid = max((f.shape[-2:] for f in features), key=lambda hw: hw[0] * hw[1])
        return self.aggregate_patches(features), (int(grid[0]), int(grid[1]))

    # ------------------------------------------------------------------ memory bank
    @torch.no_grad()
    def fit(self, dataloader) -> None:
        """Build the memory bank from the normal training images (Sec. 3.2).

        Pass 1 keeps every patch's projected feature (N x coreset_proj_dim) for the coreset,
        and its full feature only while all of them fit in `feature_memory_gb`. Beyond that,
        pass 2 runs the images again and keeps just the selected patches, so memory grows
        with N x coreset_proj_dim, not N x 1536. Both ways give the same memory bank.
        """
        projected, full, full_bytes, projection = [], [], 0, None
        for batch in tqdm(dataloader, desc="features", unit="batch"):
            patches = self._patches(batch[0])[0].flatten(0, 1)  # [B*N, C]
            if projection is None:
                projection = self._coreset_projection(patches.shape[1])
            projected.append((patches if projection is None else patches @ projection).cpu())
            full_bytes += patches.numel() * patches.element_size()
            if full is not None and projection is not None:
                if full_bytes <= self.feature_memory_gb * 2**30:
                    full.append(patches.cpu())
                else:
                    full = None  # too big to keep: pass 2 will fetch the selected patches
        if not projected:
            raise ValueError("fit() got no training images")
        projected = torch.cat(projected)
        self.n_train_patches = projected.shape[0]
        selected = self._k_center_greedy(projected, self.coreset_ratio)
        if projection is None:
            self.set_memory_bank(projected[selected])
        elif full is not None:
            self.set_memory_bank(torch.cat(full)[selected])
        else:
            self.set_memory_bank(self._collect_patches(dataloader, selected))

    @torch.no_grad()
    def _collect_patches(self, dataloader, selected: torch.Tensor) -> torch.Tensor:
        """Pass 2: the full features of the patches at the `selected` global indices, in that order."""
        order = torch.argsort(selected)
        ordered = selected[order]
        bank, offset = None, 0
        for batch in tqdm(dataloader, desc="memory bank", unit="batch"):
            patches = self._patches(batch[0])[0].flatten(0, 1).cpu()
            lo, hi = (int(torch.searchsorted(ordered, v)) for v in (offset, offset + len(patches)))
            if bank is None:
                bank = torch.empty(len(selected), patches.shape[1])
            bank[order[lo:hi]] = patches[ordered[lo:hi] - offset]
            offset += len(patches)
        return bank

    def _coreset_projection(self, in_dim: int) -> torch.Tensor | None:
        """The seeded Gaussian projection for coreset selection, or None (coreset_proj_dim 0 or >= in_dim)."""
        if not 0 < self.coreset_proj_dim < in_dim:
            return None
        return random_projection(in_dim, self.coreset_proj_dim, torch.Generator().manual_seed(self.seed)).to(self.device)

    @torch.no_grad()
    def select_coreset(self, features: torch.Tensor, ratio: float) -> torch.Tensor:
        """k-center greedy coreset (Alg. 1) of [N, C] features: indices of floor(ratio * N) patches, at least 1.

        Distances are taken on the seeded random projection to `coreset_proj_dim` dims
        (Johnson-Lindenstrauss, Sec. 3.2); 0 keeps the full features.
        """
        x = features.to(self.device, torch.float32)
        projection = self._coreset_projection(x.shape[1])
        return self._k_center_greedy(x if projection is None else x @ projection, ratio)

    def _k_center_greedy(self, points: torch.Tensor, ratio: float) -> torch.Tensor:
        """Greedy k-center selection on `points`; the seeded random start is the first index returned."""
        n = points.shape[0]
        n_select = max(1, int(n * ratio))
        if n_select >= n:
            return torch.arange(n)
        start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(self.seed)))
        if self.device.type == "cpu":
            return k_center_greedy_pruned(points.float().contiguous(), n_select, start)
        return k_center_greedy_dense(points.to(self.device, torch.float32), n_select, start).cpu()

    def set_memory_bank(self, memory_bank: torch.Tensor) -> None:
        """Keep the memory bank and index it: faiss IndexFlatL2 on the CPU, or on the GPU when faiss
        has GPUs; on a GPU without faiss GPU support, an exact chunked torch search instead."""
        self.memory_bank = memory_bank.to(self.device, torch.float32).contiguous()
        self.index = None
        faiss_on_device = self.device.type == "cpu" or (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)
        if self.search == "torch" or (self.search == "auto" and not faiss_on_device):
            return  # nearest_neighbors uses exact_knn_torch
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(self.memory_bank.shape[1])
        index.add(self.memory_bank.cpu().numpy())
        if self.device.type == "cuda":
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, self.device.index or 0, index)
        self.index = index

    def nearest_neighbors(self, patches: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances [M, k] and memory-bank indices [M, k] of each patch's k nearest memory patches."""
        if self.memory_bank is None:
            raise RuntimeError("no memory bank: call fit() or set_memory_bank() first")
        if not 1 <= k <= len(self.memory_bank):
            raise ValueError(f"k={k} nearest neighbours asked for, but the memory bank has {len(self.memory_bank)}")
        if self.index is None:
            return exact_knn_torch(patches.to(self.device), self.memory_bank, k, self.search_precision)
        queries = np.ascontiguousarray(patches.detach().cpu().numpy(), dtype=np.float32)
        squared, indices = self.index.search(queries, k)  # faiss returns squared L2
        distances = torch.from_numpy(np.sqrt(np.maximum(squared, 0)))
        return distances.to(self.device), torch.from_numpy(indices).to(self.device)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [B] and anomaly maps [B, H, W] at the input resolution (Sec. 3.3)."""
        patches, (h, w) = self._patches(images)
        b, n, c = patches.shape
        distances, nearest = self.nearest_neighbors(patches.reshape(-1, c), k=1)
        patch_scores = distances[:, 0].reshape(b, n)  # Eq. 6: distance to the nearest memory patch
        if self.reweight_b:
            scores = self._reweighted_scores(patches, patch_scores, nearest[:, 0].reshape(b, n))
        else:
            scores = patch_scores.max(dim=1).values
        maps = F.interpolate(patch_scores.reshape(b, 1, h, w), size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.blur_sigma > 0:
            maps = gaussian_blur(maps, self.blur_sigma)
        return scores.cpu().numpy(), maps[:, 0].cpu().numpy()

    def _reweighted_scores(self, patches: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 7: s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*.

        m_test* is the image's highest-scoring patch, m* its nearest memory patch and
        N_b(m*) the b nearest memory patches of m* (m* itself among them).
        """
        rows = torch.arange(patches.shape[0], device=patches.device)
        s_star, worst = patch_scores.max(dim=1)
        m_test = patches[rows, worst]  # [B, C]
        m_star = self.memory_bank[nearest[rows, worst]]  # [B, C]
        _, support = self.nearest_neighbors(m_star, k=self.reweight_b)  # [B, b]
        d = torch.linalg.vector_norm(m_test[:, None, :] - self.memory_bank[support], dim=-1)  # [B, b]
        weight = 1 - torch.exp(s_star - torch.logsumexp(d, dim=1))
        return weight * s_star

    def config(self) -> dict:
        """What produced this model's memory bank; stored with it and checked on loading."""
        return {
            "backbone": self.backbone_name,
            "layers": list(self.layers),
            "weights": self.weights,
            "weights_spec": self.weights_spec,
            "backbone_sha256": self.backbone_sha256,
            "coreset_ratio": self.coreset_ratio,
            "coreset_proj_dim": self.coreset_proj_dim,
            "seed": self.seed,
            "feature_dim": self.feature_dim,
            "amp": self.amp,
        }
