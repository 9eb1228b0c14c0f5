"""Training DIRNet from a :class:`~dirnet_tf.config.TrainConfig`: :func:`train` and its parts.

* :func:`train` -- the whole run of ``python -m experiments.train``: read a collection of
  images, split and pair them (:mod:`dirnet_tf.train_data`), train (or resume, or only export),
  select the best validation checkpoint, export a SavedModel, evaluate it on the test pairs
  (:mod:`dirnet_tf.evaluation`) and write ``metrics.json``, ``eval_pairs.json``,
  ``skipped.json`` and ``registration.png`` to ``logdir``.  ``dirnet_tf.train`` is this function.
* :func:`train_and_export` -- the same for a command that brings its own data (a pair sampler and
  validation pairs): build the model and trainer, train end to end or stage-wise, select, export.
* :func:`build_dirnet`, :func:`make_trainer`, :func:`train_or_restore`, :func:`train_stagewise`,
  :func:`export_model` -- the parts; :func:`run_record` / :func:`record_metrics` /
  :func:`write_metrics` -- what every ``metrics.json`` records about the run.

Example::

    import dirnet_tf
    from dirnet_tf.config import TrainConfig

    config = TrainConfig(images="my_pngs/", steps=2000, logdir="runs/mine", export_dir="exports/mine")
    metrics = dirnet_tf.train(config)       # the folding-free default model; PRESETS["paper"]: the paper's
"""

import os
import time

from dirnet_tf import train_data
from dirnet_tf.config import TrainConfig, parse_floats, parse_int_list, regressor_setting, resolve_stages
from dirnet_tf.files import write_json

__all__ = ["train", "train_with_report", "train_and_export", "TrainedModel", "as_config", "build_dirnet",
           "make_trainer", "train_or_restore", "train_stagewise", "export_model", "run_record",
           "record_metrics", "write_metrics"]


def as_config(config):
    """``config`` as a :class:`TrainConfig` (a dict of settings is converted; keys that are not
    settings are kept in ``extra``)."""
    if isinstance(config, TrainConfig):
        return config
    return TrainConfig.from_dict(config, extra_ok=True)


def build_dirnet(config, image_shape, channels=1, boundary="border"):
    """The :class:`dirnet_tf.DIRNet` of ``config`` (regressor and objective) for ``image_shape``.

    Parameters
    ----------
    config : TrainConfig
        ``grid_spacing``, ``stages`` (``"auto"``: :func:`dirnet_tf.config.default_stages` of
        ``image_shape``), ``filters``, ``pointwise_filters``, ``convs_per_level``, ``batch_norm``,
        ``passes``, ``bounded``, ``symmetric``, ``normalize_inputs``, ``similarity``,
        ``bending_weight``, ``folding_weight``, ``inverse_consistency_weight``.
    image_shape : sequence of int
        Spatial image size (voxels).
    channels : int
    boundary : str
        Resampling boundary mode.
    """
    from dirnet_tf.model import DIRNet

    config = as_config(config)
    return DIRNet(tuple(image_shape), config.grid_spacing, boundary=boundary, channels=channels,
                  filters=regressor_setting(config.filters),
                  pointwise_filters=parse_int_list(config.pointwise_filters),
                  convs_per_level=regressor_setting(config.convs_per_level),
                  batch_norm=bool(config.batch_norm), passes=int(config.passes), similarity=config.similarity,
                  bending_weight=float(config.bending_weight), folding_weight=float(config.folding_weight),
                  stages=resolve_stages(config.stages, image_shape), bounded=bool(config.bounded),
                  symmetric=bool(config.symmetric), normalize_inputs=bool(config.normalize_inputs),
                  inverse_consistency_weight=float(config.inverse_consistency_weight))


def make_trainer(config, image_shape, sampler, strategy=None, validation=None, channels=1, panel_pairs=8,
                 model_fn=None):
    """A :class:`dirnet_tf.trainer.Trainer` of :func:`build_dirnet` set up from ``config``.

    Parameters
    ----------
    config : TrainConfig
    image_shape : sequence of int
        Spatial image size.
    sampler : callable
        ``step -> global batch dict`` (see :func:`dirnet_tf.pairs.same_group_pair_sampler`).
    strategy : tf.distribute.Strategy or None
    validation : dict or None
        ``{"fixed", "moving"}`` validation pairs for model selection.
    channels : int
    panel_pairs : int or sequence of int
        Validation pairs of the TensorBoard image panel (see :class:`Trainer`).
    model_fn : callable or None
        Builds the model (default: :func:`build_dirnet` of ``config``).
    """
    from dirnet_tf.trainer import Trainer

    config = as_config(config)
    return Trainer(
        model_fn or (lambda: build_dirnet(config, image_shape, channels=channels)), sampler,
        logdir=config.logdir, steps=config.steps, batch_size=config.batch_size,
        learning_rate=config.learning_rate, lr_schedule=config.lr_schedule, strategy=strategy,
        mixed_precision=config.mixed_precision, validation=validation, log_every=config.log_every,
        eval_every=config.eval_every, checkpoint_every=config.checkpoint_every, config=config.to_dict(),
        resume=config.resume, seed=config.seed, steps_per_execution=config.steps_per_execution,
        jit_compile=config.jit_compile, panel_pairs=panel_pairs)


def train_or_restore(trainer, config):
    """Train (or, with ``export_only``, restore the last checkpoint), then select.

    With ``select_best`` the chief loads the best validation checkpoint (other workers do not
    export, so they skip it rather than race the chief's writes).  A nonzero
    ``inference_passes`` then sets the model's regressor passes for export and evaluation.

    Returns
    -------
    tuple
        ``(summary, train_seconds)``: the training summary (empty with ``export_only``) and the
        training wall-clock time in seconds (None with ``export_only``).
    """
    config = as_config(config)
    start = time.perf_counter()
    summary = {}
    if config.export_only:
        path = trainer.restore()
        if path is None:
            raise FileNotFoundError(f"--export_only: no checkpoint in {config.logdir}; train first")
        trainer.print(f"[export] restored {path}")
    else:
        summary = trainer.train()
    train_seconds = None if config.export_only else time.perf_counter() - start
    if config.select_best and trainer.is_chief:
        best = trainer.restore_best()
        if best:
            trainer.print(f"[select] using the best validation checkpoint {best}")
    passes = int(config.inference_passes or 0)
    if passes and passes != trainer.model.passes:
        trainer.print(f"[select] exporting and evaluating with {passes} regressor passes "
                      f"(trained with {trainer.model.passes})")
        trainer.model.passes = passes
    return summary, train_seconds


def train_stagewise(config, image_shape, sampler, validation=None, strategy=None, channels=1, panel_pairs=8):
    """Train the stages one after another instead of end to end.

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
    config = as_config(config)
    stages = resolve_stages(config.stages, image_shape)
    # A phase ends at every B-spline stage (an affine stage is trained with the B-spline stage after it).
    ends = [k + 1 for k, stage in enumerate(stages) if stage != "affine"]
    count = len(ends)
    steps = [int(config.steps) // count] * count
    steps[-1] += int(config.steps) - sum(steps)
    frozen, seconds = [], 0.0
    for k in range(count):
        phase = config.replace(stages=",".join(str(s) for s in stages[:ends[k]]), steps=steps[k],
                               logdir=os.path.join(config.logdir, f"stage{k + 1}"))

        def model_fn(phase=phase, frozen=frozen):
            model = build_dirnet(phase, image_shape, channels=channels)
            for layers, weights in zip(model.stage_layers(), frozen):
                for layer, values in zip(layers, weights):
                    layer.set_weights(values)
                    layer.trainable = False
            return model

        trainer = make_trainer(phase, image_shape, sampler, strategy, validation, channels=channels,
                               panel_pairs=panel_pairs, model_fn=model_fn)
        trainer.print(f"[stagewise] phase {k + 1}/{count} (stages {phase.stages}): {steps[k]} steps in "
                      f"{phase.logdir}" + (", the earlier stages frozen" if k else ""))
        summary, phase_seconds = train_or_restore(trainer, phase)
        seconds += phase_seconds or 0.0
        frozen = [[layer.get_weights() for layer in layers] for layers in trainer.model.stage_layers()]
    return trainer, summary, (None if config.export_only else seconds)


def export_model(trainer, config, image_shape, channels=1, **metadata):
    """Export the trainer's model as a SavedModel to ``config.export_dir`` with its metadata.

    The metadata (``assets/dirnet.json``, :func:`dirnet_tf.export_metadata.model_metadata`) holds
    image shape and channels, grid spacing, boundary, passes, the composed steps, the library
    version, ``default_spacing`` (mm, for formats without a voxel size; None when not set),
    ``config`` (:meth:`TrainConfig.to_dict`) and the caller's ``metadata`` (e.g. ``model_grid``, ``spacing_mm``, ``displacement_units``).

    Returns
    -------
    str
        The export directory.
    """
    from dirnet_tf.export_metadata import model_metadata
    from dirnet_tf.inference import export_saved_model

    config = as_config(config)
    record = config.to_dict()
    info = model_metadata(trainer.model, image_shape, channels, config=record,
                          default_spacing=parse_floats(config.default_spacing, "default_spacing"), **metadata)
    export_dir = export_saved_model(trainer.model, config.export_dir, image_shape, channels, info)
    print(f"[export] SavedModel written to {export_dir}", flush=True)
    return export_dir


class TrainedModel:
    """What :func:`train_and_export` produced.

    Attributes
    ----------
    trainer : dirnet_tf.trainer.Trainer
        Its ``model`` is the selected model.
    summary : dict
        :meth:`Trainer.train`'s summary (empty when only exported).
    train_seconds : float or None
    export_dir : str or None
        None where nothing was exported (not the chief, or ``export`` off).
    """

    def __init__(self, trainer, summary, train_seconds, export_dir):
        self.trainer, self.summary, self.train_seconds, self.export_dir = trainer, summary, train_seconds, export_dir


def train_and_export(config, image_shape, sampler, validation=None, strategy=None, channels=1, panel_pairs=8,
                     **metadata):
    """Everything between a command's data and its evaluation.

    Builds the trainer (:func:`make_trainer`), trains or restores and selects
    (:func:`train_or_restore`; with ``stagewise`` and more than one B-spline stage
    :func:`train_stagewise`), and on the chief exports (:func:`export_model`, with ``metadata``)
    unless ``export`` is off (``export_only`` always exports).

    Returns
    -------
    TrainedModel
    """
    config = as_config(config).validate()
    stages = resolve_stages(config.stages, image_shape) or ()
    if config.stagewise and len([s for s in stages if s != "affine"]) > 1:
        trainer, summary, train_seconds = train_stagewise(config, image_shape, sampler, validation, strategy,
                                                          channels, panel_pairs)
    else:
        trainer = make_trainer(config, image_shape, sampler, strategy, validation, channels=channels,
                               panel_pairs=panel_pairs)
        summary, train_seconds = train_or_restore(trainer, config)
    export_dir = None
    if trainer.is_chief and (config.export or config.export_only):
        export_dir = export_model(trainer, config, image_shape, channels, **metadata)
    return TrainedModel(trainer, summary, train_seconds, export_dir)


def run_record(trainer, summary, train_seconds, export_dir):
    """What every ``metrics.json`` records about the run that produced the model: the export,
    step, best validation NCC, training seconds and steps per second, device and replicas."""
    import tensorflow as tf

    best = summary.get("best_validation_ncc")
    if best is None and trainer.best_ncc > -float("inf"):
        best = float(trainer.best_ncc)
    return {"model": export_dir, "step": int(trainer.step.numpy()), "best_validation_ncc": best,
            "train_seconds": train_seconds, "train_steps_per_second": summary.get("steps_per_second"),
            "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
            "replicas": trainer.strategy.num_replicas_in_sync}


def write_metrics(logdir, metrics):
    """Write ``metrics`` to ``logdir/metrics.json`` (atomically); returns the path."""
    return write_json(os.path.join(logdir, "metrics.json"), metrics)


def record_metrics(config, trained, metrics, **extra):
    """Add :func:`run_record` of ``trained`` (a :class:`TrainedModel`) and ``extra`` to ``metrics``
    and write ``metrics.json`` in ``config.logdir``; returns its path."""
    config = as_config(config)
    metrics.update(run_record(trained.trainer, trained.summary, trained.train_seconds, trained.export_dir), **extra)
    return write_metrics(config.logdir, metrics)


def train(config=None, logdir=None, export_dir=None):
    """Train, export and evaluate DIRNet on a collection of images: ``python -m experiments.train``.

    Parameters
    ----------
    config : TrainConfig or dict or None
        The settings (None: ``TrainConfig()``; ``images`` must be set).  A dict is converted with
        :meth:`TrainConfig.from_dict` (keys that are not settings are recorded in ``extra``).
    logdir, export_dir : str or None
        Override ``config.logdir`` / ``config.export_dir``.

    Returns
    -------
    dict
        The metrics written to ``logdir/metrics.json`` (NCC, folding, displacement in voxels of the
        model grid and mm, label scores, synthetic endpoint errors, run record; see
        :func:`dirnet_tf.evaluation.evaluate_test_pairs`), or the training summary when nothing is
        evaluated (``evaluate`` off, nothing exported, or no test pairs).
    """
    from dirnet_tf.evaluation import evaluate_test_pairs
    from dirnet_tf.inference import load_export
    from dirnet_tf.plotting import save_test_figure
    from dirnet_tf.trainer import make_strategy

    config = as_config(config if config is not None else TrainConfig())
    if logdir is not None or export_dir is not None:
        config = config.replace(logdir=config.logdir if logdir is None else str(logdir),
                                export_dir=config.export_dir if export_dir is None else str(export_dir))
    config.validate()
    strategy = make_strategy(config.strategy)
    data = train_data.load_collection(config)
    grid = data["grid"]
    plan = train_data.make_splits_and_pairs(config, data)
    sizes = {k: len(v) for k, v in plan["splits"].items()}
    synthetic_mode = plan["mode"] == "synthetic"
    count = train_data.pair_count
    print(f"[data] {len(data['names'])} images on the model grid {grid.shape} voxels at {grid.spacing} mm; "
          f"split {sizes}; {count(plan['valid'])} validation and {count(plan['test'])} test pairs", flush=True)
    for split, what in (("valid", "no model selection: the last checkpoint is exported"),
                        ("test", "nothing will be evaluated")):
        if not count(plan[split]) and (split == "valid" or config.evaluate):
            print(f"[data] the {split} split holds {sizes[split]} image(s) and no pair: {what}; give more images, "
                  f"another --split (now {config.split}) or --split_within_groups", flush=True)
    if synthetic_mode:
        deformation = plan["deformation"]
        print(f"[data] synthetic pairs: random B-spline fields up to {deformation.magnitude:g} mm per axis, control "
              f"points every {deformation.control_spacing} voxels ({deformation.squarings()} squarings); "
              f"validation / test pairs from {plan['sources']['valid']} / {plan['sources']['test']} with "
              "held-out fields", flush=True)
    sampler = train_data.make_sampler(config, data, plan)
    validation = train_data.validation_set(data, plan)
    # Written only once the arguments proved usable: a run that fails on them leaves nothing behind.
    os.makedirs(config.logdir, exist_ok=True)
    write_json(os.path.join(config.logdir, "skipped.json"), [{"path": p, "reason": r} for p, r in data["skipped"]])
    trained = train_and_export(config, grid.shape, sampler, validation, strategy, model_grid=grid.to_dict(),
                               spacing_mm=list(grid.spacing),
                               displacement_units="voxels of the model grid, ij (array) order",
                               pairs=config.pairs, images=config.images)
    if trained.export_dir is None or not config.evaluate or not count(plan["test"]):
        if trained.export_dir is not None and config.evaluate:
            print(f"[eval] no test pairs (the test split holds {sizes['test']} image(s)); nothing evaluated",
                  flush=True)
        return trained.summary
    served, _ = load_export(trained.export_dir)
    names = data["names"]
    if synthetic_mode:
        pairs_path = train_data.write_synthetic_pairs(config, plan, names)
    else:
        pairs_path = write_json(os.path.join(config.logdir, "eval_pairs.json"),
                                {"split": "test", "pairs": [[names[a], names[b]] for a, b in plan["test"]]})
    result, pred = evaluate_test_pairs(served, data, plan["test"], trained.trainer.model.boundary, grid.spacing,
                                       config.timing_batch_size)
    if synthetic_mode:
        result["synthetic"] = dict(plan["deformation"].describe(), test_images=plan["sources"]["test"],
                                   valid_images=plan["sources"]["valid"], test_seed=int(config.split_seed),
                                   true_fields=os.path.join(config.logdir, train_data.SYNTHETIC_FIELDS))
    metrics_path = record_metrics(config, trained, result, eval_pairs=pairs_path, images=config.images,
                                  split=sizes, skipped=len(data["skipped"]))
    figure = save_test_figure(os.path.join(config.logdir, "registration.png"), pred, names, plan["test"])
    print(f"[eval] {result['pairs']} test pairs: NCC {result['ncc_before']:.4f} -> {result['ncc_after']:.4f}  "
          f"folding {100 * result['folding_fraction']:.3f}%  mean |u| {result['mean_displacement_voxels']:.2f} "
          f"voxels = {result['mean_displacement_mm']:.2f} mm  {result['ms_per_pair']:.2f} ms/pair", flush=True)
    if synthetic_mode:
        inside = (f"; inside the mask {result['epe_mm_mask']:.3f} mm "
                  f"(true {result['true_displacement_mm_mask']:.3f} mm)" if "epe_mm_mask" in result else "")
        print(f"[eval]   endpoint error {result['epe_mm']:.3f} mm "
              f"(true displacement {result['true_displacement_mm']:.3f} mm){inside}", flush=True)
    for value, s in result.get("labels", {}).items():
        print(f"[eval]   label {value}: Dice {s['dice_before']:.3f} -> {s['dice_after']:.3f}  "
              f"HD95 {s['hd95_mm_after']:.2f} mm  MAD {s['mad_mm_after']:.2f} mm", flush=True)
    print(f"[eval] wrote {metrics_path}, {pairs_path} and {figure}", flush=True)
    return result


def train_with_report(config, name, report, print_summary, figures, portable_path):
    """:func:`train`, then a worked example's own report on the export (echo, brain examples).

    Parameters
    ----------
    config : TrainConfig or dict
        The settings, the example's inputs already prepared.
    name : str
        Key of the report in ``metrics.json`` and prefix of the console lines.
    report : callable
        ``result of train -> dict`` (with ``seconds``: the whole command's time).
    print_summary : callable
        Prints the report.
    figures : str
        The report's figures, for the closing line.
    portable_path : callable
        How ``metrics.json`` records the images and the model.

    Returns
    -------
    dict
        The metrics written to ``metrics.json``: :func:`train`'s plus ``name``.
    """
    config = as_config(config)
    result = train(config)
    if not config.evaluate or "pairs" not in result:
        return result
    result[name] = report(result)
    result.update(images=portable_path(config.images), model=portable_path(result["model"]))
    path = write_metrics(config.logdir, result)
    print_summary(result[name])
    print(f"[{name}] wrote {path}, {figures} in {config.logdir} ({result[name]['seconds']:.0f} s)", flush=True)
    return result
