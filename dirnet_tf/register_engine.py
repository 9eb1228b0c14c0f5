"""The registration engine: a pair of images -> the served model -> the map on the images' own grids.

Steps, each a function (the API :mod:`dirnet_tf.registration` and ``experiments.register`` run
them in this order):

1. :func:`prepare_pair` -- read (or take) the fixed and moving images and bring them onto the
   model grid with the export's preprocessing (:class:`dirnet_tf.preprocessing.ModelGrid`);
   optional moving labels and fixed points.
2. :func:`infer` -- the served model on prepared pairs, in batches.
3. :func:`finish` -- the spline (exact control points, or the served chain of composed steps) and
   the outputs on the fixed image's grid.

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
from scipy import ndimage

from dirnet_tf import metrics, readers, spline_np, world_grid
from dirnet_tf.geometry import image_affine, planar_parts, voxels_to_world
from dirnet_tf.label_carrying import carry_labels
from dirnet_tf.points import check_points_inside, read_points, table_to_fixed_voxels
from dirnet_tf.preprocessing import ModelGrid
from dirnet_tf.readers import Image
from dirnet_tf.register_errors import RegisterError

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


def _spline(model, displacement):
    """Recovered control points and whether they define the field exactly."""
    spacing = model.grid_spacing
    info = {"spacing": spacing, "control_points": None, "exact": False, "residual": None, "problem": None}
    composed = len(model.metadata.get("steps") or ())
    if model.steps is not None:
        info["problem"] = f"the export composes {len(model.steps)} steps (they are used as a chain)"
        return info
    if composed > 1:
        info["problem"] = (f"the export {model.path} composes {composed} steps but does not serve their parameters "
                           "(it was exported by an older version); export it again (e.g. `--export_only`) to map "
                           "points and write transforms")
        return info
    if spacing is None:
        spacing = info["spacing"] = spline_np.detect_grid_spacing(displacement)
    if spacing is None:
        info["problem"] = (f"the export {model.path} does not record grid_spacing and no B-spline grid of spacing "
                           "2..64 reproduces its displacement")
        return info
    cp, exact, residual = spline_np.recover_control_points(displacement, spacing)
    info.update(control_points=cp, residual=residual)
    tolerance = spline_np.fit_tolerance(displacement)
    if not exact:
        info["problem"] = (f"the control points of grid spacing {spacing} on the {tuple(displacement.shape[:-1])} "
                           "model grid are not determined by the dense field (the grid is too fine or the image "
                           "too small)")
    elif residual > tolerance:
        info["problem"] = (f"the export's displacement is not a cubic B-spline of grid spacing {spacing} "
                           f"(residual {residual:.3g} model voxels); its metadata does not describe the model")
    else:
        info["exact"] = True
    return info


def _chain(model, result):
    """The served steps for :func:`dirnet_tf.spline_np.map_points_chain` (None without step outputs)."""
    if model.steps is None:
        return None
    chain = []
    for n, step in enumerate(model.steps):
        params = np.asarray(result["step_outputs"][step["output"]], dtype=np.float64)
        if step["kind"] == "affine":
            try:
                chain.append({"kind": "affine", "matrix": spline_np.affine_step_matrix(params, model.shape)})
            except ValueError as exc:
                raise RegisterError(f"{model.path}: step {n} ({step['output']}): {exc}") from exc
            continue
        expected = tuple(spline_np.control_grid_shape(model.shape, step["grid_spacing"])) + (model.ndim,)
        if params.shape != expected:
            raise RegisterError(f"{model.path}: step {n} ({step['output']}) has shape {params.shape}; B-spline control "
                                f"points of grid spacing {step['grid_spacing']} on the {model.shape} model grid are "
                                f"{expected}")
        chain.append({"kind": "spline", "control_points": params, "grid_spacing": step["grid_spacing"]})
    return chain


# --------------------------------------------------------------------------- #
# Outputs on the fixed grid
# --------------------------------------------------------------------------- #


def _is_identity(grid_transform, shape):
    m = grid_transform.matrix()
    return tuple(grid_transform.image_shape) == tuple(shape) and np.allclose(m, np.eye(m.shape[0]))


def _fixed_axes(result):
    """The fixed grid transform as separable axes, or None when it mixes axes.

    When every model axis ``c`` is a scaled, shifted array axis ``a(c)`` of the fixed image
    (``p_a = m[a, c] q_c + m[a, n]``: diagonal, or permuted and flipped), returns ``(axes,
    order)``: ``axes[c]`` the model index ``q_c`` of every fixed voxel along array axis
    ``a(c)`` (``GridTransform.image_to_model_index``), ``order[a]`` the model axis of array
    axis ``a``.
    """
    t = result["fixed_grid"]
    m = t.matrix()
    n = m.shape[0] - 1
    nonzero = m[:n, :n] != 0
    if not (np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1)):
        return None
    source = np.argmax(nonzero, axis=0)  # array axis a(c) of each model axis c
    axes = [(np.arange(t.image_shape[a], dtype=np.float64) - m[a, n]) / m[a, c] for c, a in enumerate(source)]
    order = [int(np.argmax(nonzero[a])) for a in range(n)]
    return axes, order


def _fixed_rows(result, rows):
    """Fixed voxel indices ``[*block, ndim]`` (ij, float64) of the fixed rows ``rows`` (a slice of axis 0)."""
    shape = result["fixed_image"].shape
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64)[rows if d == 0 else slice(None)]
                                  for d, n in enumerate(shape)], indexing="ij"), -1)


def _model_points(result, rows, p_f):
    """``(q, separable)``: the model index ``[*block, ndim]`` of the fixed voxels ``p_f`` of ``rows``,
    and the separable axes of :func:`_fixed_axes` restricted to ``rows`` (None when it mixes axes)."""
    separable = _fixed_axes(result)
    if separable is None:
        return result["fixed_grid"].image_to_model_index(p_f), None
    axes, order = separable
    axes = list(axes)
    axes[order[0]] = axes[order[0]][rows]
    q = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    return np.transpose(q, order + [len(order)]), (axes, order)


def _model_field_at(result, rows, q, separable):
    """``u_m(q)`` (model voxels, ij) at the fixed voxels of ``rows`` (a slice of axis 0), ``q`` and
    ``separable`` from :func:`_model_points`: separably on the axes when the fixed grid transform
    is axis-aligned, else per voxel (the exact spline at ``q``, or the dense field interpolated)."""
    if result["identity"]:
        return np.asarray(result["displacement"][rows], dtype=np.float64)
    spline = result["spline"]
    if spline["exact"]:
        if separable is None:
            return spline_np.spline_displacement_at(spline["control_points"], spline["spacing"], q)
        axes, order = separable
        field = spline_np.spline_on_axes(spline["control_points"], spline["spacing"], axes)
        return np.transpose(field, order + [len(order)])
    field = np.asarray(result["displacement"], dtype=np.float64)
    if separable is not None:
        axes, order = separable
        return np.transpose(_linear_on_axes(field, axes), order + [len(order)])
    positions = np.moveaxis(q, -1, 0)
    return np.stack([ndimage.map_coordinates(field[..., c], positions, order=1, mode="nearest")
                     for c in range(field.shape[-1])], axis=-1)


def _linear_on_axes(field, axes):
    """``field [*S, C]`` linearly interpolated on the tensor grid ``axes[0] x axes[1] (x axes[2])``
    (voxel indices per axis; beyond the border the edge value, as ``map_coordinates(order=1,
    mode="nearest")``), one axis at a time: a product with each axis's interpolation matrix (two
    weights per row), as :func:`dirnet_tf.spline_np.spline_on_axes` does with the spline basis."""
    out = field
    for d, q in enumerate(axes):
        n = out.shape[d]
        q = np.clip(np.asarray(q, dtype=np.float64), 0, n - 1)
        low = np.minimum(np.floor(q).astype(np.intp), max(n - 2, 0))
        matrix = np.zeros((len(q), n))
        rows = np.arange(len(q))
        matrix[rows, low] = 1.0 - (q - low)
        matrix[rows, np.minimum(low + 1, n - 1)] += q - low
        out = np.moveaxis(np.tensordot(matrix, out, axes=([1], [d])), 0, d)
    return out


def _as_image_tensor(array):
    """A grey image as the resampler's input ``[1, *shape, 1]`` float32 (converted once per volume)."""
    import tensorflow as tf

    return tf.convert_to_tensor(np.asarray(array, dtype=np.float32)[None, ..., None])


def _sample(image, positions, boundary):
    """The image tensor of :func:`_as_image_tensor` linearly interpolated at ``positions`` ``[*block,
    ndim]`` (voxel indices, ij) with the compiled resampler (``border``: the edge value beyond the
    border, ``zeros``: 0), float32: ``map_coordinates(order=1, mode="nearest" | "grid-constant")``,
    several times faster."""
    from dirnet_tf.resample_op import resample

    return resample(image, positions.astype(np.float32)[None], boundary).numpy()[0, ..., 0]


def _prepare_maps(model, result):
    """The spline / chain of ``result`` (computed once)."""
    if "spline" not in result:
        result["identity"] = _is_identity(result["fixed_grid"], model.shape)
        result["spline"] = _spline(model, result["displacement"])
        result["chain"] = _chain(model, result)


def fixed_slabs(model, result, slab_voxels=1 << 21):
    """Yield ``(rows, p_f, p_m)`` over blocks of fixed rows: ``rows`` a slice of axis 0, ``p_f`` the fixed
    voxel indices and ``p_m`` the moving voxel indices ``[*block_shape, ndim]`` (ij, float64) they map to."""
    _prepare_maps(model, result)
    shape = result["fixed_image"].shape
    step = max(1, slab_voxels // max(1, int(np.prod(shape[1:]))))
    for start in range(0, shape[0], step):
        rows = slice(start, min(shape[0], start + step))
        p_f = _fixed_rows(result, rows)
        grid_q, separable = _model_points(result, rows, p_f)
        q = grid_q + _model_field_at(result, rows, grid_q, separable)
        yield rows, p_f, result["moving_grid"].model_to_image_index(q)


def finish(model, result, want=None, slab_voxels=1 << 21):
    """Compose the geometry and compute the outputs on the fixed grid (those not computed yet).

    Parameters
    ----------
    model : dirnet_tf.registration.ExportedModel
    result : dict
        From :func:`prepare_pair` and :func:`infer`.
    want : set of str or None
        Outputs among ``image``, ``field``, ``field_fixed``, ``labels``, ``points`` (None: all
        that the inputs allow).
    slab_voxels : int
        Fixed voxels per block (bounds memory on large volumes).

    Adds to ``result``
    ------------------
    spline : dict
        ``control_points [*K, ndim]`` (model voxels, ij), ``spacing`` (model voxels), ``exact``,
        ``residual`` (model voxels), ``problem`` (why not exact).
    chain : list of dict or None
        A model of composed steps: its steps (:func:`dirnet_tf.spline_np.map_points_chain`);
        None otherwise.
    image : float32 ``[*fixed_shape]``
        W: moving intensities at ``p_m`` (for exports without ``model_grid``: the served
        ``warped`` ``[H, W, C]``).
    field : float32 ``[*fixed_shape, ndim]``
        ``p_m - p_f``: moving voxel index minus fixed voxel index (ij order).
    field_fixed : float32 ``[*fixed_shape, ndim]``
        The moving point's world position minus the fixed voxel's, in voxels of the FIXED grid
        (ij order).
    warped_labels : int64 ``[*fixed_shape]`` or None
    points_moving : float64 ``[P, ncols]`` or None
        Moving points in the kind of coordinates of the input (moving voxels ij, or RAS+ mm).
    """
    ndim = model.ndim
    fixed, moving = result["fixed_image"], result["moving_image"]
    if want is None:
        want = {"image", "field", "field_fixed", "labels", "points"}
    _prepare_maps(model, result)
    shape = fixed.shape
    todo = {key for key, name in (("image", "image"), ("field", "field"), ("field_fixed", "field_fixed"),
                                  ("labels", "warped_labels"), ("points", "points_moving"))
            if key in want and result.get(name) is None}
    image = np.zeros(shape, np.float32) if "image" in todo and model.grid is not None else None
    field = np.zeros(shape + (ndim,), np.float32) if "field" in todo else None
    field_fixed = np.zeros(shape + (ndim,), np.float32) if "field_fixed" in todo else None
    labels = result["labels"]
    warped_labels = np.zeros(shape, np.int64) if labels is not None and "labels" in todo else None
    if any(x is not None for x in (image, field, field_fixed, warped_labels)):
        affine_m = image_affine(moving)
        linear_f, translation_f = planar_parts(image_affine(fixed), ndim)
        moving_tensor = _as_image_tensor(moving.array) if image is not None else None
        for rows, p_f, p_m in fixed_slabs(model, result, slab_voxels):
            if image is not None:
                image[rows] = _sample(moving_tensor, p_m, model.boundary)
            if warped_labels is not None:
                warped_labels[rows] = carry_labels(labels, np.moveaxis(p_m, -1, 0), model.boundary)
            if field is not None:
                field[rows] = p_m - p_f
            if field_fixed is not None:
                world = voxels_to_world(affine_m, p_m, ndim)
                if ndim == 3:
                    v = np.linalg.solve(linear_f, (world - translation_f).reshape(-1, 3).T).T
                else:
                    v = np.linalg.solve(linear_f[:2], (world[..., :2] - translation_f[:2]).reshape(-1, 2).T).T
                field_fixed[rows] = v.reshape(p_f.shape) - p_f
    if model.grid is None:
        if "image" in todo:
            image = result["warped"]
        if field is not None:
            field = np.asarray(result["displacement"], np.float32)
    for name, value in (("image", image), ("field", field), ("field_fixed", field_fixed),
                        ("warped_labels", warped_labels), ("points_moving", None)):
        if result.get(name) is None:
            result[name] = value
    if result["points"] is not None and "points" in todo:
        result["points_moving"] = map_fixed_points(model, result, result["points_fixed"], result["points"]["kind"],
                                                   result["points"]["values"].shape[1])
    return result


def _require_spline(result, what):
    spline = result["spline"]
    if not spline["exact"]:
        raise RegisterError(f"{what} needs the exact B-spline, but {spline['problem']}")
    return spline


def model_steps(result, what):
    """The map from the fixed to the moving model grid as steps (:func:`dirnet_tf.spline_np.map_points_chain`).

    The served chain of a model of composed steps, else the one recovered B-spline (a
    RegisterError naming ``what`` when it is not exact).
    """
    if result.get("chain") is not None:
        return result["chain"]
    spline = _require_spline(result, what)
    return [{"kind": "spline", "control_points": spline["control_points"], "grid_spacing": spline["spacing"]}]


def map_fixed_points(model, result, points_fixed, kind="voxel", columns=None, what="--points"):
    """Map fixed voxel indices through the registration, evaluating the spline exactly.

    Parameters
    ----------
    points_fixed : array ``[P, ndim]``
        Voxel indices of the fixed image (ij order).
    kind : {'voxel', 'world'}
        Output coordinates: voxel indices of the moving image (ij order), or world RAS+ mm
        (``columns`` = 3 for a 2-D image gives x, y, z).

    Returns
    -------
    np.ndarray ``[P, columns]`` float64
        ``T_m(phi_1(... phi_n(q)))`` with ``q = T_f^-1(p_f)`` and the steps of
        :func:`model_steps`, each spline summed exactly.
    """
    _prepare_maps(model, result)
    steps = model_steps(result, what)
    q = result["fixed_grid"].image_to_model_index(np.asarray(points_fixed, dtype=np.float64))
    p_m = result["moving_grid"].model_to_image_index(spline_np.map_points_chain(steps, q))
    if kind == "voxel":
        return p_m
    world = voxels_to_world(image_affine(result["moving_image"]), p_m, model.ndim)
    return world[:, : (columns or model.ndim)]


def summary(result):
    """NCC before / after and the folding fraction (model grid) of one result."""
    return {"ncc_before": float(metrics.ncc(result["fixed"], result["moving"])),
            "ncc_after": float(metrics.ncc(result["fixed"], result["warped"])),
            "folding": float(metrics.folding_fraction(result["displacement"]))}
