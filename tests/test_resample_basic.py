"""First correctness check of the compiled resampler against scipy."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

import dirnet_tf

SCIPY_MODE = {"zeros": "grid-constant", "border": "nearest"}


def reference(image, coords, boundary):
    """Per batch item and channel ``map_coordinates(order=1)``."""
    out = np.zeros(coords.shape[:-1] + image.shape[-1:], image.dtype)
    for b in range(image.shape[0]):
        pts = coords[b].reshape(-1, coords.shape[-1]).T
        for ch in range(image.shape[-1]):
            vals = ndimage.map_coordinates(
                image[b, ..., ch], pts, order=1, mode=SCIPY_MODE[boundary], cval=0.0
            )
            out[b, ..., ch] = vals.reshape(coords.shape[1:-1])
    return out


@pytest.mark.parametrize("boundary", ["zeros", "border"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_forward_matches_scipy(boundary, ndim):
    rng = np.random.default_rng(ndim)
    spatial = (5, 6, 4)[:ndim]
    image = rng.normal(size=(2, *spatial, 3))
    coords = rng.uniform(-2.0, 7.0, size=(2, 9, ndim))
    out = dirnet_tf.resample(image, coords, boundary=boundary).numpy()
    np.testing.assert_allclose(out, reference(image, coords, boundary), atol=1e-12)


def test_gradient_exists_for_both_inputs():
    rng = np.random.default_rng(1)
    image = tf.constant(rng.normal(size=(1, 4, 4, 1)).astype(np.float32))
    coords = tf.constant(rng.uniform(0.2, 2.8, size=(1, 6, 2)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([image, coords])
        out = dirnet_tf.resample(image, coords)
    assert tape.gradient(out, image).shape == image.shape
    assert tape.gradient(out, coords).shape == coords.shape
