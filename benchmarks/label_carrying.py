"""Label carrying: corner weights (``carry_labels``) against one one-hot map per label (the definition).

    python -m benchmarks.label_carrying [--cases=2d:256x256:116,3d:64x64x64:116] [--repeats=3] [--json=out.json]

Each case is a random label map (``ndim``-D, shape, number of labels: blocks of labels as an atlas
has) sampled at positions moved by a smooth random displacement of a few voxels, the way
``experiments.register --moving_labels`` samples the moving label map at every fixed voxel.
Prints a table (seconds, best of ``--repeats``; the speed-up; whether both give the same labels)
and the same as JSON (stdout, or ``--json``).  Both implementations are
:mod:`dirnet_tf.label_carrying`; the outputs must be identical.
"""

import json
import sys
import time

import numpy as np
from absl import flags

from benchmarks.cli import parse

FLAGS = flags.FlagValues()
flags.DEFINE_string("cases", "2d:256x256:10,2d:256x256:116,3d:64x64x64:116",
                    "Comma-separated cases ndim-d:shape:labels (shape as AxBxC).", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Timed runs per implementation (the best is reported).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results to this JSON file.", flag_values=FLAGS)


def parse_case(text):
    """``"3d:64x64x64:116"`` -> ``(3, (64, 64, 64), 116)``."""
    kind, shape, labels = text.strip().split(":")
    shape = tuple(int(n) for n in shape.lower().split("x"))
    ndim = int(kind.lower().rstrip("d"))
    if ndim != len(shape) or ndim not in (2, 3) or int(labels) < 1:
        raise ValueError(f"case {text!r}: expected 2d:HxW:N or 3d:DxHxW:N")
    return ndim, shape, int(labels)


def make_case(shape, num_labels, seed):
    """A blocky random label map ``[*shape]`` and positions ``[ndim, *shape]`` moved by a smooth field."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, num_labels, tuple(max(2, n // 8) for n in shape))
    labels = ndimage.zoom(coarse, [n / c for n, c in zip(shape, coarse.shape)], order=0)[tuple(slice(n) for n in shape)]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    field = np.stack([ndimage.gaussian_filter(rng.normal(0, 1, shape), 4) for _ in shape])
    field *= 3.0 / max(np.abs(field).max(), 1e-9)
    return labels.astype(np.int32), grid + field


def best_time(fn, repeats):
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def run(cases, repeats=3, seed=0):
    """One result dict per case: ``ndim, shape, labels, voxels, one_hot_s, corners_s, speedup, identical``."""
    from dirnet_tf.label_carrying import carry_labels, carry_labels_one_hot

    results = []
    for n, (ndim, shape, num_labels) in enumerate(cases):
        labels, positions = make_case(shape, num_labels, seed + n)
        one_hot_s, reference = best_time(lambda: carry_labels_one_hot(labels, positions), repeats)
        corners_s, got = best_time(lambda: carry_labels(labels, positions), repeats)
        results.append({"ndim": ndim, "shape": list(shape), "labels": int(len(np.unique(labels))),
                        "voxels": int(np.prod(shape)), "one_hot_s": one_hot_s, "corners_s": corners_s,
                        "speedup": one_hot_s / corners_s, "identical": bool(np.array_equal(got, reference))})
    return results


def table(results):
    """The results as a fixed-width text table."""
    lines = [f"{'case':>18} {'labels':>6} {'one-hot s':>10} {'corners s':>10} {'speed-up':>9} {'same':>5}"]
    for r in results:
        case = f"{r['ndim']}-D " + "x".join(str(n) for n in r["shape"])
        lines.append(f"{case:>18} {r['labels']:>6} {r['one_hot_s']:>10.3f} {r['corners_s']:>10.3f} "
                     f"{r['speedup']:>8.1f}x {'yes' if r['identical'] else 'NO':>5}")
    return "\n".join(lines)


def main(argv=None):
    """Run the benchmark; exit status 0, 1 if an output differed, 2 for a bad command line."""
    if parse(FLAGS, "benchmarks.label_carrying", argv) is None:
        return 2
    try:
        cases = [parse_case(c) for c in FLAGS.cases.split(",") if c.strip()]
    except ValueError as exc:
        print(f"error: --cases: {exc}", file=sys.stderr)
        return 2
    results = run(cases, FLAGS.repeats, FLAGS.seed)
    print(table(results))
    text = json.dumps({"benchmark": "label_carrying", "results": results}, indent=2)
    print(text)
    if FLAGS.json:
        with open(FLAGS.json, "w") as fh:
            fh.write(text + "\n")
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
