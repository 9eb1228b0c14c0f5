"""Training throughput of DIRNet: the compiled resampler op vs a pure-TensorFlow resampler.

The same DIRNet (same weights, same batches, Adam, ``-NCC`` loss -- the MNIST
experiment's model and objective) is trained with

* ``op``          -- :func:`dirnet_tf.resample`, the compiled ``Dirnet>Resample`` op,
  in a ``tf.function`` train step (what ``experiments.mnist`` does);
* ``pure_tf``     -- :func:`dirnet_tf.resample_pure_tf.resample_pure_tf` (gather-based
  multilinear resampler built from stock ops) in the same ``tf.function`` step;
* ``pure_tf_xla`` -- the pure-TF resampler with the whole train step compiled by XLA
  (``jit_compile=True``), the strongest pure-TF alternative.

Input batches are prepared in advance (the ``tf.data`` pipeline is not timed), so
the numbers are model + resampler + optimizer.  Variants are timed in interleaved
rounds (each round runs every variant for ``--steps`` steps); the table reports the
median throughput over the rounds in pairs per second and the speed-up of the op.
Before timing, one step of each variant is checked to give the same loss.

Command line (from the repository root)::

    python -m benchmarks.training                     # 2-D MNIST sizes + one 3-D case
    python -m benchmarks.training --cases=2d:32,2d:128 --rounds=7 --out=bench_training.json
"""

import os
import platform
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from absl import flags

import dirnet_tf
from benchmarks import cli
from dirnet_tf.files import write_json
from dirnet_tf.layers import Resampler
from dirnet_tf.resample_pure_tf import resample_pure_tf
from dirnet_tf.warping import identity_grid

VARIANTS = ("op", "pure_tf", "pure_tf_xla")


@keras.saving.register_keras_serializable(package="dirnet_tf_bench")
class PureTFResampler(Resampler):
    """:class:`dirnet_tf.layers.Resampler` computed with the stock-op ``resample_pure_tf``.

    Parameters
    ----------
    boundary : str
        ``"border"`` or ``"zeros"``.
    **kwargs
        Passed to :class:`dirnet_tf.layers.Resampler`.
    """

    def __init__(self, boundary="border", **kwargs):
        super().__init__(boundary, **kwargs)
        self.supports_jit = True  # stock ops only: XLA can compile it

    def call(self, moving, displacement):
        spatial = moving.shape[1:-1]
        coords = identity_grid(spatial, dtype=moving.dtype) + tf.cast(displacement, moving.dtype)
        return resample_pure_tf(moving, coords, boundary=self.boundary)


def parse_case(text):
    """``"2d:32"`` -> 2-D MNIST 28x28, batch 32; ``"3d:2:32"`` -> 32^3 volumes, batch 2.

    Parameters
    ----------
    text : str
        ``2d:BATCH[:SIZE]`` or ``3d:BATCH[:SIZE]`` (default sizes 28 and 32).

    Returns
    -------
    dict
        ``{"name", "image_shape", "batch_size"}``.
    """
    parts = text.strip().split(":")
    try:
        kind, batch = parts[0].lower(), int(parts[1])
        size = int(parts[2]) if len(parts) > 2 else (28 if kind == "2d" else 32)
    except (IndexError, ValueError) as exc:
        raise ValueError(f"a case is 2d:BATCH[:SIZE] or 3d:BATCH[:SIZE], got {text!r}") from exc
    if kind not in ("2d", "3d") or batch < 1 or size < 8 or len(parts) > 3:
        raise ValueError(f"a case is 2d:BATCH[:SIZE] or 3d:BATCH[:SIZE], got {text!r}")
    shape = (size,) * (2 if kind == "2d" else 3)
    return {"name": f"{kind} {'x'.join(map(str, shape))} B={batch}", "image_shape": shape,
            "batch_size": batch}


def _images(image_shape, count, seed):
    """Smooth random images in [0, 1] (MNIST itself for 28x28 when available)."""
    if tuple(image_shape) == (28, 28):
        try:
            from data import mnist  # noqa: PLC0415 - run from the repository root

            images, _, _ = mnist.load("train", hdf5=mnist.DEFAULT_HDF5)
            rng = np.random.default_rng(seed)
            return images[rng.choice(len(images), count, replace=False)], "MNIST train"
        except Exception as exc:  # noqa: BLE001 - fall back to synthetic images
            print(f"[benchmarks.training] MNIST unavailable ({exc}); using synthetic images", flush=True)
    from scipy import ndimage  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    x = rng.random((count,) + tuple(image_shape))
    x = ndimage.gaussian_filter(x, (0,) + (2.0,) * len(image_shape))
    x = (x - x.min(axis=tuple(range(1, x.ndim)), keepdims=True))
    x = x / x.max(axis=tuple(range(1, x.ndim)), keepdims=True)
    return x[..., None].astype(np.float32), "synthetic"


def make_variant(variant, image_shape, grid_spacing, filters, weights, learning_rate=1e-3):
    """A DIRNet + Adam + train step for one variant.

    Parameters
    ----------
    variant : str
        One of :data:`VARIANTS`.
    image_shape : tuple of int
    grid_spacing : int
    filters : int
        Regressor width.
    weights : list of arrays or None
        Initial weights (shared by all variants so that they compute the same thing).
    learning_rate : float

    Returns
    -------
    tuple
        ``(model, train_step)`` where ``train_step(fixed, moving) -> loss``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    model = dirnet_tf.DIRNet(image_shape, grid_spacing, boundary="border", filters=filters)
    if variant != "op":
        model.resampler = PureTFResampler(model.boundary, name="resampler_tf")
    if weights is not None:
        model.set_weights(weights)
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(model.trainable_variables)

    def step(fixed, moving):
        with tf.GradientTape() as tape:
            out = model({"fixed": fixed, "moving": moving}, training=True)
            loss = -tf.reduce_mean(dirnet_tf.losses.ncc(fixed, out["warped"]))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return model, tf.function(step, jit_compile=(variant == "pure_tf_xla"))


def bench_case(case, variants=VARIANTS, grid_spacing=8, filters=32, steps=20, rounds=5, seed=0):
    """Time the variants on one case.

    Parameters
    ----------
    case : dict
        From :func:`parse_case`.
    variants : sequence of str
    grid_spacing, filters : int
        DIRNet settings (the MNIST experiment's defaults: 8 and 32).
    steps : int
        Train steps per variant per round.
    rounds : int
        Interleaved rounds.
    seed : int

    Returns
    -------
    dict
        Per variant: median/min/max pairs per second and ms per step over the rounds,
        the first-step loss; plus the data source and the op's speed-up.
    """
    shape, batch = case["image_shape"], case["batch_size"]
    n_batches = 4
    images, source = _images(shape, 2 * batch * n_batches, seed)
    pairs = images.reshape((n_batches, 2, batch) + images.shape[1:])
    batches = [(tf.constant(p[0]), tf.constant(p[1])) for p in pairs]

    keras.utils.set_random_seed(seed)
    reference = dirnet_tf.DIRNet(shape, grid_spacing, boundary="border", filters=filters)
    weights = reference.get_weights()
    steps_fns, first_loss = {}, {}
    for v in variants:
        _, fn = make_variant(v, shape, grid_spacing, filters, weights)
        first_loss[v] = float(fn(*batches[0]))  # traces/compiles; same weights -> same loss
        for b in batches[1:]:
            fn(*b)  # warm-up
        steps_fns[v] = fn
    spread = max(first_loss.values()) - min(first_loss.values())
    if spread > 1e-4:
        raise RuntimeError(f"the variants disagree on the first loss: {first_loss}")

    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            fn = steps_fns[v]
            t0 = time.perf_counter()
            for s in range(steps):
                loss = fn(*batches[s % n_batches])
            float(loss)  # wait for the last step
            times[v].append((time.perf_counter() - t0) / steps)
    result = {"case": case["name"], "image_shape": list(shape), "batch_size": batch,
              "grid_spacing": grid_spacing, "filters": filters, "data": source,
              "steps_per_round": steps, "rounds": rounds, "first_step_loss": first_loss,
              "variants": {}}
    for v in variants:
        t = np.asarray(times[v])
        result["variants"][v] = {"ms_per_step": float(np.median(t) * 1e3),
                                 "pairs_per_s": float(batch / np.median(t)),
                                 "pairs_per_s_min": float(batch / t.max()),
                                 "pairs_per_s_max": float(batch / t.min())}
    if "op" in variants:
        op = result["variants"]["op"]["pairs_per_s"]
        result["op_speedup"] = {v: op / result["variants"][v]["pairs_per_s"] for v in variants if v != "op"}
    return result


def machine_description():
    """One line naming the CPU, core count and TensorFlow version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    device = f"{len(gpus)} GPU(s)" if gpus else "CPU only"
    return f"{cpu}, {os.cpu_count()} cores, {device}, TensorFlow {tf.__version__}"


def format_table(results):
    """Markdown table of :func:`bench_case` results."""
    variants = [v for v in VARIANTS if any(v in r["variants"] for r in results)]
    head = "| case | " + " | ".join(f"{v} (pairs/s)" for v in variants) + " | op speed-up |"
    lines = [head, "|" + "---|" * (len(variants) + 2)]
    for r in results:
        cells = [f"{r['variants'][v]['pairs_per_s']:.0f}" if v in r["variants"] else "-" for v in variants]
        speed = ", ".join(f"{s:.2f}x vs {v}" for v, s in r.get("op_speedup", {}).items())
        lines.append(f"| {r['case']} | " + " | ".join(cells) + f" | {speed} |")
    return "\n".join(lines)


FLAGS = flags.FlagValues()
flags.DEFINE_string("cases", "2d:32,2d:128,3d:1:32", "Comma list of 2d:BATCH[:SIZE] / 3d:BATCH[:SIZE].",
                    flag_values=FLAGS)
flags.DEFINE_string("variants", ",".join(VARIANTS), f"Subset of {VARIANTS}.", flag_values=FLAGS)
flags.DEFINE_integer("grid_spacing", 8, "B-spline control-point spacing.", flag_values=FLAGS)
flags.DEFINE_integer("filters", 32, "Regressor width.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "Train steps per variant per round.", flag_values=FLAGS)
flags.DEFINE_integer("rounds", 5, "Interleaved rounds (median reported).", flag_values=FLAGS)
flags.DEFINE_string("out", os.path.join("runs", "bench", "bench_training.json"), "JSON output.",
                    flag_values=FLAGS)


def main(argv=None):
    """``python -m benchmarks.training`` (``argv``: the arguments after the program name)."""
    argv = cli.parse(FLAGS, "benchmarks.training", argv)
    if argv is None:
        return 2
    args = FLAGS
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    try:
        if bad or not variants:
            raise ValueError(f"--variants must be a subset of {VARIANTS}, got {args.variants!r}")
        cases = [parse_case(c) for c in args.cases.split(",") if c.strip()]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dirnet_tf.load_ops()

    machine = machine_description()
    print(f"[benchmarks.training] {machine}", flush=True)
    results = []
    for case in cases:
        print(f"[benchmarks.training] {case['name']}: {', '.join(variants)} x {args.rounds} rounds of "
              f"{args.steps} steps", flush=True)
        r = bench_case(case, variants, args.grid_spacing, args.filters, args.steps, args.rounds)
        for v, s in r["variants"].items():
            print(f"    {v:12s} {s['pairs_per_s']:9.1f} pairs/s  ({s['ms_per_step']:.2f} ms/step; "
                  f"rounds {s['pairs_per_s_min']:.0f}-{s['pairs_per_s_max']:.0f})", flush=True)
        results.append(r)
    table = format_table(results)
    print("\n" + table)
    record = {"machine": machine, "command": "python -m benchmarks.training " + " ".join(argv),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "results": results,
              "table": table}
    if args.out:
        write_json(args.out, record)
        print(f"[benchmarks.training] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
