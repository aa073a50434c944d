"""A small run of benchmarks/benchmark.py: every stage runs, and its numbers agree with each other."""

import json
import subprocess
import sys

from scripts import REPO


def test_benchmark_small_run(tmp_path):
    out = tmp_path / "bench.json"
    stages = "speed,e2e,memory,large,search,deploy,tiles"
    command = [sys.executable, str(REPO / "benchmarks" / "benchmark.py"), "--stages", stages, "--device", "cpu",
               "--n_images", "3", "--image_size", "64", "--batch_size", "2", "--ratios", "0.25,0.1", "--baseline_iters", "20",
               "--equal_n", "150", "--e2e_images", "3", "--memory_images", "2,4", "--memory_scored", "2,4", "--large_images", "3",
               "--search_test", "6", "--repeats", "2", "--deploy_test", "6",
               "--tiles_size", "320x224", "--tiles_resolutions", "256,320", "--tiles_tile", "128", "--tiles_ratio", "0.05",
               "--tiles_train", "3", "--tiles_scored", "2,4",
               "--deploy_venv", sys.prefix, "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["stage"]: row for row in json.loads(out.read_text())["rows"]}
    n = 3 * 8 * 8  # 3 images, an 8x8 layer2 grid at 64 px
    assert rows["patch features (load + backbone + aggregation)"]["N"] == n
    assert rows["coreset 0.25"]["selected"] == n // 4 and rows["coreset 0.1"]["selected"] == n // 10
    assert rows["plain eager loop, 20 iterations"]["same_first_iterations"] is True
    assert rows["full-run equality N=150, ratio 0.25"]["same_selection"] is True
    assert rows["memory bank + index"]["bank"] == [n // 4, 1536]
    assert rows["raw matrix product it needs"]["knn_over_matmul"] > 0
    for script in ("train.py", "evaluate.py"):
        assert rows[f"end to end: {script}"]["peak_rss_gib"] > 0.2  # a torch process, measured in the child
    assert rows["fit one-pass, 4 images"]["path"].startswith("fit: one pass")
    assert rows["fit two-pass, 4 images"]["path"].startswith("fit: two passes")
    assert "gib_per_1000_images" in rows["fit two-pass: growth"] and "mib_per_1000_images" in rows["evaluate --images: growth"]
    for name in ("256 px PNG", "1500x1000 JPEG"):
        assert rows[f"train.py on {name}"]["images"] == 3 and rows[f"evaluate.py on {name}"]["images"] == 4
    assert rows["search: faiss, fp32 expansion"]["max_rel_patch_score_diff"] < 1e-2  # its expansion's rounding (measured: 5e-3)
    exact = rows["search: exact"]  # float64's neighbours, to float32 rounding of the distance
    assert exact["top1_agreement"] == 1 and exact["farther_patch_taken"] == 0 and exact["max_rel_patch_score_diff"] < 1e-6
    for how in ("faiss", "exact"):
        assert rows[f"evaluate per image: {how}"]["search"].startswith(how)
    for name in ("search: exact", "backbone + patch features per image", "evaluate per image: exact"):
        assert len(rows[name]["ms_per_image_runs"]) == 2 and rows[name]["ms_per_image"] == min(rows[name]["ms_per_image_runs"])
    assert rows["search share of the backbone: exact"]["share"] > 0 and rows["evaluate per image: faiss over exact"]["ratio"] > 0
    assert all(" cores, flags: " in row["cpu"] for row in rows.values())  # every figure says which CPU made it
    scored = [r["stage"] for r in rows.values() if r["stage"].startswith("evaluate --images, ")]
    assert scored == ["evaluate --images, 2 images", "evaluate --images, 4 images"]
    assert rows["deploy: train.py (the bank)"]["bank"] == [3 * 64 // 4, 1536]
    for runtime, batch in (("onnxruntime", 2), ("onnxruntime", 1), ("openvino", 2)):
        row = rows[f"deploy: predict_onnx.py, {runtime}, batch {batch}"]
        assert row["same_decisions"] == "6/6" and row["max_rel_score_diff_to_evaluate"] < 1e-4 and row["ms_per_image"] > 0
    assert rows["deploy: export.py"]["file_mb"] > 50  # the backbone to layer3 is in it
    sizes = {name: rows[f"deploy: installed size, {name}"]["mb"] for name in ("requirements.txt", "requirements-deploy.txt")}
    assert 0 < sizes["requirements-deploy.txt"] < sizes["requirements.txt"]
    assert rows["deploy: OpenVINO, f32 precision"]["precision"] == "f32"
    assert rows["deploy: OpenVINO, f32 precision"]["max_rel_score_diff_to_f32"] == 0
    for longer, working in ((256, "256x192"), (320, "320x224")):
        for script in ("train.py", "evaluate.py"):
            row = rows[f"tiles: {script} at {longer} px"]
            assert row["working"] == working and row["s_per_megapixel"] > 0 and row["peak_rss_gib"] > 0.2
    assert rows["tiles: evaluate.py at 256 px, 4 test images"]["images"] == 6
    assert "mib_per_test_image" in rows["tiles: evaluate.py at 256 px: growth"]
