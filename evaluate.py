"""Score test images against a saved memory bank; write scores, metrics, heatmaps and a summary.

    python evaluate.py --data_path "/mnt/e/Big Data/MVTec AD" --category bottle
    python evaluate.py --data_path "/mnt/e/Big Data/MVTec AD" --category all
    python evaluate.py --data_path DIR --category bottle --images "new_parts/*.png"

Reads OUTPUT_DIR/<category>/memory_bank.npz (made by train.py) and rebuilds the model from the
config stored in it. Per category it writes scores.json, metrics.json, anomaly_maps/ (one PNG
per image), thumbnails/ (small JPEGs of them), anomaly_maps.npz (raw maps), roc.png and
score_hist.png; then OUTPUT_DIR/summary.md, summary.csv and report.html (the review page,
report_page.py) for all categories evaluated. With --images it scores unlabelled images into
OUTPUT_DIR/<category>/inference/ (report.html included), holding only one batch in memory at a time.
On MVTec AD 2 it scores test_public with labels, at each image's own resolution (the benchmark's metrics
AU-PRO@0.05 and @0.3, SegF1 and image F1 at the thresholds from validation/good join metrics.json), and writes
what its evaluation server takes for the private splits: OUTPUT_DIR/anomaly_images/<scene>/<split>/<name>.tiff
(float16 maps at the image's own size) and OUTPUT_DIR/anomaly_images_thresholded/<scene>/<split>/<name>.png
(0/255 at --ad2_threshold). Nothing is uploaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataset import PRIVATE_SPLITS, CategoryDataset, ImageFiles, resolve_categories, to_rgb
from ensemble import PatchCoreEnsemble, load_model, normalise_over_test_set
from method.search import SEARCHES
from patchcore import PatchCore, PatchCoreConfig
from plumbing.bank import AUDIT_FILE, TRAIN_LOG, bank_path, environment, require_banks
from plumbing.cli import ArgumentParser, add_data_args, add_runtime_args, check_runtime_args, make_loader, now, refuse_config_args, run_main
from plumbing.files import NpzWriter, staging, write_json
from plumbing.image_io import find_images, heatmap_names, heatmap_panel, load_rgb, resize_map
from plumbing.system import device_name, warn_once
from reporting.metrics import ad2_metrics, compute_metrics
from reporting.pixel_curves import PixelCurves
from reporting.report import mask_outline, plot_histogram, plot_roc, save_heatmap, write_summary
from reporting.report_page import save_thumbnail, thumbnail_name, write_images_page, write_report_page


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_runtime_args(parser)
    parser.add_argument(
        "--weights",
        default=None,
        help="where the training weights are now, if moved (default: as stored in the bank); must be the same weights",
    )
    parser.add_argument(
        "--search",
        default="exact",
        choices=SEARCHES,
        help="nearest-neighbour search: exact (default: the nearest memory patches by exact distance, certified by lower "
        "bounds, on any CPU or GPU); faiss (IndexFlatL2: its fp32 distance expansion, not re-ranked, whose rounding depends "
        "on the batch and the threads)",
    )
    parser.add_argument(
        "--pixel_metrics_at",
        default="model",
        choices=["model", "original"],
        help="pixel metrics at the model's input resolution (default), or at each image's own, as MVTec AD's evaluation does "
        "(banks trained with --crop none; counted as they come, in memory that does not grow with the images); always the "
        "image's own on MVTec AD 2 and for banks trained with --tile_size",
    )
    parser.add_argument(
        "--ad2_threshold",
        default="calibrated",
        choices=["calibrated", "mean_3std"],
        help="MVTec AD 2's private splits: the pixel threshold of the 0/255 maps, both set on validation/good: calibrated "
        "(default: a good part shows a region at most --target_fpr of the time) or mean_3std (the benchmark's rule)",
    )
    parser.add_argument("--images", default=None, help="score these unlabelled images instead of the test split: a folder or a glob")
    parser.add_argument(
        "--threshold",
        default=None,
        metavar="VALUE|f1",
        help="with --images: the image score at or above which a part is defective, or 'f1' for the labelled F1-optimal "
        "thresholds in the category's metrics.json (default: the thresholds calibrated on good images at training)",
    )
    refuse_config_args(parser, PatchCoreConfig, allowed=("weights",))
    args = parser.parse_args()
    check_runtime_args(parser, args, single="--images")
    if args.threshold is not None and not args.images:
        parser.error("--threshold applies to --images only; on the test split the F1-optimal threshold is reported")
    if args.threshold not in (None, "f1"):
        try:
            args.threshold = float(args.threshold)
        except ValueError:
            parser.error(f"--threshold takes a number or f1, got {args.threshold!r}")
    return args


def load(args: argparse.Namespace, category: str) -> PatchCore | PatchCoreEnsemble:
    path = bank_path(args.output_dir, category)
    return load_model(path, device=args.device, weights=args.weights, search=args.search, tf32=args.tf32)


def image_score_text(model: PatchCore | PatchCoreEnsemble, transductive: bool) -> str:
    """How an image's score is made, for metrics.json."""
    config = model.config
    text = f"Eq. 7 reweighting, b={config.reweight_b}" if config.reweight_b else "max patch score"
    if config.num_nn > 1:
        text += f"; a patch's score: the mean distance to its {config.num_nn} nearest memory patches"
    if isinstance(model, PatchCoreEnsemble):
        how = ("each member's scores and maps min-max normalised over this test set, then averaged (the released code; "
               "transductive); decisions at the calibrated thresholds: each member divided by its own thresholds, then averaged"
               if transductive else "each member's score and map divided by its calibrated thresholds, then averaged")  # fmt: skip
        text += f"; ensemble of {len(model.members)} networks: {how}"
    return text


def evaluate_category(args: argparse.Namespace, category: str) -> dict:
    """Score the test split batch by batch; keep only scores, maps and masks for the metrics."""
    out_dir = Path(args.output_dir) / category
    model = load(args, category)
    config = model.config
    dataset = CategoryDataset(args.data_path, category, "test", config.preprocess())
    scene = dataset.layout == "mvtec_ad2"  # the benchmark's metrics are at each image's own resolution
    whole, at_original = config.crop == "none", args.pixel_metrics_at == "original" or scene or config.tile_size > 0
    transductive = isinstance(model, PatchCoreEnsemble) and config.protocol == "official"  # the released code's ensemble
    if at_original and not whole:
        needs = "MVTec AD 2's metrics need" if scene else "--pixel_metrics_at original needs"
        raise ValueError(
            f"{needs} a bank trained with --crop none ({category}'s has --crop {config.crop}): "
            "a center crop has no scores outside it"
        )
    if at_original and transductive:
        raise ValueError(
            f"--pixel_metrics_at original: {category}'s official-protocol ensemble combines its members' maps over the test "
            "set at the model's resolution; drop --pixel_metrics_at"
        )
    calibration = model.calibration
    calibrated = calibration.calibrated
    no_masks = None
    if dataset.unmasked_defects:
        no_masks = (
            f"undefined: no ground-truth masks for defect type(s) {', '.join(dataset.unmasked_defects)} "
            f"(a {dataset.layout} layout keeps them in {category}/ground_truth/<defect>/<name>_mask.png)"
        )
    n, size = len(dataset), config.image_size
    scores, labels = np.empty(n), np.empty(n, np.int64)
    if at_original:  # each image's own size: counted into the pixel curves as they come (the maps wait on disk for the heatmaps)
        masks, maps = None, PixelCurves([t for t in (calibration.pixel_threshold, calibration.mean_3std_pixel_threshold) if t is not None])
    else:
        maps, masks = np.empty((n, size, size), np.float32), np.empty((n, size, size), bool)
    if transductive:  # every member's scores and maps, normalised once the whole test set is in
        members = (np.empty((len(model.members), n)), np.empty((len(model.members), n, size, size), np.float32))
    paths, defects, decided = [], [], None
    with staging(out_dir) as stage:
        start, i = time.perf_counter(), 0
        full_maps = stage / ".maps_at_original"  # float32 maps at each image's own size, one file each, until the heatmaps are drawn
        with NpzWriter(stage / "anomaly_maps.npz", compress=True) as raw:

            def keep_raw(index: int, path: str, anomaly_map: np.ndarray) -> None:
                if whole:  # back onto the original image
                    anomaly_map = resize_map(anomaly_map, dataset.original_size(index))
                raw.add(path, anomaly_map.astype(np.float16))
                if at_original:
                    maps.add(anomaly_map, dataset.original_mask(index))
                    full_maps.mkdir(exist_ok=True)
                    np.save(full_maps / f"{index}.npy", anomaly_map.astype(np.float32))

            for images, batch_labels, batch_masks, batch_paths, batch_defects in tqdm(
                make_loader(dataset, args, model.device), desc=f"{category} test", unit="batch"
            ):
                j = i + len(images)
                labels[i:j] = batch_labels.numpy()
                if transductive:
                    members[0][:, i:j], members[1][:, i:j] = model.predict_members(images)
                else:
                    scores[i:j], batch_maps = model.predict(images)
                    for k, (path, anomaly_map) in enumerate(zip(batch_paths, batch_maps)):
                        keep_raw(i + k, path, anomaly_map)
                    if not at_original:
                        maps[i:j] = batch_maps
                if not at_original:
                    masks[i:j] = batch_masks[:, 0].numpy() > 0.5
                paths += batch_paths
                defects += batch_defects
                i = j
            if transductive:
                decided = model.combine(*members) if model.calibration.calibrated else None  # what the thresholds decide on
                scores[:], maps[:] = normalise_over_test_set(*members)
                del members
                for k, path in enumerate(paths):
                    keep_raw(k, path, maps[k])
        seconds = time.perf_counter() - start

        on_calibrated_scale = calibrated and not transductive  # the maps are on the scale the thresholds were set on
        where = "each image's own resolution" if at_original else f"the model's input resolution {size}x{size}"
        where += " (the whole image)" if whole else " (center crop)"
        metrics = {
            "category": category,
            "protocol": config.protocol,
            "layout": dataset.layout,
            "shots": config.shots,
            "preset": config.preset,
            **compute_metrics(labels, scores, masks, maps, defects, no_masks, model.calibration, decided),
            "n_images": n,
            "n_good": int((labels == 0).sum()),
            "n_defective": int((labels == 1).sum()),
            "computed_on": f"image metrics: all {n} test images; pixel metrics: every pixel of every test image, "
            f"at {where}, with the {config.protocol} protocol's masks"
            + (" (its rule at the image's own resolution, no resize or crop; the curves from scores in bins 2.4e-4 wide, "
               "relative, the rates at the calibrated thresholds exact: reporting/pixel_curves.py)" if at_original else ""),
            "pixel_metrics_at": "original" if at_original else "model",
            "image_score": image_score_text(model, transductive),
            "backbone_precision": model.amp if model.amp == config.amp else f"{model.amp} (the bank's {config.amp} is not native here)",
            "patch_score": "squared L2 distance (official)" if config.protocol == "official" else "L2 distance (Eq. 6)",
            "nearest_neighbour_search": model.search_name(),
            "heatmap_scale": (calibration.heatmap_scale if on_calibrated_scale else None)
            or ([maps.low, maps.high] if at_original else [float(maps.min()), float(maps.max())]),
            "heatmap_region": "at the calibrated pixel threshold" if on_calibrated_scale else "at the labelled pixel F1 threshold",
            "thresholds_on_scores": not transductive,  # else they apply to the inductive combination, normalized_score x threshold
            "calibration": calibration.to_dict(),
            "seconds": round(seconds, 2),
            "ms_per_image": round(1000 * seconds / n, 1),
            "device": str(model.device),
            "gpu": device_name(model.device),
            "fp32_precision": model.fp32_precision,
            "weights": model.weights,
            "memory_bank": {"path": str(bank_path(args.output_dir, category)), "sha256": model.bank_sha256, **model.train_facts,
                            "config": config.to_dict()},  # fmt: skip
            "environment": environment(),
            "created": now(),
        }
        if scene:
            metrics["mvtec_ad2"] = {**ad2_metrics(labels, scores, masks, maps, calibration), "split": "test_public"}
            metrics["mvtec_ad2"]["private_splits"] = write_private_splits(args, model, category)
        if (out_dir / TRAIN_LOG).is_file():
            metrics["memory_bank"]["training_run"] = json.loads((out_dir / TRAIN_LOG).read_text())
        if (out_dir / AUDIT_FILE).is_file():  # train.py's audit of train/good: the images least like the others
            audit = json.loads((out_dir / AUDIT_FILE).read_text())["images"][:5]
            metrics["memory_bank"]["train_audit"] = {"file": AUDIT_FILE, "most_suspicious": [
                {key: entry[key] for key in ("image", "score", "rank")} for entry in audit]}  # fmt: skip

        # heatmaps, now that the colour scale and threshold are known: the images are read again, a batch at a
        # time, or one by one at their own resolution for a bank that sees the whole image
        vmin, vmax = metrics["heatmap_scale"]
        threshold = calibration.pixel_threshold if on_calibrated_scale else metrics["pixel_f1_threshold"]
        names = heatmap_names([Path(d) / Path(p).name for p, d in zip(paths, defects)])
        if whole:
            for i in tqdm(range(n), desc=f"{category} heatmaps", unit="img"):
                rgb, mask = dataset.original(i)
                anomaly_map = np.load(full_maps / f"{i}.npy") if at_original else resize_map(maps[i], rgb.size)
                panel = heatmap_panel(np.asarray(rgb, np.float64), anomaly_map, vmin, vmax, threshold, mask_outline(mask))
                save_heatmap(stage / "anomaly_maps" / names[i], panel)
                save_thumbnail(stage / thumbnail_name(names[i]), panel, rgb.size[0])
        else:
            i = 0
            for images, *_ in tqdm(make_loader(dataset, args, model.device), desc=f"{category} heatmaps", unit="batch"):
                for image in images:
                    panel = heatmap_panel(to_rgb(image), maps[i], vmin, vmax, threshold, mask_outline(masks[i]))
                    save_heatmap(stage / "anomaly_maps" / names[i], panel)
                    save_thumbnail(stage / thumbnail_name(names[i]), panel, image.shape[-1])
                    i += 1
        shutil.rmtree(full_maps, ignore_errors=True)
        plot_roc(stage / "roc.png", labels, scores, metrics["image_auroc"], category)
        plot_histogram(stage / "score_hist.png", labels, scores, metrics["image_f1_threshold"], category)
        records = [
            {"path": p, "defect_type": d, "label": int(y), "score": float(s), "heatmap": f"anomaly_maps/{name.as_posix()}"}
            for p, d, y, s, name in zip(paths, defects, labels, scores, names)
        ]
        if calibrated:  # 1.0 or more: defective at the threshold calibrated on good images
            for record, decided_score in zip(records, scores if decided is None else decided[0]):
                record["normalized_score"] = float(decided_score) / calibration.image_threshold
        write_json(stage / "scores.json", records)
        write_json(stage / "metrics.json", metrics)
    return metrics


def write_private_splits(args: argparse.Namespace, model: PatchCore, scene: str) -> dict:
    """MVTec AD 2's unlabelled splits, in the form its evaluation server takes: OUTPUT_DIR/anomaly_images/<scene>/<split>/
    <name>.tiff, each map at its image's own size in float16, and anomaly_images_thresholded/<scene>/<split>/<name>.png,
    0/255 at the pixel threshold --ad2_threshold names. Maps are written as they come: one batch in memory at a time.
    Returns what was written, per split."""
    import tifffile

    calibration = model.calibration
    threshold = calibration.pixel_threshold if args.ad2_threshold == "calibrated" else calibration.mean_3std_pixel_threshold
    root, written = Path(args.output_dir), {}
    for split in PRIVATE_SPLITS:
        if not (Path(args.data_path) / scene / split).is_dir():
            continue
        dataset = CategoryDataset(args.data_path, scene, split, model.config.preprocess())
        folder = Path(args.data_path) / scene / split
        with staging(root / "anomaly_images" / scene) as maps_stage, staging(root / "anomaly_images_thresholded" / scene) as binary:
            i = 0
            for images, *_ in tqdm(make_loader(dataset, args, model.device), desc=f"{scene} {split}", unit="batch"):
                for anomaly_map in model.predict(images)[1]:
                    name = dataset.samples[i].image.relative_to(folder).with_suffix("")
                    full = resize_map(anomaly_map, dataset.original_size(i))
                    (maps_stage / split / name).parent.mkdir(parents=True, exist_ok=True)
                    tifffile.imwrite(maps_stage / split / f"{name}.tiff", full.astype(np.float16))
                    if threshold is not None:
                        (binary / split / name).parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(np.where(full >= threshold, 255, 0).astype(np.uint8)).save(binary / split / f"{name}.png")
                    i += 1
        written[split] = {"images": len(dataset), "maps": f"anomaly_images/{scene}/{split}/",
                          "thresholded": f"anomaly_images_thresholded/{scene}/{split}/" if threshold is not None else None,
                          "threshold": threshold, "threshold_rule": args.ad2_threshold}  # fmt: skip
    return written


def labelled_values(args: argparse.Namespace, model: PatchCore | PatchCoreEnsemble) -> dict:
    """What --images may take from the category's metrics.json (a test-split evaluation: the F1 thresholds, the
    heatmap scale): its contents, when it was computed with this very bank (the checksum bank.py records) and on the
    scale --images decides on; else {}, and --threshold f1, which needs them, is refused in one line."""
    other = "or decide with the calibrated thresholds (the default) or --threshold VALUE"
    if isinstance(model, PatchCoreEnsemble) and model.config.protocol == "official":  # documented: nothing to warn of
        if args.threshold == "f1":
            raise ValueError(
                f"--threshold f1: {args.category}'s official-protocol ensemble finds its F1 thresholds on its members' scores "
                f"min-max normalised over the test set, a scale that new images do not have; {other}"
            )
        return {}
    path = Path(args.output_dir) / args.category / "metrics.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if not known or (known.get("memory_bank") or {}).get("sha256") == model.bank_sha256:
        return known
    stale = (f"{path} was computed with another memory bank than {bank_path(args.output_dir, args.category)} holds now "
             f"(trained again since): run evaluate.py on {args.category}'s test split again")  # fmt: skip
    if args.threshold == "f1":
        raise ValueError(f"--threshold f1: {stale}, {other}")
    warn_once(f"{stale}; until then its F1 mark and heatmap scale are not used")
    return {}


def decision_thresholds(
    args: argparse.Namespace, model: PatchCore | PatchCoreEnsemble, known: dict
) -> tuple[float | None, float | None, str]:
    """(image threshold, pixel threshold, where they come from) for --images; known: labelled_values."""
    calibration = model.calibration
    if args.threshold == "f1":
        if known.get("image_f1_threshold") is None:
            raise ValueError(f"--threshold f1: no labelled F1 threshold for {args.category} yet: run evaluate.py on its test split first")
        return known["image_f1_threshold"], known.get("pixel_f1_threshold"), "labelled F1-optimal thresholds (metrics.json)"
    if args.threshold is not None:
        return args.threshold, calibration.pixel_threshold, "--threshold (image); pixel: calibrated"
    if calibration.calibrated:
        how = f"calibrated on {calibration.images()} for {calibration.target_fpr:.0%} false alarms"
        return calibration.image_threshold, calibration.pixel_threshold, how
    return None, None, f"none: {calibration.reason}"


def score_new_images(args: argparse.Namespace) -> None:
    """--images: score unlabelled images batch by batch; decide with the calibrated thresholds (or --threshold)."""
    category = args.category
    out_dir = Path(args.output_dir) / category
    paths = find_images(args.images)
    model = load(args, category)
    known = labelled_values(args, model)
    threshold, pixel_threshold, source = decision_thresholds(args, model, known)
    scale = model.calibration.heatmap_scale or known.get("heatmap_scale")  # a fixed scale; else each heatmap its own
    dataset = ImageFiles(paths, model.config.preprocess())
    base = Path(os.path.commonpath([p.absolute().parent for p in paths]))
    names = [name.as_posix() for name in heatmap_names([p.absolute().relative_to(base) for p in paths])]
    records = []
    inference = out_dir / "inference"
    start = time.perf_counter()
    with staging(inference) as stage:
        for images, indices in tqdm(make_loader(dataset, args, model.device), desc=f"{category} images", unit="batch"):
            scores, maps = model.predict(images)
            for image, index, value, anomaly_map in zip(images, indices.tolist(), scores, maps):
                name = names[index]
                if model.config.crop == "none":  # drawn over the whole photo, at its own resolution
                    original = load_rgb(paths[index])
                    rgb, anomaly_map = np.asarray(original, np.float64), resize_map(anomaly_map, original.size)
                else:
                    rgb = to_rgb(image)
                vmin, vmax = scale or (float(anomaly_map.min()), float(anomaly_map.max()))
                panel = heatmap_panel(rgb, anomaly_map, vmin, vmax, pixel_threshold)
                save_heatmap(stage / "anomaly_maps" / name, panel)
                save_thumbnail(stage / thumbnail_name(name), panel, rgb.shape[1])
                record = {"path": str(paths[index]), "heatmap": f"anomaly_maps/{name}", "score": float(value)}
                if threshold is not None:  # normalized: 1.0 or more means defective
                    record["normalized_score"] = float(value) / threshold
                    record["decision"] = "defective" if value >= threshold else "good"
                records.append(record)
        summary = {
            "threshold": threshold,
            "pixel_threshold": pixel_threshold,
            "thresholds_from": source,
            "heatmap_scale": scale or "each heatmap scaled to its own range (no calibration or metrics.json for this category)",
            "weights": model.weights,
            "created": now(),
            "images": records,
        }
        write_json(stage / "scores.json", summary)
        write_images_page(stage, category, summary, model.calibration.image_threshold, known.get("image_f1_threshold"))
    seconds = time.perf_counter() - start
    print(f"\nthresholds: {source}" + (f": image {threshold:.4g}" if threshold is not None else ""))
    print(f"{'image':<40} {'score':>10} {'/ threshold':>12}  decision")
    for record in records:
        normalized = f"{record['normalized_score']:.3f}" if "normalized_score" in record else "-"
        print(f"{Path(record['path']).name:<40} {record['score']:>10.4f} {normalized:>12}  {record.get('decision', '(no threshold)')}")
    print(f"\n{len(records)} images in {seconds:.1f}s; scores and heatmaps in {inference}/, to review: {inference / 'report.html'}")


def main() -> None:
    args = parse_args()
    if args.images:
        score_new_images(args)
        return
    categories = resolve_categories(Path(args.data_path), args.category)
    require_banks(args.output_dir, categories, args.data_path)  # before any work, so that 'all' does not stop halfway
    results = [evaluate_category(args, category) for category in categories]
    print(f"\n{write_summary(Path(args.output_dir), results)}")
    page = write_report_page(Path(args.output_dir), results)
    print(f"\nsummary: {Path(args.output_dir) / 'summary.md'}; per category: metrics.json, scores.json, heatmaps in")
    for m in results:
        print(f"  {Path(args.output_dir) / m['category'] / 'anomaly_maps'}/")
    print(f"review in a browser: {page}")


if __name__ == "__main__":
    run_main(main)
