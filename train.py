"""Build a PatchCore memory bank per category and save it to OUTPUT_DIR/<category>/memory_bank.npz.

    python train.py --data_path "/mnt/e/Big Data/MVTec AD" --category bottle
    python train.py --data_path "/mnt/e/Big Data/MVTec AD" --category all --coreset_ratio 0.1
    python train.py --data_path DIR --category bottle --add "confirmed_good/*.png"

A seeded part of train/good is held out to set decision thresholds on good images only
(--calibration_holdout, --target_fpr); the bank itself holds every training image (under
--protocol official and its presets, exactly as Alg. 1 over all of them builds it).
On MVTec AD 2 (a scene with validation/ and test_public/) the thresholds come from validation/good
alone, as the benchmark requires, nothing is held out of train/good, and the whole image is used
(--crop none, its defects sit at the borders) unless --crop is given.
--add grows an existing bank with newly confirmed good images. Every training image is audited
against the others (train_audit.json, heatmaps of the most suspicious in train_audit/): defective
parts hidden in train/good rank first; --outlier_share keeps what the audit flags out of the bank.

Every memory-bank setting below is stored in the bank; evaluate.py rebuilds the model from it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dataset import CategoryDataset, ImageFiles, find_layout, resolve_categories, to_rgb
from ensemble import PatchCoreEnsemble, build_model, load_model
from method.audit import DESCRIPTION as AUDIT_TEXT
from method.audit import ranked
from method.thresholds import Calibration, calibrate_on_validation
from patchcore import PatchCore, PatchCoreConfig
from plumbing.bank import AUDIT_DIR, AUDIT_FILE, TRAIN_LOG, bank_path
from plumbing.cli import (
    ArgumentParser,
    add_config_args,
    add_data_args,
    add_runtime_args,
    check_runtime_args,
    config_from_args,
    given_config_args,
    make_loader,
    now,
    run_main,
)
from plumbing.files import staging, write_json
from plumbing.image_io import DataError, find_images, heatmap_panel
from plumbing.system import device_name


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_runtime_args(parser)
    parser.add_argument(
        "--feature_memory_gb",
        type=float,
        default=None,
        help="keep all full patch features in RAM up to this size, else run the images a second time (default: half the available RAM)",
    )
    parser.add_argument(
        "--add",
        default=None,
        metavar="DIR_OR_GLOB",
        help="grow the category's existing bank with these newly confirmed good images (a folder or a glob) instead of training",
    )
    parser.add_argument(
        "--audit_heatmaps",
        type=int,
        default=8,
        metavar="K",
        help="heatmaps of the K training images the audit finds least like the others, in OUTPUT_DIR/<category>/train_audit/ "
        "(every image's audit score goes to train_audit.json; default: 8)",
    )
    add_config_args(parser, PatchCoreConfig)
    args = parser.parse_args()
    check_runtime_args(parser, args, single="--add")
    if args.audit_heatmaps < 0:
        parser.error(f"--audit_heatmaps must be 0 or more, got {args.audit_heatmaps}")
    if args.feature_memory_gb is not None and args.feature_memory_gb < 0:
        parser.error(f"--feature_memory_gb must be 0 or more, got {args.feature_memory_gb}")
    return parser, args


def say_calibration(category: str, calibration: Calibration) -> None:
    if not calibration.calibrated:
        print(f"{category}: {calibration.reason}")
        return
    print(
        f"{category}: thresholds from {calibration.images()}, aiming at {calibration.target_fpr:.0%} "
        f"false alarms (expected {calibration.expected_fpr:.1%}): image {calibration.image_threshold:.4g}, "
        f"pixel {calibration.pixel_threshold:.4g}"
    )
    if calibration.mean_3std_pixel_threshold is not None:
        rule = calibration.mean_3std_pixel_threshold
        print(f"{category}: MVTec AD 2's own rule, mean + 3 std of the validation pixels: pixel {rule:.4g}")
    if calibration.note:
        print(f"{category}: thresholds {calibration.note}")


def write_audit(model: PatchCore | PatchCoreEnsemble, dataset: CategoryDataset, folder: Path, top: int) -> list[dict]:
    """train_audit.json: every training image's audit score and rank (method/audit.py), and heatmaps of the `top`
    most suspicious, each scored against the bank without the suspects' rows (an ensemble: its first network's),
    written atomically into `folder`. Returns the entries, most suspicious first."""
    member = model.members[0] if isinstance(model, PatchCoreEnsemble) else model
    scores, rank = model.audit_scores, ranked(model.audit_scores)
    order = [int(i) for i in np.argsort(rank)]
    suspects, heatmaps = order[:top], {}
    keep = ~torch.isin(member.bank_images, torch.tensor(suspects, dtype=torch.long))
    with staging(folder) as stage:
        if suspects and int(keep.sum()) >= max(model.config.num_nn, model.config.reweight_b, 1):
            images = torch.stack([dataset[i][0] for i in suspects])
            _, maps = member.scorer_for(member.memory_bank[keep])(images.to(member.device))
            maps, calibration = maps.cpu().numpy(), member.calibration
            low, high = calibration.heatmap_scale or (float(maps.min()), float(maps.max()))
            for i, image, anomaly_map in zip(suspects, images, maps):
                heatmaps[i] = f"{AUDIT_DIR}/{rank[i]:03d}_{Path(dataset.relative_path(i)).stem}.png"
                (stage / AUDIT_DIR).mkdir(exist_ok=True)
                heatmap_panel(to_rgb(image), anomaly_map, low, high, calibration.pixel_threshold).save(stage / heatmaps[i])
        entries = [{"image": dataset.relative_path(i), "score": float(scores[i]), "rank": int(rank[i]), "heatmap": heatmaps.get(i)}
                   for i in order]  # fmt: skip
        write_json(stage / AUDIT_FILE, {"what": AUDIT_TEXT, "outlier_share": model.config.outlier_share, "images": entries})
    return entries


def scene_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """MVTec AD 2's settings, into args before the config is built: thresholds from validation/good only (nothing held
    out of train/good), and the whole image (--crop none) unless --crop is given; breaking the benchmark's rule is a
    usage error."""
    if getattr(args, "calibration_holdout", 0) > 0:
        parser.error("--calibration_holdout: MVTec AD 2 sets thresholds on validation/good images only, never on train/good; drop it")
    if "," in getattr(args, "backbone", ""):
        parser.error("an ensemble on MVTec AD 2 is not supported yet (its thresholds come from validation/good): train one network")
    args.calibration_holdout, args.crop = 0.0, getattr(args, "crop", "none")


def train(args: argparse.Namespace, config: PatchCoreConfig) -> None:
    categories = resolve_categories(Path(args.data_path), args.category)
    datasets = {c: CategoryDataset(args.data_path, c, "train", config.preprocess()) for c in categories}  # checks every file first
    validation = {c: CategoryDataset(args.data_path, c, "validation", config.preprocess())
                  for c, d in datasets.items() if d.layout == "mvtec_ad2"}  # fmt: skip
    if config.shots:
        datasets = {c: d.few_shot(config.shots, config.seed) for c, d in datasets.items()}
    for category, dataset in datasets.items():  # one patch grid for all of them: the bank's rows are counted per image
        if len(dataset.input_sizes) > 1:
            sizes = ", ".join(f"{w}x{h}" for w, h in sorted(dataset.input_sizes)[:3])
            raise DataError(f"--tile_size: {category}'s training images take several sizes at --image_size {config.image_size} "
                            f"({sizes}): give them one size and aspect, or train each kind apart")  # fmt: skip
    model = build_model(config, device=args.device, tf32=args.tf32)
    if validation and isinstance(model, PatchCoreEnsemble):  # a preset can make one
        raise ValueError("an ensemble on MVTec AD 2 is not supported yet (its thresholds come from validation/good): train one network")
    run = f"preset {config.preset} ({config.protocol} protocol, seed {config.seed}); " if config.preset != "none" else ""
    print(f"{run}backbone {config.backbone} {list(config.layers)}, weights: {model.weights}, device: {model.device}")
    for category, dataset in datasets.items():
        start = time.perf_counter()
        if config.shots:
            chosen = ", ".join(s.image.name for s in dataset.samples)
            print(f"{category}: few-shot, {config.shots} training images drawn with seed {config.seed}: {chosen}")
        facts = model.fit(make_loader(dataset, args, model.device), args.feature_memory_gb)
        if category in validation:  # MVTec AD 2: the thresholds from validation/good, against the saved bank
            images = validation[category]
            sizes = [images.original_size(i) for i in range(len(images))]
            loader = make_loader(images, args, model.device)
            model.calibration = calibrate_on_validation(model.scorer, loader, sizes, config.target_fpr)
        fit_path = facts.pop("fit")  # a run fact: which path the free RAM allowed
        facts["held_out"] = [dataset.relative_path(i) for i in facts["held_out"]]
        if config.shots:
            facts["images"] = [dataset.relative_path(i) for i in range(len(dataset))]
        seconds = time.perf_counter() - start
        path = bank_path(args.output_dir, category)
        model.save(path, category=category, train=facts)  # nothing run-specific: same data, seed and libraries, same bytes
        run = {"seconds": round(seconds, 2), "device": str(model.device), "gpu": device_name(model.device), "fit": fit_path}
        write_json(path.parent / TRAIN_LOG, {**run, "fp32_precision": model.fp32_precision, "created": now()})
        say_calibration(category, model.calibration)
        entries = write_audit(model, dataset, path.parent, args.audit_heatmaps)
        shown = "; ".join(f"{e['image']} {e['score']:.4g}" for e in entries[: min(5, len(entries))])
        print(f"{category}: training images least like the others (audit, {path.parent / AUDIT_FILE}): {shown}")
        banks = model.memory_bank if isinstance(model, PatchCoreEnsemble) else [model.memory_bank]
        shapes = ", ".join(str(tuple(bank.shape)) for bank in banks)
        print(
            f"{category}: {facts['n_images']} images -> {facts['n_patches']} patches -> memory bank{'s' * (len(banks) > 1)} "
            f"{shapes} in {seconds:.1f}s, saved to {path}"
        )


def add(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--add: the category's bank grows; a memory-bank setting given here must be the bank's."""
    path = bank_path(args.output_dir, args.category)
    given = given_config_args(args, PatchCoreConfig)
    weights = given.pop("weights", None)  # --weights: where the bank's weights are now
    model = load_model(path, device=args.device, weights=weights, tf32=args.tf32)
    stored = model.config.to_dict()
    for name, value in given.items():
        value = list(value) if isinstance(value, tuple) else value
        if value != stored[name]:
            parser.error(f"--{name} {value} differs from the bank's {stored[name]} ({path}): drop it, or train a new bank")
    paths = find_images(args.add)
    start = time.perf_counter()
    facts = model.add(make_loader(ImageFiles(paths, model.config.preprocess()), args, model.device), args.feature_memory_gb)
    added = {"images": [str(p) for p in paths], "patches": facts["n_patches"], "picked": facts["added"]}
    model.save(path, category=args.category, train={**model.train_facts, "added": [*model.train_facts.get("added", []), added]})
    seconds = time.perf_counter() - start
    print(
        f"{args.category}: {len(paths)} good images added -> {facts['n_patches']} patches -> {facts['added']} picked; memory bank "
        f"{facts['previous_size']} -> {facts['memory_bank_size']} in {seconds:.1f}s, saved to {path}"
    )
    say_calibration(args.category, model.calibration)


def main() -> None:
    parser, args = parse_args()
    if args.add:
        add(parser, args)
    else:
        if find_layout(Path(args.data_path)) == "mvtec_ad2":
            scene_settings(parser, args)
        train(args, config_from_args(parser, args, PatchCoreConfig))


if __name__ == "__main__":
    run_main(main)
