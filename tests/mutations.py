"""Mutation check: does the test suite notice when PatchCore is computed wrongly?

    python tests/mutations.py            (or: make mutations; a few hours on 2 cores)
    python tests/mutations.py --only max_to_mean,blur_off

Each mutation below is a small deliberate error in a library module. One at a time, it is
applied to a temporary copy of the repository, and the suite runs there with -x (fast test
files first, on 2 workers). A mutation is CAUGHT when some test fails, and the first failing test is
reported; it SURVIVED when the whole suite passes. Not part of `make test`. Exits 1 when a
mutation survives or no longer applies (the code it targets has changed: update its text).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# fast, value-level test files first, so that a caught mutation stops early
TEST_ORDER = ["test_patchcore.py", "test_official.py", "test_metrics.py", "test_tiles.py", "test_ad2.py", "test_dataset.py",
              "test_bank.py", "test_files.py", "test_report.py", "test_report_page.py", "test_ensemble.py", "test_export.py",
              "test_cli.py", "test_report_browser.py", "test_notebook.py", "test_benchmark.py", "test_audit.py"]  # fmt: skip

# (name, file, original text, mutated text); the original must occur exactly once in the file
MUTATIONS = [
    ("max_to_mean", "patchcore.py",
     "scores = patch_scores.max(dim=1).values",
     "scores = patch_scores.mean(dim=1)"),
    ("blur_off", "patchcore.py",
     "if self.config.blur_sigma > 0:",
     "if False:"),
    ("eq7_index_0", "patchcore.py",
     "self.reweighted_scores(patches[rows, worst], s_star, nearest[rows, worst])",
     "self.reweighted_scores(patches[rows, worst], s_star, torch.zeros_like(nearest[rows, worst]))"),
    ("exact_search_first_block", "method/search.py",
     "for b in blocks)))",
     "for b in blocks[:1])))"),
    ("coreset_start_0", "method/coreset.py",
     "start = int(torch.randint(n, (1,), generator=generator))",
     "start = 0"),
    ("zero_padded_neighbourhood", "patchcore.py",
     "count_include_pad=False",
     "count_include_pad=True"),
    ("layer3_nearest_upsampling", "patchcore.py",
     'f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)',
     'f = F.interpolate(f, size=grid, mode="nearest")'),
    ("squared_distances", "method/search.py",
     "np.maximum(distances, 0) if squared else np.sqrt(np.maximum(distances, 0))",
     "np.maximum(distances, 0)"),
    ("pruning_bound_too_tight", "method/coreset.py",
     "bound[near], bound[i] = 2 * radius[near] + slack, 2 * radius[i] + slack",
     "bound[near], bound[i] = radius[near] + slack, radius[i] + slack"),
    ("blur_radius_2_sigma", "method/maps.py",
     "radius = int(4 * sigma + 0.5)",
     "radius = int(2 * sigma + 0.5)"),
    ("eq7_weight_without_one_minus", "patchcore.py",
     "weight = 1 - torch.exp(s_star - torch.logsumexp(d, dim=1))",
     "weight = torch.exp(s_star - torch.logsumexp(d, dim=1))"),
    ("bank_rows_out_of_order", "method/coreset.py",
     "out[name][order[lo:hi]] = chunk[ordered[lo:hi] - offset]",
     "out[name][lo:hi] = chunk[ordered[lo:hi] - offset]"),
    ("autocast_ignored", "method/backbone.py",
     'enabled=self.amp != "none"',
     "enabled=False"),
    ("aupro_4_connected", "reporting/pixel_curves.py",
     "structure=np.ones((3, 3))",
     "structure=None"),
    ("f1_threshold_off_by_one", "reporting/metrics.py",
     "return float(f1[best]), float(thresholds[best]), None",
     "return float(f1[best]), float(thresholds[min(best + 1, len(thresholds) - 1)]), None"),
    ("aupro_not_normalised", "reporting/pixel_curves.py",
     "return float(area / fpr_limit)",
     "return float(area)"),
    ("masks_binarised_at_1", "dataset.py",
     "return np.asarray(mask) >= 128",
     "return np.asarray(mask) >= 1"),
    ("normalise_with_std_as_mean", "dataset.py",
     "transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)",
     "transforms.Normalize(IMAGENET_STD, IMAGENET_STD)"),
    ("official_distances_not_squared", "patchcore.py",
     "k=self.config.num_nn, squared=official)",
     "k=self.config.num_nn, squared=False)"),
    ("official_blur_mirror", "patchcore.py",
     'mode="reflect" if official else "mirror"',
     'mode="mirror"'),
    ("official_no_batchnorm_update", "patchcore.py",
     "            self.backbone.official_batchnorm_update(self.config.image_size)\n",
     "            pass\n"),
    ("official_pooling_bins_floored", "method/official.py",
     "start, end = (k * length) // bins, -((-(k + 1) * length) // bins)  # floor, ceil",
     "start, end = (k * length) // bins, ((k + 1) * length) // bins"),
    ("official_masks_at_half_range", "dataset.py",
     "return (self._official_mask(mask)[:1] >= 1).float()",
     "return (self._official_mask(mask)[:1] >= 0.5).float()"),
    ("exact_search_scans_only_the_tiles_holding_the_query", "method/search.py",
     "reach = upper + margin",
     "reach = torch.zeros_like(upper)"),
    ("exact_search_boxes_inside_out", "method/search.py",
     "gap1 = (low1 - p1).clamp_min_(0).add_((p1 - high1).clamp_min_(0))",
     "gap1 = (high1 - p1).clamp_min_(0).add_((p1 - low1).clamp_min_(0))"),
    ("graph_search_scans_only_the_tiles_holding_the_query", "deploy/onnx_search.py",
     "box_reach = op.Add(reach, op.Mul(f64(2 * gamma(width + 2)), op.Add(op.Sqrt(squared), norm_max)))",
     "box_reach = op.Mul(reach, f64(0.0))"),
    ("exact_search_reuses_another_candidates_distance", "method/search.py",
     "from_ub = seen[which].gather(1, match.to(torch.uint8).argmax(1, keepdim=True)).squeeze(1)",
     "from_ub = seen[which].gather(1, match.to(torch.uint8).argmin(1, keepdim=True)).squeeze(1)"),
    ("exact_search_upper_bound_from_the_nearest", "method/search.py",
     "return raised(seen.amax(1), q.shape[1])",
     "return raised(seen.amin(1), q.shape[1])"),
    ("exact_search_ties_by_distance_only", "method/search.py",
     "first = first_k(which, n, k, d64, rows)",
     "first = first_k(which, n, k, d64)"),
    ("conformal_rank_one_lower", "method/thresholds.py",
     "return float(np.sort(scores)[k - 1]), (n + 1 - k) / (n + 1)",
     "return float(np.sort(scores)[max(k - 2, 0)]), (n + 1 - k) / (n + 1)"),
    ("calibration_bank_keeps_the_held_out_images", "patchcore.py",
     "kept = image_rows(sorted(set(range(n_images)) - set(held_out)), per_image)",
     "kept = image_rows(list(range(n_images)), per_image)"),
    ("official_bank_restricted_by_calibration", "patchcore.py",
     "first_from=(kept, calibration_size) if held_out and nested else None",
     "first_from=(kept, calibration_size) if held_out else None"),
    ("growing_ignores_the_bank", "patchcore.py",
     "picked = self._coreset(projected, existing=existing)",
     "picked = self._coreset(projected)"),
    ("graph_search_ties_to_the_higher_index", "deploy/onnx_search.py",
     "_, by_index = op.TopK(rows_all, op.Shape(rows_all, start=1, end=2), axis=1, largest=0, sorted=1)",
     "_, by_index = op.TopK(rows_all, op.Shape(rows_all, start=1, end=2), axis=1, largest=1, sorted=1)"),
    ("backbone_left_in_train_mode", "method/backbone.py",
     "self.eval().requires_grad_(False).to(device)",
     "self.requires_grad_(False).to(device)"),
    ("images_mode_keeps_each_map", "evaluate.py",
     "                records.append(record)\n",
     "                records.append(record)\n                globals().setdefault('kept', []).append(anomaly_map.copy())\n"),
    ("images_mode_keeps_each_batch", "evaluate.py",
     "            scores, maps = model.predict(images)\n",
     "            scores, maps = model.predict(images)\n            globals().setdefault('kept', []).append(images)\n"),
    ("patch_size_ignored", "patchcore.py",
     "grid, p = patch_grid(features, config.protocol), config.patch_size",
     "grid, p = patch_grid(features, config.protocol), 3"),
    ("official_patch_size_ignored", "patchcore.py",
     "return official_patches(features, config.patch_size, config.pretrain_dim, config.target_dim)",
     "return official_patches(features, 3, config.pretrain_dim, config.target_dim)"),
    ("num_nn_ignored", "patchcore.py",
     "return distances.mean(dim=1).reshape(patches.shape[:-1])",
     "return distances[:, 0].reshape(patches.shape[:-1])"),
    ("ensemble_normalisation_left_out", "ensemble.py",
     "return min_max(scores).mean(axis=0), min_max(maps).mean(axis=0)",
     "return scores.mean(axis=0), min_max(maps).mean(axis=0)"),
    ("ensemble_maps_not_normalised", "ensemble.py",
     "return min_max(scores).mean(axis=0), min_max(maps).mean(axis=0)",
     "return min_max(scores).mean(axis=0), maps.mean(axis=0)"),
    ("ensemble_members_not_over_their_thresholds", "ensemble.py",
     "return (scores / image).mean(axis=0), (maps / pixel).mean(axis=0)",
     "return scores.mean(axis=0), (maps / pixel).mean(axis=0)"),
    ("pixel_threshold_at_another_target", "method/thresholds.py",
     "pixel, _ = _conformal_threshold(map_peaks, target_fpr)",
     "pixel, _ = _conformal_threshold(map_peaks, 2 * target_fpr)"),
    ("review_page_flags_above_only", "reporting/assets/report_page.js",
     "state.isFlagged = (i) => data.score[i] !== null && data.score[i] >= state.threshold;",
     "state.isFlagged = (i) => data.score[i] !== null && data.score[i] > state.threshold;"),
    ("checksum_ignores_header", "plumbing/bank.py",
     "    digest.update(json.dumps(rest, sort_keys=True).encode())\n",
     "    pass\n"),
    ("export_input_not_normalised", "deploy/onnx_export.py",
     "x = x.sub(self.mean).div(self.std)  # torchvision's Normalize",
     "x = x.sub(self.mean)"),
    ("export_decides_the_wrong_way", "deploy/onnx_export.py",
     "scores >= self.image_threshold, maps >= self.pixel_threshold",
     "scores < self.image_threshold, maps >= self.pixel_threshold"),
    ("export_keeps_a_file_that_fails_its_check", "deploy/onnx_export.py",
     "if not error <= CHECK_TOLERANCE:",
     "if False:"),
    ("runner_crop_offset_floored", "plumbing/image_io.py",
     "top, left = int(round((height - image_size) / 2.0)), int(round((width - image_size) / 2.0))",
     "top, left = (height - image_size) // 2, (width - image_size) // 2"),
    ("runner_resizes_nearest", "plumbing/image_io.py",
     "image = image.resize(size, Image.Resampling.BILINEAR)",
     "image = image.resize(size, Image.Resampling.NEAREST)"),
    ("openvino_at_its_default_precision", "deploy/onnx_model.py",
     '{"INFERENCE_PRECISION_HINT": "f32"}',
     "{}"),
    ("audit_counts_the_own_image", "method/audit.py",
     "first, last = int(starts[picked].min()), int(ends[picked].max())",
     "first, last = 0, 0"),
    ("audit_ranks_the_lowest_first", "method/audit.py",
     "order = np.lexsort((np.arange(len(scores)), -scores))",
     "order = np.lexsort((np.arange(len(scores)), scores))"),
    ("robust_bank_drops_the_nearest_rows", "method/audit.py",
     "keep[torch.argsort(distances.double(), stable=True)[len(distances) - n_drop :]] = False",
     "keep[torch.argsort(distances.double(), stable=True)[:n_drop]] = False"),
    ("tiles_keep_up_to_the_next_start", "method/tiles.py",
     "bounds = [0] + [(start + tile + after) // 2 for start, after in zip(starts, starts[1:])] + [length]",
     "bounds = [0] + [after for start, after in zip(starts, starts[1:])] + [length]"),
    ("tiled_scoring_keeps_the_lowest_patch", "method/tiles.py",
     "better = top > s_star",
     "better = top < s_star"),
    ("ad2_rule_two_std", "method/thresholds.py",
     "mean + 3 * np.sqrt(",
     "mean + 2 * np.sqrt("),
    ("segf1_as_iou", "reporting/metrics.py",
     "return 2 * tp / (2 * tp + ",
     "return tp / (tp + "),
    ("ad2_masks_of_another_size_taken", "dataset.py",
     "if sample.mask is not None and header_size(sample.mask) != header_size(sample.image):",
     "if False:"),
    ("ad2_private_maps_at_the_models_size", "evaluate.py",
     "full = resize_map(anomaly_map, dataset.original_size(i))",
     "full = anomaly_map"),
    ("curves_ties_not_half", "reporting/pixel_curves.py",
     "np.sum(negatives * (above + 0.5 * positives))",
     "np.sum(negatives * (above + positives))"),
    ("curves_regions_unweighted", "reporting/pixel_curves.py",
     "weights=1.0 / sizes[labelled.ravel()[flat]]",
     "weights=np.ones(int(flat.sum()))"),
    ("curves_bins_out_of_order", "reporting/pixel_curves.py",
     "ordered = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))",
     "ordered = bits"),
    ("curves_threshold_strict", "reporting/pixel_curves.py",
     "flagged = values.ravel() >= threshold",
     "flagged = values.ravel() > threshold"),
    ("curves_defective_images_ignored", "reporting/pixel_curves.py",
     "self.good_in_defective += good",
     "self.good_in_defective += 0"),
    ("tiled_export_untiled", "deploy/onnx_export.py",
     "if self.scorer.config.tile_size:",
     "if False:"),
]  # fmt: skip


def repository_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore: what a fresh clone plus work in progress holds."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    return [f for f in listed.stdout.splitlines() if (REPO / f).is_file()]


def test_files(root: Path) -> list[str]:
    present = sorted(p.name for p in (root / "tests").glob("test_*.py"))
    return [f"tests/{name}" for name in [n for n in TEST_ORDER if n in present] + [n for n in present if n not in TEST_ORDER]]


def run_suite(root: Path) -> tuple[bool, str]:
    """(passed, first failing test) of the suite with -x in root."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "2", "-p", "no:cacheprovider", "-o", "addopts=", *test_files(root)]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.M)
    if result.returncode == 0:
        return True, ""
    return False, failed[0] if failed else result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma list of mutation names to run (default: all)")
    parser.add_argument("--no_baseline", action="store_true", help="skip the check that the unmutated suite passes")
    args = parser.parse_args()
    wanted = [m for m in MUTATIONS if not args.only or m[0] in args.only.split(",")]
    if args.only and len(wanted) != len(args.only.split(",")):
        parser.error(f"unknown mutation in --only; known: {', '.join(m[0] for m in MUTATIONS)}")

    work = Path(tempfile.mkdtemp(prefix="patchcore-mutations-"))
    try:
        files = repository_files()
        copy = work / "repo"
        for name in files:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
        # a repository of its own, as a clone is: tests that ask git what the project holds answer for the copy
        subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
        subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
        if not args.no_baseline:
            start = time.perf_counter()
            passed, failure = run_suite(copy)
            verdict = "passes" if passed else f"FAILS at {failure}"
            print(f"baseline (no mutation): {verdict} ({time.perf_counter() - start:.0f}s)", flush=True)
            if not passed:
                return 1
        rows, bad = [], 0
        for name, file, original, mutated in wanted:
            source = (copy / file).read_text()
            if source.count(original) != 1:
                rows.append((name, file, "NOT APPLIED (text not found once: update the mutation)", 0.0))
                bad += 1
                print(f"{name:<30} NOT APPLIED", flush=True)
                continue
            (copy / file).write_text(source.replace(original, mutated))
            start = time.perf_counter()
            passed, failure = run_suite(copy)
            seconds = time.perf_counter() - start
            (copy / file).write_text(source)
            verdict = "SURVIVED" if passed else f"caught by {failure}"
            bad += passed
            rows.append((name, file, verdict, seconds))
            print(f"{name:<30} {verdict} ({seconds:.0f}s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| mutation | file | result |\n|---|---|---|")
    for name, file, verdict, _ in rows:
        print(f"| {name} | {file} | {verdict} |")
    print(f"\n{len(rows) - bad} of {len(rows)} mutations caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
