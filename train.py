"""Build a PatchCore memory bank per category and save it to OUTPUT_DIR/<category>/memory_bank.npz.

    python train.py --data_path "/mnt/e/Big Data/MVTec AD" --category bottle
    python train.py --data_path "/mnt/e/Big Data/MVTec AD" --category all --coreset_ratio 0.1

Every memory-bank setting below is stored in the bank; evaluate.py rebuilds the model from it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bank import BANK_FILE, TRAIN_LOG
from cli import (
    ArgumentParser,
    add_config_args,
    add_data_args,
    add_runtime_args,
    check_runtime_args,
    config_from_args,
    make_loader,
    now,
    run_main,
)
from dataset import CategoryDataset, resolve_categories
from files import write_json
from patchcore import PatchCore, PatchCoreConfig


def parse_args() -> tuple[argparse.Namespace, PatchCoreConfig]:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_runtime_args(parser)
    parser.add_argument(
        "--feature_memory_gb",
        type=float,
        default=None,
        help="keep all full patch features in RAM up to this size, else run the images a second time (default: half the available RAM)",
    )
    add_config_args(parser, PatchCoreConfig)
    args = parser.parse_args()
    check_runtime_args(parser, args)
    if args.feature_memory_gb is not None and args.feature_memory_gb < 0:
        parser.error(f"--feature_memory_gb must be 0 or more, got {args.feature_memory_gb}")
    return args, config_from_args(parser, args, PatchCoreConfig)


def main() -> None:
    args, config = parse_args()
    categories = resolve_categories(Path(args.data_path), args.category)
    datasets = {c: CategoryDataset(args.data_path, c, "train", config.preprocess()) for c in categories}  # checks every file first
    if config.shots:
        datasets = {c: d.few_shot(config.shots, config.seed) for c, d in datasets.items()}
    model = PatchCore(config, device=args.device)
    print(f"backbone {config.backbone} {list(config.layers)}, weights: {model.weights}, device: {model.device}")
    for category, dataset in datasets.items():
        start = time.perf_counter()
        if config.shots:
            chosen = ", ".join(s.image.name for s in dataset.samples)
            print(f"{category}: few-shot, {config.shots} training images drawn with seed {config.seed}: {chosen}")
        facts = model.fit(make_loader(dataset, args, model.device), args.feature_memory_gb)
        if config.shots:
            facts["images"] = [dataset.relative_path(i) for i in range(len(dataset))]
        seconds = time.perf_counter() - start
        path = Path(args.output_dir) / category / BANK_FILE
        model.save(path, category=category, train=facts)  # nothing run-specific: same data and seed, same bytes
        write_json(path.parent / TRAIN_LOG, {"seconds": round(seconds, 2), "device": str(model.device), "created": now()})
        print(
            f"{category}: {facts['n_images']} images -> {facts['n_patches']} patches -> memory bank "
            f"{tuple(model.memory_bank.shape)} in {seconds:.1f}s, saved to {path}"
        )


if __name__ == "__main__":
    run_main(main)
