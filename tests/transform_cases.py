"""Shared cases of the interop tests (test_spline_np, test_itk, test_field_images, test_elastix_params).

The exports of :mod:`dirnet_tf.itk`, :mod:`dirnet_tf.field_images` and
:mod:`dirnet_tf.elastix_params` are tested against SimpleITK, ITK's NIfTI reader and
transformix; :mod:`dirnet_tf.spline_np` against the TensorFlow field and a brute-force sum.

Every geometric convention is checked against the other tool, not against our
own formulas: images are written with nibabel (RAS affine) and read by
SimpleITK / ITK, so the LPS flip and the axis order are ITK's own; the
B-spline parameterisation is checked by resampling with SimpleITK and
transformix and by ``TransformPoint``.

Tolerances.  Our ``warp`` and ITK's linear interpolator interpolate the same
samples multilinearly at the same continuous index.  What differs: the NIfTI
file holds the moving image in float32 (our warp uses the float64 values:
<= 6e-8 for values below 1) and its geometry in float32 (~1e-7 relative, so
positions differ by ~1e-7 voxel; the test images change by at most ~0.6 per
voxel); transformix also resamples in float32.  Observed differences are
3e-8 to 1.2e-7; the tests ask for 1e-6.  Voxels whose sampling position
falls outside ``[0, N - 1]`` are excluded: there ``warp`` clamps to the
border while ITK returns the default pixel value.

SimpleITK tests are skipped without SimpleITK; the transformix tests without
itk-elastix.
"""

import os
import re

import numpy as np
import pytest

from dirnet_tf.spline_np import affine_step_matrix

SHAPE_2D, SPACING_2D = (20, 24), (4, 5)
SHAPE_3D, SPACING_3D = (12, 14, 10), (4, 3, 3)


def rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def grid_affine(ndim):
    """Voxel -> RAS mm: rotation, anisotropic spacing, offset (3-D: also a flipped axis)."""
    a = np.eye(4)
    if ndim == 3:
        a[:3, :3] = rotation([0.3, -0.5, 0.8], 0.7) @ np.diag([-0.9, 1.3, 2.1])
        a[:3, 3] = [31.5, -22.0, 14.25]
    else:
        c, s = np.cos(0.4), np.sin(0.4)
        a[:2, :2] = np.array([[c, -s], [s, c]]) @ np.diag([0.8, 1.7])
        a[2, 2] = 3.0
        a[:3, 3] = [-12.0, 40.5, 7.0]
    return a


def case(ndim, seed=0):
    shape, spacing = (SHAPE_2D, SPACING_2D) if ndim == 2 else (SHAPE_3D, SPACING_3D)
    grid = tuple(int(np.ceil((n - 1) / s)) + 3 for n, s in zip(shape, spacing))
    rng = np.random.default_rng(seed)
    # Within the folding-free bound (0.4 s), large enough to move voxels by ~1-2.
    cp = rng.uniform(-0.4, 0.4, size=grid + (ndim,)) * np.asarray(spacing, float)
    return shape, spacing, cp, grid_affine(ndim)


def analytic(points):
    """Smooth test image at voxel positions ``points (..., ndim)`` (values in about [0.05, 0.95])."""
    p = np.asarray(points, float)
    v = 0.5 + 0.25 * np.sin(0.35 * p[..., 0] + 0.22 * p[..., 1] + 0.3)
    v = v + 0.2 * np.cos(0.18 * p[..., 0] - 0.27 * p[..., 1])
    if p.shape[-1] == 3:
        v = 0.8 * v + 0.1 + 0.1 * np.sin(0.3 * p[..., 2] - 0.2 * p[..., 0])
    return v


def voxels(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)


def ours(cp, shape, spacing, moving):
    """Dense displacement (voxels ij) and warped image from the library (TensorFlow, float64)."""
    import dirnet_tf
    from dirnet_tf.bspline import bspline_displacement

    u = bspline_displacement(np.asarray(cp, np.float64)[None], shape, spacing)
    warped = dirnet_tf.warp(np.asarray(moving, np.float64)[None, ..., None], u)
    return np.asarray(u)[0], np.asarray(warped)[0, ..., 0]


def inside_grid(u, shape):
    pos = voxels(shape) + u
    return np.all((pos >= 0) & (pos <= np.asarray(shape) - 1), axis=-1)


def beta3_reference(t):
    """Uniform cubic B-spline of one number, written out piece by piece (independent of the library)."""
    t = abs(float(t))
    if t < 1:
        return 2.0 / 3.0 - t * t + t**3 / 2.0
    if t < 2:
        return (2.0 - t) ** 3 / 6.0
    return 0.0


def brute_force(cp, spacing, points):
    """Independent evaluation: the full double sum / triple sum over every control point."""
    beta = beta3_reference
    out = []
    for x in np.asarray(points, float).reshape(-1, cp.shape[-1]):
        u = np.zeros(cp.shape[-1])
        for k in np.ndindex(*cp.shape[:-1]):
            w = np.prod([beta(x[d] / spacing[d] - k[d] + 1) for d in range(len(k))])
            if w:
                u += w * cp[k]
        out.append(x + u)
    return np.array(out)


def need_simpleitk():
    """SimpleITK, or skip the test (an optional extra: ``pip install -e .[medical]``)."""
    return pytest.importorskip("SimpleITK")


def nifti_moving(tmp_path, moving, affine, name="moving.nii.gz"):
    """The moving image written by nibabel (RAS affine), as ITK reads it."""
    nib = pytest.importorskip("nibabel")
    path = str(tmp_path / name)
    nib.Nifti1Image(np.asarray(moving, np.float32), affine).to_filename(path)
    return path


def resample_itk(sitk, image, transform):
    return sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0,
                                                sitk.sitkFloat64)).T


def report(name, diff):
    print(f"{name}: max |difference| {np.max(np.abs(diff)):.3g}")


def need_itk_elastix():
    """The ``itk`` package with itk-elastix's transformix, or skip the test."""
    itk = pytest.importorskip("itk")
    try:
        itk.TransformixFilter  # noqa: B018 - lazy attribute; missing without itk-elastix
    except AttributeError:
        pytest.skip("needs itk-elastix: pip install -e .[baselines]")
    return itk


def parameter_object(itk, path):
    parameters = itk.ParameterObject.New()
    parameters.ReadParameterFile(path)
    return parameters


def write_transformix_points(path, points_lps):
    with open(path, "w") as fh:
        fh.write(f"point\n{len(points_lps)}\n")
        for p in points_lps:
            fh.write(" ".join(repr(float(v)) for v in p) + "\n")


def read_transformix_points(path):
    points = []
    with open(path) as fh:
        for line in fh:
            m = re.search(r"OutputPoint = \[([^\]]*)\]", line)
            points.append([float(v) for v in m.group(1).split()])
    return np.array(points)


def listing(path):
    return sorted(os.listdir(path))


def chain_case(ndim):
    """An affine step and two B-spline steps (spacings of :func:`case` and a coarser one), in model order."""
    shape, spacing, cp, affine = case(ndim, seed=11)
    rng = np.random.default_rng(12)
    coarse = tuple(2 * s for s in spacing)
    cp_coarse = rng.uniform(-0.3, 0.3, tuple(int(np.ceil((n - 1) / s)) + 3 for n, s in zip(shape, coarse))
                            + (ndim,)) * np.asarray(coarse, float)
    params = np.concatenate([rng.normal(0, 0.05, ndim * ndim), rng.normal(0, 1.0, ndim)])
    steps = [{"kind": "affine", "matrix": affine_step_matrix(params, shape)},
             {"kind": "spline", "control_points": cp_coarse, "grid_spacing": coarse},
             {"kind": "spline", "control_points": cp, "grid_spacing": spacing}]
    return shape, affine, params, steps
