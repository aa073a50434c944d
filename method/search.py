"""Nearest-neighbour search over the memory bank: the k nearest bank rows of each query patch.

Three searches, all torch.nn.Modules holding the bank as a buffer, called as search(queries, k):
- ExactSearch (the default, on every device): the k rows nearest by exact distance, certified. Cheap
  lower bounds (each row's key and sketch, below) rule out most of the bank without touching it; only
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
WINDOW = 1024  # rows either side of a window's keys (in key order) among which the candidates are sought
BLOCK = 1024  # queries per block, in key order (fewer where the block's scan would pass block_bytes)
WINDOW_QUERIES = 128  # queries per window: consecutive in key order, their candidates come from one slice of the bank
GROUP = 32  # queries per group of the scan: a group scans the tiles its queries' key ranges reach
FAR = 1.5  # a query whose UB passes FAR x its block's median UB is grouped with the other far ones
TILE = 256  # bank rows per tile of the scan, in key order
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

        |p1.x - p1.y|  <=  ||s(x) - s(y)||,   ||s(x) - s(y)||^2 = ||P(x - y)||^2 + (||Rx|| - ||Ry||)^2
                                                                <= ||P(x - y)||^2 + ||R(x - y)||^2 = ||q - m||^2

    (p1: the first direction, its coordinate the row's key; R = I - P^T P; the reverse triangle inequality), so
    neither the key gap nor the sketch distance ever exceeds the true distance. On patch features the bank's
    variance sits in few directions and the bounds are tight: at bottle's size the true nearest row lies within a
    few percent of the bank in key order.

    The bank's sketches are stored in key order, in tiles of TILE rows. Queries are searched in key order, in
    blocks of BLOCK (fewer where a block's scan would pass `block_bytes`); for each block:
      1. UB: for each WINDOW_QUERIES consecutive queries, the `window` rows on either side of their keys; among them
         each query's CANDIDATES nearest by sketch (SKETCH_DIMS[0] directions, one float32 product); the k of those
         lowest on the finer sketch (SKETCH_DIMS[1] directions) get their exact fp32 distance, whose largest, raised
         by its rounding bound, is an upper bound UB of the true k-th nearest distance;
      2. the scan: groups of GROUP queries (consecutive in key order; the far ones, UB above FAR x the block's
         median, apart) scan the tiles holding rows whose keys lie within UB (+ margin) of a query's; a row is out
         when its sketch distance, less the product's rounding bound, exceeds UB;
      3. the second look: of the rows left, those whose finer sketch distance, less its rounding, exceeds UB are
         out; the rows lowest on it may lower UB (their exact distance), and rule out more;
      4. of the rest, the k nearest by (exact distance, bank index); distances close enough to the k-th for float32
         rounding to matter are recomputed in float64, so the ranking is float64's and the same whatever the batch,
         the blocks, the thread count or the instruction set.
    No row is ruled out by an estimate: each bound carries the rounding of the arithmetic that made it, so the
    result is a float64 brute force's (ties: the lower bank index), for any bank and any queries. The candidates,
    the window and the groups only decide how tight UB is and how much is scanned: never the answer.
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
        keys, order = second[:, 0].sort(stable=True)  # the key: the first coordinate, P[0].(m - mean)
        self.register_buffer("keys", keys)  # float64, ascending
        self.register_buffer("order", order)  # the bank index of each position in key order
        scan, second = scan[order], second[order]
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

    def positions(self, keys: torch.Tensor, right: bool = False) -> torch.Tensor:
        """Positions in key order: of the first bank row whose key is >= each of `keys` (> with right=True)."""
        return torch.searchsorted(self.keys, keys.contiguous(), right=right)

    def search_block(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances (float64) and bank indices [n, k] of one block of queries in key order (fast when their
        keys are close)."""
        scan, second = self.sketches(q)
        lhs = torch.cat([scan.float(), torch.ones(len(q), 1, device=q.device)], 1)  # (s(x), 1): the scan's left side
        margin = FP32_EPS * self.norm_max + SLACK * (second.norm(dim=1) + self.norm_max)  # the stored sketches' rounding, float64's
        upper = self.upper_bound(q, lhs, second, margin, k)
        which, position = self.scan(lhs, second, margin, upper)
        lower = self.finer_lower_bounds(second, margin, which, position)
        upper, known = self.lower_upper_bound(q, which, position, lower, upper, k)
        keep = lower <= upper[which]
        return self.k_nearest(q, which[keep], self.order[position[keep]], k, known[keep])

    def upper_bound(self, q: torch.Tensor, lhs: torch.Tensor, second: torch.Tensor, margin: torch.Tensor, k: int) -> torch.Tensor:
        """UB [n] (float64): for each WINDOW_QUERIES queries, the `window` rows either side of their keys (whole tiles,
        one batched product); each query's c nearest there by sketch; the k of them lowest on the finer sketch get
        their exact fp32 distance, and the largest, raised by its rounding bound, is UB."""
        n, n_rows = len(q), len(self.bank)
        c = min(n_rows, max(self.candidates, k))
        w = max(self.window, (c + 1) // 2)  # 2 w >= c rows, or the whole bank
        size = min(WINDOW_QUERIES, n)
        windows, pad = -(-n // size), -n % size
        key = torch.cat([second[:, 0], second[-1:, 0].expand(pad)]).view(windows, size)  # the last window padded
        tiles = self.scan_rows.view(-1, TILE * self.scan_rows.shape[1])
        low = (self.positions(key[:, 0]) - w).clamp(0, max(0, n_rows - 2 * w))  # 2 w rows at least: c candidates
        high = (self.positions(key[:, -1], right=True) + w).clamp(min(2 * w, n_rows), n_rows)
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
        return raised(seen.amax(1), q.shape[1])

    def scan(self, lhs: torch.Tensor, second: torch.Tensor, margin: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs (query, position in key order) that the key and the scan's sketch do not rule out. Queries go in
        groups of GROUP (in key order, the far ones apart); a group scans, in one batched product with the others,
        the tiles holding the rows whose keys lie within UB (+ margin) of one of its queries' keys. There a row is
        out when its lower bound exceeds UB: sqrt(sketch distance^2 - rounding) - margin > UB. The product is a sum
        of d1 + 2 terms whose magnitudes add up to at most (||s(x)|| + ||s(y)||)^2."""
        n, device = len(lhs), lhs.device
        key, scan32 = second[:, 0], lhs[:, :-1].double()
        far = upper > FAR * upper.median()
        by_group = far.to(torch.int8).argsort(stable=True)  # in key order, the far ones after the others
        groups, pad = -(-n // GROUP), -n % GROUP
        members = torch.cat([by_group, by_group[-1:].expand(pad)]).view(groups, GROUP)  # the last group padded
        reach = upper + margin
        first = self.positions((key - reach)[members].amin(1)) // TILE
        last = torch.maximum((self.positions((key + reach)[members].amax(1), right=True) + TILE - 1) // TILE, first)
        count = last - first  # tiles each group scans
        group = torch.repeat_interleave(torch.arange(groups, device=device), count)
        tile = torch.arange(len(group), device=device) - (torch.cumsum(count, 0) - count)[group] + first[group]
        rounding = gamma(self.dims[0] + 4) * (scan32.norm(dim=1) + self.norm_max) ** 2
        threshold = (upper + margin) ** 2 + rounding - (scan32**2).sum(1)  # ||s(x)||^2 joins the threshold
        threshold = torch.nextafter(threshold.float(), torch.tensor(float("inf"), device=device))
        tiles = self.scan_rows.view(-1, TILE * self.scan_rows.shape[1]).index_select(0, tile).view(len(tile), TILE, -1)
        partial = torch.bmm(lhs[members[group]], tiles.transpose(1, 2))  # ||s(y)||^2 - 2 s(x).s(y): [pairs of (group, tile), GROUP, TILE]
        pair, member, row = (partial <= threshold[members[group]][:, :, None]).nonzero(as_tuple=True)
        which, position = members[group[pair], member], tile[pair] * TILE + row
        first_seen = torch.ones_like(which, dtype=torch.bool)
        if pad:  # the padded group repeats its last query: keep each (query, row) once
            repeated = member >= GROUP - pad
            first_seen = ~(repeated & (group[pair] == groups - 1))
        return which[first_seen], position[first_seen]

    def finer_lower_bounds(self, second: torch.Tensor, margin: torch.Tensor, which: torch.Tensor, position: torch.Tensor,
                           chunk: int = 65536) -> torch.Tensor:  # fmt: skip
        """Lower bounds of ||q - m|| from the finer sketch, float64 [pairs], for the pairs (queries[which], rows at
        `position` in key order): ||s(x) - s(y)|| in float32, `chunk` pairs at a time, less its rounding: the query's
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
                          upper: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """UB again, from the rows the scan left: each query's k lowest on the finer sketch get their exact fp32
        distance (k = 1: every row at the lowest). Returns the lower of the two UBs [n], and the exact distances
        computed, by pair (NaN where not computed)."""
        n, device = len(q), q.device
        if k == 1:  # any one row's distance bounds the nearest's
            lowest = torch.full((n,), float("inf"), dtype=lower.dtype, device=device).scatter_reduce(0, which, lower, "amin")
            chosen = (lower == lowest[which]).nonzero().squeeze(1)
        else:  # the k lowest rows of each query (it has k or more: the true k are never ruled out)
            chosen = first_k(which, n, k, lower).flatten()
        seen = self.exact_fp32(q, which[chosen], self.order[position[chosen]])
        known = torch.full((len(which),), float("nan"), device=device)
        known[chosen] = seen
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
        return (f"exact: key and sketch bounds ({self.dims[0]} and {self.dims[1]} principal directions) rule rows out, "
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
              basis: torch.Tensor, keys: torch.Tensor, order: torch.Tensor, scan_rows: torch.Tensor,
              second_sketch: torch.Tensor, norm_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """ExactSearch.search_block as one torch operation over its buffers: squared distances (float64) and bank
    indices [n, k]. torch.export sees one node with these static output shapes; onnx_search.py gives its ONNX ops."""
    buffers = {"bank": bank, "mean": mean, "basis": basis, "keys": keys, "order": order, "scan_rows": scan_rows,
               "second_sketch": second_sketch, "norm_max": norm_max}  # fmt: skip
    return ExactSearch.from_buffers(buffers, candidates, window).search_block(queries.float(), k)


@exact_knn.register_fake
def _(queries, k, candidates, window, bank, mean, basis, keys, order, scan_rows, second_sketch, norm_max):
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
        buffers = (self.bank, self.mean, self.basis, self.keys, self.order, self.scan_rows, self.second_sketch, self.norm_max)

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
