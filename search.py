"""Nearest-neighbour search over the memory bank: the k nearest bank rows of each query patch.

Three searches, all torch.nn.Modules holding the bank as a buffer, called as search(queries, k):
- TorchSearch: candidates from a distance product in fp32 or a low precision (int8 on a CPU with
  VNNI, fp16 on a GPU), re-ranked exactly in fp32; torch operations only;
- ScanSearch: TorchSearch's fp32 search as an exportable graph (one scan over blocks of queries);
- FaissSearch: faiss's IndexFlatL2 (on the GPU where faiss has GPUs); it leaves torch for numpy.
resolve_search decides which one runs for a device.
"""

from __future__ import annotations

import functools

import faiss
import faiss.contrib.torch_utils  # noqa: F401  (a GPU index then takes and returns torch tensors on its device)
import numpy as np
import torch

from backbone import AMP_DTYPES
from system import cpu_supports, warn_once

SEARCHES = ("auto", "faiss", "torch", "fast")
# candidates per query that TorchSearch re-ranks, by the precision of its product. On random-init WideResNet
# features one candidate found every nearest neighbour in every precision, on a coreset bank and on a dense one
# (benchmarks/benchmark.py --stages search [--search_bank dense]); these keep a margin, larger where the product
# has fewer bits, for features that could not be tried here. 32 instead of 1 costs about 7 % of the int8 search.
RERANK_CANDIDATES = {"fp32": 8, "fp16": 8, "int8": 32, "bf16": 128}


def resolve_search(search: str, device: torch.device) -> tuple[str, str | None]:
    """(the search that runs: faiss, torch or fast; the fast search's low precision) for `search` on `device`.
    auto: fast on a CPU with VNNI, else faiss where it runs on the device, else torch."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    cuda = device.type == "cuda"
    faiss_here = not cuda or (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)
    low = "fp16" if cuda else "int8" if cpu_supports("int8") else None
    if search == "faiss" and not faiss_here:
        raise ValueError("--search faiss: this faiss build has no GPU support; use --search torch or fast, or --device cpu")
    if search == "fast" and low is None:
        warn_once("--search fast: this CPU has no native int8 product (VNNI), so low precision would be slower than fp32; "
                  "running the fp32 torch search")  # fmt: skip
        return "torch", None
    if search == "auto":
        search = "fast" if low and not cuda else "faiss" if faiss_here else "torch"
    return search, low if search == "fast" else None


def make_search(bank: torch.Tensor, search: str, low_precision: str | None) -> TorchSearch | FaissSearch:
    """The search module that runs (resolve_search's answer) over a float32 bank on its device."""
    if search == "faiss":
        return FaissSearch(bank)
    return TorchSearch(bank, low_precision or "fp32")


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, d] as int8 with one scale per row (its largest magnitude / 127): x ~ scale[:, None] * int8."""
    scale = x.abs().amax(1).clamp_min(1e-12) / 127
    return (x / scale[:, None]).round_().to(torch.int8), scale


class TorchSearch(torch.nn.Module):
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
        super().__init__()
        self.precision, self.candidates = precision, candidates or RERANK_CANDIDATES[precision]
        bank = bank.float()
        mean = bank.mean(0)
        centered = bank - mean
        self.register_buffer("bank", bank)
        self.register_buffer("mean", mean)
        self.register_buffer("centered_sq", (centered**2).sum(1))
        if precision == "int8":
            low, scale = _int8_rows(centered)
            self.register_buffer("scale", scale)
        else:
            low = centered.to(AMP_DTYPES.get(precision) or torch.float32)
        self.register_buffer("low", low)

    def forward(self, queries: torch.Tensor, k: int, squared: bool = False, block_bytes: int = 2**28) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances (squared ones if asked) and bank indices, each [M, k]. Queries go in chunks whose
        largest temporary (the distance block, or one candidate's difference rows) stays under `block_bytes`."""
        n_candidates = min(len(self.bank), max(self.candidates, k))
        rows = max(1, block_bytes // (4 * max(len(self.bank), self.bank.shape[1])))  # query rows per chunk
        distances, indices = [], []
        for q in queries.split(rows):
            value, index = self.search_block(q, k, n_candidates)
            distances.append(value if squared else value.sqrt())
            indices.append(index)
        return torch.cat(distances), torch.cat(indices)

    def search_block(self, q: torch.Tensor, k: int, n_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distances and bank indices [len(q), k] of one block of queries: the `n_candidates`
        nearest rows by the product, re-ranked by their exact fp32 distances."""
        q = q.float()
        centered = q - self.mean
        d2 = self.cross(centered).mul_(-2).add_(self.centered_sq).add_((centered**2).sum(1, keepdim=True))
        index = d2.topk(n_candidates, dim=1, largest=False).indices
        exact = torch.stack([((q - self.bank[index[:, j]]) ** 2).sum(1) for j in range(n_candidates)], dim=1)
        value, order = exact.topk(k, dim=1, largest=False)  # the exact re-rank
        return value, index.gather(1, order)

    def cross(self, centered: torch.Tensor) -> torch.Tensor:
        """The product of centred queries [n, C] with the centred bank [M, C], in this search's precision: [n, M] fp32."""
        if self.precision == "int8":
            q_low, q_scale = _int8_rows(centered)
            return torch._int_mm(q_low, self.low.T).float().mul_(q_scale[:, None]).mul_(self.scale)
        return (centered.to(self.low.dtype) @ self.low.T).float()

    def describe(self) -> str:
        return f"torch, {self.precision} candidates ({self.candidates} per patch) re-ranked exactly in fp32"


class ScanSearch(TorchSearch):
    """TorchSearch's fp32 search (the same candidates, the same exact re-rank) in the form an exported graph needs
    (onnx_export.py): one graph for any number of queries, the bank in it once, its memory bounded.

    - Queries go through torch's scan in blocks of `rows` (fewer when there are fewer queries; the last block
      padded): a runtime holds one block's [rows, M] distances at a time, whatever the batch. TorchSearch's
      Python loop over a query-dependent number of chunks would be unrolled for one batch size by an export.
    - The product's centred bank is computed from the bank inside each block step rather than stored beside it,
      so the file holds the bank once (onnxruntime folds the subtraction into a constant when it loads the file,
      and then holds it twice, as TorchSearch does). Inside the step, because OpenVINO cannot convert a scan
      whose body reads a value computed outside it.
    """

    def __init__(self, bank: torch.Tensor, rows: int) -> None:
        torch.nn.Module.__init__(self)  # TorchSearch's buffers but for the stored low-precision copy
        bank = bank.float()
        mean = bank.mean(0)
        self.register_buffer("bank", bank)
        self.register_buffer("mean", mean)
        self.register_buffer("centered_sq", ((bank - mean) ** 2).sum(1))
        self.precision, self.candidates, self.rows = "fp32", RERANK_CANDIDATES["fp32"], rows

    def cross(self, centered: torch.Tensor) -> torch.Tensor:
        return centered @ (self.bank - self.mean).T

    def forward(self, queries: torch.Tensor, k: int, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 distances (squared ones if asked) and bank indices, each [M, k], as TorchSearch gives them."""
        from torch._higher_order_ops.scan import scan  # torch's loop operator; exported as ONNX Scan

        n_candidates = min(len(self.bank), max(self.candidates, k))
        n, width = queries.shape
        rows = min(self.rows, n)
        blocks = (n + rows - 1) // rows
        padded = torch.cat([queries.float(), queries.new_zeros(blocks * rows - n, width)]).reshape(blocks, rows, width)
        _, (value, index) = scan(lambda carry, q: (carry.clone(), self.search_block(q, k, n_candidates)), queries.new_zeros(1), padded)
        value, index = value.reshape(-1, k)[:n], index.reshape(-1, k)[:n]
        return (value if squared else value.sqrt()), index

    def describe(self) -> str:
        return f"torch scan over blocks of {self.rows} queries, fp32 candidates ({self.candidates} per patch) re-ranked exactly in fp32"


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
