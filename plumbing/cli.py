"""Command-line plumbing shared by train.py and evaluate.py: arguments, one-line errors, loaders, facts.

The options that decide a memory bank's content are generated from PatchCoreConfig's fields,
with its defaults and help texts, so that they are written down once. train.py offers them;
evaluate.py refuses them, because it rebuilds the model from the config stored in the bank.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import traceback
import types
import typing
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, 'error: ...', exit code 2."""

    def error(self, message: str) -> None:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_path", default=None, help="dataset folder: MVTec AD, VisA, or one folder per category of your own")
    parser.add_argument("--category", default="bottle", help="a category, a comma list, or 'all' (default: bottle)")
    parser.add_argument("--output_dir", default="results", help="memory banks and results go to OUTPUT_DIR/<category>/ (default: results)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Knobs that change how fast a run is, never what it computes."""
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = cuda when available)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="images per forward pass (default: 32; with --tile_size: one image, its tiles 8 at a time)")  # fmt: skip
    parser.add_argument(
        "--num_workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader worker processes that decode images (default: up to 4)",
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="on a GPU, run fp32 convolutions and matrix products in TF32: faster from Ampere on, about 1e-3 relative error "
        "in the features (default: exact fp32; recorded in train.json and metrics.json; no effect on a CPU)",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
        raise ValueError(text)
    return text.lower() in ("true", "yes", "1")


def parser_for(annotation: object) -> Callable[[str], object]:
    """How a command-line string becomes a value of a config field's type: int, float, str, bool, X | None
    (as X), and tuple[X, ...] (a comma list of X). Another type is a TypeError when the options are built."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if len(args) == 1:
            return parser_for(args[0])
    elif typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = parser_for(args[0])
        return lambda text: tuple(item(part.strip()) for part in text.split(",") if part.strip())
    elif annotation is bool:
        return _parse_bool
    elif annotation in (int, float, str):
        return annotation
    raise TypeError(f"no command-line parser for a config field of type {annotation}")


def add_config_args(parser: argparse.ArgumentParser, config_type: type) -> None:
    """One option per config field, --<field name>, with the field's help and default, parsed by its type
    (parser_for). An option not given stays out of the namespace: the dataclass fills in its own default."""
    group = parser.add_argument_group("memory-bank settings (stored in the bank; evaluate.py follows them)")
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        shown = field.metadata.get("default_text") or (",".join(map(str, default)) if isinstance(default, tuple) else default)
        group.add_argument(
            f"--{field.name}", type=parser_for(hints[field.name]), default=argparse.SUPPRESS, metavar=field.metadata.get("metavar"),
            help=f"{field.metadata['help']} (default: {shown})",
        )  # fmt: skip


def refuse_config_args(parser: argparse.ArgumentParser, config_type: type, allowed: tuple[str, ...] = ()) -> None:
    """evaluate.py: a memory-bank setting given on its command line is a one-line usage error
    (but for the `allowed` ones, which the driver defines itself)."""

    class Refuse(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(
                f"{option_string} is a memory-bank setting: train.py stores it in the bank and evaluate.py follows the bank; "
                f"drop {option_string}, or retrain with it"
            )

    for field in dataclasses.fields(config_type):
        if field.name not in allowed:
            parser.add_argument(f"--{field.name}", action=Refuse, nargs="?", help=argparse.SUPPRESS)


def given_config_args(args: argparse.Namespace, config_type: type) -> dict:
    """The memory-bank settings given on the command line (not their defaults)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_type) if hasattr(args, f.name)}


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, config_type: type):
    """The config the command line asks for (config_type.from_options: a preset and the options beside it);
    an invalid value is a usage error."""
    try:
        return config_type.from_options(**given_config_args(args, config_type))
    except ValueError as err:
        parser.error(str(err))


def check_runtime_args(parser: argparse.ArgumentParser, args: argparse.Namespace, single: str | None = None) -> None:
    """Reject bad arguments before any work starts. `single`: the driver's option (--images, --add) that
    works on one category's bank and needs no --data_path; without it, --data_path is required."""
    if single and getattr(args, single.lstrip("-")) is not None:
        if "," in args.category or args.category == "all":
            parser.error(f"{single} works on one memory bank: give a single --category")
    elif not args.data_path:
        parser.error("the following argument is required: --data_path")
    from plumbing.system import resolve_device

    if args.batch_size <= 0:
        parser.error(f"--batch_size must be a positive integer, got {args.batch_size}")
    if args.num_workers < 0:
        parser.error(f"--num_workers must be 0 or more, got {args.num_workers}")
    try:
        resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.output_dir)
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--output_dir {out} cannot be written (no write permission in {existing}): choose another folder")


def make_loader(dataset, args: argparse.Namespace, device) -> object:
    """Batches in file order; the workers decode and resize the images. With tiles (a transform with tile_size), images
    go one at a time: the backbone batches an image's tiles itself, and training holds one image's stitched features,
    not a batch's."""
    import torch

    batch_size = 1 if getattr(dataset.transform, "tile_size", 0) else args.batch_size
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=args.num_workers, pin_memory=device.type == "cuda"
    )


def run_main(main: Callable[[], None]) -> None:
    """Run a driver: errors become one line on stderr (exit 1), Ctrl-C exits 130."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: no partial outputs were kept", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if "--debug" in sys.argv:
            traceback.print_exc()
        message = " ".join(worker_error(str(err)).split()) or type(err).__name__
        if "torch" in sys.modules and isinstance(err, sys.modules["torch"].cuda.OutOfMemoryError):
            message = f"GPU out of memory ({message[:120]}): try a smaller --batch_size, or --device cpu"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def worker_error(message: str) -> str:
    """An error's message without the traceback a DataLoader worker wraps it in ("Caught DataError in DataLoader
    worker process 0. Original Traceback (most recent call last): ... image_io.DataError: cannot read image ...")."""
    lines = message.strip().splitlines()
    if not (lines and lines[0].startswith("Caught ") and len(lines) > 1 and lines[1].startswith("Original Traceback")):
        return message
    return re.sub(r"^[\w.]+: ", "", lines[-1].strip(), count=1)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
