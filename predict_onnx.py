"""Score images with an exported PatchCore model (export.py), without torch: onnxruntime (or OpenVINO), numpy, Pillow.

    pip install -r requirements-deploy.txt
    python predict_onnx.py results/bottle/patchcore.onnx "line_camera/*.png"
    python predict_onnx.py results/bottle/patchcore.onnx line_camera/ --heatmaps --runtime openvino

Each image is read, resized and cropped as training did (the model file's metadata says how; image_io.py does
it with PIL's filters), then scored in batches by the model, which also decides at the thresholds calibrated
at training. Writes OUTPUT_DIR/scores.json (default OUTPUT_DIR: inference_onnx/ beside the model file), as
`evaluate.py --images` writes its own, and with --heatmaps one PNG per image in OUTPUT_DIR/anomaly_maps/, drawn and
named as evaluate.py draws and names them (image_io.heatmap_panel, image_io.heatmap_names: a.png and a.jpg keep apart).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deploy.onnx_model import RUNTIMES, DeployedModel
from plumbing.cli import ArgumentParser, now, run_main
from plumbing.files import staging, write_json
from plumbing.image_io import DataError, find_images, heatmap_names, heatmap_panel, load_rgb, model_input, resize_map, working_size


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the exported model file, e.g. results/bottle/patchcore.onnx")
    parser.add_argument("images", help="a folder of images, or a glob such as 'line_camera/*.png' ('**' recurses)")
    parser.add_argument(
        "--output_dir", default=None, help="where scores.json (and heatmaps) go (default: inference_onnx/ beside the model)"
    )
    parser.add_argument(
        "--runtime", default="onnxruntime", choices=RUNTIMES, help="onnxruntime (default) or openvino (pip install openvino)"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images per call of the model (default: 8)")
    parser.add_argument("--heatmaps", action="store_true", help="also draw input | heatmap | predicted region | colour bar per image")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args()
    if args.batch_size <= 0:
        parser.error(f"--batch_size must be a positive integer, got {args.batch_size}")
    return args


def thresholds_from(model: DeployedModel) -> str:
    calibration = model.calibration
    if model.image_threshold is None:
        return f"none: {calibration['reason']}"
    images = f"{calibration['n_held_out']} {calibration.get('source', 'held-out good images')}"
    return f"calibrated on {images} for {calibration['target_fpr']:.0%} false alarms"


def check_input_sizes(model: DeployedModel, paths: list[Path]) -> None:
    """A tiled model's graph takes one input size, its training images' working size: an image whose aspect gives
    another is a DataError, said before any work (from the files' headers)."""
    height, width = model.input_size
    for path in paths:
        with Image.open(path) as image:  # the header only (find_images checked every file readable)
            size = working_size(image.size, model.image_size)
        if size != (width, height):
            raise DataError(
                f"{path} becomes {size[0]}x{size[1]} pixels at image size {model.image_size}, but {model.path.name} takes "
                f"{width}x{height}, its training images' size: give it images of their aspect, or score this one with evaluate.py --images"
            )


def main() -> None:
    args = parse_args()
    model = DeployedModel(args.model, args.runtime)
    paths = find_images(args.images)
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.model).parent / "inference_onnx"
    resize, size, crop = (model.preprocessing[key] for key in ("resize", "image_size", "crop"))
    if model.tile_size:
        check_input_sizes(model, paths)
    scale = model.calibration.get("heatmap_scale")  # a fixed colour scale; else each heatmap its own
    base = Path(os.path.commonpath([p.absolute().parent for p in paths]))
    names = [name.as_posix() for name in heatmap_names([p.absolute().relative_to(base) for p in paths])]  # as evaluate.py names them
    records = []
    start = time.perf_counter()
    with staging(out_dir) as stage:
        for first in range(0, len(paths), args.batch_size):
            batch = paths[first : first + args.batch_size]
            images = np.stack([model_input(load_rgb(path), resize, size, crop, model.tile_size) for path in batch])
            outputs = model(images)
            for i, path in enumerate(batch):
                record = {"path": str(path), "score": float(outputs["scores"][i])}
                if "decisions" in outputs:  # normalized: 1.0 or more means defective
                    record["normalized_score"] = float(outputs["normalized_scores"][i])
                    record["decision"] = "defective" if outputs["decisions"][i] else "good"
                if args.heatmaps:
                    name = names[first + i]
                    anomaly_map, rgb = outputs["maps"][i], images[i]
                    if crop == "none":  # drawn over the whole photo, at its own resolution
                        photo = load_rgb(path)
                        rgb, anomaly_map = np.asarray(photo), resize_map(anomaly_map, photo.size)
                    vmin, vmax = scale or (float(anomaly_map.min()), float(anomaly_map.max()))
                    panel = heatmap_panel(rgb, anomaly_map, vmin, vmax, model.pixel_threshold)
                    (stage / "anomaly_maps" / name).parent.mkdir(parents=True, exist_ok=True)
                    panel.save(stage / "anomaly_maps" / name)
                    record["heatmap"] = f"anomaly_maps/{name}"
                records.append(record)
        summary = {
            "model": str(args.model),
            "runtime": args.runtime,
            "threshold": model.image_threshold,
            "pixel_threshold": model.pixel_threshold,
            "thresholds_from": thresholds_from(model),
            "heatmap_scale": scale or "each heatmap scaled to its own range (no calibration in the model)",
            "weights": model.metadata.get("patchcore.weights"),
            "created": now(),
            "images": records,
        }
        write_json(stage / "scores.json", summary)
    if not args.heatmaps:  # an earlier run's heatmaps would not match these scores
        shutil.rmtree(out_dir / "anomaly_maps", ignore_errors=True)
    seconds = time.perf_counter() - start
    threshold = f": image {model.image_threshold:.4g}" if model.image_threshold is not None else ""
    print(f"thresholds: {thresholds_from(model)}{threshold}")
    print(f"{'image':<40} {'score':>10} {'/ threshold':>12}  decision")
    for path, record in zip(paths, records):
        normalized = f"{record['normalized_score']:.3f}" if "normalized_score" in record else "-"
        name = path.absolute().relative_to(base).as_posix()
        print(f"{name:<40} {record['score']:>10.4f} {normalized:>12}  {record.get('decision', '(no threshold)')}")
    what = "scores and heatmaps" if args.heatmaps else "scores"
    per_image = 1000 * seconds / len(records)
    print(f"\n{len(records)} images in {seconds:.1f}s ({per_image:.0f} ms per image, {args.runtime}); {what} in {out_dir}/")


if __name__ == "__main__":
    run_main(main)
