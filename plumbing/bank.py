"""The memory-bank file, the project's one persistent contract.

OUTPUT_DIR/<category>/memory_bank.npz is a NumPy .npz read with allow_pickle=False, so that
loading it can never run code. It holds two arrays:

    memory_bank  float32 [M, C]   the coreset patch features (an ensemble: memory_bank_0, memory_bank_1, ...,
                                  one per network, in the config's order)
    header       uint8 [bytes]    UTF-8 JSON, with
        format, format_version    "patchcore-memory-bank", FORMAT_VERSION
        sha256                    of the features and of every other header field
        config                    PatchCoreConfig as a dict: rebuilds the model (PatchCore.from_bank)
        model                     weights description, sha256 of the backbone weights, feature dimension
                                  (an ensemble: members, a list of each network's model, calibration, train)
        calibration               thresholds set on held-out good images and how, or the reason there are none
        category                  the category's name
        train                     image and patch counts, bank size, the held-out images, the few-shot
                                  images (--shots), the images added later (--add)
        environment               library versions

Nothing run-specific (time, seconds, device, GPU, which fit path the free RAM allowed) is stored, so
that the same data, seed and library versions give a byte-identical file on the same machine at the
same thread count; train.py writes those facts to train.json beside it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import zipfile
from pathlib import Path

import numpy as np

from plumbing.files import save_npz

BANK_FILE = "memory_bank.npz"
TRAIN_LOG = "train.json"  # beside the bank: the run-specific facts of its training run (seconds, device, time)
AUDIT_FILE, AUDIT_DIR = "train_audit.json", "train_audit"  # beside the bank: the training-set audit (train.py)
FORMAT = "patchcore-memory-bank"
FORMAT_VERSION = 2  # 1: before the config object; its banks must be rebuilt


def bank_path(output_dir: str | Path, category: str) -> Path:
    """Where train.py writes a category's memory bank and evaluate.py reads it: OUTPUT_DIR/<category>/memory_bank.npz."""
    return Path(output_dir) / category / BANK_FILE


class BankError(Exception):
    """A memory-bank file is missing, damaged, of another format, or does not fit the model."""


def require_banks(output_dir: str | Path, categories: list[str], data_path: str | Path = "DATA_PATH") -> None:
    """Refuse, before any work, categories without a memory bank under output_dir: one BankError naming them and the
    train.py command that makes them (evaluate.py and export.py)."""
    missing = [name for name in categories if not bank_path(output_dir, name).is_file()]
    if missing:
        raise BankError(
            f"no memory bank for {', '.join(missing)} in {output_dir}: run `python train.py --data_path {data_path} "
            f"--category {','.join(missing)} --output_dir {output_dir}` first"
        )


def _checksum(banks: list[np.ndarray], header: dict) -> str:
    """sha256 of every memory bank's features, in order, and of every header field but the checksum itself."""
    rest = {k: v for k, v in header.items() if k != "sha256"}
    digest = hashlib.sha256()
    for bank in banks:
        digest.update(bank.tobytes())
    digest.update(json.dumps(rest, sort_keys=True).encode())
    return digest.hexdigest()


def _names(count: int | None) -> list[str]:
    """The arrays' names: memory_bank for one model, memory_bank_0 .. for an ensemble's `count` members."""
    return ["memory_bank"] if count is None else [f"memory_bank_{i}" for i in range(count)]


def save_bank(path: Path, memory_bank: np.ndarray | list[np.ndarray], header: dict) -> str:
    """Write the bank atomically: one array, or an ensemble's list of them; `header` holds the sections listed above.
    Returns its checksum, the header's sha256 (evaluate.py records it in metrics.json)."""
    ensemble = isinstance(memory_bank, list)
    banks = [np.ascontiguousarray(b, dtype=np.float32) for b in (memory_bank if ensemble else [memory_bank])]
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **header}
    header["sha256"] = _checksum(banks, header)
    arrays = dict(zip(_names(len(banks) if ensemble else None), banks))
    save_npz(path, {**arrays, "header": np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)})
    return header["sha256"]


def load_bank(path: Path) -> tuple[np.ndarray | list[np.ndarray], dict]:
    """Read and verify a memory-bank file: (its array, or an ensemble's list, header); never unpickles.
    Raises BankError with what to do."""
    path = Path(path)
    rerun = "rerun train.py for this category"
    if not path.is_file():
        raise BankError(
            f"no memory bank at {path}: run `python train.py --data_path DATA_PATH --category {path.parent.name} "
            f"--output_dir {path.parent.parent}` first"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes().decode())
            members = header.get("members") if isinstance(header, dict) else None
            banks = [data[name] for name in _names(len(members) if isinstance(members, list) else None)]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise BankError(f"{path} is not a readable memory bank ({err}); {rerun}") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BankError(f"{path} is not a PatchCore memory-bank file; {rerun}")
    version = header.get("format_version")
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise BankError(
            f"{path} was written by an older version of this code (bank format {version}, this code reads {FORMAT_VERSION}); {rerun}"
        )
    if version != FORMAT_VERSION:
        raise BankError(f"{path} has bank format {version}, this code reads {FORMAT_VERSION}; {rerun} with this code")
    for bank in banks:
        if bank.dtype != np.float32 or bank.ndim != 2:
            raise BankError(f"{path} holds a {bank.dtype} array of shape {bank.shape}; {rerun}")
    if _checksum(banks, header) != header.get("sha256"):
        raise BankError(f"{path} fails its checksum: the file was changed or damaged; {rerun}")
    return (banks if members is not None else banks[0]), header


def environment() -> dict:
    """The library versions that compute a bank's numbers, recorded in the bank and every output."""
    import faiss
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }
