"""Build a PatchCore memory bank per category and save it to OUTPUT_DIR/<category>/memory_bank.npz.

python train.py --data_path "/mnt/e/Big Data/MVTec AD" --category bottle --coreset_ratio 0.25
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import (
    BANK_FILE,
    TRAIN_LOG,
    ArgumentParser,
    add_common_args,
    check_common_args,
    environment,
    now,
    run_main,
    save_memory_bank,
    write_json,
)
from dataset import MVTecDataset, Preprocess, resolve_categories
from patchcore import PatchCore


def parse_args():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--coreset_ratio", type=float, default=0.25, help="fraction of training patches kept (default: 0.25)")
    parser.add_argument(
        "--coreset_proj_dim", type=int, default=128, help="random projection dims for coreset selection, 0 = none (default: 128)"
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (default), auto (imagenet, else random init), none (random init, tests only) or PATH to a state_dict",
    )
    parser.add_argument("--backbone", default="wide_resnet50_2", help="torchvision model (default: wide_resnet50_2)")
    parser.add_argument("--layers", default="layer2,layer3", help="backbone layers to take patch features from (default: layer2,layer3)")
    parser.add_argument(
        "--feature_memory_gb",
        type=float,
        default=8.0,
        help="keep all full patch features in RAM up to this size, else run the images a second time (default: 8)",
    )
    parser.add_argument("--resize", type=int, default=256, help="shorter image side before the crop (default: 256)")
    parser.add_argument("--image_size", type=int, default=224, help="center-crop size (default: 224)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the coreset's projection and start point, and of random-init weights (default: 0)"
    )
    args = parser.parse_args()
    check_common_args(parser, args)
    if not 0 < args.coreset_ratio <= 1:
        parser.error(f"--coreset_ratio must be in (0, 1], got {args.coreset_ratio}")
    if args.coreset_proj_dim < 0:
        parser.error(f"--coreset_proj_dim must be 0 (no projection) or more, got {args.coreset_proj_dim}")
    if args.feature_memory_gb < 0:
        parser.error(f"--feature_memory_gb must be 0 or more, got {args.feature_memory_gb}")
    if not 0 < args.image_size <= args.resize:
        parser.error(f"--image_size must be positive and at most --resize ({args.resize}), got {args.image_size}")
    return args


def main() -> None:
    args = parse_args()
    categories = resolve_categories(Path(args.data_path), args.category)
    preprocess = Preprocess(args.resize, args.image_size)
    datasets = {c: MVTecDataset(args.data_path, c, "train", preprocess) for c in categories}  # checks every file first
    model = PatchCore(
        backbone=args.backbone,
        layers=tuple(args.layers.split(",")),
        device=args.device,
        coreset_ratio=args.coreset_ratio,
        coreset_proj_dim=args.coreset_proj_dim,
        weights=args.weights,
        seed=args.seed,
        feature_memory_gb=args.feature_memory_gb,
        amp=args.amp,
    )
    print(f"backbone {args.backbone} {model.layers}, weights: {model.weights}, device: {model.device}")
    for category, dataset in datasets.items():
        start = time.perf_counter()
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
            pin_memory=model.device.type == "cuda",
        )  # fmt: skip
        model.fit(loader)
        seconds = time.perf_counter() - start
        header = {  # nothing run-specific here: the same data and seed give a byte-identical file
            "category": category,
            "config": {**model.config(), "resize": args.resize, "image_size": args.image_size},
            "train": {"n_images": len(dataset), "n_patches": model.n_train_patches, "memory_bank_size": int(model.memory_bank.shape[0])},
            "environment": environment(),
        }
        path = Path(args.output_dir) / category / BANK_FILE
        save_memory_bank(path, model.memory_bank.cpu().numpy(), header)
        write_json(path.parent / TRAIN_LOG, {"seconds": round(seconds, 2), "device": str(model.device), "created": now()})
        print(
            f"{category}: {len(dataset)} images -> {model.n_train_patches} patches -> memory bank "
            f"{tuple(model.memory_bank.shape)} in {seconds:.1f}s, saved to {path}"
        )


if __name__ == "__main__":
    run_main(main)
