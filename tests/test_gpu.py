"""The GPU paths (issue 18): right by construction, checked on the CPU where a check can run there, and
against the CPU or the eager path wherever CUDA exists (skipped with the reason elsewhere)."""

import numpy as np
import pytest
import torch

from method.backbone import resolve_amp
from method.coreset import k_center_greedy_dense
from method.search import FaissSearch, gpu_resources
from patchcore import PatchCore
from plumbing import system
from plumbing.system import set_cuda_fp32_precision
from references import naive_greedy

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: this path runs only on one")
GPUS = [f"cuda:{i}" for i in range(max(1, torch.cuda.device_count()))]


@pytest.mark.parametrize("capability, runs", [((7, 5), "none"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_bf16_counts_as_native_from_ampere_on_and_on_the_models_gpu(monkeypatch, capability, runs):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation: must not be what decides
    monkeypatch.setattr(system, "WARNED", set())
    assert resolve_amp("bf16", torch.device("cuda:1")) == runs
    assert asked == [torch.device("cuda:1")]
    assert resolve_amp("fp16", torch.device("cuda:1")) == "fp16"  # every CUDA GPU computes fp16


def test_exact_fp32_unless_tf32_is_asked_for():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        assert set_cuda_fp32_precision(False) == "ieee"
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert set_cuda_fp32_precision(True) == "tf32"
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        set_cuda_fp32_precision(False)
        torch.export.export(torch.nn.Conv2d(1, 1, 1), (torch.zeros(1, 1, 2, 2),))  # the flags stay readable to the exporter
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert PatchCore(weights="none", device="cpu", image_size=64).fp32_precision == "ieee"


@CUDA
@pytest.mark.parametrize("device", GPUS)
def test_cuda_graph_greedy_equals_the_eager_loop_on_every_gpu(device):
    points = torch.from_numpy(np.random.default_rng(3).normal(size=(5000, 128)).astype(np.float32))
    points = points.to(device)
    eager = k_center_greedy_dense(points, 400, start=11, block=10**9).tolist()  # no block fits: eager steps only
    assert k_center_greedy_dense(points, 400, start=11).tolist() == eager  # warm-up, capture, replays
    rows = torch.arange(0, 5000, 3)
    eager = k_center_greedy_dense(points, 400, start=0, first_from=(rows, 150), block=10**9).tolist()
    assert k_center_greedy_dense(points, 400, start=0, first_from=(rows, 150)).tolist() == eager
    assert eager == naive_greedy(points.cpu().numpy(), 400, 0, first_from=(rows.numpy(), 150))


@CUDA
def test_gpu_features_scores_and_maps_equal_the_cpus_in_exact_fp32():
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    train = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    results = []
    for device in ("cpu", "cuda"):
        model = PatchCore(weights="none", device=device, image_size=64, search="exact")
        model.set_memory_bank(model.aggregate_patches(model.extract_features(train)).flatten(0, 1))
        results.append((model.aggregate_patches(model.extract_features(images)).cpu(), *model.predict(images)))
    for cpu, gpu in zip(*results):
        gpu = torch.as_tensor(gpu)
        cpu = torch.as_tensor(cpu)
        assert ((gpu - cpu).norm() / cpu.norm()).item() < 1e-5  # TF32 would give about 1e-3


@CUDA
@pytest.mark.parametrize("device", GPUS)
def test_faiss_gpu_searches_on_the_device_with_one_resource_per_gpu(device):
    bank = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    queries = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    a, b = FaissSearch(bank.to(device)), FaissSearch(bank.to(device))
    index = torch.device(device).index or 0
    assert gpu_resources(index) is gpu_resources(index)
    distances, indices = a(queries.to(device), k=3)
    assert distances.device == torch.device(device) and indices.device == torch.device(device)
    exact = torch.cdist(queries.double(), bank.double())
    assert torch.equal(indices.cpu(), exact.topk(3, largest=False).indices)
    np.testing.assert_allclose(distances.cpu().numpy(), exact.topk(3, largest=False).values.numpy(), rtol=1e-4)
    assert torch.equal(b(queries.to(device), k=3)[1], indices)
