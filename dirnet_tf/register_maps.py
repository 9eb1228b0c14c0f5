"""The map of a registered pair on the images' own grids, and the outputs it gives.

Step 3 of :mod:`dirnet_tf.register_engine` (after ``prepare_pair`` and ``infer``): the served
displacement becomes a map from every fixed voxel to a moving voxel, ``p_m = T_m(q + u_m(q))`` with
``q = T_f^-1(p_f)`` (for a model of composed steps ``q' = phi_1(... phi_n(q))``; the geometry is
described in :mod:`dirnet_tf.register_engine`).  Here:

* the B-spline behind the served field (:func:`_spline`: control points recovered exactly, or why
  not) or the served chain of steps (:func:`_chain`);
* :func:`fixed_slabs` -- that map over blocks of fixed rows, separably where the fixed grid is
  axis-aligned with the model grid;
* :func:`finish` -- the outputs on the fixed grid: the warped image (the compiled resampler), the
  displacement in moving or fixed voxels, carried labels, mapped points;
* :func:`map_fixed_points` / :func:`model_steps` -- points mapped through the exact chain.

Units: voxel indices ij order, world coordinates RAS+ mm (:mod:`dirnet_tf.geometry`).
"""

import numpy as np
from scipy import ndimage

from dirnet_tf import spline_np
from dirnet_tf.geometry import image_affine, planar_parts, voxels_to_world
from dirnet_tf.label_carrying import carry_labels
from dirnet_tf.register_errors import RegisterError

__all__ = ["finish", "fixed_slabs", "model_steps", "map_fixed_points"]


# --------------------------------------------------------------------------- #
# The spline or chain behind the served field
# --------------------------------------------------------------------------- #


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
