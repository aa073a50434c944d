"""train.py and evaluate.py end to end on a small synthetic category, and their one-line errors."""

import csv
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from common import load_memory_bank
from dataset import make_synthetic_category
from scripts import SMALL, evaluate, run, train


def test_train_saves_the_memory_bank_with_its_config(evaluated):
    root, out, _ = evaluated
    bank, header = load_memory_bank(out / "widget" / "memory_bank.npz")
    n_patches = 6 * 8 * 8  # 6 training images, an 8x8 layer2 grid at 64 px
    assert bank.shape == (n_patches // 4, 1536)
    config = header["config"]
    assert config["weights"] == "none (random init, seed 0)" and config["layers"] == ["layer2", "layer3"]
    assert config["image_size"] == 64 and config["coreset_ratio"] == 0.25
    assert header["train"]["n_patches"] == n_patches and header["environment"]["torch"]


def test_evaluate_writes_scores_metrics_and_heatmaps(evaluated):
    root, out, stdout = evaluated
    assert "| widget |" in stdout and "image AUROC" in stdout and "anomaly_maps" in stdout
    scores = json.loads((out / "widget" / "scores.json").read_text())
    metrics = json.loads((out / "widget" / "metrics.json").read_text())
    assert len(scores) == metrics["n_images"] == 9 and metrics["n_defective"] == 6
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"):
        assert 0 <= metrics[key] <= 1, key
    assert set(metrics["per_defect"]) == {"scratch", "spot", "stain"}
    assert metrics["weights"] == "none (random init, seed 0)" and metrics["memory_bank"]["config"]["seed"] == 0
    good = [s["score"] for s in scores if s["label"] == 0]
    defective = [s["score"] for s in scores if s["label"] == 1]
    assert np.mean(defective) > np.mean(good)
    heatmaps = sorted((out / "widget" / "anomaly_maps").rglob("*.png"))
    assert len(heatmaps) == 9 and Image.open(heatmaps[0]).size == (3 * 64 + 72, 64)
    for name in ("roc.png", "score_hist.png"):
        assert Image.open(out / "widget" / name).size[0] > 100
    assert not list((out / "widget").glob(".*"))  # no temporary files or folders left


def test_raw_maps_reproduce_the_pixel_auroc(evaluated):
    from sklearn.metrics import roc_auc_score

    from dataset import MVTecDataset, Preprocess

    root, out, _ = evaluated
    metrics = json.loads((out / "widget" / "metrics.json").read_text())
    test = MVTecDataset(root, "widget", "test", Preprocess(72, 64))
    with np.load(out / "widget" / "anomaly_maps.npz") as raw:
        assert raw[test[0][3]].dtype == np.float16 and raw[test[0][3]].shape == (64, 64)
        maps = np.stack([raw[test[i][3]].astype(np.float32) for i in range(len(test))])
    masks = np.stack([test[i][2][0].numpy() for i in range(len(test))])
    assert roc_auc_score(masks.ravel() > 0.5, maps.ravel()) == pytest.approx(metrics["pixel_auroc"], abs=1e-3)


def test_summary_files(evaluated):
    _, out, _ = evaluated
    assert "| widget |" in (out / "summary.md").read_text()
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["category"] for r in rows] == ["widget", "mean"] and rows[0]["image_auroc"] == rows[1]["image_auroc"]


def test_scoring_new_images(evaluated, tmp_path):
    root, out, _ = evaluated
    result = evaluate(root, out, "--images", root / "widget" / "test" / "spot")
    assert result.returncode == 0, result.stderr
    inference = json.loads((out / "widget" / "inference" / "scores.json").read_text())
    metrics = json.loads((out / "widget" / "metrics.json").read_text())
    assert inference["threshold"] == metrics["image_f1_threshold"] and len(inference["images"]) == 2
    for record in inference["images"]:
        assert record["decision"] == ("defective" if record["score"] >= inference["threshold"] else "good")
        assert (out / "widget" / "inference" / record["heatmap"]).is_file()
    result = evaluate(root, out, "--images", f"{root}/widget/test/*/000.png", "--threshold", "1e9")
    assert result.returncode == 0, result.stderr
    inference = json.loads((out / "widget" / "inference" / "scores.json").read_text())
    assert len(inference["images"]) == 4 and {r["decision"] for r in inference["images"]} == {"good"}
    assert not (out / "widget" / "inference" / "metrics.json").exists()


def test_training_is_deterministic(evaluated, tmp_path):
    root, out, _ = evaluated
    assert train(root, tmp_path).returncode == 0
    first, _ = load_memory_bank(out / "widget" / "memory_bank.npz")
    second, _ = load_memory_bank(tmp_path / "widget" / "memory_bank.npz")
    assert np.array_equal(first, second)


def test_evaluate_refuses_a_bank_built_with_other_weights(evaluated, tmp_path):
    root, out, _ = evaluated
    torch.save(torchvision.models.wide_resnet50_2().state_dict(), tmp_path / "other.pth")  # other random weights
    result = evaluate(root, out, "--weights", tmp_path / "other.pth")
    assert result.returncode == 1 and "checksums differ" in result.stderr


def one_line_error(result, code=1):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_missing_data_path(tmp_path):
    assert "does not exist" in one_line_error(train(tmp_path / "nowhere", tmp_path))


def test_unknown_category_lists_the_found_ones(synthetic_root, tmp_path):
    line = one_line_error(run("train.py", "--data_path", synthetic_root, "--category", "bottle", "--output_dir", tmp_path, *SMALL))
    assert "bottle" in line and "found: widget" in line


def test_empty_train_good(tmp_path):
    (tmp_path / "data" / "widget" / "train" / "good").mkdir(parents=True)
    assert "no images in" in one_line_error(train(tmp_path / "data", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unreadable_image_is_named(tmp_path):
    make_synthetic_category(tmp_path / "data", "widget", n_train=2, n_test_good=1, n_per_defect=1, size=48)
    (tmp_path / "data" / "widget" / "train" / "good" / "001.png").write_bytes(b"\x89PNG garbage")
    assert "001.png" in one_line_error(train(tmp_path / "data", tmp_path / "out"))


def test_evaluate_before_train_names_the_command(synthetic_root, tmp_path):
    assert "python train.py" in one_line_error(evaluate(synthetic_root, tmp_path))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--coreset_ratio", "0"], "--coreset_ratio"),
        (["--coreset_ratio", "1.5"], "--coreset_ratio"),
        (["--batch_size", "0"], "--batch_size"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_bad_arguments_are_usage_errors(synthetic_root, tmp_path, flags, message):
    assert message in one_line_error(train(synthetic_root, tmp_path, *flags), code=2)


def test_tampered_bank_is_refused_by_evaluate(evaluated, tmp_path):
    root, _, _ = evaluated
    (tmp_path / "widget").mkdir()
    (tmp_path / "widget" / "memory_bank.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert "rerun train.py" in one_line_error(evaluate(root, tmp_path))
