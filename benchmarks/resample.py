"""Benchmark of the compiled resampler against the alternatives a user would write.

Times ``forward`` and ``forward+backward`` (gradients w.r.t. image and coords,
and w.r.t. coords only -- what DIRNet training needs) of

* ``op``           -- ``dirnet_tf.resample`` (the compiled ``Dirnet>Resample``) in
  ``tf.function``, like every TF row,
* ``op-eager``     -- the same called eagerly (no ``tf.function`` call overhead, which
  is a large part of the small case),
* ``op-loop`` / ``tf-gather-xla-loop`` -- the op / the XLA gather path repeated
  ``--loop`` times inside one ``tf.function`` (a ``tf.range`` loop whose
  coordinates depend on the previous iteration, so nothing is hoisted); the time
  per iteration is what the computation costs inside a larger graph such as a
  training step, without the per-call dispatch overhead,
* ``tf-gather``    -- the pure-TF gather resampler in ``tf.function``,
* ``tf-gather-xla``-- the same with ``jit_compile=True`` (strongest pure-TF path),
* ``keras-mapcoord`` -- ``keras.ops.image.map_coordinates(order=1)`` per item and
  channel (it has no batch axis),
* ``tf-null``      -- no resampling at all: ``image + 0 * coords[..., :1]`` (same
  shapes, elementwise) in the same ``tf.function`` calls with the same loss and
  gradient ops; its forward time is TensorFlow's own per-call cost plus one
  elementwise op, which every TF row pays (on this CPU it dominates the 28x28 case),
* ``torch-grid_sample`` -- ``torch.nn.functional.grid_sample`` (bilinear /
  trilinear, zeros padding, align_corners=True), when PyTorch is installed,

for B=32 28x28 and B=8 256x256 (2-D) and B=2 64^3 (3-D), one channel, on a
near-identity deformation (identity grid plus a smooth random displacement of a
few pixels, as in registration).  Every round times each method once, in a
fresh random order (interleaved), and the table reports the median over rounds
of the per-call time in milliseconds.  The table is printed (markdown) and
written with all samples to a JSON file.

Run from the repository root: ``python -m benchmarks.resample``
(``--help`` for options; ``make bench`` runs it with the defaults).
"""

import json
import os
import platform
import random
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from absl import flags  # noqa: E402

import dirnet_tf  # noqa: E402
from benchmarks import cli  # noqa: E402
from dirnet_tf.resample_pure_tf import resample_pure_tf  # noqa: E402

CASES = {
    "2d-28": dict(batch=32, spatial=(28, 28), label="2-D B=32 28x28"),
    "2d-256": dict(batch=8, spatial=(256, 256), label="2-D B=8 256x256"),
    "3d-64": dict(batch=2, spatial=(64, 64, 64), label="3-D B=2 64^3"),
}
MODES = ("forward", "fwd+bwd", "fwd+bwd coords")
MODE_TITLES = {
    "forward": "forward",
    "fwd+bwd": "forward+backward (image and coords)",
    "fwd+bwd coords": "forward+backward (coords only)",
}


def make_inputs(batch, spatial, seed=0):
    """Image, near-identity coordinates and the output weights (numpy, float32)."""
    rng = np.random.default_rng(seed)
    ndim = len(spatial)
    image = rng.normal(size=(batch, *spatial, 1)).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in spatial],
                                indexing="ij"), -1)
    # Smooth displacement: a few random low-frequency sines, amplitude ~3 px.
    disp = np.zeros((batch, *spatial, ndim), np.float32)
    for d in range(ndim):
        for _ in range(3):
            k = rng.uniform(0.5, 2.0, size=ndim) * 2 * np.pi / np.array(spatial)
            phase = rng.uniform(0, 2 * np.pi, size=(batch, 1))
            arg = np.tensordot(grid, k, axes=([-1], [0])).reshape(1, -1) + phase
            disp[..., d] += np.sin(arg).reshape(batch, *spatial).astype(np.float32)
    coords = grid[None] + disp
    weights = rng.normal(size=(batch, *spatial, 1)).astype(np.float32)
    return image, coords, weights


def keras_map_coordinates(image, coords, boundary="zeros"):
    """``keras.ops.image.map_coordinates`` looped over batch items and channels."""
    del boundary
    outs = []
    for b in range(image.shape[0]):
        pts = [coords[b, ..., d] for d in range(coords.shape[-1])]
        chans = [keras.ops.image.map_coordinates(image[b, ..., c], pts, order=1,
                                                  fill_mode="constant")
                 for c in range(image.shape[-1])]
        outs.append(tf.stack(chans, -1))
    return tf.stack(outs, 0)


def computations(fn, weights):
    """The three timed computations as functions of ``(image, coords)``: the
    output, the gradients of ``sum(output * weights)`` with respect to both
    inputs, and with respect to the coordinates only."""

    def forward(i, c):
        return fn(i, c)

    def both(i, c):
        with tf.GradientTape() as tape:
            tape.watch([i, c])
            loss = tf.reduce_sum(fn(i, c) * weights)
        return tape.gradient(loss, [i, c])

    def coords_only(i, c):
        with tf.GradientTape() as tape:
            tape.watch(c)
            loss = tf.reduce_sum(fn(i, c) * weights)
        return tape.gradient(loss, c)

    return {"forward": forward, "fwd+bwd": both, "fwd+bwd coords": coords_only}


def _constants(image, coords, weights):
    return tuple(tf.constant(x) for x in (image, coords, weights))


def tf_callables(fn, jit_compile, image, coords, weights):
    """Forward, forward+backward (both) and (coords only) as tf.functions."""
    image, coords, weights = _constants(image, coords, weights)
    return {mode: (lambda f=tf.function(g, jit_compile=jit_compile): f(image, coords))
            for mode, g in computations(fn, weights).items()}


def looped_callables(fn, jit_compile, image, coords, weights, repeats):
    """The three computations repeated ``repeats`` times inside one tf.function.

    Each iteration shifts the coordinates by a negligible amount that depends on
    the previous iteration's result, so the loop body cannot be hoisted or
    merged, and reduces its whole result (output times the weights, or
    gradients) so that XLA cannot skip any of it; :func:`run_case` divides the
    measured time by ``repeats``.
    """
    image, coords, weights = _constants(image, coords, weights)

    def loop(mode, compute):
        def step(i, c):
            out = compute(i, c)
            if mode == "forward":
                out = out * weights
            return tf.add_n([tf.reduce_sum(x) for x in tf.nest.flatten(out)])

        @tf.function(jit_compile=jit_compile)
        def run(i, c):
            carry = tf.zeros((), c.dtype)
            for _ in tf.range(repeats):
                carry = step(i, c + 1e-30 * carry)
            return carry
        return lambda: run(image, coords)

    return {mode: loop(mode, g) for mode, g in computations(fn, weights).items()}


def eager_callables(fn, image, coords, weights):
    """The same three computations run eagerly (no tf.function call overhead)."""
    image, coords, weights = _constants(image, coords, weights)
    return {mode: (lambda g=g: g(image, coords)) for mode, g in computations(fn, weights).items()}


def null_resample(image, coords):
    """Stand-in with the output shape of the benchmark cases and no sampling work
    (the output grid equals the image grid there)."""
    return image + 0.0 * coords[..., :1]


def torch_callables(image, coords, weights):
    """grid_sample with the same samples: channels first, normalised xy(z) order."""
    import torch
    import torch.nn.functional as F

    ndim = coords.shape[-1]
    sizes = np.array(image.shape[1:-1], np.float32)
    grid = (2.0 * coords / (sizes - 1) - 1.0)[..., ::-1].copy()  # ij -> xy(z), [-1, 1]
    img = torch.from_numpy(np.moveaxis(image, -1, 1).copy())
    grd = torch.from_numpy(grid)
    w = torch.from_numpy(np.moveaxis(weights, -1, 1).copy())

    def sample(i, g):
        return F.grid_sample(i, g, mode="bilinear", padding_mode="zeros", align_corners=True)

    def forward():
        with torch.no_grad():
            return sample(img, grd)

    def both():
        i = img.clone().requires_grad_(True)
        g = grd.clone().requires_grad_(True)
        (sample(i, g) * w).sum().backward()
        return i.grad, g.grad

    def coords_only():
        g = grd.clone().requires_grad_(True)
        (sample(img, g) * w).sum().backward()
        return g.grad

    del ndim
    return {"forward": forward, "fwd+bwd": both, "fwd+bwd coords": coords_only}


def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def build_methods(case, skip, loop):
    """Callables per method; also the number of computations one call performs."""
    image, coords, weights = make_inputs(case["batch"], case["spatial"])
    methods = {
        "op": lambda: tf_callables(dirnet_tf.resample, False, image, coords, weights),
        "op-loop": lambda: looped_callables(dirnet_tf.resample, False, image, coords, weights,
                                            loop),
        "op-eager": lambda: eager_callables(dirnet_tf.resample, image, coords, weights),
        "tf-gather": lambda: tf_callables(resample_pure_tf, False, image, coords, weights),
        "tf-gather-xla": lambda: tf_callables(resample_pure_tf, True, image, coords, weights),
        "tf-gather-xla-loop": lambda: looped_callables(resample_pure_tf, True, image, coords, weights,
                                                       loop),
        "keras-mapcoord": lambda: tf_callables(keras_map_coordinates, False, image, coords,
                                               weights),
        "tf-null": lambda: tf_callables(null_resample, False, image, coords, weights),
    }
    if torch_available():
        methods["torch-grid_sample"] = lambda: torch_callables(image, coords, weights)
    built = {name: make() for name, make in methods.items() if name not in skip}
    per_call = {name: (loop if name.endswith("-loop") else 1) for name in built}
    return built, per_call


def calibrate(fn, target_s):
    """Warm up (tracing / compilation) and pick calls per sample for ~target_s."""
    fn()
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, min(200, int(target_s / once)))


def run_case(name, case, rounds, target_s, skip, loop, log):
    methods, per_call = build_methods(case, skip, loop)
    jobs = [(m, mode) for m in methods for mode in MODES]
    inner = {}
    for method, mode in jobs:
        inner[(method, mode)] = calibrate(methods[method][mode], target_s)
    samples = {job: [] for job in jobs}
    rng = random.Random(0)
    for r in range(rounds):
        order = jobs[:]
        rng.shuffle(order)
        for job in order:
            fn, n = methods[job[0]][job[1]], inner[job]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[job].append((time.perf_counter() - start) / (n * per_call[job[0]]) * 1e3)
        log(f"  {case['label']}: round {r + 1}/{rounds}")
    return {
        method: {
            mode: {"median_ms": statistics.median(samples[(method, mode)]),
                   "samples_ms": samples[(method, mode)],
                   "calls_per_sample": inner[(method, mode)],
                   "computations_per_call": per_call[method]}
            for mode in MODES
        }
        for method in methods
    }


def format_table(results):
    lines = []
    for mode in MODES:
        methods = []
        for res in results.values():
            for m in res:
                if m not in methods:
                    methods.append(m)
        lines.append(f"{MODE_TITLES[mode]}, median ms (ratio: method / op)")
        lines.append("")
        lines.append("| case | " + " | ".join(methods) + " |")
        lines.append("|---|" + "---:|" * len(methods))
        for case_name, res in results.items():
            op = res.get("op", {}).get(mode, {}).get("median_ms")
            cells = []
            for m in methods:
                if m not in res:
                    cells.append("-")
                    continue
                ms = res[m][mode]["median_ms"]
                ratio = f" ({ms / op:.1f}x)" if op and m != "op" else ""
                cells.append(f"{ms:.3f}{ratio}" if ms < 10 else f"{ms:.1f}{ratio}")
            lines.append(f"| {CASES[case_name]['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


FLAGS = flags.FlagValues()
flags.DEFINE_string("cases", ",".join(CASES), f"Comma-separated subset of {list(CASES)}.", flag_values=FLAGS)
flags.DEFINE_integer("rounds", 15, "Interleaved rounds.", flag_values=FLAGS)
flags.DEFINE_float("target_ms", 30.0, "Approximate duration of one timing sample.", flag_values=FLAGS)
flags.DEFINE_integer("loop", 16, "Iterations per tf.function call of the *-loop methods.", flag_values=FLAGS)
flags.DEFINE_string("skip", "", "Comma-separated methods to leave out.", flag_values=FLAGS)
flags.DEFINE_string("json", os.path.join("runs", "bench", "bench_resample.json"), "Where to write all results.",
                    flag_values=FLAGS)


def main(argv=None):
    """``python -m benchmarks.resample`` (``argv``: the arguments after the program name)."""
    if cli.parse(FLAGS, "benchmarks.resample", argv) is None:
        return 2
    args = FLAGS
    skip = {s for s in args.skip.split(",") if s}
    unknown = [c for c in args.cases.split(",") if c and c not in CASES]
    if unknown:
        print(f"error: unknown cases {unknown}; known: {list(CASES)}", file=sys.stderr)
        return 2

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    env = {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "python": platform.python_version(),
    }
    if torch_available():
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    results = {}
    for name in [c for c in args.cases.split(",") if c]:
        log(f"case {CASES[name]['label']}")
        results[name] = run_case(name, CASES[name], args.rounds, args.target_ms / 1e3, skip,
                                 args.loop, log)
    table = format_table(results)
    print(table)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "rounds": args.rounds, "loop": args.loop, "cases": CASES,
                       "results": results}, f, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
