"""Sunnybrook Cardiac Data (2009 LV segmentation challenge) -> HDF5.

Reads the dataset as it is distributed (folders, series and contour files as
described and found by :mod:`data.sunnybrook_files`) and writes one HDF5 file::

    python -m data.sunnybrook --raw_dir=DIR --out=FILE.h5

Processing, per patient: images of the cine series are grouped by slice
location (position along the slice normal) and cardiac phase (trigger time);
contours are converted to ij (row, column) and rasterised into label maps
(0 background, 1 LV cavity = inside the endocardium, 2 myocardium = between
endocardium and epicardium); everything is resampled to a common pixel
spacing, cropped to a fixed size around the left ventricle and intensities are
normalised per slice (1st/99th percentile -> [0, 1]).

The output is in the cardiac HDF5 layout of :mod:`data.cardiac_h5` (shared with
:mod:`data.cardiac_phantom`, read back with :func:`data.cardiac_h5.load_h5`):
``/<patient>/images`` float32 ``[S, T, H, W]`` in [0, 1], ``/<patient>/labels``
uint8 (0 bg, 1 cavity, 2 myocardium), ``source_files`` (DICOM paths relative to
``raw_dir``) and per-patient attributes ``group``, ``split``, ``series``,
``native_spacing_mm``, ``crop_origin``, ...

Patients are split by patient, never by slice: by default the challenge's own
groups (training -> train, validation -> valid, online -> test); with
``--split=random`` a seeded random split.

A partial dataset still converts: unreadable DICOM files, contours that do not
match an image, images of an inconsistent size and patients without data are
skipped with a message naming the file, and the summary lists them.

DICOM files are read with :mod:`dirnet_tf.dicom` (:func:`read_dicom_frame`);
``pydicom`` is an optional dependency (``pip install -e .[medical]``), imported
only when DICOM files are read.
"""

import os
import sys
from collections import Counter

import numpy as np

from data.cardiac_h5 import SPLITS, write_h5
from data.sunnybrook_files import (
    GROUP_TO_SPLIT,
    SunnybrookError,
    choose_series,
    contour_files,
    discover,
    load_series_table,
    read_contour,
    series_files,
)
from dirnet_tf import dicom
from dirnet_tf.readers import ImageReadError, skip_reason

__all__ = [
    "Report", "rasterize_polygon", "read_dicom_frame", "read_cine_slices", "convert_patient", "find_ed_es",
    "split_patients", "convert", "main",
]


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


def read_dicom_frame(path):
    """Pixels, spacing, slice position and trigger time of one single-frame cine DICOM file.

    Built on :mod:`dirnet_tf.dicom` (pixels grey and rescaled, MONOCHROME1
    negated; plane geometry).

    Returns
    -------
    pixels : float32 ``(rows, columns)``.
    spacing : PixelSpacing ``(row, column)`` in mm.
    position : float, mm along the slice normal (ImagePositionPatient .
        (row direction x column direction)), or SliceLocation without them.
    trigger : TriggerTime in ms, or None.

    Raises
    ------
    SunnybrookError whose message says why without repeating the path (the
    caller's report names it); ImportError when pydicom is missing.
    """
    dicom.import_pydicom()
    try:
        ds = dicom.read_dataset(path)
        pixels = dicom.grey_pixels(ds)
    except ImageReadError as exc:
        raise SunnybrookError(f"unreadable DICOM: {skip_reason(path, exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken pixel data
        raise SunnybrookError(f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise SunnybrookError(f"expected a single 2-D frame, got pixel array of shape {pixels.shape}")
    spacing, position, orientation = dicom.plane_geometry(ds)
    if spacing is None:
        raw = getattr(ds, "PixelSpacing", None)
        if raw is None or len(raw) != 2:
            raise SunnybrookError("no PixelSpacing")
        raise SunnybrookError(f"invalid PixelSpacing {tuple(float(v) for v in raw)}")
    if position is not None and orientation is not None:
        position = float(np.dot(position, np.cross(orientation[:3], orientation[3:])))
    elif getattr(ds, "SliceLocation", None) is not None:
        position = float(ds.SliceLocation)
    else:
        raise SunnybrookError("neither ImagePositionPatient/ImageOrientationPatient nor SliceLocation")
    trigger = getattr(ds, "TriggerTime", None)
    trigger = float(trigger) if trigger not in (None, "") else None
    return pixels.astype(np.float32), spacing, position, trigger


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


def read_cine_slices(image_dir, files, report, slice_tolerance=0.5):
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
            pixels, spacing, position, trigger = read_dicom_frame(path)
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
    contours = contour_files(spec.contour_dir)
    by_series = series_files(spec.image_dir)
    series, how = choose_series(spec, by_series, set(contours))
    if series is None:
        report.skip(spec.image_dir, f"{pid}: {how}")
        return None
    if how == "detected" and spec.series:
        report.note(spec.image_dir, f"{pid}: series {'/'.join(spec.series)} from the table is not there; "
                                    f"using the detected series {series}")
    cine = read_cine_slices(spec.image_dir, by_series[series], report)
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
# Splits
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
        attrs["pydicom_version"] = dicom.import_pydicom().__version__
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
