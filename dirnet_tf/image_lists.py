"""Collections of images: folders, globs, CSV/TXT lists and label matching -> :class:`Entry` lists.

Everything a user can pass as ``--images`` (and ``--labels``) is resolved by
:func:`list_images`; each path is read with :func:`dirnet_tf.readers.read_image`
(formats, geometry and errors are described in :mod:`dirnet_tf.readers`).

* A folder: every readable image in it, sorted by file name; sub-folders
  holding DICOM files, and a folder made only of the slices of one DICOM
  series, are read as DICOM series (3-D volumes).
* A glob pattern: the matching files, sorted.
* A ``.csv`` list (header row with an ``image`` column, optional ``label``
  and ``group``) or a ``.txt`` list (one path a line, ``#`` comments); relative
  paths are relative to the list file.
* One file or ``FILE.h5:/dataset``: its images.

Label maps (:func:`dirnet_tf.readers.read_labels`, int32) are matched to
images by file stem (:func:`file_stem`) in a labels folder, come from a CSV
``label`` column, or, for a single file, from one label file holding the same
number of maps.  A label map must lie on its image's grid (same shape).

When several inputs were given, unreadable files are skipped and returned as
``(path, reason)`` pairs; the reason does not repeat the path.
"""

import csv
import dataclasses
import glob
import os
import warnings

from dirnet_tf import dicom
from dirnet_tf.readers import (
    IMAGE_EXTENSIONS,
    Image,
    ImageReadError,
    InputError,
    check_ndim,
    read_image,
    read_labels,
    skip_reason,
    split_hdf5_spec,
)

__all__ = ["LIST_EXTENSIONS", "Entry", "file_stem", "is_image_file", "list_images", "expand_folder",
           "read_image_list", "entries_with_labels"]

LIST_EXTENSIONS = (".csv", ".txt")


@dataclasses.dataclass
class Entry:
    """An image of a collection, with its label map (an :class:`Image` of int32) or None."""

    image: Image
    label: Image = None



def file_stem(path):
    """File name without folder and format extension (``a/b.nii.gz`` -> ``b``; ``x.h5:/ds`` -> ``x``)."""
    path = os.fspath(path)
    h5 = split_hdf5_spec(path)
    if h5:
        path = h5[0]
    name = os.path.basename(os.path.normpath(path))
    lower = name.lower()
    for ext in sorted(IMAGE_EXTENSIONS + LIST_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


def is_image_file(path):
    """Whether ``path`` has an image file extension (:data:`~dirnet_tf.readers.IMAGE_EXTENSIONS`) or is DICOM."""
    return os.path.basename(os.fspath(path)).lower().endswith(IMAGE_EXTENSIONS) or dicom.is_dicom_file(path)


def entries_with_labels(images, labels, image_path, label_path):
    """Pair the images read from one path with the label maps read from another -> list of :class:`Entry`.

    Raises :class:`~dirnet_tf.readers.InputError` naming both when the counts
    or the shapes (voxels) differ.
    """
    if len(labels) != len(images):
        raise InputError(f"label file {label_path} holds {len(labels)} label map(s) but image {image_path} "
                         f"holds {len(images)} image(s); they must match one to one")
    out = []
    for image, label in zip(images, labels):
        if label.shape != image.shape:
            raise InputError(f"label map {label.source} has shape {label.shape} but its image {image.source} has "
                             f"shape {image.shape}; labels must be on the image's grid")
        out.append(Entry(image, label))
    return out


def expand_folder(folder, ndim):
    """Paths to read from a folder, sorted by name: files and sub-folders holding DICOM files (series).

    A folder holding only the single-frame slices of one DICOM series gives
    ``[folder]`` itself (one volume), unless ``ndim == 2``.  Hidden names are
    left out.
    """
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    dirs = [os.path.join(folder, n) for n in names if os.path.isdir(os.path.join(folder, n))]
    dicom_files = [p for p in files if dicom.is_dicom_file(p)]
    if (ndim != 2 and len(dicom_files) >= 2 and len(dicom_files) == len(files) and not dirs
            and dicom.is_single_series(dicom_files)):
        return [folder]
    out = files + [d for d in dirs if dicom.list_dicom_files(d)]
    return sorted(out, key=lambda p: os.path.basename(p))


def read_image_list(list_path):
    """The ``(image, label or None, group or None)`` rows of a .csv/.txt list.

    Relative paths are resolved against the list file's folder.  A CSV list
    needs an ``image`` column (header row, any case; optional ``label`` and
    ``group``); a TXT list has one path a line, ``#`` comments.  Raises
    :class:`~dirnet_tf.readers.InputError` naming the list otherwise.
    """
    base = os.path.dirname(os.path.abspath(list_path))

    def resolve(p):
        p = p.strip()
        return p if os.path.isabs(p) else os.path.join(base, p)

    rows = []
    try:
        with open(list_path, newline="", encoding="utf-8") as f:
            if list_path.lower().endswith(".csv"):
                reader = csv.DictReader(f)
                fields = [c.strip().lower() for c in (reader.fieldnames or [])]
                if "image" not in fields:
                    raise InputError(f"{list_path}: a CSV list needs a header row with an `image` column "
                                     f"(optional `label`, `group`); found {reader.fieldnames}")
                for row in reader:
                    row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
                    if not row.get("image"):
                        continue
                    rows.append((resolve(row["image"]), resolve(row["label"]) if row.get("label") else None,
                                 row.get("group") or None))
            else:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        rows.append((resolve(line), None, None))
    except UnicodeDecodeError as exc:
        raise InputError(f"{list_path}: not a text list of paths ({exc})") from exc
    if not rows:
        raise InputError(f"{list_path}: the list names no images")
    return rows


def _label_index(labels_folder):
    """``{stem: path}`` of the label files in a folder; an ambiguous stem is an error."""
    index = {}
    for path in expand_folder(labels_folder, 2):
        stem = file_stem(path)
        if stem in index:
            raise InputError(f"label files {index[stem]} and {path} have the same name stem; keep one")
        index[stem] = path
    return index


def list_images(spec, labels=None, ndim=None, default_spacing=None):
    """Resolve an ``--images`` specification into images (and labels).

    Parameters
    ----------
    spec : str or os.PathLike
        A folder (every readable image in it, sorted by name; sub-folders and
        a folder made only of the slices of one DICOM series are read as DICOM
        series), a glob pattern, a ``.csv`` list (header with ``image``,
        optional ``label`` and ``group`` columns) or ``.txt`` list (one path a
        line, ``#`` comments) -- relative paths in a list are relative to the
        list file --, one file, or ``FILE.h5:/dataset``.
    labels : str or os.PathLike, optional
        Integer label maps: a folder (matched by file stem, e.g.
        ``labels/case1.nii.gz`` for ``images/case1.nii``), or -- when ``spec``
        is a single file or dataset -- one file/dataset whose label maps match
        its images one to one.  Not allowed together with a CSV ``label``
        column.
    ndim : {None, 2, 3}
        See :func:`read_image`.
    default_spacing : float or sequence of float, optional
        Voxel size (mm) for formats without one.

    Returns
    -------
    entries : list of Entry
        Images (with their label or None), in input order.
    skipped : list of (str, str)
        ``(path, reason)`` of each input that could not be read; the reason
        does not repeat the path (:func:`~dirnet_tf.readers.skip_reason`).

    Raises
    ------
    InputError
        Nothing matches ``spec``; nothing readable; 2-D and 3-D images mixed;
        a label map whose shape differs from its image (both files named); a
        labels folder none of whose names matches an image (when only some
        images lack a label map, a UserWarning says how many).
    ImageReadError
        ``spec`` is a single file (or dataset) and it is unreadable.
    """
    check_ndim(ndim)
    spec = os.fspath(spec)
    labels = None if labels is None else os.fspath(labels)
    h5 = split_hdf5_spec(spec)
    rows, single = None, False
    if h5 and os.path.isfile(h5[0]) or os.path.isfile(spec) and not spec.lower().endswith(LIST_EXTENSIONS):
        rows, single = [(spec, None, None)], True
    elif os.path.isdir(spec):
        paths = expand_folder(spec, ndim)
        single = paths == [spec]
        rows = [(p, None, None) for p in paths]
        if not rows:
            raise InputError(f"{spec}: the folder holds no files")
    elif os.path.isfile(spec):
        rows = read_image_list(spec)
        if labels is not None and any(r[1] for r in rows):
            raise InputError(f"{spec}: the list has a `label` column; do not also pass labels={labels}")
    elif any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec))
        if not paths:
            raise InputError(f"{spec}: the pattern matches no files")
        rows = [(p, None, None) for p in paths]
    else:
        raise InputError(f"{spec}: no such file, folder or HDF5 dataset, and not a glob pattern")

    label_index = None
    if labels is not None and not single:
        if not os.path.isdir(labels):
            raise InputError(f"labels={labels}: give a folder of label maps named like the images "
                             "(or a single label file for a single image file)")
        label_index = _label_index(labels)

    entries, skipped, missing = [], [], []
    for path, label_path, group in rows:
        if not single and os.path.isfile(path) and not is_image_file(path) and not split_hdf5_spec(path):
            skipped.append((path, "not an image file (unsupported extension)"))
            continue
        try:
            images = read_image(path, ndim, default_spacing)
        except ImageReadError as exc:
            if single:
                raise
            skipped.append((path, skip_reason(path, exc)))
            continue
        if group is not None:
            for image in images:
                image.group = group
        if single and labels is not None:
            label_path = labels
        elif label_index is not None:
            label_path = label_index.get(file_stem(path))
            if label_path is None:
                missing.append(path)
        if label_path is None:
            entries.extend(Entry(image) for image in images)
        else:
            entries.extend(entries_with_labels(images, read_labels(label_path, ndim), path, label_path))

    if not entries:
        detail = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        raise InputError(f"{spec}: no readable image ({len(skipped)} skipped: {detail})")
    dims = {}
    for entry in entries:
        dims.setdefault(entry.image.ndim, entry.image.source)
    if len(dims) > 1:
        raise InputError(f"{spec}: 2-D and 3-D images are mixed (e.g. {dims[2]} is 2-D, {dims[3]} is 3-D); "
                         "use one kind, or pass ndim=2 to read volumes as stacks of slices")
    if missing and not any(entry.label is not None for entry in entries):
        named = (f"its label files are named like {', '.join(sorted(label_index)[:3])}" if label_index
                 else "it holds no label file")
        raise InputError(f"labels={labels}: no label map matches an image by name (e.g. no {file_stem(missing[0])}.* "
                         f"for {missing[0]}; {named}); name each label map like its image, e.g. "
                         f"{os.path.join(labels, file_stem(missing[0]))}.png")
    if missing:
        warnings.warn(f"{len(missing)} image(s) have no label map in {labels} (e.g. {missing[0]})", stacklevel=2)
    return entries, skipped
