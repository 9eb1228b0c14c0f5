"""Similarity losses and deformation regularisers (TensorFlow, differentiable).

Every function here is pure (no state, no ``add_loss``): it maps tensors to a
value **to minimise**.  The similarity losses take ``(fixed, warped)`` in the
Keras ``(y_true, y_pred)`` order, images ``[B, *spatial, C]``.

* :func:`ncc_loss` -- ``-NCC`` (global normalised cross-correlation per pair,
  signed, the paper's objective), in ``[-1, 1]``; ``-1`` is a perfect match.
* :func:`local_ncc_loss` -- ``-`` the mean windowed (local) NCC.
* :func:`mse_loss` -- mean squared error.
* :func:`mi_loss` -- ``-`` the Parzen-window mutual information
  (:func:`mutual_information`, nats), for pairs of different contrast.
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
    "mutual_information",
    "mi_loss",
    "bending_energy",
    "jacobian_determinant",
    "folding_penalty",
    "folding_penalty_of",
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


def _mi_inputs(fixed, warped, mask):
    """``fixed``, ``warped`` flattened to ``[B, N]`` and the voxel weights ``[B, N]``."""
    fixed, warped = _pair(fixed, warped)
    dtype = tf.float64 if fixed.dtype == tf.float64 else tf.float32
    fixed = tf.cast(fixed, dtype)
    warped = tf.cast(warped, dtype)
    if mask is None:
        weights = tf.ones_like(fixed)
    else:
        mask = tf.cast(tf.convert_to_tensor(mask), dtype)
        if mask.shape.rank is not None and fixed.shape.rank is not None:
            try:
                if mask.shape.rank != fixed.shape.rank:
                    raise ValueError
                tf.broadcast_static_shape(mask.shape, fixed.shape)
            except ValueError:
                raise ValueError(f"mask {mask.shape} does not broadcast to the images {fixed.shape} "
                                 "(give [B, *spatial, 1] or the images' shape)") from None
        weights = tf.broadcast_to(mask, tf.shape(fixed))
    batch = tf.shape(fixed)[0]
    return (tf.reshape(fixed, [batch, -1]), tf.reshape(warped, [batch, -1]),
            tf.reshape(weights, [batch, -1]))


def _parzen_weights(values, weights, centres, sigma):
    """Per-voxel Gaussian bin weights ``[B, N, bins]``, each voxel's summing to 1 over the bins.

    ``values`` ``[B, N]`` are first mapped to ``[0, 1]`` by their minimum and maximum
    over the voxels of positive weight (held constant for the gradient); a pair
    whose selected voxels are all equal maps to 0.
    """
    inside = weights > 0
    big = tf.constant(np.finfo(values.dtype.as_numpy_dtype).max, values.dtype)
    lo = tf.stop_gradient(tf.reduce_min(tf.where(inside, values, big), axis=1, keepdims=True))
    hi = tf.stop_gradient(tf.reduce_max(tf.where(inside, values, -big), axis=1, keepdims=True))
    span = hi - lo
    has_range = span > 0
    scale = tf.where(has_range, 1.0 / tf.where(has_range, span, tf.ones_like(span)), tf.zeros_like(span))
    lo = tf.where(has_range, lo, tf.zeros_like(lo))  # no selected voxel: lo = +big, keep it finite
    # Voxels outside the mask may fall outside [0, 1]; they have weight 0, clipping keeps them finite.
    unit = tf.clip_by_value((values - lo) * scale, 0.0, 1.0)
    logits = -tf.square(unit[..., None] - centres) / (2.0 * sigma * sigma)
    return tf.nn.softmax(logits, axis=-1)  # exp(logits) / sum over bins, without underflow


def mutual_information(fixed, warped, bins=32, sigma=None, mask=None, eps=1e-10):
    """Mutual information of every pair from Parzen-window (Gaussian) soft histograms, in nats.

    Each image of a pair is flattened (all voxels and channels) and mapped to
    ``[0, 1]`` by its own minimum and maximum over the pair's (selected) voxels;
    the minimum and maximum are held constant for the gradient (``stop_gradient``:
    the gradient is that of the histogram with its intensity range fixed).  Every
    voxel ``n`` spreads a unit weight over ``bins`` evenly spaced bin centres
    ``c_k = k / (bins - 1)`` in ``[0, 1]``:
    ``w_nk = exp(-(x_n - c_k)^2 / (2 sigma^2)) / sum_l exp(-(x_n - c_l)^2 / (2 sigma^2))``.
    The joint histogram is ``P = W_f^T diag(m) W_w / sum(m)`` (``m`` the voxel weights of
    ``mask``, 1 without one), the marginals are its row and column sums, and
    ``MI = sum_ij P_ij (log(P_ij + eps) - log(p_f,i p_w,j + eps))``.

    MI measures statistical dependence, not a linear relation: 0 for independent
    intensities, up to ``log(bins)`` for a deterministic one-to-one relation.  It is
    invariant (up to histogram effects: binning, kernel smoothing, the clipping of
    the kernels at the ends of the range) to any one-to-one intensity remapping of
    either image, monotonic or not, so it suits pairs of different contrast (e.g.
    T1 / T2 MRI) where :func:`ncc` fails.  Larger is more similar.

    Parameters
    ----------
    fixed, warped : Tensor ``[B, *spatial, C]``
        Any spatial shape: 2-D images ``[B, H, W, C]``, 3-D volumes
        ``[B, D, H, W, C]`` or intensity samples at points ``[B, K, C]``; intensities
        in any unit (only their order within the image's range matters to the bins).
    bins : int
        Number of histogram bins (>= 2), default 32.
    sigma : float or None
        Width (standard deviation) of the Gaussian kernel in the normalised
        ``[0, 1]`` intensity unit; default ``None`` = one bin width,
        ``1 / (bins - 1)``.
    mask : Tensor ``[B, *spatial, 1]`` (or the images' shape) or None
        Voxel weights: 0/1 to select voxels, or any non-negative weights.  The
        intensity range is taken over the voxels of positive weight.  A pair with
        no selected voxel gives 0.
    eps : float
        Added inside both logarithms.

    Returns
    -------
    Tensor ``[B]``, nats, float32 (float64 for float64 input).  A constant image (or
    mask selecting equal voxels) gives 0 and a finite gradient.

    Notes
    -----
    Memory: two ``[B, N, bins]`` weight tensors (N voxels x C channels) and their
    gradients, never ``[N, bins, bins]``; the joint histogram is one batched matmul.
    A 96 x 112 x 96 volume with 32 bins needs about 130 MB per weight tensor.
    """
    bins = int(bins)
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    if sigma is None:
        sigma = 1.0 / (bins - 1)
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    fixed, warped, weights = _mi_inputs(fixed, warped, mask)
    dtype = fixed.dtype
    centres = tf.constant(np.linspace(0.0, 1.0, bins), dtype)
    w_fixed = _parzen_weights(fixed, weights, centres, sigma)
    w_warped = _parzen_weights(warped, weights, centres, sigma)
    joint = tf.linalg.matmul(w_fixed * weights[..., None], w_warped, transpose_a=True)  # [B, bins, bins]
    total = tf.reduce_sum(joint, axis=[1, 2], keepdims=True)
    joint = joint / tf.maximum(total, tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype))
    p_fixed = tf.reduce_sum(joint, axis=2, keepdims=True)
    p_warped = tf.reduce_sum(joint, axis=1, keepdims=True)
    terms = joint * (tf.math.log(joint + eps) - tf.math.log(p_fixed * p_warped + eps))
    return tf.reduce_sum(terms, axis=[1, 2])


def mi_loss(fixed, warped, bins=32, sigma=None, reduction="mean", mask=None):
    """``-mutual_information(fixed, warped)`` in nats (to minimise; the ``"mi"`` similarity).

    For pairs of different contrast; see :func:`mutual_information` (values in
    ``[-log(bins), 0]``, lower is more similar).

    Parameters
    ----------
    fixed, warped : Tensor ``[B, *spatial, C]``.
    bins : int
        Histogram bins (default 32).
    sigma : float or None
        Parzen kernel width in the ``[0, 1]`` intensity unit (default one bin width).
    reduction : ``"mean"`` or ``"none"``.
    mask : Tensor ``[B, *spatial, 1]`` or None
        Voxel weights (see :func:`mutual_information`).
    """
    return _reduce(-mutual_information(fixed, warped, bins, sigma, mask), reduction)


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
    """``np.gradient`` along ``axis`` (unit spacing, first-order edges), TF.

    The gradient is written out (the adjoint difference operator, built from slices and one
    concat) instead of left to autodiff, whose slice gradients pad every slice to the full size.
    """
    n = x.shape[axis]
    if n is None or n < 2:
        raise ValueError(f"need at least 2 samples along axis {axis} for a gradient, got {x.shape}")
    rank = x.shape.rank

    def sl(t, start, stop):
        index = [slice(None)] * rank
        index[axis] = slice(start, stop)
        return t[tuple(index)]

    @tf.custom_gradient
    def difference(t):
        first = sl(t, 1, 2) - sl(t, 0, 1)
        last = sl(t, n - 1, n) - sl(t, n - 2, n - 1)
        out = tf.concat([first, last] if n == 2 else [first, (sl(t, 2, n) - sl(t, 0, n - 2)) * 0.5, last],
                        axis=axis)

        def grad(upstream):
            # y_0 = t_1 - t_0, y_i = (t_{i+1} - t_{i-1}) / 2, y_{n-1} = t_{n-1} - t_{n-2}; with
            # g = (y'_0, y'_1 / 2, ..., y'_{n-2} / 2, y'_{n-1}) the adjoint is
            # t'_0 = -g_0 - g_1, t'_j = g_{j-1} - g_{j+1}, t'_{n-1} = g_{n-2} + g_{n-1}.
            if n == 2:
                g = sl(upstream, 0, 1) + sl(upstream, 1, 2)
                return tf.concat([-g, g], axis=axis)
            g = tf.concat([sl(upstream, 0, 1), sl(upstream, 1, n - 1) * 0.5, sl(upstream, n - 1, n)], axis=axis)
            return tf.concat([-sl(g, 0, 1) - sl(g, 1, 2), sl(g, 0, n - 2) - sl(g, 2, n),
                              sl(g, n - 2, n - 1) + sl(g, n - 1, n)], axis=axis)

        return out, grad

    return difference(x)


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
    return folding_penalty_of(jacobian_determinant(displacement), epsilon, reduction)


def folding_penalty_of(det, epsilon=0.0, reduction="mean"):
    """:func:`folding_penalty` from an already computed ``det [B, *spatial]`` (of
    :func:`jacobian_determinant`): ``mean_x relu(epsilon - det(x))`` per pair."""
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
SIMILARITIES = {"ncc": ncc_loss, "lncc": local_ncc_loss, "mse": mse_loss, "mi": mi_loss}
# Spelling accepted from configs saved before "lncc" was the only name.
_RENAMED = {"local_ncc": "lncc"}


def get(identifier):
    """Similarity loss by name (``"ncc"``, ``"lncc"`` -- local NCC, ``"mse"``, ``"mi"`` --
    mutual information) or a callable.

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
