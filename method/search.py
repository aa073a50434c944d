"""Nearest-neighbour search over the memory bank: the k nearest bank rows of each query patch.

Three searches, all torch.nn.Modules holding the bank as a buffer, called as search(queries, k):
- ExactSearch (the default, on every device): the k rows nearest by exact distance, certified. Cheap
  lower bounds (each tile's box and each row's sketch, below) rule out most of the bank without touching it; only
  rows they cannot rule out get their distance computed, and the answer is a float64 brute force's;
- GraphSearch: ExactSearch as an exportable graph (onnx_export.py): a scan over blocks of queries,
  each block one custom operation, patchcore::exact_knn, that onnx_search.py writes in ONNX ops;
- FaissSearch: faiss's IndexFlatL2 (on the GPU where faiss has GPUs): its fp32 distance expansion,
  without a re-rank; it leaves torch for numpy.
resolve_search decides which one runs for a device.
"""

from __future__ import annotations

import functools

import faiss
import faiss.contrib.torch_utils  # noqa: F401  (a GPU index then takes and returns torch tensors on its device)
import numpy as np
import torch

SEARCHES = ("exact", "faiss")
SKETCH_DIMS = (32, 128)  # the sketches' principal directions: the scan of the rows in key range, the second look at what it left
CANDIDATES = 4  # rows per query, nearest by sketch in its window, of which the k lowest on the finer sketch give UB
WINDOW = 256  # positions either side of a window's home tiles among which the candidates are sought
BLOCK = 1024  # queries per block, in key order (fewer where the block's scan would pass block_bytes)
WINDOW_QUERIES = 32  # queries per window: consecutive as arranged, their candidates come from one slice of the bank
GROUP = 32  # queries per chunk of the scan: a tile is scanned by the queries that reach it, GROUP at a time
TILE = 256  # bank rows per tile of the scan: consecutive positions, within one slab
SLAB = 2048  # bank rows per slab: consecutive in key order, in order of their second coordinate within (a multiple of TILE)
FP32_EPS = 2.0**-24  # float32's unit roundoff u
SLACK = 1e-9  # relative to the norms: more than any float64 rounding in the bounds


def resolve_search(search: str, device: torch.device) -> str:
    """The search that runs: exact (any device), or faiss where this faiss build runs on the device."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    if search == "faiss" and device.type == "cuda" and not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        raise ValueError("--search faiss: this faiss build has no GPU support; use --search exact, or --device cpu")
    return search


def make_search(bank: torch.Tensor, search: str) -> ExactSearch | FaissSearch:
    """The search module that runs (resolve_search's answer) over a float32 bank on its device."""
    return FaissSearch(bank) if search == "faiss" else ExactSearch(bank)


def block_rows(n_rows: int, block_bytes: int = 2**26) -> int:
    """Queries per block of the search: BLOCK, or fewer where a [rows, n_rows] float32 scan would pass block_bytes."""
    return max(1, min(BLOCK, block_bytes // (4 * n_rows)))


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): a float32 sum of n products is within gamma_n of the exact sum of their magnitudes
    (Higham, Accuracy and Stability of Numerical Algorithms, Sec. 3.1), in any order and with or without FMA."""
    return n * FP32_EPS / (1 - n * FP32_EPS)


class ExactSearch(torch.nn.Module):
    """The k nearest bank rows of each query by exact distance, and those distances.

    The bound. Centre rows on the bank's mean (x = q - mean, y = m - mean) and take P, the bank's top principal
    directions, orthonormal (float64). The sketch of a row is s(x) = (P x, ||x - P^T P x||): its projection and
    the length of what the projection leaves out. Then, for every pair,

        ||(p1.x, p2.x) - (p1.y, p2.y)||  <=  ||s(x) - s(y)||,   ||s(x) - s(y)||^2 = ||P(x - y)||^2 + (||Rx|| - ||Ry||)^2
                                                                          <= ||P(x - y)||^2 + ||R(x - y)||^2 = ||q - m||^2

    (p1, p2: the first two directions, p1.x the row's key; R = I - P^T P; the reverse triangle inequality), so
    neither the gap on the first two coordinates nor the sketch distance ever exceeds the true distance. On patch
    features the bank's variance sits in few directions and the bounds are tight: at bottle's size a test patch's
    UB reaches the boxes of 5 % of the bank's rows, and its sketch bound leaves 0.1 %.

    The layout: the bank's rows in slabs of SLAB rows consecutive in key order, each slab's rows in order of p2, in
    tiles of TILE positions; each tile keeps the box its rows span on (p1, p2). The box's distance from a query's
    (p1.x, p2.x) bounds every row's in the tile. Queries are searched in key order, in blocks of BLOCK (fewer where a
    block's scan would pass `block_bytes`), a block's queries arranged as the rows are (by their home: the tile where
    rows like them lie, in the slab of their key, by their p2; then by p2):
      1. UB: for each WINDOW_QUERIES consecutive queries, the rows within `window` positions of their home tiles;
         among them each query's CANDIDATES nearest by sketch (SKETCH_DIMS[0] directions, one float32 product); the k
         of those lowest on the finer sketch (SKETCH_DIMS[1] directions) get their exact fp32 distance, whose largest,
         raised by its rounding bound, is an upper bound UB of the true k-th nearest distance;
      2. the scan: a query reaches the tiles whose box lies within UB (+ margin) of it; each tile is scanned by the
         queries that reach it, GROUP at a time; a row is out when its sketch distance, less the product's rounding
         bound, exceeds UB;
      3. the second look: of the rows left, those whose finer sketch distance, less its rounding, exceeds UB are
         out; the rows lowest on it may lower UB (their exact distance), and rule out more;
      4. of the rest, the k nearest by (exact distance, bank index); distances close enough to the k-th for float32
         rounding to matter are recomputed in float64, so the ranking is float64's and the same whatever the batch,
         the blocks, the thread count or the instruction set.
    No row is ruled out by an estimate: each bound carries the rounding of the arithmetic that made it, so the
    result is a float64 brute force's (ties: the lower bank index), for any bank and any queries. The layout, the
    candidates, the window and the chunks only decide how tight UB is and how much is scanned: never the answer.
    """

    def __init__(self, bank: torch.Tensor, candidates: int = CANDIDATES, sketch_dims: tuple[int, int] = SKETCH_DIMS,
                 window: int = WINDOW) -> None:  # fmt: skip
        super().__init__()
        bank = bank.float().contiguous()
        n_rows, width = bank.shape
        self.candidates, self.window = candidates, window
        self.register_buffer("bank", bank)
        self.register_buffer("mean", bank.double().mean(0))
        # P: the top principal directions of the centred bank (of up to 8,192 evenly spaced rows), orthonormal in float64
        sample = bank[:: max(1, n_rows // 8192)] - self.mean.float()
        _, vectors = torch.linalg.eigh((sample.T @ sample).double())  # any orthonormal P gives the bound: float32 suffices here
        self.dims = (min(sketch_dims[0], width), min(sketch_dims[1], width))
        self.register_buffer("basis", vectors.flip(1)[:, : self.dims[1]].T.contiguous())
        sketches = [self.sketches(rows) for rows in bank.split(4096)]  # float64, made once
        scan, second = (torch.cat(level) for level in zip(*sketches))
        # the layout: slabs of SLAB rows in key order (the key: the first coordinate, P[0].(m - mean)), each slab's rows
        # in order of their second coordinate; positions count rows in this layout
        keys, by_key = second[:, 0].sort(stable=True)
        slab = torch.arange(n_rows, device=bank.device) // SLAB
        within = second[by_key, 1].argsort(stable=True)
        order = by_key[within[slab[within].argsort(stable=True)]]
        self.register_buffer("order", order)  # the bank index of each position
        last = (torch.arange(SLAB, n_rows + SLAB, SLAB, device=bank.device) - 1).clamp_max(n_rows - 1)
        self.register_buffer("slabs", torch.stack([keys[::SLAB], keys[last]]))  # [2, S]: each slab's lowest and highest key
        scan, second = scan[order], second[order]
        # each tile's box on the first two coordinates, [T, 4] float64: (lowest p1, lowest p2, highest p1, highest p2)
        plane = torch.cat([second[:, :2], second[-1:, :2].expand(-n_rows % TILE, 2)]).view(-1, TILE, 2)
        self.register_buffer("boxes", torch.cat([plane.amin(1), plane.amax(1)], 1))
        self.register_buffer("norm_max", second.norm(dim=1).max())  # ||y|| = ||s(y)|| for every y
        # the scan's product, one matrix: (s(x), 1) . (-2 s(y), ||s(y)||^2) = ||s(y)||^2 - 2 s(x).s(y), float32 [M', d1 + 2],
        # M' = M rounded up to whole tiles: the rows past the bank are (0, +inf), which no bound keeps
        rows = torch.cat([-2 * scan, (scan**2).sum(1, keepdim=True)], 1).float()
        past = rows.new_zeros(-n_rows % TILE, rows.shape[1])
        past[:, -1] = float("inf")
        self.register_buffer("scan_rows", torch.cat([rows, past]))
        self.register_buffer("second_sketch", second.float())  # [M, d2 + 1], float32

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor], candidates: int = CANDIDATES, window: int = WINDOW) -> ExactSearch:
        """The search over buffers an ExactSearch made (its state_dict), without computing them again."""
        search = cls.__new__(cls)
        torch.nn.Module.__init__(search)
        for name, value in buffers.items():
            search.register_buffer(name, value)
        search.candidates, search.window = candidates, window
        search.dims = (buffers["scan_rows"].shape[1] - 2, buffers["basis"].shape[0])
        return search

    def sketches(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s(x) of centred rows on the first d1 and on all d2 directions, in float64: ([n, d1 + 1], [n, d2 + 1])."""
        x = rows.double().sub_(self.mean)
        projected = x @ self.basis.T
        squared = torch.linalg.vecdot(x, x)[:, None]
        short = projected[:, : self.dims[0]]
        left_out = (squared - (short * short).sum(1, keepdim=True)).clamp_min(0).sqrt()
        left_out_all = (squared - (projected * projected).sum(1, keepdim=True)).clamp_min(0).sqrt()
        return torch.cat([short, left_out], 1), torch.cat([projected, left_out_all], 1)

    def key(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows' keys, P[0].(x - mean), in float32 [n]: they only put queries in order, into blocks whose keys are
        close (search_block computes its queries' keys again in float64, for the bounds)."""
        direction = self.basis[0].float()
        return rows.float() @ direction - self.mean.float() @ direction

    def forward(self, queries: torch.Tensor, k: int, squared: bool = False, block_bytes: int = 2**26) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances (squared ones if asked) and bank indices, each [n, k]. Queries go in key order, in blocks of
        block_rows(M, block_bytes): a block's scan (about [rows, M] float32 at most) stays near `block_bytes`."""
        if not 1 <= k <= len(self.bank):
            raise ValueError(f"k={k} nearest neighbours asked for, but the memory bank has {len(self.bank)}")
        by_key = self.key(queries).argsort(stable=True)
        queries = queries.float()
        blocks = by_key.split(block_rows(len(self.bank), block_bytes))
        distances, indices = (torch.cat(part) for part in zip(*(self.search_block(queries.index_select(0, b), k) for b in blocks)))
        back = torch.empty_like(by_key)
        back[by_key] = torch.arange(len(by_key), device=by_key.device)
        distances, indices = distances[back], indices[back]
        return (distances if squared else distances.sqrt()).float(), indices

    def home(self, second: torch.Tensor) -> torch.Tensor:
        """Each query's home in the layout [n]: the first position of the tile where a row like it would lie (in the
        slab its key falls in, the first tile whose box reaches up to its p2; the slab's last tile if none)."""
        per, n_tiles = SLAB // TILE, len(self.boxes)
        first = per * torch.searchsorted(self.slabs[1], second[:, 0].contiguous()).clamp_max(self.slabs.shape[1] - 1)
        last = (first + per).clamp_max(n_tiles) - 1
        tiles = torch.minimum(first[:, None] + torch.arange(per, device=second.device), last[:, None])
        below = (self.boxes[tiles, 3] < second[:, 1, None]).sum(1)  # the slab's tiles whose rows all lie below its p2
        return TILE * torch.minimum(first + below, last)

    def search_block(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances (float64) and bank indices [n, k] of one block of queries (fast when their keys are
        close)."""
        scan, second = self.sketches(q)
        home = self.home(second)
        by_second = second[:, 1].argsort(stable=True)
        arranged = by_second[home[by_second].argsort(stable=True)]  # as the rows are laid out: by home, then p2
        q, scan, second, home = q[arranged], scan[arranged], second[arranged], home[arranged]
        lhs = torch.cat([scan.float(), torch.ones(len(q), 1, device=q.device)], 1)  # (s(x), 1): the scan's left side
        margin = FP32_EPS * self.norm_max + SLACK * (second.norm(dim=1) + self.norm_max)  # the stored sketches' rounding, float64's
        upper, candidates, seen = self.upper_bound(q, lhs, second, margin, home, k)
        which, position = self.scan(lhs, second, margin, upper)
        lower = self.finer_lower_bounds(second, margin, which, position)
        upper, known = self.lower_upper_bound(q, which, position, lower, upper, candidates, seen, k)
        keep = lower <= upper[which]
        distances, indices = self.k_nearest(q, which[keep], self.order[position[keep]], k, known[keep])
        back = torch.empty_like(arranged)
        back[arranged] = torch.arange(len(q), device=q.device)
        return distances[back], indices[back]

    def upper_bound(self, q: torch.Tensor, lhs: torch.Tensor, second: torch.Tensor, margin: torch.Tensor, home: torch.Tensor,
                    k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """UB [n] (float64): for each WINDOW_QUERIES queries, their home tiles and the `window` positions either side
        (whole tiles, one batched product); each query's c nearest there by sketch; the k of them lowest on the finer
        sketch get their exact fp32 distance, and the largest, raised by its rounding bound, is UB. Also returns those
        k rows' positions and exact fp32 distances, [n, k] each."""
        n, n_rows = len(q), len(self.bank)
        c = min(n_rows, max(self.candidates, k))
        w = max(self.window, (c + 1) // 2)  # 2 w >= c rows, or the whole bank
        size = min(WINDOW_QUERIES, n)
        windows, pad = -(-n // size), -n % size
        home = torch.cat([home, home[-1:].expand(pad)]).view(windows, size)  # the last window padded
        tiles = self.scan_rows.view(-1, TILE * self.scan_rows.shape[1])
        low = (home.amin(1) - w).clamp(0, max(0, n_rows - 2 * w))  # 2 w rows at least: c candidates
        high = (home.amax(1) + TILE + w).clamp(min(2 * w, n_rows), n_rows)
        first, last = low // TILE, (high + TILE - 1) // TILE
        span = int((last - first).max())
        first = first.clamp_max(len(tiles) - span)
        rows = tiles.index_select(0, (first[:, None] + torch.arange(span, device=q.device)).flatten())
        product = torch.bmm(torch.cat([lhs, lhs[-1:].expand(pad, -1)]).view(windows, size, -1),
                            rows.view(windows, span * TILE, -1).transpose(1, 2))  # fmt: skip
        nearest = (product.topk(c, dim=2, largest=False).indices + TILE * first[:, None, None]).view(-1, c)[:n]
        every = torch.arange(n, device=q.device)
        lower = self.finer_lower_bounds(second, margin, every.repeat_interleave(c), nearest.flatten()).view(n, c)
        chosen = nearest.gather(1, lower.topk(k, dim=1, largest=False).indices)
        seen = self.exact_fp32(q, every.repeat_interleave(k), self.order[chosen.flatten()]).view(n, k)
        return raised(seen.amax(1), q.shape[1]), chosen, seen

    def scan(self, lhs: torch.Tensor, second: torch.Tensor, margin: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs (query, position) that the tiles' boxes and the scan's sketch do not rule out. A query reaches a
        tile when its first two coordinates lie within UB (+ margin) of the tile's box (the box's distance bounds every
        row's); each tile is scanned by the queries that reach it, GROUP at a time, all in one batched product. There a
        row is out when its lower bound exceeds UB: sqrt(sketch distance^2 - rounding) - margin > UB. The product is a
        sum of d1 + 2 terms whose magnitudes add up to at most (||s(x)|| + ||s(y)||)^2."""
        n, device = len(lhs), lhs.device
        scan32 = lhs[:, :-1].double()
        reach = upper + margin
        low1, low2, high1, high2 = self.boxes.T.contiguous()[:, :, None]  # [T, 1] each: the tiles' boxes on p1, p2
        p1, p2 = second[:, 0].contiguous(), second[:, 1].contiguous()  # the queries' first two coordinates
        gap1 = (low1 - p1).clamp_min_(0).add_((p1 - high1).clamp_min_(0))  # [T, n]: how far each query is off each box
        gap2 = (low2 - p2).clamp_min_(0).add_((p2 - high2).clamp_min_(0))
        tile_of, query_of = (gap1.square_().add_(gap2.square_()) <= reach.square()).nonzero(as_tuple=True)  # by tile, then query
        # each tile's queries in chunks of GROUP: chunk c scans tile chunk_tile[c] for the queries members[c] (n: none)
        count = torch.bincount(tile_of, minlength=len(self.boxes))
        chunks = (count + GROUP - 1) // GROUP
        slot = torch.arange(len(tile_of), device=device) - (torch.cumsum(count, 0) - count)[tile_of]
        members = torch.full((int(chunks.sum()), GROUP), n, device=device)
        members[(torch.cumsum(chunks, 0) - chunks)[tile_of] + slot // GROUP, slot % GROUP] = query_of
        chunk_tile = torch.repeat_interleave(torch.arange(len(chunks), device=device), chunks)
        rounding = gamma(self.dims[0] + 4) * (scan32.norm(dim=1) + self.norm_max) ** 2
        threshold = reach**2 + rounding - (scan32**2).sum(1)  # ||s(x)||^2 joins the threshold
        threshold = torch.nextafter(threshold.float(), torch.tensor(float("inf"), device=device))
        threshold = torch.cat([threshold, threshold.new_full((1,), float("-inf"))])  # the padding's: no row passes
        tiles = self.scan_rows.view(-1, TILE * self.scan_rows.shape[1]).index_select(0, chunk_tile).view(len(chunk_tile), TILE, -1)
        partial = torch.bmm(torch.cat([lhs, lhs.new_zeros(1, lhs.shape[1])])[members], tiles.transpose(1, 2))  # [chunks, GROUP, TILE]
        chunk, member, row = (partial <= threshold[members][:, :, None]).nonzero(as_tuple=True)  # ||s(y)||^2 - 2 s(x).s(y)
        return members[chunk, member], chunk_tile[chunk] * TILE + row

    def finer_lower_bounds(self, second: torch.Tensor, margin: torch.Tensor, which: torch.Tensor, position: torch.Tensor,
                           chunk: int = 65536) -> torch.Tensor:  # fmt: skip
        """Lower bounds of ||q - m|| from the finer sketch, float64 [pairs], for the pairs (queries[which], rows at
        `position`): ||s(x) - s(y)|| in float32, `chunk` pairs at a time, less its rounding: the query's
        sketch rounded to float32 moves it by u ||s(x)|| at most, and the sum of d2 + 1 squared differences is
        within gamma(d2 + 4) of the exact one, relatively."""
        query = second.float()
        squares = torch.empty(len(which), dtype=torch.float64, device=second.device)
        for lo in range(0, len(which), chunk):
            diff = query.index_select(0, which[lo : lo + chunk]).sub_(self.second_sketch.index_select(0, position[lo : lo + chunk]))
            squares[lo : lo + chunk] = diff.square_().sum(1)
        own = margin + FP32_EPS * second.norm(dim=1)
        return (squares / (1 + gamma(second.shape[1] + 3))).sqrt() - own[which]

    def lower_upper_bound(self, q: torch.Tensor, which: torch.Tensor, position: torch.Tensor, lower: torch.Tensor,
                          upper: torch.Tensor, candidates: torch.Tensor, seen: torch.Tensor,
                          k: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """UB again, from the rows the scan left: each query's k lowest on the finer sketch get their exact fp32
        distance (k = 1: every row at the lowest), unless UB's candidates (positions [n, k], their distances `seen`)
        hold it already. Returns the lower of the two UBs [n], and the exact distances known, by pair (NaN elsewhere)."""
        n, device = len(q), q.device
        match = position[:, None] == candidates[which]  # [pairs, k]: the pair is one of its query's candidates
        from_ub = seen[which].gather(1, match.to(torch.uint8).argmax(1, keepdim=True)).squeeze(1)
        known = torch.where(match.any(1), from_ub, float("nan"))
        if k == 1:  # any one row's distance bounds the nearest's
            lowest = torch.full((n,), float("inf"), dtype=lower.dtype, device=device).scatter_reduce(0, which, lower, "amin")
            chosen = (lower == lowest[which]).nonzero().squeeze(1)
        else:  # the k lowest rows of each query (it has k or more: the true k are never ruled out)
            chosen = first_k(which, n, k, lower).flatten()
        todo = chosen[known[chosen].isnan()]
        known[todo] = self.exact_fp32(q, which[todo], self.order[position[todo]])
        seen = known[chosen]
        if k == 1:
            bound = torch.full((n,), float("inf"), device=device).scatter_reduce(0, which[chosen], seen, "amin")
        else:
            bound = seen.view(n, k).amax(1)
        return torch.minimum(upper, raised(bound, q.shape[1])), known

    def exact_fp32(self, q: torch.Tensor, which: torch.Tensor, rows: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """sum_i (q_i - m_i)^2 in float32, directly (no expansion), for the pairs (q[which], bank[rows]), `chunk`
        pairs at a time. Within gamma(C + 2) of the exact value, relatively."""
        out = torch.empty(len(which), device=q.device)
        for lo in range(0, len(which), chunk):
            diff = q.index_select(0, which[lo : lo + chunk]).sub_(self.bank.index_select(0, rows[lo : lo + chunk]))
            out[lo : lo + chunk] = diff.square_().sum(1)
        return out

    def k_nearest(self, q: torch.Tensor, which: torch.Tensor, rows: torch.Tensor, k: int,
                  known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The k nearest bank rows of each query among its pairs (which, rows) by (float64 distance, bank index):
        squared distances (float64) and indices [n, k]. `known`: the pairs' exact fp32 distances where computed
        already (NaN elsewhere). Pairs within float32's rounding of the k-th get their distance in float64; the
        others cannot be among the k."""
        n, device = len(q), q.device
        todo = known.isnan().nonzero().squeeze(1)
        d32 = known.index_put((todo,), self.exact_fp32(q, which[todo], rows[todo]))
        if k == 1:
            kth = torch.full((n,), float("inf"), device=device).scatter_reduce(0, which, d32, "amin")
        else:  # each query has k pairs or more: the k nearest are never ruled out
            kth = d32[first_k(which, n, k, d32)[:, -1]]
        band = (d32 <= kth[which] * (1 + 4 * gamma(q.shape[1] + 2))).nonzero().squeeze(1)
        which, rows = which[band], rows[band]
        d64 = q.index_select(0, which).double().sub_(self.bank.index_select(0, rows)).square_().sum(1)
        first = first_k(which, n, k, d64, rows)  # by float64 distance, ties by bank index
        return d64[first], rows[first]

    def describe(self) -> str:
        return (f"exact: box and sketch bounds ({self.dims[0]} and {self.dims[1]} principal directions) rule rows out, "
                f"the rest ranked by exact distance (float64 where float32 could tie)")


def first_k(which: torch.Tensor, n: int, k: int, *keys: torch.Tensor) -> torch.Tensor:
    """Positions [n, k] of each query's first k pairs, the pairs (which: their query) sorted by (query, *keys): stable
    sorts, the last key first. Every query must have k pairs or more."""
    by = torch.arange(len(which), device=which.device)
    for key in (*reversed(keys), which):
        by = by[key[by].argsort(stable=True)]
    counts = torch.bincount(which, minlength=n)
    return by[(torch.cumsum(counts, 0) - counts)[:, None] + torch.arange(k, device=which.device)]


def raised(squared: torch.Tensor, width: int) -> torch.Tensor:
    """An upper bound (float64) of the true distance from a float32 squared distance of `width` terms computed
    directly: raised by its relative rounding bound gamma(width + 2), twice, and float64's slack."""
    return (squared.double() * (1 + 2 * gamma(width + 2))).sqrt() * (1 + SLACK)


@torch.library.custom_op("patchcore::exact_knn", mutates_args=())
def exact_knn(queries: torch.Tensor, k: int, candidates: int, window: int, bank: torch.Tensor, mean: torch.Tensor,
              basis: torch.Tensor, slabs: torch.Tensor, order: torch.Tensor, boxes: torch.Tensor, scan_rows: torch.Tensor,
              second_sketch: torch.Tensor, norm_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """ExactSearch.search_block as one torch operation over its buffers: squared distances (float64) and bank
    indices [n, k]. torch.export sees one node with these static output shapes; onnx_search.py gives its ONNX ops."""
    buffers = {"bank": bank, "mean": mean, "basis": basis, "slabs": slabs, "order": order, "boxes": boxes,
               "scan_rows": scan_rows, "second_sketch": second_sketch, "norm_max": norm_max}  # fmt: skip
    return ExactSearch.from_buffers(buffers, candidates, window).search_block(queries.float(), k)


@exact_knn.register_fake
def _(queries, k, candidates, window, bank, mean, basis, slabs, order, boxes, scan_rows, second_sketch, norm_max):
    return queries.new_empty(len(queries), k, dtype=torch.float64), queries.new_empty(len(queries), k, dtype=torch.long)


class GraphSearch(ExactSearch):
    """ExactSearch as the exported graph runs it (onnx_export.py): the queries sorted by key, then torch's scan (ONNX
    Scan) over blocks of `rows` of them (the last block padded with copies of the last query, so that its keys stay
    close), each block one patchcore::exact_knn operation, which the export writes as ONNX ops (onnx_search.py). A
    runtime holds one block's scan ([rows, M] at most) at a time, whatever the batch: a Python loop over a
    query-dependent number of blocks would be unrolled for one batch size by an export.
    Same answers as ExactSearch: the k nearest by (float64 distance, bank index)."""

    def __init__(self, bank: torch.Tensor, rows: int, candidates: int = CANDIDATES, window: int = WINDOW) -> None:
        super().__init__(bank, candidates, window=window)
        self.rows = rows

    def forward(self, queries: torch.Tensor, k: int, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances (squared ones if asked) and bank indices, each [n, k]."""
        from torch._higher_order_ops.scan import scan  # torch's loop operator; exported as ONNX Scan

        if not 1 <= k <= len(self.bank):
            raise ValueError(f"k={k} nearest neighbours asked for, but the memory bank has {len(self.bank)}")
        n, width = queries.shape
        rows = self.rows  # static: the scan's blocks, and so the custom op's outputs, have one shape whatever the batch
        blocks = (n + rows - 1) // rows
        by_key = self.key(queries).argsort()  # any order of equal keys: the answers do not depend on the order
        ordered = queries.float()[by_key]
        # padded with a whole block of the last query, then cut: a block of a computed size would be a ConstantOfShape
        # whose size OpenVINO cannot prove non-negative
        padded = torch.cat([ordered, ordered[-1:].expand(rows, width)])[: blocks * rows].reshape(blocks, rows, width)
        buffers = (self.bank, self.mean, self.basis, self.slabs, self.order, self.boxes, self.scan_rows, self.second_sketch,
                   self.norm_max)  # fmt: skip

        def step(carry: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            return carry.clone(), torch.ops.patchcore.exact_knn(q, k, self.candidates, self.window, *buffers)

        _, (distances, indices) = scan(step, queries.new_zeros(1), padded)
        back = torch.zeros_like(by_key).scatter(0, by_key, torch.arange(n, device=queries.device))  # the inverse permutation
        distances, indices = distances.reshape(-1, k)[back], indices.reshape(-1, k)[back]
        return (distances if squared else distances.sqrt()).float(), indices

    def describe(self) -> str:
        return super().describe() + f"; in the graph: blocks of {self.rows} patches, float64 steps in float64 where the runtime has it"


@functools.cache
def gpu_resources(device_index: int) -> faiss.StandardGpuResources:
    """faiss's scratch memory and streams on one GPU: made once per process and GPU, shared by every index."""
    return faiss.StandardGpuResources()


class FaissSearch(torch.nn.Module):
    """faiss's exhaustive IndexFlatL2 over the bank (||q||^2 - 2 q.m + ||m||^2 in fp32, no re-rank). On a GPU
    the index lives on the bank's GPU and takes torch tensors there; on a CPU queries go to numpy and
    back. Either way this search cannot be part of an exported torch graph."""

    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bank", bank.float())
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(self.bank.cpu().numpy())
        if bank.device.type == "cuda":
            index = faiss.index_cpu_to_gpu(gpu_resources(bank.device.index or 0), bank.device.index or 0, index)
        self.index = index

    def forward(self, queries: torch.Tensor, k: int, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances (squared ones if asked) and bank indices, each [M, k]."""
        if self.bank.device.type == "cuda":  # on the GPU: no copy to the host and back
            distances, indices = self.index.search(queries.detach().float().contiguous(), k)  # faiss returns squared L2
            distances = distances.clamp_min(0)
            return (distances if squared else distances.sqrt()), indices
        host = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
        distances, indices = self.index.search(host, k)  # faiss returns squared L2
        distances = np.maximum(distances, 0) if squared else np.sqrt(np.maximum(distances, 0))
        return torch.from_numpy(distances).to(self.bank.device), torch.from_numpy(indices).to(self.bank.device)

    def describe(self) -> str:
        return f"faiss {type(self.index).__name__}, fp32 distance expansion without re-rank"
