"""``clipret prepare NAME ROOT --download``: fetch the raw files through torchvision's dataset classes.

Before torchvision is asked, the host of the URL torchvision downloads from is probed with one TCP
connection (3 s; port 80 for an ``http`` URL, 443 for ``https``), so an offline machine fails at once with a line that names ``--source``. Datasets torchvision cannot
fetch (CUB-200-2011, SOP, In-Shop, and Cars-196, whose download links are dead) say where to
get them by hand.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from clipret.errors import ClipretError, first_line

__all__ = ["TORCHVISION", "MANUAL", "host_and_port", "probe", "download", "default_folder"]

# name -> (torchvision class, the URL it downloads from (torchvision 0.29's), keyword arguments)
TORCHVISION = {
    "fashion-mnist": ("FashionMNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {"train": True}),
    "cifar100": ("CIFAR100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", {"train": True}),
    "food101": ("Food101", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", {"split": "train"}),
    "oxford-pets": ("OxfordIIITPet", "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz", {"split": "trainval"}),
}
MANUAL = {
    "cub200": "fetch CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/",
    "cars196": ("torchvision's StanfordCars download links are dead; fetch car_ims.tgz and cars_annos.mat "
                "(the original https://ai.stanford.edu/~jkrause/cars/car_dataset.html files, from a mirror)"),
    "sop": "fetch Stanford_Online_Products.zip from https://cvgl.stanford.edu/projects/lifted_struct/",
    "inshop": ("fetch img.zip and Eval/list_eval_partition.txt of In-shop Clothes Retrieval from "
               "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"),
    "folder": "prepare folder reads your own SRC folder; there is nothing to download",
}


def host_and_port(url: str) -> tuple[str, int]:
    """``(host, port)`` a download from ``url`` connects to: the URL's port, else 80 for http and 443 for https."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)


def probe(host: str, port: int = 443, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to ``host`` opens within ``timeout`` seconds, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def default_folder(name: str) -> Path:
    """Where downloads go without --source: ``$CLIPRET_CACHE_DIR/datasets/NAME`` (default ~/.cache/clipret)."""
    base = os.environ.get("CLIPRET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clipret")
    return Path(base) / "datasets" / name


def download(name: str, folder: Path | None) -> Path:
    """Download dataset ``name``'s raw files into ``folder`` (default :func:`default_folder`); returns it."""
    if name not in TORCHVISION:
        raise ClipretError(f"{name} is not downloadable by clipret: {MANUAL.get(name, 'fetch it by hand')}, and pass --source DIR")
    cls_name, url, kwargs = TORCHVISION[name]
    host, port = host_and_port(url)
    reason = probe(host, port)
    if reason is not None:
        raise ClipretError(f"--download cannot reach {host} ({reason}); fetch {name}'s raw files elsewhere and pass --source DIR")
    target = folder or default_folder(name)
    target.mkdir(parents=True, exist_ok=True)
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise ClipretError("--download needs torchvision; install it, or fetch the raw files and pass --source DIR") from None
    try:
        getattr(tvd, cls_name)(root=str(target), download=True, **kwargs)  # fetches both splits' files
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError ... on a failed download
        raise ClipretError(f"downloading {name} into {target} failed ({first_line(exc)}); "
                           "fetch the raw files elsewhere and pass --source DIR") from None
    return target
