"""The Python API (``dirnet_tf.load_model``, ``dirnet_tf.register``, ``Result``) against the command and
against references computed here with scipy / numpy."""

import os

import numpy as np
import pytest
from scipy import ndimage

import dirnet_tf
from dirnet_tf.register_errors import RegisterError

pytest.register_assert_rewrite("register_fixtures")
from register_fixtures import (  # noqa: E402 - after the assert-rewrite registration
    ChainReference, digit, nifti, nifti_pair, points_csv, reference_mapping, run_main, smooth, voxel_grid,
    world_points)

pytest_plugins = ["register_fixtures"]

OUTPUTS = ("out", "displacement", "transform", "elastix_transform", "out_labels", "out_points")


def _files(folder):
    return sorted(os.listdir(folder))


def _transform_parameters(path):
    import SimpleITK as sitk

    composite = sitk.CompositeTransform(sitk.ReadTransform(str(path)))
    return [(composite.GetNthTransform(n).GetName(), composite.GetNthTransform(n).GetParameters(),
             composite.GetNthTransform(n).GetFixedParameters()) for n in range(composite.GetNumberOfTransforms())]


def _assert_same_files(cli_dir, api_dir):
    """Every file of ``cli_dir`` equals the same-named file of ``api_dir`` byte for byte (elastix files
    name the next file of their chain by absolute path: compared with the folder name replaced; an
    HDF5 transform file holds creation times: its transforms are compared, exactly)."""
    assert _files(cli_dir) == _files(api_dir)
    for name in _files(cli_dir):
        if name.endswith(".h5"):
            assert _transform_parameters(cli_dir / name) == _transform_parameters(api_dir / name)
            continue
        a = (cli_dir / name).read_bytes()
        b = (api_dir / name).read_bytes()
        if name.endswith(".txt"):
            b = b.replace(str(api_dir).encode(), str(cli_dir).encode())
        assert a == b, name


def _labels(shape, seed, values=(0, 1, 2, 5, 9)):
    """A smooth integer label map with non-consecutive values (int16)."""
    rng = np.random.default_rng(seed)
    r = np.hypot(*np.moveaxis(voxel_grid(shape)[..., :2] - rng.uniform(5, 12, 2), -1, 0))
    labels = np.asarray(values)[np.minimum((r / 3).astype(int), len(values) - 1)].astype(np.int16)
    labels[:3] = values[1]
    return labels


@pytest.mark.parametrize("case", ["grid2d", "chain3d", "mnist"])
def test_api_and_cli_write_identical_files(tmp_path, grid2d, chain3d, export_dir, case):
    """``Result.save`` writes the same files, byte for byte, as ``experiments.register`` with the same flags.

    2-D: an export with a model grid (one recovered B-spline), NIfTI pair of different geometry;
    3-D: a model of composed steps; MNIST: an export without a model grid (PNG in, PNG/NPY out).
    Every output kind: W, the displacement (.npy and ITK field), the ITK transform, the elastix
    chain, carried labels and points.  Plausible bugs caught: the API computing from another
    field than the command (the dense field instead of the spline), outputs of a different type,
    header or geometry, the elastix chain linked differently, labels or points through another path.
    """
    from PIL import Image

    import nibabel as nib

    if case == "mnist":
        rng = np.random.default_rng(11)
        Image.fromarray(digit(rng)).save(tmp_path / "f.png")
        Image.fromarray(digit(rng)).save(tmp_path / "m.png")
        fixed, moving, model_path, ext = str(tmp_path / "f.png"), str(tmp_path / "m.png"), export_dir, ".png"
        labels = _labels((28, 28), 1)
        np.save(tmp_path / "lab.npy", labels.astype(np.int32))
        label_file = str(tmp_path / "lab.npy")
        points = points_csv(tmp_path / "p.csv", ["i", "j"], [[3, 4.5], [20.25, 11], [14, 14]], "x")
        outputs = {"out": "W.png", "displacement": "D.npy", "transform": "T.tfm", "elastix_transform": "E.txt",
                   "out_labels": "L.npy", "out_points": "Q.csv"}
    else:
        ndim = 2 if case == "grid2d" else 3
        fixed, moving = nifti_pair(tmp_path, ndim)
        model_path = (grid2d if ndim == 2 else chain3d).path
        m = nib.load(moving)
        nifti(tmp_path / "lab.nii.gz", _labels(m.shape, 2), m.affine)
        label_file = str(tmp_path / "lab.nii.gz")
        p = np.random.default_rng(3).uniform(0, np.asarray(nib.load(fixed).shape) - 1, (5, ndim))
        points = points_csv(tmp_path / "p.csv", ["x", "y", "z"][:ndim],
                            world_points(nib.load(fixed).affine, p, ndim)[:, :ndim])
        ext = ".nii"
        outputs = {"out": "W.nii", "displacement": "D.nii.gz" if ndim == 3 else "D.nii",
                   "transform": "T.tfm" if ndim == 2 else "T.h5", "elastix_transform": "E.txt",
                   "out_labels": "L.nii.gz", "out_points": "Q.csv"}
    cli_dir, api_dir = tmp_path / "cli", tmp_path / "api"
    flags = [f"--model={model_path}", f"--fixed={fixed}", f"--moving={moving}",
             f"--moving_labels={label_file}", f"--points={points}"]
    assert run_main(flags + [f"--{k}={cli_dir / v}" for k, v in outputs.items()]) == 0
    model = dirnet_tf.load_model(model_path)
    result = dirnet_tf.register(model, fixed, moving)
    written = result.save(moving_labels=label_file, points=points, **{k: str(api_dir / v) for k, v in outputs.items()})
    assert sorted(os.path.basename(w) for w in written) == _files(api_dir)
    _assert_same_files(cli_dir, api_dir)
    # The displacement as .npy from the API equals the attribute, and W the attribute.
    result.save(displacement=str(tmp_path / "d.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), result.displacement)
    if ext == ".nii":
        np.testing.assert_array_equal(nib.load(str(api_dir / "W.nii")).get_fdata(), result.warped)
        np.testing.assert_array_equal(np.asarray(nib.load(str(api_dir / "L.nii.gz")).dataobj),
                                      result.warp_labels(label_file))


def test_save_is_staged_and_refuses_bad_outputs(tmp_path, grid2d):
    """A failing output (an oblique 2-D plane that a 2-D ITK transform cannot hold) leaves no file at all;
    a bad extension or a clash is refused before anything is written, naming the argument."""
    from register_fixtures import oblique_affine

    _, moving = nifti_pair(tmp_path, 2)
    oblique = nifti(tmp_path / "o.nii.gz", smooth((31, 41), 2), oblique_affine((1.0, 0.8), 0.4, (0, 0, 0), (1, 0, 0)))
    result = dirnet_tf.register(grid2d.path, oblique, moving)
    out = tmp_path / "out"
    with pytest.raises(RegisterError, match="--transform"):
        result.save(out=str(out / "W.nii.gz"), transform=str(out / "T.tfm"))
    assert not out.exists()
    with pytest.raises(RegisterError, match="--out=.*unsupported file type"):
        result.save(out=str(out / "W.jpg"))
    with pytest.raises(RegisterError, match="also written"):
        result.save(out=str(out / "W.nii.gz"), out_labels=str(out / "W.nii.gz"), moving_labels=moving)
    assert not out.exists() and result.save() == []


def test_numpy_arrays_register_like_files_without_geometry(tmp_path, grid2d, grid3d):
    """Arrays (no patient geometry) register exactly like HDF5 datasets with the same ``spacing_mm``
    (the reader's pixel space), per-image spacings as a pair; W is scipy's resampling of M at D.

    Plausible bugs caught: the spacing ignored or applied to the wrong image, arrays normalised
    differently from files, the displacement not in moving voxels (ij), W not on F's grid.
    """
    import h5py

    for ndim, bundle, shapes in ((2, grid2d, ((31, 41), (26, 35))), (3, grid3d, ((15, 17, 9), (13, 20, 8)))):
        fixed, moving = smooth(shapes[0], 0), smooth(shapes[1], 1)
        spacing_f, spacing_m = (1.0, 0.75, 2.0)[:ndim], (1.3, 0.9, 2.2)[:ndim]
        for name, array, spacing in (("f", fixed, spacing_f), ("m", moving, spacing_m)):
            with h5py.File(tmp_path / f"{name}{ndim}.h5", "w") as fh:
                fh.create_dataset("img", data=array).attrs["spacing_mm"] = spacing
        got = dirnet_tf.register(bundle.path, fixed, moving, spacing=(spacing_f, spacing_m))
        files = dirnet_tf.register(bundle.path, f"{tmp_path / f'f{ndim}.h5'}:/img", f"{tmp_path / f'm{ndim}.h5'}:/img")
        assert got.warped.shape == shapes[0] and got.displacement.shape == shapes[0] + (ndim,)
        np.testing.assert_array_equal(got.warped, files.warped)
        np.testing.assert_array_equal(got.displacement, files.displacement)
        reference = ndimage.map_coordinates(moving.astype(np.float64), np.moveaxis(voxel_grid(shapes[0])
                                            + got.displacement, -1, 0), order=1, mode="nearest")
        np.testing.assert_allclose(got.warped, reference, rtol=0, atol=1e-4 * np.ptp(reference))
        assert np.abs(got.displacement).max() > 0.3
        # One spacing for both images differs from the per-image pair.
        same = dirnet_tf.register(bundle.path, fixed, moving, spacing=spacing_f)
        assert not np.allclose(same.displacement, got.displacement, atol=1e-2)
    with pytest.raises(RegisterError, match="3-D"):
        dirnet_tf.register(grid3d.path, np.zeros((20, 20), np.float32), np.zeros((20, 20), np.float32))


def test_warp_labels_and_map_points_against_references(tmp_path, grid2d, chain2d):
    """``Result.warp_labels``: one-hot maps resampled by scipy at ``grid + displacement``, argmax;
    ``Result.map_points``: the mapping of the Keras model's own control points (voxels ij and RAS mm),
    and for a composed model the numpy chain of its steps.

    Plausible bugs caught: labels carried with the image's linear values or on the model grid,
    point conventions mixed (ij vs xy, voxels vs mm, fixed vs moving geometry), the dense field
    interpolated instead of the spline evaluated.
    """
    import nibabel as nib

    fixed, moving = nifti_pair(tmp_path, 2)
    m, f = nib.load(moving), nib.load(fixed)
    labels = _labels(m.shape, 4)
    result = dirnet_tf.register(grid2d.path, fixed, moving)
    got = result.warp_labels(labels)
    values = np.unique(labels)
    positions = np.moveaxis(voxel_grid(f.shape) + result.displacement, -1, 0)
    weights = np.stack([ndimage.map_coordinates((labels == v).astype(float), positions, order=1, mode="nearest")
                        for v in values])
    expected = values[np.argmax(weights, 0)]
    top = np.sort(weights, 0)
    clear = top[-1] - top[-2] > 1e-3
    assert got.shape == f.shape and got.dtype == np.int64 and clear.mean() > 0.9
    np.testing.assert_array_equal(got[clear], expected[clear])
    with pytest.raises(RegisterError, match="moving image's grid"):
        result.warp_labels(labels[1:])
    _, _, _, mapping = reference_mapping(grid2d, fixed, moving)
    points = np.random.default_rng(6).uniform(0, np.asarray(f.shape) - 1, (7, 2))
    np.testing.assert_allclose(result.map_points(points), mapping(points), atol=1e-4)
    np.testing.assert_allclose(result.map_points(points[0]), mapping(points[:1])[0], atol=1e-4)
    world = world_points(f.affine, points, 2)
    np.testing.assert_allclose(result.map_points(world, coordinates="world"),
                               world_points(m.affine, mapping(points), 2), atol=1e-4)
    np.testing.assert_allclose(result.map_points(world[:, :2], coordinates="world"),
                               world_points(m.affine, mapping(points), 2)[:, :2], atol=1e-4)
    pixel = np.array([[3, 4], [20, 30], [10, 7]])  # at fixed voxels: the displacement there
    np.testing.assert_allclose(result.map_points(pixel), pixel + result.displacement[tuple(pixel.T)], atol=1e-4)
    with pytest.raises(RegisterError, match="outside the fixed image"):
        result.map_points([[40.0, 2.0]])
    chain = dirnet_tf.register(chain2d.path, fixed, moving)
    np.testing.assert_allclose(chain.map_points(points), ChainReference(chain2d, fixed, moving).mapping(points),
                               atol=5e-5)
    arrays = dirnet_tf.register(grid2d.path, smooth((31, 41), 0), smooth((26, 35), 1))
    with pytest.raises(RegisterError, match="patient geometry"):
        arrays.map_points(world, coordinates="world")
