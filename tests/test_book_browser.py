"""The built book in a real browser, as a reader sees it: every chapter page renders,
shows its figures and typesets its math, with no console error and no request outside
the book (nothing is fetched from the network); the animations and slider views play,
offline.

Uses the ``built_book`` fixture (tests/conftest.py), so the book is built once per
session. Needs Debian's chromium and chromium-driver (``make browser`` installs them)
and selenium; the test is skipped, saying why, when they are missing. A screenshot of
one chapter page is saved to ``_build/artifacts/chapter.png``.
"""
import functools
import http.server
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "_build" / "artifacts"
SCREENSHOT_PAGE = "notebooks/02_complexity"
# the chapters written with math (the others are checked for math only if they have some)
MATH_PAGES = {f"notebooks/{name}" for name in (
    "01_dense_attention", "02_complexity", "03_deformable_attention", "04_multiscale",
    "05_kernel", "06_model")}


def _find(*names):
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def chapter_pages():
    """The notebook pages listed in _toc.yml, as paths without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = []
    for part in toc.get("parts", []):
        for chapter in part.get("chapters", []) or []:
            if chapter.get("file", "").startswith("notebooks/"):
                pages.append(chapter["file"])
    return pages


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = _find("chromium", "chromium-browser", "google-chrome")
    driver_path = _find("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("chromium / chromedriver not found: run `make browser` "
                    "(apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ddetr-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def site(built_book):
    """Serve the built html over http on localhost (file:// would block fonts)."""
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


WAIT_FOR_MATHJAX = """
const done = arguments[arguments.length - 1];
const start = Date.now();
(function poll() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done("ok"), (e) => done("error: " + e));
  } else if (Date.now() - start > 20000) {
    done("MathJax did not load");
  } else {
    setTimeout(poll, 100);
  }
})();
"""

IMAGES = """
return Array.from(document.querySelectorAll("main img, article img"))
  .map(img => ({src: img.getAttribute("src"), complete: img.complete,
                width: img.naturalWidth}));
"""


def _requests(browser):
    """URLs the page asked for since the last call (Chromium's performance log)."""
    import json

    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


# the browser's own pages and in-memory data: not requests to a network
LOCAL_SCHEMES = ("data:", "blob:", "about:", "chrome:", "chrome-extension:", "devtools:")


def _foreign(urls, site):
    """The URLs that are neither the book's own files nor the browser's own (LOCAL_SCHEMES)."""
    return [u for u in urls if not (u.startswith(site) or u.startswith(LOCAL_SCHEMES))]


@pytest.mark.slow
def test_chapter_pages_render_figures_and_math(browser, site):
    pages = chapter_pages()
    assert pages, "no chapter notebook is listed in _toc.yml"
    problems = []
    for page in pages:
        _requests(browser)                                  # forget earlier pages
        browser.get(f"{site}/{page}.html")
        # Sphinx loads MathJax only on pages that have math; those must render it all.
        n_tex = browser.execute_script(
            "return document.querySelectorAll('span.math, div.math').length;")
        if n_tex or page in MATH_PAGES:
            status = browser.execute_async_script(WAIT_FOR_MATHJAX)
            if status != "ok":
                problems.append(f"{page}: {status}")
            n_math = browser.execute_script(
                "return document.querySelectorAll('mjx-container').length;")
            n_raw = browser.execute_script(
                "return document.querySelectorAll('.math:not(:has(mjx-container))').length;")
            if n_math == 0:
                problems.append(f"{page}: no rendered math (mjx-container) on the page")
            if n_raw:
                problems.append(f"{page}: {n_raw} math element(s) left unrendered")
        images = browser.execute_script(IMAGES)
        if not images:
            problems.append(f"{page}: no figure on the page")
        for img in images:
            if not img["complete"] or img["width"] == 0:
                problems.append(f"{page}: image {img['src']} did not load")
        for entry in browser.get_log("browser"):
            if entry["level"] == "SEVERE":
                problems.append(f"{page}: console error: {entry['message']}")
        foreign = _foreign(_requests(browser), site)
        if foreign:
            problems.append(f"{page}: requests outside the book: {foreign[:5]}")
        if page == SCREENSHOT_PAGE or (page == pages[0] and SCREENSHOT_PAGE not in pages):
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "chapter.png"))
    assert not problems, "\n".join(problems)
    assert (ARTIFACTS / "chapter.png").stat().st_size > 10_000


# pages with animations or slider views (matplotlib's player, ddetr.viz.animation), and
# how many each has
ANIMATION_PAGES = {"notebooks/03_deformable_attention": 1, "notebooks/04_multiscale": 1,
                   "notebooks/06_model": 4}
PLAYERS = """
return Array.from(document.querySelectorAll("div.animation")).map(div => {
  const img = div.querySelector("img");
  return {src: img.src.length, hash: img.src.slice(-200), width: img.naturalWidth,
          frames: parseInt(div.querySelector("input.anim-slider").max) + 1};
});
"""
PICK_LAST = """
const div = document.querySelectorAll("div.animation")[arguments[0]];
const slider = div.querySelector("input.anim-slider");
slider.value = slider.max;
slider.dispatchEvent(new Event("input"));
return div.querySelector("img").src.slice(-200);
"""
PRESS = """
const div = document.querySelectorAll("div.animation")[arguments[0]];
div.querySelector('button[title="' + arguments[1] + '"]').click();
return div.querySelector("img").src.slice(-200);
"""


@pytest.mark.slow
def test_animations_and_views_play_offline(browser, site):
    """Each page with an animation or slider view: every player shows a frame, picking
    the last frame on the slider and pressing play change what is drawn, and the page
    requests nothing but its own files and data: URLs (no CDN, no network). Saves
    _build/artifacts/model_view.png."""
    import time

    problems = []
    for page, expected in ANIMATION_PAGES.items():
        _requests(browser)                                  # forget earlier pages
        browser.get(f"{site}/{page}.html")
        time.sleep(0.5)
        players = browser.execute_script(PLAYERS)
        if len(players) < expected:
            problems.append(f"{page}: {len(players)} players, expected {expected}")
        for i, player in enumerate(players):
            if player["width"] == 0 or player["frames"] < 2:
                problems.append(f"{page} player {i}: no frame shown ({player})")
                continue
            if browser.execute_script(PICK_LAST, i) == player["hash"]:
                problems.append(f"{page} player {i}: the slider did not change the frame")
            browser.execute_script(PRESS, i, "First frame")
            first = browser.execute_script(PRESS, i, "Play")
            time.sleep(2.5)                                 # a few frame intervals
            if browser.execute_script(PRESS, i, "Pause") == first:
                problems.append(f"{page} player {i}: playing did not change the frame")
        if page == "notebooks/06_model":
            browser.execute_script(
                "document.querySelectorAll('div.animation')[2].scrollIntoView();")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "model_view.png"))
        foreign = _foreign(_requests(browser), site)
        if foreign:
            problems.append(f"{page}: requests outside the book: {foreign[:5]}")
        for entry in browser.get_log("browser"):
            if entry["level"] == "SEVERE":
                problems.append(f"{page}: console error: {entry['message']}")
    assert not problems, "\n".join(problems)
