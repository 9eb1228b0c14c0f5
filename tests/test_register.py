"""``python -m experiments.register``: the command's flags, outputs, messages and exit codes."""

import csv
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import dirnet_tf
from dirnet_tf import register_engine, registration
from dirnet_tf.inference import export_saved_model
from dirnet_tf.register_errors import RegisterError
from dirnet_tf.register_jobs import Job
from dirnet_tf.registration import load_model, run_jobs
from experiments import register

pytest.register_assert_rewrite("register_fixtures")
from register_fixtures import (  # noqa: E402 - after the assert-rewrite registration
    REPO, digit, run_cli, run_main, oblique_affine, smooth, nifti, nifti_pair, voxel_grid, reference_mapping,
    inside_image, listing, world_points, ChainReference, points_csv)

pytest_plugins = ["register_fixtures"]


def test_register_png_pair(tmp_path, export_dir):
    rng = np.random.default_rng(0)
    fixed, moving = digit(rng), digit(rng)
    Image.fromarray(fixed).save(tmp_path / "a.png")
    Image.fromarray(moving).convert("RGB").save(tmp_path / "b.png")  # RGB is turned into grey
    out, disp, fig = tmp_path / "o" / "warped.png", tmp_path / "d.npy", tmp_path / "f.png"
    proc = run_cli([f"--model={export_dir}", f"--fixed={tmp_path / 'a.png'}", f"--moving={tmp_path / 'b.png'}",
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
    with pytest.raises(RegisterError, match="does not exist"):
        registration.register(export_dir, str(tmp_path / "nope.png"), str(tmp_path / "ok.png"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(RegisterError, match="junk.png") as info:
        registration.register(export_dir, str(tmp_path / "junk.png"), str(tmp_path / "ok.png"))
    assert str(info.value).count("junk.png") == 1, str(info.value)  # the path named once (issue 25, 11)
    with pytest.raises(RegisterError, match="not a SavedModel"):
        registration.register(str(tmp_path), str(tmp_path / "ok.png"), str(tmp_path / "ok.png"))


def test_missing_flags_exit_nonzero_and_are_named(tmp_path):
    """Without --model/--fixed/--moving/--out the command stops before loading anything.

    Plausible bugs caught: a missing flag reaching ``register`` as ``None`` (a
    traceback, or exit status 0 with nothing written), or a message that does
    not say which flags are missing (or names one that was given).
    """
    proc = run_cli([f"--out={tmp_path / 'w.png'}", f"--fixed={tmp_path / 'a.png'}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    message = [line for line in proc.stderr.splitlines() if "missing" in line]
    assert len(message) == 1, proc.stderr[-2000:]
    named = {word.strip(",") for word in message[0].split() if word.startswith("--")}
    assert named == {"--model", "--moving"}
    assert not os.path.exists(tmp_path / "w.png")
    proc = run_cli([])
    assert proc.returncode == 2
    assert all(f"--{n}" in proc.stderr for n in ("model", "fixed", "moving", "out"))


def test_npy_output_is_the_models_warped_image(tmp_path, export_dir):
    """``--out=x.npy`` holds the served model's ``warped`` output, float32, unclipped.

    The moving image is a float ``.npy`` with values up to 2 (used as is), so
    the warped image exceeds 1 somewhere.  Plausible bugs caught: the ``.npy``
    path going through the 8-bit PNG conversion (rounded to 1/255, clipped to
    [0, 1]), another output (moving, fixed) written, or a channel axis lost.
    """
    from dirnet_tf.inference import load_export

    rng = np.random.default_rng(3)
    fixed = digit(rng)
    moving = (2.0 * digit(rng) / 255.0).astype(np.float32)
    Image.fromarray(fixed).save(tmp_path / "f.png")
    np.save(tmp_path / "m.npy", moving)
    out = tmp_path / "out" / "warped.npy"
    assert run_main([f"--model={export_dir}", f"--fixed={tmp_path / 'f.png'}",
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
    fixed, moving = nifti_pair(tmp_path, ndim)
    out = tmp_path / "out"
    assert run_main([f"--model={bundle.path}", f"--fixed={fixed}", f"--moving={moving}",
                      f"--out={out / 'W.nii.gz'}", f"--displacement={out / 'D.npy'}",
                      f"--figure={out / 'fig.png'}"]) == 0
    reference, p_m, u_model, _ = reference_mapping(bundle, fixed, moving)
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
        t_m.model_to_image_index(t_f.image_to_model_index(voxel_grid(f_img.shape))), -1, 0), order=1, mode="nearest")
    assert np.abs(w - unwarped).max() > 0.05 * value_range
    d = np.load(out / "D.npy")
    assert d.shape == f_img.shape + (ndim,) and d.dtype == np.float32
    np.testing.assert_allclose(d, p_m - voxel_grid(f_img.shape), atol=1e-4)
    again = ndimage.map_coordinates(nib.load(moving).get_fdata(), np.moveaxis(voxel_grid(f_img.shape) + d, -1, 0),
                                    order=1, mode="nearest")
    np.testing.assert_allclose(again, w, atol=1e-4 * value_range)
    assert os.path.getsize(out / "fig.png") > 1000
    assert listing(out) == ["D.npy", "W.nii.gz", "fig.png"]  # no temporary file left


def test_png_pixel_space_transforms_and_points(tmp_path, grid2d):
    """PNG images live in ITK's pixel space: the ITK and elastix files resample the PNG files into W.

    Plausible bugs caught: the PNG's array axes taken as ITK's x and y (ITK reads
    a PNG with x = column), a PNG W written in normalised [0, 1] intensities,
    voxel points mapped with the fixed instead of the moving image's geometry.
    """
    from PIL import Image

    sitk = pytest.importorskip("SimpleITK")
    fixed = (smooth((33, 29), 3) / 2).astype(np.uint8)
    moving = (smooth((33, 29), 4) / 2).astype(np.uint8)
    Image.fromarray(fixed).save(tmp_path / "f.png")
    Image.fromarray(moving).save(tmp_path / "m.png")
    (tmp_path / "p.csv").write_text("name,i,j\na,3,4.5\nb,20.25,11\nc,32,0\n")
    out = tmp_path / "out"
    assert run_main([f"--model={grid2d.path}", f"--fixed={tmp_path / 'f.png'}", f"--moving={tmp_path / 'm.png'}",
                      f"--out={out / 'W.png'}", f"--transform={out / 'T.tfm'}", f"--points={tmp_path / 'p.csv'}",
                      f"--out_points={out / 'q.csv'}", f"--elastix_transform={out / 'E.txt'}"]) == 0
    reference, p_m, _, mapping = reference_mapping(grid2d, str(tmp_path / "f.png"), str(tmp_path / "m.png"))
    w = np.asarray(Image.open(out / "W.png"))
    assert w.dtype == np.uint8 and w.shape == fixed.shape
    # Tolerances: the control points recovered from the float32 field move points by <~1e-6 pixel,
    # i.e. <~1e-4 grey levels on these steep 8-bit images.
    assert np.abs(w.astype(float) - reference).max() <= 0.5 + 1e-3  # rounded moving intensities
    inside = inside_image(p_m, moving.shape)
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


def test_labels_are_carried_to_the_fixed_grid(tmp_path, grid2d):
    """Moving labels (non-consecutive values) land on the fixed grid, integer, with the fixed header.

    Reference: one-hot maps interpolated (linear, edge-clamped) at the composed
    moving point of every fixed voxel, argmax, computed here.  Plausible bugs
    caught: labels warped on the model grid or with the image's linear values
    (mixing labels 2 and 5 into 3), float output, the moving header, label values
    renumbered.
    """
    import nibabel as nib

    fixed, moving = nifti_pair(tmp_path, 2)
    m = nib.load(moving)
    r = np.hypot(*np.moveaxis(voxel_grid(m.shape) - [13, 17], -1, 0))
    labels = np.where(r < 5, 2, np.where(r < 9, 5, 0)).astype(np.int16)
    labels[:4, :] = 1
    nifti(tmp_path / "lab.nii.gz", labels, m.affine)
    out = tmp_path / "out"
    assert run_main([f"--model={grid2d.path}", f"--fixed={fixed}", f"--moving={moving}", f"--out={out / 'W.nii'}",
                      f"--moving_labels={tmp_path / 'lab.nii.gz'}", f"--out_labels={out / 'L.nii.gz'}"]) == 0
    got = nib.load(str(out / "L.nii.gz"))
    np.testing.assert_array_equal(got.affine, nib.load(fixed).affine)
    assert got.shape == nib.load(fixed).shape and np.issubdtype(got.get_data_dtype(), np.integer)
    values = np.asarray(got.dataobj)
    _, p_m, _, _ = reference_mapping(grid2d, fixed, moving)
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
    fixed, moving = nifti_pair(tmp_path / "data", 2)
    Image.fromarray((smooth((33, 29), 3) / 2).astype(np.uint8)).save(tmp_path / "data" / "a.png")
    Image.fromarray((smooth((30, 27), 4) / 2).astype(np.uint8)).save(tmp_path / "data" / "b.png")
    (tmp_path / "data" / "p.csv").write_text("i,j\n3,4\n10.5,7.25\n")
    rows = [("data/f.nii.gz", "data/m.nii.gz", "out/0.nii.gz", "data/p.csv", "out/0.csv"),
            ("data/a.png", "data/b.png", "out/1.npy", "", ""),
            ("data/m.nii.gz", "data/f.nii.gz", "out/2.nii.gz", "data/p.csv", "out/2.csv")]
    (tmp_path / "pairs.csv").write_text("fixed,moving,out,points,out_points\n"
                                        + "".join(",".join(r) + "\n" for r in rows))
    calls = []
    infer = register_engine.infer

    def counting(model, prepared, batch_size=16):
        calls.append(len(prepared))
        return infer(model, prepared, batch_size)

    monkeypatch.setattr(register_engine, "infer", counting)
    assert run_main([f"--model={grid2d.path}", f"--pairs={tmp_path / 'pairs.csv'}", "--batch_size=2"]) == 0
    assert calls == [2, 1]
    model = load_model(grid2d.path)
    single = tmp_path / "single"
    for n, (f, m, o, p, q) in enumerate(rows):
        job = Job(str(tmp_path / f), str(tmp_path / m), out=str(single / os.path.basename(o)),
                           points=str(tmp_path / p) if p else None, out_points=str(single / f"{n}.csv") if q else None)
        run_jobs(model, [job], batch_size=1)
    import nibabel as nib

    for name in ("0.nii.gz", "2.nii.gz"):
        a, b = nib.load(str(tmp_path / "out" / name)).get_fdata(), nib.load(str(single / name)).get_fdata()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.ptp(b))
    np.testing.assert_allclose(np.load(tmp_path / "out" / "1.npy"), np.load(single / "1.npy"), atol=1e-3)
    for name in ("0.csv", "2.csv"):
        np.testing.assert_allclose(np.loadtxt(tmp_path / "out" / name, delimiter=",", skiprows=1),
                                   np.loadtxt(single / name, delimiter=",", skiprows=1), atol=1e-6)
    assert sorted(os.listdir(tmp_path / "out")) == ["0.csv", "0.nii.gz", "1.npy", "2.csv", "2.nii.gz"]


def bad_case(tmp_path, case, grid2d, grid3d):
    """``(flags, words the message must contain)`` of one bad input; outputs go to tmp_path/out."""
    fixed, moving = nifti_pair(tmp_path, 2)
    out = tmp_path / "out"
    base = [f"--model={grid2d.path}", f"--fixed={fixed}", f"--moving={moving}", f"--out={out / 'W.nii.gz'}"]
    if case == "unreadable":
        (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file")
        return [f"--model={grid2d.path}", f"--fixed={tmp_path / 'junk.nii.gz'}", f"--moving={moving}",
                f"--out={out / 'W.nii.gz'}"], ["junk.nii.gz"]
    if case == "2d_for_3d":
        return [f"--model={grid3d.path}"] + base[1:], ["f.nii.gz", "3-D"]
    if case == "labels_shape":
        nifti(tmp_path / "lab.nii.gz", np.zeros((31, 41), np.int16), np.eye(4))
        return base + [f"--moving_labels={tmp_path / 'lab.nii.gz'}", f"--out_labels={out / 'L.nii.gz'}"], \
            ["lab.nii.gz", "(31, 41)", "(26, 35)"]
    if case == "points_outside":
        (tmp_path / "p.csv").write_text("i,j\n1,2\n40,2\n")
        return base + [f"--points={tmp_path / 'p.csv'}", f"--out_points={out / 'q.csv'}"], ["p.csv", "line 3"]
    if case == "unwritable":
        (tmp_path / "afile").write_text("")
        return base + [f"--displacement={tmp_path / 'afile' / 'D.npy'}"], ["afile", "--displacement"]
    if case == "oblique_transform":  # fails while writing, after W was staged
        oblique = nifti(tmp_path / "o.nii.gz", smooth((31, 41), 2), oblique_affine((1.0, 0.8), 0.4, (0, 0, 0), (1, 0, 0)))
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
    args, words = bad_case(tmp_path, case, grid2d, grid3d)
    capsys.readouterr()
    assert run_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert listing(tmp_path / "out") == []
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_bad_input_from_the_command_line(tmp_path, grid2d):
    """The same through ``python -m experiments.register``: status 1, the message, no traceback, no file."""
    args, words = bad_case(tmp_path, "points_outside", grid2d, None)
    proc = run_cli(args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and all(w in proc.stderr for w in words)
    assert listing(tmp_path / "out") == []
    proc = run_cli([f"--model={grid2d.path}", f"--pairs={tmp_path / 'nope.csv'}", f"--fixed={tmp_path / 'x.png'}"])
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
    fixed, moving = digit(rng), digit(rng)
    Image.fromarray(fixed).save(tmp_path / "a.png")
    Image.fromarray(moving).save(tmp_path / "b.png")
    (tmp_path / "p.csv").write_text("i,j\n5,7\n20,3\n14,14\n")
    out = tmp_path / "out"
    assert run_main([f"--model={export_dir}", f"--fixed={tmp_path / 'a.png'}", f"--moving={tmp_path / 'b.png'}",
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
    inside = inside_image(voxel_grid((28, 28)) + d, (28, 28))
    assert np.abs(resampled / 255.0 - warped[..., 0])[inside].max() < 1e-4


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
    fixed, moving = nifti_pair(tmp_path, ndim)
    ref = ChainReference(bundle, fixed, moving)
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
    points_csv(tmp_path / "vox.csv", ["i", "j", "k"][:ndim], points, "x")
    points_csv(tmp_path / "world.csv", ["x", "y", "z"][:ndim], world_points(fixed_affine, points, ndim)[:, :ndim])
    assert run_main([f"--model={bundle.path}", f"--fixed={fixed}", f"--moving={moving}", f"--out={out / 'W.nii.gz'}",
                      f"--points={tmp_path / 'vox.csv'}", f"--out_points={out / 'vox.csv'}"]) == 0
    run_jobs(load_model(bundle.path),
                 [Job(fixed, moving, points=str(tmp_path / "world.csv"), out_points=str(out / "world.csv"))])
    got = np.loadtxt(out / "vox.csv", delimiter=",", skiprows=1, usecols=range(ndim))
    got_world = np.loadtxt(out / "world.csv", delimiter=",", skiprows=1)
    expected = ref.mapping(points)
    print(f"{ndim}-D chain points vs numpy composition: max {np.abs(got - expected).max():.3g} moving voxels")
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-5)  # served vs eager float32 model: ~4e-6
    np.testing.assert_allclose(got_world, world_points(moving_affine, expected, ndim)[:, :ndim], rtol=0, atol=5e-5)
    # At model-grid voxels: the dense total field, up to compose_displacements' interpolation.
    q_got = (got[: len(grid)] - np.asarray(ref.t_m.offset)) / np.asarray(ref.t_m.scale)
    dense = grid + ref.u_model[tuple(grid.astype(int).T)]
    err = np.abs(q_got - dense).max()
    print(f"{ndim}-D chain vs dense total field at {len(grid)} model-grid voxels: max {err:.3g} model voxels")
    assert err < 0.05


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

    from test_dicom import write_dicom

    orientation = (np.cos(0.3), np.sin(0.3), 0.0, -np.sin(0.3) * 0.2, np.cos(0.3) * 0.2, -np.sqrt(1 - 0.04))
    normal = np.cross(orientation[:3], orientation[3:])
    origin, step, spacing = np.array([-8.0, 5.0, -10.0]), 2.0, (1.3, 1.1)
    volume = (smooth((14, 15, 8), 6) * 10).astype(np.uint16)
    series = tmp_path / "series"
    series.mkdir()
    uid = generate_uid()
    for k in range(volume.shape[2]):
        write_dicom(series / f"IM{k:02d}.dcm", volume[..., k], spacing, origin + k * step * normal, orientation,
                    instance=k + 1, series_uid=uid)
    _, moving = nifti_pair(tmp_path, 3)
    out = tmp_path / "out"
    points = np.array([[3.0, 4.0, 2.0], [10.5, 7.25, 5.0], [6.0, 12.0, 3.5]])
    ref = ChainReference(chain3d, str(series), moving)
    assert ref.fixed.shape == (14, 15, 8)
    points_csv(tmp_path / "p.csv", ["x", "y", "z"], world_points(ref.fixed.affine, points, 3))
    assert run_main([f"--model={chain3d.path}", f"--fixed={series}", f"--moving={moving}", f"--out={out / 'W.nii.gz'}",
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
                               world_points(moving_affine, ref.mapping(points), 3), atol=1e-5)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    reference_image = reader.Execute()
    resampled = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(moving, sitk.sitkFloat64), reference_image,
                                                     sitk.ReadTransform(str(out / "T.tfm")), sitk.sitkLinear, 0.0,
                                                     sitk.sitkFloat64))
    resampled = resampled.transpose(1, 2, 0)  # ITK (slice, row, column) -> ours (row, column, slice)
    inside = inside_image(ref.p_m, ref.moving.shape)
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
    Image.fromarray(digit(images)).save(tmp_path / "a.png")
    Image.fromarray(digit(images)).save(tmp_path / "b.png")
    pixels = np.array([[5, 7], [20, 3], [14, 14], [9, 21]])
    points_csv(tmp_path / "p.csv", ["i", "j"], pixels)
    out = tmp_path / "out"
    assert run_main([f"--model={export}", f"--fixed={tmp_path / 'a.png'}", f"--moving={tmp_path / 'b.png'}",
                      f"--out={out / 'w.npy'}", f"--displacement={out / 'd.npy'}", f"--transform={out / 't.tfm'}",
                      f"--points={tmp_path / 'p.csv'}", f"--out_points={out / 'q.csv'}",
                      f"--elastix_transform={out / 'E.txt'}"]) == 0
    assert listing(out) == ["E.step2.txt", "E.step3.txt", "E.step4.txt", "E.step5.txt", "E.step6.txt", "E.txt",
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
    position = voxel_grid((28, 28)) + d
    inside = np.all((position >= 1) & (position <= 26), -1)
    diff = np.abs(resampled / 255.0 - warped[..., 0])[inside].max()
    print(f"MNIST default: SimpleITK through t.tfm vs the served warped image: {diff:.3g}")
    assert diff < 0.03  # the digits' rings change by up to ~1 per pixel


def test_help_shows_the_documentation_and_every_flag_without_tensorflow():
    """``--help`` prints the module docstring (the user documentation) and every flag, and neither it
    nor importing the command loads TensorFlow (so it starts in about a second).

    Plausible bugs caught: the one-line summary only (issue 25), a flag missing from the help,
    TensorFlow imported at module level again (``--help`` took 14 s).
    """
    import subprocess
    import sys

    proc = run_cli(["--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for section in ("Inputs\n------", "Geometry\n--------", "Python API", "Bad input (an unreadable file"):
        assert section in proc.stdout, section
    for name in register.PAIR_COLUMNS + ("model", "pairs", "batch_size"):
        assert f"--{name}:" in proc.stdout, name
    code = "import sys, experiments.register; print('tensorflow' in sys.modules)"
    probe = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr[-2000:]


def test_a_run_prints_no_tensorflow_startup_lines(tmp_path, export_dir):
    """Without ``TF_CPP_MIN_LOG_LEVEL`` set by the user, a CPU run's standard error is empty: no
    ``cuInit`` error, oneDNN / cpu_feature_guard / absl::InitializeLog lines (issue 25).
    """
    import subprocess
    import sys

    rng = np.random.default_rng(12)
    Image.fromarray(digit(rng)).save(tmp_path / "a.png")
    Image.fromarray(digit(rng)).save(tmp_path / "b.png")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-m", "experiments.register", f"--model={export_dir}",
                           f"--fixed={tmp_path / 'a.png'}", f"--moving={tmp_path / 'b.png'}",
                           f"--out={tmp_path / 'w.png'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "NCC" in proc.stdout, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]
