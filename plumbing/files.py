"""Writing outputs safely: atomic files, byte-reproducible .npz archives, staged output folders.

A file is written to a temporary name beside its target, fsynced, then renamed over it, so a
run killed at any moment leaves the old file or the new one, never half of one. A folder of
outputs is assembled in a hidden staging folder and moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np


def _write_error(path: Path, err: OSError) -> OSError:
    return OSError(f"could not write {path} ({err.strerror or err}): free some disk space or choose another --output_dir")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates owner-only (0600) files; results get the mode open() would give them
FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[object], None], mode: str = "wb") -> None:
    """write(file) into a temporary file beside path, flush and fsync, then rename over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _write_error(path, err) from err
        raise


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _npz_archive(file: object, compress: bool) -> zipfile.ZipFile:
    """A zip archive open for writing .npy entries (a path or a binary file), deflated or stored."""
    return zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)


def _add_array(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    """One .npy entry with a fixed timestamp (np.savez stamps the current time), never pickled."""
    info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = archive.compression
    with archive.open(info, "w", force_zip64=True) as entry:
        np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)


def save_npz(path: Path, arrays: dict[str, np.ndarray], compress: bool = False) -> None:
    """An .npz that np.load reads with allow_pickle=False, written atomically; the same arrays give the same bytes."""

    def write(f) -> None:
        with _npz_archive(f, compress) as archive:
            for name, array in arrays.items():
                _add_array(archive, name, array)

    atomic_write(path, write)


class NpzWriter:
    """An .npz written one array at a time, so that the arrays need not all be in memory at once.
    Write it inside a staging folder: it is complete only when the `with` block ends."""

    def __init__(self, path: Path, compress: bool = False) -> None:
        self.path, self.compress = path, compress

    def __enter__(self) -> NpzWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.archive = _npz_archive(self.path, self.compress)
        return self

    def add(self, name: str, array: np.ndarray) -> None:
        try:
            _add_array(self.archive, name, array)
        except OSError as err:
            raise _write_error(self.path, err) from err

    def __exit__(self, *exc) -> None:
        self.archive.close()


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """Outputs are written into a hidden folder inside `folder` and moved into place only when all
    are complete (metrics.json last); an error or Ctrl-C leaves the previous outputs untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=folder, prefix=".staging."))
    try:
        yield stage
        for item in sorted(stage.iterdir(), key=lambda p: p.name == "metrics.json"):
            if item.is_dir():
                shutil.rmtree(folder / item.name, ignore_errors=True)
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
