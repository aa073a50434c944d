"""Time and memory of each PatchCore stage, on synthetic MVTec-style data.

    python benchmarks/benchmark.py --device cpu --out benchmarks/cpu.json
    python benchmarks/benchmark.py --stages memory --out benchmarks/memory.json

Stages (--stages, comma list; default: speed,e2e):
  speed   backbone, patch features, projection, greedy coreset at each ratio (against a plain
          eager loop, with the same selection), memory bank + index, kNN scoring (against the
          raw matrix product it needs);
  e2e     train.py and evaluate.py end to end, in fresh processes;
  large   train.py and evaluate.py on synthetic 1500x1000 JPEGs (VisA's size) against 256 px PNGs;
  search  faiss against the exact search on the same bank and patches: time, top-1 agreement with a
          float64 brute force, score error, AUROC; the backbone's time per image, the share the search
          takes of it, and the whole evaluation per image with each; on the coreset bank, or
          (--search_bank dense) on the first training patches, where near-ties abound;
  drivers train.py and evaluate.py (--search exact, the default, and faiss) at bottle scale and at their own default
          settings: what README's speed line says;
  presets the IM224 baseline against the IM320 ensemble of the released code, at bottle scale;
  memory  peak RSS of train.py at two training-set sizes, one-pass (default) and two-pass, and
          of evaluate.py --images at two numbers of images: the slope is what grows per image.
          Use a --batch_size no larger than the smallest size, so that every run holds full
          batches: a smaller last batch has smaller activations and would bias the slope;
  tiles   high resolution by tiles: train.py and evaluate.py on a synthetic MVTec AD 2 scene at two or three
          working resolutions: seconds and peak RSS per megapixel;
  deploy  the exported model (export.py) run by predict_onnx.py on onnxruntime (at --batch_size and
          at 1) and OpenVINO, in a venv of requirements-deploy.txt alone, against evaluate.py
          --images on the same images: ms per image, peak RSS, agreement; the export's time and
          file size; installed sizes of requirements-deploy.txt and requirements.txt.
Peak host memory of a stage is the process's resident set (sampled every 5 ms); of a fresh
process, its VmHWM. Peak GPU memory is torch's allocator peak. Random-init weights: speed
does not depend on them. Only public functions of the project are used.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset import CategoryDataset, Preprocess  # noqa: E402
from method.coreset import greedy_coreset  # noqa: E402
from patchcore import PatchCore  # noqa: E402
from plumbing.bank import load_bank  # noqa: E402
from plumbing.system import cpu_kind  # noqa: E402
from synthetic import make_synthetic_category  # noqa: E402


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


def record(rows: list[dict], name: str, stage: Stage | None = None, **facts) -> None:
    """One figure, with the CPU it was measured on (its model name and the flags that decide its kernels)."""
    row = {"stage": name, **facts, "cpu": cpu_kind()}
    if stage is not None:
        row.update(seconds=round(stage.seconds, 4), peak_rss_gib=gib(stage.peak), peak_gpu_gib=gib(stage.peak_gpu))
    rows.append(row)
    print(f"{name:<44} {json.dumps({k: v for k, v in row.items() if k not in ('stage', 'cpu')})}  [{row['cpu']}]", flush=True)


def plain_greedy_loop(points: torch.Tensor, n_select: int, start: int) -> list[int]:
    """Alg. 1 as anyone would first write it: one eager distance update and argmax per step."""
    selected = [start]
    min_dist = ((points - points[start]) ** 2).sum(1)
    for _ in range(n_select - 1):
        farthest = int(torch.argmax(min_dist))
        selected.append(farthest)
        min_dist = torch.minimum(min_dist, ((points - points[farthest]) ** 2).sum(1))
    return selected


# Runs a project script as __main__ in a fresh interpreter, then reports that process's VmHWM (ru_maxrss would carry
# the parent's peak over through fork and exec). Plain Python, so that it runs in a venv without torch too.
CHILD = (
    "import runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "finally:\n"
    "    hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1]\n"
    "    print('PEAK_RSS_KB', hwm, file=sys.stderr)\n"
)


def run_child(argv: list[str], python: str = sys.executable) -> tuple[float, float, str]:
    """Run a project script in a fresh process of `python`; (seconds, its peak RSS in GiB, its stdout)."""
    start = time.perf_counter()
    result = subprocess.run([python, "-c", CHILD, *argv], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        said = [line for line in result.stderr.strip().splitlines() if not line.startswith("PEAK_RSS_KB")] or ["(nothing on stderr)"]
        raise RuntimeError(f"{argv[0]} failed: {said[-1]}")
    peak_kb = int(result.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return seconds, peak_kb / 2**20, result.stdout


# ---------------------------------------------------------------------- stages
def stage_speed(args: argparse.Namespace, work: Path, rows: list[dict]) -> None:
    device = torch.device(args.device)
    resize = args.image_size * 256 // 224
    make_synthetic_category(work, "bench", n_train=args.n_images, n_test_good=2, n_per_defect=1, size=resize, seed=1)
    dataset = CategoryDataset(work, "bench", "train", Preprocess(resize, args.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=0)
    model = PatchCore(weights="none", device=args.device, image_size=args.image_size)

    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(device)
    model.extract_features(images)  # warm-up
    with Stage(device) as s:
        for _ in range(3):
            model.extract_features(images)
    record(rows, "backbone", s, images_per_s=round(3 * args.batch_size / s.seconds, 1), batch=args.batch_size)

    with Stage(device) as s:
        features = torch.cat([model.aggregate_patches(model.extract_features(b[0])).flatten(0, 1).cpu() for b in loader])
    n = features.shape[0]
    record(rows, "patch features (load + backbone + aggregation)", s, images_per_s=round(len(dataset) / s.seconds, 1), N=n)

    x = features.to(device)
    with Stage(device) as s:
        projected = x @ model.coreset_projection(x.shape[1])
    record(rows, f"projection {x.shape[1]} -> {projected.shape[1]}", s, N=n)
    del x

    bank_indices = None
    for ratio in (float(r) for r in args.ratios.split(",")):
        with Stage(device) as s:  # Alg. 1 as fit runs it, from the seeded start
            selected = greedy_coreset(projected, max(1, int(n * ratio)), model.config.seed, device)
        record(rows, f"coreset {ratio:g}", s, N=n, selected=len(selected), path="pruned" if device.type == "cpu" else "dense CUDA graphs")
        if bank_indices is None:  # the first ratio: against the plain loop, and kept as the memory bank
            bank_indices, fast_seconds = selected, s.seconds
            iters = min(args.baseline_iters, len(selected))
            with Stage(device) as b:
                baseline = plain_greedy_loop(projected.to(device), iters, int(selected[0]))
            per_iter = b.seconds / iters
            same = baseline == selected[:iters].tolist()
            record(rows, f"plain eager loop, {iters} iterations", b, estimated_full_s=round(per_iter * len(selected), 1),
                   speedup=round(per_iter * len(selected) / fast_seconds, 1), same_first_iterations=same)  # fmt: skip

    sub = projected[: args.equal_n]
    fast = greedy_coreset(sub, len(sub) // 4, model.config.seed, device).tolist()
    same = fast == plain_greedy_loop(sub.to(device), len(fast), fast[0])
    record(rows, f"full-run equality N={len(sub)}, ratio 0.25", same_selection=same)

    with Stage(device) as s:
        model.set_memory_bank(features[bank_indices])
    record(rows, "memory bank + index", s, bank=list(model.memory_bank.shape), search=model.search_name())

    per_image = model.grid[0] * model.grid[1]
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


def _driver_args(data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return ["--data_path", str(data), "--category", "synthetic", "--output_dir", str(out), "--device", args.device,
            "--num_workers", str(args.num_workers), "--batch_size", str(args.batch_size)]  # fmt: skip


def stage_e2e(args: argparse.Namespace, work: Path, rows: list[dict]) -> None:
    resize = args.image_size * 256 // 224
    data = work / "e2e"
    make_synthetic_category(data, "synthetic", n_train=args.e2e_images, size=resize, seed=2)
    common = _driver_args(data, work / "e2e-results", args)
    size = ["--resize", str(resize), "--image_size", str(args.image_size)]
    for script, extra in (("train.py", ["--weights", "none", *size]), ("evaluate.py", [])):
        seconds, peak, _ = run_child([script, *common, *extra])
        record(rows, f"end to end: {script}", seconds=round(seconds, 2), peak_rss_gib=round(peak, 3))


def _bottle(work: Path, name: str, size: int) -> Path:
    """A synthetic category of MVTec bottle's size: 209 training images, 20 good and 63 defective test images."""
    data = work / name
    if not data.exists():
        make_synthetic_category(data, "synthetic", n_train=209, n_test_good=20, n_per_defect=21, size=size, seed=6)
    return data


def _defaults_run(data: Path, out: Path, args: argparse.Namespace, script: str, *extra: str) -> tuple[float, float, str]:
    """train.py or evaluate.py at the settings a user gets (their own batch size, workers, calibration), in a fresh process."""
    return run_child([script, "--data_path", str(data), "--category", "synthetic", "--output_dir", str(out), "--device", args.device,
                      *extra])  # fmt: skip


def stage_drivers(args: argparse.Namespace, work: Path, rows: list[dict]) -> None:
    """README's figures: train.py and evaluate.py end to end at bottle scale and at their default settings
    (batch size, workers, calibration on, --search exact), and evaluate.py with --search faiss."""
    data, out = _bottle(work, "drivers", 256), work / "drivers-results"
    seconds, peak, _ = _defaults_run(data, out, args, "train.py", "--weights", "none")
    record(rows, "train.py, defaults, bottle scale", seconds=round(seconds, 1), s_per_image=round(seconds / 209, 3),
           peak_rss_gib=round(peak, 3))  # fmt: skip
    for search in ("exact", "faiss"):
        seconds, peak, _ = _defaults_run(data, out, args, "evaluate.py", "--search", search)
        metrics = json.loads((out / "synthetic" / "metrics.json").read_text())
        record(rows, f"evaluate.py --search {search}, bottle scale", seconds=round(seconds, 1),
               process_ms_per_image=round(1000 * seconds / 83, 1), scoring_ms_per_image=metrics["ms_per_image"],
               search_used=metrics["nearest_neighbour_search"],
               image_auroc=metrics["image_auroc"], peak_rss_gib=round(peak, 3))  # fmt: skip


def stage_tiles(args: argparse.Namespace, work: Path, rows: list[dict]) -> None:
    """High resolution by tiles (issue 30): train.py and evaluate.py on a synthetic MVTec AD 2 scene of
    --tiles_size images, at each working resolution of --tiles_resolutions (the longer side, --image_size) with
    --tile_size --tiles_tile, at the drivers' other defaults: seconds and peak RSS per megapixel of working image."""
    from plumbing.image_io import working_size
    from synthetic import make_synthetic_scene

    width, height = (int(v) for v in args.tiles_size.split("x"))
    data = work / "tiles"
    counts = dict(n_train=args.tiles_train, n_validation=3, n_test_good=2, n_test_bad=2, n_private=2)
    make_synthetic_scene(data, "scene", size=(width, height), defect_px=16, seed=3, **counts)
    n_scored = 4 + 2 * 2  # test_public and both private splits
    for longer in (int(v) for v in args.tiles_resolutions.split(",")):
        work_w, work_h = working_size((width, height), longer)
        megapixels = work_w * work_h / 1e6
        out = work / f"tiles-{longer}"
        common = ["--data_path", str(data), "--category", "scene", "--output_dir", str(out), "--device", args.device]
        settings = ["--image_size", str(longer), "--tile_size", str(args.tiles_tile), "--coreset_ratio", str(args.tiles_ratio)]
        seconds, peak, _ = run_child(["train.py", *common, "--weights", "none", *settings])
        images = args.tiles_train + 3  # train/good, then validation/good for the thresholds
        record(rows, f"tiles: train.py at {longer} px", working=f"{work_w}x{work_h}", megapixels=round(megapixels, 2),
               seconds=round(seconds, 1), s_per_megapixel=round(seconds / (images * megapixels), 2), peak_rss_gib=round(peak, 3),
               images=images, tile=args.tiles_tile, coreset_ratio=args.tiles_ratio)  # fmt: skip
        seconds, peak, _ = run_child(["evaluate.py", *common])
        metrics = json.loads((out / "scene" / "metrics.json").read_text())
        record(rows, f"tiles: evaluate.py at {longer} px", working=f"{work_w}x{work_h}", megapixels=round(megapixels, 2),
               seconds=round(seconds, 1), s_per_megapixel=round(seconds / (n_scored * megapixels), 2), peak_rss_gib=round(peak, 3),
               images=n_scored, au_pro_005=metrics["mvtec_ad2"]["au_pro_0.05"])  # fmt: skip
    # evaluation's peak RSS against the number of test images, their maps and metrics at the images' own size (the pixel
    # curves count them as they come): the first resolution's bank on scenes of --tiles_scored test_public images
    longer, peaks, counts = int(args.tiles_resolutions.split(",")[0]), [], [int(v) for v in args.tiles_scored.split(",")]
    for n in counts:
        scene, out = work / f"tiles-scored{n}", work / f"tiles-scored{n}-out"
        make_synthetic_scene(scene, "scene", size=(width, height), defect_px=16, seed=4, n_train=1, n_validation=1,
                             n_test_good=n // 2, n_test_bad=n - n // 2, n_private=1)  # fmt: skip
        (out / "scene").mkdir(parents=True)
        shutil.copy(work / f"tiles-{longer}" / "scene" / "memory_bank.npz", out / "scene" / "memory_bank.npz")
        seconds, peak, _ = run_child(["evaluate.py", "--data_path", str(scene), "--category", "scene", "--output_dir", str(out),
                                      "--device", args.device])  # fmt: skip
        peaks.append(peak)
        record(rows, f"tiles: evaluate.py at {longer} px, {n} test images", seconds=round(seconds, 1), peak_rss_gib=round(peak, 3),
               images=n + 2, original=f"{width}x{height}")  # fmt: skip
    growth = (peaks[-1] - peaks[0]) * 1024 / (counts[-1] - counts[0])
    record(rows, f"tiles: evaluate.py at {longer} px: growth", mib_per_test_image=round(growth, 1),
           map_and_mask_mib_per_test_image=round(width * height * 5 / 2**20, 1))  # fmt: skip


def stage_presets(args: argparse.Namespace, work: Path, rows: list[dict]) -> None:
    """The cost of the published runs: the IM224 baseline against the IM320 ensemble (issue 19), at bottle scale,
    at the drivers' default settings, random-init weights (speed does not depend on them)."""
    for preset, size in (("official-im224", 256), ("official-im320-ensemble", 366)):
        data, out = _bottle(work, f"presets-{size}", size), work / f"presets-{preset}"
        seconds, peak, stdout = _defaults_run(data, out, args, "train.py", "--weights", "none", "--preset", preset)
        banks = next(line for line in stdout.splitlines() if "memory bank" in line).split("memory bank")[1].split(" in ")[0]
        record(rows, f"train.py --preset {preset}", seconds=round(seconds, 1), s_per_image=round(seconds / 209, 3),
               peak_rss_gib=round(peak, 3), banks=banks.strip(" s"))  # fmt: skip
        seconds, peak, _ = _defaults_run(data, out, args, "evaluate.py")
        metrics = json.loads((out / "synthetic" / "metrics.json").read_text())
        record(rows, f"evaluate.py, {preset}", seconds=round(seconds, 1), process_ms_per_image=round(1000 * seconds / 83, 1),
               scoring_ms_per_image=metrics["ms_per_image"], peak_rss_gib=round(peak, 3))  # fmt: skip


def stage_memory(args: argparse.Namespace, work: Path, rows: list[dict]) -> None:
    """Peak RSS against the number of images: the slope is the memory a run needs per image."""
    resize = args.image_size * 256 // 224
    sizes, scored = ([int(v) for v in text.split(",")] for text in (args.memory_images, args.memory_scored))
    data = work / "memory"
    make_synthetic_category(data, "synthetic", n_train=max(sizes + scored), n_test_good=1, n_per_defect=1, size=resize, seed=3)
    train_good = sorted((data / "synthetic" / "train" / "good").iterdir())
    per_image_gb = (args.image_size // 8) ** 2 * 1536 * 4 / 2**30
    two_pass = ["--feature_memory_gb", "0", "--coreset_ratio", str(args.memory_ratio)]
    for mode, extra in (("one-pass (default settings)", []), (f"two-pass ({' '.join(two_pass)})", two_pass)):
        peaks = []
        for n in sizes:
            subset = work / f"subset{n}"
            (subset / "synthetic" / "train" / "good").mkdir(parents=True, exist_ok=True)
            for path in train_good[:n]:
                target = subset / "synthetic" / "train" / "good" / path.name
                if not target.exists():
                    target.symlink_to(path)
            argv = ["train.py", *_driver_args(subset, work / f"fit{n}", args), "--weights", "none", "--resize", str(resize),
                    "--image_size", str(args.image_size), *extra]  # fmt: skip
            seconds, peak, stdout = run_child(argv)
            peaks.append(peak)
            path = next(line for line in stdout.splitlines() if line.startswith("fit:"))
            record(rows, f"fit {mode.split()[0]}, {n} images", seconds=round(seconds, 1), peak_rss_gib=round(peak, 3), path=path)
        slope = (peaks[-1] - peaks[0]) / (sizes[-1] - sizes[0]) * 1000
        features = 1000 * per_image_gb
        record(rows, f"fit {mode.split()[0]}: growth", settings=mode, gib_per_1000_images=round(slope, 2),
               features_gib_per_1000_images=round(features, 2), ratio_to_features=round(slope / features, 2))  # fmt: skip

    bank_dir = work / f"fit{sizes[0]}"  # a bank to score against
    parts = work / "parts"
    parts.mkdir()
    test_good = sorted((data / "synthetic" / "train" / "good").iterdir())
    peaks = []
    for n in scored:
        folder = parts / str(n)
        folder.mkdir()
        for i in range(n):
            (folder / f"{i:04d}.png").symlink_to(test_good[i % len(test_good)])
        argv = ["evaluate.py", *_driver_args(data, bank_dir, args), "--images", str(folder)]
        seconds, peak, _ = run_child(argv)
        peaks.append(peak)
        record(rows, f"evaluate --images, {n} images", seconds=round(seconds, 1), peak_rss_gib=round(peak, 3))
    growth = (peaks[-1] - peaks[0]) * 1024
    record(rows, "evaluate --images: growth", mib=round(growth, 1), mib_per_1000_images=round(growth / (scored[-1] - scored[0]) * 1000, 1))


def stage_large(args: argparse.Namespace, work: Path, rows: list[dict]) -> None:
    """train.py and evaluate.py on VisA-sized JPEGs (1500 x 1000) against MVTec-sized 256 px PNGs."""
    n = args.large_images
    for name, layout, size in (("256 px PNG", "mvtec", 256), ("1500x1000 JPEG", "visa", (1500, 1000))):
        data = work / f"large-{layout}"
        make_synthetic_category(data, "synthetic", n_train=n, n_test_good=n // 3, n_per_defect=n // 3, size=size, seed=4, layout=layout)
        common = _driver_args(data, work / f"large-{layout}-results", args)
        for script, extra, images in (("train.py", ["--weights", "none"], n), ("evaluate.py", [], n // 3 * 4)):
            seconds, peak, _ = run_child([script, *common, *extra])
            record(rows, f"{script} on {name}", images=images, seconds=round(seconds, 1), s_per_image=round(seconds / images, 3),
                   peak_rss_gib=round(peak, 3), num_workers=args.num_workers)  # fmt: skip


def fastest(device: torch.device, repeats: int, run) -> tuple[Stage, object, list[float]]:
    """Runs `run()` `repeats` times, each timed: the fastest run's Stage, its result, and every run's seconds
    (a shared machine's noise only ever adds time, so the minimum is the figure; the list shows the spread)."""
    best, result, seconds = None, None, []
    for _ in range(repeats):
        with Stage(device) as s:
            out = run()
        seconds.append(s.seconds)
        if best is None or s.seconds < best.seconds:
            best, result = s, out
    return best, result, seconds


def float64_nearest(queries: torch.Tensor, bank: torch.Tensor, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's nearest bank row by brute force in float64 (centred, so the expansion's rounding,
    about 1e-16 of the squared norms, is far below any float32 difference): indices [M], distances [M, 1]."""
    bank = bank.double()
    mean = bank.mean(0)
    bank = bank - mean
    bank_sq = (bank**2).sum(1)
    indices, distances = [], []
    for q in queries.split(rows):
        q = q.double() - mean
        nearest = ((q**2).sum(1, keepdim=True) - 2 * q @ bank.T + bank_sq).argmin(1)
        indices.append(nearest)
        distances.append((q - bank[nearest]).norm(dim=1, keepdim=True))
    return torch.cat(indices), torch.cat(distances)


def stage_search(args: argparse.Namespace, work: Path, rows: list[dict]) -> None:
    """Evaluation per image on this CPU (or GPU): faiss against the exact search, on the same bank and patches: the
    search alone, its top-1 agreement with a float64 brute force and score error; then the backbone alone and the
    whole per-image evaluation (backbone, search, maps) with each, and what share of the backbone's time the search takes."""
    from method.search import ExactSearch
    from reporting.metrics import auroc

    device = torch.device(args.device)
    resize = args.image_size * 256 // 224
    make_synthetic_category(work, "search", n_train=args.n_images, n_test_good=args.search_test // 2, n_per_defect=args.search_test // 6,
                            size=resize, seed=5)  # fmt: skip
    settings = {"weights": "none", "device": args.device, "image_size": args.image_size, "resize": resize, "calibration_holdout": 0}
    model = PatchCore(search="faiss", **settings)
    train = CategoryDataset(work, "search", "train", model.config.preprocess())
    test = CategoryDataset(work, "search", "test", model.config.preprocess())
    if args.search_bank == "coreset":
        with Stage(device) as s:
            model.fit(torch.utils.data.DataLoader(train, batch_size=args.batch_size))
        record(rows, "fit (for the search stage)", s, bank=list(model.memory_bank.shape))
    else:  # dense: the first training patches, as many as the coreset keeps; no coreset spreads them out, so near-ties abound
        size, chunks = int(model.config.coreset_ratio * len(train) * (args.image_size // 8) ** 2), []
        for batch in torch.utils.data.DataLoader(train, batch_size=args.batch_size):
            chunks.append(model.aggregate_patches(model.extract_features(batch[0])).flatten(0, 1).cpu())
            if sum(len(c) for c in chunks) >= size:
                break
        model.set_memory_bank(torch.cat(chunks)[:size])
        record(rows, "dense bank (for the search stage)", bank=list(model.memory_bank.shape), note="the first training patches, no coreset")
    images = torch.cat([b[0] for b in torch.utils.data.DataLoader(test, batch_size=args.batch_size)])
    labels = torch.tensor([test[i][1] for i in range(len(test))]).numpy()
    patches = torch.cat([model.aggregate_patches(model.extract_features(b)) for b in images.split(args.batch_size)])
    queries = patches.flatten(0, 1).cpu()
    exact_index, exact = float64_nearest(queries, model.memory_bank.cpu())  # the reference: brute force in float64
    per_image = queries.shape[0] // len(images)

    def image_scores(distances: torch.Tensor) -> np.ndarray:
        return distances[:, 0].reshape(len(images), per_image).max(1).values.numpy()

    reference_auroc = auroc(labels, image_scores(exact))[0]
    bank = model.memory_bank
    with Stage(device) as s:
        exact_search = ExactSearch(bank)
    record(rows, "exact search: built (sketches)", s, bank=list(bank.shape))
    searches = {"faiss, fp32 expansion": functools.partial(model.nearest_neighbors, k=1), "exact": functools.partial(exact_search, k=1)}
    search_ms = {}
    for name, search in searches.items():
        search(queries[:per_image].to(device))  # warm-up
        s, (distances, index), runs = fastest(device, args.repeats,
                                               lambda search=search: tuple(t.cpu() for t in search(queries.to(device))))
        error = (distances.double() - exact) / exact.clamp_min(1e-12)  # the score against float64
        chosen = (queries.double() - bank.cpu().double()[index[:, 0]]).norm(dim=1, keepdim=True)  # float64, of the patch taken
        scores = image_scores(distances)
        search_ms[name] = 1000 * s.seconds / len(images)
        record(rows, f"search: {name}", s, patches=len(queries), ms_per_image=round(search_ms[name], 1),
               ms_per_image_runs=[round(1000 * t / len(images), 1) for t in runs],
               top1_agreement=round(float((index[:, 0] == exact_index).float().mean()), 6),
               farther_patch_taken=int((chosen > exact * (1 + 1e-6)).sum()), max_rel_patch_score_diff=float(error.abs().max()),
               max_rel_image_score_diff=float(np.abs(scores - image_scores(exact)).max() / np.abs(image_scores(exact)).max()),
               auroc_diff=auroc(labels, scores)[0] - reference_auroc)  # fmt: skip

    # the backbone alone, then the whole per-image evaluation (backbone + search + maps), at the batch size given
    model.extract_features(images[: args.batch_size])  # warm-up
    batches = images.split(args.batch_size)
    s, _, runs = fastest(device, args.repeats, lambda: [model.aggregate_patches(model.extract_features(b)) for b in batches])
    backbone_ms = 1000 * s.seconds / len(images)
    record(rows, "backbone + patch features per image", s, ms_per_image=round(backbone_ms, 1), batch=args.batch_size,
           ms_per_image_runs=[round(1000 * t / len(images), 1) for t in runs])  # fmt: skip
    for name in searches:
        record(rows, f"search share of the backbone: {name}", share=round(search_ms[name] / backbone_ms, 3))
    evaluated = {}
    for how in ("faiss", "exact"):
        scorer = PatchCore(search=how, **settings)
        scorer.set_memory_bank(model.memory_bank)
        scorer.predict(images[: args.batch_size])  # warm-up
        s, scores, runs = fastest(device, args.repeats, lambda scorer=scorer: np.concatenate([scorer.predict(b)[0] for b in batches]))
        evaluated[how] = 1000 * s.seconds / len(images)
        record(rows, f"evaluate per image: {how}", s, ms_per_image=round(evaluated[how], 1), search=scorer.search_name(),
               ms_per_image_runs=[round(1000 * t / len(images), 1) for t in runs],
               image_auroc=auroc(labels, scores)[0], auroc_diff=auroc(labels, scores)[0] - reference_auroc)  # fmt: skip
    record(rows, "evaluate per image: faiss over exact", ratio=round(evaluated["faiss"] / evaluated["exact"], 2))


# Sums the bytes on disk of the distributions a list of requirement lines installs, their dependencies included
# (markers evaluated here, extras left out), with the packaging library pip vendors: runs in any venv.
INSTALLED = (
    "import importlib.metadata as md, json, re, sys\n"
    "from pip._vendor.packaging.requirements import Requirement\n"
    "sizes = {}\n"
    "def visit(text):\n"
    "    req = Requirement(text)\n"
    "    name = re.sub(r'[-_.]+', '-', req.name).lower()\n"
    "    if (req.marker and not req.marker.evaluate({'extra': ''})) or name in sizes:\n"
    "        return\n"
    "    try:\n"
    "        dist = md.distribution(req.name)\n"
    "    except md.PackageNotFoundError:\n"
    "        sizes[name] = None\n"
    "        return\n"
    "    sizes[name] = sum(p.stat().st_size for p in (f.locate() for f in dist.files or []) if p.is_file())\n"
    "    for r in dist.requires or []:\n"
    "        visit(r)\n"
    "for line in sys.argv[1:]:\n"
    "    visit(line)\n"
    "print(json.dumps(sizes))\n"
)


def installed_bytes(python: str, requirements: list[str]) -> dict[str, int | None]:
    """{distribution: bytes on disk} of what `requirements` install in the venv of `python` (None: not installed there)."""
    result = subprocess.run([python, "-c", INSTALLED, *requirements], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def per_image_ms(stdout: str) -> float:
    """ms per image of the scoring loop (the model loaded), from the 'N images in Xs (M ms per image' line predict_onnx.py
    prints, or the 'N images in Xs' one of evaluate.py --images."""
    line = next(line for line in stdout.splitlines() if " images in " in line)
    if " ms per image" in line:
        return float(line.split(" ms per image")[0].split("(")[-1])
    n, seconds = line.split(" images in ")[0].split()[-1], line.split(" images in ")[1].split("s")[0]
    return 1000 * float(seconds) / int(n)


# OpenVINO at f32 (what onnx_model.DeployedModel asks for) against its CPU default (bf16 where the CPU has it), on the
# same model inputs: ms per image, the precision that ran, and how far the default's scores and decisions move.
OPENVINO_PRECISIONS = (
    "import json, sys, time\n"
    "import numpy as np, openvino\n"
    "from plumbing.image_io import find_images, load_rgb, model_input\n"
    "from deploy.onnx_model import DeployedModel\n"
    "path, spec, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
    "pre = DeployedModel(path, 'openvino').preprocessing\n"
    "images = np.stack([model_input(load_rgb(f), pre['resize'], pre['image_size'], pre['crop']) for f in find_images(spec)])\n"
    "core, result = openvino.Core(), {}\n"
    "for name, config in (('f32', {'INFERENCE_PRECISION_HINT': 'f32'}), ('default', {})):\n"
    "    compiled = core.compile_model(path, 'CPU', config)\n"
    "    compiled({'images': images[:1]})\n"
    "    start = time.perf_counter()\n"
    "    runs = [compiled({'images': images[i : i + batch]}) for i in range(0, len(images), batch)]\n"
    "    seconds = time.perf_counter() - start\n"
    "    scores = np.concatenate([np.asarray(r[0]) for r in runs])\n"
    "    decisions = np.concatenate([np.asarray(r[3]) for r in runs]) if len(compiled.outputs) > 3 else None\n"
    "    precision = compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()\n"
    "    result[name] = {'precision': precision, 'ms': 1000 * seconds / len(images), 'scores': scores.tolist(),\n"
    "                    'decisions': None if decisions is None else decisions.tolist()}\n"
    "print(json.dumps(result))\n"
)


def load() -> float:
    """The 1-minute load average when a run ended: on a shared machine, above the core count means the timing is stretched."""
    return round(os.getloadavg()[0], 1)


def stage_deploy(args: argparse.Namespace, work: Path, rows: list[dict]) -> None:
    """The exported model (export.py) on onnxruntime and OpenVINO, run by predict_onnx.py in a venv of requirements-deploy.txt
    alone, against evaluate.py --images (default search) on the same images: ms per image, peak RSS, agreement; the
    export's time and file size; the installed size of requirements-deploy.txt against requirements.txt."""
    resize = args.image_size * 256 // 224
    data, out = work / "deploy", work / "deploy-results"
    make_synthetic_category(data, "synthetic", n_train=args.n_images, n_test_good=args.deploy_test // 2,
                            n_per_defect=args.deploy_test // 6, size=resize, seed=6)  # fmt: skip
    images = str(data / "synthetic" / "test" / "*" / "*.png")
    common = _driver_args(data, out, args)
    seconds, peak, _ = run_child(["train.py", *common, "--weights", "none", "--resize", str(resize), "--image_size", str(args.image_size)])
    bank, header = load_bank(out / "synthetic" / "memory_bank.npz")
    record(rows, "deploy: train.py (the bank)", seconds=round(seconds, 1), load_1min=load(), peak_rss_gib=round(peak, 3),
           bank=list(bank.shape), n_patches=header["train"]["n_patches"])  # fmt: skip
    seconds, peak, stdout = run_child(["evaluate.py", *common, "--images", images])
    reference = json.loads((out / "synthetic" / "inference" / "scores.json").read_text())["images"]
    record(rows, "deploy: evaluate.py --images", seconds=round(seconds, 1), load_1min=load(), peak_rss_gib=round(peak, 3),
           images=len(reference), ms_per_image=round(per_image_ms(stdout), 1), batch=args.batch_size,
           note="default search; heatmaps drawn")  # fmt: skip
    seconds, peak, stdout = run_child(["export.py", "--output_dir", str(out), "--category", "synthetic"])
    model = out / "synthetic" / "patchcore.onnx"
    record(rows, "deploy: export.py", seconds=round(seconds, 1), load_1min=load(), peak_rss_gib=round(peak, 3),
           file_mb=round(model.stat().st_size / 1e6, 1), line=stdout.splitlines()[0])  # fmt: skip

    venv = Path(args.deploy_venv) if args.deploy_venv else work / "deploy-venv"
    if not args.deploy_venv:  # a fresh venv of requirements-deploy.txt alone (and OpenVINO): no torch in it
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(REPO / "requirements-deploy.txt")], check=True)
        subprocess.run([*pip, "openvino"], check=True)
    python = str(venv / "bin" / "python")
    has_torch = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
    for runtime, batch in (("onnxruntime", args.batch_size), ("onnxruntime", 1), ("openvino", args.batch_size)):
        scored = work / f"deploy-{runtime}-{batch}"
        argv = ["predict_onnx.py", str(model), images, "--runtime", runtime, "--batch_size", str(batch), "--heatmaps",
                "--output_dir", str(scored)]  # fmt: skip
        seconds, peak, stdout = run_child(argv, python=python)
        got = json.loads((scored / "scores.json").read_text())["images"]
        score_diff = max(abs(g["score"] - r["score"]) / abs(r["score"]) for g, r in zip(got, reference))
        same = sum(g.get("decision") == r.get("decision") for g, r in zip(got, reference))
        record(rows, f"deploy: predict_onnx.py, {runtime}, batch {batch}", seconds=round(seconds, 1), load_1min=load(),
               peak_rss_gib=round(peak, 3), ms_per_image=round(per_image_ms(stdout), 1), max_rel_score_diff_to_evaluate=score_diff,
               same_decisions=f"{same}/{len(reference)}", torch_in_venv=has_torch)  # fmt: skip

    command = [python, "-c", OPENVINO_PRECISIONS, str(model), images, str(args.batch_size)]
    precisions = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout)
    f32 = np.array(precisions["f32"]["scores"])
    for name, run in precisions.items():
        same = (
            None
            if run["decisions"] is None
            else f"{sum(a == b for a, b in zip(run['decisions'], precisions['f32']['decisions']))}/{len(f32)}"
        )
        record(rows, f"deploy: OpenVINO, {name} precision", precision=run["precision"], ms_per_image=round(run["ms"], 1), load_1min=load(),
               max_rel_score_diff_to_f32=float(np.abs(np.array(run["scores"]) - f32).max() / np.abs(f32).max()),
               same_decisions_as_f32=same, note="model calls only, in-process")  # fmt: skip

    full = installed_bytes(sys.executable, requirement_lines(REPO / "requirements.txt"))
    deploy = installed_bytes(python, requirement_lines(REPO / "requirements-deploy.txt"))
    openvino = {k: v for k, v in installed_bytes(python, ["openvino"]).items() if k not in deploy}  # what it adds
    for name, sizes in (("requirements.txt", full), ("requirements-deploy.txt", deploy), ("openvino (optional), added", openvino)):
        largest = sorted(((v or 0, k) for k, v in sizes.items()), reverse=True)[:4]
        record(rows, f"deploy: installed size, {name}", mb=round(sum(v or 0 for v in sizes.values()) / 1e6, 1),
               distributions=len(sizes), missing=[k for k, v in sizes.items() if v is None],
               largest={k: round(v / 1e6, 1) for v, k in largest})  # fmt: skip


STAGES = {"speed": stage_speed, "e2e": stage_e2e, "memory": stage_memory, "large": stage_large, "search": stage_search,
          "drivers": stage_drivers, "presets": stage_presets, "deploy": stage_deploy, "tiles": stage_tiles}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="speed,e2e", help=f"comma list of: {', '.join(STAGES)} (default: speed,e2e)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--n_images", type=int, default=209, help="training images; N = 784 x this at 224 px (default: 209, MVTec bottle)")
    parser.add_argument("--image_size", type=int, default=224, help="crop size (default: 224)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--ratios", default="0.25,0.1,0.01", help="coreset ratios to time; the first is compared with the plain loop")
    parser.add_argument("--baseline_iters", type=int, default=300, help="iterations of the plain loop timed (default: 300)")
    parser.add_argument("--equal_n", type=int, default=20000, help="N of the full-run equality check (default: 20000)")
    parser.add_argument("--e2e_images", type=int, default=30, help="training images of the end-to-end run (default: 30)")
    parser.add_argument("--memory_images", default="20,400", help="training-set sizes of the memory stage's fits (default: 20,400)")
    parser.add_argument("--memory_scored", default="40,400", help="image counts of the memory stage's evaluate --images (default: 40,400)")
    parser.add_argument(
        "--memory_ratio", type=float, default=0.01, help="coreset ratio of the memory stage's two-pass fits (default: 0.01)"
    )
    parser.add_argument("--large_images", type=int, default=30, help="training images of the large stage (default: 30)")
    parser.add_argument("--search_test", type=int, default=48, help="test images of the search stage (default: 48)")
    parser.add_argument("--search_bank", choices=["coreset", "dense"], default="coreset",
                        help="search stage's bank: the 25%% coreset (default), or as many of the first training patches, without "
                        "a coreset: the harder case for a candidate search, with many near-ties")  # fmt: skip
    parser.add_argument(
        "--num_workers",
        type=int,
        default=0,
        help="DataLoader workers of the driver runs (default: 0, so that peak RSS covers decoding too)",
    )
    parser.add_argument("--repeats", type=int, default=3,
                        help="search stage: times each of search, backbone and evaluation is run; the fastest counts (default: 3)")
    parser.add_argument("--tiles_size", default="3072x2304", help="tiles stage: the scene's image size WxH (default: 3072x2304)")
    parser.add_argument("--tiles_resolutions", default="1024,1536,2048",
                        help="tiles stage: working resolutions, the longer side (default: 1024,1536,2048)")  # fmt: skip
    parser.add_argument("--tiles_tile", type=int, default=512, help="tiles stage: --tile_size (default: 512)")
    parser.add_argument("--tiles_ratio", type=float, default=0.01, help="tiles stage: --coreset_ratio (default: 0.01)")
    parser.add_argument("--tiles_train", type=int, default=6, help="tiles stage: training images (default: 6)")
    parser.add_argument("--tiles_scored", default="4,16",
                        help="tiles stage: test_public sizes whose evaluation peak RSS is compared (default: 4,16)")  # fmt: skip
    parser.add_argument("--deploy_test", type=int, default=48, help="test images of the deploy stage (default: 48)")
    parser.add_argument("--deploy_venv", default=None,
                        help="deploy stage: a venv with requirements-deploy.txt and openvino installed (default: make one with pip, "
                        "which needs PyPI)")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="patchcore-bench-"))
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, work folder {work}", flush=True)
    try:
        for name in stages:
            STAGES[name](args, work, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu": cpu_kind(),
        "torch": torch.__version__,
        "args": vars(args),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
