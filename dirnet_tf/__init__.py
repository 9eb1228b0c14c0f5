"""dirnet_tf: DIRNet deformable image registration in TensorFlow/Keras.

Data flow: training pairs (:mod:`dirnet_tf.pairs`) -> :mod:`dirnet_tf.regressor`
(control points) -> :mod:`dirnet_tf.bspline` (dense displacement) ->
:mod:`dirnet_tf.resample_op` (warped moving image); :mod:`dirnet_tf.model` puts
them together as the Keras model ``DIRNet``, :mod:`dirnet_tf.losses` holds its
objective, :mod:`dirnet_tf.trainer` trains it, :mod:`dirnet_tf.inference`
predicts, times and exports, :mod:`dirnet_tf.metrics` scores and
:mod:`dirnet_tf.plotting` draws.

Importing the package loads the compiled resampler op and registers its
gradient (if the library has been built with ``make build-ops``); call
:func:`load_ops` explicitly before ``tf.saved_model.load`` to get a clear error
when it has not.
"""

from dirnet_tf.resample_op import load_ops, resample
from dirnet_tf.bspline import bspline_displacement, control_grid_shape
from dirnet_tf.warping import identity_grid, warp
from dirnet_tf import layers, losses, metrics
from dirnet_tf.model import DIRNet
from dirnet_tf.registration import ExportedModel, Result, load_model, register

__version__ = "0.1.0"
