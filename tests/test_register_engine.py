"""The registration engine through the library: load_model, run_jobs, register (dirnet_tf.registration)."""

import csv

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dirnet_tf import registration
from dirnet_tf.export_metadata import ExportInfo
from dirnet_tf.register_engine import read_model_input
from dirnet_tf.register_errors import RegisterError
from dirnet_tf.register_jobs import Job
from dirnet_tf.registration import load_model, run_jobs, ExportedModel

pytest.register_assert_rewrite("register_fixtures")
from register_fixtures import (  # noqa: E402 - after the assert-rewrite registration
    digit, smooth, nifti, nifti_pair, voxel_grid, reference_mapping, inside_image, listing, itk_elastix,
    world_points, ChainReference, points_csv)

pytest_plugins = ["register_fixtures"]


def test_register_in_process_matches_scaling(tmp_path, export_dir):
    rng = np.random.default_rng(1)
    fixed, moving = digit(rng), digit(rng)
    np.save(tmp_path / "f.npy", fixed)  # uint8 .npy: scaled by 1/255 as well
    Image.fromarray(moving).save(tmp_path / "m.png")
    result = registration.register(export_dir, str(tmp_path / "f.npy"), str(tmp_path / "m.png")).details
    np.testing.assert_allclose(result["fixed"][..., 0], fixed / 255.0, atol=1e-7)
    np.testing.assert_allclose(result["moving"][..., 0], moving / 255.0, atol=1e-7)
    assert result["warped"].shape == (28, 28, 1) and result["displacement"].shape == (28, 28, 2)
    grid = np.stack(np.meshgrid(np.arange(28), np.arange(28), indexing="ij"), -1)
    reference = ndimage.map_coordinates(moving / 255.0, (grid + result["displacement"]).transpose(2, 0, 1),
                                        order=1, mode="nearest")
    np.testing.assert_allclose(result["warped"][..., 0], reference, atol=1e-5)
    img16 = (np.arange(28 * 28).reshape(28, 28) * 80).astype(np.uint16)
    Image.fromarray(img16).save(tmp_path / "w16.png")
    np.testing.assert_allclose(read_model_input(str(tmp_path / "w16.png"))[..., 0], img16 / 65535.0, atol=1e-6)


def test_rgb_input_is_converted_to_luma_grey(tmp_path, export_dir):
    """RGB(A) PNG and RGB ``.npy`` give the same grey: ``(0.299 R + 0.587 G + 0.114 B) / 255``.

    The reference is computed here in float64 from the pixel values.
    Plausible bugs caught: PNG and ``.npy`` converted differently (Pillow's
    integer "L" conversion rounds to 1/255; a channel mean differs by up to
    0.2 on saturated colours), alpha mixed into the grey, channels reordered
    (BGR), or a colour image rejected for a one-channel model.
    """
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (28, 28, 3)).astype(np.uint8)
    rgb[0, :3] = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # saturated: luma 0.299, 0.587, 0.114
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    rgba = np.concatenate([rgb, rng.integers(0, 256, (28, 28, 1)).astype(np.uint8)], -1)
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ca.png")
    np.save(tmp_path / "c.npy", rgb)
    np.save(tmp_path / "ca.npy", rgba)
    for name in ("c.png", "ca.png", "c.npy", "ca.npy"):
        grey = read_model_input(str(tmp_path / name))
        assert grey.shape == (28, 28, 1) and grey.dtype == np.float32, name
        np.testing.assert_allclose(grey[..., 0], luma, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(read_model_input(str(tmp_path / "c.png"))[0, :3, 0], [0.299, 0.587, 0.114],
                               atol=1e-6)
    # End to end: the RGB file registers exactly like its grey version.
    np.save(tmp_path / "grey.npy", luma.astype(np.float32))
    fixed = str(tmp_path / "c.npy")
    from_rgb = registration.register(export_dir, fixed, str(tmp_path / "ca.png")).details
    from_grey = registration.register(export_dir, fixed, str(tmp_path / "grey.npy")).details
    np.testing.assert_allclose(from_rgb["warped"], from_grey["warped"], atol=1e-5)  # inputs equal to ~1e-7
    np.testing.assert_allclose(from_rgb["displacement"], from_grey["displacement"], atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_transform_and_displacement_field_reproduce_w(tmp_path, grid2d, grid3d, ndim):
    """SimpleITK ReadTransform + Resample, and a DisplacementFieldTransform of --displacement=.nii.gz, give W.

    Compared at fixed voxels whose moving point lies inside the moving image
    (outside, ITK returns its default value while W repeats the edge).
    Plausible bugs caught: the composite applied in the wrong order, the geometry
    step between two different model grids left out, RAS written where ITK expects
    LPS, ITK's x axis taken for our j, a displacement in voxels instead of mm.
    """
    import nibabel as nib

    sitk = pytest.importorskip("SimpleITK")
    bundle = grid2d if ndim == 2 else grid3d
    fixed, moving = nifti_pair(tmp_path, ndim)
    out = tmp_path / "out"
    model = load_model(bundle.path)
    job = Job(fixed, moving, out=str(out / "W.nii.gz"), displacement=str(out / "D.nii.gz"),
                       transform=str(out / ("T.tfm" if ndim == 2 else "T.h5")))
    run_jobs(model, [job])
    _, p_m, _, _ = reference_mapping(bundle, fixed, moving)
    inside = inside_image(p_m, nib.load(moving).shape)
    assert inside.mean() > 0.5
    w = nib.load(str(out / "W.nii.gz")).get_fdata()
    reference_image = sitk.ReadImage(fixed)
    moving_image = sitk.ReadImage(moving, sitk.sitkFloat64)
    transform = sitk.ReadTransform(job.transform)
    assert transform.GetName() == "CompositeTransform"
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(job.displacement, sitk.sitkVectorFloat64))
    scale = np.ptp(w)
    for name, t in (("transform", transform), ("displacement field", field)):
        resampled = sitk.GetArrayFromImage(sitk.Resample(moving_image, reference_image, t, sitk.sitkLinear, 0.0,
                                                         sitk.sitkFloat64)).T
        diff = np.abs(resampled - w)[inside]
        print(f"{ndim}-D SimpleITK {name} vs W: max {diff.max():.3g} (range {scale:.0f})")
        assert diff.max() < 2e-6 * scale


@pytest.mark.parametrize("ndim", [2, 3])
def test_transformix_reproduces_w_chained_and_single_file(tmp_path, grid2d, grid3d, ndim):
    """E.txt through transformix gives W: two model grids (chained file) and one shared grid (one file).

    Plausible bugs caught: the elastix chain composed in the wrong order, a
    relative initial-transform path that transformix cannot find, the model grid
    instead of the fixed image as output grid, column-major direction mixed up.
    """
    import nibabel as nib

    itk = itk_elastix()
    bundle = grid2d if ndim == 2 else grid3d
    fixed, moving = nifti_pair(tmp_path, ndim)
    same = nifti(tmp_path / "m_same.nii.gz", smooth(nib.load(fixed).shape, 5), nib.load(fixed).affine)
    model = load_model(bundle.path)
    for name, mov, chained in (("two", moving, True), ("one", same, False)):
        out = tmp_path / name
        job = Job(fixed, mov, out=str(out / "W.nii.gz"), elastix_transform=str(out / "E.txt"))
        run_jobs(model, [job])
        assert listing(out) == (["E.bspline.txt", "E.txt", "W.nii.gz"] if chained else ["E.txt", "W.nii.gz"])
        params = itk.ParameterObject.New()
        params.ReadParameterFile(job.elastix_transform)
        result = itk.transformix_filter(itk.imread(mov, itk.F), params, log_to_console=False)
        got = np.asarray(itk.array_from_image(result), np.float64).T
        w = nib.load(job.out).get_fdata()
        _, p_m, _, _ = reference_mapping(bundle, fixed, mov)
        inside = inside_image(p_m, nib.load(mov).shape)
        diff = np.abs(got - w)[inside]
        print(f"{ndim}-D transformix ({name} model grid(s)) vs W: max {diff.max():.3g} (range {np.ptp(w):.0f})")
        assert got.shape == w.shape and diff.max() < 2e-6 * np.ptp(w)  # transformix resamples in float32


@pytest.mark.parametrize("ndim", [2, 3])
def test_points_equal_the_dense_field_at_model_grid_points(tmp_path, grid2d, grid3d, ndim):
    """Fixed points sitting on model-grid voxels map exactly as the served dense field says.

    A fixed point ``p_f = T_f(q)`` with integer ``q`` must go to ``T_m(q + u_m[q])``
    (``u_m`` = the model's dense displacement there), as RAS mm (``x,y[,z]``) and
    as voxel indices (``i,j[,k]``); extra columns are copied.  Between grid points
    the map is the spline of the network's control points.
    Plausible bugs caught: points mapped through an interpolated field or with the
    wrong control points, RAS/LPS or ij/xy mix-ups, the fixed geometry used for the
    moving image, columns reordered.
    """
    import nibabel as nib

    from dirnet_tf import readers

    bundle = grid2d if ndim == 2 else grid3d
    fixed, moving = nifti_pair(tmp_path, ndim)
    _, _, u_model, mapping = reference_mapping(bundle, fixed, moving)
    f_img, m_img = readers.read_image(fixed)[0], readers.read_image(moving)[0]
    t_f = bundle.grid.transform_for(f_img.shape, f_img.spacing)
    t_m = bundle.grid.transform_for(m_img.shape, m_img.spacing)
    rng = np.random.default_rng(7)
    q = np.stack([rng.integers(0, n, 40) for n in bundle.grid.shape], -1).astype(float)
    p_f = t_f.model_to_image_index(q)
    keep = np.all((p_f >= 0) & (p_f <= np.asarray(f_img.shape) - 1), -1)
    q, p_f = q[keep][:12], p_f[keep][:12]
    extra = rng.uniform(0, np.asarray(f_img.shape) - 1, (5, ndim))  # between grid points
    points = np.concatenate([p_f, extra])
    expected_voxels = t_m.model_to_image_index(q + u_model[tuple(q.astype(int).T)])
    names = ["x", "y", "z"][:ndim]
    world = world_points(nib.load(fixed).affine, points, ndim)[:, :ndim]
    (tmp_path / "world.csv").write_text("id," + ",".join(names) + "\n"
                                        + "".join(f"p{n}," + ",".join(repr(float(v)) for v in w) + "\n"
                                                  for n, w in enumerate(world)))
    (tmp_path / "vox.csv").write_text(",".join(["i", "j", "k"][:ndim]) + ",note\n"
                                      + "".join(",".join(repr(float(v)) for v in p) + ",x\n" for p in points))
    model = load_model(bundle.path)
    out = tmp_path / "out"
    run_jobs(model, [Job(fixed, moving, points=str(tmp_path / "world.csv"),
                                      out_points=str(out / "world.csv")),
                         Job(fixed, moving, points=str(tmp_path / "vox.csv"),
                                      out_points=str(out / "vox.csv"))])
    with open(out / "world.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id"] + names and [r[0] for r in rows[1:]] == [f"p{n}" for n in range(len(points))]
    got_world = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    with open(out / "vox.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][-1] == "note" and all(r[-1] == "x" for r in rows[1:])
    got_voxels = np.array([[float(v) for v in r[:-1]] for r in rows[1:]])
    moving_affine = nib.load(moving).affine
    n_grid = len(q)
    err_grid = np.abs(got_voxels[:n_grid] - expected_voxels).max()
    print(f"{ndim}-D points at model grid points vs dense field: max {err_grid:.3g} moving voxels")
    np.testing.assert_allclose(got_voxels[:n_grid], expected_voxels, atol=1e-4)
    np.testing.assert_allclose(got_world[:n_grid], world_points(moving_affine, expected_voxels, ndim)[:, :ndim],
                               atol=1e-4)
    np.testing.assert_allclose(got_voxels, mapping(points), atol=1e-4)
    np.testing.assert_allclose(got_world, world_points(moving_affine, mapping(points), ndim)[:, :ndim], atol=1e-4)


def test_points_hand_computed_for_an_affine_displacement(tmp_path):
    """A model whose field is affine, ``u(q) = M q + b``: the point map computed by hand.

    Geometry (see ``ModelGrid.transform_for``): model grid 16 x 16 at 2 mm; fixed
    32 x 32 at 1 mm (``p_f = 2 q + 0.5``), origin (10, 20); moving 20 x 20 at 1.6 mm
    (``p_m = 1.25 q' + 0.125``), origin (-5, 3).  The fixed point (17, 26.5) mm is
    voxel (7, 6.5), ``q = (3.25, 3.0)``, ``u = (0.8025, -0.1825)``, ``q' = (4.0525,
    2.8175)``, ``p_m = (5.190625, 3.646875)``, i.e. (3.305, 8.835) mm.  A cubic
    B-spline reproduces affine fields exactly, so the recovered spline must too; the
    ITK transform must agree (in LPS: x and y negated).
    """
    import tensorflow as tf

    from dirnet_tf.preprocessing import ModelGrid

    sitk = pytest.importorskip("SimpleITK")
    matrix, offset = np.array([[0.05, -0.02], [0.03, 0.04]]), np.array([0.7, -0.4])
    field = (voxel_grid((16, 16)) @ matrix.T + offset).astype(np.float32)

    def served(fixed, moving):
        return {"warped": moving, "displacement": tf.constant(np.repeat(field[None], fixed.shape[0], 0))}

    model = ExportedModel(served, ExportInfo((16, 16), 1, ModelGrid((16, 16), 2.0, "minmax"), (4, 4), "border"),
                          "affine-field model")
    fixed_affine, moving_affine = np.eye(4), np.diag([1.6, 1.6, 1.0, 1.0])
    fixed_affine[:3, 3], moving_affine[:3, 3] = (10, 20, 0), (-5, 3, 0)
    fixed = nifti(tmp_path / "f.nii.gz", smooth((32, 32), 0), fixed_affine)
    moving = nifti(tmp_path / "m.nii.gz", smooth((20, 20), 1), moving_affine)
    (tmp_path / "w.csv").write_text("x,y\n17.0,26.5\n")
    (tmp_path / "v.csv").write_text("i,j\n7,6.5\n")
    out = tmp_path / "out"
    run_jobs(model, [Job(fixed, moving, points=str(tmp_path / "w.csv"), out_points=str(out / "w.csv"),
                                      transform=str(out / "T.tfm")),
                         Job(fixed, moving, points=str(tmp_path / "v.csv"), out_points=str(out / "v.csv"))])
    world = np.loadtxt(out / "w.csv", delimiter=",", skiprows=1)
    voxels = np.loadtxt(out / "v.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(world, [3.305, 8.835], atol=1e-5)
    np.testing.assert_allclose(voxels, [5.190625, 3.646875], atol=1e-5)
    lps = sitk.ReadTransform(str(out / "T.tfm")).TransformPoint((-17.0, -26.5))
    np.testing.assert_allclose(lps, [-3.305, -8.835], atol=1e-5)


def test_fields_that_do_not_determine_the_spline(tmp_path):
    """With control points not determined by the field (spacing 1), W still comes out; points are refused.

    W then interpolates the dense field linearly; ``--points`` would not be exact,
    so it is an error that says why, and nothing is written.
    """
    import tensorflow as tf

    from dirnet_tf.preprocessing import ModelGrid

    field = np.zeros((12, 12, 2), np.float32)
    field[..., 0] = 0.5

    def served(fixed, moving):
        return {"warped": moving, "displacement": tf.constant(np.repeat(field[None], fixed.shape[0], 0))}

    model = ExportedModel(served, ExportInfo((12, 12), 1, ModelGrid((12, 12), 2.0, "minmax"), (1, 1), "border"),
                          "spacing-1 model")
    fixed = nifti(tmp_path / "f.nii.gz", smooth((24, 24), 0), np.eye(4))
    result = registration.register(model, fixed, fixed).details
    assert not result["spline"]["exact"] and "not determined" in result["spline"]["problem"]
    np.testing.assert_allclose(result["field"][2:-2, 2:-2, 0], 1.0, atol=1e-6)  # 0.5 model voxels = 1 voxel
    (tmp_path / "p.csv").write_text("i,j\n3,3\n")
    with pytest.raises(RegisterError, match="--points needs the exact B-spline"):
        run_jobs(model, [Job(fixed, fixed, out=str(tmp_path / "o" / "W.nii.gz"),
                                          points=str(tmp_path / "p.csv"), out_points=str(tmp_path / "o" / "q.csv"))])
    assert listing(tmp_path / "o") == []


def test_chain_export_serves_every_step(chain2d):
    """The export of a composed model names its steps, and register reads them as a chain."""
    model = load_model(chain2d.path)
    assert [(s["kind"], s["grid_spacing"], s["output"]) for s in model.steps] == [
        ("affine", None, "step_0"), ("spline", (8, 8), "step_1"), ("spline", (8, 8), "step_2"),
        ("spline", (4, 4), "step_3"), ("spline", (4, 4), "step_4")]
    assert model.grid_spacing == (4, 4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_chain_itk_composite_transform_reproduces_w(tmp_path, chain2d, chain3d, ndim):
    """SimpleITK ReadTransform (.tfm in 2-D, .h5 in 3-D) + Resample of a composed model's transform.

    The file is a CompositeTransform ``[geometry, affine step, B-spline steps...]`` (ITK applies the
    last one first).  Resampled through it, the moving image equals the moving image at the exact
    chain (to float round-off, 2e-6 of the range) and W, which the command computes from the dense
    total field, to within that field's interpolation (measured ~1e-3 of the range).
    Plausible bugs caught: the composite in the wrong order, a step's transform left out or in model
    voxels instead of LPS mm, the affine step's centre or translation wrong.
    """
    import nibabel as nib

    sitk = pytest.importorskip("SimpleITK")
    bundle = chain2d if ndim == 2 else chain3d
    fixed, moving = nifti_pair(tmp_path, ndim)
    out = tmp_path / "out"
    job = Job(fixed, moving, out=str(out / "W.nii.gz"),
                       transform=str(out / ("T.tfm" if ndim == 2 else "T.h5")))
    run_jobs(load_model(bundle.path), [job])
    ref = ChainReference(bundle, fixed, moving)
    transform = sitk.ReadTransform(job.transform)
    assert transform.GetName() == "CompositeTransform"
    names = [transform.GetNthTransform(n).GetName() for n in range(transform.GetNumberOfTransforms())]
    assert names == ["AffineTransform", "AffineTransform"] + ["BSplineTransform"] * 4
    resampled = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(moving, sitk.sitkFloat64), sitk.ReadImage(fixed),
                                                     transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)).T
    w = nib.load(job.out).get_fdata()
    inside, scale = ref.fixed_interior(), np.ptp(w)
    assert inside.mean() > 0.3
    exact = np.abs(resampled - ref.image)[inside_image(ref.p_m, ref.moving.shape)].max()
    near = np.abs(resampled - w)[inside].max()
    print(f"{ndim}-D ITK chain vs exact chain {exact / scale:.3g}, vs W {near / scale:.3g} (of the range)")
    assert exact < 2e-6 * scale
    assert near < 5e-3 * scale
    # TransformPoint is the point map (LPS = RAS with x, y negated).
    fixed_affine, moving_affine = nib.load(fixed).affine, nib.load(moving).affine
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    p = np.random.default_rng(9).uniform(0, np.asarray(ref.fixed.shape) - 1, (6, ndim))
    lps = [transform.TransformPoint(tuple(v)) for v in world_points(fixed_affine, p, ndim)[:, :ndim] * flip]
    np.testing.assert_allclose(np.array(lps) * flip, world_points(moving_affine, ref.mapping(p), ndim)[:, :ndim],
                               atol=5e-5)


def transformix_points(itk, image, params, tmp_path, points_lps):
    points_file = tmp_path / "fixed_points.txt"
    points_file.write_text(f"point\n{len(points_lps)}\n" + "".join(" ".join(repr(float(v)) for v in p) + "\n"
                                                                   for p in points_lps))
    out_dir = tmp_path / "transformix_points"
    out_dir.mkdir()
    itk.transformix_pointset(image, params, fixed_point_set_file_name=str(points_file), output_directory=str(out_dir),
                             log_to_console=False)
    import re

    text = (out_dir / "outputpoints.txt").read_text()
    return np.array([[float(v) for v in m.split()] for m in re.findall(r"OutputPoint = \[([^\]]*)\]", text)])


@pytest.mark.parametrize("ndim,grids", [(2, "two"), (2, "one"), (3, "two")])
def test_chain_transformix_reproduces_w_and_maps_points(tmp_path, chain2d, chain3d, ndim, grids):
    """E.txt of a composed model: a chain of parameter files that transformix applies.

    ``two``: F and M on different model grids: E.txt is the geometry step, E.step1.txt ...
    E.step5.txt the model's steps (each the initial transform of the one before).  ``one``: M on F's
    grid: E.txt is step 1.  transformix resamples M like the exact chain (float32: 5e-6 of the
    range) and like W (its dense-field interpolation, ~1e-3), and maps points (``-def``) as
    ``--out_points`` does (outputpoints.txt prints ~6 digits).
    Plausible bugs caught: the chain linked in reverse, a relative or wrong initial-transform path,
    a step missing from the chain, an affine step elastix reads differently from ITK.
    """
    import nibabel as nib

    itk = itk_elastix()
    bundle = chain2d if ndim == 2 else chain3d
    fixed, moving = nifti_pair(tmp_path, ndim)
    if grids == "one":
        moving = nifti(tmp_path / "m_same.nii.gz", smooth(nib.load(fixed).shape, 5), nib.load(fixed).affine)
    fixed_affine, moving_affine = nib.load(fixed).affine, nib.load(moving).affine
    points = np.random.default_rng(10).uniform(0, np.asarray(nib.load(fixed).shape) - 1, (8, ndim))
    points_csv(tmp_path / "p.csv", ["x", "y", "z"][:ndim], world_points(fixed_affine, points, ndim)[:, :ndim])
    out = tmp_path / "out"
    job = Job(fixed, moving, out=str(out / "W.nii.gz"), elastix_transform=str(out / "E.txt"),
                       points=str(tmp_path / "p.csv"), out_points=str(out / "q.csv"))
    run_jobs(load_model(bundle.path), [job])
    steps = [f"E.step{k}.txt" for k in range(1 if grids == "two" else 2, 6)]
    assert listing(out) == steps + ["E.txt", "W.nii.gz", "q.csv"]
    chain = [str(out / "E.txt")] + [str(out / s) for s in steps]
    for path, initial in zip(chain, chain[1:] + ["NoInitialTransform"]):
        assert f'(InitialTransformParametersFileName "{initial}")' in open(path).read()
    params = itk.ParameterObject.New()
    params.ReadParameterFile(job.elastix_transform)
    image = itk.imread(moving, itk.F)
    got = np.asarray(itk.array_from_image(itk.transformix_filter(image, params, log_to_console=False)), np.float64).T
    ref = ChainReference(bundle, fixed, moving)
    w = nib.load(job.out).get_fdata()
    scale = np.ptp(w)
    exact = np.abs(got - ref.image)[inside_image(ref.p_m, ref.moving.shape)].max()
    near = np.abs(got - w)[ref.fixed_interior()].max()
    print(f"{ndim}-D transformix chain ({grids} grid(s)) vs exact chain {exact / scale:.3g}, vs W {near / scale:.3g}")
    assert got.shape == w.shape and exact < 5e-6 * scale and near < 5e-3 * scale  # measured 1e-6, 1.5e-3
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    fixed_lps = world_points(fixed_affine, points, ndim)[:, :ndim] * flip
    moved = transformix_points(itk, image, params, tmp_path, fixed_lps) * flip
    ours = np.loadtxt(out / "q.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(moved, ours, atol=1e-3)
    np.testing.assert_allclose(ours, world_points(moving_affine, ref.mapping(points), ndim)[:, :ndim], atol=5e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_dense_field_on_separable_axes_equals_map_coordinates(ndim):
    from dirnet_tf.register_maps import _linear_on_axes

    rng = np.random.default_rng(ndim)
    shape = (7, 9, 6)[:ndim]
    field = rng.normal(size=shape + (ndim,))
    # Fixed-grid rows mapped anywhere: inside, beyond both borders, on voxel centres, flipped order.
    axes = [np.linspace(-1.5, n + 0.7, 2 * n + 3)[::(-1) ** d] for d, n in enumerate(shape)]
    got = _linear_on_axes(field, axes)
    positions = np.stack(np.meshgrid(*axes, indexing="ij"), 0)
    expected = np.stack([ndimage.map_coordinates(field[..., c], positions, order=1, mode="nearest")
                         for c in range(ndim)], -1)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.abs(expected).max() > 0.5


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("boundary,mode", [("border", "nearest"), ("zeros", "grid-constant")])
def test_warped_intensities_by_the_compiled_resampler_equal_map_coordinates(ndim, boundary, mode):
    from dirnet_tf.register_maps import _as_image_tensor, _sample

    rng = np.random.default_rng(ndim)
    image = rng.uniform(0, 100, size=(9, 11, 7)[:ndim])
    positions = rng.uniform(-2, 12, size=(5, 6, 4)[:ndim] + (ndim,))  # inside and beyond the borders
    got = _sample(_as_image_tensor(image), positions, boundary)
    expected = ndimage.map_coordinates(image, np.moveaxis(positions, -1, 0), order=1, mode=mode, cval=0.0,
                                       prefilter=False)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert np.std(expected) > 5
