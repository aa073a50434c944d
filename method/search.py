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
CANDIDATES = 8  # rows per query, nearest by sketch, of which the k lowest on the finer sketch give UB
WINDOW = 1024  # rows either side of a block's keys (in key order) among which the candidates are sought
BLOCK = 128  # queries per block, in key order: its candidates come from one window of the bank
GROUP = 32  # queries per scan, in order of UB within a block: a scan covers the bank rows whose keys its queries can reach
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

    The bank's sketches are stored in key order. Queries are searched in key order too, in blocks of BLOCK
    queries (fewer where a block's scan would pass `block_bytes`); for each block:
      1. candidates: the CANDIDATES rows nearest by sketch (SKETCH_DIMS[0] directions, one float32 product) among
         the `window` rows on either side of the block's keys; the k of them lowest on the finer sketch
         (SKETCH_DIMS[1] directions, float64) get their exact fp32 distance, whose largest, raised by its rounding
         bound, is an upper bound UB of the true k-th nearest distance;
      2. every row whose key is farther than UB from a query's key is out (one slice of the sorted bank); of the
         rows between, those whose sketch distance, less the product's rounding bound (gamma), exceeds UB are out;
         the finer sketch rules out more, and the rows left get their exact distance;
      3. of those, the k nearest by (exact distance, bank index); distances close enough to the k-th for float32
         rounding to matter are recomputed in float64, so the ranking is float64's and the same whatever the batch,
         the blocks, the thread count or the instruction set.
    No row is ruled out by an estimate: each bound carries the rounding of the arithmetic that made it, so the
    result is a float64 brute force's (ties: the lower bank index), for any bank and any queries. The candidates
    and the window only decide how tight UB is: what the bounds cannot rule out costs time, never correctness.
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
        # the scan's product, one matrix: (s(x), 1) . (-2 s(y), ||s(y)||^2) = ||s(y)||^2 - 2 s(x).s(y), float32 [M, d1 + 2]
        self.register_buffer("scan_rows", torch.cat([-2 * scan, (scan**2).sum(1, keepdim=True)], 1).float())
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
        x = rows.double() - self.mean
        projected = x @ self.basis.T
        squared = (x * x).sum(1, keepdim=True)
        short = projected[:, : self.dims[0]]
        left_out = (squared - (short * short).sum(1, keepdim=True)).clamp_min(0).sqrt()
        left_out_all = (squared - (projected * projected).sum(1, keepdim=True)).clamp_min(0).sqrt()
        return torch.cat([short, left_out], 1), torch.cat([projected, left_out_all], 1)

    def key(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows' keys, P[0].(x - mean), in float32 [n]: they only put queries in order, into blocks whose keys are
        close (search_block computes its queries' keys again in float64, for the bounds)."""
        return (rows.float() - self.mean.float()) @ self.basis[0].float()

    def forward(self, queries: torch.Tensor, k: int, squared: bool = False, block_bytes: int = 2**26) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances (squared ones if asked) and bank indices, each [n, k]. Queries go in key order, in blocks of
        block_rows(M, block_bytes): a block's scan ([rows, M] float32 at most) stays under `block_bytes`."""
        if not 1 <= k <= len(self.bank):
            raise ValueError(f"k={k} nearest neighbours asked for, but the memory bank has {len(self.bank)}")
        by_key = self.key(queries).argsort(stable=True)
        blocks = queries.float()[by_key].split(block_rows(len(self.bank), block_bytes))
        distances, indices = (torch.cat(part) for part in zip(*(self.search_block(q, k) for q in blocks)))
        back = torch.empty_like(by_key)
        back[by_key] = torch.arange(len(by_key), device=by_key.device)
        distances, indices = distances[back], indices[back]
        return (distances if squared else distances.sqrt()).float(), indices

    def span(self, low: torch.Tensor, high: torch.Tensor) -> tuple[int, int]:
        """Positions [a, b) in key order of the bank rows whose keys lie in [low, high]."""
        a = int(torch.searchsorted(self.keys, low.reshape(1)))
        return a, int(torch.searchsorted(self.keys, high.reshape(1), right=True))

    def search_block(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances (float64) and bank indices [n, k] of one block of queries (fast when their keys are close)."""
        n, n_rows = len(q), len(self.bank)
        scan, second = self.sketches(q)
        key, scan32 = second[:, 0], scan.float()
        lhs = torch.cat([scan32, torch.ones(n, 1, device=q.device)], 1)
        margin = FP32_EPS * self.norm_max + SLACK * (second.norm(dim=1) + self.norm_max)  # the stored sketches' rounding, float64's
        # 1. the candidates: the c nearest by sketch among the `window` rows either side of the block's keys: UB
        c = min(n_rows, max(self.candidates, k))
        w = max(self.window, (c + 1) // 2)  # 2 w >= c rows, or the whole bank
        a, b = self.span(key.min(), key.max())
        a, b = max(0, min(a - w, n_rows - 2 * w)), min(n_rows, max(b + w, 2 * w))
        upper = self.upper_bound(q, second, margin, (lhs @ self.scan_rows[a:b].T).topk(c, dim=1, largest=False).indices + a, k)
        # 2. the scan of the rows in key range, for groups of GROUP queries whose UBs are close (a far query, a defect's
        #    patch, widens only its own group's range)
        groups = upper.argsort().split(GROUP)
        which, rows = zip(*(self.scan(q[g], lhs[g], second[g], margin[g], upper[g], k, c) for g in groups))
        which = torch.cat([g[w] for g, w in zip(groups, which)])
        order = which.argsort(stable=True)
        return self.k_nearest(q, which[order], torch.cat(rows)[order], k)

    def scan(self, q: torch.Tensor, lhs: torch.Tensor, second: torch.Tensor, margin: torch.Tensor, upper: torch.Tensor,
             k: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The pairs (query, bank index) that no bound rules out, for queries with sketches `second`, scan rows `lhs`
        and upper bounds `upper`. Rows whose key is farther than UB (+ margin) from every query's are out: the scan
        covers the rows between, and its c nearest by sketch may give a lower UB. There a row is out when its lower
        bound exceeds UB: sqrt(sketch distance^2 - rounding) - margin > UB. The product is a sum of d1 + 2 terms whose
        magnitudes add up to at most (||s(x)|| + ||s(y)||)^2."""
        key, scan32 = second[:, 0], lhs[:, :-1]
        a, b = self.span((key - upper - margin).min(), (key + upper + margin).max())
        partial = lhs @ self.scan_rows[a:b].T  # ||s(y)||^2 - 2 s(x).s(y); ||s(x)||^2 joins the threshold instead
        if b - a >= c:
            upper = torch.minimum(upper, self.upper_bound(q, second, margin, partial.topk(c, dim=1, largest=False).indices + a, k))
        rounding = gamma(self.dims[0] + 4) * (scan32.double().norm(dim=1) + self.norm_max) ** 2
        threshold = (upper + margin) ** 2 + rounding - (scan32.double() ** 2).sum(1)
        threshold = torch.nextafter(threshold.float(), torch.tensor(float("inf"), device=q.device))
        which, row = (partial <= threshold[:, None]).nonzero(as_tuple=True)
        row = row + a
        keep = self.lower_bounds(second, margin, which, row) <= upper[which]  # the finer sketch's second look
        return which[keep], self.order[row[keep]]

    def upper_bound(self, q: torch.Tensor, second: torch.Tensor, margin: torch.Tensor, nearest: torch.Tensor, k: int) -> torch.Tensor:
        """UB [n] from c candidates per query (positions in key order, [n, c]): the k of them lowest on the finer
        sketch get their exact fp32 distance, and the largest, raised by its rounding bound, is UB."""
        (n, c), every = nearest.shape, torch.arange(len(q), device=q.device)
        lower = self.lower_bounds(second, margin, every.repeat_interleave(c), nearest.flatten()).view(n, c)
        first = nearest.gather(1, lower.topk(k, dim=1, largest=False).indices)
        seen = self.exact_fp32(q, every.repeat_interleave(k), self.order[first.flatten()]).view(n, k)
        return (seen.amax(1).double() * (1 + 2 * gamma(q.shape[1] + 2))).sqrt() * (1 + SLACK)

    def lower_bounds(self, second: torch.Tensor, margin: torch.Tensor, which: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """||s(x) - s(y)|| - margin on the finer sketch, in float64, for the pairs (queries[which], rows in key order)."""
        return (second[which] - self.second_sketch[rows].double()).norm(dim=1) - margin[which]

    def exact_fp32(self, q: torch.Tensor, which: torch.Tensor, rows: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """sum_i (q_i - m_i)^2 in float32, directly (no expansion), for the pairs (q[which], bank[rows]), `chunk`
        pairs at a time. Within gamma(C + 2) of the exact value, relatively."""
        out = torch.empty(len(which), device=q.device)
        for lo in range(0, len(which), chunk):
            diff = q.index_select(0, which[lo : lo + chunk]).sub_(self.bank.index_select(0, rows[lo : lo + chunk]))
            out[lo : lo + chunk] = diff.square_().sum(1)
        return out

    def k_nearest(self, q: torch.Tensor, which: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest bank rows of each query among its pairs (which, rows), `which` sorted, by (float64 distance,
        bank index): squared distances (float64) and indices [n, k]. Pairs within float32's rounding of the k-th get
        their distance in float64; the others cannot be among the k."""
        n = len(q)
        counts = torch.bincount(which, minlength=n)  # k or more each: the k nearest are never ruled out
        slot = torch.arange(len(which), device=q.device) - (torch.cumsum(counts, 0) - counts)[which]
        d32 = torch.full((n, int(counts.max())), float("inf"), device=q.device)
        d32[which, slot] = self.exact_fp32(q, which, rows)
        index = torch.full(d32.shape, len(self.bank), dtype=torch.long, device=q.device)  # past the bank: padding
        index[which, slot] = rows
        band = d32 <= d32.kthvalue(k, dim=1).values[:, None] * (1 + 4 * gamma(q.shape[1] + 2))
        d64 = torch.full(d32.shape, float("inf"), dtype=torch.float64, device=q.device)
        which, slot = band.nonzero(as_tuple=True)
        d64[which, slot] = ((q[which].double() - self.bank[index[which, slot]].double()) ** 2).sum(1)
        by_index = index.argsort(dim=1, stable=True)
        index, d64 = index.gather(1, by_index), d64.gather(1, by_index)
        order = d64.argsort(dim=1, stable=True)[:, :k]
        return d64.gather(1, order), index.gather(1, order)

    def describe(self) -> str:
        return (f"exact: key and sketch bounds ({self.dims[0]} and {self.dims[1]} principal directions) rule rows out, "
                f"the rest ranked by exact distance (float64 where float32 could tie)")


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
