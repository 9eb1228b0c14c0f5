"""Refinement through the API and the command (``refine=N``, ``--refine``): options, records, exports.

The optimiser itself is tested in tests/test_refine.py; here: the refined chain reaches every output
(W, points, the ITK composite through SimpleITK, the elastix chain through transformix) exactly,
the record written beside the outputs, ``refine=0`` unchanged, and bad options named.
"""

import json
import os

import numpy as np
import pytest

pytest.register_assert_rewrite("register_fixtures")
from register_fixtures import (  # noqa: E402 - after the assert-rewrite registration
    beta3, inside_image, itk_elastix, nifti_pair, run_main, voxel_grid)

pytest_plugins = ["register_fixtures"]


def _numpy_chain(model, details):
    """``q -> phi_1(... phi_n(q))`` written out here from the (refined) step parameters of ``details``."""
    shape = np.asarray(model.shape, float)
    steps = []
    for step in model.steps:
        params = np.asarray(details["step_outputs"][step["output"]], np.float64)
        steps.append((step["kind"], params, step["grid_spacing"]))

    def spline(cp, spacing, x):
        flat = x.reshape(-1, x.shape[-1])
        weights = [beta3(flat[:, d, None] / s - np.arange(k)[None, :] + 1)
                   for d, (s, k) in enumerate(zip(spacing, cp.shape[:-1]))]
        subscripts = "pa,pb,abz->pz" if len(weights) == 2 else "pa,pb,pc,abcz->pz"
        return np.einsum(subscripts, *weights, cp).reshape(x.shape)

    def chain(q):
        x = np.asarray(q, np.float64)
        for kind, params, spacing in reversed(steps):  # the last step is applied first
            if kind == "affine":
                n = len(shape)
                matrix, t = params[: n * n].reshape(n, n), params[n * n:]
                x = x + (x - (shape - 1) / 2) @ matrix.T + t
            else:
                x = x + spline(params, spacing, x)
        return x
    return chain


def _exact_refined(result):
    """The moving image at the exact refined chain for every fixed voxel (scipy, linear, edge-clamped)."""
    from scipy import ndimage

    details = result.details
    q = details["fixed_grid"].image_to_model_index(voxel_grid(result.fixed_image.shape))
    p_m = details["moving_grid"].model_to_image_index(_numpy_chain(result.model, details)(q))
    image = ndimage.map_coordinates(result.moving_image.array.astype(np.float64), np.moveaxis(p_m, -1, 0), order=1,
                                    mode="nearest")
    return image, p_m


@pytest.mark.parametrize("ndim", [2, 3])
def test_refined_chain_reaches_every_output(tmp_path, chain2d, chain3d, ndim):
    """register(refine=N): the objective does not rise, the record is written beside W, and W, the
    ITK composite (SimpleITK) and the elastix chain (transformix) all follow the refined chain.

    Plausible bugs caught: the refined parameters not written back (outputs of the network's chain),
    the dense W refined but the step outputs not (transforms disagree with W), the record missing.
    """
    import nibabel as nib
    import SimpleITK as sitk

    import dirnet_tf

    bundle = chain2d if ndim == 2 else chain3d
    fixed, moving = nifti_pair(tmp_path, ndim)
    model = dirnet_tf.load_model(bundle.path)
    seen = []
    network = dirnet_tf.register(model, fixed, moving)
    result = dirnet_tf.register(model, fixed, moving, refine=8, progress=lambda i, loss: seen.append((i, loss)))
    record = result.refinement
    assert record["steps"] == 8 and len(seen) >= 8
    assert record["final_loss"] <= record["initial_loss"]
    changed = [not np.allclose(network.details["step_outputs"][s["output"]], result.details["step_outputs"][s["output"]])
               for s in model.steps]
    assert any(changed), "refinement left every step as the network predicted"
    out = tmp_path / "out"
    written = result.save(out=out / "W.nii.gz", transform=out / ("T.tfm" if ndim == 2 else "T.h5"),
                          elastix_transform=out / "E.txt")
    assert str(out / "W.json") in written
    saved = json.loads((out / "W.json").read_text())
    assert saved["refinement"]["steps"] == 8 and saved["refinement"]["final_loss"] == record["final_loss"]
    exact, p_m = _exact_refined(result)
    inside = inside_image(p_m, result.moving_image.shape)
    w = nib.load(str(out / "W.nii.gz")).get_fdata()
    scale = np.ptp(w)
    assert inside.mean() > 0.3
    gap = np.abs(w - exact)[inside]
    print(f"{ndim}-D refined W (dense composition) vs the exact chain: mean {gap.mean() / scale:.3g}, "
          f"max {gap.max() / scale:.3g} of the range")
    assert gap.mean() < 5e-3 * scale  # W composes the steps' dense fields (interpolated), the transforms exactly
    transform = sitk.ReadTransform(str(out / ("T.tfm" if ndim == 2 else "T.h5")))
    resampled = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(moving, sitk.sitkFloat64),
                                                     sitk.ReadImage(fixed, sitk.sitkFloat64), transform,
                                                     sitk.sitkLinear, 0.0, sitk.sitkFloat64)).T
    assert np.abs(resampled - exact)[inside].max() < 1e-5 * scale
    itk = itk_elastix()
    params = itk.ParameterObject.New()
    params.ReadParameterFile(str(out / "E.txt"))
    got = np.asarray(itk.array_from_image(itk.transformix_filter(itk.imread(moving, itk.F), params,
                                                                 log_to_console=False)), np.float64).T
    assert np.abs(got - exact)[inside].max() < 5e-6 * scale


def test_refine_zero_is_the_network(tmp_path, chain2d):
    """refine=0 gives exactly the network's outputs and writes no record."""
    import dirnet_tf

    fixed, moving = nifti_pair(tmp_path, 2)
    model = dirnet_tf.load_model(chain2d.path)
    a = dirnet_tf.register(model, fixed, moving)
    b = dirnet_tf.register(model, fixed, moving, refine=0)
    np.testing.assert_array_equal(a.warped, b.warped)
    np.testing.assert_array_equal(a.displacement, b.displacement)
    assert b.refinement is None
    assert b.save(out=tmp_path / "o" / "W.nii.gz") == [str(tmp_path / "o" / "W.nii.gz")]


def test_command_refines_and_reports(tmp_path, chain2d, capsys):
    fixed, moving = nifti_pair(tmp_path, 2)
    out = tmp_path / "out"
    assert run_main([f"--model={chain2d.path}", f"--fixed={fixed}", f"--moving={moving}", f"--out={out / 'W.nii.gz'}",
                     "--refine=10", "--refine_similarity=mi"]) == 0
    text = capsys.readouterr().out
    assert "refine: step 10/10" in text and "after 10 refinement steps (mi objective" in text
    record = json.loads((out / "W.json").read_text())
    assert record["refinement"]["similarity"] == "mi" and record["refinement"]["steps"] == 10
    assert record["fixed"] == fixed and os.path.isfile(out / "W.nii.gz")


@pytest.mark.parametrize("flags,message", [
    (["--refine=-3"], "--refine=-3 is negative"),
    (["--refine_similarity=mi"], "has no effect without refinement"),
])
def test_bad_refine_options_are_named(tmp_path, chain2d, capsys, flags, message):
    fixed, moving = nifti_pair(tmp_path, 2)
    out = tmp_path / "out"
    assert run_main([f"--model={chain2d.path}", f"--fixed={fixed}", f"--moving={moving}",
                     f"--out={out / 'W.nii.gz'}"] + flags) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_refine_option_checks():
    """check_refine_options: whole numbers >= 0, known similarities, the model's own similarity by default."""
    from types import SimpleNamespace

    from dirnet_tf.register_errors import RegisterError
    from dirnet_tf.register_refine import check_refine_options

    model = SimpleNamespace(metadata={"config": {"similarity": "lncc"}, "bounded": True}, steps=[], path="m")
    assert check_refine_options(model, 0) == (0, "lncc")
    assert check_refine_options(model, 5, "MI") == (5, "mi")
    mse = SimpleNamespace(metadata={"config": {"similarity": "mse"}}, steps=[], path="m")
    assert check_refine_options(mse, 3) == (3, "ncc")
    for bad in (-1, 2.5, "x"):
        with pytest.raises(RegisterError, match="refine"):
            check_refine_options(model, bad)
    with pytest.raises(RegisterError, match="ncc, lncc, mi"):
        check_refine_options(model, 4, "mattes")
    old = SimpleNamespace(metadata={"steps": [{"kind": "affine"}, {"kind": "spline"}]}, steps=None, path="old")
    with pytest.raises(RegisterError, match="export it again"):
        check_refine_options(old, 4)


def test_init_header_without_geometry_is_named(tmp_path, grid2d, capsys):
    """--init=header with PNG images (no patient geometry): exit 1, the image named, --init=center suggested."""
    from PIL import Image

    from register_fixtures import digit

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(digit(rng, 24)).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    assert run_main([f"--model={grid2d.path}", f"--fixed={tmp_path / 'a.png'}", f"--moving={tmp_path / 'b.png'}",
                     f"--out={out / 'W.nii.gz'}", "--init=header"]) == 1
    err = capsys.readouterr().err
    assert "a.png" in err and "no patient geometry" in err and "--init=center" in err and "Traceback" not in err
    assert not out.exists()
    assert run_main([f"--model={grid2d.path}", f"--fixed={tmp_path / 'a.png'}", f"--moving={tmp_path / 'b.png'}",
                     f"--out={out / 'W.nii.gz'}", "--init=center"]) == 0


def test_the_papers_model_is_refined_as_one_unbounded_spline(tmp_path, export_dir):
    """An export of the paper's model (one B-spline, no step outputs): its control points are recovered,
    refined, and the refined spline is what points and W follow."""
    from PIL import Image

    import dirnet_tf
    from register_fixtures import digit
    from dirnet_tf import spline_np

    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        Image.fromarray(digit(rng)).save(tmp_path / f"{name}.png")
    model = dirnet_tf.load_model(export_dir)
    network = dirnet_tf.register(model, tmp_path / "a.png", tmp_path / "b.png")
    result = dirnet_tf.register(model, tmp_path / "a.png", tmp_path / "b.png", refine=10, refine_similarity="ncc")
    assert result.refinement["final_loss"] < result.refinement["initial_loss"]
    assert not np.allclose(network.displacement, result.displacement)
    spline = result.details["spline"]
    assert spline["exact"]
    points = np.array([[5.0, 7.0], [14.0, 14.0], [20.5, 9.25]])
    expected = points + spline_np.spline_displacement_at(spline["control_points"], spline["spacing"], points)
    np.testing.assert_allclose(result.map_points(points), expected, atol=1e-6)
    np.testing.assert_allclose(result.displacement[5, 7], expected[0] - points[0], atol=1e-4)
