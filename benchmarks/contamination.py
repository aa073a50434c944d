"""Training sets with hidden defects (issue 29): the audit's recall and the robust bank, at 0, 10 and 20 % contamination.

    python benchmarks/contamination.py --out /tmp/contamination.json

For each category, contaminate.py moves 10 % and 20 % of its defective test images into train/good (SoftPatch's
"no overlap": they leave the test split; seed 0); each version (and the clean one) is trained with --outlier_share 0
(the paper's bank) and with each --outlier_share asked for, and its test split is scored. Reported per category:
  - the audit's recall: the share of the moved images ranked among the top 2 x their count (train_audit.json's rank);
  - image and pixel AUROC of every bank, and the loss of the robust one on the clean data;
  - the audit's cost at bottle's size (its leave-one-image-out distances over a 40,964-row bank of 209 images).
Categories: with --data_path, MVTec AD categories (ImageNet weights by default); without, synthetic ones (three seeds of
synthetic.py at 256 px, 30 training images, 10 defective test images per defect type, random-init weights: easy parts,
so the absolute numbers are optimistic; the comparison between banks is what this measures).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from contaminate import contaminate  # noqa: E402

from dataset import CategoryDataset  # noqa: E402
from method.audit import leave_image_out, ranked  # noqa: E402
from patchcore import PatchCore, PatchCoreConfig  # noqa: E402
from plumbing.system import cpu_kind  # noqa: E402
from reporting.metrics import auroc  # noqa: E402
from synthetic import make_synthetic_category  # noqa: E402


def run(root: Path, category: str, config: PatchCoreConfig, batch_size: int) -> dict:
    """Train on root/category's train/good, score its test split: AUROCs and the audit's recall at 2x the contaminants."""
    model = PatchCore(config, device="cpu")
    train = CategoryDataset(root, category, "train", config.preprocess())
    start = time.perf_counter()
    model.fit(torch.utils.data.DataLoader(train, batch_size=batch_size))
    seconds = time.perf_counter() - start
    rank = ranked(model.audit_scores)
    dirty = [i for i in range(len(train)) if Path(train.relative_path(i)).name.startswith("contaminant_")]
    recall = float(np.mean([rank[i] <= 2 * len(dirty) for i in dirty])) if dirty else None
    test = CategoryDataset(root, category, "test", config.preprocess())
    labels, scores, masks, maps = [], [], [], []
    for images, label, mask, _, _ in torch.utils.data.DataLoader(test, batch_size=batch_size):
        batch_scores, batch_maps = model.predict(images)
        labels.append(label.numpy())
        scores.append(batch_scores)
        masks.append(mask[:, 0].numpy() > 0.5)
        maps.append(batch_maps)
    image, _ = auroc(np.concatenate(labels), np.concatenate(scores))
    pixel, _ = auroc(np.concatenate(masks).ravel(), np.concatenate(maps).ravel(), "pixel")
    return {"image_auroc": image, "pixel_auroc": pixel, "audit_recall_at_2x": recall, "contaminants": len(dirty),
            "train_images": len(train), "bank_rows": len(model.memory_bank), "fit_seconds": round(seconds, 2)}  # fmt: skip


def audit_cost(repeats: int = 3) -> dict:
    """Seconds of the audit's leave-one-image-out distances at bottle's size: a 25 % bank of 40,964 rows from 209
    images, in the coreset's 128-d projection (the fastest of `repeats`)."""
    rows, images = torch.randn(40964, 128, generator=torch.Generator().manual_seed(0)), torch.arange(40964) % 209
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        leave_image_out(rows, images)
        times.append(time.perf_counter() - start)
    return {"rows": 40964, "dims": 128, "images": 209, "seconds": round(min(times), 2), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default=None, help="MVTec AD's folder; default: synthetic categories")
    parser.add_argument("--categories", default="bottle,screw,carpet", help="with --data_path: comma list (default: bottle,screw,carpet)")
    parser.add_argument("--weights", default=None, help="backbone weights (default: imagenet with --data_path, else none)")
    parser.add_argument("--shares", default="0,0.1,0.2", help="contamination shares (default: 0,0.1,0.2)")
    parser.add_argument("--outlier_shares", default="0.01,0.02", help="robust banks to compare with the paper's (default: 0.01,0.02)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--resize", type=int, default=256, help="shorter side before the crop (default: 256, the paper's)")
    parser.add_argument("--image_size", type=int, default=224, help="the crop (default: 224, the paper's)")
    parser.add_argument("--out", default=None, help="write the results as JSON here too")
    args = parser.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    robust = [float(s) for s in args.outlier_shares.split(",")]
    weights = args.weights or ("imagenet" if args.data_path else "none")
    results = {"cpu": cpu_kind(), "weights": weights, "audit_cost": audit_cost(), "runs": []}
    print(f"audit at bottle's size: {results['audit_cost']['seconds']} s ({results['cpu']})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_path:
            source, categories = Path(args.data_path), args.categories.split(",")
        else:
            source, categories = Path(tmp) / "clean", [f"synthetic{seed}" for seed in range(3)]
            for seed, category in enumerate(categories):
                make_synthetic_category(source, category, n_train=30, n_per_defect=10, seed=seed)
        for category in categories:
            for share in shares:
                root = source if share == 0 else Path(tmp) / f"dirty{share:g}"
                if share:
                    contaminate(source, category, share, 0, root)
                for outlier in [0.0, *robust]:
                    config = PatchCoreConfig(weights=weights, outlier_share=outlier, resize=args.resize, image_size=args.image_size)
                    row = {"category": category, "contamination": share, "outlier_share": outlier}
                    row.update(run(root, category, config, args.batch_size))
                    results["runs"].append(row)
                    recall = "" if row["audit_recall_at_2x"] is None else f", audit recall@2x {row['audit_recall_at_2x']:.2f}"
                    print(f"{category} contamination {share:g} outlier_share {outlier:g}: image AUROC {row['image_auroc']:.4f}, "
                          f"pixel AUROC {row['pixel_auroc']:.4f}{recall} ({row['contaminants']} of {row['train_images']})",
                          flush=True)  # fmt: skip
    columns = " | ".join(f"image / pixel AUROC, outlier_share {s:g}" for s in [0.0, *robust])
    print(f"\n| category | contamination | audit recall@2x | {columns} |")
    print("|---|---|---|" + "---|" * (1 + len(robust)))
    for category in dict.fromkeys(r["category"] for r in results["runs"]):
        for share in shares:
            rows = [r for r in results["runs"] if r["category"] == category and r["contamination"] == share]
            recall = rows[0]["audit_recall_at_2x"]
            cells = " | ".join(f"{100 * r['image_auroc']:.2f} / {100 * r['pixel_auroc']:.2f}" for r in rows)
            print(f"| {category} | {share:.0%} | {'n/a' if recall is None else f'{recall:.2f}'} | {cells} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
