"""Folding-free B-spline fields: the injectivity bound, det(I + Du), composition.

Adversarial control grids are built here in numpy: at a chosen pixel, row ``a``
of ``Du`` is linear in the ``a``-th control-point components and the
determinant is affine in each row, so the sign pattern (``c = +-K s``) that
minimises it row by row is found exactly; alternating over the rows from
several starts gives the configurations that come closest to folding (see the
comment block above ``INJECTIVITY_BOUND`` in ``dirnet_tf/bspline.py``).
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

import dirnet_tf
from dirnet_tf.bspline import (
    INJECTIVITY_BOUND,
    bounded_control_points,
    bspline_displacement,
    bspline_jacobian_determinant,
    injectivity_bound,
)
from dirnet_tf.spline_np import control_grid_shape, cubic_bspline
from dirnet_tf.warping import compose_displacements, identity_grid, warp

# The sharp thresholds (fraction of the spacing) of the per-axis box condition,
# Choi & Lee (2000): det(I + Du) > 0 everywhere below, some grid folds above.
SHARP = {2: 1.0 / 2.046392, 3: 1.0 / 2.479472}


# ----------------------------------------------------------------------------
# numpy helpers
# ----------------------------------------------------------------------------


def generators(pixel, image_shape, spacing):
    """``g[k, b] = s_b * d phi_k / dx_b`` at ``pixel`` for every control point k.

    Returns ``[prod(K), ndim]`` (dimensionless; ``Du`` for normalised control
    points ``sigma = c / s`` is ``sigma^T g`` conjugated by ``diag(s)``).
    """
    grid = control_grid_shape(image_shape, spacing)
    n = len(grid)
    t = [pixel[d] / spacing[d] - np.arange(grid[d]) + 1.0 for d in range(n)]
    w0 = [cubic_bspline(x) for x in t]
    w1 = [cubic_bspline(x, 1) for x in t]
    out = []
    for b in range(n):
        ws = [w1[d] if d == b else w0[d] for d in range(n)]
        g = ws[0]
        for w in ws[1:]:
            g = np.multiply.outer(g, w)
        out.append(g.ravel())
    return np.stack(out, -1)


def cofactors(m):
    """Cofactor matrices of ``[..., n, n]`` (n = 2 or 3)."""
    n = m.shape[-1]
    c = np.empty_like(m)
    for i in range(n):
        for j in range(n):
            minor = np.delete(np.delete(m, i, -2), j, -1)
            c[..., i, j] = (-1) ** (i + j) * np.linalg.det(minor) if n == 3 else (
                (-1) ** (i + j) * minor[..., 0, 0]
            )
    return c


def worst_signs(g, k, rng, restarts=24, iters=15):
    """Signs ``sigma [ndim, m]`` (approximately) minimising ``det(I + k sigma g)``."""
    m, n = g.shape
    s = rng.choice([-1.0, 1.0], size=(restarts, n, m))
    for a, b in itertools.product(range(n), repeat=2):  # structured starts
        s[a * n + b, a] = -np.where(g[:, b] >= 0, 1.0, -1.0)
    for _ in range(iters):
        for a in range(n):
            cof = cofactors(np.eye(n) + k * s @ g)
            new = -np.sign(cof[:, a] @ g.T)  # exact minimiser over row a
            s[:, a] = np.where(new == 0, s[:, a], new)
    det = np.linalg.det(np.eye(n) + k * s @ g)
    return s[np.argmin(det)], det.min()


def adversarial_batch(ndim, spacing, k, rng):
    """One control grid per target pixel of a cell (up to symmetry), at ``|c| = k s``.

    Returns ``(control_points [B, *K, ndim] float64, image_shape, pixels,
    predicted det at each target pixel)``; control points that do not touch
    the target pixel get random signs (also at the bound).
    """
    shape = (3 * spacing + 1,) * ndim
    sp = (spacing,) * ndim
    grid = control_grid_shape(shape, sp)
    offsets = [t for t in itertools.product(range(spacing // 2 + 1), repeat=ndim)
               if list(t) == sorted(t)]
    pixels = [tuple(spacing + o for o in t) for t in offsets]
    cps, predicted = [], []
    for p in pixels:
        g = generators(p, shape, sp)
        sigma, det = worst_signs(g, k, rng)
        active = np.abs(g).sum(1) > 0
        sigma = np.where(active[None], sigma, rng.choice([-1.0, 1.0], size=sigma.shape))
        cps.append((k * spacing * sigma).T.reshape(grid + (ndim,)))
        predicted.append(det)
    return np.array(cps), shape, pixels, np.array(predicted)


def fd_det(u):
    """det(I + Du) of a dense field ``[*spatial, ndim]`` by central differences
    (one-sided at the border), pixels."""
    n = u.shape[-1]
    jac = np.stack(
        [np.stack(np.gradient(u[..., a], axis=tuple(range(n))), -1) for a in range(n)], -2
    )
    return np.linalg.det(jac + np.eye(n))


def random_bounded(rng, batch, shape, spacing, scale=100.0, dtype=tf.float32):
    """Regressor-like outputs squashed into the bound (mostly saturated)."""
    grid = control_grid_shape(shape, spacing)
    raw = tf.constant(rng.normal(0.0, scale, (batch,) + grid + (len(shape),)), dtype)
    return bounded_control_points(raw, spacing, len(shape))


# ----------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------


def test_injectivity_bound_values():
    assert injectivity_bound(4, 2) == pytest.approx((4 * INJECTIVITY_BOUND[2],) * 2)
    assert injectivity_bound((4, 8, 2), 3) == pytest.approx(
        (4 * INJECTIVITY_BOUND[3], 8 * INJECTIVITY_BOUND[3], 2 * INJECTIVITY_BOUND[3])
    )
    for n in (2, 3):  # safe side of the sharp constant, but not far from it
        assert 0.97 * SHARP[n] < INJECTIVITY_BOUND[n] < SHARP[n]
    with pytest.raises(ValueError):
        injectivity_bound(4, 1)
    with pytest.raises(ValueError):
        injectivity_bound((4, 4), 3)


def test_one_axis_derivative_sum_is_at_most_three_halves():
    # sum_i |beta3'(t - i + 1)| over the four active basis functions = 1 + 2t - 2t^2.
    t = np.linspace(0.0, 1.0, 1001)
    total = sum(np.abs(cubic_bspline(t - i + 1.0, 1)) for i in range(4))
    np.testing.assert_allclose(total, 1 + 2 * t - 2 * t**2, atol=1e-12)
    assert total.max() == pytest.approx(1.5)


# ----------------------------------------------------------------------------
# det(I + Du): analytic vs finite differences
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,spacing", [((11, 9), (4, 5)), ((9, 7, 8), (4, 3, 5))])
def test_jacobian_determinant_matches_finite_differences(shape, spacing):
    """Central differences of the dense field on an m-times finer pixel grid.

    With ``u_fine(y) = u(y / m)`` (same control points, spacing ``m s``), the
    central difference has error ``<= sup|d^3 u_a / dx_b^3| / (6 m^2)`` per
    Jacobian entry, and ``|d^3 u_a / dx_b^3| <= 8 max|c_a| / s_b^3`` (the
    third derivatives of the four active cubic pieces are +-1, +-3).  The
    determinant tolerance follows from multilinearity in the rows and
    Hadamard's inequality: ``prod(|r_a| + e_a) - prod(|r_a|)``.
    """
    rng = np.random.default_rng(0)
    n, m = len(shape), 4
    grid = control_grid_shape(shape, spacing)
    cp = rng.normal(0.0, 1.0, (2,) + grid + (n,)) * np.asarray(spacing) * 0.3
    det = bspline_jacobian_determinant(tf.constant(cp), shape, spacing).numpy()
    assert det.shape == (2,) + shape and det.dtype == np.float64

    fine_shape = tuple(m * (s - 1) + 1 for s in shape)
    fine_spacing = tuple(m * s for s in spacing)
    assert control_grid_shape(fine_shape, fine_spacing) == grid
    u = bspline_displacement(tf.constant(cp), fine_shape, fine_spacing).numpy()
    inner = tuple(slice(m, m * (s - 1), m) for s in shape)  # interior coarse pixels
    jac = np.empty((2,) + tuple(s - 2 for s in shape) + (n, n))
    for b in range(n):
        plus = tuple(slice(sl.start + (d == b), sl.stop + (d == b), m)
                     for d, sl in enumerate(inner))
        minus = tuple(slice(sl.start - (d == b), sl.stop - (d == b), m)
                      for d, sl in enumerate(inner))
        jac[..., b] = m * (u[(slice(None),) + plus] - u[(slice(None),) + minus]) / 2.0
    jac += np.eye(n)
    det_fd = np.linalg.det(jac)

    max_c = np.abs(cp).max(axis=tuple(range(n + 1)))  # per component a
    third = 8.0 * max_c[:, None] / np.asarray(spacing, np.float64)[None] ** 3  # [a, b]
    entry_err = third / (6.0 * m**2)  # [a, b]
    row_err = np.sqrt((entry_err**2).sum(1))
    rows = np.sqrt((jac**2).sum(-1))
    tol = np.prod(rows + row_err, -1) - np.prod(rows, -1) + 1e-12
    got = det[(slice(None),) + tuple(slice(1, s - 1) for s in shape)]
    assert np.all(np.abs(got - det_fd) <= tol)
    assert np.abs(got - det_fd).max() < 0.02  # and the comparison is not vacuous
    assert np.abs(det - 1).max() > 0.3

    det32 = bspline_jacobian_determinant(tf.constant(cp, tf.float32), shape, spacing)
    assert det32.dtype == tf.float32
    np.testing.assert_allclose(det32.numpy(), det, atol=1e-4)


def test_jacobian_determinant_identity_and_affine():
    # Control points of a linear field x -> A x reproduce it exactly: det = det(I + A).
    shape, spacing = (10, 13), (3, 4)
    grid = control_grid_shape(shape, spacing)
    a = np.array([[0.2, -0.3], [0.1, 0.15]])
    pos = np.stack(np.meshgrid(*[(np.arange(k) - 1.0) * s for k, s in zip(grid, spacing)],
                               indexing="ij"), -1)
    cp = (pos @ a.T)[None]
    det = bspline_jacobian_determinant(tf.constant(cp), shape, spacing).numpy()
    np.testing.assert_allclose(det, np.linalg.det(np.eye(2) + a), atol=1e-12)
    zero = bspline_jacobian_determinant(tf.zeros((1,) + grid + (2,)), shape, spacing)
    np.testing.assert_allclose(zero.numpy(), 1.0)
    with pytest.raises(ValueError):
        bspline_jacobian_determinant(tf.zeros((1,) + grid + (3,)), shape, spacing)


# ----------------------------------------------------------------------------
# the bound: no folding at it, folding just past it
# ----------------------------------------------------------------------------

CASES = [(2, 4), (2, 8), (3, 4), (3, 8)]


@pytest.mark.parametrize("ndim,spacing", CASES)
def test_no_folding_at_the_bound(ndim, spacing):
    rng = np.random.default_rng(ndim * 10 + spacing)
    k = INJECTIVITY_BOUND[ndim]
    adv, shape, pixels, predicted = adversarial_batch(ndim, spacing, k, rng)
    grid = adv.shape[1:-1]
    signs = k * spacing * rng.choice([-1.0, 1.0], size=(4,) + grid + (ndim,))
    uniform = k * spacing * rng.uniform(-1.0, 1.0, size=(4,) + grid + (ndim,))
    cps = np.concatenate([adv, signs, uniform])

    det = bspline_jacobian_determinant(tf.constant(cps, tf.float32), shape, spacing).numpy()
    at_target = np.array([det[(i,) + p] for i, p in enumerate(pixels)])
    np.testing.assert_allclose(at_target, predicted, atol=1e-5)
    assert det.min() > 0.0
    # The adversarial grids come close to folding (worst case 0.0086 .. 0.018),
    # so the check above is not vacuous.
    assert predicted.min() < 0.02

    u = bspline_displacement(tf.constant(cps), shape, spacing).numpy()
    assert min(fd_det(x).min() for x in u) > 0.0


@pytest.mark.parametrize("ndim,spacing", CASES)
def test_folding_just_past_the_bound(ndim, spacing):
    """The condition is sharp: 0.1 % below the Choi-Lee constant nothing folds,
    1 % above it (and 5 % above the adopted bound) an admissible grid folds."""
    rng = np.random.default_rng(ndim * 100 + spacing)
    below, shape, _, _ = adversarial_batch(ndim, spacing, 0.999 * SHARP[ndim], rng)
    assert bspline_jacobian_determinant(tf.constant(below), shape, spacing).numpy().min() > 0.0
    for k in (1.01 * SHARP[ndim], 1.05 * INJECTIVITY_BOUND[ndim], 1.3 * INJECTIVITY_BOUND[ndim]):
        cps, shape, pixels, predicted = adversarial_batch(ndim, spacing, k, rng)
        det = bspline_jacobian_determinant(tf.constant(cps, tf.float32), shape, spacing).numpy()
        assert det.min() <= 0.0, k
        assert predicted.min() <= 0.0
    # The same grids, scaled back into the bound, do not fold.
    inside = cps * INJECTIVITY_BOUND[ndim] / k
    assert bspline_jacobian_determinant(tf.constant(inside), shape, spacing).numpy().min() > 0.0


# ----------------------------------------------------------------------------
# bounded_control_points
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_bounded_control_points_huge_inputs(dtype):
    shape, spacing = (20, 17, 12), (4, 8, 2)
    grid = control_grid_shape(shape, spacing)
    bound = np.asarray(injectivity_bound(spacing, 3))
    rng = np.random.default_rng(0)
    raw = rng.choice([-1e6, 1e6, 0.0, 1e-3, -50.0], size=(2,) + grid + (3,))
    raw = tf.constant(raw, dtype)
    with tf.GradientTape() as tape:
        tape.watch(raw)
        out = bounded_control_points(raw, spacing, 3)
        loss = tf.reduce_sum(out**2)
    grad = tape.gradient(loss, raw).numpy()
    assert out.dtype == dtype and out.shape == raw.shape
    assert np.all(np.isfinite(grad))
    got = np.abs(out.numpy())
    assert np.all(got <= 0.99 * bound + 1e-6 * bound)
    assert np.all(got < bound)
    big = np.abs(raw.numpy()) == 1e6
    np.testing.assert_allclose(got[big], np.broadcast_to(0.99 * bound, got.shape)[big], rtol=1e-6)
    small = np.abs(raw.numpy()) == 1e-3
    np.testing.assert_allclose(out.numpy()[small], raw.numpy()[small], rtol=1e-5)  # ~identity
    det = bspline_jacobian_determinant(out, shape, spacing).numpy()
    assert det.min() > 0.0


def test_bounded_control_points_checks_and_margin():
    raw = tf.fill((1, 5, 5, 2), 1e6)
    np.testing.assert_allclose(
        bounded_control_points(raw, 4, 2, margin=0.5).numpy(), 0.5 * 4 * INJECTIVITY_BOUND[2],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        bounded_control_points(raw, 4, 2, margin=1.0).numpy(), 4 * INJECTIVITY_BOUND[2], rtol=1e-6
    )
    for margin in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError):
            bounded_control_points(raw, 4, 2, margin=margin)
    with pytest.raises(ValueError):
        bounded_control_points(raw, 4, 3)  # last axis must be ndim
    with pytest.raises(ValueError):
        bounded_control_points(tf.zeros((1, 5, 2)), 4, 2)
    assert bounded_control_points(tf.zeros((1, 3, 3, 2), tf.int32), 4, 2).dtype == tf.float32


# ----------------------------------------------------------------------------
# compose_displacements
# ----------------------------------------------------------------------------


def compose_reference(first, second, mode="nearest"):
    """``second(x) + first(x + second(x))`` with scipy (order 1)."""
    ndim = first.shape[-1]
    shape = first.shape[1:-1]
    axes = [np.arange(n, dtype=np.float64) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    out = np.empty_like(second)
    for i in range(first.shape[0]):
        pos = np.moveaxis(grid + second[i], -1, 0)
        for a in range(ndim):
            out[i, ..., a] = second[i, ..., a] + ndimage.map_coordinates(
                first[i, ..., a], pos, order=1, mode=mode
            )
    return out


@pytest.mark.parametrize("shape", [(13, 17), (7, 9, 8)])
@pytest.mark.parametrize("compiled", [False, True])
def test_compose_matches_scipy(shape, compiled):
    rng = np.random.default_rng(len(shape))
    n = len(shape)
    # Rough fields, large enough that many positions leave the image (border mode).
    first = rng.normal(0.0, 3.0, (2,) + shape + (n,))
    second = rng.normal(0.0, 3.0, (2,) + shape + (n,))
    fn = tf.function(compose_displacements) if compiled else compose_displacements
    got = fn(tf.constant(first), tf.constant(second))
    assert got.dtype == tf.float64 and got.shape == first.shape
    np.testing.assert_allclose(got.numpy(), compose_reference(first, second), atol=1e-10)
    got32 = fn(tf.constant(first, tf.float32), tf.constant(second, tf.float32))
    np.testing.assert_allclose(got32.numpy(), compose_reference(first, second), atol=2e-4)
    zeros = fn(tf.constant(first), tf.constant(second), boundary="zeros")
    np.testing.assert_allclose(
        zeros.numpy(), compose_reference(first, second, mode="grid-constant"), atol=1e-10
    )


def test_compose_order_and_checks():
    shape = (9, 11)
    rng = np.random.default_rng(3)
    first = tf.constant(rng.normal(0, 2, (1,) + shape + (2,)))
    zero = tf.zeros_like(first)
    np.testing.assert_allclose(compose_displacements(first, zero).numpy(), first.numpy())
    np.testing.assert_allclose(compose_displacements(zero, first).numpy(), first.numpy())
    # A constant shift followed by anything: first is sampled at x + second(x).
    shift = tf.constant(np.broadcast_to([2.0, -1.0], (1,) + shape + (2,)))
    assert not np.allclose(compose_displacements(first, shift).numpy(),
                           compose_displacements(shift, first).numpy())
    with pytest.raises(ValueError):
        compose_displacements(first, tf.zeros((1, 9, 10, 2), tf.float64))
    with pytest.raises(ValueError):
        compose_displacements(tf.zeros((1, 9, 11, 3)), tf.zeros((1, 9, 11, 3)))


def _smooth_fields(rng, shape, spacing, dtype=tf.float64):
    cps = [random_bounded(rng, 1, shape, spacing, scale=3.0, dtype=dtype) for _ in range(2)]
    return [bspline_displacement(c, shape, spacing) for c in cps]


def _inside(shape, positions, margin):
    """Mask of positions at least ``margin`` pixels inside the image on every axis."""
    hi = np.asarray(shape, np.float64) - 1.0 - margin
    return np.all((positions >= margin) & (positions <= hi), -1)


@pytest.mark.parametrize("shape,spacing", [((40, 36), 8), ((30, 28, 32), 8)])
def test_warp_once_is_exact_for_an_affine_image(shape, spacing):
    """Multilinear interpolation reproduces affine images exactly, so warping
    twice and warping once with the composed field agree to round-off wherever
    no clamping happens (positions ``max|first| + 1`` pixels inside)."""
    rng = np.random.default_rng(len(shape))
    n = len(shape)
    first, second = _smooth_fields(rng, shape, spacing)
    grid = identity_grid(shape, tf.float64).numpy()
    image = np.concatenate([grid, (grid @ rng.normal(size=n) + 3.0)[..., None]], -1)[None]
    twice = warp(warp(image, first), second).numpy()
    total = compose_displacements(first, second)
    once = warp(image, total).numpy()
    mask = _inside(shape, grid + second.numpy()[0], np.abs(first.numpy()).max() + 1.0)
    assert mask.mean() > 0.25  # thousands of pixels
    np.testing.assert_allclose(twice[0][mask], once[0][mask], atol=1e-9)
    # The coordinate channels of the twice-warped image are the total sampling map.
    np.testing.assert_allclose(twice[0][mask][:, :n], (grid + total.numpy()[0])[mask], atol=1e-9)
    # The other order is a different map.
    wrong = warp(image, compose_displacements(second, first)).numpy()
    assert np.abs(twice[0][mask] - wrong[0][mask]).max() > 0.1


@pytest.mark.parametrize("shape,spacing", [((64, 48), 16), ((33, 30, 32), 16)])
def test_warp_once_smooth_image(shape, spacing):
    """For a smooth image, twice-warped and once-warped differ by the error of
    interpolating the intermediate image ``g = warp(m, first)`` between
    pixels.  The multilinear interpolation error is at most ``sum_a
    max|d^2 g / dx_a^2| / 8``; ``g`` has kinks (it is itself interpolated),
    so the tolerance is twice the estimate from its second differences."""
    rng = np.random.default_rng(7)
    n = len(shape)
    first, second = _smooth_fields(rng, shape, spacing)
    grid = identity_grid(shape, tf.float64).numpy()
    image = np.prod([np.cos(2 * np.pi * grid[..., a] / (40.0 + 4 * a) + a) for a in range(n)], 0)
    image = image[None, ..., None]
    inter = warp(image, first)
    twice = warp(inter, second).numpy()
    once = warp(image, compose_displacements(first, second)).numpy()
    g = inter.numpy()[0, ..., 0]
    tol = 2.0 * sum(np.abs(np.diff(g, 2, axis=a)).max() for a in range(n)) / 8.0
    mask = _inside(shape, grid + second.numpy()[0], 0.0)
    err = np.abs(twice - once)[0, ..., 0][mask].max()
    assert err <= tol
    assert tol < 0.1


@pytest.mark.parametrize("shape,spacing", [((40, 36), 4), ((40, 36), 8), ((20, 18, 16), 4),
                                           ((24, 20, 18), 8)])
def test_composed_bounded_fields_do_not_fold(shape, spacing):
    rng = np.random.default_rng(sum(shape) + spacing)
    cps = [random_bounded(rng, 2, shape, spacing) for _ in range(2)]
    first, second = [bspline_displacement(c, shape, spacing) for c in cps]
    for c in cps:
        assert bspline_jacobian_determinant(c, shape, spacing).numpy().min() > 0.0
    total = compose_displacements(first, second).numpy().astype(np.float64)
    assert min(fd_det(t).min() for t in total) > 0.0
    # Adding the two fields instead is not the composition (and is not bounded).
    assert np.abs(total - (first + second).numpy()).max() > 0.5
