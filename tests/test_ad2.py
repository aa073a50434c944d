"""MVTec AD 2 (issue 30): the synthetic scene, its layout, thresholds from validation/good only, the benchmark's
metrics on test_public and the private splits in the form its evaluation server takes, and the one-line errors."""

import json
import math
import shutil

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

from dataset import CategoryDataset, find_layout, list_categories
from patchcore import PatchCore, PatchCoreConfig
from plumbing.image_io import DataError
from reporting.metrics import aupro, auroc
from scripts import SMALL, one_line_error, run
from synthetic import make_synthetic_scene

SIZE, SIDE = (112, 80), 8  # a non-square scene, defects of 8 x 8 pixels
COUNTS = {"n_train": 6, "n_validation": 5, "n_test_good": 3, "n_test_bad": 3, "n_private": 4}


def scene(root, seed=0):
    return make_synthetic_scene(root, "scene", size=SIZE, defect_px=SIDE, seed=seed, **COUNTS)


def train(root, out, *extra):
    return run("train.py", "--data_path", root, "--category", "scene", "--output_dir", out, "--weights", "none",
               "--image_size", "64", "--resize", "64", *SMALL, *extra)  # fmt: skip


def evaluate(root, out, *extra):
    return run("evaluate.py", "--data_path", root, "--category", "scene", "--output_dir", out, *SMALL, *extra)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The synthetic scene trained and evaluated once: (data root, output dir, train's stdout, evaluate's stdout)."""
    root, out = tmp_path_factory.mktemp("ad2"), tmp_path_factory.mktemp("ad2_results")
    scene(root)
    trained = train(root, out)
    assert trained.returncode == 0, trained.stderr
    evaluated = evaluate(root, out)
    assert evaluated.returncode == 0, evaluated.stderr
    return root, out, trained.stdout, evaluated.stdout


def test_the_synthetic_scene_is_mvtec_ad2s_layout_with_small_defects_near_the_border(tmp_path):
    folder = scene(tmp_path / "a")
    assert find_layout(tmp_path / "a") == "mvtec_ad2" and list_categories(tmp_path / "a") == ["scene"]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    counts = {split: len([f for f in files if f.startswith(f"{split}/")]) for split in
              ("train/good", "validation/good", "test_public/good", "test_public/bad", "test_private", "test_private_mixed")}  # fmt: skip
    assert list(counts.values()) == [6, 5, 3, 3, 4, 4]
    scene(tmp_path / "b")  # the same seed, the same bytes
    assert all((folder / f).read_bytes() == (tmp_path / "b" / "scene" / f).read_bytes() for f in files)
    for path in (folder / "test_public" / "ground_truth" / "bad").iterdir():
        mask = np.asarray(Image.open(path)) > 0
        assert mask.shape == SIZE[::-1] and set(np.unique(np.asarray(Image.open(path)))) == {0, 255}
        ys, xs = np.nonzero(mask)
        # about SIDE x SIDE (a disc, or a bar SIDE long), its centre within 3 SIDE of a border
        assert SIDE - 2 <= max(np.ptp(xs), np.ptp(ys)) + 1 <= SIDE + 2 and mask.sum() >= SIDE * SIDE / 4
        centre = (xs.mean(), ys.mean())
        assert min(centre[0], SIZE[0] - centre[0], centre[1], SIZE[1] - centre[1]) <= 3 * SIDE + 1


def test_the_layout_gives_each_split_and_pairs_masks_by_name(tmp_path):
    scene(tmp_path)
    preprocess = PatchCoreConfig(weights="none", crop="none", image_size=64).preprocess()
    test = CategoryDataset(tmp_path, "scene", "test", preprocess)
    assert [s.defect for s in test.samples] == ["good"] * 3 + ["bad"] * 3
    assert all(s.mask.name == f"{s.image.stem}_mask.png" for s in test.samples if s.defect == "bad")
    assert len(CategoryDataset(tmp_path, "scene", "validation", preprocess)) == 5
    private = CategoryDataset(tmp_path, "scene", "test_private_mixed", preprocess)
    assert len(private) == 4 and {s.defect for s in private.samples} == {"?"} and all(s.mask is None for s in private.samples)
    with pytest.raises(DataError, match="the mvtec_ad2 layout has no 'valid' split; it has train, validation, test, test_private"):
        CategoryDataset(tmp_path, "scene", "valid", preprocess)


def test_thresholds_come_from_validation_good_alone(scored):
    """The image threshold is the split-conformal one on the validation images' scores, and the benchmark's rule is mean +
    3 std of every validation pixel at the image's own size: both recomputed here with torch's own resize."""
    root, out, trained, _ = scored
    model = PatchCore.from_bank(out / "scene" / "memory_bank.npz", device="cpu")
    calibration = model.calibration
    assert calibration.n_held_out == 5 and calibration.source == "validation/good images"
    assert model.config.calibration_holdout == 0 and model.config.crop == "none" and model.train_facts["held_out"] == []
    validation = CategoryDataset(root, "scene", "validation", model.config.preprocess())
    images = torch.stack([validation[i][0] for i in range(len(validation))])
    scores, maps = model.predict(images)
    k = min(5, math.ceil(6 * (1 - 0.05)))
    assert calibration.image_threshold == pytest.approx(float(np.sort(scores)[k - 1]), rel=1e-6)
    full = F.interpolate(torch.from_numpy(maps)[:, None].double(), size=SIZE[::-1], mode="bilinear", align_corners=False)
    assert calibration.mean_3std_pixel_threshold == pytest.approx(float(full.mean() + 3 * full.std(unbiased=False)), rel=1e-6)
    assert "thresholds from 5 validation/good images" in trained and "mean + 3 std of the validation pixels" in trained


def test_evaluate_reports_the_benchmarks_metrics_at_each_images_own_size(scored):
    root, out, _, stdout = scored
    metrics = json.loads((out / "scene" / "metrics.json").read_text())
    assert metrics["layout"] == "mvtec_ad2" and metrics["pixel_metrics_at"] == "original" and metrics["n_images"] == 6
    ad2 = metrics["mvtec_ad2"]
    for key in ("au_pro_0.05", "au_pro_0.3", "seg_f1", "seg_f1_mean_3std", "image_f1"):
        assert 0 <= ad2[key] <= 1, key
    # SegF1 again from the maps evaluate.py kept (float16, at each image's own size) and the masks, pooled
    raw = np.load(out / "scene" / "anomaly_maps.npz")
    test = CategoryDataset(root, "scene", "test", PatchCore.from_bank(out / "scene" / "memory_bank.npz", device="cpu").config.preprocess())
    tp = fp = fn = 0
    kept_maps, kept_masks = [], []
    for i in range(len(test)):
        anomaly_map = raw[test.relative_path(i)].astype(np.float32)
        mask = np.asarray(Image.open(test.samples[i].mask)) > 127 if test.samples[i].mask else np.zeros(SIZE[::-1], bool)
        assert anomaly_map.shape == mask.shape == SIZE[::-1]
        flagged = anomaly_map >= ad2["thresholds"]["pixel"]
        tp, fp, fn = tp + (flagged & mask).sum(), fp + (flagged & ~mask).sum(), fn + (~flagged & mask).sum()
        kept_maps.append(anomaly_map)
        kept_masks.append(mask)
    assert ad2["seg_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=0.02)  # float16 maps: pixels at the threshold may flip
    # the streamed curves (reporting/pixel_curves.py) against metrics.py's exact sort of every pixel of those maps
    for limit in (0.05, 0.3):
        assert ad2[f"au_pro_{limit:g}"] == pytest.approx(aupro(kept_masks, kept_maps, limit)[0], abs=0.01)
    labels, scores = np.concatenate([m.ravel() for m in kept_masks]), np.concatenate([m.ravel() for m in kept_maps])
    assert metrics["pixel_auroc"] == pytest.approx(auroc(labels, scores)[0], abs=1e-3)
    summary = (out / "summary.md").read_text()
    assert "## MVTec AD 2 (percent)" in summary and "| *paper's PatchCore, mean of 8 scenes (TEST_priv)* | 28.8 | n/a | 3.7 |" in summary
    assert "arXiv 2503.21622" in summary
    page = (out / "report.html").read_text()  # the review page: the benchmark's metrics on the scene's line, the table above
    assert "AU-PRO@0.05 <b>" in page and "SegF1 <b>" in page and "MVTec AD 2 (percent)" in page


def test_the_private_splits_are_written_for_the_evaluation_server(scored):
    root, out, _, _ = scored
    metrics = json.loads((out / "scene" / "metrics.json").read_text())
    written, threshold = metrics["mvtec_ad2"]["private_splits"], metrics["mvtec_ad2"]["thresholds"]["pixel"]
    for split in ("test_private", "test_private_mixed"):
        assert written[split]["images"] == 4 and written[split]["threshold"] == threshold
        for image in sorted((root / "scene" / split).iterdir()):
            anomaly_map = tifffile.imread(out / "anomaly_images" / "scene" / split / f"{image.stem}.tiff")
            binary = np.asarray(Image.open(out / "anomaly_images_thresholded" / "scene" / split / f"{image.stem}.png"))
            assert anomaly_map.dtype == np.float16 and anomaly_map.shape == binary.shape == SIZE[::-1]
            assert set(np.unique(binary)) <= {0, 255}
            differ = (binary == 255) != (anomaly_map >= threshold)  # thresholded in float32, stored in float16
            assert np.all(np.abs(anomaly_map[differ].astype(np.float64) - threshold) <= 2**-10 * threshold)


def test_a_scene_without_validation_is_one_line_before_any_work(tmp_path):
    shutil.rmtree(scene(tmp_path / "data") / "validation")
    line = one_line_error(train(tmp_path / "data", tmp_path / "out"))
    assert "validation/good is missing: MVTec AD 2 sets thresholds on validation/good images only" in line
    assert not (tmp_path / "out" / "scene").exists()


def test_a_mask_of_another_size_than_its_image_is_one_line(tmp_path):
    folder = scene(tmp_path / "data")
    assert train(tmp_path / "data", tmp_path / "out").returncode == 0  # train.py reads train/ and validation/ only
    mask = sorted((folder / "test_public" / "ground_truth" / "bad").iterdir())[1]
    Image.new("L", (20, 10)).save(mask)
    line = one_line_error(evaluate(tmp_path / "data", tmp_path / "out"))
    assert f"mask {mask} is 20x10 pixels but its image {mask.name.replace('_mask', '')} is 112x80" in line
    assert not (tmp_path / "out" / "scene" / "metrics.json").exists()


def test_calibration_on_train_good_is_refused_on_mvtec_ad2(tmp_path):
    scene(tmp_path / "data")
    line = one_line_error(train(tmp_path / "data", tmp_path / "out", "--calibration_holdout", "0.2"), code=2)
    assert "validation/good images only" in line and not (tmp_path / "out" / "scene").exists()
