"""The memory-bank file: round trip, tamper detection, no code execution; atomic writes."""

import json
import pickle

import numpy as np
import pytest

from common import BankError, atomic_write, load_memory_bank, save_memory_bank


def test_round_trip(tmp_path):
    bank = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    save_memory_bank(tmp_path / "bank.npz", bank, {"config": {"seed": 3}})
    loaded, header = load_memory_bank(tmp_path / "bank.npz")
    assert np.array_equal(loaded, bank) and header["config"] == {"seed": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["bank.npz"]  # no temporary file left


def test_truncated_and_flipped_files_are_refused(tmp_path):
    path = tmp_path / "bank.npz"
    save_memory_bank(path, np.ones((50, 8), np.float32), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BankError, match="not a readable memory bank"):
        load_memory_bank(path)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside the features
    path.write_bytes(bytes(flipped))
    with pytest.raises(BankError, match="rerun train.py"):
        load_memory_bank(path)


def test_changed_features_fail_the_checksum(tmp_path):
    path = tmp_path / "bank.npz"
    save_memory_bank(path, np.ones((5, 4), np.float32), {})
    with np.load(path) as data:
        header = data["header"]
    np.savez(path, memory_bank=np.zeros((5, 4), np.float32), header=header)
    with pytest.raises(BankError, match="checksum"):
        load_memory_bank(path)


def test_other_format_version_is_refused(tmp_path):
    path = tmp_path / "bank.npz"
    header = {"format": "patchcore-memory-bank", "format_version": 99, "sha256": ""}
    np.savez(path, memory_bank=np.ones((2, 2), np.float32), header=np.frombuffer(json.dumps(header).encode(), np.uint8))
    with pytest.raises(BankError, match="format version 99"):
        load_memory_bank(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "bank.npz"
    np.savez(path, memory_bank=np.array([_Payload(str(marker))], dtype=object), header=np.array([_Payload(str(marker))], dtype=object))
    with pytest.raises(BankError):
        load_memory_bank(path)
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(BankError):
        load_memory_bank(path)
    assert not marker.exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")

    def failing(f):
        f.write("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, failing, mode="w")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
