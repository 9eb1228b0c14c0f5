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

from data import cardiac_phantom
from data.cardiac import (NUM_LABELS, STRUCTURES, CardiacDataError, ed_es_pairs, load_data,
                          training_frames)
from data.cardiac_h5 import SPLITS
from dirnet_tf.config import PRESETS
from experiments import common
from experiments.common import define_flag

common.define_flags()

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
flags.adopt_module_key_flags(common)  # --help lists every flag of the command (defined in common)

FLAGS = flags.FLAGS
# The paper's model (one B-spline stage, one pass, no regulariser) with 3x3 widths of 32, one
# convolution per level (the regressor of the paper).
DEFAULTS = dict(PRESETS["paper"], convs_per_level="1", steps=800, batch_size=32, learning_rate=1e-3,
                lr_schedule="cosine", grid_spacing=8, filters="32", logdir=os.path.join("runs", "cardiac"),
                export_dir=os.path.join("exports", "cardiac"), log_every=50, eval_every=250,
                checkpoint_every=250)

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
    from dirnet_tf.evaluation import evaluate_pairs, structure_scores, summarise_structures
    from dirnet_tf.warping import warp_labels

    result, pred = evaluate_pairs(fn, pairs["fixed"], pairs["moving"], spacing=spacing,
                                  timing_batch_size=timing_batch_size)
    warped_labels = warp_labels(pairs["moving_labels"], pred["displacement"], NUM_LABELS,
                                boundary).numpy().astype(np.uint8)
    per_pair = structure_scores(pairs["fixed_labels"], pairs["moving_labels"], warped_labels,
                                pairs["annotated"], spacing, STRUCTURES)
    folding = pred["folding"]
    directions = np.array([r["direction"] for r in pairs["records"]])
    everything = np.ones(len(directions), bool)
    result.update(
        structures=summarise_structures(per_pair, everything),
        per_direction={d: dict(pairs=int((directions == d).sum()),
                               structures=summarise_structures(per_pair, directions == d),
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

    from dirnet_tf.plotting import draw_deformation_grid

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
    """Train / export / evaluate according to ``config`` (a :class:`dirnet_tf.config.TrainConfig`;
    this command's own flags in ``config.extra``).

    Returns
    -------
    dict: the metrics written to ``metrics.json`` (or the training summary when
    ``evaluate`` is off).
    """
    from dirnet_tf.files import write_json
    from dirnet_tf.inference import load_export
    from dirnet_tf.pairs import same_group_pair_sampler
    from dirnet_tf.trainer import make_strategy
    from dirnet_tf.training import record_metrics, train_and_export

    data = load_data(config.extra)
    patients, splits, size = data["patients"], data["splits"], data["image_size"]
    image_shape = (size, size)
    print(f"[data] {data['source']}: " + ", ".join(f"{s} {len(splits[s])}" for s in SPLITS)
          + " patients", flush=True)
    strategy = make_strategy(config.strategy)
    images, groups = training_frames(patients, splits["train"])
    print(f"[data] {len(images)} training frames in {groups.max() + 1} slices", flush=True)
    sampler = same_group_pair_sampler(images, groups, config.batch_size, config.seed)
    valid = ed_es_pairs(patients, splits.get("valid", []))
    validation = None if valid is None else {"fixed": valid["fixed"], "moving": valid["moving"]}
    trained = train_and_export(config, image_shape, sampler, validation, strategy,
                               spacing_mm=data["spacing"], data=data["source"])
    if trained.export_dir is None or not config.evaluate:
        return trained.summary

    pairs = ed_es_pairs(patients, splits["test"])
    if pairs is None:
        raise CardiacDataError("the test patients have no slice with both ED and ES annotated")
    pairs_path = write_json(os.path.join(config.logdir, "eval_pairs.json"),
                            {"data": data["source"], "pairs": pairs["records"]})
    served, _ = load_export(trained.export_dir)
    metrics, pred = evaluate(served, pairs, data["spacing"], trained.trainer.model.boundary,
                             timing_batch_size=config.timing_batch_size)
    metrics_path = record_metrics(config, trained, metrics, data=data["source"],
                                  test_patients=list(splits["test"]), eval_pairs=pairs_path)
    # One ES->ED pair per test patient (its middle annotated slice) for the figure.
    chosen, seen = [], {}
    for i, rec in enumerate(pairs["records"]):
        if rec["direction"] == "ES->ED":
            seen.setdefault(rec["patient"], []).append(i)
    for members in seen.values():
        chosen.append(members[len(members) // 2])
    chosen = chosen[:max(1, config.extra["figure_pairs"])]
    figure = save_figure(os.path.join(config.logdir, "cardiac_registration.png"), pairs, pred, chosen)
    _print_summary(metrics)
    print(f"[eval] wrote {metrics_path}, {pairs_path} and {figure}", flush=True)
    return metrics


def main():
    """Command line: apply this experiment's defaults, then parse flags and run."""
    common.run_experiment(run, DEFAULTS, errors=(CardiacDataError,))


if __name__ == "__main__":
    main()
