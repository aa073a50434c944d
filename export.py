"""Export a category's memory bank as one ONNX file that scores as PatchCore.predict does, to run without torch.

    python export.py --output_dir results --category bottle
    python predict_onnx.py results/bottle/patchcore.onnx "line_camera/*.png"

Reads OUTPUT_DIR/<category>/memory_bank.npz (made by train.py) and writes OUTPUT_DIR/<category>/patchcore.onnx:
the backbone, the bank, the search, the maps and the decisions in one graph, with the preprocessing, config,
thresholds and versions as metadata (README, "Deploy"; onnx_model.py lists them). The file is run once with
onnxruntime against predict() before it is renamed into place; an interrupted export leaves no file.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from deploy.onnx_export import PROTOBUF_LIMIT, export_onnx
from deploy.onnx_model import model_path
from plumbing.bank import BANK_FILE, BankError, bank_path, require_banks
from plumbing.cli import ArgumentParser, run_main


def parse_args() -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output_dir", default="results", help="where train.py wrote the memory banks: OUTPUT_DIR/<category>/ (default: results)"
    )
    parser.add_argument(
        "--category", default="bottle", help="a category, a comma list, or 'all' (every bank under OUTPUT_DIR; default: bottle)"
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="where the training weights are now, if moved (default: as stored in the bank); must be the same weights",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser.parse_args()


def categories(output_dir: Path, spec: str) -> list[str]:
    """The categories to export, each with a memory bank under output_dir."""
    if spec == "all":
        found = sorted(p.parent.name for p in output_dir.glob(f"*/{BANK_FILE}"))
        if not found:
            raise BankError(f"no memory banks under {output_dir}: run train.py first, or give the --output_dir it wrote to")
        return found
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    require_banks(output_dir, wanted or [repr(spec)])
    return wanted


def main() -> None:
    args = parse_args()
    missing = [name for name in ("onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"export.py needs {' and '.join(missing)}: pip install -r requirements.txt")
    output_dir = Path(args.output_dir)
    for category in categories(output_dir, args.category):
        start = time.perf_counter()
        done = export_onnx(bank_path(output_dir, category), model_path(output_dir, category), weights=args.weights)
        seconds = time.perf_counter() - start
        where = (
            f"with its tensors in {done['data'].name} beside it: they exceed one protobuf file's {PROTOBUF_LIMIT / 1e9:.1f} GB limit"
            if done["data"]
            else "one file, the bank inside"
        )
        height, width = done["input_size"]
        print(f"{category}: exported {done['path']} ({done['bytes'] / 1e6:.1f} MB, {where}) in {seconds:.1f}s")
        print(f"  checked: onnxruntime scores {done['check_images']} probe images as predict() does "
              f"(largest difference {done['check_error']:.1e} of the largest value)")  # fmt: skip
        print(f"  input: images, uint8 RGB [batch, {height}, {width}, 3]; outputs: {', '.join(done['outputs'])}")
        print(f"  search: {done['search']}")
        print(f'  run it: python predict_onnx.py {done["path"]} "line_camera/*.png"')


if __name__ == "__main__":
    run_main(main)
