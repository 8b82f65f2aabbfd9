"""Tiny fakes of the raw formats `clipret prepare` reads, made in the tests (a few images each)."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(i: int) -> bytes:
    """A distinct little JPEG: an 8×8 image whose colour encodes ``i``."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def lines(*rows: str) -> bytes:
    return ("\n".join(rows) + "\n").encode()


# ------------------------------------------------------------------ CIFAR-100

CIFAR_CLASSES = (5, 17, 42, 99)  # fine label ids used by the fake


def cifar100(folder: Path, train_per_class: int = 3, test_per_class: int = 5) -> dict[str, np.ndarray]:
    """cifar-100-python.tar.gz with Python-2-style (bytes-keyed) pickles; pixel (0, 0) red = row index."""
    names = [f"class_{i:02d}" for i in range(100)]
    names[42] = "maple_tree"

    def split(per_class: int, salt: int) -> tuple[bytes, np.ndarray, np.ndarray]:
        labels = np.repeat(np.array(CIFAR_CLASSES), per_class)
        rng = np.random.default_rng(salt)
        images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
        images[:, 0, 0, 0] = np.arange(len(labels))
        data = images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)
        d = {b"data": data, b"fine_labels": labels.tolist(), b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
        return pickle.dumps(d, protocol=4), images, labels

    train, train_x, train_y = split(train_per_class, 1)
    test, test_x, test_y = split(test_per_class, 2)
    meta = pickle.dumps({b"fine_label_names": [n.encode() for n in names]}, protocol=4)
    write_tar(folder / "cifar-100-python.tar.gz", {"cifar-100-python/train": train, "cifar-100-python/test": test,
                                                   "cifar-100-python/meta": meta})
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "names": np.array(names)}


# ------------------------------------------------------------------ Food-101 and Oxford-IIIT Pet


FOOD_CLASSES = ("apple_pie", "ramen", "sushi")


def food101(folder: Path, train_per_class: int = 2, test_per_class: int = 4) -> dict[str, bytes]:
    """food-101.tar.gz: meta/train.txt, test.txt, classes.txt and images/<class>/<id>.jpg; returns {member: bytes}."""
    images: dict[str, bytes] = {}
    train, test = [], []
    n = 0
    for c in FOOD_CLASSES:
        for k in range(train_per_class + test_per_class):
            n += 1
            line = f"{c}/{1000 + n}"
            images[f"food-101/images/{line}.jpg"] = jpeg(n)
            (train if k < train_per_class else test).append(line)
    members = {"food-101/meta/classes.txt": lines(*FOOD_CLASSES), "food-101/meta/train.txt": lines(*train),
               "food-101/meta/test.txt": lines(*test), **images}
    write_tar(folder / "food-101.tar.gz", members)
    return images


PET_BREEDS = ("Abyssinian", "american_bulldog", "Bengal")


def pets(folder: Path, train_per_class: int = 2, test_per_class: int = 4) -> dict[str, bytes]:
    """images.tar.gz and annotations.tar.gz (trainval.txt, test.txt with comment lines)."""
    images: dict[str, bytes] = {}
    trainval, test = ["#Image CLASS-ID SPECIES BREED ID"], ["#Image CLASS-ID SPECIES BREED ID"]
    for b, breed in enumerate(PET_BREEDS, 1):
        for k in range(1, train_per_class + test_per_class + 1):
            stem = f"{breed}_{k}"
            images[f"images/{stem}.jpg"] = jpeg(10 * b + k)
            (trainval if k <= train_per_class else test).append(f"{stem} {b} 1 {b}")
    write_tar(folder / "images.tar.gz", images)
    write_tar(folder / "annotations.tar.gz", {"annotations/trainval.txt": lines(*trainval),
                                              "annotations/test.txt": lines(*test)})
    return images


# ------------------------------------------------------------------ the metric-learning benchmarks

CUB_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 101: "101.White_Pelican",
               102: "102.Western_Wood_Pewee", 150: "150.Sage_Thrasher"}


def cub200(folder: Path, per_class: int = 4) -> dict[str, bytes]:
    """CUB_200_2011.tgz: images.txt, image_class_labels.txt and images/<NNN.Name>/*.jpg."""
    images: dict[str, bytes] = {}
    listing, labels = [], []
    n = 0
    for cid, cname in CUB_CLASSES.items():
        for k in range(per_class):
            n += 1
            rel = f"{cname}/{cname.split('.')[1]}_{k:04d}_{n}.jpg"
            images[f"CUB_200_2011/images/{rel}"] = jpeg(n)
            listing.append(f"{n} {rel}")
            labels.append(f"{n} {cid}")
    write_tar(folder / "CUB_200_2011.tgz", {"CUB_200_2011/images.txt": lines(*listing),
                                             "CUB_200_2011/image_class_labels.txt": lines(*labels),
                                             "attributes.txt": b"1 has_bill_shape::curved\n", **images})
    return images


CARS_CLASSES = (1, 2, 98, 99, 150, 196)


def cars196(folder: Path, per_class: int = 3) -> dict[str, bytes]:
    """car_ims.tgz and cars_annos.mat (struct array annotations, class_names), written with scipy.io.savemat."""
    from scipy.io import savemat

    dt = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
          ("class", "O"), ("test", "O")]
    rows, images = [], {}
    n = 0
    for cid in CARS_CLASSES:
        for k in range(per_class):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            images[rel] = jpeg(n)
            rows.append((rel, 1, 2, 30, 40, cid, k % 2))
    annos = np.zeros((1, len(rows)), dtype=dt)
    for i, row in enumerate(rows):
        annos[0, i] = row
    names = np.empty((1, 196), dtype=object)
    for c in range(196):
        names[0, c] = f"Make {c + 1} Model"
    names[0, 98] = "Ram C/V Cargo Van Minivan 2012"  # class 99: a '/' in the name
    folder.mkdir(parents=True, exist_ok=True)
    savemat(folder / "cars_annos.mat", {"annotations": annos, "class_names": names})
    write_tar(folder / "car_ims.tgz", images)
    return images


SOP_TRAIN = {1: "bicycle", 2: "bicycle", 3: "chair"}
SOP_TEST = {11319: "bicycle", 11320: "chair", 11321: "chair"}


def sop(folder: Path, per_class: int = 3) -> dict[str, bytes]:
    """Stanford_Online_Products.zip: Ebay_train.txt, Ebay_test.txt and <super>_final/<product>_<k>.JPG."""
    images: dict[str, bytes] = {}
    tables: dict[str, list[str]] = {"train": [], "test": []}
    n = 0
    for split, classes in (("train", SOP_TRAIN), ("test", SOP_TEST)):
        tables[split].append("image_id class_id super_class_id path")
        for cid, sup in classes.items():
            for k in range(per_class):
                n += 1
                rel = f"{sup}_final/{100000 + cid}_{k}.JPG"
                images[f"Stanford_Online_Products/{rel}"] = jpeg(n)
                tables[split].append(f"{n} {cid} {1 if sup == 'bicycle' else 2} {rel}")
    write_zip(folder / "Stanford_Online_Products.zip", {
        "Stanford_Online_Products/Ebay_train.txt": lines(*tables["train"]),
        "Stanford_Online_Products/Ebay_test.txt": lines(*tables["test"]), **images})
    return images


def inshop(folder: Path) -> dict[str, tuple[str, str]]:
    """img.zip and Eval/list_eval_partition.txt; returns {member: (status, item id)}."""
    rows: dict[str, tuple[str, str]] = {}
    plan = {"id_00000001": ("WOMEN/Dresses", ["train"] * 3), "id_00000002": ("MEN/Denim", ["train"] * 2),
            "id_00000003": ("WOMEN/Dresses", ["query", "query", "gallery", "gallery"]),
            "id_00000004": ("MEN/Shirts_Polos", ["query", "gallery", "gallery"])}
    images = {}
    n = 0
    for item, (category, statuses) in plan.items():
        for k, status in enumerate(statuses, 1):
            n += 1
            member = f"img/{category}/{item}/{k:02d}_1_front.jpg"
            images[member] = jpeg(n)
            rows[member] = (status, item)
    write_zip(folder / "img.zip", images)
    table = [str(len(rows)), "image_name item_id evaluation_status"]
    table += [f"{m} {item} {status}" for m, (status, item) in rows.items()]
    (folder / "Eval").mkdir(parents=True, exist_ok=True)
    (folder / "Eval" / "list_eval_partition.txt").write_bytes(lines(*table))
    return rows
