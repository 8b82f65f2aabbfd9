import pytest

from clipret.data.layout import folder_labels, id_to_path, labels_for, list_images, read_labels_csv, training_set
from clipret.errors import ClipretError


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_ids_are_sorted_posix_relative_and_extensions_case_insensitive(tmp_path):
    for name in ["b/2.JPG", "a/1.jpeg", "a/z.PnG", "c/x.webp", "c/y.BMP", "c/notes.txt", ".hidden/h.jpg", "top.jpg"]:
        _touch(tmp_path / name)
    assert list_images(tmp_path) == ["a/1.jpeg", "a/z.PnG", "b/2.JPG", "c/x.webp", "c/y.BMP", "top.jpg"]
    assert folder_labels(list_images(tmp_path)) == {"a/1.jpeg": "a", "a/z.PnG": "a", "b/2.JPG": "b", "c/x.webp": "c", "c/y.BMP": "c"}


def test_missing_or_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(ClipretError, match="folder not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipretError, match="no images found"):
        list_images(tmp_path / "empty")


def test_training_set_needs_two_classes(tmp_path):
    _touch(tmp_path / "training" / "only" / "1.jpg")
    with pytest.raises(ClipretError, match="at least 2 classes"):
        training_set(tmp_path)
    _touch(tmp_path / "training" / "other" / "2.jpg")
    ids, labels, folder = training_set(tmp_path)
    assert ids == ["only/1.jpg", "other/2.jpg"] and labels == ["only", "other"] and folder.name == "training"


def test_labels_csv_with_and_without_header(tmp_path):
    (tmp_path / "l.csv").write_text("filename,label\nq/1.jpg,cat\ng\\2.jpg,dog\n\n")
    assert read_labels_csv(tmp_path / "l.csv") == {"q/1.jpg": "cat", "g/2.jpg": "dog"}
    (tmp_path / "n.csv").write_text("1.jpg,cat\n2.jpg,dog\n")
    labels = read_labels_csv(tmp_path / "n.csv")
    assert labels_for(["sub/1.jpg", "2.jpg"], labels, "query") == ["cat", "dog"]
    with pytest.raises(ClipretError, match="1 query ids have no label"):
        labels_for(["3.jpg"], labels, "query")
    (tmp_path / "c.csv").write_text("a.jpg,cat\na.jpg,dog\n")
    with pytest.raises(ClipretError, match="two labels"):
        read_labels_csv(tmp_path / "c.csv")


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/passwd", "a/../../b.jpg", "C:/x.jpg", "a\\..\\b.jpg", ""])
def test_unsafe_ids_are_rejected(tmp_path, bad):
    with pytest.raises(ClipretError, match="unsafe image id"):
        id_to_path(tmp_path, bad)


def test_safe_id_maps_under_folder(tmp_path):
    assert id_to_path(tmp_path, "a/b.jpg") == tmp_path / "a" / "b.jpg"
