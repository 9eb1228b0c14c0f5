"""Geometry and spline helpers behind the exact point map (dirnet_tf.geometry, dirnet_tf.spline_np)."""

import numpy as np
import pytest

from dirnet_tf import spline_np
from dirnet_tf.geometry import pixel_affine

def test_control_point_recovery_and_pixel_space():
    """The helpers behind the exact point map, checked on fields built here.

    Plausible bugs caught: a pseudo-inverse along the wrong axis (recovery is
    only exact with all axes right), a rank-deficient fit (spacing 1) called
    exact, a finer grid spacing detected than the field's, the pixel affine not
    matching how ITK places a PNG's pixels.
    """
    from dirnet_tf.bspline import bspline_displacement
    from dirnet_tf.spline_np import spline_displacement_at

    rng = np.random.default_rng(0)
    for shape, spacing in (((23, 30), (4, 8)), ((9, 14, 11), (2, 4, 4))):
        grid = tuple(int(np.ceil((n - 1) / s)) + 3 for n, s in zip(shape, spacing))
        cp = rng.normal(0, 1, grid + (len(shape),))
        dense = np.asarray(bspline_displacement(cp[None], shape, spacing))[0]
        got, exact, residual = spline_np.recover_control_points(dense, spacing)
        assert exact and residual < 1e-10
        np.testing.assert_allclose(got, cp, atol=1e-9)
        axes = [rng.uniform(-3, n + 2, 5) for n in shape]
        points = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        np.testing.assert_allclose(spline_np.spline_on_axes(cp, spacing, axes), spline_displacement_at(cp, spacing, points),
                                   atol=1e-12)
    cp = rng.normal(0, 1, (7, 7, 2))
    dense = np.asarray(bspline_displacement(cp[None], (28, 28), 8))[0].astype(np.float32)
    assert spline_np.detect_grid_spacing(dense) == (8, 8)
    assert spline_np.detect_grid_spacing(rng.normal(0, 1, (28, 28, 2))) is None
    assert not spline_np.recover_control_points(dense, (1, 1))[1]
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.GetImageFromArray(np.zeros((5, 7), np.float32))  # numpy [i, j]: ITK x = j
    image.SetSpacing((0.7, 1.9))  # (x, y) = (j, i)
    affine = pixel_affine((1.9, 0.7))  # spacing per array axis i, j
    lps = np.array(image.TransformContinuousIndexToPhysicalPoint((2.5, 4.0)))  # x = j = 2.5, y = i = 4
    np.testing.assert_allclose(np.diag([-1, -1, 1]) @ (affine[:3, :3] @ [4.0, 2.5, 0] + affine[:3, 3]),
                               list(lps) + [0], atol=1e-12)
