"""The HTML report in a real browser: Debian's headless Chromium driven by selenium (never downloaded).

Skipped, with the reason, where chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipret
from clipret.data.layout import read_labels_csv
from test_report import THUMB, build_retrieval_set, cli

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ROWS = 6
HIT, MISS = "rgb(26, 156, 60)", "rgb(214, 39, 40)"  # clipret.report.page's HIT_COLOUR and MISS_COLOUR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        pytest.skip(f"selenium is not installed ({exc})")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            pytest.skip(f"{path} is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # an explicit driver: nothing is downloaded
    yield d
    d.quit()


@pytest.fixture(scope="module")
def reports(tiny_dataset, tmp_path_factory):
    """The report of a small real retrieval set, and the same with one gallery image deleted."""
    tmp = tmp_path_factory.mktemp("browser")
    rset = build_retrieval_set(tiny_dataset, tmp)
    gallery = tmp / "gallery-copy"
    shutil.copytree(tiny_dataset / "test" / "gallery", gallery)
    gone = clipret.Results.load(rset["results"]).ids[0][0]
    (gallery / gone).unlink()
    for name, extra in (("full", []), ("missing", ["--gallery-images", gallery])):
        cli("report", rset["results"], "--labels", rset["labels"], "--out", tmp / f"{name}.html", "--worst", ROWS,
            "--thumb", THUMB, *extra)
    return {"dir": tmp, "gone": gone, "labels": read_labels_csv(rset["labels"])}


def _open(driver, path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.as_uri())
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))


def _row_ids(driver) -> list[str]:
    return driver.execute_script("return Array.from(document.querySelectorAll('#rows .row')).map(r => r.dataset.id)")


def _check_rows_borders_sorting_filter_and_screenshot(driver, labels: dict[str, str]) -> None:
    """Every check a person would make of an open report: the rows, each border against the labels
    (a placeholder's too), sorting both ways and back, the class filter, a screenshot that is not blank."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    rows = driver.find_elements(By.CSS_SELECTOR, "#rows .row")
    assert len(rows) == ROWS
    for row in rows:
        query = row.get_attribute("data-id")
        figures = row.find_elements(By.CSS_SELECTOR, "figure.item")
        assert len(figures) == 5
        for fig in figures:
            imgs = fig.find_elements(By.TAG_NAME, "img")
            gallery_id = (imgs[0].get_attribute("alt") if imgs
                          else fig.find_element(By.CSS_SELECTOR, "div.missing").text.split("\n")[0])
            colour = driver.execute_script("return getComputedStyle(arguments[0]).borderTopColor", fig)
            assert colour == (HIT if labels[gallery_id] == labels[query] else MISS), (query, gallery_id)

    aps = lambda: [float(a) for a in driver.execute_script(  # noqa: E731
        "return Array.from(document.querySelectorAll('#rows .row')).map(r => r.dataset.ap)")]
    before = _row_ids(driver)
    assert aps() == sorted(aps())
    Select(driver.find_element(By.ID, "sort")).select_by_value("ap-desc")
    assert _row_ids(driver) != before and aps() == sorted(aps(), reverse=True)
    Select(driver.find_element(By.ID, "sort")).select_by_value("ap-asc")
    assert _row_ids(driver) == before  # ties stay in id order, as the page was written

    label = labels[before[0]]
    Select(driver.find_element(By.ID, "filter")).select_by_value(label)
    shown = [r for r in driver.find_elements(By.CSS_SELECTOR, "#rows .row") if r.is_displayed()]
    assert shown and all(labels[r.get_attribute("data-id")] == label for r in shown)
    assert len(shown) == sum(labels[q] == label for q in before)
    Select(driver.find_element(By.ID, "filter")).select_by_value("")

    shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"), dtype=np.float64)
    assert shot.shape[0] > 100 and shot.std() > 10  # text, tables and thumbnails: not a blank page


def test_rows_images_borders_sorting_filter_and_screenshot(driver, reports):
    from selenium.webdriver.common.by import By

    _open(driver, reports["dir"] / "full.html")
    widths = driver.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
    assert len(widths) == ROWS * 6 and min(widths) > 0  # a query and its 5 results per row, every one decoded
    assert driver.find_elements(By.CSS_SELECTOR, ".missing") == []
    _check_rows_borders_sorting_filter_and_screenshot(driver, reports["labels"])


def test_a_missing_gallery_image_is_a_placeholder_never_a_broken_img(driver, reports):
    from selenium.webdriver.common.by import By

    _open(driver, reports["dir"] / "missing.html")
    placeholders = driver.find_elements(By.CSS_SELECTOR, "div.missing")
    assert placeholders and all(reports["gone"] in p.text for p in placeholders)
    assert all(p.size["width"] > 0 and p.size["height"] > 0 for p in placeholders)
    widths = driver.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
    assert min(widths) > 0 and len(widths) + len(placeholders) == ROWS * 6
    _check_rows_borders_sorting_filter_and_screenshot(driver, reports["labels"])
