"""The affine stage: image pair -> affine map, as a dense displacement field.

:class:`AffineRegressor` is a small ConvNet (3x3 convolutions and 2x2 average
pooling down to a coarse map, global average pooling, a dense layer) that
outputs ``ndim * (ndim + 1)`` numbers: a matrix ``M`` (``ndim x ndim``) and a
translation ``t`` (pixels).  Its output layer starts at zero, so an untrained
stage is the identity.  :func:`affine_displacement` turns them into the dense
displacement ``u(x) = M (x - c) + t`` about the image centre ``c`` (pixels, ij
order), i.e. the sampling map ``x -> c + (I + M)(x - c) + t``.

With ``bounded=True`` every entry of ``M`` is squashed into ``(-0.9 / ndim,
0.9 / ndim)``: then ``|M|_F < 0.9 < 1``, so ``I + M`` is invertible with a
positive determinant and the map never folds.
"""

import keras
import numpy as np
import tensorflow as tf

__all__ = ["AffineRegressor", "affine_displacement", "AFFINE_MATRIX_BOUND"]

# Per-entry bound of M (times ndim) that keeps |M|_F < 0.9: det(I + M) > 0.
AFFINE_MATRIX_BOUND = 0.9


def affine_displacement(params, image_shape):
    """Dense displacement ``u(x) = M (x - c) + t`` of affine parameters.

    Parameters
    ----------
    params : Tensor ``[B, ndim * (ndim + 1)]``
        Row-major ``M`` (``ndim x ndim``, dimensionless) then ``t`` (pixels), ij order.
    image_shape : sequence of int
        Spatial size; ``c`` is its centre ``(n - 1) / 2`` per axis.

    Returns
    -------
    Tensor ``[B, *image_shape, ndim]`` in pixels, ij order.
    """
    shape = tuple(int(n) for n in image_shape)
    ndim = len(shape)
    params = tf.convert_to_tensor(params)
    matrix = tf.reshape(params[:, : ndim * ndim], [-1, ndim, ndim])
    translation = params[:, ndim * ndim:]
    axes = [tf.range(n, dtype=params.dtype) - (n - 1) / 2.0 for n in shape]
    centred = tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)  # [*shape, ndim]
    u = tf.einsum("bij,...j->b...i", matrix, centred)
    return u + tf.reshape(translation, [-1] + [1] * ndim + [ndim])


@keras.saving.register_keras_serializable(package="dirnet_tf")
class AffineRegressor(keras.layers.Layer):
    """ConvNet: concatenated image pair -> affine parameters (identity at start).

    Parameters
    ----------
    image_shape : sequence of int
        Spatial size (2 or 3 axes).
    filters : int
        Width of the 3x3 convolutions.
    levels : int
        Convolution + 2x2 pooling levels (fewer when the image is small).
    bounded : bool
        Squash the matrix entries into ``(-0.9 / ndim, 0.9 / ndim)`` (never folds).
    **kwargs
        Passed to ``keras.layers.Layer``.

    Call: ``pair [B, *image_shape, 2C]`` -> ``[B, ndim * (ndim + 1)]`` (see
    :func:`affine_displacement`).
    """

    def __init__(self, image_shape, filters=16, levels=4, bounded=False, **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(int(n) for n in image_shape)
        self.ndim = len(self.image_shape)
        if self.ndim not in (2, 3):
            raise ValueError(f"image_shape must have 2 or 3 entries, got {image_shape!r}")
        self.filters = int(filters)
        self.levels = max(1, min(int(levels), int(np.log2(max(2, min(self.image_shape))))))
        self.bounded = bool(bounded)
        conv = keras.layers.Conv2D if self.ndim == 2 else keras.layers.Conv3D
        pool = keras.layers.AveragePooling2D if self.ndim == 2 else keras.layers.AveragePooling3D
        gap = keras.layers.GlobalAveragePooling2D if self.ndim == 2 else keras.layers.GlobalAveragePooling3D
        self._names = []
        for level in range(self.levels):
            for layer in (conv(self.filters, 3, padding="same", activation="elu", kernel_initializer="he_normal",
                               name=f"affine_conv{level}", dtype=self.dtype_policy),
                          pool(2, padding="same", name=f"affine_pool{level}", dtype=self.dtype_policy)):
                setattr(self, layer.name, layer)  # attributes, so tf.train.Checkpoint saves them
                self._names.append(layer.name)
        self.global_pool = gap(name="affine_gap", dtype=self.dtype_policy)
        self.hidden = keras.layers.Dense(2 * self.filters, activation="elu", name="affine_hidden",
                                         dtype=self.dtype_policy)
        self.output_dense = keras.layers.Dense(self.ndim * (self.ndim + 1), kernel_initializer="zeros",
                                               bias_initializer="zeros", name="affine_params", dtype="float32")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for name in self._names:
            layer = getattr(self, name)
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.global_pool.build(shape)
        shape = self.global_pool.compute_output_shape(shape)
        self.hidden.build(shape)
        self.output_dense.build(self.hidden.compute_output_shape(shape))
        self.built = True

    def call(self, pair):
        x = pair
        for name in self._names:
            x = getattr(self, name)(x)
        params = self.output_dense(self.hidden(self.global_pool(x)))
        if not self.bounded:
            return params
        nn = self.ndim * self.ndim
        limit = AFFINE_MATRIX_BOUND / self.ndim
        return tf.concat([limit * tf.tanh(params[:, :nn] / limit), params[:, nn:]], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.ndim * (self.ndim + 1))

    def get_config(self):
        config = super().get_config()
        config.update(image_shape=list(self.image_shape), filters=self.filters, levels=self.levels,
                      bounded=self.bounded)
        return config
