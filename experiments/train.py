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
most ``--max_frame_gap`` apart), ``atlas:PATH``, ``list:CSV`` (see :mod:`dirnet_tf.pairs`).
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

from dirnet_tf import metrics, pairs, readers
from dirnet_tf.files import write_json
from dirnet_tf.inference import load_export, predict, time_per_pair
from dirnet_tf.plotting import registration_figure, volume_figure
from dirnet_tf.preprocessing import NORMALIZE_MODES, ModelGrid
from dirnet_tf.trainer import make_strategy
from dirnet_tf.warping import warp_labels
from experiments import common
from experiments.common import define_flag

common.define_flags()
flags.adopt_module_key_flags(common)
define_flag("string", "images", None, "Images: a folder, a glob, a .csv/.txt list, one file or FILE.h5:/dataset.")
define_flag("string", "labels", None, "Label maps for evaluation: a folder of files named like the images "
            "(or one file for a single image file).")
define_flag("string", "pairs", "random", "Pairing: random, within_group, sequence, atlas:PATH or list:CSV.")
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
        ``groups``, ``names`` (sources), ``grid`` (ModelGrid), ``skipped`` [(path, reason)].
    """
    if not config["images"]:
        raise readers.InputError("--images is required: a folder, a glob, a .csv/.txt list or a file")
    ndim = config["ndim"] or None
    default_spacing = _floats(config["default_spacing"], "default_spacing")
    entries, skipped = readers.list_images(config["images"], config["labels"], ndim, default_spacing)
    for path, reason in skipped:
        print(f"[data] skipped {path}: {reason}", flush=True)
    if len(entries) < 2:
        raise readers.InputError(f"--images={config['images']}: {len(entries)} usable image; registration "
                                 "needs at least two")
    grid = model_grid(config, entries[0].image)
    mask = None
    if config["mask"]:
        mask_image = readers.read_image(config["mask"], ndim, default_spacing)[0]
        mask = mask_image.array != 0
    images, labels = [], []
    for entry in entries:
        image = entry.image
        array, _ = grid.prepare(image, mask=mask)
        if mask is not None:
            if mask.shape != image.shape:
                raise readers.InputError(f"--mask={config['mask']} has shape {mask.shape} but {image.source} "
                                         f"has shape {image.shape}; give a mask on the images' grid")
            array = array * (grid.prepare_labels(mask.astype(np.int32), image) > 0)
        images.append(array)
        if entry.label is not None:
            labels.append(grid.prepare_labels(entry.label, entry.image))
    if labels and len(labels) != len(images):
        raise readers.InputError(f"{len(images) - len(labels)} image(s) have no label map; give labels for "
                                 "all images or none")
    return {"images": np.stack(images)[..., None].astype(np.float32),
            "labels": np.stack(labels) if labels else None,
            "groups": [e.image.group for e in entries], "names": [e.image.source for e in entries],
            "grid": grid, "skipped": skipped}


def make_splits_and_pairs(config, data):
    """Split the collection and form the pairs of every split.

    Returns
    -------
    dict
        ``splits`` (indices per split), ``sampler_pairs`` (train candidates, None for random)
        and ``valid`` / ``test`` evaluation pairs (int ``[P, 2]`` global indices).
    """
    groups, names = data["groups"], data["names"]
    mode, argument = pairs.parse_pairs_spec(config["pairs"])
    atlas_index = listed = None
    if mode == "atlas":
        atlas_index = pairs.find_image(argument, names)
        if atlas_index is None:
            raise pairs.PairingError(f"--pairs=atlas:{argument}: the atlas is not one of --images; add it "
                                     "to the images (it is used as the fixed image of every pair)")
    if mode == "list":
        listed = pairs.read_pair_list(argument, names)
    split = (pairs.split_within_groups(groups, config["split"]) if config["split_within_groups"]
             else pairs.split_by_group(groups, config["split"], config["split_seed"]))
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


def evaluate(fn, data, eval_pairs, boundary, spacing, timing_batch_size=8):
    """Score the registration of ``eval_pairs`` by ``fn`` (an exported model).

    Returns
    -------
    tuple
        ``(metrics dict, predictions dict)``; displacement statistics in model voxels and mm.
    """
    images = data["images"]
    fixed, moving = images[eval_pairs[:, 0]], images[eval_pairs[:, 1]]
    pred = predict(fn, fixed, moving, batch_size=max(1, timing_batch_size))
    disp = pred["displacement"]
    ncc_before = metrics.ncc(fixed, moving, batched=True)
    ncc_after = metrics.ncc(fixed, pred["warped"], batched=True)
    folding = np.asarray(metrics.folding_fraction(disp)).reshape(-1)
    magnitude_vox = np.linalg.norm(disp, axis=-1)
    magnitude_mm = np.linalg.norm(disp * np.asarray(spacing), axis=-1)
    timing = time_per_pair(fn, fixed, moving, batch_size=min(timing_batch_size, len(fixed)))
    result = {
        "pairs": int(len(fixed)),
        "ncc_before": float(ncc_before.mean()), "ncc_after": float(ncc_after.mean()),
        "ncc_after_median": float(np.median(ncc_after)),
        "folding_fraction": float(folding.mean()), "pairs_with_folding": int((folding > 0).sum()),
        "mean_displacement_voxels": float(magnitude_vox.mean()),
        "mean_displacement_mm": float(magnitude_mm.mean()),
        "max_displacement_mm": float(magnitude_mm.max()),
        "ms_per_pair": timing["ms_per_pair"], "timing_batch_size": timing["batch_size"],
        "displacement_units": "voxels of the model grid, ij (array) order; *_mm: times spacing_mm",
        "spacing_mm": [float(s) for s in spacing],
    }
    if data["labels"] is not None:
        result["labels"] = label_scores(data["labels"], eval_pairs, disp, boundary, spacing)
    pred.update(ncc_before=ncc_before, ncc_after=ncc_after, fixed=fixed, moving=moving)
    return result, pred


def label_scores(labels, eval_pairs, displacement, boundary, spacing):
    """Dice, HD95 and MAD (mm) per label, before and after carrying the moving labels."""
    fixed_labels, moving_labels = labels[eval_pairs[:, 0]], labels[eval_pairs[:, 1]]
    num_labels = int(labels.max()) + 1
    warped = warp_labels(moving_labels, displacement.astype(np.float32), num_labels, boundary).numpy()
    scores = {}
    for value in range(1, num_labels):
        rows = {"dice_before": [], "dice_after": [], "hd95_mm_after": [], "mad_mm_after": []}
        for f, m, w in zip(fixed_labels, moving_labels, warped):
            if not (f == value).any() or not (m == value).any():
                continue
            rows["dice_before"].append(metrics.dice(f == value, m == value)["mean"])
            rows["dice_after"].append(metrics.dice(f == value, w == value)["mean"])
            rows["hd95_mm_after"].append(metrics.hd95(f == value, w == value, spacing))
            rows["mad_mm_after"].append(metrics.mad(f == value, w == value, spacing))
        if rows["dice_before"]:
            scores[str(value)] = dict({k: float(np.mean(v)) for k, v in rows.items()},
                                      pairs=len(rows["dice_before"]))
    return scores


def save_figure(path, pred, names, eval_pairs, max_pairs=8):
    """2-D: up to ``max_pairs`` pairs (fixed / moving / warped / grid); 3-D: the first pair's slices."""
    import matplotlib.pyplot as plt

    if pred["fixed"].ndim == 4:
        n = min(max_pairs, len(pred["fixed"]))
        titles = [f"{os.path.basename(names[a])}<-{os.path.basename(names[b])}\n"
                  f"NCC {pred['ncc_before'][k]:.2f}->{pred['ncc_after'][k]:.2f}"
                  for k, (a, b) in enumerate(eval_pairs[:n])]
        fig = registration_figure(pred["fixed"][:n], pred["moving"][:n], pred["warped"][:n],
                                  pred["displacement"][:n], titles=titles, max_cols=n)
    else:
        fig = volume_figure(pred["fixed"][0], pred["moving"][0], pred["warped"][0], pred["displacement"][0],
                            title=f"NCC {pred['ncc_before'][0]:.3f} -> {pred['ncc_after'][0]:.3f}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    print(f"[data] {len(data['names'])} images on the model grid {grid.shape} voxels at {grid.spacing} mm; "
          f"split {sizes}; {len(plan['valid'])} validation and {len(plan['test'])} test pairs", flush=True)
    images = data["images"]
    if plan["sampler_pairs"] is None:
        sampler = pairs.random_pair_sampler(images[plan["splits"]["train"]], config["batch_size"], config["seed"])
    else:
        sampler = pairs.pair_list_sampler(images, plan["sampler_pairs"], config["batch_size"], config["seed"])
    validation = None
    if len(plan["valid"]):
        validation = {"fixed": images[plan["valid"][:, 0]], "moving": images[plan["valid"][:, 1]]}
    trainer = common.trainer_from_config(config, grid.shape, sampler, strategy, validation)
    summary, train_seconds = common.train_or_restore(trainer, config)
    if not trainer.is_chief:
        return summary
    export_dir = common.export(trainer, config, grid.shape, model_grid=grid.to_dict(), spacing_mm=list(grid.spacing),
                               displacement_units="voxels of the model grid, ij (array) order",
                               pairs=config["pairs"], images=config["images"])
    if not config["evaluate"] or not len(plan["test"]):
        if config["evaluate"]:
            print(f"[eval] no test pairs (the test split holds {sizes['test']} image(s)); nothing evaluated",
                  flush=True)
        return summary
    served, _ = load_export(export_dir)
    names = data["names"]
    pairs_path = write_json(os.path.join(config["logdir"], "eval_pairs.json"),
                            {"split": "test", "pairs": [[names[a], names[b]] for a, b in plan["test"]]})
    result, pred = evaluate(served, data, plan["test"], trainer.model.boundary, grid.spacing,
                            config["timing_batch_size"])
    result.update(common.run_record(trainer, summary, train_seconds, export_dir), eval_pairs=pairs_path,
                  images=config["images"], split=sizes, skipped=len(data["skipped"]))
    metrics_path = common.write_metrics(config, result)
    figure = save_figure(os.path.join(config["logdir"], "registration.png"), pred, names, plan["test"])
    print(f"[eval] {result['pairs']} test pairs: NCC {result['ncc_before']:.4f} -> {result['ncc_after']:.4f}  "
          f"folding {100 * result['folding_fraction']:.3f}%  mean |u| {result['mean_displacement_voxels']:.2f} "
          f"voxels = {result['mean_displacement_mm']:.2f} mm  {result['ms_per_pair']:.2f} ms/pair", flush=True)
    for value, s in result.get("labels", {}).items():
        print(f"[eval]   label {value}: Dice {s['dice_before']:.3f} -> {s['dice_after']:.3f}  "
              f"HD95 {s['hd95_mm_after']:.2f} mm  MAD {s['mad_mm_after']:.2f} mm", flush=True)
    print(f"[eval] wrote {metrics_path}, {pairs_path} and {figure}", flush=True)
    return result


def main():
    """Command line: apply this command's defaults, then parse flags and run."""
    common.run_experiment(run, DEFAULTS, errors=(readers.InputError,))


if __name__ == "__main__":
    main()
