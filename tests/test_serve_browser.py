"""The web page of ``clipret serve`` in a real browser (issue 22): headless Chromium from Debian's package,
driven by selenium. Skipped where chromium, chromedriver or selenium are missing (never downloaded here)."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
selenium = pytest.importorskip("selenium", reason="selenium drives the browser tests: pip install selenium")

from serve_fixtures import ZERO_SHOT, live_server, zero_shot_gallery  # noqa: E402

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and (Path(DRIVER).exists() or shutil.which("chromedriver"))),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER if Path(DRIVER).exists() else shutil.which("chromedriver")),
                              options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tiny_dataset, tmp_path_factory):
    from clipret.serve.app import create_app
    from clipret.serve.service import SearchService
    from clipret.serve.settings import Settings

    tmp = tmp_path_factory.mktemp("browser")
    zero_shot_gallery(tiny_dataset / "test" / "gallery", tmp / "g0.npy")
    settings = Settings(gallery=tmp / "g0.npy", model=ZERO_SHOT, pretrained="none", device="cpu", k=6)
    service = SearchService.load(settings)
    with live_server(create_app(settings, service)) as url:
        yield SimpleNamespace(url=url, settings=settings, service=service)


def _wait(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting in the browser")


def _loaded_thumbnails(driver) -> list[dict]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results figure.hit')).map(f => {"
        "const img = f.querySelector('img');"
        "return {caption: f.querySelector('figcaption').textContent, complete: img.complete, width: img.naturalWidth}; });")


def test_an_uploaded_image_shows_k_loaded_thumbnails_with_scores(browser, server, tiny_dataset):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    k_box = browser.find_element(By.ID, "k")
    k_box.clear()
    k_box.send_keys("4")
    image = sorted((tiny_dataset / "test" / "query").rglob("*.png"))[0]
    browser.find_element(By.ID, "file").send_keys(str(image))
    hits = _wait(lambda: (h := _loaded_thumbnails(browser)) and len(h) == 4 and all(x["complete"] and x["width"] > 0 for x in h) and h)
    assert all("(" in h["caption"] and "/" in h["caption"] for h in hits)  # "1. class/file.png  (0.9871)"
    assert "4 results from the image gallery" in browser.find_element(By.ID, "status").text


def test_a_typed_text_query_shows_results(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server.url + "/")
    box = browser.find_element(By.ID, "text")
    box.send_keys("a red dress", Keys.ENTER)
    hits = _wait(lambda: (h := _loaded_thumbnails(browser)) and len(h) == 6 and all(x["width"] > 0 for x in h) and h)
    assert len(hits) == 6
    assert "from the text gallery" in browser.find_element(By.ID, "status").text


def test_with_a_token_the_page_sends_it_and_thumbnails_still_load(browser, server, tiny_dataset):
    from selenium.webdriver.common.by import By

    from clipret.serve.app import create_app

    settings = dataclasses.replace(server.settings, token="page-s3cret")
    image = sorted((tiny_dataset / "test" / "query").rglob("*.png"))[1]
    with live_server(create_app(settings, server.service)) as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "file").send_keys(str(image))
        _wait(lambda: "token" in browser.find_element(By.ID, "status").text)  # 401: "this server needs a token ..."
        browser.find_element(By.ID, "token").send_keys("page-s3cret")
        browser.find_element(By.ID, "text").click()  # leaving the box stores the token
        browser.find_element(By.ID, "file").clear()
        browser.find_element(By.ID, "file").send_keys(str(image))
        hits = _wait(lambda: (h := _loaded_thumbnails(browser)) and len(h) == 6 and all(x["width"] > 0 for x in h) and h)
        assert len(hits) == 6
