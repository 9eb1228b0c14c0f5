"""``python -m benchmarks.elastix_baseline``: the elastix B-spline baseline on held-out MNIST test pairs.

The registration itself is :mod:`dirnet_tf.elastix` (optional ``itk-elastix``:
``pip install -e .[baselines]`` or ``pip install itk-elastix``) with the committed parameter files
``baselines/elastix/bspline_gs8.txt``, ``bspline_gs4.txt`` and ``bspline_gs2.txt`` (cubic
B-spline transform with a final control-point spacing of 8, 4 or 2 pixels, 2 resolutions (3 for
spacing 2), 250 iterations per resolution, full sampling, ``AdvancedNormalizedCorrelation``,
adaptive stochastic gradient descent, linear interpolation, 0 outside the image) and the thread
count in ``baselines/elastix/settings.json``.  Importing this module works without
``itk-elastix``; running it then raises an :class:`ImportError` that says how to install it.

Python::

    from dirnet_tf.elastix import ElastixRegistration
    reg = ElastixRegistration(grid_spacing=8)          # threads from settings.json
    out = reg.register_batch(fixed, moving)            # [N, 28, 28, 1] each
    out["warped"], out["displacement"], out["seconds"]

Command line (from the repository root), on held-out MNIST test pairs::

    python -m benchmarks.elastix_baseline --grid_spacing=8 --num_pairs=20
    python -m benchmarks.elastix_baseline --grid_spacing=4 --pairs=logs/mnist/eval_pairs.json
"""

import os
import sys

import numpy as np
from absl import flags

from benchmarks import cli
from data import mnist
from dirnet_tf import metrics
from dirnet_tf.elastix import ElastixRegistration
from dirnet_tf.files import write_json

__all__ = ["interleave_digits", "main"]


def interleave_digits(digits):
    """Order pair indices so that every prefix covers the classes evenly.

    Parameters
    ----------
    digits : array of int ``[P]``
        The class of each pair.

    Returns
    -------
    ndarray of int ``[P]``
        Indices: the first pair of each digit, then the second of each, ...
    """
    digits = np.asarray(digits)
    rank = np.zeros(len(digits), np.int64)
    for d in np.unique(digits):
        members = np.flatnonzero(digits == d)
        rank[members] = np.arange(len(members))
    return np.lexsort((digits, rank))


FLAGS = flags.FlagValues()
flags.DEFINE_integer("grid_spacing", 8, "8, 4 or 2 (the committed parameter files).", flag_values=FLAGS)
flags.DEFINE_integer("threads", None, "Threads per registration (default: baselines/elastix/settings.json).",
                     flag_values=FLAGS)
flags.DEFINE_string("parameter_file", None, "Use this elastix parameter file.", flag_values=FLAGS)
flags.DEFINE_string("pairs", None, "eval_pairs.json saved by the MNIST evaluation (default: draw the "
                    "MNIST evaluation's pairs into runs/bench/eval_pairs.json).", flag_values=FLAGS)
flags.DEFINE_string("hdf5", None, "MNIST HDF5 file (default: data.mnist's).", flag_values=FLAGS)
flags.DEFINE_integer("num_pairs", 20, "Use the first N pairs, spread over the digits (0: all).",
                     flag_values=FLAGS)
flags.DEFINE_string("out", None, "Write a JSON summary here.", flag_values=FLAGS)


def main(argv=None):
    """``python -m benchmarks.elastix_baseline``: register held-out MNIST test pairs."""
    if cli.parse(FLAGS, "benchmarks.elastix_baseline", argv) is None:
        return 2
    args = FLAGS
    if args.pairs:
        record = mnist.load_eval_pairs(args.pairs, hdf5=args.hdf5)
    else:
        record = mnist.draw_eval_pairs(os.path.join("runs", "bench", "eval_pairs.json"),
                                       args.hdf5 or mnist.DEFAULT_HDF5)
    fixed, moving, digits = record["fixed"], record["moving"], record["digits"]
    if args.num_pairs:
        # Interleave the digits so that a prefix covers every class.
        order = interleave_digits(digits)[:args.num_pairs]
        fixed, moving, digits = fixed[order], moving[order], digits[order]

    reg = ElastixRegistration(args.grid_spacing, threads=args.threads,
                              parameter_file=args.parameter_file)
    out = reg.register_batch(fixed, moving, compute_displacement=False)
    before = metrics.ncc(fixed, moving, batched=True)
    after = metrics.ncc(fixed, out["warped"], batched=True)
    summary = {
        "grid_spacing": args.grid_spacing, "threads": reg.threads,
        "parameter_file": os.path.relpath(reg.parameter_file), "pairs": int(len(fixed)),
        "ncc_before": float(before.mean()), "ncc_after": float(after.mean()),
        "ms_per_pair_median": float(1000 * np.median(out["seconds"])),
        "ms_per_pair_mean": float(1000 * np.mean(out["seconds"])),
    }
    print(f"elastix gs={args.grid_spacing} threads={reg.threads}: {len(fixed)} pairs, NCC "
          f"{summary['ncc_before']:.4f} -> {summary['ncc_after']:.4f}, "
          f"{summary['ms_per_pair_median']:.1f} ms/pair (median; mean "
          f"{summary['ms_per_pair_mean']:.1f})")
    if args.out:
        write_json(args.out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
