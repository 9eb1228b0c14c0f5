"""Identity grids and warping of images / label maps by dense displacement fields.

A displacement field ``u`` of shape ``[B, *spatial, ndim]`` (pixels, ij order)
maps output pixel ``x`` to the sampling position ``x + u(x)`` in the moving
image: ``warped(x) = moving(x + u(x))`` (backward warping).
"""

import tensorflow as tf

from dirnet_tf.resample_op import resample

__all__ = ["identity_grid", "warp", "warp_labels", "compose_displacements"]


def identity_grid(image_shape, dtype=tf.float32):
    """The ij meshgrid of pixel indices.

    Parameters
    ----------
    image_shape : sequence of int
        Spatial size ``(H, W)`` or ``(D, H, W)``.
    dtype : tf.DType
        Floating dtype of the result (default float32).

    Returns
    -------
    Tensor ``[*image_shape, ndim]`` with ``grid[i, j] == (i, j)`` (2-D) or
    ``grid[i, j, k] == (i, j, k)`` (3-D).
    """
    try:
        shape = tuple(int(n) for n in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"image_shape must be a sequence of ints, got {image_shape!r}") from None
    if len(shape) not in (2, 3) or any(n < 1 for n in shape):
        raise ValueError(f"image_shape must have 2 or 3 positive entries, got {image_shape!r}")
    axes = [tf.range(n, dtype=dtype) for n in shape]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def _check_pair(image, displacement, what="image"):
    rank = image.shape.rank
    if rank not in (4, 5):
        raise ValueError(
            f"{what} must be [B, H, W, C] or [B, D, H, W, C], got shape {image.shape}"
        )
    ndim = rank - 2
    if displacement.shape.rank != rank or (
        displacement.shape[-1] is not None and displacement.shape[-1] != ndim
    ):
        raise ValueError(
            f"displacement must be [B, *spatial, {ndim}] for {what} of shape {image.shape}, "
            f"got {displacement.shape}"
        )
    for a, b in zip(image.shape[1:-1], displacement.shape[1:-1]):
        if a is None or b is None:
            continue
        if a != b:
            raise ValueError(
                f"displacement spatial shape {displacement.shape[1:-1]} must match {what} "
                f"spatial shape {image.shape[1:-1]}"
            )
    return ndim


def warp(image, displacement, boundary="border"):
    """Warp ``image`` with a dense displacement field (multilinear interpolation).

    Parameters
    ----------
    image : Tensor ``[B, *spatial, C]`` (2 or 3 spatial axes), float32/float64.
    displacement : Tensor ``[B, *spatial, ndim]`` in pixels, ij order, same
        spatial shape as ``image``.
    boundary : str
        ``"border"`` (default; clamp to the edge pixels) or ``"zeros"``.

    Returns
    -------
    Tensor ``[B, *spatial, C]``: ``resample(image, identity_grid + displacement,
    boundary)``.
    """
    image = tf.convert_to_tensor(image)
    displacement = tf.convert_to_tensor(displacement)
    if not image.dtype.is_floating:
        image = tf.cast(image, tf.float32)
    displacement = tf.cast(displacement, image.dtype)
    _check_pair(image, displacement)
    spatial = image.shape[1:-1]
    if any(n is None for n in spatial):
        spatial = displacement.shape[1:-1]
    if any(n is None for n in spatial):
        raise ValueError(f"warp needs a static spatial shape, got image {image.shape}")
    coords = identity_grid(spatial, dtype=image.dtype) + displacement
    return resample(image, coords, boundary=boundary)


def warp_labels(labels, displacement, num_labels=None, boundary="border"):
    """Warp an integer label map: warp its one-hot encoding, then take the argmax.

    Parameters
    ----------
    labels : Tensor ``[B, *spatial]`` or ``[B, *spatial, 1]`` of integer labels
        ``0 .. num_labels - 1``.
    displacement : Tensor ``[B, *spatial, ndim]`` in pixels, ij order.
    num_labels : int or None
        Number of labels; default ``max(labels) + 1`` (must then be eager).
    boundary : str
        ``"border"`` (default) or ``"zeros"`` (outside counts as no label; the
        argmax then falls back to label 0 where all classes sample 0).

    Returns
    -------
    Tensor of the same shape and dtype as ``labels``.
    """
    labels = tf.convert_to_tensor(labels)
    displacement = tf.convert_to_tensor(displacement)
    squeeze = False
    if labels.shape.rank == displacement.shape.rank:
        if labels.shape[-1] != 1:
            raise ValueError(
                f"labels must be [B, *spatial] or [B, *spatial, 1], got {labels.shape} for "
                f"displacement {displacement.shape}"
            )
        labels = labels[..., 0]
        squeeze = True
    if labels.shape.rank != displacement.shape.rank - 1:
        raise ValueError(
            f"labels must be [B, *spatial] matching displacement {displacement.shape}, "
            f"got {labels.shape}"
        )
    if num_labels is None:
        num_labels = int(tf.reduce_max(labels)) + 1
    one_hot = tf.one_hot(tf.cast(labels, tf.int32), int(num_labels), dtype=tf.float32)
    warped = warp(one_hot, tf.cast(displacement, tf.float32), boundary=boundary)
    out = tf.cast(tf.argmax(warped, axis=-1), labels.dtype)
    if squeeze:
        out = out[..., None]
    return out


def compose_displacements(first, second, boundary="border"):
    """Displacement of two successive backward warps, applied as one.

    Order: the image ``m`` is warped by ``first`` and the result is then
    warped by ``second``::

        warped1(y) = m(y + first(y))                        # warp(m, first)
        warped2(x) = warped1(x + second(x))                 # warp(warped1, second)
                   = m(x + second(x) + first(x + second(x)))
                   = m(x + total(x))                        # warp(m, total)

    so the total sampling map is ``phi_1 o phi_2`` with ``phi_i(x) = x +
    field_i(x)``, and

        ``total(x) = second(x) + first(x + second(x))``.

    ``first`` is resampled at ``x + second(x)`` with multilinear
    interpolation (:func:`dirnet_tf.resample`).  Warping ``m`` once with
    ``total`` resamples the image a single time instead of twice.  If both
    maps are injective (``det > 0``) so is their composition, whose Jacobian
    is ``(I + D first)(x + second(x)) (I + D second)(x)``; the returned field
    represents it up to the multilinear interpolation of ``first`` between
    pixels, which only matters where ``first`` changes quickly from pixel to
    pixel.

    Parameters
    ----------
    first : Tensor ``[B, *spatial, ndim]``
        Displacement (pixels, ij order) of the warp applied first.
    second : Tensor ``[B, *spatial, ndim]``
        Displacement (pixels, ij order) of the warp applied second, same
        shape as ``first``.
    boundary : str
        How ``first`` is extended outside the image: ``"border"`` (default;
        clamped to its edge values) or ``"zeros"`` (no displacement outside).

    Returns
    -------
    Tensor ``[B, *spatial, ndim]`` in pixels, ij order, dtype of ``first``
    (integer input becomes float32).  Differentiable in both fields.
    """
    first = tf.convert_to_tensor(first)
    second = tf.convert_to_tensor(second)
    if not first.dtype.is_floating:
        first = tf.cast(first, tf.float32)
    second = tf.cast(second, first.dtype)
    if first.shape.rank not in (4, 5) or (
        first.shape[-1] is not None and first.shape[-1] != first.shape.rank - 2
    ):
        raise ValueError(
            f"first must be a displacement field [B, *spatial, ndim] with 2 or 3 spatial axes, "
            f"got shape {first.shape}"
        )
    _check_pair(first, second, what="first")
    spatial = first.shape[1:-1]
    if any(n is None for n in spatial):
        spatial = second.shape[1:-1]
    if any(n is None for n in spatial):
        raise ValueError(
            f"compose_displacements needs a static spatial shape, got {first.shape} and "
            f"{second.shape}"
        )
    coords = identity_grid(spatial, dtype=first.dtype) + second
    return second + resample(first, coords, boundary=boundary)
