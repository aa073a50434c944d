"""ExactSearch in ONNX ops: the translation of search.exact_knn (patchcore::exact_knn, one block of queries) that
onnx_export.py gives torch's ONNX exporter, so that the exported graph searches as ExactSearch does, without torch.

The bounds are ExactSearch's (search.py explains them), with the same rounding margins, in the steps of one small
block (the graph's blocks hold 32 queries, so there is one window a block, and the tiles are scanned by all 32):
  1. the queries' sketches and keys in float64; the scan's float32 product (Gemm) with the rows of the slabs
     holding the block's keys, 2 `window` rows at least (a Slice of the bank's layout; ONNX has no searchsorted, so a
     slab's index is a count of slabs below), its CANDIDATES smallest (TopK);
  2. the candidates' direct float32 distances and UB, the k-th of them raised by its rounding bound (ExactSearch
     computes only the k candidates lowest on the finer sketch: a UB as valid, not lower);
  3. the rows of the tiles whose box lies within UB of one of the queries (a Gather of tiles), of those the rows
     whose scan bound does not exceed UB (NonZero), less the candidates, and of those the rows the second sketch
     keeps (float64; ExactSearch: float32, less its rounding): their direct float32 distances, in one padded [n, w]
     matrix (ScatterND) beside the candidates';
  4. the rows within float32's rounding of the k-th get their distance in float64; then the rows sorted by bank
     index and the k smallest distances taken with TopK, which puts the lower index first on ties: the ranking is
     (float64 distance, bank index), float64 brute force's.
Two steps are written differently, with the same guarantee: the threshold is rounded up to float32 by a relative
margin of 2^-22 (ONNX has no nextafter), and the reach of the boxes is widened by float32's rounding of the
coordinates (for runtimes that compute float64 as float32). Pair distances are computed PAIR_CHUNK pairs at a time
(an ONNX Loop). A block holds its scan of the tiles it reaches ([rows, M] at the very worst), a mask and the (query, row) pairs the
mask leaves.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import DOUBLE as DOUBLE_T
from onnxscript import FLOAT as FLOAT_T
from onnxscript import INT64 as INT64_T
from onnxscript import opset18 as op  # the exporter's default opset: the function is inlined into its graph
from onnxscript import script

from method.search import FP32_EPS, SLAB, SLACK, TILE, gamma

FLOAT, INT32, DOUBLE = 1, 6, 11  # ONNX's element types
PAIR_CHUNK = 2048  # pairs whose distance one Loop step computes: [PAIR_CHUNK, C] differences at a time (written out in pair_distances)


def constant(value, dtype) -> ir.Value:
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


def pair_distances(left, right, which, rows, float64: bool):
    """sum_i (left[which]_i - right[rows]_i)^2 for each pair, directly (no expansion), in float64 or float32,
    PAIR_CHUNK pairs a Loop step."""
    return (pair_distances64 if float64 else pair_distances32)(left, right, which, rows)


@script()
def pair_distances32(left: FLOAT_T[...], right: FLOAT_T[...], which: INT64_T[...], rows: INT64_T[...]) -> FLOAT_T[...]:
    chunk = op.Constant(value_ints=[2048])
    steps = op.Reshape(op.Div(op.Add(op.Shape(which), op.Constant(value_ints=[2047])), chunk), op.Constant(value_ints=[]))
    empty = op.Max(op.Sub(op.Shape(which), op.Shape(which)), op.Constant(value_ints=[0]))  # [0], a size no inference fixes, >= 0
    out = op.Cast(op.ConstantOfShape(empty), to=1)  # (OpenVINO needs the Loop's state of open size, and a size it can bound)
    for i in range(steps):
        lo = op.Mul(op.Reshape(i, op.Constant(value_ints=[1])), chunk)
        hi = op.Add(lo, chunk)
        diff = op.Sub(op.Gather(left, op.Slice(which, lo, hi), axis=0), op.Gather(right, op.Slice(rows, lo, hi), axis=0))
        out = op.Concat(out, op.ReduceSum(op.Mul(diff, diff), op.Constant(value_ints=[1]), keepdims=0), axis=0)
    return out


@script()
def pair_distances64(left: FLOAT_T[...], right: FLOAT_T[...], which: INT64_T[...], rows: INT64_T[...]) -> DOUBLE_T[...]:
    chunk = op.Constant(value_ints=[2048])
    steps = op.Reshape(op.Div(op.Add(op.Shape(which), op.Constant(value_ints=[2047])), chunk), op.Constant(value_ints=[]))
    empty = op.Max(op.Sub(op.Shape(which), op.Shape(which)), op.Constant(value_ints=[0]))  # [0], a size no inference fixes, >= 0
    out = op.Cast(op.ConstantOfShape(empty), to=11)  # (OpenVINO needs the Loop's state of open size, and a size it can bound)
    for i in range(steps):
        lo = op.Mul(op.Reshape(i, op.Constant(value_ints=[1])), chunk)
        hi = op.Add(lo, chunk)
        diff = op.Sub(op.Cast(op.Gather(left, op.Slice(which, lo, hi), axis=0), to=11),
                      op.Cast(op.Gather(right, op.Slice(rows, lo, hi), axis=0), to=11))  # fmt: skip
        out = op.Concat(out, op.ReduceSum(op.Mul(diff, diff), op.Constant(value_ints=[1]), keepdims=0), axis=0)
    return out


def exact_knn(queries, k: int, candidates: int, window: int, bank, mean, basis, slabs, order, boxes, scan_rows, second_sketch,
              norm_max):
    """patchcore::exact_knn in ONNX ops: squared distances (float64) and bank indices [n, k] of one block of queries."""
    n_rows, width = (int(d) for d in bank.shape)
    d1 = int(scan_rows.shape[1]) - 2
    one, zero = ints(1), ints(0)
    n = op.Shape(queries, start=0, end=1)

    # 1. the sketches of the queries (float64), their keys, and the candidates: the scan of the `window` rows either
    #    side of the block's keys, its c smallest (TopK)
    x = op.Sub(op.Cast(queries, to=DOUBLE), mean)
    projected = op.MatMul(x, op.Transpose(basis))
    squared = op.ReduceSum(op.Mul(x, x), one, keepdims=1)
    short = op.Slice(projected, zero, ints(d1), one)
    left_out = op.Sqrt(op.Relu(op.Sub(squared, op.ReduceSum(op.Mul(short, short), one, keepdims=1))))
    left_out_all = op.Sqrt(op.Relu(op.Sub(squared, op.ReduceSum(op.Mul(projected, projected), one, keepdims=1))))
    scan32 = op.Cast(op.Concat(short, left_out, axis=1), to=FLOAT)
    second = op.Concat(projected, left_out_all, axis=1)
    key = op.Slice(projected, zero, one, one)  # [n, 1]
    ones = op.Cast(op.Expand(constant(1, np.int64), op.Concat(n, ints(1), axis=0)), to=FLOAT)
    lhs = op.Concat(scan32, ones, axis=1)  # (s(x), 1), against (-2 s(y), ||s(y)||^2)
    c = min(n_rows, max(candidates, k))
    w = max(window, (c + 1) // 2)  # 2 w >= c rows, or the whole bank
    start, end = slab_rows(slabs, op.ReduceMin(key, keepdims=0), op.ReduceMax(key, keepdims=0), n_rows)
    b = op.Min(ints(n_rows), op.Max(end, op.Add(start, ints(2 * w))))  # 2 w rows at least: c candidates
    a = op.Max(zero, op.Min(start, op.Sub(b, ints(2 * w))))
    _, nearest = op.TopK(op.Gemm(lhs, op.Slice(scan_rows, a, b, zero), transB=1), ints(c), axis=1, largest=0, sorted=1)
    cand_at = op.Add(nearest, a)  # positions
    cand = op.Gather(order, cand_at)  # bank indices

    # 2. the candidates' exact float32 distances: UB
    each = flat(op.Expand(op.Unsqueeze(arange(n), one), op.Concat(n, ints(c), axis=0)))
    d32 = op.Reshape(pair_distances(queries, bank, each, flat(cand), float64=False), ints(-1, c))
    upper = op.Mul(op.Sqrt(op.Mul(op.Cast(kth(d32, k), to=DOUBLE), f64(1 + 2 * gamma(width + 2)))), f64(1 + SLACK))  # [n, 1]

    # 3. the rows of the tiles the queries reach, and of those what the sketches leave
    scan64 = op.Cast(scan32, to=DOUBLE)
    scan_sq_q = op.ReduceSum(op.Mul(scan64, scan64), one, keepdims=1)
    spread = op.Add(op.Sqrt(scan_sq_q), norm_max)
    margin = op.Add(op.Mul(f64(FP32_EPS), norm_max), op.Mul(f64(SLACK), spread))
    reach = op.Add(upper, margin)
    # the tiles whose box some query reaches; the reach widened by float32's rounding of the two coordinates (each
    # |fl(p.x) - p.x| <= gamma_C ||x||, the stored boxes' u |p.y|, twice over for the pair): ExactSearch needs no such
    # term, but OpenVINO's CPU plugin computes float64 as float32
    box_reach = op.Add(reach, op.Mul(f64(2 * gamma(width + 2)), op.Add(op.Sqrt(squared), norm_max)))  # [n, 1]
    point = op.Unsqueeze(op.Slice(second, zero, ints(2), one), one)  # [n, 1, 2]
    low, high = op.Slice(boxes, zero, ints(2), one), op.Slice(boxes, ints(2), ints(4), one)  # [T, 2]: the tiles' boxes
    gap = op.Add(op.Relu(op.Sub(low, point)), op.Relu(op.Sub(point, high)))  # [n, T, 2]
    reached = op.LessOrEqual(op.ReduceSum(op.Mul(gap, gap), ints(2), keepdims=0), op.Mul(box_reach, box_reach))  # [n, T]
    tiles = flat(op.NonZero(op.ReduceMax(op.Cast(reached, to=INT32), zero, keepdims=0)))  # the tiles any query reaches
    rows = op.Reshape(op.Gather(op.Reshape(scan_rows, ints(-1, TILE * (d1 + 2))), tiles, axis=0), ints(-1, d1 + 2))
    partial = op.Gemm(lhs, rows, transB=1)
    rounding = op.Mul(f64(gamma(d1 + 4)), op.Mul(spread, spread))
    threshold = op.Sub(op.Add(op.Mul(reach, reach), rounding), scan_sq_q)
    # rounded up to float32: a relative 2^-22 is more than float32's half ulp, 1e-30 more than its smallest spacing
    threshold32 = op.Cast(op.Add(op.Add(threshold, op.Mul(op.Abs(threshold), f64(2.0**-22))), f64(1e-30)), to=FLOAT)  # [n, 1]
    pairs = op.NonZero(op.LessOrEqual(partial, threshold32))
    pair_query, pair_row = (flat(op.Slice(pairs, ints(i), ints(i + 1), zero)) for i in (0, 1))
    pair_row = op.Add(op.Mul(op.Gather(tiles, op.Div(pair_row, ints(TILE))), ints(TILE)), op.Mod(pair_row, ints(TILE)))  # positions
    second_sq = pair_distances(second, second_sketch, pair_query, pair_row, float64=True)
    lower = op.Sub(op.Sqrt(second_sq), op.Gather(flat(margin), pair_query))
    keep = op.LessOrEqual(lower, op.Gather(flat(upper), pair_query))
    # less the query's candidates, whose distances d32 holds (they join below, so that a runtime computing float64
    # as float32 still finds k rows for each query)
    a_candidate = op.ReduceSum(op.Cast(op.Equal(op.Unsqueeze(pair_row, one), op.Gather(cand_at, pair_query)), to=7), one, keepdims=0)
    keep = op.And(keep, op.Equal(a_candidate, constant(0, np.int64)))
    query = op.Compress(pair_query, keep, axis=0)  # the block's query of each pair, ascending
    row = op.Gather(order, op.Compress(pair_row, keep, axis=0))  # bank indices
    # each pair's slot in its query's row of a padded [n, w] matrix; padding: row n_rows, distance inf
    counts = op.ScatterElements(op.Expand(constant(0, np.int64), n), query, op.Expand(constant(1, np.int64), op.Shape(query)),
                                reduction="add")  # fmt: skip
    slot = op.Sub(arange(op.Shape(query)), op.Gather(op.CumSum(counts, constant(0, np.int64), exclusive=1), query))
    shape = op.Concat(n, op.ReduceMax(op.Concat(counts, zero, axis=0), zero, keepdims=1), axis=0)
    where = op.Concat(op.Unsqueeze(query, one), op.Unsqueeze(slot, one), axis=1)
    extra_rows = op.ScatterND(op.Expand(constant(n_rows, np.int64), shape), where, row)
    extra = op.ScatterND(op.Expand(constant(np.inf, np.float32), shape), where, pair_distances(queries, bank, query, row, float64=False))
    rows_all, d32_all = op.Concat(cand, extra_rows, axis=1), op.Concat(d32, extra, axis=1)

    # 4. the k nearest by (float64 distance, bank index)
    band = op.LessOrEqual(d32_all, op.Mul(kth(d32_all, k), constant(1 + 4 * gamma(width + 2), np.float32)))
    where = op.Transpose(op.NonZero(band))  # [B, 2]: (query, slot)
    d64_band = pair_distances(queries, bank, flat(op.Slice(where, zero, one, one)), op.GatherND(rows_all, where), float64=True)
    d64 = op.ScatterND(op.Expand(constant(np.inf, np.float64), op.Shape(rows_all)), where, d64_band)
    _, by_index = op.TopK(rows_all, op.Shape(rows_all, start=1, end=2), axis=1, largest=0, sorted=1)
    rows_all, d64 = op.GatherElements(rows_all, by_index, axis=1), op.GatherElements(d64, by_index, axis=1)
    distances, order = op.TopK(d64, ints(k), axis=1, largest=0, sorted=1)  # ties: the lower index first
    return distances, op.GatherElements(rows_all, order, axis=1)


def slab_rows(slabs, low, high, n_rows: int):
    """The positions [start, end), each [1], of the slabs that hold every bank row whose key
    lies in [low, high] (slabs: each slab's lowest and highest key, [2, S]; ONNX has no searchsorted, so a slab's
    index is a count of slabs)."""
    lowest, highest = (flat(op.Slice(slabs, ints(i), ints(i + 1), ints(0))) for i in (0, 1))
    start = op.Mul(op.Reshape(op.ReduceSum(op.Cast(op.Less(highest, low), to=7), keepdims=0), ints(1)), ints(SLAB))
    end = op.Mul(op.Reshape(op.ReduceSum(op.Cast(op.LessOrEqual(lowest, high), to=7), keepdims=0), ints(1)), ints(SLAB))
    return start, op.Max(start, op.Min(end, ints(n_rows)))


def kth(distances, k: int):
    """The k-th smallest of each row, [n, 1]."""
    values, _ = op.TopK(distances, ints(k), axis=1, largest=0, sorted=1)
    return op.Slice(values, ints(k - 1), ints(k), ints(1))


def ints(*values: int):
    return constant(values, np.int64)


def f64(value: float):
    return constant(value, np.float64)


def flat(x):
    return op.Reshape(x, ints(-1))


def arange(length):
    """0, 1, ..., length - 1 for a length [1]."""
    return op.Range(constant(0, np.int64), op.Reshape(length, constant(np.zeros(0), np.int64)), constant(1, np.int64))


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export: patchcore::exact_knn in the ops above."""
    import torch

    from method import search  # noqa: F401  (registers patchcore::exact_knn)

    return {torch.ops.patchcore.exact_knn.default: exact_knn}

