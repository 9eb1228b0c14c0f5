"""The data of a training run: a collection of images -> the model grid -> splits -> pairs -> samplers.

* :func:`load_collection` reads the images (and labels, and a mask) named by a
  :class:`~dirnet_tf.config.TrainConfig`, resamples them onto the model grid
  (:func:`model_grid`) and normalises them;
* :func:`make_splits_and_pairs` splits them by group (or in time) and forms the training
  candidates and the validation / test pairs of the ``pairs`` mode; ``pairs="synthetic"``
  makes held-out synthetic pairs instead (:func:`synthetic_plan`);
* :func:`make_sampler` and :func:`validation_set` turn a plan into what
  :class:`dirnet_tf.trainer.Trainer` consumes; :func:`write_synthetic_pairs` records the
  synthetic test pairs and their true fields.

Images are float32 ``[N, *shape, 1]`` on the model grid (voxels in array (ij) order, spacing in
mm); pair arrays are int ``[P, 2]`` (fixed, moving) indices into the collection.
"""

import os

import numpy as np

from dirnet_tf import image_lists, pair_plans, pairs, readers, synthetic
from dirnet_tf.config import parse_floats, parse_int_list
from dirnet_tf.files import write_json
from dirnet_tf.preprocessing import ModelGrid

__all__ = ["model_grid", "load_collection", "split_images", "make_splits_and_pairs", "synthetic_deformation",
           "synthetic_plan", "pair_count", "make_sampler", "validation_set", "write_synthetic_pairs",
           "SYNTHETIC_FIELDS"]

SYNTHETIC_FIELDS = "synthetic_test_fields.npz"
# Above this size (bytes, float32) the true test fields are stored as float16.
FIELDS_FLOAT32_LIMIT = 64 * 2**20


def model_grid(config, first):
    """The :class:`~dirnet_tf.preprocessing.ModelGrid` of ``config`` (``shape``, ``spacing``,
    ``normalize``); an empty shape or spacing is the first image's (``first``).  A shape needs one
    value per axis of the images (:class:`~dirnet_tf.readers.InputError` otherwise)."""
    ndim = len(first.shape)
    shape = first.shape
    if str(config.shape).strip():
        try:
            shape = tuple(int(n) for n in np.atleast_1d(parse_int_list(config.shape)))
        except ValueError:
            raise readers.InputError(f"--shape={config.shape}: give whole numbers of voxels separated by "
                                     "commas") from None
        if len(shape) != ndim:
            example = ",".join(str(int(n)) for n in first.shape)
            raise readers.InputError(f"--shape={config.shape}: give {ndim} values, one per axis of the {ndim}-D "
                                     f"images (e.g. --shape={example}), not {len(shape)}")
    spacing = parse_floats(config.spacing, "spacing")
    return ModelGrid(tuple(shape), first.spacing if spacing is None else spacing, config.normalize)


def load_collection(config):
    """Read, resample and normalise the images (and labels) named by ``config``.

    Parameters
    ----------
    config : TrainConfig
        ``images``, ``labels``, ``mask``, ``ndim``, ``default_spacing``, ``pairs``, ``shape``,
        ``spacing``, ``normalize``.

    Returns
    -------
    dict
        ``images`` float32 ``[N, *shape, 1]``, ``labels`` int32 ``[N, *shape]`` or None,
        ``masks`` bool ``[N, *shape]`` (``mask`` on the model grid) or None,
        ``groups``, ``names`` (sources), ``grid`` (ModelGrid), ``skipped`` [(path, reason)].
    """
    if not config.images:
        raise readers.InputError("--images is required: a folder, a glob, a .csv/.txt list or a file")
    ndim = config.ndim or None
    default_spacing = parse_floats(config.default_spacing, "default_spacing")
    entries, skipped = image_lists.list_images(config.images, config.labels, ndim, default_spacing)
    for path, reason in skipped:
        print(f"[data] skipped {path}: {reason}", flush=True)
    needed = 1 if pair_plans.parse_pairs_spec(config.pairs)[0] == "synthetic" else 2
    if len(entries) < needed:
        raise readers.InputError(f"--images={config.images}: {len(entries)} usable image; registration "
                                 "needs at least two (--pairs=synthetic: one)")
    grid = model_grid(config, entries[0].image)
    mask = None
    if config.mask:
        mask_image = readers.read_image(config.mask, ndim, default_spacing)[0]
        mask = mask_image.array != 0
    images, labels, masks = [], [], []
    for entry in entries:
        image = entry.image
        array, _ = grid.prepare(image, mask=mask)
        if mask is not None:
            if mask.shape != image.shape:
                raise readers.InputError(f"--mask={config.mask} has shape {mask.shape} but {image.source} "
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


def split_images(config, groups):
    """Train / valid / test image indices: by group, or in time with ``split_within_groups``."""
    if config.split_within_groups:
        return pair_plans.split_within_groups(groups, config.split)
    return pair_plans.split_by_group(groups, config.split, config.split_seed)


def make_splits_and_pairs(config, data):
    """Split the collection (:func:`load_collection`) and form the pairs of every split.

    Returns
    -------
    dict
        ``splits`` (indices per split), ``mode``, ``sampler_pairs`` (train candidates, None for
        random) and ``valid`` / ``test`` evaluation pairs (int ``[P, 2]`` global indices); for
        ``pairs="synthetic"`` see :func:`synthetic_plan`.
    """
    groups, names = data["groups"], data["names"]
    mode, argument = pair_plans.parse_pairs_spec(config.pairs)
    if mode == "synthetic":
        return synthetic_plan(config, data)
    atlas_index = listed = None
    if mode == "atlas":
        atlas_index = pair_plans.find_image(argument, names)
        if atlas_index is None:
            raise pair_plans.PairingError(f"--pairs=atlas:{argument}: the atlas is not one of --images; add it "
                                     "to the images (it is used as the fixed image of every pair)")
    if mode == "list":
        listed = pair_plans.read_pair_list(argument, names)
    split = split_images(config, groups)
    if atlas_index is not None:  # the atlas is the fixed image of every split
        split = {k: np.union1d(v, [atlas_index]) if len(v) else v for k, v in split.items()}
    options = dict(max_frame_gap=config.max_frame_gap, atlas_index=atlas_index, pairs=listed, names=names)
    out = {"splits": split, "mode": mode,
           "sampler_pairs": pair_plans.pair_candidates(groups, mode, subset=split["train"], **options)}
    for name, seed in (("valid", 1), ("test", 0)):
        members = split[name]
        usable = len(members) >= 2 if mode != "atlas" else len(members) >= 1
        out[name] = (pair_plans.evaluation_pairs(groups, mode, subset=members, max_pairs=config.eval_pairs,
                                            seed=seed, **options) if usable else np.zeros((0, 2), np.int64))
    return out


def synthetic_deformation(config, grid):
    """The :class:`~dirnet_tf.synthetic.SyntheticDeformation` of the ``synthetic_*`` settings on ``grid``."""
    return synthetic.SyntheticDeformation(
        grid.shape, grid.spacing, magnitude=config.synthetic_magnitude, spacing=config.synthetic_spacing,
        gamma=config.synthetic_gamma, scale=config.synthetic_scale, noise=config.synthetic_noise,
        augment=config.synthetic_augment, boundary="border")


def synthetic_plan(config, data):
    """Splits and evaluation pairs of ``pairs="synthetic"``.

    The images are split as for the other modes (by group, or in time with
    ``split_within_groups``); a validation or test split left without images (e.g. a single
    image) uses the training images instead, so that its pairs differ from the training pairs by
    their random fields only (held-out fields; ``sources`` says which).  ``eval_pairs`` pairs are
    made for each, from the ``VALID`` / ``TEST`` random streams of ``split_seed``.

    Returns
    -------
    dict
        ``splits``, ``mode`` (``"synthetic"``), ``sampler_pairs`` (None), ``deformation``,
        ``sources`` (per split: ``"held-out images"`` or ``"training images"``) and ``valid`` /
        ``test``: dicts of arrays ``fixed``, ``moving``, ``displacement`` (true, voxels), ``index``
        (global image index) and, for the test pairs, ``region`` (bool, the fixed-grid foreground of
        the labels or of ``mask``; absent without either) and with labels ``fixed_labels`` /
        ``moving_labels``.
    """
    groups = data["groups"]
    split = split_images(config, groups)
    deformation = synthetic_deformation(config, data["grid"])
    out = {"splits": split, "mode": "synthetic", "sampler_pairs": None, "deformation": deformation, "sources": {}}
    count = int(config.eval_pairs)
    if count < 1:
        raise pair_plans.PairingError(f"--eval_pairs={count}: give a whole number >= 1")
    for name, stream in (("valid", synthetic.VALID), ("test", synthetic.TEST)):
        members = split[name] if len(split[name]) else split["train"]
        out["sources"][name] = "held-out images" if len(split[name]) else "training images"
        labels, real_labels = None, False
        if name == "test" and data["labels"] is not None:
            labels, real_labels = data["labels"][members], True
        elif name == "test" and data.get("masks") is not None:
            labels = data["masks"][members].astype(np.int32)
        made = synthetic.synthetic_evaluation_pairs(data["images"][members], count, config.split_seed,
                                                    deformation, stream, labels=labels)
        made["index"] = members[made["index"]]
        if labels is not None:
            made["region"] = made["fixed_labels"] > 0
            if not real_labels:
                del made["fixed_labels"], made["moving_labels"]
        out[name] = made
    return out


def pair_count(eval_pairs):
    """Number of pairs of an index array ``[P, 2]`` or of synthetic pairs (a dict)."""
    return len(eval_pairs["fixed"]) if isinstance(eval_pairs, dict) else len(eval_pairs)


def make_sampler(config, data, plan):
    """The training pair sampler of a plan (:func:`make_splits_and_pairs`): synthetic pairs, random
    pairs of the training images, or the plan's candidate pairs; seeded by ``config.seed``."""
    images = data["images"]
    if plan["mode"] == "synthetic":
        return synthetic.synthetic_pair_sampler(images[plan["splits"]["train"]], config.batch_size, config.seed,
                                                plan["deformation"])
    if plan["sampler_pairs"] is None:
        return pairs.random_pair_sampler(images[plan["splits"]["train"]], config.batch_size, config.seed)
    return pairs.pair_list_sampler(images, plan["sampler_pairs"], config.batch_size, config.seed)


def validation_set(data, plan):
    """``{"fixed", "moving"}`` validation pairs of a plan, or None when it has none."""
    valid = plan["valid"]
    if plan["mode"] == "synthetic":
        return {"fixed": valid["fixed"], "moving": valid["moving"]}
    if len(valid):
        images = data["images"]
        return {"fixed": images[valid[:, 0]], "moving": images[valid[:, 1]]}
    return None


def write_synthetic_pairs(config, plan, names):
    """``eval_pairs.json`` of synthetic test pairs (image, random key, generator) and the true fields.

    The true test fields go to ``synthetic_test_fields.npz`` in ``config.logdir``
    (``displacement`` in voxels of the model grid, ij order, float32, or float16 when the float32
    fields would exceed 64 MiB; ``index``: the image of each pair).  Each pair can also be
    regenerated exactly with :func:`dirnet_tf.synthetic.synthetic_evaluation_pairs` from the
    recorded seed and stream.

    Returns
    -------
    str
        The path of ``eval_pairs.json``.
    """
    test, deformation = plan["test"], plan["deformation"]
    field = np.asarray(test["displacement"], np.float32)
    dtype = np.float32 if field.nbytes <= FIELDS_FLOAT32_LIMIT else np.float16
    np.savez(os.path.join(config.logdir, SYNTHETIC_FIELDS), displacement=field.astype(dtype),
             index=np.asarray(test["index"], np.int64), spacing_mm=np.asarray(deformation.voxel_spacing))
    record = {"split": "test", "mode": "synthetic", "images": plan["sources"]["test"],
              "seed": int(config.split_seed), "stream": synthetic.TEST,
              "regenerate": "dirnet_tf.synthetic.synthetic_evaluation_pairs(images of the split, count, seed, "
                            "deformation, stream): pair k uses stream_key(seed, stream, k)",
              "generator": deformation.describe(), "true_fields": SYNTHETIC_FIELDS,
              "true_fields_dtype": np.dtype(dtype).name,
              "pairs": [{"image": names[i], "key": [int(config.split_seed), synthetic.TEST, k]}
                        for k, i in enumerate(np.asarray(test["index"]).tolist())]}
    return write_json(os.path.join(config.logdir, "eval_pairs.json"), record)
