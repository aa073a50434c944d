"""The training-set audit and the robust bank (issue 29): which training images look defective, and which bank rows
no other training image vouches for.

On a real line train/good is sorted by people, and defective parts slip in. Greedy k-center (Alg. 1) picks the
patches farthest from everything first, so a defect in a training image is all but certain to enter the memory
bank, where it makes the same defect look normal at test. Both steps here rest on one number per bank row r,
its leave-one-image-out distance

    a(r) = min { ||P r - P s|| : s in the bank, image(s) != image(r) }

in the coreset's random projection P (Alg. 1's own distances, Johnson-Lindenstrauss): how far r is from every
other training image's bank rows. A normal patch has near neighbours in other images, or is near a bank row
that has; a defect seen in one image has none. No alignment is assumed: textures and rotated parts work alike.

- audit_scores: an image's score is the largest a(r) over its bank rows (an image with no row in the bank: the
  largest distance of its patches to the bank, which then holds none of its rows). PatchCore.fit ranks every
  training image by it; train.py prints the top few and writes train_audit.json.
- kept_rows: the robust bank (PatchCoreConfig.outlier_share) drops the share of bank rows with the largest a(r)
  before the bank is saved or calibrated with.
"""

from __future__ import annotations

import numpy as np
import torch

from method.coreset import image_rows, nearest_center

DESCRIPTION = ("each training image scored against the memory bank without its own rows: the largest distance of its bank "
               "rows to any other image's, in the coreset's projection (method/audit.py); rank 1 is the least like the "
               "others; heatmaps: the top ones scored against the bank without any of their rows")  # fmt: skip


def leave_image_out(rows: torch.Tensor, images: torch.Tensor, which: torch.Tensor | None = None, block: int = 256) -> torch.Tensor:
    """a(r) for the rows `which` (default: all) of `rows` [M, d], whose source images are `images` [M]: the distance
    to the nearest row of another image; inf where every row is one image's. float32 distance expansion, `block`
    query rows at a time ([block, M] floats in memory). Rows are visited by image, so that a block's own-image
    columns lie in one slice of the sorted rows."""
    order = torch.argsort(images.long(), stable=True)
    rows, images = rows.float()[order], images.long()[order]
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    queries = torch.arange(len(rows)) if which is None else position[which].sort().values
    squared = (rows * rows).sum(1)
    starts = torch.searchsorted(images, images, side="left")
    ends = torch.searchsorted(images, images, side="right")
    out = torch.empty(len(rows))
    for lo in range(0, len(queries), block):
        picked = queries[lo : lo + block]
        d = torch.addmm(squared[None, :], rows[picked], rows.T, alpha=-2)  # ||s||^2 - 2 r.s; ||r||^2 joins after the min
        first, last = int(starts[picked].min()), int(ends[picked].max())  # every own-image column is in this slice
        own = d[:, first:last]
        own[images[picked, None] == images[None, first:last]] = float("inf")
        out[picked] = (d.min(1).values + squared[picked]).clamp_min(0).sqrt()
    return out[position if which is None else position[which]]


def audit_scores(distances: torch.Tensor, row_images: torch.Tensor, n_images: int) -> np.ndarray:
    """Each image's largest a(r) over its bank rows, [n_images] float64; NaN for an image without rows (the
    caller scores it against the bank, nearest_center)."""
    scores = torch.full((n_images,), float("nan"), dtype=torch.float64)
    finite = distances.double().nan_to_num(posinf=0.0)
    scores.scatter_reduce_(0, row_images.long(), finite, reduce="amax", include_self=False)
    return scores.numpy()


def ranked(scores: np.ndarray) -> np.ndarray:
    """Rank of every image by its audit score, 1 = the most suspicious (ties: the lower index first)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(1, len(scores) + 1)
    return rank


def audit_bank(projected: torch.Tensor, bank: torch.Tensor, per_image: int, n_images: int) -> tuple[np.ndarray, torch.Tensor]:
    """Every training image's audit score [n_images] (float64) and a(r) of the bank rows [M], from the coreset's
    projections of all patches `projected` [N, d] and the bank's rows among them, `bank` [M]. An image with no row
    in the bank is scored by its patches' largest distance to the bank."""
    images = bank // per_image
    distances = leave_image_out(projected[bank], images)
    scores = audit_scores(distances, images, n_images)
    missing = np.flatnonzero(np.isnan(scores))
    if len(missing):
        squared, _ = nearest_center(projected[image_rows(missing.tolist(), per_image)], projected[bank])
        scores[missing] = squared.double().sqrt().view(len(missing), per_image).amax(1).numpy()
    return scores, distances


def kept_rows(distances: torch.Tensor, share: float) -> torch.Tensor:
    """Bool mask [M]: the rows the robust bank keeps, all but the floor(share * M) with the largest a(r) (ties: the
    later row goes)."""
    keep = torch.ones(len(distances), dtype=torch.bool)
    n_drop = int(share * len(distances))
    if n_drop:
        keep[torch.argsort(distances.double(), stable=True)[len(distances) - n_drop :]] = False
    return keep


def vouched(existing: torch.Tensor, new: torch.Tensor, new_images: torch.Tensor, cut: float) -> torch.Tensor:
    """Bool mask over `new` rows [n, d] (a grown bank's picks, from images `new_images`): a(r) against the `existing`
    bank's rows [M, d] and the other new images' within `cut`, the largest a(r) fit kept."""
    images = torch.cat([torch.full((len(existing),), -1), new_images.long()])  # the existing rows: from no new image
    return leave_image_out(torch.cat([existing, new]), images, torch.arange(len(new)) + len(existing)) <= cut
