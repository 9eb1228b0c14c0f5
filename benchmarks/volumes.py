"""Seconds per training step and peak memory of 3-D DIRNet training, batch 1, by volume size.

For each volume shape and each resampler variant the benchmark builds
``DIRNet(shape, grid_spacing, filters="auto", convs_per_level="auto")`` (the
default 3-D regressor: widths 8, 16, then 32; one 3x3 convolution per level and
two at the coarsest), runs one warm-up training step (which traces the step) and
then times ``--steps`` Adam steps on one pair of smooth random volumes, with the
trainer's objective (``model.objective(fixed, outputs)``, batch mean) in a
``tf.function`` train step (graph mode, no XLA).  The variants are

* ``op``      -- the compiled resampler op (:func:`dirnet_tf.resample`);
* ``pure_tf`` -- the stock-op resampler
  (:func:`dirnet_tf.resample_pure_tf.resample_pure_tf`), swapped in as in
  :mod:`benchmarks.training` (:class:`benchmarks.training.PureTFResampler`).

Every case runs in a fresh Python process, so its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the case) is that case's
alone.  Reported per case: median seconds per step, the first (tracing) step's
seconds, the peak resident set size (GiB), its increment over the resident set
size just before the model is built (GiB; TensorFlow, the op library and the
input volumes are loaded by then), the parameter count and TensorFlow's own
peak (GiB) of the memory its allocator handed out for tensors
(``tf.config.experimental.get_memory_info`` of the first GPU, else of the CPU:
documented for GPUs and TPUs only, but TensorFlow 2.21 answers for the CPU too;
where it raises, the error is recorded instead).  A case that fails (an error, the process
killed, e.g. when out of memory, or ``--case_timeout`` exceeded) is reported as
failed with the reason; the other cases still run.

Command line (from the repository root)::

    python -m benchmarks.volumes            # 64^3, 96x112x96, 128^3; op and pure_tf
    python -m benchmarks.volumes --shapes=64x64x64 --variants=op --steps=5 --out=v.json

Prints a markdown table and writes JSON (``--out``; empty: no file).
"""

import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

from absl import flags

from benchmarks import cli

VARIANTS = ("op", "pure_tf")
DEFAULT_SHAPES = "64x64x64,96x112x96,128x128x128"
GIB = float(1 << 30)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MIN_SIZE = 8


def parse_shape(text):
    """``"96x112x96"`` -> ``(96, 112, 96)``.

    Parameters
    ----------
    text : str
        Three positive integers (voxels along each axis, each at least 8) joined by ``x``.

    Returns
    -------
    tuple of int

    Raises
    ------
    ValueError
        For anything else.
    """
    parts = text.strip().lower().replace("\u00d7", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(n < _MIN_SIZE for n in shape):
        raise ValueError(f"a volume shape is DxHxW, three integers >= {_MIN_SIZE} (e.g. 96x112x96), "
                         f"got {text!r}")
    return shape


def parse_shapes(text):
    """Comma-separated :func:`parse_shape` list (at least one shape).

    Parameters
    ----------
    text : str

    Returns
    -------
    list of tuple of int
    """
    shapes = [parse_shape(s) for s in text.split(",") if s.strip()]
    if not shapes:
        raise ValueError(f"--shapes needs at least one DxHxW shape, got {text!r}")
    return shapes


def parse_variants(text):
    """Comma-separated subset of :data:`VARIANTS` (at least one).

    Parameters
    ----------
    text : str

    Returns
    -------
    list of str
    """
    variants = [v.strip() for v in text.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        raise ValueError(f"--variants must be a subset of {VARIANTS}, got {text!r}")
    return variants


def shape_name(shape):
    """``(96, 112, 96)`` -> ``"96x112x96"``."""
    return "x".join(str(n) for n in shape)


def current_rss_bytes():
    """Resident set size of this process now, in bytes (Linux ``/proc``; else the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes():
    """Peak resident set size of this process so far, in bytes (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _tf_memory_info(tf):
    """TensorFlow's own memory statistics of the first GPU (else the CPU).

    Returns
    -------
    dict
        ``{"device", "peak_gib", "current_gib"}`` (GiB; the peak since the process
        started), or ``{"device", "error"}`` where TensorFlow does not report memory
        for that device.
    """
    device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
    try:
        info = tf.config.experimental.get_memory_info(device)
        return {"device": device, "peak_gib": info["peak"] / GIB, "current_gib": info["current"] / GIB}
    except Exception as exc:  # noqa: BLE001 - unsupported device: report why
        return {"device": device, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}


def run_case(shape, variant, grid_spacing=8, steps=3, seed=0):
    """Build, warm up and time one case in this process (see the module docstring).

    The peak memory measured is this process's, so call this in a fresh process
    (:func:`run_case_subprocess`) for a peak that belongs to the case alone.

    Parameters
    ----------
    shape : tuple of int
        Volume size ``(D, H, W)`` in voxels.
    variant : str
        One of :data:`VARIANTS`.
    grid_spacing : int
        B-spline control-point spacing (voxels).
    steps : int
        Timed training steps after the warm-up step.
    seed : int
        Seeds the weights and the random volumes.

    Returns
    -------
    dict
        ``status`` ("ok"), ``s_per_step`` (median seconds), ``s_per_step_all``,
        ``first_step_s`` (seconds, tracing included), ``peak_rss_gib``,
        ``rss_before_model_gib``, ``rss_increment_gib``, ``params``, ``filters``,
        ``convs_per_level``, ``control_grid``, ``losses`` (warm-up and timed steps)
        and ``tf_memory`` (:func:`_tf_memory_info`).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    import keras  # noqa: PLC0415 - heavy imports only where a case runs
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    import dirnet_tf  # noqa: PLC0415
    from benchmarks.training import PureTFResampler, _images  # noqa: PLC0415

    dirnet_tf.load_ops()
    volumes, _ = _images(tuple(shape), 2, seed)  # [2, D, H, W, 1] float32 in [0, 1]
    fixed, moving = tf.constant(volumes[:1]), tf.constant(volumes[1:])
    del volumes
    keras.utils.set_random_seed(seed)
    rss_before = current_rss_bytes()

    model = dirnet_tf.DIRNet(tuple(shape), grid_spacing, filters="auto", convs_per_level="auto")
    if variant == "pure_tf":
        model.resampler = PureTFResampler(model.boundary, name="resampler_tf")
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(fixed, moving):
        with tf.GradientTape() as tape:
            outputs = model({"fixed": fixed, "moving": moving}, training=True)
            per_pair, _ = model.objective(fixed, outputs)
            loss = tf.reduce_mean(per_pair)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    t0 = time.perf_counter()
    losses = [float(train_step(fixed, moving))]  # traces the step
    first_step_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(float(train_step(fixed, moving)))  # float(): waits for the step
        times.append(time.perf_counter() - t0)
    peak = peak_rss_bytes()
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"non-finite training loss: {losses}")
    reg = model.regressor
    return {
        "status": "ok",
        "s_per_step": float(np.median(times)),
        "s_per_step_all": times,
        "first_step_s": first_step_s,
        "peak_rss_gib": peak / GIB,
        "rss_before_model_gib": rss_before / GIB,
        "rss_increment_gib": (peak - rss_before) / GIB,
        "params": int(model.count_params()),
        "filters": list(reg.filters),
        "convs_per_level": list(reg.convs_per_level),
        "control_grid": list(model.grid_shape),
        "losses": losses,
        "tf_memory": _tf_memory_info(tf),
    }


def failure_reason(returncode, stderr="", timeout_s=None):
    """One line saying why a case's process failed.

    Parameters
    ----------
    returncode : int or None
        The process's exit status (negative: killed by that signal); ignored when
        ``timeout_s`` is given.
    stderr : str
        Its standard error; the last non-empty line is quoted.
    timeout_s : float or None
        The limit (seconds) it was stopped at, if it timed out.

    Returns
    -------
    str
    """
    if timeout_s is not None:
        return f"timed out after {timeout_s:g} s"
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    last = lines[-1] if lines else "no error message"
    return f"exit status {returncode}: {last[:300]}"


def run_case_subprocess(shape, variant, grid_spacing=8, steps=3, seed=0, timeout_s=3600.0):
    """:func:`run_case` in a fresh ``python -m benchmarks.volumes`` process.

    Parameters
    ----------
    shape, variant, grid_spacing, steps, seed
        As for :func:`run_case`.
    timeout_s : float
        Seconds before the process is stopped and the case reported as failed.

    Returns
    -------
    dict
        The case's result (:func:`run_case`) or ``{"status": "failed", "reason": ...}``;
        both with ``shape``, ``voxels``, ``variant``, ``grid_spacing``, ``steps`` and
        ``wall_s`` (seconds the process ran, imports included).
    """
    head = {"shape": list(shape), "voxels": int(math.prod(shape)), "variant": variant,
            "grid_spacing": grid_spacing, "steps": steps}
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="bench_volumes_") as tmp:
        out = os.path.join(tmp, "case.json")
        cmd = [sys.executable, "-m", "benchmarks.volumes", f"--shapes={shape_name(shape)}",
               f"--variants={variant}", f"--grid_spacing={grid_spacing}", f"--steps={steps}",
               f"--seed={seed}", "--out=", f"--case_out={out}"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**head, "status": "failed", "reason": failure_reason(None, timeout_s=timeout_s),
                    "wall_s": time.perf_counter() - t0}
        wall = time.perf_counter() - t0
        result = None
        if os.path.exists(out):
            with open(out) as fh:
                result = json.load(fh)
    if result is None:
        result = {"status": "failed", "reason": failure_reason(proc.returncode, proc.stderr)}
    return {**head, **result, "wall_s": wall}


def _gib(x):
    """GiB with two decimals (three below 0.1 GiB)."""
    return f"{x:.3f}" if abs(x) < 0.1 else f"{x:.2f}"


def format_table(results):
    """Markdown table of :func:`run_case_subprocess` results (a failed case: its reason).

    Parameters
    ----------
    results : list of dict

    Returns
    -------
    str
    """
    tf_peak = any("peak_gib" in r.get("tf_memory", {}) for r in results)
    head = ["volume", "voxels (M)", "resampler", "parameters", "s / step", "first step (s)",
            "peak RSS (GiB)", "RSS increment (GiB)"] + (["TF peak (GiB)"] if tf_peak else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [shape_name(r["shape"]).replace("x", "×"), f"{r['voxels'] / 1e6:.2f}", r["variant"]]
        if r.get("status") == "ok":
            cells += [f"{r['params']:,}", f"{r['s_per_step']:.2f}", f"{r['first_step_s']:.1f}",
                      _gib(r["peak_rss_gib"]), _gib(r["rss_increment_gib"])]
            if tf_peak:
                peak = r.get("tf_memory", {}).get("peak_gib")
                cells.append("n/a" if peak is None else _gib(peak))
        else:
            reason = str(r.get("reason", "unknown")).replace("|", "/")
            cells += ["—", f"failed: {reason}"] + ["—"] * (len(head) - 5)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


FLAGS = flags.FlagValues()
flags.DEFINE_string("shapes", DEFAULT_SHAPES, "Comma list of volume shapes DxHxW (voxels).",
                    flag_values=FLAGS)
flags.DEFINE_string("variants", ",".join(VARIANTS), f"Subset of {VARIANTS}.", flag_values=FLAGS)
flags.DEFINE_integer("grid_spacing", 8, "B-spline control-point spacing (voxels; a power of two).",
                     flag_values=FLAGS)
flags.DEFINE_integer("steps", 3, "Timed training steps per case, after one warm-up step.",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the weights and of the random volumes.", flag_values=FLAGS)
flags.DEFINE_float("case_timeout", 3600.0, "Seconds before a case's process is stopped (failed).",
                   flag_values=FLAGS)
flags.DEFINE_string("out", os.path.join("runs", "bench", "bench_volumes.json"),
                    "JSON output (empty: none).", flag_values=FLAGS)
flags.DEFINE_string("case_out", "", "Internal: run the one case in this process and write its "
                    "result JSON here.", flag_values=FLAGS)


def _run_one(shape, variant, args):
    """The ``--case_out`` mode: one case in this process; a failure is written, not raised."""
    from dirnet_tf.files import write_json  # noqa: PLC0415

    try:
        result = run_case(shape, variant, args.grid_spacing, args.steps, args.seed)
    except Exception as exc:  # noqa: BLE001 - e.g. ResourceExhaustedError: report it
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {message[:300]}"}
    write_json(args.case_out, result)
    return 0 if result["status"] == "ok" else 1


def main(argv=None):
    """``python -m benchmarks.volumes`` (``argv``: the arguments after the program name).

    Returns
    -------
    int
        0, or 2 for a bad command line (after printing ``error: ...``).
    """
    FLAGS.unparse_flags()  # defaults again: main() may be called more than once (tests)
    argv = cli.parse(FLAGS, "benchmarks.volumes", argv)
    if argv is None:
        return 2
    args = FLAGS
    try:
        shapes = parse_shapes(args.shapes)
        variants = parse_variants(args.variants)
        g = args.grid_spacing
        if g < 1 or g & (g - 1):
            raise ValueError(f"--grid_spacing must be a power of two, got {g}")
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if args.case_out and (len(shapes) != 1 or len(variants) != 1):
            raise ValueError("--case_out runs exactly one shape and one variant")
    except ValueError as exc:
        print(f"error: python -m benchmarks.volumes: {exc}", file=sys.stderr)
        return 2
    if args.case_out:
        return _run_one(shapes[0], variants[0], args)

    from benchmarks.training import machine_description  # noqa: PLC0415 - imports TensorFlow
    from dirnet_tf.files import write_json  # noqa: PLC0415

    machine = machine_description()
    print(f"[benchmarks.volumes] {machine}", flush=True)
    results = []
    for shape in shapes:
        for variant in variants:
            print(f"[benchmarks.volumes] {shape_name(shape)} {variant}: 1 warm-up + {args.steps} "
                  "steps in a fresh process ...", flush=True)
            r = run_case_subprocess(shape, variant, args.grid_spacing, args.steps, args.seed,
                                    args.case_timeout)
            if r["status"] == "ok":
                print(f"    {r['s_per_step']:.2f} s/step (first {r['first_step_s']:.1f} s), peak RSS "
                      f"{r['peak_rss_gib']:.2f} GiB (+{r['rss_increment_gib']:.2f} GiB), "
                      f"{r['params']:,} parameters", flush=True)
            else:
                print(f"    failed: {r['reason']}", flush=True)
            results.append(r)
    table = format_table(results)
    print("\n" + table)
    tf_memory = [r["tf_memory"] for r in results if "tf_memory" in r]
    record = {"machine": machine, "command": "python -m benchmarks.volumes " + " ".join(argv),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "grid_spacing": args.grid_spacing, "steps": args.steps, "batch_size": 1,
              "tf_memory_info": tf_memory[0] if tf_memory else None,
              "results": results, "table": table}
    if args.out:
        write_json(args.out, record)
        print(f"[benchmarks.volumes] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
