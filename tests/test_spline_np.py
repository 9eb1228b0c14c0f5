"""The numpy spline (dirnet_tf.spline_np): basis, grid rule, exact evaluation, chains, recovery."""

import math

import numpy as np
import pytest

from dirnet_tf.spline_np import (
    affine_step_matrix,
    axis_basis,
    control_grid_shape,
    cubic_bspline,
    detect_grid_spacing,
    fit_tolerance,
    map_points_bspline,
    map_points_chain,
    normalize_spacing,
    recover_control_points,
    spline_displacement_at,
    spline_on_axes,
)
from tests.transform_cases import (
    beta3_reference,
    brute_force,
    case,
    chain_case,
    ours,
    voxels,
)


@pytest.mark.parametrize("ndim", [2, 3])
def test_map_points_at_voxels_equals_dense_field(ndim):
    shape, spacing, cp, _ = case(ndim)
    u, _ = ours(cp, shape, spacing, np.zeros(shape))
    grid = voxels(shape)
    mapped = map_points_bspline(cp, spacing, grid)
    np.testing.assert_allclose(mapped - grid, u, atol=1e-5)
    assert np.max(np.abs(mapped - grid - u)) < 1e-10  # float64 throughout
    assert np.max(np.abs(u)) > 0.5  # a real deformation


@pytest.mark.parametrize("ndim", [2, 3])
def test_map_points_subvoxel_equals_brute_force_sum(ndim):
    shape, spacing, cp, _ = case(ndim, seed=1)
    rng = np.random.default_rng(5)
    # Inside the image, beyond it (where the spline tails off), and on exact knots.
    pts = rng.uniform(-3 * np.asarray(spacing), np.asarray(shape) + 2 * np.asarray(spacing), (40, ndim))
    pts[:3] = np.asarray(spacing) * np.array([[-1], [0], [2]])
    np.testing.assert_allclose(map_points_bspline(cp, spacing, pts), brute_force(cp, spacing, pts),
                               rtol=0, atol=1e-12)
    # Control point 0 sits at voxel -s and its basis spans 2 s: nothing reaches below -3 s.
    far = -3.0 * np.asarray(spacing, float)[None] - 1e-9
    np.testing.assert_array_equal(map_points_bspline(cp, spacing, far), far)


def test_map_points_keeps_shape_and_accepts_batch_axis():
    shape, spacing, cp, _ = case(2)
    pts = np.random.default_rng(2).uniform(0, 19, (3, 5, 2))
    out = map_points_bspline(cp[None], spacing, pts)
    assert out.shape == (3, 5, 2)
    np.testing.assert_allclose(out, map_points_bspline(cp, spacing, pts.reshape(-1, 2)).reshape(3, 5, 2))


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_step_matrix_is_the_affine_stage(ndim):
    """``x + affine_displacement(params)(x)`` is the homogeneous map of :func:`affine_step_matrix`."""
    from dirnet_tf.affine import affine_displacement

    shape, _, params, steps = chain_case(ndim)
    u = np.asarray(affine_displacement(params[None], shape))[0]
    matrix = steps[0]["matrix"]
    grid = voxels(shape)
    np.testing.assert_allclose(grid @ matrix[:ndim, :ndim].T + matrix[:ndim, ndim], grid + u, atol=1e-10)
    np.testing.assert_allclose(affine_step_matrix(params[None], shape), matrix)  # a batch axis of 1
    with pytest.raises(ValueError, match="affine step parameters"):
        affine_step_matrix(params[:-1], shape)


# --------------------------------------------------------------------------- #
# Against the TensorFlow field (dirnet_tf.bspline), recovery, grid rule
# --------------------------------------------------------------------------- #


def _tf_field(cp, shape, spacing, orders=None):
    from dirnet_tf.bspline import bspline_derivative

    return np.asarray(bspline_derivative(np.asarray(cp, np.float64)[None], shape, spacing, orders))[0]


@pytest.mark.parametrize("shape, spacing", [((20, 24), (4, 5)), ((17, 9), 3), ((12, 14, 10), (4, 3, 3)),
                                             ((9, 11, 7), 2)])
def test_numpy_spline_equals_tensorflow_field(shape, spacing):
    """spline_on_axes, spline_displacement_at and axis_basis derivatives agree with bspline_derivative."""
    ndim = len(shape)
    grid = control_grid_shape(shape, spacing)
    cp = np.random.default_rng(21).normal(0, 2.0, grid + (ndim,))
    u = _tf_field(cp, shape, spacing)
    axes = [np.arange(n) for n in shape]
    np.testing.assert_allclose(spline_on_axes(cp, spacing, axes), u, rtol=0, atol=1e-10)
    np.testing.assert_allclose(spline_displacement_at(cp, spacing, voxels(shape)), u, rtol=0, atol=1e-10)
    # First derivative along axis 0 (per voxel): one axis_basis of derivative 1, the others plain.
    s = normalize_spacing(spacing, ndim)
    out = cp
    for d, n in enumerate(shape):
        w = axis_basis(np.arange(n), s[d], grid[d], derivative=int(d == 0))
        out = np.moveaxis(np.tensordot(w, out, axes=([1], [d])), 0, d)
    orders = tuple(int(d == 0) for d in range(ndim))
    np.testing.assert_allclose(out, _tf_field(cp, shape, spacing, orders), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape,spacing", [((28, 28), 8), ((7, 9), (3, 2)), ((5, 6, 7), (2, 3, 4)),
                                           ((1, 17), (5, 1))])
def test_control_grid_shape_covers_every_support(shape, spacing):
    grid = control_grid_shape(shape, spacing)
    s = spacing if isinstance(spacing, tuple) else (spacing,) * len(shape)
    for n, sd, k in zip(shape, s, grid):
        assert k == math.ceil((n - 1) / sd) + 3
        # Every control point influences some pixel and every pixel's support
        # (the knots k with |x/s - k + 1| < 2) lies inside the grid.
        used = set()
        for x in range(n):
            support = [j for j in range(-5, k + 5) if beta3_reference(x / sd - j + 1) != 0.0]
            assert min(support) >= 0 and max(support) <= k - 1
            used.update(support)
        assert used == set(range(k))


def test_basis_partition_of_unity_and_spacing_rule():
    t = np.linspace(0, 1, 11)
    total = sum(cubic_bspline(t - k) for k in (-2, -1, 0, 1, 2))
    np.testing.assert_allclose(total, 1.0, atol=1e-15)
    assert cubic_bspline(2.0) == 0.0 and cubic_bspline(0.0) == pytest.approx(2 / 3)
    import dirnet_tf

    assert dirnet_tf.control_grid_shape is control_grid_shape  # one rule, also the TF field's
    assert dirnet_tf.control_grid_shape((13, 9), 4) == (6, 5) == control_grid_shape((13, 9), (4, 4))
    assert normalize_spacing(4, 3) == normalize_spacing([4], 3) == normalize_spacing(np.array([4.0, 4, 4]), 3)
    with pytest.raises(ValueError, match="positive"):  # from test_bspline's test_bad_input
        control_grid_shape((10, 12), 0)
    with pytest.raises(ValueError, match="2 entries|spatial axes"):
        control_grid_shape((10, 12), (2, 2, 2))
    for bad, message in [(0, "positive"), ((4, 3), "2 entries"), ("four", "grid_spacing"), (2.5, "positive"),
                         (True, "grid_spacing")]:
        with pytest.raises(ValueError, match=message):
            normalize_spacing(bad, 3)


@pytest.mark.parametrize("shape, spacing", [((28, 28), (4, 4)), ((33, 20), (8, 4)), ((24, 20, 18), (4, 4, 4))])
def test_recover_control_points_round_trip(shape, spacing):
    """Dense TF field -> recovered control points -> the same control points and the same field."""
    ndim = len(shape)
    cp = np.random.default_rng(22).normal(0, 1.5, control_grid_shape(shape, spacing) + (ndim,))
    u = _tf_field(cp, shape, spacing)
    recovered, exact, residual = recover_control_points(u, spacing)
    assert exact and residual < 1e-10
    np.testing.assert_allclose(recovered, cp, atol=1e-8)
    # float32 round-off stays within the tolerance, and the spacing is found again.
    u32 = u.astype(np.float32)
    _, _, residual32 = recover_control_points(u32, spacing)
    assert residual32 <= fit_tolerance(u32)
    if len(set(spacing)) == 1:
        assert detect_grid_spacing(u32) == spacing


def test_detect_grid_spacing_rejects_a_field_that_is_no_spline():
    rng = np.random.default_rng(23)
    assert detect_grid_spacing(rng.normal(size=(20, 20, 2))) is None
    # A spline of spacing 4 is also one of spacing 2, but not of 8: the coarsest exact fit is 4.
    cp = rng.normal(size=control_grid_shape((33, 33), 4) + (2,))
    assert detect_grid_spacing(_tf_field(cp, (33, 33), 4)) == (4, 4)


def test_chain_and_point_errors():
    shape, spacing, cp, _ = case(2)
    pts = np.random.default_rng(24).uniform(0, 19, (6, 2))
    shift = np.eye(3)
    shift[:2, 2] = [1.5, -2.0]
    steps = [{"kind": "affine", "matrix": shift}, {"kind": "spline", "control_points": cp, "grid_spacing": spacing}]
    np.testing.assert_allclose(map_points_chain(steps, pts), map_points_bspline(cp, spacing, pts) + [1.5, -2.0])
    np.testing.assert_allclose(map_points_chain([], pts), pts)
    with pytest.raises(ValueError, match="a step must be"):
        map_points_chain([{"kind": "spline", "control_points": cp}], pts)
    with pytest.raises(ValueError, match="homogeneous"):
        map_points_chain([{"kind": "affine", "matrix": np.eye(2)}], pts)
    with pytest.raises(ValueError, match=r"shape \[\*K, ndim\].*\(7, 6, 4\)"):
        map_points_bspline(np.zeros((7, 6, 4)), 4, np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"points_ij.*\(5, 3\)"):
        spline_displacement_at(cp, spacing, np.zeros((5, 3)))
