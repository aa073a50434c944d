"""The data: layouts on disk, image and mask loading, and preprocessing.

Layouts, recognised from what is under --data_path:
  folder  MVTec AD's layout, also the one for your own parts; ground truth is optional:
              <root>/<category>/train/good/*.png
              <root>/<category>/test/<good|defect_type>/*.png
              <root>/<category>/ground_truth/<defect_type>/<name>_mask.png   (defective at half range)
  visa    VisA: <root>/split_csv/1cls.csv with columns object,split,label,image,mask (labels
          normal/anomaly, paths relative to root); masks mark defects with any non-zero value.
  mvtec_ad2  MVTec AD 2 (Heckler-Kram et al., 2025), one folder per scene:
              <root>/<scene>/train/good/*.png, <scene>/validation/good/*.png (the thresholds' only source)
              <root>/<scene>/test_public/<good|bad>/*.png, test_public/ground_truth/bad/<name>_mask.png
              <root>/<scene>/test_private/, <scene>/test_private_mixed/   (no labels: scored for the server)
"""

from __future__ import annotations

import copy
import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from plumbing.image_io import IMAGE_EXTENSIONS, DataError, check_readable, image_files, load_rgb, open_image, to_8bit, working_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preprocess:
    """The paper's preprocessing: shorter side to `resize`, center crop `image_size`, ImageNet mean/std.
    With crop 'none', the whole image is resized to image_size x image_size instead (aspect not kept); with tile_size
    too, so that its longer side is image_size, the aspect kept (image_io.working_size), for the model to cut into tiles.

    Ground-truth masks are brought onto the same grid, as each protocol defines them:
    - paper: defective where the mask is at half its value range or more; resized with
      nearest-neighbour, so defects keep their edges and thin defects survive;
    - official: the released code's chain, applied to the mask as PIL opens it: the image's own
      Resize (bilinear with antialiasing; PIL uses nearest for mode '1' and 'P' images whatever
      is asked), CenterCrop and ToTensor, then only pixels at exactly 1.0 count (their
      astype(int)), so defect edges, and defects thinner than a few pixels, count as normal.
    """

    def __init__(self, resize: int, image_size: int, protocol: str = "paper", crop: str = "center", tile_size: int = 0) -> None:
        self.protocol, self.image_size, self.tile_size = protocol, image_size, tile_size

        def geometry(interpolation: InterpolationMode) -> list:
            if crop == "center":
                return [transforms.Resize(resize, interpolation), transforms.CenterCrop(image_size)]
            return [transforms.Resize((image_size, image_size), interpolation)]

        bilinear = geometry(InterpolationMode.BILINEAR)  # torchvision's default, antialiased on PIL images
        self._image = transforms.Compose([*bilinear, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self._nearest = transforms.Compose(geometry(InterpolationMode.NEAREST))
        self._official_mask = transforms.Compose([*bilinear, transforms.ToTensor()])

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the model's input for an image of `size` (width, height)."""
        return working_size(size, self.image_size) if self.tile_size else (self.image_size, self.image_size)

    def image(self, image: Image.Image) -> torch.Tensor:
        if self.tile_size:  # the working size, aspect kept: bilinear with antialiasing, as the other geometries
            w, h = self.input_size(image.size)
            image = transforms.functional.resize(image, [h, w], InterpolationMode.BILINEAR, antialias=True)
            return transforms.functional.normalize(transforms.functional.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
        return self._image(image)

    def mask(self, mask: Image.Image, image_size: tuple[int, int]) -> torch.Tensor:
        """[1, S, S] float 0/1 on the model's input grid, from a mask as opened (`image_size`: its image's (w, h))."""
        if self.tile_size:  # the paper's rule at the working size (tiles are paper-protocol only)
            defective = Image.fromarray(_half_range_mask(mask, image_size)).resize(self.input_size(image_size), Image.Resampling.NEAREST)
            return torch.from_numpy(np.array(defective)).float()[None]
        if self.protocol == "official":
            return (self._official_mask(mask)[:1] >= 1).float()
        defective = Image.fromarray(_half_range_mask(mask, image_size))  # mode '1', kept 0/1 by the nearest-neighbour geometry
        return torch.from_numpy(np.array(self._nearest(defective))).float()[None]

    def original_mask(self, mask: Image.Image, image_size: tuple[int, int]) -> np.ndarray:
        """bool [h, w] at the image's own size (w, h), by the protocol's rule without its geometry: paper, at half
        range or more; official, at exactly 1.0 after ToTensor (a mask of another size is resized nearest first)."""
        if self.protocol == "official":
            if mask.size != image_size:
                mask = mask.resize(image_size, Image.Resampling.NEAREST)
            return (transforms.functional.to_tensor(mask)[0] >= 1).numpy()
        return _half_range_mask(mask, image_size)


def _half_range_mask(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """bool [h, w] at `size` (w, h): defective where the mask is at half its value range or more
    (the paper protocol), read in 8 bits; a mask of another size is resized nearest-neighbour first."""
    mask = to_8bit(mask).convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return np.asarray(mask) >= 128


# ---------------------------------------------------------------------- layouts
VISA_CSV = Path("split_csv") / "1cls.csv"
LAYOUT_HELP = (
    "expected MVTec AD or a folder of your own parts (<category>/train/good/, <category>/test/<good|defect>/, "
    "optional <category>/ground_truth/<defect>/<name>_mask.png), VisA (split_csv/1cls.csv), or MVTec AD 2 "
    "(<scene>/train/good/, <scene>/validation/good/, <scene>/test_public/)"
)
AD2_SPLITS = {"train": "train", "validation": "validation", "test": "test_public", "test_private": "test_private",
              "test_private_mixed": "test_private_mixed"}  # fmt: skip
PRIVATE_SPLITS = ("test_private", "test_private_mixed")


@dataclass(frozen=True)
class Sample:
    image: Path
    defect: str  # "good" or the defect type
    mask: Path | None  # None: no ground truth for this image


def find_layout(root: Path) -> str:
    """'visa' when root holds VisA's split_csv/1cls.csv; 'mvtec_ad2' when a category folder holds test_public/; else
    'folder' (MVTec AD's layout, masks optional)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data_path {root} does not exist or is not a folder: point it at the data set's folder")
    if (root / VISA_CSV).is_file():
        return "visa"
    scenes = [p for p in root.iterdir() if p.is_dir() and (p / "train").is_dir()]
    if any((p / "test_public").is_dir() for p in scenes):
        return "mvtec_ad2"
    if scenes:
        return "folder"
    raise DataError(f"--data_path {root} matches no known layout: {LAYOUT_HELP}")


def _visa_rows(root: Path) -> list[dict]:
    """VisA's split_csv/1cls.csv: object, split, label (normal/anomaly), image, mask; paths relative to root.
    Read and checked once per version of the file (its size and modification time), not per category and split."""
    stat = (root / VISA_CSV).stat()
    return _read_visa_csv(Path(root).resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_visa_csv(root: Path, mtime_ns: int, size: int) -> list[dict]:
    path = root / VISA_CSV
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"object", "split", "label", "image", "mask"}
    if not rows or not needed <= set(rows[0]):
        raise DataError(f"{path} must have the columns {','.join(sorted(needed))} and at least one row")
    for line, row in enumerate(rows, start=2):
        if row["label"] not in ("normal", "anomaly") or row["split"] not in ("train", "test"):
            raise DataError(
                f"{path} line {line}: label {row['label']!r}, split {row['split']!r}; expected label normal or anomaly, split train or test"
            )
        for column in ("image", "mask") if row["label"] == "anomaly" else ("image",):
            if not row[column] or not (root / row[column]).is_file():
                raise DataError(f"{path} line {line}: the {column} file {root / row[column]} does not exist")
    return rows


def list_categories(root: Path) -> list[str]:
    """The categories found under root, in the layout it has."""
    root = Path(root)
    if find_layout(root) == "visa":
        return sorted({row["object"] for row in _visa_rows(root)})
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())


def resolve_categories(root: Path, spec: str) -> list[str]:
    """'all', one name or a comma list -> category names, each checked to exist under root."""
    found = list_categories(root)
    if spec == "all":
        return found
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    missing = [name for name in wanted if name not in found]
    if missing or not wanted:
        raise DataError(f"--category {','.join(missing) or spec!r} not found under {root}; found: {', '.join(found) or 'none'}")
    return wanted


def _folder_samples(root: Path, category: str, split: str) -> list[Sample]:
    """MVTec AD's layout, which is also the layout for one's own parts. Masks are paired by file
    name, never by list position; a defect type without a ground_truth/<defect>/ folder has none."""
    folder = root / category / split
    if not folder.is_dir():
        raise DataError(f"{folder} is missing: {LAYOUT_HELP}")
    samples = []
    defect_types = ["good"] if split == "train" else sorted(p.name for p in folder.iterdir() if p.is_dir())
    for defect in defect_types:
        if not (folder / defect).is_dir():
            continue
        masks = root / category / "ground_truth" / defect
        for path in image_files(sorted(p for p in (folder / defect).iterdir() if p.is_file()), folder / defect):
            mask = None
            if defect != "good" and masks.is_dir():
                mask = masks / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise DataError(f"defect image {path} has no mask: expected {mask} (or no {masks} folder at all)")
            samples.append(Sample(path, defect, mask))
    if not samples:
        where = folder / "good" if split == "train" else folder
        raise DataError(f"no images in {where}: expected {'/'.join(IMAGE_EXTENSIONS)} files there")
    return samples


def _ad2_samples(root: Path, scene: str, split: str) -> list[Sample]:
    """MVTec AD 2: train/good; validation/good (thresholds); test_public's good and bad, each bad image with its mask
    in test_public/ground_truth/bad/ (paired by name); the private splits' images, unlabelled (defect '?')."""
    folder = root / scene / AD2_SPLITS[split]
    if split == "validation" and not (folder / "good").is_dir():
        raise DataError(f"{folder / 'good'} is missing: MVTec AD 2 sets thresholds on validation/good images only; "
                        "restore the scene's validation/ folder as the data set ships it")  # fmt: skip
    if not folder.is_dir():
        raise DataError(f"{folder} is missing: {LAYOUT_HELP}")
    if split in PRIVATE_SPLITS:
        samples = [Sample(path, "?", None) for path in image_files(sorted(p for p in folder.rglob("*") if p.is_file()), folder)]
    else:
        samples = []
        for defect in ("good",) if split != "test" else ("good", "bad"):
            masks = folder / "ground_truth" / "bad"
            for path in image_files(sorted(p for p in (folder / defect).glob("*") if p.is_file()), folder / defect):
                mask = masks / f"{path.stem}_mask.png" if defect == "bad" else None
                if mask is not None and not mask.is_file():
                    raise DataError(f"defect image {path} has no mask: expected {mask}")
                samples.append(Sample(path, defect, mask))
    if not samples:
        raise DataError(f"no images in {folder}: expected {'/'.join(IMAGE_EXTENSIONS)} files there")
    for sample in samples:  # the benchmark's metrics are at the image's own resolution: a mask must be its image's size
        if sample.mask is not None and header_size(sample.mask) != header_size(sample.image):
            (w, h), (mw, mh) = header_size(sample.image), header_size(sample.mask)
            raise DataError(f"mask {sample.mask} is {mw}x{mh} pixels but its image {sample.image.name} is {w}x{h}: "
                            "MVTec AD 2 scores every pixel at the image's own size; give each image a mask of its size")  # fmt: skip
    return samples


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header."""
    with Image.open(path) as image:
        return image.size


def _visa_samples(root: Path, category: str, split: str) -> list[Sample]:
    """VisA: one defect type, 'anomaly'; its masks mark defects with any non-zero value (often 1)."""
    rows = [r for r in _visa_rows(root) if r["object"] == category and r["split"] == split]
    if not rows:
        raise DataError(f"{root / VISA_CSV} lists no {split} images of {category!r}")
    return [
        Sample(root / r["image"], "good" if r["label"] == "normal" else "anomaly", root / r["mask"] if r["mask"] else None) for r in rows
    ]


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """Preprocess's normalised [3, H, W] image tensor back to [H, W, 3] floats in 0..255."""
    return np.clip((image.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255, 0, 255)


class CategoryDataset(torch.utils.data.Dataset):
    """One category's train or test split, in the layout found under root.

    Items: (image [3,S,S], label 0/1, mask [1,S,S] (zeros where there is no ground truth), path
    relative to root, defect type). Images are decoded and brought to the model's input one at a
    time, in the DataLoader's workers; no full-size image is kept.
    """

    def __init__(self, root: str | Path, category: str, split: str, transform: Preprocess) -> None:
        self.root_path, self.category, self.split = Path(root), category, split
        self.transform = transform
        self.layout = find_layout(self.root_path)
        splits = AD2_SPLITS if self.layout == "mvtec_ad2" else ("train", "test")
        if split not in splits:
            raise DataError(f"the {self.layout} layout has no {split!r} split; it has {', '.join(splits)}")
        read = {"visa": _visa_samples, "mvtec_ad2": _ad2_samples}.get(self.layout, _folder_samples)
        self.samples = read(self.root_path, category, split)
        for sample in self.samples:
            check_readable(sample.image)
            if sample.mask is not None:
                check_readable(sample.mask)
        self.input_sizes = input_sizes([s.image for s in self.samples], transform, f"{category}'s {split} images")

    @property
    def unmasked_defects(self) -> list[str]:
        """Defect types with images that have no ground-truth mask (pixel metrics need them all)."""
        return sorted({s.defect for s in self.samples if s.defect != "good" and s.mask is None})

    def few_shot(self, shots: int, seed: int) -> CategoryDataset:
        """A copy holding `shots` of these images, drawn without replacement with `seed` (in file order)."""
        if not 0 < shots <= len(self.samples):
            raise DataError(
                f"--shots {shots}: {self.category}'s {self.split} split holds {len(self.samples)} images; give 1 to {len(self.samples)}"
            )
        chosen = sorted(np.random.default_rng(seed).choice(len(self.samples), shots, replace=False).tolist())
        subset = copy.copy(self)
        subset.samples = [self.samples[i] for i in chosen]
        return subset

    def relative_path(self, idx: int) -> str:
        return self.samples[idx].image.relative_to(self.root_path).as_posix()

    def original_size(self, idx: int) -> tuple[int, int]:
        """(width, height) of the image file, read from its header."""
        return header_size(self.samples[idx].image)

    def original_mask(self, idx: int) -> np.ndarray:
        """bool [h, w] at the image's own size, by the protocol's rule (Preprocess.original_mask; VisA: non-zero
        marks a defect); all False without a mask."""
        sample, size = self.samples[idx], self.original_size(idx)
        if sample.mask is None:
            return np.zeros(size[::-1], bool)
        return self.transform.original_mask(self._mask_image(sample), size)

    def original(self, idx: int) -> tuple[Image.Image, np.ndarray | None]:
        """The image at its own resolution, and its mask there, if it has one."""
        return load_rgb(self.samples[idx].image), None if self.samples[idx].mask is None else self.original_mask(idx)

    def _mask_image(self, sample: Sample) -> Image.Image:
        """The mask as stored; VisA's (defective where non-zero) made 0/255 first, so that both protocols read it as they read MVTec's."""
        mask = open_image(sample.mask)
        if self.layout == "visa":
            mask = Image.fromarray(((np.asarray(to_8bit(mask).convert("L")) > 0) * 255).astype(np.uint8))
        return mask

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int, torch.Tensor, str, str]:
        sample = self.samples[idx]
        rgb = load_rgb(sample.image)
        image = self.transform.image(rgb)
        if sample.mask is None:
            mask = torch.zeros(1, *image.shape[-2:])
        else:
            mask = self.transform.mask(self._mask_image(sample), rgb.size)
        return image, int(sample.defect != "good"), mask, self.relative_path(idx), sample.defect


def input_sizes(paths: list[Path], transform: Preprocess, what: str) -> set[tuple[int, int]]:
    """The model-input sizes (width, height) the images at `paths` take, from their headers. With tiles, an image
    whose input would be smaller than a tile is a DataError, said before any work starts."""
    if not transform.tile_size:
        return {(transform.image_size, transform.image_size)}
    sizes = {transform.input_size(header_size(path)) for path in paths}
    small = sorted(size for size in sizes if min(size) < transform.tile_size)
    if small:
        raise DataError(f"--tile_size {transform.tile_size} is larger than the image: {what} become {small[0][0]}x{small[0][1]} "
                        f"pixels at --image_size {transform.image_size}: lower --tile_size, or raise --image_size")  # fmt: skip
    return sizes


class ImageFiles(torch.utils.data.Dataset):
    """Unlabelled images, for scoring new parts: items are (image [3,S,S], index)."""

    def __init__(self, paths: list[Path], transform: Preprocess) -> None:
        self.paths, self.transform = paths, transform
        self.input_sizes = input_sizes(paths, transform, "the images")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.transform.image(load_rgb(self.paths[idx])), idx
