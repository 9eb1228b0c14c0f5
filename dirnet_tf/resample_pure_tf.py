"""Pure-TensorFlow multilinear resampler: the compiled op's twin for XLA.

The same function as the compiled ``Dirnet>Resample`` op, written with stock
TensorFlow ops (gathers).  It is used where the compiled op cannot run -- inside
XLA-compiled functions -- and as the baseline in the benchmarks.  Results and
gradients follow the op's conventions exactly:

* coordinates are absolute pixel positions in ij order;
* ``"zeros"``: every corner outside the image contributes 0;
* ``"border"``: coordinates are clamped to ``[0, size - 1]`` first;
* at integer coordinates the coordinate gradient is the right-sided one (the
  derivative inside the cell ``[floor(x), floor(x) + 1]``);
* non-finite or huge coordinates sample 0 (zeros) or a finite border value, and
  have finite gradients.
"""

import itertools

import tensorflow as tf

__all__ = ["BOUNDARY_MODES", "resample_pure_tf"]

#: Boundary modes of the resampler (the compiled op's ``boundary`` attribute and this twin):
#: ``"zeros"`` (corners outside the image count as 0) or ``"border"`` (coordinates clamped).
BOUNDARY_MODES = ("zeros", "border")


def resample_pure_tf(image, coords, boundary="zeros"):
    """Multilinear resampling with stock TensorFlow ops.

    Parameters
    ----------
    image : Tensor ``[B, *spatial, C]`` with 2 or 3 spatial axes.
    coords : Tensor ``[B, *out_points, ndim]`` of absolute ij pixel coordinates,
        same float dtype as ``image``.
    boundary : ``"zeros"`` or ``"border"``.

    Returns
    -------
    Tensor ``[B, *out_points, C]``.
    """
    if boundary not in BOUNDARY_MODES:
        raise ValueError(f"boundary must be one of {BOUNDARY_MODES}, got {boundary!r}")
    image = tf.convert_to_tensor(image)
    coords = tf.convert_to_tensor(coords, dtype=image.dtype)
    ndim = image.shape.rank - 2
    dtype = image.dtype

    image_shape = tf.shape(image)
    coords_shape = tf.shape(coords)
    batch = image_shape[0]
    channels = image_shape[-1]
    sizes = [image_shape[1 + d] for d in range(ndim)]

    flat_image = tf.reshape(image, tf.stack([batch, -1, channels]))
    flat_coords = tf.reshape(coords, tf.stack([batch, -1, ndim]))

    lows, fracs, valid_low, valid_high = [], [], [], []
    for d in range(ndim):
        x = flat_coords[..., d]
        size_f = tf.cast(sizes[d], dtype)
        finite = tf.math.is_finite(x)
        if boundary == "border":
            # NaN -> 0, +-inf and huge values clamp to the edges (as the op).
            x = tf.where(tf.math.is_nan(x), tf.zeros_like(x), x)
            x = tf.clip_by_value(x, tf.zeros_like(x), size_f - 1)
        else:
            x = tf.where(finite, x, tf.zeros_like(x))
            # Far outside the image every corner is outside: clamping there keeps
            # the integer conversion defined without changing the result.
            x = tf.clip_by_value(x, -2 * tf.ones_like(x), size_f + 1)
        x0 = tf.floor(x)
        frac = x - x0
        i0 = tf.cast(x0, tf.int64)
        size_i = tf.cast(sizes[d], tf.int64)
        if boundary == "border":
            lo_ok = tf.ones_like(finite)
            hi_ok = tf.ones_like(finite)
        else:
            lo_ok = finite & (i0 >= 0) & (i0 < size_i)
            hi_ok = finite & (i0 + 1 >= 0) & (i0 + 1 < size_i)
        lows.append(i0)
        fracs.append(frac)
        valid_low.append(lo_ok)
        valid_high.append(hi_ok)

    strides = []
    stride = tf.constant(1, tf.int64)
    for d in reversed(range(ndim)):
        strides.insert(0, stride)
        stride = stride * tf.cast(sizes[d], tf.int64)

    result = None
    for corner in itertools.product((0, 1), repeat=ndim):
        weight = None
        index = None
        ok = None
        for d, bit in enumerate(corner):
            size_i = tf.cast(sizes[d], tf.int64)
            idx = tf.clip_by_value(lows[d] + bit, 0, size_i - 1)
            w = fracs[d] if bit else 1 - fracs[d]
            v = valid_high[d] if bit else valid_low[d]
            weight = w if weight is None else weight * w
            index = idx * strides[d] if index is None else index + idx * strides[d]
            ok = v if ok is None else ok & v
        weight = tf.where(ok, weight, tf.zeros_like(weight))
        values = tf.gather(flat_image, index, batch_dims=1)
        term = values * weight[..., None]
        result = term if result is None else result + term

    out_shape = tf.concat([coords_shape[:-1], [channels]], axis=0)
    return tf.reshape(result, out_shape)
