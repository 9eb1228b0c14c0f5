"""The registration engine: a pair of images -> the served model -> the map on the images' own grids.

Steps, each a function (the API :mod:`dirnet_tf.registration` and ``experiments.register`` run
them in this order):

1. :func:`prepare_pair` -- read (or take) the fixed and moving images and bring them onto the
   model grid with the export's preprocessing (:class:`dirnet_tf.preprocessing.ModelGrid`);
   optional moving labels and fixed points.
2. :func:`infer` -- the served model on prepared pairs, in batches.
3. :func:`finish` (:mod:`dirnet_tf.register_maps`) -- the spline (exact control points, or the
   served chain of composed steps) and the outputs on the fixed image's grid.

Geometry.  The model returns ``u_m`` (model voxels, ij order) on the fixed image's model grid.  For
a fixed voxel ``p_f`` (ij): ``q = T_f^-1(p_f)`` (model index of F), ``q' = q + u_m(q)`` (for a
model of composed steps ``q' = phi_1(... phi_n(q))``), ``p_m = T_m(q')`` (voxel of the moving
image M), and the warped image ``W(p_f) = M(p_m)`` (multilinear, original intensities; outside M
as the export's ``boundary``).  ``T_f`` and ``T_m`` (model index -> image index) depend on
``init`` (:func:`prepare_pair`): with ``"array"`` each is the diagonal map of its own image
(:class:`dirnet_tf.preprocessing.GridTransform`); with ``"header"`` / ``"center"`` (world space,
:mod:`dirnet_tf.world_grid`) ``T_f`` places the model grid in F's physical space (3-D: closest
RAS+ axis order) and ``T_m = A_m^-1 (A_f T_f + t)`` is a general affine (``A``: voxel -> RAS+ mm,
``t`` the initial translation in mm), so that every output carries the header relation.  The
full description is the module docstring of ``experiments/register.py``.

Units: voxel indices are ij order, integer at voxel centres; world coordinates RAS+ mm
(:mod:`dirnet_tf.geometry`).  A prepared pair is a dict (keys documented at each step).
"""

import os

import numpy as np

from dirnet_tf import metrics, readers, world_grid
from dirnet_tf.points import check_points_inside, read_points, table_to_fixed_voxels
from dirnet_tf.preprocessing import ModelGrid
from dirnet_tf.readers import Image
from dirnet_tf.register_errors import RegisterError
from dirnet_tf.register_maps import finish, fixed_slabs, map_fixed_points, model_steps  # noqa: F401 - step 3

__all__ = ["INIT_MODES", "read_model_input", "model_input_array", "prepare_pair", "attach_labels", "attach_points",
           "infer", "finish", "fixed_slabs", "model_steps", "map_fixed_points", "summary"]



# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #


def model_input_array(array, channels, name):
    """An image array as float32 ``[H, W, channels]`` for an export without ``model_grid``.

    Integers are scaled to ``[0, 1]`` (uint8 by 255, uint16 by 65535, other integers by
    their maximum), floats used as they are; RGB(A) is converted to grey (ITU-R 601 luma,
    alpha ignored; :func:`dirnet_tf.readers.rgb_to_grey`) for ``channels == 1``, grey repeated for 3.  ``name`` is for messages.
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        info = np.iinfo(array.dtype) if array.dtype != bool else None
        array = array.astype(np.float32) / (float(info.max) if info else 1.0)
    else:
        array = array.astype(np.float32)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise RegisterError(f"image {name} has shape {array.shape}; expected [H, W] or [H, W, C]")
    if array.shape[-1] != channels:
        if array.shape[-1] in (3, 4) and channels == 1:
            array = readers.rgb_to_grey(array)[..., None].astype(np.float32)
        elif array.shape[-1] == 1 and channels == 3:
            array = np.repeat(array, 3, axis=-1)
        else:
            raise RegisterError(f"image {name} has {array.shape[-1]} channels; the model expects {channels}")
    if not np.isfinite(array).all():
        raise RegisterError(f"image {name} contains non-finite values")
    return array


def read_model_input(path, channels=1):
    """Read an image file as float32 ``[H, W, channels]`` in ``[0, 1]`` (integers scaled).

    The reader of exports without ``model_grid`` (``experiments.mnist``): Pillow formats or
    ``.npy``; conversion as :func:`model_input_array`.
    """
    if not os.path.isfile(path):
        raise RegisterError(f"image file {path} does not exist")
    try:
        if path.lower().endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            array = readers.decode_pil(path, rgb=channels == 3)[0]  # grey, or RGB made grey below
    except Exception as exc:  # noqa: BLE001 - any decoder failure
        raise RegisterError(f"cannot read image {path}: {readers.skip_reason(path, exc)}") from exc
    return model_input_array(array, channels, path)


def _read_one(model, path, what):
    if not os.path.exists(path) and readers.split_hdf5_spec(path) is None:
        raise RegisterError(f"the {what} image {path} does not exist")
    try:
        images = readers.read_image(path, ndim=model.ndim, default_spacing=model.default_spacing)
    except readers.InputError as exc:
        hint = (" (give a volume: NIfTI, a DICOM series folder, .npy or HDF5)" if model.ndim == 3 else "")
        raise RegisterError(f"cannot read the {what} image for the {model.ndim}-D model {model.path}: {exc}"
                            f"{hint}") from exc
    except ImportError as exc:
        raise RegisterError(f"cannot read the {what} image {path}: {exc}") from exc
    if len(images) != 1:
        raise RegisterError(f"the {what} image {path} holds {len(images)} {model.ndim}-D images; the model "
                            f"registers one {model.ndim}-D image per file")
    return images[0]


def _array_image(model, array, spacing, what):
    """A numpy array as an :class:`Image` without patient geometry (pixel space), spacing in mm."""
    array = np.asarray(array)
    if array.ndim != model.ndim:
        raise RegisterError(f"the {what} array has shape {array.shape}; the {model.ndim}-D model {model.path} "
                            f"registers {model.ndim}-D arrays (grey, no channel axis)")
    if spacing is None:
        spacing = model.default_spacing if model.default_spacing is not None else 1.0
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (model.ndim,))
    if not np.all(spacing > 0):
        raise RegisterError(f"spacing {spacing.tolist()} of the {what} array must be positive (mm per axis)")
    try:
        values = readers.as_float_image(array, f"the {what} array")
    except readers.InputError as exc:
        raise RegisterError(str(exc)) from exc
    return Image(values, tuple(float(s) for s in spacing), None, f"<{what} array>")


def _identity_transform(shape):
    return ModelGrid(shape, 1.0, "none").transform_for(shape, 1.0)


def _source_name(source, what):
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<{what} array>"


INIT_MODES = ("header", "center", "array")


def _init_mode(model, images, init):
    """The mode ``init`` resolves to for a model-grid export and the pair ``images`` (see :func:`prepare_pair`)."""
    if init is None:
        world = getattr(getattr(model, "info", None), "space", "array") == "world"
        return "header" if world and all(image.affine is not None for image in images.values()) else "array"
    if init == "header":
        for name, image in images.items():
            if image.affine is None:
                raise RegisterError(f"the {name} image {image.source} has no patient geometry (a PNG/NPY file or an "
                                    "array lives in pixel space), so init='header' cannot relate it to the other "
                                    "image through its header; use --init=center (or --init=array)")
    return init


def prepare_pair(model, fixed, moving, spacing=(None, None), init=None):
    """Read and check one pair and bring it onto the model grid.

    Parameters
    ----------
    model : dirnet_tf.registration.ExportedModel
    fixed, moving : str, os.PathLike or numpy array
        A file (:mod:`dirnet_tf.readers` formats) or an array of the model's dimensionality
        (no patient geometry: the pixel space of :func:`dirnet_tf.geometry.pixel_affine`).
    spacing : pair
        mm per axis of the fixed and of the moving array (None: the export's default spacing,
        else 1 mm); ignored for files.
    init : {None, "header", "center", "array"}
        How fixed and moving are related (:mod:`dirnet_tf.world_grid`):

        * ``"array"``: each image on the model grid along its own array axes, centred on its
          own field of view (:meth:`dirnet_tf.preprocessing.ModelGrid.prepare`);
        * ``"header"``: through their headers: the fixed model grid lies in the fixed image's
          physical space (3-D: array axes permuted / flipped to the closest RAS+ order), the
          moving image is sampled at the world positions (RAS+ mm) of its voxels; both images
          need patient geometry;
        * ``"center"``: as ``"header"``, the moving image sampled at ``x + t`` with ``t`` (RAS+
          mm) the moving minus the fixed centre of mass of the normalised intensities (images
          without patient geometry in their pixel space);
        * None: ``"header"`` when both images have patient geometry and the export is a
          world-space export (metadata ``"space": "world"``), else ``"array"``.

        Exports without ``model_grid`` always use ``"array"``.

    Returns
    -------
    dict
        ``fixed``, ``moving``: model inputs float32 ``[*model_shape, channels]``;
        ``fixed_image``, ``moving_image``: :class:`dirnet_tf.readers.Image` on their own grids;
        ``fixed_grid``, ``moving_grid``: :class:`dirnet_tf.preprocessing.GridTransform` or
        :class:`dirnet_tf.world_grid.AffineGridTransform` (model index -> image index);
        ``init``: ``{"mode": "header" | "center" | "array", "translation_mm": [x, y, z]}``
        (RAS+ mm, zeros unless ``center``); ``labels`` and ``points`` (None, see
        :func:`attach_labels`, :func:`attach_points`).
    """
    if init is not None and init not in INIT_MODES:
        raise RegisterError(f"init must be one of {', '.join(INIT_MODES)} (or None for the export's default), "
                            f"got {init!r}")
    sources = {"fixed": fixed, "moving": moving}
    if model.grid is None:
        if init in ("header", "center"):
            raise RegisterError(f"the export {model.path} has no model grid: the fixed image "
                                f"{_source_name(fixed, 'fixed')} and the moving image {_source_name(moving, 'moving')} "
                                f"have no patient geometry and are registered on their pixel grids as they are "
                                f"(init={init!r} needs a model-grid export); use --init=array")
        arrays = {}
        for name, source in sources.items():
            if isinstance(source, (str, os.PathLike)):
                image = read_model_input(os.fspath(source), model.channels)
            else:
                image = model_input_array(source, model.channels, f"<{name} array>")
            path = _source_name(source, name)
            if image.shape[:2] != model.shape:
                raise RegisterError(
                    f"the {name} image {path} is {image.shape[0]}x{image.shape[1]} pixels but the model "
                    f"{model.path} expects {model.shape[0]}x{model.shape[1]}"
                )
            arrays[name] = image
        identity = _identity_transform(model.shape)
        result = {"fixed": arrays["fixed"], "moving": arrays["moving"],
                  "fixed_image": Image(arrays["fixed"][..., 0], (1.0, 1.0), None, _source_name(fixed, "fixed")),
                  "moving_image": Image(arrays["moving"][..., 0], (1.0, 1.0), None, _source_name(moving, "moving")),
                  "fixed_grid": identity, "moving_grid": identity}
        mode, translation = "array", np.zeros(3)
    else:
        if model.channels != 1:
            raise RegisterError(f"{model.path}: a model grid export with {model.channels} channels; "
                                "images are read as grey (1 channel)")
        images = {}
        for (name, source), space in zip(sources.items(), spacing):
            if isinstance(source, (str, os.PathLike)):
                images[name] = _read_one(model, os.fspath(source), name)
            else:
                images[name] = _array_image(model, source, space, name)
        mode = _init_mode(model, images, init)
        translation = np.zeros(3)
        if mode == "array":
            fixed_array, fixed_grid = model.grid.prepare(images["fixed"])
            moving_array, moving_grid = model.grid.prepare(images["moving"])
        else:
            try:
                fixed_array, fixed_grid, moving_array, moving_grid, translation = world_grid.prepare_world_pair(
                    model.grid, images["fixed"], images["moving"], mode)
            except readers.InputError as exc:
                raise RegisterError(f"cannot relate the moving image {images['moving'].source} to the fixed image "
                                    f"{images['fixed'].source} (init={mode!r}): {exc}") from exc
        result = {"fixed": fixed_array[..., None], "moving": moving_array[..., None],
                  "fixed_image": images["fixed"], "moving_image": images["moving"], "fixed_grid": fixed_grid,
                  "moving_grid": moving_grid}
    result["init"] = {"mode": mode, "translation_mm": [float(v) for v in translation]}
    result["labels"] = None
    result["points"] = result["points_fixed"] = None
    return result


def read_moving_labels(path, moving, ndim):
    """The integer label map at ``path`` (int32, on the moving image's grid)."""
    if not os.path.exists(path):
        raise RegisterError(f"the moving label map {path} does not exist")
    try:
        labels = readers.read_labels(path, ndim=ndim)
    except readers.InputError as exc:
        raise RegisterError(f"cannot read the moving label map {path}: {exc}") from exc
    if len(labels) != 1:
        raise RegisterError(f"the moving label map {path} holds {len(labels)} label maps; give one")
    if labels[0].shape != moving.shape:
        raise RegisterError(f"the moving label map {path} has shape {labels[0].shape} but the moving image "
                            f"{moving.source} has shape {moving.shape}; labels must be on the moving image's grid")
    return labels[0].array


def attach_labels(model, result, path):
    """Read the moving label map ``path`` into ``result["labels"]`` (int32, moving grid)."""
    result["labels"] = read_moving_labels(path, result["moving_image"], model.ndim)
    result.pop("warped_labels", None)
    return result


def attach_points(model, result, path):
    """Read a points CSV (:func:`dirnet_tf.points.read_points`) into ``result["points"]`` (the table)
    and ``result["points_fixed"]`` (fixed voxels, ij); a point outside the fixed image is an error."""
    fixed = result["fixed_image"]
    table = read_points(path, model.ndim, fixed.affine is not None)
    points = table_to_fixed_voxels(table, fixed)
    check_points_inside(points, fixed, table)
    result["points"], result["points_fixed"] = table, points
    result.pop("points_moving", None)
    return result


# --------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------- #


def infer(model, prepared, batch_size=16):
    """Run the served model on prepared pairs (in batches); adds ``warped``, ``displacement`` (model
    grid, model voxels ij) and ``step_outputs`` (``{output name: parameters}`` of a model of composed
    steps, else empty) to each."""
    from dirnet_tf.inference import predict

    if not prepared:
        return prepared
    out = predict(model.fn, np.stack([p["fixed"] for p in prepared]), np.stack([p["moving"] for p in prepared]),
                  batch_size=max(1, int(batch_size)))
    names = [step["output"] for step in model.steps or ()]
    missing = [name for name in names if name not in out]
    if missing:
        raise RegisterError(f"{model.path}: the model does not return {', '.join(missing)}, which its metadata "
                            "names as step outputs")
    for n, p in enumerate(prepared):
        p["warped"] = out["warped"][n]
        p["displacement"] = out["displacement"][n]
        p["step_outputs"] = {name: out[name][n] for name in names}
    return prepared


def summary(result):
    """NCC before / after and the folding fraction (model grid) of one result."""
    return {"ncc_before": float(metrics.ncc(result["fixed"], result["moving"])),
            "ncc_after": float(metrics.ncc(result["fixed"], result["warped"])),
            "folding": float(metrics.folding_fraction(result["displacement"]))}
