"""Time and memory of each PatchCore stage, on a synthetic MVTec-style category.

    python benchmarks/benchmark.py --device cpu --out benchmarks/cpu.json

Stages: backbone, patch features, projection, greedy coreset (against the straightforward
loop, with the same selection), memory bank + faiss index, kNN scoring (against the raw
matrix product it needs), fit peak memory against N, and train.py + evaluate.py end to end.
Peak host memory is the process's resident set (sampled every 5 ms); peak GPU memory is
torch's allocator peak. Random-init weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset import MVTecDataset, Preprocess, make_synthetic_category  # noqa: E402
from patchcore import PatchCore, k_center_greedy_dense  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Stage:
    """Times a block and records its peak RSS (a sampling thread) and peak GPU memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.running = False
        self.thread.join()
        self.peak_gpu = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def record(rows: list[dict], name: str, stage: Stage, **facts) -> None:
    rows.append(
        {"stage": name, "seconds": round(stage.seconds, 4), "peak_rss_gib": gib(stage.peak), "peak_gpu_gib": gib(stage.peak_gpu), **facts}
    )
    print(f"{name:<34} {stage.seconds:9.3f}s  rss {gib(stage.peak):6.2f} GiB  {json.dumps(facts)}", flush=True)


def child_peak_rss(argv: list[str]) -> tuple[float, float]:
    """Run a Python script in a fresh process; (seconds, its own peak RSS in GiB)."""
    wrapper = (  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec
        "import runpy, sys; sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "    print('PEAK_RSS_KB', hwm, file=sys.stderr)"
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {result.stderr.strip().splitlines()[-1]}")
    peak_kb = int(result.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return seconds, peak_kb / 2**20


FIT_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from dataset import MVTecDataset, Preprocess
from patchcore import PatchCore
dataset = MVTecDataset({root!r}, "bench", "train", Preprocess({resize}, {size}))
dataset.samples = dataset.samples[:{n_images}]
loader = torch.utils.data.DataLoader(dataset, batch_size={batch_size})
model = PatchCore(weights="none", device={device!r}, coreset_ratio=0.01, feature_memory_gb={memory_gb})
model.fit(loader)
print("N", model.n_train_patches, file=sys.stderr)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--n_images", type=int, default=209, help="training images; N = 784 x this at 224 px (default: 209, MVTec bottle)")
    parser.add_argument("--image_size", type=int, default=224, help="crop size (default: 224)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--ratios", default="0.25,0.1,0.01", help="coreset ratios to time (default: 0.25,0.1,0.01)")
    parser.add_argument("--baseline_iters", type=int, default=300, help="iterations of the straightforward loop timed (default: 300)")
    parser.add_argument("--equal_n", type=int, default=20000, help="N of the full-run equality check against the loop (default: 20000)")
    parser.add_argument("--fit_images", default="16,32,64", help="training-set sizes for peak fit memory against N (default: 16,32,64)")
    parser.add_argument("--e2e_images", type=int, default=30, help="training images of the end-to-end run (default: 30)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    resize = args.image_size * 256 // 224
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="patchcore-bench-"))
    print(f"device {device}, torch threads {torch.get_num_threads()}, work folder {work}", flush=True)

    make_synthetic_category(work, "bench", n_train=args.n_images, n_test_good=2, n_per_defect=1, size=resize, seed=1)
    dataset = MVTecDataset(work, "bench", "train", Preprocess(resize, args.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=0)
    model = PatchCore(weights="none", device=args.device, coreset_ratio=0.25)

    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(device)
    model.extract_features(images)  # warm-up
    with Stage(device) as s:
        for _ in range(3):
            model.extract_features(images)
    record(rows, "backbone", s, images_per_s=round(3 * args.batch_size / s.seconds, 1), batch=args.batch_size)

    with Stage(device) as s:
        features = torch.cat([model._patches(b[0])[0].reshape(-1, 1536).cpu() for b in loader])
    n = features.shape[0]
    record(rows, "patch features (load+backbone+agg)", s, images_per_s=round(len(dataset) / s.seconds, 1), N=n)

    x = features.to(device)
    with Stage(device) as s:
        projected = x @ model._coreset_projection(x.shape[1])
    record(rows, "projection 1536 -> 128", s, N=n)
    del x

    for i, ratio in enumerate(float(r) for r in args.ratios.split(",")):
        with Stage(device) as s:
            selected = model._k_center_greedy(projected, ratio)
        record(rows, f"coreset {ratio:g}", s, N=n, selected=len(selected), path="pruned" if device.type == "cpu" else "dense")
        if i == 0:  # the first ratio: compared with the straightforward loop, and kept as the memory bank
            bank_indices = selected
            iters = min(args.baseline_iters, len(selected))
            with Stage(device) as b:
                baseline = k_center_greedy_dense(projected.to(device), iters, int(selected[0]))
            per_iter = b.seconds / iters
            record(rows, f"straightforward loop, {iters} iters", b, estimated_full_s=round(per_iter * len(selected), 1),
                   speedup=round(per_iter * len(selected) / s.seconds, 1),
                   same_first_iters=baseline.cpu().tolist() == selected[:iters].tolist())  # fmt: skip

    sub = projected[: args.equal_n]
    full_fast = model._k_center_greedy(sub, 0.25)
    full_loop = k_center_greedy_dense(sub.to(device), len(full_fast), int(full_fast[0])).cpu()
    rows.append({"stage": f"full-run equality N={len(sub)}, ratio 0.25", "same_selection": full_fast.tolist() == full_loop.tolist()})
    print(f"full-run equality at N={len(sub)}: {rows[-1]['same_selection']}", flush=True)

    with Stage(device) as s:
        model.set_memory_bank(features[bank_indices])
    record(rows, "memory bank + faiss index", s, bank=list(model.memory_bank.shape), faiss_gpu=type(model.index).__name__)

    per_image = (args.image_size // 8) ** 2  # layer2 has stride 8: 784 patches at 224 px
    queries = features[: args.batch_size * per_image]
    model.nearest_neighbors(queries[:per_image], 1)  # warm-up
    with Stage(device) as s:
        model.nearest_neighbors(queries, 1)
    knn_ms = 1000 * s.seconds / args.batch_size
    q, m = queries.to(device), model.memory_bank
    torch.mm(q[:per_image], m.T)
    with Stage(device) as mm:
        torch.mm(q, m.T)
    mm_ms = 1000 * mm.seconds / args.batch_size
    record(rows, "kNN scoring", s, ms_per_image=round(knn_ms, 2), images_per_s=round(1000 / knn_ms, 1))
    record(rows, "raw matrix product it needs", mm, ms_per_image=round(mm_ms, 2), knn_over_matmul=round(knn_ms / mm_ms, 2))
    del features, projected, queries, q

    for n_fit in (int(v) for v in args.fit_images.split(",") if v):
        for memory_gb, mode in ((0, "two-pass"), (64, "one-pass")):
            script = work / "fit.py"
            script.write_text(FIT_SCRIPT.format(repo=str(REPO), root=str(work), resize=resize, size=args.image_size, n_images=n_fit,
                                                batch_size=args.batch_size, device=args.device, memory_gb=memory_gb))  # fmt: skip
            seconds, peak = child_peak_rss([str(script)])
            rows.append(
                {
                    "stage": f"fit {mode}, {n_fit} images",
                    "seconds": round(seconds, 2),
                    "N": n_fit * per_image,
                    "peak_rss_gib": round(peak, 3),
                }
            )
            print(f"fit {mode:<9} {n_fit:>5} images  N={n_fit * per_image:<9} {seconds:7.1f}s  peak RSS {peak:.2f} GiB", flush=True)

    data = work / "e2e"
    make_synthetic_category(data, "synthetic", n_train=args.e2e_images, size=resize, seed=2)
    common = ["--data_path", str(data), "--category", "synthetic", "--output_dir", str(work / "results"), "--device", args.device,
              "--num_workers", "0", "--batch_size", str(args.batch_size)]  # fmt: skip
    for script, extra in (
        ("train.py", ["--weights", "none", "--resize", str(resize), "--image_size", str(args.image_size)]),
        ("evaluate.py", []),
    ):
        seconds, peak = child_peak_rss([str(REPO / script), *common, *extra])
        rows.append({"stage": f"end to end: {script}", "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 3)})
        print(f"end to end {script:<12} {seconds:7.1f}s  peak RSS {peak:.2f} GiB", flush=True)

    result = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "args": vars(args),
        "rows": rows,
    }
    shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
