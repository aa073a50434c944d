"""High resolution by tiles: the method on images far larger than the backbone's usual input, in bounded memory.

With `tile_size` set, an image is resized so that its longer side is `image_size` (aspect kept, each side a
multiple of 32 pixels: plumbing/image_io.working_size, torch-free, for the exported model's runner), and cut into
square tiles of `tile_size` pixels that overlap their neighbours by `tile_overlap`. Each tile goes through the
backbone and Eq. 1-2 on its own; of each tile, only the patches nearer its own centre than any other tile's are kept
(the overlap is split down its middle), so every cell of the image's patch grid comes from exactly one tile, at least
tile_overlap / 2 pixels from that tile's inner edges: one grid, no gaps, no cell twice. The grid is the one a
backbone run on the whole image would have: a cell of `cell` pixels (8 for layer2), H / cell x W / cell cells. What
differs from a whole-image run is only what a tile's border padding changes in its kept cells, which the overlap
keeps away from them.

Scoring goes a tile at a time (AnomalyScorer): each tile's kept patches are searched as they come, so that the
memory in flight is one group of tiles' activations and the images' maps, whatever the image's size. The exported
graph (onnx_export.py) has one fixed input size: it runs all of an image's tiles through the backbone at once and
scores the stitched grid (stitched_patches with group None), the same scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Pixel starts of the tiles along a side of `length` pixels: every tile - overlap pixels, the last one flush with
    the end (it may overlap its neighbour by more). One tile when it covers the side."""
    if tile >= length:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def kept_cells(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """For tiles at `starts` (in cells) of `tile` cells along a side of `length` cells: the cells [first, end) each
    keeps, split down the middle of each overlap, so that together they cover the side once."""
    bounds = [0] + [(start + tile + after) // 2 for start, after in zip(starts, starts[1:])] + [length]
    return list(zip(bounds, bounds[1:]))


@dataclass(frozen=True)
class Tile:
    """One tile of an image: its pixel window, and the cells of the image's grid it keeps, with where they sit in the
    tile's own grid."""

    y: int  # the window's top-left pixel
    x: int
    rows: slice  # the kept cells in the image's grid
    cols: slice
    own_rows: slice  # the same cells in the tile's grid
    own_cols: slice


def tiles_of(height: int, width: int, tile: int, overlap: int, cell: int) -> tuple[list[Tile], tuple[int, int]]:
    """The tiles of a (height, width) image, row by row, and the image's patch grid (height / cell, width / cell)."""
    if min(height, width) < tile:
        raise ValueError(f"a {width}x{height} image is smaller than a tile of {tile} pixels: lower --tile_size, or raise --image_size")
    if height % cell or width % cell or tile % cell:
        raise ValueError(f"image ({width}x{height}) and tile ({tile}) sizes must be multiples of the patch cell ({cell} pixels)")
    per_axis = []
    for length in (height, width):
        starts = tile_starts(length, tile, overlap)
        kept = kept_cells([s // cell for s in starts], tile // cell, length // cell)
        per_axis.append([(start, slice(a, b), slice(a - start // cell, b - start // cell)) for start, (a, b) in zip(starts, kept)])
    tiles = [Tile(y, x, rows, cols, own_rows, own_cols) for y, rows, own_rows in per_axis[0] for x, cols, own_cols in per_axis[1]]
    return tiles, (height // cell, width // cell)


def tile_patches(features: Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, int]]], images: torch.Tensor, tile: int,
                 overlap: int, cell: int, group: int | None) -> Iterator[tuple[Tile, torch.Tensor]]:  # fmt: skip
    """Each tile of a batch of images [B, 3, H, W] with the patch features [B, rows, cols, C] it keeps, `group` tile
    crops through `features` (the untiled patch features: crops -> ([n, h*w, C], (h, w))) at a time; None: every tile
    of the batch in one run (a number of runs that does not depend on the batch, as an exported graph needs)."""
    b = images.shape[0]  # not len(): a symbolic batch stays symbolic in an export
    tiles, _ = tiles_of(images.shape[-2], images.shape[-1], tile, overlap, cell)
    per_group = len(tiles) if group is None else max(1, group // b)  # tiles per backbone run: about `group` crops, or all
    for first in range(0, len(tiles), per_group):
        chosen = tiles[first : first + per_group]
        crops = torch.cat([images[:, :, t.y : t.y + tile, t.x : t.x + tile] for t in chosen])
        patches, grid = features(crops)
        patches = patches.reshape(len(chosen), b, *grid, -1)
        for t, own in zip(chosen, patches):
            yield t, own[:, t.own_rows, t.own_cols]


def stitched_patches(features: Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, int]]], images: torch.Tensor, tile: int,
                     overlap: int, cell: int, group: int | None) -> tuple[torch.Tensor, tuple[int, int]]:  # fmt: skip
    """The patch features of whole images [B, N, C] (N = the image's grid, row by row) from their tiles, and the grid."""
    _, grid = tiles_of(images.shape[-2], images.shape[-1], tile, overlap, cell)
    out = None
    for t, patches in tile_patches(features, images, tile, overlap, cell, group):
        if out is None:
            out = patches.new_empty(images.shape[0], *grid, patches.shape[-1])
        out[:, t.rows, t.cols] = patches
    return out.flatten(1, 2), grid


def score_by_tiles(scorer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AnomalyScorer.forward with tile_size: image scores [B] and maps [B, H, W] of images [B, 3, H, W], each tile's kept
    patches searched as they come, so that no image's whole patch features are ever held; per image, the worst patch
    so far (score, feature, nearest bank row) is kept for the image score (Eq. 7 reweights it). The same scores as
    scorer.score() on stitched_patches, which holds them all (tests/test_tiles.py)."""
    b = len(images)
    _, grid = tiles_of(*images.shape[-2:], *scorer.features.tiling()[:3])
    patch_scores = images.new_empty(b, *grid)
    s_star, m_test, nearest_star = images.new_full((b,), -float("inf")), None, torch.zeros(b, dtype=torch.long, device=images.device)
    for t, patches in tile_patches(scorer.features.untiled, images, *scorer.features.tiling()):
        tile_scores, nearest = scorer.patch_scores(patches)
        patch_scores[:, t.rows, t.cols] = tile_scores
        top, where = tile_scores.flatten(1).max(dim=1)
        m_test = patches.new_zeros(b, patches.shape[-1]) if m_test is None else m_test
        better = top > s_star  # a later tile takes over only with a higher score: ties stay with the first in raster order of tiles
        m_test[better], nearest_star[better] = patches.flatten(1, 2)[better, where[better]], nearest.flatten(1)[better, where[better]]
        s_star = torch.maximum(s_star, top)
    scores = scorer.reweighted_scores(m_test, s_star, nearest_star) if scorer.config.reweight_b else s_star
    return scores, scorer.maps(patch_scores.flatten(1), grid, tuple(images.shape[-2:]))
