"""Score a category's test split against its saved memory bank; write scores, metrics and heatmaps.

    python evaluate.py --data_path "/mnt/e/Big Data/MVTec AD" --category bottle

Reads OUTPUT_DIR/<category>/memory_bank.npz (made by train.py) and writes beside it:
scores.json, metrics.json and anomaly_maps/<defect_type>/<image>.png.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from common import (
    BANK_FILE,
    ArgumentParser,
    BankError,
    add_common_args,
    check_common_args,
    environment,
    load_memory_bank,
    run_main,
    write_json,
)
from dataset import IMAGENET_MEAN, IMAGENET_STD, MVTecDataset, Preprocess, resolve_categories
from patchcore import PatchCore


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
    args = parser.parse_args()
    check_common_args(parser, args)
    if args.reweight_b < 0:
        parser.error(f"--reweight_b must be 0 (off) or more, got {args.reweight_b}")
    if args.blur_sigma < 0:
        parser.error(f"--blur_sigma must be 0 (off) or more, got {args.blur_sigma}")
    return args


def auroc(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[float | None, str | None]:
    """ROC AUC, or (None, reason) where one class is absent and the metric is undefined."""
    labels = np.asarray(labels).ravel()
    if labels.min() == labels.max():
        return None, f"undefined: every {what} is {'defective' if labels.min() else 'good'}"
    return float(roc_auc_score(labels, np.asarray(scores).ravel())), None


def compute_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> dict:
    """Image AUROC over image scores; pixel AUROC over every pixel of every test image's anomaly map."""
    image_auroc, image_reason = auroc(labels, scores, "test image")
    pixel_auroc, pixel_reason = auroc(masks > 0.5, maps, "test pixel")
    metrics = {"image_auroc": image_auroc, "pixel_auroc": pixel_auroc}
    if image_reason:
        metrics["image_auroc_reason"] = image_reason
    if pixel_reason:
        metrics["pixel_auroc_reason"] = pixel_reason
    return metrics


def heatmap_panel(image: torch.Tensor, anomaly_map: np.ndarray, mask: np.ndarray, vmin: float, vmax: float) -> Image.Image:
    """[input | heatmap overlay with the ground-truth outline in white], one colour scale per category."""
    rgb = image.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    rgb = np.clip(rgb * 255, 0, 255)
    heat = matplotlib.colormaps["jet"](np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0, 1))[..., :3] * 255
    overlay = 0.5 * rgb + 0.5 * heat
    region = mask > 0.5
    overlay[region & ~ndimage.binary_erosion(region, iterations=2)] = 255
    return Image.fromarray(np.concatenate([rgb, overlay], axis=1).astype(np.uint8))


def load_model(bank_path: Path, args: argparse.Namespace) -> tuple[PatchCore, dict]:
    """Rebuild the model a memory bank was made with, and refuse a bank that does not match it."""
    if not bank_path.is_file():
        category = bank_path.parent.name
        raise BankError(
            f"no memory bank at {bank_path}: run `python train.py --data_path {args.data_path} "
            f"--category {category} --output_dir {args.output_dir}` first"
        )
    memory_bank, header = load_memory_bank(bank_path)
    config = header["config"]
    model = PatchCore(
        backbone=config["backbone"],
        layers=tuple(config["layers"]),
        device=args.device,
        coreset_ratio=config["coreset_ratio"],
        coreset_proj_dim=config["coreset_proj_dim"],
        weights=args.weights or config["weights_spec"],
        seed=config["seed"],
        reweight_b=args.reweight_b,
        blur_sigma=args.blur_sigma,
    )
    if model.backbone_sha256 != config["backbone_sha256"]:
        raise BankError(
            f"{bank_path} was built with backbone weights '{config['weights']}', but evaluation has '{model.weights}' "
            "(their checksums differ): evaluate with the training weights, or retrain"
        )
    if memory_bank.shape[1] != config["feature_dim"]:
        raise BankError(f"{bank_path}: features have {memory_bank.shape[1]} dims, its config says {config['feature_dim']}")
    if args.reweight_b > memory_bank.shape[0]:
        raise BankError(f"--reweight_b {args.reweight_b} is larger than the memory bank ({memory_bank.shape[0]} patches)")
    model.set_memory_bank(torch.from_numpy(memory_bank))
    return model, header


def evaluate_category(args: argparse.Namespace, category: str) -> dict:
    out_dir = Path(args.output_dir) / category
    model, header = load_model(out_dir / BANK_FILE, args)
    config = header["config"]
    dataset = MVTecDataset(args.data_path, category, "test", Preprocess(config["resize"], config["image_size"]))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
        pin_memory=model.device.type == "cuda",
    )  # fmt: skip

    records, images, masks, maps, scores = [], [], [], [], []
    start = time.perf_counter()
    for image, label, mask, path, defect in tqdm(loader, desc=f"{category} test", unit="batch"):
        batch_scores, batch_maps = model.predict(image)
        scores.append(batch_scores)
        maps.append(batch_maps)
        masks.append(mask[:, 0].numpy())
        images.append(image)
        for i in range(len(path)):
            records.append({"path": path[i], "defect_type": defect[i], "label": int(label[i]), "score": float(batch_scores[i])})
    seconds = time.perf_counter() - start
    scores, maps, masks = np.concatenate(scores), np.concatenate(maps), np.concatenate(masks)
    labels = np.array([r["label"] for r in records])

    metrics = {
        "category": category,
        **compute_metrics(labels, scores, masks, maps),
        "n_images": len(records),
        "n_good": int((labels == 0).sum()),
        "n_defective": int((labels == 1).sum()),
        "pixel_metrics_on": f"all {len(records)} test images at {maps.shape[-1]}x{maps.shape[-2]} px",
        "image_score": f"Eq. 7 reweighting, b={args.reweight_b}" if args.reweight_b else "max patch score",
        "blur_sigma": args.blur_sigma,
        "seconds": round(seconds, 2),
        "ms_per_image": round(1000 * seconds / len(records), 1),
        "device": str(model.device),
        "weights": model.weights,
        "memory_bank": {"path": str(out_dir / BANK_FILE), **header["train"], "config": config},
        "environment": environment(),
    }

    # heatmaps go to a temporary folder that replaces anomaly_maps/ only when complete
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".anomaly_maps."))
    try:
        vmin, vmax = float(maps.min()), float(maps.max())
        images = torch.cat(images)
        for i, record in enumerate(tqdm(records, desc=f"{category} heatmaps", unit="img")):
            target = tmp / record["defect_type"] / (Path(record["path"]).stem + ".png")
            target.parent.mkdir(exist_ok=True)
            heatmap_panel(images[i], maps[i], masks[i], vmin, vmax).save(target)
        shutil.rmtree(out_dir / "anomaly_maps", ignore_errors=True)
        tmp.rename(out_dir / "anomaly_maps")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    metrics["heatmap_scale"] = [vmin, vmax]
    write_json(out_dir / "scores.json", records)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def percent(value: float | None) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def main() -> None:
    args = parse_args()
    categories = resolve_categories(Path(args.data_path), args.category)
    rows = [evaluate_category(args, category) for category in categories]
    print(f"\n{'category':<14} {'image AUROC':>11} {'pixel AUROC':>11} {'images':>7} {'ms/img':>7}")
    for m in rows:
        print(
            f"{m['category']:<14} {percent(m['image_auroc']):>11} {percent(m['pixel_auroc']):>11} {m['n_images']:>7} {m['ms_per_image']:>7}"
        )
    print(f"\nweights: {rows[0]['weights']}; results and heatmaps in {args.output_dir}/<category>/")


if __name__ == "__main__":
    run_main(main)
