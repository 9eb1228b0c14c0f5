"""Losses and regularisers against numpy references; numerical gradients."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

import dirnet_tf
from dirnet_tf import losses


def ncc_ref(a, b, eps):
    a = a - a.mean()
    b = b - b.mean()
    return (a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean() + eps)


def local_ncc_ref(a, b, window, eps):
    """Windowed NCC with boxes cut at the border, one channel at a time, by loops."""
    spatial = a.shape[:-1]
    half = [(w - 1) // 2 for w in window]
    vals = []
    for c in range(a.shape[-1]):
        for x in itertools.product(*[range(n) for n in spatial]):
            box = tuple(slice(max(0, x[d] - half[d]), min(spatial[d], x[d] - half[d] + window[d]))
                        for d in range(len(spatial)))
            pa, pb = a[box + (c,)], b[box + (c,)]
            cov = (pa * pb).mean() - pa.mean() * pb.mean()
            va = max((pa * pa).mean() - pa.mean() ** 2, 0.0)
            vb = max((pb * pb).mean() - pb.mean() ** 2, 0.0)
            vals.append(cov / np.sqrt(va * vb + eps))
    return np.mean(vals)


def test_global_ncc():
    rng = np.random.default_rng(0)
    a = rng.random((3, 9, 8, 2))
    b = rng.random((3, 9, 8, 2))
    got = losses.ncc(a, b, eps=1e-5).numpy()
    np.testing.assert_allclose(got, [ncc_ref(a[i], b[i], 1e-5) for i in range(3)], rtol=1e-6)
    np.testing.assert_allclose(losses.ncc(a, 2 * a + 1, eps=0.0).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(losses.ncc(a, -a, eps=0.0).numpy(), -1.0, rtol=1e-6)
    # The loss is -NCC: signed, not squared.
    np.testing.assert_allclose(float(losses.ncc_loss(a, -a, eps=0.0)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(losses.ncc_loss(a, b, reduction="none").numpy(), -got, rtol=1e-6)
    np.testing.assert_allclose(float(losses.ncc_loss(a, b)), -got.mean(), rtol=1e-6)
    graph = tf.function(lambda x, y: losses.ncc_loss(x, y))
    np.testing.assert_allclose(float(graph(a, b)), -got.mean(), rtol=1e-5)


@pytest.mark.parametrize("shape,window", [((7, 6), (3, 3)), ((7, 6), (5, 2)), ((4, 5, 3), (3, 3, 3))])
def test_local_ncc(shape, window):
    rng = np.random.default_rng(1)
    a = rng.random((2,) + shape + (2,))
    b = 0.5 * a + rng.random(a.shape)
    got = losses.local_ncc(a, b, window=window, eps=1e-5).numpy()
    ref = [local_ncc_ref(a[i], b[i], window, 1e-5) for i in range(2)]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(losses.local_ncc_loss(a, b, window=window)), -np.mean(got),
                               rtol=1e-5)
    # float32 goes through avg_pool, float64 through cumulative sums: same result.
    got32 = losses.local_ncc(a.astype(np.float32), b.astype(np.float32), window=window, eps=1e-5)
    np.testing.assert_allclose(got32.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_mse():
    rng = np.random.default_rng(2)
    a = rng.random((2, 5, 4, 1))
    b = rng.random((2, 5, 4, 1))
    np.testing.assert_allclose(losses.mse_loss(a, b, reduction="none").numpy(),
                               ((a - b) ** 2).reshape(2, -1).mean(1), rtol=1e-6)
    assert losses.get("mse") is losses.mse_loss and losses.get("ncc") is losses.ncc_loss
    with pytest.raises(ValueError, match="unknown similarity"):
        losses.get("cosine")
    with pytest.raises(ValueError, match="same shape"):
        losses.mse_loss(a, b[:, :4])


@pytest.mark.parametrize("fn", [losses.ncc_loss, losses.local_ncc_loss, losses.mse_loss])
@pytest.mark.parametrize("ndim", [2, 3])
def test_constant_images_are_finite(fn, ndim):
    shape = (1,) + (5,) * ndim + (1,)
    const = tf.fill(shape, 0.7)
    varying = tf.constant(np.random.default_rng(3).random(shape), tf.float32)
    for a, b in [(const, const), (const, varying), (varying, const)]:
        with tf.GradientTape() as tape:
            tape.watch(b)
            value = fn(a, b)
        grad = tape.gradient(value, b)
        assert np.isfinite(float(value)), fn.__name__
        assert np.isfinite(grad.numpy()).all(), fn.__name__
    if fn is not losses.mse_loss:
        assert abs(float(fn(const, varying))) < 1e-4  # correlation with a constant is 0


def test_similarity_gradients_numerical():
    rng = np.random.default_rng(4)
    a = tf.constant(rng.random((1, 5, 4, 1)))
    b = tf.constant(rng.random((1, 5, 4, 1)))
    for fn in (lambda y: losses.ncc_loss(a, y), lambda y: losses.local_ncc_loss(a, y, window=3),
               lambda y: losses.mse_loss(a, y)):
        fn = tf.function(fn)
        theoretical, numerical = tf.test.compute_gradient(fn, [b])
        np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
        assert np.abs(theoretical[0]).max() > 0


def bending_ref(cp, shape, spacing):
    """Bending energy by brute force from the analytic B-spline derivatives."""
    def beta(t, m):
        a = abs(t)
        s = np.sign(t)
        if m == 0:
            return 2 / 3 - a * a + a**3 / 2 if a < 1 else ((2 - a) ** 3 / 6 if a < 2 else 0.0)
        if m == 1:
            return s * (-2 * a + 1.5 * a * a) if a < 1 else (s * -0.5 * (2 - a) ** 2 if a < 2 else 0.0)
        return -2 + 3 * a if a < 1 else (2 - a if a < 2 else 0.0)

    ndim = len(shape)
    grid = cp.shape[:-1]
    # tables[d][m][x, k] = d^m/dx^m beta(x / s - k + 1), from the scalar formulas.
    tables = [[np.array([[beta(x / spacing[d] - k + 1, m) / spacing[d] ** m
                          for k in range(grid[d])] for x in range(shape[d])])
               for m in range(3)] for d in range(ndim)]
    total = 0.0
    for d in range(ndim):
        for e in range(ndim):
            orders = [0] * ndim
            orders[d] += 1
            orders[e] += 1
            field = cp
            for i in range(ndim):
                # contract grid axis i of `field` with tables[i][orders[i]]
                field = np.moveaxis(np.tensordot(tables[i][orders[i]], field, axes=([1], [i])), 0, i)
            total += (field**2).sum()
    return total / np.prod(shape)


@pytest.mark.parametrize("shape,spacing", [((6, 7), (2, 3)), ((3, 4, 3), (2, 2, 1))])
def test_bending_energy(shape, spacing):
    grid = dirnet_tf.control_grid_shape(shape, spacing)
    ndim = len(shape)
    cp = np.random.default_rng(5).normal(size=(2,) + grid + (ndim,))
    got = losses.bending_energy(cp, shape, spacing, reduction="none").numpy()
    np.testing.assert_allclose(got, [bending_ref(cp[i], shape, spacing) for i in range(2)],
                               rtol=1e-6)
    # Affine fields do not bend.
    A = np.random.default_rng(6).normal(size=(ndim, ndim))
    pos = np.stack(np.meshgrid(*[(np.arange(k) - 1.0) * s for k, s in zip(grid, spacing)],
                               indexing="ij"), -1)
    affine = (pos @ A.T + 3.0)[None]
    assert float(losses.bending_energy(affine, shape, spacing)) < 1e-10
    theoretical, numerical = tf.test.compute_gradient(
        tf.function(lambda c: losses.bending_energy(c, shape, spacing)), [tf.constant(cp[:1])])
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_and_folding_penalty(ndim):
    rng = np.random.default_rng(7)
    shape = (2,) + (5, 4, 3)[:ndim] + (ndim,)
    u = rng.normal(scale=0.8, size=shape)
    det = losses.jacobian_determinant(u).numpy()
    ref = np.empty(shape[:-1])
    for b in range(shape[0]):
        jac = np.stack([np.stack(np.gradient(u[b, ..., c]), -1) for c in range(ndim)], -2)
        ref[b] = np.linalg.det(jac + np.eye(ndim))
    np.testing.assert_allclose(det, ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(det, dirnet_tf.metrics.jacobian_determinant(u), rtol=1e-6,
                               atol=1e-9)
    assert (ref <= 0).any() and (ref > 0).any()
    pen = losses.folding_penalty(u, epsilon=0.1, reduction="none").numpy()
    np.testing.assert_allclose(pen, np.maximum(0.1 - ref, 0).reshape(2, -1).mean(1), rtol=1e-6)
    # Identity: no folding at all; gradient of the penalty is finite.
    assert float(losses.folding_penalty(np.zeros(shape))) == 0.0
    theoretical, numerical = tf.test.compute_gradient(
        tf.function(lambda v: losses.folding_penalty(v, epsilon=0.1)), [tf.constant(u[:1])])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-5)
    with pytest.raises(ValueError, match="displacement"):
        losses.jacobian_determinant(np.zeros((1, 4, 4, 3)))


@pytest.mark.parametrize("size", [2, 3, 6])
@pytest.mark.parametrize("axis", [1, 2])
def test_np_gradient_and_its_written_out_gradient(size, axis):
    """The finite differences behind the Jacobian are np.gradient, and their hand-written adjoint is the
    gradient (checked against finite differences), for every length the edge rules treat apart."""
    from dirnet_tf.losses import _np_gradient

    shape = [2, 5, 4, 2]
    shape[axis] = size
    x = np.random.default_rng(size + axis).normal(size=shape)
    np.testing.assert_allclose(_np_gradient(tf.constant(x), axis).numpy(), np.gradient(x, axis=axis), rtol=1e-12)
    theoretical, numerical = tf.test.compute_gradient(lambda t: _np_gradient(t, axis), [tf.constant(x)])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-7)


def test_registration_loss_matches_numpy():
    rng = np.random.default_rng(0)
    fixed = rng.random((3, 8, 8, 1)).astype(np.float32)
    warped = rng.random((3, 8, 8, 1)).astype(np.float32)
    cps = rng.normal(size=(3,) + dirnet_tf.control_grid_shape((8, 8), 4) + (2,)).astype(np.float32)
    out = {"warped": warped, "control_points": cps,
           "displacement": dirnet_tf.bspline_displacement(cps, (8, 8), 4)}
    per_pair, parts = losses.registration_objective("ncc")(fixed, out)

    def ncc(a, b):  # the documented definition of dirnet_tf.losses.ncc (eps = 1e-5)
        a, b = a - a.mean(), b - b.mean()
        return (a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean() + 1e-5)

    ref = np.array([ncc(f, w) for f, w in zip(fixed, warped)])
    np.testing.assert_allclose(parts["ncc"].numpy(), ref, atol=1e-4)
    np.testing.assert_allclose(per_pair.numpy(), -ref, atol=1e-4)
    mse, _ = losses.registration_objective("mse")(fixed, out)
    np.testing.assert_allclose(mse.numpy(), ((fixed - warped) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
    reg, parts = losses.registration_objective("ncc", bending_weight=0.5, folding_weight=2.0,
                                                 image_shape=(8, 8), grid_spacing=4)(fixed, out)
    np.testing.assert_allclose(
        reg.numpy(), -ref + 0.5 * parts["bending_energy"].numpy() + 2.0 * parts["folding_penalty"].numpy(),
        rtol=1e-5, atol=1e-5)
    assert (parts["bending_energy"].numpy() > 0).all()
    with pytest.raises(ValueError, match="unknown similarity"):
        losses.registration_objective("nope")


def test_folding_penalty_at_det_exactly_zero():
    """``folding_penalty`` where det J is exactly 0 (a collapsed, non-invertible map).

    Documented behaviour: with ``epsilon=0`` the penalty is ``relu(0 - det)``,
    so a pixel with ``det J == 0`` costs 0 *and* has zero gradient (TF's
    ``relu'(0) = 0``) -- unlike :func:`dirnet_tf.metrics.folding_fraction`,
    which counts it as folding (``det <= 0``).  Only ``epsilon > 0`` pushes
    collapsed pixels back (each costs ``epsilon``).

    Field (hand-computed, as in ``tests/test_metrics.py``): 8x6 pixels, only
    ``u_0`` non-zero so ``det J = 1 + du0/di`` exactly; columns 1-2 hold
    ``u_0 = -clip(i, 2, 5)`` -> det ``[1, 1, .5, 0, 0, .5, 1, 1]`` down the rows
    (4 pixels exactly 0); column 5 holds ``u_0 = -2 i`` -> det -1 (8 pixels).

    Plausible bugs caught: ``relu(det - epsilon)`` (sign flip: identity pixels
    would cost), a ``reduction="none"`` that also averages over the batch, an
    ``epsilon`` that is ignored, a penalty that charges ``det == 0`` at
    ``epsilon=0`` (e.g. ``relu(epsilon - det + 1e-6)``), or a determinant that
    is not exactly 0 on the collapsed block in float32.
    """
    i = np.arange(8.0)
    u = np.zeros((2, 8, 6, 2), np.float32)
    u[0, :, 1:3, 0] = -np.clip(i, 2, 5)[:, None]
    u[0, :, 5, 0] = -2 * i
    det = losses.jacobian_determinant(u).numpy()
    det_by_hand = np.ones((8, 6))
    det_by_hand[:, 1:3] = np.array([1, 1, 0.5, 0, 0, 0.5, 1, 1])[:, None]
    det_by_hand[:, 5] = -1.0
    np.testing.assert_array_equal(det[0], det_by_hand)
    np.testing.assert_array_equal(det[1], np.ones((8, 6)))
    # epsilon = 0: only the 8 folded pixels cost (1 each); the 4 collapsed ones cost 0.
    pen = losses.folding_penalty(u, epsilon=0.0, reduction="none").numpy()
    np.testing.assert_allclose(pen, [8 * 1.0 / 48, 0.0], rtol=1e-6)
    assert float(losses.folding_penalty(u)) == pytest.approx(8 / 48 / 2, rel=1e-6)  # batch mean
    # epsilon = 0.1: collapsed pixels cost 0.1, folded ones 1.1, det 0.5 and 1 cost nothing.
    pen = losses.folding_penalty(u, epsilon=0.1, reduction="none").numpy()
    np.testing.assert_allclose(pen, [(4 * 0.1 + 8 * 1.1) / 48, 0.0], rtol=1e-6)
    # A field that only collapses (no det < 0): flat point of the epsilon = 0 penalty.
    collapsed = tf.constant(u[:1] * (np.arange(6) < 5)[None, None, :, None].astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(collapsed)
        flat = losses.folding_penalty(collapsed, epsilon=0.0)
        margin = losses.folding_penalty(collapsed, epsilon=0.1)
    assert float(flat) == 0.0
    assert not tape.gradient(flat, collapsed).numpy().any()
    assert float(margin) == pytest.approx(4 * 0.1 / 48, rel=1e-6)
    assert np.abs(tape.gradient(margin, collapsed).numpy()).max() > 0
