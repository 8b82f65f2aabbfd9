"""How big a ``clipret report`` page gets at its defaults on a large result, and how fast Chromium opens it.

Writes 600 synthetic 640x480 photos (bench/embed.py's ``make_photo``), a gallery and a query set
whose ids link to them (every id its own file, so every thumbnail is made), random unit vectors
with class labels in the ids' folders, and a results.json (k = 10) of every query; then runs
``clipret report`` with its defaults (``--worst 200 --thumb 128``) and loads the page in headless
Chromium (Debian's chromium + chromium-driver, selenium), timing the load until every thumbnail
has decoded. It prints the page's size, the thumbnails on it, and both times.

    python bench/report_size.py                       # 100,000 queries, 2,000 gallery items
    python bench/report_size.py --queries 20000 --no-browser
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def make_results(work: Path, n_query: int, n_gallery: int, classes: int = 20, photos: int = 600) -> Path:
    import clipret
    from clipret.artifacts import save_embeddings
    from embed import make_photo

    rng = np.random.default_rng(0)
    files = []
    for i in range(photos):
        path = work / "photos" / f"p{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_photo(i, seed=0, width=640, height=480).save(path, quality=90)
        files.append(path)
    sides = {}
    for side, n, offset in (("query", n_query, 0), ("gallery", n_gallery, photos // 2)):
        labels = rng.integers(0, classes, n)
        ids = [f"c{c}/{side[0]}{i:07d}.jpg" for i, c in enumerate(labels)]
        for c in range(classes):
            (work / side / f"c{c}").mkdir(parents=True)
        for i, image_id in enumerate(ids):
            os.link(files[(i * 7 + offset) % photos], work / side / image_id)
        v = rng.normal(size=(n, 16)).astype(np.float32)
        sides[side] = work / f"{side}.npy"
        save_embeddings(sides[side], v / np.linalg.norm(v, axis=1, keepdims=True), ids, fingerprint="bench", root=work / side)
    return clipret.retrieve(sides["query"], sides["gallery"], k=10).to_json(work / "results.json")


def browser_load_s(page: Path) -> tuple[float, int]:
    """(seconds until every <img> of ``page`` has decoded, image count) in headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        t = time.perf_counter()
        driver.get(page.as_uri())
        decoded = "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
        while not driver.execute_script(decoded):
            if time.perf_counter() - t > 120:
                raise SystemExit("the page's images did not decode within 120 s")
            time.sleep(0.02)
        return time.perf_counter() - t, int(driver.execute_script("return document.images.length"))
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--gallery", type=int, default=2_000)
    ap.add_argument("--photos", type=int, default=600, help="distinct photos the ids link to (default 600)")
    ap.add_argument("--no-browser", action="store_true", help="skip the Chromium load")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipret-bench-report-"))
    try:
        results = make_results(work, args.queries, args.gallery, photos=args.photos)
        page = work / "report.html"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "clipret", "report", str(results), "--out", str(page)], check=True,
                       capture_output=True, text=True)
        write_s = time.perf_counter() - t
        print(f"{args.queries} queries x {args.gallery} gallery items, k 10, report defaults (--worst 200 --thumb 128): "
              f"{page.stat().st_size / 1e6:.1f} MB written in {write_s:.1f} s (whole process)")
        if not args.no_browser:
            load_s, images = browser_load_s(page)
            print(f"headless Chromium: {images} thumbnails decoded {load_s:.2f} s after the page was asked for")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
