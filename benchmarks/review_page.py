"""The review page (report.html) at a real size: its bytes, and how fast headless Chromium opens and filters it.

    python benchmarks/review_page.py --images 2000 --out benchmarks/review_page.json

Writes one synthetic category of --images test records, as evaluate.py would leave it: a heatmap
panel (image_io.heatmap_panel) and a thumbnail (report_page.save_thumbnail) per image, drawn from
smooth random 224 px images and maps, scores.json, summary.md and metrics.json (metrics.py's
image metrics on the synthetic scores), then report_page.write_report_page. No model runs: the
page depends only on these files. Then, in headless Chromium (tests/browser.py), --loads fresh
loads from file://, each timed with the browser's own clock, and per load:

  - DOMContentLoaded, first contentful paint, the page's script done (gallery built), load event;
  - thumbnails loaded once the visible ones are in (lazy loading: the rest wait for scrolling);
  - the outcome filter changed (false alarms), a defect-type filter, a sort, 50 slider positions:
    each timed from the event to the next frame drawn.
The table gives each figure's median over the loads (maximum in brackets).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from browser import chromium, missing  # noqa: E402
from plumbing.files import write_json  # noqa: E402
from plumbing.image_io import heatmap_panel  # noqa: E402
from reporting.metrics import compute_metrics  # noqa: E402
from reporting.report import save_heatmap, write_summary  # noqa: E402
from reporting.report_page import save_thumbnail, thumbnail_name, write_report_page  # noqa: E402

DEFECTS = ("good", "crack", "scratch", "spot", "stain", "contamination")

# JS, run in the page: (DOMContentLoaded, first contentful paint, script done, load) in ms since navigation start
LOAD_TIMES = """
const nav = performance.getEntriesByType('navigation')[0];
const paint = performance.getEntriesByName('first-contentful-paint')[0];
return [nav.domContentLoadedEventEnd, paint ? paint.startTime : null, window.reportReady, nav.loadEventEnd];
"""
# JS: the time from a change to the next frame drawn, in ms (arguments: selector, value, event type)
TIME_CHANGE = """
const [selector, value, type] = arguments, done = arguments[arguments.length - 1];
const node = document.querySelector(selector), start = performance.now();
node.value = value;
node.dispatchEvent(new Event(type, {bubbles: true}));
requestAnimationFrame(() => setTimeout(() => done(performance.now() - start), 0));
"""


def write_category(out: Path, n: int, size: int, seed: int) -> tuple[dict, float]:
    """A category of n synthetic test images: panels, thumbnails, scores.json, metrics.json; returns the metrics
    and the seconds save_thumbnail took in all (what the thumbnails add to evaluate.py's heatmap loop)."""
    rng = np.random.default_rng(seed)
    folder = out / "synthetic"
    defects = [DEFECTS[0] if i < n // 3 else DEFECTS[1 + i % (len(DEFECTS) - 1)] for i in range(n)]
    labels = np.array([int(d != "good") for d in defects])
    scores = np.where(labels == 1, rng.normal(12.0, 2.0, n), rng.normal(8.0, 1.0, n))
    records, thumbnail_seconds = [], 0.0
    for i in range(n):
        rgb = ndimage.gaussian_filter(rng.uniform(0, 255, (size, size, 3)), (6, 6, 0))
        rgb = (rgb - rgb.min()) / max(np.ptp(rgb), 1e-9) * 255
        anomaly_map = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 8) * 40 + scores[i] * 0.7
        name = Path(defects[i]) / f"{i:05d}.png"
        panel = heatmap_panel(rgb, anomaly_map, 0.0, 16.0, 9.0)
        save_heatmap(folder / "anomaly_maps" / name, panel)
        start = time.perf_counter()
        save_thumbnail(folder / thumbnail_name(name), panel, size)
        thumbnail_seconds += time.perf_counter() - start
        records.append({"path": f"synthetic/test/{name.as_posix()}", "defect_type": defects[i], "label": int(labels[i]),
                        "score": float(scores[i]), "heatmap": f"anomaly_maps/{name.as_posix()}"})  # fmt: skip
    calibration = {"image_threshold": 9.5, "pixel_threshold": 9.0, "target_fpr": 0.05, "expected_fpr": 0.05}
    no_pixels = "synthetic records: no pixel ground truth"
    metrics = {"category": "synthetic", "protocol": "paper", "shots": 0, "weights": "none (synthetic records)",
               **compute_metrics(labels, scores, None, None, defects, no_pixels, calibration)}  # fmt: skip
    write_json(folder / "scores.json", records)
    write_json(folder / "metrics.json", metrics)
    write_summary(out, [metrics])
    return metrics, thumbnail_seconds


def measure(page: Path, loads: int) -> list[dict]:
    """Per fresh load of page: load times, thumbnails loaded, and the times of filters, a sort and slider moves."""
    runs = []
    with chromium(1280, 900) as driver:
        driver.set_script_timeout(30)
        for _ in range(loads):
            driver.get("about:blank")
            driver.get(page.absolute().as_uri())
            driver.execute_script("return new Promise((done) => setTimeout(done, 500))")  # the visible thumbnails come in
            dom, paint, ready, load = driver.execute_script(LOAD_TIMES)
            images = driver.execute_script("return [...document.querySelectorAll('.item img')].map(i => i.naturalWidth > 0)")
            timed = {}
            for name, selector, value, kind in [
                ("filter: false alarms", "select.filter-outcome", "false-alarm", "change"),
                ("filter: every outcome again", "select.filter-outcome", "all", "change"),
                ("filter: one defect type", "select.filter-defect", "scratch", "change"),
                ("sort by name", "select.sort", "name", "change"),
            ]:
                timed[name] = driver.execute_async_script(TIME_CHANGE, selector, value, kind)
            slider = [driver.execute_async_script(TIME_CHANGE, "input.slider", str(v), "input") for v in np.linspace(6, 16, 50)]
            timed["slider, one move (median of 50)"] = statistics.median(slider)
            timed["slider, slowest of 50 moves"] = max(slider)
            logs = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
            loaded = {"DOMContentLoaded": dom, "first contentful paint": paint, "page script done": ready, "load event": load}
            runs.append(
                {**loaded, "thumbnails loaded": sum(images), "gallery entries": len(images), "console problems": len(logs), **timed}
            )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="test images in the category (default: 2000)")
    parser.add_argument("--size", type=int, default=224, help="the images' side in px, as the model's input (default: 224)")
    parser.add_argument("--loads", type=int, default=5, help="fresh page loads measured (default: 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="write the run here and keep it (default: a temporary folder, removed)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    reason = missing()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        sys.exit(1)
    with tempfile.TemporaryDirectory(prefix="patchcore-page-") as temporary:
        out = Path(args.keep or temporary)
        start = time.perf_counter()
        _, thumbnail_seconds = write_category(out, args.images, args.size, args.seed)
        written = time.perf_counter() - start
        start = time.perf_counter()
        page = write_report_page(out, [json.loads((out / "synthetic" / "metrics.json").read_text())])
        page_seconds = time.perf_counter() - start
        sizes = {
            kind: sum(p.stat().st_size for p in (out / "synthetic" / kind).rglob("*") if p.is_file())
            for kind in ("thumbnails", "anomaly_maps")
        }
        runs = measure(page, args.loads)
        facts = {
            "images": args.images,
            "report.html bytes": page.stat().st_size,
            "thumbnails bytes (all)": sizes["thumbnails"],
            "thumbnail bytes (mean)": round(sizes["thumbnails"] / args.images),
            "heatmap panels bytes (all)": sizes["anomaly_maps"],
            "write_report_page seconds": round(page_seconds, 3),
            "panels + thumbnails written, seconds": round(written, 1),
            "save_thumbnail ms per image": round(1000 * thumbnail_seconds / args.images, 2),
        }
    for key, value in facts.items():
        print(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
    print(f"\n| in headless Chromium, {args.loads} fresh loads from file:// | median | max |\n|---|---|---|")
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        unit = "" if key in ("thumbnails loaded", "gallery entries", "console problems") else " ms"
        print(f"| {key} | {statistics.median(values):.0f}{unit} | {max(values):.0f}{unit} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "facts": facts, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
