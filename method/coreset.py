"""The memory bank's coreset (Sec. 3.2): a seeded random projection, and Alg. 1, greedy k-center selection.

Alg. 1 picks, one at a time, the patch farthest from every patch picked so far, so that the bank
covers the training patches with the smallest largest gap. Two exact implementations pick the
same patches: k_center_greedy_dense (one vectorised update per pick; the GPU path, with CUDA
graphs) and k_center_greedy_pruned (touches only the patches a new center can come closer to;
the CPU path). Its inputs stream in: projected_patches is fit's first pass over the images (the
projections, and the full features where they fit in RAM), full_patches the kept chunks or a
second pass, and gather_rows takes the selected rows out of them chunk by chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm


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


def nearest_center(points: torch.Tensor, centers: torch.Tensor, block_bytes: int = 2**28) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance (float32) of every point to its nearest center, and that center's index; computed
    in float64 as ||p||^2 - 2 p.c + ||c||^2 in row blocks, so it is exact to float32 rounding. A block's
    float64 temporaries (its rows, and their distances to every center) stay under `block_bytes`, as the
    greedy loop's do: a grown bank has as many centers as it has rows."""
    rows = max(1, block_bytes // (8 * (len(centers) + points.shape[1])))
    centers64 = centers.double()
    centers_sq = (centers64**2).sum(1)
    best, which = [], []
    for block in points.split(rows):
        block64 = block.double()
        d = (block64 @ centers64.T).mul_(-2).add_((block64**2).sum(1, keepdim=True)).add_(centers_sq).clamp_min_(0)
        value, index = d.min(1)
        best.append(value.float())
        which.append(index)
    return torch.cat(best), torch.cat(which)


def closer_(min_dist: torch.Tensor, points: torch.Tensor, center: torch.Tensor, rows: int) -> None:
    """min_dist = min(min_dist, ||p - center||^2) in place, `rows` points at a time: no N x D temporary."""
    for lo in range(0, len(points), rows):
        part = min_dist[lo : lo + rows]
        torch.minimum(part, squared_distances(points[lo : lo + rows], center), out=part)


def _greedy_start(
    points: torch.Tensor, start: int | None, existing: torch.Tensor | None, rows: int = 16384
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The picks made before the loop, every point's squared distance to the nearest of the selected set, and
    which one that is: a fresh run starts at `start`; a grown bank starts from the `existing` centers (no pick yet)."""
    if existing is None:
        group = torch.zeros(len(points), dtype=torch.long, device=points.device)
        if points.device.type == "cpu":  # in row blocks: no N x D temporaries
            return [start], torch.from_numpy(squared_distances_blocked(points, points[start])), group
        min_dist = torch.full((len(points),), torch.inf, device=points.device)
        closer_(min_dist, points, points[start], rows)
        return [start], min_dist, group
    return [], *nearest_center(points, existing.to(points.device, torch.float32))


def k_center_greedy_dense(
    points: torch.Tensor,
    n_select: int,
    start: int | None = None,
    existing: torch.Tensor | None = None,
    block: int = 64,
    block_bytes: int = 2**28,
    first_from: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Alg. 1 as one vectorised update per iteration: O(N x D) work each, no host sync (the GPU path).

    Picks n_select points, the first being `start`; or, to grow a bank, n_select more points
    after the `existing` centers. first_from = (rows, count): the first `count` picks are taken
    among `rows` only (greedy_coreset explains why). Each update runs over row blocks whose
    N x D temporary stays under `block_bytes` (full-width features of a large category would
    need gigabytes at once). On CUDA, `block` iterations are captured once as a CUDA graph and
    replayed, so the per-iteration kernel-launch overhead goes; elsewhere the same step runs eagerly.
    """
    rows = max(1, block_bytes // (4 * points.shape[1]))
    first, min_dist, _ = _greedy_start(points, start, existing, rows)  # squared distance to the nearest selected point
    selected = torch.empty(n_select, dtype=torch.long, device=points.device)
    selected[: len(first)] = torch.tensor(first, dtype=torch.long)
    position = torch.full((1,), len(first), dtype=torch.long, device=points.device)  # where the next index goes
    penalty = torch.zeros_like(min_dist)  # -inf on the rows that may not be picked yet, read by every step (and graph replay)
    restricted = 0
    if first_from is not None:
        penalty.fill_(-torch.inf).index_fill_(0, first_from[0].to(points.device), 0.0)
        restricted = first_from[1] - len(first)

    def step() -> None:
        farthest = torch.argmax(min_dist + penalty).view(1)  # first index among ties
        selected.index_copy_(0, position, farthest)
        closer_(min_dist, points, points[farthest], rows)
        position.add_(1)

    graph = None
    progress = tqdm(total=n_select - len(first), desc="coreset", unit="pt", mininterval=1.0)

    def run(count: int) -> None:  # `count` steps: replays of the captured graph for whole blocks, eager steps for the rest
        nonlocal graph
        if points.device.type == "cuda" and graph is None and count >= 2 * block:
            with torch.cuda.device(points.device):  # streams and graphs belong to the current device: make it the points' (cuda:N)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up before capture; these are real iterations
                    for _ in range(block):
                        step()
                torch.cuda.current_stream().wait_stream(side)
                count -= block
                progress.update(block)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # recorded, not run
                    for _ in range(block):
                        step()
        while graph is not None and count >= block:
            graph.replay()
            count -= block
            progress.update(block)
        for _ in range(count):
            step()
            progress.update(1)

    run(restricted)
    penalty.zero_()  # every row may be picked from now on
    run(n_select - len(first) - restricted)
    progress.close()
    return selected


def k_center_greedy_pruned(
    points: torch.Tensor,
    n_select: int,
    start: int | None = None,
    existing: torch.Tensor | None = None,
    n_pivots: int = 16,
    first_from: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Alg. 1, exactly, touching only the points a new center can get closer to (the CPU path).

    Every point belongs to its nearest center j (a list of members per center), and r_j is
    the largest distance in j's group. A new center c can only come closer to points of
    group j if d(j, c) < 2 r_j (triangle inequality), so other groups are skipped. d(j, c)
    itself is first bounded from below through pivot centers, |d(k, j) - d(k, c)| <= d(j, c):
    4 pivots for every center, the other 12 for those that pass, so that most centers are
    ruled out without a full distance. A slack of 1e-4 of the data's scale on the bounds
    covers float32 rounding. Same selection as k_center_greedy_dense, with the same `start`,
    `existing` centers or `first_from`; returns the n_select picks.
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
    eligible, restricted_until = None, 0  # while restricted: the rows that may be picked, and their distances (-1 elsewhere)
    if first_from is not None:
        eligible = np.zeros(n, bool)
        eligible[first_from[0].numpy()] = True
        eligible_dist, restricted_until = np.where(eligible, min_dist, -1.0).astype(np.float32), k0 + first_from[1] - len(first)
    for i in tqdm(range(k0, size), desc="coreset", unit="pt", mininterval=1.0):
        farthest = int(np.argmax(eligible_dist if i < restricted_until else min_dist))  # first index among ties
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
        if i + 1 < restricted_until:
            moved = touched[closer][eligible[touched[closer]]]
            eligible_dist[moved] = min_dist[moved]
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


def projected_patches(
    features: Callable, dataloader, n_patches: int, dim: int, projection: torch.Tensor | None, grid: tuple[int, int], budget: float
) -> tuple[torch.Tensor, list | None, str]:
    """Pass 1 over the images: every patch's projected feature for the coreset ([N, projected dims]) and, when all
    full features fit in `budget` bytes, those too, as the per-batch chunks they arrive in, never concatenated.
    features(images) gives ([B, n, dim] patches, their grid). Returns (projected, chunks or None, which path)."""
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
        patches, got = features(batch[0])
        if got != grid:
            raise ValueError(f"fit() needs images of the bank's image_size (a {grid} patch grid), got a {got} grid")
        patches = patches.flatten(0, 1)  # [B*n, dim]
        projected[offset : offset + len(patches)] = (patches if projection is None else patches @ projection).cpu()
        if chunks is not None:
            chunks.append(patches.cpu())
        offset += len(patches)
    if offset != len(projected):
        raise ValueError(f"the dataloader gave {offset:,} patches, {n_patches:,} expected from its dataset's length")
    if projection is None:
        chunks = [projected]  # the full features themselves
    return projected, chunks, path.split(":")[0]


def full_patches(features: Callable, chunks: list | None, dataloader) -> Iterable[torch.Tensor]:
    """The full features' chunks in order: the kept ones, each released once taken, or a second pass over the images."""
    if chunks is not None:
        return (chunks.pop(0) for _ in range(len(chunks)))
    return (features(b[0])[0].flatten(0, 1).cpu() for b in tqdm(dataloader, desc="memory bank", unit="batch"))


def gather_rows(chunks: Iterable[torch.Tensor], wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def image_rows(images: list[int], per_image: int) -> torch.Tensor:
    """The patch rows of these images, when every image gives per_image rows in order."""
    return (torch.tensor(images, dtype=torch.long)[:, None] * per_image + torch.arange(per_image)).flatten()


def greedy_coreset(
    points: torch.Tensor,
    n_select: int,
    seed: int,
    device: torch.device,
    existing: torch.Tensor | None = None,
    first_from: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Alg. 1: indices of n_select of the (projected) `points`, on `device`: the pruned exact loop on a CPU,
    the dense CUDA-graph loop on a GPU. A fresh selection starts at a seeded random point, the first index
    returned; with `existing` centers (a bank being grown), every point starts at its distance to the nearest.

    first_from = (rows, count): the start and the first `count` picks are drawn among `rows` only, then
    the loop goes on over every point. Those first picks are then exactly Alg. 1 over `rows` alone (a
    point's distance depends only on the picks, all among `rows`), and the selection holds them: the
    calibration bank of PatchCore.fit, a subset of the saved bank.
    """
    n = points.shape[0]
    if first_from is not None and n_select >= n:  # every point kept: the restricted rows first
        rows = first_from[0]
        return torch.cat([rows, torch.from_numpy(np.setdiff1d(np.arange(n), rows.numpy()))])
    if n_select >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    if existing is not None:
        start = None
    elif first_from is not None:
        start = int(first_from[0][int(torch.randint(len(first_from[0]), (1,), generator=generator))])
    else:
        start = int(torch.randint(n, (1,), generator=generator))
    if device.type == "cpu":
        return k_center_greedy_pruned(points.cpu().float().contiguous(), n_select, start, existing, first_from=first_from)
    return k_center_greedy_dense(points.to(device, torch.float32), n_select, start, existing, first_from=first_from).cpu()
