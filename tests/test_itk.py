"""ITK geometry and transforms (dirnet_tf.itk) against SimpleITK and ITK's NIfTI reader.

Cases and tolerances: :mod:`tests.transform_cases`.
"""

import sys

import numpy as np
import pytest

from dirnet_tf.elastix_params import elastix_transform_parameters, write_elastix_transform
from dirnet_tf.field_images import displacement_field_image, write_displacement_field
from dirnet_tf.itk import (
    itk_affine_transform,
    itk_bspline_transform,
    itk_geometry,
    itk_step_transforms,
    map_points_world,
    write_itk_transform,
)
from dirnet_tf.spline_np import map_points_bspline, map_points_chain
from tests.transform_cases import (
    SPACING_2D,
    analytic,
    case,
    chain_case,
    grid_affine,
    inside_grid,
    listing,
    need_simpleitk,
    nifti_moving,
    ours,
    report,
    resample_itk,
    rotation,
    voxels,
)


@pytest.fixture
def sitk():
    return need_simpleitk()


@pytest.mark.parametrize("ndim", [2, 3])
def test_map_points_world_is_voxel_map_in_ras(ndim):
    shape, spacing, cp, affine = case(ndim)
    vox = np.random.default_rng(3).uniform(0, np.asarray(shape) - 1, (25, ndim))
    lin = affine[:ndim, :ndim]
    ras = vox @ lin.T + affine[:ndim, 3]
    moved = map_points_world(cp, spacing, affine, ras)
    np.testing.assert_allclose(moved, map_points_bspline(cp, spacing, vox) @ lin.T + affine[:ndim, 3], atol=1e-10)
    if ndim == 2:  # 3-D RAS points on the 2-D image plane keep their z
        ras3 = np.concatenate([ras, np.full((25, 1), 7.0)], axis=1)
        out3 = map_points_world(cp, spacing, affine, ras3)
        np.testing.assert_allclose(out3[:, :2], moved, atol=1e-12)
        np.testing.assert_array_equal(out3[:, 2], 7.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_geometry_matches_itk_nifti_reader(sitk, tmp_path, ndim):
    shape, _, _, affine = case(ndim)
    moving = analytic(voxels(shape))
    image = sitk.ReadImage(nifti_moving(tmp_path, moving, affine))
    geometry = itk_geometry(affine, ndim)
    np.testing.assert_allclose(image.GetOrigin(), geometry["origin"], atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), geometry["spacing"], rtol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), geometry["direction"], atol=1e-6)
    # SimpleITK's array is the transpose of nibabel's [i, j, k]: ITK x = array axis i.
    np.testing.assert_allclose(sitk.GetArrayFromImage(image).T, moving, atol=1e-6)
    field = displacement_field_image(np.zeros(shape + (ndim,)), affine)
    assert field.GetSize() == image.GetSize()
    np.testing.assert_allclose(field.GetDirection(), image.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("ndim, ext", [(2, ".tfm"), (3, ".tfm"), (2, ".h5"), (3, ".h5")])
def test_bspline_file_resamples_like_warp(sitk, tmp_path, ndim, ext):
    shape, spacing, cp, affine = case(ndim)
    moving = analytic(voxels(shape))
    u, warped = ours(cp, shape, spacing, moving)
    path = write_itk_transform(str(tmp_path / f"t{ext}"), itk_bspline_transform(cp, spacing, affine, shape))
    transform = sitk.ReadTransform(path)
    image = sitk.ReadImage(nifti_moving(tmp_path, moving, affine), sitk.sitkFloat64)
    itk_warped = resample_itk(sitk, image, transform)
    inside = inside_grid(u, shape)
    assert inside.mean() > 0.6
    diff = (itk_warped - warped)[inside]
    report(f"SimpleITK {ndim}-D {ext} vs warp", diff)
    assert np.max(np.abs(diff)) < 1e-6
    assert np.max(np.abs(warped - moving)) > 0.05


@pytest.mark.parametrize("ndim, shear", [(2, False), (3, False), (2, True), (3, True)])
def test_transform_point_equals_map_points_world(sitk, ndim, shear):
    shape, spacing, cp, affine = case(ndim, seed=4)
    if shear:  # non-orthogonal voxel axes: ITK grid directions need not be orthogonal either
        affine[:ndim, :ndim] = affine[:ndim, :ndim] @ (np.eye(ndim) + 0.3 * np.triu(np.ones((ndim, ndim)), 1))
    transform = itk_bspline_transform(cp, spacing, affine)
    rng = np.random.default_rng(6)
    # Voxels inside, around and far outside the image (margin 3 makes ITK exact everywhere).
    vox = rng.uniform(-4 * np.asarray(spacing), np.asarray(shape) + 4 * np.asarray(spacing), (200, ndim))
    vox = np.concatenate([vox, voxels(shape).reshape(-1, ndim)[[0, -1]], np.asarray(shape, float)[None] - 1])
    ras = vox @ affine[:ndim, :ndim].T + affine[:ndim, 3]
    expected = map_points_world(cp, spacing, affine, ras)
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    got = np.array([transform.TransformPoint((p * flip).tolist()) for p in ras]) * flip
    rel = np.abs(got - expected).max(axis=1) / (1 + np.abs(expected).max(axis=1))
    report(f"TransformPoint {ndim}-D (shear {shear}) vs map_points_world (mm)", got - expected)
    assert rel.max() < 1e-6
    moved = np.linalg.norm(expected - ras, axis=1)
    assert moved.max() > 0.5


def test_itk_valid_region_and_margin(sitk):
    # (13 - 1) % 4 == 0: the last voxel sits on the upper limit of ITK's valid region, voxel 0
    # on the lower one; ITK leaves points outside [1, K - 2] (continuous grid index) unmoved.
    shape, spacing = (13, 9), (4, 4)
    cp = np.ones((6, 5, 2))
    affine = np.eye(4)  # voxel (i, j) is LPS (-i, -j)
    bare = itk_bspline_transform(cp, spacing, affine, shape, margin=0)
    padded = itk_bspline_transform(cp, spacing, affine, shape)
    vox = np.array([[12.0, 4.0], [0.0, 4.0], [-0.001, 4.0], [12.001, 4.0], [-9.0, 4.0], [20.0, 4.0]])
    ours = map_points_bspline(cp, spacing, vox)
    bare_out = -np.array([bare.TransformPoint((-v).tolist()) for v in vox])
    padded_out = -np.array([padded.TransformPoint((-v).tolist()) for v in vox])
    np.testing.assert_allclose(padded_out, ours, atol=1e-12)
    np.testing.assert_allclose(bare_out[:2], ours[:2], atol=1e-12)
    np.testing.assert_allclose(bare_out[2:], vox[2:], atol=1e-12)  # outside: identity
    assert np.all(np.abs(ours[2:4] - vox[2:4]) > 0.5)  # where our spline does move them


@pytest.mark.parametrize("ndim", [2, 3])
def test_composite_affine_then_bspline_matches_our_composition(sitk, tmp_path, ndim):
    from dirnet_tf.warping import compose_displacements

    shape, spacing, cp, affine = case(ndim, seed=7)
    moving = analytic(voxels(shape))
    # A voxel-space affine: small rotation about the centre plus a shift (fixed voxel -> moving voxel).
    centre = (np.asarray(shape) - 1) / 2
    rot = rotation([0.2, 0.1, 1.0], 0.08)[:ndim, :ndim] * 1.03
    mat = np.eye(ndim + 1)
    mat[:ndim, :ndim] = rot
    mat[:ndim, ndim] = centre - rot @ centre + np.array([0.7, -0.4, 0.3])[:ndim]
    grid = voxels(shape)
    u_affine = grid @ mat[:ndim, :ndim].T + mat[:ndim, ndim] - grid
    u_spline, _ = ours(cp, shape, spacing, moving)
    # Warp by the affine first, then by the B-spline: sampling map A(phi(x)).
    total = np.asarray(compose_displacements(u_affine[None], u_spline[None]))[0]
    import dirnet_tf

    warped = np.asarray(dirnet_tf.warp(moving[None, ..., None], total[None]))[0, ..., 0]
    path = write_itk_transform(str(tmp_path / "composite.tfm"),
                                  [itk_affine_transform(mat, affine),
                                   itk_bspline_transform(cp, spacing, affine, shape)])
    transform = sitk.ReadTransform(path)
    assert transform.GetName() == "CompositeTransform"
    image = sitk.ReadImage(nifti_moving(tmp_path, moving, affine), sitk.sitkFloat64)
    itk_warped = resample_itk(sitk, image, transform)
    # compose_displacements clamps the affine field where x + u_spline(x) leaves the grid.
    inside = inside_grid(total, shape) & inside_grid(u_spline, shape)
    assert inside.mean() > 0.5
    diff = (itk_warped - warped)[inside]
    report(f"composite {ndim}-D vs compose_displacements + warp", diff)
    assert np.max(np.abs(diff)) < 1e-6
    # Point level: ITK's composite is A(B(p)).
    vox = np.random.default_rng(8).uniform(0, np.asarray(shape) - 1, (30, ndim))
    expected_vox = map_points_bspline(cp, spacing, vox) @ mat[:ndim, :ndim].T + mat[:ndim, ndim]
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    lin, off = affine[:ndim, :ndim], affine[:ndim, 3]
    got = np.array([transform.TransformPoint(((lin @ v + off) * flip).tolist()) for v in vox]) * flip
    np.testing.assert_allclose(got, expected_vox @ lin.T + off, atol=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
def test_different_moving_grid(sitk, ndim):
    shape, spacing, cp, affine = case(ndim)
    moving_affine = affine.copy()
    moving_affine[:ndim, :ndim] = moving_affine[:ndim, :ndim] * 1.1
    moving_affine[:3, 3] += [2.0, -1.0, 0.5]
    transform = sitk.CompositeTransform([itk_affine_transform(np.eye(ndim + 1), affine, moving_affine),
                                         itk_bspline_transform(cp, spacing, affine)])
    vox = np.random.default_rng(9).uniform(0, np.asarray(shape) - 1, (30, ndim))
    ras = vox @ affine[:ndim, :ndim].T + affine[:ndim, 3]
    expected = map_points_world(cp, spacing, affine, ras, moving_affine=moving_affine)
    np.testing.assert_allclose(expected, map_points_bspline(cp, spacing, vox) @ moving_affine[:ndim, :ndim].T
                               + moving_affine[:ndim, 3], atol=1e-10)
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    got = np.array([transform.TransformPoint((p * flip).tolist()) for p in ras]) * flip
    np.testing.assert_allclose(got, expected, atol=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
def test_chain_of_steps_is_the_composition_and_itk_applies_it(sitk, tmp_path, ndim):
    """:func:`map_points_chain` is ``phi_1 o phi_2 o phi_3`` (the order of ``compose_displacements``,
    last step first), and the CompositeTransform of :func:`itk_step_transforms` maps points the same way.

    The dense reference composes the steps' dense fields as the model does; it agrees to within
    its own multilinear interpolation at voxels whose intermediate points stay inside the grid,
    while the reversed chain differs by far more.
    """
    import dirnet_tf
    from dirnet_tf.warping import compose_displacements

    shape, affine, params, steps = chain_case(ndim)
    fields = [np.asarray(dirnet_tf.affine.affine_displacement(params[None], shape))[0]]
    fields += [ours(s["control_points"], shape, s["grid_spacing"], np.zeros(shape))[0] for s in steps[1:]]
    total = fields[0]
    for u in fields[1:]:
        total = np.asarray(compose_displacements(total[None], u[None]))[0]
    grid = voxels(shape)
    chained = map_points_chain(steps, grid)
    inside = np.all([np.all((x >= 0) & (x <= np.asarray(shape) - 1), -1)
                     for x in (map_points_chain(steps[k:], grid) for k in range(1, 3))], axis=0)
    assert inside.mean() > 0.5
    err = np.abs(chained - (grid + total))[inside].max()
    reversed_err = np.abs(map_points_chain(steps[::-1], grid) - (grid + total))[inside].max()
    print(f"{ndim}-D chain vs composed dense fields: {err:.3g} voxels (reversed chain {reversed_err:.3g})")
    assert err < 0.05 and reversed_err > 0.2
    path = write_itk_transform(str(tmp_path / "chain.h5"), itk_step_transforms(steps, affine, shape))
    transform = sitk.ReadTransform(path)
    assert transform.GetNumberOfTransforms() == 3
    vox = np.random.default_rng(13).uniform(-2, np.asarray(shape) + 1, (25, ndim))
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    lin, off = affine[:ndim, :ndim], affine[:ndim, 3]
    got = np.array([transform.TransformPoint(((lin @ v + off) * flip).tolist()) for v in vox]) * flip
    np.testing.assert_allclose(got, map_points_chain(steps, vox) @ lin.T + off, atol=1e-9)


def test_writes_are_atomic(sitk, tmp_path, monkeypatch):
    shape, spacing, cp, affine = case(2)
    target = str(tmp_path / "t.tfm")
    write_itk_transform(target, itk_bspline_transform(cp, spacing, affine))
    write_displacement_field(str(tmp_path / "f.nii.gz"), np.zeros(shape + (2,)), affine)
    write_elastix_transform(str(tmp_path / "e.txt"), cp, spacing, affine, shape)
    assert listing(tmp_path) == ["e.txt", "f.nii.gz", "t.tfm"]  # no temporary files left
    before = {n: open(tmp_path / n, "rb").read() for n in listing(tmp_path)}

    def broken_write(obj, path, *args):
        with open(path, "w") as fh:
            fh.write("half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteTransform", broken_write)
    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_itk_transform(target, itk_bspline_transform(2 * cp, spacing, affine))
    with pytest.raises(RuntimeError, match="disk full"):
        write_displacement_field(str(tmp_path / "f.nii.gz"), np.ones(shape + (2,)), affine)
    with pytest.raises(ValueError, match="do not fit"):
        write_elastix_transform(str(tmp_path / "e.txt"), cp[:-1], spacing, affine, shape)
    assert listing(tmp_path) == sorted(before)
    assert {n: open(tmp_path / n, "rb").read() for n in listing(tmp_path)} == before


def test_bad_inputs_raise_value_error_naming_shapes(sitk):
    shape, spacing, cp, affine = case(3)
    assert cp.shape == (6, 8, 6, 3)
    with pytest.raises(ValueError, match=r"\(8, 8, 6, 3\).*\(12, 14, 10\).*\[6, 8, 6, 3\]"):
        itk_bspline_transform(cp[np.r_[0:6, 0:2]], spacing, affine, image_shape=shape)
    with pytest.raises(ValueError, match=r"\(6, 7, 6, 3\).*\[6, 8, 6, 3\]"):
        elastix_transform_parameters(cp[:, :-1], spacing, affine, shape)
    with pytest.raises(ValueError, match=r"4x4.*\(3, 3\)"):
        itk_bspline_transform(cp, spacing, affine[:3, :3])
    with pytest.raises(ValueError, match=r"4x4.*\(3, 4\)"):
        map_points_world(cp, spacing, affine[:3], np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        itk_bspline_transform(case(2)[2], SPACING_2D, np.eye(2))
    with pytest.raises(ValueError, match=r"shape \[\*K, ndim\].*\(7, 6, 4\)"):
        map_points_bspline(np.zeros((7, 6, 4)), 4, np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"points_ij.*\(5, 2\)"):
        map_points_bspline(cp, spacing, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="oblique"):
        oblique = grid_affine(3)
        itk_bspline_transform(case(2)[2], SPACING_2D, oblique)
    with pytest.raises(ValueError, match="singular"):
        itk_bspline_transform(cp, spacing, np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\.tfm"):
        write_itk_transform("t.mat", itk_bspline_transform(cp, spacing, affine))
    with pytest.raises(ValueError, match="mix dimensions"):
        write_itk_transform("t.tfm", [itk_bspline_transform(cp, spacing, affine),
                                         itk_affine_transform(np.eye(3), np.eye(3))])
    with pytest.raises(ValueError, match=r"\[\*spatial, ndim\].*\(4, 5, 3\)"):
        displacement_field_image(np.zeros((4, 5, 3)), np.eye(4))
    with pytest.raises(ValueError, match="grid_spacing"):
        map_points_bspline(cp, (4, 3), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="grid_spacing"):
        map_points_bspline(cp, "four", np.zeros((1, 3)))
    sheared = affine.copy()
    sheared[:3, 1] += sheared[:3, 0]
    with pytest.raises(ValueError, match=r"not orthogonal.*\.mha"):
        write_displacement_field("f.nii.gz", np.zeros(shape + (3,)), sheared)


def test_2d_accepts_3x3_in_plane_affine(sitk):
    shape, spacing, cp, affine4 = case(2)
    affine3 = np.eye(3)
    affine3[:2, :2] = affine4[:2, :2]
    affine3[:2, 2] = affine4[:2, 3]
    a = itk_bspline_transform(cp, spacing, affine4)
    b = itk_bspline_transform(cp, spacing, affine3)
    assert a.GetFixedParameters() == b.GetFixedParameters()
    assert a.GetParameters() == b.GetParameters()


def test_missing_simpleitk_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # `import SimpleITK` raises ImportError
    shape, spacing, cp, affine = case(2)
    with pytest.raises(ImportError, match=r"pip install -e \.\[medical\]"):
        itk_bspline_transform(cp, spacing, affine)
    # The numpy-only parts keep working.
    assert map_points_bspline(cp, spacing, np.zeros((1, 2))).shape == (1, 2)
    assert "BSplineTransform" in elastix_transform_parameters(cp, spacing, affine, shape)
