"""Where the Sunnybrook Cardiac Data files are: the patient table, folder discovery, series choice, contours.

The data set as it is distributed: per-patient folders (``SC-HF-I-01``; image
folders may drop the leading zero, ``SC-HF-I-1``) of DICOM images
``IM-SSSS-NNNN.dcm`` (``SSSS`` = that patient's short-axis cine series,
``NNNN`` = image number), expert contours in
``<patient>/contours-manual/IRCCI-expert/IM-0001-NNNN-{i,o}contour-manual.txt``
(one ``x y`` point per line, x = column, y = row, pixels).  Converted by
:mod:`data.sunnybrook`.
"""

import dataclasses
import json
import os
import re

import numpy as np

__all__ = [
    "GROUP_TO_SPLIT", "DEFAULT_SERIES", "SunnybrookError", "PatientSpec", "normalize_patient_id",
    "load_series_table", "discover", "series_files", "contour_files", "choose_series", "read_contour",
]

GROUP_TO_SPLIT = {"training": "train", "validation": "valid", "online": "test"}

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


def series_files(image_dir):
    """``{series: {number: filename}}`` of the ``IM-SSSS-NNNN.dcm`` files in a folder.

    ``series`` is the ``SSSS`` text (``"0004"``), ``number`` the image number ``NNNN`` as an int.
    """
    by_series = {}
    for name in sorted(os.listdir(image_dir)):
        match = _IMAGE_RE.match(name)
        if match:
            by_series.setdefault(match.group(1), {})[int(match.group(2))] = name
    return by_series


def contour_files(contour_dir):
    """``{number: {"i": path, "o": path}}`` of the contour files in a folder (``{}`` when there is none).

    ``number`` is the image number ``NNNN``; ``"i"`` the endocardium (inner) contour, ``"o"`` the
    epicardium (outer).
    """
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
