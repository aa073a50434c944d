"""Shared fixtures: a small synthetic category, a random-init model (no weights download), CLI runs."""

import pytest

from patchcore import PatchCore
from scripts import evaluate, train
from synthetic import make_synthetic_category


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small category in MVTec's layout, under a path with a space and a non-ASCII character."""
    root = tmp_path_factory.mktemp("data") / "Big Data ü"
    make_synthetic_category(root, "widget", n_train=6, n_test_good=3, n_per_defect=2, size=80, seed=0)
    return root


@pytest.fixture(scope="session")
def model():
    return PatchCore(weights="none", device="cpu", seed=0)


@pytest.fixture(scope="session")
def evaluated(synthetic_root, tmp_path_factory):
    """The synthetic category trained and evaluated once: (data root, output dir, evaluate's stdout)."""
    out = tmp_path_factory.mktemp("results")
    result = train(synthetic_root, out)
    assert result.returncode == 0, result.stderr
    result = evaluate(synthetic_root, out)
    assert result.returncode == 0, result.stderr
    return synthetic_root, out, result.stdout
