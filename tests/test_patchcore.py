"""PatchCore against independent references: hand-made cases, a naive greedy loop, brute-force kNN, scipy."""

import re
import urllib.error

import numpy as np
import pytest
import scipy.ndimage
import scipy.special
import torch
import torchvision

from method.backbone import WeightsError
from method.coreset import k_center_greedy_dense, k_center_greedy_pruned, nearest_center
from method.maps import gaussian_blur
from method.presets import PRESETS
from method.search import WINDOW, ExactSearch, GraphSearch
from method.thresholds import calibrate, holdout_images
from patchcore import AnomalyScorer, PatchCore, PatchCoreConfig
from plumbing import system
from plumbing.system import resolve_device
from references import naive_greedy


def test_patch_features_have_the_papers_shapes(model):
    features = model.extract_features(torch.randn(2, 3, 224, 224))
    assert [tuple(f.shape) for f in features] == [(2, 512, 28, 28), (2, 1024, 14, 14)]
    assert tuple(model.aggregate_patches(features).shape) == (2, 784, 1536)


def test_forward_stops_after_layer3(model):
    names = [name for name, _ in model.backbone.named_children()]
    assert names == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]  # layer4, avgpool and fc are gone
    calls = []
    hooks = [child.register_forward_hook(lambda *a, n=name: calls.append(n)) for name, child in model.backbone.named_children()]
    try:
        model.extract_features(torch.randn(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    assert calls == names  # in the order torchvision's forward() runs them


def test_backbone_maps_equal_torchvisions_own_forward(model):
    """The cut network's layer2 and layer3 maps are those of torchvision's unchanged WideResNet-50 forward()."""
    network = torchvision.models.wide_resnet50_2()
    network.load_state_dict(model.backbone.state_dict(), strict=False)  # layer4 and fc keep their random init: unused here
    seen = {}
    for name in ("layer2", "layer3"):
        getattr(network, name).register_forward_hook(lambda module, inputs, output, n=name: seen.__setitem__(n, output))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    network.eval()(images)
    got = model.extract_features(images)
    assert torch.equal(got[0], seen["layer2"]) and torch.equal(got[1], seen["layer3"])


@pytest.mark.parametrize(
    "name, layers", [("wide_resnet101_2", ("layer2", "layer3")), ("densenet201", ("features.denseblock2", "features.denseblock3"))]
)
def test_other_backbones_and_nested_layers_equal_torchvisions_own_forward(name, layers, tmp_path):
    """The published ensembles' backbones: a cut network (DenseNet's layers nested inside `features`) gives the maps
    of torchvision's unchanged network, and a state_dict file of the whole network loads into it."""
    from method.backbone import Backbone

    network = torchvision.models.get_model(name)
    torch.save(network.state_dict(), tmp_path / "weights.pth")
    backbone = Backbone(name, layers, str(tmp_path / "weights.pth"), 0, torch.device("cpu"))
    assert not any(key.startswith(("layer4", "fc", "features.denseblock4", "classifier")) for key in backbone.state_dict())
    seen = {}
    for layer in layers:
        network.get_submodule(layer).register_forward_hook(lambda module, inputs, output, n=layer: seen.__setitem__(n, output))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        network.eval()(images)
    for got, layer in zip(backbone(images), layers):
        assert torch.equal(got, seen[layer])
    if name.startswith("densenet"):  # torchvision's published DenseNet files name 'norm1' 'norm.1': they load too
        old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in network.state_dict().items()
               if not k.endswith("num_batches_tracked")}  # fmt: skip
        assert any(".norm.1." in k for k in old)
        torch.save(old, tmp_path / "published.pth")
        assert Backbone(name, layers, str(tmp_path / "published.pth"), 0, torch.device("cpu")).sha256 == backbone.sha256


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


def _neighbourhood_mean(x, p=3):
    """The mean over each position's p x p neighbourhood N_p, counting only positions inside the map (Eq. 1)."""
    out, r = np.zeros_like(x), p // 2
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            out[..., i, j] = x[..., max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1].mean(axis=(-1, -2))
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


@pytest.mark.parametrize("p", [3, 5, 1])
def test_aggregation_matches_a_numpy_reference(p):
    model = PatchCore(weights="none", device="cpu", image_size=64, patch_size=p)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 6, 6)), rng.normal(size=(2, 5, 3, 3))
    expected = np.concatenate([_neighbourhood_mean(a, p), _bilinear(_neighbourhood_mean(b, p), (6, 6))], axis=1)
    expected = expected.reshape(2, 8, 36).transpose(0, 2, 1)
    got = model.aggregate_patches([torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def _seeded_start(n, seed):
    """The coreset's documented start: the first draw of torch.randint(n) from a generator seeded with `seed`."""
    return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("proj_dim, seed", [(0, 0), (8, 0), (8, 5)])
def test_greedy_coreset_equals_naive_loop_from_the_seeded_start(proj_dim, seed):
    model = PatchCore(weights="none", device="cpu", seed=seed, coreset_proj_dim=proj_dim, coreset_ratio=0.1)
    features = torch.randn(300, 20, generator=torch.Generator().manual_seed(1))
    selected = model.select_coreset(features).tolist()
    assert len(selected) == 30 and len(set(selected)) == 30
    start = _seeded_start(300, seed)
    assert selected[0] == start != 0
    points = features.numpy()
    if proj_dim:  # the same seeded projection: a Gaussian matrix scaled by 1/sqrt(dims), drawn here without the code under test
        generator = torch.Generator().manual_seed(seed)
        points = points @ (torch.randn(20, proj_dim, generator=generator) / np.sqrt(proj_dim)).numpy()
    assert selected == naive_greedy(points, 30, start)


@pytest.mark.parametrize("n, dim, n_select", [(50, 2, 20), (400, 3, 100), (1000, 16, 250), (2000, 128, 60)])
def test_pruned_and_dense_greedy_equal_the_naive_loop(n, dim, n_select):
    points = np.random.default_rng(n).normal(size=(n, dim)).astype(np.float32)
    points[: n // 10] *= 0.01  # a dense cluster next to the spread-out rest
    expected = naive_greedy(points, n_select, start=7)
    assert k_center_greedy_pruned(torch.from_numpy(points), n_select, start=7).tolist() == expected
    assert k_center_greedy_dense(torch.from_numpy(points), n_select, start=7).tolist() == expected
    # the dense update over row blocks (a bound on its temporaries) picks the same
    assert k_center_greedy_dense(torch.from_numpy(points), n_select, start=7, block_bytes=4 * dim * 33).tolist() == expected


@pytest.mark.parametrize("n, n_first", [(400, 30), (1000, 120)])
def test_greedy_with_first_picks_from_some_rows_equals_the_naive_loop(n, n_first):
    points = np.random.default_rng(n).normal(size=(n, 6)).astype(np.float32)
    points[: n // 5] *= 3  # the rows that may not be picked first include the spread-out ones
    rows = torch.arange(n // 5, n, 2)  # every other row of the rest
    expected = naive_greedy(points, 150, start=int(rows[3]), first_from=(rows.numpy(), n_first))
    assert set(expected[:n_first]) <= set(rows.tolist()) and not set(expected[n_first:]) <= set(rows.tolist())
    for greedy in (k_center_greedy_pruned, k_center_greedy_dense):
        assert greedy(torch.from_numpy(points), 150, start=int(rows[3]), first_from=(rows, n_first)).tolist() == expected
    # and those first picks are Alg. 1 over the rows alone
    alone = naive_greedy(points[rows.numpy()], n_first, start=3)
    assert expected[:n_first] == rows[alone].tolist()


def test_greedy_ties_go_to_the_first_index():
    # integer grid points, each twice: many exactly equal distances, all exact in float32
    grid = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2).astype(np.float32)
    points = np.concatenate([grid, grid])
    expected = naive_greedy(points, 30, start=0)
    assert k_center_greedy_pruned(torch.from_numpy(points), 30, start=0).tolist() == expected
    assert k_center_greedy_dense(torch.from_numpy(points), 30, start=0).tolist() == expected
    assert max(expected) < 36  # a duplicate's later copy is never preferred


def test_one_pass_and_two_pass_fit_equal_a_reference_bank():
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4)
    one_pass = PatchCore(weights="none", device="cpu", coreset_ratio=0.1, seed=3, image_size=64)
    two_pass = PatchCore(weights="none", device="cpu", coreset_ratio=0.1, seed=3, image_size=64)
    assert one_pass.fit(loader, feature_memory_gb=1)["fit"] == "one pass"
    assert two_pass.fit(loader, feature_memory_gb=0)["fit"] == "two passes"
    # the reference: every patch's feature, the seeded projection and start, the naive greedy loop; the first
    # picks (the calibration bank) come from the images not held out, the start drawn among their patches
    features = one_pass.aggregate_patches(one_pass.extract_features(images)).reshape(-1, 1536).numpy()
    projection = (torch.randn(1536, 128, generator=torch.Generator().manual_seed(3)) / np.sqrt(128)).numpy()
    n, per_image = len(features), len(features) // 6
    held = holdout_images(6, 0.2, 3)
    assert len(held) == 1
    kept = np.concatenate([np.arange(i * per_image, (i + 1) * per_image) for i in range(6) if i not in held])
    start = int(kept[_seeded_start(len(kept), 3)])
    expected = features[naive_greedy(features @ projection, n // 10, start, first_from=(kept, len(kept) // 10))]
    np.testing.assert_allclose(one_pass.memory_bank.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(one_pass.memory_bank, two_pass.memory_bank)


def test_coreset_seeds_differ_and_full_ratio_keeps_all(model):
    features = torch.randn(50, 4)
    starts = {int(PatchCore(weights="none", device="cpu", seed=s, coreset_ratio=0.2).select_coreset(features)[0]) for s in range(6)}
    assert starts == {_seeded_start(50, s) for s in range(6)} and len(starts) > 1
    assert sorted(PatchCore(weights="none", device="cpu", coreset_ratio=1.0).select_coreset(features).tolist()) == list(range(50))
    assert len(PatchCore(weights="none", device="cpu", coreset_ratio=0.001).select_coreset(features)) == 1


def _brute_force(queries, bank, k):
    """k nearest rows of bank for each query, in float64 numpy: (distances, indices)."""
    d = np.sqrt(((queries.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.fixture
def low_precision_cpu(monkeypatch):
    """A CPU that computes bf16 and fp16 natively, whatever this one does: the numerics run either way."""
    monkeypatch.setattr(system, "cpu_flags", lambda: frozenset({"avx512_bf16", "avx512_fp16", "avx512_vnni"}))


@pytest.mark.cpu_dependent
@pytest.mark.parametrize("search", ["faiss", "exact"])
def test_nearest_neighbors_equal_brute_force(search):
    model = PatchCore(weights="none", device="cpu", search=search)
    generator = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(500, 32, generator=generator), torch.randn(40, 32, generator=generator)
    model.set_memory_bank(bank)
    assert isinstance(model.scorer.index, ExactSearch) == (search == "exact")
    distances, indices = model.nearest_neighbors(queries, k=3)
    expected_d, expected_i = _brute_force(queries.numpy(), bank.numpy(), 3)
    assert np.array_equal(indices.numpy(), expected_i)
    np.testing.assert_allclose(distances.numpy(), expected_d, rtol=1e-5)  # measured: 1.4e-7
    with pytest.raises(ValueError, match="memory bank has 500"):
        model.nearest_neighbors(queries, k=501)


def _near_ties(n_queries=60, per_query=5, spread=1e-3, seed=7, dim=64):
    """Bank rows at almost the same distance from each query (relative gaps of `spread`), amid unrelated rows:
    a product in float32 cannot rank them, an exact search must."""
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(n_queries, dim)).astype(np.float32) * 5
    directions = rng.normal(size=(n_queries, per_query, dim))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    radii = 0.5 * (1 + spread * rng.permutation(per_query))  # shuffled, so that the bank's order does not tell
    near = queries[:, None, :] + radii[None, :, None] * directions
    bank = np.concatenate([near.reshape(-1, dim), rng.normal(size=(500, dim)) * 5]).astype(np.float32)
    return torch.from_numpy(queries), torch.from_numpy(bank)


def _hard_cases():
    """Banks and queries built to break a search that is not exact: near-ties (relative gaps of 1e-6, below float32's
    product), rows repeated many times and different rows at equal distances (ties the bank index must break), queries far
    from everything, a bank whose variance is spread over every direction (the sketches' bound is loose), and rows on a
    low-dimensional patch-like manifold with a large common offset (the product's cancellation is worst)."""
    rng = np.random.default_rng(11)
    cases = {"near-ties 1e-3": _near_ties(), "near-ties 1e-6": _near_ties(spread=1e-6, seed=8)}
    queries, bank = _near_ties(seed=9)
    bank = torch.cat([bank, bank[:40].repeat(6, 1)])  # each of the first 40 rows seven times, at the bank's end too
    cases["repeated rows"] = (torch.cat([queries, bank[:10] + 1e-7]), bank)
    queries, bank = _near_ties(seed=10)
    cases["far queries"] = (torch.cat([queries, 1e4 * torch.from_numpy(rng.normal(size=(20, 64)).astype(np.float32))]), bank)
    cases["isotropic"] = tuple(torch.from_numpy(rng.normal(size=(n, 300)).astype(np.float32)) for n in (50, 3000))
    basis = rng.normal(size=(6, 256))
    rows = rng.normal(size=(2600, 6)) @ basis + 0.01 * rng.normal(size=(2600, 256)) + 40.0
    cases["offset manifold"] = (torch.from_numpy(rows[:100].astype(np.float32)), torch.from_numpy(rows[100:].astype(np.float32)))
    # exact ties between different rows: q + v and q - v (whole numbers, so float64's distances are equal), in both
    # index orders, so that for some query the higher index has the lower key and only the index can break the tie
    queries, steps = rng.integers(-20, 21, size=(30, 32)), rng.integers(-3, 4, size=(30, 32))
    pairs = [(q - v, q + v) if i % 2 else (q + v, q - v) for i, (q, v) in enumerate(zip(queries, steps))]
    mirrored = np.concatenate([np.array(pairs).reshape(-1, 32), rng.integers(-20, 21, size=(300, 32))]).astype(np.float32)
    cases["mirrored ties"] = (torch.from_numpy(queries.astype(np.float32)), torch.from_numpy(mirrored))
    return cases


@pytest.mark.cpu_dependent
@pytest.mark.parametrize("case", list(_hard_cases()))
@pytest.mark.parametrize("k", [1, 2, 9, 40])
@pytest.mark.parametrize("window", [3, WINDOW])
def test_exact_search_equals_a_float64_brute_force(case, k, window):
    """Every neighbour, in order, and every distance, as float64 gives them, ties broken by the lower bank index;
    k up to beyond the candidates, past the Eq. 7 support (b = 9), and past a repeated row's copies. With the default
    window the candidates come from all of these small banks; with a window of 3 rows from a sliver of it, so UB is
    loose and the key range decides what the scan covers."""
    queries, bank = _hard_cases()[case]
    distances, indices = ExactSearch(bank, window=window)(queries, k=k)
    expected_d, expected_i = _brute_force(queries.numpy(), bank.numpy(), k)
    assert np.array_equal(indices.numpy(), expected_i)
    np.testing.assert_allclose(distances.numpy(), expected_d, rtol=1e-7, atol=0)  # float64 rounded to float32


@pytest.mark.cpu_dependent
def test_exact_search_does_not_depend_on_the_block_or_the_threads():
    queries, bank = _hard_cases()["near-ties 1e-6"]
    search = ExactSearch(bank, window=5)
    expected = search(queries, k=3)
    threads = torch.get_num_threads()
    try:
        for block_bytes, n_threads in ((4 * len(bank), 1), (4 * len(bank) * 7, 2), (2**30, 1)):  # 1 query a block, 7, all
            torch.set_num_threads(n_threads)
            got = search(queries, k=3, block_bytes=block_bytes)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    finally:
        torch.set_num_threads(threads)


def test_low_precision_never_runs_where_the_cpu_lacks_it(model, monkeypatch, capsys):
    monkeypatch.setattr(system, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(system, "WARNED", set())
    fast = PatchCore(weights="none", device="cpu", amp="bf16")
    again = PatchCore(weights="none", device="cpu", amp="bf16")
    assert (fast.amp, again.amp) == ("none", "none")
    assert capsys.readouterr().err.count("--amp bf16: this CPU has no native bf16") == 1  # said once
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    assert torch.equal(fast.extract_features(images)[0], model.extract_features(images)[0])  # fp32, bit for bit
    assert fast.config.amp == "bf16"  # the bank's setting stays as trained


@pytest.mark.cpu_dependent
@pytest.mark.parametrize("amp, low, high", [("bf16", 1e-3, 1.5e-2), ("fp16", 1.5e-4, 2.5e-3)])
def test_low_precision_backbone_error_is_what_the_precision_gives(model, amp, low, high, low_precision_cpu):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    exact = model.aggregate_patches(model.extract_features(images))
    fast = PatchCore(weights="none", device="cpu", amp=amp)
    error = ((fast.aggregate_patches(fast.extract_features(images)) - exact).norm() / exact.norm()).item()
    # measured relative error: bf16 4.3e-3, fp16 6.2e-4; fp32 gives 0, and other images give 5.4e-2
    assert low < error < high


@pytest.mark.parametrize("mode", ["mirror", "reflect"])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 16), (16, 16), (40, 50)])
def test_gaussian_blur_matches_scipy_at_any_size(mode, size):
    x = np.random.default_rng(3).random((2, 1, *size)).astype(np.float32)
    got = gaussian_blur(torch.from_numpy(x), sigma=4.0, mode=mode).numpy()
    expected = np.stack([scipy.ndimage.gaussian_filter(m[0].astype(np.float64), sigma=4, mode=mode, truncate=4.0) for m in x])
    np.testing.assert_allclose(got[:, 0], expected, atol=1e-6)  # measured: 2.7e-7


def _paper_reference(model, images, b=0, k=1):
    """Sec. 3.3 from scratch in float64: Eq. 6 patch scores by brute force (with k > 1, the mean of the k nearest
    distances), the max (or Eq. 7 with its own neighbour search), bilinear upsampling, scipy's Gaussian (sigma 4, mirror)."""
    patches = model.aggregate_patches(model.extract_features(images)).numpy().astype(np.float64)  # [B, N, C]
    bank = model.memory_bank.numpy().astype(np.float64)
    n_images, n = patches.shape[:2]
    d = np.sqrt(((patches[:, :, None, :] - bank[None, None]) ** 2).sum(-1))  # [B, N, M]
    patch_scores, nearest = np.sort(d, axis=-1)[..., :k].mean(-1), d.argmin(-1)
    scores = patch_scores.max(1)
    if b:
        for i in range(n_images):
            worst = patch_scores[i].argmax()
            m_star = bank[nearest[i, worst]]
            support = np.argsort(np.linalg.norm(bank - m_star, axis=1), kind="stable")[:b]  # N_b(m*), m* included
            distances = np.linalg.norm(patches[i, worst] - bank[support], axis=1)
            scores[i] = (1 - np.exp(scores[i] - scipy.special.logsumexp(distances))) * scores[i]
    side = int(np.sqrt(n))
    upsampled = _bilinear(patch_scores.reshape(n_images, side, side), images.shape[-2:])
    maps = np.stack([scipy.ndimage.gaussian_filter(u, sigma=4, mode="mirror", truncate=4.0) for u in upsampled])
    return scores, maps


@pytest.fixture(scope="module")
def scored():
    """A model whose memory bank holds the patches of two random 'training' images, and three test images."""
    model = PatchCore(weights="none", device="cpu", seed=0)
    rng = np.random.default_rng(12)
    train, test = (torch.from_numpy(rng.normal(size=(n, 3, 64, 64)).astype(np.float32)) for n in (2, 3))
    model.set_memory_bank(model.aggregate_patches(model.extract_features(train)).reshape(-1, 1536))
    return model, test


@pytest.mark.cpu_dependent
@pytest.mark.parametrize("search, tolerance", [("faiss", 2.5e-4), ("exact", 1e-5)])
def test_predict_equals_the_papers_definition(scored, search, tolerance):
    same, images = scored
    model = PatchCore(weights="none", device="cpu", seed=0, search=search)  # the same weights, and the same bank
    model.set_memory_bank(same.memory_bank)
    assert model.search_name().startswith(search)
    scores, maps = model.predict(images)
    expected_scores, expected_maps = _paper_reference(model, images)
    assert scores.shape == (3,) and maps.shape == (3, 64, 64)
    # faiss: its expansion's rounding (measured 5e-5 in scores, 7e-5 in maps); exact: the distances are float64's,
    # and what is left is float32's upsampling and blur (measured: 3e-7)
    np.testing.assert_allclose(scores, expected_scores, rtol=tolerance)
    np.testing.assert_allclose(maps, expected_maps, rtol=tolerance, atol=tolerance * expected_maps.max())


@pytest.mark.parametrize("k", [3, 5])
def test_predict_with_k_nearest_neighbours_equals_their_mean_distance(scored, k):
    same, images = scored
    model = PatchCore(weights="none", device="cpu", seed=0, num_nn=k)  # the same weights, and the same bank
    model.set_memory_bank(same.memory_bank)
    scores, maps = model.predict(images)
    expected_scores, expected_maps = _paper_reference(model, images, k=k)
    nearest_only, _ = _paper_reference(model, images)
    assert (np.abs(expected_scores - nearest_only) > 5e-3 * nearest_only).all()  # k matters here, at 20x the tolerance
    np.testing.assert_allclose(scores, expected_scores, rtol=2.5e-4)  # measured: 5e-5 at k = 1
    np.testing.assert_allclose(maps, expected_maps, rtol=2.5e-4, atol=2.5e-4 * expected_maps.max())


@pytest.mark.parametrize("b", [2, 3])
def test_predict_with_eq7_equals_the_papers_definition(scored, b):
    same, images = scored
    model = PatchCore(weights="none", device="cpu", seed=0, reweight_b=b)  # the same weights, and the same bank
    model.set_memory_bank(same.memory_bank)
    scores, _ = model.predict(images)
    expected, _ = _paper_reference(model, images, b=b)
    unweighted, _ = _paper_reference(model, images)
    assert (np.abs(expected - unweighted) > 3e-3 * unweighted).all()  # the weight matters here, at 5x the tolerance
    np.testing.assert_allclose(scores, expected, rtol=6e-4)  # measured: 1.3e-4


def test_predict_on_maps_smaller_than_the_blur_kernel():
    model = PatchCore(weights="none", device="cpu")
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    model.set_memory_bank(torch.randn(50, 1536, generator=torch.Generator().manual_seed(14)))
    scores, maps = model.predict(images)
    expected_scores, expected_maps = _paper_reference(model, images)
    np.testing.assert_allclose(scores, expected_scores, rtol=2.5e-4)
    np.testing.assert_allclose(maps, expected_maps, rtol=2.5e-4)


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
    assert fallback.config.weights == "none" and fallback.backbone_sha256 == model.backbone_sha256


def test_device_checks():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            resolve_device("cuda")


def test_a_gpu_that_torch_cannot_use_is_said_once(tmp_path, monkeypatch, capsys):
    smi = tmp_path / "nvidia-smi"  # answers as on a machine whose driver is too old for this torch's CUDA
    smi.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 3060, 535.104.05'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(system, "WARNED", set())
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "NVIDIA GeForce RTX 3060, 535.104.05" in err and "driver" in err
    smi.unlink()  # no NVIDIA GPU: nothing to say
    monkeypatch.setattr(system, "WARNED", set())
    assert resolve_device("auto") == torch.device("cpu") and capsys.readouterr().err == ""


def test_growing_a_bank_continues_the_greedy_loop():
    """add() = Alg. 1 continued with the bank as the selected set, against a naive float64 loop written here."""
    generator = torch.Generator().manual_seed(20)
    first, more = torch.randn(4, 3, 64, 64, generator=generator), torch.randn(3, 3, 64, 64, generator=generator)
    model = PatchCore(weights="none", device="cpu", image_size=64, coreset_ratio=0.1, calibration_holdout=0)
    model.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(first), batch_size=2))
    old = model.memory_bank.clone()
    facts = model.add(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(more), batch_size=2))
    new = model.aggregate_patches(model.extract_features(more)).reshape(-1, 1536)
    projection = (torch.randn(1536, 128, generator=torch.Generator().manual_seed(0)) / np.sqrt(128)).numpy().astype(np.float64)
    points, centers = new.numpy().astype(np.float64) @ projection, old.numpy().astype(np.float64) @ projection
    min_dist = ((points[:, None, :] - centers[None]) ** 2).sum(-1).min(1)
    picked = []
    for _ in range(len(points) // 10):
        picked.append(int(np.argmax(min_dist)))
        min_dist = np.minimum(min_dist, ((points - points[picked[-1]]) ** 2).sum(1))
    assert facts["added"] == len(picked) == 19 and torch.equal(model.memory_bank[: len(old)], old)
    # features differ by up to 1.6e-5 between batch sizes; another pick would differ by about 1
    np.testing.assert_allclose(model.memory_bank[len(old) :].numpy(), new.numpy()[picked], atol=1e-4)


@pytest.mark.parametrize("n, target", [(199, 0.05), (99, 0.01), (9, 0.05)])
def test_calibrated_threshold_gives_the_target_false_alarm_rate(n, target):
    """Good-image scores from a known (skewed) distribution: over many held-out draws, the share of fresh good
    scores at or above the calibrated threshold averages the rate calibrate() reports, and that is the target
    when n held-out images can reach it (9 images cannot reach 5 %: 1 / (n + 1) = 10 % is what they give)."""
    rng = np.random.default_rng(n)
    fresh = rng.gamma(3.0, 2.0, 200_000)
    rates, reported = [], set()
    for _ in range(400):
        held_out = rng.gamma(3.0, 2.0, n)
        calibration = calibrate(held_out, held_out, 0.0, target)
        rates.append((fresh >= calibration.image_threshold).mean())
        reported.add(calibration.expected_fpr)
    (expected,) = reported
    assert expected == (target if n >= 1 / target - 1 else 1 / (n + 1))
    assert abs(np.mean(rates) - expected) < 0.15 * expected  # the mean of 400 draws; its sampling error is about 5 %


def test_calibration_scores_held_out_images_against_a_bank_without_them():
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(21))
    settings = {"weights": "none", "device": "cpu", "image_size": 64, "target_fpr": 0.25}
    model = PatchCore(calibration_holdout=0.5, **settings)
    model.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=6))
    held = holdout_images(6, model.config.calibration_holdout, model.config.seed)
    kept = [i for i in range(6) if i not in held]
    assert len(held) == 3 and model.calibration.n_held_out == 3
    # the reference: a bank of the kept images only (Alg. 1 over them), and the held-out images scored against it
    reference = PatchCore(calibration_holdout=0, **settings)
    reference.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[kept]), batch_size=3))
    scores, maps = reference.predict(images[held])
    peaks = np.sort(maps.reshape(3, -1).max(1))
    # the thresholds, computed here: the k-th smallest held-out value, k = ceil((n + 1)(1 - 0.25)) = 3 of n = 3
    assert model.calibration.image_threshold == pytest.approx(np.sort(scores)[2], rel=1e-4)
    assert model.calibration.pixel_threshold == pytest.approx(peaks[2], rel=1e-4)
    assert model.calibration.held_out_image_scores["mean"] == pytest.approx(scores.mean(), rel=1e-4)
    # the saved bank holds every image and begins with that calibration bank, so it can only score lower
    assert torch.equal(model.memory_bank[: len(reference.memory_bank)], reference.memory_bank)
    assert len(model.memory_bank) == model.bank_size(6 * model.patches_per_image) > len(reference.memory_bank)
    assert (model.predict(images[held])[0] <= scores + 1e-6).all()


def test_official_bank_is_plain_alg1_over_every_image_whatever_the_calibration():
    """--protocol official, which every preset is: the saved bank is Alg. 1 over every training patch, as the released
    code builds it, with calibration as without; the thresholds come from a calibration bank of its own, and say so."""
    assert all(PatchCoreConfig.from_options(preset=name).protocol == "official" for name in PRESETS)
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(22))
    settings = {"weights": "none", "device": "cpu", "protocol": "official", "image_size": 64, "resize": 64, "seed": 3,
                "target_fpr": 0.25}  # fmt: skip
    model = PatchCore(calibration_holdout=0.5, **settings)
    model.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=6))
    # the reference: every patch's feature, the seeded projection and start, the naive greedy loop, no restriction
    features = model.aggregate_patches(model.extract_features(images)).reshape(-1, 1024).numpy()
    projection = (torch.randn(1024, 128, generator=torch.Generator().manual_seed(3)) / np.sqrt(128)).numpy()
    n = len(features)
    expected = features[naive_greedy(features @ projection, n // 10, _seeded_start(n, 3))]
    np.testing.assert_allclose(model.memory_bank.numpy(), expected, rtol=1e-5, atol=1e-5)
    # the thresholds: the held-out images against Alg. 1 over the kept images alone; k = 3 of n = 3 at 25 %
    held = holdout_images(6, 0.5, 3)
    kept = [i for i in range(6) if i not in held]
    reference = PatchCore(calibration_holdout=0, **settings)
    reference.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[kept]), batch_size=3))
    scores, maps = reference.predict(images[held])
    assert model.calibration.image_threshold == pytest.approx(scores.max(), rel=1e-4)
    assert model.calibration.pixel_threshold == pytest.approx(maps.reshape(3, -1).max(1).max(), rel=1e-4)
    assert "approximate" in model.calibration.note and model.train_facts["calibration_bank_size"] == len(reference.memory_bank)


@pytest.mark.parametrize("b", [0, 3])
def test_a_fresh_eq7_calibration_says_its_target_is_approximate(b):
    """docs/architecture.md: the saved bank contains the calibration bank, so max scores can only fall and the thresholds
    are conservative; Eq. 7's weight can move either way, which a --reweight_b bank's note says from fit on."""
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(23))
    model = PatchCore(weights="none", device="cpu", image_size=64, calibration_holdout=0.5, reweight_b=b)
    model.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4))
    assert model.calibration.calibrated
    if b:
        assert "Eq. 7" in model.calibration.note and "approximate" in model.calibration.note
    else:
        assert model.calibration.note is None


def test_pixel_threshold_is_the_conformal_rank_of_the_map_maxima_at_the_target():
    rng = np.random.default_rng(5)
    scores, peaks = rng.normal(size=19), rng.normal(size=19) + 3
    for target in (0.05, 0.1, 0.3):
        k = int(np.ceil((19 + 1) * (1 - target)))  # 19, 18, 14
        calibration = calibrate(scores, peaks, 0.0, target)
        assert calibration.image_threshold == np.sort(scores)[k - 1]
        assert calibration.pixel_threshold == np.sort(peaks)[k - 1]


@pytest.mark.parametrize("n_existing", [3, 40])  # fewer and more existing centers than the 16 pivots
def test_greedy_continues_from_existing_centers_as_the_naive_loop(n_existing):
    rng = np.random.default_rng(n_existing)
    points = rng.normal(size=(600, 8)).astype(np.float32)
    points[:100] *= 0.05  # a dense cluster next to the spread-out rest
    existing = rng.normal(size=(n_existing, 8)).astype(np.float32)
    min_dist = ((points[:, None, :].astype(np.float64) - existing[None]) ** 2).sum(-1).min(1)
    expected = []
    for _ in range(60):
        expected.append(int(np.argmax(min_dist)))
        min_dist = np.minimum(min_dist, ((points.astype(np.float64) - points[expected[-1]]) ** 2).sum(1))
    for greedy in (k_center_greedy_pruned, k_center_greedy_dense):
        assert greedy(torch.from_numpy(points), 60, existing=torch.from_numpy(existing)).tolist() == expected


def test_nearest_center_keeps_its_temporaries_under_the_byte_budget():
    """A grown bank's every new patch against its nearest bank patch: equal to float64 brute force, and no single
    allocation (as torch's profiler records them) above block_bytes, however many centers there are."""
    rng = np.random.default_rng(8)
    points, centers = rng.normal(size=(5000, 8)).astype(np.float32), rng.normal(size=(3000, 8)).astype(np.float32)
    d = ((points[:, None, :].astype(np.float64) - centers[None].astype(np.float64)) ** 2).sum(-1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        value, index = nearest_center(torch.from_numpy(points), torch.from_numpy(centers), block_bytes=2**20)
    assert max(event.cpu_memory_usage for event in profile.events()) <= 2**20  # 4,096 rows at once: 98 MB
    assert index.tolist() == d.argmin(1).tolist()
    np.testing.assert_allclose(value.numpy(), d.min(1), rtol=1e-6)


@pytest.mark.parametrize("protocol, b", [("paper", 0), ("paper", 3), ("official", 0)])
def test_scoring_module_is_one_torch_graph_equal_to_predict_with_faiss(protocol, b):
    """AnomalyScorer with the graph search exports as one graph (torch.export refuses a step that leaves torch, as the
    faiss search's numpy round trip does), and that graph scores as predict() does with faiss: both protocols, and Eq. 7."""
    settings = {"weights": "none", "device": "cpu", "protocol": protocol, "reweight_b": b, "image_size": 64, "resize": 64}
    generator = torch.Generator().manual_seed(30)
    train, test = torch.randn(2, 3, 64, 64, generator=generator), torch.randn(3, 3, 64, 64, generator=generator)
    with_faiss = PatchCore(search="faiss", **settings)
    with_faiss.set_memory_bank(with_faiss.aggregate_patches(with_faiss.extract_features(train)).flatten(0, 1))
    expected_scores, expected_maps = with_faiss.predict(test)
    scorer = AnomalyScorer(with_faiss.features, GraphSearch(with_faiss.memory_bank, rows=64), with_faiss.config)
    graph = torch.export.export(scorer, (test,)).module()
    scores, maps = graph(test)
    # measured largest error relative to the largest value, against faiss: 2.8e-5 (scores), 4.4e-5 (maps)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=2.5e-4)
    np.testing.assert_allclose(maps.numpy(), expected_maps, rtol=2.5e-4, atol=2.5e-4 * expected_maps.max())
    with pytest.raises(Exception, match="numpy"):
        torch.export.export(with_faiss.scorer, (test,))


def test_readme_states_when_the_threshold_guarantee_holds():
    """Issue 28, item 7: README's false-alarm promise names its conditions, and its numbers are what calibrate() and
    the hold-out give: the rate 1/(n + 1) below 19 held-out images, 5 % from 19, reached from 93 training images."""
    import re

    from scripts import REPO

    section = (REPO / "README.md").read_text().split("## Deciding on a production line")[1].split("\n## ")[0]
    assert "flag a new good part with probability at most `--target_fpr`" not in section  # the unqualified claim
    for condition in ("single model", "held-out", "1/(n + 1)", "Eq. 7", "ensembles", "approximate", "`expected_fpr`"):
        assert condition in section, condition

    def rate(n: int, target: float = 0.05) -> float:
        scores = np.arange(n, dtype=float)
        return calibrate(scores, scores, 0.0, target).expected_fpr

    n_needed, n_images = (int(v) for v in re.search(r"Reaching 5 % needs n ≥ (\d+), i.e. at least (\d+) training", section).groups())
    assert rate(n_needed) == pytest.approx(0.05) and rate(n_needed - 1) == pytest.approx(1 / n_needed) and 1 / n_needed > 0.05
    assert len(holdout_images(n_images, 0.2, 0)) == n_needed and len(holdout_images(n_images - 1, 0.2, 0)) == n_needed - 1
    for n_held, shown in re.findall(r"holds out (\d+): 1/\d+ = ([\d.]+) %", section):
        assert round(100 * rate(int(n_held)), 1) == float(shown)
    assert len(re.findall(r"holds out (\d+): 1/\d+ = ([\d.]+) %", section)) == 2
    assert len(holdout_images(30, 0.2, 0)) == 6 and len(holdout_images(60, 0.2, 0)) == 12  # the demo's category; 60 images
