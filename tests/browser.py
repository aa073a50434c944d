"""Headless Chromium through selenium, for the review page's test and its benchmark; and a screenshot command.

    python tests/browser.py PAGE.html SHOT.png [--width 1280] [--height 1500]

Chromium starts with a fresh profile and without background networking (sync, component updates,
QUIC): on a machine without network those connections would only fail. selenium is a test-only
dependency (requirements-test.txt); Chromium and its driver are Debian's `chromium` and
`chromium-driver` (.ci/run installs them where they are missing).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]  # fmt: skip


def missing() -> str | None:
    """Why no browser can be started here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-test.txt)"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no chromium on PATH (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[object]:
    """A headless Chromium driven by selenium, with the browser console's messages kept for get_log('browser')."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        for flag in [*FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver: object, page: Path, timeout: float = 20) -> None:
    """Load page from file:// and wait until its script has built every section (<html data-ready>)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(Path(page).absolute().as_uri())
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"))


def screenshot(driver: object, path: Path, max_colours: int | None = None) -> None:
    """The viewport as a PNG; with max_colours, palette-quantised to keep the file small."""
    from PIL import Image

    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    if max_colours:
        image = image.quantize(colors=max_colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--colours", type=int, default=128, help="palette size of the PNG (default: 128)")
    args = parser.parse_args()
    reason = missing()
    if reason or not args.page.is_file():
        print(f"error: {reason or f'no page at {args.page}'}", file=sys.stderr)
        sys.exit(1)
    with chromium(args.width, args.height) as driver:
        open_page(driver, args.page)
        driver.execute_script("return new Promise((done) => setTimeout(done, 300))")  # lazy thumbnails in view
        screenshot(driver, args.png, args.colours)
    print(f"wrote {args.png} ({args.png.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
