"""Make docs/images/report.png: a ``clipret report`` page on real images, shot in headless Chromium.

Exports a small Fashion-MNIST split (every class, a few query and gallery images each; Debian's
``dataset-fashion-mnist`` package, or $CLIPRET_FASHION_MNIST), embeds it with the tiny
RANDOM-INIT model (``clipret/configs/tiny-rn.json``: no download, so the retrieval is weak and
shows plenty of misses), searches it, writes the report and photographs the top of the page.
Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian's chromium, chromium-driver) and selenium.

    python bench/report_screenshot.py                     # -> docs/images/report.png
    python bench/report_screenshot.py --keep /tmp/shot    # keep the data, results and report.html
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def make_report(work: Path, per_class: int = 3, gallery: int = 6, worst: int = 12) -> Path:
    """Data, embeddings, results.json and report.html under ``work``; returns the report's path."""
    import clipret
    from clipret.report import results_report
    from fashion_mnist import export_fashion_mnist, find_fashion_mnist

    src = find_fashion_mnist()
    if src is None:
        raise SystemExit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist, or set CLIPRET_FASHION_MNIST")
    data = work / "data"
    export_fashion_mnist(src, data, train_per_class=1, query_per_class=per_class, gallery_per_class=gallery, size=64)
    enc = clipret.Encoder.load("tiny-rn.json", "none", device="cpu")  # a bundled config, random weights
    for side in ("query", "gallery"):
        enc.embed_folder(data / "test" / side, out=work / f"{side}.npy", workers=0)
    clipret.retrieve(work / "query.npy", work / "gallery.npy", k=8).to_json(work / "results.json")
    here = os.getcwd()
    os.chdir(work)  # the page names the results file as given: "results.json"
    try:
        results_report("results.json", "report.html", labels=Path("data/test/labels.csv"), worst=worst, k=8, thumb=64)
    finally:
        os.chdir(here)
    return work / "report.html"


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 1700) -> None:
    """Open ``page`` in headless Chromium and save the window as a 128-colour PNG (kept small for the docs)."""
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(page.resolve().as_uri())
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(128, dither=Image.Dither.NONE)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB) from {page}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "report.png")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.keep is not None:
        screenshot(make_report(args.keep), args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        screenshot(make_report(Path(tmp)), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
