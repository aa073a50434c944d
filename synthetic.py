"""Synthetic categories for the demo and the tests: round parts on brushed metal, with scratches,
spots and stains, written in MVTec AD's layout, a plain folder's (no ground truth) or VisA's; and
scenes in MVTec AD 2's layout, with small defects near the borders of large non-square images.

    python synthetic.py DIR [--category NAME] [--layout mvtec|folder|visa|mvtec_ad2] [--size PX [PX]] [--n_train N] [--seed S]
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


def _small_defect(rng: np.random.Generator, w: int, h: int, image: Image.Image, side: int) -> Image.Image:
    """One dark spot or bright scratch of about side x side pixels, within 3 sides of an image border (MVTec AD 2's
    defects are small and often at the border); drawn on image in place; returns its mask (mode L, 0/255)."""
    edge = int(rng.integers(4))  # which border: left, right, top, bottom
    near = rng.uniform(side, 3 * side)
    along = rng.uniform(0.1, 0.9)
    cx = (near, w - near, along * w, along * w)[edge]
    cy = (along * h, along * h, near, h - near)[edge]
    mask = Image.new("L", (w, h), 0)
    r = side / 2
    if rng.uniform() < 0.5:
        box, shape, colour = (cx - r, cy - r, cx + r, cy + r), "ellipse", (25, 20, 15)
    else:
        box, shape, colour = (cx - r, cy - r / 4, cx + r, cy + r / 4), "rectangle", (240, 240, 225)
    for target, fill in ((ImageDraw.Draw(image), colour), (ImageDraw.Draw(mask), 255)):
        getattr(target, shape)(box, fill=fill)
    return mask


def make_synthetic_scene(
    root: str | Path,
    scene: str = "synthetic_ad2",
    n_train: int = 20,
    n_validation: int = 8,
    n_test_good: int = 6,
    n_test_bad: int = 6,
    n_private: int = 6,
    size: tuple[int, int] = (640, 480),
    defect_px: int = 16,
    seed: int = 0,
) -> Path:
    """Write a scene in MVTec AD 2's layout: train/good, validation/good, test_public/{good,bad} with
    ground_truth/bad/<stem>_mask.png (0/255), and the unlabelled test_private (good and bad parts) and
    test_private_mixed (the same kind of parts under other lighting). Non-square images of `size` (width,
    height) with defects of about defect_px x defect_px pixels near the borders; the same seed, the same files."""
    w, h = size
    rng = np.random.default_rng(seed)
    folder = Path(root) / scene
    splits = [("train/good", n_train, 0), ("validation/good", n_validation, 0), ("test_public/good", n_test_good, 0),
              ("test_public/bad", n_test_bad, n_test_bad), ("test_private", n_private, n_private // 2),
              ("test_private_mixed", n_private, n_private // 2)]  # fmt: skip
    for split, count, n_bad in splits:
        bad = set(rng.choice(count, n_bad, replace=False).tolist()) if n_bad < count else set(range(count))
        for i in range(count):
            image = _normal_part(rng, w, h)
            mask = _small_defect(rng, w, h, image, defect_px) if i in bad else None
            image = image.filter(ImageFilter.GaussianBlur(0.6))
            if split == "test_private_mixed":  # other lighting: darker or brighter, and tinted
                gain = rng.uniform(0.7, 1.3, 3)
                image = Image.fromarray(np.clip(np.asarray(image) * gain, 0, 255).astype(np.uint8))
            name = f"{i:03d}_{'mixed' if split.endswith('mixed') else 'regular'}"
            (folder / split).mkdir(parents=True, exist_ok=True)
            image.save(folder / split / f"{name}.png")
            if split == "test_public/bad":
                (folder / "test_public" / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
                mask.save(folder / "test_public" / "ground_truth" / "bad" / f"{name}_mask.png")
    return folder


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
    parser = argparse.ArgumentParser(description="Write a synthetic category: MVTec AD's, a plain folder's, VisA's or MVTec AD 2's layout.")
    parser.add_argument("dir", metavar="DIR", help="folder to write the category into")
    parser.add_argument("--category", default="synthetic", help="category (or MVTec AD 2 scene) folder name (default: synthetic)")
    parser.add_argument("--layout", default="mvtec", choices=(*SYNTHETIC_LAYOUTS, "mvtec_ad2"),
                        help="mvtec (default), folder (no masks), visa, or mvtec_ad2 (validation/, test_public/, private splits)")
    parser.add_argument("--size", type=int, nargs="+", default=None, metavar="PX",
                        help="image side, or width and height (default: 256; mvtec_ad2: 640 480)")
    parser.add_argument("--n_train", type=int, default=None, help="defect-free training images (default: 30; mvtec_ad2: 20)")
    parser.add_argument("--defect_px", type=int, default=16, help="mvtec_ad2: defect size in pixels (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    if args.layout == "mvtec_ad2":
        size = tuple((args.size * 2)[:2]) if args.size else (640, 480)
        out = make_synthetic_scene(args.dir, args.category, n_train=args.n_train or 20, size=size, defect_px=args.defect_px, seed=args.seed)
    else:
        size = 256 if not args.size else args.size[0] if len(args.size) == 1 else tuple(args.size[:2])
        out = make_synthetic_category(args.dir, args.category, n_train=args.n_train or 30, size=size, seed=args.seed, layout=args.layout)
    print(f"wrote synthetic {args.layout} {'scene' if args.layout == 'mvtec_ad2' else 'category'} to {out}")
