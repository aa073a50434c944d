"""Helpers that run train.py and evaluate.py as a user would, in a fresh interpreter."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--batch_size", "4", "--num_workers", "0", "--device", "cpu"]
THREADS = {"OMP_NUM_THREADS": "2"}  # results are reproducible at a fixed thread count (docs/architecture.md)


def run(script, *args, env=None):
    env = {**os.environ, **THREADS, **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env)


def train(root, out, *extra, env=None):
    return run("train.py", "--data_path", root, "--category", "widget", "--output_dir", out, "--weights", "none",
               "--resize", "72", "--image_size", "64", *SMALL, *extra, env=env)  # fmt: skip


def evaluate(root, out, *extra, env=None):
    return run("evaluate.py", "--data_path", root, "--category", "widget", "--output_dir", out, *SMALL, *extra, env=env)


def one_line_error(result, code=1):
    """The one 'error: ...' line a failed run printed on stderr, with exit status `code` and no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
