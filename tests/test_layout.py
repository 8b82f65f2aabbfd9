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
    ids, labels, folder, unusable = training_set(tmp_path)
    assert ids == ["only/1.jpg", "other/2.jpg"] and labels == ["only", "other"] and folder.name == "training"
    assert unusable == {}
    import os

    with open(os.path.join(os.fsencode(tmp_path / "training" / "other"), b"caf\xe9.jpg"), "wb") as fh:
        fh.write(b"x")
    ids, _, _, unusable = training_set(tmp_path)
    assert ids == ["only/1.jpg", "other/2.jpg"]
    assert unusable == {"other/caf\\xe9.jpg": "file name is not valid UTF-8; rename the file"}


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


def test_symlink_loop_does_not_multiply_the_gallery(tmp_path):
    import os

    for name in ["a/1.jpg", "a/2.jpg", "b/3.jpg", "4.jpg", "5.jpg"]:
        _touch(tmp_path / name)
    os.symlink(".", tmp_path / "loop")  # loop -> the folder itself
    os.symlink("..", tmp_path / "a" / "up")  # a/up -> the folder again, from below
    assert list_images(tmp_path) == ["4.jpg", "5.jpg", "a/1.jpg", "a/2.jpg", "b/3.jpg"]


def test_link_to_a_sibling_lists_its_images_once_under_their_real_path(tmp_path):
    import os

    for name in ["real/1.jpg", "real/2.jpg"]:
        _touch(tmp_path / "g" / name)
    os.symlink("real", tmp_path / "g" / "alias")
    assert list_images(tmp_path / "g") == ["real/1.jpg", "real/2.jpg"]


def test_link_to_a_folder_outside_is_followed_once(tmp_path):
    import os

    _touch(tmp_path / "elsewhere" / "x.jpg")
    (tmp_path / "g").mkdir()
    _touch(tmp_path / "g" / "own.jpg")
    os.symlink(tmp_path / "elsewhere", tmp_path / "g" / "ext1")
    os.symlink(tmp_path / "elsewhere", tmp_path / "g" / "ext2")  # the same target again
    os.symlink(tmp_path / "g", tmp_path / "elsewhere" / "back")  # and a loop back into the gallery
    assert list_images(tmp_path / "g") == ["ext1/x.jpg", "own.jpg"]


def test_file_names_that_are_not_utf8_are_skipped_with_a_reason(tmp_path):
    import os

    from clipret.data.layout import scan_images

    _touch(tmp_path / "ok.png")
    bad = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    with open(bad, "wb") as fh:
        fh.write(b"x")
    ids, skipped = scan_images(tmp_path)
    assert ids == ["ok.png"]
    assert skipped == [{"id": "caf\\xe9.png", "reason": "file name is not valid UTF-8; rename the file"}]
    import json

    json.dumps(skipped, ensure_ascii=False).encode("utf-8")  # manifest-safe


def test_bare_file_name_labels_are_refused_when_two_ids_share_the_name():
    labels = {"1.jpg": "cat", "2.jpg": "dog", "b/1.jpg": "eel"}
    assert labels_for(["a/2.jpg"], labels, "gallery") == ["dog"]  # unambiguous fallback
    assert labels_for(["b/1.jpg", "c/1.jpg"], {"b/1.jpg": "eel", "c/1.jpg": "cat"}, "gallery") == ["eel", "cat"]
    with pytest.raises(ClipretError, match="a/1.jpg and c/1.jpg share the file name 1.jpg"):
        labels_for(["a/1.jpg", "c/1.jpg"], labels, "gallery")
    # an id with its own row takes no part: the bare row can only mean the other one
    assert labels_for(["b/1.jpg", "c/1.jpg"], labels, "gallery") == ["eel", "cat"]
