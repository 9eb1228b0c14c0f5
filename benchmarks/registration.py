"""DIRNet vs iterative elastix B-spline registration on the same held-out MNIST test pairs.

Methods, all on one pair list (the ``eval_pairs.json`` that the MNIST evaluation
saves: 100 same-digit test pairs per digit, seed 0):

* DIRNet rows (:data:`MODELS`, chosen with ``--dirnet_models``): ``default`` -- the folding-free
  default of ``experiments.mnist`` (B-spline stages at spacing 8, 4 and 2), compared with elastix
  at spacing 2; ``accurate`` -- ``--preset=accurate`` (stages 8 and 4 only, three passes each,
  trained stage-wise, with a folding penalty), against spacing 4; ``paper`` -- the paper's setting (``--preset=paper``: one pass, no constraint,
  no regulariser, spacing 8); ``gs8`` / ``gs4`` -- the additive-pass models of the previous
  default.  Each is a SavedModel exported by ``experiments.mnist`` (given with ``--model_NAME``;
  otherwise trained here with the flags in :data:`MODELS` into ``runs/bench/mnist_NAME`` and
  exported to ``exports/bench/mnist_NAME``, or reused from there when such an export exists);
* ``elastix gs=8`` / ``gs=4`` / ``gs=2`` -- :mod:`dirnet_tf.elastix` with the
  committed parameter files and thread count in ``baselines/elastix/`` (``--elastix_spacings``
  selects them).

Every method is scored by the same code (:mod:`dirnet_tf.metrics`, as in the MNIST
evaluation): NCC after registration, Dice of the digits binarised at 0.5, the
fraction of pixels with a folding Jacobian (``det <= 0``) and time per pair.
DIRNet's time is the median over repeated runs of the exported model on batches
of ``--batch_size`` pairs (also reported at batch size 1); elastix's is the mean
wall time of one registration (pairs run one after another, elastix has no batched
mode; the displacement field for the folding measure is computed afterwards and not
timed).

elastix results are cached in ``--outdir`` (``elastix_gs{N}.npz``) and reused for the same
pairs, parameter file and thread count (``--no-elastix_cache`` recomputes); the speed-up is
also measured in alternating DIRNet/elastix rounds (``--timing_rounds``).

Writes ``bench_registration.json``, ``bench_registration.md`` (the table) and
``bench_registration.png`` (chart) into ``--outdir`` (default ``runs/bench``).

Command line (from the repository root)::

    python -m benchmarks.registration                    # trains what is missing, all 1000 pairs
    python -m benchmarks.registration --dirnet_models=default --model_default=exports/mnist
    python -m benchmarks.registration --num_pairs=100    # quicker: 10 pairs per digit
"""

import hashlib
import json
import os
import subprocess
import sys
import time

import matplotlib
import numpy as np
import tensorflow as tf
from absl import flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import cli  # noqa: E402
from benchmarks.elastix_baseline import interleave_digits  # noqa: E402
from benchmarks.training import machine_description  # noqa: E402
from data import mnist  # noqa: E402
from dirnet_tf import metrics  # noqa: E402
from dirnet_tf.elastix import ElastixRegistration, import_itk, load_settings, parameter_file  # noqa: E402
from dirnet_tf.export_metadata import ExportMetadataError, read_metadata  # noqa: E402
from dirnet_tf.files import write_json  # noqa: E402
from dirnet_tf.inference import as_pair_function, load_export, predict, time_per_pair  # noqa: E402

GRID_SPACINGS = (8, 4, 2)

# The DIRNet models this benchmark compares: name -> (row label, grid spacing of the elastix row it is
# compared with, flags of ``python -m experiments.mnist`` that train it when no export is given).
# "default" is the experiment's folding-free default (stages 8, 4, 2), "accurate" its --preset=accurate
# (stages 8 and 4, three passes each, stage-wise, a folding penalty); "paper" the paper's setting
# (one pass, no constraint, no regulariser); gs8 / gs4 the additive-pass models of the previous default:
# gs8 exported with the 2 passes it was trained with (a third, untrained pass gains NCC but doubles
# folding), gs4 a regressor twice as wide at full and half resolution, 3 passes trained, 4 exported.
MODELS = {
    "default": ("DIRNet default (stages 8,4,2)", 2, ()),
    "accurate": ("DIRNet stages 8,4, 3 passes", 4, ("--preset=accurate",)),
    "paper": ("DIRNet paper setting (gs=8)", 8, ("--preset=paper",)),
    "gs8": ("DIRNet gs=8", 8, ("--grid_spacing=8", "--preset=additive", "--inference_passes=2")),
    "gs4": ("DIRNet gs=4", 4, ("--grid_spacing=4", "--preset=additive", "--filters=16,32,32", "--passes=3",
                               "--inference_passes=4")),
}


def _log(msg):
    print(f"[benchmarks.registration] {msg}", flush=True)


def export_info(export_dir):
    """The ``assets/dirnet.json`` metadata of an export (``{}`` if it has none).

    Parameters
    ----------
    export_dir : str
        A SavedModel directory written by :func:`dirnet_tf.inference.export_saved_model`.
    """
    try:
        return read_metadata(export_dir)
    except ExportMetadataError:
        return {}


def export_grid_spacing(export_dir):
    """Grid spacing recorded in an export's metadata (``None`` if absent or not isotropic).

    Parameters
    ----------
    export_dir : str
        A SavedModel directory written by :func:`dirnet_tf.inference.export_saved_model`.
    """
    gs = export_info(export_dir).get("grid_spacing")
    if isinstance(gs, (list, tuple)):
        gs = gs[0] if len(set(gs)) == 1 else None
    return None if gs is None else int(gs)


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _is_export(path):
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def ensure_model(name, given, root="runs/bench", exports="exports/bench", steps=None):
    """Return an export dir for the DIRNet model ``name`` of :data:`MODELS`, training one if needed.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    given : str or None
        An export directory passed on the command line (used as is; its recorded
        grid spacing must match the model's).
    root, exports : str
        Where a model trained here keeps its logdir / export.
    steps : int or None
        ``--steps`` for the training run (``None``: the MNIST experiment's default).

    Returns
    -------
    tuple
        ``(export_dir, logdir or None)``.
    """
    _, grid_spacing, train_flags = MODELS[name]
    if given:
        if not _is_export(given):
            raise ValueError(f"--model_{name}={given} is not a SavedModel directory "
                             "(no saved_model.pb); export one with python -m experiments.mnist")
        recorded = export_grid_spacing(given)
        if recorded is not None and recorded != grid_spacing:
            raise ValueError(f"--model_{name}={given} was trained with (finest) grid spacing {recorded}, "
                             f"not {grid_spacing}")
        return given, None
    logdir = os.path.join(root, f"mnist_{name}")
    export_dir = os.path.join(exports, f"mnist_{name}")
    if _is_export(export_dir) and export_grid_spacing(export_dir) == grid_spacing:
        _log(f"reusing {export_dir}")
        return export_dir, logdir
    cmd = [sys.executable, "-m", "experiments.mnist", *train_flags, f"--logdir={logdir}",
           f"--export_dir={export_dir}"]
    if steps:
        cmd.append(f"--steps={steps}")
    _log("training: " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)
    return export_dir, logdir


def load_pairs(pairs_path, hdf5, outdir, num_pairs):
    """The evaluation pairs (saved by the MNIST evaluation, or drawn the same way).

    Parameters
    ----------
    pairs_path : str or None
        An ``eval_pairs.json``; ``None``: draw 100 test pairs per digit with seed 0
        (as ``experiments.mnist`` does) and save them to ``outdir/eval_pairs.json``.
    hdf5 : str or None
        MNIST HDF5 override.
    outdir : str
    num_pairs : int
        Keep this many (0: all), interleaving the digits so that every digit is covered.

    Returns
    -------
    dict
        ``fixed``, ``moving`` ``[P, 28, 28, 1]``, ``digits`` ``[P]``, ``path``.
    """

    if pairs_path is None:
        pairs_path = os.path.join(outdir, "eval_pairs.json")
        record = mnist.draw_eval_pairs(pairs_path, hdf5 or mnist.DEFAULT_HDF5)
        _log(f"drew {len(record['digits'])} test pairs (100 per digit, seed 0) -> {pairs_path}")
    record = mnist.load_eval_pairs(pairs_path, hdf5=hdf5)
    fixed, moving, digits = record["fixed"], record["moving"], record["digits"]
    if num_pairs:
        keep = np.sort(interleave_digits(digits)[:num_pairs])
        fixed, moving, digits = fixed[keep], moving[keep], digits[keep]
    return {"fixed": fixed, "moving": moving, "digits": digits, "path": pairs_path}


def quality(fixed, moving, warped, displacement, digits):
    """Per-pair scores and their summary, computed as in the MNIST evaluation.

    Parameters
    ----------
    fixed, moving, warped : ``[P, 28, 28, 1]``.
    displacement : ``[P, 28, 28, 2]`` (pixels, ij).
    digits : ``[P]``.

    Returns
    -------
    tuple
        ``(summary dict, per-pair dict of arrays)``.
    """

    scores = metrics.registration_scores(fixed, warped, displacement)
    ncc, dice, folding = scores["ncc"], scores["dice"], scores["folding"]
    summary = {"ncc": float(ncc.mean()), "ncc_std": float(ncc.std()), "ncc_median": float(np.median(ncc)),
               "dice": float(dice.mean()), "folding_fraction": float(folding.mean()),
               "pairs_with_folding": int((folding > 0).sum()),
               "per_digit_ncc": {str(int(d)): float(ncc[digits == d].mean()) for d in np.unique(digits)}}
    return summary, scores


def run_dirnet(export_dir, pairs, batch_size, repeats):
    """Register the pairs with an exported DIRNet (and each pair the other way round), and time it."""
    served, _ = load_export(export_dir)
    pred = predict(served, pairs["fixed"], pairs["moving"], batch_size)
    pred["reverse_displacement"] = predict(served, pairs["moving"], pairs["fixed"], batch_size)["displacement"]
    timing = time_per_pair(served, pairs["fixed"], pairs["moving"], batch_size=batch_size, repeats=repeats)
    single = time_per_pair(served, pairs["fixed"], pairs["moving"], batch_size=1, repeats=max(repeats, 20))
    return pred, {"ms_per_pair": timing["ms_per_pair"], "ms_per_pair_min": timing["ms_per_pair_min"],
                  "timing_batch_size": timing["batch_size"], "timing_repeats": timing["repeats"],
                  "ms_per_pair_batch1": single["ms_per_pair"]}


def _elastix_key(grid_spacing, pairs, threads):
    """Identifies an elastix result: the images, the parameter file's text and the thread count."""

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(pairs["fixed"], np.float32).tobytes())
    h.update(np.ascontiguousarray(pairs["moving"], np.float32).tobytes())
    with open(parameter_file(grid_spacing), "rb") as f:
        h.update(f.read())
    h.update(str(threads if threads is not None else load_settings()["threads"]).encode())
    return h.hexdigest()


def run_elastix(grid_spacing, pairs, threads, cache_dir=None, tag=""):
    """Register the pairs with elastix (one after another).

    Parameters
    ----------
    grid_spacing : int
    pairs : dict from :func:`load_pairs`.
    threads : int or None
        Threads per registration (``None``: ``settings.json``).
    cache_dir : str or None
        Keep the results (with their timings) in ``elastix_gs{N}{tag}.npz`` there and reuse them
        when the pairs, the parameter file and the thread count are unchanged.
    tag : str
        Cache file suffix (e.g. ``"_reverse"`` for the pairs the other way round).
    """

    cache = key = None
    if cache_dir:
        cache = os.path.join(cache_dir, f"elastix_gs{grid_spacing}{tag}.npz")
        key = _elastix_key(grid_spacing, pairs, threads)
        if os.path.isfile(cache):
            with np.load(cache) as z:
                if str(z["key"]) == key:
                    _log(f"  reusing elastix results from {cache} (measured {z['date']})")
                    out = {k: z[k] for k in ("warped", "displacement", "seconds")}
                    info = json.loads(str(z["info"]))
                    return out, dict(info, from_cache=cache)
    reg = ElastixRegistration(grid_spacing, threads=threads)
    n = len(pairs["fixed"])
    t0 = time.perf_counter()

    def progress(done, total):
        if done % 100 == 0 or done == total:
            _log(f"  elastix gs={grid_spacing}: {done}/{total} pairs ({time.perf_counter() - t0:.0f} s)")

    out = reg.register_batch(pairs["fixed"], pairs["moving"], compute_displacement=True, progress=progress)
    reg.close()
    sec = out["seconds"]
    info = {"ms_per_pair": float(sec.mean() * 1e3), "ms_per_pair_median": float(np.median(sec) * 1e3),
            "threads": reg.threads, "parameter_file": os.path.relpath(reg.parameter_file),
            "pairs_timed": int(n), "load_average": _loadavg()}
    if cache:
        np.savez_compressed(cache, key=key, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            info=json.dumps(info), **out)
    return out, info


def interleaved_timing(export_dir, grid_spacing, pairs, batch_size, rounds, elastix_pairs, threads):
    """Speed-up measured in alternating rounds (robust to a machine whose load changes).

    Each round times one DIRNet call on ``batch_size`` pairs and then elastix on
    ``elastix_pairs`` different pairs; the speed-up is the median of the per-round
    ratios of milliseconds per pair.

    Returns
    -------
    dict
        ``dirnet_ms_per_pair``, ``elastix_ms_per_pair`` (medians over rounds),
        ``speedup`` (median of ratios), ``rounds``.
    """

    served, _ = load_export(export_dir)
    call = as_pair_function(served)  # the call path of time_per_pair
    n = len(pairs["fixed"])
    idx = np.arange(batch_size) % n
    f, m = tf.constant(pairs["fixed"][idx]), tf.constant(pairs["moving"][idx])
    for _ in range(2):
        call(f, m)["warped"].numpy()
    reg = ElastixRegistration(grid_spacing, threads=threads)
    d_ms, e_ms = [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        out = call(f, m)
        out["warped"].numpy()
        out["displacement"].numpy()
        d_ms.append((time.perf_counter() - t0) * 1e3 / batch_size)
        sel = (np.arange(elastix_pairs) + r * elastix_pairs) % n
        res = reg.register_batch(pairs["fixed"][sel], pairs["moving"][sel], compute_displacement=False)
        e_ms.append(float(res["seconds"].mean() * 1e3))
    reg.close()
    d_ms, e_ms = np.asarray(d_ms), np.asarray(e_ms)
    return {"dirnet_ms_per_pair": float(np.median(d_ms)), "elastix_ms_per_pair": float(np.median(e_ms)),
            "speedup": float(np.median(e_ms / d_ms)), "rounds": int(rounds),
            "dirnet_batch_size": int(batch_size), "elastix_pairs_per_round": int(elastix_pairs)}


def format_table(rows, before):
    """Markdown table of the summaries."""
    lines = ["| method | NCC | Dice | folding pixels | pairs with folding | inverse consistency (px) | ms / pair |",
             "|---|---|---|---|---|---|---|",
             f"| before registration | {before['ncc']:.4f} | {before['dice']:.4f} | - | - | - | - |"]
    for name, r in rows.items():
        if r.get("passes"):
            name += f" ({r['passes']} pass{'es' if r['passes'] > 1 else ''})"
        t = f"{r['ms_per_pair']:.3f}" if r["ms_per_pair"] < 10 else f"{r['ms_per_pair']:.1f}"
        if "ms_per_pair_batch1" in r:
            t += f" (batch {r['timing_batch_size']}; {r['ms_per_pair_batch1']:.2f} at batch 1)"
        else:
            t += f" ({r['threads']} threads, one pair at a time)"
        consistency = r.get("inverse_consistency_px")
        consistency = "-" if consistency is None else f"{consistency:.3f}"
        lines.append(f"| {name} | {r['ncc']:.4f} | {r['dice']:.4f} | {100 * r['folding_fraction']:.3f}% | "
                     f"{r['pairs_with_folding']} / {r['pairs']} | {consistency} | {t} |")
    return "\n".join(lines)


def compare(rows):
    """Every DIRNet row against the elastix row of its grid spacing: speed-up, NCC difference, folding.

    Returns
    -------
    dict
        ``{model name: {"elastix", "speedup", "ncc_dirnet_minus_elastix", "folding_dirnet",
        "folding_elastix"}}`` for the :data:`MODELS` rows present with their elastix row.
    """
    out = {}
    for name, (label, gs, _) in MODELS.items():
        d, e = rows.get(label), rows.get(f"elastix gs={gs}")
        if d is None or e is None:
            continue
        out[name] = {"elastix": f"elastix gs={gs}", "speedup": e["ms_per_pair"] / d["ms_per_pair"],
                     "ncc_dirnet_minus_elastix": d["ncc"] - e["ncc"],
                     "folding_dirnet": d["folding_fraction"], "folding_elastix": e["folding_fraction"]}
    return out


def save_chart(path, rows, per_pair, before):
    """Four panels: NCC (box plot), Dice, folding %, ms per pair (log scale)."""

    matplotlib.use("Agg")

    names = list(rows)
    colors = ["tab:blue" if n.startswith("DIRNet") else "tab:orange" for n in names]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    ax = axes[0]
    ax.boxplot([per_pair["before"]["ncc"]] + [per_pair[n]["ncc"] for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 2), ["before"] + names, rotation=30, ha="right")
    ax.set_title("NCC after registration")
    ax = axes[1]
    ax.bar(names, [rows[n]["dice"] for n in names], color=colors)
    ax.axhline(before["dice"], color="gray", ls="--", label="before")
    ax.set_ylim(min(before["dice"], *[rows[n]["dice"] for n in names]) - 0.05, 1.0)
    ax.set_title("Dice (digits > 0.5)")
    ax.legend(loc="lower right")
    ax = axes[2]
    ax.bar(names, [100 * rows[n]["folding_fraction"] for n in names], color=colors)
    ax.set_title("folding pixels (det J <= 0), %")
    ax = axes[3]
    ax.bar(names, [rows[n]["ms_per_pair"] for n in names], color=colors)
    ax.set_yscale("log")
    ax.set_title("ms per pair (log scale)")
    for a in axes[1:]:
        a.tick_params(axis="x", rotation=30)
        for label in a.get_xticklabels():
            label.set_ha("right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


FLAGS = flags.FlagValues()
for _name, (_label, _gs, _flags) in MODELS.items():
    flags.DEFINE_string(f"model_{_name}", None, f"Export of the '{_label}' row (default: trained with "
                        f"python -m experiments.mnist {' '.join(_flags)}).", flag_values=FLAGS)
flags.DEFINE_list("dirnet_models", list(MODELS), f"DIRNet rows, some of {', '.join(MODELS)}.", flag_values=FLAGS)
flags.DEFINE_integer("train_steps", None, "--steps when a model has to be trained (default: the "
                     "experiment's).", flag_values=FLAGS)
flags.DEFINE_string("pairs", None, "eval_pairs.json (default: draw them as the MNIST evaluation does).",
                    flag_values=FLAGS)
flags.DEFINE_string("hdf5", None, "MNIST HDF5 file (default: data.mnist's).", flag_values=FLAGS)
flags.DEFINE_integer("num_pairs", 0, "Use N of the pairs (0: all).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 256, "DIRNet batch size for timing.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 11, "Timed DIRNet runs (median).", flag_values=FLAGS)
flags.DEFINE_integer("elastix_threads", None, "Threads per elastix registration (default: "
                     "baselines/elastix/settings.json).", flag_values=FLAGS)
flags.DEFINE_bool("skip_elastix", False, "DIRNet rows only.", flag_values=FLAGS)
flags.DEFINE_list("elastix_spacings", [str(gs) for gs in GRID_SPACINGS], "elastix rows: final grid spacings, "
                  f"some of {', '.join(map(str, GRID_SPACINGS))}.", flag_values=FLAGS)
flags.DEFINE_bool("elastix_cache", True, "Keep elastix results in --outdir and reuse them for the same "
                  "pairs, parameter file and threads (the interleaved timing always runs).", flag_values=FLAGS)
flags.DEFINE_integer("timing_rounds", 9, "Alternating DIRNet/elastix timing rounds for the speed-up "
                     "(0: none).", flag_values=FLAGS)
flags.DEFINE_string("outdir", os.path.join("runs", "bench"), "Output directory.", flag_values=FLAGS)


def main(argv=None):
    """``python -m benchmarks.registration`` (``argv``: the arguments after the program name)."""
    argv = cli.parse(FLAGS, "benchmarks.registration", argv)
    if argv is None:
        return 2
    args = FLAGS
    os.makedirs(args.outdir, exist_ok=True)

    if not args.skip_elastix:
        import_itk()  # fail early, with the install hint
    unknown = sorted(set(args.dirnet_models) - set(MODELS))
    if unknown:
        _log(f"error: --dirnet_models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
        return 2
    if not set(args.elastix_spacings) <= {str(gs) for gs in GRID_SPACINGS}:
        _log(f"error: --elastix_spacings={','.join(args.elastix_spacings)}: choose from "
             f"{', '.join(map(str, GRID_SPACINGS))}")
        return 2
    spacings = [int(gs) for gs in args.elastix_spacings]
    models = {name: ensure_model(name, getattr(args, f"model_{name}"), steps=args.train_steps)[0]
              for name in args.dirnet_models}
    pairs_path = args.pairs
    if pairs_path is None:
        # The pair list saved by the MNIST evaluation of a model trained here, if there is one.
        for name in models:
            candidate = os.path.join("runs", "bench", f"mnist_{name}", "eval_pairs.json")
            if not getattr(args, f"model_{name}") and os.path.isfile(candidate):
                pairs_path = candidate
                break
    pairs = load_pairs(pairs_path, args.hdf5, args.outdir, args.num_pairs)
    n = len(pairs["fixed"])
    _log(f"{n} pairs from {pairs['path']}")

    zero = np.zeros(pairs["fixed"].shape[:-1] + (2,), np.float32)
    before, per_before = quality(pairs["fixed"], pairs["moving"], pairs["moving"], zero, pairs["digits"])
    rows, per_pair = {}, {"before": per_before}
    for name, export_dir in models.items():
        label = MODELS[name][0]
        _log(f"{label}: {export_dir}")
        pred, timing = run_dirnet(export_dir, pairs, args.batch_size, args.repeats)
        summary, scores = quality(pairs["fixed"], pairs["moving"], pred["warped"], pred["displacement"],
                                  pairs["digits"])
        info = export_info(export_dir)
        rows[label] = dict(summary, **timing, pairs=n, model=export_dir,
                           passes=None if info.get("steps") else info.get("passes"),
                           inverse_consistency_px=float(metrics.inverse_consistency(
                               pred["displacement"], pred["reverse_displacement"]).mean()))
        per_pair[label] = scores
        _log(f"  NCC {summary['ncc']:.4f}  Dice {summary['dice']:.4f}  folding "
             f"{100 * summary['folding_fraction']:.3f}%  {timing['ms_per_pair']:.3f} ms/pair")
    if not args.skip_elastix:
        for gs in spacings:
            _log(f"elastix gs={gs} on {n} pairs")
            out, timing = run_elastix(gs, pairs, args.elastix_threads,
                                      args.outdir if args.elastix_cache else None)
            summary, scores = quality(pairs["fixed"], pairs["moving"], out["warped"], out["displacement"],
                                      pairs["digits"])
            reverse, _ = run_elastix(gs, {"fixed": pairs["moving"], "moving": pairs["fixed"]},
                                     args.elastix_threads, args.outdir if args.elastix_cache else None,
                                     tag="_reverse")
            rows[f"elastix gs={gs}"] = dict(summary, **timing, pairs=n,
                                            inverse_consistency_px=float(metrics.inverse_consistency(
                                                out["displacement"], reverse["displacement"]).mean()))
            per_pair[f"elastix gs={gs}"] = scores
            _log(f"  NCC {summary['ncc']:.4f}  Dice {summary['dice']:.4f}  folding "
                 f"{100 * summary['folding_fraction']:.3f}%  {timing['ms_per_pair']:.1f} ms/pair")

    interleaved = {}
    if not args.skip_elastix and args.timing_rounds > 0:
        for name, export_dir in models.items():
            gs = MODELS[name][1]
            t = interleaved[name] = interleaved_timing(export_dir, gs, pairs, args.batch_size, args.timing_rounds,
                                                       10, args.elastix_threads)
            _log(f"interleaved timing {name} vs elastix gs={gs}: DIRNet {t['dirnet_ms_per_pair']:.3f} ms/pair, "
                 f"elastix {t['elastix_ms_per_pair']:.1f} ms/pair, speed-up {t['speedup']:.0f}x")

    order = [MODELS[name][0] for name in MODELS if MODELS[name][0] in rows]
    order += [f"elastix gs={gs}" for gs in GRID_SPACINGS if f"elastix gs={gs}" in rows]
    rows = {k: rows[k] for k in order}
    table = format_table(rows, before)
    comparison = compare(rows)
    for name, t in interleaved.items():
        if name in comparison:
            comparison[name]["speedup_interleaved"] = t["speedup"]
    record = {"machine": machine_description(),
              "command": "python -m benchmarks.registration " + " ".join(argv),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "pairs_file": pairs["path"],
              "pairs": n, "before": before, "methods": rows, "dirnet_vs_elastix": comparison,
              "interleaved_timing": interleaved, "load_average": _loadavg(), "table": table}
    json_path = write_json(os.path.join(args.outdir, "bench_registration.json"), record)
    with open(os.path.join(args.outdir, "bench_registration.md"), "w") as f:
        f.write(f"{table}\n\n{n} MNIST test pairs; {record['machine']}; `{record['command']}`\n")
    chart = save_chart(os.path.join(args.outdir, "bench_registration.png"), rows, per_pair, before)
    print("\n" + table + "\n")
    for name, t in comparison.items():
        alt = t.get("speedup_interleaved")
        print(f"{MODELS[name][0]} vs {t['elastix']}: DIRNet is {t['speedup']:.0f}x faster per pair than elastix "
              + (f"({alt:.0f}x in alternating rounds)" if alt else "")
              + f"; NCC difference {t['ncc_dirnet_minus_elastix']:+.4f}; folding "
              f"{100 * t['folding_dirnet']:.3f}% vs {100 * t['folding_elastix']:.3f}%")
    _log(f"wrote {json_path}, bench_registration.md and {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
