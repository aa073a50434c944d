"""Synthetic categories for the demo and the tests: round parts on brushed metal, with scratches,
spots and stains, written in MVTec AD's layout, a plain folder's (no ground truth) or VisA's.

    python synthetic.py DIR [--category NAME] [--layout mvtec|folder|visa] [--size PX [PX]] [--n_train N] [--seed S]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dataset import VISA_CSV

SYNTHETIC_DEFECTS = ("scratch", "spot", "stain")
SYNTHETIC_LAYOUTS = ("mvtec", "folder", "visa")


def _normal_part(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A round part on a brushed-metal background, with small random shifts in pose and colour."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    stripes = 0.5 + 0.15 * np.sin(2 * np.pi * (18 * x + 3 * y + rng.uniform(0, 1)))
    base = np.stack([stripes * c for c in (0.55, 0.6, 0.65)], axis=-1)
    base += rng.normal(0, 0.02, base.shape)
    image = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy = np.array([w, h]) / 2 + rng.uniform(-3, 3, 2)
    tint = rng.uniform(-10, 10)
    for radius, colour in ((0.38, (60, 110, 60)), (0.30, (90, 150, 90)), (0.12, (40, 80, 40))):
        r = radius * min(w, h)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c + tint) for c in colour))
    return image


def _draw_defect(kind: str, rng: np.random.Generator, w: int, h: int, image: Image.Image, value: int = 255) -> Image.Image:
    """Draw one defect of `kind` on image, in place; return its mask (mode L, 0 and `value`)."""
    size = min(w, h)
    cx, cy = rng.uniform(0.3, 0.7, 2) * np.array([w, h])
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        dx, dy = np.cos(angle) * size * 0.15, np.sin(angle) * size * 0.15
        shapes = [("line", (cx - dx, cy - dy, cx + dx, cy + dy), (235, 235, 220))]
    elif kind == "spot":
        r = size * rng.uniform(0.03, 0.06)
        shapes = [("ellipse", (cx - r, cy - r, cx + r, cy + r), (20, 15, 10))]
    else:  # stain: a few overlapping blobs of a foreign colour
        shapes = []
        for _ in range(4):
            x, y = (cx, cy) + rng.uniform(-0.05, 0.05, 2) * size
            r = size * rng.uniform(0.02, 0.05)
            shapes.append(("ellipse", (x - r, y - r, x + r, y + r), (170, 90, 30)))
    mask = Image.new("L", (w, h), 0)
    for target, mask_fill in ((ImageDraw.Draw(image), None), (ImageDraw.Draw(mask), value)):
        for shape, box, colour in shapes:
            if shape == "line":
                target.line(box, fill=mask_fill or colour, width=max(2, size // 60))
            else:
                target.ellipse(box, fill=mask_fill or colour)
    return mask


def make_synthetic_category(
    root: str | Path,
    category: str = "synthetic",
    n_train: int = 30,
    n_test_good: int = 8,
    n_per_defect: int = 6,
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    layout: str = "mvtec",
) -> Path:
    """Write a category with procedurally made images; the same seed gives the same files.

    layout 'mvtec': MVTec AD's layout, PNG, 0/255 masks; 'folder': the same without any
    ground_truth/ (one's own parts, unlabelled pixels); 'visa': VisA's layout, JPEG images, masks
    whose defects have the value 1, and rows added to <root>/split_csv/1cls.csv.
    size: the side of square images, or (width, height).
    """
    if layout not in SYNTHETIC_LAYOUTS:
        raise ValueError(f"layout must be one of {SYNTHETIC_LAYOUTS}, got {layout!r}")
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    root, folder = Path(root), Path(root) / category
    counts = [("train", "good", n_train), ("test", "good", n_test_good)] + [("test", d, n_per_defect) for d in SYNTHETIC_DEFECTS]
    rows = []
    for split, defect, count in counts:
        for i in range(count):
            image = _normal_part(rng, w, h)
            mask = None if defect == "good" else _draw_defect(defect, rng, w, h, image, value=1 if layout == "visa" else 255)
            image = image.filter(ImageFilter.GaussianBlur(0.6))
            if layout == "visa":
                kind, name = ("Normal", f"{split}_{i:03d}") if defect == "good" else ("Anomaly", f"{defect}_{i:03d}")
                image_path, mask_path = (
                    Path(category, "Data", "Images", kind, f"{name}.JPG"),
                    Path(category, "Data", "Masks", kind, f"{name}.png"),
                )
                rows.append(
                    [
                        category,
                        split,
                        "normal" if defect == "good" else "anomaly",
                        image_path.as_posix(),
                        "" if mask is None else mask_path.as_posix(),
                    ]
                )
            else:
                image_path = Path(category, split, defect, f"{i:03d}.png")
                mask_path = Path(category, "ground_truth", defect, f"{i:03d}_mask.png") if layout == "mvtec" else None
            (root / image_path).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / image_path, quality=95)
            if mask is not None and mask_path is not None:
                (root / mask_path).parent.mkdir(parents=True, exist_ok=True)
                mask.save(root / mask_path)
    if layout == "visa":  # one CSV for all objects: keep the other objects' rows
        table = root / VISA_CSV
        kept = []
        if table.is_file():
            with table.open(newline="") as f:
                kept = list(csv.reader(f))[1:]
        table.parent.mkdir(parents=True, exist_ok=True)
        with table.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["object", "split", "label", "image", "mask"])
            writer.writerows([r for r in kept if r[0] != category] + rows)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a synthetic category, in MVTec AD's, a plain folder's or VisA's layout.")
    parser.add_argument("dir", metavar="DIR", help="folder to write the category into")
    parser.add_argument("--category", default="synthetic", help="category folder name (default: synthetic)")
    parser.add_argument("--layout", default="mvtec", choices=SYNTHETIC_LAYOUTS, help="mvtec (default), folder (no masks) or visa")
    parser.add_argument("--size", type=int, nargs="+", default=[256], metavar="PX", help="image side, or width and height (default: 256)")
    parser.add_argument("--n_train", type=int, default=30, help="defect-free training images (default: 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    size = args.size[0] if len(args.size) == 1 else tuple(args.size[:2])
    out = make_synthetic_category(args.dir, args.category, n_train=args.n_train, size=size, seed=args.seed, layout=args.layout)
    print(f"wrote synthetic {args.layout} category to {out}")
