"""The training configuration: :class:`TrainConfig`, its presets and the default-stage rule.

Every setting of a training run -- model, objective, optimisation, the run directory, data,
pairing, split, synthetic pairs and evaluation -- is one field of :class:`TrainConfig`.  The
field names are the flag names of ``python -m experiments.train`` (``--steps`` is
``TrainConfig.steps``) and the values have the flags' types (comma lists stay strings, e.g.
``stages="8,4,2"``, ``shape="96,112,96"``), so :meth:`TrainConfig.to_dict` is what a run records in
``flags.json`` and in its export's metadata (``config``).

This module imports neither TensorFlow nor absl: a command defines its flags from
:func:`fields_of` (help text, type, choices) before TensorFlow is loaded.
"""

import dataclasses
import math

__all__ = ["TrainConfig", "PRESETS", "GROUPS", "SHARED_GROUPS", "fields_of", "default_stages",
           "resolve_stages", "parse_stages", "parse_int_list", "parse_floats", "regressor_setting",
           "MIN_CONTROL_INTERVALS", "FINEST_STAGE", "MAX_STAGES"]

# The default-stage rule (see default_stages).
MIN_CONTROL_INTERVALS = 3
FINEST_STAGE = {2: 2, 3: 4}
MAX_STAGES = 3

# Field groups, in the order a command's help lists them.  SHARED_GROUPS are the flags every
# command defines; a command that reads its own data (MNIST, the cardiac MRI) leaves out the rest.
GROUPS = ("model", "objective", "optimisation", "run", "data", "pairing", "split", "synthetic", "evaluation")
SHARED_GROUPS = ("model", "objective", "optimisation", "run")

SIMILARITIES = ("ncc", "lncc", "mse", "mi")  # dirnet_tf.losses.SIMILARITIES (checked by a test)
STRATEGIES = ("default", "mirrored", "multi_worker")  # dirnet_tf.trainer.STRATEGIES (checked by a test)
NORMALIZE_MODES = ("percentile", "minmax", "none")  # dirnet_tf.preprocessing.NORMALIZE_MODES (checked)


def _field(default, group, help_text, choices=None):
    return dataclasses.field(default=default, metadata={"group": group, "help": help_text, "choices": choices})


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (:func:`dirnet_tf.train`); the defaults are the folding-free model.

    Field names and value types are those of ``python -m experiments.train``'s flags (their help text is
    the field's ``metadata["help"]``, see :func:`fields_of`).  Lengths are in voxels of the model grid
    unless a name says ``mm``; comma lists are strings, in array (ij) axis order.

    **Default model** (``TrainConfig()``): the folding-free composed model -- B-spline stages chosen
    from the model grid (``stages="auto"``), two bounded, symmetric passes per stage (every step below
    the injectivity bound, steps composed; identical images give the identity), standardised regressor
    inputs, a small bending energy (0.01), a folding penalty (1.0) and an inverse-consistency loss
    (0.03), the stages trained one after another (``stagewise``).  ``PRESETS["paper"]`` gives the
    paper's model: one stage at ``grid_spacing``, one unconstrained pass, no regulariser.

    **Default-stage rule** (``stages="auto"``, :func:`default_stages`): with ``m`` the smallest axis of
    the model grid (voxels), the coarsest stage is the largest power of two ``s`` with at least
    ``MIN_CONTROL_INTERVALS`` (3) control intervals across that axis (``m / s >= 3``); the stages halve
    from there down to 2 voxels (2-D) or 4 voxels (3-D), at most ``MAX_STAGES`` (3) of them (the finest
    ones are dropped).  28x28 gives ``8,4,2``; 64x64 ``16,8,4``; 96x112x96 ``32,16,8``; 48x48x48
    ``16,8,4``; 16x16 ``4,2``; a grid too small for the finest spacing gets one stage at the coarsest.

    **Extra settings**: a command's own flags (e.g. MNIST's ``digits``) are kept in ``extra`` so that
    :meth:`to_dict` records them with the run; the library never reads them.
    """

    # -- model ---------------------------------------------------------------------------------
    grid_spacing: int = _field(8, "model", "B-spline control-point spacing in pixels (a power of two).")
    stages: str = _field("auto", "model", "Transform stages, composed: e.g. 'affine,8,4' (an affine stage, then "
                         "B-spline stages at these grid spacings, each with --passes passes); 'auto' (the "
                         "default): B-spline stages chosen from the model grid (powers of two from the coarsest "
                         "spacing with at least 3 control intervals across the smallest axis, halving down to "
                         "2 voxels in 2-D or 4 in 3-D, at most 3: 8,4,2 on 28x28); empty: one B-spline stage "
                         "at --grid_spacing (the paper).")
    filters: str = _field("auto", "model", "Width of the regressor's 3x3 convolutions: one int, a comma "
                          "list with one per resolution level (log2(grid_spacing) + 1 of them), or 'auto' "
                          "(8, 16, then 32 at every coarser level).")
    pointwise_filters: str = _field("", "model", "Widths of the regressor's hidden 1x1 convolutions, a comma "
                                    "list (empty: the regressor's default, two of the last 3x3 width).")
    convs_per_level: str = _field("auto", "model", "3x3 convolutions per resolution level of the regressor: "
                                  "one int, a comma list with one per level (log2(grid_spacing) + 1 of them), or "
                                  "'auto' (1 per level, 2 at the coarsest).")
    batch_norm: bool = _field(False, "model", "Batch normalisation in the regressor.")
    passes: int = _field(2, "model", "Regressor passes in training: each later pass adds a "
                         "control-point update predicted from the fixed image and the current warped image "
                         "(shared weights).")
    inference_passes: int = _field(0, "model", "Regressor passes of the exported and evaluated "
                                   "model (0: the same as --passes). A model trained with passes >= 2 keeps "
                                   "improving with a pass or two more at inference.")
    bounded: bool = _field(True, "model", "Folding-free by construction: every step below the injectivity "
                           "bound, steps composed.")
    symmetric: bool = _field(True, "model", "Every step is r(fixed, warped) - r(warped, fixed): identical "
                             "images give the identity.")
    normalize_inputs: bool = _field(True, "model", "The regressors see standardised images (intensity scale "
                                    "does not change the field).")
    # -- objective -----------------------------------------------------------------------------
    similarity: str = _field("ncc", "objective", "Similarity loss: ncc (global, the paper), lncc (local, "
                             "9-pixel windows), mse or mi (mutual information, for pairs of different contrast).",
                             SIMILARITIES)
    bending_weight: float = _field(0.01, "objective", "Weight of the B-spline bending energy (0 = paper).")
    folding_weight: float = _field(1.0, "objective", "Weight of the Jacobian folding penalty (0 = paper).")
    inverse_consistency_weight: float = _field(
        0.03, "objective", "Weight of the inverse-consistency loss: in training every pair is also registered "
        "the other way round (a batch of 2 x --batch_size registrations) and the residual of composing the two "
        "fields (pixels) is penalised (0 = paper).")
    # -- optimisation --------------------------------------------------------------------------
    steps: int = _field(2000, "optimisation", "Number of training steps (optimizer updates).")
    batch_size: int = _field(8, "optimisation", "Global batch size (pairs per step, split across replicas).")
    learning_rate: float = _field(1e-3, "optimisation", "Peak learning rate of Adam.")
    lr_schedule: str = _field("cosine", "optimisation", "Learning-rate schedule: constant or cosine decay "
                              "(with a short linear warm-up).", ("constant", "cosine"))
    stagewise: bool = _field(True, "optimisation", "Train the B-spline --stages one after another (the steps "
                             "split evenly; each trained with the earlier ones frozen, in LOGDIR/stageK; an "
                             "affine stage with the first) instead of end to end.")
    seed: int = _field(0, "optimisation", "Seed of weight initialisation and of the training pair stream.")
    strategy: str = _field("default", "optimisation", "tf.distribute strategy: default (one device), mirrored "
                           "(all GPUs of this machine) or multi_worker (machines configured by TF_CONFIG).",
                           STRATEGIES)
    steps_per_execution: int = _field(10, "optimisation", "Optimizer steps per call of the compiled training "
                                      "function (a loop inside one tf.function; saves per-step Python overhead).")
    jit_compile: bool = _field(False, "optimisation", "Compile the training step with XLA (single device; the "
                               "resampler then uses its pure-TF twin inside the compiled step).")
    mixed_precision: bool = _field(False, "optimisation", "mixed_float16 compute in the regressor; the "
                                   "B-spline field and the resampling stay float32 (meant for GPUs; works but "
                                   "is slow on CPU).")
    # -- run -----------------------------------------------------------------------------------
    logdir: str = _field("runs/train", "run", "Checkpoints, flags.json, TensorBoard events, metrics.")
    export_dir: str = _field("exports/train", "run", "Where the SavedModel is written.")
    resume: bool = _field(True, "run", "Continue from the last checkpoint in --logdir if there is one.")
    export_only: bool = _field(False, "run", "Only export the SavedModel from the checkpoint in --logdir.")
    log_every: int = _field(50, "run", "Console/TensorBoard scalar interval in steps.")
    eval_every: int = _field(250, "run", "Validation (and image panel) interval in steps.")
    checkpoint_every: int = _field(250, "run", "Checkpoint interval in steps.")
    # -- data ----------------------------------------------------------------------------------
    images: str = _field(None, "data", "Images: a folder, a glob, a .csv/.txt list, one file or FILE.h5:/dataset.")
    labels: str = _field(None, "data", "Label maps for evaluation: a folder of files named like the images "
                         "(or one file for a single image file).")
    mask: str = _field(None, "data", "A mask on the images' own grid (any readable format; non-zero = use).")
    ndim: int = _field(0, "data", "2 or 3: whether a 3-D array is a stack of 2-D images or a volume "
                       "(0: volumes).")
    shape: str = _field("", "data", "Model grid in voxels per array axis, e.g. 96,112,96 (default: the first "
                        "image's grid).")
    spacing: str = _field("", "data", "Model grid spacing in mm per array axis, one value or one per axis "
                          "(default: the first image's).")
    default_spacing: str = _field("", "data", "Voxel size in mm for formats without one (PNG, NPY, HDF5; "
                                  "default 1).")
    normalize: str = _field("percentile", "data", "Intensity normalisation: 1st-99th percentile -> [0, 1], "
                            "min-max, or none.", NORMALIZE_MODES)
    # -- pairing -------------------------------------------------------------------------------
    pairs: str = _field("random", "pairing", "Pairing: random, within_group, sequence, atlas:PATH, list:CSV or "
                        "synthetic (an image and a copy deformed by a known random field).")
    max_frame_gap: int = _field(1, "pairing", "--pairs=sequence: frames at most this far apart.")
    # -- split ---------------------------------------------------------------------------------
    split: str = _field("0.8,0.1,0.1", "split", "Train,valid,test fractions (of groups).")
    split_seed: int = _field(0, "split", "Seed of the split.")
    split_within_groups: bool = _field(False, "split", "Cut every group in time (first frames train, then "
                                       "valid, then test) instead of splitting by group.")
    # -- synthetic -----------------------------------------------------------------------------
    synthetic_magnitude: float = _field(4.0, "synthetic", "--pairs=synthetic: largest displacement per axis of "
                                        "the random fields, mm.")
    synthetic_spacing: float = _field(32.0, "synthetic", "--pairs=synthetic: control-point spacing of the random "
                                      "B-spline fields, mm (larger: smoother).")
    synthetic_gamma: float = _field(0.1, "synthetic", "--pairs=synthetic: standard deviation of log(gamma) of the "
                                    "random intensity gamma of each image.")
    synthetic_scale: float = _field(0.1, "synthetic", "--pairs=synthetic: largest relative change of each "
                                    "image's intensity scale.")
    synthetic_noise: float = _field(0.01, "synthetic", "--pairs=synthetic: standard deviation of added Gaussian "
                                    "noise, relative to the image's intensity range.")
    synthetic_augment: float = _field(0.0, "synthetic", "--pairs=synthetic: largest displacement per axis (mm) "
                                      "of a random deformation applied to the image before each pair is made "
                                      "(0: off).")
    # -- evaluation ----------------------------------------------------------------------------
    eval_pairs: int = _field(50, "evaluation", "Most validation and test pairs (each).")
    select_best: bool = _field(True, "evaluation", "Export the checkpoint with the best validation NCC.")
    evaluate: bool = _field(True, "evaluation", "Evaluate the export on the test pairs.")
    export: bool = _field(True, "evaluation", "Write the SavedModel after training.")
    timing_batch_size: int = _field(8, "evaluation", "Batch size of the time-per-pair measurement.")
    # -- a command's own settings (recorded, never read by the library) -------------------------
    extra: dict = dataclasses.field(default_factory=dict, metadata={"group": None, "help": None, "choices": None})

    def to_dict(self):
        """The settings as a flat JSON-able dict (``extra`` merged in): what ``flags.json`` records."""
        out = {f.name: getattr(self, f.name) for f in fields_of()}
        out.update(self.extra)
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, values, extra_ok=False):
        """A config from ``values`` (e.g. :meth:`to_dict`, or a command's flag values).

        Missing keys keep their defaults.  Keys that are not fields raise :class:`ValueError`
        naming them, unless ``extra_ok`` (a command's own flags), when they go to ``extra``.
        """
        names = {f.name for f in fields_of()}
        values = dict(values)
        extra = dict(values.pop("extra", None) or {})
        unknown = sorted(k for k in values if k not in names)
        if unknown and not extra_ok:
            raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; the settings are "
                             f"{', '.join(sorted(names))}")
        extra.update((k, values.pop(k)) for k in unknown)
        return cls(**values, extra=extra)

    def replace(self, **changes):
        """A copy with ``changes`` (field names; unknown names raise :class:`ValueError`)."""
        return TrainConfig.from_dict(dict(self.to_dict(), **changes), extra_ok=bool(self.extra))

    def with_preset(self, name):
        """A copy with :data:`PRESETS` ``[name]`` applied (``""``: unchanged)."""
        if not name:
            return self
        if name not in PRESETS:
            raise ValueError(f"--preset={name}: choose one of {sorted(PRESETS)}")
        return self.replace(**PRESETS[name])

    def validate(self):
        """Check the settings a run cannot start with (before anything is read or written).

        Raises
        ------
        ValueError
            ``steps`` < 1 (unless ``export_only``), ``batch_size`` < 1, ``eval_pairs`` < 1; the
            message names the flag and what to give.
        """
        if not self.export_only and int(self.steps) < 1:
            raise ValueError(f"--steps={self.steps}: give the number of training steps, a whole number >= 1 "
                             "(--export_only exports the last checkpoint without training)")
        if int(self.batch_size) < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if int(self.eval_pairs) < 1:
            raise ValueError(f"--eval_pairs={self.eval_pairs}: give a whole number >= 1")
        return self

    def stage_list(self, image_shape):
        """The model's stages for images of ``image_shape`` (voxels): see :func:`resolve_stages`."""
        return resolve_stages(self.stages, image_shape)


def fields_of(group=None):
    """The :class:`TrainConfig` fields (``dataclasses.Field``; ``metadata``: ``group``, ``help``,
    ``choices``), of one ``group`` or all, without ``extra``."""
    return [f for f in dataclasses.fields(TrainConfig)
            if f.name != "extra" and (group is None or f.metadata["group"] == group)]


# Named settings.  "paper": the model of de Vos et al. (one B-spline stage at grid_spacing, one
# regressor pass, no constraint, no regulariser) -- every model/objective setting whose default is
# not the paper's set back to it (the regressor widths stay "auto").
PRESETS = {
    "paper": dict(stages="", passes=1, inference_passes=0, stagewise=False, bounded=False, symmetric=False,
                  normalize_inputs=False, bending_weight=0.0, folding_weight=0.0, inverse_consistency_weight=0.0),
}


def default_stages(image_shape):
    """The B-spline stages of ``stages="auto"`` for a model grid of ``image_shape`` voxels.

    The coarsest stage is the largest power of two ``s`` with ``min(image_shape) / s >=
    MIN_CONTROL_INTERVALS``; the stages halve down to ``FINEST_STAGE`` (2 voxels in 2-D, 4 in 3-D), at
    most ``MAX_STAGES`` of them.  A grid too small for the finest spacing gets one stage at the
    coarsest (at least 1).

    Parameters
    ----------
    image_shape : sequence of int
        Spatial size of the model grid (voxels).

    Returns
    -------
    list of int
        Grid spacings, coarse to fine (28x28 -> ``[8, 4, 2]``).
    """
    shape = [int(n) for n in image_shape]
    if not shape or min(shape) < 1:
        raise ValueError(f"model grid {tuple(shape)}: every axis needs at least one voxel")
    coarsest = 2 ** max(0, int(math.floor(math.log2(max(1.0, min(shape) / MIN_CONTROL_INTERVALS)))))
    finest = max(FINEST_STAGE.get(len(shape), 2), coarsest // 2 ** (MAX_STAGES - 1))
    stages = [coarsest]
    while stages[-1] // 2 >= finest:
        stages.append(stages[-1] // 2)
    return stages


def parse_stages(text):
    """``"affine,8,4"`` -> ``["affine", 8, 4]``; empty -> ``None`` (one stage at ``grid_spacing``).

    ``"auto"`` is returned as it is (resolved with the model grid by :func:`resolve_stages`).
    """
    if isinstance(text, (list, tuple)):
        return list(text) or None
    parts = [t.strip().lower() for t in str(text or "").split(",") if t.strip()]
    if not parts:
        return None
    if parts == ["auto"]:
        return "auto"
    try:
        return [p if p == "affine" else int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--stages={text}: give 'affine' and/or B-spline grid spacings (powers of two), "
                         "e.g. --stages=affine,8,4") from None


def resolve_stages(text, image_shape):
    """The stages of ``text`` for a model grid of ``image_shape``: ``"auto"`` by :func:`default_stages`,
    otherwise :func:`parse_stages` (None: one stage at ``grid_spacing``)."""
    stages = parse_stages(text)
    return default_stages(image_shape) if stages == "auto" else stages


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


def parse_floats(text, what):
    """``"1.5"`` -> ``1.5``; ``"2,1,1"`` -> ``(2.0, 1.0, 1.0)``; empty -> None.

    Parameters
    ----------
    text : str or number
    what : str
        The setting's name, for the message of :class:`dirnet_tf.readers.InputError`.
    """
    if not str(text).strip():
        return None
    try:
        values = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        from dirnet_tf.readers import InputError

        raise InputError(f"--{what}={text}: give numbers separated by commas") from None
    return values[0] if len(values) == 1 else tuple(values)


def regressor_setting(value):
    """A regressor width / convolution-count setting for :class:`dirnet_tf.DIRNet`:
    ``"auto"`` as it is (the regressor's rule), otherwise :func:`parse_int_list`."""
    if str(value).strip().lower() == "auto":
        return "auto"
    return parse_int_list(value)
