"""Metrics on inputs whose answers are known by hand, and the heatmap panel."""

import numpy as np
import pytest
import torch

from evaluate import auroc, compute_metrics, heatmap_panel


def test_auroc_hand_computed():
    # pairs (defective, good) ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4); wrong: (0.35<0.4) -> 3/4
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), "x")[0] == pytest.approx(0.75)
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5]), "x")[0] == pytest.approx(0.5)  # a tie counts half
    assert auroc(np.array([1, 0, 0]), np.array([3.0, 2.0, 1.0]), "x")[0] == pytest.approx(1.0)


def test_auroc_undefined_for_one_class():
    value, reason = auroc(np.zeros(4), np.arange(4.0), "test image")
    assert value is None and "every test image is good" in reason


def test_pixel_auroc_over_all_pixels_of_all_images():
    masks = np.zeros((2, 2, 2))
    masks[1, 0, 0] = 1  # one defective pixel among 8
    maps = np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.35, 0.0], [0.0, 0.0]]])
    # the defective pixel (0.35) outranks 0.1, 0.2, 0.3 and the three zeros of image 2, not 0.4: 6/7
    metrics = compute_metrics(np.array([0, 1]), np.array([0.4, 0.35]), masks, maps)
    assert metrics["pixel_auroc"] == pytest.approx(6 / 7)
    assert metrics["image_auroc"] == pytest.approx(0.0)


def test_heatmap_panel_shows_input_and_outline():
    image = torch.zeros(3, 32, 32)
    mask = np.zeros((32, 32))
    mask[8:24, 8:24] = 1
    panel = np.asarray(heatmap_panel(image, np.random.default_rng(0).random((32, 32)), mask, 0.0, 1.0))
    assert panel.shape == (32, 64, 3)
    assert (panel[8, 32 + 8] == 255).all() and not (panel[16, 32 + 16] == 255).all()  # outline, not the inside
