"""DIRNet on cine cardiac MRI: train, evaluate with contours, export (``python -m experiments.cardiac``).

Training is unsupervised: random pairs of time frames of the same short-axis
slice of the training patients (images only, labels are never used).  Model
selection uses the image similarity of ED/ES pairs of the validation patients.
Evaluation registers, on every annotated slice of the test patients,
end-systole to end-diastole (fixed = ED, moving = ES) and the reverse, warps
the moving label map (LV cavity, myocardium) as one-hot maps through
:func:`dirnet_tf.warp` and takes the argmax, and reports Dice, 95th-percentile
Hausdorff distance and mean absolute surface distance (mm) per structure,
before and after registration, plus the folding fraction and the time per pair.

Data:

* ``--synthetic``: the built-in beating-heart phantom (:mod:`data.cardiac_phantom`,
  exact labels, 1.5 mm pixels), generated in memory; nothing to download.
* otherwise ``--data=FILE.h5`` made by ``python -m data.sunnybrook`` from the
  Sunnybrook Cardiac Data; without it the command stops with instructions (it
  never falls back to the phantom).

Outputs in ``--logdir`` (default ``runs/cardiac``): checkpoints and
``flags.json``, TensorBoard events, ``metrics.json``, ``eval_pairs.json`` and
``cardiac_registration.png`` (contours overlaid).  The SavedModel goes to
``--export_dir`` (default ``exports/cardiac``); load it in a new process with
``import dirnet_tf`` first.

Examples::

    python -m experiments.cardiac --synthetic
    python -m data.sunnybrook --raw_dir=SUNNYBROOK --out=datasets/sunnybrook.h5
    python -m experiments.cardiac --data=datasets/sunnybrook.h5
"""

import os

import numpy as np
from absl import flags

from data import cardiac_phantom, sunnybrook
from dirnet_tf.evaluation import evaluate_pairs
from dirnet_tf.inference import load_export
from dirnet_tf.pairs import same_group_pair_sampler
from dirnet_tf.plotting import draw_deformation_grid
from dirnet_tf.trainer import make_strategy
from dirnet_tf.files import write_json
from dirnet_tf.warping import warp_labels
from experiments import common
from experiments.common import define_flag

common.define_flags()
flags.adopt_module_key_flags(common)  # --help lists the shared flags too

define_flag("bool", "synthetic", False, "Use the built-in beating-heart phantom instead of real data.")
define_flag("string", "data", os.path.join("datasets", "sunnybrook.h5"),
        "Cardiac HDF5 file written by `python -m data.sunnybrook` (ignored with --synthetic).")
define_flag("integer", "image_size", 0, "Image size in pixels (square). 0: as stored in --data, 64 for "
        "--synthetic. Stored images of another size are centre-cropped or zero-padded.")
define_flag("string", "phantom_subjects", "24,4,8", "Phantom subjects for train,valid,test.")
define_flag("integer", "phantom_slices", 3, "Phantom short-axis slices per subject.")
define_flag("integer", "phantom_phases", 20, "Phantom frames per cardiac cycle.")
define_flag("float", "phantom_spacing", cardiac_phantom.DEFAULT_SPACING, "Phantom pixel spacing in mm.")
define_flag("float", "phantom_noise", 0.03, "Phantom Rician noise level.")
define_flag("integer", "phantom_seed", 0, "Seed of the phantom data set.")
define_flag("bool", "select_best", True, "Evaluate/export the checkpoint with the best validation NCC "
        "(otherwise the last one).")
define_flag("bool", "evaluate", True, "Evaluate on the test patients after training.")
define_flag("integer", "figure_pairs", 6, "Test pairs drawn in cardiac_registration.png.")
define_flag("integer", "timing_batch_size", 64, "Batch size of the ms/pair measurement.")

FLAGS = flags.FLAGS
STRUCTURES = {"lv_cavity": 1, "myocardium": 2}
NUM_LABELS = len(sunnybrook.LABEL_NAMES)
PHANTOM_SIZE = 64
DEFAULTS = dict(steps=800, batch_size=32, learning_rate=1e-3, lr_schedule="cosine", grid_spacing=8,
                filters="32", logdir=os.path.join("runs", "cardiac"),
                export_dir=os.path.join("exports", "cardiac"), log_every=50, eval_every=250,
                checkpoint_every=250)

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


# --------------------------------------------------------------------------- data


def _fit_size(array, size):
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
    """The cardiac data set selected by the flags.

    Parameters
    ----------
    config : dict of flag values (``synthetic``, ``data``, ``image_size``,
        ``phantom_*``).

    Returns
    -------
    dict with ``patients`` (name -> arrays, see :func:`data.sunnybrook.load_h5`),
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
            loaded = sunnybrook.load_h5(path)
        except (OSError, ValueError, KeyError) as exc:
            raise CardiacDataError(f"Cannot use {path}: {exc}\n\n" + MISSING_DATA_HELP.format(path=path)) from exc
        patients, splits = loaded["patients"], loaded["splits"]
        spacing = [float(s) for s in loaded["attrs"]["spacing_mm"]]
        stored = next(iter(patients.values()))["images"].shape[-1] if patients else 0
        size = config["image_size"] or stored
        if size != stored:
            for p in patients.values():
                for key in ("images", "labels"):
                    p[key] = _fit_size(p[key], size)
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


# --------------------------------------------------------------------------- evaluation


def _stats(values):
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
            "median": float(np.median(finite)) if finite.size else None,
            "n": int(values.size), "n_infinite": int(values.size - finite.size)}


def contour_metrics(fixed_labels, moving_labels, warped_labels, annotated, spacing):
    """Per-pair Dice / HD95 / MAD (mm) before and after registration, per structure.

    Returns
    -------
    dict structure -> dict ``{metric_before|after: array [P]}`` (NaN where the
    structure is not annotated in the pair).
    """
    from dirnet_tf import metrics

    n = len(fixed_labels)
    result = {}
    for k, (structure, label) in enumerate(STRUCTURES.items()):
        values = {f"{m}_{w}": np.full(n, np.nan) for m in ("dice", "hd95_mm", "mad_mm")
                  for w in ("before", "after")}
        for i in range(n):
            if not annotated[i, k]:
                continue
            fixed = fixed_labels[i] == label
            for when, other in (("before", moving_labels[i]), ("after", warped_labels[i])):
                mask = other == label
                values[f"dice_{when}"][i] = metrics.dice(fixed, mask)["mean"]
                values[f"hd95_mm_{when}"][i] = metrics.hd95(fixed, mask, spacing)
                values[f"mad_mm_{when}"][i] = metrics.mad(fixed, mask, spacing)
        result[structure] = values
    return result


def summarise(per_pair, select):
    """Mean/std/median of every metric over the selected pairs, per structure."""
    out = {}
    for structure, values in per_pair.items():
        entry = {}
        for key, v in values.items():
            v = v[select]
            entry[key] = _stats(v[~np.isnan(v)])
        entry["pairs"] = int((~np.isnan(values["dice_before"][select])).sum())
        out[structure] = entry
    return out


def evaluate(fn, pairs, spacing, boundary="border", timing_batch_size=64):
    """Register the test pairs and score the warped contours.

    Parameters
    ----------
    fn : keras.Model or SavedModel signature (see :func:`dirnet_tf.inference.predict`).
    pairs : dict from :func:`ed_es_pairs`.
    spacing : pixel spacing (mm) per axis.
    boundary : the model's resampling boundary (used to warp the labels).
    timing_batch_size : batch size of the ms/pair measurement.

    Returns
    -------
    ``(metrics dict, predictions dict)``.
    """
    result, pred = evaluate_pairs(fn, pairs["fixed"], pairs["moving"], spacing=spacing,
                                  timing_batch_size=timing_batch_size)
    warped_labels = warp_labels(pairs["moving_labels"], pred["displacement"], NUM_LABELS,
                                boundary).numpy().astype(np.uint8)
    per_pair = contour_metrics(pairs["fixed_labels"], pairs["moving_labels"], warped_labels,
                               pairs["annotated"], spacing)
    folding = pred["folding"]
    directions = np.array([r["direction"] for r in pairs["records"]])
    everything = np.ones(len(directions), bool)
    result.update(
        structures=summarise(per_pair, everything),
        per_direction={d: dict(pairs=int((directions == d).sum()),
                               structures=summarise(per_pair, directions == d),
                               folding_fraction=float(folding[directions == d].mean()))
                       for d in sorted(set(directions.tolist()))},
    )
    pred.update(warped_labels=warped_labels, per_pair=per_pair)
    return result, pred


def save_figure(path, pairs, pred, indices):
    """Rows fixed / moving / warped / deformation grid; contours overlaid.

    Cavity (endocardium) in red, epicardium in green; on the warped row the warped
    moving contours are solid and the fixed contours dashed.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    indices = list(indices)
    n = len(indices)
    fig, axes = plt.subplots(4, n, figsize=(2.0 * n, 8.2), squeeze=False)
    h = pairs["fixed"].shape[1]

    def contours(ax, labels, style="solid"):
        if (labels == 1).any():
            ax.contour(labels == 1, [0.5], colors="tab:red", linewidths=0.9, linestyles=style)
        if (labels >= 1).any():
            ax.contour(labels >= 1, [0.5], colors="tab:green", linewidths=0.9, linestyles=style)

    for c, i in enumerate(indices):
        rec = pairs["records"][i]
        cav = pred["per_pair"]["lv_cavity"]
        myo = pred["per_pair"]["myocardium"]
        rows = [(pairs["fixed"][i], [(pairs["fixed_labels"][i], "solid")]),
                (pairs["moving"][i], [(pairs["moving_labels"][i], "solid")]),
                (pred["warped"][i], [(pred["warped_labels"][i], "solid"), (pairs["fixed_labels"][i], "dashed")]),
                (pred["warped"][i], [])]
        for r, (img, overlays) in enumerate(rows):
            ax = axes[r, c]
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, alpha=0.35 if r == 3 else 1.0)
            for labels, style in overlays:
                contours(ax, labels, style)
            ax.set_xticks([])
            ax.set_yticks([])
        draw_deformation_grid(axes[3, c], pred["displacement"][i], step=max(2, h // 24), linewidth=0.5)
        title = f"{rec['patient']} s{rec['slice']} {rec['direction']}"
        axes[0, c].set_title(title, fontsize=7)
        axes[2, c].set_title(f"Dice cav {cav['dice_before'][i]:.2f}->{cav['dice_after'][i]:.2f}\n"
                             f"myo {myo['dice_before'][i]:.2f}->{myo['dice_after'][i]:.2f}", fontsize=7)
    for r, name in enumerate(("fixed", "moving", "warped", "grid")):
        axes[r, 0].set_ylabel(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _print_summary(m):
    print(f"[eval] {m['pairs']} test pairs (ED<->ES), spacing {m['spacing_mm']} mm: NCC {m['ncc_before']:.4f} -> "
          f"{m['ncc_after']:.4f}   folding {100 * m['folding_fraction']:.3f}% of pixels "
          f"({m['pairs_with_folding']} pairs with any)   {m['ms_per_pair']:.3f} ms/pair "
          f"(batch {m['timing_batch_size']})", flush=True)
    for structure, v in m["structures"].items():
        def fmt(key):
            b, a = v[f"{key}_before"]["mean"], v[f"{key}_after"]["mean"]
            return "n/a" if b is None or a is None else f"{b:.3f} -> {a:.3f}"
        print(f"[eval]   {structure:10s} ({v['pairs']} pairs)  Dice {fmt('dice')}   HD95 {fmt('hd95_mm')} mm   "
              f"MAD {fmt('mad_mm')} mm", flush=True)


# --------------------------------------------------------------------------- main


def run(config):
    """Train / export / evaluate according to ``config`` (a dict of flag values).

    Returns
    -------
    dict: the metrics written to ``metrics.json`` (or the training summary when
    ``evaluate`` is off).
    """
    data = load_data(config)
    patients, splits, size = data["patients"], data["splits"], data["image_size"]
    image_shape = (size, size)
    print(f"[data] {data['source']}: " + ", ".join(f"{s} {len(splits[s])}" for s in sunnybrook.SPLITS)
          + " patients", flush=True)
    strategy = make_strategy(config["strategy"])
    images, groups = training_frames(patients, splits["train"])
    print(f"[data] {len(images)} training frames in {groups.max() + 1} slices", flush=True)
    sampler = same_group_pair_sampler(images, groups, config["batch_size"], config["seed"])
    valid = ed_es_pairs(patients, splits.get("valid", []))
    validation = None if valid is None else {"fixed": valid["fixed"], "moving": valid["moving"]}
    run_ = common.train_and_export(config, image_shape, sampler, validation, strategy,
                                   spacing_mm=data["spacing"], data=data["source"])
    if run_.export_dir is None or not config["evaluate"]:
        return run_.summary

    pairs = ed_es_pairs(patients, splits["test"])
    if pairs is None:
        raise CardiacDataError("the test patients have no slice with both ED and ES annotated")
    pairs_path = write_json(os.path.join(config["logdir"], "eval_pairs.json"),
                            {"data": data["source"], "pairs": pairs["records"]})
    served, _ = load_export(run_.export_dir)
    metrics, pred = evaluate(served, pairs, data["spacing"], run_.trainer.model.boundary,
                             timing_batch_size=config["timing_batch_size"])
    metrics_path = common.record_metrics(config, run_, metrics, data=data["source"],
                                         test_patients=list(splits["test"]), eval_pairs=pairs_path)
    # One ES->ED pair per test patient (its middle annotated slice) for the figure.
    chosen, seen = [], {}
    for i, rec in enumerate(pairs["records"]):
        if rec["direction"] == "ES->ED":
            seen.setdefault(rec["patient"], []).append(i)
    for members in seen.values():
        chosen.append(members[len(members) // 2])
    chosen = chosen[:max(1, config["figure_pairs"])]
    figure = save_figure(os.path.join(config["logdir"], "cardiac_registration.png"), pairs, pred, chosen)
    _print_summary(metrics)
    print(f"[eval] wrote {metrics_path}, {pairs_path} and {figure}", flush=True)
    return metrics


def main():
    """Command line: apply this experiment's defaults, then parse flags and run."""
    common.run_experiment(run, DEFAULTS, errors=(CardiacDataError,))


if __name__ == "__main__":
    main()
