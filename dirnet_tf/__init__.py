"""dirnet_tf: DIRNet deformable image registration in TensorFlow/Keras.

Data flow: fixed + moving -> :mod:`dirnet_tf.regressor` (control points) ->
:mod:`dirnet_tf.bspline` (dense displacement) -> :mod:`dirnet_tf.resampling`
(warped moving image).

Importing the package loads the compiled resampler op and registers its
gradient (if the library has been built with ``make build-ops``); call
:func:`load_ops` explicitly before ``tf.saved_model.load`` to get a clear error
when it has not.
"""

from dirnet_tf.resampling import load_ops, resample
from dirnet_tf.bspline import bspline_displacement, control_grid_shape
from dirnet_tf.warping import identity_grid, warp
from dirnet_tf import layers, losses, metrics
from dirnet_tf.model import DIRNet

__version__ = "0.1.0"
