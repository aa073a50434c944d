"""A fast smoke run of benchmarks/benchmark.py: every stage runs and reports."""

import json
import subprocess
import sys

from scripts import REPO


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--device", "cpu", "--n_images", "3", "--image_size", "64",
               "--batch_size", "2", "--ratios", "0.25,0.1", "--baseline_iters", "20", "--equal_n", "150", "--fit_images", "2",
               "--e2e_images", "3", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["stage"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["straightforward loop, 20 iters"]["same_first_iters"] is True
    assert rows["full-run equality N=150, ratio 0.25"]["same_selection"] is True
    for stage in ("backbone", "coreset 0.25", "kNN scoring", "fit two-pass, 2 images", "end to end: evaluate.py"):
        assert rows[stage]["seconds"] > 0 and rows[stage]["peak_rss_gib"] > 0
