"""Train DIRNet on your own 2-D images or 3-D volumes (``python -m experiments.train``).

    python -m experiments.train --images=DIR_OR_GLOB_OR_LIST [--labels=DIR] [--pairs=MODE] \\
        --logdir=runs/mine --export_dir=exports/mine [--shape=..] [--spacing=..] [...]

**Images** (``--images``): a folder (every readable image in it, sorted by name), a glob,
a ``.csv`` list (header ``image``, optional ``label`` and ``group`` columns) or ``.txt``
list, one file, or ``FILE.h5:/dataset``.  Formats: PNG/JPEG/TIFF/BMP (colour -> grey),
``.npy`` (``--ndim`` decides whether a 3-D array is a volume or a stack of 2-D images),
NIfTI, DICOM (a file -- a multi-frame file is one group of 2-D frames -- or a folder
holding one series), HDF5; see :mod:`dirnet_tf.readers`.  Unreadable files are skipped
and listed (console and ``skipped.json`` in ``--logdir``).

**Model grid**: every image is resampled with its own spacing (from the NIfTI/DICOM
header, ``--default_spacing`` for formats without one) onto ``--shape`` voxels at
``--spacing`` mm, centre-cropped or padded, and normalised (``--normalize``); by default
the grid is the first image's.  ``--mask``: a file with one mask on the images' own grid
(non-zero = used); voxels outside it are set to 0 after normalisation, so that static
overlays do not drive the similarity.  The grid and the normalisation are stored in the
export (``assets/dirnet.json``, key ``model_grid``); displacements are in **voxels of the
model grid, ij (array) order**; ``metrics.json`` also gives them in mm.

**Pairs** (``--pairs``): ``random``, ``within_group``, ``sequence`` (frames of one group at
most ``--max_frame_gap`` apart), ``atlas:PATH``, ``list:CSV`` (see :mod:`dirnet_tf.pairs`), or
``synthetic``: every pair is one image and a copy of it deformed by a known random smooth field
(:mod:`dirnet_tf.synthetic`): ``moving`` = the image, ``fixed`` = the image warped by the field ``u``
(so ``warp(moving, u) == fixed`` exactly and ``u`` is the true answer on the fixed grid), each with
random intensity changes.  ``--synthetic_magnitude`` (largest displacement per axis, mm),
``--synthetic_spacing`` (control-point spacing, mm: the smoothness; fields beyond the injectivity
bound are composed of small ones), ``--synthetic_gamma`` / ``--synthetic_scale`` /
``--synthetic_noise`` (intensity changes), ``--synthetic_augment`` (mm; a random deformation of
the image first, a new moving image per pair).  Fields are drawn on the fly from ``--seed``
(training) and ``--split_seed`` (validation and test: other random streams, so held-out fields);
one image is enough.  The evaluation adds the endpoint error of the recovered field against the
true one in mm (``epe_mm``; inside the labelled foreground, or the ``--mask``, as ``epe_mm_mask``),
the mean true displacement, and Dice of the labels carried by the recovered field against the
labels carried by the true field; ``synthetic_test_fields.npz`` holds the true test fields.
**Splits** (``--split=TRAIN,VALID,TEST``, ``--split_seed``) are made by group, never one
group in two splits; ``--split_within_groups`` instead cuts every group in time (first
frames train, then valid, then test) -- for a collection that is one sequence.

**Labels** (``--labels``, a folder of label maps named like the images, or the CSV
``label`` column) are used only for evaluation: Dice per label, HD95 and MAD in mm.

Outputs in ``--logdir``: checkpoints, ``flags.json``, TensorBoard events (2-D: pairs;
3-D: the central orthogonal slices), ``skipped.json``, ``eval_pairs.json``,
``metrics.json`` (NCC, folding, displacement in voxels and mm, Dice/HD95/MAD with labels,
time per pair) and ``registration.png``; the SavedModel goes to ``--export_dir``.
"""

import os

import numpy as np
from absl import flags

from dirnet_tf import evaluation, pairs, readers, synthetic
from dirnet_tf.files import write_json
from dirnet_tf.inference import load_export
from dirnet_tf.plotting import registration_figure, volume_figure
from dirnet_tf.preprocessing import NORMALIZE_MODES, ModelGrid
from dirnet_tf.trainer import make_strategy
from experiments import common
from experiments.common import define_flag

common.define_flags()
flags.adopt_module_key_flags(common)
define_flag("string", "images", None, "Images: a folder, a glob, a .csv/.txt list, one file or FILE.h5:/dataset.")
define_flag("string", "labels", None, "Label maps for evaluation: a folder of files named like the images "
            "(or one file for a single image file).")
define_flag("string", "pairs", "random", "Pairing: random, within_group, sequence, atlas:PATH, list:CSV or "
            "synthetic (an image and a copy deformed by a known random field).")
define_flag("integer", "max_frame_gap", 1, "--pairs=sequence: frames at most this far apart.")
define_flag("string", "split", "0.8,0.1,0.1", "Train,valid,test fractions (of groups).")
define_flag("integer", "split_seed", 0, "Seed of the split.")
define_flag("bool", "split_within_groups", False, "Cut every group in time (first frames train, then valid, "
            "then test) instead of splitting by group.")
define_flag("integer", "ndim", 0, "2 or 3: whether a 3-D array is a stack of 2-D images or a volume "
            "(0: volumes).")
define_flag("string", "shape", "", "Model grid in voxels per array axis, e.g. 96,112,96 (default: the first "
            "image's grid).")
define_flag("string", "spacing", "", "Model grid spacing in mm per array axis, one value or one per axis "
            "(default: the first image's).")
define_flag("string", "default_spacing", "", "Voxel size in mm for formats without one (PNG, NPY, HDF5; "
            "default 1).")
define_flag("enum", "normalize", "percentile", "Intensity normalisation: 1st-99th percentile -> [0, 1], "
            "min-max, or none.", list(NORMALIZE_MODES))
define_flag("string", "mask", None, "A mask on the images' own grid (any readable format; non-zero = use).")
define_flag("integer", "eval_pairs", 50, "Most validation and test pairs (each).")
define_flag("bool", "select_best", True, "Export the checkpoint with the best validation NCC.")
define_flag("bool", "evaluate", True, "Evaluate the export on the test pairs.")
define_flag("integer", "timing_batch_size", 8, "Batch size of the time-per-pair measurement.")
define_flag("float", "synthetic_magnitude", 4.0, "--pairs=synthetic: largest displacement per axis of the "
            "random fields, mm.")
define_flag("float", "synthetic_spacing", 32.0, "--pairs=synthetic: control-point spacing of the random "
            "B-spline fields, mm (larger: smoother).")
define_flag("float", "synthetic_gamma", 0.1, "--pairs=synthetic: standard deviation of log(gamma) of the random "
            "intensity gamma of each image.")
define_flag("float", "synthetic_scale", 0.1, "--pairs=synthetic: largest relative change of each image's "
            "intensity scale.")
define_flag("float", "synthetic_noise", 0.01, "--pairs=synthetic: standard deviation of added Gaussian noise, "
            "relative to the image's intensity range.")
define_flag("float", "synthetic_augment", 0.0, "--pairs=synthetic: largest displacement per axis (mm) of a "
            "random deformation applied to the image before each pair is made (0: off).")

DEFAULTS = dict(steps=2000, batch_size=8, learning_rate=1e-3, grid_spacing=8, filters="auto",
                convs_per_level="auto", logdir=os.path.join("runs", "train"),
                export_dir=os.path.join("exports", "train"), log_every=50, eval_every=250,
                checkpoint_every=250)


def _floats(text, what):
    if not str(text).strip():
        return None
    try:
        values = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise readers.InputError(f"--{what}={text}: give numbers separated by commas") from None
    return values[0] if len(values) == 1 else tuple(values)


def model_grid(config, first):
    """The :class:`~dirnet_tf.preprocessing.ModelGrid` of the flags (defaults: the first image's grid)."""
    shape = common.parse_int_list(config["shape"]) if str(config["shape"]).strip() else first.shape
    spacing = _floats(config["spacing"], "spacing")
    return ModelGrid(tuple(np.atleast_1d(shape)), first.spacing if spacing is None else spacing,
                     config["normalize"])


def load_collection(config):
    """Read, resample and normalise the images (and labels) named by the flags.

    Returns
    -------
    dict
        ``images`` float32 ``[N, *shape, 1]``, ``labels`` int32 ``[N, *shape]`` or None,
        ``masks`` bool ``[N, *shape]`` (``--mask`` on the model grid) or None,
        ``groups``, ``names`` (sources), ``grid`` (ModelGrid), ``skipped`` [(path, reason)].
    """
    if not config["images"]:
        raise readers.InputError("--images is required: a folder, a glob, a .csv/.txt list or a file")
    ndim = config["ndim"] or None
    default_spacing = _floats(config["default_spacing"], "default_spacing")
    entries, skipped = readers.list_images(config["images"], config["labels"], ndim, default_spacing)
    for path, reason in skipped:
        print(f"[data] skipped {path}: {reason}", flush=True)
    needed = 1 if pairs.parse_pairs_spec(config["pairs"])[0] == "synthetic" else 2
    if len(entries) < needed:
        raise readers.InputError(f"--images={config['images']}: {len(entries)} usable image; registration "
                                 "needs at least two (--pairs=synthetic: one)")
    grid = model_grid(config, entries[0].image)
    mask = None
    if config["mask"]:
        mask_image = readers.read_image(config["mask"], ndim, default_spacing)[0]
        mask = mask_image.array != 0
    images, labels, masks = [], [], []
    for entry in entries:
        image = entry.image
        array, _ = grid.prepare(image, mask=mask)
        if mask is not None:
            if mask.shape != image.shape:
                raise readers.InputError(f"--mask={config['mask']} has shape {mask.shape} but {image.source} "
                                         f"has shape {image.shape}; give a mask on the images' grid")
            masks.append(grid.prepare_labels(mask.astype(np.int32), image) > 0)
            array = array * masks[-1]
        images.append(array)
        if entry.label is not None:
            labels.append(grid.prepare_labels(entry.label, entry.image))
    if labels and len(labels) != len(images):
        raise readers.InputError(f"{len(images) - len(labels)} image(s) have no label map; give labels for "
                                 "all images or none")
    return {"images": np.stack(images)[..., None].astype(np.float32),
            "labels": np.stack(labels) if labels else None,
            "masks": np.stack(masks) if masks else None,
            "groups": [e.image.group for e in entries], "names": [e.image.source for e in entries],
            "grid": grid, "skipped": skipped}


def make_splits_and_pairs(config, data):
    """Split the collection and form the pairs of every split.

    Returns
    -------
    dict
        ``splits`` (indices per split), ``sampler_pairs`` (train candidates, None for random)
        and ``valid`` / ``test`` evaluation pairs (int ``[P, 2]`` global indices); for
        ``--pairs=synthetic`` see :func:`synthetic_plan`.
    """
    groups, names = data["groups"], data["names"]
    mode, argument = pairs.parse_pairs_spec(config["pairs"])
    if mode == "synthetic":
        return synthetic_plan(config, data)
    atlas_index = listed = None
    if mode == "atlas":
        atlas_index = pairs.find_image(argument, names)
        if atlas_index is None:
            raise pairs.PairingError(f"--pairs=atlas:{argument}: the atlas is not one of --images; add it "
                                     "to the images (it is used as the fixed image of every pair)")
    if mode == "list":
        listed = pairs.read_pair_list(argument, names)
    split = split_images(config, groups)
    if atlas_index is not None:  # the atlas is the fixed image of every split
        split = {k: np.union1d(v, [atlas_index]) if len(v) else v for k, v in split.items()}
    options = dict(max_frame_gap=config["max_frame_gap"], atlas_index=atlas_index, pairs=listed, names=names)
    out = {"splits": split, "mode": mode,
           "sampler_pairs": pairs.pair_candidates(groups, mode, subset=split["train"], **options)}
    for name, seed in (("valid", 1), ("test", 0)):
        members = split[name]
        usable = len(members) >= 2 if mode != "atlas" else len(members) >= 1
        out[name] = (pairs.evaluation_pairs(groups, mode, subset=members, max_pairs=config["eval_pairs"],
                                            seed=seed, **options) if usable else np.zeros((0, 2), np.int64))
    return out


def split_images(config, groups):
    """Train / valid / test image indices: by group, or in time with ``--split_within_groups``."""
    if config["split_within_groups"]:
        return pairs.split_within_groups(groups, config["split"])
    return pairs.split_by_group(groups, config["split"], config["split_seed"])


def synthetic_deformation(config, grid):
    """The :class:`~dirnet_tf.synthetic.SyntheticDeformation` of the ``--synthetic_*`` flags on ``grid``."""
    return synthetic.SyntheticDeformation(
        grid.shape, grid.spacing, magnitude=config["synthetic_magnitude"], spacing=config["synthetic_spacing"],
        gamma=config["synthetic_gamma"], scale=config["synthetic_scale"], noise=config["synthetic_noise"],
        augment=config["synthetic_augment"], boundary="border")


def synthetic_plan(config, data):
    """Splits and evaluation pairs of ``--pairs=synthetic``.

    The images are split as for the other modes (by group, or in time with
    ``--split_within_groups``); a validation or test split left without images
    (e.g. a single image) uses the training images instead, so that its pairs
    differ from the training pairs by their random fields only (held-out fields;
    ``sources`` says which).  ``--eval_pairs`` pairs are made for each, from the
    ``VALID`` / ``TEST`` random streams of ``--split_seed``.

    Returns
    -------
    dict
        ``splits``, ``mode`` (``"synthetic"``), ``sampler_pairs`` (None), ``deformation``,
        ``sources`` (per split: ``"held-out images"`` or ``"training images"``) and ``valid`` /
        ``test``: dicts of arrays ``fixed``, ``moving``, ``displacement`` (true, voxels), ``index``
        (global image index) and, for the test pairs, ``region`` (bool, the fixed-grid foreground of
        the labels or of ``--mask``; absent without either) and with labels ``fixed_labels`` /
        ``moving_labels``.
    """
    groups = data["groups"]
    split = split_images(config, groups)
    deformation = synthetic_deformation(config, data["grid"])
    out = {"splits": split, "mode": "synthetic", "sampler_pairs": None, "deformation": deformation, "sources": {}}
    count = int(config["eval_pairs"])
    if count < 1:
        raise pairs.PairingError(f"--eval_pairs={count}: give a whole number >= 1")
    for name, stream in (("valid", synthetic.VALID), ("test", synthetic.TEST)):
        members = split[name] if len(split[name]) else split["train"]
        out["sources"][name] = "held-out images" if len(split[name]) else "training images"
        labels, real_labels = None, False
        if name == "test" and data["labels"] is not None:
            labels, real_labels = data["labels"][members], True
        elif name == "test" and data.get("masks") is not None:
            labels = data["masks"][members].astype(np.int32)
        made = synthetic.synthetic_evaluation_pairs(data["images"][members], count, config["split_seed"],
                                                    deformation, stream, labels=labels)
        made["index"] = members[made["index"]]
        if labels is not None:
            made["region"] = made["fixed_labels"] > 0
            if not real_labels:
                del made["fixed_labels"], made["moving_labels"]
        out[name] = made
    return out


def _count(eval_pairs):
    return len(eval_pairs["fixed"]) if isinstance(eval_pairs, dict) else len(eval_pairs)


def synthetic_scores(predicted, test, spacing, boundary="border"):
    """Scores of recovered fields against the true fields of synthetic pairs.

    Parameters
    ----------
    predicted : array ``[P, *spatial, ndim]``
        Recovered backward fields (voxels, ij), on the fixed grid.
    test : dict
        Synthetic pairs (:func:`synthetic_plan`): ``displacement`` (true), optional ``region``,
        ``fixed_labels`` and ``moving_labels``.
    spacing : sequence of float (mm per axis)
    boundary : str

    Returns
    -------
    (dict, dict)
        Summary (``epe_mm`` mean endpoint error, ``true_displacement_mm`` the mean true
        displacement (= the endpoint error of no registration), their ``*_mask`` values inside
        ``region``, ``labels``: Dice / HD95 / MAD of the labels carried by ``predicted`` against
        those carried by the true field, with ``foreground`` = all labels > 0) and per-pair
        ``epe_mm`` / ``epe_mm_mask``.
    """
    true = np.asarray(test["displacement"])
    spacing = np.asarray(spacing, np.float64)
    epe = synthetic.endpoint_error(predicted, true, spacing)
    true_mm = np.linalg.norm(true * spacing, axis=-1)
    out = {"epe_mm": float(epe.mean()), "epe_mm_median": float(np.median(epe)), "epe_mm_max_pair": float(epe.max()),
           "true_displacement_mm": float(true_mm.mean()), "max_true_displacement_mm": float(true_mm.max())}
    per_pair = {"epe_mm": epe}
    region = test.get("region")
    if region is not None:
        epe_mask = synthetic.endpoint_error(predicted, true, spacing, region)
        out.update(epe_mm_mask=float(np.nanmean(epe_mask)), epe_mm_mask_median=float(np.nanmedian(epe_mask)),
                   true_displacement_mm_mask=float(np.nanmean(synthetic.masked_mean(true_mm, region))),
                   mask_voxels_mean=float(np.asarray(region).reshape(len(region), -1).sum(axis=1).mean()))
        per_pair["epe_mm_mask"] = epe_mask
    if "fixed_labels" in test:
        fixed_labels = np.asarray(test["fixed_labels"], np.int32)
        moving_labels = np.asarray(test["moving_labels"], np.int32)
        labels = evaluation.label_scores(fixed_labels, moving_labels, predicted, boundary, spacing)
        foreground = evaluation.label_scores((fixed_labels > 0).astype(np.int32),
                                             (moving_labels > 0).astype(np.int32), predicted, boundary, spacing)
        if "1" in foreground:
            labels["foreground"] = foreground["1"]
        out["labels"] = labels
        out["labels_note"] = ("Dice/HD95/MAD of the moving labels carried by the recovered field against the "
                              "moving labels carried by the true field (= the fixed image's labels)")
    return out, per_pair


def evaluate(fn, data, eval_pairs, boundary, spacing, timing_batch_size=8):
    """Score the registration of ``eval_pairs`` by ``fn`` (an exported model).

    ``eval_pairs``: int ``[P, 2]`` (fixed, moving) image indices, or the synthetic pairs of
    :func:`synthetic_plan` (then the scores of :func:`synthetic_scores` are added).

    The scores are :func:`dirnet_tf.evaluation.evaluate_pairs`' (NCC, folding, displacement in
    voxels and mm, inverse consistency, identity check, time per pair, label scores).

    Returns
    -------
    tuple
        ``(metrics dict, predictions dict)``; displacement statistics in model voxels and mm.
    """
    if isinstance(eval_pairs, dict):  # --pairs=synthetic
        fixed, moving, labels = eval_pairs["fixed"], eval_pairs["moving"], None
    else:
        images = data["images"]
        fixed, moving = images[eval_pairs[:, 0]], images[eval_pairs[:, 1]]
        labels = None
        if data["labels"] is not None:
            labels = (data["labels"][eval_pairs[:, 0]], data["labels"][eval_pairs[:, 1]])
    result, pred = evaluation.evaluate_pairs(fn, fixed, moving, spacing=spacing, labels=labels, boundary=boundary,
                                             batch_size=max(1, timing_batch_size),
                                             timing_batch_size=timing_batch_size)
    pred.update(fixed=fixed, moving=moving)
    if isinstance(eval_pairs, dict):
        scores, per_pair = synthetic_scores(pred["displacement"], eval_pairs, spacing, boundary)
        result.update(scores)
        pred.update(per_pair)
    return result, pred


def save_figure(path, pred, names, eval_pairs, max_pairs=8):
    """2-D: up to ``max_pairs`` pairs (fixed / moving / warped / grid); 3-D: the first pair's slices."""
    import matplotlib.pyplot as plt

    synthetic_pairs = isinstance(eval_pairs, dict)
    if synthetic_pairs:  # one image and its known deformation: titles name the image and the error
        index = eval_pairs["index"]
        labels = [f"{os.path.basename(names[i])} (synthetic)" for i in index]
        errors = [f", EPE {e:.2f} mm" for e in pred["epe_mm"]]
    else:
        labels = [f"{os.path.basename(names[a])}<-{os.path.basename(names[b])}" for a, b in eval_pairs]
        errors = [""] * len(labels)
    if pred["fixed"].ndim == 4:
        n = min(max_pairs, len(pred["fixed"]))
        titles = [f"{labels[k]}\nNCC {pred['ncc_before'][k]:.2f}->{pred['ncc_after'][k]:.2f}{errors[k]}"
                  for k in range(n)]
        fig = registration_figure(pred["fixed"][:n], pred["moving"][:n], pred["warped"][:n],
                                  pred["displacement"][:n], titles=titles, max_cols=n)
    else:
        fig = volume_figure(pred["fixed"][0], pred["moving"][0], pred["warped"][0], pred["displacement"][0],
                            title=f"NCC {pred['ncc_before'][0]:.3f} -> {pred['ncc_after'][0]:.3f}{errors[0]}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SYNTHETIC_FIELDS = "synthetic_test_fields.npz"
# Above this size (bytes, float32) the true test fields are stored as float16.
_FIELDS_FLOAT32_LIMIT = 64 * 2**20


def write_synthetic_pairs(config, plan, names):
    """``eval_pairs.json`` of synthetic test pairs (image, random key, generator) and the true fields.

    The true test fields go to ``synthetic_test_fields.npz`` (``displacement`` in voxels of the
    model grid, ij order, float32, or float16 when the float32 fields would exceed 64 MiB;
    ``index``: the image of each pair).  Each pair can also be regenerated exactly with
    :func:`dirnet_tf.synthetic.synthetic_evaluation_pairs` from the recorded seed and stream.

    Returns
    -------
    str
        The path of ``eval_pairs.json``.
    """
    test, deformation = plan["test"], plan["deformation"]
    field = np.asarray(test["displacement"], np.float32)
    dtype = np.float32 if field.nbytes <= _FIELDS_FLOAT32_LIMIT else np.float16
    np.savez(os.path.join(config["logdir"], SYNTHETIC_FIELDS), displacement=field.astype(dtype),
             index=np.asarray(test["index"], np.int64), spacing_mm=np.asarray(deformation.voxel_spacing))
    record = {"split": "test", "mode": "synthetic", "images": plan["sources"]["test"],
              "seed": int(config["split_seed"]), "stream": synthetic.TEST,
              "regenerate": "dirnet_tf.synthetic.synthetic_evaluation_pairs(images of the split, count, seed, "
                            "deformation, stream): pair k uses stream_key(seed, stream, k)",
              "generator": deformation.describe(), "true_fields": SYNTHETIC_FIELDS,
              "true_fields_dtype": np.dtype(dtype).name,
              "pairs": [{"image": names[i], "key": [int(config["split_seed"]), synthetic.TEST, k]}
                        for k, i in enumerate(np.asarray(test["index"]).tolist())]}
    return write_json(os.path.join(config["logdir"], "eval_pairs.json"), record)


def run(config):
    """Train / export / evaluate on the images named by ``config`` (a dict of flag values).

    Returns
    -------
    dict
        The metrics written to ``metrics.json`` (or the training summary when there is
        nothing to evaluate).
    """
    strategy = make_strategy(config["strategy"])
    data = load_collection(config)
    grid = data["grid"]
    os.makedirs(config["logdir"], exist_ok=True)
    write_json(os.path.join(config["logdir"], "skipped.json"),
               [{"path": p, "reason": r} for p, r in data["skipped"]])
    plan = make_splits_and_pairs(config, data)
    sizes = {k: len(v) for k, v in plan["splits"].items()}
    synthetic_mode = plan["mode"] == "synthetic"
    print(f"[data] {len(data['names'])} images on the model grid {grid.shape} voxels at {grid.spacing} mm; "
          f"split {sizes}; {_count(plan['valid'])} validation and {_count(plan['test'])} test pairs", flush=True)
    images = data["images"]
    if synthetic_mode:
        deformation = plan["deformation"]
        print(f"[data] synthetic pairs: random B-spline fields up to {deformation.magnitude:g} mm per axis, control "
              f"points every {deformation.control_spacing} voxels ({deformation.squarings()} squarings); "
              f"validation / test pairs from {plan['sources']['valid']} / {plan['sources']['test']} with "
              "held-out fields", flush=True)
        sampler = synthetic.synthetic_pair_sampler(images[plan["splits"]["train"]], config["batch_size"],
                                                   config["seed"], deformation)
    elif plan["sampler_pairs"] is None:
        sampler = pairs.random_pair_sampler(images[plan["splits"]["train"]], config["batch_size"], config["seed"])
    else:
        sampler = pairs.pair_list_sampler(images, plan["sampler_pairs"], config["batch_size"], config["seed"])
    validation = None
    if synthetic_mode:
        validation = {"fixed": plan["valid"]["fixed"], "moving": plan["valid"]["moving"]}
    elif len(plan["valid"]):
        validation = {"fixed": images[plan["valid"][:, 0]], "moving": images[plan["valid"][:, 1]]}
    run_ = common.train_and_export(config, grid.shape, sampler, validation, strategy, model_grid=grid.to_dict(),
                                   spacing_mm=list(grid.spacing),
                                   displacement_units="voxels of the model grid, ij (array) order",
                                   pairs=config["pairs"], images=config["images"])
    if run_.export_dir is None or not config["evaluate"] or not _count(plan["test"]):
        if run_.export_dir is not None and config["evaluate"]:
            print(f"[eval] no test pairs (the test split holds {sizes['test']} image(s)); nothing evaluated",
                  flush=True)
        return run_.summary
    served, _ = load_export(run_.export_dir)
    names = data["names"]
    if synthetic_mode:
        pairs_path = write_synthetic_pairs(config, plan, names)
    else:
        pairs_path = write_json(os.path.join(config["logdir"], "eval_pairs.json"),
                                {"split": "test", "pairs": [[names[a], names[b]] for a, b in plan["test"]]})
    result, pred = evaluate(served, data, plan["test"], run_.trainer.model.boundary, grid.spacing,
                            config["timing_batch_size"])
    if synthetic_mode:
        result["synthetic"] = dict(plan["deformation"].describe(), test_images=plan["sources"]["test"],
                                   valid_images=plan["sources"]["valid"], test_seed=int(config["split_seed"]),
                                   true_fields=os.path.join(config["logdir"], SYNTHETIC_FIELDS))
    metrics_path = common.record_metrics(config, run_, result, eval_pairs=pairs_path, images=config["images"],
                                         split=sizes, skipped=len(data["skipped"]))
    figure = save_figure(os.path.join(config["logdir"], "registration.png"), pred, names, plan["test"])
    print(f"[eval] {result['pairs']} test pairs: NCC {result['ncc_before']:.4f} -> {result['ncc_after']:.4f}  "
          f"folding {100 * result['folding_fraction']:.3f}%  mean |u| {result['mean_displacement_voxels']:.2f} "
          f"voxels = {result['mean_displacement_mm']:.2f} mm  {result['ms_per_pair']:.2f} ms/pair", flush=True)
    if synthetic_mode:
        inside = (f"; inside the mask {result['epe_mm_mask']:.3f} mm "
                  f"(true {result['true_displacement_mm_mask']:.3f} mm)" if "epe_mm_mask" in result else "")
        print(f"[eval]   endpoint error {result['epe_mm']:.3f} mm "
              f"(true displacement {result['true_displacement_mm']:.3f} mm){inside}", flush=True)
    for value, s in result.get("labels", {}).items():
        print(f"[eval]   label {value}: Dice {s['dice_before']:.3f} -> {s['dice_after']:.3f}  "
              f"HD95 {s['hd95_mm_after']:.2f} mm  MAD {s['mad_mm_after']:.2f} mm", flush=True)
    print(f"[eval] wrote {metrics_path}, {pairs_path} and {figure}", flush=True)
    return result


def run_example(config, name, report, print_summary, figures, portable_path):
    """:func:`run`, then a worked example's own report on the export (``experiments.echo``, ``brain3d``).

    Parameters
    ----------
    config : dict
        Flag values, the example's inputs already prepared.
    name : str
        Key of the report in ``metrics.json`` and prefix of the console lines.
    report : callable
        ``result of run -> dict`` (with ``seconds``: the whole command's time).
    print_summary : callable
        Prints the report.
    figures : str
        The report's figures, for the closing line.
    portable_path : callable
        How ``metrics.json`` records the images and the model.

    Returns
    -------
    dict
        The metrics written to ``metrics.json``: :func:`run`'s plus ``name``.
    """
    result = run(config)
    if not config["evaluate"] or "pairs" not in result:
        return result
    result[name] = report(result)
    result.update(images=portable_path(config["images"]), model=portable_path(result["model"]))
    path = common.write_metrics(config, result)
    print_summary(result[name])
    print(f"[{name}] wrote {path}, {figures} in {config['logdir']} ({result[name]['seconds']:.0f} s)", flush=True)
    return result


def main():
    """Command line: apply this command's defaults, then parse flags and run."""
    common.run_experiment(run, DEFAULTS, errors=(readers.InputError,))


if __name__ == "__main__":
    main()
