"""The compiled resampler ``dirnet_tf.resample`` against independent references.

Forward values are compared with ``scipy.ndimage.map_coordinates(order=1)``;
gradients with ``tf.test.compute_gradient`` (off integer coordinates), with
one-sided forward differences of the scipy reference (on integer coordinates,
where the contract asks for the right-sided derivative), and with a numpy
scatter reference for the image gradient.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

import dirnet_tf
from dirnet_tf.resample_pure_tf import resample_pure_tf as resample_tf
from dirnet_tf.resample_op import load_ops

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
            _, gi_tf, gc_tf = grads(image, coords, boundary, fn=resample_tf, weights=g)
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
