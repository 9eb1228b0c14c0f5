"""Using a trained model: batched prediction, timing, SavedModel export and loading.

* :func:`predict` -- run a model (a ``keras.Model`` or a SavedModel signature)
  over arrays in batches;
* :func:`time_per_pair` -- milliseconds per pair (median of repeated calls);
* :func:`export_saved_model` -- an atomic SavedModel with a ``serving_default``
  signature taking keyword ``fixed`` and ``moving``, and the export's metadata
  in ``assets/dirnet.json``;
* :func:`load_export` -- load such a SavedModel (the compiled op first, with a
  clear error when it is missing) and its metadata.
"""

import math
import os
import shutil
import tempfile
import time
import uuid

import keras
import numpy as np
import tensorflow as tf

from dirnet_tf.console import quiet_tensorflow_logs
from dirnet_tf.export_metadata import read_metadata, step_metadata, step_output, write_metadata
from dirnet_tf.resample_op import load_ops

__all__ = ["predict", "as_pair_function", "time_per_pair", "export_saved_model", "load_export"]

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
        ``warped`` and ``displacement`` as numpy arrays, and every further output
        of a signature (the ``step_0``, ``step_1``, ... of a model of composed
        steps, see :func:`export_saved_model`).
    """
    call = as_pair_function(fn)
    outs = {"warped": [], "displacement": []}
    fixed = np.asarray(fixed, np.float32)
    moving = np.asarray(moving, np.float32)
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} must have the same shape")
    for i in range(0, len(fixed), batch_size):
        out = call(tf.constant(fixed[i:i + batch_size]), tf.constant(moving[i:i + batch_size]))
        for k in out:
            outs.setdefault(k, []).append(out[k].numpy())
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
    call = as_pair_function(fn)
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


class _ServingModule(tf.Module):
    def __init__(self, model, spec):
        super().__init__()
        self.model = model

        @tf.function(input_signature=[tf.TensorSpec(spec, tf.float32, name="fixed"),
                                      tf.TensorSpec(spec, tf.float32, name="moving")],
                     autograph=False)  # plain Python around the model call; nothing to convert
        def serve(fixed, moving):
            out = self.model({"fixed": fixed, "moving": moving}, training=False)
            served = {"warped": tf.cast(out["warped"], tf.float32),
                      "displacement": tf.cast(out["displacement"], tf.float32)}
            for n, params in enumerate(out.get("step_params") or ()):
                served[step_output(n)] = tf.cast(params, tf.float32)
            return served

        self.serve = serve


def export_saved_model(model, export_dir, image_shape, channels=1, metadata=None):
    """Write ``model`` as a SavedModel atomically (temp dir beside the target, then rename).

    The ``serving_default`` signature takes keyword inputs ``fixed`` and ``moving``
    (float32 ``[None, *image_shape, channels]``) and returns ``warped``
    (``[None, *image_shape, channels]``) and ``displacement`` (``[None, *image_shape,
    ndim]``, pixels, ij order). Loading it in a new process needs ``import dirnet_tf``
    (or ``dirnet_tf.load_ops()``) first, for the compiled resampler.

    A model of composed steps (``DIRNet.step_layout()`` not None) also returns each
    step's exact parameters, ``step_0``, ``step_1``, ... (the model's ``step_params``:
    ``[None, ndim * (ndim + 1)]`` for an affine step, ``[None, *control_grid, ndim]``
    control points in pixels, ij, for a B-spline step), and the metadata gets their
    description under ``steps`` (:func:`dirnet_tf.export_metadata.step_metadata`).

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
        Written to ``export_dir/assets/dirnet.json`` (e.g. grid spacing, boundary, flags);
        for a model of composed steps ``steps`` is set to :func:`dirnet_tf.export_metadata.step_metadata`.

    Returns
    -------
    str
        ``export_dir``.
    """
    steps = step_metadata(model)
    if steps is not None:
        metadata = dict(metadata or {}, steps=steps)
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(export_dir) + ".tmp-", dir=parent)
    old = None
    try:
        module = _ServingModule(model, [None] + [int(n) for n in image_shape] + [int(channels)])
        target = os.path.join(tmp, "model")
        with quiet_tensorflow_logs():
            tf.saved_model.save(module, target, signatures={"serving_default": module.serve})
        if metadata is not None:
            write_metadata(target, metadata)
        if os.path.exists(export_dir):
            old = export_dir + f".old-{uuid.uuid4().hex[:8]}"
            os.rename(export_dir, old)
        os.rename(target, export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return export_dir


def load_export(export_dir):
    """Load a SavedModel written by :func:`export_saved_model`, and its metadata.

    The compiled resampler is loaded first (a SavedModel containing the op cannot
    be loaded without it), so a missing build gives an error that says to run
    ``make build-ops`` rather than TensorFlow's "Op type not registered".

    Parameters
    ----------
    export_dir : str

    Returns
    -------
    tuple
        ``(serving_default signature, metadata dict)``; the metadata is ``{}`` for an
        export without ``assets/dirnet.json``.

    Raises
    ------
    FileNotFoundError
        When ``export_dir`` holds no SavedModel.
    RuntimeError
        When the compiled op is missing or does not load.
    """
    if not tf.saved_model.contains_saved_model(export_dir):
        raise FileNotFoundError(f"{export_dir} is not a SavedModel directory (no saved_model.pb); "
                                "pass the --export_dir of a training run")
    load_ops()
    loaded = tf.saved_model.load(export_dir)
    if "serving_default" not in loaded.signatures:
        raise ValueError(f"{export_dir} has no serving_default signature; it was not written by "
                         "dirnet_tf.inference.export_saved_model")
    signature = loaded.signatures["serving_default"]
    signature._dirnet_keepalive = loaded  # the signature's variables live as long as the module
    return signature, read_metadata(export_dir)
