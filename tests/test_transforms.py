"""Exported transforms (dirnet_tf.transforms) against SimpleITK, ITK's NIfTI reader and transformix.

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
import sys

import numpy as np
import pytest

from dirnet_tf import transforms as tr

SHAPE_2D, SPACING_2D = (20, 24), (4, 5)
SHAPE_3D, SPACING_3D = (12, 14, 10), (4, 3, 3)


# --------------------------------------------------------------------------- #
# Test data
# --------------------------------------------------------------------------- #


def _rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _affine(ndim):
    """Voxel -> RAS mm: rotation, anisotropic spacing, offset (3-D: also a flipped axis)."""
    a = np.eye(4)
    if ndim == 3:
        a[:3, :3] = _rotation([0.3, -0.5, 0.8], 0.7) @ np.diag([-0.9, 1.3, 2.1])
        a[:3, 3] = [31.5, -22.0, 14.25]
    else:
        c, s = np.cos(0.4), np.sin(0.4)
        a[:2, :2] = np.array([[c, -s], [s, c]]) @ np.diag([0.8, 1.7])
        a[2, 2] = 3.0
        a[:3, 3] = [-12.0, 40.5, 7.0]
    return a


def _case(ndim, seed=0):
    shape, spacing = (SHAPE_2D, SPACING_2D) if ndim == 2 else (SHAPE_3D, SPACING_3D)
    grid = tuple(int(np.ceil((n - 1) / s)) + 3 for n, s in zip(shape, spacing))
    rng = np.random.default_rng(seed)
    # Within the folding-free bound (0.4 s), large enough to move voxels by ~1-2.
    cp = rng.uniform(-0.4, 0.4, size=grid + (ndim,)) * np.asarray(spacing, float)
    return shape, spacing, cp, _affine(ndim)


def _analytic(points):
    """Smooth test image at voxel positions ``points (..., ndim)`` (values in about [0.05, 0.95])."""
    p = np.asarray(points, float)
    v = 0.5 + 0.25 * np.sin(0.35 * p[..., 0] + 0.22 * p[..., 1] + 0.3)
    v = v + 0.2 * np.cos(0.18 * p[..., 0] - 0.27 * p[..., 1])
    if p.shape[-1] == 3:
        v = 0.8 * v + 0.1 + 0.1 * np.sin(0.3 * p[..., 2] - 0.2 * p[..., 0])
    return v


def _voxels(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)


def _ours(cp, shape, spacing, moving):
    """Dense displacement (voxels ij) and warped image from the library (TensorFlow, float64)."""
    import dirnet_tf
    from dirnet_tf.bspline import bspline_displacement

    u = bspline_displacement(np.asarray(cp, np.float64)[None], shape, spacing)
    warped = dirnet_tf.warp(np.asarray(moving, np.float64)[None, ..., None], u)
    return np.asarray(u)[0], np.asarray(warped)[0, ..., 0]


def _inside(u, shape):
    pos = _voxels(shape) + u
    return np.all((pos >= 0) & (pos <= np.asarray(shape) - 1), axis=-1)


def _brute_force(cp, spacing, points):
    """Independent evaluation: the full double sum / triple sum over every control point."""
    def beta(t):
        t = abs(t)
        return 2 / 3 - t * t + t ** 3 / 2 if t < 1 else ((2 - t) ** 3 / 6 if t < 2 else 0.0)

    out = []
    for x in np.asarray(points, float).reshape(-1, cp.shape[-1]):
        u = np.zeros(cp.shape[-1])
        for k in np.ndindex(*cp.shape[:-1]):
            w = np.prod([beta(x[d] / spacing[d] - k[d] + 1) for d in range(len(k))])
            if w:
                u += w * cp[k]
        out.append(x + u)
    return np.array(out)


@pytest.fixture
def sitk():
    return pytest.importorskip("SimpleITK")


def _nifti_moving(tmp_path, moving, affine, name="moving.nii.gz"):
    """The moving image written by nibabel (RAS affine), as ITK reads it."""
    nib = pytest.importorskip("nibabel")
    path = str(tmp_path / name)
    nib.Nifti1Image(np.asarray(moving, np.float32), affine).to_filename(path)
    return path


def _resample(sitk, image, transform):
    return sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0,
                                                sitk.sitkFloat64)).T


def _report(name, diff):
    print(f"{name}: max |difference| {np.max(np.abs(diff)):.3g}")


# --------------------------------------------------------------------------- #
# Exact evaluation (numpy only)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("ndim", [2, 3])
def test_map_points_at_voxels_equals_dense_field(ndim):
    shape, spacing, cp, _ = _case(ndim)
    u, _ = _ours(cp, shape, spacing, np.zeros(shape))
    grid = _voxels(shape)
    mapped = tr.map_points(cp, spacing, grid)
    np.testing.assert_allclose(mapped - grid, u, atol=1e-5)
    assert np.max(np.abs(mapped - grid - u)) < 1e-10  # float64 throughout
    assert np.max(np.abs(u)) > 0.5  # a real deformation


@pytest.mark.parametrize("ndim", [2, 3])
def test_map_points_subvoxel_equals_brute_force_sum(ndim):
    shape, spacing, cp, _ = _case(ndim, seed=1)
    rng = np.random.default_rng(5)
    # Inside the image, beyond it (where the spline tails off), and on exact knots.
    pts = rng.uniform(-3 * np.asarray(spacing), np.asarray(shape) + 2 * np.asarray(spacing), (40, ndim))
    pts[:3] = np.asarray(spacing) * np.array([[-1], [0], [2]])
    np.testing.assert_allclose(tr.map_points(cp, spacing, pts), _brute_force(cp, spacing, pts),
                               rtol=0, atol=1e-12)
    # Control point 0 sits at voxel -s and its basis spans 2 s: nothing reaches below -3 s.
    far = -3.0 * np.asarray(spacing, float)[None] - 1e-9
    np.testing.assert_array_equal(tr.map_points(cp, spacing, far), far)


def test_map_points_keeps_shape_and_accepts_batch_axis():
    shape, spacing, cp, _ = _case(2)
    pts = np.random.default_rng(2).uniform(0, 19, (3, 5, 2))
    out = tr.map_points(cp[None], spacing, pts)
    assert out.shape == (3, 5, 2)
    np.testing.assert_allclose(out, tr.map_points(cp, spacing, pts.reshape(-1, 2)).reshape(3, 5, 2))


@pytest.mark.parametrize("ndim", [2, 3])
def test_map_points_world_is_voxel_map_in_ras(ndim):
    shape, spacing, cp, affine = _case(ndim)
    vox = np.random.default_rng(3).uniform(0, np.asarray(shape) - 1, (25, ndim))
    lin = affine[:ndim, :ndim]
    ras = vox @ lin.T + affine[:ndim, 3]
    moved = tr.map_points_world(cp, spacing, affine, ras)
    np.testing.assert_allclose(moved, tr.map_points(cp, spacing, vox) @ lin.T + affine[:ndim, 3], atol=1e-10)
    if ndim == 2:  # 3-D RAS points on the 2-D image plane keep their z
        ras3 = np.concatenate([ras, np.full((25, 1), 7.0)], axis=1)
        out3 = tr.map_points_world(cp, spacing, affine, ras3)
        np.testing.assert_allclose(out3[:, :2], moved, atol=1e-12)
        np.testing.assert_array_equal(out3[:, 2], 7.0)


# --------------------------------------------------------------------------- #
# Geometry: our ITK geometry is the one ITK's NIfTI reader builds
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_geometry_matches_itk_nifti_reader(sitk, tmp_path, ndim):
    shape, _, _, affine = _case(ndim)
    moving = _analytic(_voxels(shape))
    image = sitk.ReadImage(_nifti_moving(tmp_path, moving, affine))
    geometry = tr.itk_geometry(affine, ndim)
    np.testing.assert_allclose(image.GetOrigin(), geometry["origin"], atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), geometry["spacing"], rtol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), geometry["direction"], atol=1e-6)
    # SimpleITK's array is the transpose of nibabel's [i, j, k]: ITK x = array axis i.
    np.testing.assert_allclose(sitk.GetArrayFromImage(image).T, moving, atol=1e-6)
    field = tr.displacement_field_image(np.zeros(shape + (ndim,)), affine)
    assert field.GetSize() == image.GetSize()
    np.testing.assert_allclose(field.GetDirection(), image.GetDirection(), atol=1e-6)


# --------------------------------------------------------------------------- #
# SimpleITK
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("ndim, ext", [(2, ".tfm"), (3, ".tfm"), (2, ".h5"), (3, ".h5")])
def test_bspline_file_resamples_like_warp(sitk, tmp_path, ndim, ext):
    shape, spacing, cp, affine = _case(ndim)
    moving = _analytic(_voxels(shape))
    u, warped = _ours(cp, shape, spacing, moving)
    path = tr.write_itk_transform(str(tmp_path / f"t{ext}"), tr.itk_bspline_transform(cp, spacing, affine, shape))
    transform = sitk.ReadTransform(path)
    image = sitk.ReadImage(_nifti_moving(tmp_path, moving, affine), sitk.sitkFloat64)
    itk_warped = _resample(sitk, image, transform)
    inside = _inside(u, shape)
    assert inside.mean() > 0.6
    diff = (itk_warped - warped)[inside]
    _report(f"SimpleITK {ndim}-D {ext} vs warp", diff)
    assert np.max(np.abs(diff)) < 1e-6
    assert np.max(np.abs(warped - moving)) > 0.05
    # 3-D: (10 - 1) % 3 == 0, so the last slice sits on the edge of ITK's unpadded grid; it is checked too.


@pytest.mark.parametrize("ndim, shear", [(2, False), (3, False), (2, True), (3, True)])
def test_transform_point_equals_map_points_world(sitk, ndim, shear):
    shape, spacing, cp, affine = _case(ndim, seed=4)
    if shear:  # non-orthogonal voxel axes: ITK grid directions need not be orthogonal either
        affine[:ndim, :ndim] = affine[:ndim, :ndim] @ (np.eye(ndim) + 0.3 * np.triu(np.ones((ndim, ndim)), 1))
    transform = tr.itk_bspline_transform(cp, spacing, affine)
    rng = np.random.default_rng(6)
    # Voxels inside, around and far outside the image (margin 3 makes ITK exact everywhere).
    vox = rng.uniform(-4 * np.asarray(spacing), np.asarray(shape) + 4 * np.asarray(spacing), (200, ndim))
    vox = np.concatenate([vox, _voxels(shape).reshape(-1, ndim)[[0, -1]], np.asarray(shape, float)[None] - 1])
    ras = vox @ affine[:ndim, :ndim].T + affine[:ndim, 3]
    expected = tr.map_points_world(cp, spacing, affine, ras)
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    got = np.array([transform.TransformPoint((p * flip).tolist()) for p in ras]) * flip
    rel = np.abs(got - expected).max(axis=1) / (1 + np.abs(expected).max(axis=1))
    _report(f"TransformPoint {ndim}-D (shear {shear}) vs map_points_world (mm)", got - expected)
    assert rel.max() < 1e-6
    moved = np.linalg.norm(expected - ras, axis=1)
    assert moved.max() > 0.5


def test_itk_valid_region_and_margin(sitk):
    # (13 - 1) % 4 == 0: the last voxel sits on the upper limit of ITK's valid region, voxel 0
    # on the lower one; ITK leaves points outside [1, K - 2] (continuous grid index) unmoved.
    shape, spacing = (13, 9), (4, 4)
    cp = np.ones((6, 5, 2))
    affine = np.eye(4)  # voxel (i, j) is LPS (-i, -j)
    bare = tr.itk_bspline_transform(cp, spacing, affine, shape, margin=0)
    padded = tr.itk_bspline_transform(cp, spacing, affine, shape)
    vox = np.array([[12.0, 4.0], [0.0, 4.0], [-0.001, 4.0], [12.001, 4.0], [-9.0, 4.0], [20.0, 4.0]])
    ours = tr.map_points(cp, spacing, vox)
    bare_out = -np.array([bare.TransformPoint((-v).tolist()) for v in vox])
    padded_out = -np.array([padded.TransformPoint((-v).tolist()) for v in vox])
    np.testing.assert_allclose(padded_out, ours, atol=1e-12)
    np.testing.assert_allclose(bare_out[:2], ours[:2], atol=1e-12)
    np.testing.assert_allclose(bare_out[2:], vox[2:], atol=1e-12)  # outside: identity
    assert np.all(np.abs(ours[2:4] - vox[2:4]) > 0.5)  # where our spline does move them


@pytest.mark.parametrize("ndim", [2, 3])
def test_composite_affine_then_bspline_matches_our_composition(sitk, tmp_path, ndim):
    from dirnet_tf.warping import compose_displacements

    shape, spacing, cp, affine = _case(ndim, seed=7)
    moving = _analytic(_voxels(shape))
    # A voxel-space affine: small rotation about the centre plus a shift (fixed voxel -> moving voxel).
    centre = (np.asarray(shape) - 1) / 2
    rot = _rotation([0.2, 0.1, 1.0], 0.08)[:ndim, :ndim] * 1.03
    mat = np.eye(ndim + 1)
    mat[:ndim, :ndim] = rot
    mat[:ndim, ndim] = centre - rot @ centre + np.array([0.7, -0.4, 0.3])[:ndim]
    grid = _voxels(shape)
    u_affine = grid @ mat[:ndim, :ndim].T + mat[:ndim, ndim] - grid
    u_spline, _ = _ours(cp, shape, spacing, moving)
    # Warp by the affine first, then by the B-spline: sampling map A(phi(x)).
    total = np.asarray(compose_displacements(u_affine[None], u_spline[None]))[0]
    import dirnet_tf

    warped = np.asarray(dirnet_tf.warp(moving[None, ..., None], total[None]))[0, ..., 0]
    path = tr.write_itk_transform(str(tmp_path / "composite.tfm"),
                                  [tr.itk_affine_transform(mat, affine),
                                   tr.itk_bspline_transform(cp, spacing, affine, shape)])
    transform = sitk.ReadTransform(path)
    assert transform.GetName() == "CompositeTransform"
    image = sitk.ReadImage(_nifti_moving(tmp_path, moving, affine), sitk.sitkFloat64)
    itk_warped = _resample(sitk, image, transform)
    # compose_displacements clamps the affine field where x + u_spline(x) leaves the grid.
    inside = _inside(total, shape) & _inside(u_spline, shape)
    assert inside.mean() > 0.5
    diff = (itk_warped - warped)[inside]
    _report(f"composite {ndim}-D vs compose_displacements + warp", diff)
    assert np.max(np.abs(diff)) < 1e-6
    # Point level: ITK's composite is A(B(p)).
    vox = np.random.default_rng(8).uniform(0, np.asarray(shape) - 1, (30, ndim))
    expected_vox = tr.map_points(cp, spacing, vox) @ mat[:ndim, :ndim].T + mat[:ndim, ndim]
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    lin, off = affine[:ndim, :ndim], affine[:ndim, 3]
    got = np.array([transform.TransformPoint(((lin @ v + off) * flip).tolist()) for v in vox]) * flip
    np.testing.assert_allclose(got, expected_vox @ lin.T + off, atol=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
def test_different_moving_grid(sitk, ndim):
    shape, spacing, cp, affine = _case(ndim)
    moving_affine = affine.copy()
    moving_affine[:ndim, :ndim] = moving_affine[:ndim, :ndim] * 1.1
    moving_affine[:3, 3] += [2.0, -1.0, 0.5]
    transform = sitk.CompositeTransform([tr.itk_affine_transform(np.eye(ndim + 1), affine, moving_affine),
                                         tr.itk_bspline_transform(cp, spacing, affine)])
    vox = np.random.default_rng(9).uniform(0, np.asarray(shape) - 1, (30, ndim))
    ras = vox @ affine[:ndim, :ndim].T + affine[:ndim, 3]
    expected = tr.map_points_world(cp, spacing, affine, ras, moving_affine=moving_affine)
    np.testing.assert_allclose(expected, tr.map_points(cp, spacing, vox) @ moving_affine[:ndim, :ndim].T
                               + moving_affine[:ndim, 3], atol=1e-10)
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    got = np.array([transform.TransformPoint((p * flip).tolist()) for p in ras]) * flip
    np.testing.assert_allclose(got, expected, atol=1e-9)


@pytest.mark.parametrize("ndim, ext", [(2, ".nii.gz"), (3, ".nii.gz"), (2, ".mha"), (3, ".mha"), (3, ".nrrd")])
def test_displacement_field_file_resamples_like_warp(sitk, tmp_path, ndim, ext):
    shape, spacing, cp, affine = _case(ndim, seed=2)
    moving = _analytic(_voxels(shape))
    u, warped = _ours(cp, shape, spacing, moving)
    path = tr.write_displacement_field(str(tmp_path / f"field{ext}"), u, affine)
    field = sitk.ReadImage(path, sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    image = sitk.ReadImage(_nifti_moving(tmp_path, moving, affine), sitk.sitkFloat64)
    itk_warped = _resample(sitk, image, transform)
    inside = _inside(u, shape)
    diff = (itk_warped - warped)[inside]
    _report(f"displacement field {ndim}-D {ext} vs warp", diff)
    assert np.max(np.abs(diff)) < 1e-5  # NIfTI geometry is stored in float32
    # At voxel centres the field transform is the spline map.
    vox = _voxels(shape).reshape(-1, ndim)[::7]
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    lin, off = affine[:ndim, :ndim], affine[:ndim, 3]
    got = np.array([transform.TransformPoint(((lin @ v + off) * flip).tolist()) for v in vox]) * flip
    # NIfTI keeps the geometry in float32 (~4e-7 mm here); MetaImage / NRRD in double.
    atol = 1e-5 if ext.startswith(".nii") else 1e-9
    np.testing.assert_allclose(got, tr.map_points_world(cp, spacing, affine, vox @ lin.T + off), atol=atol)


# --------------------------------------------------------------------------- #
# transformix (itk-elastix)
# --------------------------------------------------------------------------- #


@pytest.fixture
def itk():
    itk = pytest.importorskip("itk")
    try:
        itk.TransformixFilter  # noqa: B018 - lazy attribute; missing without itk-elastix
    except AttributeError:
        pytest.skip("needs itk-elastix: pip install -e .[baselines]")
    return itk


def _parameter_object(itk, path):
    parameters = itk.ParameterObject.New()
    parameters.ReadParameterFile(path)
    return parameters


@pytest.mark.parametrize("ndim", [2, 3])
def test_transformix_resamples_like_warp(itk, tmp_path, ndim):
    shape, spacing, cp, affine = _case(ndim, seed=3)
    moving = _analytic(_voxels(shape))
    u, warped = _ours(cp, shape, spacing, moving)
    image = itk.imread(_nifti_moving(tmp_path, moving, affine), itk.F)
    inside = _inside(u, shape)
    for order in (1, 3):
        path = tr.write_elastix_transform(str(tmp_path / f"TransformParameters.{order}.txt"), cp, spacing,
                                          affine, shape, interpolation_order=order)
        result = itk.transformix_filter(image, _parameter_object(itk, path), log_to_console=False)
        out = np.asarray(itk.array_from_image(result), np.float64).T
        assert out.shape == shape
        if order == 1:
            diff = (out - warped)[inside]
            _report(f"transformix {ndim}-D linear vs warp", diff)
            assert np.max(np.abs(diff)) < 1e-6
        else:
            # Cubic B-spline interpolation of the analytic image vs its exact values at phi(x):
            # O(h^4) accurate, except within ~2 voxels of the border, where transformix's mirror
            # boundary condition does not continue the image (errors up to ~0.02 there).
            truth = _analytic(_voxels(shape) + u)
            pos = _voxels(shape) + u
            interior = np.all((pos >= 2) & (pos <= np.asarray(shape) - 3), axis=-1)
            err_cubic = np.max(np.abs(out - truth)[interior])
            err_linear = np.max(np.abs(warped - truth)[interior])
            print(f"transformix {ndim}-D cubic vs analytic {err_cubic:.3g} (linear {err_linear:.3g})")
            assert err_cubic < 0.3 * err_linear and err_cubic < 3e-3


def _write_points(path, points_lps):
    with open(path, "w") as fh:
        fh.write(f"point\n{len(points_lps)}\n")
        for p in points_lps:
            fh.write(" ".join(repr(float(v)) for v in p) + "\n")


def _read_output_points(path):
    points = []
    with open(path) as fh:
        for line in fh:
            m = re.search(r"OutputPoint = \[([^\]]*)\]", line)
            points.append([float(v) for v in m.group(1).split()])
    return np.array(points)


@pytest.mark.parametrize("ndim", [2, 3])
def test_transformix_points_and_field_match_map_points_world(itk, tmp_path, ndim):
    shape, spacing, cp, affine = _case(ndim, seed=5)
    moving = _analytic(_voxels(shape))
    image = itk.imread(_nifti_moving(tmp_path, moving, affine), itk.F)
    path = tr.write_elastix_transform(str(tmp_path / "TransformParameters.0.txt"), cp, spacing, affine, shape)
    parameters = _parameter_object(itk, path)
    vox = np.random.default_rng(10).uniform(-1, np.asarray(shape), (40, ndim))
    ras = vox @ affine[:ndim, :ndim].T + affine[:ndim, 3]
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    points_file = str(tmp_path / "points.txt")
    _write_points(points_file, ras * flip)
    out_dir = str(tmp_path / "out")
    os.makedirs(out_dir)
    itk.transformix_pointset(image, parameters, fixed_point_set_file_name=points_file,
                             output_directory=out_dir, log_to_console=False)
    got = _read_output_points(os.path.join(out_dir, "outputpoints.txt")) * flip
    expected = tr.map_points_world(cp, spacing, affine, ras)
    _report(f"transformix points {ndim}-D vs map_points_world (mm)", got - expected)
    # outputpoints.txt prints about 6 significant digits.
    np.testing.assert_allclose(got, expected, atol=1e-3)
    # Dense deformation field (LPS mm at the fixed voxels) vs the library's field.
    field = itk.transformix_deformation_field(image, parameters, output_directory=out_dir, log_to_console=False)
    field = np.asarray(itk.array_from_image(field), np.float64)
    field = field.transpose(list(range(ndim))[::-1] + [ndim])
    u, _ = _ours(cp, shape, spacing, moving)
    expected_field = (u @ affine[:ndim, :ndim].T) * flip
    _report(f"transformix deformation field {ndim}-D (mm)", field - expected_field)
    np.testing.assert_allclose(field, expected_field, atol=1e-4)  # float32 field


def test_transformix_margin_keeps_the_last_voxel(itk, tmp_path):
    # elastix's valid region is half-open: without padding the last voxel ((13 - 1) % 4 == 0)
    # would not move; the default margin keeps the map exact there.
    shape, spacing = (13, 9), (4, 4)
    cp = np.ones((6, 5, 2))
    affine = np.eye(4)
    image = itk.image_from_array(np.zeros(shape[::-1], np.float32))
    image.SetDirection(itk.matrix_from_array(-np.eye(2)))  # LPS geometry of the identity RAS affine
    vox = np.array([[12.0, 4.0], [0.0, 4.0], [6.5, 3.25]])
    points_file = str(tmp_path / "points.txt")
    _write_points(points_file, -vox)
    results = {}
    for margin in (0, tr.DEFAULT_MARGIN):
        path = tr.write_elastix_transform(str(tmp_path / f"tp{margin}.txt"), cp, spacing, affine, shape,
                                          margin=margin)
        out_dir = str(tmp_path / f"out{margin}")
        os.makedirs(out_dir)
        itk.transformix_pointset(image, _parameter_object(itk, path), fixed_point_set_file_name=points_file,
                                 output_directory=out_dir, log_to_console=False)
        results[margin] = -_read_output_points(os.path.join(out_dir, "outputpoints.txt"))
    ours = tr.map_points(cp, spacing, vox)
    np.testing.assert_allclose(results[tr.DEFAULT_MARGIN], ours, atol=1e-5)
    np.testing.assert_allclose(results[0][0], vox[0], atol=1e-5)  # unmoved without padding
    np.testing.assert_allclose(results[0][1:], ours[1:], atol=1e-5)


# --------------------------------------------------------------------------- #
# Files, errors
# --------------------------------------------------------------------------- #


def test_elastix_text_fields():
    shape, spacing, cp, affine = _case(2)
    text = tr.elastix_transform_parameters(cp, spacing, affine, shape, margin=1)
    params = {m.group(1): m.group(2) for m in re.finditer(r"^\((\w+) (.*)\)$", text, re.M)}
    assert params["Transform"] == '"BSplineTransform"'
    assert params["GridSize"] == " ".join(str(k + 2) for k in cp.shape[:-1])
    assert params["Size"] == "20 24" and params["Index"] == "0 0" and params["GridIndex"] == "0 0"
    assert int(params["NumberOfParameters"]) == (cp.shape[0] + 2) * (cp.shape[1] + 2) * 2
    assert len(params["TransformParameters"].split()) == int(params["NumberOfParameters"])
    assert params["FixedImageDimension"] == params["MovingImageDimension"] == "2"
    assert params["FinalBSplineInterpolationOrder"] == "1"
    assert params["ResultImagePixelType"] == '"float"'
    assert params["HowToCombineTransforms"] == '"Compose"'
    assert params["InitialTransformParametersFileName"] == '"NoInitialTransform"'
    # Column-major direction: LPS flip of a rotation by 0.4 rad.
    direction = np.array([float(v) for v in params["Direction"].split()]).reshape(2, 2, order="F")
    c, s = np.cos(0.4), np.sin(0.4)
    np.testing.assert_allclose(direction, -np.array([[c, -s], [s, c]]), atol=1e-12)


def _listing(path):
    return sorted(os.listdir(path))


def test_writes_are_atomic(sitk, tmp_path, monkeypatch):
    shape, spacing, cp, affine = _case(2)
    target = str(tmp_path / "t.tfm")
    tr.write_itk_transform(target, tr.itk_bspline_transform(cp, spacing, affine))
    tr.write_displacement_field(str(tmp_path / "f.nii.gz"), np.zeros(shape + (2,)), affine)
    tr.write_elastix_transform(str(tmp_path / "e.txt"), cp, spacing, affine, shape)
    assert _listing(tmp_path) == ["e.txt", "f.nii.gz", "t.tfm"]  # no temporary files left
    before = {n: open(tmp_path / n, "rb").read() for n in _listing(tmp_path)}

    def broken_write(obj, path, *args):
        with open(path, "w") as fh:
            fh.write("half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteTransform", broken_write)
    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        tr.write_itk_transform(target, tr.itk_bspline_transform(2 * cp, spacing, affine))
    with pytest.raises(RuntimeError, match="disk full"):
        tr.write_displacement_field(str(tmp_path / "f.nii.gz"), np.ones(shape + (2,)), affine)
    with pytest.raises(ValueError, match="do not fit"):
        tr.write_elastix_transform(str(tmp_path / "e.txt"), cp[:-1], spacing, affine, shape)
    assert _listing(tmp_path) == sorted(before)
    assert {n: open(tmp_path / n, "rb").read() for n in _listing(tmp_path)} == before


def test_bad_inputs_raise_value_error_naming_shapes(sitk):
    shape, spacing, cp, affine = _case(3)
    assert cp.shape == (6, 8, 6, 3)
    with pytest.raises(ValueError, match=r"\(8, 8, 6, 3\).*\(12, 14, 10\).*\[6, 8, 6, 3\]"):
        tr.itk_bspline_transform(cp[np.r_[0:6, 0:2]], spacing, affine, image_shape=shape)
    with pytest.raises(ValueError, match=r"\(6, 7, 6, 3\).*\[6, 8, 6, 3\]"):
        tr.elastix_transform_parameters(cp[:, :-1], spacing, affine, shape)
    with pytest.raises(ValueError, match=r"4x4.*\(3, 3\)"):
        tr.itk_bspline_transform(cp, spacing, affine[:3, :3])
    with pytest.raises(ValueError, match=r"4x4.*\(3, 4\)"):
        tr.map_points_world(cp, spacing, affine[:3], np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        tr.itk_bspline_transform(_case(2)[2], SPACING_2D, np.eye(2))
    with pytest.raises(ValueError, match=r"shape \[\*K, ndim\].*\(7, 6, 4\)"):
        tr.map_points(np.zeros((7, 6, 4)), 4, np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"points_ij.*\(5, 2\)"):
        tr.map_points(cp, spacing, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="oblique"):
        oblique = _affine(3)
        tr.itk_bspline_transform(_case(2)[2], SPACING_2D, oblique)
    with pytest.raises(ValueError, match="singular"):
        tr.itk_bspline_transform(cp, spacing, np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\.tfm"):
        tr.write_itk_transform("t.mat", tr.itk_bspline_transform(cp, spacing, affine))
    with pytest.raises(ValueError, match="mix dimensions"):
        tr.write_itk_transform("t.tfm", [tr.itk_bspline_transform(cp, spacing, affine),
                                         tr.itk_affine_transform(np.eye(3), np.eye(3))])
    with pytest.raises(ValueError, match=r"\[\*spatial, ndim\].*\(4, 5, 3\)"):
        tr.displacement_field_image(np.zeros((4, 5, 3)), np.eye(4))
    with pytest.raises(ValueError, match="grid_spacing"):
        tr.map_points(cp, (4, 3), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="grid_spacing"):
        tr.map_points(cp, "four", np.zeros((1, 3)))
    sheared = affine.copy()
    sheared[:3, 1] += sheared[:3, 0]
    with pytest.raises(ValueError, match=r"not orthogonal.*\.mha"):
        tr.write_displacement_field("f.nii.gz", np.zeros(shape + (3,)), sheared)


@pytest.mark.parametrize("shape, spacing", [((13, 9), 4), ((28, 28), 8), ((5, 7, 9), (2, 3, 4)),
                                             ((16, 17, 18), 4)])
def test_control_grid_rule_matches_bspline(shape, spacing):
    from dirnet_tf.bspline import control_grid_shape

    grid = control_grid_shape(shape, spacing)
    cp = np.zeros(grid + (len(shape),))
    text = tr.elastix_transform_parameters(cp, spacing, np.eye(4), shape, margin=0)
    assert f"(GridSize {' '.join(map(str, grid))})" in text
    with pytest.raises(ValueError, match="do not fit"):
        tr.elastix_transform_parameters(cp[1:], spacing, np.eye(4), shape)


def test_2d_accepts_3x3_in_plane_affine(sitk):
    shape, spacing, cp, affine4 = _case(2)
    affine3 = np.eye(3)
    affine3[:2, :2] = affine4[:2, :2]
    affine3[:2, 2] = affine4[:2, 3]
    a = tr.itk_bspline_transform(cp, spacing, affine4)
    b = tr.itk_bspline_transform(cp, spacing, affine3)
    assert a.GetFixedParameters() == b.GetFixedParameters()
    assert a.GetParameters() == b.GetParameters()


def test_missing_simpleitk_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # `import SimpleITK` raises ImportError
    shape, spacing, cp, affine = _case(2)
    with pytest.raises(ImportError, match=r"pip install -e \.\[medical\]"):
        tr.itk_bspline_transform(cp, spacing, affine)
    # The numpy-only parts keep working.
    assert tr.map_points(cp, spacing, np.zeros((1, 2))).shape == (1, 2)
    assert "BSplineTransform" in tr.elastix_transform_parameters(cp, spacing, affine, shape)


# --------------------------------------------------------------------------- #
# Chains of composed steps
# --------------------------------------------------------------------------- #


def _chain_case(ndim):
    """An affine step and two B-spline steps (spacings of :func:`_case` and a coarser one), in model order."""
    shape, spacing, cp, affine = _case(ndim, seed=11)
    rng = np.random.default_rng(12)
    coarse = tuple(2 * s for s in spacing)
    cp_coarse = rng.uniform(-0.3, 0.3, tuple(int(np.ceil((n - 1) / s)) + 3 for n, s in zip(shape, coarse))
                            + (ndim,)) * np.asarray(coarse, float)
    params = np.concatenate([rng.normal(0, 0.05, ndim * ndim), rng.normal(0, 1.0, ndim)])
    steps = [{"kind": "affine", "matrix": tr.affine_step_matrix(params, shape)},
             {"kind": "spline", "control_points": cp_coarse, "grid_spacing": coarse},
             {"kind": "spline", "control_points": cp, "grid_spacing": spacing}]
    return shape, affine, params, steps


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_step_matrix_is_the_affine_stage(ndim):
    """``x + affine_displacement(params)(x)`` is the homogeneous map of :func:`affine_step_matrix`."""
    from dirnet_tf.affine import affine_displacement

    shape, _, params, steps = _chain_case(ndim)
    u = np.asarray(affine_displacement(params[None], shape))[0]
    matrix = steps[0]["matrix"]
    grid = _voxels(shape)
    np.testing.assert_allclose(grid @ matrix[:ndim, :ndim].T + matrix[:ndim, ndim], grid + u, atol=1e-10)
    np.testing.assert_allclose(tr.affine_step_matrix(params[None], shape), matrix)  # a batch axis of 1
    with pytest.raises(ValueError, match="affine step parameters"):
        tr.affine_step_matrix(params[:-1], shape)


@pytest.mark.parametrize("ndim", [2, 3])
def test_chain_of_steps_is_the_composition_and_itk_applies_it(sitk, tmp_path, ndim):
    """:func:`map_points_steps` is ``phi_1 o phi_2 o phi_3`` (the order of ``compose_displacements``,
    last step first), and the CompositeTransform of :func:`itk_step_transforms` maps points the same way.

    The dense reference composes the steps' dense fields as the model does; it agrees to within
    its own multilinear interpolation at voxels whose intermediate points stay inside the grid,
    while the reversed chain differs by far more.
    """
    import dirnet_tf
    from dirnet_tf.warping import compose_displacements

    shape, affine, params, steps = _chain_case(ndim)
    fields = [np.asarray(dirnet_tf.affine.affine_displacement(params[None], shape))[0]]
    fields += [_ours(s["control_points"], shape, s["grid_spacing"], np.zeros(shape))[0] for s in steps[1:]]
    total = fields[0]
    for u in fields[1:]:
        total = np.asarray(compose_displacements(total[None], u[None]))[0]
    grid = _voxels(shape)
    chained = tr.map_points_steps(steps, grid)
    inside = np.all([np.all((x >= 0) & (x <= np.asarray(shape) - 1), -1)
                     for x in (tr.map_points_steps(steps[k:], grid) for k in range(1, 3))], axis=0)
    assert inside.mean() > 0.5
    err = np.abs(chained - (grid + total))[inside].max()
    reversed_err = np.abs(tr.map_points_steps(steps[::-1], grid) - (grid + total))[inside].max()
    print(f"{ndim}-D chain vs composed dense fields: {err:.3g} voxels (reversed chain {reversed_err:.3g})")
    assert err < 0.05 and reversed_err > 0.2
    path = tr.write_itk_transform(str(tmp_path / "chain.h5"), tr.itk_step_transforms(steps, affine, shape))
    transform = sitk.ReadTransform(path)
    assert transform.GetNumberOfTransforms() == 3
    vox = np.random.default_rng(13).uniform(-2, np.asarray(shape) + 1, (25, ndim))
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    lin, off = affine[:ndim, :ndim], affine[:ndim, 3]
    got = np.array([transform.TransformPoint(((lin @ v + off) * flip).tolist()) for v in vox]) * flip
    np.testing.assert_allclose(got, tr.map_points_steps(steps, vox) @ lin.T + off, atol=1e-9)


def test_elastix_affine_parameters_are_the_itk_affine(sitk):
    """The elastix AffineTransform text holds the matrix and translation of :func:`itk_affine_transform`."""
    shape, affine, _, steps = _chain_case(3)
    moving_affine = affine.copy()
    moving_affine[:3, 3] += [1.0, -2.0, 0.5]
    text = tr.elastix_affine_parameters(steps[0]["matrix"], affine, shape, moving_affine)
    params = {m.group(1): m.group(2) for m in re.finditer(r"^\((\w+) (.*)\)$", text, re.M)}
    assert params["Transform"] == '"AffineTransform"' and params["NumberOfParameters"] == "12"
    assert params["CenterOfRotationPoint"] == "0.0 0.0 0.0" and params["Size"] == "12 14 10"
    itk = tr.itk_affine_transform(steps[0]["matrix"], affine, moving_affine)
    np.testing.assert_allclose([float(v) for v in params["TransformParameters"].split()],
                               list(itk.GetMatrix()) + list(itk.GetTranslation()), rtol=1e-15, atol=1e-12)
    assert tr.elastix_step_parameters(steps[0], affine, shape, moving_affine=moving_affine) == text
    with pytest.raises(ValueError, match="a step must be"):
        tr.map_points_steps([{"kind": "rigid"}], np.zeros((1, 3)))
