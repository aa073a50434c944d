"""MVTec AD: the folder layout, image loading and preprocessing, and a synthetic category.

Layout (any category folder in it works, not only MVTec's 15):
    <root>/<category>/train/good/*.png
    <root>/<category>/test/<good|defect_type>/*.png
    <root>/<category>/ground_truth/<defect_type>/<name>_mask.png

    python dataset.py --synthetic DIR [--category NAME]   writes a synthetic category
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torchvision import transforms
from torchvision.transforms import InterpolationMode

CATEGORIES = (
    "bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
    "carpet", "grid", "leather", "tile", "wood",
)  # fmt: skip
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(Exception):
    """The data on disk is not what MVTec's layout promises."""


class Preprocess:
    """The paper's preprocessing: shorter side to `resize`, center crop `image_size`, ImageNet mean/std.

    Ground-truth masks are brought onto the same crop, as each protocol defines them:
    - paper: defective where the mask is at half its value range or more; resized with
      nearest-neighbour, so defects keep their edges and thin defects survive;
    - official: the released code's chain, applied to the mask as PIL opens it: the image's own
      Resize (bilinear with antialiasing; PIL uses nearest for mode '1' and 'P' images whatever
      is asked), CenterCrop and ToTensor, then only pixels at exactly 1.0 count (their
      astype(int)), so defect edges, and defects thinner than a few pixels, count as normal.
    """

    def __init__(self, resize: int = 256, image_size: int = 224, protocol: str = "paper") -> None:
        self.resize, self.image_size, self.protocol = resize, image_size, protocol
        self._image = transforms.Compose([
            transforms.Resize(resize, interpolation=InterpolationMode.BILINEAR),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])  # fmt: skip
        self._nearest = transforms.Compose([
            transforms.Resize(resize, interpolation=InterpolationMode.NEAREST),
            transforms.CenterCrop(image_size),
        ])  # fmt: skip
        self._official_mask = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size), transforms.ToTensor()])

    def image(self, image: Image.Image) -> torch.Tensor:
        return self._image(image)

    def mask(self, mask: Image.Image, image_size: tuple[int, int]) -> torch.Tensor:
        """[1, S, S] float 0/1 on the model's crop, from a mask as opened (`image_size`: its image's (w, h))."""
        if self.protocol == "official":
            return (self._official_mask(mask)[:1] >= 1).float()
        mask = _to_8bit(mask).convert("L")
        if mask.size != image_size:
            mask = mask.resize(image_size, Image.Resampling.NEAREST)
        return torch.from_numpy(np.asarray(self._nearest(mask)) >= 128).float()[None]


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel images rescaled to 8 bits over their type's range, not clipped."""
    if image.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I") and values.max() > 255 else 255.0
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8))


def open_image(path: Path) -> Image.Image:
    """An image file, fully read, in the mode it is stored in."""
    with Image.open(path) as image:
        image.load()
    return image


def load_rgb(path: Path) -> Image.Image:
    """Any PNG/JPEG/BMP/TIFF (grey, RGBA, palette, 16-bit) as 8-bit RGB."""
    return _to_8bit(open_image(path)).convert("RGB")


def list_categories(root: Path) -> list[str]:
    """Category folders under root: those with a train/ or test/ folder."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir()))


def resolve_categories(root: Path, spec: str) -> list[str]:
    """'all', one name or a comma list -> category names, each checked to exist under root."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data_path {root} does not exist or is not a folder: point it at the MVTec AD folder")
    found = list_categories(root)
    if spec == "all":
        if not found:
            raise DataError(f"--data_path {root} holds no category folders (each needs train/ and test/)")
        return found
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    missing = [name for name in wanted if name not in found]
    if missing or not wanted:
        raise DataError(f"--category {','.join(missing) or spec!r} not found under {root}; found: {', '.join(found) or 'none'}")
    return wanted


def _image_files(folder: Path, skipped: list[Path]) -> list[Path]:
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(path)
        elif path.is_file():
            skipped.append(path)
    return files


def _check_readable(path: Path) -> None:
    """A cheap full read of the file's structure, so a broken image stops the run before any heavy work."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:
        raise DataError(f"cannot read image {path} ({err}): replace or remove the file") from err


class MVTecDataset(torch.utils.data.Dataset):
    """Items: (image [3,S,S], label 0/1, mask [1,S,S], path relative to root, defect type)."""

    def __init__(self, root: str | Path, category: str, split: str, transform: Preprocess | None = None) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root_path = Path(root)
        self.category = category
        self.split = split
        self.transform = transform or Preprocess()
        folder = self.root_path / category / split
        if not folder.is_dir():
            raise DataError(f"{folder} is missing: a category needs train/good, test/ and ground_truth/ folders")

        self.samples: list[tuple[Path, str, Path | None]] = []  # (image, defect type, mask or None)
        skipped: list[Path] = []
        defect_types = ["good"] if split == "train" else sorted(p.name for p in folder.iterdir() if p.is_dir())
        for defect in defect_types:
            if not (folder / defect).is_dir():
                continue
            for path in _image_files(folder / defect, skipped):
                mask = None
                if defect != "good":  # masks are paired by file name, never by list position
                    mask = self.root_path / category / "ground_truth" / defect / f"{path.stem}_mask.png"
                    if not mask.is_file():
                        raise DataError(f"defect image {path} has no mask: expected {mask}")
                self.samples.append((path, defect, mask))
        if skipped:
            print(f"note: skipped {len(skipped)} non-image file(s) under {folder}", file=sys.stderr)
        if not self.samples:
            where = folder / "good" if split == "train" else folder
            raise DataError(f"no images in {where}: expected {'/'.join(IMAGE_EXTENSIONS)} files there")
        for path, _, mask in self.samples:
            _check_readable(path)
            if mask is not None:
                _check_readable(mask)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int, torch.Tensor, str, str]:
        path, defect, mask_path = self.samples[idx]
        rgb = load_rgb(path)
        image = self.transform.image(rgb)
        if mask_path is None:
            mask = torch.zeros(1, *image.shape[-2:])
        else:
            mask = self.transform.mask(open_image(mask_path), rgb.size)
        return image, int(defect != "good"), mask, path.relative_to(self.root_path).as_posix(), defect


def find_images(spec: str) -> list[Path]:
    """Image files of a folder, or matching a glob pattern ('**' recurses); each checked readable."""
    folder = Path(spec)
    if folder.is_dir():
        candidates = sorted(p for p in folder.iterdir() if p.is_file())
    else:
        candidates = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    images = [p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS]
    if len(images) < len(candidates):
        print(f"note: skipped {len(candidates) - len(images)} non-image file(s) in {spec}", file=sys.stderr)
    if not images:
        raise DataError(f"--images {spec}: no {'/'.join(IMAGE_EXTENSIONS)} files there; give a folder or a glob such as 'dir/*.png'")
    for path in images:
        _check_readable(path)
    return images


class ImageFiles(torch.utils.data.Dataset):
    """Unlabelled images, for scoring new parts: items are (image [3,S,S], index)."""

    def __init__(self, paths: list[Path], transform: Preprocess) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.transform.image(load_rgb(self.paths[idx])), idx


# ---------------------------------------------------------------------- synthetic data
SYNTHETIC_DEFECTS = ("scratch", "spot", "stain")


def _normal_part(rng: np.random.Generator, size: int) -> Image.Image:
    """A round part on a brushed-metal background, with small random shifts in pose and colour."""
    y, x = np.mgrid[0:size, 0:size] / size
    stripes = 0.5 + 0.15 * np.sin(2 * np.pi * (18 * x + 3 * y + rng.uniform(0, 1)))
    base = np.stack([stripes * c for c in (0.55, 0.6, 0.65)], axis=-1)
    base += rng.normal(0, 0.02, base.shape)
    image = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy = size / 2 + rng.uniform(-3, 3, 2)
    tint = rng.uniform(-10, 10)
    for radius, colour in ((0.38, (60, 110, 60)), (0.30, (90, 150, 90)), (0.12, (40, 80, 40))):
        r = radius * size
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c + tint) for c in colour))
    return image


def _draw_defect(kind: str, rng: np.random.Generator, size: int, image: Image.Image) -> Image.Image:
    """Draw one defect of `kind` on image, in place; return its mask (mode L, 0/255)."""
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
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
    mask = Image.new("L", (size, size), 0)
    for target, mask_fill in ((ImageDraw.Draw(image), None), (ImageDraw.Draw(mask), 255)):
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
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a category in MVTec AD's layout with procedurally made images; the same seed gives the same files."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / category
    counts = [("train", "good", n_train), ("test", "good", n_test_good)]
    counts += [("test", defect, n_per_defect) for defect in SYNTHETIC_DEFECTS]
    for split, defect, count in counts:
        (folder / split / defect).mkdir(parents=True, exist_ok=True)
        if defect != "good":
            (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = _normal_part(rng, size)
            if defect != "good":
                mask = _draw_defect(defect, rng, size, image)
                mask.save(folder / "ground_truth" / defect / f"{i:03d}_mask.png")
            image.filter(ImageFilter.GaussianBlur(0.6)).save(folder / split / defect / f"{i:03d}.png")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a synthetic category in MVTec AD's layout.")
    parser.add_argument("--synthetic", required=True, metavar="DIR", help="folder to write the category into")
    parser.add_argument("--category", default="synthetic", help="category folder name (default: synthetic)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--n_train", type=int, default=30, help="defect-free training images (default: 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    out = make_synthetic_category(args.synthetic, args.category, n_train=args.n_train, size=args.size, seed=args.seed)
    print(f"wrote synthetic category to {out}")
