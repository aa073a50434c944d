"""An exported PatchCore model (patchcore.onnx, written by onnx_export.py) read and run without torch:
its metadata checked, then onnxruntime or OpenVINO. This file is the export's contract, as bank.py is
the memory bank's: the names below are what onnx_export.py writes and what any caller reads.

The graph, B images a call (any B), H = W = the bank's image_size, or, for a bank trained with tile_size, the size
(width, height) its training images took, preprocessing's input_size:
  input    images             uint8 [B, H, W, 3]  RGB, height x width x channel, already resized and cropped
                                                   as PREPROCESSING says (image_io.model_input does it in Python)
  outputs  scores             float32 [B]          image scores, as PatchCore.predict gives them
           maps               float32 [B, H, W]    anomaly maps, blurred, as PatchCore.predict gives them
           normalized_scores  float32 [B]          scores / the calibrated image threshold (1.0 or more: defective)
           decisions          bool [B]             true: defective (score >= the image threshold)
           defect_masks       bool [B, H, W]       true: the pixel is at or above the pixel threshold
  The last three exist only where the bank has calibrated thresholds (metadata 'patchcore.calibration').

Metadata (ONNX metadata_props, each a string; JSON where marked). A reader needs REQUIRED_METADATA (format,
format_version, preprocessing, config, calibration) and refuses a file without one of them, naming it:
  patchcore.format, patchcore.format_version   FORMAT, FORMAT_VERSION
  patchcore.preprocessing                      JSON: input layout and input_size, resize, crop, image_size, tile_size,
                                               filter, mean, std
  patchcore.config                             JSON: the bank's PatchCoreConfig
  patchcore.calibration                        JSON: the bank's calibration (thresholds, how), or why there is none
  patchcore.image_threshold, patchcore.pixel_threshold   the thresholds the outputs decide with, or absent
  patchcore.outputs                            JSON: each output's meaning
  patchcore.weights, patchcore.backbone_sha256 the backbone weights and their hash, as the bank records them
  patchcore.bank_format_version, patchcore.bank_sha256, patchcore.category   the bank exported
  patchcore.search                             how the graph searches the bank
  patchcore.project_version, patchcore.torch_version   what exported it
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT = "patchcore-onnx"
FORMAT_VERSION = 1
MODEL_FILE = "patchcore.onnx"
INPUT = "images"
OUTPUTS = ("scores", "maps")
DECISION_OUTPUTS = ("normalized_scores", "decisions", "defect_masks")  # where the bank has calibrated thresholds
RUNTIMES = ("onnxruntime", "openvino")
KEY = "patchcore."  # the prefix of every metadata key
REQUIRED_METADATA = ("format", "format_version", "preprocessing", "config", "calibration")  # what a caller reads; KEY before each
PREPROCESSING_FIELDS = ("resize", "image_size", "crop")  # what image_io.model_input needs of 'patchcore.preprocessing'


class ExportError(Exception):
    """An exported model file is missing, damaged, not a PatchCore export, or cannot be run here."""


def model_path(output_dir: str | Path, category: str) -> Path:
    """Where export.py writes a category's model: OUTPUT_DIR/<category>/patchcore.onnx, beside its memory bank."""
    return Path(output_dir) / category / MODEL_FILE


class DeployedModel:
    """An exported model on onnxruntime or OpenVINO: model(images uint8 [B, S, S, 3]) -> {output name: array}.

    OpenVINO runs with inference precision f32: its CPU plugin otherwise picks bf16 on CPUs that have
    AVX-512-BF16 or AMX, which moves the scores by about 1e-3 relative (docs/architecture.md, Deploying).
    """

    def __init__(self, path: str | Path, runtime: str = "onnxruntime") -> None:
        self.path, self.runtime = Path(path), runtime
        if runtime not in RUNTIMES:
            raise ExportError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if not self.path.is_file():
            raise ExportError(f"no exported model at {self.path}: run `python export.py --output_dir DIR --category NAME` first")
        again = "export it again with export.py"
        if runtime == "onnxruntime":
            try:
                import onnxruntime
            except ImportError as err:
                raise ExportError(f"onnxruntime is not installed ({err}): pip install -r requirements-deploy.txt") from err
            try:
                self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            except Exception as err:
                raise ExportError(f"{self.path} is not a readable ONNX file ({first_line(err)}); {again}") from err
            self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
            self.output_names = [o.name for o in self.session.get_outputs()]
        else:
            try:
                import openvino
            except ImportError as err:
                raise ExportError(f"OpenVINO is not installed ({err}): pip install openvino, or use --runtime onnxruntime") from err
            core = openvino.Core()
            try:
                model = core.read_model(str(self.path))
            except Exception as err:
                raise ExportError(f"{self.path} is not a readable ONNX file ({first_line(err)}); {again}") from err
            framework = model.get_rt_info()["framework"] if "framework" in model.get_rt_info() else {}
            self.metadata = {key: model.get_rt_info(["framework", key]).astype(str) for key in framework}
            self.output_names = [o.get_any_name() for o in model.outputs]
            self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self._check(again)
        self.config, self.preprocessing, self.calibration = (self._json(name, again) for name in ("config", "preprocessing", "calibration"))
        lacking = [name for name in PREPROCESSING_FIELDS if name not in self.preprocessing]
        if lacking:
            raise ExportError(f"{self.path}: its metadata '{KEY}preprocessing' lacks {', '.join(lacking)}; {again}")
        self.image_size, self.tile_size = int(self.preprocessing["image_size"]), int(self.preprocessing.get("tile_size", 0))
        width, height = self.preprocessing.get("input_size", (self.image_size, self.image_size))
        self.input_size = (int(height), int(width))  # (height, width) of the input
        self.image_threshold, self.pixel_threshold = (self._number(name, again) for name in ("image_threshold", "pixel_threshold"))
        if any(name in self.output_names for name in DECISION_OUTPUTS) and self.image_threshold is None:
            raise ExportError(f"{self.path} has decision outputs but no '{KEY}image_threshold' metadata; {again}")

    def _check(self, again: str) -> None:
        if self.metadata.get(KEY + "format") != FORMAT:
            raise ExportError(f"{self.path} is not a PatchCore export (no '{KEY}format: {FORMAT}' metadata), or a truncated one; {again}")
        version = self.metadata.get(KEY + "format_version")
        if version != str(FORMAT_VERSION):
            raise ExportError(f"{self.path} is export format {version}, this code reads {FORMAT_VERSION}; {again}")
        absent = [KEY + name for name in REQUIRED_METADATA if KEY + name not in self.metadata]
        if absent:
            raise ExportError(f"{self.path} lacks the metadata {', '.join(absent)}, which every export has; {again}")
        missing = [name for name in OUTPUTS if name not in self.output_names]
        if missing:
            raise ExportError(f"{self.path} lacks the output(s) {', '.join(missing)}; {again}")

    def _json(self, name: str, again: str) -> dict:
        """A JSON object of the metadata, or a one-line ExportError naming the key."""
        try:
            value = json.loads(self.metadata[KEY + name])
        except ValueError as err:
            raise ExportError(f"{self.path}: its metadata '{KEY}{name}' is not valid JSON ({err}); {again}") from err
        if not isinstance(value, dict):
            raise ExportError(f"{self.path}: its metadata '{KEY}{name}' is not a JSON object; {again}")
        return value

    def _number(self, name: str, again: str) -> float | None:
        """An optional number of the metadata (a threshold), or a one-line ExportError naming the key."""
        text = self.metadata.get(KEY + name)
        if text is None:
            return None
        try:
            return float(text)
        except ValueError as err:
            raise ExportError(f"{self.path}: its metadata '{KEY}{name}' is not a number ({text!r}); {again}") from err

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for a batch of model inputs, uint8 [B, H, W, 3]."""
        expected = (*self.input_size, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ExportError(f"the model takes uint8 images [B, {', '.join(map(str, expected))}], got {images.dtype} {list(images.shape)}")
        if self.runtime == "onnxruntime":
            return dict(zip(self.output_names, self.session.run(None, {INPUT: images})))
        result = self.compiled({INPUT: images})
        return {name: np.asarray(result[i]) for i, name in enumerate(self.output_names)}


def first_line(err: BaseException) -> str:
    """An exception's message on one line, shortened: runtimes' messages run over many lines."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
