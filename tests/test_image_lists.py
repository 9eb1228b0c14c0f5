"""Collections (``dirnet_tf.image_lists``): folders, globs, CSV/TXT lists, label matching, skipped files."""

import os
import subprocess
import sys

import numpy as np
import pytest

from dirnet_tf.image_lists import list_images
from dirnet_tf.readers import ImageReadError, InputError, read_labels
from test_readers import write_npy, write_png


def test_partial_folder_reads_valid_and_reports_skipped(tmp_path):
    write_png(tmp_path / "a.png", np.full((6, 6), 7, np.uint8))
    write_npy(tmp_path / "b.npy", np.ones((6, 6)))
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "readme.md").write_text("not an image")
    entries, skipped = list_images(tmp_path)
    assert [os.path.basename(e.image.source) for e in entries] == ["a.png", "b.npy"]
    reasons = dict((os.path.basename(p), r) for p, r in skipped)
    assert set(reasons) == {"c.png", "readme.md"}
    # the reason says what is wrong; the skip line (`skipped PATH: REASON`) names the file, once
    assert "corrupt" in reasons["c.png"] and "c.png" not in reasons["c.png"], reasons["c.png"]
    # every file broken -> an error that lists them
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="no readable image.*x.png"):
        list_images(tmp_path / "only")


def test_mixed_2d_3d_is_an_error(tmp_path):
    write_npy(tmp_path / "flat.npy", np.zeros((5, 5)))
    write_npy(tmp_path / "vol.npy", np.zeros((5, 5, 5)))
    with pytest.raises(InputError, match=r"mixed.*flat.npy.*vol.npy"):
        list_images(tmp_path)
    entries, _ = list_images(tmp_path, ndim=2)  # the volume read as 5 slices is fine
    assert len(entries) == 6


def test_labels_by_stem_and_shape_mismatch(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    write_npy(images / "case1.npy", np.random.default_rng(3).random((8, 8)))
    write_npy(images / "case2.npy", np.random.default_rng(4).random((8, 8)))
    lab = np.zeros((8, 8), np.uint8)
    lab[2:5, 3:6] = 2
    write_png(labels / "case1.png", lab)
    with pytest.warns(UserWarning, match="1 image.*no label map"):
        entries, _ = list_images(images, labels=labels)
    assert entries[0].label is not None and entries[1].label is None
    np.testing.assert_array_equal(entries[0].label.array, lab)
    assert entries[0].label.array.dtype == np.int32

    write_npy(labels / "case2.npy", np.zeros((8, 9), np.int32))
    with pytest.raises(InputError, match=r"case2.npy.*\(8, 9\).*case2.npy.*\(8, 8\)") as info:
        list_images(images, labels=labels)
    assert str(labels / "case2.npy") in str(info.value) and str(images / "case2.npy") in str(info.value)

    write_npy(tmp_path / "fractional.npy", np.full((3, 3), 0.5))
    with pytest.raises(ImageReadError, match="not an integer label map"):
        read_labels(tmp_path / "fractional.npy")


def test_csv_and_txt_lists_relative_to_the_list(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_npy(data / "x.npy", np.zeros((4, 4)))
    write_npy(data / "y.npy", np.ones((4, 4)))
    write_npy(data / "y_lab.npy", np.eye(4, dtype=np.int32))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "pairs.csv").write_text("image,label,group\n../data/y.npy,../data/y_lab.npy,p1\n../data/x.npy,,p1\n")
    entries, skipped = list_images(lists / "pairs.csv")
    assert skipped == [] and [os.path.basename(e.image.source) for e in entries] == ["y.npy", "x.npy"]
    assert entries[0].image.group == "p1" and entries[1].image.group == "p1"
    np.testing.assert_array_equal(entries[0].label.array, np.eye(4))
    assert entries[1].label is None

    (lists / "some.txt").write_text("# two images\n../data/x.npy\n\n../data/missing.npy\n")
    entries, skipped = list_images(lists / "some.txt")
    assert len(entries) == 1 and len(skipped) == 1 and "missing.npy" in skipped[0][0]

    (lists / "bad.csv").write_text("path\n../data/x.npy\n")
    with pytest.raises(InputError, match="bad.csv.*`image` column"):
        list_images(lists / "bad.csv")


def test_glob_sorted(tmp_path):
    for name in ["b2.npy", "a1.npy", "c3.npy"]:
        write_npy(tmp_path / name, np.zeros((3, 3)))
    entries, _ = list_images(str(tmp_path / "*.npy"))
    assert [os.path.basename(e.image.source) for e in entries] == ["a1.npy", "b2.npy", "c3.npy"]
    with pytest.raises(InputError, match="matches no files"):
        list_images(str(tmp_path / "*.png"))


def test_skip_reasons_do_not_repeat_the_path(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    broken = tmp_path / "b.png"
    broken.write_bytes(b"nope")
    (tmp_path / "c.npy").write_bytes(b"nope")
    entries, skipped = list_images(tmp_path)
    assert len(entries) == 1 and [os.path.basename(p) for p, _ in skipped] == ["b.png", "c.npy"]
    for path, reason in skipped:
        # what a caller prints, `skipped PATH: REASON`, names the path once
        assert f"{path}: {reason}".count(f"{path}: ") == 1, reason
    assert skipped[0][1].startswith("unreadable or corrupt image file")
    assert skipped[1][1].startswith("not a readable .npy array")
    os.remove(tmp_path / "a.png")
    with pytest.raises(InputError, match="no readable image") as info:
        list_images(tmp_path)
    assert str(info.value).count(f"{broken}: ") == 1


def test_reading_modules_do_not_need_tensorflow(tmp_path):
    """readers, dicom and image_lists read a folder with TensorFlow blocked (the package __init__ is bypassed)."""
    write_npy(tmp_path / "a.npy", np.ones((3, 4)))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys, types\n"
        "sys.modules['tensorflow'] = None\n"
        f"pkg = types.ModuleType('dirnet_tf'); pkg.__path__ = [{os.path.join(root, 'dirnet_tf')!r}]\n"
        "sys.modules['dirnet_tf'] = pkg\n"
        "from dirnet_tf import dicom, image_lists\n"
        f"entries, skipped = image_lists.list_images({str(tmp_path)!r})\n"
        "print(entries[0].image.shape, skipped)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 4) []"


def test_labels_folder_matching_no_image_is_an_error(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    write_npy(images / "case1.npy", np.zeros((4, 4)))
    write_npy(images / "case2.npy", np.zeros((4, 4)))
    write_png(labels / "seg_case1.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match=r"labels=.*labels: no label map matches an image by name "
                                         r"\(e\.g\. no case1\.\* for .*case1\.npy; its label files are named like "
                                         r"seg_case1\); name each label map like its image"):
        list_images(images, labels=labels)
    os.remove(labels / "seg_case1.png")
    with pytest.raises(InputError, match="it holds no label file"):
        list_images(images, labels=labels)
