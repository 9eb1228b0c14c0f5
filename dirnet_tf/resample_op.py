"""``dirnet_tf.resample``: multilinear resampling through the compiled C++/CUDA op.

The compiled library (``dirnet_tf/_resample_ops.so``, built by ``make build-ops``)
registers ``Dirnet>Resample`` and its gradient op ``Dirnet>ResampleGrad``.  This
module loads it exactly once, registers the Python gradient and wraps the op
with argument checking.  Inside XLA-compiled functions, where a custom op
cannot run, the equivalent stock-TF formulation from
:mod:`dirnet_tf.resample_pure_tf` is used instead (same values, same gradients).
"""

import os
import threading

import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from dirnet_tf.resample_pure_tf import BOUNDARY_MODES, resample_pure_tf

__all__ = ["BOUNDARY_MODES", "load_ops", "resample"]

_LIBRARY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_resample_ops.so")
_BUILD_HINT = (
    "Build it from the repository root with `make build-ops` (it needs the "
    "TensorFlow you are running now: {tf}).".format(tf=tf.__version__)
)

_lock = threading.Lock()
_module = None
_load_error = None


def _try_load():
    global _module, _load_error
    with _lock:
        if _module is not None or _load_error is not None:
            return
        if not os.path.exists(_LIBRARY_FILE):
            _load_error = f"The compiled resampler {_LIBRARY_FILE} does not exist. {_BUILD_HINT}"
            return
        try:
            module = tf.load_op_library(_LIBRARY_FILE)
        except Exception as exc:  # noqa: BLE001 - any loader failure means "rebuild"
            _load_error = (
                f"Could not load the compiled resampler {_LIBRARY_FILE} "
                f"(it was probably built for another TensorFlow version): {exc}. {_BUILD_HINT}"
            )
            return
        # A shared library that loads but does not register our ops (a stale or foreign
        # file under that name) must fail here, not as an AttributeError later.
        missing = [name for name in ("dirnet_resample", "dirnet_resample_grad") if not hasattr(module, name)]
        if missing:
            _load_error = (f"{_LIBRARY_FILE} loads but does not define the ops {missing}: it is not this "
                           f"package's resampler. {_BUILD_HINT}")
            return
        _module = module


def load_ops():
    """Load the compiled ``Dirnet>Resample`` op and register its gradient.

    ``import dirnet_tf`` already does this; call it explicitly before
    ``tf.saved_model.load`` of a model that contains the op to get a clear
    error if the library has not been built.

    Returns
    -------
    The op module returned by ``tf.load_op_library``.

    Raises
    ------
    RuntimeError
        If the library is missing or does not load; the message says to run
        ``make build-ops``.
    """
    _try_load()
    if _module is None:
        raise RuntimeError(_load_error)
    return _module


@tf.RegisterGradient("Dirnet>Resample")
def _resample_grad(op, grad):
    # Under a GradientTape, TensorFlow tells the gradient function which inputs
    # need no gradient (``skip_input_indices``).  DIRNet warps a constant moving
    # image, so the image-gradient scatter (the costly half) is then skipped.
    skip = getattr(op, "skip_input_indices", None) or ()
    need_image = 0 not in skip
    grad_image, grad_coords = load_ops().dirnet_resample_grad(
        op.inputs[0], op.inputs[1], grad, boundary=op.get_attr("boundary"), image_grad=need_image
    )
    return [grad_image if need_image else None, grad_coords]


def _in_xla_context():
    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def _check_arguments(image, coords, boundary):
    if boundary not in BOUNDARY_MODES:
        raise ValueError(f"boundary must be one of {BOUNDARY_MODES}, got {boundary!r}")
    shapes = f"image shape {image.shape.as_list() if image.shape.rank is not None else None}, " \
        f"coords shape {coords.shape.as_list() if coords.shape.rank is not None else None}"
    if image.dtype not in (tf.float32, tf.float64) or coords.dtype != image.dtype:
        raise TypeError(
            "resample needs image and coords of the same dtype, float32 or float64; got "
            f"image {image.dtype.name} and coords {coords.dtype.name} ({shapes})"
        )
    rank = image.shape.rank
    if rank is not None and rank not in (4, 5):
        raise ValueError(
            f"resample: image must be [B, H, W, C] or [B, D, H, W, C] (rank 4 or 5); got {shapes}"
        )
    if coords.shape.rank is not None and coords.shape.rank < 3:
        raise ValueError(
            "resample: coords must be [B, *out_points, ndim] with at least one output axis "
            f"(rank >= 3); got {shapes}"
        )
    if rank is not None and coords.shape.rank is not None:
        ndim = rank - 2
        last = coords.shape[-1]
        if last is not None and last != ndim:
            raise ValueError(
                "resample: coords.shape[-1] must equal the number of spatial axes of image "
                f"({ndim}); got {shapes}"
            )
        b_img, b_crd = image.shape[0], coords.shape[0]
        if b_img is not None and b_crd is not None and b_img != b_crd:
            raise ValueError(f"resample: image and coords must have the same batch size; got {shapes}")
    if rank is not None:
        for size in image.shape[1:-1]:
            if size == 0:
                raise ValueError(f"resample: image has an empty spatial axis; got {shapes}")


def resample(image, coords, boundary="zeros"):
    """Sample ``image`` at ``coords`` with multilinear interpolation.

    Parameters
    ----------
    image : Tensor ``[B, *spatial, C]`` with 2 or 3 spatial axes; float32 or
        float64.
    coords : Tensor ``[B, *out_points, ndim]`` of absolute pixel coordinates in
        ij order (``coords[..., 0]`` indexes the first spatial axis), same
        dtype as ``image``.  ``out_points`` is one or more axes of any size.
    boundary : ``"zeros"`` -- corners outside the image count as 0 (equal to
        ``scipy.ndimage.map_coordinates(order=1, mode="grid-constant")``);
        ``"border"`` -- coordinates are clamped to ``[0, size - 1]`` (equal to
        ``mode="nearest"``).

    Returns
    -------
    Tensor ``[B, *out_points, C]``.

    Gradients flow to both inputs.  At integer coordinates the coordinate
    gradient is the right-sided derivative (cell ``[floor(x), floor(x)+1]``).
    Non-finite or huge coordinates sample 0 in ``"zeros"`` mode, a finite
    border value in ``"border"`` mode, and get finite gradients.
    """
    image = tf.convert_to_tensor(image)
    coords = tf.convert_to_tensor(coords)
    _check_arguments(image, coords, boundary)
    if _in_xla_context():
        return resample_pure_tf(image, coords, boundary)
    return load_ops().dirnet_resample(image, coords, boundary=boundary)


_try_load()
