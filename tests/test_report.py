"""report.py: the summary table against the published numbers of each protocol, and the heatmap panel."""

import csv
from pathlib import Path

import numpy as np
import pytest

from plumbing.image_io import heatmap_names, heatmap_panel
from reporting.report import mask_outline, summary_rows, write_summary


def _result(category, image, pixel, pro, protocol="paper", shots=0):
    return {
        "category": category,
        "image_auroc": image,
        "pixel_auroc": pixel,
        "aupro": pro,
        "weights": "w",
        "protocol": protocol,
        "shots": shots,
    }


def test_summary_rows_compare_with_the_paper():
    rows = summary_rows([_result("bottle", 0.99, 0.97, 0.9), _result("pill", 0.95, None, None), _result("mine", 0.8, 0.9, 0.7)])
    bottle, pill, mine, mean, compared = rows
    assert bottle["published_image_auroc"] == 100.0 and bottle["image_auroc_diff"] == pytest.approx(-1.0)
    assert bottle["published_pixel_auroc"] == 98.6 and bottle["pixel_auroc_diff"] == pytest.approx(-1.6)
    assert pill["pixel_auroc"] is None and pill["pixel_auroc_diff"] is None  # undefined stays undefined
    assert mine["published_image_auroc"] is None and mine["image_auroc_diff"] is None  # no target for own categories
    assert mean["image_auroc"] == pytest.approx((99 + 95 + 80) / 3, abs=0.01)
    assert mean["pixel_auroc"] == pytest.approx((97 + 90) / 2) and mean["aupro"] == pytest.approx(80.0)
    assert mean["published_image_auroc"] is None and mean["image_auroc_diff"] is None  # 'mine' has no published number
    # the comparison is over the same categories on both sides: bottle and pill (pill's pixel AUROC is undefined)
    assert compared["category"] == "mean of the 2 published"
    assert compared["image_auroc"] == pytest.approx((99 + 95) / 2) and compared["published_image_auroc"] == pytest.approx((100 + 96.6) / 2)
    assert compared["image_auroc_diff"] == pytest.approx((99 + 95) / 2 - (100 + 96.6) / 2, abs=0.01)
    assert compared["pixel_auroc"] == 97.0 and compared["published_pixel_auroc"] == 98.6
    assert compared["pixel_auroc_diff"] == pytest.approx(-1.6)


def test_each_protocol_is_compared_with_its_own_published_numbers(tmp_path):
    paper, official, _ = summary_rows([_result("cable", 0.99, 0.98, 0.9), _result("cable", 0.99, 0.98, 0.9, "official")])
    assert paper["published_image_auroc"] == 99.5 and paper["published_pixel_auroc"] == 98.4  # the seed's table
    assert official["published_image_auroc"] == 99.68 and official["published_pixel_auroc"] == 98.41  # the released results.csv
    write_summary(tmp_path, [_result("cable", 0.99, 0.98, 0.9, "official")])
    text = (tmp_path / "summary.md").read_text()
    assert "protocol: official" in text and "IM224_WR50_L2-3_P01_D1024-1024_PS-3_AN-1/results.csv" in text and "design document" not in text


def test_visa_categories_few_shot_runs_and_own_categories(tmp_path):
    rows = summary_rows([_result("pcb1", 0.95, 0.99, 0.9, shots=4), _result("mine", 0.9, None, None)])
    assert rows[0]["published_image_auroc"] == 98.5 and rows[0]["published_pixel_auroc"] == 99.9 and rows[0]["shots"] == 4
    assert rows[1]["published_image_auroc"] is None and rows[2]["shots"] == "4/all"
    text = write_summary(tmp_path, [_result("pcb1", 0.95, 0.99, 0.9, shots=4)])
    assert "IM-IAD" in text and "full-shot" in text and "| pcb1 | 4 |" in text


def test_false_alarms_and_recall_at_the_calibrated_threshold_are_columns():
    result = {**_result("bottle", 0.99, 0.97, 0.9), "at_calibrated_thresholds": {"image_fpr": 0.05, "image_recall": 0.875}}
    row, mean = summary_rows([result])
    assert (row["image_fpr"], row["image_recall"]) == (5.0, 87.5) and (mean["image_fpr"], mean["image_recall"]) == (5.0, 87.5)


def test_write_summary_files(tmp_path):
    table = write_summary(tmp_path, [_result("bottle", 0.99, 0.97, 0.9)])
    assert "| bottle | all | 99.00 | 100.00 | -1.00 | 97.00 | 98.60 | -1.60 | 90.00 | n/a | n/a |" in table
    assert table in (tmp_path / "summary.md").read_text()
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert rows[0]["image_auroc_diff"] == "-1.0" and rows[0]["protocol"] == "paper" and rows[1]["category"] == "mean"
    assert "AUROC, defective images" not in table  # the paper's table has no defective-image figures: no such columns


def test_a_preset_run_is_compared_with_that_runs_results_like_with_like(tmp_path):
    """The released code's results.csv: instance_auroc, full_pixel_auroc, and on the defective images alone
    anomaly_pixel_auroc and anomaly_pro, each beside the metric of ours computed on the same images."""
    result = {**_result("bottle", 0.99, 0.97, 0.9, "official"), "preset": "official-im320-ensemble",
              "pixel_auroc_defective": 0.96, "aupro_defective": 0.95}  # fmt: skip
    row, _ = summary_rows([result])
    # models/IM320_Ensemble_L2-3_P001_D1024-384_PS-3_AN-1/results.csv, mvtec_bottle @ fcaa92f
    assert (row["published_image_auroc"], row["published_pixel_auroc"]) == (100.0, 98.68)
    assert (row["published_pixel_auroc_defective"], row["published_aupro_defective"]) == (98.23, 97.01)
    assert row["aupro_defective_diff"] == pytest.approx(95 - 97.01)
    table = write_summary(tmp_path, [result])
    assert "pixel AUROC, defective images | published | diff | AUPRO@0.3, defective images | published | diff" in table
    cells = "| bottle | all | 99.00 | 100.00 | -1.00 | 97.00 | 98.68 | -1.68 | 90.00 | 96.00 | 98.23 | -2.23 | 95.00 | 97.01 | -2.01 |"
    assert cells in table
    assert "IM320_Ensemble_L2-3_P001_D1024-384_PS-3_AN-1/results.csv" in table and "preset: official-im320-ensemble" in table


def test_heatmap_names_keep_images_that_share_a_stem_apart():
    images = [Path("crack/000.png"), Path("crack/000.jpg"), Path("crack/001.png"), Path("good/000.png"), Path("a/b/x.bmp")]
    names = ["crack/000.png.png", "crack/000.jpg.png", "crack/001.png", "good/000.png", "a/b/x.png"]
    assert [p.as_posix() for p in heatmap_names(images)] == names


def test_heatmap_panel_layout_outline_and_region():
    rgb = np.zeros((32, 32, 3))
    anomaly_map = np.zeros((32, 32))
    anomaly_map[:, 16:] = 1.0
    mask = np.zeros((32, 32))
    mask[8:24, 8:24] = 1
    panel = np.asarray(heatmap_panel(rgb, anomaly_map, 0.0, 1.0, threshold=0.5, outline=mask_outline(mask)))
    assert panel.shape == (32, 3 * 32 + 72, 3)
    overlay, region = panel[:, 32:64], panel[:, 64:96]
    assert (overlay[8, 8] == 255).all() and not (overlay[16, 16] == 255).all()  # outline, not the inside
    assert region[2, 20, 0] > 100 and region[2, 20, 1] == 0  # above the threshold: red
    assert (region[2, 4] == 0).all()  # below: the input as it was
    assert (overlay[2, 4] != overlay[2, 20]).any()  # one fixed scale: low and high differ in colour


def test_the_heatmaps_jet_is_matplotlibs():
    """image_io.jet, the one colour map of every heatmap, against matplotlib's jet at the 256 entries of its table."""
    import matplotlib

    from plumbing.image_io import jet

    x = np.linspace(0, 1, 256)
    np.testing.assert_allclose(jet(x), matplotlib.colormaps["jet"](x)[:, :3] * 255, atol=1e-9)


def test_published_means_are_the_runs_results_csv_beside_the_scripts_comment():
    """Issue 28, item 10: README and summary.md show what each run's results.csv averages to beside what the comment in
    sample_training.sh states, and say which is which. The means: the issue's hand computation for three runs, numpy
    over the embedded rows for all."""
    from reporting.published import RUN_RESULTS, STATED_MEANS, source_text
    from scripts import REPO

    by_hand = {"official-im320-seg-ensemble": (99.03, 98.44, 94.11), "official-im320-seg": (98.92, 98.32, None),
               "official-im224-ensemble": (None, None, 94.33)}  # fmt: skip
    readme = (REPO / "README.md").read_text()
    assert "| `--preset` | their run | mean of the run's results.csv | `sample_training.sh`'s comment |" in readme
    for run, rows in RUN_RESULTS.items():
        means = np.mean(np.array(list(rows.values())), axis=0)[[0, 1, 3]] * 100
        for mean, hand in zip(means, by_hand.get(run, (None,) * 3)):
            assert hand is None or round(mean, 2) == hand, (run, mean, hand)
        comment = " / ".join(f"{100 * v:.1f}" for v in STATED_MEANS[run])
        (row,) = [line for line in readme.splitlines() if line.startswith(f"| `{run}` |")]
        cells = row.split(" | ")
        assert cells[2] == " / ".join(f"{v:.2f}" for v in means) and cells[3].startswith(comment), row
        text = source_text(run)
        assert f"their means over its 15 categories: {means[0]:.2f}% / {means[1]:.2f}% / PRO {means[2]:.2f}%" in text
        assert f"the comment in sample_training.sh states {100 * STATED_MEANS[run][0]:.1f}%" in text
    assert "repeats the IM320 ensemble line" in source_text("official-im320-seg-ensemble")
    assert STATED_MEANS["official-im320-seg-ensemble"] == STATED_MEANS["official-im320-ensemble"]  # the script's comment, as it is
