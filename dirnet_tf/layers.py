"""Keras 3 layers of DIRNet: regressor, cubic B-spline transformer, resampler.

All three are registered as ``dirnet_tf>Regressor``, ``dirnet_tf>BSplineTransformer``
and ``dirnet_tf>Resampler`` for ``.keras`` serialisation.

* :class:`Regressor` -- ConvNet, image pair -> control points
  (see :mod:`dirnet_tf.regressor`).
* :class:`BSplineTransformer` -- control points -> dense displacement
  (:func:`dirnet_tf.bspline_displacement`).
* :class:`Resampler` -- warps the moving image through the compiled
  ``dirnet_tf.resample`` op.  It sets ``supports_jit = False``, so Keras's
  ``jit_compile="auto"`` does not pick XLA for a model containing it (inside
  an explicitly XLA-compiled function ``resample`` falls back to the stock-TF
  implementation).
"""

import keras

from dirnet_tf.bspline import bspline_displacement
from dirnet_tf.spline_np import control_grid_shape, normalize_spacing
from dirnet_tf.regressor import Regressor
from dirnet_tf.resample_op import BOUNDARY_MODES
from dirnet_tf.warping import warp

__all__ = ["Regressor", "BSplineTransformer", "Resampler"]


@keras.saving.register_keras_serializable(package="dirnet_tf")
class BSplineTransformer(keras.layers.Layer):
    """Cubic B-spline free-form deformation: control points -> dense displacement.

    Parameters
    ----------
    image_shape : sequence of int
        Spatial size ``(H, W)`` or ``(D, H, W)`` of the dense field.
    grid_spacing : int or sequence of int
        Control-point spacing in pixels (any positive integers).
    **kwargs
        Passed to ``keras.layers.Layer``.

    Call arguments
    --------------
    control_points : Tensor ``[B, *control_grid_shape(image_shape, grid_spacing), ndim]``.

    Returns
    -------
    Tensor ``[B, *image_shape, ndim]``, displacement in pixels (ij order).
    """

    def __init__(self, image_shape, grid_spacing, **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(int(n) for n in image_shape)
        if len(self.image_shape) not in (2, 3):
            raise ValueError(f"image_shape must have 2 or 3 entries, got {image_shape!r}")
        self.grid_spacing = normalize_spacing(grid_spacing, len(self.image_shape))
        self.grid_shape = control_grid_shape(self.image_shape, self.grid_spacing)

    def build(self, input_shape):
        self.built = True

    def call(self, control_points):
        return bspline_displacement(control_points, self.image_shape, self.grid_spacing)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + self.image_shape + (len(self.image_shape),)

    def get_config(self):
        config = super().get_config()
        config.update(image_shape=list(self.image_shape), grid_spacing=list(self.grid_spacing))
        return config


@keras.saving.register_keras_serializable(package="dirnet_tf")
class Resampler(keras.layers.Layer):
    """Warp an image by a dense displacement field with the compiled resampler.

    Parameters
    ----------
    boundary : str
        ``"border"`` (default; sampling positions are clamped to the image) or
        ``"zeros"`` (outside the image counts as 0).
    **kwargs
        Passed to ``keras.layers.Layer``.

    Call arguments
    --------------
    moving : Tensor ``[B, *spatial, C]``.
    displacement : Tensor ``[B, *spatial, ndim]`` in pixels, ij order.

    Returns
    -------
    Tensor ``[B, *spatial, C]``: ``resample(moving, identity_grid + displacement,
    boundary)``.
    """

    def __init__(self, boundary="border", **kwargs):
        super().__init__(**kwargs)
        if boundary not in BOUNDARY_MODES:
            raise ValueError(f"boundary must be one of {BOUNDARY_MODES}, got {boundary!r}")
        self.boundary = boundary
        # The compiled op has no XLA kernel: keep jit_compile="auto" off XLA.
        self.supports_jit = False

    def build(self, moving_shape, displacement_shape=None):
        self.built = True

    def call(self, moving, displacement):
        return warp(moving, displacement, boundary=self.boundary)

    def compute_output_shape(self, moving_shape, displacement_shape=None):
        return tuple(moving_shape)

    def get_config(self):
        config = super().get_config()
        config.update(boundary=self.boundary)
        return config
