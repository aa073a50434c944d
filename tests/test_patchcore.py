"""PatchCore against independent references: hand-made cases, a naive greedy loop, brute-force kNN, scipy."""

import urllib.error

import numpy as np
import pytest
import scipy.ndimage
import torch
import torchvision

from patchcore import (
    PatchCore,
    WeightsError,
    exact_knn_torch,
    gaussian_blur,
    k_center_greedy_dense,
    k_center_greedy_pruned,
    random_projection,
    resolve_device,
)


def test_patch_features_have_the_papers_shapes(model):
    features = model.extract_features(torch.randn(2, 3, 224, 224))
    assert [tuple(f.shape) for f in features] == [(2, 512, 28, 28), (2, 1024, 14, 14)]
    assert tuple(model.aggregate_patches(features).shape) == (2, 784, 1536)


def test_forward_stops_after_layer3(model):
    calls = []
    hooks = [
        getattr(model.backbone, n).register_forward_hook(lambda *a, n=n: calls.append(n)) for n in ("layer2", "layer4", "avgpool", "fc")
    ]
    try:
        model.extract_features(torch.randn(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["layer2"]  # layer3 runs too: its hook is what stops the forward pass
    assert isinstance(model.backbone.layer4, torch.nn.Identity) and isinstance(model.backbone.fc, torch.nn.Identity)


def test_aggregation_hand_computed(model):
    a = torch.arange(16.0).reshape(1, 1, 4, 4)  # a "layer2" map on the 4x4 grid
    b = torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]])  # a "layer3" map on a 2x2 grid
    patches = model.aggregate_patches([a, b])
    assert patches.shape == (1, 16, 2)
    # 3x3 neighbourhood means, averaging only in-image neighbours at the border
    assert patches[0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)  # corner (0, 0)
    assert patches[0, 5, 0] == pytest.approx((0 + 1 + 2 + 4 + 5 + 6 + 8 + 9 + 10) / 9)  # (1, 1)
    assert patches[0, 7, 0] == pytest.approx((2 + 3 + 6 + 7 + 10 + 11) / 6)  # edge (1, 3)
    # every 3x3 neighbourhood of a 2x2 map is the whole map: mean 6, and upsampling keeps a constant
    assert torch.allclose(patches[0, :, 1], torch.full((16,), 6.0))


def _neighbourhood_mean(x):
    out = np.zeros_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            out[..., i, j] = x[..., max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].mean(axis=(-1, -2))
    return out


def _bilinear(x, size):
    """Half-pixel bilinear resize, the usual definition (align_corners=False), written out."""

    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    (y0, y1, wy), (x0, x1, wx) = axis(x.shape[-2], size[0]), axis(x.shape[-1], size[1])
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def test_aggregation_matches_a_numpy_reference(model):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 6, 6)), rng.normal(size=(2, 5, 3, 3))
    expected = np.concatenate([_neighbourhood_mean(a), _bilinear(_neighbourhood_mean(b), (6, 6))], axis=1)
    expected = expected.reshape(2, 8, 36).transpose(0, 2, 1)
    got = model.aggregate_patches([torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def _naive_greedy(points, n_select, start):
    """Alg. 1 written plainly: each step recomputes every point's distance to every chosen center."""
    points = points.astype(np.float64)
    selected = [start]
    while len(selected) < n_select:
        d = np.min([((points - points[c]) ** 2).sum(1) for c in selected], axis=0)
        selected.append(int(np.argmax(d)))
    return selected


@pytest.mark.parametrize("proj_dim", [0, 8])
def test_greedy_coreset_equals_naive_loop(model, proj_dim, monkeypatch):
    monkeypatch.setattr(model, "coreset_proj_dim", proj_dim)
    features = torch.randn(300, 20, generator=torch.Generator().manual_seed(1))
    selected = model._greedy_coreset(features, 0.1).tolist()
    assert len(selected) == 30 and len(set(selected)) == 30
    points = features
    if proj_dim:  # the same seeded projection
        points = features @ random_projection(20, proj_dim, torch.Generator().manual_seed(model.seed))
    assert selected == _naive_greedy(points.numpy(), 30, selected[0])


@pytest.mark.parametrize("n, dim, n_select", [(50, 2, 20), (400, 3, 100), (1000, 16, 250), (2000, 128, 60)])
def test_pruned_and_dense_greedy_equal_the_naive_loop(n, dim, n_select):
    points = np.random.default_rng(n).normal(size=(n, dim)).astype(np.float32)
    points[: n // 10] *= 0.01  # a dense cluster next to the spread-out rest
    expected = _naive_greedy(points, n_select, start=7)
    assert k_center_greedy_pruned(torch.from_numpy(points), n_select, start=7).tolist() == expected
    assert k_center_greedy_dense(torch.from_numpy(points), n_select, start=7).tolist() == expected


def test_greedy_ties_go_to_the_first_index():
    # integer grid points, each twice: many exactly equal distances, all exact in float32
    grid = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2).astype(np.float32)
    points = np.concatenate([grid, grid])
    expected = _naive_greedy(points, 30, start=0)
    assert k_center_greedy_pruned(torch.from_numpy(points), 30, start=0).tolist() == expected
    assert k_center_greedy_dense(torch.from_numpy(points), 30, start=0).tolist() == expected
    assert max(expected) < 36  # a duplicate's later copy is never preferred


def test_two_pass_fit_equals_one_pass(monkeypatch):
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4)
    one_pass = PatchCore(weights="none", device="cpu", coreset_ratio=0.1)
    one_pass.fit(loader)
    two_pass = PatchCore(weights="none", device="cpu", coreset_ratio=0.1, feature_memory_gb=0)
    calls = []
    monkeypatch.setattr(two_pass, "_collect_patches", lambda *a, f=two_pass._collect_patches: calls.append(1) or f(*a))
    two_pass.fit(loader)
    assert calls == [1] and torch.equal(one_pass.memory_bank, two_pass.memory_bank)
    patches = torch.cat([one_pass._patches(b[0])[0].reshape(-1, 1536) for b in loader])
    assert torch.equal(one_pass.memory_bank, patches[one_pass._greedy_coreset(patches, 0.1)])


def test_coreset_start_is_seeded_and_full_ratio_keeps_all(model):
    features = torch.randn(50, 4)
    assert model._greedy_coreset(features, 0.2).tolist() == model._greedy_coreset(features, 0.2).tolist()
    assert sorted(model._greedy_coreset(features, 1.0).tolist()) == list(range(50))
    assert len(model._greedy_coreset(features, 0.001)) == 1


def test_nearest_neighbors_equal_brute_force(model):
    generator = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(500, 32, generator=generator), torch.randn(40, 32, generator=generator)
    model.set_memory_bank(bank)
    distances, indices = model._nearest_neighbors(queries, k=3)
    brute = torch.cdist(queries.double(), bank.double())
    expected_d, expected_i = brute.topk(3, largest=False)
    assert torch.equal(indices, expected_i)
    np.testing.assert_allclose(distances.numpy(), expected_d.numpy(), rtol=1e-4)
    with pytest.raises(ValueError, match="memory bank has 500"):
        model._nearest_neighbors(queries, k=501)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_torch_search_equals_brute_force(precision):
    generator = torch.Generator().manual_seed(8)
    bank, queries = torch.randn(3000, 24, generator=generator), torch.randn(700, 24, generator=generator)
    distances, indices = exact_knn_torch(queries, bank, k=2, precision=precision)
    expected_d, expected_i = torch.cdist(queries.double(), bank.double()).topk(2, largest=False)
    assert torch.equal(indices, expected_i)
    np.testing.assert_allclose(distances.numpy(), expected_d.numpy(), rtol=1e-4)


def test_torch_search_in_fp16_keeps_distances_close():
    generator = torch.Generator().manual_seed(9)
    bank, queries = torch.randn(500, 64, generator=generator), torch.randn(100, 64, generator=generator)
    distances, _ = exact_knn_torch(queries, bank, k=1, precision="fp16")
    expected = torch.cdist(queries, bank).min(1).values
    assert torch.allclose(distances[:, 0], expected, rtol=2e-2)


def test_bf16_autocast_backbone_scores_close_to_fp32(model):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    bank = torch.randn(200, 1536, generator=torch.Generator().manual_seed(11))
    model.set_memory_bank(bank)
    fp32, _ = model.predict(images)
    fast = PatchCore(weights="none", device="cpu", amp="bf16")
    fast.set_memory_bank(bank)
    bf16, _ = fast.predict(images)
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)


def test_gaussian_blur_matches_scipy():
    x = np.random.default_rng(3).random((2, 1, 40, 50)).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(x), sigma=4.0).numpy()
    expected = np.stack([scipy.ndimage.gaussian_filter(m[0], sigma=4, mode="mirror", truncate=4.0) for m in x])[:, None]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_reweighted_score_follows_eq7(model, monkeypatch):
    rng = np.random.default_rng(4)
    bank = rng.normal(size=(40, 6)).astype(np.float32)
    patches = rng.normal(size=(2, 10, 6)).astype(np.float32)
    model.set_memory_bank(torch.from_numpy(bank))
    d = np.linalg.norm(patches[:, :, None] - bank[None, None], axis=-1)  # [B, N, M]
    patch_scores = d.min(-1)
    monkeypatch.setattr(model, "reweight_b", 9)
    got = model._reweighted_scores(torch.from_numpy(patches), torch.from_numpy(patch_scores), torch.from_numpy(d.argmin(-1)))
    for i in range(2):
        worst = patch_scores[i].argmax()
        m_star = bank[d[i, worst].argmin()]
        support = np.argsort(np.linalg.norm(bank - m_star, axis=1))[:9]  # N_b(m*), m* included
        weight = 1 - np.exp(patch_scores[i, worst]) / np.exp(d[i, worst, support]).sum()
        assert got[i].item() == pytest.approx(weight * patch_scores[i, worst], rel=1e-5)


def test_predict_gives_scores_and_maps_at_input_size(model):
    model.set_memory_bank(torch.randn(100, 1536))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    scores, maps = model.predict(images)
    assert scores.shape == (2,) and maps.shape == (2, 64, 64)
    again_scores, again_maps = model.predict(images)
    assert np.array_equal(scores, again_scores) and np.array_equal(maps, again_maps)


def test_weights_from_a_state_dict_file(model, tmp_path):
    path = tmp_path / "wrn50.pth"
    torch.save(model.backbone.state_dict(), path)
    assert PatchCore(weights=str(path), device="cpu", seed=123).backbone_sha256 == model.backbone_sha256
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="not a state_dict of wide_resnet50_2"):
        PatchCore(weights=str(tmp_path / "r18.pth"), device="cpu")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable state_dict"):
        PatchCore(weights=str(tmp_path / "junk.pth"), device="cpu")


@pytest.fixture
def offline(monkeypatch):
    """torchvision as on a machine without access to the model hub."""
    real = torchvision.models.get_model

    def get_model(name, weights=None):
        if weights is not None:
            raise urllib.error.URLError("Name or service not known")
        return real(name, weights=None)

    monkeypatch.setattr(torchvision.models, "get_model", get_model)


def test_imagenet_weights_offline_name_the_alternatives(offline):
    with pytest.raises(WeightsError, match="--weights PATH.*--weights none"):
        PatchCore(weights="imagenet", device="cpu")


def test_auto_weights_offline_fall_back_loudly(offline, model, capsys):
    fallback = PatchCore(weights="auto", device="cpu", seed=0)
    assert "RANDOM INIT" in capsys.readouterr().err
    assert fallback.weights_spec == "none" and fallback.backbone_sha256 == model.backbone_sha256


def test_device_checks():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            resolve_device("cuda")
