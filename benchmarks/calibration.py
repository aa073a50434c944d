"""Thresholds set on good images only, measured on synthetic categories.

    python benchmarks/calibration.py --out benchmarks/calibration.json

For each seed, a synthetic category is trained with the default calibration (a seeded 20 %
of train/good held out; split-conformal thresholds for --target_fpr) and its test split is
scored. Reported per category and averaged:
  - false alarms (share of good test images called defective) and recall (share of defective
    ones caught) at the calibrated image threshold, against the labelled F1-optimal threshold;
  - the same for the bank the thresholds were computed on (the training images without the
    held-out ones: the saved bank's first picks), and for Alg. 1 over every image without the
    restricted first picks (what the saved bank would be without calibration, and was before
    issue 18);
  - image AUROC of each bank, the largest distance of a training patch to its nearest memory
    patch (the coverage Alg. 1 minimises) of the saved and the unrestricted bank, and the training
    time with and without calibration.
Random-init weights: the synthetic parts are easy, so the absolute numbers are optimistic; the
comparison between thresholds and between banks is what this measures.
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

from dataset import CategoryDataset  # noqa: E402
from patchcore import PatchCore  # noqa: E402
from reporting.metrics import auroc, f1_max, rates_at  # noqa: E402
from synthetic import make_synthetic_category  # noqa: E402


def loader(dataset, batch_size: int = 16):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def scores_of(model: PatchCore, dataset) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = [], []
    for images, batch_labels, *_ in loader(dataset):
        scores.append(model.predict(images)[0])
        labels.append(batch_labels.numpy())
    return np.concatenate(labels), np.concatenate(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="one synthetic category per seed (default: 0,1,2)")
    parser.add_argument("--n_train", type=int, default=60, help="training images per category (default: 60)")
    parser.add_argument("--n_test_good", type=int, default=60, help="good test images, on which false alarms are counted (default: 60)")
    parser.add_argument("--n_per_defect", type=int, default=10, help="test images per defect type (3 types; default: 10)")
    parser.add_argument("--size", type=int, default=128, help="image side and model input in px (default: 128)")
    parser.add_argument("--target_fpr", type=float, default=0.05, help="the calibration's target (default: 0.05)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="patchcore-calibration-"))
    settings = {"weights": "none", "device": "cpu", "resize": args.size, "image_size": args.size, "target_fpr": args.target_fpr}
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        make_synthetic_category(root, f"s{seed}", n_train=args.n_train, n_test_good=args.n_test_good, n_per_defect=args.n_per_defect,
                                size=args.size, seed=100 + seed)  # fmt: skip
        model = PatchCore(seed=seed, **settings)
        train = CategoryDataset(root, f"s{seed}", "train", model.config.preprocess())
        test = CategoryDataset(root, f"s{seed}", "test", model.config.preprocess())
        start = time.perf_counter()
        facts = model.fit(loader(train))
        seconds = time.perf_counter() - start
        calibration = model.calibration
        # the bank the thresholds were computed on: the training images without the held-out ones
        subset = PatchCore(seed=seed, calibration_holdout=0, **settings)
        kept = torch.utils.data.Subset(train, [i for i in range(len(train)) if i not in facts["held_out"]])
        subset.fit(loader(kept))
        plain = PatchCore(seed=seed, calibration_holdout=0, **settings)
        plain_start = time.perf_counter()
        plain.fit(loader(train))
        plain_seconds = time.perf_counter() - plain_start
        patches = torch.cat([model.aggregate_patches(model.extract_features(b[0])).flatten(0, 1) for b in loader(train)])
        radius = {name: float(m.nearest_neighbors(patches, k=1)[0].max()) for name, m in (("saved", model), ("unrestricted", plain))}
        rows.append({"seed": seed, "coverage_radius_saved": round(radius["saved"], 4),
                     "coverage_radius_unrestricted": round(radius["unrestricted"], 4)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        banks = (("every training image (saved)", model), ("without the held-out images", subset), ("Alg. 1 unrestricted", plain))
        for bank, scorer in banks:
            labels, scores = scores_of(scorer, test)
            _, f1_threshold, _ = f1_max(labels, scores)
            for threshold_name, threshold in (("calibrated", calibration.image_threshold), ("F1-optimal (labelled)", f1_threshold)):
                fpr, recall = rates_at(labels, scores, threshold)
                row = {"seed": seed, "bank": bank, "threshold": threshold_name, "false_alarms": round(fpr, 4), "recall": round(recall, 4),
                       "image_auroc": round(auroc(labels, scores)[0], 4), "expected_fpr": calibration.expected_fpr,
                       "n_held_out": calibration.n_held_out}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
        rows.append({"seed": seed, "fit_seconds_with_calibration": round(seconds, 1), "fit_seconds_without": round(plain_seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| bank | threshold | false alarms | recall | image AUROC |\n|---|---|---|---|---|")
    for bank in ("every training image (saved)", "without the held-out images", "Alg. 1 unrestricted"):
        for threshold in ("calibrated", "F1-optimal (labelled)"):
            chosen = [r for r in rows if r.get("bank") == bank and r.get("threshold") == threshold]
            mean = {k: np.mean([r[k] for r in chosen]) for k in ("false_alarms", "recall", "image_auroc")}
            print(f"| {bank} | {threshold} | {mean['false_alarms']:.1%} | {mean['recall']:.1%} | {mean['image_auroc']:.4f} |")
    radii = [r for r in rows if "coverage_radius_saved" in r]
    print(f"\ncoverage radius, mean: {np.mean([r['coverage_radius_saved'] for r in radii]):.4f} saved, "
          f"{np.mean([r['coverage_radius_unrestricted'] for r in radii]):.4f} unrestricted Alg. 1")  # fmt: skip
    times = [r for r in rows if "fit_seconds_with_calibration" in r]
    print(f"\nfit seconds, mean: {np.mean([t['fit_seconds_with_calibration'] for t in times]):.1f} with calibration, "
          f"{np.mean([t['fit_seconds_without'] for t in times]):.1f} without")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
