"""Decision thresholds from good images only: split-conformal calibration on held-out good training images.

PatchCore.fit holds a seeded share of the good training images out of the calibration bank (Alg. 1
over the other images: the paper protocol's saved bank begins with it, the official protocol's is
built apart from it), scores them against it, and calibrate() turns their scores into the image and
pixel thresholds that a production line decides with (docs/architecture.md, "Decisions on
unlabelled parts").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from plumbing.image_io import resize_map


@dataclass
class Calibration:
    """The decision thresholds a bank carries (saved in its header as to_dict()), or the reason it has none.

    image_threshold: an image scoring at or above it is defective; pixel_threshold: the same for a map's
    pixels. Both are set so that a new good part is flagged with probability at most target_fpr
    (split conformal, calibrate()); expected_fpr is what n_held_out images can give.
    """

    image_threshold: float | None = None
    pixel_threshold: float | None = None
    target_fpr: float | None = None
    expected_fpr: float | None = None
    n_held_out: int | None = None
    source: str | None = None  # the good images they were set on (banks before it had held-out good images)
    method: str | None = None
    heatmap_scale: list[float] | None = None  # [low, high] of the colour bar, the pixel threshold in its middle
    held_out_image_scores: dict | None = None  # statistics of the held-out scores
    held_out_map_maxima: dict | None = None
    mean_3std_pixel_threshold: float | None = None  # MVTec AD 2's own rule: mean + 3 std of every validation pixel score
    reason: str | None = None  # why there are no thresholds
    note: str | None = None  # what happened to them since (a grown bank)

    @property
    def calibrated(self) -> bool:
        return self.image_threshold is not None

    def images(self) -> str:
        """The good images the thresholds were set on, e.g. '20 held-out good images'."""
        return f"{self.n_held_out} {self.source or 'held-out good images'}"

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, saved: dict) -> Calibration:
        return cls(**saved)


def _conformal_threshold(scores: np.ndarray, target: float) -> tuple[float, float]:
    """The smallest held-out score t such that a new good score, exchangeable with the n held-out ones, is
    >= t with probability at most `target`: the k-th smallest, k = ceil((n + 1)(1 - target)). Returns
    (t, its false-alarm rate (n + 1 - k) / (n + 1)); with too few scores, k = n: the largest, 1 / (n + 1)."""
    n = len(scores)
    k = min(n, math.ceil((n + 1) * (1 - target) - 1e-9))
    return float(np.sort(scores)[k - 1]), (n + 1 - k) / (n + 1)


def holdout_images(n_images: int, share: float, seed: int) -> list[int]:
    """The training images held out for calibration: round(share * n_images), drawn with the seed (a stream
    apart from the few-shot draw); none when that leaves no image on either side."""
    k = round(share * n_images)
    if k < 1 or k >= n_images:
        return []
    return sorted(np.random.default_rng([seed, 1]).choice(n_images, k, replace=False).tolist())


def calibrate(scores: np.ndarray, map_peaks: np.ndarray, map_low: float, target_fpr: float) -> Calibration:
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

    return Calibration(
        image_threshold=image,
        pixel_threshold=pixel,
        target_fpr=target_fpr,
        expected_fpr=image_rate,
        n_held_out=len(scores),
        source="held-out good images",
        method="split conformal on held-out good images (k-th smallest score, k = ceil((n + 1)(1 - target_fpr)))",
        heatmap_scale=[float(map_low), 2 * pixel - float(map_low)],
        held_out_image_scores=stats(scores),
        held_out_map_maxima=stats(map_peaks),
    )


def calibrate_on_validation(scorer: torch.nn.Module, dataloader: torch.utils.data.DataLoader, sizes: list[tuple[int, int]],
                            target_fpr: float) -> Calibration:  # fmt: skip
    """MVTec AD 2's thresholds, from its validation/good images only, as the benchmark requires: calibrate() on their
    scores against the saved bank (they played no part in it, so a new good part is exchangeable with them), and the
    benchmark's own pixel rule beside it, mean + 3 std of every validation pixel score, each map at its image's own
    size (`sizes`: (width, height) in loader order), summed in float64 one map at a time."""
    scores, peaks, lows, total, squares, count, i = [], [], [], 0.0, 0.0, 0, 0
    for batch in tqdm(dataloader, desc="validation", unit="batch"):
        batch_scores, maps = (v.cpu().numpy() for v in scorer(batch[0]))
        scores.append(batch_scores)
        peaks.append(maps.reshape(len(maps), -1).max(1))
        lows.append(maps.min())
        for anomaly_map in maps:
            full = resize_map(anomaly_map, sizes[i]).astype(np.float64)
            total, squares, count, i = total + full.sum(), squares + (full * full).sum(), count + full.size, i + 1
    calibration = calibrate(np.concatenate(scores), np.concatenate(peaks), min(lows), target_fpr)
    calibration.source = "validation/good images"
    calibration.method = ("split conformal on validation/good images, MVTec AD 2's only source of thresholds (k-th smallest "
                          "score, k = ceil((n + 1)(1 - target_fpr)))")  # fmt: skip
    mean = total / count
    calibration.mean_3std_pixel_threshold = float(mean + 3 * np.sqrt(max(squares / count - mean * mean, 0.0)))
    return calibration


def note_on_fit(nested: bool, reweighted: bool) -> str | None:
    """What fresh thresholds mean for the saved bank, where that is less than calibrate() says: none when the saved
    bank contains the calibration bank (nested, the paper protocol) and scores by the max or the k-nearest mean,
    which can then only fall, so that the thresholds are conservative."""
    if not nested:
        return ("set against a calibration bank of its own (Alg. 1 over the kept images), which the saved bank, Alg. 1 over "
                "every image as the released code builds it, does not contain: scores against the saved bank can be higher "
                "as well as lower, so the false-alarm target is approximate")  # fmt: skip
    if reweighted:
        return ("set against the calibration bank, the saved bank's first rows; with Eq. 7 scores the larger saved bank can "
                "score an image higher as well as lower, so the false-alarm target is approximate")  # fmt: skip
    return None


def note_on_growth(n_images: int, reweighted: bool, nested: bool = True) -> str:
    """What kept thresholds mean for a grown bank: it holds the old one, so every patch's k nearest distances can
    only fall, and with them the max (or mean) image score and every map pixel; Eq. 7's weight can move either way.
    nested: the thresholds were conservative for the bank before (note_on_fit)."""
    if reweighted:
        return (f"kept after adding {n_images} good images; with Eq. 7 scores a larger bank can score an image "
                "higher as well as lower, so recalibrate (train anew) to keep the false-alarm target")  # fmt: skip
    if not nested:
        return (f"kept after adding {n_images} good images: a larger bank can only lower scores; they were set against a "
                "calibration bank the saved bank does not contain, so the false-alarm target stays approximate")  # fmt: skip
    return f"kept after adding {n_images} good images: a larger bank can only lower scores, so these thresholds are conservative"


def calibrate_held_out(scorer: torch.nn.Module | None, dataloader: torch.utils.data.DataLoader, held_out: list[int], share: float,
                       target_fpr: float, note: str | None, keep: bool = False,
                       ) -> tuple[Calibration, tuple[np.ndarray, np.ndarray] | None]:  # fmt: skip
    """PatchCore.fit's thresholds: the held-out training images run again, in batches of their own, through `scorer`
    (the calibration bank's; None when nothing is held out), then calibrate(); or why there are none. Running them
    again rather than keeping their features makes the thresholds the same whichever fit path ran; `note` goes with
    them. With `keep`, their (scores, maps) come back too (an ensemble combines its members by them); otherwise only
    what calibrate() needs of each batch's maps is kept."""
    if share == 0:
        return Calibration(reason="calibration off (--calibration_holdout 0): no thresholds"), None
    if not held_out:
        reason = (f"too few training images ({len(dataloader.dataset)}) to hold out a share of {share:g} for calibration: "
                  "no thresholds stored; decide with evaluate.py --threshold")  # fmt: skip
        return Calibration(reason=reason), None
    subset = torch.utils.data.Subset(dataloader.dataset, held_out)
    loader = torch.utils.data.DataLoader(subset, batch_size=dataloader.batch_size, num_workers=dataloader.num_workers)
    scores, peaks, lows, maps_kept = [], [], [], []
    for batch in tqdm(loader, desc="calibration", unit="batch"):
        batch_scores, maps = (v.cpu().numpy() for v in scorer(batch[0]))
        scores.append(batch_scores)
        peaks.append(maps.reshape(len(maps), -1).max(1))
        lows.append(maps.min())
        if keep:
            maps_kept.append(maps)
    calibration = calibrate(np.concatenate(scores), np.concatenate(peaks), min(lows), target_fpr)
    calibration.note = note
    return calibration, (np.concatenate(scores), np.concatenate(maps_kept)) if keep else None
