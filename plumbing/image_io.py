"""Image files in and out with PIL and numpy only, no torch: shared by dataset.py and the torch-free
runner (predict_onnx.py).

  load_rgb      any PNG/JPEG/BMP/TIFF (grey, RGBA, palette, 16-bit) as 8-bit RGB
  find_images   the image files of a folder or a glob, each checked readable
  working_size  a tiled model's input size for an image
  model_input   an image on the model's input grid as uint8, exactly as dataset.Preprocess resizes and crops it
  heatmap_panel input | heatmap | predicted region | colour bar, drawn without matplotlib (evaluate.py's and the runner's)
  heatmap_names the heatmap file of each image (evaluate.py's and the runner's)
  resize_map    an anomaly map resized onto its original image (torch's bilinear rule, without torch): evaluate.py's and the runner's
"""

from __future__ import annotations

import glob
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ALIGN = 32  # tiled inputs' sides are multiples of it, as tiles and overlaps are: every layer's grid (stride 8 to 32) then aligns


class DataError(Exception):
    """The data on disk is not what MVTec's layout promises."""


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": how older Pillow versions open a 16-bit PNG
# The rule to_8bit follows, for the exported model's metadata (onnx_export.py) so that a caller in another language can follow it
COLOR_RULE = (
    "8-bit RGB. The 8-bit value of a 16-bit grey image (PIL modes I;16, I;16B, I;16L, I;16N, and I, PIL's 32-bit integer "
    "mode, read as 16-bit) is (v + 128) // 257 in integers, i.e. v * 255 / 65535 rounded half up, after clipping v to "
    "0..65535: by the mode, whatever the image holds, so 65535 -> 255, 32768 -> 128, 200 -> 1. A 32-bit float grey "
    "image (mode F) is read on 0..1: floor(clip(v, 0, 1) * 255 + 0.5). Then grey, palette and RGBA (alpha dropped) "
    "become RGB with PIL's convert('RGB')"
)


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel images rescaled to 8 bits by their mode, never by what they hold (COLOR_RULE):
    integer modes as 16-bit, (v + 128) // 257 after clipping to 0..65535, which rounds v * 255 / 65535 half up;
    float images on 0..1, floor(clip(v, 0, 1) * 255 + 0.5). Other modes as they are."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8))
    if image.mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
        return Image.fromarray(np.floor(values * 255.0 + 0.5).astype(np.uint8))
    return image


def open_image(path: Path) -> Image.Image:
    """An image file, fully read, in the mode it is stored in. A file that cannot be decoded (a truncated JPEG,
    which check_readable cannot see: PIL's verify() checks nothing for JPEG) is a DataError naming it."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as err:
        raise DataError(f"cannot read image {path} ({err}): replace or remove the file") from err
    return image


def load_rgb(path: Path) -> Image.Image:
    """Any PNG/JPEG/BMP/TIFF (grey, RGBA, palette, 16-bit) as 8-bit RGB."""
    return to_8bit(open_image(path)).convert("RGB")


def image_files(candidates: list[Path], where: object) -> list[Path]:
    """The image files among `candidates`, with one note on stderr for the other files skipped."""
    images = [p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS]
    if len(images) < len(candidates):
        print(f"note: skipped {len(candidates) - len(images)} non-image file(s) in {where}", file=sys.stderr)
    return images


def check_readable(path: Path) -> None:
    """A cheap full read of the file's structure, so a broken image stops the run before any heavy work."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:
        raise DataError(f"cannot read image {path} ({err}): replace or remove the file") from err


def find_images(spec: str) -> list[Path]:
    """Image files of a folder, or matching a glob pattern ('**' recurses); each checked readable."""
    folder = Path(spec)
    if folder.is_dir():
        candidates = sorted(p for p in folder.iterdir() if p.is_file())
    else:
        candidates = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    images = image_files(candidates, spec)
    if not images:
        raise DataError(f"--images {spec}: no {'/'.join(IMAGE_EXTENSIONS)} files there; give a folder or a glob such as 'dir/*.png'")
    for path in images:
        check_readable(path)
    return images


def working_size(size: tuple[int, int], longer: int) -> tuple[int, int]:
    """(width, height) of an image of `size` (width, height) resized so that its longer side is `longer`, the aspect
    kept, each side rounded to a multiple of ALIGN (at least ALIGN): a tiled model's input (method/tiles.py)."""
    scale = longer / max(size)
    return tuple(max(ALIGN, round(side * scale / ALIGN) * ALIGN) for side in size)


def model_input(image: Image.Image, resize: int, image_size: int, crop: str, tile_size: int = 0) -> np.ndarray:
    """An 8-bit RGB image on the model's input grid, uint8 [height, width, 3]: what dataset.Preprocess makes of it
    before ToTensor and Normalize (which an exported graph does itself), pixel for pixel.

    crop 'center': torchvision's Resize(resize) on a PIL image: the shorter side to `resize`, the longer to
    int(resize * long / short), with PIL's BILINEAR (antialiased when shrinking), skipped when the size is already
    right; then CenterCrop(image_size): offsets int(round((side - image_size) / 2)), Python's round (half to even).
    crop 'none': the whole image resized to image_size x image_size the same way; with tile_size, to its working
    size instead (working_size: the longer side image_size, the aspect kept).
    """
    width, height = image.size
    if crop == "none":
        size = working_size(image.size, image_size) if tile_size else (image_size, image_size)
    else:
        short, long = min(width, height), max(width, height)
        new_short, new_long = resize, int(resize * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    if crop == "center":
        width, height = image.size
        top, left = int(round((height - image_size) / 2.0)), int(round((width - image_size) / 2.0))
        image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


# matplotlib's 'jet' colour map, its segments written out: (position, value) per channel
_JET = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as jet colours [..., 3] in 0..255: matplotlib's segments, interpolated linearly (matplotlib
    looks the same line up in a 256-entry table)."""
    return np.stack([np.interp(values, *zip(*channel)) for channel in _JET], axis=-1) * 255


def heatmap_panel(
    rgb: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, threshold: float | None, outline: np.ndarray | None = None
) -> Image.Image:
    """[input | heatmap overlay | predicted region at the pixel threshold (when there is one) | colour bar], with PIL
    and numpy only: the one drawing of evaluate.py and the torch-free runner. rgb [H, W, 3] in 0..255; outline: bool
    [H, W], pixels drawn white on the overlay and the region (the ground truth's edge, report.mask_outline)."""
    rgb = np.asarray(rgb, np.float64)
    heat = jet(np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0, 1))
    panels = [rgb, 0.5 * rgb + 0.5 * heat]
    if threshold is not None:
        predicted = rgb.copy()
        hit = anomaly_map >= threshold
        predicted[hit] = 0.4 * predicted[hit] + 0.6 * np.array([255.0, 0, 0])
        panels.append(predicted)
    if outline is not None:
        for panel in panels[1:]:
            panel[outline] = 255
    height = rgb.shape[0]
    bar = np.full((height, 72, 3), 255.0)
    bar[:, 4:16] = jet(np.linspace(1, 0, height))[:, None, :]
    image = Image.fromarray(np.concatenate([*panels, bar], axis=1).astype(np.uint8))
    draw, x = ImageDraw.Draw(image), sum(p.shape[1] for p in panels)
    draw.text((x + 19, 0), f"{vmax:.3g}", fill=(0, 0, 0))
    draw.text((x + 19, height - 11), f"{vmin:.3g}", fill=(0, 0, 0))
    if threshold is not None and vmax > vmin:
        y = int(round((vmax - threshold) / (vmax - vmin) * (height - 1)))
        draw.line((x, y, x + 18, y), fill=(0, 0, 0), width=2)
        draw.text((x + 19, min(max(y - 5, 12), height - 23)), f"thr {threshold:.3g}", fill=(0, 0, 0))
    return image


def heatmap_names(images: list[Path]) -> list[Path]:
    """Each image's heatmap name beside its folder: <stem>.png, or <name>.png where two images of one folder share a
    stem (a.png and a.jpg), so that neither overwrites the other's heatmap. The one naming rule of evaluate.py (test
    split and --images) and the torch-free runner."""
    stems = Counter(p.with_suffix("") for p in images)
    return [p.with_suffix(".png") if stems[p.with_suffix("")] == 1 else p.with_name(p.name + ".png") for p in images]


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and the second one's weight along one axis, as torch's bilinear (align_corners=False) finds
    them: output pixel i samples x = max(scale * (i + 0.5) - 0.5, 0), scale = n_in / n_out, both rounded to float32 as
    torch rounds them, between its two neighbours (the last one repeated at the edge)."""
    scale = np.float64(np.float32(n_in / n_out))
    x = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32), np.float32(0))
    first = np.minimum(np.floor(x).astype(np.int64), n_in - 1)
    return first, np.minimum(first + 1, n_in - 1), np.clip(x - first.astype(np.float32), 0, 1).astype(np.float64)


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An [H, W] anomaly map resized bilinearly to size (width, height), e.g. back onto the original image, float32:
    torch's F.interpolate(mode='bilinear', align_corners=False), no antialiasing: its sample positions, then the
    weighted sums in float64 with numpy.
    The one map resize of evaluate.py and the runner (tests/test_export.py checks it against torch's)."""
    rows, cols = _bilinear_axis(anomaly_map.shape[0], size[1]), _bilinear_axis(anomaly_map.shape[1], size[0])
    values = np.asarray(anomaly_map, np.float64)
    across = values[:, cols[0]] * (1 - cols[2]) + values[:, cols[1]] * cols[2]
    return (across[rows[0]] * (1 - rows[2])[:, None] + across[rows[1]] * rows[2][:, None]).astype(np.float32)
