"""The numpy cubic B-spline of DIRNet: basis, grid rule, evaluation, point maps, recovery.

THE one numpy implementation of the package's spline (the TensorFlow field of
:mod:`dirnet_tf.bspline` builds on :func:`cubic_bspline`, :func:`axis_basis`
and :func:`control_grid_shape`; the ITK and elastix exports of
:mod:`dirnet_tf.itk` and :mod:`dirnet_tf.elastix_params` on
:func:`control_points_array`).  No TensorFlow, no SimpleITK.

Units and axis order
--------------------
Everything here is in **voxels of one (model) grid, ij order**: array axis
``d`` of the image is coordinate ``d`` of a point and component ``d`` of a
displacement; integer coordinates are voxel centres.  No mm, no RAS/LPS
(world coordinates are :func:`dirnet_tf.itk.map_points_world`).

The spline
----------
For an image of ``N_d`` voxels along axis ``d`` and a control-point spacing of
``s_d`` voxels there are ``K_d = ceil((N_d - 1) / s_d) + 3`` control points
(:func:`control_grid_shape`); control point ``k`` sits at voxel ``(k - 1) s_d``
and the displacement is the tensor-product cubic B-spline

    ``u(x) = sum_k cp[k] prod_d beta3(x_d / s_d - k_d + 1)``

with the uniform cubic B-spline ``beta3`` (:func:`cubic_bspline`).  ``u`` is
defined by the finite sum at every point of space (control points beyond the
grid count as zero; it vanishes more than two spacings outside the grid).  The
registration's map ``phi(x) = x + u(x)`` takes a FIXED voxel to the MOVING
voxel it is sampled from (``warped(x) = moving(phi(x))``).

Evaluation comes in three forms: separably on a tensor grid of positions
(:func:`axis_basis`, :func:`spline_on_axes`; the TF field uses the same
weights), exactly at arbitrary points (:func:`spline_displacement_at`,
:func:`map_points_bspline`), and through a chain of composed steps
(:func:`map_points_chain`: an affine step :func:`affine_step_matrix` and
B-spline steps, last step applied first, as
:func:`dirnet_tf.warping.compose_displacements`).  A dense field sampled at the
voxels of the grid gives its control points back by least squares
(:func:`recover_control_points`) and its spacing by
:func:`detect_grid_spacing`.
"""

import math

import numpy as np

__all__ = [
    "normalize_spacing",
    "normalize_image_shape",
    "control_grid_shape",
    "cubic_bspline",
    "axis_basis",
    "control_points_array",
    "spline_on_axes",
    "spline_displacement_at",
    "map_points_bspline",
    "homogeneous_matrix",
    "affine_step_matrix",
    "step_kind",
    "map_points_chain",
    "recover_control_points",
    "fit_tolerance",
    "detect_grid_spacing",
]

_POINT_CHUNK = 65536  # points per block in spline_displacement_at (bounds memory)


# --------------------------------------------------------------------------- #
# Grid rule and basis
# --------------------------------------------------------------------------- #


def _spacing_value(value, grid_spacing):
    """One spacing entry as a positive Python int, else ValueError."""
    if isinstance(value, (bool, np.bool_)):
        ok = False
    elif isinstance(value, (int, np.integer)):
        ok = int(value) >= 1
    elif isinstance(value, (float, np.floating)):
        ok = bool(np.isfinite(value)) and float(value).is_integer() and value >= 1
    else:
        ok = False
    if not ok:
        raise ValueError(f"grid_spacing must contain positive integers (pixels), got {grid_spacing!r}")
    return int(value)


def normalize_spacing(grid_spacing, ndim):
    """Return ``grid_spacing`` as a tuple of ``ndim`` positive Python ints (voxels, ij order).

    Parameters
    ----------
    grid_spacing : int or sequence of int
        One spacing for all axes, or one per axis (voxels).  Integral floats
        (``4.0``) and numpy arrays are accepted; a sequence of one entry
        counts for every axis.
    ndim : int
        Number of spatial axes.

    Raises
    ------
    ValueError
        If the spacing is not a positive integer or has the wrong length.
    """
    if isinstance(grid_spacing, (int, float, np.integer, np.floating)) and not isinstance(
            grid_spacing, (bool, np.bool_)):
        return (_spacing_value(grid_spacing, grid_spacing),) * ndim
    if isinstance(grid_spacing, (str, bytes)):
        values = None
    else:
        try:
            values = tuple(np.asarray(grid_spacing, dtype=object)) if np.ndim(grid_spacing) == 1 else None
        except (TypeError, ValueError):
            values = None
    if values is None:
        raise ValueError(
            f"grid_spacing must be a positive int or a tuple of {ndim} positive ints, got {grid_spacing!r}"
        )
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim:
        raise ValueError(
            f"grid_spacing {grid_spacing!r} has {len(values)} entries but the image has {ndim} spatial axes"
        )
    return tuple(_spacing_value(v, grid_spacing) for v in values)


def normalize_image_shape(image_shape):
    """``image_shape`` as a tuple of 2 or 3 positive ints (voxels, ij order), else ValueError."""
    try:
        shape = tuple(int(n) for n in image_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"image_shape must be a sequence of 2 or 3 positive ints, got {image_shape!r}"
        ) from None
    if len(shape) not in (2, 3) or any(n < 1 for n in shape):
        raise ValueError(
            f"image_shape must be a sequence of 2 or 3 positive ints (spatial axes only), "
            f"got {image_shape!r}"
        )
    return shape


def control_grid_shape(image_shape, grid_spacing):
    """Number of control points per axis for an image and a grid spacing.

    Parameters
    ----------
    image_shape : sequence of int
        Spatial size of the image, ``(H, W)`` or ``(D, H, W)`` (voxels, ij order).
    grid_spacing : int or sequence of int
        Control-point spacing in voxels, one for all axes or one per axis.

    Returns
    -------
    tuple of int
        ``K_d = ceil((N_d - 1) / s_d) + 3`` for every axis.
    """
    shape = normalize_image_shape(image_shape)
    return _grid_rule(shape, normalize_spacing(grid_spacing, len(shape)))


def _grid_rule(shape, spacing):
    """``K_d = ceil((N_d - 1) / s_d) + 3`` of validated ``shape`` and ``spacing`` (any number of axes)."""
    return tuple(int(math.ceil((n - 1) / s)) + 3 for n, s in zip(shape, spacing))


def cubic_bspline(t, derivative=0):
    """Uniform cubic B-spline ``beta3`` (or its 1st/2nd derivative), numpy.

    Parameters
    ----------
    t : array_like
        Evaluation points (in units of the knot spacing).
    derivative : int
        0, 1 or 2.

    Returns
    -------
    numpy.ndarray (float64) of the same shape as ``t``.
    """
    t = np.asarray(t, dtype=np.float64)
    a = np.abs(t)
    sign = np.sign(t)
    inner = a < 1
    outer = (a >= 1) & (a < 2)
    if derivative == 0:
        return np.where(inner, 2.0 / 3.0 - a**2 + 0.5 * a**3,
                        np.where(outer, (2.0 - a) ** 3 / 6.0, 0.0))
    if derivative == 1:
        return sign * np.where(inner, -2.0 * a + 1.5 * a**2,
                               np.where(outer, -0.5 * (2.0 - a) ** 2, 0.0))
    if derivative == 2:
        return np.where(inner, -2.0 + 3.0 * a, np.where(outer, 2.0 - a, 0.0))
    raise ValueError(f"derivative must be 0, 1 or 2, got {derivative!r}")


def axis_basis(positions, spacing, num_points, derivative=0):
    """``B[x, k] = d^m/dx^m beta3(positions[x] / spacing - k + 1)``: one axis of the tensor-product spline.

    Parameters
    ----------
    positions : array (n,)
        Voxel indices along one array axis (any real values).
    spacing : int
        Control-point spacing in voxels.
    num_points : int
        Control points along the axis.
    derivative : int
        0, 1 or 2: the derivative with respect to the position (per voxel,
        hence the factor ``spacing ** -derivative``).

    Returns
    -------
    np.ndarray ``[n, num_points]`` float64
    """
    x = np.asarray(positions, dtype=np.float64)[:, None]
    k = np.arange(num_points, dtype=np.float64)[None, :]
    return cubic_bspline(x / float(spacing) - k + 1.0, derivative) / float(spacing) ** derivative


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #


def control_points_array(control_points, grid_spacing, image_shape=None):
    """Validate control points of one registration.

    Parameters
    ----------
    control_points : array_like ``[*K, ndim]`` (or ``[1, *K, ndim]``)
        Control-point displacements in voxels, ij order; ``ndim`` 2 or 3.
    grid_spacing : int or sequence of int
        Control-point spacing in voxels (:func:`normalize_spacing`).
    image_shape : sequence of int, optional
        The grid (voxels, ij); when given, ``K`` must be
        :func:`control_grid_shape` of it.

    Returns
    -------
    tuple
        ``(control_points float64 [*K, ndim], spacing (tuple of int), image_shape (tuple or None))``.
    """
    cp = np.asarray(control_points, dtype=np.float64)
    shape = cp.shape
    if cp.ndim >= 2 and cp.ndim == cp.shape[-1] + 2 and cp.shape[0] == 1:
        cp = cp[0]  # one registration of a batch
    ndim = cp.shape[-1] if cp.ndim else 0
    if ndim not in (2, 3) or cp.ndim != ndim + 1:
        raise ValueError(
            f"control_points must have shape [*K, ndim] with ndim 2 or 3 (e.g. [K0, K1, 2] or "
            f"[K0, K1, K2, 3]; a leading batch axis of 1 is allowed), got {shape}"
        )
    if min(cp.shape[:-1]) < 1:
        raise ValueError(f"control_points of shape {shape} has an empty grid axis")
    if not np.all(np.isfinite(cp)):
        raise ValueError(f"control_points of shape {shape} contain non-finite values")
    spacing = normalize_spacing(grid_spacing, ndim)
    if image_shape is not None:
        image_shape = tuple(int(n) for n in np.atleast_1d(image_shape))
        if len(image_shape) != ndim or min(image_shape) < 1:
            raise ValueError(
                f"image_shape {image_shape} must have {ndim} positive entries for control points of "
                f"shape {shape}"
            )
        expected = control_grid_shape(image_shape, spacing)
        if tuple(cp.shape[:-1]) != expected:
            raise ValueError(
                f"control_points of shape {shape} do not fit image_shape {image_shape} with "
                f"grid_spacing {spacing}: expected [{', '.join(map(str, expected))}, {ndim}] "
                f"(K = ceil((N - 1) / s) + 3)"
            )
    return cp, spacing, image_shape


def spline_on_axes(control_points, grid_spacing, axes):
    """The B-spline displacement on the tensor grid ``axes[0] x axes[1] (x axes[2])``.

    Parameters
    ----------
    control_points : array ``[*K, C]``
        Control-point values (usually ``C = ndim`` displacements), voxels, ij order.
    grid_spacing : int or sequence of int
        Voxels per axis.
    axes : list of 1-D arrays
        Voxel indices along each array axis (e.g. the model index of every
        row / column of the fixed image).

    Returns
    -------
    np.ndarray ``[len(axes[0]), ..., C]`` float64
        ``u`` in voxels, ij order: the exact spline sum (control points beyond
        the grid count as zero), evaluated separably.
    """
    out = np.asarray(control_points, dtype=np.float64)
    spacing = normalize_spacing(grid_spacing, len(axes))
    for d, q in enumerate(axes):
        basis = axis_basis(q, spacing[d], out.shape[d])
        out = np.moveaxis(np.tensordot(basis, out, axes=([1], [d])), 0, d)
    return out


def spline_displacement_at(control_points, grid_spacing, points_ij):
    """The B-spline displacement ``u`` evaluated exactly at arbitrary points.

    Parameters
    ----------
    control_points : array_like ``[*K, ndim]`` (or ``[1, *K, ndim]``)
        Control-point displacements in voxels of the model grid, ij order.
    grid_spacing : int or sequence of int
        Control-point spacing in voxels.
    points_ij : array_like ``(..., ndim)``
        Points in (fractional) voxel coordinates of the model grid, ij order;
        any position, inside or outside the image.

    Returns
    -------
    np.ndarray ``(..., ndim)``, float64
        ``u(x) = sum_k cp[k] prod_d beta3(x_d / s_d - k_d + 1)`` in voxels,
        ij order: the sum over the (at most) 4 control points per axis whose
        basis functions are non-zero at ``x`` -- no interpolation of a dense
        field; control points beyond the grid count as zero.
    """
    cp, spacing, _ = control_points_array(control_points, grid_spacing)
    ndim = cp.shape[-1]
    pts = np.asarray(points_ij, dtype=np.float64)
    if pts.ndim < 1 or pts.shape[-1] != ndim:
        raise ValueError(f"points_ij must have shape (..., {ndim}) for control points of shape "
                         f"{np.shape(control_points)}, got {pts.shape}")
    flat = pts.reshape(-1, ndim)
    out = np.empty_like(flat)
    grid = np.asarray(cp.shape[:-1])
    offsets = np.arange(4)
    for start in range(0, len(flat), _POINT_CHUNK):
        block = flat[start:start + _POINT_CHUNK]
        idx, weights = [], []
        for d in range(ndim):
            t = block[:, d] / spacing[d] + 1.0  # continuous control-grid index
            k = np.floor(t).astype(np.int64)[:, None] - 1 + offsets  # the 4 supporting nodes
            w = cubic_bspline(t[:, None] - k)
            inside = (k >= 0) & (k < grid[d])
            weights.append(np.where(inside, w, 0.0))
            idx.append(np.clip(k, 0, grid[d] - 1))
        if ndim == 2:
            values = cp[idx[0][:, :, None], idx[1][:, None, :]]  # (P, 4, 4, 2)
            out[start:start + len(block)] = np.einsum("pa,pb,pabc->pc", weights[0], weights[1], values)
        else:
            values = cp[idx[0][:, :, None, None], idx[1][:, None, :, None], idx[2][:, None, None, :]]
            out[start:start + len(block)] = np.einsum("pa,pb,pe,pabec->pc", weights[0], weights[1],
                                                      weights[2], values)
    return out.reshape(pts.shape)


def map_points_bspline(control_points, grid_spacing, points_ij):
    """The spatial map ``phi(x) = x + u(x)`` of one B-spline at arbitrary points (fixed voxel -> moving voxel).

    Parameters
    ----------
    control_points : array_like ``[*K, ndim]`` (or ``[1, *K, ndim]``)
        Control-point displacements in voxels of the model grid, ij order.
    grid_spacing : int or sequence of int
        Control-point spacing in voxels.
    points_ij : array_like ``(..., ndim)``
        Fixed-image points in (fractional) voxel coordinates, ij order.

    Returns
    -------
    np.ndarray ``(..., ndim)``, float64
        The moving-image points, voxels, ij order (exact spline sum, see
        :func:`spline_displacement_at`).
    """
    pts = np.asarray(points_ij, dtype=np.float64)
    return pts + spline_displacement_at(control_points, grid_spacing, pts)


# --------------------------------------------------------------------------- #
# Chains of composed steps
# --------------------------------------------------------------------------- #


def homogeneous_matrix(matrix):
    """Validate a 3x3 (2-D) or 4x4 (3-D) homogeneous voxel map (ij order) -> float64 array."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] not in (3, 4):
        raise ValueError(f"matrix must be a 3x3 (2-D) or 4x4 (3-D) homogeneous voxel map, got shape {m.shape}")
    ndim = m.shape[0] - 1
    if not np.allclose(m[-1], np.eye(ndim + 1)[-1]):
        raise ValueError(f"matrix of shape {m.shape} must end with the row {np.eye(ndim + 1)[-1].tolist()}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"matrix of shape {m.shape} contains non-finite values")
    return m


def affine_step_matrix(params, image_shape):
    """The homogeneous voxel map of an affine step of a DIRNet (:mod:`dirnet_tf.affine`).

    Parameters
    ----------
    params : array_like ``[ndim * (ndim + 1)]`` (or ``[1, ndim * (ndim + 1)]``)
        Row-major ``M`` then ``t`` (voxels), ij order, as
        :func:`dirnet_tf.affine.affine_displacement` takes them.
    image_shape : sequence of int
        The model grid; its centre ``c = (N - 1) / 2`` is the centre of ``M``.

    Returns
    -------
    np.ndarray ``(ndim + 1, ndim + 1)`` float64
        ``x -> x + M (x - c) + t`` (model voxels, ij), for
        :func:`map_points_chain`, :func:`dirnet_tf.itk.itk_affine_transform`
        and :func:`dirnet_tf.elastix_params.elastix_affine_parameters`.
    """
    shape = tuple(int(n) for n in np.atleast_1d(image_shape))
    ndim = len(shape)
    p = np.asarray(params, dtype=np.float64)
    if p.ndim == 2 and p.shape[0] == 1:
        p = p[0]
    if ndim not in (2, 3) or p.shape != (ndim * (ndim + 1),) or not np.all(np.isfinite(p)):
        raise ValueError(f"affine step parameters must be {ndim * (ndim + 1)} finite numbers (M row-major, "
                         f"then t) for image_shape {shape}, got shape {np.shape(params)}")
    m = p[: ndim * ndim].reshape(ndim, ndim)
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    out = np.eye(ndim + 1)
    out[:ndim, :ndim] += m
    out[:ndim, ndim] = p[ndim * ndim:] - m @ centre
    return out


def step_kind(step):
    """``"affine"`` or ``"spline"`` for a valid step of a chain, else ValueError.

    A step is ``{"kind": "affine", "matrix": (ndim + 1, ndim + 1)}`` or
    ``{"kind": "spline", "control_points": [*K, ndim], "grid_spacing": s}``
    (voxels of the model grid, ij order).
    """
    kind = step.get("kind") if isinstance(step, dict) else None
    if kind == "affine" and "matrix" in step:
        return kind
    if kind == "spline" and "control_points" in step and "grid_spacing" in step:
        return kind
    raise ValueError(f"a step must be {{'kind': 'affine', 'matrix': ...}} or {{'kind': 'spline', "
                     f"'control_points': ..., 'grid_spacing': ...}}, got {step!r:.200}")


def map_points_chain(steps, points_ij):
    """The composed map ``phi_1(phi_2(... phi_n(x)))`` of a chain of steps at arbitrary points.

    Parameters
    ----------
    steps : sequence of dict
        In the order a model of composed steps predicts them (``DIRNet.step_layout``):
        ``{"kind": "affine", "matrix": (ndim + 1, ndim + 1)}`` (a homogeneous voxel
        map, e.g. :func:`affine_step_matrix`) or ``{"kind": "spline",
        "control_points": [*K, ndim], "grid_spacing": s}`` (``phi(x) = x + u(x)``,
        :func:`map_points_bspline`), all in voxels of one model grid, ij order.  The
        LAST step is applied to a fixed point first (the composition of
        :func:`dirnet_tf.warping.compose_displacements`).
    points_ij : array_like ``(..., ndim)``
        Fixed points, (fractional) voxels of the model grid, ij order.

    Returns
    -------
    np.ndarray ``(..., ndim)`` float64
        Moving points: every spline summed exactly at the point the later steps
        moved it to (no interpolation of a dense field).
    """
    x = np.asarray(points_ij, dtype=np.float64)
    for step in reversed(list(steps)):
        if step_kind(step) == "affine":
            m = homogeneous_matrix(step["matrix"])
            x = x @ m[:-1, :-1].T + m[:-1, -1]
        else:
            x = map_points_bspline(step["control_points"], step["grid_spacing"], x)
    return x


# --------------------------------------------------------------------------- #
# Recovery of control points from a dense field
# --------------------------------------------------------------------------- #


def recover_control_points(displacement, grid_spacing):
    """Control points whose B-spline reproduces a dense displacement on its grid.

    The dense field is linear in the control points, separably: ``u = W_0 C
    W_1^T`` per component in 2-D (``W_d[x, k] = beta3(x / s_d - k + 1)``,
    ``N_d x K_d``, :func:`axis_basis`).  The least-squares solution ``C =
    W_0^+ U W_1^+T`` is exact (up to float round-off in ``u``) when every
    ``W_d`` has full column rank, which holds for spacing >= 2 and ``N_d`` >=
    ``K_d`` + 1 or so; otherwise the minimum-norm solution still reproduces
    ``u`` at the voxels but not between them.

    Parameters
    ----------
    displacement : array ``[*shape, ndim]``
        Voxels of the (model) grid, ij order (e.g. the served model's ``displacement``).
    grid_spacing : int or sequence of int
        Control-point spacing in voxels.

    Returns
    -------
    tuple
        ``(control_points [*K, ndim] float64 (voxels, ij), exact (bool: all
        W_d of full column rank), residual (max |spline - u| at the voxels,
        voxels))``.
    """
    u = np.asarray(displacement, dtype=np.float64)
    shape = u.shape[:-1]
    spacing = normalize_spacing(grid_spacing, len(shape))
    grid = _grid_rule(shape, spacing)
    out, exact = u, True
    for d, (n, s, k) in enumerate(zip(shape, spacing, grid)):
        w = axis_basis(np.arange(n), s, k)
        exact = exact and n >= k and np.linalg.matrix_rank(w) == k
        out = np.moveaxis(np.tensordot(np.linalg.pinv(w), out, axes=([1], [d])), 0, d)
    check = spline_on_axes(out, spacing, [np.arange(n) for n in shape])
    return out, bool(exact), float(np.max(np.abs(check - u))) if u.size else 0.0


def fit_tolerance(displacement):
    """Largest residual (voxels) accepted for a float32 field to be a spline: ``1e-4 + 1e-5 max|u|``."""
    return 1e-4 + 1e-5 * float(np.max(np.abs(displacement))) if np.size(displacement) else 1e-4


def detect_grid_spacing(displacement, candidates=(64, 32, 16, 8, 4, 2)):
    """The coarsest control-point spacing whose B-spline reproduces ``displacement`` exactly.

    Used for exports whose metadata does not record ``grid_spacing``.  A
    coarser spline space is contained in every finer one, and with full-rank
    weight matrices a spline is determined by its samples, so the coarsest
    exact fit is the model's own spline (up to round-off).

    Parameters
    ----------
    displacement : array ``[*shape, ndim]``
        Voxels of the grid, ij order.
    candidates : sequence of int
        Spacings (voxels, the same on every axis) tried in this order.

    Returns
    -------
    tuple of int or None
        ``(s,) * ndim``, or None when no candidate fits within :func:`fit_tolerance`.
    """
    u = np.asarray(displacement, dtype=np.float64)
    shape, ndim = u.shape[:-1], u.shape[-1]
    for s in candidates:
        spacing = (int(s),) * ndim
        if any(n < k for n, k in zip(shape, _grid_rule(shape, spacing))):
            continue
        _, exact, residual = recover_control_points(u, spacing)
        if exact and residual <= fit_tolerance(u):
            return spacing
    return None
