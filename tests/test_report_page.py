"""report_page.py without a browser: thumbnails, the summary table, the page's bytes (tests/test_report_browser.py opens it)."""

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from plumbing.image_io import heatmap_panel
from reporting.report import write_summary
from reporting.report_page import THUMBNAIL_SIDE, save_thumbnail, summary_html, thumbnail_name
from scripts import REPO


def test_thumbnail_is_the_heatmap_tile_at_most_128_px(tmp_path):
    """A grey input under a uniform map: the overlay tile has one colour the input tile has not."""
    import matplotlib

    rgb = np.full((300, 200, 3), 100.0)
    anomaly_map = np.full((300, 200), 0.9)
    panel = heatmap_panel(rgb, anomaly_map, 0.0, 1.0, threshold=0.5)
    save_thumbnail(tmp_path / thumbnail_name("good/001.png"), panel, 200)
    path = tmp_path / "thumbnails" / "good" / "001.jpg"
    thumb = np.asarray(Image.open(path).convert("RGB"), np.float64)
    assert Image.open(path).format == "JPEG" and thumb.shape == (THUMBNAIL_SIDE, round(THUMBNAIL_SIDE * 200 / 300), 3)
    expected = 0.5 * 100 + 0.5 * np.array(matplotlib.colormaps["jet"](0.9)[:3]) * 255  # image_io.heatmap_panel's overlay
    assert np.abs(thumb - expected).max() < 6  # JPEG rounding


def _cells(text: str) -> list[list[str]]:
    class Cells(HTMLParser):
        rows: list = []

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.rows[-1].append("")

        def handle_data(self, data):
            if self.rows and self.rows[-1]:
                self.rows[-1][-1] += data

    parser = Cells()
    parser.rows = []
    parser.feed(text)
    return parser.rows


def test_the_summary_table_is_summary_md_s(tmp_path):
    result = {"category": "bottle", "image_auroc": 0.99, "pixel_auroc": 0.97, "aupro": 0.9, "weights": "w", "protocol": "paper", "shots": 0}
    markdown = write_summary(tmp_path, [result, {**result, "category": "mine", "pixel_auroc": None}])
    expected = [[c.strip().strip("*") for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]
    expected = [row for row in expected if set("".join(row)) - set("-")]  # without the |---| line
    page = summary_html(markdown)
    assert _cells(page) == expected and len(expected) == 5  # header, two categories, the mean and the mean of the published one
    assert "<h2>PatchCore on 2 categories (percent)</h2>" in page and "<li>" in page and "**" not in page


def test_the_page_is_the_same_bytes_from_the_same_outputs(evaluated, tmp_path):
    """Written again from a copy of the outputs under other hash seeds: no timestamp, no path, no set order inside."""
    _, out, _ = evaluated
    page = (out / "report.html").read_bytes()
    assert str(out).encode() not in page and str(REPO).encode() not in page
    shutil.copy(out / "summary.md", tmp_path / "summary.md")
    (tmp_path / "widget").mkdir()
    shutil.copy(out / "widget" / "scores.json", tmp_path / "widget" / "scores.json")
    shutil.copy(out / "widget" / "train_audit.json", tmp_path / "widget" / "train_audit.json")  # its section of the page
    code = (
        "import json, sys; from pathlib import Path; from reporting.report_page import write_report_page; "
        "out, copy = Path(sys.argv[1]), Path(sys.argv[2]); "
        "write_report_page(copy, [json.loads((out / 'widget' / 'metrics.json').read_text())])"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "report.html").read_bytes() == page


def test_evaluate_writes_a_thumbnail_per_heatmap(evaluated):
    _, out, stdout = evaluated
    heatmaps = sorted(p.relative_to(out / "widget" / "anomaly_maps") for p in (out / "widget" / "anomaly_maps").rglob("*.png"))
    thumbs = sorted(p.relative_to(out / "widget") for p in (out / "widget" / "thumbnails").rglob("*"))
    assert [p for p in thumbs if p.suffix] == [thumbnail_name(h) for h in heatmaps] and len(heatmaps) == 9
    assert Image.open(out / "widget" / thumbnail_name(heatmaps[0])).size == (64, 64)  # the 64 px tile, never enlarged
    records = json.loads((out / "widget" / "scores.json").read_text())
    assert sorted(r["heatmap"] for r in records) == sorted(f"anomaly_maps/{h.as_posix()}" for h in heatmaps)
    assert f"review in a browser: {out / 'report.html'}" in stdout
    page = (out / "report.html").read_text()
    assert not re.search(r"(src|href)=\"?https?:|@import|<link", page)  # nothing from the network


def test_without_calibration_the_slider_starts_at_the_f1_threshold(tmp_path):
    from reporting.report_page import write_report_page

    (tmp_path / "w").mkdir()
    images = [("good", 1.0), ("good", 2.5), ("dent", 2.0), ("dent", 4.0)]
    records = [{"path": f"w/test/{d}/{i}.png", "defect_type": d, "label": int(d != "good"), "score": s,
                "heatmap": f"anomaly_maps/{d}/{i}.png"} for i, (d, s) in enumerate(images)]  # fmt: skip
    (tmp_path / "w" / "scores.json").write_text(json.dumps(records))
    metrics = {"category": "w", "image_auroc": 0.75, "image_f1_threshold": 2.0, "per_defect": {"dent": {"image_auroc": 0.75}}}
    page = write_report_page(tmp_path, [metrics]).read_text()
    slider = re.search(r'<input type="range" class="slider" min="([^"]+)" max="([^"]+)" step="any" value="([^"]+)"', page)
    low, high, start = map(float, slider.groups())
    assert start == 2.0 and low < 1.0 and high > 4.0  # every score reachable, and beyond: nothing flagged
    assert re.findall(r'<button type="button" class="mark" data-value="([^"]+)">([^<]+)</button>', page) == [("2.0", "F1 2")]
    assert "<td>dent</td><td>2</td><td>75.00</td>" in page and "<td>good</td><td>2</td>" in page


def test_the_page_takes_each_thumbnails_name_from_python(tmp_path):
    """Issue 28, item 18: the thumbnail naming rule is thumbnail_name alone; the page carries the names it makes, by
    hand here: heatmap anomaly_maps/<name> -> thumbnails/<name without its last suffix>.jpg."""
    from reporting.report_page import write_images_page

    heatmaps = ["crack/a.png.png", "crack/a.jpg.png", "good/b.png", "c.d e.png"]
    scored = {"images": [{"path": f"/x/{h}", "heatmap": f"anomaly_maps/{h}", "score": 1.0} for h in heatmaps]}
    page = write_images_page(tmp_path, "w", scored, calibrated=None, f1=None).read_text()
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page).group(1))
    expected = ["thumbnails/crack/a.png.jpg", "thumbnails/crack/a.jpg.jpg", "thumbnails/good/b.jpg", "thumbnails/c.d e.jpg"]
    assert data[0]["thumbs"] == expected


def test_a_score_that_is_not_finite_is_null_in_the_pages_data(tmp_path):
    """JSON.parse throws on NaN and Infinity, and then every category's section stays blank: the page's data has null
    there, as a strict JSON parser reads it, and the slider's ends and start come from the finite values."""
    from reporting.report_page import write_images_page

    images = [{"path": f"{i}.png", "heatmap": f"anomaly_maps/{i}.png", "score": s} for i, s in enumerate([1.0, float("nan"), 3.0])]
    scored = {"images": images, "threshold": float("inf"), "thresholds_from": "--threshold"}
    page = write_images_page(tmp_path, "w", scored, calibrated=2.0, f1=float("nan")).read_text()
    payload = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page).group(1)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    (data,) = json.loads(payload, parse_constant=refuse)
    assert data["score"] == [1.0, None, 3.0] and data["start"] == 2.0 and all(np.isfinite(data["range"]))
    assert data["range"][0] < 1.0 and data["range"][1] > 3.0
