"""train.py and evaluate.py end to end on a small synthetic category, and their one-line errors."""

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from plumbing.bank import load_bank, save_bank
from plumbing.cli import run_main
from scripts import REPO, SMALL, evaluate, one_line_error, run, train
from synthetic import make_synthetic_category


def test_train_saves_the_memory_bank_with_its_config(evaluated):
    root, out, _ = evaluated
    bank, header = load_bank(out / "widget" / "memory_bank.npz")
    n_patches = 6 * 8 * 8  # 6 training images, an 8x8 layer2 grid at 64 px
    assert bank.shape == (n_patches // 4, 1536)
    config = header["config"]
    assert config["weights"] == "none" and header["model"]["weights"] == "none (random init, seed 0)"
    assert config["layers"] == ["layer2", "layer3"]
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

    from dataset import CategoryDataset, Preprocess

    root, out, _ = evaluated
    metrics = json.loads((out / "widget" / "metrics.json").read_text())
    test = CategoryDataset(root, "widget", "test", Preprocess(72, 64))
    with np.load(out / "widget" / "anomaly_maps.npz") as raw:
        assert raw[test[0][3]].dtype == np.float16 and raw[test[0][3]].shape == (64, 64)
        maps = np.stack([raw[test[i][3]].astype(np.float32) for i in range(len(test))])
    masks = np.stack([test[i][2][0].numpy() for i in range(len(test))])
    assert roc_auc_score(masks.ravel() > 0.5, maps.ravel()) == pytest.approx(metrics["pixel_auroc"], abs=1e-3)


def test_scores_and_image_metrics_follow_the_papers_definition(evaluated):
    """scores.json against Eq. 6 and the max computed here in float64 from the saved bank; metrics.json against sklearn."""
    from sklearn.metrics import roc_auc_score

    from dataset import CategoryDataset, Preprocess
    from patchcore import PatchCore

    root, out, _ = evaluated
    bank, _ = load_bank(out / "widget" / "memory_bank.npz")
    test = CategoryDataset(root, "widget", "test", Preprocess(72, 64))
    model = PatchCore(weights="none", device="cpu", seed=0)  # the training run's weights
    images = torch.stack([test[i][0] for i in range(len(test))])
    patches = model.aggregate_patches(model.extract_features(images)).numpy().astype(np.float64)
    expected = {}
    for i, image_patches in enumerate(patches):
        d = np.sqrt(((image_patches[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1))
        expected[test[i][3]] = d.min(1).max()
    records = json.loads((out / "widget" / "scores.json").read_text())
    got = {r["path"]: r["score"] for r in records}
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[p] for p in expected], list(expected.values()), rtol=2.5e-4)  # measured: 3e-6
    metrics = json.loads((out / "widget" / "metrics.json").read_text())
    labels, scores = [r["label"] for r in records], [r["score"] for r in records]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_summary_files(evaluated):
    _, out, _ = evaluated
    assert "| widget |" in (out / "summary.md").read_text()
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["category"] for r in rows] == ["widget", "mean"] and rows[0]["image_auroc"] == rows[1]["image_auroc"]


def test_scoring_new_images(evaluated, tmp_path):
    root, out, _ = evaluated
    _, header = load_bank(out / "widget" / "memory_bank.npz")
    calibration = header["calibration"]
    parts = tmp_path / "parts"  # two different images that share a stem keep a heatmap each
    parts.mkdir()
    shutil.copy(root / "widget" / "test" / "spot" / "000.png", parts / "000.png")
    Image.open(root / "widget" / "test" / "spot" / "001.png").convert("RGB").save(parts / "000.jpg", quality=95)
    result = evaluate(root, out, "--images", parts)
    assert result.returncode == 0, result.stderr
    inference = json.loads((out / "widget" / "inference" / "scores.json").read_text())
    assert inference["threshold"] == calibration["image_threshold"] and inference["pixel_threshold"] == calibration["pixel_threshold"]
    assert inference["thresholds_from"].startswith("calibrated on 1 held-out good images") and len(inference["images"]) == 2
    assert sorted(r["heatmap"] for r in inference["images"]) == ["anomaly_maps/000.jpg.png", "anomaly_maps/000.png.png"]
    for record in inference["images"]:
        assert record["decision"] == ("defective" if record["score"] >= inference["threshold"] else "good")
        assert record["normalized_score"] == pytest.approx(record["score"] / inference["threshold"])
        assert (out / "widget" / "inference" / record["heatmap"]).is_file()
    metrics = json.loads((out / "widget" / "metrics.json").read_text())
    assert evaluate(root, out, "--images", root / "widget" / "test" / "spot", "--threshold", "f1").returncode == 0
    inference = json.loads((out / "widget" / "inference" / "scores.json").read_text())
    assert inference["threshold"] == metrics["image_f1_threshold"] and inference["thresholds_from"].startswith("labelled F1")
    result = evaluate(root, out, "--images", f"{root}/widget/test/*/000.png", "--threshold", "1e9")
    assert result.returncode == 0, result.stderr
    inference = json.loads((out / "widget" / "inference" / "scores.json").read_text())
    assert len(inference["images"]) == 4 and {r["decision"] for r in inference["images"]} == {"good"}
    assert not (out / "widget" / "inference" / "metrics.json").exists()
    assert "--threshold takes a number or f1" in one_line_error(evaluate(root, out, "--images", root, "--threshold", "high"), code=2)


def test_values_from_another_banks_metrics_json_are_refused(evaluated, tmp_path):
    """metrics.json records the checksum of the bank it was computed with; after a retrain --threshold f1 is refused in
    one line, and an --images run neither marks that file's F1 threshold nor takes its heatmap scale, and says so once."""
    root, out, _ = evaluated
    shutil.copytree(out, tmp_path / "out")
    out = tmp_path / "out"
    _, header = load_bank(out / "widget" / "memory_bank.npz")
    assert json.loads((out / "widget" / "metrics.json").read_text())["memory_bank"]["sha256"] == header["sha256"]
    assert train(root, out, "--seed", "1").returncode == 0  # metrics.json stays: the old bank's
    result = evaluate(root, out, "--images", root / "widget" / "test" / "good", "--threshold", "f1")
    assert "computed with another memory bank" in one_line_error(result)
    result = evaluate(root, out, "--images", root / "widget" / "test" / "good")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "metrics.json" in line] == [
        f"WARNING: {out / 'widget' / 'metrics.json'} was computed with another memory bank than {out / 'widget' / 'memory_bank.npz'} "
        "holds now (trained again since): run evaluate.py on widget's test split again; until then its F1 mark and heatmap scale "
        "are not used"
    ]
    page = (out / "widget" / "inference" / "report.html").read_text()
    assert 'class="mark"' in page and ">F1 " not in page


def test_metrics_at_the_calibrated_thresholds(evaluated):
    root, out, _ = evaluated
    metrics = json.loads((out / "widget" / "metrics.json").read_text())
    records = json.loads((out / "widget" / "scores.json").read_text())
    at = metrics["at_calibrated_thresholds"]
    good = [r["score"] >= at["image_threshold"] for r in records if r["label"] == 0]
    defective = [r["score"] >= at["image_threshold"] for r in records if r["label"] == 1]
    assert at["image_fpr"] == pytest.approx(np.mean(good)) and at["image_recall"] == pytest.approx(np.mean(defective))
    assert 0 <= at["pixel_fpr"] <= 1 and 0 <= at["pixel_recall"] <= 1 and at["f1_image_threshold"] == metrics["image_f1_threshold"]
    assert all(r["normalized_score"] == pytest.approx(r["score"] / at["image_threshold"]) for r in records)


def test_decisions_right_after_training(synthetic_root, tmp_path):
    """No metrics.json: the thresholds calibrated on held-out good images decide."""
    result = train(synthetic_root, tmp_path, "--calibration_holdout", "0.5", "--target_fpr", "0.25")
    assert result.returncode == 0, result.stderr
    assert "widget: thresholds from 3 held-out good images, aiming at 25% false alarms (expected 25.0%)" in result.stdout
    _, header = load_bank(tmp_path / "widget" / "memory_bank.npz")
    assert len(header["train"]["held_out"]) == 3 and header["train"]["n_images"] == 6  # the bank holds every image
    result = evaluate(synthetic_root, tmp_path, "--images", f"{synthetic_root}/widget/test/*/*.png")
    assert result.returncode == 0, result.stderr
    inference = json.loads((tmp_path / "widget" / "inference" / "scores.json").read_text())
    assert inference["threshold"] == header["calibration"]["image_threshold"] and not (tmp_path / "widget" / "metrics.json").exists()
    assert all(r["decision"] == ("defective" if r["normalized_score"] >= 1 else "good") for r in inference["images"])


def test_too_few_images_to_calibrate_is_said_in_one_line(tmp_path):
    make_synthetic_category(tmp_path / "data", "widget", n_train=2, n_test_good=1, n_per_defect=1, size=72)
    result = train(tmp_path / "data", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "calibration" in line]
    assert lines == ["widget: too few training images (2) to hold out a share of 0.2 for calibration: no thresholds stored; "
                     "decide with evaluate.py --threshold"]  # fmt: skip
    result = evaluate(tmp_path / "data", tmp_path / "out", "--images", tmp_path / "data" / "widget" / "test" / "good")
    assert result.returncode == 0, result.stderr
    inference = json.loads((tmp_path / "out" / "widget" / "inference" / "scores.json").read_text())
    assert inference["threshold"] is None and "decision" not in inference["images"][0] and "(no threshold)" in result.stdout


def test_adding_good_images_grows_the_bank(evaluated, tmp_path):
    root, out, _ = evaluated
    shutil.copytree(out / "widget", tmp_path / "widget", ignore=shutil.ignore_patterns("anomaly_maps*", "inference"))
    before, old_header = load_bank(tmp_path / "widget" / "memory_bank.npz")
    grow = ["--category", "widget", "--output_dir", tmp_path, *SMALL]
    result = run("train.py", *grow, "--add", root / "widget" / "test" / "good")
    assert result.returncode == 0, result.stderr
    after, header = load_bank(tmp_path / "widget" / "memory_bank.npz")
    assert np.array_equal(after[: len(before)], before) and len(after) == len(before) + 3 * 8 * 8 // 4
    assert header["train"]["n_images"] == 9 and len(header["train"]["added"][0]["images"]) == 3
    assert header["calibration"]["image_threshold"] == old_header["calibration"]["image_threshold"]
    assert "conservative" in header["calibration"]["note"] and "thresholds kept after adding 3 good images" in result.stdout
    line = one_line_error(run("train.py", *grow, "--add", root / "widget" / "test" / "good", "--coreset_ratio", "0.5"), code=2)
    assert "--coreset_ratio 0.5 differs from the bank's 0.25" in line
    assert np.array_equal(load_bank(tmp_path / "widget" / "memory_bank.npz")[0], after)  # the refused run wrote nothing


def test_scoring_new_images_holds_one_batch_at_a_time(evaluated, tmp_path, monkeypatch):
    """Live tensors and traced (numpy and Python) memory must not grow with the number of images scored."""
    import gc
    import tracemalloc

    import evaluate as evaluate_module
    from patchcore import PatchCore

    root, out, _ = evaluated
    shutil.copytree(out / "widget", tmp_path / "out" / "widget", ignore=shutil.ignore_patterns("anomaly_maps*", "inference"))
    parts = tmp_path / "parts"
    parts.mkdir()
    rng = np.random.default_rng(0)
    for i in range(160):
        Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(parts / f"{i:03d}.png")
    calls, samples, real_predict = [], [], PatchCore.predict

    def predict(self, images):
        calls.append(1)
        if len(calls) in (6, 80):  # after warm-up, and at the last of the 80 batches
            gc.collect()
            samples.append((sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()), tracemalloc.get_traced_memory()[0]))
        return real_predict(self, images)

    monkeypatch.setattr(PatchCore, "predict", predict)
    argv = ["evaluate.py", "--data_path", str(root), "--category", "widget", "--output_dir", str(tmp_path / "out"), "--images", str(parts)]
    monkeypatch.setattr(sys, "argv", argv + ["--batch_size", "2", "--num_workers", "0", "--device", "cpu"])
    tracemalloc.start()
    try:
        evaluate_module.main()
    finally:
        tracemalloc.stop()
    assert len(calls) == 80
    (tensors_early, traced_early), (tensors_late, traced_late) = samples
    # 75 batches later: keeping each image's map (16 KB) or RGB copy (98 KB) would add 2.4 MB or more;
    # what may grow is the list of small per-image records (about 0.6 KB each)
    assert tensors_late - tensors_early <= 2 and traced_late - traced_early < 400_000, samples
    assert len(json.loads((tmp_path / "out" / "widget" / "inference" / "scores.json").read_text())["images"]) == 160


@pytest.mark.cpu_dependent
def test_settings_round_trip_through_the_bank(synthetic_root, tmp_path):
    """Non-default resize, crop, layers, amp and blur at training; evaluation, given none of them, uses the stored ones."""
    from dataset import CategoryDataset, Preprocess
    from patchcore import PatchCore
    from plumbing.system import cpu_supports

    settings = ["--resize", "60", "--image_size", "48", "--layers", "layer1,layer2", "--amp", "bf16", "--blur_sigma", "2"]
    assert train(synthetic_root, tmp_path, *settings).returncode == 0
    result = evaluate(synthetic_root, tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "widget" / "metrics.json").read_text())
    config = metrics["memory_bank"]["config"]
    assert (config["resize"], config["image_size"], config["layers"], config["amp"], config["blur_sigma"]) == (
        60,
        48,
        ["layer1", "layer2"],
        "bf16",
        2.0,
    )
    with np.load(tmp_path / "widget" / "anomaly_maps.npz") as raw:
        assert {raw[k].shape for k in raw.files} == {(48, 48)}
    test = CategoryDataset(synthetic_root, "widget", "test", Preprocess(60, 48))
    images = torch.stack([test[i][0] for i in range(len(test))])
    bank, _ = load_bank(tmp_path / "widget" / "memory_bank.npz")
    got = np.array([r["score"] for r in json.loads((tmp_path / "widget" / "scores.json").read_text())])
    scores = {}
    for amp in ("bf16", "none"):
        model = PatchCore(weights="none", device="cpu", layers=("layer1", "layer2"), amp=amp, blur_sigma=2.0)
        model.set_memory_bank(torch.from_numpy(bank))
        scores[amp] = model.predict(images)[0]
    np.testing.assert_allclose(got, scores["bf16"], rtol=1e-5)  # the stored precision ran, as it runs here
    if cpu_supports("bf16"):  # native bf16: it changes the scores (measured difference: 1e-3)
        assert np.abs(got - scores["none"]).max() > 10 * 1e-5 * np.abs(got).max() and metrics["backbone_precision"] == "bf16"
    else:  # no native bf16: fp32 ran, and metrics.json says why
        np.testing.assert_allclose(got, scores["none"], rtol=1e-5)
        assert metrics["backbone_precision"] == "none (the bank's bf16 is not native here)"


@pytest.mark.parametrize("flag", [["--image_size", "32"], ["--amp", "bf16"], ["--reweight_b", "9"], ["--layers", "layer3"]])
def test_evaluate_refuses_memory_bank_settings(evaluated, flag):
    root, out, _ = evaluated
    line = one_line_error(evaluate(root, out, *flag), code=2)
    assert f"{flag[0]} is a memory-bank setting" in line and "retrain" in line


def test_evaluate_refuses_an_old_format_bank_in_one_line(evaluated, tmp_path):
    root, _, _ = evaluated
    (tmp_path / "widget").mkdir()
    header = np.frombuffer(json.dumps({"format": "patchcore-memory-bank", "format_version": 1}).encode(), np.uint8)
    np.savez(tmp_path / "widget" / "memory_bank.npz", memory_bank=np.ones((4, 1536), np.float32), header=header)
    line = one_line_error(evaluate(root, tmp_path))
    assert "older version of this code (bank format 1, this code reads 2); rerun train.py" in line


def test_evaluate_refuses_a_bank_built_with_other_weights(evaluated, tmp_path):
    root, out, _ = evaluated
    torch.save(torchvision.models.wide_resnet50_2().state_dict(), tmp_path / "other.pth")  # other random weights
    result = evaluate(root, out, "--weights", tmp_path / "other.pth")
    assert result.returncode == 1 and "checksums differ" in result.stderr


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


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_truncated_jpeg_is_named_in_one_line(tmp_path, workers):
    """A truncated JPEG passes the structural check (PIL's verify() checks nothing for JPEG) and fails when decoded:
    one line naming the file, also when a DataLoader worker decodes it (issue 28, item 12)."""
    make_synthetic_category(tmp_path / "data", "widget", n_train=3, n_test_good=1, n_per_defect=1, size=48)
    truncated = tmp_path / "data" / "widget" / "train" / "good" / "002.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), np.uint8)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:800])
    result = train(tmp_path / "data", tmp_path / "out", "--backbone", "resnet18", "--num_workers", workers)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]  # the rest: progress bars
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    line = errors[0]
    assert line.startswith(f"error: cannot read image {truncated} (image file is truncated"), line
    assert line.endswith("): replace or remove the file")


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


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this would create the marker file


def test_a_pickle_payload_bank_is_refused_and_never_run(evaluated, tmp_path):
    root, _, _ = evaluated
    marker = tmp_path / "pwned"
    (tmp_path / "widget").mkdir()
    payload = np.array([_Payload(str(marker))], dtype=object)
    np.savez(tmp_path / "widget" / "memory_bank.npz", memory_bank=payload, header=payload)
    line = one_line_error(evaluate(root, tmp_path))
    assert "not a readable memory bank" in line and "rerun train.py" in line
    assert not marker.exists()


def test_same_seed_same_bytes_and_same_scores(evaluated, tmp_path):
    """At a fixed thread count (tests/scripts.py pins it): other counts change float32 summation order. The
    second run takes the two-pass fit (as less free RAM would make it): a run fact, kept out of the bank."""
    root, out, _ = evaluated
    assert train(root, tmp_path, "--feature_memory_gb", "0").returncode == 0
    assert (tmp_path / "widget" / "memory_bank.npz").read_bytes() == (out / "widget" / "memory_bank.npz").read_bytes()
    runs = [json.loads((o / "widget" / "train.json").read_text()) for o in (out, tmp_path)]
    assert [r["fit"] for r in runs] == ["one pass", "two passes"] and runs[0]["gpu"] == "cpu"
    assert evaluate(root, tmp_path).returncode == 0
    assert (tmp_path / "widget" / "scores.json").read_text() == (out / "widget" / "scores.json").read_text()


def test_test_split_with_one_class_gives_undefined_metrics(tmp_path):
    make_synthetic_category(tmp_path / "data", "widget", n_train=2, n_test_good=2, n_per_defect=1, size=48)
    for defect in ("scratch", "spot", "stain"):
        shutil.rmtree(tmp_path / "data" / "widget" / "test" / defect)
    assert train(tmp_path / "data", tmp_path / "out").returncode == 0
    result = evaluate(tmp_path / "data", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "out" / "widget" / "metrics.json").read_text()
    assert "NaN" not in text
    metrics = json.loads(text)
    assert metrics["image_auroc"] is None and metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["undefined"]["image_auroc"] == "undefined: every test image is good"
    assert "n/a" in result.stdout


def test_reweighting_neighbours_beyond_the_bank_are_refused(synthetic_root, tmp_path):
    line = one_line_error(train(synthetic_root, tmp_path, "--reweight_b", "100000"))
    assert "--reweight_b 100000 is larger than the memory bank (96 patches)" in line
    assert not (tmp_path / "widget" / "memory_bank.npz").exists()


def test_reweighted_scores_end_to_end(synthetic_root, tmp_path):
    assert train(synthetic_root, tmp_path, "--reweight_b", "9").returncode == 0
    result = evaluate(synthetic_root, tmp_path)  # no flag: the bank's config says b = 9
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "widget" / "metrics.json").read_text())
    assert metrics["image_score"] == "Eq. 7 reweighting, b=9" and metrics["memory_bank"]["config"]["reweight_b"] == 9


def test_reweight_b_1_is_a_usage_error(synthetic_root, tmp_path):
    line = one_line_error(train(synthetic_root, tmp_path, "--reweight_b", "1"), code=2)
    assert "--reweight_b 1 would score every image 0" in line and "use 0 or b >= 2" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_is_a_usage_error(synthetic_root, tmp_path):
    line = one_line_error(run("train.py", "--data_path", synthetic_root, "--category", "widget", "--device", "cuda"), code=2)
    assert "--device cuda" in line and "--device cpu" in line


def test_incompatible_weights_file(synthetic_root, tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    result = run("train.py", "--data_path", synthetic_root, "--category", "widget", "--output_dir", tmp_path / "out",
                 "--weights", tmp_path / "r18.pth", *SMALL)  # fmt: skip
    assert "not a state_dict of wide_resnet50_2" in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir(synthetic_root, tmp_path):
    (tmp_path / "a_file").write_text("")
    line = one_line_error(train(synthetic_root, tmp_path / "a_file" / "results"), code=2)
    assert "--output_dir" in line and "cannot be written" in line


@pytest.fixture(scope="module")
def slow_category(tmp_path_factory):
    """Full-size images, so that each run lasts long enough to be interrupted."""
    root = tmp_path_factory.mktemp("slow")
    make_synthetic_category(root, "widget", n_train=12, n_test_good=16, n_per_defect=4, size=256)
    return root


def _interrupt_when(command, text, timeout=120):
    """Start command, send Ctrl-C (SIGINT) once its stderr shows text; return (exit code, stderr)."""
    child = subprocess.Popen(  # SIGINT un-ignored in the child: background shells start jobs with it ignored
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=REPO,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen, deadline = b"", time.time() + timeout
    while text.encode() not in seen and time.time() < deadline:
        chunk = os.read(child.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    assert text.encode() in seen, seen.decode(errors="replace")
    child.send_signal(signal.SIGINT)
    _, rest = child.communicate(timeout=60)
    return child.returncode, (seen + rest).decode(errors="replace")


def test_ctrl_c_leaves_no_partial_outputs(slow_category, tmp_path):
    base = [sys.executable, "--data_path", slow_category, "--category", "widget", "--output_dir", tmp_path, "--weights", "none"]
    base = [str(a) for a in base] + ["--num_workers", "0", "--batch_size", "2", "--device", "cpu"]
    code, err = _interrupt_when([base[0], str(REPO / "train.py"), *base[1:]], "features:")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "widget").exists() or not list((tmp_path / "widget").iterdir())

    assert subprocess.run([base[0], str(REPO / "train.py"), *base[1:], "--coreset_ratio", "0.01"], cwd=REPO).returncode == 0
    evaluate_args = [a for a in base[1:] if a not in ("--weights", "none")]
    code, err = _interrupt_when([base[0], str(REPO / "evaluate.py"), *evaluate_args], "widget test:")
    assert code == 130 and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "widget").iterdir()) == ["memory_bank.npz", "train.json", "train_audit", "train_audit.json"]


def test_full_disk_during_evaluate_keeps_the_old_results(evaluated, tmp_path, monkeypatch, capsys):
    import evaluate as evaluate_module

    root, out, _ = evaluated
    shutil.copytree(out / "widget", tmp_path / "widget")
    before = (tmp_path / "widget" / "metrics.json").read_text()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("plumbing.files.os.fsync", no_space)
    argv = ["evaluate.py", "--data_path", str(root), "--category", "widget", "--output_dir", str(tmp_path), *SMALL]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        run_main(evaluate_module.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and "No space left on device" in err[-1] and "--output_dir" in err[-1]
    assert (tmp_path / "widget" / "metrics.json").read_text() == before
    assert not list((tmp_path / "widget").glob(".*"))


def test_a_bank_of_another_feature_size_is_refused(evaluated, tmp_path):
    from patchcore import PatchCore
    from plumbing.bank import BankError

    _, out, _ = evaluated
    bank, header = load_bank(out / "widget" / "memory_bank.npz")
    header["config"]["layers"] = ["layer3"]  # a consistent file, but 1024-d features expected
    save_bank(tmp_path / "memory_bank.npz", bank, {k: v for k, v in header.items() if k != "sha256"})
    with pytest.raises(BankError, match="holds 1536-d features, but wide_resnet50_2 \\['layer3'\\] makes 1024-d"):
        PatchCore.from_bank(tmp_path / "memory_bank.npz", device="cpu")


def _exit(main, monkeypatch, capsys, argv=("prog",)):
    monkeypatch.setattr(sys, "argv", list(argv))
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    return exit_info.value.code, capsys.readouterr().err


def test_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def main():
        raise ValueError("bad thing\nover two lines")

    code, err = _exit(main, monkeypatch, capsys)
    assert code == 1 and err == "error: bad thing over two lines\n"
    code, err = _exit(main, monkeypatch, capsys, ("prog", "--debug"))
    assert code == 1 and "Traceback" in err and err.endswith("error: bad thing over two lines\n")


def test_gpu_out_of_memory_suggests_what_to_do(monkeypatch, capsys):
    def main():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    code, err = _exit(main, monkeypatch, capsys)
    assert code == 1 and "GPU out of memory" in err and "smaller --batch_size, or --device cpu" in err


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def main():
        raise KeyboardInterrupt

    code, err = _exit(main, monkeypatch, capsys)
    assert code == 130 and "interrupted" in err


def test_a_visa_category_trains_and_evaluates_end_to_end(tmp_path):
    data = tmp_path / "visa"
    command = run("synthetic.py", data, "--layout", "visa", "--category", "pcb1", "--size", "96", "64", "--n_train", "5")
    assert command.returncode == 0, command.stderr
    visa = ["--data_path", data, "--category", "all", "--output_dir", tmp_path / "out", *SMALL]
    result = run("train.py", *visa, "--weights", "none", "--resize", "72", "--image_size", "64")
    assert result.returncode == 0, result.stderr
    result = run("evaluate.py", *visa)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "pcb1" / "metrics.json").read_text())
    assert metrics["layout"] == "visa" and metrics["n_defective"] == 18 and metrics["pixel_auroc"] is not None
    assert "| pcb1 | all |" in result.stdout and "IM-IAD" in result.stdout  # compared with the published VisA numbers


def test_a_folder_without_ground_truth_gets_image_metrics_and_heatmaps(tmp_path):
    make_synthetic_category(tmp_path / "data", "widget", n_train=4, n_test_good=2, n_per_defect=1, size=72, layout="folder")
    assert train(tmp_path / "data", tmp_path / "out").returncode == 0
    result = evaluate(tmp_path / "data", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "widget" / "metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["undefined"]["pixel_auroc"].startswith("undefined: no ground-truth masks for defect type(s) scratch, spot, stain")
    assert len(list((tmp_path / "out" / "widget" / "anomaly_maps").rglob("*.png"))) == 5


def test_few_shot_banks_come_from_k_images_drawn_with_the_seed(synthetic_root, tmp_path):
    banks = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"seed{seed}-{len(banks)}"
        result = train(synthetic_root, out, "--shots", "2", "--seed", str(seed), "--coreset_ratio", "1")
        assert result.returncode == 0, result.stderr
        bank, header = load_bank(out / "widget" / "memory_bank.npz")
        assert bank.shape == (2 * 8 * 8, 1536) and header["train"]["n_images"] == 2 and header["config"]["shots"] == 2
        banks[len(banks)] = header["train"]["images"]
    assert banks[0] == banks[1] and banks[0] != banks[2] and all(p.startswith("widget/train/good/") for p in banks[0])
    assert evaluate(synthetic_root, tmp_path / "seed0-0").returncode == 0
    metrics = json.loads((tmp_path / "seed0-0" / "widget" / "metrics.json").read_text())
    assert metrics["shots"] == 2 and metrics["memory_bank"]["images"] == banks[0]
    assert "--shots 7: widget's train split holds 6 images" in one_line_error(train(synthetic_root, tmp_path / "x", "--shots", "7"))


def test_whole_image_maps_land_on_the_original_image(tmp_path):
    """--crop none: a bright square at a known place of a 120x60 image is where its full-size map peaks."""
    rng = np.random.default_rng(0)
    for split, defect, count in (("train", "good", 4), ("test", "good", 1), ("test", "hole", 1)):
        (tmp_path / "data" / "w" / split / defect).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = (100 + rng.normal(0, 3, (60, 120, 3))).clip(0, 255).astype(np.uint8)
            if defect == "hole":
                image[20:36, 88:104] = 255  # the defect: x 88..103, y 20..35
            Image.fromarray(image).save(tmp_path / "data" / "w" / split / defect / f"{i}.png")
    common = ["--data_path", tmp_path / "data", "--category", "w", "--output_dir", tmp_path / "out", *SMALL]
    # layer1 only: with random weights, deeper layers' features react to the square wherever they look
    settings = ["--weights", "none", "--crop", "none", "--image_size", "64", "--resize", "64", "--layers", "layer1"]
    assert run("train.py", *common, *settings).returncode == 0
    result = run("evaluate.py", *common)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out" / "w" / "anomaly_maps.npz") as raw:
        full = raw["w/test/hole/0.png"].astype(np.float32)
    assert full.shape == (60, 120)  # back at the original size
    y, x = np.unravel_index(full.argmax(), full.shape)
    assert 20 - 4 <= y <= 35 + 4 and 88 - 4 <= x <= 103 + 4, (y, x)
    assert Image.open(tmp_path / "out" / "w" / "anomaly_maps" / "hole" / "0.png").size == (3 * 120 + 72, 60)  # the full photo, 3 panels
    result = run("evaluate.py", *common, "--pixel_metrics_at", "original")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "w" / "metrics.json").read_text())
    assert metrics["pixel_metrics_at"] == "original" and "each image's own resolution (the whole image)" in metrics["computed_on"]
    assert not list((tmp_path / "out").rglob(".maps_at_original"))  # the full-size maps the heatmaps were drawn from: gone


def test_config_options_are_parsed_by_each_fields_real_type():
    import dataclasses

    from plumbing.cli import ArgumentParser, add_config_args

    @dataclasses.dataclass(frozen=True)
    class Config:
        count: int = dataclasses.field(default=1, metadata={"help": "h"})
        ratio: float | None = dataclasses.field(default=None, metadata={"help": "h"})
        name: str = dataclasses.field(default="a", metadata={"help": "h"})
        flag: bool = dataclasses.field(default=False, metadata={"help": "h"})
        sizes: tuple[int, ...] = dataclasses.field(default=(1,), metadata={"help": "h"})
        names: tuple[str, ...] = dataclasses.field(default=("x",), metadata={"help": "h"})

    parser = ArgumentParser()
    add_config_args(parser, Config)
    args = vars(parser.parse_args(["--count", "3", "--ratio", "0.5", "--name", "b", "--flag", "yes", "--sizes", "3, 5", "--names", "p,q"]))
    assert args == {"count": 3, "ratio": 0.5, "name": "b", "flag": True, "sizes": (3, 5), "names": ("p", "q")}
    assert vars(parser.parse_args([])) == {}  # not given: the dataclass's default applies

    @dataclasses.dataclass(frozen=True)
    class Unknown:
        table: dict = dataclasses.field(default_factory=dict, metadata={"help": "h"})

    with pytest.raises(TypeError, match="no command-line parser"):
        add_config_args(ArgumentParser(), Unknown)
