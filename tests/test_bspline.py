"""Cubic B-spline transformer: against the explicit tensor-product sum."""

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

import dirnet_tf
from dirnet_tf.bspline import bspline_derivative, contract_separable
from tests.transform_cases import beta3_reference as beta3_ref


def explicit_field(cp, image_shape, spacing, beta=beta3_ref):
    """u(x) = sum_k c_k prod_d beta(x_d / s_d - k_d + 1), by brute force."""
    cp = np.asarray(cp, np.float64)
    grid = cp.shape[1:-1]
    out = np.zeros((cp.shape[0],) + tuple(image_shape) + (cp.shape[-1],))
    for x in itertools.product(*[range(n) for n in image_shape]):
        for k in itertools.product(*[range(n) for n in grid]):
            w = 1.0
            for d in range(len(x)):
                w *= beta(x[d] / spacing[d] - k[d] + 1)
                if w == 0.0:
                    break
            if w:
                out[(slice(None),) + x] += w * cp[(slice(None),) + k]
    return out


CASES = [
    ((7, 9), (3, 2)),
    ((10, 6), (4, 4)),
    ((5, 6, 7), (2, 3, 4)),
]


@pytest.mark.parametrize("shape,spacing", CASES)
def test_matches_explicit_sum(shape, spacing):
    rng = np.random.default_rng(0)
    grid = dirnet_tf.control_grid_shape(shape, spacing)
    cp = rng.normal(size=(2,) + grid + (len(shape),)).astype(np.float32)
    expected = explicit_field(cp, shape, spacing)
    got = dirnet_tf.bspline_displacement(cp, shape, spacing).numpy()
    assert got.shape == (2,) + shape + (len(shape),)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    graph = tf.function(lambda c: dirnet_tf.bspline_displacement(c, shape, spacing))
    np.testing.assert_allclose(graph(tf.constant(cp)).numpy(), got, atol=1e-6)


def test_int_spacing_and_unknown_batch():
    shape = (11, 13)
    grid = dirnet_tf.control_grid_shape(shape, 4)
    cp = np.random.default_rng(1).normal(size=(3,) + grid + (2,)).astype(np.float32)
    fn = tf.function(
        lambda c: dirnet_tf.bspline_displacement(c, shape, 4),
        input_signature=[tf.TensorSpec((None,) + grid + (2,), tf.float32)],
    )
    np.testing.assert_allclose(fn(cp).numpy(), explicit_field(cp, shape, (4, 4)), atol=1e-5)


@pytest.mark.parametrize("shape,spacing", CASES)
def test_partition_of_unity_and_linear_reproduction(shape, spacing):
    ndim = len(shape)
    grid = dirnet_tf.control_grid_shape(shape, spacing)
    # Constant control points -> the same constant everywhere.
    const = np.arange(1, ndim + 1, dtype=np.float32) * 1.5
    cp = np.broadcast_to(const, (1,) + grid + (ndim,))
    field = dirnet_tf.bspline_displacement(cp, shape, spacing).numpy()
    np.testing.assert_allclose(field, np.broadcast_to(const, field.shape), atol=1e-5)
    # Linear field sampled at the control-point positions (k - 1) * s is reproduced.
    rng = np.random.default_rng(2)
    A = rng.normal(size=(ndim, ndim)) * 0.2
    b = rng.normal(size=ndim)
    pos = np.stack(np.meshgrid(*[(np.arange(k) - 1.0) * s for k, s in zip(grid, spacing)],
                               indexing="ij"), -1)
    cp = (pos @ A.T + b)[None].astype(np.float32)
    field = dirnet_tf.bspline_displacement(cp, shape, spacing).numpy()[0]
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    np.testing.assert_allclose(field, x @ A.T + b, atol=1e-4)


def test_gradient_numerical():
    shape, spacing = (6, 5), (2, 3)
    grid = dirnet_tf.control_grid_shape(shape, spacing)
    cp = np.random.default_rng(3).normal(size=(1,) + grid + (2,))
    theoretical, numerical = tf.test.compute_gradient(
        tf.function(lambda c: dirnet_tf.bspline_displacement(c, shape, spacing)),
        [tf.constant(cp)],
    )
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
    assert np.abs(theoretical[0]).sum() > 0


@pytest.mark.parametrize("grid,out,channels", [((5, 6), (7, 8), 2), ((4, 5, 6), (3, 7, 2), 3), ((6,), (9,), 1)])
@pytest.mark.parametrize("as_tensors", [False, True])
def test_contract_separable_matches_einsum_with_its_gradient(grid, out, channels, as_tensors):
    rng = np.random.default_rng(11)
    values = rng.normal(size=(3,) + grid + (channels,))
    mats = [rng.normal(size=(n, k)) for n, k in zip(out, grid)]
    axes, outs = "abc"[:len(grid)], "pqr"[:len(grid)]
    ref = np.einsum(f"z{axes}y," + ",".join(o + a for o, a in zip(outs, axes)) + f"->z{outs}y", values, *mats)
    given = [tf.constant(w) for w in mats] if as_tensors else mats
    got = contract_separable(tf.constant(values), given)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    theoretical, numerical = tf.test.compute_gradient(lambda v: contract_separable(v, given),
                                                      [tf.constant(values[:1])])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
    with pytest.raises(ValueError, match="static"):
        contract_separable(tf.constant(values[..., 0]), given)


def test_3d_gradient_numerical():
    shape, spacing = (3, 4, 3), (2, 1, 3)
    grid = dirnet_tf.control_grid_shape(shape, spacing)
    cp = np.random.default_rng(4).normal(size=(1,) + grid + (3,))
    theoretical, numerical = tf.test.compute_gradient(
        tf.function(lambda c: dirnet_tf.bspline_displacement(c, shape, spacing)),
        [tf.constant(cp)],
    )
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)


def test_derivatives_match_explicit_sum_with_derivative_splines():
    # Reference derivatives of beta3, checked against finite differences first.
    def d1(t):
        a = abs(t)
        sgn = math.copysign(1.0, t)
        if a < 1:
            return sgn * (-2 * a + 1.5 * a * a)
        if a < 2:
            return sgn * (-0.5 * (2 - a) ** 2)
        return 0.0

    def d2(t):
        a = abs(t)
        if a < 1:
            return -2 + 3 * a
        if a < 2:
            return 2 - a
        return 0.0

    h = 1e-5
    for t in np.linspace(-2.3, 2.3, 37):
        assert abs(d1(t) - (beta3_ref(t + h) - beta3_ref(t - h)) / (2 * h)) < 1e-6
        assert abs(d2(t) - (d1(t + h) - d1(t - h)) / (2 * h)) < 1e-4

    shape, spacing = (7, 8), (3, 2)
    grid = dirnet_tf.control_grid_shape(shape, spacing)
    cp = np.random.default_rng(5).normal(size=(1,) + grid + (2,)).astype(np.float32)
    table = {0: beta3_ref, 1: d1, 2: d2}
    for orders in [(1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]:
        ref = np.zeros((1,) + shape + (2,))
        for x in itertools.product(*[range(n) for n in shape]):
            for k in itertools.product(*[range(n) for n in grid]):
                w = 1.0
                for d in range(2):
                    w *= table[orders[d]](x[d] / spacing[d] - k[d] + 1) / spacing[d] ** orders[d]
                ref[(0,) + x] += w * cp[(0,) + k]
        got = bspline_derivative(cp, shape, spacing, orders).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=str(orders))


def test_identity_grid_and_warp():
    grid = dirnet_tf.identity_grid((3, 4)).numpy()
    assert grid.shape == (3, 4, 2) and grid.dtype == np.float32
    assert (grid[2, 1] == [2, 1]).all() and (grid[0, 3] == [0, 3]).all()
    grid3 = dirnet_tf.identity_grid((2, 3, 4)).numpy()
    assert grid3.shape == (2, 3, 4, 3) and (grid3[1, 2, 3] == [1, 2, 3]).all()

    rng = np.random.default_rng(6)
    image = rng.normal(size=(2, 5, 6, 1)).astype(np.float32)
    # A shift by exactly one pixel along axis 1 (ij order): warped(i, j) = image(i, j + 1).
    disp = np.zeros((2, 5, 6, 2), np.float32)
    disp[..., 1] = 1.0
    warped = dirnet_tf.warp(image, disp).numpy()
    np.testing.assert_allclose(warped[:, :, :-1], image[:, :, 1:], atol=1e-6)
    np.testing.assert_allclose(warped[:, :, -1], image[:, :, -1], atol=1e-6)  # border clamp
    zeros = dirnet_tf.warp(image, disp, boundary="zeros").numpy()
    np.testing.assert_allclose(zeros[:, :, -1], 0.0, atol=1e-6)
    # Label maps: warp one-hot then argmax.
    labels = rng.integers(0, 3, size=(2, 5, 6)).astype(np.int32)
    warped_labels = dirnet_tf.warping.warp_labels(labels, disp).numpy()
    assert (warped_labels[:, :, :-1] == labels[:, :, 1:]).all()
    assert warped_labels.dtype == np.int32


def test_bad_input():
    with pytest.raises(ValueError, match=r"control_grid_shape|shape \[B, 6, 7"):
        dirnet_tf.bspline_displacement(np.zeros((1, 5, 7, 2), np.float32), (10, 12), 3)
    with pytest.raises(ValueError, match="one displacement component"):
        dirnet_tf.bspline_displacement(np.zeros((1, 6, 7, 3), np.float32), (10, 12), 3)
    with pytest.raises(ValueError, match="displacement"):
        dirnet_tf.warp(np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 4, 5, 2), np.float32))
