"""The training loop: strategies, the :class:`Trainer`, checkpoints and best-validation state.

* :func:`make_strategy` / :func:`worker_info` -- the ``tf.distribute`` strategy
  named by ``--strategy`` and this process's role in it;
* :class:`Trainer` -- builds model and optimizer under ``strategy.scope()``, runs a
  compiled multi-step ``tf.function`` (optionally XLA), checkpoints around a step
  counter (resume continues the exact run), stops on a NaN loss keeping the last
  good checkpoint, writes TensorBoard scalars and image panels (chief only) and
  keeps the checkpoint with the best validation NCC in ``logdir/best`` (its value
  in ``logdir/best/best.json``, so it survives a resume);
* :class:`TrainingInterrupted` -- Ctrl-C during :meth:`Trainer.train`: one line saying
  where training stopped and from which checkpoint the same command resumes (a
  checkpoint being written when Ctrl-C comes is finished first).
"""

import json
import math
import os
import shutil
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from dirnet_tf.files import write_json
from dirnet_tf.console import quiet_tensorflow_logs
from dirnet_tf.pairs import make_input_iterator, validation_batches
from dirnet_tf.plotting import figure_to_image, registration_figure, volume_figure

__all__ = ["STRATEGIES", "TrainingDivergedError", "TrainingInterrupted", "make_strategy", "worker_info",
           "Trainer"]


STRATEGIES = ("default", "mirrored", "multi_worker")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (``KeyboardInterrupt``) stopped :meth:`Trainer.train`; the last checkpoint is kept.

    A ``KeyboardInterrupt`` still (so ``except Exception`` does not swallow it), whose message
    is the one line to show, e.g. ``interrupted at step 6; run the same command again to resume
    from the last checkpoint (step 4)``.

    Attributes
    ----------
    step : int
        The last optimizer step completed (steps of an interrupted call are not counted).
    checkpoint : str or None
        The checkpoint a rerun resumes from (None: none was written yet).
    checkpoint_step : int or None
        Its step.
    """

    def __init__(self, step, checkpoint):
        self.step = int(step)
        self.checkpoint = checkpoint
        self.checkpoint_step = _checkpoint_step(checkpoint)
        if checkpoint is None:
            message = (f"interrupted at step {self.step}; no checkpoint was written yet, so running the "
                       "same command again starts from step 0")
        else:
            message = (f"interrupted at step {self.step}; run the same command again to resume from the "
                       f"last checkpoint (step {self.checkpoint_step})")
        super().__init__(message)


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


class Trainer:
    """Generic training loop for image-pair registration models.

    Parameters
    ----------
    model_fn : callable
        ``() -> keras.Model`` taking ``{"fixed", "moving"}`` and returning a dict with
        at least ``warped`` (DIRNet); called under ``strategy.scope()`` (and under the
        ``mixed_float16`` policy with ``mixed_precision``).
    sampler : callable
        ``step -> global batch dict`` (see :func:`dirnet_tf.pairs.same_group_pair_sampler`).
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
    panel_pairs : int or sequence of int
        Validation pairs drawn in the TensorBoard image panel: the first ``panel_pairs``
        pairs, or these indices (e.g. one pair per class); 3-D models show the central
        orthogonal slices of the first of them.
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
        (:mod:`dirnet_tf.resample_pure_tf`), since custom ops cannot be compiled.
        Single-replica strategies only (the cross-replica gradient reduction
        cannot run inside an XLA cluster); ignored with a message otherwise.
    loss_fn : callable or None
        ``(batch, outputs) -> (per_pair_loss [B], {name: per_pair [B]})``; default
        the model's own objective, ``model.objective(batch["fixed"], outputs)``
        (:meth:`dirnet_tf.DIRNet.objective`), so the trainer, ``model.fit`` and the
        saved model config optimise the same thing.
    """

    #: The validation metric that selects the best checkpoint (higher is better); a subclass whose
    #: validation reports another score (e.g. ``"dice"``) sets its own.
    selection_metric = "ncc"

    def __init__(self, model_fn, sampler, logdir, steps, batch_size, learning_rate=1e-3,
                 lr_schedule="cosine", strategy=None, mixed_precision=False, validation=None,
                 panel_pairs=8, log_every=100, eval_every=500, checkpoint_every=500, config=None,
                 resume=True, seed=0, max_to_keep=3, print_fn=None, steps_per_execution=10,
                 jit_compile=False, loss_fn=None):
        self.strategy = strategy or tf.distribute.get_strategy()
        self.sampler = sampler
        self.logdir = logdir
        self.total_steps = int(steps)
        self.batch_size = int(batch_size)
        self.log_every = max(1, int(log_every))
        self.eval_every = int(eval_every)
        self.checkpoint_every = int(checkpoint_every)
        self.config = dict(config or {})
        self.resume = bool(resume)
        self.panel_pairs = panel_pairs
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
        self.loss_fn = loss_fn or (lambda batch, outputs: self.model.objective(batch["fixed"], outputs))
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
        """``eval_step({"fixed", "moving"}) -> (per_pair, parts, outputs)``, traced once.

        The input signature leaves the batch size open, so the validation batches (the last
        one smaller) and the image panel's pairs run the same graph instead of retracing.
        """
        model, loss_fn = self.model, self.loss_fn
        spec = tf.TensorSpec((None,) + tuple(self.validation["fixed"].shape[1:]), tf.float32)

        @tf.function(input_signature=[{"fixed": spec, "moving": spec}])
        def eval_step(batch):
            outputs = model(batch, training=False)
            per_pair, parts = loss_fn(batch, outputs)
            return per_pair, parts, outputs

        return eval_step

    def evaluate_validation(self, batch_size=256):
        """Mean loss/NCC (and the other loss parts) over the validation pairs.

        Returns
        -------
        dict
            Name -> mean over the validation pairs.
        """
        if self._eval_step is None:
            self._eval_step = self._make_eval_step()
        totals, count = {}, 0
        for batch in validation_batches(self.validation["fixed"], self.validation["moving"], batch_size):
            per_pair, parts, _ = self._eval_step(batch)
            for k, v in dict(parts, loss=per_pair).items():
                totals[k] = totals.get(k, 0.0) + float(tf.reduce_sum(v))
            count += int(per_pair.shape[0])
        return {k: v / max(count, 1) for k, v in totals.items()}

    # ---------------------------------------------------------------- loop

    def save(self):
        """Save a checkpoint at the current step (every worker calls this; non-chief
        workers write into a temporary directory that is deleted)."""
        with _InterruptsDeferred(), quiet_tensorflow_logs():
            path = self.manager.save(checkpoint_number=int(self.step.numpy()))
            if not self.is_chief:
                shutil.rmtree(self._ckpt_dir, ignore_errors=True)
        return path

    def _validate_and_log(self, step):
        metrics = self.evaluate_validation()
        with self.writer.as_default(step=step):
            for k, v in metrics.items():
                tf.summary.scalar(f"validation/{k}", v)
            if self.is_chief:
                self._log_panel()
        self.writer.flush()
        improved = metrics.get(self.selection_metric, -np.inf) > self.best_ncc
        if improved:
            self.best_ncc = metrics[self.selection_metric]
            with _InterruptsDeferred(), quiet_tensorflow_logs():  # checkpoint and score together
                self.best_manager.save(checkpoint_number=step)
                if not self.is_chief:
                    shutil.rmtree(os.path.join(self._ckpt_dir, "best"), ignore_errors=True)
                else:
                    _write_best_state(self.logdir, self.best_ncc)
        self.print(f"[valid] step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
                   + ("  (best)" if improved else ""))
        return metrics

    def _log_panel(self):
        """The fixed / moving / warped / grid image panel of the chosen validation pairs."""
        fixed, moving = self.validation["fixed"], self.validation["moving"]
        if isinstance(self.panel_pairs, (int, np.integer)):
            indices = list(range(min(int(self.panel_pairs), len(fixed))))
        else:
            indices = [int(i) for i in self.panel_pairs]
        if not indices:
            return
        if self._eval_step is None:
            self._eval_step = self._make_eval_step()
        outputs = self._eval_step({"fixed": fixed[indices], "moving": moving[indices]})[2]
        if "displacement" not in outputs:
            return
        if fixed.ndim == 4:
            fig = registration_figure(fixed[indices], moving[indices], outputs["warped"],
                                      outputs["displacement"], max_cols=len(indices))
        else:  # 3-D: the central orthogonal slices of the first chosen pair
            fig = volume_figure(fixed[indices[0]], moving[indices[0]], outputs["warped"][0],
                                outputs["displacement"][0])
        tf.summary.image("validation/fixed_moving_warped_grid", figure_to_image(fig))

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
        TrainingInterrupted
            On Ctrl-C (``KeyboardInterrupt``); nothing is written for the steps since the last
            checkpoint, which stays (a checkpoint being written is finished first), and the
            same call resumes from it.
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
            write_json(os.path.join(self.logdir, "flags.json"), self.config)
        start = int(self.step.numpy())
        if start >= self.total_steps:
            self.print(f"[train] already at step {start} >= --steps={self.total_steps}; nothing to train")
            return {"step": start, "resumed_from": resumed_from, "last_loss": None,
                    "steps_per_second": None, "best_validation_ncc": _finite(self.best_ncc)}
        try:
            return self._train_from(start, resumed_from)
        except KeyboardInterrupt as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            try:
                self.writer.flush()
            except Exception:  # noqa: BLE001 -- the interrupt is what to report
                pass
            raise TrainingInterrupted(int(self.step.numpy()), self.latest_checkpoint()) from None

    def _train_from(self, start, resumed_from):
        """The loop of :meth:`train` from step ``start`` (the step variable), to ``steps``."""
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


class _InterruptsDeferred:
    """Inside the block Ctrl-C (SIGINT) is held back and raised as ``KeyboardInterrupt`` on
    leaving it, so a checkpoint being written is finished (main thread only; elsewhere, or
    where the program installed its own SIGINT handler, nothing changes)."""

    def __enter__(self):
        self._previous = None
        self._received = False
        if threading.current_thread() is not threading.main_thread():
            return self
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return self
        self._previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self._received = True

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            if self._received and exc_info[0] is None:
                raise KeyboardInterrupt
        return False


def _checkpoint_step(path):
    """The step number of a checkpoint path ``.../ckpt-N`` (None for None)."""
    if path is None:
        return None
    try:
        return int(os.path.basename(path).rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


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
        write_json(os.path.join(logdir, "best", "best.json"), {"validation_ncc": float(value)})


def _format_seconds(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
