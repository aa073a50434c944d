"""Anomaly-detection metrics: AUROC, F1-max, and AUPRO as in the MVTec AD benchmark.

A metric that one class's absence leaves undefined is returned as None with the reason,
never as NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score

from reporting.pixel_curves import PixelCurves, defect_regions, pro_area

if TYPE_CHECKING:
    from method.thresholds import Calibration


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


def _pixels(arrays) -> np.ndarray:
    """Every pixel of a stack of maps, or of a list of maps of different sizes, in one flat array."""
    if isinstance(arrays, list):
        return np.concatenate([np.asarray(a).ravel() for a in arrays]) if arrays else np.empty(0)
    return np.asarray(arrays).ravel()


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-region-overlap curve: (FPR, PRO) at every distinct score, from (0, 0) to (1, 1).

    PRO at a threshold is the mean over all ground-truth connected regions (8-connected,
    each image's regions apart) of the fraction of the region's pixels predicted defective;
    FPR is the fraction of all defect-free pixels predicted defective. masks and maps: [N, H, W]
    arrays, or lists of per-image [H, W] arrays (of any sizes).
    """
    regions, n_regions = [], 0
    for mask in masks:
        labelled, count = defect_regions(np.asarray(mask) > 0.5)
        regions.append(np.where(labelled > 0, labelled + n_regions, 0).ravel())
        n_regions += count
    flat = np.concatenate(regions)
    sizes = np.bincount(flat, minlength=n_regions + 1)
    n_negative = int((flat == 0).sum())

    # each pixel adds to PRO (1 / its region's size / number of regions) or to FPR (1 / negatives)
    pro_step = np.where(flat > 0, 1.0 / (sizes[flat] * n_regions), 0.0)
    fpr_step = np.where(flat > 0, 0.0, 1.0 / n_negative)
    values = _pixels(maps).astype(np.float64)
    order = np.argsort(-values, kind="stable")
    scores = values[order]
    pro, fpr = np.cumsum(pro_step[order]), np.cumsum(fpr_step[order])
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # thresholds between distinct scores
    return np.r_[0.0, fpr[last_of_each_score]], np.r_[0.0, pro[last_of_each_score]]


def aupro(masks, maps, fpr_limit: float = 0.3) -> tuple[float | None, str | None]:
    """Area under the PRO curve up to FPR = fpr_limit, divided by fpr_limit (MVTec AD's AUPRO@0.3)."""
    reason = _one_class(_pixels(masks) > 0.5, "test pixel")
    if reason:
        return None, reason
    return pro_area(*pro_curve(masks, maps), fpr_limit), None


def rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float | None, float | None]:
    """(false-positive rate on the good samples, recall on the defective ones) when score >= threshold
    is called defective; None for a class that is absent."""
    labels, flagged = np.asarray(labels).ravel().astype(bool), np.asarray(scores).ravel() >= threshold
    fpr = float(flagged[~labels].mean()) if (~labels).any() else None
    recall = float(flagged[labels].mean()) if labels.any() else None
    return fpr, recall


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


def f1_at(labels, scores, threshold: float) -> float | None:
    """F1 when score >= threshold is called defective, every sample (or pixel) pooled: 2 TP / (2 TP + FP + FN);
    None without any defective sample. labels and scores: arrays, or lists of per-image arrays."""
    labels, flagged = _pixels(labels).astype(bool), _pixels(scores) >= threshold
    if not labels.any():
        return None
    tp = int((labels & flagged).sum())
    return 2 * tp / (2 * tp + int((~labels & flagged).sum()) + int((labels & ~flagged).sum()))


def ad2_metrics(labels: np.ndarray, scores: np.ndarray, masks: list | None, maps, calibration: Calibration) -> dict:
    """MVTec AD 2's metrics (Heckler-Kram et al., 2025) on its labelled test split, each map and mask at its image's
    own size: AU-PRO up to a false-positive rate of 0.05 (the benchmark's main metric) and of 0.3; SegF1, the pixel
    F1 with every test pixel pooled, at the pixel threshold set on validation/good (calibrated) and at the benchmark's
    own rule (mean + 3 std of the validation pixels); the image F1 at the calibrated image threshold. masks and maps:
    lists of per-image arrays, or None and a pixel_curves.PixelCurves that holds them (with exact counts at the
    calibrated thresholds), as evaluate.py streams them."""
    streamed = isinstance(maps, PixelCurves)
    result = {}
    for limit in (0.05, 0.3):
        result[f"au_pro_{limit:g}"], reason = maps.aupro(fpr_limit=limit) if streamed else aupro(masks, maps, fpr_limit=limit)
        if reason:
            result[f"au_pro_{limit:g}_undefined"] = reason
    if calibration.calibrated:
        def seg_f1(threshold: float | None) -> float | None:
            if threshold is None:
                return None
            return maps.f1_at(threshold) if streamed else f1_at([m > 0.5 for m in masks], maps, threshold)

        result["seg_f1"], result["seg_f1_mean_3std"] = seg_f1(calibration.pixel_threshold), seg_f1(calibration.mean_3std_pixel_threshold)
        result["image_f1"] = f1_at(labels, scores, calibration.image_threshold)
        result["thresholds"] = {"image": calibration.image_threshold, "pixel": calibration.pixel_threshold,
                                "pixel_mean_3std": calibration.mean_3std_pixel_threshold, "from": calibration.images()}  # fmt: skip
    else:
        result["undefined"] = f"SegF1 and image F1 need thresholds from validation/good: {calibration.reason}"
    return result


def compute_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks,
    maps,
    defect_types: list[str],
    no_masks: str | None = None,
    calibration: Calibration | None = None,
    decided: tuple[np.ndarray, object] | None = None,
) -> dict:
    """Every metric of a category's test split; pixel metrics over all pixels of all test images, and, as the
    released code reports them too, over the defective images alone (pixel_auroc_defective, aupro_defective).

    masks and maps: [N, H, W] arrays or lists of per-image arrays, or None and a pixel_curves.PixelCurves that holds
    them (maps streamed at each image's own size; its thresholds, the calibrated pixel one). `no_masks`: why there is no
    pixel ground truth (masks is then ignored, and every pixel metric is None with that reason).
    `calibration` (thresholds set on good images, thresholds.calibrate): the false-positive rate
    and recall it gives at image and pixel level, beside the F1-optimal thresholds, on `decided`
    (scores, maps) where the thresholds apply to other scores than the metrics' (an official ensemble's).
    """
    metrics: dict = {}
    reasons: dict = {}
    streamed = isinstance(maps, PixelCurves)
    pixel_labels, pixel_scores = (None, None) if no_masks or streamed else (_pixels(masks) > 0.5, _pixels(maps))
    defective = [] if no_masks or streamed else [i for i, mask in enumerate(masks) if (np.asarray(mask) > 0.5).any()]
    pixel = {
        "pixel_auroc": lambda: auroc(pixel_labels, pixel_scores, "test pixel"),
        "aupro": lambda: aupro(masks, maps),
        "pixel_auroc_defective": lambda: auroc(_pixels([masks[i] for i in defective]) > 0.5, _pixels([maps[i] for i in defective]),
                                               "pixel of the defective test images"),  # fmt: skip
        "aupro_defective": lambda: aupro([masks[i] for i in defective], [maps[i] for i in defective]),
    }
    if streamed:
        pixel = {"pixel_auroc": maps.auroc, "aupro": maps.aupro, "pixel_auroc_defective": lambda: maps.auroc(defective_images=True),
                 "aupro_defective": lambda: maps.aupro(defective_images=True)}  # fmt: skip
    for name, compute in {"image_auroc": lambda: auroc(labels, scores, "test image"), **pixel}.items():
        value, reason = (None, no_masks) if no_masks and name != "image_auroc" else compute()
        metrics[name] = value
        if reason:
            reasons[name] = reason
    for level, (y, s) in {"image": (labels, scores), "pixel": (pixel_labels, pixel_scores)}.items():
        if no_masks and level == "pixel":
            value, threshold, reason = None, None, no_masks
        else:
            value, threshold, reason = maps.f1_max() if streamed and level == "pixel" else f1_max(y, s, f"test {level}")
        metrics[f"{level}_f1_max"], metrics[f"{level}_f1_threshold"] = value, threshold
        if reason:
            reasons[f"{level}_f1_max"] = reason
    metrics["per_defect"] = per_defect_auroc(labels, scores, defect_types)
    if calibration is not None and calibration.calibrated:
        at = {"image_threshold": calibration.image_threshold, "pixel_threshold": calibration.pixel_threshold,
              "target_fpr": calibration.target_fpr, "expected_fpr": calibration.expected_fpr}  # fmt: skip
        decided_scores, decided_pixels = (scores, pixel_scores) if decided is None else (decided[0], _pixels(decided[1]))
        at["image_fpr"], at["image_recall"] = rates_at(labels, decided_scores, calibration.image_threshold)
        if no_masks:
            at["pixel_fpr"], at["pixel_recall"] = None, None
        else:
            at["pixel_fpr"], at["pixel_recall"] = (maps.rates_at(calibration.pixel_threshold) if streamed
                                                   else rates_at(pixel_labels, decided_pixels, calibration.pixel_threshold))  # fmt: skip
        at["f1_image_threshold"], at["f1_pixel_threshold"] = metrics["image_f1_threshold"], metrics["pixel_f1_threshold"]
        metrics["at_calibrated_thresholds"] = at
    if reasons:
        metrics["undefined"] = reasons
    return metrics
