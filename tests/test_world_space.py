"""World-space registration: fixed and moving related through their headers (dirnet_tf.world_grid,
``init`` of dirnet_tf.register_engine.prepare_pair, ``space`` of the export metadata).

The volumes here are one scan and copies of it whose arrays are permuted (a sagittal axis order),
flipped and cropped, with headers that say so (built here with index matrices, checked against
nibabel).  For such pairs the world-space preparation must give the network identical inputs, and
a symmetric composed model (``r(F, W) - r(W, F)``) then returns exactly the identity: every output
must be the identity in world coordinates (RAS mm).
"""

import re

import numpy as np
import pytest

import dirnet_tf
from dirnet_tf import register_engine
from dirnet_tf.export_metadata import ExportInfo, ExportMetadataError, model_metadata, parse_metadata
from dirnet_tf.geometry import pixel_affine
from dirnet_tf.inference import export_saved_model
from dirnet_tf.preprocessing import GridTransform, ModelGrid
from dirnet_tf.readers import Image
from dirnet_tf.register_errors import RegisterError
from dirnet_tf.registration import ExportedModel, Result, load_model
from dirnet_tf.world_grid import AffineGridTransform, canonical_image, closest_ras_orientation, transform_from_dict

pytest.register_assert_rewrite("register_fixtures")
from register_fixtures import (  # noqa: E402
    nifti, oblique_affine, random_chain_model, smooth, voxel_grid, world_points)

SHAPE3, SPACING3 = (20, 24, 18), (1.2, 1.0, 1.5)


# --------------------------------------------------------------------------- #
# Images and models
# --------------------------------------------------------------------------- #


def windowed(shape, seed, margin=3):
    """A smooth positive image that is exactly 0 within ``margin`` voxels of every border."""
    out = smooth(shape, seed).astype(np.float64)
    for a, n in enumerate(shape):
        x = np.clip((np.arange(n) - margin + 1) / (n - 2 * margin + 1), 0, 1)
        w = np.sin(np.pi * x) ** 2
        out = out * w.reshape([-1 if b == a else 1 for b in range(len(shape))])
    return out.astype(np.float32)


def reorient(array, affine, crop, perm, flips):
    """A copy of the scan: cropped (``crop`` slices), its axes permuted (``perm``) and flipped, with the affine
    that says so.  Returns ``(array, affine, matrix)``, ``matrix``: copy index -> original index (homogeneous)."""
    n = array.ndim
    array = array[crop]
    matrix = np.eye(n + 1)
    matrix[:n, n] = [s.start or 0 for s in crop]
    permute = np.zeros((n + 1, n + 1))
    permute[n, n] = 1
    for d, a in enumerate(perm):
        permute[a, d] = 1  # copy axis d is original axis perm[d]
    array = np.transpose(array, perm)
    matrix = matrix @ permute
    flip = np.eye(n + 1)
    for d in flips:
        flip[d, d], flip[d, n] = -1, array.shape[d] - 1
    array = np.flip(array, flips)
    matrix = matrix @ flip
    embed = np.eye(4)
    embed[:n, :n], embed[:n, 3] = matrix[:n, :n], matrix[:n, n]
    return np.ascontiguousarray(array), np.asarray(affine) @ embed, matrix


def scan3d(tmp_path, seed=0, name="scan"):
    affine = oblique_affine(SPACING3, 0.2, (31.5, -22.0, 14.25), (0.3, -0.5, 0.8))
    array = windowed(SHAPE3, seed)
    return nifti(tmp_path / f"{name}.nii.gz", array, affine), array, affine


def copy3d(tmp_path, array, affine, name="copy", shift=(0.0, 0.0, 0.0)):
    """Sagittal axis order (original k, i, j), the new second axis flipped, cropped within the zero border."""
    copy, copy_affine, matrix = reorient(array, affine, (slice(2, 19), slice(1, 22), slice(0, 16)), (2, 0, 1), (1,))
    copy_affine = copy_affine.copy()
    copy_affine[:3, 3] += shift
    return nifti(tmp_path / f"{name}.nii.gz", copy, copy_affine), copy, copy_affine, matrix


def random_chain(shape, seed, gains):
    """An untrained DIRNet(stages=("affine", 8), bounded, symmetric) with random, non-trivial steps."""
    return random_chain_model(shape, seed, gains, stages=("affine", 8), passes=1)


@pytest.fixture(scope="module")
def world3d(tmp_path_factory):
    """A 3-D world-space export (metadata written by model_metadata: ``"space": "world"``)."""
    grid = ModelGrid((16, 16, 16), 2.0, "minmax")
    model = random_chain(grid.shape, 3, (2.0, 80.0, 10.0))
    path = str(tmp_path_factory.mktemp("world3d") / "export")
    export_saved_model(model, path, grid.shape, 1, model_metadata(model, grid.shape, 1, model_grid=grid.to_dict()))
    return load_model(path)


def fake_model(shape, grid, field=None, space="world", grid_spacing=4):
    """An ExportedModel serving a fixed displacement (zero by default): fast, no SavedModel."""
    import tensorflow as tf

    field = np.zeros(tuple(shape) + (len(shape),), np.float32) if field is None else field.astype(np.float32)

    def served(fixed, moving):
        return {"warped": moving, "displacement": tf.constant(np.repeat(field[None], fixed.shape[0], 0))}

    info = ExportInfo(tuple(shape), 1, grid, (grid_spacing,) * len(shape), "border", space=space)
    return ExportedModel(served, info, f"{space}-space test model")


def run(model, fixed, moving, init=None, spacing=(None, None)):
    details = register_engine.prepare_pair(model, fixed, moving, spacing, init=init)
    register_engine.infer(model, [details])
    register_engine.finish(model, details, {"image", "field"})
    return Result(model, details, fixed if isinstance(fixed, str) else "<fixed array>",
                  moving if isinstance(moving, str) else "<moving array>")


def inside(p, shape, margin=0.0):
    return np.all((p >= margin) & (p <= np.asarray(shape) - 1 - margin), axis=-1)


# --------------------------------------------------------------------------- #
# Orientation
# --------------------------------------------------------------------------- #


def test_closest_ras_orientation_and_canonical_view_match_nibabel():
    """The closest-RAS rule is nibabel's io_orientation; the canonical view its as_closest_canonical.

    Plausible bugs caught: a permutation applied inverted (axis a -> c read as c -> a), the flip's
    shift ``n - 1`` missing or on the wrong axis, spacing not permuted with the axes.
    """
    import nibabel as nib

    rng = np.random.default_rng(0)
    array = rng.normal(size=(5, 6, 7)).astype(np.float32)
    for n in range(12):
        perm = rng.permutation(3)
        flips = tuple(int(d) for d in np.nonzero(rng.random(3) < 0.5)[0])
        base = oblique_affine((1.1, 0.8, 2.0), rng.uniform(-0.6, 0.6), rng.normal(0, 20, 3), rng.normal(size=3))
        copy, affine, _ = reorient(array, base, (slice(None),) * 3, tuple(perm), flips)
        got = closest_ras_orientation(affine)
        expected = nib.orientations.io_orientation(affine)
        assert [(w, s) for w, s in got] == [(int(w), int(s)) for w, s in expected]
        spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
        canonical, matrix = canonical_image(Image(copy, spacing, affine, "copy"))
        reference = nib.as_closest_canonical(nib.Nifti1Image(copy, affine))
        np.testing.assert_array_equal(canonical.array, np.asarray(reference.dataobj))
        np.testing.assert_allclose(canonical.affine, reference.affine, atol=1e-12)
        np.testing.assert_allclose(canonical.spacing, np.linalg.norm(reference.affine[:3, :3], axis=0), atol=1e-12)
        k = rng.integers(0, canonical.shape, (10, 3))
        p = k @ matrix[:3, :3].T + matrix[:3, 3]
        np.testing.assert_array_equal(canonical.array[tuple(k.T)], copy[tuple(p.astype(int).T)])


# --------------------------------------------------------------------------- #
# 3-D: identity in world space
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("direction", ["copy_to_original", "original_to_copy"])
def test_header_gives_the_identity_in_world_space(tmp_path, world3d, direction):
    """A permuted, flipped, cropped copy registered with its original (either way) is the identity in world mm.

    The metadata's ``"space": "world"`` makes init None resolve to ``header``.  Checked: the network sees
    equal inputs (so the symmetric model returns the identity); ``map_points`` of world points returns the
    same world points; W equals the fixed image wherever the moving image is defined; the fixed grid of an
    image in RAS order is exactly ModelGrid.prepare's.
    Plausible bugs caught: the moving image sampled along its own array axes (the copy's axes are
    permuted), a flip's offset missing, the fixed model affine of the permuted image built from the
    canonical transform only (world points off by the permutation), the grid transform's matrix used
    transposed in the outputs.
    """
    original, array, affine = scan3d(tmp_path)
    copy, _, copy_affine, _ = copy3d(tmp_path, array, affine)
    fixed, moving = (copy, original) if direction == "copy_to_original" else (original, copy)
    fixed_affine = copy_affine if fixed == copy else affine
    result = run(world3d, fixed, moving)
    details = result.details
    assert details["init"] == {"mode": "header", "translation_mm": [0.0, 0.0, 0.0]}
    np.testing.assert_allclose(details["moving"], details["fixed"], atol=2e-6)
    assert np.abs(details["fixed"]).max() > 0.9  # the content is on the model grid
    assert np.abs(details["displacement"]).max() < 1e-4
    if fixed == original:  # already in RAS order: exactly the per-image preparation (centred, crop-robust)
        expected, transform = world3d.grid.prepare(result.fixed_image, exact_centre=True, foreground_high=True)
        np.testing.assert_array_equal(details["fixed"][..., 0], expected)
        assert isinstance(details["fixed_grid"], GridTransform)
        assert details["fixed_grid"].to_dict() == transform.to_dict()
    else:
        assert isinstance(details["fixed_grid"], AffineGridTransform)
    assert isinstance(details["moving_grid"], AffineGridTransform)
    rng = np.random.default_rng(1)
    voxels = rng.uniform(0, np.asarray(result.fixed_image.shape) - 1, (40, 3))
    world = world_points(fixed_affine, voxels, 3)
    np.testing.assert_allclose(result.map_points(world, coordinates="world"), world, atol=1e-4)
    moving_affine = affine if moving == original else copy_affine
    p_m = result.map_points(voxels)
    np.testing.assert_allclose(world_points(moving_affine, p_m, 3), world, atol=1e-4)
    # W is the fixed image wherever the moving one is defined (the fixed image's zero border is cropped in
    # the copy: there W is the copy's border value, 0 as well)
    fixed_array = result.fixed_image.array
    p_all = np.concatenate([p for _, _, p in register_engine.fixed_slabs(world3d, details)], axis=0)
    defined = inside(p_all, result.moving_image.shape)
    assert defined.mean() > 0.5
    np.testing.assert_allclose(result.warped[defined], fixed_array[defined], atol=1e-4 * np.ptp(fixed_array))
    np.testing.assert_allclose(result.warped, fixed_array, atol=1e-4 * np.ptp(fixed_array))


def test_center_recovers_a_shifted_origin(tmp_path, world3d):
    """The copy with its header origin shifted by ``d`` (intensities unchanged): init center finds ``d``.

    The centres of mass of identical intensities differ by exactly ``d``, so the network again sees equal
    inputs and the registration is ``x -> x + d`` in world mm (points, W, the record); header alone
    keeps ``t = 0``.
    Plausible bugs caught: the translation with the wrong sign (fixed minus moving), added in voxels
    instead of mm, left out of the point map or of W.
    """
    original, array, affine = scan3d(tmp_path)
    d = np.array([6.5, -4.25, 3.0])
    copy, _, copy_affine, _ = copy3d(tmp_path, array, affine, shift=d)
    result = run(world3d, original, copy, init="center")
    np.testing.assert_allclose(result.details["init"]["translation_mm"], d, atol=1e-6)
    assert result.details["init"]["mode"] == "center"
    np.testing.assert_allclose(result.details["moving"], result.details["fixed"], atol=2e-6)
    world = world_points(affine, np.random.default_rng(2).uniform(0, np.asarray(SHAPE3) - 1, (30, 3)), 3)
    np.testing.assert_allclose(result.map_points(world, coordinates="world"), world + d, atol=1e-4)
    np.testing.assert_allclose(result.warped, array, atol=1e-4 * np.ptp(array))
    header = register_engine.prepare_pair(world3d, original, copy, init="header")
    assert header["init"] == {"mode": "header", "translation_mm": [0.0, 0.0, 0.0]}


@pytest.mark.parametrize("init", ["header", "center"])
def test_itk_composite_and_transformix_reproduce_w_with_a_permuted_image(tmp_path, world3d, init):
    """``Result.save(transform=...)`` through SimpleITK, and the elastix chain through transformix.

    ``header``: fixed a scan in RAS order, moving a different scan stored permuted, flipped and cropped;
    ``center``: fixed the permuted, flipped, cropped copy (a permuted B-spline grid), moving the other
    scan in RAS order with its origin shifted.  The model's steps are not trivial.  With ``header`` the
    moving model grid is the fixed one in world space (the geometry step is the identity; elastix leaves
    it out), with ``center`` it is shifted by ``t``.  The composite ``[geometry, affine step, B-spline
    step]`` resampled through SimpleITK equals the moving image at the exact point map (float round-off) and W (to the
    dense field's interpolation); TransformPoint and transformix's points equal ``map_points``.
    Plausible bugs caught: the moving model affine built from scale/offset only (the permutation lost),
    a non-diagonal matrix transposed in the geometry step, a direction matrix the B-spline grid cannot
    hold.
    """
    import nibabel as nib

    sitk = pytest.importorskip("SimpleITK")
    scan, array, affine = scan3d(tmp_path, seed=0, name="scan")
    _, other, _ = scan3d(tmp_path, seed=1, name="other")
    shift = (0.0, 0.0, 0.0) if init == "header" else (5.0, -3.0, 4.0)
    if init == "header":
        fixed, fixed_affine = scan, affine
        moving, moving_array, moving_affine, _ = copy3d(tmp_path, other, affine, name="moving")
    else:
        fixed, _, fixed_affine, _ = copy3d(tmp_path, array, affine, name="fixed")
        moving_array, moving_affine = other, affine.copy()
        moving_affine[:3, 3] += shift
        moving = nifti(tmp_path / "moving.nii.gz", other, moving_affine)
    result = run(world3d, fixed, moving, init=init)
    assert isinstance(result.details["fixed_grid"], GridTransform if init == "header" else AffineGridTransform)
    assert result.details["init"]["mode"] == init
    if init == "center":
        assert np.linalg.norm(np.subtract(result.details["init"]["translation_mm"], shift)) < 2.0
    assert np.abs(result.details["displacement"]).max() > 0.5  # a real deformation (model voxels)
    out = tmp_path / "out"
    result.save(out=str(out / "W.nii.gz"), transform=str(out / "T.h5"), elastix_transform=str(out / "E.txt"))
    transform = sitk.ReadTransform(str(out / "T.h5"))
    names = [transform.GetNthTransform(n).GetName() for n in range(transform.GetNumberOfTransforms())]
    assert names == ["AffineTransform", "AffineTransform", "BSplineTransform"]
    resampled = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(moving, sitk.sitkFloat64), sitk.ReadImage(fixed),
                                                     transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)).T
    from scipy import ndimage

    voxels = voxel_grid(result.fixed_image.shape).reshape(-1, 3)
    p_m = result.map_points(voxels)
    exact = ndimage.map_coordinates(moving_array.astype(np.float64), p_m.T, order=1, mode="nearest")
    defined = inside(p_m, moving_array.shape)
    scale = np.ptp(moving_array)
    err_exact = np.abs(resampled.reshape(-1) - exact)[defined].max()
    err_w = np.abs(resampled - nib.load(str(out / "W.nii.gz")).get_fdata()).reshape(-1)[defined]
    print(f"ITK vs exact map {err_exact / scale:.3g}, vs W max {err_w.max() / scale:.3g} "
          f"median {np.median(err_w) / scale:.3g} (of the range)")
    assert defined.mean() > 0.5
    assert err_exact < 2e-6 * scale
    assert err_w.max() < 5e-3 * scale  # measured 3e-4
    flip = np.array([-1.0, -1.0, 1.0])
    world = world_points(fixed_affine, voxels[::97], 3)
    lps = np.array([transform.TransformPoint(tuple(v)) for v in world * flip]) * flip
    expected = result.map_points(world, coordinates="world")
    np.testing.assert_allclose(lps, expected, atol=1e-4)
    np.testing.assert_allclose(world_points(moving_affine, p_m[::97], 3), expected, atol=1e-6)
    itk = pytest.importorskip("itk")
    if not hasattr(itk, "TransformixFilter"):
        pytest.skip("needs itk-elastix")
    params = itk.ParameterObject.New()
    files = sorted(out.glob("E*.txt"))
    assert [f.name for f in files] == (["E.step2.txt", "E.txt"] if init == "header"
                                       else ["E.step1.txt", "E.step2.txt", "E.txt"])
    params.ReadParameterFile(str(out / "E.txt"))
    points_file = tmp_path / "points.txt"
    points_file.write_text(f"point\n{len(world)}\n" + "".join(" ".join(repr(float(v)) for v in p * flip) + "\n"
                                                          for p in world))
    out_dir = tmp_path / "transformix"
    out_dir.mkdir()
    image = itk.imread(moving, itk.F)
    got = np.asarray(itk.array_from_image(itk.transformix_filter(image, params, log_to_console=False)), np.float64).T
    assert np.abs(got.reshape(-1) - exact)[defined].max() < 5e-6 * scale
    itk.transformix_pointset(image, params, fixed_point_set_file_name=str(points_file), output_directory=str(out_dir),
                             log_to_console=False)
    text = (out_dir / "outputpoints.txt").read_text()
    moved = np.array([[float(v) for v in m.split()] for m in re.findall(r"OutputPoint = \[([^\]]*)\]", text)])
    np.testing.assert_allclose(moved * flip, expected, atol=1e-3)


# --------------------------------------------------------------------------- #
# Today's behaviour kept
# --------------------------------------------------------------------------- #


def test_array_mode_and_old_exports_give_todays_arrays(tmp_path):
    """init "array", and init None with an export written before ``space`` existed, prepare each image on
    its own: the arrays and transforms of ModelGrid.prepare, bit for bit; the metadata key round-trips.

    Plausible bugs caught: old exports silently switched to world space (their outputs would change),
    ``space`` not written for model-grid exports, an unknown value accepted.
    """
    grid = ModelGrid((16, 16, 16), 2.0, "percentile")
    original, array, affine = scan3d(tmp_path)
    copy = copy3d(tmp_path, array, affine)[0]
    old = parse_metadata({"model_grid": grid.to_dict()}, "old", grid.shape)
    assert old.space == "array"
    new = model_metadata(dirnet_tf.DIRNet((16, 16, 16), 8, filters=2), grid.shape, 1, model_grid=grid.to_dict())
    assert new["space"] == "world" and parse_metadata(new, "new", grid.shape).space == "world"
    assert "space" not in model_metadata(dirnet_tf.DIRNet((28, 28), 8, filters=2), (28, 28), 1)
    with pytest.raises(ExportMetadataError, match="space 'ras'"):
        parse_metadata(dict(new, space="ras"), "bad", grid.shape)
    from dirnet_tf import readers

    images = [readers.read_image(p)[0] for p in (copy, original)]
    for space, init in (("array", None), ("world", "array")):
        model = fake_model(grid.shape, grid, space=space)
        details = register_engine.prepare_pair(model, copy, original, init=init)
        assert details["init"] == {"mode": "array", "translation_mm": [0.0, 0.0, 0.0]}
        for key, image in zip(("fixed", "moving"), images):
            expected, transform = grid.prepare(image)
            np.testing.assert_array_equal(details[key][..., 0], expected)
            assert details[f"{key}_grid"].to_dict() == transform.to_dict()


# --------------------------------------------------------------------------- #
# 2-D
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("perm,flips", [((0, 1), (0,)), ((1, 0), (1,))])
def test_2d_header_identity_and_center_for_arrays(tmp_path, perm, flips):
    """2-D: a flipped (and transposed) cropped copy through its header; arrays without geometry with center.

    The fixed grid keeps the fixed image's array axes; the moving image is projected through its 3x2
    linear part.  Arrays (pixel space): a content shift of (3, -3) pixels is found by center, and the map
    is ``p -> p + (3, -3)`` in voxels.
    Plausible bugs caught: the least-squares projection with the wrong pseudo-inverse (transposed),
    the pixel affine's reversed axes ignored for the translation.
    """
    grid = ModelGrid((24, 24), 1.5, "minmax")
    model = fake_model(grid.shape, grid)
    affine = oblique_affine((1.0, 0.75), 0.3, (-20, 15, 4))
    array = windowed((30, 36), 4)
    fixed = nifti(tmp_path / "f.nii.gz", array, affine)
    copy, copy_affine, _ = reorient(array, affine, (slice(2, 28), slice(2, 34)), perm, flips)
    moving = nifti(tmp_path / "m.nii.gz", copy, copy_affine)
    result = run(model, fixed, moving, init="header")
    details = result.details
    assert isinstance(details["fixed_grid"], GridTransform)
    np.testing.assert_allclose(details["moving"], details["fixed"], atol=2e-6)
    world = world_points(affine, np.random.default_rng(3).uniform(0, np.asarray(array.shape) - 1, (20, 2)), 2)
    np.testing.assert_allclose(result.map_points(world, coordinates="world"), world, atol=1e-6)
    np.testing.assert_allclose(result.warped, array, atol=1e-5 * np.ptp(array))
    shifted = np.zeros_like(array)
    shifted[3:, :-3] = array[:-3, 3:]  # only the zero border is lost: the centre of mass moves by (3, -3)
    spacing = (0.8, 1.3)
    result = run(model, array, shifted, init="center", spacing=(spacing, spacing))
    ras = pixel_affine(spacing)[:3, :2] @ np.array([3.0, -3.0])
    np.testing.assert_allclose(result.details["init"]["translation_mm"], ras, atol=1e-9)
    voxels = np.random.default_rng(4).uniform(0, np.asarray(array.shape) - 1, (20, 2))
    np.testing.assert_allclose(result.map_points(voxels), voxels + [3.0, -3.0], atol=1e-6)
    np.testing.assert_allclose(result.warped[:-3, 3:], array[:-3, 3:], atol=1e-5 * np.ptp(array))


# --------------------------------------------------------------------------- #
# The point map on a fixed grid that is not diagonal
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("ndim", [2, 3])
def test_fixed_slabs_agree_with_the_exact_point_map_on_any_fixed_grid(tmp_path, ndim):
    """W's per-voxel map (fixed_slabs) equals map_fixed_points for diagonal, permuted and oblique fixed grids.

    A served B-spline field (random control points): the separable path (diagonal, or permuted and
    flipped) and the per-voxel fallback (an oblique grid) must give the same moving positions as the exact
    point map; the dense-field fallback (spline not exact) equals map_coordinates of the field at the
    fixed voxels' model positions.
    Plausible bugs caught: a permuted field transposed the wrong way, a row block taken along the model
    axis instead of the fixed array axis, the fallback evaluating the field at image instead of model indices.
    """
    from scipy import ndimage

    from dirnet_tf.spline_np import control_grid_shape, spline_on_axes

    shape = (16, 20) if ndim == 2 else (12, 10, 14)
    grid = ModelGrid(shape, 2.0, "minmax")
    cp = np.random.default_rng(5).normal(0, 0.8, tuple(control_grid_shape(shape, (4,) * ndim)) + (ndim,))
    field = spline_on_axes(cp, (4,) * ndim, [np.arange(n, dtype=float) for n in shape])
    model = fake_model(shape, grid, field)
    if ndim == 2:
        fixed = nifti(tmp_path / "f.nii.gz", windowed((22, 26), 6), oblique_affine((1.0, 1.2), 0.1, (3, 4, 5)))
    else:
        _, array, affine = scan3d(tmp_path)
        fixed = copy3d(tmp_path, array, affine)[0]
    moving = nifti(tmp_path / "m.nii.gz", windowed((18, 22) if ndim == 2 else (14, 16, 12), 7),
                   oblique_affine((1.1, 0.9) if ndim == 2 else (1.1, 0.9, 1.3), 0.2, (1, 2, 3)))
    details = register_engine.prepare_pair(model, fixed, moving, init="header")
    register_engine.infer(model, [details])
    rotation = np.eye(ndim + 1)
    c, s = np.cos(0.3), np.sin(0.3)
    rotation[:2, :2] = [[c, -s], [s, c]]
    grids = {"world": details["fixed_grid"],
             "oblique": AffineGridTransform(shape, grid.spacing, details["fixed_image"].shape, (1.0,) * ndim,
                                            (details["fixed_grid"].matrix() @ rotation).tolist())}
    for name, fixed_grid in grids.items():
        for key in ("spline", "identity", "chain", "image", "field"):
            details.pop(key, None)
        details["fixed_grid"] = fixed_grid
        p_f = np.concatenate([p for _, p, _ in register_engine.fixed_slabs(model, details, slab_voxels=200)])
        p_m = np.concatenate([p for _, _, p in register_engine.fixed_slabs(model, details, slab_voxels=200)])
        assert details["spline"]["exact"]
        expected = register_engine.map_fixed_points(model, details, p_f.reshape(-1, ndim))
        np.testing.assert_allclose(p_m.reshape(-1, ndim), expected, atol=1e-9, err_msg=name)
        details["spline"] = dict(details["spline"], exact=False)
        p_dense = np.concatenate([p for _, _, p in register_engine.fixed_slabs(model, details, slab_voxels=200)])
        q = fixed_grid.image_to_model_index(p_f.reshape(-1, ndim))
        served = field.astype(np.float32).astype(np.float64)
        u = np.stack([ndimage.map_coordinates(served[..., k], q.T, order=1, mode="nearest") for k in range(ndim)], -1)
        np.testing.assert_allclose(p_dense.reshape(-1, ndim), details["moving_grid"].model_to_image_index(q + u),
                                   atol=1e-9, err_msg=name)


def test_affine_grid_transform_round_trips_and_maps_consistently():
    """to_dict / from_dict, the inverse map, the model affine and the inside mask of AffineGridTransform."""
    rng = np.random.default_rng(8)
    matrix = np.eye(4)
    matrix[:3, :3] = rng.normal(0, 1, (3, 3)) + 2 * np.eye(3)
    matrix[:3, 3] = rng.normal(0, 3, 3)
    affine = oblique_affine((1.0, 2.0, 1.5), 0.4, (1, 2, 3))
    t = AffineGridTransform((6, 7, 5), (2.0, 2.0, 2.0), (9, 8, 10), (1.0, 2.0, 1.5), matrix.tolist(), affine.tolist(),
                            "x", intensity={"mode": "minmax", "low": 0.0, "high": 1.0, "pad_value": 0.0})
    back = transform_from_dict(t.to_json())
    assert isinstance(back, AffineGridTransform) and back.to_dict() == t.to_dict()
    q = rng.uniform(-2, 8, (20, 3))
    np.testing.assert_allclose(t.image_to_model_index(t.model_to_image_index(q)), q, atol=1e-10)
    np.testing.assert_allclose(world_points(t.model_affine(), q, 3), world_points(affine, t.model_to_image_index(q), 3),
                               atol=1e-10)
    p = t.model_to_image_index(voxel_grid((6, 7, 5)))
    np.testing.assert_array_equal(t.inside_mask(), np.all((p >= -0.5) & (p <= np.array([8.5, 7.5, 9.5])), -1))
    assert isinstance(transform_from_dict(ModelGrid((4, 4), 1.0).transform_for((8, 8), 0.5).to_dict()), GridTransform)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_errors_name_the_image_and_the_choice(tmp_path):
    """init header needs patient geometry on both images (PNG, NPY and arrays have none); unknown init
    values and world modes on an export without a model grid are refused."""
    from PIL import Image as PILImage

    grid = ModelGrid((16, 16), 1.0, "minmax")
    model = fake_model(grid.shape, grid)
    array = windowed((20, 20), 9)
    png, npy = tmp_path / "a.png", tmp_path / "b.npy"
    PILImage.fromarray((array / array.max() * 255).astype(np.uint8)).save(png)
    np.save(npy, array)
    fixed = nifti(tmp_path / "f.nii.gz", array, np.eye(4))
    for moving, name in ((str(png), "a.png"), (str(npy), "b.npy"), (array, "<moving array>")):
        message = f"moving image .*{re.escape(name)}.*no patient geometry.*--init=center"
        with pytest.raises(RegisterError, match=message):
            register_engine.prepare_pair(model, fixed, moving, init="header")
        assert register_engine.prepare_pair(model, fixed, moving)["init"]["mode"] == "array"  # None: array
        assert register_engine.prepare_pair(model, fixed, moving, init="center")["init"]["mode"] == "center"
    with pytest.raises(RegisterError, match="fixed image <fixed array>.*no patient geometry"):
        register_engine.prepare_pair(model, array, fixed, init="header")
    with pytest.raises(RegisterError, match="init must be one of header, center, array.*'world'"):
        register_engine.prepare_pair(model, fixed, fixed, init="world")
    plain = fake_model((20, 20), None)
    with pytest.raises(RegisterError, match="no model grid.*no patient geometry.*--init=array"):
        register_engine.prepare_pair(plain, array, array, init="header")
    assert register_engine.prepare_pair(plain, array, array)["init"]["mode"] == "array"


def test_cropping_background_changes_neither_grid_nor_intensities():
    """A volume and its copy with 20 % of empty background cropped at every border (header updated):
    in world space both give the same fixed model array, grid centre and intensity range."""
    from dirnet_tf.preprocessing import ModelGrid
    from dirnet_tf.readers import Image
    from dirnet_tf.world_grid import prepare_fixed

    rng = np.random.default_rng(0)
    shape = (41, 50, 37)
    array = np.zeros(shape, np.float32)
    inner = tuple(slice(int(0.3 * n), n - int(0.3 * n)) for n in shape)
    array[inner] = rng.uniform(50, 400, array[inner].shape)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-20.0, -25.0, -18.0)
    start = [int(0.2 * n) for n in shape]
    crop = array[tuple(slice(s, n - s) for s, n in zip(start, shape))]
    crop_affine = affine.copy()
    crop_affine[:3, 3] += start
    grid = ModelGrid((16, 20, 14), 2.0)
    a, ta = prepare_fixed(grid, Image(array, (1.0, 1.0, 1.0), affine, "full"))
    b, tb = prepare_fixed(grid, Image(crop, (1.0, 1.0, 1.0), crop_affine, "crop"))
    np.testing.assert_allclose(ta.model_affine(), tb.model_affine(), atol=1e-9)
    assert ta.intensity["high"] == tb.intensity["high"] and ta.intensity["low"] == tb.intensity["low"]
    np.testing.assert_allclose(a, b, atol=1e-6)
    # the whole-image percentile of the old preparation moves with the crop
    assert grid.prepare(Image(array, (1.0,) * 3, affine, "full"))[1].intensity["high"] != \
        grid.prepare(Image(crop, (1.0,) * 3, crop_affine, "crop"))[1].intensity["high"]
