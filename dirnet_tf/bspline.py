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
once with numpy (:func:`dirnet_tf.spline_np.axis_basis`; the basis, the grid
rule :func:`~dirnet_tf.spline_np.control_grid_shape` and the spacing rule
:func:`~dirnet_tf.spline_np.normalize_spacing` live in :mod:`dirnet_tf.spline_np`,
the one numpy spline), and the control points are contracted with one matrix per
axis (:func:`contract_separable`: broadcast matmuls, no transposes).  This is exact for every image size and spacing,
differentiable, and costs ``O(N K)`` per axis instead of a per-pixel loop.
Derivatives of the field (used by the bending-energy regulariser) use the same
machinery with the derivatives of ``beta3``.
"""

import numpy as np
import tensorflow as tf

from dirnet_tf.spline_np import axis_basis, control_grid_shape, normalize_image_shape, normalize_spacing

__all__ = [
    "bspline_displacement",
    "bspline_derivative",
    "INJECTIVITY_BOUND",
    "injectivity_bound",
    "bounded_control_points",
    "bspline_jacobian_determinant",
    "map_determinant",
    "contract_separable",
]


def contract_separable(values, matrices):
    """Contract axes ``1..n`` of ``values [B, K_1, ..., K_n, C]`` with one ``[N_d, K_d]`` matrix each.

    Returns ``[B, N_1, ..., N_n, C]`` with ``out[b, i, ..., c] = sum_k W_1[i_1, k_1] ... W_n[i_n, k_n]
    values[b, k, ..., c]``, without a transpose forward or backward: axis ``d < n`` is one
    broadcast matmul of ``W_d`` with ``values`` reshaped to ``[B N_1 ... N_{d-1}, K_d, K_{d+1} ...
    K_n C]``; the last axis, whose rows would be only ``C`` long, is one plain matmul of ``[B N_1
    ... N_{n-1}, K_n C]`` with ``(W_n kron I_C)^T``.  ``matrices`` may be numpy arrays or tensors
    (static shapes); the spatial sizes and ``C`` of ``values`` must be static.
    """
    out = tf.convert_to_tensor(values)
    n = len(matrices)
    sizes = out.shape.as_list()[1:]  # [K_1, ..., K_n, C]
    if out.shape.rank != n + 2 or any(k is None for k in sizes):
        raise ValueError(f"values must be [B, K_1, ..., K_{n}, C] with static K and C, got {out.shape}")
    channels = sizes[-1]
    for d, w in enumerate(matrices):
        if d < n - 1:
            w = tf.convert_to_tensor(w, dtype=out.dtype)
            out = tf.matmul(w, tf.reshape(out, [-1, sizes[d], int(np.prod(sizes[d + 1:]))]))
        else:
            if isinstance(w, np.ndarray):
                kron = tf.constant(np.kron(w, np.eye(channels)).T, dtype=out.dtype)
            else:
                eye = tf.eye(channels, dtype=out.dtype)
                kron = tf.reshape(tf.einsum("jl,cd->lcjd", tf.cast(w, out.dtype), eye),
                                  [w.shape[1] * channels, w.shape[0] * channels])
            out = tf.matmul(tf.reshape(out, [-1, sizes[d] * channels]), kron)
        sizes[d] = int(w.shape[0])
    return tf.reshape(out, [-1] + sizes)


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
    shape = normalize_image_shape(image_shape)
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
    shape = normalize_image_shape(image_shape)
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
        axis_basis(np.arange(n), s, k, o) for n, s, k, o in zip(shape, spacing, grid, orders)
    ]
    return contract_separable(control_points, weights)


# ---------------------------------------------------------------------------
# Folding-free fields: a bound on the control points, and det(I + Du).
# ---------------------------------------------------------------------------
#
# Where the constants in INJECTIVITY_BOUND come from
# ---------------------------------------------------
# The Jacobian of the map x -> x + u(x) is I + Du with
#
#     du_a/dx_b (x) = sum_k c_{k,a} d/dx_b prod_d beta3(x_d / s_d - k_d + 1).
#
# Conjugating with diag(s) leaves the determinant unchanged and turns the
# problem into the unit-spacing one with normalised coefficients c_{k,a} / s_a,
# so a per-axis bound |c_{k,a}| <= K * s_a covers anisotropic grids too.
#
# One axis at a time: in a cell with local coordinate t in [0, 1) the four
# active basis derivatives satisfy sum_i |beta3'(t - i + 1)| = 1 + 2t - 2t^2
# <= 3/2 (at t = 1/2), and the weights of the other axes are positive and sum
# to 1, so every normalised entry obeys |du_a/dx_b| * s_b / s_a <= 1.5 K.
# Asking for ||Du||_inf < 1 only gives K < 1/3 (2-D) and K < 2/9 (3-D): too
# pessimistic, because one control grid cannot make all entries extreme at
# the same time.
#
# Sharp constant: at a fixed point, row a of Du depends only on the a-th
# components c_{., a}, and det(I + Du) is affine in each row.  Over the box
# |c| <= K the minimum is therefore reached at c = +-K, and row a ranges over
# the zonotope K * {sum_k s_k grad phi_k(x) : |s_k| <= 1}.  Minimising the
# determinant over these zonotopes at every point of a cell (2-D: exactly, by
# enumerating the zonotope vertices; 3-D: exact row-by-row minimisation,
# alternated from many starts) and bisecting on K gives the threshold K* below
# which det(I + Du) > 0 everywhere and above which some admissible control
# grid folds (a box-constrained L-BFGS-B search over all control points of
# one cell, from random starts, found nothing worse):
#
#     2-D: K* = 0.488665 = 1 / 2.04639, worst point t = (0.2448, 0.2448)
#     3-D: K* = 0.403312 = 1 / 2.47947, worst point t = (0.1641, 0.1641, 0.1641)
#
# (up to the symmetries t -> 1 - t and axis permutations).  These are the
# constants of Choi & Lee, "Injectivity conditions of 2D and 3D uniform cubic
# B-spline functions", Graphical Models 62 (2000) 411-427, so their box
# condition is sharp.  Rueckert et al. (2006, diffeomorphic registration with
# B-splines) use the 3-D one, rounded to 0.4 of the spacing.
#
# Adopted: 0.48 (2-D) and 0.40 (3-D), 1.8 % and 0.8 % below K*.  At these
# values the smallest det(I + Du) over all points and all admissible control
# grids is 0.0177 (2-D) and 0.0082 (3-D), far above float32 round-off.
# Sign patterns that minimise det at one pixel fold the field at that pixel
# once |c| / s exceeds 0.48871 (2-D, spacing 4 and 8), 0.40349 (3-D, spacing 8)
# and 0.40416 (3-D, spacing 4), i.e. at most 0.3 % above K*.  The bound is a
# sufficient condition: most fields that violate it are still injective.

#: Per-axis bound on control-point displacements, as a fraction of the grid
#: spacing, that guarantees ``det(I + Du) > 0`` everywhere (keyed by ndim).
INJECTIVITY_BOUND = {2: 0.48, 3: 0.40}


def injectivity_bound(grid_spacing, ndim):
    """Largest control-point displacement per axis that keeps the map folding-free.

    If every control point satisfies ``|c_a| <= injectivity_bound(s, ndim)[a]``
    the map ``x -> x + u(x)`` has ``det(I + Du) > 0`` at every point (see the
    comment block above :data:`INJECTIVITY_BOUND`).

    Parameters
    ----------
    grid_spacing : int or sequence of int
        Control-point spacing in pixels, one for all axes or one per axis.
    ndim : int
        Number of spatial axes, 2 or 3.

    Returns
    -------
    tuple of float
        ``INJECTIVITY_BOUND[ndim] * s_a`` in pixels, one per axis (ij order).
    """
    if ndim not in INJECTIVITY_BOUND:
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    spacing = normalize_spacing(grid_spacing, ndim)
    return tuple(INJECTIVITY_BOUND[ndim] * float(s) for s in spacing)


def bounded_control_points(raw, grid_spacing, ndim, margin=0.99):
    """Squash unconstrained regressor outputs into the injectivity bound.

    ``c_a = L_a * tanh(raw_a / L_a)`` with ``L_a = margin *
    injectivity_bound(grid_spacing, ndim)[a]``: smooth, odd, equal to the
    identity to first order near 0 (slope 1), and ``|c_a| <= L_a`` for every
    input, so the B-spline field of the result is folding-free.

    Parameters
    ----------
    raw : Tensor ``[B, *K, ndim]``, float
        Unconstrained control-point displacements in pixels (ij order).
    grid_spacing : int or sequence of int
        Control-point spacing in pixels.
    ndim : int
        Number of spatial axes, 2 or 3.
    margin : float
        Fraction of the bound to use, in ``(0, 1]``.  Below 1 the result
        stays strictly inside the bound even where ``tanh`` rounds to +-1
        (about ``|raw| > 9 L`` in float32).

    Returns
    -------
    Tensor of the same shape and dtype as ``raw`` (integer input becomes
    float32), in pixels.  Differentiable; the gradient is finite (it tends
    to 0) for huge inputs.
    """
    margin = float(margin)
    if not 0.0 < margin <= 1.0:
        raise ValueError(f"margin must be in (0, 1], got {margin!r}")
    raw = tf.convert_to_tensor(raw)
    if not raw.dtype.is_floating:
        raw = tf.cast(raw, tf.float32)
    last = raw.shape[-1] if raw.shape.rank else None
    bad_last = last is not None and last != ndim
    if raw.shape.rank is not None and (raw.shape.rank != ndim + 2 or bad_last):
        raise ValueError(
            f"raw must have shape [B, *control_grid, {ndim}] for ndim={ndim}, got {raw.shape}"
        )
    limit = tf.constant(
        [margin * b for b in injectivity_bound(grid_spacing, ndim)], dtype=raw.dtype
    )
    return limit * tf.tanh(raw / limit)


def bspline_jacobian_determinant(control_points, image_shape, grid_spacing):
    """``det(I + Du)`` of the B-spline map ``x -> x + u(x)`` at every pixel.

    Computed analytically from the first derivatives of the spline
    (:func:`bspline_derivative`), not by finite differences.

    Parameters
    ----------
    control_points : Tensor ``[B, *K, ndim]``, float
        Control-point displacements in pixels (ij order), ``K =
        control_grid_shape(image_shape, grid_spacing)``.
    image_shape : sequence of int
        Spatial size ``(H, W)`` or ``(D, H, W)``.
    grid_spacing : int or sequence of int
        Control-point spacing in pixels.

    Returns
    -------
    Tensor ``[B, *image_shape]`` (dimensionless; local volume change).
    Values ``<= 0`` mark folding; 1 means no volume change.
    """
    shape = normalize_image_shape(image_shape)
    ndim = len(shape)
    control_points = tf.convert_to_tensor(control_points)
    last = control_points.shape[-1] if control_points.shape.rank else None
    if last is not None and last != ndim:
        raise ValueError(
            f"control_points must have shape [B, *K, {ndim}] for image_shape {shape}, "
            f"got {control_points.shape}"
        )
    return map_determinant([
        bspline_derivative(
            control_points, shape, grid_spacing, orders=tuple(int(d == b) for d in range(ndim))
        )
        for b in range(ndim)
    ])


def map_determinant(derivatives):
    """``det(I + Du)`` from the derivatives of a displacement field, written out explicitly.

    Parameters
    ----------
    derivatives : list of ``ndim`` Tensors ``[..., ndim]``
        ``derivatives[b][..., a] = du_a / dx_b`` (2 or 3 axes).

    Returns
    -------
    Tensor ``[...]`` (its gradient stays finite where the Jacobian is singular).
    """
    ndim = len(derivatives)
    # unstack, not [..., a]: its gradient stacks instead of padding every slice to the full size
    parts = [tf.unstack(d, num=ndim, axis=-1) for d in derivatives]
    j = [[parts[b][a] + (1.0 if a == b else 0.0) for b in range(ndim)] for a in range(ndim)]
    if ndim == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )
