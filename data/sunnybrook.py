"""Sunnybrook Cardiac Data (2009 LV segmentation challenge) -> HDF5.

Reads the dataset as it is distributed -- per-patient folders (``SC-HF-I-01``;
image folders may drop the leading zero, ``SC-HF-I-1``) of DICOM images
``IM-SSSS-NNNN.dcm`` (``SSSS`` = that patient's short-axis cine series,
``NNNN`` = image number), expert contours in
``<patient>/contours-manual/IRCCI-expert/IM-0001-NNNN-{i,o}contour-manual.txt``
(one ``x y`` point per line, x = column, y = row) -- and writes one HDF5 file::

    python -m data.sunnybrook --raw_dir=DIR --out=FILE.h5

Processing, per patient: images of the cine series are grouped by slice
location (position along the slice normal) and cardiac phase (trigger time);
contours are converted to ij (row, column) and rasterised into label maps
(0 background, 1 LV cavity = inside the endocardium, 2 myocardium = between
endocardium and epicardium); everything is resampled to a common pixel
spacing, cropped to a fixed size around the left ventricle and intensities are
normalised per slice (1st/99th percentile -> [0, 1]).

HDF5 layout (shared with :mod:`data.cardiac_phantom`, read back with
:func:`load_h5`)::

    /                     attrs: format, spacing_mm, crop_size, label_names, source, ...
    /<patient>/images     float32 [S, T, H, W] in [0, 1]
    /<patient>/labels     uint8   [S, T, H, W] (0 bg, 1 cavity, 2 myocardium)
    /<patient>/annotated  bool    [S, T, 2]    (endocardium, epicardium drawn)
    /<patient>/ed_phase, es_phase   int32 [S] (-1: not annotated)
    /<patient>/slice_locations      float32 [S] (mm)
    /<patient>/trigger_times        float32 [S, T] (ms)
    /<patient>/source_files         str [S, T] (DICOM paths relative to raw_dir)
    /<patient>            attrs: group, split, series, native_spacing_mm, crop_origin, ...
    /splits/{train,valid,test}      str [n] patient names

Patients are split by patient, never by slice: by default the challenge's own
groups (training -> train, validation -> valid, online -> test); with
``--split=random`` a seeded random split.

A partial dataset still converts: unreadable DICOM files, contours that do not
match an image, images of an inconsistent size and patients without data are
skipped with a message naming the file, and the summary lists them.

``pydicom`` is an optional dependency (``pip install -e .[medical]``); it is
imported only when DICOM files are read.
"""

import dataclasses
import json
import os
import re
import sys
from collections import Counter

import numpy as np

FORMAT = "dirnet-tf-cardiac-v1"
LABEL_NAMES = ("background", "lv_cavity", "myocardium")
GROUP_TO_SPLIT = {"training": "train", "validation": "valid", "online": "test"}
SPLITS = ("train", "valid", "test")

# Default patient -> (challenge group, short-axis cine series number) table.
#
# Source: the series numbers used by the public Sunnybrook preprocessing
# scripts of the 2015 Kaggle Data Science Bowl LV tutorial (training group)
# and by public scripts that extended it to all 45 patients, with the groups
# given by the contour archives (ContoursPart3 = TrainingDataContours,
# ContoursPart2 = ValidationDataContours, ContoursPart1 = OnlineDataContours).
# These are not part of an official document of the data set.  SC-N-06 is
# published with two different numbers (0981 and 0984): both are listed and the
# one present on disk is used.  Anything here can be overridden with
# ``--series_json``; a patient folder that is not in the table gets its series
# detected automatically (the series that contains the contoured image numbers
# and the most images).
DEFAULT_SERIES = {
    # challenge training (contours: TrainingDataContours)
    "SC-HF-I-01": ("training", ("0004",)),
    "SC-HF-I-02": ("training", ("0106",)),
    "SC-HF-I-04": ("training", ("0116",)),
    "SC-HF-I-40": ("training", ("0134",)),
    "SC-HF-NI-03": ("training", ("0379",)),
    "SC-HF-NI-04": ("training", ("0501",)),
    "SC-HF-NI-34": ("training", ("0446",)),
    "SC-HF-NI-36": ("training", ("0474",)),
    "SC-HYP-01": ("training", ("0550",)),
    "SC-HYP-03": ("training", ("0650",)),
    "SC-HYP-38": ("training", ("0734",)),
    "SC-HYP-40": ("training", ("0755",)),
    "SC-N-02": ("training", ("0898",)),
    "SC-N-03": ("training", ("0915",)),
    "SC-N-40": ("training", ("0944",)),
    # challenge validation (contours: ValidationDataContours)
    "SC-HF-I-05": ("validation", ("0156",)),
    "SC-HF-I-06": ("validation", ("0180",)),
    "SC-HF-I-07": ("validation", ("0209",)),
    "SC-HF-I-08": ("validation", ("0226",)),
    "SC-HF-NI-07": ("validation", ("0523",)),
    "SC-HF-NI-11": ("validation", ("0270",)),
    "SC-HF-NI-31": ("validation", ("0401",)),
    "SC-HF-NI-33": ("validation", ("0424",)),
    "SC-HYP-06": ("validation", ("0767",)),
    "SC-HYP-07": ("validation", ("0007",)),
    "SC-HYP-08": ("validation", ("0796",)),
    "SC-HYP-37": ("validation", ("0702",)),
    "SC-N-05": ("validation", ("0963",)),
    "SC-N-06": ("validation", ("0981", "0984")),
    "SC-N-07": ("validation", ("1009",)),
    # challenge online (contours: OnlineDataContours)
    "SC-HF-I-09": ("online", ("0241",)),
    "SC-HF-I-10": ("online", ("0024",)),
    "SC-HF-I-11": ("online", ("0043",)),
    "SC-HF-I-12": ("online", ("0062",)),
    "SC-HF-NI-12": ("online", ("0286",)),
    "SC-HF-NI-13": ("online", ("0304",)),
    "SC-HF-NI-14": ("online", ("0331",)),
    "SC-HF-NI-15": ("online", ("0359",)),
    "SC-HYP-09": ("online", ("0003",)),
    "SC-HYP-10": ("online", ("0579",)),
    "SC-HYP-11": ("online", ("0601",)),
    "SC-HYP-12": ("online", ("0629",)),
    "SC-N-09": ("online", ("1031",)),
    "SC-N-10": ("online", ("0851",)),
    "SC-N-11": ("online", ("0878",)),
}

_PATIENT_RE = re.compile(r"^SC-(HF-I|HF-NI|HYP|N)-0*(\d+)$", re.IGNORECASE)
_IMAGE_RE = re.compile(r"^IM-(\d{4})-(\d{4})\.dcm$", re.IGNORECASE)
_CONTOUR_RE = re.compile(r"^IM-0001-(\d{4})-([io])contour-manual\.txt$", re.IGNORECASE)
_CONTOUR_SUBDIR = os.path.join("contours-manual", "IRCCI-expert")


class SunnybrookError(ValueError):
    """A problem with one input file or folder (the message names it)."""


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #


def _import_pydicom():
    try:
        import pydicom  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:
        raise ImportError(
            "Reading the Sunnybrook DICOM files needs pydicom, an optional extra of dirnet-tf: "
            "run `pip install -e .[medical]` (or `pip install pydicom`)."
        ) from exc
    return pydicom


def normalize_patient_id(name):
    """Canonical patient id: ``SC-HF-I-1`` / ``sc-hf-i-01`` -> ``SC-HF-I-01``.

    Parameters
    ----------
    name : str, a folder name or table key.

    Returns
    -------
    The canonical id (two-digit number), or None if ``name`` is not a
    Sunnybrook patient id.
    """
    match = _PATIENT_RE.match(os.path.basename(str(name).rstrip("/\\")))
    if not match:
        return None
    return f"SC-{match.group(1).upper()}-{int(match.group(2)):02d}"


@dataclasses.dataclass
class PatientSpec:
    """Where one patient's data lives and how to read it."""

    patient: str
    group: str = None
    series: tuple = ()
    image_dir: str = None
    contour_dir: str = None


def load_series_table(series_json=None):
    """The patient table: :data:`DEFAULT_SERIES`, overridden by a JSON file.

    Parameters
    ----------
    series_json : optional path of a JSON object mapping patient ids (any
        spelling accepted by :func:`normalize_patient_id`) either to a series
        number string (``"0004"``) or to an object with any of the keys
        ``series`` (string or list of candidate strings), ``group``
        (``training``/``validation``/``online``), ``image_dir`` and
        ``contour_dir`` (folders relative to ``--raw_dir``, or absolute).

    Returns
    -------
    dict canonical patient id -> :class:`PatientSpec`.
    """
    table = {
        pid: PatientSpec(pid, group=group, series=tuple(series))
        for pid, (group, series) in DEFAULT_SERIES.items()
    }
    if not series_json:
        return table
    try:
        with open(series_json, encoding="utf-8") as f:
            overrides = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SunnybrookError(f"Cannot read the series table {series_json}: {exc}") from exc
    if not isinstance(overrides, dict):
        raise SunnybrookError(f"{series_json}: expected a JSON object patient -> series, got {type(overrides).__name__}")
    for key, value in overrides.items():
        pid = normalize_patient_id(key)
        if pid is None:
            raise SunnybrookError(f"{series_json}: {key!r} is not a Sunnybrook patient id (like SC-HF-I-01)")
        spec = table.get(pid, PatientSpec(pid))
        if isinstance(value, (str, int)):
            value = {"series": value}
        if not isinstance(value, dict):
            raise SunnybrookError(f"{series_json}: entry {key!r} must be a string or an object, got {value!r}")
        unknown = set(value) - {"series", "group", "image_dir", "contour_dir"}
        if unknown:
            raise SunnybrookError(f"{series_json}: entry {key!r} has unknown keys {sorted(unknown)}")
        if "series" in value:
            series = value["series"]
            series = [series] if isinstance(series, (str, int)) else list(series)
            spec.series = tuple(f"{int(s):04d}" for s in series)
        if "group" in value:
            if value["group"] not in GROUP_TO_SPLIT:
                raise SunnybrookError(
                    f"{series_json}: entry {key!r} has group {value['group']!r}; "
                    f"expected one of {sorted(GROUP_TO_SPLIT)}"
                )
            spec.group = value["group"]
        for field in ("image_dir", "contour_dir"):
            if field in value:
                setattr(spec, field, value[field])
        table[pid] = spec
    return table


def read_contour(path):
    """Read one contour text file and return its points in ij order.

    Parameters
    ----------
    path : file with one ``x y`` point per line (x = column, y = row, pixels).

    Returns
    -------
    float64 array ``[N, 2]`` of (row, column) = (y, x) points.

    Raises
    ------
    SunnybrookError naming the file (and line) when it cannot be read or has
    fewer than 3 points.
    """
    points = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    if len(parts) != 2:
                        raise ValueError
                    x, y = float(parts[0]), float(parts[1])
                except ValueError:
                    raise SunnybrookError(
                        f"{path}, line {lineno}: expected two numbers 'x y', got {line.strip()!r}"
                    ) from None
                if not (np.isfinite(x) and np.isfinite(y)):
                    raise SunnybrookError(f"{path}, line {lineno}: non-finite coordinate {line.strip()!r}")
                points.append((y, x))
    except OSError as exc:
        raise SunnybrookError(f"Cannot read contour file {path}: {exc}") from exc
    if len(points) < 3:
        raise SunnybrookError(f"{path}: a contour needs at least 3 points, found {len(points)}")
    return np.asarray(points, dtype=np.float64)


def rasterize_polygon(points_ij, shape):
    """Fill a polygon on a pixel grid.

    Pixel ``(i, j)`` is set when its centre, the point ``(i, j)``, lies inside
    the closed polygon (even-odd rule; the polygon is closed automatically).

    Parameters
    ----------
    points_ij : array ``[N, 2]`` of (row, column) vertices, in pixels of the
        target grid.
    shape : ``(H, W)`` of the output.

    Returns
    -------
    bool array ``[H, W]``.
    """
    from matplotlib.path import Path  # noqa: PLC0415 - keeps import of this module light

    points_ij = np.asarray(points_ij, dtype=np.float64)
    if points_ij.ndim != 2 or points_ij.shape[1] != 2 or len(points_ij) < 3:
        raise ValueError(f"points_ij must be [N >= 3, 2], got shape {points_ij.shape}")
    height, width = shape
    mask = np.zeros((height, width), dtype=bool)
    lo = np.maximum(np.floor(points_ij.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(points_ij.max(axis=0)).astype(int), [height - 1, width - 1])
    if np.any(hi < lo):
        return mask
    ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    centres = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(np.float64)
    inside = Path(points_ij, closed=False).contains_points(centres)
    mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1] = inside.reshape(ii.shape)
    return mask


# --------------------------------------------------------------------------- #
# Discovery
# --------------------------------------------------------------------------- #


def _resolve(raw_dir, path):
    return path if os.path.isabs(path) else os.path.join(raw_dir, path)


def discover(raw_dir, table):
    """Find every patient's image folder and contour folder under ``raw_dir``.

    A folder named like a patient (``SC-HF-I-1`` or ``SC-HF-I-01``) that holds
    ``IM-SSSS-NNNN.dcm`` files is an image folder; one that holds
    ``contours-manual/IRCCI-expert`` is a contour folder (the two may be the
    same folder).  Folders given in the table take precedence.

    Parameters
    ----------
    raw_dir : root of the unpacked data set.
    table : dict from :func:`load_series_table`.

    Returns
    -------
    dict canonical patient id -> :class:`PatientSpec` with folders filled in
    (``None`` where nothing was found), sorted by id.
    """
    if not os.path.isdir(raw_dir):
        raise SunnybrookError(f"--raw_dir {raw_dir} is not a folder")
    found_images, found_contours = {}, {}
    for root, dirs, files in os.walk(raw_dir):
        dirs.sort()
        pid = normalize_patient_id(os.path.basename(root))
        if pid is None:
            continue
        if any(_IMAGE_RE.match(f) for f in files):
            found_images.setdefault(pid, root)
        if os.path.isdir(os.path.join(root, _CONTOUR_SUBDIR)):
            found_contours.setdefault(pid, os.path.join(root, _CONTOUR_SUBDIR))
        # DICOMs may sit in a sub-folder of the patient folder.
        if pid not in found_images:
            for sub_root, _, sub_files in os.walk(root):
                if any(_IMAGE_RE.match(f) for f in sub_files):
                    found_images[pid] = sub_root
                    break
    patients = {}
    for pid in sorted(set(found_images) | set(found_contours) | {p for p, s in table.items() if s.image_dir}):
        spec = dataclasses.replace(table.get(pid, PatientSpec(pid)))
        spec.image_dir = _resolve(raw_dir, spec.image_dir) if spec.image_dir else found_images.get(pid)
        spec.contour_dir = _resolve(raw_dir, spec.contour_dir) if spec.contour_dir else found_contours.get(pid)
        patients[pid] = spec
    return patients


# --------------------------------------------------------------------------- #
# Reading one patient
# --------------------------------------------------------------------------- #


class Report:
    """Collects what was converted and what was skipped (with reasons)."""

    def __init__(self, verbose=True):
        self.skipped = []  # (path, reason)
        self.notes = []  # (path, remark): nothing was dropped
        self.converted = []
        self.verbose = verbose

    def skip(self, path, reason):
        self.skipped.append((str(path), str(reason)))
        if self.verbose:
            print(f"[sunnybrook] skipped {path}: {reason}", file=sys.stderr)

    def note(self, path, remark):
        self.notes.append((str(path), str(remark)))
        if self.verbose:
            print(f"[sunnybrook] note on {path}: {remark}", file=sys.stderr)

    def summary(self):
        lines = [f"converted {len(self.converted)} patient(s): {', '.join(self.converted) or '-'}"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} item(s):")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        if self.notes:
            lines.append(f"{len(self.notes)} note(s):")
            lines += [f"  {path}: {remark}" for path, remark in self.notes]
        return "\n".join(lines)


def _image_files(image_dir):
    """``{series: {number: filename}}`` of the IM-SSSS-NNNN.dcm files in a folder."""
    by_series = {}
    for name in sorted(os.listdir(image_dir)):
        match = _IMAGE_RE.match(name)
        if match:
            by_series.setdefault(match.group(1), {})[int(match.group(2))] = name
    return by_series


def _contour_files(contour_dir):
    """``{number: {"i": path, "o": path}}`` of the contour files in a folder."""
    contours = {}
    if contour_dir and os.path.isdir(contour_dir):
        for name in sorted(os.listdir(contour_dir)):
            match = _CONTOUR_RE.match(name)
            if match:
                contours.setdefault(int(match.group(1)), {})[match.group(2).lower()] = os.path.join(contour_dir, name)
    return contours


def choose_series(spec, by_series, contour_numbers):
    """Pick the cine series of a patient.

    The table's candidates that exist on disk come first; without one, the
    series that contains the most contoured image numbers, then the most
    images, is used.

    Returns
    -------
    ``(series, how)`` with ``how`` in ``{"table", "detected"}``; ``(None, reason)``
    when the folder has no series at all.
    """
    for candidate in spec.series:
        if candidate in by_series:
            return candidate, "table"
    if not by_series:
        return None, "no IM-SSSS-NNNN.dcm files"

    def score(series):
        numbers = by_series[series]
        return (sum(n in numbers for n in contour_numbers), len(numbers), series)

    return max(by_series, key=score), "detected"


def _read_dicom(path):
    """Pixels, spacing, slice position and trigger time of one DICOM file."""
    pydicom = _import_pydicom()
    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
        raise SunnybrookError(f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise SunnybrookError(f"expected a single 2-D frame, got pixel array of shape {pixels.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    spacing = getattr(ds, "PixelSpacing", None)
    if spacing is None or len(spacing) != 2:
        raise SunnybrookError("no PixelSpacing")
    spacing = (float(spacing[0]), float(spacing[1]))
    if min(spacing) <= 0:
        raise SunnybrookError(f"invalid PixelSpacing {spacing}")
    position = None
    ipp, iop = getattr(ds, "ImagePositionPatient", None), getattr(ds, "ImageOrientationPatient", None)
    if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        position = float(np.dot(np.asarray(ipp, float), normal))
    elif getattr(ds, "SliceLocation", None) is not None:
        position = float(ds.SliceLocation)
    if position is None:
        raise SunnybrookError("neither ImagePositionPatient/ImageOrientationPatient nor SliceLocation")
    trigger = getattr(ds, "TriggerTime", None)
    trigger = float(trigger) if trigger not in (None, "") else None
    return pixels, spacing, position, trigger


def _cluster(values, tolerance):
    """Group sorted-unique values closer than ``tolerance``; returns a label per value."""
    order = np.argsort(values)
    labels = np.empty(len(values), dtype=int)
    current, last = -1, None
    for idx in order:
        if last is None or values[idx] - last > tolerance:
            current += 1
        labels[idx] = current
        last = values[idx]
    return labels


def read_cine(image_dir, files, report, slice_tolerance=0.5):
    """Read a cine series and arrange it as ``[slices, phases]``.

    Parameters
    ----------
    image_dir : folder of the files.
    files : ``{image number: file name}`` of the series.
    report : :class:`Report` for skipped files.
    slice_tolerance : positions closer than this (mm) are the same slice.

    Returns
    -------
    dict with ``pixels`` float32 ``[S, T, H, W]``, ``numbers`` int ``[S, T]``,
    ``slice_locations`` ``[S]``, ``trigger_times`` ``[S, T]``, ``spacing``
    (row, column) mm, ``files`` ``[S, T]``; or None when nothing usable is left.
    """
    frames = []
    for number, name in sorted(files.items()):
        path = os.path.join(image_dir, name)
        try:
            pixels, spacing, position, trigger = _read_dicom(path)
        except SunnybrookError as exc:
            report.skip(path, exc)
            continue
        frames.append(dict(number=number, path=path, pixels=pixels, spacing=spacing,
                           position=position, trigger=trigger))
    if not frames:
        return None
    # Inconsistent sizes / spacings: the most common geometry wins.
    geometry = Counter((f["pixels"].shape, f["spacing"]) for f in frames)
    (shape, spacing), _ = geometry.most_common(1)[0]
    kept = []
    for f in frames:
        if (f["pixels"].shape, f["spacing"]) != (shape, spacing):
            report.skip(f["path"], f"inconsistent size/spacing {f['pixels'].shape} {f['spacing']} mm; "
                                   f"the rest of the series is {shape} {spacing} mm")
        else:
            kept.append(f)
    frames = kept
    positions = np.array([f["position"] for f in frames])
    slice_ids = _cluster(positions, slice_tolerance)
    slices = []
    for s in range(slice_ids.max() + 1):
        members = [f for f, sid in zip(frames, slice_ids) if sid == s]
        members.sort(key=lambda f: (f["trigger"] if f["trigger"] is not None else -1.0, f["number"]))
        slices.append(members)
    counts = Counter(len(m) for m in slices)
    n_phases = max(counts, key=lambda c: (counts[c], c))
    good = []
    for members in slices:
        if len(members) != n_phases:
            report.skip(f"{image_dir} slice at {members[0]['position']:.2f} mm",
                        f"{len(members)} phases where the other slices have {n_phases} (images "
                        f"{', '.join(os.path.basename(m['path']) for m in members[:4])}...)")
        else:
            good.append(members)
    if not good:
        return None
    return dict(
        pixels=np.stack([np.stack([m["pixels"] for m in members]) for members in good]),
        numbers=np.array([[m["number"] for m in members] for members in good]),
        slice_locations=np.array([float(np.mean([m["position"] for m in members])) for members in good]),
        trigger_times=np.array([[m["trigger"] if m["trigger"] is not None else np.nan for m in members]
                                for members in good]),
        spacing=spacing,
        files=[[m["path"] for m in members] for members in good],
    )


def _resample_crop(image, scale, origin, size):
    """Sample ``image`` at native coordinates ``(origin + k) * scale`` (k = 0..size-1), linear."""
    from scipy import ndimage  # noqa: PLC0415

    ii = (origin[0] + np.arange(size)) * scale[0]
    jj = (origin[1] + np.arange(size)) * scale[1]
    grid = np.stack(np.meshgrid(ii, jj, indexing="ij"))
    return ndimage.map_coordinates(image, grid, order=1, mode="constant", cval=0.0)


def _normalise(sequence, valid):
    """Map the 1st..99th percentile of the in-FOV pixels of a sequence to [0, 1]."""
    values = sequence[valid] if np.any(valid) else sequence.ravel()
    lo, hi = np.percentile(values, [1.0, 99.0])
    if hi - lo < 1e-6:
        return np.zeros_like(sequence, dtype=np.float32)
    return np.clip((sequence - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def convert_patient(spec, raw_dir, report, spacing=1.5, crop_size=128):
    """Read, rasterise, resample, crop and normalise one patient.

    Parameters
    ----------
    spec : :class:`PatientSpec` with folders (from :func:`discover`).
    raw_dir : data root (for relative provenance paths).
    report : :class:`Report`.
    spacing : output pixel spacing in mm (both axes).
    crop_size : output size in pixels (square), centred on the LV.

    Returns
    -------
    dict of arrays and attributes for :func:`write_h5`, or None when the
    patient has no usable images (the reason is in ``report``).
    """
    pid = spec.patient
    if not spec.image_dir or not os.path.isdir(spec.image_dir):
        report.skip(spec.image_dir or f"{raw_dir}/{pid}", f"{pid}: no image folder found")
        return None
    contours = _contour_files(spec.contour_dir)
    by_series = _image_files(spec.image_dir)
    series, how = choose_series(spec, by_series, set(contours))
    if series is None:
        report.skip(spec.image_dir, f"{pid}: {how}")
        return None
    if how == "detected" and spec.series:
        report.note(spec.image_dir, f"{pid}: series {'/'.join(spec.series)} from the table is not there; "
                                    f"using the detected series {series}")
    cine = read_cine(spec.image_dir, by_series[series], report)
    if cine is None:
        report.skip(spec.image_dir, f"{pid}: no readable images in series {series}")
        return None
    n_slices, n_phases, height, width = cine["pixels"].shape
    native = np.asarray(cine["spacing"], dtype=np.float64)
    scale = spacing / native  # new pixel -> native pixel

    # Contours -> (slice, phase) in native ij coordinates.
    where = {int(n): (s, t) for (s, t), n in np.ndenumerate(cine["numbers"])}
    polygons = {}
    if not contours:
        report.skip(spec.contour_dir or spec.image_dir, f"{pid}: no contour files (images kept, unlabelled)")
    for number, kinds in sorted(contours.items()):
        for kind, path in sorted(kinds.items()):
            if number not in where:
                report.skip(path, f"image IM-{series}-{number:04d}.dcm is not in the converted series "
                                  f"(missing, unreadable or in a dropped slice) in {spec.image_dir}")
                continue
            try:
                points = read_contour(path)
            except SunnybrookError as exc:
                report.skip(path, exc)
                continue
            if (points.min() < -0.5 * max(height, width)) or (points[:, 0].max() > 1.5 * height) or (
                    points[:, 1].max() > 1.5 * width):
                report.skip(path, f"contour points far outside the {height}x{width} image")
                continue
            polygons[(where[number], kind)] = points
        if number in where and "o" in kinds and "i" not in kinds:
            report.skip(kinds["o"], "epicardium without endocardium: myocardium cannot be labelled")

    # Crop centre: mean LV centre (in output pixels) over the annotated frames.
    centres = [pts.mean(axis=0) / scale for (_, kind), pts in polygons.items() if kind == "i"]
    if centres:
        centre = np.mean(centres, axis=0)
    else:
        centre = (np.array([height, width]) - 1) / 2.0 / scale
    origin = np.round(centre - (crop_size - 1) / 2.0).astype(int)

    images = np.zeros((n_slices, n_phases, crop_size, crop_size), np.float32)
    labels = np.zeros_like(images, dtype=np.uint8)
    annotated = np.zeros((n_slices, n_phases, 2), bool)
    ones = np.ones((height, width), np.float32)
    for s in range(n_slices):
        seq = np.stack([_resample_crop(cine["pixels"][s, t], scale, origin, crop_size) for t in range(n_phases)])
        valid = _resample_crop(ones, scale, origin, crop_size) > 0.999
        images[s] = _normalise(seq, np.broadcast_to(valid, seq.shape))
    for ((s, t), kind), points in polygons.items():
        if kind == "o" and ((s, t), "i") not in polygons:
            continue
        mask = rasterize_polygon(points / scale - origin, (crop_size, crop_size))
        if kind == "i":
            labels[s, t][mask] = 1
            annotated[s, t, 0] = True
        else:
            labels[s, t][mask & (labels[s, t] != 1)] = 2
            annotated[s, t, 1] = True
    # Endocardium drawn after epicardium must win inside the cavity.
    for ((s, t), kind), points in polygons.items():
        if kind == "i":
            labels[s, t][rasterize_polygon(points / scale - origin, (crop_size, crop_size))] = 1

    ed_phase, es_phase = find_ed_es(labels, annotated)
    rel = [[os.path.relpath(p, raw_dir) for p in row] for row in cine["files"]]
    return dict(
        images=images, labels=labels, annotated=annotated, ed_phase=ed_phase, es_phase=es_phase,
        slice_locations=cine["slice_locations"].astype(np.float32),
        trigger_times=cine["trigger_times"].astype(np.float32), source_files=np.array(rel, dtype=object),
        attrs=dict(group=spec.group or "", series=series, series_from=how,
                   native_spacing_mm=native.tolist(), native_shape=[height, width],
                   crop_origin=origin.tolist(), spacing_mm=[spacing, spacing],
                   image_dir=os.path.relpath(spec.image_dir, raw_dir),
                   contour_dir=os.path.relpath(spec.contour_dir, raw_dir) if spec.contour_dir else "",
                   n_contours=len(polygons)),
    )


def find_ed_es(labels, annotated):
    """End-diastole / end-systole phase per slice from the annotated cavities.

    Among the phases of a slice with an endocardium, ED is the one with the
    largest cavity and ES the one with the smallest.

    Returns
    -------
    ``(ed_phase, es_phase)``: int32 ``[S]``, -1 where a slice has fewer than
    two annotated phases.
    """
    n_slices = labels.shape[0]
    ed = np.full(n_slices, -1, np.int32)
    es = np.full(n_slices, -1, np.int32)
    for s in range(n_slices):
        phases = np.flatnonzero(annotated[s, :, 0])
        if len(phases) < 2:
            continue
        areas = [(labels[s, t] == 1).sum() for t in phases]
        ed[s] = phases[int(np.argmax(areas))]
        es[s] = phases[int(np.argmin(areas))]
    return ed, es


# --------------------------------------------------------------------------- #
# Splits and HDF5
# --------------------------------------------------------------------------- #


def split_patients(groups, mode="challenge", seed=0, fractions=(0.34, 0.33, 0.33)):
    """Assign patients (never slices) to train / valid / test.

    Parameters
    ----------
    groups : dict patient -> challenge group (``training``, ``validation``,
        ``online``, or empty when unknown).
    mode : ``"challenge"`` (training -> train, validation -> valid, online ->
        test) or ``"random"`` (seeded permutation cut by ``fractions``).
    seed : seed of the random split.
    fractions : (train, valid, test) fractions for the random split; test gets
        the remainder, and every non-empty split gets at least one patient
        when there are at least three patients.

    Returns
    -------
    dict split -> sorted list of patients.
    """
    patients = sorted(groups)
    if mode == "challenge":
        unknown = [p for p in patients if groups[p] not in GROUP_TO_SPLIT]
        if unknown:
            raise SunnybrookError(
                f"No challenge group is known for {', '.join(unknown)}: give one with --series_json "
                "({\"PATIENT\": {\"group\": \"training\"}}) or use --split=random"
            )
        out = {split: [] for split in SPLITS}
        for p in patients:
            out[GROUP_TO_SPLIT[groups[p]]].append(p)
        return out
    if mode != "random":
        raise ValueError(f"split mode must be 'challenge' or 'random', got {mode!r}")
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions < 0) or fractions.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions.tolist()}")
    fractions = fractions / fractions.sum()
    order = list(np.random.default_rng(seed).permutation(patients))
    n = len(order)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    if n >= 3:
        n_train = max(n_train, 1 if fractions[0] > 0 else 0)
        n_valid = max(n_valid, 1 if fractions[1] > 0 else 0)
        if fractions[2] > 0 and n_train + n_valid >= n:
            n_train = max(n_train - (n_train + n_valid - n + 1), 1)
            n_valid = n - 1 - n_train
    n_valid = min(n_valid, n - n_train)
    return {
        "train": sorted(order[:n_train]),
        "valid": sorted(order[n_train:n_train + n_valid]),
        "test": sorted(order[n_train + n_valid:]),
    }


def _jsonable(value):
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def write_h5(path, patients, splits, attrs):
    """Write patients in the cardiac HDF5 layout, atomically (temp file + rename).

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

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    str_dtype = h5py.string_dtype()
    try:
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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


# --------------------------------------------------------------------------- #
# Conversion entry point
# --------------------------------------------------------------------------- #


def convert(raw_dir, out, spacing=1.5, crop_size=128, series_json=None, split="challenge", split_seed=0,
            split_fractions=(0.34, 0.33, 0.33), verbose=True):
    """Convert the raw data set under ``raw_dir`` into the HDF5 file ``out``.

    Parameters
    ----------
    raw_dir : root folder of the unpacked data set.
    out : output HDF5 path.
    spacing : common output pixel spacing (mm).
    crop_size : output image size (pixels), centred on the LV.
    series_json : optional JSON override of the patient table.
    split : ``"challenge"`` or ``"random"``.
    split_seed, split_fractions : random split settings.
    verbose : print skipped items and the summary.

    Returns
    -------
    :class:`Report`.

    Raises
    ------
    SunnybrookError when nothing at all can be converted (the report's
    reasons are in the message).
    """
    if spacing <= 0 or crop_size < 8:
        raise ValueError(f"need spacing > 0 and crop_size >= 8, got {spacing} and {crop_size}")
    report = Report(verbose=verbose)
    table = load_series_table(series_json)
    specs = discover(raw_dir, table)
    if not specs:
        raise SunnybrookError(
            f"No Sunnybrook patient folders (named like SC-HF-I-01 or SC-HF-I-1, holding IM-SSSS-NNNN.dcm "
            f"files or contours-manual/IRCCI-expert/) found under {raw_dir}")
    patients = {}
    for pid, spec in specs.items():
        data = convert_patient(spec, raw_dir, report, spacing=spacing, crop_size=crop_size)
        if data is not None:
            patients[pid] = data
            report.converted.append(pid)
    if not patients:
        raise SunnybrookError(f"Nothing could be converted from {raw_dir}:\n{report.summary()}")
    groups = {p: d["attrs"]["group"] for p, d in patients.items()}
    splits = split_patients(groups, mode=split, seed=split_seed, fractions=split_fractions)
    for name, members in splits.items():
        for p in members:
            patients[p]["attrs"]["split"] = name
    attrs = dict(
        source="Sunnybrook Cardiac Data (2009 LV segmentation challenge)",
        created_by="python -m data.sunnybrook",
        raw_dir=os.path.abspath(raw_dir), spacing_mm=[spacing, spacing], crop_size=crop_size,
        split_mode=split, split_seed=split_seed, split_fractions=list(split_fractions),
        series_json=os.path.abspath(series_json) if series_json else "",
        skipped=[list(s) for s in report.skipped], notes=[list(n) for n in report.notes],
    )
    try:
        import pydicom  # noqa: PLC0415

        attrs["pydicom_version"] = pydicom.__version__
    except ImportError:  # pragma: no cover - cannot get here after reading DICOMs
        pass
    write_h5(out, patients, splits, attrs)
    if verbose:
        print(report.summary())
        for name in SPLITS:
            print(f"{name}: {len(splits[name])} patient(s) {' '.join(splits[name])}")
        print(f"wrote {out}")
    return report


def main(argv=None):
    """Command line: ``python -m data.sunnybrook --raw_dir=DIR --out=FILE.h5``."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m data.sunnybrook", description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw_dir", required=True, help="root of the unpacked Sunnybrook Cardiac Data")
    parser.add_argument("--out", required=True, help="output HDF5 file")
    parser.add_argument("--spacing", type=float, default=1.5, help="output pixel spacing in mm (default 1.5)")
    parser.add_argument("--crop_size", type=int, default=128, help="output size in pixels (default 128)")
    parser.add_argument("--series_json", default=None,
                        help="JSON file overriding the patient -> series/group/folder table")
    parser.add_argument("--split", choices=("challenge", "random"), default="challenge",
                        help="challenge groups (default) or a seeded random split by patient")
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--split_fractions", default="0.34,0.33,0.33", help="train,valid,test for --split=random")
    args = parser.parse_args(argv)
    try:
        fractions = tuple(float(x) for x in args.split_fractions.split(","))
    except ValueError:
        parser.error(f"--split_fractions must be three comma-separated numbers, got {args.split_fractions!r}")
    try:
        convert(args.raw_dir, args.out, spacing=args.spacing, crop_size=args.crop_size,
                series_json=args.series_json, split=args.split, split_seed=args.split_seed,
                split_fractions=fractions)
    except (SunnybrookError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
