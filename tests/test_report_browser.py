"""report.html, the review page (report_page.py), in a real headless Chromium opened from file://.

Every figure the page shows at a threshold is checked against numpy on scores.json and against
metrics.rates_at, never against the page's own code. Without chromium, chromedriver or selenium this
module is skipped with one line; under CI (PATCHCORE_CI set, as .ci/run does) that fails the run instead.
"""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import browser
from reporting.metrics import rates_at
from reporting.report_page import save_thumbnail, thumbnail_name, write_images_page
from scripts import SMALL, run

if browser.missing():
    if os.environ.get("PATCHCORE_CI"):
        pytest.fail(f"PATCHCORE_CI is set and the review page's browser test cannot run: {browser.missing()}", pytrace=False)
    pytest.skip(f"the review page's browser test: {browser.missing()}", allow_module_level=True)


@pytest.fixture(scope="module")
def driver():
    with browser.chromium(1280, 1000) as chromium:
        yield chromium


def _problems(driver) -> list:
    """Console errors and warnings since the last call, and any resource not read from file://."""
    logs = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    remote = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('file:'))")
    return logs + remote


def _section(driver, category):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'section[data-category="{category}"]')


READ = """
const s = arguments[0], get = (c) => s.querySelector(c), text = (c) => get(c) ? get(c).textContent : null;
const items = [...s.querySelectorAll('.gallery .item')];
return {threshold: get('.threshold-value').value, fpr: get('.fpr') && get('.fpr').dataset.value, fprText: text('.fpr'),
        recall: get('.recall') && get('.recall').dataset.value, recallText: text('.recall'), fprCount: text('.fpr-count'),
        recallCount: text('.recall-count'), flagged: text('.flagged'), shown: text('.shown'),
        confusion: ['.tn', '.fp', '.fn', '.tp'].map(text), perDefect: [...s.querySelectorAll('.per-defect')].map(c => c.textContent),
        visible: items.filter(e => !e.hidden).map(e => e.dataset.name), all: items.map(e => e.dataset.name)};
"""


def _read(driver, section) -> dict:
    return driver.execute_script(READ, section)


def _move_slider(driver, section, value: float) -> None:
    """The slider set to value, as dragging it there would: its input event."""
    script = (
        "const s = arguments[0].querySelector('.slider'); s.value = arguments[1]; s.dispatchEvent(new Event('input', {bubbles: true}));"
    )
    driver.execute_script(script, section, repr(value))


def _type_threshold(section, value: float) -> None:
    """value typed into the threshold's number box, as a person would."""
    from selenium.webdriver.common.by import By

    box = section.find_element(By.CSS_SELECTOR, ".threshold-value")
    box.clear()
    box.send_keys(repr(value))


def _select(section, cls: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(section.find_element(By.CSS_SELECTOR, f"select.{cls}")).select_by_value(value)


def _expected(records: list, threshold: float) -> dict:
    """numpy, from scores.json: score >= threshold is defective."""
    labels = np.array([r["label"] for r in records])
    flagged = np.array([r["score"] for r in records]) >= threshold
    good, bad = labels == 0, labels == 1
    counts = {"tn": good & ~flagged, "fp": good & flagged, "fn": bad & ~flagged, "tp": bad & flagged, "n_good": good, "n_bad": bad}
    return {"fpr": flagged[good].mean(), "recall": flagged[bad].mean(), **{k: int(v.sum()) for k, v in counts.items()}}


def _check_figures(shown: dict, records: list, threshold: float) -> None:
    expected = _expected(records, threshold)
    labels, scores = [r["label"] for r in records], [r["score"] for r in records]
    fpr, recall = rates_at(labels, scores, threshold)  # metrics.py's own
    assert float(shown["fpr"]) == expected["fpr"] == fpr and float(shown["recall"]) == expected["recall"] == recall, (threshold, shown)
    assert abs(float(shown["fprText"].rstrip(" %")) - 100 * fpr) <= 0.005 + 1e-9
    assert abs(float(shown["recallText"].rstrip(" %")) - 100 * recall) <= 0.005 + 1e-9
    assert shown["fprCount"] == f"({expected['fp']} of {expected['n_good']} good)"
    assert shown["recallCount"] == f"({expected['tp']} of {expected['n_bad']} defective)"
    assert shown["confusion"] == [str(expected[k]) for k in ("tn", "fp", "fn", "tp")]
    assert shown["flagged"] == f"{expected['fp'] + expected['tp']} of {len(records)} images"


def test_the_page_opens_offline_with_one_entry_per_test_image(evaluated, driver, tmp_path):
    _, out, _ = evaluated
    records = json.loads((out / "widget" / "scores.json").read_text())
    metrics = json.loads((out / "widget" / "metrics.json").read_text())
    browser.open_page(driver, out / "report.html")
    section = _section(driver, "widget")
    shown = _read(driver, section)
    assert sorted(shown["all"]) == sorted(r["heatmap"].removeprefix("anomaly_maps/") for r in records) and len(shown["all"]) == 9
    # it starts at the calibrated threshold, where it shows what metrics.json says there
    at = metrics["at_calibrated_thresholds"]
    assert float(shown["threshold"]) == at["image_threshold"]
    assert (float(shown["fpr"]), float(shown["recall"])) == (at["image_fpr"], at["image_recall"])
    _check_figures(shown, records, at["image_threshold"])
    # every thumbnail in view is loaded, from its file beside the page
    driver.execute_script("return new Promise((done) => setTimeout(done, 200))")
    sizes = driver.execute_script("return [...arguments[0].querySelectorAll('.item img')].map(i => [i.complete, i.naturalWidth])", section)
    assert sizes == [[True, 64]] * 9
    assert _problems(driver) == []
    shot = tmp_path / "report.png"
    browser.screenshot(driver, shot)
    print(f"screenshot of the review page: {shot}")


def test_the_slider_shows_what_metrics_py_computes(evaluated, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _, out, _ = evaluated
    records = json.loads((out / "widget" / "scores.json").read_text())
    metrics = json.loads((out / "widget" / "metrics.json").read_text())
    browser.open_page(driver, out / "report.html")
    section = _section(driver, "widget")
    slider = section.find_element(By.CSS_SELECTOR, ".slider")
    lo, hi = float(slider.get_attribute("min")), float(slider.get_attribute("max"))
    scores = sorted({r["score"] for r in records})
    # between every two neighbouring scores, and beyond both ends: every operating point of the test split
    for value in [lo, *[(a + b) / 2 for a, b in zip(scores, scores[1:]) if b - a > 2 * (hi - lo) / 1000], hi]:
        _move_slider(driver, section, value)
        shown = _read(driver, section)
        assert abs(float(shown["threshold"]) - value) <= (hi - lo) / 1000  # the slider's resolution
        _check_figures(shown, records, value)
    # the F1 mark: exactly metrics.json's threshold, which is a test image's score, and so that image is flagged
    section.find_element(By.CSS_SELECTOR, "button.mark:nth-of-type(2)").click()
    shown = _read(driver, section)
    assert float(shown["threshold"]) == metrics["image_f1_threshold"] in [r["score"] for r in records]
    _check_figures(shown, records, metrics["image_f1_threshold"])
    # typed into the number box: a good image's score exactly
    value = max(r["score"] for r in records if r["label"] == 0)
    _type_threshold(section, value)
    shown = _read(driver, section)
    assert float(shown["threshold"]) == value and _expected(records, value)["fp"] >= 1
    _check_figures(shown, records, value)
    # dragged by the mouse, then moved with the arrow keys: whatever it lands on, the figures follow
    ActionChains(driver).click_and_hold(slider).move_by_offset(-slider.size["width"] // 4, 0).release().perform()
    dragged = float(_read(driver, section)["threshold"])
    _check_figures(_read(driver, section), records, dragged)
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    stepped = float(_read(driver, section)["threshold"])
    assert stepped == pytest.approx(dragged + 2 * (hi - lo) / 200, abs=(hi - lo) / 1000)
    _check_figures(_read(driver, section), records, stepped)
    assert _problems(driver) == []


def test_the_filters_and_the_sort_select_the_right_images(evaluated, driver):
    from selenium.webdriver.common.by import By

    _, out, _ = evaluated
    records = json.loads((out / "widget" / "scores.json").read_text())
    names = [r["heatmap"].removeprefix("anomaly_maps/") for r in records]
    browser.open_page(driver, out / "report.html")
    section = _section(driver, "widget")
    good = [r["score"] for r in records if r["label"] == 0]
    defective = [r["score"] for r in records if r["label"] == 1]
    for threshold in (max(good), max(defective)):  # exactly a score: at least one false alarm, then at least one missed defect
        _type_threshold(section, threshold)
        assert float(_read(driver, section)["threshold"]) == threshold
        flagged = [r["score"] >= threshold for r in records]
        outcome = {
            "false-alarm": {n for n, r, f in zip(names, records, flagged) if r["label"] == 0 and f},
            "missed": {n for n, r, f in zip(names, records, flagged) if r["label"] == 1 and not f},
        }
        outcome["correct"] = set(names) - outcome["false-alarm"] - outcome["missed"]
        outcome["all"] = set(names)
        assert outcome["false-alarm"] if threshold == max(good) else outcome["missed"]
        for defect in ["all", "good", *sorted({r["defect_type"] for r in records} - {"good"})]:
            _select(section, "filter-defect", defect)
            for kind, chosen in outcome.items():
                _select(section, "filter-outcome", kind)
                expected = {n for n, r in zip(names, records) if n in chosen and defect in ("all", r["defect_type"])}
                shown = _read(driver, section)
                assert set(shown["visible"]) == expected, (threshold, defect, kind)
                assert shown["shown"] == f"showing {len(expected)} of 9"
    _select(section, "filter-defect", "all")
    _select(section, "filter-outcome", "all")
    order = sorted(range(len(records)), key=lambda i: (-records[i]["score"], i))
    assert _read(driver, section)["visible"] == [names[i] for i in order]  # highest score first, by default
    _select(section, "sort", "score-asc")
    assert _read(driver, section)["visible"] == [names[i] for i in sorted(range(len(records)), key=lambda i: (records[i]["score"], i))]
    _select(section, "sort", "name")
    assert _read(driver, section)["visible"] == sorted(names)
    # a thumbnail opens its full panel (input | heatmap | region | colour bar)
    section.find_element(By.CSS_SELECTOR, ".gallery .item").click()
    panel = driver.execute_script(
        "const b = document.getElementById('lightbox'), i = b.querySelector('img');"
        "return new Promise((done) => { const f = () => done([b.hidden, i.naturalWidth, decodeURIComponent(i.src)]);"
        "i.complete && i.naturalWidth ? f() : i.addEventListener('load', f); });"
    )
    assert panel[0] is False and panel[1] == 3 * 64 + 72 and panel[2].endswith(f"widget/anomaly_maps/{sorted(names)[0]}")
    assert _problems(driver) == []


def test_images_runs_get_the_gallery_and_slider_without_labels(evaluated, driver, tmp_path):
    root, out, _ = evaluated
    (tmp_path / "widget").mkdir()
    for name in ("memory_bank.npz", "metrics.json"):
        shutil.copy(out / "widget" / name, tmp_path / "widget" / name)
    result = run("evaluate.py", "--category", "widget", "--output_dir", tmp_path, "--images", f"{root}/widget/test/*/*.png", *SMALL)
    assert result.returncode == 0, result.stderr
    inference = json.loads((tmp_path / "widget" / "inference" / "scores.json").read_text())
    f1 = json.loads((out / "widget" / "metrics.json").read_text())["image_f1_threshold"]
    browser.open_page(driver, tmp_path / "widget" / "inference" / "report.html")
    section = _section(driver, "widget")
    names = [r["heatmap"].removeprefix("anomaly_maps/") for r in inference["images"]]
    scores = np.array([r["score"] for r in inference["images"]])
    shown = _read(driver, section)
    assert sorted(shown["all"]) == sorted(names) and len(names) == 9 and shown["fpr"] is None  # no labels, no rates
    assert float(shown["threshold"]) == inference["threshold"]
    for threshold in (inference["threshold"], f1):
        if threshold == f1:
            driver.execute_script(
                "[...arguments[0].querySelectorAll('button.mark')].find(b => b.textContent.startsWith('F1')).click()", section
            )
        flagged = {n for n, s in zip(names, scores) if s >= threshold}
        if threshold == inference["threshold"]:
            assert flagged == {n for n, r in zip(names, inference["images"]) if r["decision"] == "defective"}
        shown = _read(driver, section)
        assert float(shown["threshold"]) == threshold
        assert shown["flagged"] == f"{len(flagged)} of 9 images ({100 * len(flagged) / 9:.2f} %)"
        _select(section, "filter-outcome", "flagged")
        assert set(_read(driver, section)["visible"]) == flagged
        _select(section, "filter-outcome", "passed")
        assert set(_read(driver, section)["visible"]) == set(names) - flagged
    assert _problems(driver) == []


def test_thumbnails_load_as_they_come_into_view_and_ties_keep_file_order(driver, tmp_path):
    n = 600
    for i in range(n):
        save_thumbnail(tmp_path / thumbnail_name(f"{i:04d}.png"), Image.new("RGB", (3 * 16 + 72, 16), (i % 256, 80, 80)), 16)
    scored = {
        "threshold": 0.5,
        "images": [{"path": f"{i:04d}.png", "heatmap": f"anomaly_maps/{i:04d}.png", "score": (i // 2) / n} for i in range(n)],
    }
    write_images_page(tmp_path, "many", scored, calibrated=None, f1=None)
    browser.open_page(driver, tmp_path / "report.html")
    count = (
        "return new Promise((done) => setTimeout(() => "
        "done([...document.querySelectorAll('.item img')].filter(i => i.naturalWidth).length), 300))"
    )
    at_first = driver.execute_script(count)
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    at_the_end = driver.execute_script(count)
    assert 0 < at_first < n // 2 and at_first < at_the_end, (at_first, at_the_end)
    section = _section(driver, "many")
    assert _read(driver, section)["visible"] == [f"{i:04d}.png" for i in sorted(range(n), key=lambda i: (-(i // 2), i))]
    _select(section, "sort", "score-asc")
    assert _read(driver, section)["visible"] == [f"{i:04d}.png" for i in range(n)]
    assert _problems(driver) == []


def test_names_that_need_escaping_reach_their_files(driver, tmp_path):
    """Spaces, #, %, non-ASCII and markup in image and category names: shown as text, linked by their URL."""
    names = ["a b#1%ü.png", "x</script><b>y.png", "sub dir/z?.png"]
    for name in names:
        panel = Image.new("RGB", (3 * 32 + 72, 32), (200, 30, 30))
        (tmp_path / "anomaly_maps" / name).parent.mkdir(parents=True, exist_ok=True)
        panel.save(tmp_path / "anomaly_maps" / name)
        save_thumbnail(tmp_path / thumbnail_name(name), panel, 32)
    scored = {"threshold": 2.0, "thresholds_from": "--threshold <i>", "images": [
        {"path": f"/x/{n}", "heatmap": f"anomaly_maps/{n}", "score": s} for n, s in zip(names, (1.0, 2.0, 3.0))]}  # fmt: skip
    write_images_page(tmp_path, "cat</script>&", scored, calibrated=None, f1=None)
    browser.open_page(driver, tmp_path / "report.html")
    section = _section(driver, "cat</script>&")
    shown = _read(driver, section)
    assert shown["all"] == ["sub dir/z?.png", "x</script><b>y.png", "a b#1%ü.png"] and shown["flagged"] == "2 of 3 images (66.67 %)"
    sizes = driver.execute_script("return [...arguments[0].querySelectorAll('.item img')].map(i => i.naturalWidth)", section)
    assert sizes == [32, 32, 32]
    assert driver.execute_script("return document.querySelectorAll('b').length") == driver.execute_script(
        "return document.querySelectorAll('.figure b').length"
    )  # no markup of the names made it into the page
    assert _problems(driver) == []
