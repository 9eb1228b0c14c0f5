"""Image files -> :class:`Image` objects: the Image type, its errors, and the per-format readers.

:func:`read_image` reads everything one path holds (a file, ``FILE.h5:/dataset``
or a DICOM series folder); :func:`read_labels` reads integer label maps.
Collections (folders, globs, CSV/TXT lists, label matching) are in
:mod:`dirnet_tf.image_lists`, DICOM in :mod:`dirnet_tf.dicom`.  No TensorFlow:
numpy, h5py and Pillow; ``nibabel`` and ``pydicom`` are optional and imported
only when a NIfTI or DICOM file is read.

Formats
-------
* PNG / JPEG / TIFF / BMP: 2-D; colour is converted to grey (ITU-R 601 luma,
  :data:`LUMA_WEIGHTS` = ``0.299 R + 0.587 G + 0.114 B``, in floating point);
  a multi-page TIFF is a stack of 2-D images.  Pixel size tags are not read
  (``default_spacing``).  :func:`decode_pil` and :func:`rgb_to_grey` are the
  decoding and the grey conversion on their own.
* ``.npy``: a 2-D array is one image; a 3-D array is one volume (default,
  ``ndim=3``) or a stack of 2-D images (``ndim=2``); leading axes beyond
  ``ndim`` index images.
* NIfTI ``.nii`` / ``.nii.gz`` (nibabel): 2-D or 3-D (a trailing axis of
  length 1 is dropped, a 4-D file is a series of volumes); the affine
  (:func:`nifti_affine`: the sform when its code is > 0, else the qform when
  its code is > 0, else the voxel sizes) gives spacing and orientation.
* DICOM (pydicom, :mod:`dirnet_tf.dicom`): one file, single- or multi-frame
  (a multi-frame file is a sequence of 2-D frames forming one group), or a
  folder holding one series (one 3-D volume, slices ordered by their position
  along the slice normal).
* HDF5 ``FILE.h5:/dataset`` (h5py, :func:`split_hdf5_spec`): a dataset of N
  images (``[N, H, W]`` or ``[N, D, H, W]``; a 2-D dataset is one image);
  optional ``spacing_mm`` attribute on the dataset or the file.

Groups (``Image.group``): the frames of a multi-frame DICOM file, the pages of
a multi-page TIFF and the volumes of a 4-D NIfTI file form one group each (the
file's path); with two or more leading (image-indexing) axes in ``.npy`` or
HDF5 data, images sharing all but the last leading index form a group.  A
flat ``.npy`` / HDF5 stack is a collection, not a group.  A CSV ``group``
column (:mod:`dirnet_tf.image_lists`) overrides all of these.

Conventions
-----------
* ``Image.array`` is float32, spatial axes only, in array order: 2-D ``(i, j)``
  = (row, column); 3-D ``(i, j, k)``.  For DICOM, ``i`` = row, ``j`` = column,
  ``k`` = slice (sorted along the slice normal); for NIfTI the stored voxel
  axes are kept as they are (no reorientation).
* ``Image.spacing`` is in mm per array axis, in the same order.
* ``Image.affine`` is a 4x4 matrix mapping array indices ``(i, j, k, 1)``
  (``k = 0`` for 2-D images) to world coordinates in mm in **RAS+** (the NIfTI
  convention: +x towards the patient's Right, +y Anterior, +z Superior).
  DICOM's patient coordinates are LPS+ (+x Left, +y Posterior) and are
  converted with ``diag(-1, -1, 1)``.  ``None`` when the file has no patient
  geometry (PNG, npy, HDF5, ultrasound).

Errors
------
A user mistake raises :class:`InputError` (a :class:`ValueError`) whose message
names the file(s) and says what to do; an unreadable file raises its subclass
:class:`ImageReadError`.  Corrections of inconsistent metadata are reported
with :class:`GeometryWarning` and recorded in ``Image.notes``.
"""

import dataclasses
import importlib
import os
import re
import warnings

import numpy as np

__all__ = [
    "PIL_EXTENSIONS", "NPY_EXTENSIONS", "NIFTI_EXTENSIONS", "DICOM_EXTENSIONS", "HDF5_EXTENSIONS",
    "IMAGE_EXTENSIONS", "LUMA_WEIGHTS",
    "Image", "InputError", "ImageReadError", "GeometryWarning",
    "read_image", "read_labels", "skip_reason", "split_hdf5_spec", "decode_pil", "rgb_to_grey", "nifti_affine",
    "import_optional", "check_ndim", "spacing_tuple", "default_spacing_tuple", "as_float_image",
]

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NPY_EXTENSIONS = (".npy",)
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf")
IMAGE_EXTENSIONS = PIL_EXTENSIONS + NPY_EXTENSIONS + NIFTI_EXTENSIONS + DICOM_EXTENSIONS + HDF5_EXTENSIONS

#: Grey from RGB: ITU-R 601 luma weights of (R, G, B).
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

_MEDICAL_HINT = "run `pip install -e .[medical]` (or `pip install {package}`)"
_H5_SPEC = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf)):(?P<dataset>/.*)$", re.IGNORECASE)
# Pillow modes whose pixels are one grey (or index) value each.
_GREY_MODES = ("1", "L", "I", "F")


class InputError(ValueError):
    """A mistake in the input specification; the message names the file(s) and what to do."""


class ImageReadError(InputError):
    """One file (or dataset, or DICOM series) cannot be read; the message names it and says why."""


class GeometryWarning(UserWarning):
    """Inconsistent geometry metadata was corrected (the message says how)."""


@dataclasses.dataclass
class Image:
    """One image with its physical geometry.

    Attributes
    ----------
    array : np.ndarray
        float32, shape ``(H, W)`` or ``(H, W, D)`` -- spatial axes only (grey),
        in array (ij / ijk) order.  Label maps read with :func:`read_labels`
        hold int32 instead.
    spacing : tuple of float
        Voxel size in mm per array axis (``len == array.ndim``).
    affine : np.ndarray or None
        4x4, array indices ``(i, j, k, 1)`` (``k = 0`` for 2-D) -> world mm in
        RAS+ (DICOM LPS converted with ``diag(-1, -1, 1)``); None when the file
        carries no patient geometry.
    source : str
        Where it came from: a path, ``'file.h5:/ds[3]'``, ``'stack.npy[2]'``,
        ``'file.dcm[frame 5]'`` (indices 0-based), a DICOM series folder.
    group : str or None
        Images of one group belong together (frames of one multi-frame DICOM,
        the images of one CSV ``group``); None when ungrouped.
    header : object or None
        The original nibabel header (NIfTI) so that a writer can save results
        on the same grid; None for other formats.
    spacing_from : str
        Where ``spacing`` came from: ``'nifti'``, ``'dicom'``,
        ``'ultrasound-region'``, ``'hdf5'`` (a ``spacing_mm`` attribute) or
        ``'default'`` (the ``default_spacing`` argument, 1 mm if not given).
    notes : list of str
        Metadata corrections made while reading (also issued as
        :class:`GeometryWarning`).
    """

    array: np.ndarray
    spacing: tuple
    affine: np.ndarray = None
    source: str = ""
    group: str = None
    header: object = None
    spacing_from: str = "default"
    notes: list = dataclasses.field(default_factory=list)

    @property
    def ndim(self):
        """Number of spatial axes (2 or 3)."""
        return self.array.ndim

    @property
    def shape(self):
        """Array shape (voxels, array order)."""
        return tuple(self.array.shape)

    def describe(self):
        """JSON-serialisable metadata (everything but the pixels and the header)."""
        return {
            "source": self.source,
            "shape": list(self.shape),
            "spacing": [float(s) for s in self.spacing],
            "affine": None if self.affine is None else np.asarray(self.affine, float).tolist(),
            "group": self.group,
            "spacing_from": self.spacing_from,
            "notes": list(self.notes),
        }




# --------------------------------------------------------------------------- #
# Small helpers, shared with dicom.py and image_lists.py
# --------------------------------------------------------------------------- #


def import_optional(name, what):
    """Import the optional module ``name`` (``nibabel``, ``pydicom``) needed to read ``what``.

    Raises ImportError saying how to install it (``pip install -e .[medical]``).
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"Reading {what} needs {name}, an optional extra of dirnet-tf: "
            + _MEDICAL_HINT.format(package=name) + "."
        ) from exc


def split_hdf5_spec(path):
    """``'FILE.h5:/dataset'`` -> ``('FILE.h5', '/dataset')``; None when ``path`` does not name an HDF5 dataset.

    The extension may be ``.h5``, ``.hdf5`` or ``.hdf`` (any case); the file
    need not exist.
    """
    m = _H5_SPEC.match(os.fspath(path))
    return (m.group("file"), m.group("dataset")) if m else None


def skip_reason(path, exc):
    """Why ``path`` was skipped: the message of ``exc`` without a leading ``'path: '`` (the skip line names it).

    Errors of this module start with the path they concern; a caller that
    prints ``skipped PATH: REASON`` uses this to name the path once.
    """
    reason = str(exc)
    prefix = f"{os.fspath(path)}: "
    return reason[len(prefix):] if reason.startswith(prefix) else reason


def _lower_name(path):
    return os.path.basename(os.fspath(path)).lower()


def spacing_tuple(spacing, ndim, what):
    """``spacing`` (scalar or per-axis sequence, mm) -> tuple of ``ndim`` positive floats.

    Raises :class:`InputError` starting with ``what`` otherwise.
    """
    values = np.atleast_1d(np.asarray(spacing, dtype=float)).ravel()
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InputError(f"{what}: spacing {spacing!r} must be one positive number or {ndim} (mm per array axis)")
    return tuple(float(v) for v in values)


def default_spacing_tuple(ndim, default_spacing, source):
    """Spacing (mm per axis) of an image of ``source`` without its own: ``default_spacing``, or 1 mm when None."""
    if default_spacing is None:
        return (1.0,) * ndim
    return spacing_tuple(default_spacing, ndim, f"default_spacing for {source}")


def check_ndim(ndim):
    """Raise :class:`InputError` unless ``ndim`` is 2, 3 or None (automatic)."""
    if ndim not in (None, 2, 3):
        raise InputError(f"ndim must be 2, 3 or None (automatic), got {ndim!r}")


def as_float_image(array, source):
    """Validate a numeric array of ``source`` and convert it to float32 (:class:`ImageReadError` naming it)."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise ImageReadError(f"{source}: unsupported data type {array.dtype} (expected numbers)")
    out = array.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise ImageReadError(f"{source}: contains NaN or infinite values; clean the file first")
    if min(out.shape) < 1:
        raise ImageReadError(f"{source}: empty image of shape {out.shape}")
    return out


def _split_stack(array, ndim, source, default_ndim):
    """Split an array of shape ``batch + spatial`` into spatial arrays.

    Returns a list of ``(suffix, group_key, array)``: ``suffix`` is ``'[3]'``
    or ``'[1, 4]'`` (empty for a single image); with two or more leading axes
    the images that share all but the last leading index form a group.
    """
    want = default_ndim(array.ndim) if ndim is None else ndim
    if array.ndim < 2:
        raise ImageReadError(f"{source}: array of shape {array.shape} is not an image (needs 2 or 3 spatial axes)")
    if array.ndim < want:
        raise ImageReadError(f"{source}: array of shape {array.shape} has fewer axes than ndim={want}")
    batch = array.shape[: array.ndim - want]
    if not batch:
        return [("", None, array)]
    out = []
    for index in np.ndindex(*batch):
        suffix = "[" + ", ".join(str(i) for i in index) + "]"
        group = None
        if len(index) > 1:
            group = source + "[" + ", ".join(str(i) for i in index[:-1]) + "]"
        out.append((suffix, group, array[index]))
    return out


# --------------------------------------------------------------------------- #
# Per-format readers
# --------------------------------------------------------------------------- #


def rgb_to_grey(array):
    """Colour pixels ``[..., 3 or 4]`` (R, G, B[, alpha ignored]) -> grey float64 ``[...]`` (:data:`LUMA_WEIGHTS`)."""
    array = np.asarray(array)
    if array.ndim < 1 or array.shape[-1] not in (3, 4):
        raise ValueError(f"rgb_to_grey needs colour pixels [..., 3 or 4], got shape {array.shape}")
    return array[..., :3].astype(np.float64) @ LUMA_WEIGHTS


def _frame_array(frame, palette, rgb):
    if rgb:
        return np.asarray(frame if frame.mode == "RGB" else frame.convert("RGB"))
    mode = frame.mode
    if mode in _GREY_MODES or mode.startswith("I;") or (mode == "P" and palette):
        return np.asarray(frame)
    if mode in ("LA", "La"):
        return np.asarray(frame)[..., 0]
    return np.asarray(frame.convert("RGB"))


def decode_pil(path, palette=False, rgb=False):
    """Decode every frame (page) of an image file that Pillow reads, without changing the values.

    Parameters
    ----------
    path : str or os.PathLike
    palette : bool
        Keep a palette (``P``) image's indices (label maps) instead of its colours.
    rgb : bool
        Return every frame as RGB ``[H, W, 3]`` uint8.

    Returns
    -------
    list of np.ndarray
        One per frame: a 2-D array ``(rows, columns)`` in the file's own type
        (bool for 1-bit, uint8, uint16, int32, float32) for grey (and, with
        ``palette``, palette) images, the grey channel of grey+alpha, otherwise
        ``[H, W, 3]`` uint8 RGB (alpha dropped; :func:`rgb_to_grey` makes it grey).

    Raises
    ------
    ImageReadError
        Naming the file, when it is missing, unreadable or corrupt.
    """
    from PIL import Image as PILImage  # noqa: PLC0415

    source = os.fspath(path)
    arrays = []
    try:
        with PILImage.open(path) as img:
            for n in range(getattr(img, "n_frames", 1)):
                img.seek(n)
                img.load()
                arrays.append(_frame_array(img, palette, rgb))
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken files
        detail = str(exc).replace(f" {source!r}", "").replace(source, "the file")  # the message names it once
        raise ImageReadError(
            f"{source}: unreadable or corrupt image file ({type(exc).__name__}: {detail}); "
            "re-export it or remove it from the input"
        ) from exc
    return arrays


def _read_pil(path, ndim, default_spacing, labels=False):
    source = os.fspath(path)
    if ndim == 3:
        raise ImageReadError(f"{source}: a {os.path.splitext(source)[1]} file is 2-D, but ndim=3 was asked for")
    arrays = []
    for array in decode_pil(path, palette=labels):
        if array.ndim == 3 and labels:
            if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
                raise ImageReadError(f"{source}: a colour image cannot be a label map "
                                     "(save labels as grey or palette indices)")
            array = array[..., 0]
        elif array.ndim == 3:
            array = rgb_to_grey(array)
        arrays.append(array)
    spacing = default_spacing_tuple(2, default_spacing, source)
    images = []
    for n, array in enumerate(arrays):
        name = source if len(arrays) == 1 else f"{source}[{n}]"
        group = None if len(arrays) == 1 else source
        images.append(Image(as_float_image(array, name), spacing, None, name, group))
    return images


def _read_npy(path, ndim, default_spacing):
    source = os.fspath(path)
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(
            f"{source}: not a readable .npy array ({type(exc).__name__}: {exc}); "
            "save it with numpy.save (no pickled objects)"
        ) from exc
    if not isinstance(array, np.ndarray):
        raise ImageReadError(f"{source}: expected one array (.npy), not an archive")
    parts = _split_stack(array, ndim, source, lambda n: 2 if n == 2 else 3)
    images = []
    for suffix, group, arr in parts:
        name = source + suffix
        spacing = default_spacing_tuple(arr.ndim, default_spacing, name)
        images.append(Image(as_float_image(arr, name), spacing, None, name, group))
    return images


def _read_hdf5(path, dataset, ndim, default_spacing):
    import h5py  # noqa: PLC0415

    source = f"{os.fspath(path)}:{dataset}" if dataset else os.fspath(path)
    try:
        f = h5py.File(path, "r")
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"{source}: not a readable HDF5 file ({type(exc).__name__}: {exc})") from exc
    with f:
        names = []
        f.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
        if not dataset:
            candidates = [n for n in names if f[n].ndim >= 2]
            if len(candidates) != 1:
                raise ImageReadError(
                    f"{source}: name the dataset as FILE.h5:/DATASET (datasets here: {', '.join(names[:10]) or 'none'})"
                )
            dataset = candidates[0]
            source = f"{os.fspath(path)}:{dataset}"
        if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
            raise ImageReadError(
                f"{source}: no dataset {dataset} in the file (datasets: {', '.join(names[:10]) or 'none'})"
            )
        ds = f[dataset]
        try:
            array = ds[()]
        except Exception as exc:  # noqa: BLE001
            raise ImageReadError(f"{source}: dataset cannot be read ({type(exc).__name__}: {exc})") from exc
        attr = ds.attrs.get("spacing_mm", f.attrs.get("spacing_mm"))
    parts = _split_stack(np.asarray(array), ndim, source, lambda n: 2 if n <= 3 else 3)
    images = []
    for suffix, group, arr in parts:
        name = source + suffix
        spacing, spacing_from, notes = None, "default", []
        if attr is not None:
            try:
                spacing, spacing_from = spacing_tuple(attr, arr.ndim, name), "hdf5"
            except InputError:
                notes.append(f"{name}: spacing_mm attribute {np.asarray(attr).tolist()} does not fit a "
                             f"{arr.ndim}-D image; ignored")
        if spacing is None:
            spacing = default_spacing_tuple(arr.ndim, default_spacing, name)
        image = Image(as_float_image(arr, name), spacing, None, name, group, None, spacing_from, notes)
        images.append(image)
    for note in {n for im in images for n in im.notes}:
        warnings.warn(note, GeometryWarning, stacklevel=3)
    return images



def nifti_affine(header):
    """The voxel -> world (RAS+ mm) affine of a NIfTI header, by the NIfTI rules (nibabel's ``get_best_affine``).

    The sform when its code is > 0, else the qform when its code is > 0, else
    the voxel sizes alone (nibabel's base affine, centred on the grid).  The
    sform may hold a shear, which the qform (a rotation, voxel sizes and an
    offset) cannot.
    """
    sform, sform_code = header.get_sform(coded=True)
    if sform is not None and sform_code > 0:
        return np.asarray(sform, dtype=float)
    qform, qform_code = header.get_qform(coded=True)
    if qform is not None and qform_code > 0:
        return np.asarray(qform, dtype=float)
    return np.asarray(header.get_base_affine(), dtype=float)


def _read_nifti(path, ndim, default_spacing):
    nib = import_optional("nibabel", "NIfTI files")
    source = os.fspath(path)
    try:
        img = nib.load(source)
        data = np.asarray(img.get_fdata(dtype=np.float64))  # scl_slope/scl_inter applied
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
        raise ImageReadError(
            f"{source}: not a readable NIfTI file ({type(exc).__name__}: {exc}); check the file or re-export it"
        ) from exc
    affine = nifti_affine(img.header)
    header = img.header
    while data.ndim > 2 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 4:
        raise ImageReadError(f"{source}: {data.ndim}-D NIfTI data of shape {data.shape} is not supported")
    if data.ndim < 2:
        raise ImageReadError(f"{source}: NIfTI data of shape {data.shape} is not an image")
    want = ndim if ndim is not None else min(data.ndim, 3)
    if data.ndim < want:
        raise ImageReadError(f"{source}: {data.ndim}-D NIfTI image, but ndim={want} was asked for")
    images = []
    # Spatial axes are the first `want`; any further axis (slices for ndim=2 on a
    # volume, time for a 4-D file) indexes images.
    batch = data.shape[want:]
    for index in np.ndindex(*batch) if batch else [()]:
        arr = data[(Ellipsis,) + index] if index else data
        name = source + ("[" + ", ".join(str(i) for i in index) + "]" if index else "")
        # Affine of this image: the k-th slice (ndim=2 on a volume) starts at k along axis 2.
        aff = affine.copy()
        if want == 2 and data.ndim >= 3:
            aff[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, float(index[0])]) + affine[:3, 3]
        spacing = tuple(float(np.linalg.norm(aff[:3, a])) for a in range(want))
        if min(spacing) <= 0:
            zooms = header.get_zooms()[:want]
            spacing = spacing_tuple(zooms, want, name)
        group = source if batch else None
        images.append(Image(as_float_image(arr, name), spacing, aff, name, group, header, "nifti"))
    return images


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def read_image(path, ndim=None, default_spacing=None):
    """Read every image held by one file, HDF5 dataset or DICOM series folder.

    Parameters
    ----------
    path : str or os.PathLike
        An image file, ``FILE.h5:/dataset`` or a folder holding one DICOM series.
    ndim : {None, 2, 3}
        Spatial dimensionality wanted.  For ``.npy`` (and NIfTI) 3-D data,
        ``ndim=2`` reads a stack of 2-D images along the last axis (NIfTI) or
        the first axis (npy), ``ndim=3`` one volume; None: 3-D data are
        volumes (HDF5: ``[N, H, W]`` is N 2-D images).
    default_spacing : float or sequence of float, optional
        Voxel size in mm (per array axis) for formats that do not store one;
        1 mm when None.

    Returns
    -------
    list of Image
        One per image (npy stacks, multi-frame DICOM and HDF5 datasets give
        several).

    Raises
    ------
    ImageReadError
        The file does not exist, has an unsupported type or is unreadable.
    ImportError
        nibabel/pydicom are needed but not installed (``pip install -e .[medical]``).
    """
    from dirnet_tf import dicom  # noqa: PLC0415 - dicom.py builds on this module

    check_ndim(ndim)
    path = os.fspath(path)
    m = _H5_SPEC.match(path)
    if m and os.path.isfile(m.group("file")):
        return _read_hdf5(m.group("file"), m.group("dataset"), ndim, default_spacing)
    if os.path.isdir(path):
        return dicom.read_dicom_series(path, ndim, default_spacing)
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: no such file or folder")
    lower = _lower_name(path)
    if lower.endswith(PIL_EXTENSIONS):
        return _read_pil(path, ndim, default_spacing)
    if lower.endswith(NPY_EXTENSIONS):
        return _read_npy(path, ndim, default_spacing)
    if lower.endswith(NIFTI_EXTENSIONS):
        return _read_nifti(path, ndim, default_spacing)
    if lower.endswith(HDF5_EXTENSIONS):
        return _read_hdf5(path, None, ndim, default_spacing)
    if dicom.is_dicom_file(path):
        return dicom.read_dicom_file(path, ndim, default_spacing)
    raise ImageReadError(f"{path}: unsupported file type (supported: {', '.join(IMAGE_EXTENSIONS)}, "
                         "DICOM files without extension, FILE.h5:/dataset, DICOM series folders)")


def read_labels(path, ndim=None):
    """Read integer label maps (same layout rules as :func:`read_image`).

    Colour images are refused (palette PNGs keep their indices); values must
    be whole numbers.  Returns a list of :class:`Image` whose ``array`` is
    int32.  Raises :class:`ImageReadError` otherwise.
    """
    check_ndim(ndim)
    path = os.fspath(path)
    if _lower_name(path).endswith(PIL_EXTENSIONS) and os.path.isfile(path):
        images = _read_pil(path, ndim, None, labels=True)
    else:
        images = read_image(path, ndim)
    for image in images:
        values = image.array
        if not np.array_equal(values, np.round(values)) or np.abs(values).max(initial=0) > 2**31 - 1:
            raise ImageReadError(f"{image.source}: not an integer label map (values must be whole numbers)")
        image.array = values.astype(np.int32)
    return images
