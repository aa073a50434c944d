"""A memory bank as one ONNX file that scores as PatchCore.predict does, for runtimes without torch.

export_onnx(bank, output) rebuilds the model from the bank (PatchCore.from_bank), gives its AnomalyScorer a
GraphSearch (ExactSearch, certified exact, as one custom operation per block of patches in a scan), wraps it with
the input step and the decisions (DeployedScorer), exports that with torch's ONNX exporter (torch.onnx.export(dynamo=True),
onnxscript; onnx_search.py writes the search's operation in ONNX ops), writes the metadata, runs the file once with onnxruntime
against predict() and only then renames it into place. The scoring itself is patchcore.py's; nothing here
re-implements it. onnx_model.py holds the file's contract (input, outputs, metadata keys) and reads it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import functional as TF

from dataset import IMAGENET_MEAN, IMAGENET_STD
from deploy.onnx_model import DECISION_OUTPUTS, FORMAT, FORMAT_VERSION, INPUT, KEY, OUTPUTS, DeployedModel, ExportError
from deploy.onnx_search import translation_table
from method.search import GROUP, GraphSearch, block_rows
from method.tiles import stitched_patches
from patchcore import AnomalyScorer, PatchCore
from plumbing.bank import FORMAT_VERSION as BANK_FORMAT_VERSION
from plumbing.bank import BankError, load_bank
from plumbing.image_io import COLOR_RULE
from plumbing.system import warn_once

PROTOBUF_LIMIT = 2**31  # bytes: one protobuf file holds at most 2 GB; a larger model keeps its tensors in a .data file beside it
BLOCK_BYTES = 2**28  # the largest scan block [rows, M] float32 the graph's search holds at once
SINGLE_MODEL_SECTIONS = {"format", "format_version", "sha256", "config", "model", "calibration", "category", "train", "environment"}
CHECK_IMAGES = 2  # images the written file is run on, against predict(), before it is renamed into place
CHECK_TOLERANCE = 1e-4  # relative to the largest value; measured on the tests' banks: below 1e-6 against the torch search


class DeployedScorer(torch.nn.Module):
    """uint8 RGB images [B, H, W, 3] -> dataset.Preprocess's ToTensor and Normalize -> AnomalyScorer -> scores [B],
    maps [B, H, W], and, given thresholds, normalized scores, decisions and defect masks (onnx_model.py). H = W = S
    (image_size), or, for a tiled bank, the working size its training images took: every tile of an image goes through
    the backbone in one run and the stitched grid is scored (AnomalyScorer scores tile by tile, which a graph of one
    input size does not need; the scores are the same).

    The decisions compare the float32 scores and maps with the thresholds rounded to float32, as evaluate.py
    --images does (NumPy compares a float32 score with a Python float in float32)."""

    def __init__(self, scorer: AnomalyScorer, image_threshold: float | None, pixel_threshold: float | None) -> None:
        super().__init__()
        self.scorer = scorer
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.image_threshold, self.pixel_threshold = image_threshold, pixel_threshold

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.permute(0, 3, 1, 2).float().div(255)  # torchvision's ToTensor
        x = x.sub(self.mean).div(self.std)  # torchvision's Normalize
        if self.scorer.config.tile_size:
            tile, overlap, cell, _ = self.scorer.features.tiling()
            patches, grid = stitched_patches(self.scorer.features.untiled, x, tile, overlap, cell, group=None)
            scores, maps = self.scorer.score(patches, grid, tuple(x.shape[-2:]))
        else:
            scores, maps = self.scorer(x)
        if self.image_threshold is None:
            return scores, maps
        return scores, maps, scores / self.image_threshold, scores >= self.image_threshold, maps >= self.pixel_threshold


def check_single_model(path: Path, header: dict) -> None:
    """Refuse, in one line, a bank whose header is not one model's (an ensemble's, say): the graph is one AnomalyScorer."""
    if isinstance(header.get("members"), list):
        raise BankError(
            f"{path} holds an ensemble of {len(header['members'])} networks: export.py exports one model's bank as one scoring "
            "graph, and ensembles cannot be exported yet; export a single-network bank, or score with evaluate.py --images"
        )
    if (header.get("config") or {}).get("tile_size") and "input_size" not in (header.get("train") or {}):
        raise BankError(
            f"{path} was trained with --tile_size before banks recorded their training images' size, which the exported "
            "graph takes as its input: run train.py again"
        )
    extra = sorted(set(header) - SINGLE_MODEL_SECTIONS)
    if extra or not isinstance(header.get("config"), dict) or not isinstance(header.get("model"), dict):
        raise BankError(
            f"{path} is not a single model's memory bank (sections {', '.join(extra) or 'config/model missing'}): "
            "export.py exports one model's bank; ensembles cannot be exported yet"
        )


def project_version() -> str:
    """The git commit this code is at (with '-dirty' for uncommitted changes), or 'unknown' outside a checkout."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True, text=True,
                                   cwd=Path(__file__).resolve().parent, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return described.stdout.strip() if described.returncode == 0 and described.stdout.strip() else "unknown"


def input_size(model: PatchCore) -> tuple[int, int]:
    """(height, width) of the graph's input: the square image_size, or a tiled bank's training images' working size."""
    width, height = model.train_facts["input_size"] if model.config.tile_size else (model.config.image_size,) * 2
    return height, width


def metadata(model: PatchCore, header: dict, search: GraphSearch) -> dict[str, str]:
    """The file's metadata_props (onnx_model.py lists the keys)."""
    config, calibration = model.config, model.calibration
    height, width = input_size(model)
    outputs = {
        "scores": "float32 [B]: image scores, as PatchCore.predict gives them"
        + (" (squared L2 distances: --protocol official)" if config.protocol == "official" else " (L2 distances, Eq. 6)"),
        "maps": f"float32 [B, {height}, {width}]: anomaly maps, blurred, as PatchCore.predict gives them",
    }
    calibrated = calibration.calibrated
    if calibrated:
        outputs.update(
            normalized_scores="float32 [B]: scores / patchcore.image_threshold; 1.0 or more is defective",
            decisions="bool [B]: true = defective, score >= patchcore.image_threshold (compared in float32)",
            defect_masks="bool [B, S, S]: true = the map is at or above patchcore.pixel_threshold (compared in float32)",
        )
    preprocessing = {
        "input": f"uint8 RGB, [batch, {height}, {width}, 3] (height, width, channel), 0..255",
        "input_size": [width, height],
        "resize": config.resize,
        "image_size": config.image_size,
        "crop": config.crop,
        "tile_size": config.tile_size,
        "geometry": (
            f"the shorter side resized to {config.resize} (the longer to int({config.resize} * long / short)), then the central "
            f"{config.image_size} x {config.image_size} cut out at offsets int(round((side - {config.image_size}) / 2)), "
            "rounding half to even"
            if config.crop == "center"
            else f"the whole image resized to {width} x {height}: the longer side to {config.image_size}, each side "
            f"round(side * {config.image_size} / longer / 32) * 32 (at least 32), which only images of the training images' "
            f"aspect make; the graph cuts it into tiles of {config.tile_size} pixels overlapping by {config.tile_overlap}"
            if config.tile_size
            else f"the whole image resized to {config.image_size} x {config.image_size}, aspect not kept"
        ),
        "filter": "PIL's Image.resize with Image.BILINEAR (antialiased when shrinking) on the 8-bit RGB image; none when the size is right",
        "color": COLOR_RULE,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "in_graph": "x / 255, then (x - mean) / std per channel (torchvision's ToTensor and Normalize)",
    }
    properties = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "preprocessing": json.dumps(preprocessing),
        "config": json.dumps(config.to_dict()),
        "calibration": json.dumps(calibration.to_dict()),
        "outputs": json.dumps(outputs),
        "weights": model.weights,
        "backbone_sha256": model.backbone_sha256,
        "backbone_precision": "fp32",
        "bank_format_version": str(BANK_FORMAT_VERSION),
        "bank_sha256": header["sha256"],
        "bank_rows": str(len(model.memory_bank)),
        "category": str(header.get("category", "")),
        "search": search.describe(),
        "project_version": project_version(),
        "torch_version": torch.__version__,
    }
    if calibrated:
        properties.update(
            image_threshold=repr(float(calibration.image_threshold)), pixel_threshold=repr(float(calibration.pixel_threshold))
        )
    return {KEY + key: value for key, value in properties.items()}


def deployed_scorer(model: PatchCore) -> tuple[DeployedScorer, GraphSearch]:
    """The model's scoring module with the exportable search, wrapped with the input step and the decisions."""
    search = GraphSearch(model.memory_bank.cpu(), min(GROUP, block_rows(len(model.memory_bank), BLOCK_BYTES)))
    scorer = AnomalyScorer(model.features, search, model.config)
    calibration = model.calibration
    thresholds = (calibration.image_threshold, calibration.pixel_threshold) if calibration.calibrated else (None, None)
    return DeployedScorer(scorer, *thresholds).eval(), search


def probe_images(size: tuple[int, int], n: int, seed: int = 0) -> np.ndarray:
    """n seeded random uint8 RGB images [n, H, W, 3] of size (H, W): the export's example input and its check."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *size, 3), dtype=np.uint8)


def check_against_predict(path: Path, model: PatchCore, images: np.ndarray) -> float:
    """Run the written file with onnxruntime and predict() on the same images; the largest difference of scores
    and maps, relative to the largest value. Raises ExportError beyond CHECK_TOLERANCE."""
    normalised = torch.stack([TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD) for image in images])
    expected = model.predict(normalised)
    got = DeployedModel(path)(images)
    error = max(float(np.abs(got[name] - want).max() / np.abs(want).max()) for name, want in zip(OUTPUTS, expected))
    if not error <= CHECK_TOLERANCE:
        raise ExportError(f"the exported graph does not score as predict() does (relative difference {error:.2g}); nothing was written")
    return error


def export_onnx(bank: Path, output: Path, protobuf_limit: int = PROTOBUF_LIMIT, weights: str | None = None) -> dict:
    """Write the model of memory bank `bank` to `output` (an .onnx file, with its tensors in `output`.data when
    they exceed `protobuf_limit`): atomically, checked against predict() first. weights: where the bank's backbone
    weights file is now, if it moved (the same weights: their checksum is checked). Returns what was done."""
    bank, output = Path(bank), Path(output)
    header = load_bank(bank)[1]  # a damaged or foreign bank is refused here, in one line
    check_single_model(bank, header)
    model = PatchCore.from_bank(bank, device="cpu", weights=weights)
    if model.amp != "none":  # ONNX runtimes on CPUs run convolutions in fp32, as PatchCore does where bf16/fp16 is not native
        warn_once(f"the bank's backbone runs in {model.amp} here (--amp {model.config.amp}); the exported graph runs it in fp32, "
                  "as PatchCore does where the CPU lacks it: scores differ from this machine's by about 1e-3 relative")  # fmt: skip
        model.backbone.amp = model.amp = "none"
    deployed, search = deployed_scorer(model)
    example = torch.from_numpy(probe_images(input_size(model), 2))
    names = [*OUTPUTS, *(DECISION_OUTPUTS if deployed.image_threshold is not None else ())]
    program = torch.onnx.export(
        deployed, (example,), dynamo=True, input_names=[INPUT], output_names=names, verbose=False,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), custom_translation_table=translation_table(),
    )  # fmt: skip
    program.model.metadata_props.update(metadata(model, header, search))
    program.model.doc_string = (
        f"PatchCore ({model.config.protocol} protocol) for category {header.get('category')!r}: uint8 RGB images -> "
        f"{', '.join(names)}. Metadata 'patchcore.preprocessing' says how to prepare the images."
    )
    tensor_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    external = tensor_bytes >= protobuf_limit
    data_name = f"{output.name}.data"
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        import onnx_ir

        onnx_ir.save(program.model, stage / output.name, format="protobuf", external_data=data_name if external else None)
        error = check_against_predict(stage / output.name, model, probe_images(input_size(model), CHECK_IMAGES, seed=1))
        if external:
            os.replace(stage / data_name, output.parent / data_name)
        os.replace(stage / output.name, output)  # the model file last: whoever opens it finds its data in place
        if not external:
            (output.parent / data_name).unlink(missing_ok=True)  # an earlier, larger export's tensors
    except OSError as err:
        raise OSError(f"could not write {output} ({err.strerror or err}): free some disk space or choose another --output_dir") from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    sizes = [output.stat().st_size] + ([(output.parent / data_name).stat().st_size] if external else [])
    return {
        "path": output, "data": output.parent / data_name if external else None, "bytes": sum(sizes), "tensor_bytes": tensor_bytes,
        "outputs": names, "check_error": error, "check_images": CHECK_IMAGES, "search": search.describe(),
        "config": dataclasses.asdict(model.config), "input_size": input_size(model),
    }  # fmt: skip
