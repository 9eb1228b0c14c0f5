"""DICOM images (pydicom): pixels, patient geometry, ultrasound spacing, files and series.

``pydicom`` is an optional dependency (``pip install -e .[medical]``), imported
only when a DICOM file is read.  :func:`dirnet_tf.readers.read_image` reads
DICOM through this module; ``data.sunnybrook`` builds on its pixel and
geometry functions.

Conventions
-----------
* Pixels: grey float (colour converted with
  :data:`dirnet_tf.readers.LUMA_WEIGHTS`), ``RescaleSlope`` /
  ``RescaleIntercept`` applied, MONOCHROME1 negated so that bright = high.
  Arrays are ``(rows, cols)``: axis ``i`` = row, ``j`` = column; a series
  volume adds ``k`` = slice, sorted along the slice normal (never by file name
  or InstanceNumber).
* Spacing: mm per array axis, ``(row spacing, column spacing[, slice step])``
  from PixelSpacing (``PixelSpacing[0]`` is the distance between rows) and the
  slice positions, or, for ultrasound, from SequenceOfUltrasoundRegions.
* Affine: 4x4, array indices ``(i, j, k, 1)`` -> world mm in **RAS+**;
  DICOM's patient coordinates are LPS+ and are converted with
  :data:`LPS_TO_RAS` (``diag(-1, -1, 1)``).
"""

import os
import warnings

import numpy as np

from dirnet_tf.readers import (
    DICOM_EXTENSIONS,
    GeometryWarning,
    Image,
    ImageReadError,
    as_float_image,
    default_spacing_tuple,
    import_optional,
    rgb_to_grey,
)

__all__ = [
    "LPS_TO_RAS", "import_pydicom", "is_dicom_file", "list_dicom_files", "read_dataset", "grey_pixels",
    "plane_geometry", "plane_affine", "ultrasound_spacing", "read_dicom_file", "read_dicom_series",
    "is_single_series",
]

#: DICOM LPS+ -> RAS+ (applied on the left of an LPS affine).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Largest down-sampling factor tried when an ultrasound region lies outside the image.
_MAX_REGION_FACTOR = 16


def import_pydicom():
    """The ``pydicom`` module; ImportError saying how to install it when it is missing."""
    return import_optional("pydicom", "DICOM files")


def _has_dicom_magic(path):
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_file(path):
    """Whether ``path`` is a DICOM file: a DICOM extension, or no extension and the ``DICM`` magic (not DICOMDIR)."""
    lower = os.path.basename(os.fspath(path)).lower()
    if lower.endswith(DICOM_EXTENSIONS):
        return True
    return "." not in lower and lower != "dicomdir" and _has_dicom_magic(path)


def list_dicom_files(folder):
    """The DICOM files directly in ``folder`` (no hidden files), sorted by name."""
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))
            and is_dicom_file(os.path.join(folder, n))]



def grey_pixels(ds):
    """Pixel data of a dataset as grey float64: ``(rows, cols)`` or ``(frames, rows, cols)``.

    Colour (3 samples per pixel) is converted to grey, the modality rescale
    (``RescaleSlope``, ``RescaleIntercept``) is applied and MONOCHROME1 data
    are negated.  Raises :class:`~dirnet_tf.readers.ImageReadError` for other
    numbers of samples per pixel, and pydicom's own errors when the pixel data
    cannot be decoded.
    """
    pydicom = import_pydicom()
    array = ds.pixel_array
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    if samples == 3:
        if photometric.startswith("YBR") and int(pydicom.__version__.split(".")[0]) < 3:
            # pydicom < 3 does not convert uncompressed YBR data; its luma channel is the grey value.
            if not ds.file_meta.TransferSyntaxUID.is_compressed:
                return np.asarray(array[..., 0], dtype=np.float64)
        array = rgb_to_grey(array)
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


def plane_geometry(ds, frame=None):
    """Geometry of one image plane: ``(spacing, position, orientation)``, each None where absent or invalid.

    ``spacing`` = PixelSpacing ``(row, column)`` mm (positive), ``position`` =
    ImagePositionPatient (LPS mm, float array of 3), ``orientation`` =
    ImageOrientationPatient (float array of 6: the direction of a row, then
    of a column).  ``frame`` (0-based) looks in the per-frame, then the shared
    functional groups of an enhanced multi-frame file first.
    """
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


def plane_affine(spacing, position, orientation, slice_step=None):
    """4x4 RAS+ affine of a DICOM plane: array index (row i, column j, slice k) -> world mm.

    ``spacing`` is PixelSpacing ``(row, column)`` mm, ``position`` and
    ``orientation`` are ImagePositionPatient / ImageOrientationPatient (LPS).

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


def ultrasound_spacing(ds, rows, cols, source):
    """Pixel spacing ``(row, column)`` mm from SequenceOfUltrasoundRegions, and notes; ``(None, [])`` if absent.

    ``rows`` x ``cols`` is the size of the image (pixels); ``source`` names it
    in the notes.

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


def read_dataset(path, stop_before_pixels=False):
    """The pydicom dataset of one file (a file without the 128-byte preamble is parsed leniently).

    Raises :class:`~dirnet_tf.readers.ImageReadError` naming the file when it
    is not a readable DICOM file or (unless ``stop_before_pixels``) has no
    pixel data.
    """
    pydicom = import_pydicom()
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


def read_dicom_file(path, ndim=None, default_spacing=None):
    """One DICOM file -> a list of :class:`~dirnet_tf.readers.Image`, one 2-D image per frame.

    All frames of a multi-frame file form one group (the file's path).
    ``ndim=3`` is refused (a volume is a series folder, :func:`read_dicom_series`);
    ``default_spacing`` (mm) is used when the file has neither PixelSpacing nor
    an ultrasound region.
    """
    import_pydicom()
    source = os.fspath(path)
    if ndim == 3:
        raise ImageReadError(
            f"{source}: a single DICOM file is read as 2-D frames; for a 3-D volume give the folder of the series"
        )
    ds = read_dataset(source)
    try:
        pixels = grey_pixels(ds)
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
    us_spacing, notes = ultrasound_spacing(ds, rows, cols, source)
    for note in notes:
        warnings.warn(note, GeometryWarning, stacklevel=3)
    images = []
    for n in range(frames):
        name = source if frames == 1 else f"{source}[frame {n}]"
        spacing, position, orientation = plane_geometry(ds, n if frames > 1 else None)
        affine, spacing_from = None, "dicom"
        if spacing is not None and position is not None and orientation is not None:
            affine = plane_affine(spacing, position, orientation)
        elif spacing is None and us_spacing is not None:
            spacing, spacing_from = us_spacing, "ultrasound-region"
        if spacing is None:
            spacing, spacing_from = default_spacing_tuple(2, default_spacing, name), "default"
        group = source if frames > 1 else None
        images.append(Image(as_float_image(pixels[n], name), tuple(spacing), affine, name, group,
                            None, spacing_from, list(notes)))
    return images


def read_dicom_series(folder, ndim=None, default_spacing=None):
    """A folder of single-frame DICOM slices of one series -> ``[Image]``, one 3-D image ``(rows, cols, slices)``.

    Slices are ordered by ``ImagePositionPatient . normal`` (normal = row
    direction x column direction); the third spacing is the distance between
    consecutive positions, which must be uniform.  ``default_spacing`` is
    not used (a series always has its own spacing); it is accepted like every
    reader's.  ``ndim=2`` is refused.
    """
    import_pydicom()
    source = os.fspath(folder)
    if ndim == 2:
        raise ImageReadError(f"{source}: a DICOM series folder is one 3-D volume, but ndim=2 was asked for; "
                             "list the files instead")
    files = list_dicom_files(source)
    if len(files) < 2:
        raise ImageReadError(f"{source}: a DICOM series folder needs at least 2 slice files, found {len(files)}")
    slices, series = [], set()
    for path in files:
        ds = read_dataset(path)
        series.add(str(getattr(ds, "SeriesInstanceUID", "")))
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise ImageReadError(f"{path}: multi-frame file inside the series folder {source}; "
                                 "give multi-frame files individually")
        spacing, position, orientation = plane_geometry(ds)
        if spacing is None or position is None or orientation is None:
            raise ImageReadError(f"{path}: slice without PixelSpacing/ImagePositionPatient/ImageOrientationPatient; "
                                 f"the series in {source} cannot be assembled into a volume")
        try:
            pixels = grey_pixels(ds)
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
    affine = plane_affine(first_spacing, slices[0][3], first_orientation, step_lps)
    volume = np.stack([s[1] for s in slices], axis=-1)
    spacing = (first_spacing[0], first_spacing[1], float(np.linalg.norm(step_lps)))
    return [Image(as_float_image(volume, source), spacing, affine, source, None, None, "dicom")]


def is_single_series(files):
    """Whether DICOM files are single-frame slices of one series at two or more positions (header peek).

    False as well when pydicom is missing or a file lacks the plane geometry.
    """
    try:
        import_pydicom()
    except ImportError:
        return False
    uids, positions = set(), set()
    for path in files:
        try:
            ds = read_dataset(path, stop_before_pixels=True)
        except ImageReadError:
            continue
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            return False
        uids.add(str(getattr(ds, "SeriesInstanceUID", "")))
        _, position, orientation = plane_geometry(ds)
        if position is None or orientation is None:
            return False
        positions.add(round(float(np.dot(position, np.cross(orientation[:3], orientation[3:]))), 3))
    return len(uids) == 1 and len(positions) >= 2
