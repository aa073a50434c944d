"""What a person looks at: the ground truth's outline on heatmap panels (image_io.heatmap_panel draws them), ROC and
histogram plots, and the summary table of all categories beside the published numbers (published.py).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_curve

from plumbing.files import atomic_write, write_bytes, write_text
from reporting.published import MVTEC_AD2_PAPER, MVTEC_AD2_SOURCE, published, source_text


# ---------------------------------------------------------------------- heatmaps
def mask_outline(mask: np.ndarray | None) -> np.ndarray | None:
    """The ground truth's edge, bool [H, W], 2 px wide inside the defect (image_io.heatmap_panel draws it white); None
    without a defect."""
    if mask is None or not mask.any():
        return None
    region = mask > 0.5
    return region & ~ndimage.binary_erosion(region, iterations=2)


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
# (ours, published) pairs of the summary, in percent; the defective-image pair only where a released-code run is compared
COMPARED = ("image_auroc", "pixel_auroc", "pixel_auroc_defective", "aupro_defective")


def summary_rows(results: list[dict]) -> list[dict]:
    """One row per category and a mean row: ours, the published number for the run (published.py), and
    the difference, in percent. A category without a published number gets None there; when only some
    have one, the mean row leaves published and diff empty and a second mean row compares those alone."""

    def pct(value):
        return None if value is None else round(100 * value, 2)

    rows = []
    for m in results:
        theirs = published(m["protocol"], m["category"], m.get("preset", "none")) or {}
        at = m.get("at_calibrated_thresholds") or {}
        row = {"category": m["category"], "protocol": m["protocol"], "shots": m["shots"] or "all", "aupro": pct(m["aupro"]),
               "image_fpr": pct(at.get("image_fpr")), "image_recall": pct(at.get("image_recall"))}  # fmt: skip
        for key in COMPARED:
            row[key], row[f"published_{key}"] = pct(m.get(key)), pct(theirs.get(key))
        rows.append(row)

    def mean_row(name: str, members: list[dict], compare: bool) -> dict:
        row = {"category": name, "protocol": "/".join(sorted({r["protocol"] for r in members})),
               "shots": "/".join(sorted({str(r["shots"]) for r in members}))}  # fmt: skip
        for key in ("aupro", "image_fpr", "image_recall", *COMPARED):
            values = [r[key] for r in members if r[key] is not None]
            row[key] = round(float(np.mean(values)), 2) if values else None
        for key in COMPARED:  # published and diff: over the same categories as ours, or not at all
            both = [r for r in members if r[key] is not None and r[f"published_{key}"] is not None]
            with_ours = [r for r in members if r[key] is not None]
            if compare and both and len(both) == len(with_ours):
                row[f"published_{key}"] = round(float(np.mean([r[f"published_{key}"] for r in both])), 2)
            else:
                row[f"published_{key}"] = None
        return row

    compared = [r for r in rows if r["published_image_auroc"] is not None]
    means = [mean_row("mean", rows, compare=len(compared) == len(rows))]
    if compared and len(compared) < len(rows):  # the published means cover fewer categories: compare over those alone
        means.append(mean_row(f"mean of the {len(compared)} published", compared, compare=True))
    rows += means
    for row in rows:
        for key in COMPARED:
            ours, theirs = row[key], row[f"published_{key}"]
            row[f"{key}_diff"] = None if ours is None or theirs is None else round(ours - theirs, 2)
    return rows


def summary_columns(rows: list[dict]) -> dict[str, str]:
    """The summary's columns: title; the defective-image ones only where some row has a published number for them."""
    columns = {"category": "category", "shots": "shots"}
    titles = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pixel_auroc_defective": "pixel AUROC, defective images",
              "aupro_defective": "AUPRO@0.3, defective images"}  # fmt: skip
    for key in COMPARED:
        if key in ("image_auroc", "pixel_auroc") or any(r[f"published_{key}"] is not None for r in rows):
            columns.update({key: titles[key], f"published_{key}": "published", f"{key}_diff": "diff"})
        if key == "pixel_auroc":
            columns["aupro"] = "AUPRO@0.3"
    return {**columns, "image_fpr": "false alarms", "image_recall": "recall"}


def ad2_section(results: list[dict]) -> str:
    """summary.md's MVTec AD 2 table, for the scenes evaluated on its layout, with the paper's PatchCore row beside it;
    empty without any."""
    scenes = [m for m in results if "mvtec_ad2" in m]
    if not scenes:
        return ""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    lines = ["| scene | AU-PRO@0.05 | AU-PRO@0.3 | SegF1 | SegF1 (mean + 3 std) | image F1 |", "|---|---|---|---|---|---|"]
    for m in scenes:
        ad2 = m["mvtec_ad2"]
        values = [ad2.get(key) for key in ("au_pro_0.05", "au_pro_0.3", "seg_f1", "seg_f1_mean_3std", "image_f1")]
        lines.append(f"| {m['category']} (test_public) | " + " | ".join(pct(v) for v in values) + " |")
    for split, paper in MVTEC_AD2_PAPER.items():
        lines.append(f"| *paper's PatchCore, mean of 8 scenes ({split})* | {paper['au_pro_0.05']:.1f} | n/a | {paper['seg_f1']:.1f} "
                     "| n/a | n/a |")  # fmt: skip
    return (
        "\n## MVTec AD 2 (percent)\n\n"
        f"- published: {MVTEC_AD2_SOURCE}; those splits have no public labels, so ours are on test_public, which is not "
        "the same images: a guide, not a comparison\n"
        "- thresholds from validation/good only: SegF1 (every test pixel pooled) and image F1 at the calibrated thresholds; "
        "SegF1 (mean + 3 std) at the benchmark's own rule; AU-PRO at each image's own resolution\n\n"
        + "\n".join(lines) + "\n"
    )


def write_summary(output_dir: Path, results: list[dict]) -> str:
    """summary.md and summary.csv for all categories of a run; returns summary.md's text (protocol, sources, table)."""
    rows = summary_rows(results)
    columns = summary_columns(rows)

    def cell(column, value):
        if value is None or isinstance(value, str) or column == "shots":
            return "n/a" if value is None else str(value)
        return f"{value:+.2f}" if column.endswith("_diff") else f"{value:.2f}"

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        text = [cell(c, row[c]) for c in columns]
        lines.append("| " + " | ".join(f"**{t}**" if row["category"].startswith("mean") else t for t in text) + " |")
    table = "\n".join(lines)
    protocols = sorted({m["protocol"] for m in results})
    presets = sorted({m.get("preset", "none") for m in results} - {"none"})
    keys = sorted({theirs["source"] for m in results if (theirs := published(m["protocol"], m["category"], m.get("preset", "none")))})
    sources = "\n".join(f"- published, full-shot: {source_text(key)}" for key in keys) or "- no published numbers for these categories"
    weights = ", ".join(sorted({m["weights"] for m in results}))
    run = f"; preset: {', '.join(presets)}" if presets else ""
    markdown = (
        f"# PatchCore on {len(results)} categor{'y' if len(results) == 1 else 'ies'} (percent)\n\n"
        f"protocol: {', '.join(protocols)}{run}; weights: {weights}\n\n{sources}\n"
        "- false alarms, recall: on the test split's good and defective images, at the image threshold calibrated on "
        "held-out good training images (n/a without one)\n\n"
        f"{table}\n"
    )
    markdown += ad2_section(results)
    write_text(output_dir / "summary.md", markdown)

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=["protocol", *columns], lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: ("" if row[c] is None else row[c]) for c in ["protocol", *columns]} for row in rows)

    atomic_write(output_dir / "summary.csv", write_csv, mode="w")
    return markdown
