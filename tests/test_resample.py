"""The compiled resampler ``dirnet_tf.resample`` against independent references.

Forward values are compared with ``scipy.ndimage.map_coordinates(order=1)``;
gradients with ``tf.test.compute_gradient`` (off integer coordinates), with
one-sided forward differences of the scipy reference (on integer coordinates,
where the contract asks for the right-sided derivative), and with a numpy
scatter reference for the image gradient.  Larger batches, whose items the CPU
kernel shares out to several threads, are checked against a vectorised numpy
reference of the value and both gradients (``ref_bilinear``).
"""

import functools
import itertools
import os
import subprocess
import sys
import tempfile
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

import dirnet_tf
from dirnet_tf.resample_pure_tf import resample_pure_tf
from dirnet_tf import load_ops

SCIPY_MODE = {"zeros": "grid-constant", "border": "nearest"}
HOSTILE = [np.nan, np.inf, -np.inf, 1e30, -1e30, 3e9, -3e9]


def ref_forward(image, coords, boundary):
    """Per batch item and channel ``map_coordinates(order=1)``."""
    image = np.asarray(image, np.float64)
    coords = np.asarray(coords, np.float64)
    out = np.zeros(coords.shape[:-1] + image.shape[-1:])
    for b in range(image.shape[0]):
        pts = coords[b].reshape(-1, coords.shape[-1]).T
        for ch in range(image.shape[-1]):
            vals = ndimage.map_coordinates(
                image[b, ..., ch], pts, order=1, mode=SCIPY_MODE[boundary], cval=0.0
            )
            out[b, ..., ch] = vals.reshape(coords.shape[1:-1])
    return out


def ref_image_grad(image_shape, coords, grad_out, boundary):
    """Numpy scatter: d<resample(I, x), G>/dI, corner by corner."""
    ndim = len(image_shape) - 2
    sizes = np.array(image_shape[1:-1])
    grad = np.zeros(image_shape)
    flat_x = coords.reshape(coords.shape[0], -1, ndim)
    flat_g = grad_out.reshape(grad_out.shape[0], -1, image_shape[-1])
    for b in range(image_shape[0]):
        for x, g in zip(flat_x[b], flat_g[b]):
            if boundary == "border":
                x = np.clip(np.nan_to_num(x, nan=0.0), 0, sizes - 1)
            elif not np.all(np.isfinite(x)) or np.any(np.abs(x) > 1e6):
                continue
            low = np.floor(x).astype(np.int64)
            frac = x - low
            for corner in np.ndindex(*([2] * ndim)):
                idx = low + np.array(corner)
                weight = np.prod(np.where(np.array(corner) == 1, frac, 1 - frac))
                if boundary == "border":
                    idx = np.minimum(idx, sizes - 1)
                elif np.any(idx < 0) or np.any(idx >= sizes):
                    continue
                grad[(b, *idx)] += weight * g
    return grad


def random_case(rng, ndim, batch=2, channels=2, out_axes=(7,), low=-2.0, high=None, dtype=np.float64):
    spatial = (5, 6, 4)[:ndim]
    image = rng.normal(size=(batch, *spatial, channels)).astype(dtype)
    high = max(spatial) + 1.0 if high is None else high
    coords = rng.uniform(low, high, size=(batch, *out_axes, ndim)).astype(dtype)
    return image, coords


def off_integer(coords, margin=0.05):
    """Moves coordinates at least ``margin`` away from integers (and cell edges)."""
    frac = coords - np.floor(coords)
    return np.floor(coords) + np.clip(frac, margin, 1 - margin)


def grads(image, coords, boundary, fn=dirnet_tf.resample, weights=None):
    image = tf.convert_to_tensor(image)
    coords = tf.convert_to_tensor(coords)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([image, coords])
        out = fn(image, coords, boundary=boundary)
        loss = tf.reduce_sum(out * (weights if weights is not None else 1.0))
    return out, tape.gradient(loss, image), tape.gradient(loss, coords)


# --------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("boundary", ["zeros", "border"])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_forward_matches_scipy(channels, ndim, boundary, dtype):
    rng = np.random.default_rng(100 * ndim + channels)
    image, coords = random_case(rng, ndim, channels=channels, out_axes=(11,), dtype=dtype)
    # Some exactly integer coordinates, including the edges and -1.
    coords[:, :4] = rng.integers(-1, 6, size=coords[:, :4].shape).astype(dtype)
    out = dirnet_tf.resample(image, coords, boundary=boundary)
    assert out.dtype == dtype and out.shape == (2, 11, channels)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out.numpy(), ref_forward(image, coords, boundary), atol=tol)


@pytest.mark.parametrize("ndim", [2, 3])
def test_output_grids_of_other_sizes(ndim):
    rng = np.random.default_rng(7)
    out_axes = (3, 4) if ndim == 2 else (2, 3, 2)
    image, coords = random_case(rng, ndim, batch=3, channels=2, out_axes=out_axes)
    for boundary in ("zeros", "border"):
        out = dirnet_tf.resample(image, coords, boundary=boundary)
        assert out.shape == (3, *out_axes, 2)
        np.testing.assert_allclose(out.numpy(), ref_forward(image, coords, boundary), atol=1e-12)


def test_identity_grid_reproduces_image_and_batch_items_are_independent():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(3, 6, 5, 2))
    grid = np.stack(np.meshgrid(np.arange(6.0), np.arange(5.0), indexing="ij"), -1)
    coords = np.broadcast_to(grid, (3, 6, 5, 2)).copy()
    coords[1] += 0.5  # only item 1 moves
    out = dirnet_tf.resample(image, coords).numpy()
    np.testing.assert_array_equal(out[0], image[0])
    np.testing.assert_array_equal(out[2], image[2])
    np.testing.assert_allclose(out[1], ref_forward(image[1:2], coords[1:2], "zeros")[0], atol=1e-12)


def test_large_single_item_uses_several_shards_correctly():
    """B=1 and B=3 with enough points to be split across threads mid-item."""
    rng = np.random.default_rng(11)
    for batch in (1, 3):
        image, coords = random_case(rng, 2, batch=batch, channels=1, out_axes=(64, 64), high=7.0)
        g = rng.normal(size=(batch, 64, 64, 1))
        for boundary in ("zeros", "border"):
            out, gi, gc = grads(image, coords, boundary, weights=g)
            np.testing.assert_allclose(out.numpy(), ref_forward(image, coords, boundary), atol=1e-12)
            _, gi_tf, gc_tf = grads(image, coords, boundary, fn=resample_pure_tf, weights=g)
            np.testing.assert_allclose(gi.numpy(), gi_tf.numpy(), atol=1e-10)
            np.testing.assert_allclose(gc.numpy(), gc_tf.numpy(), atol=1e-10)


# ------------------------------------------------------------------- gradients


@pytest.mark.parametrize("boundary", ["zeros", "border"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_gradients_off_integer_coordinates(ndim, boundary):
    rng = np.random.default_rng(20 + ndim)
    image, coords = random_case(rng, ndim, batch=2, channels=2, out_axes=(5,), low=-1.5)
    coords = off_integer(coords)
    image_t, coords_t = tf.constant(image), tf.constant(coords)
    theoretical, numerical = tf.test.compute_gradient(
        lambda i, c: dirnet_tf.resample(i, c, boundary=boundary), [image_t, coords_t], delta=1e-4
    )
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, atol=1e-7)
    # The image gradient also against an explicit numpy scatter.
    g = rng.normal(size=(2, 5, 2))
    _, gi, _ = grads(image, coords, boundary, weights=g)
    np.testing.assert_allclose(gi.numpy(), ref_image_grad(image.shape, coords, g, boundary), atol=1e-12)


@pytest.mark.parametrize("boundary", ["zeros", "border"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_gradients_on_integer_coordinates_are_right_sided(ndim, boundary):
    rng = np.random.default_rng(30 + ndim)
    spatial = (5, 6, 4)[:ndim]
    image = rng.normal(size=(1, *spatial, 2))
    lo, hi = (-1, max(spatial)) if boundary == "zeros" else (0, max(spatial) - 2)
    coords = rng.integers(lo, hi, size=(1, 40, ndim)).astype(np.float64)
    if boundary == "border":  # interior integers: both edges are exempt in the contract
        coords = np.minimum(coords, np.array(spatial) - 2).astype(np.float64)
        coords = np.maximum(coords, 1.0)
    coords[0, 0] = -1.0 if boundary == "zeros" else 1.0
    g = rng.normal(size=(1, 40, 2))
    _, _, gc = grads(image, coords, boundary, weights=g)
    h = 1e-7
    base = ref_forward(image, coords, boundary)
    for d in range(ndim):
        shifted = coords.copy()
        shifted[..., d] += h
        expected = np.sum((ref_forward(image, shifted, boundary) - base) / h * g, axis=-1)
        np.testing.assert_allclose(gc.numpy()[..., d], expected, atol=1e-5)


def test_border_gradient_is_zero_outside_the_image():
    image = np.arange(12.0).reshape(1, 3, 4, 1)
    coords = np.array([[[-0.5, 1.5], [1.5, 3.5], [-3.0, 7.0], [1.5, 1.5]]])
    _, _, gc = grads(image, coords, "border")
    gc = gc.numpy()[0]
    assert gc[0, 0] == 0 and gc[0, 1] == 1.0  # row clamped, column free (slope 1)
    assert gc[1, 1] == 0 and gc[1, 0] == 4.0  # column clamped, row free (slope 4)
    np.testing.assert_array_equal(gc[2], [0.0, 0.0])
    np.testing.assert_allclose(gc[3], [4.0, 1.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_of_only_coords_equals_full_gradient(dtype):
    """With the image unwatched the op skips the image scatter; same coords gradient."""
    rng = np.random.default_rng(5)
    image, coords = random_case(rng, 3, channels=2, out_axes=(9,), dtype=dtype)
    image_t, coords_t = tf.constant(image), tf.constant(coords)
    with tf.GradientTape() as tape:
        tape.watch(coords_t)
        loss = tf.reduce_sum(dirnet_tf.resample(image_t, coords_t) ** 2)
    only = tape.gradient(loss, coords_t)
    with tf.GradientTape() as tape:
        tape.watch([image_t, coords_t])
        loss = tf.reduce_sum(dirnet_tf.resample(image_t, coords_t) ** 2)
    full_image, full_coords = tape.gradient(loss, [image_t, coords_t])
    np.testing.assert_array_equal(only.numpy(), full_coords.numpy())
    assert full_image is not None and np.any(full_image.numpy() != 0)

    @tf.function
    def symbolic(i, c):  # tf.gradients: no tape, both gradients computed
        return tf.gradients(tf.reduce_sum(dirnet_tf.resample(i, c) ** 2), [i, c])

    gi, gc = symbolic(image_t, coords_t)
    np.testing.assert_allclose(gc.numpy(), full_coords.numpy(), rtol=1e-6)
    np.testing.assert_allclose(gi.numpy(), full_image.numpy(), rtol=1e-6)


# ------------------------------------------------------------ hostile coordinates


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ndim", [2, 3])
def test_hostile_coordinates(ndim, dtype):
    rng = np.random.default_rng(40 + ndim)
    image, coords = random_case(rng, ndim, batch=1, channels=2, out_axes=(len(HOSTILE) * ndim,))
    image = image.astype(dtype)
    coords = np.full(coords.shape, 1.25)
    for k, v in enumerate(HOSTILE):  # one hostile value per point and axis
        for d in range(ndim):
            coords[0, k * ndim + d, d] = v
    coords = coords.astype(dtype)
    for boundary in ("zeros", "border"):
        out, gi, gc = grads(image, coords, boundary)
        out, gi, gc = out.numpy(), gi.numpy(), gc.numpy()
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(gi)) and np.all(np.isfinite(gc))
        if boundary == "zeros":
            np.testing.assert_array_equal(out, 0.0)
            np.testing.assert_array_equal(gi, 0.0)
            np.testing.assert_array_equal(gc, 0.0)
        else:
            clamped = np.clip(np.nan_to_num(coords.astype(np.float64), nan=0.0, posinf=1e300,
                                            neginf=-1e300), 0, np.array(image.shape[1:-1]) - 1)
            tol = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(out, ref_forward(image, clamped, "border"), atol=tol)
            np.testing.assert_allclose(
                gi, ref_image_grad(image.shape, coords.astype(np.float64), np.ones(out.shape),
                                   "border"), atol=tol)
            # Every hostile axis is clamped (or NaN): its derivative is 0.
            for k in range(len(HOSTILE)):
                for d in range(ndim):
                    assert gc[0, k * ndim + d, d] == 0.0


# ----------------------------------------------------------- invalid arguments

INVALID = {
    "batch mismatch": ((2, 5, 5, 1), (3, 4, 2)),
    "coords last axis != ndim": ((2, 5, 5, 1), (2, 4, 3)),
    "3-D coords for 2-D image": ((1, 5, 5, 1), (1, 4, 3)),
    "image rank 3": ((5, 5, 1), (5, 4, 2)),
    "image rank 6": ((1, 2, 3, 4, 5, 1), (1, 4, 4)),
    "coords rank 2": ((1, 5, 5, 1), (1, 2)),
    "empty spatial axis": ((1, 0, 5, 1), (1, 4, 2)),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_shapes_raise_naming_the_shapes(case):
    image_shape, coords_shape = INVALID[case]
    image = tf.zeros(image_shape, tf.float32)
    coords = tf.zeros(coords_shape, tf.float32)
    shape_text = str(list(coords_shape)).replace(" ", "")
    # Eager, through the public wrapper.
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)) as info:
        dirnet_tf.resample(image, coords)
    assert "coords" in str(info.value) and "image" in str(info.value)
    # Eager, raw op: the kernel's own validation.
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        load_ops().dirnet_resample(image, coords)
    assert shape_text in str(info.value).replace(" ", "")
    # tf.function with fully unknown shapes: only the kernel can catch it.
    spec = [tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.float32)]
    fn = tf.function(lambda i, c: dirnet_tf.resample(i, c), input_signature=spec)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        fn(image, coords)
    assert shape_text in str(info.value).replace(" ", "")
    # tf.function with static shapes: caught while tracing.
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        tf.function(lambda i, c: dirnet_tf.resample(i, c))(image, coords)


def test_invalid_shape_in_gradient_op_and_boundary_and_dtypes():
    image = tf.zeros((1, 4, 4, 2), tf.float64)
    coords = tf.zeros((1, 3, 2), tf.float64)
    with pytest.raises(tf.errors.InvalidArgumentError, match="grad_output"):
        load_ops().dirnet_resample_grad(image, coords, tf.zeros((1, 3, 1), tf.float64))
    with pytest.raises(ValueError, match="boundary"):
        dirnet_tf.resample(image, coords, boundary="reflect")
    for bad_image, bad_coords in [
        (tf.zeros((1, 4, 4, 1), tf.int32), tf.zeros((1, 3, 2), tf.int32)),
        (tf.zeros((1, 4, 4, 1), tf.float32), tf.zeros((1, 3, 2), tf.float64)),
        (tf.zeros((1, 4, 4, 1), tf.float16), tf.zeros((1, 3, 2), tf.float16)),
    ]:
        with pytest.raises(TypeError, match=bad_image.dtype.name):
            dirnet_tf.resample(bad_image, bad_coords)
        with pytest.raises(TypeError, match=bad_coords.dtype.name):
            tf.function(dirnet_tf.resample)(bad_image, bad_coords)


@pytest.mark.parametrize("ndim", [2, 3])
def test_empty_inputs(ndim):
    spatial = (4, 5, 3)[:ndim]
    cases = [  # (image shape, coords shape)
        ((0, *spatial, 2), (0, 6, ndim)),  # empty batch
        ((2, *spatial, 2), (2, 0, ndim)),  # no output points
        ((2, *spatial, 0), (2, 6, ndim)),  # no channels
    ]
    for image_shape, coords_shape in cases:
        image = tf.ones(image_shape, tf.float64)
        coords = tf.ones(coords_shape, tf.float64)
        for fn in (dirnet_tf.resample, tf.function(dirnet_tf.resample)):
            out, gi, gc = grads(image, coords, "zeros", fn=fn)
            assert out.shape == coords_shape[:-1] + image_shape[-1:]
            assert gi.shape == image_shape and gc.shape == coords_shape
            assert np.all(gi.numpy() == 0) and np.all(gc.numpy() == 0)


# ------------------------------------------------------------ tf.function, XLA


@pytest.mark.parametrize("ndim", [2, 3])
def test_tf_function_equals_eager(ndim):
    rng = np.random.default_rng(50)
    image, coords = random_case(rng, ndim, out_axes=(4, 3))
    eager = grads(image, coords, "border")
    spec = [tf.TensorSpec([None] * (ndim + 2), tf.float64), tf.TensorSpec(None, tf.float64)]
    fn = tf.function(lambda i, c: grads(i, c, "border"), input_signature=spec)
    for a, b in zip(eager, fn(image, coords)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("ndim", [2, 3])
def test_xla_path_matches_op(ndim):
    rng = np.random.default_rng(60 + ndim)
    image, coords = random_case(rng, ndim, channels=2, out_axes=(12,), low=-1.5)
    coords[:, :3] = np.round(coords[:, :3])  # integers: the right-sided convention
    coords[0, 3:3 + len(HOSTILE), 0] = HOSTILE
    g = rng.normal(size=(2, 12, 2))
    boundaries = ("zeros", "border")

    def both(i, c):
        return [grads(i, c, boundary, weights=g) for boundary in boundaries]

    xla = tf.function(both, jit_compile=True)(tf.constant(image), tf.constant(coords))
    for boundary, xla_results in zip(boundaries, xla):
        for a, b in zip(grads(image, coords, boundary, weights=g), xla_results):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-12)
    # Inside XLA the op itself is not used (it would fail to compile).
    graph = tf.function(both, jit_compile=True).get_concrete_function(
        tf.constant(image), tf.constant(coords)).graph
    assert not any(o.type.startswith("Dirnet>") for o in graph.get_operations())
    assert any(o.type.startswith("Dirnet>") for o in tf.function(both).get_concrete_function(
        tf.constant(image), tf.constant(coords)).graph.get_operations())


# ---------------------------------------------------------------------- Keras


class Translate(keras.layers.Layer):
    """Tiny test layer: shifts a 2-D image by a trainable (dy, dx)."""

    def __init__(self, xla=False, **kwargs):
        super().__init__(**kwargs)
        # The Keras convention for layers built on the op: keep it out of XLA.
        # With xla=True, XLA compiles the step and resample() uses its pure-TF form.
        self.supports_jit = xla
        self.shift = self.add_weight(shape=(2,), initializer="zeros", name="shift")

    def call(self, image):
        shape = tf.shape(image)
        grid = tf.stack(tf.meshgrid(tf.range(shape[1]), tf.range(shape[2]), indexing="ij"), -1)
        grid = tf.cast(grid, image.dtype) + self.shift
        coords = tf.broadcast_to(grid, tf.concat([shape[:1], shape[1:3], [2]], 0))
        return dirnet_tf.resample(image, coords, boundary="border")


@pytest.mark.parametrize("jit_compile", [False, True])
def test_keras_layer_trains(jit_compile):
    """The op (jit_compile=False) and its XLA substitute (True) both train a shift."""
    yy, xx = np.meshgrid(np.arange(12.0), np.arange(12.0), indexing="ij")
    blob = lambda cy, cx: np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)  # noqa: E731
    moving = np.stack([blob(5.0, 5.0)] * 4)[..., None].astype("float32")
    fixed = np.stack([blob(6.0, 4.5)] * 4)[..., None].astype("float32")
    inputs = keras.Input((12, 12, 1))
    model = keras.Model(inputs, Translate(xla=jit_compile)(inputs))
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse", jit_compile=jit_compile)
    before = model.evaluate(moving, fixed, verbose=0)
    model.fit(moving, fixed, epochs=25, batch_size=4, verbose=0)
    after = model.evaluate(moving, fixed, verbose=0)
    assert after < 0.2 * before
    shift = model.layers[-1].shift.numpy()
    np.testing.assert_allclose(shift, [-1.0, 0.5], atol=0.25)


# ------------------------------- CPU backward: batch items shared out to threads


def ref_bilinear(image, coords, grad_out, boundary):
    """Vectorised numpy reference of the value and both gradients of the op.

    Written from the contract, corner by corner: the value is the sum of the
    corner values times the products of the per-axis weights; the image
    gradient scatters ``weight * grad_out`` to the corners; the coordinate
    gradient along axis d replaces axis d's weights ``(1 - t, t)`` by their
    derivatives ``(-1, 1)`` (times 0 outside ``[0, n-1]`` in border mode).

    Parameters
    ----------
    image : ndarray ``[B, *spatial, C]``.
    coords : ndarray ``[B, *out_points, ndim]``, finite.
    grad_out : ndarray ``[B, *out_points, C]``, the upstream gradient.
    boundary : ``"zeros"`` or ``"border"``.

    Returns
    -------
    (value, grad_image, grad_coords), shaped like the output, image and coords.
    """
    image = np.asarray(image, np.float64)
    coords = np.asarray(coords, np.float64)
    grad_out = np.asarray(grad_out, np.float64)
    batch, spatial, channels = image.shape[0], image.shape[1:-1], image.shape[-1]
    ndim = len(spatial)
    x = coords.reshape(batch, -1, ndim)
    g = grad_out.reshape(batch, -1, channels)
    lines, weights, slopes, valid = [], [], [], []  # per axis: (low, high) pairs
    for d, n in enumerate(spatial):
        xd = x[..., d]
        if boundary == "border":
            inside = ((xd >= 0) & (xd <= n - 1)).astype(np.float64)
            xc = np.clip(xd, 0, n - 1)
            low = np.floor(xc).astype(np.int64)
            t = xc - low
            lines.append((low, np.minimum(low + 1, n - 1)))
            slopes.append((-inside, inside))
            valid.append((np.ones_like(t, bool), np.ones_like(t, bool)))
        else:
            low = np.floor(xd).astype(np.int64)
            t = xd - low
            lines.append((low, low + 1))
            slopes.append((-np.ones_like(t), np.ones_like(t)))
            valid.append(((low >= 0) & (low < n), (low + 1 >= 0) & (low + 1 < n)))
        weights.append((1 - t, t))
    value = np.zeros_like(g)
    grad_image = np.zeros_like(image)
    grad_coords = np.zeros_like(x)
    items = np.broadcast_to(np.arange(batch)[:, None], x.shape[:2])
    for corner in itertools.product((0, 1), repeat=ndim):
        inside = np.logical_and.reduce([valid[d][h] for d, h in enumerate(corner)])
        index = tuple(np.clip(lines[d][h], 0, n - 1)
                      for d, (h, n) in enumerate(zip(corner, spatial)))
        corner_value = image[(items, *index)] * inside[..., None]  # [B, P, C]
        axis_weights = [weights[d][h] for d, h in enumerate(corner)]
        weight = np.prod(axis_weights, axis=0)
        value += weight[..., None] * corner_value
        np.add.at(grad_image, (items, *index), (weight * inside)[..., None] * g)
        contracted = np.sum(g * corner_value, axis=-1)
        for d, h in enumerate(corner):
            others = np.prod([w for e, w in enumerate(axis_weights) if e != d], axis=0)
            grad_coords[..., d] += contracted * slopes[d][h] * others
    return (value.reshape(grad_out.shape), grad_image, grad_coords.reshape(coords.shape))


def registration_case(seed, batch, spatial, channels, boundary, spread=3.0):
    """Identity grid plus a random displacement (some points leave the image)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, *spatial, channels))
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in spatial],
                                indexing="ij"), -1)
    coords = grid + rng.uniform(-spread, spread, size=(batch, *spatial, len(spatial)))
    grad_out = rng.normal(size=(batch, *spatial, channels))
    return {"image": image, "coords": coords, "grad_out": grad_out, "boundary": boundary}


# Batch sizes around the kernel's choices for 2 and 4 threads: whole batch items
# per work unit with units dividing B (4, 16) or not (9, 18), and a batch split
# mid-item with private scratch (5); 2-D 64x64 and 3-D 16^3, several channels.
THREADED_CASES = {
    f"{len(spatial)}d_b{batch}_c{channels}_{boundary}": (batch, spatial, channels, boundary)
    for batch, spatial, channels in [
        (4, (64, 64), 2), (5, (64, 64), 1), (9, (64, 64), 3), (16, (64, 64), 1),
        (18, (64, 64), 5), (5, (16, 16, 16), 2), (9, (16, 16, 16), 1), (18, (16, 16, 16), 2),
    ]
    for boundary in ("zeros", "border")
}
THREAD_COUNTS = (2, 4)

# Runs in a fresh interpreter: the intra-op thread count can only be set
# before TensorFlow initialises, and the CPU kernel splits its work by it.
_THREADED_SCRIPT = r"""
import sys
import numpy as np
import tensorflow as tf

threads = int(sys.argv[3])
tf.config.threading.set_intra_op_parallelism_threads(threads)
import dirnet_tf

assert tf.config.threading.get_intra_op_parallelism_threads() == threads
cases = np.load(sys.argv[1])
names = sorted({key.split("/")[0] for key in cases.files})
results = {"dirnet_tf_file": np.array(dirnet_tf.__file__)}
with tf.device("/CPU:0"):
    for name in names:
        image = tf.constant(cases[name + "/image"])
        coords = tf.constant(cases[name + "/coords"])
        grad_out = tf.constant(cases[name + "/grad_out"])
        boundary = str(cases[name + "/boundary"])
        with tf.GradientTape() as tape:
            tape.watch([image, coords])
            out = dirnet_tf.resample(image, coords, boundary=boundary)
            loss = tf.reduce_sum(out * grad_out)
        grad_image, grad_coords = tape.gradient(loss, [image, coords])
        results[name + "/value"] = out.numpy()
        results[name + "/grad_image"] = grad_image.numpy()
        results[name + "/grad_coords"] = grad_coords.numpy()
np.savez(sys.argv[2], **results)
"""


def _threaded_case(name):
    batch, spatial, channels, boundary = THREADED_CASES[name]
    seed = zlib.crc32(name.encode())
    return registration_case(seed, batch, spatial, channels, boundary)


@functools.lru_cache(maxsize=None)
def _run_threaded_cases(threads):
    """Value and gradients of every THREADED_CASES entry, computed by the op on
    the CPU in a subprocess whose TensorFlow uses ``threads`` intra-op threads."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(dirnet_tf.__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = os.path.join(tmp, "inputs.npz"), os.path.join(tmp, "outputs.npz")
        arrays = {}
        for name in THREADED_CASES:
            for key, value in _threaded_case(name).items():
                arrays[f"{name}/{key}"] = np.asarray(value)
        np.savez(inputs, **arrays)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-c", _THREADED_SCRIPT, inputs, outputs,
                               str(threads)], cwd=package_root, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        with np.load(outputs) as results:
            return {key: results[key] for key in results.files}


@pytest.mark.parametrize("name", sorted(THREADED_CASES))
@pytest.mark.parametrize("threads", THREAD_COUNTS)
def test_cpu_backward_with_image_gradient_on_several_threads(threads, name):
    """Both gradients of many batch items, the items shared out to 2 or 4 threads."""
    results = _run_threaded_cases(threads)
    # The subprocess tested this package, not some other installed copy.
    assert str(results["dirnet_tf_file"]) == os.path.abspath(dirnet_tf.__file__)
    case = _threaded_case(name)
    value, grad_image, grad_coords = ref_bilinear(**case)
    np.testing.assert_allclose(value, ref_forward(case["image"], case["coords"], case["boundary"]),
                               atol=1e-12)  # the reference itself agrees with scipy
    np.testing.assert_allclose(results[name + "/value"], value, atol=1e-12)
    for b in range(case["image"].shape[0]):  # item by item: a wrong item is named
        np.testing.assert_allclose(results[name + "/grad_image"][b], grad_image[b], atol=1e-10,
                                   err_msg=f"image gradient of batch item {b}")
        np.testing.assert_allclose(results[name + "/grad_coords"][b], grad_coords[b], atol=1e-10,
                                   err_msg=f"coordinate gradient of batch item {b}")


@pytest.mark.parametrize("boundary", ["zeros", "border"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_numpy_gradient_reference_is_right(ndim, boundary):
    """ref_bilinear against scipy (value), central differences of scipy (coordinate
    gradient, off integers) and the loop scatter ref_image_grad (image gradient)."""
    rng = np.random.default_rng(70 + ndim)
    image, coords = random_case(rng, ndim, batch=2, channels=3, out_axes=(4, 5), low=-2.5)
    coords = off_integer(coords, margin=0.01)
    grad_out = rng.normal(size=(2, 4, 5, 3))
    value, grad_image, grad_coords = ref_bilinear(image, coords, grad_out, boundary)
    np.testing.assert_allclose(value, ref_forward(image, coords, boundary), atol=1e-12)
    np.testing.assert_allclose(grad_image, ref_image_grad(image.shape, coords, grad_out, boundary),
                               atol=1e-12)
    h = 1e-6
    for d in range(ndim):
        step = np.zeros(ndim)
        step[d] = h
        diff = ref_forward(image, coords + step, boundary) - ref_forward(image, coords - step, boundary)
        np.testing.assert_allclose(grad_coords[..., d], np.sum(diff / (2 * h) * grad_out, axis=-1),
                                   atol=1e-7)


# ------------------------------------------------ border mode: the image edges


def edge_values(n):
    """Coordinates on and around both edges of an axis of size n (and a few inside)."""
    last = n - 1.0
    return np.array([-1.0, -0.25, -1e-3, 0.0, 1e-3, 0.5, 1.0, last - 1.0, last - 0.5,
                     last - 1e-3, last, last + 1e-3, last + 0.25, last + 1.0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ndim", [2, 3])
def test_border_value_and_gradients_at_the_edges(ndim, dtype):
    """Integer coordinates exactly at 0 and n-1 (and just inside/outside), all axes.

    Contract: the coordinate gradient is the derivative of the cell
    [floor(x), floor(x)+1] and 0 where x lies outside [0, n-1].  At x = n-1 that
    cell reaches past the image, where the clamped image is flat: the gradient
    is 0 there, while at x = 0 it is the slope into pixel 1.
    """
    spatial = (5, 6, 4)[:ndim]
    rng = np.random.default_rng(80 + ndim)
    image = rng.normal(size=(1, *spatial, 2)).astype(dtype)
    axes = [edge_values(n) for n in spatial]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, ndim).astype(dtype)
    grad_out = rng.normal(size=coords.shape[:-1] + (2,))
    out, gi, gc = grads(image, coords, "border", weights=grad_out.astype(dtype))
    out, gi, gc = out.numpy(), gi.numpy(), gc.numpy()
    tol = 1e-12 if dtype == np.float64 else 2e-5

    x = coords.astype(np.float64)
    img = image.astype(np.float64)
    np.testing.assert_allclose(out, ref_forward(img, x, "border"), atol=tol)
    np.testing.assert_allclose(gi, ref_image_grad(image.shape, x, grad_out, "border"), atol=tol)
    last = np.array(spatial, np.float64) - 1
    for d in range(ndim):
        # Explicit formula: the value difference across the cell [floor(x), floor(x)+1]
        # of scipy's clamped ("nearest") interpolation, which is flat outside [0, n-1].
        low, high = x.copy(), x.copy()
        low[..., d] = np.floor(x[..., d])
        high[..., d] = low[..., d] + 1
        cell = ref_forward(img, high, "border") - ref_forward(img, low, "border")
        expected = np.sum(cell * grad_out, axis=-1)
        np.testing.assert_allclose(gc[..., d], expected, atol=tol, err_msg=f"axis {d}")
        # The same from one-sided (right) differences of scipy.
        h = 1e-7
        shifted = x.copy()
        shifted[..., d] += h
        right = (ref_forward(img, shifted, "border") - ref_forward(img, x, "border")) / h
        np.testing.assert_allclose(expected, np.sum(right * grad_out, axis=-1), atol=1e-6)
        # Exactly 0 at n-1 and outside; the slope into pixel 1 at 0.
        flat = (x[..., d] >= last[d]) | (x[..., d] < 0)
        assert np.sum(flat) > 0 and np.all(gc[..., d][flat] == 0.0), f"axis {d}"
        # (This image has a nonzero slope at every x = 0 point, so a gradient
        # dropped at the lower edge would be seen.)
        at_zero = x[..., d] == 0
        assert np.sum(at_zero) > 0 and np.all(expected[at_zero] != 0), f"axis {d}"
