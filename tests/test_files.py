"""Safe writes: atomic files, reproducible archives written whole or one array at a time, staged folders."""

import errno
import stat

import numpy as np
import pytest

from plumbing.files import NpzWriter, atomic_write, save_npz, staging, write_json


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")

    def failing(f):
        f.write("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, failing, mode="w")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path):
    (tmp_path / "plain.json").write_text("{}")  # open() applies the umask to 0666
    write_json(tmp_path / "metrics.json", {"a": 1})
    save_npz(tmp_path / "bank.npz", {"x": np.zeros(2)})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes["metrics.json"] == modes["bank.npz"] == modes["plain.json"], modes


def test_full_disk_gives_a_clear_error(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("plumbing.files.os.fsync", no_space)
    with pytest.raises(OSError, match="could not write .*metrics.json \\(No space left on device\\): free some disk space"):
        write_json(tmp_path / "metrics.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_npz_files_are_byte_reproducible_and_load_without_pickle(tmp_path):
    arrays = {"a/b.png": np.arange(6, dtype=np.float16).reshape(2, 3), "x": np.ones(4, np.float32)}
    save_npz(tmp_path / "one.npz", arrays, compress=True)
    with NpzWriter(tmp_path / "two.npz", compress=True) as writer:
        for name, array in arrays.items():
            writer.add(name, array)
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    with np.load(tmp_path / "two.npz", allow_pickle=False) as loaded:
        assert sorted(loaded.files) == ["a/b.png", "x"] and np.array_equal(loaded["a/b.png"], arrays["a/b.png"])


def test_staging_moves_outputs_in_only_when_complete(tmp_path):
    (tmp_path / "metrics.json").write_text("old")
    with pytest.raises(RuntimeError):
        with staging(tmp_path) as stage:
            write_json(stage / "metrics.json", {"new": 1})
            raise RuntimeError("failed halfway")
    assert (tmp_path / "metrics.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with staging(tmp_path) as stage:
        write_json(stage / "metrics.json", {"new": 1})
        (stage / "maps").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps", "metrics.json"] and "new" in (tmp_path / "metrics.json").read_text()
