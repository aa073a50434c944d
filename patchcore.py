"""PatchCore: "Towards Total Recall in Industrial Anomaly Detection" (Roth et al., CVPR 2022).

A frozen ImageNet CNN turns every image into a grid of locally aware patch features
(Sec. 3.1, Eq. 1-2). A greedy coreset of the features of all normal training images
is the memory bank (Sec. 3.2, Alg. 1). A test patch's anomaly score is the distance to
its nearest memory patch; the image score is the largest patch score (Sec. 3.3, Eq. 6-7).

PatchCoreConfig holds everything that decides a memory bank's content and how it is scored;
it is saved in the bank, and PatchCore.from_bank rebuilds the model from it. This file holds
the method and that round trip; no command line, and the file format lives in bank.py.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from bank import BankError, environment, load_bank, save_bank
from dataset import Preprocess

WEIGHT_CHOICES = ("imagenet", "auto", "none")  # or a path to a local state_dict file
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SEARCHES = ("auto", "faiss", "torch", "fast")
# candidates per query that TorchSearch re-ranks, by the precision of its product. On random-init WideResNet
# features one candidate found every nearest neighbour in every precision, on a coreset bank and on a dense one
# (benchmarks/benchmark.py --stages search [--search_bank dense]); these keep a margin, larger where the product
# has fewer bits, for features that could not be tried here. 32 instead of 1 costs about 7 % of the int8 search.
RERANK_CANDIDATES = {"fp32": 8, "fp16": 8, "int8": 32, "bf16": 128}
PROTOCOLS = ("paper", "official")
DEFAULT_CORESET_RATIO = {"paper": 0.25, "official": 0.1}  # the seed's 25 %; the released code's IM224 baseline, 10 %


@dataclass(frozen=True)
class PatchCoreConfig:
    """Everything that decides a memory bank's content and how it is scored.

    Stored whole in the bank; PatchCore.from_bank rebuilds the model with PatchCoreConfig(**saved).
    These defaults are the only ones: train.py's options are generated from these fields, with
    their help texts. How a run is executed (device, batch size, search) is not part of it.
    """

    protocol: str = field(
        default="paper",
        metadata={
            "help": "paper: the seed's 1536-d features and L2 distances (Eq. 6); official: the authors' released code "
            "(1024-d features, squared distances, scipy's blur, their masks); see docs/architecture.md"
        },
    )
    backbone: str = field(default="wide_resnet50_2", metadata={"help": "torchvision classification network"})
    layers: tuple[str, ...] = field(
        default=("layer2", "layer3"), metadata={"help": "backbone layers the patch features come from, comma list", "metavar": "LAYERS"}
    )
    weights: str = field(
        default="imagenet",
        metadata={
            "help": "imagenet, auto (imagenet, else random init with a warning), none (random init, tests only) or PATH to a state_dict"
        },
    )
    resize: int = field(default=256, metadata={"help": "shorter image side before the center crop"})
    image_size: int = field(default=224, metadata={"help": "center-crop size, the model's input"})
    crop: str = field(
        default="center",
        metadata={"help": "center: the paper's resize, then center crop; none: the whole image resized to image_size, borders kept"},
    )
    shots: int = field(default=0, metadata={"help": "few-shot: build the bank from this many training images, drawn with --seed; 0 = all"})
    coreset_ratio: float | None = field(
        default=None,
        metadata={"help": "fraction of the training patches kept in the memory bank", "default_text": "0.25 for paper, 0.1 for official"},
    )
    coreset_proj_dim: int = field(default=128, metadata={"help": "random-projection dims for the coreset distances, 0 = none"})
    seed: int = field(
        default=0,
        metadata={
            "help": "seed of the coreset's projection and start point, the few-shot draw, the calibration hold-out, random-init weights"
        },
    )
    amp: str = field(default="none", metadata={"help": "backbone autocast precision: none (fp32), bf16 or fp16"})
    reweight_b: int = field(
        default=0,
        metadata={"help": "image score: 0 = max patch score; b >= 2 = the paper's Eq. 7 reweighting with b neighbours (paper: 9)"},
    )
    blur_sigma: float = field(default=4.0, metadata={"help": "Gaussian sigma for smoothing anomaly maps, 0 = none"})
    calibration_holdout: float = field(
        default=0.2,
        metadata={"help": "fraction of train/good held out (drawn with --seed) to set thresholds on good images only; 0 = none"},
    )
    target_fpr: float = field(default=0.05, metadata={"help": "false-alarm rate the thresholds aim at on good parts"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # a list when read back from JSON
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be paper or official, got {self.protocol!r}")
        if self.coreset_ratio is None:
            object.__setattr__(self, "coreset_ratio", DEFAULT_CORESET_RATIO[self.protocol])
        official = self.protocol == "official"
        checks = [  # (holds, what to say when it does not)
            (bool(self.layers), "--layers must name at least one layer"),
            (  # --crop none resizes the whole image to image_size: resize plays no part then
                self.image_size > 0 and (self.crop == "none" or self.image_size <= self.resize),
                f"--image_size must be positive and at most --resize ({self.resize}), got {self.image_size}",
            ),
            (self.crop in ("center", "none"), f"--crop must be center or none, got {self.crop!r}"),
            (self.shots >= 0, f"--shots must be 0 (all images) or more, got {self.shots}"),
            (0 < self.coreset_ratio <= 1, f"--coreset_ratio must be in (0, 1], got {self.coreset_ratio}"),
            (self.coreset_proj_dim >= 0, f"--coreset_proj_dim must be 0 (no projection) or more, got {self.coreset_proj_dim}"),
            (self.amp in AMP_DTYPES, f"--amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}"),
            (self.reweight_b >= 0, f"--reweight_b must be 0 (max score) or at least 2, got {self.reweight_b}"),
            (self.reweight_b != 1, "--reweight_b 1 would score every image 0 (Eq. 7's weight is 1 - e^s/e^s): use 0 or b >= 2"),
            (self.blur_sigma >= 0, f"--blur_sigma must be 0 (off) or more, got {self.blur_sigma}"),
            (0 <= self.calibration_holdout < 1, f"--calibration_holdout must be in [0, 1), got {self.calibration_holdout}"),
            (0 < self.target_fpr < 1, f"--target_fpr must be in (0, 1), got {self.target_fpr}"),
            (not official or self.reweight_b == 0, "--reweight_b: the released code scores by the max; Eq. 7 is --protocol paper only"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}

    def preprocess(self) -> Preprocess:
        """Images (and masks, as the protocol defines them) on the model's input grid."""
        return Preprocess(self.resize, self.image_size, self.protocol, self.crop)


class WeightsError(RuntimeError):
    """The backbone weights asked for cannot be had."""


WARNED: set[str] = set()  # the warnings said in this process, each once


def _warn_once(message: str) -> None:
    if message not in WARNED:
        WARNED.add(message)
        print(f"WARNING: {message}", file=sys.stderr)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_supports(precision: str) -> bool:
    """Whether this CPU computes in `precision` natively: bf16 (AVX-512-BF16 or AMX-BF16), fp16 (AVX-512-FP16
    or AMX-FP16) or int8 (VNNI). Emulated low precision is slower than fp32, so it does not count."""
    needs = {"bf16": {"avx512_bf16", "amx_bf16"}, "fp16": {"avx512_fp16", "amx_fp16"}, "int8": {"avx512_vnni", "avx_vnni", "amx_int8"}}
    return bool(needs[precision] & cpu_flags())


def _visible_nvidia_gpu() -> str | None:
    """The first GPU nvidia-smi lists ('name, driver version'), or None when it is absent or lists none."""
    smi = shutil.which("nvidia-smi") or ("/usr/lib/wsl/lib/nvidia-smi" if Path("/usr/lib/wsl/lib/nvidia-smi").is_file() else None)
    if smi is None:
        return None
    try:
        listed = subprocess.run(
            [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = listed.stdout.strip().splitlines()
    return lines[0].strip() if listed.returncode == 0 and lines else None


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when torch can use a GPU, else cpu (saying why, when an NVIDIA GPU is there
    but torch cannot use it); 'cuda' without CUDA is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        gpu = _visible_nvidia_gpu()
        if gpu:
            cuda = torch.version.cuda
            why = (
                f"this torch {torch.__version__} is built for CUDA {cuda}, which needs a newer NVIDIA driver (CUDA 13 needs 580 or newer, "
                f"CUDA 12 needs 525 or newer): update the driver, or install a torch build for your driver's CUDA "
                f"(e.g. pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126)"
                if cuda
                else f"this torch {torch.__version__} is a CPU-only build: install a CUDA build of torch"
            )
            _warn_once(f"an NVIDIA GPU is visible ({gpu}) but torch cannot use it; running on the CPU. {why}")
        return torch.device("cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device '{device}': use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but this torch build sees no CUDA GPU: use --device cpu")
    return torch.device(device)


def load_backbone(name: str, weights: str, seed: int) -> tuple[torch.nn.Module, str, str]:
    """Build a torchvision classification network with the weights asked for.

    weights: 'imagenet' (torchvision's IMAGENET1K_V1, downloaded and cached), 'none'
    (random init from `seed`, for tests), 'auto' (imagenet, else random init with a
    warning) or a path to a local state_dict file (loaded by PatchCore).
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


def available_memory_bytes() -> int | None:
    """RAM the system can give without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_feature_memory_gb() -> float:
    """fit()'s default budget for holding all full patch features: half the available RAM."""
    available = available_memory_bytes()
    if available is None:
        _warn_once("could not read the available memory; fit keeps full features up to 8 GB (set --feature_memory_gb)")
        return 8.0
    return round(available / 2**30 / 2, 1)


def random_projection(in_dim: int, out_dim: int, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian [in_dim, out_dim] matrix scaled by 1/sqrt(out_dim): distances are kept in expectation."""
    return torch.randn(in_dim, out_dim, generator=generator) / math.sqrt(out_dim)


def squared_distances(points: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """||p - c||^2 for every row p. Both greedy variants use exactly this arithmetic, so their
    float32 distances, and therefore their selections, agree bit for bit."""
    return ((points - center) ** 2).sum(1)


def squared_distances_blocked(points: torch.Tensor, center: torch.Tensor, rows: np.ndarray | None = None, block: int = 16384) -> np.ndarray:
    """squared_distances of all points, or of the points at `rows`, `block` rows at a time, so
    that no N x D temporary exists; each row's arithmetic is the same, so is every value."""
    n = len(points) if rows is None else len(rows)
    out = np.empty(n, np.float32)
    for lo in range(0, n, block):
        part = points[lo : lo + block] if rows is None else torch.from_numpy(points.numpy()[rows[lo : lo + block]])
        out[lo : lo + block] = squared_distances(part, center).numpy()
    return out


def nearest_center(points: torch.Tensor, centers: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance (float32) of every point to its nearest center, and that center's index; computed
    in float64 as ||p||^2 - 2 p.c + ||c||^2 in row blocks, so it is exact to float32 rounding."""
    centers64 = centers.double()
    centers_sq = (centers64**2).sum(1)
    best, which = [], []
    for block in points.split(rows):
        block64 = block.double()
        d = ((block64**2).sum(1, keepdim=True) - 2 * block64 @ centers64.T + centers_sq).clamp_min(0)
        value, index = d.min(1)
        best.append(value.float())
        which.append(index)
    return torch.cat(best), torch.cat(which)


def _greedy_start(points: torch.Tensor, start: int | None, existing: torch.Tensor | None) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The picks made before the loop, every point's squared distance to the nearest of the selected set, and
    which one that is: a fresh run starts at `start`; a grown bank starts from the `existing` centers (no pick yet)."""
    if existing is None:
        group = torch.zeros(len(points), dtype=torch.long, device=points.device)
        if points.device.type == "cpu":  # in row blocks: no N x D temporaries
            return [start], torch.from_numpy(squared_distances_blocked(points, points[start])), group
        return [start], squared_distances(points, points[start]), group
    return [], *nearest_center(points, existing.to(points.device, torch.float32))


def k_center_greedy_dense(
    points: torch.Tensor, n_select: int, start: int | None = None, existing: torch.Tensor | None = None, block: int = 64
) -> torch.Tensor:
    """Alg. 1 as one vectorised update per iteration: O(N x D) work each, no host sync (the GPU path).

    Picks n_select points, the first being `start`; or, to grow a bank, n_select more points
    after the `existing` centers. On CUDA, `block` iterations are captured once as a CUDA graph
    and replayed, so the per-iteration kernel-launch overhead goes; elsewhere the same step runs eagerly.
    """
    first, min_dist, _ = _greedy_start(points, start, existing)  # squared distance to the nearest selected point
    selected = torch.empty(n_select, dtype=torch.long, device=points.device)
    selected[: len(first)] = torch.tensor(first, dtype=torch.long)
    position = torch.full((1,), len(first), dtype=torch.long, device=points.device)  # where the next index goes

    def step() -> None:
        farthest = torch.argmax(min_dist).view(1)  # first index among ties
        selected.index_copy_(0, position, farthest)
        torch.minimum(min_dist, squared_distances(points, points[farthest]), out=min_dist)
        position.add_(1)

    remaining = n_select - len(first)
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


def k_center_greedy_pruned(
    points: torch.Tensor, n_select: int, start: int | None = None, existing: torch.Tensor | None = None, n_pivots: int = 16
) -> torch.Tensor:
    """Alg. 1, exactly, touching only the points a new center can get closer to (the CPU path).

    Every point belongs to its nearest center j (a list of members per center), and r_j is
    the largest distance in j's group. A new center c can only come closer to points of
    group j if d(j, c) < 2 r_j (triangle inequality), so other groups are skipped. d(j, c)
    itself is first bounded from below through pivot centers, |d(k, j) - d(k, c)| <= d(j, c):
    4 pivots for every center, the other 12 for those that pass, so that most centers are
    ruled out without a full distance. A slack of 1e-4 of the data's scale on the bounds
    covers float32 rounding. Same selection as k_center_greedy_dense, with the same `start`
    or `existing` centers; returns the n_select picks.
    """
    n, dim = points.shape
    x = points.numpy()

    def center_distances(a: np.ndarray, c: np.ndarray) -> np.ndarray:  # for the bounds only
        diff = a - c
        return np.sqrt(np.einsum("ij,ij->i", diff, diff))

    first, min_dist, group = _greedy_start(points, start, existing)
    min_dist, group = min_dist.numpy(), group.numpy()
    initial = x[first] if existing is None else existing.numpy().astype(np.float32)
    k0 = len(initial)  # centers before the loop: the start point, or the existing bank
    size = k0 + n_select - len(first)
    centers = np.empty((size, dim), np.float32)
    centers[:k0] = initial
    members = np.split(np.argsort(group, kind="stable"), np.cumsum(np.bincount(group, minlength=k0))[:-1]) + [None] * (size - k0)
    radius = np.zeros(size, np.float32)  # r_j, exact for every group
    np.maximum.at(radius, group, np.sqrt(min_dist))
    slack = 1e-4 * float(np.sqrt(min_dist.max())) + 1e-12
    bound = 2 * radius + slack  # how close a new center must come to center j to touch j's group
    pivot_of = list(range(min(n_pivots, k0)))  # the first centers serve as pivots, up to n_pivots
    pivot_dist = np.zeros((n_pivots, size), np.float32)  # d(pivot k, center j)
    for k, j in enumerate(pivot_of):
        pivot_dist[k, :k0] = center_distances(centers[:k0], centers[j])
    scratch = np.empty((4, size), np.float32)
    selected = np.empty(n_select, np.int64)
    selected[: len(first)] = first
    for i in tqdm(range(k0, size), desc="coreset", unit="pt", mininterval=1.0):
        farthest = int(np.argmax(min_dist))  # first index among ties
        c = x[farthest]
        selected[i - k0 + len(first)], centers[i] = farthest, c
        if len(pivot_of) < n_pivots:  # the new center becomes a pivot
            pivot_dist[len(pivot_of), : i + 1] = center_distances(centers[: i + 1], c)
            pivot_of.append(i)
        pivots = len(pivot_of)
        to_pivots = center_distances(centers[pivot_of], c)
        pivot_dist[:pivots, i] = to_pivots
        lower = scratch[: min(pivots, 4), :i]  # the bound through the first 4 pivots, for every center
        np.abs(np.subtract(pivot_dist[: len(lower), :i], to_pivots[: len(lower), None], out=lower), out=lower)
        maybe = np.flatnonzero(lower.max(0) < bound[:i])
        if pivots > len(lower) and len(maybe):  # through the other pivots, for the centers still in question
            maybe = maybe[np.abs(pivot_dist[len(lower) : pivots, maybe] - to_pivots[len(lower) :, None]).max(0) < bound[maybe]]
        near = maybe[center_distances(centers[maybe], c) < bound[maybe]]
        parts = [members[j] for j in near]
        touched = np.concatenate(parts) if parts else np.empty(0, np.int64)
        if len(touched) > n // 4:  # little to prune (early on, or data without cluster structure): one dense pass
            dist = squared_distances_blocked(points, points[farthest])[touched]
        else:
            dist = squared_distances_blocked(points, points[farthest], touched)
        closer = dist < min_dist[touched]
        min_dist[touched[closer]] = dist[closer]
        members[i] = touched[closer]
        # the touched groups keep the points that stayed; their radii are recomputed from those
        stay = ~closer
        counts = np.add.reduceat(stay, np.cumsum([0] + [len(p) for p in parts[:-1]])) if parts else np.zeros(0, np.int64)
        kept = touched[stay]
        for j, part in zip(near, np.split(kept, np.cumsum(counts)[:-1])):
            members[j] = part
        radius[near] = 0
        if len(kept):  # kept is ordered by group: one maximum per non-empty group
            filled = counts > 0
            radius[near[filled]] = np.maximum.reduceat(np.sqrt(min_dist[kept]), (np.cumsum(counts) - counts)[filled])
        radius[i] = np.sqrt(min_dist[members[i]].max()) if len(members[i]) else 0
        bound[near], bound[i] = 2 * radius[near] + slack, 2 * radius[i] + slack
    return torch.from_numpy(selected)


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, d] as int8 with one scale per row (its largest magnitude / 127): x ~ scale[:, None] * int8."""
    scale = x.abs().amax(1).clamp_min(1e-12) / 127
    return (x / scale[:, None]).round_().to(torch.int8), scale


class TorchSearch:
    """k nearest bank rows in torch: candidates from a product in `precision`, re-ranked exactly in fp32.

    The `candidates` nearest rows are found by ||q||^2 - 2 q.m + ||m||^2 on features centred on
    the bank's mean (distances do not change, the terms shrink: 4x smaller norms on WideResNet
    features), with the cross term in 'fp32', or in low precision: 'fp16' (the GPU's fast path),
    'int8' with one scale per row (the CPU's, with VNNI), or 'bf16' (measured, not used: it needs
    128 candidates). Their distances are then recomputed exactly in fp32 from the features,
    ||q - m||^2, and ranked: the result is the exact nearest neighbour whenever the true one is
    among the candidates, which the expansion alone misses on near-ties even in fp32.
    """

    def __init__(self, bank: torch.Tensor, precision: str = "fp32", candidates: int | None = None) -> None:
        self.bank, self.precision = bank.float(), precision
        self.candidates = candidates or RERANK_CANDIDATES[precision]
        self.mean = self.bank.mean(0)
        centered = self.bank - self.mean
        self.centered_sq = (centered**2).sum(1)
        if precision == "int8":
            self.low, self.scale = _int8_rows(centered)
        else:
            self.low = centered.to(AMP_DTYPES.get(precision) or torch.float32)

    def search(self, queries: torch.Tensor, k: int, squared: bool = False, block_bytes: int = 2**28) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances (squared ones if asked) and bank indices, each [M, k]. Queries go in chunks whose
        largest temporary (the distance block, or one candidate's difference rows) stays under `block_bytes`."""
        n_candidates = min(len(self.bank), max(self.candidates, k))
        rows = max(1, block_bytes // (4 * max(len(self.bank), self.bank.shape[1])))  # query rows per chunk
        distances, indices = [], []
        for q in queries.split(rows):
            q = q.float()
            centered = q - self.mean
            if self.precision == "int8":
                q_low, q_scale = _int8_rows(centered)
                cross = torch._int_mm(q_low, self.low.T).float().mul_(q_scale[:, None]).mul_(self.scale)
            else:
                cross = (centered.to(self.low.dtype) @ self.low.T).float()
            d2 = cross.mul_(-2).add_(self.centered_sq).add_((centered**2).sum(1, keepdim=True))
            index = d2.topk(n_candidates, dim=1, largest=False).indices
            exact = torch.stack([((q - self.bank[index[:, j]]) ** 2).sum(1) for j in range(n_candidates)], dim=1)
            value, order = exact.topk(k, dim=1, largest=False)  # the exact re-rank
            distances.append(value if squared else value.sqrt())
            indices.append(index.gather(1, order))
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


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An [H, W] anomaly map resized bilinearly to size (width, height), e.g. back onto the original image."""
    tensor = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=(size[1], size[0]), mode="bilinear", align_corners=False)[0, 0].numpy()


def _largest_grid(features: list[torch.Tensor]) -> tuple[int, int]:
    """(h, w) of the largest feature map: the patch grid (28 x 28 for layer2 at 224 px)."""
    return max((tuple(int(v) for v in f.shape[-2:]) for f in features), key=lambda hw: hw[0] * hw[1])


class _StopForward(Exception):
    """Raised by the hook of the deepest used layer: the rest of the network never runs."""


def _gather_rows(chunks: Iterable[torch.Tensor], wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For each name, the rows at its global indices (into the chunks laid end to end), in that
    order, taken chunk by chunk: the chunks are never concatenated, and each can be freed once read."""
    plans = {name: (order := torch.argsort(rows), rows[order]) for name, rows in wanted.items()}
    out, offset = {}, 0
    for chunk in chunks:
        for name, (order, ordered) in plans.items():
            lo, hi = (int(torch.searchsorted(ordered, v)) for v in (offset, offset + len(chunk)))
            if name not in out:
                out[name] = torch.empty(len(ordered), chunk.shape[1])
            out[name][order[lo:hi]] = chunk[ordered[lo:hi] - offset]
        offset += len(chunk)
    return out


def _image_rows(images: list[int], per_image: int) -> torch.Tensor:
    """The patch rows of these images, when every image gives per_image rows in order."""
    return (torch.tensor(images, dtype=torch.long)[:, None] * per_image + torch.arange(per_image)).flatten()


def _conformal_threshold(scores: np.ndarray, target: float) -> tuple[float, float]:
    """The smallest held-out score t such that a new good score, exchangeable with the n held-out ones, is
    >= t with probability at most `target`: the k-th smallest, k = ceil((n + 1)(1 - target)). Returns
    (t, its false-alarm rate (n + 1 - k) / (n + 1)); with too few scores, k = n: the largest, 1 / (n + 1)."""
    n = len(scores)
    k = min(n, math.ceil((n + 1) * (1 - target) - 1e-9))
    return float(np.sort(scores)[k - 1]), (n + 1 - k) / (n + 1)


def calibrate(scores: np.ndarray, map_peaks: np.ndarray, map_low: float, target_fpr: float) -> dict:
    """Thresholds from good images only: the image scores [n] of held-out good images, each one's
    anomaly-map maximum [n], and the smallest map value of them all.

    image threshold: split-conformal on the image scores, so that a new good part is called
    defective with probability at most target_fpr; pixel threshold: the same on the map maxima,
    so that a good part shows no predicted region with probability at least 1 - target_fpr.
    A target finer than 1 / (n + 1) cannot be met with n images: the thresholds are then the
    largest held-out values, and `expected_fpr` says what they give.
    """
    image, image_rate = _conformal_threshold(scores, target_fpr)
    pixel, _ = _conformal_threshold(map_peaks, target_fpr)

    def stats(values: np.ndarray) -> dict:
        q = np.quantile(values, [0.5, 0.9, 0.95, 0.99])
        return {"min": float(values.min()), "mean": float(values.mean()), "std": float(values.std()), "median": float(q[0]),
                "q90": float(q[1]), "q95": float(q[2]), "q99": float(q[3]), "max": float(values.max())}  # fmt: skip

    return {
        "method": "split conformal on held-out good images (k-th smallest score, k = ceil((n + 1)(1 - target_fpr)))",
        "target_fpr": target_fpr,
        "expected_fpr": image_rate,
        "n_held_out": len(scores),
        "image_threshold": image,
        "pixel_threshold": pixel,
        "heatmap_scale": [float(map_low), 2 * pixel - float(map_low)],  # the pixel threshold in the middle of the colour bar
        "held_out_image_scores": stats(scores),
        "held_out_map_maxima": stats(map_peaks),
    }


class PatchCore:
    """The method, built from a PatchCoreConfig; `device` and `search` only decide how it runs.
    PatchCore(weights="none", seed=3) is PatchCore(PatchCoreConfig(weights="none", seed=3)).

    search: 'faiss' (IndexFlatL2, exact fp32, on the GPU when faiss has GPUs); 'torch' (TorchSearch:
    fp32 candidates re-ranked exactly); 'fast' (the same with candidates from a low-precision
    product: int8 on a CPU with VNNI, fp16 on a GPU); or 'auto': fast on such a CPU, else faiss
    where it runs on the device, else torch. Fields given beside a config replace its values;
    protocol-dependent defaults (the coreset ratio) resolve when a config is built, not then.
    """

    def __init__(self, config: PatchCoreConfig | None = None, *, device: str = "auto", search: str = "auto", **fields) -> None:
        config = PatchCoreConfig(**fields) if config is None else dataclasses.replace(config, **fields)
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
        self.device = resolve_device(device)
        self.search, self.low_precision = self._resolve_search(search)
        self.amp = self._resolve_amp(config.amp)
        network, weights_spec, self.weights = load_backbone(config.backbone, config.weights, config.seed)
        self.config = dataclasses.replace(config, weights=weights_spec)  # 'auto' resolved: the bank records what was used
        self.backbone = self._cut_after_last_layer(network)
        if weights_spec not in WEIGHT_CHOICES:
            self._load_state_dict_file(weights_spec)
        self.backbone_sha256 = self._fingerprint()
        self.backbone.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda":  # NHWC convolutions run faster on tensor cores
            self.backbone.to(memory_format=torch.channels_last)

        # feature_extractor: forward hooks collect the used layers' outputs.
        self._features: dict[str, torch.Tensor] = {}
        for name in self.config.layers:
            getattr(self.backbone, name).register_forward_hook(self._hook(name))

        probe = self.extract_features(torch.zeros(1, 3, self.config.image_size, self.config.image_size))
        if self.config.protocol == "official":
            widths = [f.shape[1] for f in probe]
            if widths != [512, 1024]:
                raise ValueError(
                    f"--protocol official reproduces the released code's baseline, whose two layers have 512 and 1024 "
                    f"channels (wide_resnet50_2 layer2,layer3); {self.config.backbone} {list(self.config.layers)} have {widths}"
                )
            self._official_batchnorm_update()
        self.grid = _largest_grid(probe)
        self.patches_per_image = self.grid[0] * self.grid[1]
        self.feature_dim = self.aggregate_patches(probe).shape[-1]  # 1536 (paper), 1024 (official)
        self.memory_bank: torch.Tensor | None = None  # [M, C] coreset of training patch features
        self.calibration: dict = {"reason": "no memory bank yet"}  # thresholds set on held-out good images (calibrate)
        self.index = None  # over the memory bank: a faiss index, or a TorchSearch

    def _resolve_search(self, search: str) -> tuple[str, str | None]:
        """(the search that runs: faiss, torch or fast; the fast search's low precision)."""
        cuda = self.device.type == "cuda"
        faiss_here = not cuda or (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)
        low = "fp16" if cuda else "int8" if cpu_supports("int8") else None
        if search == "faiss" and not faiss_here:
            raise ValueError("--search faiss: this faiss build has no GPU support; use --search torch or fast, or --device cpu")
        if search == "fast" and low is None:
            _warn_once("--search fast: this CPU has no native int8 product (VNNI), so low precision would be slower than fp32; "
                       "running the fp32 torch search")  # fmt: skip
            return "torch", None
        if search == "auto":
            search = "fast" if low and not cuda else "faiss" if faiss_here else "torch"
        return search, low if search == "fast" else None

    def _resolve_amp(self, amp: str) -> str:
        """The backbone precision that runs: the config's, where the device computes it natively, else fp32."""
        if amp == "none":
            return amp
        supported = (
            torch.cuda.is_bf16_supported()
            if self.device.type == "cuda" and amp == "bf16"
            else self.device.type == "cuda" or cpu_supports(amp)
        )
        if not supported:
            _warn_once(f"--amp {amp}: this {self.device.type.upper()} has no native {amp}; the backbone runs in fp32, which is faster here")
            return "none"
        return amp

    # ------------------------------------------------------------------ backbone
    def _cut_after_last_layer(self, network: torch.nn.Module) -> torch.nn.Module:
        """Replace every child after the deepest used layer by Identity (layer4, avgpool, fc)."""
        names = [name for name, _ in network.named_children()]
        unknown = [layer for layer in self.config.layers if layer not in names]
        if unknown:
            raise ValueError(f"{self.config.backbone} has no layer(s) {unknown}; it has {names}")
        self._last_layer = max(self.config.layers, key=names.index)
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
        names = [name for name, _ in self.backbone.named_children()]
        dropped = tuple(name + "." for name in names[names.index(self._last_layer) + 1 :])
        state = {k: v for k, v in state.items() if k in used or not k.startswith(dropped)}
        missing, unexpected = sorted(set(used) - set(state)), sorted(set(state) - set(used))
        if missing or unexpected:
            example = f"'{(missing or unexpected)[0]}'"
            raise WeightsError(
                f"--weights {path}: not a state_dict of {self.config.backbone} ({len(missing)} missing keys, {len(unexpected)} "
                f"unexpected, e.g. {example}); use torchvision's {self.config.backbone} checkpoint"
            )
        try:
            self.backbone.load_state_dict(state, strict=True)
        except RuntimeError as err:  # right keys, wrong shapes
            raise WeightsError(
                f"--weights {path}: not a state_dict of {self.config.backbone} ({str(err).splitlines()[-1].strip()})"
            ) from err

    def _fingerprint(self) -> str:
        """sha256 of the used backbone weights: evaluation checks it equals training's."""
        digest = hashlib.sha256()
        for key, value in self.backbone.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def _official_batchnorm_update(self) -> None:
        """As the released code does while it builds its model: it pushes one all-ones image through
        the backbone, still in train mode, to read the feature widths, so every BatchNorm up to the
        last used layer updates its running statistics once (momentum 0.1) before any image is seen.
        Reproduced because it changes every feature (docs/architecture.md)."""
        side = self.config.image_size
        self.backbone.train()
        try:
            self.backbone(torch.ones(1, 3, side, side, device=self.device))
        except _StopForward:
            pass
        self.backbone.eval()

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
        return [self._features[name].float().contiguous() for name in self.config.layers]

    @torch.no_grad()
    def aggregate_patches(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Locally aware patch features (Eq. 1-2): [B, N, C], N = H*W of the largest map.

        1. each layer: average over the 3x3 neighbourhood of every position (stride 1,
           border positions average over their in-image neighbours only);
        2. deeper maps upsampled bilinearly to the largest map's grid (28x28 for 224 px);
        3. channels concatenated (512 + 1024 = 1536 for layer2 + layer3).
        """
        if self.config.protocol == "official":
            return self._official_patches(features)
        grid = _largest_grid(features)
        maps = []
        for f in features:
            f = F.avg_pool2d(f, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            maps.append(f)
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)

    @staticmethod
    def _official_patches(features: list[torch.Tensor]) -> torch.Tensor:
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
        near2 = (F.avg_pool2d(layer2, 3, stride=1, padding=1, divisor_override=1) + layer2) / 10
        pairs = (layer3[:, 0::2] + layer3[:, 1::2]) / 2
        near3 = F.avg_pool2d(pairs, 3, stride=1, padding=1, count_include_pad=True)
        near3 = F.interpolate(near3, size=layer2.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([near2, near3], dim=1).flatten(2).transpose(1, 2)

    def _patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, N, C] patch features and their grid (h, w)."""
        features = self.extract_features(images)
        return self.aggregate_patches(features), _largest_grid(features)

    # ------------------------------------------------------------------ memory bank
    def _features_pass(self, dataloader, n_images: int, feature_memory_gb: float | None) -> tuple[torch.Tensor, list | None, str]:
        """Pass 1 over the images: every patch's projected feature for the coreset ([N, coreset_proj_dim]),
        and, when all full features fit in `feature_memory_gb` (default: half the available RAM), those
        too, as the per-batch chunks they arrive in, never concatenated. Returns (projected, chunks or None, what was kept)."""
        budget = (default_feature_memory_gb() if feature_memory_gb is None else feature_memory_gb) * 2**30
        n_patches, dim = n_images * self.patches_per_image, self.feature_dim
        projection = self.coreset_projection(dim)
        projected = torch.empty(n_patches, dim if projection is None else projection.shape[1])
        chunks, size = None, f"{n_patches:,} patch features ({n_patches * dim * 4 / 2**30:.2f} GB)"
        if projection is None:
            path = f"one pass: the coreset runs on all {size} at full width (--coreset_proj_dim 0)"
        elif n_patches * dim * 4 <= budget:
            chunks = []
            path = f"one pass: all {size} stay in RAM (--feature_memory_gb {budget / 2**30:g})"
        else:
            path = (
                f"two passes: {size} exceed --feature_memory_gb {budget / 2**30:g}; keeping {projected.shape[1]}-d "
                "projections, then running the images again for the selected patches"
            )
        print(f"fit: {path}", flush=True)
        offset = 0
        for batch in tqdm(dataloader, desc="features", unit="batch"):
            patches, grid = self._patches(batch[0])
            if grid != self.grid:
                raise ValueError(f"fit() needs images of image_size {self.config.image_size} px (a {self.grid} patch grid), got {grid}")
            patches = patches.flatten(0, 1)  # [B*N, C]
            projected[offset : offset + len(patches)] = (patches if projection is None else patches @ projection).cpu()
            if chunks is not None:
                chunks.append(patches.cpu())
            offset += len(patches)
        if offset != len(projected):
            raise ValueError(f"the dataloader gave {offset // self.patches_per_image} images, its dataset's length {n_images}")
        if projection is None:
            chunks = [projected]  # the full features themselves
        return projected, chunks, path.split(":")[0]

    def _full_features(self, chunks: list | None, dataloader):
        """The full features' chunks in order: the kept ones, each released once taken, or a second pass."""
        if chunks is not None:
            return (chunks.pop(0) for _ in range(len(chunks)))
        return (self._patches(b[0])[0].flatten(0, 1).cpu() for b in tqdm(dataloader, desc="memory bank", unit="batch"))

    def holdout_images(self, n_images: int) -> list[int]:
        """The training images held out for calibration: round(calibration_holdout * n), drawn with the
        seed (a stream apart from the few-shot draw); none when that leaves no image on either side."""
        k = round(self.config.calibration_holdout * n_images)
        if k < 1 or k >= n_images:
            return []
        return sorted(np.random.default_rng([self.config.seed, 1]).choice(n_images, k, replace=False).tolist())

    @torch.no_grad()
    def fit(self, dataloader, feature_memory_gb: float | None = None) -> dict:
        """Build the memory bank from the normal training images (Sec. 3.2); returns counts.

        Pass 1 (_features_pass) keeps the projected features, and the full ones when they fit;
        the selected rows are then taken from the kept chunks, or from a second pass. Both ways
        give the same memory bank. With calibration_holdout > 0, a seeded part of the images is
        also left out of a second coreset; their scores against it set `self.calibration`'s
        thresholds (calibrate); the saved bank holds every image, as the paper's does.
        """
        n_images = len(dataloader.dataset)
        if n_images == 0:
            raise ValueError("fit() got no training images")
        per_image = self.patches_per_image
        self._check_reweight_b(self.bank_size(n_images * per_image))
        held_out = self.holdout_images(n_images)
        if held_out:  # the calibration bank is the smaller one
            self._check_reweight_b(self.bank_size((n_images - len(held_out)) * per_image))
        projected, chunks, path = self._features_pass(dataloader, n_images, feature_memory_gb)
        wanted = {"bank": self.k_center_greedy(projected)}
        if held_out:
            kept = _image_rows(sorted(set(range(n_images)) - set(held_out)), per_image)
            wanted["calibration bank"] = kept[self.k_center_greedy(projected[kept])]
            if chunks is not None:
                wanted["held out"] = _image_rows(held_out, per_image)
        del projected
        rows = _gather_rows(self._full_features(chunks, dataloader), wanted)
        if self.config.calibration_holdout == 0:
            self.calibration = {"reason": "calibration off (--calibration_holdout 0): no thresholds"}
        elif not held_out:
            self.calibration = {
                "reason": f"too few training images ({n_images}) to hold out a share of {self.config.calibration_holdout:g} "
                "for calibration: no thresholds stored; decide with evaluate.py --threshold"
            }
        if held_out:
            self.set_memory_bank(rows.pop("calibration bank"))
            if "held out" in rows:
                patches = rows.pop("held out").view(len(held_out), per_image, -1)
                scored = (self._score(part.to(self.device), self.grid, (self.config.image_size,) * 2) for part in patches.split(16))
            else:  # the full features were not kept: run the held-out images again
                subset = torch.utils.data.Subset(dataloader.dataset, held_out)
                loader = torch.utils.data.DataLoader(subset, batch_size=dataloader.batch_size, num_workers=dataloader.num_workers)
                scored = (self.predict(batch[0]) for batch in tqdm(loader, desc="calibration", unit="batch"))
            # of each batch's maps, only what calibrate() needs: their maxima and the smallest value
            summary = [(scores, maps.reshape(len(maps), -1).max(1), maps.min()) for scores, maps in scored]
            scores, peaks, lows = zip(*summary)
            self.calibration = calibrate(np.concatenate(scores), np.concatenate(peaks), min(lows), self.config.target_fpr)
        self.set_memory_bank(rows["bank"])
        facts = {"n_images": n_images, "n_patches": n_images * per_image, "memory_bank_size": len(rows["bank"]), "fit": path}
        return {**facts, "held_out": held_out}

    @torch.no_grad()
    def add(self, dataloader, feature_memory_gb: float | None = None) -> dict:
        """Grow the memory bank with newly confirmed good images: Alg. 1 goes on with the bank as the
        already-selected set. Each new patch starts at its distance to the nearest bank patch (in the
        coreset's projection), and bank_size(new patches) greedy picks are added. The thresholds stay:
        more good patches can only lower scores, so they become conservative."""
        if self.memory_bank is None:
            raise RuntimeError("no memory bank to grow: fit() or from_bank() first")
        n_images = len(dataloader.dataset)
        if n_images == 0:
            raise ValueError("add() got no images")
        projected, chunks, path = self._features_pass(dataloader, n_images, feature_memory_gb)
        projection = self.coreset_projection(self.feature_dim)
        existing = self.memory_bank.cpu() if projection is None else self.memory_bank.cpu() @ projection.cpu()
        picked = self.k_center_greedy(projected, existing=existing)
        del projected
        new_rows = _gather_rows(self._full_features(chunks, dataloader), {"new": picked})["new"]
        old = len(self.memory_bank)
        self.set_memory_bank(torch.cat([self.memory_bank.cpu(), new_rows]))
        if self.calibration.get("image_threshold") is not None:
            self.calibration["note"] = (
                f"kept after adding {n_images} good images: more good patches can only lower scores, so these thresholds are conservative"
            )
        return {"n_images": n_images, "n_patches": n_images * self.patches_per_image, "added": len(picked),
                "memory_bank_size": len(self.memory_bank), "previous_size": old, "fit": path}  # fmt: skip

    def coreset_projection(self, in_dim: int) -> torch.Tensor | None:
        """The seeded Gaussian projection for coreset selection, or None (coreset_proj_dim 0 or >= in_dim)."""
        out_dim = self.config.coreset_proj_dim
        if not 0 < out_dim < in_dim:
            return None
        return random_projection(in_dim, out_dim, torch.Generator().manual_seed(self.config.seed)).to(self.device)

    @torch.no_grad()
    def select_coreset(self, features: torch.Tensor) -> torch.Tensor:
        """k-center greedy coreset (Alg. 1) of [N, C] features: indices of floor(coreset_ratio * N) patches, at least 1.

        Distances are taken on the seeded random projection to `coreset_proj_dim` dims
        (Johnson-Lindenstrauss, Sec. 3.2); 0 keeps the full features.
        """
        x = features.to(self.device, torch.float32)
        projection = self.coreset_projection(x.shape[1])
        return self.k_center_greedy(x if projection is None else x @ projection)

    def bank_size(self, n_patches: int) -> int:
        """floor(coreset_ratio * N), at least 1."""
        return max(1, int(n_patches * self.config.coreset_ratio))

    def _check_reweight_b(self, bank_size: int) -> None:
        if self.config.reweight_b > bank_size:
            raise ValueError(
                f"--reweight_b {self.config.reweight_b} is larger than the memory bank ({bank_size} patches): "
                "use a smaller --reweight_b or a larger --coreset_ratio"
            )

    def k_center_greedy(self, points: torch.Tensor, existing: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy k-center selection (Alg. 1) of bank_size(N) of the (projected) `points`: the pruned
        exact loop on a CPU, the dense CUDA-graph loop on a GPU. A fresh selection starts at the
        seeded random start, the first index returned; with `existing` centers (a bank being
        grown), every point starts at its distance to the nearest of them."""
        n = points.shape[0]
        n_select = self.bank_size(n)
        if n_select >= n:
            return torch.arange(n)
        start = None if existing is not None else int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(self.config.seed)))
        if self.device.type == "cpu":
            return k_center_greedy_pruned(points.cpu().float().contiguous(), n_select, start, existing)
        return k_center_greedy_dense(points.to(self.device, torch.float32), n_select, start, existing).cpu()

    def set_memory_bank(self, memory_bank: torch.Tensor) -> None:
        """Keep the memory bank and index it for the search that runs."""
        self._check_reweight_b(len(memory_bank))
        self.memory_bank = memory_bank.to(self.device, torch.float32).contiguous()
        if self.search != "faiss":
            self.index = TorchSearch(self.memory_bank, self.low_precision or "fp32")
            return
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(self.memory_bank.shape[1])
        index.add(self.memory_bank.cpu().numpy())
        if self.device.type == "cuda":
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, self.device.index or 0, index)
        self.index = index

    def search_name(self) -> str:
        """Which nearest-neighbour search runs, for the outputs."""
        if self.search == "faiss":
            return f"faiss {type(self.index).__name__}, exact fp32"
        return f"torch, {self.index.precision} candidates ({self.index.candidates} per patch) re-ranked exactly in fp32"

    def nearest_neighbors(self, patches: torch.Tensor, k: int, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances [M, k] (squared ones if asked) and memory-bank indices [M, k] of each patch's k nearest memory patches."""
        if self.memory_bank is None:
            raise RuntimeError("no memory bank: call fit() or set_memory_bank() first")
        if not 1 <= k <= len(self.memory_bank):
            raise ValueError(f"k={k} nearest neighbours asked for, but the memory bank has {len(self.memory_bank)}")
        if isinstance(self.index, TorchSearch):
            return self.index.search(patches.to(self.device), k, squared=squared)
        queries = np.ascontiguousarray(patches.detach().cpu().numpy(), dtype=np.float32)
        distances, indices = self.index.search(queries, k)  # faiss returns squared L2
        distances = np.maximum(distances, 0) if squared else np.sqrt(np.maximum(distances, 0))
        return torch.from_numpy(distances).to(self.device), torch.from_numpy(indices).to(self.device)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [B] and anomaly maps [B, H, W] at the input resolution (Sec. 3.3).

        paper: L2 distances (Eq. 6), maps blurred with mirror padding; official: squared L2
        distances, as faiss returns them to the released code, blurred as scipy's default ('reflect').
        """
        patches, grid = self._patches(images)
        return self._score(patches, grid, tuple(images.shape[-2:]))

    def _score(self, patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """predict() from the patch features [B, N, C] of images of `size`."""
        official = self.config.protocol == "official"
        b, n, c = patches.shape
        distances, nearest = self.nearest_neighbors(patches.reshape(-1, c), k=1, squared=official)
        patch_scores = distances[:, 0].reshape(b, n)  # Eq. 6: distance to the nearest memory patch
        if self.config.reweight_b:
            scores = self._reweighted_scores(patches, patch_scores, nearest[:, 0].reshape(b, n))
        else:
            scores = patch_scores.max(dim=1).values
        maps = F.interpolate(patch_scores.reshape(b, 1, *grid), size=size, mode="bilinear", align_corners=False)
        if self.config.blur_sigma > 0:
            maps = gaussian_blur(maps, self.config.blur_sigma, mode="reflect" if official else "mirror")
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
        _, support = self.nearest_neighbors(m_star, k=self.config.reweight_b)  # [B, b]
        d = torch.linalg.vector_norm(m_test[:, None, :] - self.memory_bank[support], dim=-1)  # [B, b]
        weight = 1 - torch.exp(s_star - torch.logsumexp(d, dim=1))
        return weight * s_star

    # ------------------------------------------------------------------ the bank file
    def save(self, path: Path, **sections: object) -> None:
        """Write the memory bank with its config and the model's provenance (bank.py has the format);
        `sections` (train facts, calibration) are stored beside them."""
        if self.memory_bank is None:
            raise RuntimeError("no memory bank to save: call fit() first")
        model = {"weights": self.weights, "backbone_sha256": self.backbone_sha256, "feature_dim": self.feature_dim}
        header = {
            "config": self.config.to_dict(),
            "model": model,
            "calibration": self.calibration,
            **sections,
            "environment": environment(),
        }
        save_bank(Path(path), self.memory_bank.cpu().numpy(), header)

    @classmethod
    def from_bank(cls, path: Path, *, device: str = "auto", weights: str | None = None, search: str = "auto") -> PatchCore:
        """The model a memory bank was built with, holding that bank; its header is `bank_header`.

        `weights` only says where the same weights are now (a moved file); a bank whose backbone
        weights or feature width differ from the rebuilt model's is refused.
        """
        memory_bank, header = load_bank(Path(path))
        try:
            config = PatchCoreConfig(**header["config"])
        except (KeyError, TypeError, ValueError) as err:
            raise BankError(f"{path} holds a config this code cannot use ({err}); rerun train.py for this category") from err
        model = cls(config, device=device, search=search, **({"weights": weights} if weights else {}))
        built = header["model"]
        if model.backbone_sha256 != built["backbone_sha256"]:
            raise BankError(
                f"{path} was built with backbone weights '{built['weights']}', but evaluation has '{model.weights}' "
                "(their checksums differ): evaluate with the training weights, or retrain"
            )
        if memory_bank.shape[1] != model.feature_dim:
            raise BankError(
                f"{path} holds {memory_bank.shape[1]}-d features, but {config.backbone} {list(config.layers)} makes "
                f"{model.feature_dim}-d ones: rerun train.py with these settings"
            )
        model.set_memory_bank(torch.from_numpy(memory_bank))
        model.calibration, model.bank_header = header["calibration"], header
        return model
