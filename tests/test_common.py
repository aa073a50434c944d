"""The memory-bank file (round trip, tamper detection, no code execution), atomic writes, one-line errors."""

import errno
import json
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common import BankError, atomic_write, load_memory_bank, run_main, save_memory_bank, write_json
from scripts import REPO


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
    torch.save({"memory_bank": _Payload(str(marker))}, path)  # torch's format: a zip holding a pickle
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


SAVER = """
import sys
import numpy as np
from pathlib import Path
from common import save_memory_bank
path = Path(sys.argv[1])
save_memory_bank(path, np.zeros((10, 4), np.float32), {"which": "old"})
print("ready", flush=True)
big = np.ones((4000, 1536), np.float32)
while True:
    save_memory_bank(path, big, {"which": "new"})
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5])
def test_a_killed_save_leaves_the_old_or_the_new_bank(tmp_path, delay):
    path = tmp_path / "memory_bank.npz"
    child = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    bank, header = load_memory_bank(path)  # never a partial file
    assert (header["which"], bank.shape) in {("old", (10, 4)), ("new", (4000, 1536))}


def _exit(main, monkeypatch, capsys, argv=("prog",)):
    monkeypatch.setattr(sys, "argv", list(argv))
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    return exit_info.value.code, capsys.readouterr().err


def test_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def main():
        raise ValueError("bad thing\nover two lines")

    code, err = _exit(main, monkeypatch, capsys)
    assert code == 1 and err == "error: bad thing over two lines\n"
    code, err = _exit(main, monkeypatch, capsys, ("prog", "--debug"))
    assert code == 1 and "Traceback" in err and err.endswith("error: bad thing over two lines\n")


def test_gpu_out_of_memory_suggests_what_to_do(monkeypatch, capsys):
    def main():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    code, err = _exit(main, monkeypatch, capsys)
    assert code == 1 and "GPU out of memory" in err and "smaller --batch_size, or --device cpu" in err


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def main():
        raise KeyboardInterrupt

    code, err = _exit(main, monkeypatch, capsys)
    assert code == 130 and "interrupted" in err


def test_full_disk_gives_a_clear_error(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("common.os.fsync", no_space)
    with pytest.raises(OSError, match="could not write .*metrics.json \\(No space left on device\\): free some disk space"):
        write_json(tmp_path / "metrics.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_an_edited_header_fails_the_checksum(tmp_path):
    path = tmp_path / "bank.npz"
    save_memory_bank(path, np.ones((5, 4), np.float32), {"config": {"layers": ["layer2", "layer3"]}})
    with np.load(path) as data:
        memory_bank, header = data["memory_bank"], json.loads(data["header"].tobytes())
    header["config"]["layers"] = ["layer3"]
    np.savez(path, memory_bank=memory_bank, header=np.frombuffer(json.dumps(header).encode(), np.uint8))
    with pytest.raises(BankError, match="checksum"):
        load_memory_bank(path)
