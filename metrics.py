"""Anomaly-detection metrics: AUROC, F1-max, and AUPRO as in the MVTec AD benchmark.

A metric that one class's absence leaves undefined is returned as None with the reason,
never as NaN.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score


def _one_class(labels: np.ndarray, what: str) -> str | None:
    if labels.size == 0:
        return f"undefined: there is no {what}"
    if labels.min() == labels.max():
        return f"undefined: every {what} is {'defective' if labels.min() else 'good'}"
    return None


def auroc(labels: np.ndarray, scores: np.ndarray, what: str = "sample") -> tuple[float | None, str | None]:
    """Area under the ROC curve, or (None, reason)."""
    labels = np.asarray(labels).ravel().astype(bool)
    reason = _one_class(labels, what)
    if reason:
        return None, reason
    return float(roc_auc_score(labels, np.asarray(scores).ravel())), None


def f1_max(labels: np.ndarray, scores: np.ndarray, what: str = "sample") -> tuple[float | None, float | None, str | None]:
    """The best F1 over all thresholds and the threshold reaching it (score >= threshold is defective)."""
    labels = np.asarray(labels).ravel().astype(bool)
    reason = _one_class(labels, what)
    if reason:
        return None, None, reason
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores).ravel())
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best]), None


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-region-overlap curve: (FPR, PRO) at every distinct score, from (0, 0) to (1, 1).

    PRO at a threshold is the mean over all ground-truth connected regions (8-connected,
    each image's regions apart) of the fraction of the region's pixels predicted defective;
    FPR is the fraction of all defect-free pixels predicted defective.
    """
    masks = np.asarray(masks) > 0.5
    regions = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions[i] = np.where(labelled > 0, labelled + n_regions, 0)
        n_regions += count
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)
    n_negative = int((~masks).sum())

    # each pixel adds to PRO (1 / its region's size / number of regions) or to FPR (1 / negatives)
    flat = regions.ravel()
    pro_step = np.where(flat > 0, 1.0 / (sizes[flat] * n_regions), 0.0)
    fpr_step = np.where(flat > 0, 0.0, 1.0 / n_negative)
    order = np.argsort(-np.asarray(maps, dtype=np.float64).ravel(), kind="stable")
    scores = np.asarray(maps, dtype=np.float64).ravel()[order]
    pro, fpr = np.cumsum(pro_step[order]), np.cumsum(fpr_step[order])
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # thresholds between distinct scores
    return np.r_[0.0, fpr[last_of_each_score]], np.r_[0.0, pro[last_of_each_score]]


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> tuple[float | None, str | None]:
    """Area under the PRO curve up to FPR = fpr_limit, divided by fpr_limit (MVTec AD's AUPRO@0.3)."""
    masks = np.asarray(masks) > 0.5
    reason = _one_class(masks.ravel(), "test pixel")
    if reason:
        return None, reason
    fpr, pro = pro_curve(masks, maps)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:  # close the area at the limit, interpolating on the segment that crosses it
        after = np.argmax(fpr > fpr_limit)
        y_limit = pro[after - 1] + (pro[after] - pro[after - 1]) * (fpr_limit - fpr[after - 1]) / (fpr[after] - fpr[after - 1])
        x, y = np.r_[x, fpr_limit], np.r_[y, y_limit]
    area = np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2)  # trapezoid rule
    return float(area / fpr_limit), None


def per_defect_auroc(labels: np.ndarray, scores: np.ndarray, defect_types: list[str]) -> dict:
    """Image AUROC of the good images against each defect type alone, with counts."""
    labels, scores, defect_types = np.asarray(labels), np.asarray(scores), np.asarray(defect_types)
    good = defect_types == "good"
    result = {}
    for defect in sorted(set(defect_types[~good])):
        chosen = good | (defect_types == defect)
        value, reason = auroc(labels[chosen], scores[chosen], f"image of good+{defect}")
        result[defect] = {"image_auroc": value, "n_images": int((defect_types == defect).sum()), "n_good": int(good.sum())}
        if reason:
            result[defect]["reason"] = reason
    return result


def compute_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, defect_types: list[str]) -> dict:
    """Every metric of a category's test split; pixel metrics over all pixels of all test images."""
    metrics: dict = {}
    reasons: dict = {}
    for name, (value, reason) in {
        "image_auroc": auroc(labels, scores, "test image"),
        "pixel_auroc": auroc(masks, maps, "test pixel"),
        "aupro": aupro(masks, maps),
    }.items():
        metrics[name] = value
        if reason:
            reasons[name] = reason
    for level, (y, s) in {"image": (labels, scores), "pixel": (masks, maps)}.items():
        value, threshold, reason = f1_max(y, s, f"test {level}")
        metrics[f"{level}_f1_max"], metrics[f"{level}_f1_threshold"] = value, threshold
        if reason:
            reasons[f"{level}_f1_max"] = reason
    metrics["per_defect"] = per_defect_auroc(labels, scores, defect_types)
    if reasons:
        metrics["undefined"] = reasons
    return metrics
