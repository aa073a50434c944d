"""What a person looks at: heatmap panels with a colour bar, ROC and histogram plots, the
summary table of all categories, and the published numbers it is compared with.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from scipy import ndimage
from sklearn.metrics import roc_curve

from dataset import IMAGENET_MEAN, IMAGENET_STD
from files import atomic_write, write_bytes, write_text

# Published full-shot numbers the summary compares with: {category: (image AUROC, pixel AUROC)}, and their sources.
MVTEC_PAPER = {
    "bottle": (1.000, 0.986),
    "cable": (0.995, 0.984),
    "capsule": (0.981, 0.988),
    "hazelnut": (1.000, 0.987),
    "metal_nut": (1.000, 0.984),
    "pill": (0.966, 0.974),
    "screw": (0.981, 0.994),
    "toothbrush": (1.000, 0.987),
    "transistor": (1.000, 0.963),
    "zipper": (0.994, 0.988),
    "carpet": (0.987, 0.990),
    "grid": (0.982, 0.987),
    "leather": (1.000, 0.993),
    "tile": (0.987, 0.956),
    "wood": (0.992, 0.950),
}
MVTEC_OFFICIAL = {
    "bottle": (1.0000, 0.9848),
    "cable": (0.9968, 0.9841),
    "capsule": (0.9793, 0.9895),
    "hazelnut": (1.0000, 0.9868),
    "metal_nut": (0.9990, 0.9834),
    "pill": (0.9667, 0.9780),
    "screw": (0.9877, 0.9952),
    "toothbrush": (1.0000, 0.9857),
    "transistor": (0.9987, 0.9610),
    "zipper": (0.9950, 0.9887),
    "carpet": (0.9860, 0.9905),
    "grid": (0.9791, 0.9880),
    "leather": (1.0000, 0.9929),
    "tile": (0.9949, 0.9571),
    "wood": (0.9912, 0.9508),
}
VISA_IM_IAD = {
    "candle": (0.986, 0.995), "capsules": (0.816, 0.995), "cashew": (0.973, 0.989), "chewinggum": (0.991, 0.991),
    "fryum": (0.962, 0.938), "macaroni1": (0.975, 0.998), "macaroni2": (0.781, 0.991), "pcb1": (0.985, 0.999),
    "pcb2": (0.973, 0.990), "pcb3": (0.979, 0.992), "pcb4": (0.996, 0.986), "pipe_fryum": (0.998, 0.991),
}  # fmt: skip
SOURCES = {
    "mvtec paper": "MVTec AD: the paper's table as the design document lists it (Roth et al., CVPR 2022; 25 % coreset)",
    "mvtec official": "MVTec AD: the released code's IM224 WR50 baseline, amazon-science/patchcore-inspection @ fcaa92f, "
    "models/IM224_WR50_L2-3_P01_D1024-1024_PS-3_AN-1/results.csv (instance_auroc, full_pixel_auroc; 10 % coreset)",
    "visa": "VisA: the IM-IAD benchmark (M-3LAB/IM-IAD README @ be00a93, 'vanilla setting on VisA'): the released code "
    "at resize 256 and crop 256, for both protocols (no published paper-protocol numbers per object; see docs/architecture.md)",
}


def published(protocol: str, category: str) -> tuple[float | None, float | None, str | None]:
    """(image AUROC, pixel AUROC, source key) published for a category under a protocol; Nones where there is none."""
    if category in VISA_IM_IAD:
        return (*VISA_IM_IAD[category], "visa")
    table = MVTEC_OFFICIAL if protocol == "official" else MVTEC_PAPER
    return (*table[category], f"mvtec {protocol}") if category in table else (None, None, None)


# ---------------------------------------------------------------------- heatmaps
def to_rgb(image: torch.Tensor) -> np.ndarray:
    """A normalised [3, H, W] tensor back to [H, W, 3] floats in 0..255."""
    return np.clip((image.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255, 0, 255)


def colour_bar(height: int, vmin: float, vmax: float, threshold: float | None) -> np.ndarray:
    """A vertical jet colour bar with the score range, and the pixel threshold marked."""
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


def save_heatmap(path: Path, panel: Image.Image) -> None:
    """One heatmap PNG (inside a staging folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    panel.save(path)


# ---------------------------------------------------------------------- plots
def _save_figure(path: Path, figure) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())


def plot_roc(path: Path, labels: np.ndarray, scores: np.ndarray, auroc: float | None, category: str) -> None:
    figure = Figure(figsize=(4.5, 4.5))
    ax = figure.subplots()
    if auroc is not None:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"PatchCore (AUROC {100 * auroc:.1f}%)")
    ax.plot([0, 1], [0, 1], "k:", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{category}: image-level ROC")
    ax.legend(loc="lower right")
    _save_figure(path, figure)


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
    _save_figure(path, figure)


# ---------------------------------------------------------------------- summary
def summary_rows(results: list[dict]) -> list[dict]:
    """One row per category and a mean row: ours, the published number for the run's protocol, and
    the difference, in percent. A category without a published number gets None there; when only some
    have one, the mean row leaves published and diff empty and a second mean row compares those alone."""

    def pct(value):
        return None if value is None else round(100 * value, 2)

    rows = []
    for m in results:
        image, pixel, _ = published(m["protocol"], m["category"])
        at = m.get("at_calibrated_thresholds") or {}
        rows.append({
            "category": m["category"], "protocol": m["protocol"], "shots": m["shots"] or "all", "image_auroc": pct(m["image_auroc"]),
            "published_image_auroc": pct(image), "pixel_auroc": pct(m["pixel_auroc"]), "published_pixel_auroc": pct(pixel),
            "aupro": pct(m["aupro"]), "image_fpr": pct(at.get("image_fpr")), "image_recall": pct(at.get("image_recall")),
        })  # fmt: skip
    def mean_row(name: str, members: list[dict], compare: bool) -> dict:
        row = {"category": name, "protocol": "/".join(sorted({r["protocol"] for r in members})),
               "shots": "/".join(sorted({str(r["shots"]) for r in members}))}  # fmt: skip
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_fpr", "image_recall"):
            values = [r[key] for r in members if r[key] is not None]
            row[key] = round(float(np.mean(values)), 2) if values else None
        for level in ("image", "pixel"):  # published and diff: over the same categories as ours, or not at all
            both = [r for r in members if r[f"{level}_auroc"] is not None and r[f"published_{level}_auroc"] is not None]
            with_ours = [r for r in members if r[f"{level}_auroc"] is not None]
            if compare and both and len(both) == len(with_ours):
                row[f"published_{level}_auroc"] = round(float(np.mean([r[f"published_{level}_auroc"] for r in both])), 2)
            else:
                row[f"published_{level}_auroc"] = None
        return row

    compared = [r for r in rows if r["published_image_auroc"] is not None]
    means = [mean_row("mean", rows, compare=len(compared) == len(rows))]
    if compared and len(compared) < len(rows):  # the published means cover fewer categories: compare over those alone
        means.append(mean_row(f"mean of the {len(compared)} published", compared, compare=True))
    rows += means
    for row in rows:
        for level in ("image", "pixel"):
            ours, theirs = row[f"{level}_auroc"], row[f"published_{level}_auroc"]
            row[f"{level}_diff"] = None if ours is None or theirs is None else round(ours - theirs, 2)
    return rows


COLUMNS = {  # summary column: title
    "category": "category", "shots": "shots", "image_auroc": "image AUROC", "published_image_auroc": "published", "image_diff": "diff",
    "pixel_auroc": "pixel AUROC", "published_pixel_auroc": "published", "pixel_diff": "diff", "aupro": "AUPRO@0.3",
    "image_fpr": "false alarms", "image_recall": "recall",
}  # fmt: skip


def write_summary(output_dir: Path, results: list[dict]) -> str:
    """summary.md and summary.csv for all categories of a run; returns summary.md's text (protocol, sources, table)."""
    rows = summary_rows(results)

    def cell(column, value):
        if value is None or isinstance(value, str) or column == "shots":
            return "n/a" if value is None else str(value)
        return f"{value:+.2f}" if column.endswith("_diff") else f"{value:.2f}"

    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        text = [cell(c, row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(f"**{t}**" if row["category"].startswith("mean") else t for t in text) + " |")
    table = "\n".join(lines)
    protocols = sorted({m["protocol"] for m in results})
    keys = sorted({key for m in results if (key := published(m["protocol"], m["category"])[2])})
    sources = "\n".join(f"- published, full-shot: {SOURCES[key]}" for key in keys) or "- no published numbers for these categories"
    weights = ", ".join(sorted({m["weights"] for m in results}))
    markdown = (
        f"# PatchCore on {len(results)} categor{'y' if len(results) == 1 else 'ies'} (percent)\n\n"
        f"protocol: {', '.join(protocols)}; weights: {weights}\n\n{sources}\n"
        "- false alarms, recall: on the test split's good and defective images, at the image threshold calibrated on "
        "held-out good training images (n/a without one)\n\n"
        f"{table}\n"
    )
    write_text(output_dir / "summary.md", markdown)

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=["protocol", *COLUMNS], lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: ("" if row[c] is None else row[c]) for c in ["protocol", *COLUMNS]} for row in rows)

    atomic_write(output_dir / "summary.csv", write_csv, mode="w")
    return markdown
