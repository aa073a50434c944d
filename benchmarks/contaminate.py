"""Contaminated training sets, SoftPatch's "no overlap" protocol (issue 29): a seeded share of a category's defective
test images moved into train/good, their masks left out, on a copy of the data.

    python benchmarks/contaminate.py --data_path "/mnt/e/Big Data/MVTec AD" --category bottle --share 0.1 --out data/dirty10

The copy is OUT/<category> (MVTec AD's layout, or one's own folders in it); the moved images leave the test split,
so they are scored neither as training nor as test images twice. OUT/<category>.contamination.json lists what moved
where: benchmarks/contamination.py reads it to measure how many of them the training-set audit ranks first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset import VISA_CSV  # noqa: E402
from plumbing.cli import run_main  # noqa: E402
from plumbing.image_io import DataError, image_files  # noqa: E402


def contaminate(data_path: Path, category: str, share: float, seed: int, out: Path) -> dict:
    """Copy `category` to `out`/<category> with round(share x its defective test images) of them, drawn with `seed`, moved
    into train/good as contaminant_<defect>_<name> and their masks removed; returns (and writes beside the copy) what
    moved. The copy is built in a hidden folder and renamed into place: an error leaves nothing."""
    source, target = Path(data_path) / category, Path(out) / category
    if (Path(data_path) / VISA_CSV).is_file():
        raise DataError("contaminate.py copies MVTec AD's layout (train/good, test/<defect>, ground_truth/<defect>); VisA's "
                        "split_csv layout is not supported: write its images in that layout first")  # fmt: skip
    if not (source / "train" / "good").is_dir() or not (source / "test").is_dir():
        raise DataError(f"{source} has no train/good and test/ folders: point --data_path and --category at an MVTec AD category")
    if not 0 < share < 1:
        raise DataError(f"--share must be in (0, 1), a share of the defective test images; got {share}")
    if target.exists():
        raise DataError(f"{target} exists already: choose another --out, or remove it")
    folders = [d for d in sorted((source / "test").iterdir()) if d.is_dir() and d.name != "good"]
    defective = [p for d in folders for p in image_files(sorted(d.iterdir()), d)]
    n_moved = int(round(share * len(defective)))
    if not 1 <= n_moved < len(defective):
        raise DataError(f"--share {share} of {len(defective)} defective test images moves {n_moved}: choose a share that moves "
                        "at least one and leaves at least one")  # fmt: skip
    picked = sorted(np.random.default_rng(seed).choice(len(defective), n_moved, replace=False).tolist())
    Path(out).mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=f".{category}."))
    try:
        shutil.copytree(source, stage / category)
        moved = []
        for i in picked:
            image = defective[i]
            defect, name = image.parent.name, image.name
            destination = Path("train", "good", f"contaminant_{defect}_{name}")
            (stage / category / "test" / defect / name).rename(stage / category / destination)
            for mask in (stage / category / "ground_truth" / defect).glob(f"{image.stem}_mask.*"):
                mask.unlink()
            moved.append({"from": f"test/{defect}/{name}", "to": destination.as_posix()})
        record = {"source": str(source), "category": category, "share": share, "seed": seed,
                  "defective_test_images": len(defective), "moved": moved}  # fmt: skip
        (stage / category).rename(target)
        (Path(out) / f"{category}.contamination.json").write_text(json.dumps(record, indent=2) + "\n")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="the data set's folder (MVTec AD's layout)")
    parser.add_argument("--category", required=True, help="the category to copy")
    parser.add_argument("--share", type=float, default=0.1, help="share of its defective test images moved into train/good (default: 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    parser.add_argument("--out", required=True, help="folder the contaminated copy is written into, as OUT/<category>")
    args = parser.parse_args()
    record = contaminate(Path(args.data_path), args.category, args.share, args.seed, Path(args.out))
    listed = Path(args.out) / f"{args.category}.contamination.json"
    print(f"{args.category}: {len(record['moved'])} of {record['defective_test_images']} defective test images moved into "
          f"train/good of {Path(args.out) / args.category} (seed {args.seed}); the list: {listed}")  # fmt: skip


if __name__ == "__main__":
    run_main(main)
