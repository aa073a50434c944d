"""Pixel metrics of maps that arrive one image at a time, at each image's own resolution, in memory that does not
grow with the images (evaluate.py at --pixel_metrics_at original, on MVTec AD 2 and for tiled banks).

metrics.py's pixel metrics sort every test pixel at once: at 5 megapixels an image, MVTec AD 2's few hundred test
images would hold billions of scores, and more than that in the sort. Here each image's pixels are counted into
histograms as the image is scored, and the image is let go:
  - each score goes into one of 2^BITS bins that keep the order of float32 values (the float's bits made unsigned in
    value order, their top BITS): a bin is 2^-(BITS - 9) of its values wide, relative (about 2.4e-4 at BITS = 21);
  - per bin: defect pixels, defect-free pixels (all images, and the defective images alone), and each defect pixel's
    share of its region, 1 / the region's size (regions 8-connected within an image, as metrics.pro_curve has them);
  - ROC, PR and PRO curves are evaluated at the bins' lower edges, so pixels within one bin count as tied: the
    metrics are metrics.py's exact ones on scores rounded down to their bin's edge (tests/test_metrics.py measures
    the difference against them);
  - the thresholds given up front (the calibrated ones) are counted exactly, pixel by pixel: the false-positive rate,
    recall and F1 at them are exact.
Memory: the four histograms (2^BITS bins, 64 MB at BITS = 21) and one image's map and mask at a time.
The regions and the PRO area are metrics.py's too (defect_regions, pro_area): one rule for both.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BITS = 21
SHIFT = 32 - BITS


def defect_regions(defect: np.ndarray) -> tuple[np.ndarray, int]:
    """A boolean mask's 8-connected regions: (labels 1..count, 0 outside), count), as MVTec AD's evaluation has them."""
    return ndimage.label(defect, structure=np.ones((3, 3)))


def pro_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """The area under a PRO curve (ascending FPR from 0) up to fpr_limit, by the trapezoid rule, over fpr_limit."""
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:  # close the area at the limit, interpolating on the segment that crosses it
        after = np.argmax(fpr > fpr_limit)
        y_limit = pro[after - 1] + (pro[after] - pro[after - 1]) * (fpr_limit - fpr[after - 1]) / (fpr[after] - fpr[after - 1])
        x, y = np.r_[x, fpr_limit], np.r_[y, y_limit]
    area = np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2)  # trapezoid rule
    return float(area / fpr_limit)


def bins(values: np.ndarray) -> np.ndarray:
    """Each float32 value's bin, in the values' order: the float's bits as an unsigned integer that increases with the
    value (negative floats' bits inverted, positive ones' sign bit set), its top BITS."""
    bits = np.ascontiguousarray(values, np.float32).ravel().view(np.uint32)
    ordered = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))
    return (ordered >> np.uint32(SHIFT)).astype(np.intp)


def lower_edge(index: int) -> float:
    """The smallest float32 value in a bin: a pixel is in this bin or a higher one exactly when it is >= this value."""
    ordered = np.uint32(index << SHIFT)
    bits = ordered & np.uint32(0x7FFFFFFF) if ordered >> np.uint32(31) else ~ordered
    return float(np.array([bits], np.uint32).view(np.float32)[0])


class PixelCurves:
    """Histograms of pixel scores by ground truth, fed a map and its mask at a time (add), and the pixel metrics
    metrics.py computes, read from them. `thresholds`: where the exact counts are kept (f1_at, rates_at)."""

    def __init__(self, thresholds: list[float] = ()) -> None:
        n = 1 << BITS
        self.defect = np.zeros(n, np.int64)  # defect pixels per bin
        self.good = np.zeros(n, np.int64)  # defect-free pixels per bin, every image
        self.good_in_defective = np.zeros(n, np.int64)  # of those, the pixels of images with a defect
        self.overlap = np.zeros(n)  # per bin: the sum over its defect pixels of 1 / their region's size
        self.regions = 0
        self.low, self.high = float("inf"), -float("inf")  # the smallest and largest score
        self.exact = {float(t): np.zeros(3, np.int64) for t in thresholds}  # threshold: (TP, FP, FN) at score >= it

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        """One image's map and its ground-truth mask (defective where > 0.5), of one size."""
        values, defect = np.asarray(anomaly_map, np.float32), np.asarray(mask) > 0.5
        if values.shape != defect.shape:
            raise ValueError(f"a map of {values.shape} against a mask of {defect.shape}")
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        key, flat = bins(values), defect.ravel()
        n, defect_keys = len(self.good), key[flat]
        self.defect += np.bincount(defect_keys, minlength=n)
        good = np.bincount(key[~flat], minlength=n)
        self.good += good
        if flat.any():
            labelled, count = defect_regions(defect)
            sizes = np.bincount(labelled.ravel())
            self.good_in_defective += good
            self.overlap += np.bincount(defect_keys, weights=1.0 / sizes[labelled.ravel()[flat]], minlength=n)
            self.regions += count
        for threshold, counts in self.exact.items():
            flagged = values.ravel() >= threshold
            tp = int((flagged & flat).sum())
            counts += (tp, int(flagged.sum()) - tp, int(flat.sum()) - tp)

    def _negatives(self, defective_images: bool) -> np.ndarray:
        return self.good_in_defective if defective_images else self.good

    def _undefined(self, negatives: np.ndarray, what: str) -> str | None:
        if not self.defect.any():
            return f"undefined: every {what} is good"
        if not negatives.any():
            return f"undefined: every {what} is defective"
        return None

    def auroc(self, defective_images: bool = False) -> tuple[float | None, str | None]:
        """Pixel AUROC, pixels within a bin tied (half a pair each), or (None, reason)."""
        negatives = self._negatives(defective_images)
        reason = self._undefined(negatives, "pixel of the defective test images" if defective_images else "test pixel")
        if reason:
            return None, reason
        positives = self.defect.astype(np.float64)
        above = np.cumsum(positives[::-1])[::-1] - positives  # defect pixels in higher bins
        return float(np.sum(negatives * (above + 0.5 * positives)) / (positives.sum() * negatives.sum())), None

    def _from_the_top(self, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The non-empty bins, and the defect and defect-free pixels at or above each one's lower edge."""
        used = np.flatnonzero(self.defect + negatives)
        tp = np.cumsum(self.defect[used][::-1])[::-1]
        fp = np.cumsum(negatives[used][::-1])[::-1]
        return used, tp, fp

    def f1_max(self) -> tuple[float | None, float | None, str | None]:
        """The best pixel F1 over the bins' edges and that edge (score >= it is defective), or (None, None, reason)."""
        reason = self._undefined(self.good, "test pixel")
        if reason:
            return None, None, reason
        used, tp, fp = self._from_the_top(self.good)
        f1 = 2 * tp / (tp + fp + self.defect.sum())  # 2 TP / (2 TP + FP + FN)
        best = int(np.argmax(f1))  # the lowest edge among equals, as metrics.f1_max
        return float(f1[best]), lower_edge(int(used[best])), None

    def aupro(self, fpr_limit: float = 0.3, defective_images: bool = False) -> tuple[float | None, str | None]:
        """Area under the PRO curve up to FPR = fpr_limit, over fpr_limit (metrics.aupro), or (None, reason)."""
        negatives = self._negatives(defective_images)
        reason = self._undefined(negatives, "pixel of the defective test images" if defective_images else "test pixel")
        if reason:
            return None, reason
        used = np.flatnonzero(self.defect + negatives)[::-1]  # thresholds from the top
        fpr = np.r_[0.0, np.cumsum(negatives[used]) / negatives.sum()]
        pro = np.r_[0.0, np.cumsum(self.overlap[used]) / self.regions]
        return pro_area(fpr, pro, fpr_limit), None

    def counts_at(self, threshold: float) -> np.ndarray:
        """(TP, FP, FN) at score >= threshold, exact: a threshold given when the curves were made."""
        if float(threshold) not in self.exact:
            raise ValueError(f"no exact counts at {threshold}: give it to PixelCurves(thresholds=...) before the images")
        return self.exact[float(threshold)]

    def f1_at(self, threshold: float) -> float | None:
        """Pixel F1 at score >= threshold, every pixel pooled (metrics.f1_at), exact; None without defect pixels."""
        tp, fp, fn = (int(v) for v in self.counts_at(threshold))
        return 2 * tp / (2 * tp + fp + fn) if tp + fn else None

    def rates_at(self, threshold: float) -> tuple[float | None, float | None]:
        """(false-positive rate on defect-free pixels, recall on defect pixels) at score >= threshold (metrics.rates_at)."""
        tp, fp, fn = (int(v) for v in self.counts_at(threshold))
        negatives = int(self.good.sum())
        return (fp / negatives if negatives else None), (tp / (tp + fn) if tp + fn else None)
