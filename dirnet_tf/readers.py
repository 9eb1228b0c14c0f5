"""Image readers: files, folders, globs and lists -> :class:`Image` objects.

Everything a user can pass as ``--images`` (and ``--labels``) is resolved here,
without TensorFlow (numpy, scipy, h5py and Pillow; ``nibabel`` and ``pydicom``
are optional and imported only when a NIfTI or DICOM file is read).

Formats
-------
* PNG / JPEG / TIFF / BMP: 2-D; colour is converted to grey (ITU-R 601 luma,
  ``0.299 R + 0.587 G + 0.114 B``, in floating point); a multi-page TIFF is a
  stack of 2-D images.  Pixel size tags are not read (``default_spacing``).
* ``.npy``: a 2-D array is one image; a 3-D array is one volume (default,
  ``ndim=3``) or a stack of 2-D images (``ndim=2``); leading axes beyond
  ``ndim`` index images.
* NIfTI ``.nii`` / ``.nii.gz`` (nibabel): 2-D or 3-D (a trailing axis of
  length 1 is dropped, a 4-D file is a series of volumes); the header's affine
  gives spacing and orientation.
* DICOM (pydicom): one file, single- or multi-frame (a multi-frame file is a
  sequence of 2-D frames forming one group), or a folder holding one series
  (one 3-D volume, slices ordered by their position along the slice normal,
  never by file name or InstanceNumber).  Spacing comes from PixelSpacing and
  the slice positions, or, for ultrasound, from SequenceOfUltrasoundRegions.
* HDF5 ``FILE.h5:/dataset`` (h5py): a dataset of N images (``[N, H, W]`` or
  ``[N, D, H, W]``; a 2-D dataset is one image); optional ``spacing_mm``
  attribute on the dataset or the file.

Groups (``Image.group``): the frames of a multi-frame DICOM file, the pages of
a multi-page TIFF and the volumes of a 4-D NIfTI file form one group each (the
file's path); with two or more leading (image-indexing) axes in ``.npy`` or
HDF5 data, images sharing all but the last leading index form a group.  A
flat ``.npy`` / HDF5 stack is a collection, not a group.  A CSV ``group``
column overrides all of these.

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
:class:`ImageReadError`.  :func:`list_images` skips unreadable files when it was
given several and returns them as ``(path, reason)`` pairs.  Corrections of
inconsistent metadata are reported with :class:`GeometryWarning` and recorded
in ``Image.notes``.
"""

import csv
import dataclasses
import glob
import os
import re
import warnings

import numpy as np

__all__ = [
    "Image", "Entry", "InputError", "ImageReadError", "GeometryWarning",
    "read_image", "read_labels", "list_images", "file_stem",
]

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NPY_EXTENSIONS = (".npy",)
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf")
LIST_EXTENSIONS = (".csv", ".txt")
IMAGE_EXTENSIONS = PIL_EXTENSIONS + NPY_EXTENSIONS + NIFTI_EXTENSIONS + DICOM_EXTENSIONS + HDF5_EXTENSIONS

#: DICOM LPS+ -> RAS+ (applied on the left of an LPS affine).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_MEDICAL_HINT = "run `pip install -e .[medical]` (or `pip install {package}`)"
_H5_SPEC = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf)):(?P<dataset>/.*)$", re.IGNORECASE)
_RGB_WEIGHTS = np.array([0.299, 0.587, 0.114])
# Largest down-sampling factor tried when an ultrasound region lies outside the image.
_MAX_REGION_FACTOR = 16


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


@dataclasses.dataclass
class Entry:
    """An image of a collection, with its label map (an :class:`Image` of int32) or None."""

    image: Image
    label: Image = None


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #


def _import_optional(name, what):
    try:
        if name == "nibabel":
            import nibabel as module  # noqa: PLC0415 - optional dependency
        else:
            import pydicom as module  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError(
            f"Reading {what} needs {name}, an optional extra of dirnet-tf: "
            + _MEDICAL_HINT.format(package=name) + "."
        ) from exc
    return module


def _lower_name(path):
    return os.path.basename(os.fspath(path)).lower()


def file_stem(path):
    """File name without folder and format extension (``a/b.nii.gz`` -> ``b``; ``x.h5:/ds`` -> ``x``)."""
    path = os.fspath(path)
    m = _H5_SPEC.match(path)
    if m:
        path = m.group("file")
    name = os.path.basename(os.path.normpath(path))
    lower = name.lower()
    for ext in sorted(IMAGE_EXTENSIONS + LIST_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


def _has_dicom_magic(path):
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_dicom_file(path):
    lower = _lower_name(path)
    if lower.endswith(DICOM_EXTENSIONS):
        return True
    return "." not in lower and lower != "dicomdir" and _has_dicom_magic(path)


def _is_image_file(path):
    return _lower_name(path).endswith(IMAGE_EXTENSIONS) or _is_dicom_file(path)


def _spacing_tuple(spacing, ndim, what):
    """``spacing`` (scalar or per-axis sequence, mm) -> tuple of ``ndim`` positive floats."""
    values = np.atleast_1d(np.asarray(spacing, dtype=float)).ravel()
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InputError(f"{what}: spacing {spacing!r} must be one positive number or {ndim} (mm per array axis)")
    return tuple(float(v) for v in values)


def _default_geometry(ndim, default_spacing, source):
    if default_spacing is None:
        return (1.0,) * ndim
    return _spacing_tuple(default_spacing, ndim, f"default_spacing for {source}")


def _check_ndim(ndim):
    if ndim not in (None, 2, 3):
        raise InputError(f"ndim must be 2, 3 or None (automatic), got {ndim!r}")


def _as_float_image(array, source):
    """Validate a numeric array and convert it to float32."""
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


def _pil_to_array(frame, labels):
    """One Pillow frame -> 2-D array (grey float, or integer indices for labels)."""
    mode = frame.mode
    if mode in ("1", "L", "P", "I", "F") or mode.startswith("I;"):
        if mode == "P" and not labels:
            frame = frame.convert("RGB")
        else:
            return np.asarray(frame)
    if labels:
        rgb = np.asarray(frame.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise ImageReadError("a colour image cannot be a label map (save labels as grey or palette indices)")
        return rgb[..., 0]
    if mode in ("LA", "La"):
        return np.asarray(frame)[..., 0]
    rgb = np.asarray(frame.convert("RGB"), dtype=np.float64)
    return rgb @ _RGB_WEIGHTS


def _read_pil(path, ndim, default_spacing, labels=False):
    from PIL import Image as PILImage  # noqa: PLC0415

    source = os.fspath(path)
    if ndim == 3:
        raise ImageReadError(f"{source}: a {os.path.splitext(source)[1]} file is 2-D, but ndim=3 was asked for")
    arrays = []
    try:
        with PILImage.open(path) as img:
            for n in range(getattr(img, "n_frames", 1)):
                img.seek(n)
                img.load()
                arrays.append(_pil_to_array(img, labels))
    except ImageReadError as exc:
        raise ImageReadError(f"{source}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken files
        raise ImageReadError(
            f"{source}: unreadable or corrupt image file ({type(exc).__name__}: {exc}); "
            "re-export it or remove it from the input"
        ) from exc
    spacing = _default_geometry(2, default_spacing, source)
    images = []
    for n, array in enumerate(arrays):
        name = source if len(arrays) == 1 else f"{source}[{n}]"
        group = None if len(arrays) == 1 else source
        images.append(Image(_as_float_image(array, name), spacing, None, name, group))
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
        spacing = _default_geometry(arr.ndim, default_spacing, name)
        images.append(Image(_as_float_image(arr, name), spacing, None, name, group))
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
                spacing, spacing_from = _spacing_tuple(attr, arr.ndim, name), "hdf5"
            except InputError:
                notes.append(f"{name}: spacing_mm attribute {np.asarray(attr).tolist()} does not fit a "
                             f"{arr.ndim}-D image; ignored")
        if spacing is None:
            spacing = _default_geometry(arr.ndim, default_spacing, name)
        image = Image(_as_float_image(arr, name), spacing, None, name, group, None, spacing_from, notes)
        images.append(image)
    for note in {n for im in images for n in im.notes}:
        warnings.warn(note, GeometryWarning, stacklevel=3)
    return images


def _read_nifti(path, ndim, default_spacing):
    nib = _import_optional("nibabel", "NIfTI files")
    source = os.fspath(path)
    try:
        img = nib.load(source)
        data = np.asarray(img.get_fdata(dtype=np.float64))  # scl_slope/scl_inter applied
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
        raise ImageReadError(
            f"{source}: not a readable NIfTI file ({type(exc).__name__}: {exc}); check the file or re-export it"
        ) from exc
    affine = np.asarray(img.affine, dtype=float)
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
            spacing = _spacing_tuple(zooms, want, name)
        group = source if batch else None
        images.append(Image(_as_float_image(arr, name), spacing, aff, name, group, header, "nifti"))
    return images


# ------------------------------- DICOM ------------------------------------- #


def _dicom_pixels(ds, pydicom):
    """Pixel data as a float array: ``(rows, cols)`` or ``(frames, rows, cols)``, grey, rescaled."""
    array = ds.pixel_array
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    if samples == 3:
        if photometric.startswith("YBR") and int(pydicom.__version__.split(".")[0]) < 3:
            # pydicom < 3 does not convert uncompressed YBR data; its luma channel is the grey value.
            if not ds.file_meta.TransferSyntaxUID.is_compressed:
                return np.asarray(array[..., 0], dtype=np.float64)
        array = np.asarray(array, dtype=np.float64) @ _RGB_WEIGHTS
    elif samples != 1:
        raise ImageReadError(f"{samples} samples per pixel are not supported")
    else:
        array = np.asarray(array, dtype=np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    array = array * slope + intercept
    if photometric == "MONOCHROME1":
        array = -array  # MONOCHROME1 displays low values bright: negate so that bright = high, the same for every file
    return array


def _functional(ds, frame, sequence, attribute):
    """An attribute from a per-frame / shared functional group (enhanced multi-frame) or None."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = getattr(ds, groups, None)
        if seq is None or index is None or len(seq) <= index:
            continue
        inner = getattr(seq[index], sequence, None)
        if inner is not None and len(inner) and getattr(inner[0], attribute, None) is not None:
            return getattr(inner[0], attribute)
    return None


def _plane_geometry(ds, frame=None):
    """PixelSpacing (row, col mm), ImagePositionPatient and ImageOrientationPatient of one frame (or None)."""
    spacing = _functional(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    if spacing is None:
        spacing = getattr(ds, "PixelSpacing", None)
    position = _functional(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
    if position is None:
        position = getattr(ds, "ImagePositionPatient", None)
    orientation = _functional(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
    if orientation is None:
        orientation = getattr(ds, "ImageOrientationPatient", None)
    spacing = tuple(float(v) for v in spacing) if spacing is not None and len(spacing) == 2 else None
    if spacing is not None and min(spacing) <= 0:
        spacing = None
    position = np.asarray([float(v) for v in position]) if position is not None and len(position) == 3 else None
    orientation = (np.asarray([float(v) for v in orientation])
                   if orientation is not None and len(orientation) == 6 else None)
    return spacing, position, orientation


def _lps_affine(spacing, position, orientation, slice_step=None):
    """4x4 RAS affine of a DICOM plane: (row i, column j, slice k) -> world mm.

    ``orientation[:3]`` is the direction of increasing column index (along a
    row), ``orientation[3:]`` that of increasing row index; the third column is
    ``slice_step`` (LPS mm per slice) or the unit normal.
    """
    row_dir, col_dir = orientation[:3], orientation[3:]
    lps = np.eye(4)
    lps[:3, 0] = col_dir * spacing[0]  # axis i = row index: moves down a column
    lps[:3, 1] = row_dir * spacing[1]  # axis j = column index: moves along a row
    lps[:3, 2] = np.cross(row_dir, col_dir) if slice_step is None else slice_step
    lps[:3, 3] = position
    return LPS_TO_RAS @ lps


def _ultrasound_spacing(ds, rows, cols, source):
    """Pixel spacing (row, col mm) from SequenceOfUltrasoundRegions, and notes; (None, []) if absent.

    The 2-D region with physical units of cm (code 3) and the largest area is
    used.  When its box does not fit in the image (the pixel data were
    down-sampled after the region was recorded), the image is trusted: the
    smallest integer factor that brings the box inside the image is assumed to
    be the down-sampling factor and the deltas are multiplied by it.
    """
    regions = getattr(ds, "SequenceOfUltrasoundRegions", None)
    if not regions:
        return None, []
    usable = []
    for r in regions:
        units_x, units_y = getattr(r, "PhysicalUnitsXDirection", None), getattr(r, "PhysicalUnitsYDirection", None)
        dx, dy = getattr(r, "PhysicalDeltaX", None), getattr(r, "PhysicalDeltaY", None)
        if units_x != 3 or units_y != 3 or dx is None or dy is None or float(dx) <= 0 or float(dy) <= 0:
            continue
        box = [int(getattr(r, name, 0) or 0) for name in
               ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")]
        usable.append(((box[2] - box[0]) * (box[3] - box[1]), box, float(dx) * 10.0, float(dy) * 10.0))
    if not usable:
        return None, []
    _, (x0, y0, x1, y1), dx_mm, dy_mm = max(usable, key=lambda u: u[0])
    if x1 < cols and y1 < rows:
        return (dy_mm, dx_mm), []
    for factor in range(2, _MAX_REGION_FACTOR + 1):
        if x1 / factor < cols and y1 / factor < rows:
            note = (
                f"{source}: the ultrasound region box (x {x0}-{x1}, y {y0}-{y1} pixels) lies outside the "
                f"{cols}x{rows} image, so the region metadata describe a larger original; trusting the image, "
                f"it is taken as a {factor}x down-sample and the region's pixel size "
                f"({dy_mm:.4g} x {dx_mm:.4g} mm) is scaled to {dy_mm * factor:.4g} x {dx_mm * factor:.4g} mm "
                "(row x column); check this against the original recording."
            )
            return (dy_mm * factor, dx_mm * factor), [note]
    note = (f"{source}: the ultrasound region box (x {x0}-{x1}, y {y0}-{y1}) does not fit the {cols}x{rows} "
            "image even after down-sampling by 16; the region's pixel size is ignored")
    return None, [note]


def _dcmread(path, pydicom, stop_before_pixels=False):
    source = os.fspath(path)
    try:
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=stop_before_pixels)
        except pydicom.errors.InvalidDicomError:
            # Files without the 128-byte preamble are still legal; parse them leniently.
            ds = pydicom.dcmread(source, stop_before_pixels=stop_before_pixels, force=True)
            if "SOPClassUID" not in ds and "Rows" not in ds:
                raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
        raise ImageReadError(
            f"{source}: not a readable DICOM file ({type(exc).__name__}: {exc}); check or remove it"
        ) from exc
    if not stop_before_pixels and "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ImageReadError(f"{source}: DICOM file without pixel data (not an image); remove it from the input")
    return ds


def _read_dicom_file(path, ndim, default_spacing):
    """One DICOM file -> one 2-D image per frame (all frames of a multi-frame file form one group)."""
    pydicom = _import_optional("pydicom", "DICOM files")
    source = os.fspath(path)
    if ndim == 3:
        raise ImageReadError(
            f"{source}: a single DICOM file is read as 2-D frames; for a 3-D volume give the folder of the series"
        )
    ds = _dcmread(source, pydicom)
    try:
        pixels = _dicom_pixels(ds, pydicom)
    except ImageReadError as exc:
        raise ImageReadError(f"{source}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(
            f"{source}: DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc}); "
            "compressed data may need pylibjpeg/pillow/gdcm, or the file is corrupt"
        ) from exc
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames == 1 and pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3 or pixels.shape[0] != frames:
        raise ImageReadError(f"{source}: pixel data of shape {pixels.shape} do not match {frames} frame(s)")
    rows, cols = pixels.shape[1:]
    us_spacing, notes = _ultrasound_spacing(ds, rows, cols, source)
    for note in notes:
        warnings.warn(note, GeometryWarning, stacklevel=3)
    images = []
    for n in range(frames):
        name = source if frames == 1 else f"{source}[frame {n}]"
        spacing, position, orientation = _plane_geometry(ds, n if frames > 1 else None)
        affine, spacing_from = None, "dicom"
        if spacing is not None and position is not None and orientation is not None:
            affine = _lps_affine(spacing, position, orientation)
        elif spacing is None and us_spacing is not None:
            spacing, spacing_from = us_spacing, "ultrasound-region"
        if spacing is None:
            spacing, spacing_from = _default_geometry(2, default_spacing, name), "default"
        group = source if frames > 1 else None
        images.append(Image(_as_float_image(pixels[n], name), tuple(spacing), affine, name, group,
                            None, spacing_from, list(notes)))
    return images


def _dicom_files(folder):
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))
            and _is_dicom_file(os.path.join(folder, n))]


def _read_dicom_series(folder, ndim, default_spacing):
    """A folder of single-frame DICOM slices of one series -> one 3-D image ``(rows, cols, slices)``.

    Slices are ordered by ``ImagePositionPatient . normal`` (normal = row
    direction x column direction); the third spacing is the distance between
    consecutive positions, which must be uniform.
    """
    pydicom = _import_optional("pydicom", "DICOM files")
    source = os.fspath(folder)
    if ndim == 2:
        raise ImageReadError(f"{source}: a DICOM series folder is one 3-D volume, but ndim=2 was asked for; "
                             "list the files instead")
    files = _dicom_files(source)
    if len(files) < 2:
        raise ImageReadError(f"{source}: a DICOM series folder needs at least 2 slice files, found {len(files)}")
    slices, series = [], set()
    for path in files:
        ds = _dcmread(path, pydicom)
        series.add(str(getattr(ds, "SeriesInstanceUID", "")))
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise ImageReadError(f"{path}: multi-frame file inside the series folder {source}; "
                                 "give multi-frame files individually")
        spacing, position, orientation = _plane_geometry(ds)
        if spacing is None or position is None or orientation is None:
            raise ImageReadError(f"{path}: slice without PixelSpacing/ImagePositionPatient/ImageOrientationPatient; "
                                 f"the series in {source} cannot be assembled into a volume")
        try:
            pixels = _dicom_pixels(ds, pydicom)
        except Exception as exc:  # noqa: BLE001
            raise ImageReadError(f"{path}: DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
        slices.append((path, pixels, spacing, position, orientation))
    if len(series) > 1:
        raise ImageReadError(f"{source}: the folder holds {len(series)} DICOM series; put each in its own folder")
    _, first_pixels, first_spacing, _, first_orientation = slices[0]
    for path, pixels, spacing, _, orientation in slices[1:]:
        if pixels.shape != first_pixels.shape:
            raise ImageReadError(f"{path}: slice of shape {pixels.shape} differs from {first_pixels.shape} "
                                 f"({slices[0][0]}) in the series {source}")
        if not np.allclose(spacing, first_spacing, atol=1e-4) or not np.allclose(orientation, first_orientation,
                                                                                  atol=1e-4):
            raise ImageReadError(f"{path}: PixelSpacing or ImageOrientationPatient differs from {slices[0][0]} "
                                 f"in the series {source}")
    normal = np.cross(first_orientation[:3], first_orientation[3:])
    slices.sort(key=lambda s: float(np.dot(s[3], normal)))
    along = np.array([float(np.dot(s[3], normal)) for s in slices])
    steps = np.diff(along)
    if np.min(steps) <= 1e-3:
        k = int(np.argmin(steps))
        raise ImageReadError(
            f"{source}: slices {slices[k][0]} and {slices[k + 1][0]} are at the same position "
            "(several time points or series?); give them as separate files instead"
        )
    if np.max(steps) - np.min(steps) > 1e-2 * np.median(steps) + 1e-3:
        raise ImageReadError(
            f"{source}: non-uniform slice spacing ({np.min(steps):.4g} to {np.max(steps):.4g} mm; missing slices?)"
        )
    step_lps = (slices[-1][3] - slices[0][3]) / (len(slices) - 1)
    affine = _lps_affine(first_spacing, slices[0][3], first_orientation, step_lps)
    volume = np.stack([s[1] for s in slices], axis=-1)
    spacing = (first_spacing[0], first_spacing[1], float(np.linalg.norm(step_lps)))
    return [Image(_as_float_image(volume, source), spacing, affine, source, None, None, "dicom")]


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
    _check_ndim(ndim)
    path = os.fspath(path)
    m = _H5_SPEC.match(path)
    if m and os.path.isfile(m.group("file")):
        return _read_hdf5(m.group("file"), m.group("dataset"), ndim, default_spacing)
    if os.path.isdir(path):
        return _read_dicom_series(path, ndim, default_spacing)
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
    if _is_dicom_file(path):
        return _read_dicom_file(path, ndim, default_spacing)
    raise ImageReadError(f"{path}: unsupported file type (supported: {', '.join(IMAGE_EXTENSIONS)}, "
                         "DICOM files without extension, FILE.h5:/dataset, DICOM series folders)")


def read_labels(path, ndim=None):
    """Read integer label maps (same layout rules as :func:`read_image`).

    Colour images are refused (palette PNGs keep their indices); values must
    be whole numbers.  Returns a list of :class:`Image` whose ``array`` is
    int32.  Raises :class:`ImageReadError` otherwise.
    """
    _check_ndim(ndim)
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


def _attach_labels(images, labels, image_path, label_path):
    """Pair images read from one path with the label maps read from another; checks count and shapes."""
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


def _expand_folder(folder, ndim):
    """Paths to read from a folder, sorted by name: files, DICOM series sub-folders; or the folder itself."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    dirs = [os.path.join(folder, n) for n in names if os.path.isdir(os.path.join(folder, n))]
    dicom = [p for p in files if _is_dicom_file(p)]
    if ndim != 2 and len(dicom) >= 2 and len(dicom) == len(files) and not dirs and _looks_like_series(dicom):
        return [folder]
    out = files + [d for d in dirs if _dicom_files(d)]
    return sorted(out, key=lambda p: os.path.basename(p))


def _looks_like_series(files):
    """Whether DICOM files are single-frame slices of one series at two or more positions (header peek)."""
    try:
        pydicom = _import_optional("pydicom", "DICOM files")
    except ImportError:
        return False
    uids, positions = set(), set()
    for path in files:
        try:
            ds = _dcmread(path, pydicom, stop_before_pixels=True)
        except ImageReadError:
            continue
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            return False
        uids.add(str(getattr(ds, "SeriesInstanceUID", "")))
        _, position, orientation = _plane_geometry(ds)
        if position is None or orientation is None:
            return False
        positions.add(round(float(np.dot(position, np.cross(orientation[:3], orientation[3:]))), 3))
    return len(uids) == 1 and len(positions) >= 2


def _read_list(list_path):
    """``(image, label or None, group or None)`` rows of a .csv/.txt list, paths relative to the list file."""
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
    for path in _expand_folder(labels_folder, 2):
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
        ``(path, reason)`` of each input that could not be read.

    Raises
    ------
    InputError
        Nothing matches ``spec``; nothing readable; 2-D and 3-D images mixed;
        a label map whose shape differs from its image (both files named).
    ImageReadError
        ``spec`` is a single file (or dataset) and it is unreadable.
    """
    _check_ndim(ndim)
    spec = os.fspath(spec)
    labels = None if labels is None else os.fspath(labels)
    h5 = _H5_SPEC.match(spec)
    rows, single = None, False
    if h5 and os.path.isfile(h5.group("file")) or os.path.isfile(spec) and not spec.lower().endswith(LIST_EXTENSIONS):
        rows, single = [(spec, None, None)], True
    elif os.path.isdir(spec):
        paths = _expand_folder(spec, ndim)
        single = paths == [spec]
        rows = [(p, None, None) for p in paths]
        if not rows:
            raise InputError(f"{spec}: the folder holds no files")
    elif os.path.isfile(spec):
        rows = _read_list(spec)
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
        if not single and os.path.isfile(path) and not _is_image_file(path) and not _H5_SPEC.match(path):
            skipped.append((path, "not an image file (unsupported extension)"))
            continue
        try:
            images = read_image(path, ndim, default_spacing)
        except ImageReadError as exc:
            if single:
                raise
            skipped.append((path, str(exc)))
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
            entries.extend(_attach_labels(images, read_labels(label_path, ndim), path, label_path))

    if not entries:
        detail = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        raise InputError(f"{spec}: no readable image ({len(skipped)} skipped: {detail})")
    dims = {}
    for entry in entries:
        dims.setdefault(entry.image.ndim, entry.image.source)
    if len(dims) > 1:
        raise InputError(f"{spec}: 2-D and 3-D images are mixed (e.g. {dims[2]} is 2-D, {dims[3]} is 3-D); "
                         "use one kind, or pass ndim=2 to read volumes as stacks of slices")
    if missing:
        warnings.warn(f"{len(missing)} image(s) have no label map in {labels} (e.g. {missing[0]})", stacklevel=2)
    return entries, skipped
