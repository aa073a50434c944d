"""The review page of a run, report.html: every test image with its heatmap, and the image threshold as a slider.

One self-contained HTML file (the CSS and JS of assets/ inlined, nothing from the network) that links
the run's files beside it by relative paths, so that the folder can be zipped and sent:

- the heatmap panels, anomaly_maps/<name>.png, opened full size from the gallery;
- their thumbnails, thumbnails/<name>.jpg: the heatmap-over-input tile, 128 px, written by
  save_thumbnail in the loop that draws the panels (nothing per image is kept in memory).

The page embeds each image's scalars (name, thumbnail, defect type, label, score) and the thresholds; the
slider starts at the calibrated threshold and recomputes in the browser which images are flagged
(score >= threshold, as metrics.rates_at), the false-alarm rate, the recall and the counts.

Test split: OUTPUT_DIR/report.html for every category of the run (write_report_page), with the
summary table, ROC, score histogram and per-defect AUROC. --images: report.html in the run's
inference/ folder (write_images_page), the same gallery and slider without labels.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

from PIL import Image

from plumbing.bank import AUDIT_FILE
from plumbing.files import write_text

THUMBNAIL_SIDE = 128  # px, the thumbnail's longer side
ASSETS = Path(__file__).resolve().parent / "assets"


# ---------------------------------------------------------------------- thumbnails
def thumbnail_name(name: str | Path) -> Path:
    """Where the thumbnail of heatmap anomaly_maps/<name> goes, relative to the same folder: thumbnails/<name>.jpg."""
    return Path("thumbnails") / Path(name).with_suffix(".jpg")


def _thumbnails(records: list[dict]) -> list[str]:
    """Each record's thumbnail, relative to the page's folder for the category: the page takes them as they are
    (thumbnail_name is the one rule; the page's script does not derive them)."""
    return [thumbnail_name(r["heatmap"].removeprefix("anomaly_maps/")).as_posix() for r in records]


def save_thumbnail(path: Path, panel: Image.Image, tile_width: int) -> None:
    """The panel's second tile (heatmap over the input, image_io.heatmap_panel), its longer side at most
    THUMBNAIL_SIDE px, as a JPEG at path (inside a staging folder). tile_width: the input image's width."""
    tile = panel.crop((tile_width, 0, 2 * tile_width, panel.height))
    tile.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tile.save(path, "JPEG", quality=85)


# ---------------------------------------------------------------------- the page
def _attr(value: float) -> str:
    """A number for an HTML attribute or the page's data, exactly as Python holds it (the shortest repr)."""
    return repr(float(value))


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` inside escaped text."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", _text(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def summary_html(markdown: str) -> str:
    """summary.md (report.write_summary) as HTML: its heading, lines, bullet list and table."""
    out, rows, items = [], [], []

    def flush() -> None:
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if rows:
            head, body = rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]
            table = "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
            table += "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append(f'<table class="summary">{table}</table>')
            rows.clear()

    for line in markdown.splitlines():
        line = line.strip()
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        if line.startswith("#"):
            out.append(f"<h2>{_inline(line.lstrip('#').strip())}</h2>")
        elif line:
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)


def _finite(value: object) -> object:
    """The page's data with every NaN or infinity as null: JSON.parse accepts neither, and one would blank the page."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _slider_range(scores: list[float], marks: list[float]) -> tuple[float, float]:
    """The slider's ends: every finite score and mark inside, with 2 % of the span to spare on each side."""
    values = [v for v in scores + marks if math.isfinite(v)]
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    spare = 0.02 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 1.0)
    return lo - spare, hi + spare


def _start(thresholds: list[float | None], scores: list[float]) -> float:
    """Where the slider starts: the first finite threshold given, else the median finite score."""
    scores = [s for s in scores if math.isfinite(s)]
    chosen = [t for t in thresholds if t is not None and math.isfinite(t)] or [sorted(scores)[len(scores) // 2] if scores else 0.0]
    return float(chosen[0])


def _threshold(index: int, start: float, marks: list[tuple[str, float]], span: tuple[float, float]) -> str:
    """The threshold: a number box (exact), the slider with its marks, and a button per mark (exact)."""
    options = "".join(f'<option value="{_attr(value)}" label="{_text(name)}"></option>' for name, value in marks)
    buttons = "".join(
        f'<button type="button" class="mark" data-value="{_attr(value)}">{_text(name)} {_number(value)}</button>' for name, value in marks
    )
    return (
        '<div class="threshold">'
        f'<label>image threshold <input type="number" class="threshold-value" step="any" value="{_attr(start)}"></label>'
        f'<input type="range" class="slider" min="{_attr(span[0])}" max="{_attr(span[1])}" step="any" value="{_attr(start)}" '
        f'list="marks-{index}" aria-label="image threshold"><datalist id="marks-{index}">{options}</datalist>'
        f'<span class="marks">{buttons}</span><span class="rule">score &ge; threshold: defective</span></div>'
    )


def _figures(labelled: bool) -> str:
    """Where the page writes the live figures at the threshold."""
    if not labelled:
        return '<div class="figures"><div class="figure">flagged <b class="flagged"></b></div></div>'
    return (
        '<div class="figures">'
        '<div class="figure">false alarms <b class="fpr"></b> <span class="fpr-count"></span></div>'
        '<div class="figure">recall <b class="recall"></b> <span class="recall-count"></span></div>'
        '<div class="figure">flagged <b class="flagged"></b></div>'
        '<table class="confusion"><tr><th></th><th>passed</th><th>flagged</th></tr>'
        '<tr><th>good</th><td class="tn"></td><td class="fp"></td></tr>'
        '<tr><th>defective</th><td class="fn"></td><td class="tp"></td></tr></table></div>'
    )


def _gallery_controls(labelled: bool, defects: list[str]) -> str:
    """The gallery's sort, its filters by defect type and by outcome at the threshold, and how many it shows."""

    def select(name: str, cls: str, options: list[tuple[str, str]]) -> str:
        return (
            f'<label>{name} <select class="{cls}">'
            + "".join(f'<option value="{_text(v)}">{_text(t)}</option>' for v, t in options)
            + "</select></label>"
        )

    sort = select("sort", "sort", [("score-desc", "score, highest first"), ("score-asc", "score, lowest first"), ("name", "name")])
    if labelled:
        filters = select("defect type", "filter-defect", [("all", "all"), *[(d, d) for d in defects]])
        outcomes = [("all", "every outcome"), ("false-alarm", "false alarms"), ("missed", "missed defects"), ("correct", "correct")]
    else:
        filters, outcomes = "", [("all", "all"), ("flagged", "flagged"), ("passed", "passed")]
    return f'<div class="controls">{sort}{filters}{select("outcome", "filter-outcome", outcomes)}<span class="shown"></span></div>'


def _page(title: str, intro: str, sections: list[str], data: list[dict]) -> str:
    css = (ASSETS / "report_page.css").read_text()
    js = (ASSETS / "report_page.js").read_text()
    payload = json.dumps(_finite(data), separators=(",", ":"), ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")
    nav = ""
    if len(data) > 1:
        nav = "<nav>" + " ".join(f'<a href="#c{i}">{_text(d["category"])}</a>' for i, d in enumerate(data)) + "</nav>"
    policy = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_text(title)}</title>\n<style>\n{css}</style></head>\n<body>\n"
        f"<header><h1>{_text(title)}</h1>{intro}</header>\n{nav}\n"
        + "\n".join(sections)
        + '\n<div id="lightbox" hidden><div class="box"><img alt=""><p class="caption"></p>'
        '<p class="keys">&larr; &rarr; previous / next shown image, Esc closes</p></div></div>\n'
        f'<script type="application/json" id="report-data">{payload}</script>\n'
        f"<script>\n{js}</script>\n</body></html>\n"
    )


def audit_html(folder: Path) -> str:
    """The training-set audit of a category (train.py's train_audit.json beside its bank), if there is one: the training
    images least like the others, each with its heatmap against the bank without it, for a person to look at and
    remove from train/good."""
    path = folder / AUDIT_FILE
    if not path.is_file():
        return ""
    audit = json.loads(path.read_text())
    shown = [e for e in audit["images"] if e.get("heatmap")]
    figures = "".join(
        f'<figure><a href="{_text(folder.name + "/" + e["heatmap"])}"><img loading="lazy" alt="{_text(e["image"])}" '
        f'src="{_text(folder.name + "/" + e["heatmap"])}"></a><figcaption>{e["rank"]}. {_text(e["image"])}: '
        f'{_number(e["score"])}</figcaption></figure>'
        for e in shown
    )
    return (
        f'<details class="audit"><summary>Training images least like the others: the {len(shown)} of '
        f"{len(audit['images'])} the audit ranks first (train_audit.json)</summary><p>{_text(audit['what'])}. A defective "
        f"part hidden in train/good ranks first: look, and remove it from train/good if it is one.</p>"
        f'<div class="audit-figures">{figures}</div></details>'
    )


def _section(index: int, data: dict, line: str = "", table: str = "", audit: str = "") -> str:
    """One category: its metrics line, the threshold and live figures, the per-defect table and plots, the gallery,
    and the training-set audit."""
    plots = '<svg class="hist" viewBox="0 0 420 220" role="img" aria-label="score histogram"></svg>'
    if data["labelled"]:
        plots = '<svg class="roc" viewBox="0 0 240 240" role="img" aria-label="ROC"></svg>' + plots
    return (
        f'<section class="category" id="c{index}" data-index="{index}" data-category="{_text(data["category"])}">'
        f"<h2>{_text(data['category'])}</h2>{line}"
        f"{_threshold(index, data['start'], data['marks'], data['range'])}{_figures(data['labelled'])}"
        f'<div class="plots">{plots}{table}</div>'
        f"{_gallery_controls(data['labelled'], data.get('defects', []))}"
        f'<div class="gallery"></div>{audit}</section>'
    )


def _metric(name: str, value: float | None, reasons: dict, key: str) -> str:
    reason = reasons.get(key)
    title = f' title="{_text(reason)}"' if reason else ""
    return f"<span{title}>{_text(name)} <b>{_pct(value)}</b></span>"


def _category(folder: Path, metrics: dict) -> dict:
    """One test-split category's page data: its images' scalars from scores.json, the thresholds from metrics.json."""
    records = json.loads((folder / "scores.json").read_text())
    defects = sorted({r["defect_type"] for r in records}, key=lambda d: (d != "good", d))
    # an official ensemble's scores are normalised over the test set: its calibrated threshold is on another scale
    at = metrics.get("at_calibrated_thresholds") or {}
    calibrated = at.get("image_threshold") if metrics.get("thresholds_on_scores", True) else None
    f1 = metrics.get("image_f1_threshold")
    marks = [(name, float(value)) for name, value in (("calibrated", calibrated), ("F1", f1)) if value is not None]
    scores = [r["score"] for r in records]
    return {
        "category": metrics["category"],
        "labelled": True,
        "base": metrics["category"] + "/",
        "names": [r["heatmap"].removeprefix("anomaly_maps/") for r in records],
        "thumbs": _thumbnails(records),
        "defects": defects,
        "defect": [defects.index(r["defect_type"]) for r in records],
        "label": [int(r["label"]) for r in records],
        "score": scores,
        "marks": marks,
        "start": _start([calibrated, f1], scores),
        "range": _slider_range(scores, [v for _, v in marks]),
    }


def _category_body(metrics: dict, data: dict) -> tuple[str, str]:
    """The category's metrics line (metrics.json) and per-defect table, whose last column the page fills in."""
    reasons = metrics.get("undefined") or {}
    at = metrics.get("at_calibrated_thresholds") or {}
    line = " ".join([
        _metric("image AUROC", metrics.get("image_auroc"), reasons, "image_auroc"),
        _metric("pixel AUROC", metrics.get("pixel_auroc"), reasons, "pixel_auroc"),
        _metric("AUPRO@0.3", metrics.get("aupro"), reasons, "aupro"),
        _metric("image F1-max", metrics.get("image_f1_max"), reasons, "image_f1_max"),
    ])  # fmt: skip
    ad2 = metrics.get("mvtec_ad2")
    if ad2:  # the benchmark's metrics, at each image's own size, thresholds from validation/good
        shown = (("AU-PRO@0.05", "au_pro_0.05"), ("SegF1", "seg_f1"), ("SegF1, mean + 3 std", "seg_f1_mean_3std"), ("image F1", "image_f1"))
        line += " " + " ".join(_metric(name, ad2.get(key), ad2, f"{key}_undefined") for name, key in shown)
    if at:
        fpr, recall = _pct(at["image_fpr"]), _pct(at["image_recall"])
        line += f" <span>at the calibrated threshold: false alarms <b>{fpr}</b>, recall <b>{recall}</b></span>"
    auroc = '<th title="image AUROC of the good images against this defect type alone">AUROC vs good</th>'
    rows = f"<tr><th>defect type</th><th>images</th>{auroc}<th>flagged</th></tr>"
    counts = {d: 0 for d in data["defects"]}
    for d in data["defect"]:
        counts[data["defects"][d]] += 1
    per_defect = metrics.get("per_defect") or {}
    for defect in data["defects"]:
        entry = per_defect.get(defect, {})
        value = "" if defect == "good" else _pct(entry.get("image_auroc"))
        title = f' title="{_text(entry["reason"])}"' if entry.get("reason") else ""
        rows += (
            f"<tr><td>{_text(defect)}</td><td>{counts[defect]}</td><td{title}>{value}</td>"
            f'<td class="per-defect" data-defect="{_text(defect)}"></td></tr>'
        )
    return f'<p class="metrics">{line} <span class="unit">(percent)</span></p>', f'<table class="defects">{rows}</table>'


def write_report_page(output_dir: Path, results: list[dict]) -> Path:
    """OUTPUT_DIR/report.html for the categories of a test-split run, written atomically. results: their
    metrics.json contents (evaluate_category's return values); each category's scores.json is read back
    from OUTPUT_DIR/<category>/, and OUTPUT_DIR/summary.md is shown as its table."""
    output_dir = Path(output_dir)
    data = [_category(output_dir / m["category"], m) for m in results]
    sections = [_section(i, d, *_category_body(m, d), audit_html(output_dir / m["category"]))
                for i, (m, d) in enumerate(zip(results, data))]  # fmt: skip
    summary = output_dir / "summary.md"
    intro = summary_html(summary.read_text()) if summary.is_file() else ""
    title = "PatchCore: " + (data[0]["category"] if len(data) == 1 else f"{len(data)} categories")
    path = output_dir / "report.html"
    write_text(path, _page(title, intro, sections, data))
    return path


def write_images_page(folder: Path, category: str, scored: dict, calibrated: float | None, f1: float | None) -> Path:
    """report.html in an --images run's folder (its staging folder): the gallery and slider without labels.
    scored: the run's scores.json content; calibrated, f1: the category's thresholds, marked on the slider."""
    records = scored["images"]
    scores = [r["score"] for r in records]
    marks = [(name, float(value)) for name, value in (("calibrated", calibrated), ("F1", f1)) if value is not None]
    used = scored.get("threshold")
    if used is not None and used not in (calibrated, f1):
        marks.append(("this run's", float(used)))
    data = {
        "category": category,
        "labelled": False,
        "base": "",
        "names": [r["heatmap"].removeprefix("anomaly_maps/") for r in records],
        "thumbs": _thumbnails(records),
        "score": scores,
        "marks": marks,
        "start": _start([used, calibrated, f1], scores),
        "range": _slider_range(scores, [v for _, v in marks]),
    }
    intro = (
        f"<p>{len(records)} unlabelled images scored against {_text(category)}'s memory bank; "
        f"this run's threshold: {_text(scored.get('thresholds_from', 'none'))}"
        + (f" ({_number(used)})" if used is not None else "")
        + ". Move the slider to see what is flagged at another threshold.</p>"
    )
    path = Path(folder) / "report.html"
    write_text(path, _page(f"PatchCore: {category}, new images", intro, [_section(0, data)], [data]))
    return path
