"""Training machinery shared by the experiments (MNIST, cardiac).

The pieces, each usable on its own:

* **flags** -- :func:`define_flags` defines the flags every experiment has
  (``--steps``, ``--batch_size``, ``--learning_rate``, ``--grid_spacing``,
  ``--similarity``, ``--bending_weight``, ``--folding_weight``, ``--logdir``,
  ``--export_dir``, ``--seed``, ``--resume``, ``--export_only``,
  ``--strategy``, ``--mixed_precision``, ...) exactly once; experiments set their
  own defaults with :func:`set_flag_defaults`.  :func:`dump_flags` writes them to
  ``flags.json`` beside the checkpoints.
* **input** -- :func:`same_group_pair_sampler` draws random pairs of images that
  share a group (a digit class, the frames of one MRI slice).  A *sampler* maps a
  step number to one global batch, deterministically from ``(seed, step)``, so a
  resumed run continues the exact data stream.  :func:`make_input_iterator`
  turns it into a ``tf.data`` pipeline, split across the replicas of a
  ``tf.distribute`` strategy.
* **losses** -- :func:`make_registration_loss`: similarity + optional bending and
  folding penalties, per pair.
* **training** -- :class:`Trainer`: builds the model and optimizer under
  ``strategy.scope()``, a small ``tf.function`` train step, checkpoint manager
  around a step counter (resume), NaN guard, console progress, one TensorBoard
  writer (scalars and image panels, chief only), validation with keeping the best
  checkpoint.
* **evaluation** -- :func:`predict`, :func:`time_per_pair`,
  :func:`registration_figure`.
* **export** -- :func:`export_saved_model`: an atomic SavedModel with a
  ``serving_default`` signature taking keyword ``fixed`` and ``moving``.
"""

import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid

import keras
import numpy as np
import tensorflow as tf

from dirnet_tf import losses as _losses

STRATEGIES = ("default", "mirrored", "multi_worker")
SIMILARITIES = {"ncc": "ncc", "lncc": "local_ncc", "mse": "mse"}


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --------------------------------------------------------------------------- flags


def define_flag(kind, name, default, help_text, *args):
    """Define an absl flag unless a flag of that name exists (experiments share one FLAGS).

    Parameters
    ----------
    kind : str
        ``"integer"``, ``"float"``, ``"string"``, ``"bool"`` or ``"enum"``.
    name, default, help_text
        As for ``absl.flags.DEFINE_*``.
    *args
        The enum values for ``"enum"``.
    """
    from absl import flags

    if name in flags.FLAGS:
        return
    definer = getattr(flags, "DEFINE_" + kind)
    if args:
        definer(name, default, *args, help_text)
    else:
        definer(name, default, help_text)


def define_flags():
    """Define the flags shared by every experiment (idempotent).

    Call at import time of an experiment module; experiment-specific defaults are
    applied with :func:`set_flag_defaults` before ``app.run``.
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
    define("enum", "similarity", "ncc", "Similarity loss.", list(SIMILARITIES))
    define("float", "bending_weight", 0.0, "Weight of the B-spline bending energy (0 = paper).")
    define("float", "folding_weight", 0.0, "Weight of the Jacobian folding penalty (0 = paper).")
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


def set_flag_defaults(**defaults):
    """Override default values of defined flags (before parsing).

    Parameters
    ----------
    **defaults
        ``flag_name=value``.
    """
    from absl import flags

    for name, value in defaults.items():
        flags.FLAGS.set_default(name, value)


def flags_dict(names=None):
    """The parsed flag values as a JSON-able dict.

    Parameters
    ----------
    names : iterable of str or None
        Flags to include; default all flags defined by the main module and this one.
    """
    from absl import flags

    f = flags.FLAGS
    if names is None:
        names = set()
        for module, fls in f.flags_by_module_dict().items():
            if module in (__name__, sys.argv[0]) or "experiments" in module:
                names.update(fl.name for fl in fls)
    return {n: f[n].value for n in sorted(names) if n in f}


def dump_flags(directory, config, filename="flags.json"):
    """Write ``config`` (a flag dict) as JSON into ``directory`` (atomically).

    Parameters
    ----------
    directory : str
        Target directory (created).
    config : dict
        JSON-able values.
    filename : str
        File name.

    Returns
    -------
    str
        The written path.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- strategy


def make_strategy(name="default"):
    """Create the ``tf.distribute`` strategy named by ``--strategy``.

    Parameters
    ----------
    name : str
        ``"default"`` (the default strategy: one device, GPU if TF sees one),
        ``"mirrored"`` (``MirroredStrategy`` over the local GPUs, or the CPU) or
        ``"multi_worker"`` (``MultiWorkerMirroredStrategy`` configured by ``TF_CONFIG``;
        create it before any other TensorFlow op runs).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def worker_info(strategy):
    """``(is_chief, task_type, task_id)`` of this process in ``strategy``'s cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True, None, 0
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    cluster = resolver.cluster_spec().as_dict()
    if task_type is None:
        return True, None, 0
    if "chief" in cluster:
        return task_type == "chief", task_type, task_id
    return (task_type == "worker" and task_id == 0), task_type, task_id


# --------------------------------------------------------------------------- input


def same_group_pair_sampler(images, groups, batch_size, seed=0):
    """Sampler of random (fixed, moving) pairs of distinct images with the same group.

    The fixed image is uniform over all images whose group has at least two
    members; the moving image is uniform over the *other* members of its group.
    Batch ``step`` depends only on ``(seed, step)``.

    Parameters
    ----------
    images : array ``[N, *spatial, C]``
        All candidate images (kept as one constant tensor).
    groups : array of int ``[N]``
        Group of each image (e.g. digit label, or slice id for time frames).
    batch_size : int
        Pairs per batch (the global batch).
    seed : int
        Stream seed.

    Returns
    -------
    callable
        ``sample(step) -> {"fixed": [B, *spatial, C], "moving": [B, *spatial, C]}``
        usable inside ``tf.data`` (``step`` an int64 scalar tensor).
    """
    images = np.asarray(images, dtype=np.float32)
    groups = np.asarray(groups).reshape(-1)
    if images.shape[0] != groups.shape[0]:
        raise ValueError(f"images {images.shape} and groups {groups.shape} differ in length")
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    uniq, start, count = np.unique(sorted_groups, return_index=True, return_counts=True)
    group_of_pos = np.searchsorted(uniq, sorted_groups)
    eligible = np.flatnonzero(count[group_of_pos] >= 2)
    if eligible.size == 0:
        raise ValueError(f"no group has two images to pair (groups {uniq.tolist()}, sizes {count.tolist()})")
    images_t = tf.constant(images[order])
    eligible_t = tf.constant(eligible, tf.int64)
    group_t = tf.constant(group_of_pos, tf.int64)
    start_t = tf.constant(start, tf.int64)
    count_t = tf.constant(count, tf.int64)
    seed = int(seed)
    batch_size = int(batch_size)

    def sample(step):
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
        keys = tf.random.experimental.stateless_split(key, 2)
        pick = tf.random.stateless_uniform([batch_size], keys[0], minval=0,
                                           maxval=tf.size(eligible_t, out_type=tf.int64), dtype=tf.int64)
        fixed_pos = tf.gather(eligible_t, pick)
        g = tf.gather(group_t, fixed_pos)
        n = tf.gather(count_t, g)
        s = tf.gather(start_t, g)
        u = tf.random.stateless_uniform([batch_size], keys[1], dtype=tf.float64)
        other = tf.minimum(tf.cast(u * tf.cast(n - 1, tf.float64), tf.int64), n - 2)
        moving_pos = s + (fixed_pos - s + 1 + other) % n
        return {"fixed": tf.gather(images_t, fixed_pos), "moving": tf.gather(images_t, moving_pos)}

    return sample


def make_input_iterator(sampler, global_batch_size, start_step=0, strategy=None, prefetch=2):
    """Iterator over training batches ``start_step, start_step + 1, ...``.

    Parameters
    ----------
    sampler : callable
        ``sample(step) -> dict`` of global-batch tensors (deterministic in ``step``).
    global_batch_size : int
        Leading size of the sampler's tensors.
    start_step : int
        First step (a resumed run passes its restored step count).
    strategy : tf.distribute.Strategy or None
        With several replicas, every replica gets its consecutive slice of the
        same global batch, so the union over replicas equals the single-device
        batch.
    prefetch : int
        Batches prepared ahead.

    Returns
    -------
    iterator
        Of dicts (or per-replica values of dicts under a multi-replica strategy).
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ValueError(
            f"--batch_size={global_batch_size} is not divisible by the {replicas} replicas of the strategy"
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True

    def steps():
        return tf.data.Dataset.range(int(start_step), 2**62)

    if replicas == 1 and not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        ds = steps().map(sampler, num_parallel_calls=2).prefetch(prefetch).with_options(options)
        return iter(strategy.experimental_distribute_dataset(ds))

    def dataset_fn(ctx):
        per_replica = ctx.get_per_replica_batch_size(global_batch_size)
        local = per_replica * (ctx.num_replicas_in_sync // ctx.num_input_pipelines)
        first = ctx.input_pipeline_id * local

        def local_slice(batch):
            return {k: v[first:first + local] for k, v in batch.items()}

        ds = steps().map(sampler, num_parallel_calls=2).map(local_slice)
        ds = ds.unbatch().batch(per_replica, drop_remainder=True)
        return ds.prefetch(prefetch).with_options(options)

    return iter(strategy.distribute_datasets_from_function(dataset_fn))


def validation_batches(fixed, moving, batch_size=256):
    """A ``tf.data.Dataset`` of fixed validation pairs (in order, batched).

    Parameters
    ----------
    fixed, moving : arrays ``[N, *spatial, C]``.
    batch_size : int
    """
    return tf.data.Dataset.from_tensor_slices(
        {"fixed": np.asarray(fixed, np.float32), "moving": np.asarray(moving, np.float32)}
    ).batch(batch_size)


# --------------------------------------------------------------------------- losses


def make_registration_loss(similarity="ncc", bending_weight=0.0, folding_weight=0.0,
                           image_shape=None, grid_spacing=None):
    """Per-pair training loss of a registration model.

    ``loss = similarity(fixed, warped) + bending_weight * bending_energy(control_points)
    + folding_weight * folding_penalty(displacement)``.

    Parameters
    ----------
    similarity : str
        ``"ncc"``, ``"lncc"`` (local NCC) or ``"mse"`` (also the names of
        :func:`dirnet_tf.losses.get`).
    bending_weight, folding_weight : float
        Regulariser weights (0 = the paper's setting).
    image_shape, grid_spacing
        Needed when ``bending_weight > 0``.

    Returns
    -------
    callable
        ``loss(batch, outputs) -> (per_pair_loss [B], {name: per_pair_value [B]})``
        where ``outputs`` is the model's dict; the dict has ``ncc`` always.
    """
    sim_name = SIMILARITIES.get(similarity, similarity)
    sim_fn = _losses.get(sim_name)
    if bending_weight and (image_shape is None or grid_spacing is None):
        raise ValueError("bending_weight > 0 needs image_shape and grid_spacing")

    def loss(batch, outputs):
        fixed = tf.cast(batch["fixed"], tf.float32)
        warped = tf.cast(outputs["warped"], tf.float32)
        values = sim_fn(fixed, warped, reduction="none")
        parts = {"similarity": values, "ncc": _losses.ncc(fixed, warped)}
        total = values
        if bending_weight:
            be = _losses.bending_energy(tf.cast(outputs["control_points"], tf.float32), image_shape,
                                        grid_spacing, reduction="none")
            parts["bending_energy"] = be
            total = total + bending_weight * be
        if folding_weight:
            fp = _losses.folding_penalty(tf.cast(outputs["displacement"], tf.float32), reduction="none")
            parts["folding_penalty"] = fp
            total = total + folding_weight * fp
        return total, parts

    return loss


def keep_float32(model):
    """Keep the B-spline transformer and the resampler of a model in float32.

    Under the ``mixed_float16`` policy every layer would compute in float16; the
    displacement field (pixel positions) and the compiled resampler (float32/float64
    only) must stay float32.  Their inputs are cast on entry by Keras.

    Parameters
    ----------
    model : keras.Model
        Searched recursively for :class:`dirnet_tf.layers.BSplineTransformer` and
        :class:`dirnet_tf.layers.Resampler`.

    Returns
    -------
    list of keras.layers.Layer
        The layers switched to float32.
    """
    from dirnet_tf.layers import BSplineTransformer, Resampler

    changed = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, (BSplineTransformer, Resampler)) and layer.compute_dtype != "float32":
            layer.dtype_policy = "float32"
            changed.append(layer)
    return changed


# --------------------------------------------------------------------------- figures


def _to_numpy(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def registration_figure(fixed, moving, warped, displacement, titles=None, grid_step=2, max_cols=8):
    """Matplotlib figure like the paper's: rows fixed / moving / warped / deformation grid.

    The last row draws the sampling grid ``x + u(x)`` (every ``grid_step`` pixels) over
    the (faded) moving image: where each fixed-image pixel takes its value from in the
    moving image. 2-D images only.

    Parameters
    ----------
    fixed, moving, warped : arrays ``[N, H, W, C]`` (first channel shown).
    displacement : array ``[N, H, W, 2]`` in pixels, ij order.
    titles : list of str or None
        Column titles.
    grid_step : int
        Spacing of the drawn grid lines in pixels.
    max_cols : int
        At most this many pairs.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fixed, moving, warped, displacement = (_to_numpy(a) for a in (fixed, moving, warped, displacement))
    n = min(len(fixed), max_cols)
    fig, axes = plt.subplots(4, n, figsize=(1.6 * n, 6.6), squeeze=False)
    rows = ("fixed", "moving", "warped", "grid on moving")
    h, w = fixed.shape[1:3]
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for c in range(n):
        for r, img in enumerate((fixed[c], moving[c], warped[c], moving[c])):
            ax = axes[r, c]
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=max(1.0, float(img.max())),
                      alpha=0.35 if r == 3 else 1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(rows[r])
        si = ii + displacement[c, ..., 0]
        sj = jj + displacement[c, ..., 1]
        ax = axes[3, c]
        for k in range(0, h, grid_step):
            ax.plot(sj[k, :], si[k, :], color="tab:red", lw=0.6)
        for k in range(0, w, grid_step):
            ax.plot(sj[:, k], si[:, k], color="tab:red", lw=0.6)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        if titles is not None:
            axes[0, c].set_title(titles[c], fontsize=8)
    fig.tight_layout()
    return fig


def figure_to_image(fig, dpi=80):
    """Render a matplotlib figure to a uint8 ``[1, H, W, 4]`` array (for ``tf.summary.image``)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return tf.image.decode_png(buf.getvalue(), channels=4)[None]


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Generic training loop for image-pair registration models.

    Parameters
    ----------
    model_fn : callable
        ``() -> keras.Model`` taking ``{"fixed", "moving"}`` and returning a dict with
        at least ``warped`` (DIRNet); called under ``strategy.scope()`` (and under the
        ``mixed_float16`` policy with ``mixed_precision``).
    loss_fn : callable
        ``(batch, outputs) -> (per_pair_loss [B], {name: per_pair [B]})``, e.g. from
        :func:`make_registration_loss`.
    sampler : callable
        ``step -> global batch dict`` (see :func:`same_group_pair_sampler`).
    logdir : str
        Checkpoints (``ckpt-N``), ``flags.json``, the best-validation checkpoint
        (``best/``) and TensorBoard events.
    steps : int
        Total optimizer steps.
    batch_size : int
        Global batch size.
    learning_rate : float
        Peak Adam learning rate.
    lr_schedule : str
        ``"constant"`` or ``"cosine"`` (linear warm-up over 2% of the steps, cosine decay
        to 1% of the peak).
    strategy : tf.distribute.Strategy or None
        Default: the current (default) strategy.
    mixed_precision : bool
        Build the model under ``mixed_float16`` with loss scaling.
    validation : dict or None
        ``{"fixed": array, "moving": array}`` pairs evaluated every ``eval_every`` steps;
        the best mean validation NCC is kept in ``logdir/best``.
    panel_size : int
        Validation pairs drawn in the TensorBoard image panel (2-D models).
    log_every, eval_every, checkpoint_every : int
        Intervals in steps.
    config : dict or None
        Flags dumped to ``flags.json`` beside the checkpoints.
    resume : bool
        Restore the latest checkpoint in ``logdir`` if there is one.
    seed : int
        ``keras.utils.set_random_seed`` before building the model.
    max_to_keep : int
        Checkpoints kept.
    print_fn : callable
        Progress output (default ``print`` with flush).
    steps_per_execution : int
        Optimizer steps run by one call of the compiled training function (a
        ``tf.range`` loop inside one ``tf.function``; calls never cross a
        logging, validation or checkpoint boundary).  Saves the per-step Python
        and synchronisation overhead; 1 gives the classic one-step loop.
    jit_compile : bool
        Compile the per-replica step (forward, loss, backward, optimizer
        update) with XLA.  Inside XLA the resampler uses its pure-TF twin
        (:mod:`dirnet_tf.resample_tf`), since custom ops cannot be compiled.
        Single-replica strategies only (the cross-replica gradient reduction
        cannot run inside an XLA cluster); ignored with a message otherwise.
    """

    def __init__(self, model_fn, loss_fn, sampler, logdir, steps, batch_size, learning_rate=1e-3,
                 lr_schedule="cosine", strategy=None, mixed_precision=False, validation=None,
                 panel_size=8, log_every=100, eval_every=500, checkpoint_every=500, config=None,
                 resume=True, seed=0, max_to_keep=3, print_fn=None, steps_per_execution=10,
                 jit_compile=False):
        self.strategy = strategy or tf.distribute.get_strategy()
        self.loss_fn = loss_fn
        self.sampler = sampler
        self.logdir = logdir
        self.total_steps = int(steps)
        self.batch_size = int(batch_size)
        self.log_every = max(1, int(log_every))
        self.eval_every = int(eval_every)
        self.checkpoint_every = int(checkpoint_every)
        self.config = dict(config or {})
        self.resume = bool(resume)
        self.panel_size = int(panel_size)
        self.print = print_fn or (lambda *a: print(*a, flush=True))
        self.is_chief, self.task_type, self.task_id = worker_info(self.strategy)
        self.mixed_precision = bool(mixed_precision)
        self.steps_per_execution = int(steps_per_execution)
        if self.steps_per_execution < 1:
            raise ValueError(f"steps_per_execution must be >= 1, got {steps_per_execution}")
        self.jit_compile = bool(jit_compile)
        if self.jit_compile and self.strategy.num_replicas_in_sync > 1:
            self.print(f"[train] --jit_compile ignored: the step of a {self.strategy.num_replicas_in_sync}"
                       "-replica strategy reduces gradients across replicas, which XLA cannot compile here")
            self.jit_compile = False
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.batch_size % self.strategy.num_replicas_in_sync:
            raise ValueError(f"--batch_size={self.batch_size} is not divisible by the "
                             f"{self.strategy.num_replicas_in_sync} replicas")
        if self.total_steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")

        keras.utils.set_random_seed(int(seed))
        if self.mixed_precision and not tf.config.list_physical_devices("GPU"):
            self.print("[train] --mixed_precision on a CPU: float16 is correct but slow here")
        policy = keras.mixed_precision.dtype_policy()
        with self.strategy.scope():
            try:
                if self.mixed_precision:
                    keras.mixed_precision.set_dtype_policy("mixed_float16")
                self.model = model_fn()
                if self.mixed_precision:
                    keep_float32(self.model)
            finally:
                keras.mixed_precision.set_dtype_policy(policy)
            schedule = learning_rate
            if lr_schedule == "cosine" and self.total_steps > 0:
                warmup = max(1, self.total_steps // 50)
                schedule = keras.optimizers.schedules.CosineDecay(
                    0.0, decay_steps=max(1, self.total_steps - warmup), alpha=0.01,
                    warmup_target=float(learning_rate), warmup_steps=warmup)
            elif lr_schedule not in ("constant", "cosine"):
                raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
            optimizer = keras.optimizers.Adam(learning_rate=schedule)
            if self.mixed_precision:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            self.optimizer = optimizer
            self._build()
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step)
        ckpt_dir = logdir if self.is_chief else os.path.join(
            logdir, f".worker-{self.task_type}-{self.task_id}-tmp")
        self._ckpt_dir = ckpt_dir
        self.manager = tf.train.CheckpointManager(self.checkpoint, ckpt_dir, max_to_keep=max_to_keep,
                                                  step_counter=self.step)
        self.best_checkpoint = tf.train.Checkpoint(model=self.model, step=self.step)
        self.best_manager = tf.train.CheckpointManager(
            self.best_checkpoint, os.path.join(ckpt_dir, "best"), max_to_keep=1, step_counter=self.step)
        self.best_ncc = -np.inf
        if validation is not None:
            self.validation = {k: np.asarray(validation[k], np.float32) for k in ("fixed", "moving")}
        else:
            self.validation = None
        self._writer = None
        self._train_step = None
        self._eval_step = None

    # ---------------------------------------------------------------- setup

    def _build(self):
        """Create model and optimizer variables (so checkpoints restore eagerly)."""
        sample = self.sampler(tf.constant(0, tf.int64))
        one = {k: v[:1] for k, v in sample.items()}
        self.model(one, training=False)
        self.optimizer.build(self.model.trainable_variables)

    @property
    def writer(self):
        """The single TensorBoard writer (a no-op writer on non-chief workers)."""
        if self._writer is None:
            if self.is_chief:
                self._writer = tf.summary.create_file_writer(self.logdir)
            else:
                self._writer = tf.summary.create_noop_writer()
        return self._writer

    def latest_checkpoint(self):
        """Latest checkpoint of the run: the chief's, in ``logdir`` (every worker restores it)."""
        return tf.train.latest_checkpoint(self.logdir)

    def restore(self, path=None):
        """Restore a checkpoint (default: the latest); returns its path or None."""
        path = path or self.latest_checkpoint()
        if path is None:
            return None
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as exc:
            raise ValueError(
                f"Cannot restore {path} into this model: {exc}. The flags differ from the run that "
                f"wrote it (see {os.path.join(self.logdir, 'flags.json')}); use another --logdir "
                "or --noresume."
            ) from exc
        return path

    def restore_best(self):
        """Load the model weights of the best validation checkpoint, if there is one."""
        path = tf.train.latest_checkpoint(os.path.join(self.logdir, "best"))
        if path is not None:
            self.best_checkpoint.restore(path).expect_partial()
        return path

    def _check_config(self):
        path = os.path.join(self.logdir, "flags.json")
        if not os.path.exists(path):
            return
        try:
            with open(path) as fh:
                previous = json.load(fh)
        except (OSError, ValueError):
            return
        ignore = {"steps", "resume", "export_only", "log_every", "eval_every", "checkpoint_every",
                  "steps_per_execution", "jit_compile"}
        changed = {k: (previous[k], v) for k, v in self.config.items()
                   if k in previous and previous[k] != v and k not in ignore}
        if changed:
            self.print(f"[train] resuming with changed flags (previous, now): {changed}")

    # ---------------------------------------------------------------- steps

    def _make_train_step(self):
        """``train_steps(iterator, n) -> (sums, count)``: up to ``n`` optimizer steps.

        ``sums`` holds the per-step means (loss and loss parts) summed over the
        ``count`` steps run; the loop stops early after the first step whose
        loss is not finite (``count`` then includes that step).
        """
        strategy = self.strategy
        model, optimizer, loss_fn = self.model, self.optimizer, self.loss_fn
        global_batch = float(self.batch_size)
        scale_loss = self.mixed_precision

        def replica_step(batch):
            with tf.GradientTape() as tape:
                outputs = model(batch, training=True)
                per_pair, parts = loss_fn(batch, outputs)
                loss = tf.reduce_sum(per_pair) / global_batch
                if model.losses:
                    loss += tf.add_n([tf.cast(x, tf.float32) for x in model.losses]) / strategy.num_replicas_in_sync
                scaled = optimizer.scale_loss(loss) if scale_loss else loss
            variables = model.trainable_variables
            grads = tape.gradient(scaled, variables)
            optimizer.apply_gradients(zip(grads, variables))
            sums = {k: tf.reduce_sum(tf.cast(v, tf.float32)) / global_batch for k, v in parts.items()}
            sums["loss"] = loss
            return sums

        if self.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)

        def one_step(iterator):
            results = strategy.run(replica_step, args=(next(iterator),))
            return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in results.items()}

        @tf.function
        def train_steps(iterator, n):
            sums = one_step(iterator)
            count = tf.constant(1, tf.int32)
            for _ in tf.range(1, n):
                if not tf.math.is_finite(sums["loss"]):
                    break
                sums = {k: v + r for (k, v), r in zip(sums.items(), one_step(iterator).values())}
                count += 1
            return sums, count

        return train_steps

    def _make_eval_step(self):
        model, loss_fn = self.model, self.loss_fn

        @tf.function
        def eval_step(batch):
            outputs = model(batch, training=False)
            per_pair, parts = loss_fn(batch, outputs)
            return per_pair, parts, outputs

        return eval_step

    def evaluate_validation(self, batch_size=256):
        """Mean loss/NCC (and the other loss parts) over the validation pairs.

        Returns
        -------
        tuple
            ``(metrics dict, first-batch outputs dict of numpy arrays)``.
        """
        if self._eval_step is None:
            self._eval_step = self._make_eval_step()
        totals, count, first = {}, 0, None
        for batch in validation_batches(self.validation["fixed"], self.validation["moving"], batch_size):
            per_pair, parts, outputs = self._eval_step(batch)
            n = int(per_pair.shape[0])
            for k, v in dict(parts, loss=per_pair).items():
                totals[k] = totals.get(k, 0.0) + float(tf.reduce_sum(v))
            count += n
            if first is None:
                first = {k: v.numpy() for k, v in outputs.items()}
        return {k: v / max(count, 1) for k, v in totals.items()}, first

    # ---------------------------------------------------------------- loop

    def save(self):
        """Save a checkpoint at the current step (every worker calls this; non-chief
        workers write into a temporary directory that is deleted)."""
        path = self.manager.save(checkpoint_number=int(self.step.numpy()))
        if not self.is_chief:
            shutil.rmtree(self._ckpt_dir, ignore_errors=True)
        return path

    def _validate_and_log(self, step):
        metrics, outputs = self.evaluate_validation()
        with self.writer.as_default(step=step):
            for k, v in metrics.items():
                tf.summary.scalar(f"validation/{k}", v)
            if self.is_chief and self.validation["fixed"].ndim == 4:
                n = min(self.panel_size, len(self.validation["fixed"]))
                if n and "displacement" in outputs:
                    fig = registration_figure(self.validation["fixed"][:n], self.validation["moving"][:n],
                                              outputs["warped"][:n], outputs["displacement"][:n])
                    tf.summary.image("validation/fixed_moving_warped_grid", figure_to_image(fig))
        self.writer.flush()
        improved = metrics.get("ncc", -np.inf) > self.best_ncc
        if improved:
            self.best_ncc = metrics["ncc"]
            self.best_manager.save(checkpoint_number=step)
            if not self.is_chief:
                shutil.rmtree(os.path.join(self._ckpt_dir, "best"), ignore_errors=True)
        self.print(f"[valid] step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
                   + ("  (best)" if improved else ""))
        return metrics

    def train(self):
        """Run (or resume) training up to ``steps``.

        Returns
        -------
        dict
            ``{"step", "resumed_from", "last_loss", "steps_per_second", "best_validation_ncc"}``.

        Raises
        ------
        TrainingDivergedError
            On a NaN/inf loss; no checkpoint is written for it, the last good one stays.
        """
        resumed_from = None
        if self.resume and self.latest_checkpoint():
            self._check_config()
            resumed_from = self.restore()
            self.print(f"[train] resumed from {resumed_from} at step {int(self.step.numpy())}")
            best = tf.train.latest_checkpoint(os.path.join(self.logdir, "best"))
            if best is not None:
                state = _read_best_state(self.logdir)
                self.best_ncc = state if state is not None else -np.inf
        elif not self.resume and self.latest_checkpoint():
            self.print(f"[train] --noresume: starting from scratch in {self.logdir} "
                       "(older checkpoints there are replaced)")
        if self.is_chief:
            dump_flags(self.logdir, self.config)
        start = int(self.step.numpy())
        if start >= self.total_steps:
            self.print(f"[train] already at step {start} >= --steps={self.total_steps}; nothing to train")
            return {"step": start, "resumed_from": resumed_from, "last_loss": None,
                    "steps_per_second": None, "best_validation_ncc": _finite(self.best_ncc)}
        if self._train_step is None:
            self._train_step = self._make_train_step()
        iterator = make_input_iterator(self.sampler, self.batch_size, start, self.strategy)
        t_start = time.perf_counter()
        t_log, step_log = t_start, start
        rate = None
        last = None
        sums, n_sums = {}, 0
        done = start
        while done < self.total_steps:
            n = self._steps_until_boundary(done)
            results, count = self._train_step(iterator, tf.constant(n, tf.int32))
            count = int(count)
            values = {k: float(v) for k, v in results.items()}
            if not math.isfinite(values["loss"]):
                good = self.latest_checkpoint()
                raise TrainingDivergedError(
                    f"The training loss became {values['loss']} at step {done + count}; training stopped. "
                    f"The last good checkpoint is kept: {good or 'none was written yet'}. "
                    "Try a lower --learning_rate (or fix the input data); rerunning resumes from it."
                )
            done += count
            self.step.assign(done)
            last = {k: v / count for k, v in values.items()}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            n_sums += count
            if done % self.log_every == 0 or done == self.total_steps:
                now = time.perf_counter()
                rate = (done - step_log) / max(now - t_log, 1e-9)
                t_log, step_log = now, done
                means = {k: v / n_sums for k, v in sums.items()}
                sums, n_sums = {}, 0
                lr = self._current_lr()
                eta = (self.total_steps - done) / max(rate, 1e-9)
                self.print(f"[train] step {done}/{self.total_steps}  loss {means['loss']:.4f}  "
                           + (f"ncc {means['ncc']:.4f}  " if "ncc" in means else "")
                           + f"lr {lr:.2e}  {rate:.2f} steps/s  ETA {_format_seconds(eta)}")
                with self.writer.as_default(step=done):
                    for k, v in means.items():
                        tf.summary.scalar(f"train/{k}", v)
                    tf.summary.scalar("train/learning_rate", lr)
                    tf.summary.scalar("train/steps_per_second", rate)
            if self.validation is not None and self.eval_every > 0 and (
                    done % self.eval_every == 0 or done == self.total_steps):
                self._validate_and_log(done)
                if self.is_chief:
                    _write_best_state(self.logdir, self.best_ncc)
            if (self.checkpoint_every > 0 and done % self.checkpoint_every == 0) or done == self.total_steps:
                self.save()
        self.writer.flush()
        elapsed = time.perf_counter() - t_start
        return {"step": int(self.step.numpy()), "resumed_from": resumed_from,
                "last_loss": last["loss"] if last else None,
                "steps_per_second": (self.total_steps - start) / max(elapsed, 1e-9),
                "best_validation_ncc": _finite(self.best_ncc)}

    def _steps_until_boundary(self, done):
        """Steps of the next call: up to ``steps_per_execution``, never past a logging,
        validation or checkpoint step, nor past the end."""
        n = min(self.steps_per_execution, self.total_steps - done)
        for every in (self.log_every, self.eval_every if self.validation is not None else 0,
                      self.checkpoint_every):
            if every > 0:
                n = min(n, every - done % every)
        return max(1, n)

    def _current_lr(self):
        opt = self.optimizer
        inner = getattr(opt, "inner_optimizer", opt)
        lr = inner.learning_rate
        return float(lr.numpy() if hasattr(lr, "numpy") else lr)


def run_experiment(run, defaults, errors=()):
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
        Flag defaults of this experiment (:func:`set_flag_defaults`).
    errors : tuple of exception types
        Experiment-specific expected errors.
    """
    from absl import app

    expected = (FileNotFoundError, ValueError, TrainingDivergedError) + tuple(errors)

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        try:
            run(flags_dict())
        except expected as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        return 0

    set_flag_defaults(**defaults)
    app.run(lambda argv: sys.exit(main(argv)))


AUTO_FILTERS = (8, 16, 32)


def auto_filters(levels):
    """The ``"auto"`` widths: ``AUTO_FILTERS`` for the finest levels, its last
    entry repeated for every coarser level."""
    return [AUTO_FILTERS[min(level, len(AUTO_FILTERS) - 1)] for level in range(levels)]


def auto_convs_per_level(levels):
    """The ``"auto"`` convolution counts: one per level, two at the coarsest."""
    return [1] * (levels - 1) + [2]


def regressor_levels(grid_spacing, value, auto):
    """Per-level regressor setting from a flag value.

    Parameters
    ----------
    grid_spacing : int
        Control-point spacing (a power of two): ``log2(s) + 1`` resolution levels.
    value : str or int
        ``"auto"``, one int, or a comma list of ints (see :func:`parse_int_list`).
    auto : callable
        The ``"auto"`` rule: number of levels -> list (:func:`auto_filters`,
        :func:`auto_convs_per_level`).

    Returns
    -------
    int or list of int
    """
    if str(value).strip().lower() != "auto":
        return parse_int_list(value)
    levels = int(round(math.log2(max(1, int(grid_spacing))))) + 1
    return list(auto(levels))


def build_dirnet(image_shape, config, channels=1, boundary="border"):
    """The DIRNet described by the shared regressor flags in ``config``.

    Parameters
    ----------
    image_shape : sequence of int
        Spatial image size.
    config : dict
        Flag values (:func:`flags_dict`): ``grid_spacing``, ``filters``,
        ``pointwise_filters``, ``convs_per_level``, ``batch_norm``,
        ``mixed_precision``.
    channels : int
        Image channels.
    boundary : str
        Resampling boundary mode.
    """
    from dirnet_tf.model import DIRNet

    model = DIRNet(tuple(image_shape), config["grid_spacing"], boundary=boundary, channels=channels,
                   filters=regressor_levels(config["grid_spacing"], config["filters"], auto_filters),
                   pointwise_filters=parse_int_list(config.get("pointwise_filters", "")),
                   convs_per_level=regressor_levels(config["grid_spacing"],
                                                    config.get("convs_per_level", "1"),
                                                    auto_convs_per_level),
                   batch_norm=bool(config.get("batch_norm", False)),
                   passes=int(config.get("passes", 1)))
    if config.get("mixed_precision"):
        keep_float32(model)
    return model


def trainer_from_config(config, image_shape, sampler, strategy=None, validation=None, channels=1):
    """A :class:`Trainer` of :func:`build_dirnet` set up from the shared experiment flags.

    Parameters
    ----------
    config : dict
        Flag values (:func:`define_flags`).
    image_shape : sequence of int
        Spatial image size.
    sampler : callable
        ``step -> global batch dict`` (see :func:`same_group_pair_sampler`).
    strategy : tf.distribute.Strategy or None
    validation : dict or None
        ``{"fixed", "moving"}`` validation pairs for model selection.
    channels : int
        Image channels.
    """
    loss = make_registration_loss(config["similarity"], config["bending_weight"],
                                  config["folding_weight"], image_shape, config["grid_spacing"])
    return Trainer(
        lambda: build_dirnet(image_shape, config, channels=channels), loss, sampler,
        logdir=config["logdir"], steps=config["steps"], batch_size=config["batch_size"],
        learning_rate=config["learning_rate"], lr_schedule=config["lr_schedule"], strategy=strategy,
        mixed_precision=config["mixed_precision"], validation=validation,
        log_every=config["log_every"], eval_every=config["eval_every"],
        checkpoint_every=config["checkpoint_every"], config=config, resume=config["resume"],
        seed=config["seed"], steps_per_execution=config.get("steps_per_execution", 10),
        jit_compile=config.get("jit_compile", False))


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


def _finite(x):
    return float(x) if np.isfinite(x) else None


def _read_best_state(logdir):
    try:
        with open(os.path.join(logdir, "best", "best.json")) as fh:
            return float(json.load(fh)["validation_ncc"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_best_state(logdir, value):
    if np.isfinite(value):
        dump_flags(os.path.join(logdir, "best"), {"validation_ncc": float(value)}, "best.json")


def _format_seconds(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# --------------------------------------------------------------------------- evaluation


def predict(fn, fixed, moving, batch_size=256):
    """Run a registration model over arrays in batches.

    Parameters
    ----------
    fn : callable
        A DIRNet-like ``keras.Model`` (called on ``{"fixed", "moving"}``) or a
        SavedModel signature (called with keywords ``fixed=``, ``moving=``).
    fixed, moving : arrays ``[N, *spatial, C]``.
    batch_size : int

    Returns
    -------
    dict
        ``warped`` and ``displacement`` as numpy arrays.
    """
    call = _as_pair_function(fn)
    outs = {"warped": [], "displacement": []}
    fixed = np.asarray(fixed, np.float32)
    moving = np.asarray(moving, np.float32)
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} must have the same shape")
    for i in range(0, len(fixed), batch_size):
        out = call(tf.constant(fixed[i:i + batch_size]), tf.constant(moving[i:i + batch_size]))
        for k in outs:
            outs[k].append(out[k].numpy())
    return {k: (np.concatenate(v) if v else np.zeros((0,) + fixed.shape[1:-1] + (
        fixed.ndim - 2 if k == "displacement" else fixed.shape[-1],), np.float32)) for k, v in outs.items()}


def as_pair_function(fn):
    """``fn`` as a callable ``(fixed, moving) -> {"warped", "displacement"}``.

    Parameters
    ----------
    fn : keras.Model or SavedModel signature
        A model (wrapped in a ``tf.function``) or a signature called with keywords.
    """
    if isinstance(fn, keras.Model):
        model = fn

        @tf.function(reduce_retracing=True)
        def call(fixed, moving):
            out = model({"fixed": fixed, "moving": moving}, training=False)
            return {"warped": out["warped"], "displacement": out["displacement"]}

        return call
    return lambda fixed, moving: fn(fixed=fixed, moving=moving)


_as_pair_function = as_pair_function


def time_per_pair(fn, fixed, moving, batch_size=256, repeats=7, warmup=2):
    """Milliseconds per pair of one-pass registration (median over repeats).

    Parameters
    ----------
    fn : callable
        As in :func:`predict`.
    fixed, moving : arrays ``[N, *spatial, C]``; the first ``batch_size`` pairs are used
        (tiled if fewer).
    batch_size : int
    repeats, warmup : int
        Timed and untimed calls.

    Returns
    -------
    dict
        ``{"ms_per_pair": median, "ms_per_pair_min", "batch_size", "repeats", "times_s"}``.
    """
    call = _as_pair_function(fn)
    reps = int(math.ceil(batch_size / max(1, len(fixed))))
    f = tf.constant(np.concatenate([np.asarray(fixed, np.float32)] * reps)[:batch_size])
    m = tf.constant(np.concatenate([np.asarray(moving, np.float32)] * reps)[:batch_size])
    for _ in range(warmup):
        _ = call(f, m)["warped"].numpy()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call(f, m)
        out["warped"].numpy()
        out["displacement"].numpy()
        times.append(time.perf_counter() - t0)
    times = np.asarray(times)
    return {"ms_per_pair": float(np.median(times) * 1e3 / batch_size),
            "ms_per_pair_min": float(times.min() * 1e3 / batch_size),
            "batch_size": int(batch_size), "repeats": int(repeats), "times_s": times.tolist()}


# --------------------------------------------------------------------------- export


class _ServingModule(tf.Module):
    def __init__(self, model, spec):
        super().__init__()
        self.model = model

        @tf.function(input_signature=[tf.TensorSpec(spec, tf.float32, name="fixed"),
                                      tf.TensorSpec(spec, tf.float32, name="moving")])
        def serve(fixed, moving):
            out = self.model({"fixed": fixed, "moving": moving}, training=False)
            return {"warped": tf.cast(out["warped"], tf.float32),
                    "displacement": tf.cast(out["displacement"], tf.float32)}

        self.serve = serve


def export_saved_model(model, export_dir, image_shape, channels=1, metadata=None):
    """Write ``model`` as a SavedModel atomically (temp dir beside the target, then rename).

    The ``serving_default`` signature takes keyword inputs ``fixed`` and ``moving``
    (float32 ``[None, *image_shape, channels]``) and returns ``warped``
    (``[None, *image_shape, channels]``) and ``displacement`` (``[None, *image_shape,
    ndim]``, pixels, ij order). Loading it in a new process needs ``import dirnet_tf``
    (or ``dirnet_tf.load_ops()``) first, for the compiled resampler.

    Parameters
    ----------
    model : keras.Model
        A DIRNet-like model.
    export_dir : str
        Final directory; an existing export there is replaced only once the new one is
        complete.
    image_shape : sequence of int
        Spatial size.
    channels : int
        Channels per image.
    metadata : dict or None
        Written to ``export_dir/assets/dirnet.json`` (e.g. grid spacing, boundary, flags).

    Returns
    -------
    str
        ``export_dir``.
    """
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(export_dir) + ".tmp-", dir=parent)
    old = None
    try:
        module = _ServingModule(model, [None] + [int(n) for n in image_shape] + [int(channels)])
        target = os.path.join(tmp, "model")
        tf.saved_model.save(module, target, signatures={"serving_default": module.serve})
        if metadata is not None:
            os.makedirs(os.path.join(target, "assets"), exist_ok=True)
            with open(os.path.join(target, "assets", "dirnet.json"), "w") as fh:
                json.dump(metadata, fh, indent=2, sort_keys=True, default=str)
        if os.path.exists(export_dir):
            old = export_dir + f".old-{uuid.uuid4().hex[:8]}"
            os.rename(export_dir, old)
        os.rename(target, export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return export_dir

