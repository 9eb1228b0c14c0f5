"""The cardiac MRI data of ``python -m experiments.cardiac``: the Sunnybrook file or the phantom, as pairs.

:func:`load_data` opens the data set (the HDF5 file of ``python -m data.sunnybrook``, or the
built-in beating-heart phantom of :mod:`data.cardiac_phantom` made in memory), with
:data:`MISSING_DATA_HELP` when the file is missing; :func:`training_frames` gives every frame of the
training patients with a group per (patient, slice), :func:`ed_es_pairs` the end-diastole /
end-systole pairs of every annotated slice.  Images ``[..., H, W]`` float in [0, 1]; labels 0
background, 1 LV cavity, 2 myocardium; spacing in mm per axis.
"""

import os

import numpy as np

from data import cardiac_h5, cardiac_phantom

__all__ = ["CardiacDataError", "MISSING_DATA_HELP", "STRUCTURES", "NUM_LABELS", "PHANTOM_SIZE", "load_data",
           "fit_size", "training_frames", "ed_es_pairs"]

STRUCTURES = {"lv_cavity": 1, "myocardium": 2}
NUM_LABELS = len(cardiac_h5.LABEL_NAMES)
PHANTOM_SIZE = 64

MISSING_DATA_HELP = """\
No cardiac data file at {path}.

To run on the Sunnybrook Cardiac Data (the data set of the paper):
  1. Obtain the Sunnybrook Cardiac Data (2009 Cardiac MR Left Ventricle Segmentation
     Challenge; distributed free of charge, after registration, through the Cardiac Atlas
     Project): the DICOM images of the training, validation and online groups and the
     expert contours ("contours-manual/IRCCI-expert").
  2. Unpack everything into one folder, e.g. SUNNYBROOK/ (patient folders such as
     SC-HF-I-1 or SC-HF-I-01 anywhere below it).
  3. Convert it (needs pydicom: pip install -e .[medical]):
       python -m data.sunnybrook --raw_dir=SUNNYBROOK --out={path}
  4. Run this experiment again: python -m experiments.cardiac --data={path}

To run without the real data on the built-in beating-heart phantom instead, pass
--synthetic explicitly."""


class CardiacDataError(ValueError):
    """The cardiac data set is missing or unusable (the message says what to do)."""


def fit_size(array, size):
    """Centre-crop or zero-pad the last two axes of ``array`` to ``size x size``."""
    out = array
    for axis in (-2, -1):
        n = out.shape[axis]
        if n > size:
            start = (n - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=axis)
        elif n < size:
            before = (size - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, size - n - before)
            out = np.pad(out, pad)
    return out


def load_data(config):
    """The cardiac data set selected by the settings.

    Parameters
    ----------
    config : dict
        ``synthetic``, ``data``, ``image_size``, ``phantom_*`` (``experiments.cardiac``'s flags).

    Returns
    -------
    dict with ``patients`` (name -> arrays, see :func:`data.cardiac_h5.load_h5`),
    ``splits`` (split -> names), ``spacing`` (mm, per axis), ``image_size``
    and ``source`` (a description).

    Raises
    ------
    CardiacDataError without ``--synthetic`` when the data file is missing or
    unusable, with instructions.
    """
    if config["synthetic"]:
        try:
            counts = [int(x) for x in str(config["phantom_subjects"]).split(",")]
            if len(counts) != 3:
                raise ValueError
        except ValueError:
            raise CardiacDataError(
                f"--phantom_subjects must be three comma-separated integers train,valid,test; "
                f"got {config['phantom_subjects']!r}") from None
        size = config["image_size"] or PHANTOM_SIZE
        patients, splits = cardiac_phantom.make_phantom(
            *counts, seed=config["phantom_seed"], n_slices=config["phantom_slices"],
            n_phases=config["phantom_phases"], size=size, spacing=config["phantom_spacing"],
            noise=config["phantom_noise"])
        spacing = [config["phantom_spacing"]] * 2
        source = (f"synthetic phantom (seed {config['phantom_seed']}, subjects {counts}, "
                  f"{config['phantom_slices']} slices x {config['phantom_phases']} phases, {size}x{size}, "
                  f"{config['phantom_spacing']} mm)")
    else:
        path = config["data"]
        if not path or not os.path.exists(path):
            raise CardiacDataError(MISSING_DATA_HELP.format(path=path))
        try:
            loaded = cardiac_h5.load_h5(path)
        except (OSError, ValueError, KeyError) as exc:
            raise CardiacDataError(f"Cannot use {path}: {exc}\n\n" + MISSING_DATA_HELP.format(path=path)) from exc
        patients, splits = loaded["patients"], loaded["splits"]
        spacing = [float(s) for s in loaded["attrs"]["spacing_mm"]]
        stored = next(iter(patients.values()))["images"].shape[-1] if patients else 0
        size = config["image_size"] or stored
        if size != stored:
            for p in patients.values():
                for key in ("images", "labels"):
                    p[key] = fit_size(p[key], size)
        source = f"{loaded['attrs'].get('source', 'cardiac data')} from {os.path.abspath(path)}"
    missing = [s for s in ("train", "test") if not splits.get(s)]
    if missing:
        raise CardiacDataError(f"The cardiac data ({source}) has no patients in split(s) {missing}; "
                               "convert with another --split or more patients")
    return dict(patients=patients, splits=splits, spacing=spacing, image_size=int(size), source=source)


def training_frames(patients, names):
    """All frames of the given patients with a group id per (patient, slice).

    Returns
    -------
    ``(images [N, H, W, 1] float32, groups [N] int64)``.
    """
    images, groups, gid = [], [], 0
    for name in names:
        stack = patients[name]["images"]
        for s in range(stack.shape[0]):
            images.append(stack[s])
            groups.append(np.full(stack.shape[1], gid, np.int64))
            gid += 1
    if not images:
        raise CardiacDataError("no training frames")
    return np.concatenate(images)[..., None].astype(np.float32), np.concatenate(groups)


def ed_es_pairs(patients, names, directions=("ES->ED", "ED->ES")):
    """ED/ES registration pairs of every annotated slice.

    ``"ES->ED"`` registers end-systole (moving) to end-diastole (fixed); ``"ED->ES"``
    the reverse.

    Returns
    -------
    dict with ``fixed``/``moving`` ``[P, H, W, 1]``, ``fixed_labels``/``moving_labels``
    ``[P, H, W]`` uint8, ``annotated`` ``[P, 2]`` (cavity, myocardium labelled in both
    frames) and ``records`` (list of dicts: patient, slice, direction, phases).
    """
    out = {k: [] for k in ("fixed", "moving", "fixed_labels", "moving_labels", "annotated", "records")}
    for name in names:
        p = patients[name]
        for s in range(p["images"].shape[0]):
            ed, es = int(p["ed_phase"][s]), int(p["es_phase"][s])
            if ed < 0 or es < 0 or ed == es:
                continue
            for direction in directions:
                fixed_t, moving_t = (ed, es) if direction == "ES->ED" else (es, ed)
                ann = p["annotated"][s, fixed_t] & p["annotated"][s, moving_t]
                out["fixed"].append(p["images"][s, fixed_t])
                out["moving"].append(p["images"][s, moving_t])
                out["fixed_labels"].append(p["labels"][s, fixed_t])
                out["moving_labels"].append(p["labels"][s, moving_t])
                out["annotated"].append([bool(ann[0]), bool(ann[0] and ann[1])])
                out["records"].append(dict(patient=name, slice=s, direction=direction,
                                           fixed_phase=fixed_t, moving_phase=moving_t))
    if not out["records"]:
        return None
    result = {k: np.stack(v) for k, v in out.items() if k != "records"}
    result["fixed"] = result["fixed"][..., None].astype(np.float32)
    result["moving"] = result["moving"][..., None].astype(np.float32)
    result["records"] = out["records"]
    return result
