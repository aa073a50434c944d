"""Nearest-neighbour search over the memory bank: the k nearest bank rows of each query patch.

Three searches, all torch.nn.Modules holding the bank as a buffer, called as search(queries, k):
- ExactSearch (the default, on every device): the k rows nearest by exact distance, certified. Cheap
  lower bounds (a sketch of each row, below) rule out most of the bank; only rows they cannot rule
  out get their distance computed, and the answer is the same as a float64 brute force would give;
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
SKETCH_DIMS = (32, 128)  # the sketches' principal directions: the scan over the whole bank, the second look at what it left
CANDIDATES = 8  # rows per query whose exact distance bounds the k-th nearest before the scan's rows are ruled out
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


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): a float32 sum of n products is within gamma_n of the exact sum of their magnitudes
    (Higham, Accuracy and Stability of Numerical Algorithms, Sec. 3.1), in any order and with or without FMA."""
    return n * FP32_EPS / (1 - n * FP32_EPS)


class ExactSearch(torch.nn.Module):
    """The k nearest bank rows of each query by exact distance, and those distances.

    The bound. Centre rows on the bank's mean (x = q - mean, y = m - mean) and take P, the bank's top principal
    directions, orthonormal (float64). The sketch of a row is s(x) = (P x, ||x - P^T P x||): its projection and
    the length of what the projection leaves out. Then, for every pair,

        ||s(x) - s(y)||^2 = ||P(x - y)||^2 + (||Rx|| - ||Ry||)^2  <=  ||P(x - y)||^2 + ||R(x - y)||^2 = ||q - m||^2

    (R = I - P^T P; the reverse triangle inequality), so a sketch distance never exceeds the true one. On patch
    features the bank's variance sits in few directions and the bound is tight.

    The search, for each block of queries:
      1. the scan: every bank row's sketch distance (SKETCH_DIMS[0] directions) in one float32 product, and the
         CANDIDATES + 1 smallest;
      2. the exact fp32 distances of the CANDIDATES nearest by sketch: the k-th of them, raised by its rounding
         bound, is an upper bound UB of the true k-th nearest distance;
      3. every row whose lower bound (its sketch distance less the product's rounding bound, gamma) exceeds UB is
         farther than k rows already seen, and is out. Where the scan's (CANDIDATES + 1)-th smallest is out, so is
         every row but the candidates: certified. Otherwise the rows it cannot rule out get a second look, the
         sketch on SKETCH_DIMS[1] directions (float64), and those it keeps their exact distance;
      4. of the rows left, the k nearest by (exact distance, bank index); distances close enough to the k-th for
         float32 rounding to matter are recomputed in float64, so the ranking is float64's and the same whatever
         the batch, thread count or instruction set.
    No row is ruled out by an estimate: each bound carries the rounding of the arithmetic that made it, so the
    result is a float64 brute force's (ties: the lower bank index), for any bank and any queries. What bounds
    cannot rule out costs time, never correctness.
    """

    def __init__(self, bank: torch.Tensor, candidates: int = CANDIDATES, sketch_dims: tuple[int, int] = SKETCH_DIMS) -> None:
        super().__init__()
        bank = bank.float().contiguous()
        n_rows, width = bank.shape
        self.candidates = candidates
        self.register_buffer("bank", bank)
        self.register_buffer("mean", bank.double().mean(0))
        # P: the top principal directions of the centred bank (of up to 8,192 evenly spaced rows), orthonormal in float64
        sample = bank[:: max(1, n_rows // 8192)] - self.mean.float()
        _, vectors = torch.linalg.eigh((sample.T @ sample).double())  # any orthonormal P gives the bound: float32 suffices here
        self.dims = (min(sketch_dims[0], width), min(sketch_dims[1], width))
        self.register_buffer("basis", vectors.flip(1)[:, : self.dims[1]].T.contiguous())
        sketches = [self.sketches(rows) for rows in bank.split(4096)]  # float64, made once
        scan, second = (torch.cat(level).float() for level in zip(*sketches))
        self.register_buffer("scan_sketch", scan)  # [M, d1 + 1], float32: the scan's product
        self.register_buffer("scan_sq", (scan.double() ** 2).sum(1).float())
        self.register_buffer("second_sketch", second)  # [M, d2 + 1], float32
        self.register_buffer("norm_max", (bank.double() - self.mean).norm(dim=1).max())  # ||y|| = ||s(y)|| for every y

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor], candidates: int = CANDIDATES) -> ExactSearch:
        """The search over buffers an ExactSearch made (its state_dict), without computing them again."""
        search = cls.__new__(cls)
        torch.nn.Module.__init__(search)
        for name, value in buffers.items():
            search.register_buffer(name, value)
        search.candidates = candidates
        search.dims = (buffers["scan_sketch"].shape[1] - 1, buffers["basis"].shape[0])
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

    def forward(self, queries: torch.Tensor, k: int, squared: bool = False, block_bytes: int = 2**24) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances (squared ones if asked) and bank indices, each [n, k]. Queries go in blocks whose scan
        ([rows, M] float32) stays under `block_bytes`."""
        if not 1 <= k <= len(self.bank):
            raise ValueError(f"k={k} nearest neighbours asked for, but the memory bank has {len(self.bank)}")
        rows = max(1, block_bytes // (4 * len(self.bank)))
        distances, indices = zip(*(self.search_block(q.float(), k) for q in queries.split(rows)))
        distances = torch.cat(distances)
        return (distances if squared else distances.sqrt()).float(), torch.cat(indices)

    def search_block(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances (float64) and bank indices [n, k] of one block of queries."""
        n, n_rows = len(q), len(self.bank)
        scan, second = self.sketches(q)
        scan32 = scan.float()
        # 1. the scan: ||s(y)||^2 - 2 s(x).s(y) for every bank row; ||s(x)||^2 joins the threshold instead
        partial = torch.addmm(self.scan_sq, scan32, self.scan_sketch.T, alpha=-2)
        c = min(n_rows, max(self.candidates, k))
        smallest, nearest = partial.topk(min(n_rows, c + 1), dim=1, largest=False)
        # 2. exact distances of the c candidates: an upper bound of the k-th nearest
        d32 = self.exact_fp32(q, torch.arange(n, device=q.device).repeat_interleave(c), nearest[:, :c].flatten()).view(n, c)
        upper = (d32.kthvalue(k, dim=1).values.double() * (1 + 2 * gamma(q.shape[1] + 2))).sqrt()
        # 3. what the bounds leave: a row is out when sqrt(its sketch distance^2 - rounding) - margin > upper
        scan_norm = scan32.double().norm(dim=1)
        margin = FP32_EPS * self.norm_max + SLACK * (scan_norm + self.norm_max)  # the stored sketches' rounding, float64's
        rounding = gamma(self.dims[0] + 4) * (scan_norm + self.norm_max) ** 2  # the float32 product's
        threshold = (upper + margin) ** 2 + rounding - (scan32.double() ** 2).sum(1)
        threshold = torch.nextafter(threshold.float(), torch.tensor(float("inf"), device=q.device))
        certified = smallest[:, -1] > threshold if c < n_rows else torch.ones(n, dtype=torch.bool, device=q.device)
        out_d = torch.empty(n, k, dtype=torch.float64, device=q.device)
        out_i = torch.empty(n, k, dtype=torch.long, device=q.device)
        if certified.any():
            out_d[certified], out_i[certified] = self.k_nearest(q[certified], nearest[certified, :c], d32[certified], k)
        unsure = (~certified).nonzero()[:, 0]
        if len(unsure):
            pair_query, pair_row = (partial[unsure] <= threshold[unsure, None]).nonzero(as_tuple=True)
            lower = (second[unsure][pair_query] - self.second_sketch[pair_row].double()).norm(dim=1) - margin[unsure][pair_query]
            keep = lower <= upper[unsure][pair_query] * (1 + SLACK)
            pair_query, pair_row = pair_query[keep], pair_row[keep]
            counts = torch.bincount(pair_query, minlength=len(unsure))  # at least k each: the k nearest are never out
            slot = torch.arange(len(pair_query), device=q.device) - (torch.cumsum(counts, 0) - counts)[pair_query]
            rows = torch.full((len(unsure), int(counts.max())), n_rows, dtype=torch.long, device=q.device)  # n_rows: padding
            rows[pair_query, slot] = pair_row
            d = torch.full(rows.shape, float("inf"), device=q.device)
            d[pair_query, slot] = self.exact_fp32(q, unsure[pair_query], pair_row)
            out_d[unsure], out_i[unsure] = self.k_nearest(q[unsure], rows, d, k)
        return out_d, out_i

    def exact_fp32(self, q: torch.Tensor, which: torch.Tensor, rows: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """sum_i (q_i - m_i)^2 in float32, directly (no expansion), for the pairs (q[which], bank[rows]), `chunk`
        pairs at a time. Within gamma(C + 2) of the exact value, relatively."""
        out = torch.empty(len(which), device=q.device)
        for lo in range(0, len(which), chunk):
            diff = q[which[lo : lo + chunk]] - self.bank[rows[lo : lo + chunk]]
            out[lo : lo + chunk] = (diff * diff).sum(1)
        return out

    def k_nearest(self, q: torch.Tensor, rows: torch.Tensor, d32: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest of each query's `rows` [n, w] by (float64 distance, bank index): the rows within float32's
        rounding of the k-th get their distance in float64, the others cannot be among the k."""
        band = d32 <= d32.kthvalue(k, dim=1).values[:, None] * (1 + 4 * gamma(q.shape[1] + 2))
        d64 = torch.full(rows.shape, float("inf"), dtype=torch.float64, device=q.device)
        which, slot = band.nonzero(as_tuple=True)
        d64[which, slot] = ((q[which].double() - self.bank[rows[which, slot]].double()) ** 2).sum(1)
        by_index = rows.argsort(dim=1, stable=True)
        rows, d64 = rows.gather(1, by_index), d64.gather(1, by_index)
        order = d64.argsort(dim=1, stable=True)[:, :k]
        return d64.gather(1, order), rows.gather(1, order)

    def describe(self) -> str:
        return (f"exact: sketch bounds ({self.dims[0]} and {self.dims[1]} principal directions) rule rows out, "
                f"the rest ranked by exact distance (float64 where float32 could tie)")


@torch.library.custom_op("patchcore::exact_knn", mutates_args=())
def exact_knn(queries: torch.Tensor, k: int, candidates: int, bank: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor,
              scan_sketch: torch.Tensor, scan_sq: torch.Tensor, second_sketch: torch.Tensor, norm_max: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """ExactSearch.search_block as one torch operation over its buffers: squared distances (float64) and bank
    indices [n, k]. torch.export sees one node with these static output shapes; onnx_search.py gives its ONNX ops."""
    buffers = {"bank": bank, "mean": mean, "basis": basis, "scan_sketch": scan_sketch, "scan_sq": scan_sq,
               "second_sketch": second_sketch, "norm_max": norm_max}  # fmt: skip
    return ExactSearch.from_buffers(buffers, candidates).search_block(queries.float(), k)


@exact_knn.register_fake
def _(queries, k, candidates, bank, mean, basis, scan_sketch, scan_sq, second_sketch, norm_max):
    return queries.new_empty(len(queries), k, dtype=torch.float64), queries.new_empty(len(queries), k, dtype=torch.long)


class GraphSearch(ExactSearch):
    """ExactSearch as the exported graph runs it (onnx_export.py): torch's scan (ONNX Scan) over blocks of `rows`
    queries (fewer when there are fewer; the last block padded), each block one patchcore::exact_knn operation, which
    the export writes as ONNX ops (onnx_search.py). A runtime holds one block's [rows, M] scan at a time, whatever
    the batch: a Python loop over a query-dependent number of blocks would be unrolled for one batch size by an export.
    Same answers as ExactSearch: the k nearest by (float64 distance, bank index)."""

    def __init__(self, bank: torch.Tensor, rows: int, candidates: int = CANDIDATES) -> None:
        super().__init__(bank, candidates)
        self.rows = rows

    def forward(self, queries: torch.Tensor, k: int, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances (squared ones if asked) and bank indices, each [n, k]."""
        from torch._higher_order_ops.scan import scan  # torch's loop operator; exported as ONNX Scan

        if not 1 <= k <= len(self.bank):
            raise ValueError(f"k={k} nearest neighbours asked for, but the memory bank has {len(self.bank)}")
        n, width = queries.shape
        rows = min(self.rows, n)
        blocks = (n + rows - 1) // rows
        padded = torch.cat([queries.float(), queries.new_zeros(blocks * rows - n, width)]).reshape(blocks, rows, width)
        buffers = (self.bank, self.mean, self.basis, self.scan_sketch, self.scan_sq, self.second_sketch, self.norm_max)

        def step(carry: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            return carry.clone(), torch.ops.patchcore.exact_knn(q, k, self.candidates, *buffers)

        _, (distances, indices) = scan(step, queries.new_zeros(1), padded)
        distances, indices = distances.reshape(-1, k)[:n], indices.reshape(-1, k)[:n]
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
