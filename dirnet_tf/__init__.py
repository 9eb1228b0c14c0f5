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

__version__ = "0.1.0"
