"""dirnet_tf: DIRNet deformable image registration in TensorFlow/Keras.

Along the data flow: image files (:mod:`~dirnet_tf.readers`, :mod:`~dirnet_tf.dicom`,
:mod:`~dirnet_tf.image_lists`) -> a model grid (:mod:`~dirnet_tf.preprocessing`) -> pairs
(:mod:`~dirnet_tf.pair_plans`, :mod:`~dirnet_tf.pairs`) -> :mod:`~dirnet_tf.regressor` (control
points) -> :mod:`~dirnet_tf.bspline` (dense displacement) -> :mod:`~dirnet_tf.resample_op` (warped
moving image); :mod:`~dirnet_tf.model` puts them together as the Keras model ``DIRNet`` and
:mod:`~dirnet_tf.losses` holds its objective.  :func:`train` (:mod:`~dirnet_tf.training`, settings
in :class:`TrainConfig`) trains and exports a model; :func:`load_model` and :func:`register`
(:mod:`~dirnet_tf.registration`) register images with an export; :mod:`~dirnet_tf.itk`,
:mod:`~dirnet_tf.field_images` and :mod:`~dirnet_tf.elastix_params` write what ITK and elastix open.

Imported before TensorFlow, the package imports its submodules (and TensorFlow) only when one of
its names is first used, so ``import dirnet_tf`` is cheap and a command can quieten TensorFlow
(:mod:`dirnet_tf.console`) before TensorFlow loads.  Imported after TensorFlow, it loads the
compiled resampler op at once.  Call :func:`load_ops` before ``tf.saved_model.load`` of a model
that contains the op (a clear error when it has not been built with ``make build-ops``);
:func:`load_model` does this itself.
"""

import importlib
import sys

__version__ = "0.1.0"

# Public name -> the submodule that defines it (imported on first use, PEP 562).
_EXPORTS = {
    "load_ops": "resample_op",
    "resample": "resample_op",
    "bspline_displacement": "bspline",
    "control_grid_shape": "spline_np",
    "identity_grid": "warping",
    "warp": "warping",
    "DIRNet": "model",
    "TrainConfig": "config",
    "train": "training",
    "ExportedModel": "registration",
    "Result": "registration",
    "load_model": "registration",
    "register": "registration",
}
# Submodules reachable as attributes of the package without an explicit import.
_SUBMODULES = ("layers", "losses", "metrics")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"dirnet_tf.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"dirnet_tf.{name}")
    else:
        raise AttributeError(f"module 'dirnet_tf' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if "tensorflow" in sys.modules:  # TensorFlow is loaded already: load the op (and its gradient) now
    importlib.import_module("dirnet_tf.resample_op")
