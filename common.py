"""What train.py and evaluate.py share: arguments, one-line errors, atomic writes, the memory-bank file.

Memory-bank file (<output_dir>/<category>/memory_bank.npz), a NumPy .npz read with
allow_pickle=False, so loading never executes code:
    memory_bank  float32 [M, C]   the coreset patch features
    header       uint8  [bytes]   UTF-8 JSON: format, format_version, sha256 of memory_bank,
                                  config (model + preprocessing), training facts, versions
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import traceback
import zipfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

BANK_FILE = "memory_bank.npz"
TRAIN_LOG = "train.json"  # run-specific facts of the training run: seconds, device, time
BANK_FORMAT = "patchcore-memory-bank"
BANK_FORMAT_VERSION = 1


class BankError(Exception):
    """A memory-bank file is missing, damaged or was built with other settings."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, 'error: ...', exit code 2."""

    def error(self, message: str) -> None:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_path", required=True, help="MVTec AD folder, holding one folder per category")
    parser.add_argument("--category", default="bottle", help="a category, a comma list, or 'all' (default: bottle)")
    parser.add_argument("--output_dir", default="results", help="memory banks and results go to OUTPUT_DIR/<category>/ (default: results)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = cuda when available)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    parser.add_argument(
        "--amp", default="none", choices=["none", "bf16", "fp16"], help="backbone autocast precision (default: none = fp32)"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad arguments before any work starts."""
    from patchcore import resolve_device

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
        message = " ".join(str(err).split()) or type(err).__name__
        if "torch" in sys.modules and isinstance(err, sys.modules["torch"].cuda.OutOfMemoryError):
            message = f"GPU out of memory ({message[:120]}): try a smaller --batch_size, or --device cpu"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def environment() -> dict:
    """Library versions and GPU, recorded in every output."""
    import faiss
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write(path: Path, write: Callable[[object], None], mode: str = "wb") -> None:
    """write(file) into a temporary file beside path, flush and fsync, then rename over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(f"could not write {path} ({err.strerror or err}): free some disk space or choose another --output_dir") from err
        raise


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def save_npz(path: Path, arrays: dict[str, np.ndarray], compress: bool = False) -> None:
    """An .npz that np.load reads with allow_pickle=False, written atomically and byte for byte
    reproducibly (fixed timestamps in the zip, unlike np.savez)."""

    def write(f) -> None:
        method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(f, "w", method) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = method
                with archive.open(info, "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)

    atomic_write(path, write)


def _checksum(memory_bank: np.ndarray, header: dict) -> str:
    """sha256 of the features and of every header field but the checksum itself."""
    rest = {k: v for k, v in header.items() if k != "sha256"}
    return hashlib.sha256(memory_bank.tobytes() + json.dumps(rest, sort_keys=True).encode()).hexdigest()


def save_memory_bank(path: Path, memory_bank: np.ndarray, header: dict) -> None:
    memory_bank = np.ascontiguousarray(memory_bank, dtype=np.float32)
    header = {"format": BANK_FORMAT, "format_version": BANK_FORMAT_VERSION, **header}
    header["sha256"] = _checksum(memory_bank, header)
    header_bytes = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    save_npz(path, {"memory_bank": memory_bank, "header": header_bytes})


def load_memory_bank(path: Path) -> tuple[np.ndarray, dict]:
    """Read and verify a memory-bank file; never unpickles."""
    rerun = "rerun train.py for this category"
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes().decode())
            memory_bank = data["memory_bank"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise BankError(f"{path} is not a readable memory bank ({err}); {rerun}") from err
    if not isinstance(header, dict) or header.get("format") != BANK_FORMAT:
        raise BankError(f"{path} is not a PatchCore memory-bank file; {rerun}")
    if header.get("format_version") != BANK_FORMAT_VERSION:
        raise BankError(f"{path} has format version {header.get('format_version')}, this code reads {BANK_FORMAT_VERSION}; {rerun}")
    if memory_bank.dtype != np.float32 or memory_bank.ndim != 2:
        raise BankError(f"{path} holds a {memory_bank.dtype} array of shape {memory_bank.shape}; {rerun}")
    if _checksum(memory_bank, header) != header.get("sha256"):
        raise BankError(f"{path} fails its checksum: the file was changed or damaged; {rerun}")
    return memory_bank, header
