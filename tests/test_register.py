"""``python -m experiments.register``: register two image files with an exported model."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import dirnet_tf
from dirnet_tf.inference import export_saved_model
from experiments import register

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    model = dirnet_tf.DIRNet((28, 28), 8, filters=4)
    rng = np.random.default_rng(2)
    for v in model.regressor.trainable_variables[-2:]:  # a non-trivial deformation
        v.assign(rng.normal(0, 0.5, v.shape).astype(np.float32))
    path = str(tmp_path_factory.mktemp("model") / "export")
    export_saved_model(model, path, (28, 28), 1)
    return path


def _digit(rng, size=28):
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    c = rng.uniform(10, 18, 2)
    r = np.hypot(ii - c[0], jj - c[1])
    return (np.clip(1.5 - np.abs(r - rng.uniform(5, 8)), 0, 1) * 255).astype(np.uint8)


def _cli(args):
    return subprocess.run([sys.executable, "-m", "experiments.register"] + args, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_register_png_pair(tmp_path, export_dir):
    rng = np.random.default_rng(0)
    fixed, moving = _digit(rng), _digit(rng)
    Image.fromarray(fixed).save(tmp_path / "a.png")
    Image.fromarray(moving).convert("RGB").save(tmp_path / "b.png")  # RGB is turned into grey
    out, disp, fig = tmp_path / "o" / "warped.png", tmp_path / "d.npy", tmp_path / "f.png"
    proc = _cli([f"--model={export_dir}", f"--fixed={tmp_path / 'a.png'}", f"--moving={tmp_path / 'b.png'}",
                 f"--out={out}", f"--displacement={disp}", f"--figure={fig}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NCC" in proc.stdout
    d = np.load(disp)
    assert d.shape == (28, 28, 2) and d.dtype == np.float32 and np.abs(d).max() > 0.2
    grid = np.stack(np.meshgrid(np.arange(28), np.arange(28), indexing="ij"), -1)
    reference = ndimage.map_coordinates(moving / 255.0, (grid + d).transpose(2, 0, 1), order=1, mode="nearest")
    warped = np.asarray(Image.open(out))
    assert warped.dtype == np.uint8 and warped.shape == (28, 28)
    assert np.abs(warped.astype(int) - np.rint(reference * 255)).max() <= 1
    assert os.path.getsize(fig) > 1000


def test_register_in_process_matches_scaling(tmp_path, export_dir):
    rng = np.random.default_rng(1)
    fixed, moving = _digit(rng), _digit(rng)
    np.save(tmp_path / "f.npy", fixed)  # uint8 .npy: scaled by 1/255 as well
    Image.fromarray(moving).save(tmp_path / "m.png")
    result = register.register(export_dir, str(tmp_path / "f.npy"), str(tmp_path / "m.png"))
    np.testing.assert_allclose(result["fixed"][..., 0], fixed / 255.0, atol=1e-7)
    np.testing.assert_allclose(result["moving"][..., 0], moving / 255.0, atol=1e-7)
    assert result["warped"].shape == (28, 28, 1) and result["displacement"].shape == (28, 28, 2)
    grid = np.stack(np.meshgrid(np.arange(28), np.arange(28), indexing="ij"), -1)
    reference = ndimage.map_coordinates(moving / 255.0, (grid + result["displacement"]).transpose(2, 0, 1),
                                        order=1, mode="nearest")
    np.testing.assert_allclose(result["warped"][..., 0], reference, atol=1e-5)
    img16 = (np.arange(28 * 28).reshape(28, 28) * 80).astype(np.uint16)
    Image.fromarray(img16).save(tmp_path / "w16.png")
    np.testing.assert_allclose(register.read_image(str(tmp_path / "w16.png"))[..., 0], img16 / 65535.0, atol=1e-6)


def test_wrong_size_and_bad_files(tmp_path, export_dir, capsys):
    Image.fromarray(np.zeros((32, 30), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "ok.png")
    # the command's main, in this process (the PNG test above runs it as a subprocess)
    register.FLAGS.unparse_flags()
    register.FLAGS(["register", f"--model={export_dir}", f"--fixed={tmp_path / 'ok.png'}",
                 f"--moving={tmp_path / 'big.png'}", f"--out={tmp_path / 'o.png'}"])
    assert register.main(["register"]) == 1
    err = capsys.readouterr().err
    assert "big.png" in err and "32x30" in err and "28x28" in err
    assert not os.path.exists(tmp_path / "o.png")
    with pytest.raises(register.RegisterError, match="does not exist"):
        register.register(export_dir, str(tmp_path / "nope.png"), str(tmp_path / "ok.png"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(register.RegisterError, match="junk.png"):
        register.register(export_dir, str(tmp_path / "junk.png"), str(tmp_path / "ok.png"))
    with pytest.raises(register.RegisterError, match="not a SavedModel"):
        register.register(str(tmp_path), str(tmp_path / "ok.png"), str(tmp_path / "ok.png"))


def test_missing_flags_exit_nonzero_and_are_named(tmp_path):
    """Without --model/--fixed/--moving/--out the command stops before loading anything.

    Plausible bugs caught: a missing flag reaching ``register`` as ``None`` (a
    traceback, or exit status 0 with nothing written), or a message that does
    not say which flags are missing (or names one that was given).
    """
    proc = _cli([f"--out={tmp_path / 'w.png'}", f"--fixed={tmp_path / 'a.png'}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    message = [line for line in proc.stderr.splitlines() if "missing" in line]
    assert len(message) == 1, proc.stderr[-2000:]
    named = {word.strip(",") for word in message[0].split() if word.startswith("--")}
    assert named == {"--model", "--moving"}
    assert not os.path.exists(tmp_path / "w.png")
    proc = _cli([])
    assert proc.returncode == 2
    assert all(f"--{n}" in proc.stderr for n in ("model", "fixed", "moving", "out"))


def _run_main(args):
    """``register.main`` in this process with the given flags (restored afterwards)."""
    register.FLAGS.unparse_flags()
    try:
        register.FLAGS(["register"] + args)
        return register.main(["register"])
    finally:
        register.FLAGS.unparse_flags()


def test_npy_output_is_the_models_warped_image(tmp_path, export_dir):
    """``--out=x.npy`` holds the served model's ``warped`` output, float32, unclipped.

    The moving image is a float ``.npy`` with values up to 2 (used as is), so
    the warped image exceeds 1 somewhere.  Plausible bugs caught: the ``.npy``
    path going through the 8-bit PNG conversion (rounded to 1/255, clipped to
    [0, 1]), another output (moving, fixed) written, or a channel axis lost.
    """
    from dirnet_tf.inference import load_export

    rng = np.random.default_rng(3)
    fixed = _digit(rng)
    moving = (2.0 * _digit(rng) / 255.0).astype(np.float32)
    Image.fromarray(fixed).save(tmp_path / "f.png")
    np.save(tmp_path / "m.npy", moving)
    out = tmp_path / "out" / "warped.npy"
    assert _run_main([f"--model={export_dir}", f"--fixed={tmp_path / 'f.png'}",
                      f"--moving={tmp_path / 'm.npy'}", f"--out={out}"]) == 0
    warped = np.load(out)
    fn, _ = load_export(export_dir)
    expected = fn(fixed=(fixed / 255.0).astype(np.float32)[None, ..., None], moving=moving[None, ..., None])
    expected = expected["warped"].numpy()[0]
    assert warped.dtype == np.float32 and warped.shape == (28, 28, 1)
    np.testing.assert_allclose(warped, expected, rtol=0, atol=1e-6)
    assert warped.max() > 1.05  # not clipped to [0, 1]
    assert np.abs(warped * 255 - np.rint(warped * 255)).max() > 1e-3  # not quantised to 8 bits
    assert not np.allclose(warped[..., 0], moving, atol=1e-3)  # really warped


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
        grey = register.read_image(str(tmp_path / name))
        assert grey.shape == (28, 28, 1) and grey.dtype == np.float32, name
        np.testing.assert_allclose(grey[..., 0], luma, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(register.read_image(str(tmp_path / "c.png"))[0, :3, 0], [0.299, 0.587, 0.114],
                               atol=1e-6)
    # End to end: the RGB file registers exactly like its grey version.
    np.save(tmp_path / "grey.npy", luma.astype(np.float32))
    fixed = str(tmp_path / "c.npy")
    from_rgb = register.register(export_dir, fixed, str(tmp_path / "ca.png"))
    from_grey = register.register(export_dir, fixed, str(tmp_path / "grey.npy"))
    np.testing.assert_allclose(from_rgb["warped"], from_grey["warped"], atol=1e-5)  # inputs equal to ~1e-7
    np.testing.assert_allclose(from_rgb["displacement"], from_grey["displacement"], atol=1e-5)


# --------------------------------------------------------------------------- #
# Exports with a model grid (as experiments.train writes them): any size, spacing, format
# --------------------------------------------------------------------------- #


class _Bundle:
    """An export on disk, the Keras model it was made from, and its ModelGrid."""

    def __init__(self, path, model, grid, grid_spacing):
        self.path, self.model, self.grid, self.grid_spacing = path, model, grid, grid_spacing


def _grid_export(tmp_path_factory, shape, spacing_mm, grid_spacing, scale, seed):
    """A tiny randomised DIRNet exported with the metadata of ``experiments.train``."""
    from dirnet_tf.preprocessing import ModelGrid

    model = dirnet_tf.DIRNet(shape, grid_spacing, filters=4)
    rng = np.random.default_rng(seed)
    for v in model.regressor.trainable_variables[-2:]:  # displacements of about 1-2 model voxels
        v.assign(rng.normal(0, scale, v.shape).astype(np.float32))
    return _write_export(tmp_path_factory, model, ModelGrid(shape, spacing_mm, "percentile"), grid_spacing)


def _write_export(tmp_path_factory, model, grid, grid_spacing):
    """Export ``model`` with the metadata of ``experiments.train`` (export_saved_model adds a chain's ``steps``)."""
    metadata = {"model_grid": grid.to_dict(), "spacing_mm": list(grid.spacing), "image_shape": list(grid.shape),
                "channels": 1, "grid_spacing": grid_spacing, "boundary": "border", "passes": model.passes,
                "displacement_units": "voxels of the model grid, ij (array) order"}
    path = str(tmp_path_factory.mktemp("grid_model") / "export")
    export_saved_model(model, path, grid.shape, 1, metadata)
    return _Bundle(path, model, grid, grid_spacing)


@pytest.fixture(scope="module")
def grid2d(tmp_path_factory):
    return _grid_export(tmp_path_factory, (16, 20), (2.0, 1.5), 4, 1.0, 2)


@pytest.fixture(scope="module")
def grid3d(tmp_path_factory):
    return _grid_export(tmp_path_factory, (10, 12, 8), (2.0, 1.5, 2.5), 4, 0.6, 3)


def _rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _affine(spacing, angle, translation, axis=(0.0, 0.0, 1.0), flip=False):
    """Voxel -> RAS mm: a rotation about ``axis`` (2-D: in plane), anisotropic spacing, an offset."""
    a = np.eye(4)
    diag = list(spacing) + ([2.5] if len(spacing) == 2 else [])
    if flip:
        diag[0] = -diag[0]
    a[:3, :3] = _rotation(axis, angle) @ np.diag(diag)
    a[:3, 3] = translation
    return a


def _smooth(shape, seed):
    """A smooth positive test image (intensities about 150..450, not normalised)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    v = np.ones(shape)
    for _ in range(4):
        w = rng.normal(0, 0.25, len(shape))
        v = v + rng.uniform(0.3, 1.0) * np.sin(sum(wi * gi for wi, gi in zip(w, grid)) + rng.uniform(0, 6))
    return (100 * v + 300).astype(np.float32)


def _nifti(path, array, affine):
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(array), affine)
    image.header["descrip"] = b"dirnet register test"
    image.header.set_xyzt_units("mm", "sec")
    image.to_filename(str(path))
    return str(path)


def _pair(tmp_path, ndim):
    """Fixed and moving NIfTI files: different shapes, spacings and (non-identity, anisotropic) affines."""
    if ndim == 2:
        fixed = _nifti(tmp_path / "f.nii.gz", _smooth((31, 41), 0), _affine((1.0, 0.75), 0.3, (-20, 15, 4)))
        moving = _nifti(tmp_path / "m.nii.gz", _smooth((26, 35), 1), _affine((1.3, 0.9), 0.25, (-18, 13, 4)))
    else:
        fixed = _nifti(tmp_path / "f.nii.gz", _smooth((15, 17, 9), 0),
                       _affine((1.2, 1.0, 2.0), 0.5, (31.5, -22.0, 14.25), (0.3, -0.5, 0.8), flip=True))
        moving = _nifti(tmp_path / "m.nii.gz", _smooth((13, 20, 8), 1),
                        _affine((1.5, 0.9, 2.2), 0.45, (30.0, -21.0, 15.0), (0.3, -0.5, 0.8), flip=True))
    return fixed, moving


def _voxels(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)


def _reference(bundle, fixed_path, moving_path):
    """The composed mapping computed here, from the Keras model's own control points.

    Returns ``(W, p_m, u_model, mapping)``: the moving image (scipy, linear,
    edge-clamped) at ``p_m = T_m(q + u(q))``, ``q = T_f^-1(p_f)`` for every fixed
    voxel ``p_f``; ``u`` is the spline of the network's control points (never the
    dense field); the served dense field ``u_model``; ``mapping(p_f) -> p_m`` for
    any fixed voxel indices.
    """
    from dirnet_tf import readers
    from dirnet_tf.transforms import spline_displacement_at

    fixed, moving = readers.read_image(fixed_path)[0], readers.read_image(moving_path)[0]
    f, t_f = bundle.grid.prepare(fixed)
    m, t_m = bundle.grid.prepare(moving)
    out = bundle.model({"fixed": f[None, ..., None], "moving": m[None, ..., None]})
    cp = out["control_points"].numpy()[0].astype(np.float64)

    def mapping(p_f):
        q = (np.asarray(p_f, float) - np.asarray(t_f.offset)) / np.asarray(t_f.scale)
        return (q + spline_displacement_at(cp, bundle.grid_spacing, q)) * np.asarray(t_m.scale) + np.asarray(t_m.offset)

    p_m = mapping(_voxels(fixed.shape))
    w = ndimage.map_coordinates(moving.array.astype(np.float64), np.moveaxis(p_m, -1, 0), order=1, mode="nearest")
    return w, p_m, out["displacement"].numpy()[0], mapping


def _inside(p_m, shape):
    return np.all((p_m >= 0) & (p_m <= np.asarray(shape) - 1), axis=-1)


def _listing(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _itk_elastix():
    itk = pytest.importorskip("itk")
    try:
        itk.TransformixFilter  # noqa: B018 - lazy attribute; missing without itk-elastix
    except AttributeError:
        pytest.skip("needs itk-elastix")
    return itk


@pytest.mark.parametrize("ndim", [2, 3])
def test_nifti_result_on_the_fixed_grid_equals_the_composed_mapping(tmp_path, grid2d, grid3d, ndim):
    """W keeps the fixed header (affine, spacing, units, description) and equals an independent composition.

    The reference is computed here with scipy from the network's own control points
    and the library's model-grid geometry; ``--displacement=.npy`` resamples the
    moving image into W with ``map_coordinates(M, p_f + D)``.
    Plausible bugs caught: W returned on the model grid or with the moving header,
    the moving image's grid transform taken equal to the fixed one (shapes and
    spacings differ here), control points recovered wrongly, ij/xy swaps, the
    normalised instead of the original intensities.
    """
    import nibabel as nib

    bundle = grid2d if ndim == 2 else grid3d
    fixed, moving = _pair(tmp_path, ndim)
    out = tmp_path / "out"
    assert _run_main([f"--model={bundle.path}", f"--fixed={fixed}", f"--moving={moving}",
                      f"--out={out / 'W.nii.gz'}", f"--displacement={out / 'D.npy'}",
                      f"--figure={out / 'fig.png'}"]) == 0
    reference, p_m, u_model, _ = _reference(bundle, fixed, moving)
    assert np.abs(u_model).max() > 0.5  # a real deformation, in model voxels
    f_img, w_img = nib.load(fixed), nib.load(str(out / "W.nii.gz"))
    assert w_img.shape == f_img.shape and w_img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(w_img.affine, f_img.affine)
    np.testing.assert_array_equal(w_img.header.get_zooms(), f_img.header.get_zooms())
    assert w_img.header["descrip"].item() == b"dirnet register test"
    assert w_img.header.get_xyzt_units() == ("mm", "sec")
    w = w_img.get_fdata()
    value_range = np.ptp(reference)
    print(f"{ndim}-D W vs composed reference: max {np.abs(w - reference).max():.3g} (range {value_range:.0f})")
    np.testing.assert_allclose(w, reference, rtol=0, atol=1e-6 * value_range)
    # the deformation matters: without u (q' = q) the moving image lands elsewhere
    from dirnet_tf import readers

    t_f, t_m = (bundle.grid.transform_for(im.shape, im.spacing) for im in
                (readers.read_image(fixed)[0], readers.read_image(moving)[0]))
    unwarped = ndimage.map_coordinates(nib.load(moving).get_fdata(), np.moveaxis(
        t_m.model_to_image_index(t_f.image_to_model_index(_voxels(f_img.shape))), -1, 0), order=1, mode="nearest")
    assert np.abs(w - unwarped).max() > 0.05 * value_range
    d = np.load(out / "D.npy")
    assert d.shape == f_img.shape + (ndim,) and d.dtype == np.float32
    np.testing.assert_allclose(d, p_m - _voxels(f_img.shape), atol=1e-4)
    again = ndimage.map_coordinates(nib.load(moving).get_fdata(), np.moveaxis(_voxels(f_img.shape) + d, -1, 0),
                                    order=1, mode="nearest")
    np.testing.assert_allclose(again, w, atol=1e-4 * value_range)
    assert os.path.getsize(out / "fig.png") > 1000
    assert _listing(out) == ["D.npy", "W.nii.gz", "fig.png"]  # no temporary file left


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
    fixed, moving = _pair(tmp_path, ndim)
    out = tmp_path / "out"
    model = register.load_model(bundle.path)
    job = register.Job(fixed, moving, out=str(out / "W.nii.gz"), displacement=str(out / "D.nii.gz"),
                       transform=str(out / ("T.tfm" if ndim == 2 else "T.h5")))
    register.run(model, [job])
    _, p_m, _, _ = _reference(bundle, fixed, moving)
    inside = _inside(p_m, nib.load(moving).shape)
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

    itk = _itk_elastix()
    bundle = grid2d if ndim == 2 else grid3d
    fixed, moving = _pair(tmp_path, ndim)
    same = _nifti(tmp_path / "m_same.nii.gz", _smooth(nib.load(fixed).shape, 5), nib.load(fixed).affine)
    model = register.load_model(bundle.path)
    for name, mov, chained in (("two", moving, True), ("one", same, False)):
        out = tmp_path / name
        job = register.Job(fixed, mov, out=str(out / "W.nii.gz"), elastix_transform=str(out / "E.txt"))
        register.run(model, [job])
        assert _listing(out) == (["E.bspline.txt", "E.txt", "W.nii.gz"] if chained else ["E.txt", "W.nii.gz"])
        params = itk.ParameterObject.New()
        params.ReadParameterFile(job.elastix_transform)
        result = itk.transformix_filter(itk.imread(mov, itk.F), params, log_to_console=False)
        got = np.asarray(itk.array_from_image(result), np.float64).T
        w = nib.load(job.out).get_fdata()
        _, p_m, _, _ = _reference(bundle, fixed, mov)
        inside = _inside(p_m, nib.load(mov).shape)
        diff = np.abs(got - w)[inside]
        print(f"{ndim}-D transformix ({name} model grid(s)) vs W: max {diff.max():.3g} (range {np.ptp(w):.0f})")
        assert got.shape == w.shape and diff.max() < 2e-6 * np.ptp(w)  # transformix resamples in float32


def test_png_pixel_space_transforms_and_points(tmp_path, grid2d):
    """PNG images live in ITK's pixel space: the ITK and elastix files resample the PNG files into W.

    Plausible bugs caught: the PNG's array axes taken as ITK's x and y (ITK reads
    a PNG with x = column), a PNG W written in normalised [0, 1] intensities,
    voxel points mapped with the fixed instead of the moving image's geometry.
    """
    from PIL import Image

    sitk = pytest.importorskip("SimpleITK")
    fixed = (_smooth((33, 29), 3) / 2).astype(np.uint8)
    moving = (_smooth((33, 29), 4) / 2).astype(np.uint8)
    Image.fromarray(fixed).save(tmp_path / "f.png")
    Image.fromarray(moving).save(tmp_path / "m.png")
    (tmp_path / "p.csv").write_text("name,i,j\na,3,4.5\nb,20.25,11\nc,32,0\n")
    out = tmp_path / "out"
    assert _run_main([f"--model={grid2d.path}", f"--fixed={tmp_path / 'f.png'}", f"--moving={tmp_path / 'm.png'}",
                      f"--out={out / 'W.png'}", f"--transform={out / 'T.tfm'}", f"--points={tmp_path / 'p.csv'}",
                      f"--out_points={out / 'q.csv'}", f"--elastix_transform={out / 'E.txt'}"]) == 0
    reference, p_m, _, mapping = _reference(grid2d, str(tmp_path / "f.png"), str(tmp_path / "m.png"))
    w = np.asarray(Image.open(out / "W.png"))
    assert w.dtype == np.uint8 and w.shape == fixed.shape
    # Tolerances: the control points recovered from the float32 field move points by <~1e-6 pixel,
    # i.e. <~1e-4 grey levels on these steep 8-bit images.
    assert np.abs(w.astype(float) - reference).max() <= 0.5 + 1e-3  # rounded moving intensities
    inside = _inside(p_m, moving.shape)
    resampled = sitk.GetArrayFromImage(sitk.Resample(
        sitk.ReadImage(str(tmp_path / "m.png"), sitk.sitkFloat64), sitk.ReadImage(str(tmp_path / "f.png")),
        sitk.ReadTransform(str(out / "T.tfm")), sitk.sitkLinear, 0.0, sitk.sitkFloat64))
    assert resampled.shape == fixed.shape  # numpy [i, j]: no transposition for PNG
    assert np.abs(resampled - reference)[inside].max() < 1e-3
    assert not os.path.exists(out / "E.bspline.txt")  # same shape and spacing: one model grid, one file
    itk = pytest.importorskip("itk")
    if hasattr(itk, "transformix_filter"):
        params = itk.ParameterObject.New()
        params.ReadParameterFile(str(out / "E.txt"))
        got = itk.array_from_image(itk.transformix_filter(itk.imread(str(tmp_path / "m.png"), itk.F), params,
                                                          log_to_console=False))
        assert np.abs(np.asarray(got, np.float64) - reference)[inside].max() < 1e-3
    with open(out / "q.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["name", "i", "j"] and [r[0] for r in rows[1:]] == ["a", "b", "c"]
    got = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(got, mapping([[3, 4.5], [20.25, 11], [32, 0]]), atol=1e-4)  # moving voxels, ij


def _world_points(affine, voxels, ndim):
    return np.asarray(voxels, float) @ np.asarray(affine)[:3, :ndim].T + np.asarray(affine)[:3, 3]


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
    fixed, moving = _pair(tmp_path, ndim)
    _, _, u_model, mapping = _reference(bundle, fixed, moving)
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
    world = _world_points(nib.load(fixed).affine, points, ndim)[:, :ndim]
    (tmp_path / "world.csv").write_text("id," + ",".join(names) + "\n"
                                        + "".join(f"p{n}," + ",".join(repr(float(v)) for v in w) + "\n"
                                                  for n, w in enumerate(world)))
    (tmp_path / "vox.csv").write_text(",".join(["i", "j", "k"][:ndim]) + ",note\n"
                                      + "".join(",".join(repr(float(v)) for v in p) + ",x\n" for p in points))
    model = register.load_model(bundle.path)
    out = tmp_path / "out"
    register.run(model, [register.Job(fixed, moving, points=str(tmp_path / "world.csv"),
                                      out_points=str(out / "world.csv")),
                         register.Job(fixed, moving, points=str(tmp_path / "vox.csv"),
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
    np.testing.assert_allclose(got_world[:n_grid], _world_points(moving_affine, expected_voxels, ndim)[:, :ndim],
                               atol=1e-4)
    np.testing.assert_allclose(got_voxels, mapping(points), atol=1e-4)
    np.testing.assert_allclose(got_world, _world_points(moving_affine, mapping(points), ndim)[:, :ndim], atol=1e-4)


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
    field = (_voxels((16, 16)) @ matrix.T + offset).astype(np.float32)

    def served(fixed, moving):
        return {"warped": moving, "displacement": tf.constant(np.repeat(field[None], fixed.shape[0], 0))}

    model = register.Export(served, {}, "affine-field model", (16, 16), 1, ModelGrid((16, 16), 2.0, "minmax"),
                            (4, 4), "border")
    fixed_affine, moving_affine = np.eye(4), np.diag([1.6, 1.6, 1.0, 1.0])
    fixed_affine[:3, 3], moving_affine[:3, 3] = (10, 20, 0), (-5, 3, 0)
    fixed = _nifti(tmp_path / "f.nii.gz", _smooth((32, 32), 0), fixed_affine)
    moving = _nifti(tmp_path / "m.nii.gz", _smooth((20, 20), 1), moving_affine)
    (tmp_path / "w.csv").write_text("x,y\n17.0,26.5\n")
    (tmp_path / "v.csv").write_text("i,j\n7,6.5\n")
    out = tmp_path / "out"
    register.run(model, [register.Job(fixed, moving, points=str(tmp_path / "w.csv"), out_points=str(out / "w.csv"),
                                      transform=str(out / "T.tfm")),
                         register.Job(fixed, moving, points=str(tmp_path / "v.csv"), out_points=str(out / "v.csv"))])
    world = np.loadtxt(out / "w.csv", delimiter=",", skiprows=1)
    voxels = np.loadtxt(out / "v.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(world, [3.305, 8.835], atol=1e-5)
    np.testing.assert_allclose(voxels, [5.190625, 3.646875], atol=1e-5)
    lps = sitk.ReadTransform(str(out / "T.tfm")).TransformPoint((-17.0, -26.5))
    np.testing.assert_allclose(lps, [-3.305, -8.835], atol=1e-5)


def test_labels_are_carried_to_the_fixed_grid(tmp_path, grid2d):
    """Moving labels (non-consecutive values) land on the fixed grid, integer, with the fixed header.

    Reference: one-hot maps interpolated (linear, edge-clamped) at the composed
    moving point of every fixed voxel, argmax, computed here.  Plausible bugs
    caught: labels warped on the model grid or with the image's linear values
    (mixing labels 2 and 5 into 3), float output, the moving header, label values
    renumbered.
    """
    import nibabel as nib

    fixed, moving = _pair(tmp_path, 2)
    m = nib.load(moving)
    r = np.hypot(*np.moveaxis(_voxels(m.shape) - [13, 17], -1, 0))
    labels = np.where(r < 5, 2, np.where(r < 9, 5, 0)).astype(np.int16)
    labels[:4, :] = 1
    _nifti(tmp_path / "lab.nii.gz", labels, m.affine)
    out = tmp_path / "out"
    assert _run_main([f"--model={grid2d.path}", f"--fixed={fixed}", f"--moving={moving}", f"--out={out / 'W.nii'}",
                      f"--moving_labels={tmp_path / 'lab.nii.gz'}", f"--out_labels={out / 'L.nii.gz'}"]) == 0
    got = nib.load(str(out / "L.nii.gz"))
    np.testing.assert_array_equal(got.affine, nib.load(fixed).affine)
    assert got.shape == nib.load(fixed).shape and np.issubdtype(got.get_data_dtype(), np.integer)
    values = np.asarray(got.dataobj)
    _, p_m, _, _ = _reference(grid2d, fixed, moving)
    weights = np.stack([ndimage.map_coordinates((labels == v).astype(float), np.moveaxis(p_m, -1, 0), order=1,
                                                mode="nearest") for v in (0, 1, 2, 5)])
    expected = np.array([0, 1, 2, 5])[np.argmax(weights, 0)]
    top = np.sort(weights, 0)
    clear = top[-1] - top[-2] > 1e-3  # no near-tie between two labels
    assert set(np.unique(values)) <= {0, 1, 2, 5} and {1, 2, 5} <= set(np.unique(values))
    np.testing.assert_array_equal(values[clear], expected[clear])
    assert clear.mean() > 0.95


def test_pairs_csv_runs_in_batches_and_equals_single_runs(tmp_path, grid2d, monkeypatch):
    """--pairs: relative paths, per-pair outputs, batches of --batch_size; the same files as single runs.

    Plausible bugs caught: outputs of one pair written for another (a batch
    misaligned), paths resolved against the working directory instead of the CSV,
    pairs of different image sizes not batched, a batch result differing from a
    single run.
    """
    from PIL import Image

    (tmp_path / "data").mkdir()
    fixed, moving = _pair(tmp_path / "data", 2)
    Image.fromarray((_smooth((33, 29), 3) / 2).astype(np.uint8)).save(tmp_path / "data" / "a.png")
    Image.fromarray((_smooth((30, 27), 4) / 2).astype(np.uint8)).save(tmp_path / "data" / "b.png")
    (tmp_path / "data" / "p.csv").write_text("i,j\n3,4\n10.5,7.25\n")
    rows = [("data/f.nii.gz", "data/m.nii.gz", "out/0.nii.gz", "data/p.csv", "out/0.csv"),
            ("data/a.png", "data/b.png", "out/1.npy", "", ""),
            ("data/m.nii.gz", "data/f.nii.gz", "out/2.nii.gz", "data/p.csv", "out/2.csv")]
    (tmp_path / "pairs.csv").write_text("fixed,moving,out,points,out_points\n"
                                        + "".join(",".join(r) + "\n" for r in rows))
    calls = []
    infer = register.infer

    def counting(model, prepared, batch_size=16):
        calls.append(len(prepared))
        return infer(model, prepared, batch_size)

    monkeypatch.setattr(register, "infer", counting)
    assert _run_main([f"--model={grid2d.path}", f"--pairs={tmp_path / 'pairs.csv'}", "--batch_size=2"]) == 0
    assert calls == [2, 1]
    model = register.load_model(grid2d.path)
    single = tmp_path / "single"
    for n, (f, m, o, p, q) in enumerate(rows):
        job = register.Job(str(tmp_path / f), str(tmp_path / m), out=str(single / os.path.basename(o)),
                           points=str(tmp_path / p) if p else None, out_points=str(single / f"{n}.csv") if q else None)
        register.run(model, [job], batch_size=1)
    import nibabel as nib

    for name in ("0.nii.gz", "2.nii.gz"):
        a, b = nib.load(str(tmp_path / "out" / name)).get_fdata(), nib.load(str(single / name)).get_fdata()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.ptp(b))
    np.testing.assert_allclose(np.load(tmp_path / "out" / "1.npy"), np.load(single / "1.npy"), atol=1e-3)
    for name in ("0.csv", "2.csv"):
        np.testing.assert_allclose(np.loadtxt(tmp_path / "out" / name, delimiter=",", skiprows=1),
                                   np.loadtxt(single / name, delimiter=",", skiprows=1), atol=1e-6)
    assert sorted(os.listdir(tmp_path / "out")) == ["0.csv", "0.nii.gz", "1.npy", "2.csv", "2.nii.gz"]


def _bad_case(tmp_path, case, grid2d, grid3d):
    """``(flags, words the message must contain)`` of one bad input; outputs go to tmp_path/out."""
    fixed, moving = _pair(tmp_path, 2)
    out = tmp_path / "out"
    base = [f"--model={grid2d.path}", f"--fixed={fixed}", f"--moving={moving}", f"--out={out / 'W.nii.gz'}"]
    if case == "unreadable":
        (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file")
        return [f"--model={grid2d.path}", f"--fixed={tmp_path / 'junk.nii.gz'}", f"--moving={moving}",
                f"--out={out / 'W.nii.gz'}"], ["junk.nii.gz"]
    if case == "2d_for_3d":
        return [f"--model={grid3d.path}"] + base[1:], ["f.nii.gz", "3-D"]
    if case == "labels_shape":
        _nifti(tmp_path / "lab.nii.gz", np.zeros((31, 41), np.int16), np.eye(4))
        return base + [f"--moving_labels={tmp_path / 'lab.nii.gz'}", f"--out_labels={out / 'L.nii.gz'}"], \
            ["lab.nii.gz", "(31, 41)", "(26, 35)"]
    if case == "points_outside":
        (tmp_path / "p.csv").write_text("i,j\n1,2\n40,2\n")
        return base + [f"--points={tmp_path / 'p.csv'}", f"--out_points={out / 'q.csv'}"], ["p.csv", "line 3"]
    if case == "unwritable":
        (tmp_path / "afile").write_text("")
        return base + [f"--displacement={tmp_path / 'afile' / 'D.npy'}"], ["afile", "--displacement"]
    if case == "oblique_transform":  # fails while writing, after W was staged
        oblique = _nifti(tmp_path / "o.nii.gz", _smooth((31, 41), 2), _affine((1.0, 0.8), 0.4, (0, 0, 0), (1, 0, 0)))
        return [f"--model={grid2d.path}", f"--fixed={oblique}", f"--moving={moving}", f"--out={out / 'W.nii.gz'}",
                f"--transform={out / 'T.tfm'}"], ["--transform", "T.tfm"]
    if case == "second_pair":  # pair 2 fails after pair 1 was registered and staged
        (tmp_path / "junk.png").write_bytes(b"not a png")
        (tmp_path / "pairs.csv").write_text(f"fixed,moving,out\n{fixed},{moving},out/a.nii.gz\n"
                                            f"{fixed},junk.png,out/b.nii.gz\n")
        return [f"--model={grid2d.path}", f"--pairs={tmp_path / 'pairs.csv'}", "--batch_size=1"], \
            ["junk.png", "line 3"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unreadable", "2d_for_3d", "labels_shape", "points_outside", "unwritable",
                                  "oblique_transform", "second_pair"])
def test_bad_input_is_named_and_leaves_nothing(tmp_path, grid2d, grid3d, capsys, case):
    """Each bad input: exit status 1, one ``error:`` line naming the file, and no output (nor temporary) file.

    Plausible bugs caught: a traceback or exit status 0, a message that does not
    say which file, W written before a later output failed (``oblique_transform``:
    a 2-D plane that a 2-D ITK transform cannot hold; ``second_pair``: pair 2 of a
    CSV unreadable after pair 1 was done), temporary files left behind.
    """
    args, words = _bad_case(tmp_path, case, grid2d, grid3d)
    capsys.readouterr()
    assert _run_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert _listing(tmp_path / "out") == []
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_bad_input_from_the_command_line(tmp_path, grid2d):
    """The same through ``python -m experiments.register``: status 1, the message, no traceback, no file."""
    args, words = _bad_case(tmp_path, "points_outside", grid2d, None)
    proc = _cli(args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and all(w in proc.stderr for w in words)
    assert _listing(tmp_path / "out") == []
    proc = _cli([f"--model={grid2d.path}", f"--pairs={tmp_path / 'nope.csv'}", f"--fixed={tmp_path / 'x.png'}"])
    assert proc.returncode == 2 and "--fixed" in proc.stderr


def test_export_without_model_grid_maps_points_and_writes_transforms(tmp_path, export_dir):
    """An MNIST-style export (no metadata at all): points and the ITK transform work on the pixel grid.

    The grid spacing is found from the field (8 here).  A point on a pixel moves
    by the served displacement there; SimpleITK resampling the PNG through T.tfm
    reproduces the served ``warped`` (times 255, as the PNG holds 0..255).
    """
    from PIL import Image

    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(5)
    fixed, moving = _digit(rng), _digit(rng)
    Image.fromarray(fixed).save(tmp_path / "a.png")
    Image.fromarray(moving).save(tmp_path / "b.png")
    (tmp_path / "p.csv").write_text("i,j\n5,7\n20,3\n14,14\n")
    out = tmp_path / "out"
    assert _run_main([f"--model={export_dir}", f"--fixed={tmp_path / 'a.png'}", f"--moving={tmp_path / 'b.png'}",
                      f"--out={out / 'w.npy'}", f"--displacement={out / 'd.npy'}", f"--transform={out / 't.tfm'}",
                      f"--points={tmp_path / 'p.csv'}", f"--out_points={out / 'q.csv'}"]) == 0
    d, warped = np.load(out / "d.npy"), np.load(out / "w.npy")
    assert warped.shape == (28, 28, 1) and d.shape == (28, 28, 2)
    got = np.loadtxt(out / "q.csv", delimiter=",", skiprows=1)
    p = np.array([[5, 7], [20, 3], [14, 14]])
    np.testing.assert_allclose(got, p + d[tuple(p.T)], atol=1e-4)
    resampled = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(tmp_path / "b.png"), sitk.sitkFloat64),
                                                     sitk.ReadImage(str(tmp_path / "a.png")),
                                                     sitk.ReadTransform(str(out / "t.tfm")), sitk.sitkLinear, 0.0,
                                                     sitk.sitkFloat64))
    inside = _inside(_voxels((28, 28)) + d, (28, 28))
    assert np.abs(resampled / 255.0 - warped[..., 0])[inside].max() < 1e-4


def test_control_point_recovery_and_pixel_space():
    """The helpers behind the exact point map, checked on fields built here.

    Plausible bugs caught: a pseudo-inverse along the wrong axis (recovery is
    only exact with all axes right), a rank-deficient fit (spacing 1) called
    exact, a finer grid spacing detected than the field's, the pixel affine not
    matching how ITK places a PNG's pixels.
    """
    from dirnet_tf.bspline import bspline_displacement
    from dirnet_tf.transforms import spline_displacement_at
    from experiments import register_io as rio

    rng = np.random.default_rng(0)
    for shape, spacing in (((23, 30), (4, 8)), ((9, 14, 11), (2, 4, 4))):
        grid = tuple(int(np.ceil((n - 1) / s)) + 3 for n, s in zip(shape, spacing))
        cp = rng.normal(0, 1, grid + (len(shape),))
        dense = np.asarray(bspline_displacement(cp[None], shape, spacing))[0]
        got, exact, residual = rio.recover_control_points(dense, spacing)
        assert exact and residual < 1e-10
        np.testing.assert_allclose(got, cp, atol=1e-9)
        axes = [rng.uniform(-3, n + 2, 5) for n in shape]
        points = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        np.testing.assert_allclose(rio.spline_on_axes(cp, spacing, axes), spline_displacement_at(cp, spacing, points),
                                   atol=1e-12)
    cp = rng.normal(0, 1, (7, 7, 2))
    dense = np.asarray(bspline_displacement(cp[None], (28, 28), 8))[0].astype(np.float32)
    assert rio.detect_grid_spacing(dense) == (8, 8)
    assert rio.detect_grid_spacing(rng.normal(0, 1, (28, 28, 2))) is None
    assert not rio.recover_control_points(dense, (1, 1))[1]
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.GetImageFromArray(np.zeros((5, 7), np.float32))  # numpy [i, j]: ITK x = j
    image.SetSpacing((0.7, 1.9))  # (x, y) = (j, i)
    affine = rio.pixel_affine((1.9, 0.7))  # spacing per array axis i, j
    lps = np.array(image.TransformContinuousIndexToPhysicalPoint((2.5, 4.0)))  # x = j = 2.5, y = i = 4
    np.testing.assert_allclose(np.diag([-1, -1, 1]) @ (affine[:3, :3] @ [4.0, 2.5, 0] + affine[:3, 3]),
                               list(lps) + [0], atol=1e-12)


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

    model = register.Export(served, {}, "spacing-1 model", (12, 12), 1, ModelGrid((12, 12), 2.0, "minmax"),
                            (1, 1), "border")
    fixed = _nifti(tmp_path / "f.nii.gz", _smooth((24, 24), 0), np.eye(4))
    result = register.register(model, fixed, fixed)
    assert not result["spline"]["exact"] and "not determined" in result["spline"]["problem"]
    np.testing.assert_allclose(result["field"][2:-2, 2:-2, 0], 1.0, atol=1e-6)  # 0.5 model voxels = 1 voxel
    (tmp_path / "p.csv").write_text("i,j\n3,3\n")
    with pytest.raises(register.RegisterError, match="--points needs the exact B-spline"):
        register.run(model, [register.Job(fixed, fixed, out=str(tmp_path / "o" / "W.nii.gz"),
                                          points=str(tmp_path / "p.csv"), out_points=str(tmp_path / "o" / "q.csv"))])
    assert _listing(tmp_path / "o") == []


# --------------------------------------------------------------------------- #
# Models of composed steps (an affine step, then B-spline steps): the exported chain
# --------------------------------------------------------------------------- #


def _chain_export(tmp_path_factory, shape, spacing_mm, seed, gains):
    """A tiny DIRNet(stages=("affine", 8, 4), passes=2, bounded, symmetric) with random, non-trivial steps.

    ``gains``: factors of the output layers -- the affine matrix and translation columns, then the
    regressors of the spacing-8 and spacing-4 stages -- chosen (for the images of :func:`_pair`) so
    that the affine step shears by ~0.02-0.06 and shifts by ~1.5 voxels and every B-spline step
    moves by ~0.6-1.3 voxels (below the bounds, 3.84 and 1.92 voxels in 2-D).
    """
    from dirnet_tf.preprocessing import ModelGrid

    model = dirnet_tf.DIRNet(shape, 4, filters=4, stages=("affine", 8, 4), passes=2, bounded=True, symmetric=True)
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))
    ndim = len(shape)
    dense = model.affine_regressor.output_dense
    kernel = dense.kernel.numpy()
    kernel[:, : ndim * ndim] *= gains[0]
    kernel[:, ndim * ndim:] *= gains[1]
    dense.kernel.assign(kernel)
    dense.bias.assign(np.zeros(dense.bias.shape, np.float32))  # the bounded matrix stays far from saturation
    for name, gain in zip(("regressor", "regressor_1"), gains[2:]):
        for v in getattr(model, name).output_conv.trainable_variables:
            v.assign(gain * v)
    return _write_export(tmp_path_factory, model, ModelGrid(shape, spacing_mm, "percentile"), 4)


@pytest.fixture(scope="module")
def chain2d(tmp_path_factory):
    return _chain_export(tmp_path_factory, (32, 32), (1.0, 1.0), 2, (1.0, 50.0, 27.0, 3.0))


@pytest.fixture(scope="module")
def chain3d(tmp_path_factory):
    return _chain_export(tmp_path_factory, (16, 16, 16), (1.2, 1.2, 1.2), 3, (1.5, 25.0, 3.5, 1.2))


def _beta3(t):
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a ** 2 + a ** 3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def _spline_sum(cp, spacing, x):
    """``sum_k cp[k] prod_d beta3(x_d / s_d - k_d + 1)`` over EVERY control point (brute force, numpy)."""
    x = np.asarray(x, float)
    flat = x.reshape(-1, x.shape[-1])
    weights = [_beta3(flat[:, d, None] / s - np.arange(k)[None, :] + 1) for d, (s, k) in
               enumerate(zip(spacing, cp.shape[:-1]))]
    subscripts = "pa,pb,abz->pz" if len(weights) == 2 else "pa,pb,pc,abcz->pz"
    return np.einsum(subscripts, *weights, cp).reshape(x.shape)


class _ChainReference:
    """The registration of one pair computed here from the Keras model's own step parameters.

    ``chain(q)``: ``phi_1(... phi_n(q))`` on the model grid, each step written out in numpy
    (affine ``q + M (q - c) + t``, B-splines by :func:`_spline_sum`); ``trace(q)``: the positions
    after each step (last step first); ``mapping(p_f)``: fixed voxel -> moving voxel through the grid
    transforms; ``p_m`` / ``image``: the mapping of every fixed voxel and the moving image there
    (scipy, linear, edge-clamped); ``u_model``: the model's dense total field.
    """

    def __init__(self, bundle, fixed_path, moving_path):
        from dirnet_tf import readers

        self.fixed, self.moving = readers.read_image(fixed_path)[0], readers.read_image(moving_path)[0]
        f, self.t_f = bundle.grid.prepare(self.fixed)
        m, self.t_m = bundle.grid.prepare(self.moving)
        out = bundle.model({"fixed": f[None, ..., None], "moving": m[None, ..., None]})
        self.shape = bundle.grid.shape
        self.steps = [(kind, spacing, p.numpy()[0].astype(np.float64))
                      for (kind, spacing), p in zip(bundle.model.step_layout(), out["step_params"])]
        self.u_model = out["displacement"].numpy()[0].astype(np.float64)
        self.p_m = self.mapping(_voxels(self.fixed.shape))
        self.image = ndimage.map_coordinates(self.moving.array.astype(np.float64), np.moveaxis(self.p_m, -1, 0),
                                             order=1, mode="nearest")

    def trace(self, q):
        x, positions = np.asarray(q, float), []
        centre = (np.asarray(self.shape) - 1) / 2
        for kind, spacing, p in reversed(self.steps):
            if kind == "affine":
                n = x.shape[-1]
                x = x + (x - centre) @ p[: n * n].reshape(n, n).T + p[n * n:]
            else:
                x = x + _spline_sum(p, spacing, x)
            positions.append(x)
        return positions

    def chain(self, q):
        return self.trace(q)[-1]

    def model_index(self, p_f):
        return (np.asarray(p_f, float) - np.asarray(self.t_f.offset)) / np.asarray(self.t_f.scale)

    def mapping(self, p_f):
        return self.chain(self.model_index(p_f)) * np.asarray(self.t_m.scale) + np.asarray(self.t_m.offset)

    def interior(self, q, margin=1.0):
        """Points whose every intermediate position (and ``q``) lies ``margin`` inside the model grid:
        there the model's dense composition never clamps a field at the grid's border."""
        upper = np.asarray(self.shape) - 1 - margin
        return np.all([np.all((x >= margin) & (x <= upper), -1) for x in [np.asarray(q, float)] + self.trace(q)],
                      axis=0)

    def fixed_interior(self):
        """Fixed voxels inside the model grid's chain (:meth:`interior`) whose moving point lies inside M."""
        q = self.model_index(_voxels(self.fixed.shape))
        return self.interior(q) & _inside(self.p_m, self.moving.shape)


def test_chain_export_serves_every_step(chain2d):
    """The export of a composed model names its steps, and register reads them as a chain."""
    model = register.load_model(chain2d.path)
    assert [(s["kind"], s["grid_spacing"], s["output"]) for s in model.steps] == [
        ("affine", None, "step_0"), ("spline", (8, 8), "step_1"), ("spline", (8, 8), "step_2"),
        ("spline", (4, 4), "step_3"), ("spline", (4, 4), "step_4")]
    assert model.grid_spacing == (4, 4)


def _points_csv(path, columns, points, extra=None):
    rows = [",".join(repr(float(v)) for v in p) + ("" if extra is None else f",{extra}") for p in points]
    path.write_text(",".join(columns) + ("" if extra is None else ",note") + "\n" + "\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("ndim", [2, 3])
def test_chain_points_equal_the_dense_field_and_a_numpy_composition(tmp_path, chain2d, chain3d, ndim):
    """--points through a composed model: the exact chain ``T_m(phi_1(... phi_n(T_f^-1(p))))``.

    At fixed points on model-grid voxels the result agrees with the model's dense total field to
    within the interpolation error of ``compose_displacements`` (measured: 0.018 model voxels in 2-D
    and 0.008 in 3-D, where every intermediate point stays inside the grid); everywhere it equals the
    composition of the Keras model's own step parameters written out here in numpy (measured 4e-6:
    the served and the eager float32 model).
    Plausible bugs caught: the steps composed in reverse order (~0.1-1 voxel off), a step left out,
    the affine step about the wrong centre, the dense field interpolated instead of the steps
    evaluated, the moving image's geometry mixed up with the fixed one's.
    """
    import nibabel as nib

    bundle = chain2d if ndim == 2 else chain3d
    fixed, moving = _pair(tmp_path, ndim)
    ref = _ChainReference(bundle, fixed, moving)
    assert all(np.abs(p).max() > 0.5 for kind, _, p in ref.steps if kind == "spline")  # non-trivial steps
    assert np.abs(ref.steps[0][2][ndim * ndim:]).max() > 0.5 and np.abs(ref.steps[0][2][: ndim * ndim]).max() > 0.01
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in ref.shape], indexing="ij"), -1).reshape(-1, ndim)
    p_f = ref.t_f.model_to_image_index(grid)
    keep = ref.interior(grid) & np.all((p_f >= 0) & (p_f <= np.asarray(ref.fixed.shape) - 1), -1)
    grid, p_f = grid[keep], p_f[keep]
    assert len(grid) > 50
    extra = np.random.default_rng(8).uniform(0, np.asarray(ref.fixed.shape) - 1, (20, ndim))
    points = np.concatenate([p_f, extra])
    fixed_affine, moving_affine = nib.load(fixed).affine, nib.load(moving).affine
    out = tmp_path / "out"
    _points_csv(tmp_path / "vox.csv", ["i", "j", "k"][:ndim], points, "x")
    _points_csv(tmp_path / "world.csv", ["x", "y", "z"][:ndim], _world_points(fixed_affine, points, ndim)[:, :ndim])
    assert _run_main([f"--model={bundle.path}", f"--fixed={fixed}", f"--moving={moving}", f"--out={out / 'W.nii.gz'}",
                      f"--points={tmp_path / 'vox.csv'}", f"--out_points={out / 'vox.csv'}"]) == 0
    register.run(register.load_model(bundle.path),
                 [register.Job(fixed, moving, points=str(tmp_path / "world.csv"), out_points=str(out / "world.csv"))])
    got = np.loadtxt(out / "vox.csv", delimiter=",", skiprows=1, usecols=range(ndim))
    got_world = np.loadtxt(out / "world.csv", delimiter=",", skiprows=1)
    expected = ref.mapping(points)
    print(f"{ndim}-D chain points vs numpy composition: max {np.abs(got - expected).max():.3g} moving voxels")
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5)  # served vs eager float32 model: ~4e-6
    np.testing.assert_allclose(got_world, _world_points(moving_affine, expected, ndim)[:, :ndim], rtol=0, atol=5e-5)
    # At model-grid voxels: the dense total field, up to compose_displacements' interpolation.
    q_got = (got[: len(grid)] - np.asarray(ref.t_m.offset)) / np.asarray(ref.t_m.scale)
    dense = grid + ref.u_model[tuple(grid.astype(int).T)]
    err = np.abs(q_got - dense).max()
    print(f"{ndim}-D chain vs dense total field at {len(grid)} model-grid voxels: max {err:.3g} model voxels")
    assert err < 0.05


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
    fixed, moving = _pair(tmp_path, ndim)
    out = tmp_path / "out"
    job = register.Job(fixed, moving, out=str(out / "W.nii.gz"),
                       transform=str(out / ("T.tfm" if ndim == 2 else "T.h5")))
    register.run(register.load_model(bundle.path), [job])
    ref = _ChainReference(bundle, fixed, moving)
    transform = sitk.ReadTransform(job.transform)
    assert transform.GetName() == "CompositeTransform"
    names = [transform.GetNthTransform(n).GetName() for n in range(transform.GetNumberOfTransforms())]
    assert names == ["AffineTransform", "AffineTransform"] + ["BSplineTransform"] * 4
    resampled = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(moving, sitk.sitkFloat64), sitk.ReadImage(fixed),
                                                     transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)).T
    w = nib.load(job.out).get_fdata()
    inside, scale = ref.fixed_interior(), np.ptp(w)
    assert inside.mean() > 0.3
    exact = np.abs(resampled - ref.image)[_inside(ref.p_m, ref.moving.shape)].max()
    near = np.abs(resampled - w)[inside].max()
    print(f"{ndim}-D ITK chain vs exact chain {exact / scale:.3g}, vs W {near / scale:.3g} (of the range)")
    assert exact < 2e-6 * scale
    assert near < 5e-3 * scale
    # TransformPoint is the point map (LPS = RAS with x, y negated).
    fixed_affine, moving_affine = nib.load(fixed).affine, nib.load(moving).affine
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    p = np.random.default_rng(9).uniform(0, np.asarray(ref.fixed.shape) - 1, (6, ndim))
    lps = [transform.TransformPoint(tuple(v)) for v in _world_points(fixed_affine, p, ndim)[:, :ndim] * flip]
    np.testing.assert_allclose(np.array(lps) * flip, _world_points(moving_affine, ref.mapping(p), ndim)[:, :ndim],
                               atol=5e-5)


def _transformix_points(itk, image, params, tmp_path, points_lps):
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

    itk = _itk_elastix()
    bundle = chain2d if ndim == 2 else chain3d
    fixed, moving = _pair(tmp_path, ndim)
    if grids == "one":
        moving = _nifti(tmp_path / "m_same.nii.gz", _smooth(nib.load(fixed).shape, 5), nib.load(fixed).affine)
    fixed_affine, moving_affine = nib.load(fixed).affine, nib.load(moving).affine
    points = np.random.default_rng(10).uniform(0, np.asarray(nib.load(fixed).shape) - 1, (8, ndim))
    _points_csv(tmp_path / "p.csv", ["x", "y", "z"][:ndim], _world_points(fixed_affine, points, ndim)[:, :ndim])
    out = tmp_path / "out"
    job = register.Job(fixed, moving, out=str(out / "W.nii.gz"), elastix_transform=str(out / "E.txt"),
                       points=str(tmp_path / "p.csv"), out_points=str(out / "q.csv"))
    register.run(register.load_model(bundle.path), [job])
    steps = [f"E.step{k}.txt" for k in range(1 if grids == "two" else 2, 6)]
    assert _listing(out) == steps + ["E.txt", "W.nii.gz", "q.csv"]
    chain = [str(out / "E.txt")] + [str(out / s) for s in steps]
    for path, initial in zip(chain, chain[1:] + ["NoInitialTransform"]):
        assert f'(InitialTransformParametersFileName "{initial}")' in open(path).read()
    params = itk.ParameterObject.New()
    params.ReadParameterFile(job.elastix_transform)
    image = itk.imread(moving, itk.F)
    got = np.asarray(itk.array_from_image(itk.transformix_filter(image, params, log_to_console=False)), np.float64).T
    ref = _ChainReference(bundle, fixed, moving)
    w = nib.load(job.out).get_fdata()
    scale = np.ptp(w)
    exact = np.abs(got - ref.image)[_inside(ref.p_m, ref.moving.shape)].max()
    near = np.abs(got - w)[ref.fixed_interior()].max()
    print(f"{ndim}-D transformix chain ({grids} grid(s)) vs exact chain {exact / scale:.3g}, vs W {near / scale:.3g}")
    assert got.shape == w.shape and exact < 5e-6 * scale and near < 5e-3 * scale  # measured 1e-6, 1.5e-3
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    fixed_lps = _world_points(fixed_affine, points, ndim)[:, :ndim] * flip
    moved = _transformix_points(itk, image, params, tmp_path, fixed_lps) * flip
    ours = np.loadtxt(out / "q.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(moved, ours, atol=1e-3)
    np.testing.assert_allclose(ours, _world_points(moving_affine, ref.mapping(points), ndim)[:, :ndim], atol=5e-5)


def test_chain_with_a_dicom_series_as_fixed_image(tmp_path, chain3d):
    """A DICOM series (oblique, anisotropic) as the fixed image of a composed 3-D model.

    W lies on the series' grid (its affine from the DICOM geometry) and equals the moving image at
    the exact chain up to the dense field's interpolation; world points map exactly; SimpleITK,
    reading the series itself, resamples M through T.tfm into the exact chain (its index axes are
    (column, row, slice), ours (row, column, slice)).
    Plausible bugs caught: the DICOM geometry lost (W on the model grid or with an identity
    affine), row/column axes swapped between the reader and the transforms.
    """
    import nibabel as nib

    pytest.importorskip("pydicom")
    sitk = pytest.importorskip("SimpleITK")
    from pydicom.uid import generate_uid

    from test_readers import write_dicom

    orientation = (np.cos(0.3), np.sin(0.3), 0.0, -np.sin(0.3) * 0.2, np.cos(0.3) * 0.2, -np.sqrt(1 - 0.04))
    normal = np.cross(orientation[:3], orientation[3:])
    origin, step, spacing = np.array([-8.0, 5.0, -10.0]), 2.0, (1.3, 1.1)
    volume = (_smooth((14, 15, 8), 6) * 10).astype(np.uint16)
    series = tmp_path / "series"
    series.mkdir()
    uid = generate_uid()
    for k in range(volume.shape[2]):
        write_dicom(series / f"IM{k:02d}.dcm", volume[..., k], spacing, origin + k * step * normal, orientation,
                    instance=k + 1, series_uid=uid)
    _, moving = _pair(tmp_path, 3)
    out = tmp_path / "out"
    points = np.array([[3.0, 4.0, 2.0], [10.5, 7.25, 5.0], [6.0, 12.0, 3.5]])
    ref = _ChainReference(chain3d, str(series), moving)
    assert ref.fixed.shape == (14, 15, 8)
    _points_csv(tmp_path / "p.csv", ["x", "y", "z"], _world_points(ref.fixed.affine, points, 3))
    assert _run_main([f"--model={chain3d.path}", f"--fixed={series}", f"--moving={moving}", f"--out={out / 'W.nii.gz'}",
                      f"--points={tmp_path / 'p.csv'}", f"--out_points={out / 'q.csv'}",
                      f"--transform={out / 'T.tfm'}"]) == 0
    w_img = nib.load(str(out / "W.nii.gz"))
    np.testing.assert_allclose(w_img.affine, ref.fixed.affine, atol=1e-5)
    w = w_img.get_fdata()
    scale = np.ptp(w)
    near = np.abs(w - ref.image)[ref.fixed_interior()].max()
    print(f"DICOM fixed: W vs exact chain {near / scale:.3g} of the range")
    assert ref.fixed_interior().mean() > 0.2 and near < 5e-3 * scale
    moving_affine = nib.load(moving).affine
    np.testing.assert_allclose(np.loadtxt(out / "q.csv", delimiter=",", skiprows=1),
                               _world_points(moving_affine, ref.mapping(points), 3), atol=1e-5)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    reference_image = reader.Execute()
    resampled = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(moving, sitk.sitkFloat64), reference_image,
                                                     sitk.ReadTransform(str(out / "T.tfm")), sitk.sitkLinear, 0.0,
                                                     sitk.sitkFloat64))
    resampled = resampled.transpose(1, 2, 0)  # ITK (slice, row, column) -> ours (row, column, slice)
    inside = _inside(ref.p_m, ref.moving.shape)
    exact = np.abs(resampled - ref.image)[inside].max()
    print(f"DICOM fixed: SimpleITK through T.tfm vs exact chain {exact / scale:.3g} of the range")
    assert exact < 1e-5 * scale


def test_mnist_default_export_gives_points_and_transforms(tmp_path):
    """The MNIST default (stages 8, 4 then 2, two composed bounded symmetric passes each, normalised
    inputs), exported without a model grid: PNG pairs get points, an ITK file and an elastix chain.

    The grids coincide, so E.txt is step 1 and E.step2.txt ... E.step6.txt follow.  Points on
    pixels move by the served displacement to within its interpolation (measured 0.017 pixel);
    SimpleITK resamples the PNG through T.tfm into the served ``warped`` to within the same
    (measured 0.015, intensities in [0, 1]).
    Plausible bugs caught: a composed export still refused (the behaviour before step outputs),
    the pixel space of a PNG mixed up with a model grid, the chain's files misnamed.
    """
    from PIL import Image

    sitk = pytest.importorskip("SimpleITK")
    model = dirnet_tf.DIRNet((28, 28), 4, filters=4, stages=(8, 4, 2), passes=2, bounded=True, symmetric=True,
                             normalize_inputs=True)
    rng = np.random.default_rng(4)
    for v in model.trainable_variables:
        v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))
    for name, gain in (("regressor", 3.0), ("regressor_1", 2.0), ("regressor_2", 1.0)):  # steps of about 1 pixel
        for v in getattr(model, name).output_conv.trainable_variables:
            v.assign(gain * v)
    export = str(tmp_path / "export")
    export_saved_model(model, export, (28, 28), 1, {"grid_spacing": 2})
    images = np.random.default_rng(5)
    Image.fromarray(_digit(images)).save(tmp_path / "a.png")
    Image.fromarray(_digit(images)).save(tmp_path / "b.png")
    pixels = np.array([[5, 7], [20, 3], [14, 14], [9, 21]])
    _points_csv(tmp_path / "p.csv", ["i", "j"], pixels)
    out = tmp_path / "out"
    assert _run_main([f"--model={export}", f"--fixed={tmp_path / 'a.png'}", f"--moving={tmp_path / 'b.png'}",
                      f"--out={out / 'w.npy'}", f"--displacement={out / 'd.npy'}", f"--transform={out / 't.tfm'}",
                      f"--points={tmp_path / 'p.csv'}", f"--out_points={out / 'q.csv'}",
                      f"--elastix_transform={out / 'E.txt'}"]) == 0
    assert _listing(out) == ["E.step2.txt", "E.step3.txt", "E.step4.txt", "E.step5.txt", "E.step6.txt", "E.txt",
                             "d.npy", "q.csv", "t.tfm", "w.npy"]
    d, warped = np.load(out / "d.npy"), np.load(out / "w.npy")
    assert np.abs(d).max() > 0.5
    got = np.loadtxt(out / "q.csv", delimiter=",", skiprows=1)
    err = np.abs(got - (pixels + d[tuple(pixels.T)])).max()
    print(f"MNIST default: points vs the served field at pixels: {err:.3g} pixels")
    assert err < 0.05
    resampled = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(tmp_path / "b.png"), sitk.sitkFloat64),
                                                     sitk.ReadImage(str(tmp_path / "a.png")),
                                                     sitk.ReadTransform(str(out / "t.tfm")), sitk.sitkLinear, 0.0,
                                                     sitk.sitkFloat64))
    position = _voxels((28, 28)) + d
    inside = np.all((position >= 1) & (position <= 26), -1)
    diff = np.abs(resampled / 255.0 - warped[..., 0])[inside].max()
    print(f"MNIST default: SimpleITK through t.tfm vs the served warped image: {diff:.3g}")
    assert diff < 0.03  # the digits' rings change by up to ~1 per pixel
