"""The memory-bank file: round trip, tamper detection, no code execution, old formats, killed writes."""

import json
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from plumbing.bank import BankError, load_bank, save_bank
from scripts import REPO


def test_round_trip(tmp_path):
    bank = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    save_bank(tmp_path / "bank.npz", bank, {"config": {"seed": 3}})
    loaded, header = load_bank(tmp_path / "bank.npz")
    assert np.array_equal(loaded, bank) and header["config"] == {"seed": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["bank.npz"]  # no temporary file left


def test_truncated_and_flipped_files_are_refused(tmp_path):
    path = tmp_path / "bank.npz"
    save_bank(path, np.ones((50, 8), np.float32), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BankError, match="not a readable memory bank"):
        load_bank(path)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside the features
    path.write_bytes(bytes(flipped))
    with pytest.raises(BankError, match="rerun train.py"):
        load_bank(path)


def test_changed_features_fail_the_checksum(tmp_path):
    path = tmp_path / "bank.npz"
    save_bank(path, np.ones((5, 4), np.float32), {})
    with np.load(path) as data:
        header = data["header"]
    np.savez(path, memory_bank=np.zeros((5, 4), np.float32), header=header)
    with pytest.raises(BankError, match="checksum"):
        load_bank(path)


def test_other_and_older_format_versions_are_refused(tmp_path):
    path = tmp_path / "bank.npz"
    for version, message in ((99, "bank format 99, this code reads 2"), (1, "older version of this code \\(bank format 1")):
        header = {"format": "patchcore-memory-bank", "format_version": version, "sha256": ""}
        np.savez(path, memory_bank=np.ones((2, 2), np.float32), header=np.frombuffer(json.dumps(header).encode(), np.uint8))
        with pytest.raises(BankError, match=message):
            load_bank(path)


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
        load_bank(path)
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(BankError):
        load_bank(path)
    torch.save({"memory_bank": _Payload(str(marker))}, path)  # torch's format: a zip holding a pickle
    with pytest.raises(BankError):
        load_bank(path)
    assert not marker.exists()


SAVER = """
import sys
import numpy as np
from pathlib import Path
from plumbing.bank import save_bank
path = Path(sys.argv[1])
save_bank(path, np.zeros((10, 4), np.float32), {"which": "old"})
print("ready", flush=True)
big = np.ones((4000, 1536), np.float32)
while True:
    save_bank(path, big, {"which": "new"})
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5])
def test_a_killed_save_leaves_the_old_or_the_new_bank(tmp_path, delay):
    path = tmp_path / "memory_bank.npz"
    child = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    bank, header = load_bank(path)  # never a partial file
    assert (header["which"], bank.shape) in {("old", (10, 4)), ("new", (4000, 1536))}


def test_an_edited_header_fails_the_checksum(tmp_path):
    path = tmp_path / "bank.npz"
    save_bank(path, np.ones((5, 4), np.float32), {"config": {"layers": ["layer2", "layer3"]}})
    with np.load(path) as data:
        memory_bank, header = data["memory_bank"], json.loads(data["header"].tobytes())
    header["config"]["layers"] = ["layer3"]
    np.savez(path, memory_bank=memory_bank, header=np.frombuffer(json.dumps(header).encode(), np.uint8))
    with pytest.raises(BankError, match="checksum"):
        load_bank(path)
