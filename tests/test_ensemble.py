"""Ensembles (issue 19) end to end: one bank file, train / evaluate / --images / --add like a single model, and
their scores against the combination rules written out here (the released code's test-set normalisation under
--protocol official; each member divided by its calibrated thresholds elsewhere)."""

import json

import numpy as np
import pytest
import torch

from bank import BankError, load_bank
from dataset import CategoryDataset
from ensemble import load_model
from files import save_npz
from scripts import evaluate, run, train
from synthetic import make_synthetic_category

# two small networks keep the suite quick; the published ensembles' networks are checked in test_official.py
NETWORKS = ["--backbone", "resnet18,densenet121", "--layers", "0.layer2,0.layer3,1.features.denseblock2,1.features.denseblock3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic_category(root, "widget", n_train=6, n_test_good=3, n_per_defect=2, size=80, seed=3)
    return root


def _test_images(root, model):
    test = CategoryDataset(root, "widget", "test", model.config.preprocess())
    return torch.stack([test[i][0] for i in range(len(test))]), [test[i][3] for i in range(len(test))]


@pytest.mark.cpu_dependent
@pytest.mark.parametrize("protocol", ["paper", "official"])
def test_an_ensemble_trains_evaluates_and_scores_like_one_model(data, tmp_path, protocol):
    result = train(data, tmp_path, *NETWORKS, "--protocol", protocol)
    assert result.returncode == 0, result.stderr
    rows, dim = (96, 384) if protocol == "paper" else (38, 1024)  # 25 % or 10 % of 6 x 64 patches; resnet18's 128 + 256 channels
    assert f"memory banks ({rows}, {dim}), ({rows}, " in result.stdout  # one bank per network, in one file
    banks, header = load_bank(tmp_path / "widget" / "memory_bank.npz")
    assert isinstance(banks, list) and len(banks) == 2 and len(header["members"]) == 2
    assert (tmp_path / "widget" / "memory_bank.npz").is_file() and not list((tmp_path / "widget").glob("*.npz.*"))
    assert evaluate(data, tmp_path).returncode == 0

    model = load_model(tmp_path / "widget" / "memory_bank.npz", device="cpu")
    images, paths = _test_images(data, model)
    member_scores = np.stack([m.predict(images)[0] for m in model.members])  # each member as a model of its own
    thresholds = np.array([m.calibration.image_threshold for m in model.members])
    records = {r["path"]: r for r in json.loads((tmp_path / "widget" / "scores.json").read_text())}
    got = np.array([records[p]["score"] for p in paths])
    inductive = (member_scores / thresholds[:, None]).mean(0)  # each member over its own calibrated threshold
    if protocol == "official":  # the released code: every member min-max normalised over this test set, then averaged
        low, high = member_scores.min(1, keepdims=True), member_scores.max(1, keepdims=True)
        expected = ((member_scores - low) / (high - low)).mean(0)
    else:
        expected = inductive
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    normalized = np.array([records[p]["normalized_score"] for p in paths])  # decisions: inductive, at the ensemble's threshold
    np.testing.assert_allclose(normalized, inductive / model.calibration.image_threshold, rtol=1e-5)

    # one new image gets a score, and the decision equals the test split's
    result = evaluate(data, tmp_path, "--images", data / "widget" / "test" / "good")
    assert result.returncode == 0, result.stderr
    inference = json.loads((tmp_path / "widget" / "inference" / "scores.json").read_text())
    for record in inference["images"]:
        test_path = "widget/test/good/" + record["path"].rsplit("/", 1)[1]
        assert record["score"] == pytest.approx(inductive[paths.index(test_path)], rel=1e-5)


def test_an_ensemble_grows_and_its_file_is_checked_whole(data, tmp_path):
    assert train(data, tmp_path, *NETWORKS).returncode == 0
    path = tmp_path / "widget" / "memory_bank.npz"
    before, header = load_bank(path)
    result = run("train.py", "--output_dir", tmp_path, "--category", "widget", "--add", data / "widget" / "test" / "good",
                 "--device", "cpu", "--num_workers", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    after, grown = load_bank(path)
    assert all(len(a) > len(b) and np.array_equal(a[: len(b)], b) for a, b in zip(after, before))  # Alg. 1 went on in each
    assert grown["calibration"]["image_threshold"] == header["calibration"]["image_threshold"]
    assert "conservative" in grown["calibration"]["note"] and grown["train"]["n_images"] == 6 + 3
    # a change to any member's bank fails the one checksum over all of them
    after[1][0, 0] += 1
    header_bytes = np.frombuffer(json.dumps(grown, sort_keys=True).encode(), dtype=np.uint8)
    save_npz(path, {"memory_bank_0": after[0], "memory_bank_1": after[1], "header": header_bytes})
    with pytest.raises(BankError, match="fails its checksum"):
        load_bank(path)


def test_ensemble_settings_and_their_refusals(data, tmp_path):
    result = train(data, tmp_path, "--backbone", "resnet18,densenet121", "--layers", "layer2,layer3")
    assert result.returncode == 2 and "start with the network's index" in result.stderr
    result = train(data, tmp_path, *NETWORKS, "--calibration_holdout", "0")
    assert result.returncode == 2 and "combines its members by their thresholds" in result.stderr
    result = train(data, tmp_path, "--preset", "official-im320", "--coreset_ratio", "0.1")
    assert result.returncode == 2 and "--coreset_ratio 0.1 (the preset has 0.01)" in result.stderr


def test_an_ensembles_weights_are_split_and_stripped_as_its_networks_are():
    """--weights "none, none" gives each network 'none', not ' none' read as a file path (issue 28, item 14)."""
    from ensemble import member_configs
    from patchcore import PatchCoreConfig

    config = PatchCoreConfig(backbone="resnet18, resnet18", layers=("0.layer2", "1.layer2"), weights="none, none")
    assert [m.weights for m in member_configs(config)] == ["none", "none"]
    assert [m.backbone for m in member_configs(config)] == ["resnet18", "resnet18"]
    config = PatchCoreConfig(backbone="resnet18,resnet18", layers=("0.layer2", "1.layer2"), weights=" none ")  # one for all
    assert [m.weights for m in member_configs(config)] == ["none", "none"]
