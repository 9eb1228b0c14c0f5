"""The shipped brain model (``dirnet_tf.load_model("brain")``) against elastix, same pairs, same CPU, one run.

    python -m benchmarks.brain_model [--sections=templates,held_out_fields] [--refine_steps=0,50]
        [--model=brain] [--json=baselines/results/brain_model_metrics.json]

Needs ``pip install -e .[brain,medical,baselines]`` (the templates, nibabel, itk-elastix).

* ``templates``: MNI <-> ROBEX, both ways, through the library API on NIfTI files as
  :func:`data.brain.write_aligned_volumes` writes them (1 mm RAS boxes, each centred on its brain;
  the model relates them through their headers).  Once T1 <-> T1, once with the moving scan's
  contrast remapped T2-like (:func:`data.brain_labels.t2_like_contrast`: a fixed non-monotonic
  map per tissue).  Scores on the fixed scan's 1 mm grid: brain-mask Dice of the carried moving
  mask, NCC inside the fixed brain mask between the fixed T1 and the moving *T1* carried by the
  same map (so both contrasts are scored alike), folding voxels (``det J <= 0`` of the map), seconds
  per volume (the whole ``register`` call: reading both files, the network, the outputs on the
  fixed grid), split into its parts for one pair (``register_seconds_mni<-robex``), and the network
  alone on the model grid.  ``before``: the scans as their headers
  place them.  Grey / white matter Dice needs maps on both sides: ROBEX has none (held-out fields).
* ``held_out_fields``: the test pairs of ``experiments.brain3d`` (each template under held-out
  random smooth fields of known truth, on the 2 mm model grid; rebuilt from that command's
  defaults, no export needed): endpoint error in mm (brain), Dice of the carried labels (MNI: grey /
  white matter / other brain) against the true field's, folding, seconds per volume.

Every refinement count ``N`` of ``--refine_steps`` is run (0 = the network alone; similarity NCC for
same-contrast pairs, mutual information across contrasts).  elastix runs in this process on the same
pairs: affine then cubic B-spline (``baselines/elastix/brain_affine.txt`` + ``brain3d_bspline.txt``),
NCC for same contrast; across contrasts with NCC (to show that it fails) and with mutual information.
Its seconds include bringing the moving scan onto the fixed grid through the headers.  Units:
endpoint errors in mm; seconds of wall time; Dice and NCC unitless.
"""

import json
import os
import sys
import time

import numpy as np
from absl import flags

from benchmarks.cli import parse, parse_sections, save_report

FLAGS = flags.FlagValues()
flags.DEFINE_string("sections", "templates,held_out_fields", "Comma-separated sections to run.", flag_values=FLAGS)
flags.DEFINE_string("model", "brain", "The model: a shipped model's name or an export directory.", flag_values=FLAGS)
flags.DEFINE_string("refine_steps", "0,50", "Refinement counts N (0 = network only).", flag_values=FLAGS)
flags.DEFINE_bool("elastix", True, "Also run elastix on the same pairs.", flag_values=FLAGS)
flags.DEFINE_integer("brain_pairs", 3, "Held-out-field pairs per template.", flag_values=FLAGS)
flags.DEFINE_integer("brain_elastix_pairs", 2, "Held-out-field pairs per template registered by elastix.",
                     flag_values=FLAGS)
flags.DEFINE_string("folder", os.path.join("runs", "brain_model"), "Scratch folder for the input files.",
                    flag_values=FLAGS)
flags.DEFINE_string("json", os.path.join("baselines", "results", "brain_model_metrics.json"),
                    "Where to write the results.", flag_values=FLAGS)

ELASTIX_FILES = ("brain_affine.txt", "brain3d_bspline.txt")
ELASTIX_METRICS = {"ncc": {"Metric": "AdvancedNormalizedCorrelation"},
                   "mi": {"Metric": "AdvancedMattesMutualInformation", "NumberOfHistogramBins": "32"}}
CONTRASTS = {"t1": "ncc", "t2": "mi"}  # the moving scan's contrast -> the refinement's similarity


def _elastix_files():
    from dirnet_tf.elastix import BASELINE_DIR

    return [os.path.join(BASELINE_DIR, name) for name in ELASTIX_FILES]


def write_inputs(folder):
    """Both templates as 1 mm NIfTI (T1, labels) and the T2-like copy of each T1, same headers."""
    import nibabel as nib

    from data import brain as brain_data
    from data import brain_labels

    inputs = brain_data.write_aligned_volumes(folder, (96, 112, 96), (2.0, 2.0, 2.0))
    for name in brain_data.BRAIN_VOLUMES:
        t1 = nib.load(inputs[name]["image"])
        mask = np.asarray(nib.load(inputs[name]["labels"]).dataobj) > 0
        t2 = brain_labels.t2_like_contrast(np.asarray(t1.dataobj, np.float32), mask)
        inputs[name]["t2"] = os.path.join(folder, f"{name}_t2.nii.gz")
        nib.save(nib.Nifti1Image(t2, t1.affine), inputs[name]["t2"])
    return inputs


class Scan:
    """A NIfTI scan's T1 array, brain mask and affine (voxel ij -> RAS mm)."""

    def __init__(self, files):
        import nibabel as nib

        image = nib.load(files["image"])
        self.affine = image.affine
        self.t1 = np.asarray(image.dataobj, np.float32)
        self.mask = np.asarray(nib.load(files["labels"]).dataobj) > 0
        self.spacing = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def header_map(fixed, moving, displacement=None):
    """Moving voxel indices ``[3, *fixed_shape]`` of every fixed voxel through the headers, after a
    displacement of the fixed voxel in fixed voxels (``[*fixed_shape, 3]``, ij) when given."""
    grid = np.indices(fixed.t1.shape, dtype=np.float64)
    if displacement is not None:
        grid += np.moveaxis(displacement, -1, 0)
    m = np.linalg.inv(moving.affine) @ fixed.affine
    return np.einsum("ij,j...->i...", m[:3, :3], grid) + m[:3, 3].reshape(3, 1, 1, 1)


def score_map(fixed, moving, positions):
    """Brain Dice, NCC in the fixed brain and folding (``det J <= 0`` of the world map) of a map given as
    the moving voxel indices ``[3, *fixed_shape]`` of every fixed voxel."""
    from scipy import ndimage

    from dirnet_tf import metrics

    warped = ndimage.map_coordinates(moving.t1, positions, order=1, mode="constant", cval=0.0)
    carried = ndimage.map_coordinates(moving.mask.astype(np.float32), positions, order=0, mode="constant") > 0
    gradient = np.stack([np.stack(np.gradient(positions[c]), 0) for c in range(3)], 0)  # [c, axis, ...]
    # In world space (mm -> mm) the map's Jacobian is A_m J A_f^-1: its sign also carries the headers'.
    orientation = np.sign(np.linalg.det(moving.affine[:3, :3]) * np.linalg.det(fixed.affine[:3, :3]))
    det = orientation * np.linalg.det(np.moveaxis(gradient, (0, 1), (-2, -1)))
    return {"brain_dice": float(metrics.dice(fixed.mask, carried)["mean"]),
            "ncc_brain": float(metrics.ncc(fixed.t1[fixed.mask], warped[fixed.mask])),
            "folding_voxels": int((det <= 0).sum())}


def _print_row(key, name, row):
    print(f"  {key:<18s} {name:<12s} Dice {row['brain_dice']:.4f}  NCC {row['ncc_brain']:.4f}  "
          f"folding {row['folding_voxels']}  {row.get('seconds', 0.0):.2f} s", flush=True)


def network_seconds(model, repeats=5):
    """Median seconds of the network alone on one pair of the model grid (batch 1)."""
    from dirnet_tf.inference import time_per_pair

    rng = np.random.default_rng(0)
    pair = rng.uniform(size=(2, 1, *model.shape, model.channels)).astype(np.float32)
    return time_per_pair(model.fn, pair[0], pair[1], batch_size=1, repeats=repeats)["ms_per_pair"] / 1e3


def register_seconds(model, fixed_file, moving_file, repeats=3):
    """Median seconds of the parts of one ``register`` call without refinement: ``read_and_prepare``
    (both files read and brought onto the model grid through their headers), ``network`` (the served
    model on the model grid) and ``outputs`` (warped image and displacement on the fixed grid), and
    their ``total``."""
    from dirnet_tf import register_engine

    parts = {"read_and_prepare": [], "network": [], "outputs": [], "total": []}
    for _ in range(repeats + 1):  # the first call traces and warms up: not counted
        t0 = time.perf_counter()
        details = register_engine.prepare_pair(model, fixed_file, moving_file, (None, None), init="header")
        t1 = time.perf_counter()
        register_engine.infer(model, [details])
        t2 = time.perf_counter()
        register_engine.finish(model, details, {"image", "field"})
        t3 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            parts[key].append(value)
    return {key: float(np.median(values[1:])) for key, values in parts.items()}


def templates_section(model, steps_list, folder):
    """MNI <-> ROBEX, both ways, T1 and T2-like moving scans: the model (network, refined) and elastix."""
    import nibabel as nib

    import dirnet_tf
    from data import brain as brain_data
    from dirnet_tf.elastix import register_pairs

    inputs = write_inputs(folder)
    scans = {name: Scan(inputs[name]) for name in ("mni", "robex")}
    report = {"network_seconds_model_grid": network_seconds(model),
              "register_seconds_mni<-robex": register_seconds(model, inputs["mni"]["image"], inputs["robex"]["image"]),
              "elastix_parameter_files": [os.path.join("baselines", "elastix", n) for n in ELASTIX_FILES]}
    for contrast, similarity in CONTRASTS.items():
        for fixed_name, moving_name in (("mni", "robex"), ("robex", "mni")):
            fixed, moving = scans[fixed_name], scans[moving_name]
            key = f"{fixed_name}<-{moving_name} {contrast}"
            moving_file = inputs[moving_name]["image" if contrast == "t1" else "t2"]
            rows = {"before": score_map(fixed, moving, header_map(fixed, moving))}
            _print_row(key, "before", rows["before"])
            for steps in steps_list:
                start = time.perf_counter()
                result = dirnet_tf.register(model, inputs[fixed_name]["image"], moving_file, init="header",
                                            refine=steps, refine_similarity=similarity if steps else None)
                seconds = time.perf_counter() - start
                positions = np.indices(fixed.t1.shape, dtype=np.float64) + np.moveaxis(result.displacement, -1, 0)
                row = dict(score_map(fixed, moving, positions), seconds=seconds)
                if steps:
                    row["refinement"] = result.refinement
                rows[f"N={steps}"] = row
                _print_row(key, f"N={steps}", row)
            if FLAGS.elastix:
                moving_image = np.asarray(nib.load(moving_file).dataobj, np.float32)
                for metric in (("ncc",) if contrast == "t1" else ("ncc", "mi")):
                    start = time.perf_counter()
                    on_fixed = brain_data.resample_world(moving_image, moving.affine, fixed.affine, fixed.t1.shape)
                    resample_seconds = time.perf_counter() - start
                    out = register_pairs(fixed.t1[None], on_fixed[None], _elastix_files(), ndim=3,
                                         spacing=fixed.spacing, overrides=ELASTIX_METRICS[metric])
                    positions = header_map(fixed, moving, out["displacement"][0].astype(np.float64))
                    row = dict(score_map(fixed, moving, positions),
                               seconds=float(out["seconds"][0]) + resample_seconds)
                    rows[f"elastix {metric}"] = row
                    _print_row(key, f"elastix {metric}", row)
            report[key] = rows
    return report


def brain3d_test_sets(folder):
    """The held-out-field test pairs of ``experiments.brain3d`` (its defaults) of both templates."""
    from dirnet_tf.config import TrainConfig
    from experiments import brain3d

    config = TrainConfig.from_dict(dict(brain3d.DEFAULTS, logdir=folder), extra_ok=True)
    config, inputs = brain3d.prepare_inputs(config)
    volumes, _, sets = brain3d.held_out_sets(config, inputs)
    return sets, np.asarray(volumes[next(iter(sets))]["grid"].spacing, np.float64)


def held_out_fields_section(model, steps_list, folder):
    """brain3d's held-out fields: endpoint error, label Dice, folding, seconds; elastix affine + B-spline."""
    from benchmarks.refinement import run_methods
    from dirnet_tf.comparison import warp_and_score
    from dirnet_tf.elastix import register_pairs

    sets, spacing = brain3d_test_sets(folder)
    if tuple(sets["mni"]["fixed"].shape[1:4]) != tuple(model.shape):
        raise ValueError(f"the model's grid {model.shape} differs from experiments.brain3d's "
                         f"{sets['mni']['fixed'].shape[1:4]}")

    def elastix(fixed, moving):
        return register_pairs(fixed, moving, _elastix_files(), ndim=3, spacing=spacing,
                              overrides=ELASTIX_METRICS["ncc"])

    report = {"model_grid": {"shape": list(model.shape), "spacing_mm": spacing.tolist()}}
    for name, test in sets.items():
        test = {k: v[:FLAGS.brain_pairs] for k, v in test.items()}
        print(f"[held_out_fields] {name}: {len(test['fixed'])} pairs", flush=True)

        def score(displacement, subset, test=test):
            part = {k: v[subset] for k, v in test.items()}
            return warp_and_score(part["fixed"], part["moving"], displacement, spacing, "border", part)[0]

        report[name] = run_methods(model, test["fixed"], test["moving"], steps_list, score,
                                   baseline=elastix if FLAGS.elastix else None,
                                   elastix_pairs=FLAGS.brain_elastix_pairs if FLAGS.elastix else 0)
    return report


SECTIONS = {"templates": templates_section, "held_out_fields": held_out_fields_section}


def main(argv=None):
    """Run the benchmark; exit status 0, 2 for a bad command line."""
    argv = parse(FLAGS, "benchmarks.brain_model", argv)
    if argv is None:
        return 2
    names = parse_sections(FLAGS.sections, SECTIONS)
    if names is None:
        return 2
    from dirnet_tf.console import import_tensorflow_quietly

    import_tensorflow_quietly()
    from dirnet_tf.registration import load_model

    model = load_model(FLAGS.model)
    steps_list = [int(s) for s in FLAGS.refine_steps.split(",") if s.strip()]
    report = {"model": FLAGS.model, "refine_steps": steps_list, "cpu_count": os.cpu_count(),
              "command": " ".join(["python -m benchmarks.brain_model"] + argv)}
    for name in names:
        print(f"[{name}]", flush=True)
        report[name] = SECTIONS[name](model, steps_list, os.path.join(FLAGS.folder, name))
        if FLAGS.json:
            save_report(FLAGS.json, report)
    print(f"wrote {FLAGS.json}" if FLAGS.json else json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
