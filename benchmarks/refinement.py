"""Instance optimisation (``--refine=N``) against the network alone and elastix, same pairs, same CPU, one run.

    python -m benchmarks.refinement [--sections=brain3d,reoriented,echo,mnist] [--refine_steps=0,25,50,100]
        [--brain3d_export=exports/brain3d] [--echo_export=exports/echo] [--mnist_export=exports/mnist]
        [--echo_batch_size=72] [--mnist_batch_size=1000]
        [--json=baselines/results/refinement_metrics.json]

Every section uses an export written by its experiment (``python -m experiments.brain3d``,
``experiments.echo``, ``experiments.mnist``) and that experiment's own test pairs, rebuilt from
the training configuration stored in the export (``config``).  A section whose export is missing
is reported as skipped (with the command that makes it), never silently left out.

* ``brain3d``: the held-out random fields of the training volume (MNI) and of the other volume
  (ROBEX): endpoint error in mm over the brain, brain / tissue Dice of the carried labels, NCC,
  folding fraction, seconds per volume; MNI <-> ROBEX both ways: NCC and brain Dice.
* ``reoriented``: MNI <- ROBEX and ROBEX <- MNI through the library API on NIfTI files (world
  space, ``init="header"``), once as written by ``experiments.brain3d`` and once with both
  volumes re-oriented (sagittal axis order, flipped) and cropped, their headers saying so:
  NCC inside the fixed brain mask and brain Dice on the fixed grid must agree.
* ``echo``: the sector NCC of ``experiments.echo``'s test pairs.
* ``mnist``: NCC of ``experiments.mnist``'s held-out test pairs (``--mnist_pairs`` of them).

Each refinement count ``N`` of ``--refine_steps`` is run on the same pairs
(:func:`dirnet_tf.register_refine.refined_function`; 0 = the network alone); elastix runs once
per section on the first pairs (``--brain_elastix_pairs``, ``--echo_elastix_pairs``,
``--mnist_elastix_pairs``) with the experiment's parameter file (MNIST: ``bspline_gs2.txt``, the
most accurate MNIST baseline), in this process, so its seconds are comparable.  Prints one table per section and writes everything as
JSON.  Units: endpoint errors in mm; displacements in model voxels (ij); seconds of wall time.
"""

import json
import os
import sys
import time

import numpy as np
from absl import flags

from benchmarks.cli import parse, parse_sections, save_report

FLAGS = flags.FlagValues()
flags.DEFINE_string("sections", "brain3d,reoriented,echo,mnist", "Comma-separated sections to run.",
                    flag_values=FLAGS)
flags.DEFINE_string("refine_steps", "0,25,50,100", "Refinement counts N to compare (0 = network only).",
                    flag_values=FLAGS)
flags.DEFINE_string("brain3d_export", os.path.join("exports", "brain3d"), "Export of experiments.brain3d.",
                    flag_values=FLAGS)
flags.DEFINE_string("echo_export", os.path.join("exports", "echo"), "Export of experiments.echo.", flag_values=FLAGS)
flags.DEFINE_string("mnist_export", os.path.join("exports", "mnist"), "Export of experiments.mnist.",
                    flag_values=FLAGS)
flags.DEFINE_integer("brain_pairs", 3, "Held-out-field pairs per brain volume.", flag_values=FLAGS)
flags.DEFINE_integer("echo_pairs", 72, "Echo test pairs (the first ones of the experiment's list).",
                     flag_values=FLAGS)
flags.DEFINE_integer("mnist_pairs", 1000, "MNIST test pairs (the first ones of the experiment's list).",
                     flag_values=FLAGS)
flags.DEFINE_integer("echo_batch_size", 72, "Echo pairs registered (and refined) together.", flag_values=FLAGS)
flags.DEFINE_integer("mnist_batch_size", 1000, "MNIST pairs registered (and refined) together.", flag_values=FLAGS)
flags.DEFINE_integer("brain_elastix_pairs", 2, "Pairs per brain set registered by elastix (0: none).",
                     flag_values=FLAGS)
flags.DEFINE_integer("echo_elastix_pairs", 72, "Echo pairs registered by elastix (0: none).", flag_values=FLAGS)
flags.DEFINE_integer("mnist_elastix_pairs", 100, "MNIST pairs registered by elastix (0: none).", flag_values=FLAGS)
flags.DEFINE_string("mnist_elastix_parameter_file", os.path.join("baselines", "elastix", "bspline_gs2.txt"),
                    "elastix parameter file of the MNIST section (the most accurate of the MNIST baselines).",
                    flag_values=FLAGS)
flags.DEFINE_string("json", os.path.join("baselines", "results", "refinement_metrics.json"),
                    "Where to write the results.", flag_values=FLAGS)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(model):
    from dirnet_tf.config import TrainConfig

    return TrainConfig.from_dict(dict(model.metadata.get("config") or {}), extra_ok=True)


def run_methods(model, fixed, moving, steps_list, score, batch_size=1, baseline=None, elastix_pairs=0):
    """``{"N=<n>": scores}`` for every refinement count and ``elastix`` on the first pairs.

    ``score(displacement, subset)`` scores displacements ``[P, *spatial, ndim]`` of the pairs
    ``subset`` (a slice); seconds per pair are wall time of the whole call (network + refinement),
    ``batch_size`` pairs at a time, after one untimed call of that size (which traces the graphs).
    """
    from dirnet_tf.inference import predict
    from dirnet_tf.register_refine import refined_function

    rows = {}
    for steps in steps_list:
        fn = refined_function(model, steps)
        predict(fn, fixed[:batch_size], moving[:batch_size], batch_size=batch_size)  # traces the graphs once
        start = time.perf_counter()
        out = predict(fn, fixed, moving, batch_size=batch_size)
        seconds = time.perf_counter() - start
        row = score(out["displacement"], slice(None))
        row["seconds_per_pair"] = seconds / len(fixed)
        row["batch_size"] = int(batch_size)
        if elastix_pairs:
            row["same_pairs_as_elastix"] = score(out["displacement"][:elastix_pairs], slice(0, elastix_pairs))
        rows[f"N={steps}"] = row
        print(f"  N={steps:<4d} {_brief(row)}", flush=True)
    if baseline is not None and elastix_pairs:
        out = baseline(fixed[:elastix_pairs], moving[:elastix_pairs])
        row = score(out["displacement"], slice(0, elastix_pairs))
        row["seconds_per_pair"] = float(np.median(out["seconds"]))
        rows["elastix"] = row
        print(f"  elastix {_brief(row)}", flush=True)
    return rows


def _brief(row):
    keys = ("epe_mm_mask", "ncc_after", "ncc_sector", "ncc", "brain_dice_after", "folding_fraction",
            "seconds_per_pair")
    return "  ".join(f"{k} {row[k]:.4g}" for k in keys if isinstance(row.get(k), (int, float)))


def brain3d_section(model, steps_list):
    """Held-out fields (both volumes) and MNI <-> ROBEX."""
    from dirnet_tf.comparison import warp_and_score
    from dirnet_tf.elastix import register_pairs
    from experiments import brain3d

    config = _config(model)
    config, inputs = brain3d.prepare_inputs(config)
    volumes, _, sets = brain3d.held_out_sets(config, inputs)
    trained, other = list(sets)
    spacing = np.asarray(volumes[trained]["grid"].spacing, np.float64)

    def elastix(fixed, moving):
        return register_pairs(fixed, moving, brain3d.ELASTIX_PARAMETER_FILE, ndim=3, spacing=spacing)

    report = {"model_grid": {"shape": list(volumes[trained]["grid"].shape), "spacing_mm": spacing.tolist()}}
    for name, test in sets.items():
        test = {k: v[:FLAGS.brain_pairs] for k, v in test.items()}
        print(f"[brain3d] held-out fields of {name}: {len(test['fixed'])} pairs", flush=True)

        def score(displacement, subset, test=test):
            part = {k: v[subset] for k, v in test.items()}
            return warp_and_score(part["fixed"], part["moving"], displacement, spacing, "border", part)[0]

        report[f"held_out_fields_{name}"] = run_methods(model, test["fixed"], test["moving"], steps_list, score,
                                                        baseline=elastix, elastix_pairs=FLAGS.brain_elastix_pairs)
    for fixed_name, moving_name in ((trained, other), (other, trained)):
        f, m = volumes[fixed_name], volumes[moving_name]
        print(f"[brain3d] {fixed_name} <- {moving_name}", flush=True)

        def score(displacement, subset, f=f, m=m):
            return warp_and_score(f["images"][:1], m["images"][:1], displacement, spacing, "border",
                                  fixed_mask=f["labels"][:1] > 0, moving_mask=m["labels"][:1] > 0)[0]

        report[f"{fixed_name}<-{moving_name}"] = run_methods(model, f["images"][:1], m["images"][:1], steps_list,
                                                             score, baseline=elastix,
                                                             elastix_pairs=1 if FLAGS.brain_elastix_pairs else 0)
    return report


def reoriented_copy(path, out, permutation=(2, 0, 1), flip=(0,), crop=0.06):
    """Write the NIfTI ``path`` re-oriented and cropped, with a header that says so: the array axes
    permuted (``permutation``), flipped (``flip``: axes of the new order) and ``crop`` of every
    border removed; the voxels keep their world positions."""
    import nibabel as nib

    image = nib.load(path)
    data, affine = np.asanyarray(image.dataobj), image.affine.copy()
    index = np.eye(4)  # new voxel -> old voxel
    data = np.transpose(data, permutation)
    index = index[:, list(permutation) + [3]]
    for a in flip:
        data = np.flip(data, a)
        column = np.zeros(4)
        column[a] = -1
        flip_matrix = np.eye(4)
        flip_matrix[a, a] = -1
        flip_matrix[a, 3] = data.shape[a] - 1
        index = index @ flip_matrix
    start = [int(round(crop * n)) for n in data.shape]
    data = data[tuple(slice(s, n - s) for s, n in zip(start, data.shape))]
    shift = np.eye(4)
    shift[:3, 3] = start
    index = index @ shift
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine @ index), out)
    return out


def reoriented_section(model, steps_list, folder):
    """The same pairs as files, as written and re-oriented + cropped: scores on the fixed grid."""
    import dirnet_tf
    from data import brain as brain_data
    from dirnet_tf import metrics, readers
    from experiments import brain3d

    config, inputs = brain3d.prepare_inputs(_config(model))
    os.makedirs(folder, exist_ok=True)
    files = {}
    for name in brain_data.BRAIN_VOLUMES:
        files[(name, "original")] = (inputs[name]["image"], inputs[name]["labels"])
        files[(name, "reoriented")] = tuple(
            reoriented_copy(p, os.path.join(folder, f"{name}_{kind}_reoriented.nii.gz"))
            for kind, p in (("t1", inputs[name]["image"]), ("labels", inputs[name]["labels"])))
    kept = {}
    for name in brain_data.BRAIN_VOLUMES:  # the crop removes background only
        counts = [int((readers.read_labels(files[(name, kind)][1], ndim=3)[0].array > 0).sum())
                  for kind in ("original", "reoriented")]
        kept[name] = {"brain_voxels_original": counts[0], "brain_voxels_copy": counts[1]}
    report = {"copies": "array axes permuted (2, 0, 1), the first flipped, 6 % cropped at every border (empty "
                        "background only: every brain voxel is kept); headers updated so every voxel keeps its "
                        "world position", "brain_voxels": kept}
    for fixed_name, moving_name in (("mni", "robex"), ("robex", "mni")):
        for steps in steps_list:
            row = {}
            for kind in ("original", "reoriented"):
                fixed_path, fixed_labels = files[(fixed_name, kind)]
                moving_path, moving_labels = files[(moving_name, kind)]
                start = time.perf_counter()
                result = dirnet_tf.register(model, fixed_path, moving_path, init="header", refine=steps)
                carried = result.warp_labels(moving_labels) > 0
                seconds = time.perf_counter() - start
                mask = readers.read_labels(fixed_labels, ndim=3)[0].array > 0
                fixed = result.fixed_image.array
                row[kind] = {"ncc_brain": float(metrics.ncc(fixed[mask], result.warped[mask])),
                             "brain_dice": float(metrics.dice(mask, carried)["mean"]),
                             "seconds": seconds}
            row["difference"] = {k: abs(row["original"][k] - row["reoriented"][k]) for k in ("ncc_brain",
                                                                                              "brain_dice")}
            report[f"{fixed_name}<-{moving_name} N={steps}"] = row
            print(f"[reoriented] {fixed_name}<-{moving_name} N={steps}: " + "; ".join(
                f"{kind} NCC {row[kind]['ncc_brain']:.4f} Dice {row[kind]['brain_dice']:.4f}"
                for kind in ("original", "reoriented")), flush=True)
    return report


def echo_section(model, steps_list):
    """Sector NCC of the echo test pairs."""
    from dirnet_tf import comparison, train_data
    from dirnet_tf.elastix import register_pairs
    from experiments import echo

    config, inputs = echo.prepare_inputs(_config(model))
    data = train_data.load_collection(config)
    test = train_data.make_splits_and_pairs(config, data)["test"][:FLAGS.echo_pairs]
    grid, images = data["grid"], data["images"]
    spacing = np.asarray(grid.spacing, np.float64)
    sector = grid.prepare_labels(inputs.mask.astype(np.int32), inputs.frames[0]) > 0
    fixed, moving = images[test[:, 0]], images[test[:, 1]]

    def score(displacement, subset):
        from dirnet_tf.warping import warp

        warped = warp(moving[subset], np.asarray(displacement, np.float32)).numpy()
        return comparison.masked_registration_scores(fixed[subset], warped, displacement, sector, spacing,
                                                     test[subset])[0]

    def elastix(f, m):
        return register_pairs(f, m, config.extra["elastix_parameter_file"], fixed_mask=sector)

    print(f"[echo] {len(test)} test pairs", flush=True)
    return {"pairs": int(len(test)), **run_methods(model, fixed, moving, steps_list, score,
                                                   batch_size=FLAGS.echo_batch_size,
                                                   baseline=elastix, elastix_pairs=FLAGS.echo_elastix_pairs)}


def mnist_section(model, steps_list):
    """NCC of the MNIST test pairs."""
    from data import mnist as mnist_data
    from dirnet_tf import metrics
    from dirnet_tf.elastix import register_pairs
    from dirnet_tf.warping import warp

    config = _config(model)
    record = mnist_data.load_eval_pairs(os.path.join(config.logdir, "eval_pairs.json"))
    fixed, moving = record["fixed"][:FLAGS.mnist_pairs], record["moving"][:FLAGS.mnist_pairs]

    def score(displacement, subset):
        warped = warp(moving[subset], np.asarray(displacement, np.float32)).numpy()
        ncc = [metrics.ncc(f, w) for f, w in zip(fixed[subset], warped)]
        det = metrics.jacobian_determinant(np.asarray(displacement))
        return {"ncc": float(np.mean(ncc)), "folding_fraction": float((det <= 0).mean()),
                "pairs_with_folding": int((det <= 0).reshape(len(det), -1).any(axis=1).sum())}

    def elastix(f, m):
        return register_pairs(f, m, FLAGS.mnist_elastix_parameter_file)

    print(f"[mnist] {len(fixed)} test pairs", flush=True)
    return {"pairs": int(len(fixed)), **run_methods(model, fixed, moving, steps_list, score,
                                                    batch_size=FLAGS.mnist_batch_size,
                                                    baseline=elastix, elastix_pairs=FLAGS.mnist_elastix_pairs)}


SECTIONS = {"brain3d": ("brain3d_export", "python -m experiments.brain3d", brain3d_section),
            "reoriented": ("brain3d_export", "python -m experiments.brain3d", None),
            "echo": ("echo_export", "python -m experiments.echo", echo_section),
            "mnist": ("mnist_export", "python -m experiments.mnist", mnist_section)}


def main(argv=None):
    """Run the benchmark; exit status 0, 2 for a bad command line."""
    argv = parse(FLAGS, "benchmarks.refinement", argv)
    if argv is None:
        return 2
    from dirnet_tf.console import import_tensorflow_quietly

    import_tensorflow_quietly()
    from dirnet_tf.registration import load_model

    steps_list = [int(s) for s in FLAGS.refine_steps.split(",") if s.strip()]
    report = {"refine_steps": steps_list, "command": "python -m benchmarks.refinement " + " ".join(argv),
              "cpu_count": os.cpu_count()}
    names = parse_sections(FLAGS.sections, SECTIONS)
    if names is None:
        return 2
    for name in names:
        flag, command, run = SECTIONS[name]
        path = FLAGS[flag].value
        if not os.path.isdir(path):
            report[name] = {"skipped": f"no export at {path}; make it with `{command}`"}
            print(f"[{name}] skipped: {report[name]['skipped']}", flush=True)
        else:
            model = load_model(path)
            if name == "reoriented":
                report[name] = reoriented_section(model, steps_list, os.path.join("runs", "refinement_reoriented"))
            else:
                report[name] = run(model, steps_list)
            report[name]["export"] = path
        if FLAGS.json:
            save_report(FLAGS.json, report)
    print(f"wrote {FLAGS.json}" if FLAGS.json else json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
