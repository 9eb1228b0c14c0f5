"""Similarity losses and deformation regularisers (TensorFlow, differentiable).

Every function here is pure (no state, no ``add_loss``): it maps tensors to a
value **to minimise**.  The similarity losses take ``(fixed, warped)`` in the
Keras ``(y_true, y_pred)`` order, images ``[B, *spatial, C]``.

* :func:`ncc_loss` -- ``-NCC`` (global normalised cross-correlation per pair,
  signed, the paper's objective), in ``[-1, 1]``; ``-1`` is a perfect match.
* :func:`local_ncc_loss` -- ``-`` the mean windowed (local) NCC.
* :func:`mse_loss` -- mean squared error.
* :func:`bending_energy` -- bending energy of the cubic B-spline field,
  computed exactly at the pixels from the control points.
* :func:`folding_penalty` -- mean of ``relu(epsilon - det J)`` with ``J`` the
  finite-difference Jacobian of ``x + u(x)``.
* :func:`inverse_consistency_loss` -- mean residual (pixels) of composing the
  a -> b and b -> a fields, both ways round.

:func:`registration_objective` combines them into the per-pair objective that
:class:`dirnet_tf.DIRNet` (and so the trainer and ``model.fit``) minimises.

``reduction="mean"`` (default) averages over the batch to a scalar;
``reduction="none"`` returns one value per pair ``[B]``.  All are finite for
constant images (the correlation of a constant image is defined as 0).
"""

import itertools

import numpy as np
import tensorflow as tf

from dirnet_tf.bspline import bspline_derivative, map_determinant
from dirnet_tf.warping import compose_displacements

__all__ = [
    "ncc",
    "ncc_loss",
    "local_ncc",
    "local_ncc_loss",
    "mse_loss",
    "bending_energy",
    "jacobian_determinant",
    "folding_penalty",
    "inverse_consistency_loss",
    "SIMILARITIES",
    "get",
    "registration_objective",
]


def _reduce(values, reduction):
    if reduction == "mean":
        return tf.reduce_mean(values)
    if reduction in ("none", None):
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _pair(fixed, warped):
    fixed = tf.convert_to_tensor(fixed)
    warped = tf.convert_to_tensor(warped)
    if not fixed.dtype.is_floating:
        fixed = tf.cast(fixed, tf.float32)
    warped = tf.cast(warped, fixed.dtype)
    if fixed.shape.rank is not None and fixed.shape.rank < 3:
        raise ValueError(f"images must be [B, *spatial, C], got fixed {fixed.shape}")
    if not fixed.shape.is_compatible_with(warped.shape):
        raise ValueError(
            f"fixed and warped must have the same shape, got {fixed.shape} and {warped.shape}"
        )
    return fixed, warped


def ncc(fixed, warped, eps=1e-5):
    """Global normalised cross-correlation of every pair.

    Parameters
    ----------
    fixed, warped : Tensor ``[B, *spatial, C]``
        Statistics are taken over all pixels and channels of a pair.
    eps : float
        Added to the product of the variances:
        ``ncc = cov / sqrt(var_f * var_w + eps)``; a constant image gives 0.

    Returns
    -------
    Tensor ``[B]`` in ``[-1, 1]``.
    """
    fixed, warped = _pair(fixed, warped)
    axes = list(range(1, fixed.shape.rank))
    f = fixed - tf.reduce_mean(fixed, axis=axes, keepdims=True)
    w = warped - tf.reduce_mean(warped, axis=axes, keepdims=True)
    cov = tf.reduce_mean(f * w, axis=axes)
    var_f = tf.reduce_mean(f * f, axis=axes)
    var_w = tf.reduce_mean(w * w, axis=axes)
    return cov / tf.sqrt(var_f * var_w + eps)


def ncc_loss(fixed, warped, eps=1e-5, reduction="mean"):
    """``-ncc(fixed, warped)`` (the paper's similarity, to minimise).

    Parameters
    ----------
    fixed, warped : Tensor ``[B, *spatial, C]``.
    eps : float
        See :func:`ncc`.
    reduction : ``"mean"`` (scalar) or ``"none"`` (``[B]``).
    """
    return _reduce(-ncc(fixed, warped, eps), reduction)


def _box_mean(x, window):
    """Mean over a ``window`` box centred on every pixel, boxes cut at the border.

    float32/float16 use ``tf.nn.avg_pool`` (``"SAME"`` padding excludes the
    padding from the average); other dtypes (float64 has no 3-D CPU kernel)
    use separable cumulative sums with the same box placement.
    """
    ndim = x.shape.rank - 2
    if x.dtype in (tf.float32, tf.float16, tf.bfloat16):
        if ndim == 2:
            return tf.nn.avg_pool2d(x, ksize=window, strides=1, padding="SAME",
                                    data_format="NHWC")
        return tf.nn.avg_pool3d(x, ksize=window, strides=1, padding="SAME", data_format="NDHWC")
    for d, w in enumerate(window):
        axis = 1 + d
        n = x.shape[axis]
        before = (w - 1) // 2
        pads = [[0, 0]] * x.shape.rank
        pads[axis] = [before + 1, w - 1 - before]
        csum = tf.cumsum(tf.pad(x, pads), axis=axis)
        upper = [slice(None)] * x.shape.rank
        lower = [slice(None)] * x.shape.rank
        upper[axis] = slice(w, w + n)
        lower[axis] = slice(0, n)
        # Number of in-image pixels in each box (static).
        idx = np.arange(n)
        count = np.minimum(idx - before + w, n) - np.maximum(idx - before, 0)
        shape = [1] * x.shape.rank
        shape[axis] = n
        count = tf.constant(count.reshape(shape), x.dtype)
        x = (csum[tuple(upper)] - csum[tuple(lower)]) / count
    return x


def local_ncc(fixed, warped, window=9, eps=1e-5):
    """Mean windowed NCC of every pair.

    For every pixel and channel the correlation is taken over a
    ``window``-sized box centred on it (boxes are cut at the image border), as
    ``cov / sqrt(var_f * var_w + eps)``, then averaged over pixels and
    channels.

    Parameters
    ----------
    fixed, warped : Tensor ``[B, *spatial, C]`` with 2 or 3 spatial axes.
    window : int or sequence of int
        Box size per axis (odd sizes centre the box).
    eps : float
        Stabiliser; windows where either image is constant contribute 0.

    Returns
    -------
    Tensor ``[B]``.
    """
    fixed, warped = _pair(fixed, warped)
    ndim = fixed.shape.rank - 2
    if ndim not in (2, 3):
        raise ValueError(f"local_ncc needs 2-D or 3-D images, got shape {fixed.shape}")
    if isinstance(window, int):
        window = [window] * ndim
    window = [int(w) for w in window]
    if len(window) != ndim or any(w < 1 for w in window):
        raise ValueError(f"window must be a positive int or {ndim} positive ints, got {window}")
    mu_f = _box_mean(fixed, window)
    mu_w = _box_mean(warped, window)
    var_f = tf.nn.relu(_box_mean(fixed * fixed, window) - mu_f * mu_f)
    var_w = tf.nn.relu(_box_mean(warped * warped, window) - mu_w * mu_w)
    cov = _box_mean(fixed * warped, window) - mu_f * mu_w
    local = cov / tf.sqrt(var_f * var_w + eps)
    return tf.reduce_mean(local, axis=list(range(1, ndim + 2)))


def local_ncc_loss(fixed, warped, window=9, eps=1e-5, reduction="mean"):
    """``-local_ncc(fixed, warped)``.

    Parameters
    ----------
    fixed, warped : Tensor ``[B, *spatial, C]``.
    window : int or sequence of int
        Box size.
    eps : float
        See :func:`local_ncc`.
    reduction : ``"mean"`` or ``"none"``.
    """
    return _reduce(-local_ncc(fixed, warped, window, eps), reduction)


def mse_loss(fixed, warped, reduction="mean"):
    """Mean squared intensity difference per pair.

    Parameters
    ----------
    fixed, warped : Tensor ``[B, *spatial, C]``.
    reduction : ``"mean"`` or ``"none"``.
    """
    fixed, warped = _pair(fixed, warped)
    values = tf.reduce_mean(tf.square(fixed - warped), axis=list(range(1, fixed.shape.rank)))
    return _reduce(values, reduction)


def bending_energy(control_points, image_shape, grid_spacing, reduction="mean"):
    """Bending energy of the cubic B-spline displacement field.

    ``mean_x sum_c sum_{d,e} (d^2 u_c / dx_d dx_e)^2`` over the pixels of the
    image, with the second derivatives of the B-spline evaluated exactly (not
    by finite differences); units pixel^-2 * pixel^2.  Affine fields have zero
    bending energy.

    Parameters
    ----------
    control_points : Tensor ``[B, *K, ndim]``.
    image_shape : sequence of int
        Spatial size of the dense field.
    grid_spacing : int or sequence of int
        Control-point spacing in pixels.
    reduction : ``"mean"`` or ``"none"``.
    """
    ndim = len(tuple(image_shape))
    total = None
    for d, e in itertools.combinations_with_replacement(range(ndim), 2):
        orders = [0] * ndim
        orders[d] += 1
        orders[e] += 1
        deriv = bspline_derivative(control_points, image_shape, grid_spacing, orders)
        term = tf.reduce_sum(tf.square(deriv), axis=-1) * (1.0 if d == e else 2.0)
        total = term if total is None else total + term
    values = tf.reduce_mean(total, axis=list(range(1, ndim + 1)))
    return _reduce(values, reduction)


def _np_gradient(x, axis):
    """``np.gradient`` along ``axis`` (unit spacing, first-order edges), TF."""
    n = x.shape[axis]
    if n is None or n < 2:
        raise ValueError(f"need at least 2 samples along axis {axis} for a gradient, got {x.shape}")

    def sl(start, stop):
        index = [slice(None)] * x.shape.rank
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    first = sl(1, 2) - sl(0, 1)
    last = sl(n - 1, n) - sl(n - 2, n - 1)
    if n == 2:
        return tf.concat([first, last], axis=axis)
    interior = (sl(2, n) - sl(0, n - 2)) * 0.5
    return tf.concat([first, interior, last], axis=axis)


def jacobian_determinant(displacement):
    """Jacobian determinant of ``x + u(x)`` per pixel (TF, differentiable).

    Derivatives are central differences, one-sided at the edges (like
    ``np.gradient``); the determinant is written out explicitly (its gradient
    stays finite where the Jacobian is singular).

    Parameters
    ----------
    displacement : Tensor ``[B, *spatial, ndim]`` (pixels, ij order).

    Returns
    -------
    Tensor ``[B, *spatial]``.
    """
    displacement = tf.convert_to_tensor(displacement)
    rank = displacement.shape.rank
    ndim = displacement.shape[-1]
    if rank not in (4, 5) or ndim != rank - 2:
        raise ValueError(
            f"displacement must be [B, H, W, 2] or [B, D, H, W, 3], got {displacement.shape}"
        )
    return map_determinant([_np_gradient(displacement, 1 + d) for d in range(ndim)])


def folding_penalty(displacement, epsilon=0.0, reduction="mean"):
    """Penalty on folding: ``mean_x relu(epsilon - det J(x))`` per pair.

    Parameters
    ----------
    displacement : Tensor ``[B, *spatial, ndim]``.
    epsilon : float
        Margin: determinants below it are penalised (0 penalises only folds).
        With ``epsilon=0`` a pixel with ``det J`` exactly 0 (a collapse, which
        :func:`dirnet_tf.metrics.folding_fraction` counts as folding) costs 0
        and gets zero gradient; use ``epsilon > 0`` to push such pixels back.
    reduction : ``"mean"`` or ``"none"``.
    """
    det = jacobian_determinant(displacement)
    values = tf.reduce_mean(tf.nn.relu(epsilon - det), axis=list(range(1, det.shape.rank)))
    return _reduce(values, reduction)


def inverse_consistency_loss(forward, backward, reduction="mean"):
    """Mean residual of composing the a -> b and b -> a fields (0 = inverse consistent).

    ``forward`` registers a to b (``x -> x + forward(x)`` samples b), ``backward`` b to
    a; ``x + forward(x) + backward(x + forward(x))`` and ``x + backward(x) + forward(x +
    backward(x))`` should both be ``x``.  The value is the mean over pixels of the two
    residual lengths, averaged (a smooth norm, ``sqrt(r . r + 1e-6)``), in pixels: the
    quantity :func:`dirnet_tf.metrics.inverse_consistency` reports, made symmetric and
    differentiable (the field applied second is interpolated multilinearly, edge values
    outside, as there).

    Parameters
    ----------
    forward, backward : Tensor ``[B, *spatial, ndim]`` (pixels, ij), the fields of the
        same pairs in the two directions.
    reduction : ``"mean"`` or ``"none"``.
    """
    forward = tf.cast(forward, tf.float32)
    backward = tf.cast(backward, tf.float32)
    if forward.shape.rank not in (4, 5) or forward.shape[-1] != forward.shape.rank - 2:
        raise ValueError(f"fields must be [B, H, W, 2] or [B, D, H, W, 3], got {forward.shape}")
    if forward.shape != backward.shape:
        raise ValueError(f"forward {forward.shape} and backward {backward.shape} fields differ in shape")
    axes = list(range(1, forward.shape.rank - 1))

    def mean_length(residual):
        return tf.reduce_mean(tf.sqrt(tf.reduce_sum(tf.square(residual), axis=-1) + 1e-6), axis=axes)

    values = 0.5 * (mean_length(compose_displacements(backward, forward))
                    + mean_length(compose_displacements(forward, backward)))
    return _reduce(values, reduction)


# Similarity losses by name: the names of the ``--similarity`` flag.
SIMILARITIES = {"ncc": ncc_loss, "lncc": local_ncc_loss, "mse": mse_loss}
# Spelling accepted from configs saved before "lncc" was the only name.
_RENAMED = {"local_ncc": "lncc"}


def get(identifier):
    """Similarity loss by name (``"ncc"``, ``"lncc"`` -- local NCC, ``"mse"``) or a callable.

    Parameters
    ----------
    identifier : str or callable ``(fixed, warped, reduction=...) -> loss``.
    """
    if callable(identifier):
        return identifier
    try:
        return SIMILARITIES[_RENAMED.get(identifier, identifier)]
    except KeyError:
        raise ValueError(
            f"unknown similarity {identifier!r}; use one of {sorted(SIMILARITIES)} or a callable"
        ) from None


def registration_objective(similarity="ncc", bending_weight=0.0, folding_weight=0.0,
                           image_shape=None, grid_spacing=None, step_spacings=None,
                           inverse_consistency_weight=0.0):
    """The per-pair registration objective (what DIRNet minimises).

    ``loss = similarity(fixed, warped) + bending_weight * bending_energy(control_points)
    + folding_weight * folding_penalty(displacement)``, in float32.

    Parameters
    ----------
    similarity : str or callable
        A name of :data:`SIMILARITIES` or ``(fixed, warped, reduction="none") -> [B]``.
    bending_weight, folding_weight : float
        Regulariser weights (0 = the paper's setting; a term with weight 0 is not computed).
    image_shape, grid_spacing
        Needed when ``bending_weight > 0``.
    step_spacings : list or None
        For a model of several B-spline steps (``outputs["control_point_steps"]``):
        the grid spacing of each step; the bending term is then the sum of the
        bending energies of the steps.
    inverse_consistency_weight : float
        Weight of :func:`inverse_consistency_loss` between ``outputs["displacement"]``
        and ``outputs["inverse"]["displacement"]``.  When the outputs hold
        ``"inverse"`` (the same pairs registered the other way round, as
        :class:`dirnet_tf.DIRNet` returns in training with this weight), the other
        terms are the means of the two directions.

    Returns
    -------
    callable
        ``objective(fixed, outputs) -> (per_pair_loss [B], {name: per_pair_value [B]})``
        where ``outputs`` is the model's dict (``warped``, and ``control_points`` /
        ``displacement`` for the regularisers); the parts are ``similarity``, ``ncc``
        (always, for monitoring) and ``bending_energy`` / ``folding_penalty`` /
        ``inverse_consistency`` when weighted.
    """
    sim_fn = get(similarity)
    if bending_weight and (image_shape is None or grid_spacing is None):
        raise ValueError("bending_weight > 0 needs image_shape and grid_spacing")

    def objective(fixed, outputs):
        total, parts = one_direction(fixed, outputs)
        inverse = outputs.get("inverse") if isinstance(outputs, dict) else None
        if inverse is None:
            return total, parts
        total_b, parts_b = one_direction(inverse["fixed"], inverse)
        total = 0.5 * (total + total_b)
        parts = {k: 0.5 * (v + parts_b[k]) for k, v in parts.items()}
        if inverse_consistency_weight:
            ic = inverse_consistency_loss(outputs["displacement"], inverse["displacement"], reduction="none")
            parts["inverse_consistency"] = ic
            total = total + inverse_consistency_weight * ic
        return total, parts

    def one_direction(fixed, outputs):
        fixed = tf.cast(fixed, tf.float32)
        warped = tf.cast(outputs["warped"], tf.float32)
        values = sim_fn(fixed, warped, reduction="none")
        parts = {"similarity": values, "ncc": ncc(fixed, warped)}
        total = values
        if bending_weight and step_spacings is not None:
            be = tf.add_n([bending_energy(tf.cast(points, tf.float32), image_shape, spacing, reduction="none")
                           for points, spacing in zip(outputs["control_point_steps"], step_spacings)])
            parts["bending_energy"] = be
            total = total + bending_weight * be
        elif bending_weight:
            be = bending_energy(tf.cast(outputs["control_points"], tf.float32), image_shape,
                                grid_spacing, reduction="none")
            parts["bending_energy"] = be
            total = total + bending_weight * be
        if folding_weight:
            fp = folding_penalty(tf.cast(outputs["displacement"], tf.float32), reduction="none")
            parts["folding_penalty"] = fp
            total = total + folding_weight * fp
        return total, parts

    return objective
