"""The cardiac HDF5 format: written by :mod:`data.sunnybrook` and :mod:`data.cardiac_phantom`, read by experiments.

Layout::

    /                     attrs: format, spacing_mm, crop_size, label_names, source, ...
    /<patient>/images     float32 [S, T, H, W] in [0, 1]
    /<patient>/labels     uint8   [S, T, H, W] (0 bg, 1 cavity, 2 myocardium)
    /<patient>/annotated  bool    [S, T, 2]    (endocardium, epicardium drawn)
    /<patient>/ed_phase, es_phase   int32 [S] (-1: not annotated)
    /<patient>/slice_locations      float32 [S] (mm)
    /<patient>/trigger_times        float32 [S, T] (ms)
    /<patient>/source_files         str [S, T] (source paths, relative to the raw data folder)
    /<patient>            attrs: group, split, ...
    /splits/{train,valid,test}      str [n] patient names

``S`` = slices, ``T`` = cardiac phases, ``H, W`` = rows, columns (pixels of
``spacing_mm``).  List and dict attributes are stored as JSON text.
"""

import json
import os

import numpy as np

from dirnet_tf.files import atomic_write

__all__ = ["FORMAT", "LABEL_NAMES", "SPLITS", "write_h5", "load_h5"]

FORMAT = "dirnet-tf-cardiac-v1"
LABEL_NAMES = ("background", "lv_cavity", "myocardium")
SPLITS = ("train", "valid", "test")


def _jsonable(value):
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def write_h5(path, patients, splits, attrs):
    """Write patients in the cardiac HDF5 layout, atomically (:func:`dirnet_tf.files.atomic_write`).

    Parameters
    ----------
    path : output file.
    patients : dict name -> dict with arrays ``images``, ``labels``,
        ``annotated``, ``ed_phase``, ``es_phase`` (+ optional
        ``slice_locations``, ``trigger_times``, ``source_files``) and ``attrs``.
    splits : dict split -> list of patient names.
    attrs : root attributes (provenance); ``format``, ``label_names`` added.
    """
    import h5py  # noqa: PLC0415

    str_dtype = h5py.string_dtype()

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["label_names"] = json.dumps(list(LABEL_NAMES))
            for key, value in attrs.items():
                f.attrs[key] = _jsonable(value)
            for name, data in patients.items():
                g = f.create_group(name)
                g.create_dataset("images", data=data["images"].astype(np.float32), compression="gzip",
                                 compression_opts=4, chunks=(1, 1) + data["images"].shape[2:])
                g.create_dataset("labels", data=data["labels"].astype(np.uint8), compression="gzip",
                                 compression_opts=4, chunks=(1, 1) + data["labels"].shape[2:])
                for key in ("annotated", "ed_phase", "es_phase", "slice_locations", "trigger_times"):
                    if key in data:
                        g.create_dataset(key, data=data[key])
                if "source_files" in data:
                    g.create_dataset("source_files", data=np.asarray(data["source_files"], dtype=object),
                                     dtype=str_dtype)
                for key, value in data.get("attrs", {}).items():
                    g.attrs[key] = _jsonable(value)
            sg = f.create_group("splits")
            for split in SPLITS:
                sg.create_dataset(split, data=np.array(sorted(splits.get(split, [])), dtype=object),
                                  dtype=str_dtype)

    atomic_write(path, write)


def load_h5(path, splits=None):
    """Read a cardiac HDF5 file (Sunnybrook or phantom) into memory.

    Parameters
    ----------
    path : file written by :func:`write_h5`.
    splits : optional iterable of split names to load (default: all).

    Returns
    -------
    dict with ``attrs`` (root attributes), ``splits`` (split -> list of
    names) and ``patients`` (name -> dict of arrays + ``attrs``).

    Raises
    ------
    FileNotFoundError / ValueError naming the file when it is missing or not
    in this format.
    """
    import h5py  # noqa: PLC0415

    if not os.path.exists(path):
        raise FileNotFoundError(f"Cardiac data file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path} is not a readable HDF5 file ({exc}); convert the data again") from exc
    with f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"{path} is not a cardiac data file of format {FORMAT} "
                             f"(format attribute: {f.attrs.get('format')!r})")
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
        split_names = {s: [n.decode() if isinstance(n, bytes) else str(n) for n in f["splits"][s][()]]
                       for s in SPLITS}
        wanted = set(SPLITS if splits is None else splits)
        unknown = wanted - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; expected some of {SPLITS}")
        patients = {}
        for split in SPLITS:
            if split not in wanted:
                continue
            for name in split_names[split]:
                g = f[name]
                data = {k: g[k][()] for k in g.keys() if k != "source_files"}
                data["attrs"] = {k: _decode_attr(v) for k, v in g.attrs.items()}
                data["split"] = split
                patients[name] = data
    return dict(attrs=attrs, splits=split_names, patients=patients)


def _decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value
