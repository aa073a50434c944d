"""Score test images against a saved memory bank; write scores, metrics, heatmaps and a summary.

    python evaluate.py --data_path "/mnt/e/Big Data/MVTec AD" --category bottle
    python evaluate.py --data_path "/mnt/e/Big Data/MVTec AD" --category all
    python evaluate.py --data_path DIR --category bottle --images "new_parts/*.png"

Reads OUTPUT_DIR/<category>/memory_bank.npz (made by train.py). Per category it writes
scores.json, metrics.json, anomaly_maps/ (one PNG per image), anomaly_maps.npz (raw maps),
roc.png and score_hist.png; then OUTPUT_DIR/summary.md and summary.csv for all categories
evaluated. With --images it scores unlabelled images into OUTPUT_DIR/<category>/inference/.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from scipy import ndimage
from sklearn.metrics import roc_curve
from tqdm import tqdm

from common import (
    BANK_FILE,
    TRAIN_LOG,
    ArgumentParser,
    BankError,
    add_common_args,
    atomic_write,
    check_common_args,
    environment,
    load_memory_bank,
    now,
    run_main,
    save_npz,
    write_json,
)
from dataset import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, MVTecDataset, Preprocess, find_images, resolve_categories
from metrics import compute_metrics
from patchcore import PatchCore

# The paper's MVTec AD results as the design document lists them: (image AUROC, pixel AUROC).
PAPER_TARGETS = {
    "bottle": (1.000, 0.986), "cable": (0.995, 0.984), "capsule": (0.981, 0.988), "hazelnut": (1.000, 0.987),
    "metal_nut": (1.000, 0.984), "pill": (0.966, 0.974), "screw": (0.981, 0.994), "toothbrush": (1.000, 0.987),
    "transistor": (1.000, 0.963), "zipper": (0.994, 0.988), "carpet": (0.987, 0.990), "grid": (0.982, 0.987),
    "leather": (1.000, 0.993), "tile": (0.987, 0.956), "wood": (0.992, 0.950),
}  # fmt: skip


def parse_args():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--weights", default=None, help="backbone weights (default: those the memory bank was built with); must equal them")
    parser.add_argument(
        "--reweight_b",
        type=int,
        default=0,
        help="image score: 0 = max patch score (default); b > 0 = the paper's Eq. 7 reweighting with b neighbours (paper: 9)",
    )
    parser.add_argument("--blur_sigma", type=float, default=4.0, help="Gaussian sigma for smoothing anomaly maps, 0 = none (default: 4)")
    parser.add_argument(
        "--search_precision",
        default="fp32",
        choices=["fp32", "tf32", "fp16"],
        help="matmul precision of the exact torch kNN search used on a GPU without faiss GPU support (default: fp32)",
    )
    parser.add_argument("--images", default=None, help="score these unlabelled images instead of the test split: a folder or a glob")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="with --images: image score at or above which an image is called defective "
        "(default: the image F1 threshold in the category's metrics.json, if any)",
    )
    args = parser.parse_args()
    check_common_args(parser, args)
    if args.reweight_b < 0:
        parser.error(f"--reweight_b must be 0 (off) or more, got {args.reweight_b}")
    if args.blur_sigma < 0:
        parser.error(f"--blur_sigma must be 0 (off) or more, got {args.blur_sigma}")
    if args.images and "," in args.category or args.images and args.category == "all":
        parser.error("--images scores against one memory bank: give a single --category")
    if args.threshold is not None and not args.images:
        parser.error("--threshold applies to --images only; on the test split the F1-optimal threshold is reported")
    return args


def load_model(bank_path: Path, device: str = "auto", weights: str | None = None, reweight_b: int = 0, blur_sigma: float = 4.0, **options):
    """Rebuild the model a memory bank was made with, and refuse a bank that does not match it.

    Returns (model, header); the header's config holds the preprocessing sizes. `options` go to
    PatchCore (amp, search_precision).
    """
    if not bank_path.is_file():
        raise BankError(
            f"no memory bank at {bank_path}: run `python train.py --data_path DATA_PATH --category {bank_path.parent.name} "
            f"--output_dir {bank_path.parent.parent}` first"
        )
    memory_bank, header = load_memory_bank(bank_path)
    config = header["config"]
    model = PatchCore(
        backbone=config["backbone"],
        layers=tuple(config["layers"]),
        device=device,
        coreset_ratio=config["coreset_ratio"],
        coreset_proj_dim=config["coreset_proj_dim"],
        weights=weights or config["weights_spec"],
        seed=config["seed"],
        reweight_b=reweight_b,
        blur_sigma=blur_sigma,
        **options,  # amp, search_precision
    )
    if model.backbone_sha256 != config["backbone_sha256"]:
        raise BankError(
            f"{bank_path} was built with backbone weights '{config['weights']}', but evaluation has '{model.weights}' "
            "(their checksums differ): evaluate with the training weights, or retrain"
        )
    if memory_bank.shape[1] != model.feature_dim:
        raise BankError(
            f"{bank_path} holds {memory_bank.shape[1]}-d features, but {config['backbone']} {config['layers']} makes "
            f"{model.feature_dim}-d ones: rerun train.py with these settings"
        )
    if reweight_b > memory_bank.shape[0]:
        raise BankError(f"--reweight_b {reweight_b} is larger than the memory bank ({memory_bank.shape[0]} patches)")
    model.set_memory_bank(torch.from_numpy(memory_bank))
    return model, header


# ---------------------------------------------------------------------- pictures
def to_rgb(image: torch.Tensor) -> np.ndarray:
    """A normalised [3, H, W] tensor back to [H, W, 3] floats in 0..255."""
    return np.clip((image.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255, 0, 255)


def colour_bar(height: int, vmin: float, vmax: float, threshold: float | None) -> np.ndarray:
    """A vertical jet colour bar with the category's score range, and the pixel threshold marked."""
    bar = np.full((height, 72, 3), 255.0)
    bar[:, 4:16] = matplotlib.colormaps["jet"](np.linspace(1, 0, height))[:, None, :3] * 255
    image = Image.fromarray(bar.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.text((19, 0), f"{vmax:.3g}", fill=(0, 0, 0))
    draw.text((19, height - 11), f"{vmin:.3g}", fill=(0, 0, 0))
    if threshold is not None and vmax > vmin:
        y = int(round((vmax - threshold) / (vmax - vmin) * (height - 1)))
        draw.line((0, y, 18, y), fill=(0, 0, 0), width=2)
        draw.text((19, min(max(y - 5, 12), height - 23)), f"thr {threshold:.3g}", fill=(0, 0, 0))
    return np.asarray(image, dtype=np.float64)


def heatmap_panel(
    rgb: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None, vmin: float, vmax: float, threshold: float | None
) -> Image.Image:
    """[input | heatmap overlay | predicted region at the pixel threshold | colour bar]; ground truth outlined in white."""
    heat = matplotlib.colormaps["jet"](np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0, 1))[..., :3] * 255
    outline = None
    if mask is not None and mask.any():
        region = mask > 0.5
        outline = region & ~ndimage.binary_erosion(region, iterations=2)
    panels = [rgb, 0.5 * rgb + 0.5 * heat]
    if threshold is not None:
        predicted = rgb.copy()
        hit = anomaly_map >= threshold
        predicted[hit] = 0.4 * predicted[hit] + 0.6 * np.array([255.0, 0, 0])
        panels.append(predicted)
    if outline is not None:
        for panel in panels[1:]:
            panel[outline] = 255
    panels.append(colour_bar(rgb.shape[0], vmin, vmax, threshold))
    return Image.fromarray(np.concatenate(panels, axis=1).astype(np.uint8))


def write_heatmaps(folder: Path, names: list[str], rgbs, maps, masks, vmin: float, vmax: float, threshold: float | None) -> None:
    """One PNG per image under folder/."""
    for i, name in enumerate(tqdm(names, desc="heatmaps", unit="img")):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        heatmap_panel(rgbs[i], maps[i], None if masks is None else masks[i], vmin, vmax, threshold).save(target)


@contextlib.contextmanager
def staging(folder: Path):
    """Outputs are written into a hidden folder inside `folder` and moved into place only when all
    are complete (metrics.json last); an error or Ctrl-C leaves the previous outputs untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=folder, prefix=".staging."))
    try:
        yield stage
        for item in sorted(stage.iterdir(), key=lambda p: p.name == "metrics.json"):
            if item.is_dir():
                shutil.rmtree(folder / item.name, ignore_errors=True)
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_figure(path: Path, figure) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_roc(path: Path, labels: np.ndarray, scores: np.ndarray, auroc: float | None, category: str) -> None:
    figure = Figure(figsize=(4.5, 4.5))
    ax = figure.subplots()
    if auroc is not None:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"PatchCore (AUROC {100 * auroc:.1f}%)")
    ax.plot([0, 1], [0, 1], "k:", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{category}: image-level ROC")
    ax.legend(loc="lower right")
    save_figure(path, figure)


def plot_histogram(path: Path, labels: np.ndarray, scores: np.ndarray, threshold: float | None, category: str) -> None:
    figure = Figure(figsize=(6, 3.5))
    ax = figure.subplots()
    bins = np.linspace(scores.min(), scores.max(), 30) if scores.max() > scores.min() else 10
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"good ({(labels == 0).sum()})", color="tab:green")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"defective ({(labels == 1).sum()})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"F1 threshold {threshold:.3g}")
    ax.set(xlabel="image anomaly score", ylabel="images", title=f"{category}: score histogram")
    ax.legend()
    save_figure(path, figure)


# ---------------------------------------------------------------------- scoring
def score(model: PatchCore, loader, desc: str) -> tuple[np.ndarray, np.ndarray, list, float]:
    """Image scores, anomaly maps, the batches themselves, and the seconds spent."""
    scores, maps, batches = [], [], []
    start = time.perf_counter()
    for batch in tqdm(loader, desc=desc, unit="batch"):
        batch_scores, batch_maps = model.predict(batch[0])
        scores.append(batch_scores)
        maps.append(batch_maps)
        batches.append(batch)
    return np.concatenate(scores), np.concatenate(maps), batches, time.perf_counter() - start


def make_loader(dataset, args: argparse.Namespace, model: PatchCore):
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers, pin_memory=model.device.type == "cuda"
    )


def load_model_for(args: argparse.Namespace, out_dir: Path) -> tuple[PatchCore, dict]:
    """load_model with the command line's scoring options."""
    options = {"amp": args.amp, "search_precision": args.search_precision}
    return load_model(out_dir / BANK_FILE, args.device, args.weights, args.reweight_b, args.blur_sigma, **options)


def evaluate_category(args: argparse.Namespace, category: str) -> dict:
    out_dir = Path(args.output_dir) / category
    model, header = load_model_for(args, out_dir)
    config = header["config"]
    dataset = MVTecDataset(args.data_path, category, "test", Preprocess(config["resize"], config["image_size"]))
    scores, maps, batches, seconds = score(model, make_loader(dataset, args, model), f"{category} test")
    labels = np.concatenate([b[1].numpy() for b in batches])
    masks = np.concatenate([b[2][:, 0].numpy() for b in batches])
    paths = [p for b in batches for p in b[3]]
    defects = [d for b in batches for d in b[4]]

    metrics = {
        "category": category,
        **compute_metrics(labels, scores, masks, maps, defects),
        "n_images": len(paths),
        "n_good": int((labels == 0).sum()),
        "n_defective": int((labels == 1).sum()),
        "computed_on": f"image metrics: all {len(paths)} test images; pixel metrics: every pixel of every test image, "
        f"at the evaluation resolution {maps.shape[-1]}x{maps.shape[-2]} (center crop)",
        "image_score": f"Eq. 7 reweighting, b={args.reweight_b}" if args.reweight_b else "max patch score",
        "blur_sigma": args.blur_sigma,
        "amp": args.amp,
        "nearest_neighbour_search": "faiss IndexFlatL2" if model.index is not None else f"exact torch search ({args.search_precision})",
        "heatmap_scale": [float(maps.min()), float(maps.max())],
        "seconds": round(seconds, 2),
        "ms_per_image": round(1000 * seconds / len(paths), 1),
        "device": str(model.device),
        "weights": model.weights,
        "memory_bank": {"path": str(out_dir / BANK_FILE), **header["train"], "config": config},
        "environment": environment(),
        "created": now(),
    }
    if (out_dir / TRAIN_LOG).is_file():
        metrics["memory_bank"]["training_run"] = json.loads((out_dir / TRAIN_LOG).read_text())

    names = [str(Path(d) / (Path(p).stem + ".png")) for p, d in zip(paths, defects)]
    rgbs = [to_rgb(image) for b in batches for image in b[0]]
    records = [{"path": p, "defect_type": d, "label": int(y), "score": float(s)} for p, d, y, s in zip(paths, defects, labels, scores)]
    with staging(out_dir) as stage:
        write_heatmaps(stage / "anomaly_maps", names, rgbs, maps, masks, *metrics["heatmap_scale"], metrics["pixel_f1_threshold"])
        save_npz(stage / "anomaly_maps.npz", {p: m.astype(np.float16) for p, m in zip(paths, maps)}, compress=True)
        plot_roc(stage / "roc.png", labels, scores, metrics["image_auroc"], category)
        plot_histogram(stage / "score_hist.png", labels, scores, metrics["image_f1_threshold"], category)
        write_json(stage / "scores.json", records)
        write_json(stage / "metrics.json", metrics)
    return metrics


def score_new_images(args: argparse.Namespace) -> None:
    """--images: score unlabelled images; decisions where a threshold is known."""
    category = args.category
    out_dir = Path(args.output_dir) / category
    paths = find_images(args.images)
    model, header = load_model_for(args, out_dir)
    known = json.loads((out_dir / "metrics.json").read_text()) if (out_dir / "metrics.json").is_file() else {}
    threshold = args.threshold if args.threshold is not None else known.get("image_f1_threshold")
    config = header["config"]
    dataset = ImageFiles(paths, Preprocess(config["resize"], config["image_size"]))
    scores, maps, batches, seconds = score(model, make_loader(dataset, args, model), f"{category} images")

    base = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    names = [p.resolve().relative_to(base).with_suffix(".png").as_posix() for p in paths]
    vmin, vmax = known.get("heatmap_scale") or (float(maps.min()), float(maps.max()))
    rgbs = [to_rgb(image) for b in batches for image in b[0]]
    records = []
    for path, name, value in zip(paths, names, scores):
        record = {"path": str(path), "heatmap": f"anomaly_maps/{name}", "score": float(value)}
        if threshold is not None:
            record["decision"] = "defective" if value >= threshold else "good"
        records.append(record)
    inference = out_dir / "inference"
    with staging(inference) as stage:
        write_heatmaps(stage / "anomaly_maps", names, rgbs, maps, None, vmin, vmax, known.get("pixel_f1_threshold"))
        write_json(stage / "scores.json", {"threshold": threshold, "weights": model.weights, "created": now(), "images": records})
    print(f"\n{'image':<40} {'score':>10}  decision")
    for record in records:
        print(f"{Path(record['path']).name:<40} {record['score']:>10.4f}  {record.get('decision', '(no threshold)')}")
    print(f"\n{len(records)} images in {seconds:.1f}s; scores and heatmaps in {inference}/")


# ---------------------------------------------------------------------- summary
def summary_rows(results: list[dict]) -> list[dict]:
    """One row per category and a mean row: ours, the paper's, and the difference, in percent."""

    def pct(value):
        return None if value is None else round(100 * value, 2)

    rows = []
    for m in results:
        paper_image, paper_pixel = PAPER_TARGETS.get(m["category"], (None, None))
        rows.append({
            "category": m["category"], "image_auroc": pct(m["image_auroc"]), "paper_image_auroc": pct(paper_image),
            "pixel_auroc": pct(m["pixel_auroc"]), "paper_pixel_auroc": pct(paper_pixel), "aupro": pct(m["aupro"]),
        })  # fmt: skip
    mean = {"category": "mean"}
    for key in ("image_auroc", "paper_image_auroc", "pixel_auroc", "paper_pixel_auroc", "aupro"):
        values = [r[key] for r in rows if r[key] is not None]
        mean[key] = round(float(np.mean(values)), 2) if values else None
    rows.append(mean)
    for row in rows:
        for level in ("image", "pixel"):
            ours, paper = row[f"{level}_auroc"], row[f"paper_{level}_auroc"]
            row[f"{level}_diff"] = None if ours is None or paper is None else round(ours - paper, 2)
    return rows


def write_summary(output_dir: Path, results: list[dict]) -> str:
    rows = summary_rows(results)
    columns = ["category", "image_auroc", "paper_image_auroc", "image_diff", "pixel_auroc", "paper_pixel_auroc", "pixel_diff", "aupro"]
    titles = ["category", "image AUROC", "paper", "diff", "pixel AUROC", "paper", "diff", "AUPRO@0.3"]

    def cell(column, value):
        if value is None or isinstance(value, str):
            return "n/a" if value is None else value
        return f"{value:+.2f}" if column.endswith("_diff") else f"{value:.2f}"

    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        text = [cell(c, row[c]) for c in columns]
        lines.append("| " + " | ".join(f"**{t}**" if row["category"] == "mean" else t for t in text) + " |")
    weights = results[0]["weights"]
    table = "\n".join(lines)
    markdown = f"# PatchCore on {len(results)} categor{'y' if len(results) == 1 else 'ies'} (percent)\n\nweights: {weights}\n\n{table}\n"
    atomic_write(output_dir / "summary.md", lambda f: f.write(markdown), mode="w")

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: ("" if row[c] is None else row[c]) for c in columns} for row in rows)

    atomic_write(output_dir / "summary.csv", write_csv, mode="w")
    return table


def main() -> None:
    args = parse_args()
    if args.images:
        score_new_images(args)
        return
    categories = resolve_categories(Path(args.data_path), args.category)
    untrained = [c for c in categories if not (Path(args.output_dir) / c / BANK_FILE).is_file()]
    if untrained:  # before any work, so that 'all' does not stop halfway
        raise BankError(
            f"no memory bank for {', '.join(untrained)} in {args.output_dir}: run `python train.py --data_path {args.data_path} "
            f"--category {','.join(untrained)} --output_dir {args.output_dir}` first"
        )
    results = [evaluate_category(args, category) for category in categories]
    table = write_summary(Path(args.output_dir), results)
    print(f"\nweights: {results[0]['weights']} (percent; paper = the design document's MVTec AD targets)\n{table}")
    print(f"\nsummary: {Path(args.output_dir) / 'summary.md'}; per category: metrics.json, scores.json, heatmaps in")
    for m in results:
        print(f"  {Path(args.output_dir) / m['category'] / 'anomaly_maps'}/")


if __name__ == "__main__":
    run_main(main)
