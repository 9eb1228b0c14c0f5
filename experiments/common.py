"""What every experiment shares: flags, building DIRNet and its trainer, the run tail, clean errors.

* **flags** -- :func:`define_flags` defines the flags every experiment has
  (``--steps``, ``--batch_size``, ``--learning_rate``, ``--grid_spacing``,
  ``--similarity``, ``--bending_weight``, ``--folding_weight``, ``--logdir``,
  ``--export_dir``, ``--seed``, ``--resume``, ``--export_only``,
  ``--strategy``, ``--mixed_precision``, ...) exactly once; an experiment adds its
  own with :func:`define_flag` and sets its defaults in :func:`run_experiment`.
  :func:`flags_dict` is the parsed values of every flag defined this way.
* **model and trainer** -- :func:`build_dirnet` and :func:`trainer_from_config`
  turn those values into a :class:`dirnet_tf.DIRNet` (whose objective the trainer
  optimises) and a :class:`dirnet_tf.trainer.Trainer`; :func:`train_or_restore`
  trains or restores, selects the best checkpoint and sets the inference passes.
* **the run tail** -- :func:`export` (SavedModel + metadata), :func:`run_record`
  (what every ``metrics.json`` records about the run) and :func:`write_metrics`.
* :func:`run_experiment` -- the command-line entry: defaults, parsing, and
  ``error: ...`` with exit status 1 instead of a traceback for expected failures.
"""

import os
import sys
import time

from absl import app, flags

import dirnet_tf
from dirnet_tf import losses
from dirnet_tf.files import write_json
from dirnet_tf.inference import export_saved_model
from dirnet_tf.model import DIRNet
from dirnet_tf.trainer import STRATEGIES, Trainer, TrainingDivergedError

# Names of the flags defined through define_flag (what flags_dict returns).
_DEFINED = []


def define_flag(kind, name, default, help_text, *args):
    """Define an absl flag once (experiment modules share one ``FLAGS``).

    Parameters
    ----------
    kind : str
        ``"integer"``, ``"float"``, ``"string"``, ``"bool"`` or ``"enum"``.
    name, default, help_text
        As for ``absl.flags.DEFINE_*``.
    *args
        The enum values for ``"enum"``.
    """
    if name in flags.FLAGS:
        return
    definer = getattr(flags, "DEFINE_" + kind)
    if args:
        definer(name, default, *args, help_text)
    else:
        definer(name, default, help_text)
    _DEFINED.append(name)


def define_flags():
    """Define the flags shared by every experiment (idempotent).

    Call at import time of an experiment module; experiment-specific defaults are
    applied by :func:`run_experiment` before parsing.
    """
    define = define_flag
    define("integer", "steps", 2000, "Number of training steps (optimizer updates).")
    define("integer", "batch_size", 32, "Global batch size (pairs per step, split across replicas).")
    define("float", "learning_rate", 1e-3, "Peak learning rate of Adam.")
    define("enum", "lr_schedule", "cosine", "Learning-rate schedule: constant or cosine decay "
           "(with a short linear warm-up).", ["constant", "cosine"])
    define("integer", "grid_spacing", 8, "B-spline control-point spacing in pixels (a power of two).")
    define("string", "filters", "32", "Width of the regressor's 3x3 convolutions: one int, a comma "
           "list with one per resolution level (log2(grid_spacing) + 1 of them), or 'auto' "
           "(8, 16, then 32 at every coarser level).")
    define("string", "pointwise_filters", "", "Widths of the regressor's hidden 1x1 convolutions, a comma "
           "list (empty: the regressor's default, two of the last 3x3 width).")
    define("string", "convs_per_level", "1", "3x3 convolutions per resolution level of the regressor: "
           "one int, a comma list with one per level (log2(grid_spacing) + 1 of them), or 'auto' "
           "(1 per level, 2 at the coarsest).")
    define("bool", "batch_norm", False, "Batch normalisation in the regressor.")
    define("integer", "passes", 1, "Regressor passes in training: each later pass adds a "
           "control-point update predicted from the fixed image and the current warped image "
           "(shared weights).")
    define("integer", "inference_passes", 0, "Regressor passes of the exported and evaluated "
           "model (0: the same as --passes). A model trained with passes >= 2 keeps improving "
           "with a pass or two more at inference.")
    define("string", "stages", "", "Transform stages, composed: e.g. 'affine,8,4' (an affine stage, then "
           "B-spline stages at these grid spacings, each with --passes passes); empty: one B-spline stage "
           "at --grid_spacing (the paper).")
    define("bool", "stagewise", False, "Train the B-spline --stages one after another (the steps split "
           "evenly; each trained with the earlier ones frozen, in LOGDIR/stageK; an affine stage with the "
           "first) instead of end to end.")
    define("bool", "bounded", False, "Folding-free by construction: every step below the injectivity bound, "
           "steps composed.")
    define("bool", "symmetric", False, "Every step is r(fixed, warped) - r(warped, fixed): identical images "
           "give the identity.")
    define("bool", "normalize_inputs", False, "The regressors see standardised images (intensity scale does "
           "not change the field).")
    define("enum", "similarity", "ncc", "Similarity loss: ncc (global, the paper), lncc (local, 9-pixel windows) or mse.",
           list(losses.SIMILARITIES))
    define("float", "bending_weight", 0.0, "Weight of the B-spline bending energy (0 = paper).")
    define("float", "folding_weight", 0.0, "Weight of the Jacobian folding penalty (0 = paper).")
    define("float", "inverse_consistency_weight", 0.0, "Weight of the inverse-consistency loss: in training "
           "every pair is also registered the other way round (a batch of 2 x --batch_size registrations) and "
           "the residual of composing the two fields (pixels) is penalised (0 = paper).")
    define("string", "logdir", "runs/experiment", "Checkpoints, flags.json, TensorBoard events, metrics.")
    define("string", "export_dir", "exports/experiment", "Where the SavedModel is written.")
    define("integer", "seed", 0, "Seed of weight initialisation and of the training pair stream.")
    define("bool", "resume", True, "Continue from the last checkpoint in --logdir if there is one.")
    define("bool", "export_only", False, "Only export the SavedModel from the checkpoint in --logdir.")
    define("integer", "log_every", 100, "Console/TensorBoard scalar interval in steps.")
    define("integer", "eval_every", 500, "Validation (and image panel) interval in steps.")
    define("integer", "checkpoint_every", 500, "Checkpoint interval in steps.")
    define("enum", "strategy", "default", "tf.distribute strategy: default (one device), mirrored "
           "(all GPUs of this machine) or multi_worker (machines configured by TF_CONFIG).",
           list(STRATEGIES))
    define("integer", "steps_per_execution", 10, "Optimizer steps per call of the compiled training "
           "function (a loop inside one tf.function; saves per-step Python overhead).")
    define("bool", "jit_compile", False, "Compile the training step with XLA (single device; the "
           "resampler then uses its pure-TF twin inside the compiled step).")
    define("bool", "mixed_precision", False, "mixed_float16 compute in the regressor; the B-spline "
           "field and the resampling stay float32 (meant for GPUs; works but is slow on CPU).")


def parse_int_list(text):
    """``"32"`` -> ``32``; ``"16,32,64"`` -> ``[16, 32, 64]``; ``""`` -> ``None``.

    Parameters
    ----------
    text : str or int
    """
    if isinstance(text, int):
        return text
    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    if not parts:
        return None
    try:
        values = [int(t) for t in parts]
    except ValueError:
        raise ValueError(f"expected an int or a comma list of ints, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def flags_dict():
    """The parsed values of every flag defined with :func:`define_flag`, as a JSON-able dict."""
    return {name: flags.FLAGS[name].value for name in sorted(_DEFINED)}


def apply_preset(presets, name):
    """Set the flags of preset ``name`` that were not given on the command line.

    Parameters
    ----------
    presets : dict
        ``name -> {flag: value}``.
    name : str
        ``""`` for none.
    """
    if not name:
        return
    if name not in presets:
        raise ValueError(f"--preset={name}: choose one of {sorted(presets)}")
    for flag, value in presets[name].items():
        if not flags.FLAGS[flag].present:
            flags.FLAGS[flag].value = value


def run_experiment(run, defaults, errors=(), presets=None):
    """Command-line entry of an experiment: defaults, flag parsing, clean errors.

    Applies ``defaults`` to the shared flags, parses the command line with
    ``absl.app`` and calls ``run(flags_dict())``.  Expected failures (missing
    or corrupt data, bad flag values, a diverged run, and ``errors``) print
    ``error: ...`` and exit with status 1 instead of a traceback.

    Parameters
    ----------
    run : callable
        ``config -> anything``.
    defaults : dict
        Flag defaults of this experiment (``flag_name=value``), applied before parsing.
    errors : tuple of exception types
        Experiment-specific expected errors.
    presets : dict or None
        ``name -> {flag: value}`` selected by a ``--preset`` flag of the experiment:
        applied after parsing to the flags not given on the command line.
    """
    expected = (FileNotFoundError, ValueError, TrainingDivergedError) + tuple(errors)

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        try:
            if presets:
                apply_preset(presets, flags.FLAGS["preset"].value)
            run(flags_dict())
        except expected as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        return 0

    for name, value in defaults.items():
        flags.FLAGS.set_default(name, value)
    app.run(lambda argv: sys.exit(main(argv)))


def regressor_setting(value):
    """A regressor width / convolution-count flag value for :class:`dirnet_tf.DIRNet`:
    ``"auto"`` as it is (the regressor's rule), otherwise :func:`parse_int_list`."""
    if str(value).strip().lower() == "auto":
        return "auto"
    return parse_int_list(value)


def build_dirnet(image_shape, config, channels=1, boundary="border"):
    """The DIRNet described by the shared flags in ``config``: regressor and objective.

    Parameters
    ----------
    image_shape : sequence of int
        Spatial image size.
    config : dict
        Flag values (:func:`flags_dict`): ``grid_spacing``, ``filters``,
        ``pointwise_filters``, ``convs_per_level``, ``batch_norm``, ``passes``,
        ``similarity``, ``bending_weight``, ``folding_weight``, ``stages``, ``bounded``,
        ``symmetric``, ``normalize_inputs``, ``inverse_consistency_weight``.
    channels : int
        Image channels.
    boundary : str
        Resampling boundary mode.
    """
    return DIRNet(tuple(image_shape), config["grid_spacing"], boundary=boundary, channels=channels,
                  filters=regressor_setting(config["filters"]),
                  pointwise_filters=parse_int_list(config.get("pointwise_filters", "")),
                  convs_per_level=regressor_setting(config.get("convs_per_level", "1")),
                  batch_norm=bool(config.get("batch_norm", False)),
                  passes=int(config.get("passes", 1)),
                  similarity=config.get("similarity", "ncc"),
                  bending_weight=float(config.get("bending_weight", 0.0)),
                  folding_weight=float(config.get("folding_weight", 0.0)),
                  stages=parse_stages(config.get("stages", "")),
                  bounded=bool(config.get("bounded", False)), symmetric=bool(config.get("symmetric", False)),
                  normalize_inputs=bool(config.get("normalize_inputs", False)),
                  inverse_consistency_weight=float(config.get("inverse_consistency_weight", 0.0)))


def parse_stages(text):
    """``"affine,8,4"`` -> ``["affine", 8, 4]``; empty -> ``None`` (one stage at --grid_spacing)."""
    parts = [t.strip().lower() for t in str(text or "").split(",") if t.strip()]
    if not parts:
        return None
    try:
        return [p if p == "affine" else int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--stages={text}: give 'affine' and/or B-spline grid spacings (powers of two), "
                         "e.g. --stages=affine,8,4") from None


def trainer_from_config(config, image_shape, sampler, strategy=None, validation=None, channels=1,
                        panel_pairs=8, model_fn=None):
    """A :class:`Trainer` of :func:`build_dirnet` set up from the shared experiment flags.

    Parameters
    ----------
    config : dict
        Flag values (:func:`define_flags`).
    image_shape : sequence of int
        Spatial image size.
    sampler : callable
        ``step -> global batch dict`` (see :func:`dirnet_tf.pairs.same_group_pair_sampler`).
    strategy : tf.distribute.Strategy or None
    validation : dict or None
        ``{"fixed", "moving"}`` validation pairs for model selection.
    channels : int
        Image channels.
    panel_pairs : int or sequence of int
        Validation pairs of the TensorBoard image panel (see :class:`Trainer`).
    model_fn : callable or None
        Builds the model (default: :func:`build_dirnet` of ``config``).
    """
    return Trainer(
        model_fn or (lambda: build_dirnet(image_shape, config, channels=channels)), sampler,
        logdir=config["logdir"], steps=config["steps"], batch_size=config["batch_size"],
        learning_rate=config["learning_rate"], lr_schedule=config["lr_schedule"], strategy=strategy,
        mixed_precision=config["mixed_precision"], validation=validation,
        log_every=config["log_every"], eval_every=config["eval_every"],
        checkpoint_every=config["checkpoint_every"], config=config, resume=config["resume"],
        seed=config["seed"], steps_per_execution=config.get("steps_per_execution", 10),
        jit_compile=config.get("jit_compile", False), panel_pairs=panel_pairs)


def train_or_restore(trainer, config):
    """Train (or, with ``export_only``, restore the last checkpoint), then select.

    With ``select_best`` the chief loads the best validation checkpoint (other
    workers do not export, so they skip it rather than race the chief's writes).
    A nonzero ``inference_passes`` then sets the model's regressor passes for
    export and evaluation.

    Parameters
    ----------
    trainer : Trainer
    config : dict
        Flag values: ``export_only``, ``select_best``, ``logdir``.

    Returns
    -------
    ``(summary, train_seconds)``: the training summary (empty with
    ``export_only``) and the training wall-clock time (None with ``export_only``).
    """
    start = time.perf_counter()
    summary = {}
    if config["export_only"]:
        path = trainer.restore()
        if path is None:
            raise FileNotFoundError(f"--export_only: no checkpoint in {config['logdir']}; train first")
        trainer.print(f"[export] restored {path}")
    else:
        summary = trainer.train()
    train_seconds = None if config["export_only"] else time.perf_counter() - start
    if config.get("select_best") and trainer.is_chief:
        best = trainer.restore_best()
        if best:
            trainer.print(f"[select] using the best validation checkpoint {best}")
    passes = int(config.get("inference_passes") or 0)
    if passes and passes != trainer.model.passes:
        trainer.print(f"[select] exporting and evaluating with {passes} regressor passes "
                      f"(trained with {trainer.model.passes})")
        trainer.model.passes = passes
    return summary, train_seconds


def export(trainer, config, image_shape, channels=1, **metadata):
    """Export the trainer's model as a SavedModel to ``config["export_dir"]`` with its metadata.

    The metadata (``assets/dirnet.json``) records what a user of the export needs:
    image shape and channels, grid spacing, boundary mode, regressor passes, the
    flags and the library version, for a model of composed steps the ``steps``
    (:func:`dirnet_tf.inference.step_metadata`), plus the experiment's own ``metadata``.

    Returns
    -------
    str
        The export directory.
    """
    model = trainer.model
    spacing = [int(v) for v in model.grid_spacing]  # the finest B-spline stage's
    record = {"image_shape": list(image_shape), "channels": int(channels),
              "grid_spacing": spacing[0] if len(set(spacing)) == 1 else spacing, "boundary": model.boundary,
              "passes": model.passes, "flags": config, "dirnet_tf_version": dirnet_tf.__version__}
    if model.step_layout() is not None:
        # export_saved_model adds the composed steps in order (``steps``: kind, grid spacing and the
        # serving output holding each step's parameters), from which a transform export builds the chain.
        record.update(stages=model.stages, bounded=model.bounded, symmetric=model.symmetric,
                      normalize_inputs=model.normalize_inputs)
    record.update(metadata)
    export_dir = export_saved_model(model, config["export_dir"], image_shape, channels, record)
    print(f"[export] SavedModel written to {export_dir}", flush=True)
    return export_dir


def run_record(trainer, summary, train_seconds, export_dir):
    """What every ``metrics.json`` records about the run that produced the model.

    Parameters
    ----------
    trainer : Trainer
    summary : dict
        :meth:`Trainer.train`'s summary (empty when only exported).
    train_seconds : float or None
    export_dir : str
    """
    import tensorflow as tf

    best = summary.get("best_validation_ncc")
    if best is None and trainer.best_ncc > -float("inf"):
        best = float(trainer.best_ncc)
    return {"model": export_dir, "step": int(trainer.step.numpy()), "best_validation_ncc": best,
            "train_seconds": train_seconds, "train_steps_per_second": summary.get("steps_per_second"),
            "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
            "replicas": trainer.strategy.num_replicas_in_sync}


def write_metrics(config, metrics):
    """Write ``metrics`` to ``metrics.json`` in ``config["logdir"]`` (atomically); returns the path."""
    return write_json(os.path.join(config["logdir"], "metrics.json"), metrics)


class Run:
    """What :func:`train_and_export` produced: the trainer, its summary, the export (or None)."""

    def __init__(self, trainer, summary, train_seconds, export_dir):
        self.trainer, self.summary, self.train_seconds, self.export_dir = trainer, summary, train_seconds, export_dir


def train_and_export(config, image_shape, sampler, validation=None, strategy=None, channels=1, panel_pairs=8,
                     **metadata):
    """Everything between an experiment's data and its evaluation, the same for every experiment.

    Builds the trainer (:func:`trainer_from_config`), trains or restores and selects
    (:func:`train_or_restore`; with ``--stagewise`` :func:`train_stagewise`), and on the chief exports (:func:`export`, with ``metadata``)
    unless the ``export`` flag is off.

    Returns
    -------
    Run
        ``export_dir`` is None where nothing was exported (not the chief, or ``--noexport``).
    """
    if config.get("stagewise") and len([s for s in parse_stages(config.get("stages")) or () if s != "affine"]) > 1:
        trainer, summary, train_seconds = train_stagewise(config, image_shape, sampler, validation, strategy,
                                                          channels, panel_pairs)
    else:
        trainer = trainer_from_config(config, image_shape, sampler, strategy, validation, channels=channels,
                                      panel_pairs=panel_pairs)
        summary, train_seconds = train_or_restore(trainer, config)
    export_dir = None
    if trainer.is_chief and (config.get("export", True) or config.get("export_only")):
        export_dir = export(trainer, config, image_shape, channels, **metadata)
    return Run(trainer, summary, train_seconds, export_dir)


def train_stagewise(config, image_shape, sampler, validation=None, strategy=None, channels=1, panel_pairs=8):
    """Train the ``--stages`` one after another instead of end to end.

    One phase per B-spline stage (an affine stage joins the B-spline stage after it), each with
    ``steps / K`` steps (the last one the remainder) in ``LOGDIR/stageK``: phase k trains a model
    of the stages up to its B-spline stage whose earlier stages hold the weights the previous
    phase selected, frozen, so only the new stage learns.  Each phase resumes and selects its
    best validation checkpoint like a normal run.

    Returns
    -------
    tuple
        ``(trainer of the last phase, its summary, training seconds of all phases)``.
    """
    stages = parse_stages(config.get("stages"))
    # A phase ends at every B-spline stage (an affine stage is trained with the B-spline stage after it).
    ends = [k + 1 for k, stage in enumerate(stages) if stage != "affine"]
    count = len(ends)
    steps = [int(config["steps"]) // count] * count
    steps[-1] += int(config["steps"]) - sum(steps)
    frozen, seconds = [], 0.0
    for k in range(count):
        phase = dict(config, stages=",".join(str(s) for s in stages[:ends[k]]), steps=steps[k],
                     logdir=os.path.join(config["logdir"], f"stage{k + 1}"))

        def model_fn(phase=phase, frozen=frozen):
            model = build_dirnet(image_shape, phase, channels=channels)
            for layers, weights in zip(model.stage_layers(), frozen):
                for layer, values in zip(layers, weights):
                    layer.set_weights(values)
                    layer.trainable = False
            return model

        trainer = trainer_from_config(phase, image_shape, sampler, strategy, validation, channels=channels,
                                      panel_pairs=panel_pairs, model_fn=model_fn)
        trainer.print(f"[stagewise] phase {k + 1}/{count} (stages {phase['stages']}): {steps[k]} steps in "
                      f"{phase['logdir']}" + (", the earlier stages frozen" if k else ""))
        summary, phase_seconds = train_or_restore(trainer, phase)
        seconds += phase_seconds or 0.0
        frozen = [[layer.get_weights() for layer in layers] for layers in trainer.model.stage_layers()]
    return trainer, summary, (None if config.get("export_only") else seconds)


def record_metrics(config, run, metrics, **extra):
    """Add :func:`run_record` and ``extra`` to ``metrics`` and write ``metrics.json``; returns its path."""
    metrics.update(run_record(run.trainer, run.summary, run.train_seconds, run.export_dir), **extra)
    return write_metrics(config, metrics)
