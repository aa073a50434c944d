"""Ensembles (issue 19) end to end: one bank file, train / evaluate / --images / --add like a single model, and
their scores against the combination rules written out here (the released code's test-set normalisation under
--protocol official; each member divided by its calibrated thresholds elsewhere)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from dataset import CategoryDataset
from ensemble import build_model, load_model, normalise_over_test_set
from method.thresholds import holdout_images
from patchcore import PatchCore, PatchCoreConfig
from plumbing.bank import BankError, load_bank
from plumbing.files import save_npz
from scripts import evaluate, one_line_error, run, train
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
    # features differ by up to 1.6e-5 between batch sizes (this batch of 9, evaluate's of 4), and the min-max
    # normalisation divides by the scores' range: measured up to 1.8e-5 relative
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    normalized = np.array([records[p]["normalized_score"] for p in paths])  # decisions: inductive, at the ensemble's threshold
    np.testing.assert_allclose(normalized, inductive / model.calibration.image_threshold, rtol=1e-5)

    # one new image gets a score, and the decision equals the test split's
    result = evaluate(data, tmp_path, "--images", data / "widget" / "test" / "good")
    assert result.returncode == 0, result.stderr
    inference = json.loads((tmp_path / "widget" / "inference" / "scores.json").read_text())
    for record in inference["images"]:
        test_path = "widget/test/good/" + record["path"].rsplit("/", 1)[1]
        assert record["score"] == pytest.approx(inductive[paths.index(test_path)], rel=1e-5)
    page = (tmp_path / "widget" / "inference" / "report.html").read_text()
    f1 = json.loads((tmp_path / "widget" / "metrics.json").read_text())["image_f1_threshold"]
    if protocol == "official":  # its F1 threshold lies on the test-set min-max scale: neither a mark nor a decision here
        assert 'class="mark"' in page and ">F1 " not in page
        result = evaluate(data, tmp_path, "--images", data / "widget" / "test" / "good", "--threshold", "f1")
        assert "a scale that new images do not have" in one_line_error(result)
    else:
        assert f'data-value="{f1!r}">F1 ' in page


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


class CountedReads(torch.utils.data.Dataset):
    """Images that count how often each one is read."""

    def __init__(self, images):
        self.images, self.reads = images, [0] * len(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        self.reads[index] += 1
        return (self.images[index],)


@pytest.mark.parametrize("protocol", ["paper", "official"])
def test_an_ensemble_calibrates_on_what_its_members_scored(protocol):
    """The ensemble's thresholds: the held-out images' scores and maps against each member's calibration bank (Alg. 1
    over the kept images), each divided by the member's thresholds, averaged, then the conformal rank; and each held-out
    image is read once per member for its features and once for its calibration, not scored again by the ensemble."""
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(24))
    settings = {"weights": "none", "image_size": 64, "resize": 64, "target_fpr": 0.25, "protocol": protocol}
    config = PatchCoreConfig(backbone="resnet18,densenet121", layers=tuple(NETWORKS[3].split(",")), calibration_holdout=0.5, **settings)
    model = build_model(config, device="cpu")
    dataset = CountedReads(images)
    model.fit(torch.utils.data.DataLoader(dataset, batch_size=2), feature_memory_gb=1)
    held = holdout_images(6, 0.5, 0)
    assert [dataset.reads[i] for i in held] == [2 * 2] * 3 and model.calibration.n_held_out == 3
    scores, maps = [], []
    for member in model.members:  # the reference: each member's calibration bank built here, Alg. 1 over the kept images
        alone = PatchCore(dataclasses.replace(member.config, calibration_holdout=0), device="cpu")
        alone.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[[i for i in range(6) if i not in held]])))
        member_scores, member_maps = alone.predict(images[held])
        scores.append(member_scores / member.calibration.image_threshold)
        maps.append(member_maps / member.calibration.pixel_threshold)
    scores, maps = np.mean(scores, axis=0), np.mean(maps, axis=0)
    # k = ceil((3 + 1)(1 - 0.25)) = 3 of n = 3: the largest
    assert model.calibration.image_threshold == pytest.approx(scores.max(), rel=1e-4)
    assert model.calibration.pixel_threshold == pytest.approx(maps.max(), rel=1e-4)
    assert model.calibration.heatmap_scale[0] == pytest.approx(maps.min(), rel=1e-4, abs=1e-6)


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


def test_test_set_normalisation_of_constant_members_is_zero_not_nan():
    """A one-image test set (or a member that scores every image alike): its min-max range is 0. Hand-computed:
    member 0 is constant and contributes 0; member 1 goes from [2, 4] to [0, 1]; their mean is half of that."""
    scores = np.array([[5.0, 5.0], [2.0, 4.0]])
    maps = np.stack([np.full((2, 2, 2), 7.0), np.array([[[1.0, 1.0], [1.0, 3.0]], [[2.0, 2.0], [2.0, 2.0]]])])
    combined_scores, combined_maps = normalise_over_test_set(scores, maps)
    np.testing.assert_array_equal(combined_scores, [0.0, 0.5])
    np.testing.assert_array_equal(combined_maps, [[[0.0, 0.0], [0.0, 0.5]], [[0.25, 0.25], [0.25, 0.25]]])
    one_image_scores, one_image_maps = normalise_over_test_set(scores[:, :1], maps[:, :1])
    assert one_image_scores.tolist() == [0.0] and np.isfinite(one_image_maps).all()
