"""Metrics on inputs whose answers are worked out by hand."""

import numpy as np
import pytest

from reporting.metrics import ad2_metrics, aupro, auroc, compute_metrics, f1_at, f1_max, per_defect_auroc, pro_curve, rates_at


def test_auroc_hand_computed():
    # pairs (defective, good) ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4); wrong: (0.35<0.4) -> 3/4
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))[0] == pytest.approx(0.75)
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5]))[0] == pytest.approx(0.5)  # a tie counts half
    assert auroc(np.array([1, 0, 0]), np.array([3.0, 2.0, 1.0]))[0] == pytest.approx(1.0)


def test_auroc_undefined_for_one_class():
    value, reason = auroc(np.zeros(4), np.arange(4.0), "test image")
    assert value is None and "every test image is good" in reason


def test_f1_max_hand_computed():
    # threshold 0.35 marks {0.35, 0.4, 0.8} defective: precision 2/3, recall 1 -> F1 0.8 (best)
    f1, threshold, _ = f1_max(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert f1 == pytest.approx(0.8) and threshold == pytest.approx(0.35)


def test_pixel_metrics_over_all_pixels_of_all_images():
    masks = np.zeros((2, 2, 2))
    masks[1, 0, 0] = 1  # one defective pixel among 8
    maps = np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.35, 0.0], [0.0, 0.0]]])
    # the defective pixel (0.35) outranks 0.1, 0.2, 0.3 and the three zeros of image 2, not 0.4: 6/7
    metrics = compute_metrics(np.array([0, 1]), np.array([0.4, 0.35]), masks, maps, ["good", "hole"])
    assert metrics["pixel_auroc"] == pytest.approx(6 / 7)
    assert metrics["image_auroc"] == pytest.approx(0.0)
    assert metrics["per_defect"] == {"hole": {"image_auroc": 0.0, "n_images": 1, "n_good": 1}}


def _square(size=10, top=2, left=2, side=2):
    mask = np.zeros((1, size, size))
    mask[0, top : top + side, left : left + side] = 1
    return mask


def test_aupro_perfect_map_is_one():
    mask = _square()
    assert aupro(mask, mask.copy())[0] == pytest.approx(1.0)


def test_aupro_constant_map():
    # one threshold: the curve jumps from (0, 0) to (1, 1); the line PRO = FPR integrates to 0.3^2/2, / 0.3
    mask = _square()
    assert aupro(mask, np.ones_like(mask))[0] == pytest.approx(0.15)


def test_aupro_one_square_region():
    mask = _square()  # 4 defective pixels, 96 defect-free
    maps = np.zeros_like(mask)
    maps[mask > 0] = 0.5
    maps[0, 9, :10] = 0.95  # 10 defect-free pixels score above the region
    # curve: (0,0) -> (10/96, 0) -> (10/96, 1) -> (1, 1); area to 0.3 is 0.3 - 10/96
    fpr, pro = pro_curve(mask, maps)
    np.testing.assert_allclose(fpr, [0, 10 / 96, 10 / 96, 1])
    np.testing.assert_allclose(pro, [0, 0, 1, 1])
    assert aupro(mask, maps)[0] == pytest.approx((0.3 - 10 / 96) / 0.3)


def test_aupro_weights_regions_not_pixels():
    mask = np.zeros((1, 12, 12))
    mask[0, 0, 0] = 1  # region A: 1 pixel
    mask[0, 5:8, 5:8] = 1  # region B: 9 pixels
    maps = np.zeros_like(mask)
    maps[0, 0, 0] = 1.0  # A found first: PRO jumps to 0.5 (pixel-weighted it would be 0.1)
    maps[0, 5:8, 5:8] = 0.5
    maps[0, 11, :6] = 0.7  # 6 of 134 defect-free pixels in between
    f = 6 / 134
    fpr, pro = pro_curve(mask, maps)
    np.testing.assert_allclose(fpr, [0, 0, f, f, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    assert aupro(mask, maps)[0] == pytest.approx((0.5 * f + (0.3 - f)) / 0.3)


def test_aupro_regions_are_separate_per_image_and_8_connected():
    mask = np.zeros((2, 4, 4))
    mask[0, 0, 0] = mask[0, 1, 1] = 1  # diagonal neighbours: one region
    mask[1, 0, 0] = 1  # the same place in another image: another region
    maps = np.zeros_like(mask)
    maps[1, 0, 0] = 1.0
    fpr, pro = pro_curve(mask, maps)
    assert pro[1] == pytest.approx(0.5)  # 1 of 2 regions found at the first threshold


def test_aupro_undefined_without_defects():
    value, reason = aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    assert value is None and "every test pixel is good" in reason


def test_per_defect_auroc_compares_good_with_each_type():
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.15, 0.05])
    result = per_defect_auroc(labels, scores, ["good", "good", "crack", "hole", "hole"])
    assert result["crack"]["image_auroc"] == pytest.approx(1.0)
    assert result["hole"]["image_auroc"] == pytest.approx(0.25)  # 0.15 beats 0.1 only
    assert result["hole"]["n_images"] == 2 and result["hole"]["n_good"] == 2


def test_aupro_at_005_hand_computed():
    """MVTec AD 2's AU-PRO@0.05: the same curve, integrated to FPR 0.05 and divided by it."""
    mask = _square()  # 4 defective pixels, 96 defect-free
    maps = np.zeros_like(mask)
    maps[mask > 0] = 0.5
    maps[0, 9, :3] = 0.95  # 3 defect-free pixels above the region: the curve rises at FPR 3/96 < 0.05
    assert aupro(mask, maps, fpr_limit=0.05)[0] == pytest.approx((0.05 - 3 / 96) / 0.05)
    maps[0, 9, :10] = 0.95  # 10 of them: it rises at 10/96, past 0.05
    assert aupro(mask, maps, fpr_limit=0.05)[0] == pytest.approx(0.0)


def test_segf1_pools_every_pixel_of_every_image():
    labels = [np.array([[1, 1], [0, 0]]), np.array([[0, 1]])]
    scores = [np.array([[0.9, 0.2], [0.8, 0.1]]), np.array([[0.7, 0.6]])]
    # at 0.5: TP 2 (0.9, 0.6), FP 2 (0.8, 0.7), FN 1 (0.2): 2 TP / (2 TP + FP + FN) = 4 / 7
    assert f1_at(labels, scores, 0.5) == pytest.approx(4 / 7)
    assert f1_at([np.zeros((2, 2))], [np.ones((2, 2))], 0.5) is None  # no defective pixel: undefined


def test_ad2_metrics_at_the_thresholds_from_validation():
    from method.thresholds import Calibration

    mask = _square()
    maps = np.zeros_like(mask)
    maps[mask > 0] = 0.5
    maps[0, 9, :3] = 0.95
    calibration = Calibration(image_threshold=0.5, pixel_threshold=0.6, mean_3std_pixel_threshold=0.4, n_held_out=5,
                              source="validation/good images")  # fmt: skip
    result = ad2_metrics(np.array([1, 0]), np.array([0.7, 0.4]), list(mask), list(maps), calibration)
    assert result["au_pro_0.05"] == pytest.approx((0.05 - 3 / 96) / 0.05)
    assert result["seg_f1"] == pytest.approx(0.0)  # at 0.6 only the 3 false pixels are flagged
    assert result["seg_f1_mean_3std"] == pytest.approx(2 * 4 / (2 * 4 + 3))  # at 0.4: the region and the 3
    assert result["image_f1"] == pytest.approx(1.0) and result["thresholds"]["from"] == "5 validation/good images"


def _scene_maps(seed: int, tied: bool) -> tuple[list, list]:
    """Maps and masks of several sizes (one image without a defect, one with two regions), smooth scores higher in the
    defects; tied: whole numbers 0..40 only, each the lower edge of its bin."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for h, w, boxes in ((37, 53, [(5, 9, 12, 20)]), (64, 64, []), (20, 90, [(2, 5, 6, 15), (10, 60, 18, 75)]), (48, 30, [(30, 3, 47, 10)])):
        mask = np.zeros((h, w), bool)
        for top, left, bottom, right in boxes:
            mask[top:bottom, left:right] = True
        values = rng.gamma(2.0, 1.0, (h, w)) + 2.5 * mask * rng.random((h, w))
        maps.append(np.floor(values * 6).astype(np.float32) if tied else values.astype(np.float32))
        masks.append(mask)
    return masks, maps


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_pixel_curves_are_the_exact_metrics_on_binned_scores(tied):
    """reporting/pixel_curves.py against metrics.py's exact sort over every pixel: with whole-number scores (each the
    lower edge of its bin, many ties) the same to float rounding, which checks the ties; with continuous scores within
    what bins 2.4e-4 wide allow; at the thresholds given up front exactly the same counts."""
    from reporting.pixel_curves import PixelCurves, bins, lower_edge

    masks, maps = _scene_maps(1, tied)
    thresholds = [3.0, float(np.quantile(np.concatenate([m.ravel() for m in maps]), 0.9))]
    curves = PixelCurves(thresholds)
    for anomaly_map, mask in zip(maps, masks):
        curves.add(anomaly_map, mask)
    defective = [i for i, m in enumerate(masks) if m.any()]
    labels, scores = np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps])
    tolerance = 1e-12 if tied else 2e-4  # measured over 20 seeds: continuous scores at most 1.7e-4 apart
    assert curves.auroc()[0] == pytest.approx(auroc(labels, scores)[0], abs=tolerance)
    only = [masks[i] for i in defective], [maps[i] for i in defective]
    exact = auroc(np.concatenate([m.ravel() for m in only[0]]), np.concatenate([m.ravel() for m in only[1]]))[0]
    assert curves.auroc(defective_images=True)[0] == pytest.approx(exact, abs=tolerance)
    for limit in (0.05, 0.3):
        assert curves.aupro(limit)[0] == pytest.approx(aupro(masks, maps, limit)[0], abs=tolerance)
    assert curves.aupro(defective_images=True)[0] == pytest.approx(aupro(*only)[0], abs=tolerance)
    value, threshold, _ = curves.f1_max()
    assert value == pytest.approx(f1_max(labels, scores)[0], abs=tolerance)
    assert value == pytest.approx(f1_at(masks, maps, threshold), abs=1e-12)  # its threshold gives its F1, exactly
    for t in thresholds:
        assert curves.f1_at(t) == f1_at(masks, maps, t) and curves.rates_at(t) == rates_at(labels, scores, t)
    assert (curves.low, curves.high) == (float(scores.min()), float(scores.max()))
    values = np.sort(np.random.default_rng(0).normal(0, 100, 10_000).astype(np.float32))
    key = bins(values)
    assert np.all(np.diff(key) >= 0)  # the bins keep the values' order, negative ones too
    assert all(lower_edge(b) <= v < lower_edge(b + 1) for b, v in zip(key[::97], values[::97]))


def test_streamed_pixel_curves_say_what_is_undefined_and_take_only_their_thresholds():
    from reporting.pixel_curves import PixelCurves

    curves = PixelCurves([0.5])
    curves.add(np.ones((4, 4)), np.zeros((4, 4)))
    assert curves.auroc() == (None, "undefined: every test pixel is good") and curves.f1_at(0.5) is None
    assert curves.aupro(defective_images=True) == (None, "undefined: every pixel of the defective test images is good")
    with pytest.raises(ValueError, match="no exact counts at 0.7"):
        curves.f1_at(0.7)
