"""Cubic B-spline free-form deformations on a regular control grid.

Conventions (shared by the whole package):

* Coordinates and displacements are in **pixels**, in **ij order**: component
  ``d`` of a displacement moves along spatial axis ``d`` of the image array.
* For an image of size ``N_d`` along axis ``d`` and a grid spacing of ``s_d``
  pixels there are ``K_d = ceil((N_d - 1) / s_d) + 3`` control points; control
  point ``k`` sits at pixel ``(k - 1) * s_d``, so one control point lies
  outside the image on either side (the cubic B-spline has a support of four
  knots) and the grid covers pixel ``N_d - 1`` fully.
* The dense field is the tensor-product cubic B-spline

  ``u(x) = sum_k c_k prod_d beta3(x_d / s_d - k_d + 1)``

  with the uniform cubic B-spline ``beta3``.  It does **not** interpolate the
  control points (it approximates them); it reproduces constant and linear
  fields exactly.

The field is evaluated separably: for every axis a small dense weight matrix
``W_d[x, k] = beta3(x / s_d - k + 1)`` (``N_d x K_d``, mostly zeros) is built
once with numpy, and the control points are contracted with one matrix per
axis (``tensordot``).  This is exact for every image size and spacing,
differentiable, and costs ``O(N K)`` per axis instead of a per-pixel loop.
Derivatives of the field (used by the bending-energy regulariser) use the same
machinery with the derivatives of ``beta3``.
"""

import math

import numpy as np
import tensorflow as tf

__all__ = [
    "control_grid_shape",
    "bspline_displacement",
    "bspline_derivative",
    "cubic_bspline",
    "normalize_spacing",
]


def normalize_spacing(grid_spacing, ndim):
    """Return ``grid_spacing`` as a tuple of ``ndim`` positive Python ints.

    Parameters
    ----------
    grid_spacing : int or sequence of ints
        One spacing for all axes, or one per axis (pixels).
    ndim : int
        Number of spatial axes.

    Raises
    ------
    ValueError
        If the spacing is not a positive integer or has the wrong length.
    """
    if isinstance(grid_spacing, (int, np.integer)) and not isinstance(grid_spacing, bool):
        spacing = (int(grid_spacing),) * ndim
    else:
        try:
            spacing = tuple(grid_spacing)
        except TypeError:
            raise ValueError(
                f"grid_spacing must be a positive int or a tuple of {ndim} positive ints, "
                f"got {grid_spacing!r}"
            ) from None
        if len(spacing) != ndim:
            raise ValueError(
                f"grid_spacing {grid_spacing!r} has {len(spacing)} entries but the image has "
                f"{ndim} spatial axes"
            )
    out = []
    for s in spacing:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or int(s) < 1:
            if isinstance(s, float) and s.is_integer() and s >= 1:
                out.append(int(s))
                continue
            raise ValueError(
                f"grid_spacing must contain positive integers (pixels), got {grid_spacing!r}"
            )
        out.append(int(s))
    return tuple(out)


def _normalize_shape(image_shape):
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
        Spatial size of the image, ``(H, W)`` or ``(D, H, W)``.
    grid_spacing : int or sequence of int
        Control-point spacing in pixels, one for all axes or one per axis.

    Returns
    -------
    tuple of int
        ``K_d = ceil((N_d - 1) / s_d) + 3`` for every axis.
    """
    shape = _normalize_shape(image_shape)
    spacing = normalize_spacing(grid_spacing, len(shape))
    return tuple(int(math.ceil((n - 1) / s)) + 3 for n, s in zip(shape, spacing))


def cubic_bspline(t, derivative=0):
    """Uniform cubic B-spline ``beta3`` (or its 1st/2nd derivative), numpy.

    Parameters
    ----------
    t : array_like
        Evaluation points.
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


def _axis_weights(size, spacing, num_points, derivative=0):
    """``W[x, k] = d^m/dx^m beta3(x / s - k + 1)`` as float64 ``[size, num_points]``."""
    x = np.arange(size, dtype=np.float64)[:, None]
    k = np.arange(num_points, dtype=np.float64)[None, :]
    return cubic_bspline(x / spacing - k + 1.0, derivative) / float(spacing) ** derivative


def _apply_separable(control_points, weights):
    """Contract ``control_points [B, *K, C]`` with one ``[N_d, K_d]`` matrix per axis."""
    out = control_points
    ndim = len(weights)
    for d, w in enumerate(weights):
        w = tf.constant(w, dtype=out.dtype)
        # Contract axis (1 + d) of `out` with axis 1 of w; the new axis goes last.
        out = tf.tensordot(out, w, axes=[[1 + d], [1]])
        # out: [B, (axes != d in order...), C, N_d]; move N_d back to position 1 + d.
        rank = ndim + 2
        perm = list(range(rank - 1))
        perm.insert(1 + d, rank - 1)
        out = tf.transpose(out, perm)
    return out


def bspline_displacement(control_points, image_shape, grid_spacing):
    """Dense displacement field of a cubic B-spline control grid.

    Parameters
    ----------
    control_points : Tensor ``[B, *K, ndim]``, float
        Control-point displacements in pixels (ij order), ``K =
        control_grid_shape(image_shape, grid_spacing)``.
    image_shape : sequence of int
        Spatial size ``(H, W)`` or ``(D, H, W)`` of the dense field.
    grid_spacing : int or sequence of int
        Control-point spacing in pixels (any positive integer per axis).

    Returns
    -------
    Tensor ``[B, *image_shape, ndim]``, same dtype as ``control_points``:
    ``u(x) = sum_k c_k prod_d beta3(x_d / s_d - k_d + 1)``.

    Raises
    ------
    ValueError
        If the control grid does not match ``control_grid_shape``.
    """
    shape = _normalize_shape(image_shape)
    control_points = tf.convert_to_tensor(control_points)
    last = control_points.shape[-1] if control_points.shape.rank else None
    if last is not None and last != len(shape):
        raise ValueError(
            f"control_points must have shape [B, *K, {len(shape)}] (one displacement component "
            f"per spatial axis of image_shape {shape}), got {control_points.shape}"
        )
    return bspline_derivative(control_points, shape, grid_spacing, orders=None)


def bspline_derivative(control_points, image_shape, grid_spacing, orders=None):
    """A partial derivative of the B-spline field, evaluated exactly at the pixels.

    Parameters
    ----------
    control_points : Tensor ``[B, *K, C]``, float
        Control-point values (``C`` components, usually ``ndim``).
    image_shape : sequence of int
        Spatial size of the dense field.
    grid_spacing : int or sequence of int
        Control-point spacing in pixels.
    orders : sequence of int or None
        Derivative order (0, 1 or 2) along each spatial axis; ``None`` means
        all zeros (the field itself).  Derivatives are per pixel, e.g.
        ``orders=(1, 0)`` is ``du/dx_0``.

    Returns
    -------
    Tensor ``[B, *image_shape, C]``.
    """
    shape = _normalize_shape(image_shape)
    ndim = len(shape)
    spacing = normalize_spacing(grid_spacing, ndim)
    grid = control_grid_shape(shape, spacing)
    if orders is None:
        orders = (0,) * ndim
    orders = tuple(int(o) for o in orders)
    if len(orders) != ndim or any(o not in (0, 1, 2) for o in orders):
        raise ValueError(f"orders must be {ndim} ints in (0, 1, 2), got {orders!r}")
    control_points = tf.convert_to_tensor(control_points)
    if not control_points.dtype.is_floating:
        control_points = tf.cast(control_points, tf.float32)
    rank = control_points.shape.rank
    if rank is not None and rank != ndim + 2:
        raise ValueError(
            f"control_points must have shape [B, {', '.join(map(str, grid))}, C] for "
            f"image_shape {shape} and grid_spacing {spacing}, got {control_points.shape}"
        )
    expected = (None,) + grid
    got = control_points.shape.as_list()[: ndim + 1]
    if any(e is not None and g is not None and e != g for e, g in zip(expected, got)):
        raise ValueError(
            f"control_points must have shape [B, {', '.join(map(str, grid))}, C] "
            f"(control_grid_shape({shape}, {spacing})), got {control_points.shape}"
        )
    weights = [
        _axis_weights(n, s, k, o) for n, s, k, o in zip(shape, spacing, grid, orders)
    ]
    return _apply_separable(control_points, weights)
