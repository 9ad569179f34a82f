"""The search page in a real browser: Debian's headless Chromium driven by Selenium through Debian's
chromedriver (nothing downloaded), against the real `serve` command on 127.0.0.1. Skips, with the
reason, where they are not installed; with FICO_REQUIRE_BROWSER=1 (set by .ci/run) that is a failure.

FICO_SERVE_SCREENSHOT=docs/search_page.png writes the page's screenshot there (the one in the docs)."""
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.helpers.slurm import report_line

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser(request, tmp_path_factory):
    def cannot(reason: str):
        report_line(request, f"\n[browser test] {reason}")
        if os.environ.get("FICO_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FICO_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        cannot("selenium is not installed (the [test] extra)")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file():
            cannot(f"no {path} (apt-get install {package})")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1100,860", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # the driver's path given: Selenium Manager (which would look for one online) is not run
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), f"timed out waiting for {what}")


def _hits(driver) -> list[tuple[str, str]]:
    """(gallery position, caption) of each result shown, once every thumbnail has loaded."""
    from selenium.webdriver.common.by import By

    figures = driver.find_elements(By.CSS_SELECTOR, "#results figure.hit")
    loaded = driver.execute_script("return [...document.querySelectorAll('#results img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
    return [(f.get_attribute("data-position"), f.text) for f in figures] if loaded else []


def test_search_page_in_chromium(browser, served, test_split, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    folder, captions = test_split
    caption = captions[20][1]
    browser.get(served.url)
    assert "Test metrics" in browser.find_element(By.ID, "card").text
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("8")
    browser.find_element(By.ID, "text").send_keys(caption, Keys.ENTER)
    expected = served.get("/api/query?" + urlencode({"text": caption, "k": 8}))
    positions = expected.headers["X-Positions"].split(",")
    names = [Path(r["path"]).name for r in json.loads(expected.body)["results"]]
    shown = _wait(browser, lambda d: len(_hits(d)) == 8 and _hits(d), "8 loaded thumbnails")
    assert [p for p, _ in shown] == positions
    assert all(name in text for (_, text), name in zip(shown, names))
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("FICO_SERVE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["FICO_SERVE_SCREENSHOT"])

    browser.find_element(By.ID, "image").send_keys(str(folder / "000013.png"))  # an upload from disk
    _wait(browser, lambda d: "000013.png" in d.find_element(By.ID, "status").text, "the image query's answer")
    shown = _wait(browser, lambda d: len(_hits(d)) == 8 and _hits(d), "8 loaded thumbnails")
    answer = served.post_image("000013.png", (folder / "000013.png").read_bytes(), 8)
    assert [p for p, _ in shown] == answer.headers["X-Positions"].split(",")
    assert shown[0][1].startswith("1. 000013.png")  # the image itself, first
