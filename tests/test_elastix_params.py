"""elastix parameter files (dirnet_tf.elastix_params) against transformix and SimpleITK.

Cases and tolerances: :mod:`tests.transform_cases`; transformix tests are skipped
without itk-elastix.
"""

import os
import re

import numpy as np
import pytest

from dirnet_tf.elastix_params import (
    elastix_affine_parameters,
    elastix_chain,
    elastix_step_parameters,
    elastix_transform_parameters,
    write_elastix_transform,
)
from dirnet_tf.itk import DEFAULT_MARGIN, itk_affine_transform, itk_geometry, map_points_world
from dirnet_tf.spline_np import map_points_bspline, map_points_chain
from tests.transform_cases import (
    analytic,
    case,
    chain_case,
    inside_grid,
    need_itk_elastix,
    need_simpleitk,
    nifti_moving,
    ours,
    parameter_object,
    read_transformix_points,
    report,
    voxels,
    write_transformix_points,
)


@pytest.fixture
def sitk():
    return need_simpleitk()


@pytest.fixture
def itk():
    return need_itk_elastix()


@pytest.mark.parametrize("ndim", [2, 3])
def test_transformix_resamples_like_warp(itk, tmp_path, ndim):
    shape, spacing, cp, affine = case(ndim, seed=3)
    moving = analytic(voxels(shape))
    u, warped = ours(cp, shape, spacing, moving)
    image = itk.imread(nifti_moving(tmp_path, moving, affine), itk.F)
    inside = inside_grid(u, shape)
    for order in (1, 3):
        path = write_elastix_transform(str(tmp_path / f"TransformParameters.{order}.txt"), cp, spacing,
                                          affine, shape, interpolation_order=order)
        result = itk.transformix_filter(image, parameter_object(itk, path), log_to_console=False)
        out = np.asarray(itk.array_from_image(result), np.float64).T
        assert out.shape == shape
        if order == 1:
            diff = (out - warped)[inside]
            report(f"transformix {ndim}-D linear vs warp", diff)
            assert np.max(np.abs(diff)) < 1e-6
        else:
            # Cubic B-spline interpolation of the analytic image vs its exact values at phi(x):
            # O(h^4) accurate, except within ~2 voxels of the border, where transformix's mirror
            # boundary condition does not continue the image (errors up to ~0.02 there).
            truth = analytic(voxels(shape) + u)
            pos = voxels(shape) + u
            interior = np.all((pos >= 2) & (pos <= np.asarray(shape) - 3), axis=-1)
            err_cubic = np.max(np.abs(out - truth)[interior])
            err_linear = np.max(np.abs(warped - truth)[interior])
            print(f"transformix {ndim}-D cubic vs analytic {err_cubic:.3g} (linear {err_linear:.3g})")
            assert err_cubic < 0.3 * err_linear and err_cubic < 3e-3


@pytest.mark.parametrize("ndim", [2, 3])
def test_transformix_points_and_field_match_map_points_world(itk, tmp_path, ndim):
    shape, spacing, cp, affine = case(ndim, seed=5)
    moving = analytic(voxels(shape))
    image = itk.imread(nifti_moving(tmp_path, moving, affine), itk.F)
    path = write_elastix_transform(str(tmp_path / "TransformParameters.0.txt"), cp, spacing, affine, shape)
    parameters = parameter_object(itk, path)
    vox = np.random.default_rng(10).uniform(-1, np.asarray(shape), (40, ndim))
    ras = vox @ affine[:ndim, :ndim].T + affine[:ndim, 3]
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    points_file = str(tmp_path / "points.txt")
    write_transformix_points(points_file, ras * flip)
    out_dir = str(tmp_path / "out")
    os.makedirs(out_dir)
    itk.transformix_pointset(image, parameters, fixed_point_set_file_name=points_file,
                             output_directory=out_dir, log_to_console=False)
    got = read_transformix_points(os.path.join(out_dir, "outputpoints.txt")) * flip
    expected = map_points_world(cp, spacing, affine, ras)
    report(f"transformix points {ndim}-D vs map_points_world (mm)", got - expected)
    # outputpoints.txt prints about 6 significant digits.
    np.testing.assert_allclose(got, expected, atol=1e-3)
    # Dense deformation field (LPS mm at the fixed voxels) vs the library's field.
    field = itk.transformix_deformation_field(image, parameters, output_directory=out_dir, log_to_console=False)
    field = np.asarray(itk.array_from_image(field), np.float64)
    field = field.transpose(list(range(ndim))[::-1] + [ndim])
    u, _ = ours(cp, shape, spacing, moving)
    expected_field = (u @ affine[:ndim, :ndim].T) * flip
    report(f"transformix deformation field {ndim}-D (mm)", field - expected_field)
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
    write_transformix_points(points_file, -vox)
    results = {}
    for margin in (0, DEFAULT_MARGIN):
        path = write_elastix_transform(str(tmp_path / f"tp{margin}.txt"), cp, spacing, affine, shape,
                                          margin=margin)
        out_dir = str(tmp_path / f"out{margin}")
        os.makedirs(out_dir)
        itk.transformix_pointset(image, parameter_object(itk, path), fixed_point_set_file_name=points_file,
                                 output_directory=out_dir, log_to_console=False)
        results[margin] = -read_transformix_points(os.path.join(out_dir, "outputpoints.txt"))
    ours = map_points_bspline(cp, spacing, vox)
    np.testing.assert_allclose(results[DEFAULT_MARGIN], ours, atol=1e-5)
    np.testing.assert_allclose(results[0][0], vox[0], atol=1e-5)  # unmoved without padding
    np.testing.assert_allclose(results[0][1:], ours[1:], atol=1e-5)


def test_elastix_text_fields():
    shape, spacing, cp, affine = case(2)
    text = elastix_transform_parameters(cp, spacing, affine, shape, margin=1)
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


@pytest.mark.parametrize("shape, spacing", [((13, 9), 4), ((28, 28), 8), ((5, 7, 9), (2, 3, 4)),
                                             ((16, 17, 18), 4)])
def test_control_grid_rule_matches_bspline(shape, spacing):
    from dirnet_tf.spline_np import control_grid_shape

    grid = control_grid_shape(shape, spacing)
    cp = np.zeros(grid + (len(shape),))
    text = elastix_transform_parameters(cp, spacing, np.eye(4), shape, margin=0)
    assert f"(GridSize {' '.join(map(str, grid))})" in text
    with pytest.raises(ValueError, match="do not fit"):
        elastix_transform_parameters(cp[1:], spacing, np.eye(4), shape)


def test_elastix_affine_parameters_are_the_itk_affine(sitk):
    """The elastix AffineTransform text holds the matrix and translation of :func:`itk_affine_transform`."""
    shape, affine, _, steps = chain_case(3)
    moving_affine = affine.copy()
    moving_affine[:3, 3] += [1.0, -2.0, 0.5]
    text = elastix_affine_parameters(steps[0]["matrix"], affine, shape, moving_affine)
    params = {m.group(1): m.group(2) for m in re.finditer(r"^\((\w+) (.*)\)$", text, re.M)}
    assert params["Transform"] == '"AffineTransform"' and params["NumberOfParameters"] == "12"
    assert params["CenterOfRotationPoint"] == "0.0 0.0 0.0" and params["Size"] == "12 14 10"
    itk = itk_affine_transform(steps[0]["matrix"], affine, moving_affine)
    np.testing.assert_allclose([float(v) for v in params["TransformParameters"].split()],
                               list(itk.GetMatrix()) + list(itk.GetTranslation()), rtol=1e-15, atol=1e-12)
    assert elastix_step_parameters(steps[0], affine, shape, moving_affine=moving_affine) == text
    with pytest.raises(ValueError, match="a step must be"):
        map_points_chain([{"kind": "rigid"}], np.zeros((1, 3)))


def _fields(text):
    return {m.group(1): m.group(2) for m in re.finditer(r"^\((\w+) (.*)\)$", text, re.M)}


def test_elastix_chain_links_files_and_sets_the_fixed_grid(tmp_path):
    shape, affine, _, steps = chain_case(2)
    texts = [elastix_step_parameters(step, affine, shape) for step in steps]
    paths = [str(tmp_path / f"TransformParameters.{k}.txt") for k in range(len(texts))]
    fixed_grid = {"size": [30, 25], "spacing": [0.5, 2.0], "origin": [1.0, -3.5], "direction": [0.0, 1.0, 1.0, 0.0]}
    linked = elastix_chain(texts, paths, fixed_grid)
    assert len(linked) == 3
    for k, text in enumerate(linked):
        fields = _fields(text)
        assert fields["Size"] == "30 25" and fields["Index"] == "0 0"
        assert fields["Spacing"] == "0.5 2.0" and fields["Origin"] == "1.0 -3.5"
        assert fields["Direction"] == "0.0 1.0 1.0 0.0"  # column-major of the row-major [[0, 1], [1, 0]]
        initial = f'"{os.path.abspath(paths[k + 1])}"' if k + 1 < len(paths) else '"NoInitialTransform"'
        assert fields["InitialTransformParametersFileName"] == initial
        assert fields["InitialTransformParameterFileName"] == initial
        # Everything else is the step's own text.
        own = _fields(texts[k])
        replaced = {"Size", "Spacing", "Origin", "Direction", "InitialTransformParametersFileName",
                    "InitialTransformParameterFileName"}
        assert fields.keys() == own.keys()
        assert {key: v for key, v in fields.items() if key not in replaced} == \
            {key: v for key, v in own.items() if key not in replaced}
    with pytest.raises(RuntimeError, match=r"no \(Size \.\.\.\) line"):
        elastix_chain(["(Transform \"AffineTransform\")\n"], paths[:1], fixed_grid)


@pytest.mark.parametrize("ndim", [2, 3])
def test_transformix_applies_a_chain_like_map_points_chain(itk, tmp_path, ndim):
    """A chain of elastix files (affine step, two B-spline steps) maps points as :func:`map_points_chain`."""
    shape, affine, _, steps = chain_case(ndim)
    geometry = itk_geometry(affine, ndim)
    fixed_grid = {"size": list(shape), "spacing": list(geometry["spacing"]), "origin": list(geometry["origin"]),
                  "direction": list(geometry["direction"])}
    paths = [str(tmp_path / f"TransformParameters.{k}.txt") for k in range(len(steps))]
    texts = elastix_chain([elastix_step_parameters(step, affine, shape) for step in steps], paths, fixed_grid)
    for path, text in zip(paths, texts):
        with open(path, "w") as fh:
            fh.write(text)
    image = itk.image_from_array(np.zeros(shape[::-1], np.float32))
    image.SetSpacing(fixed_grid["spacing"])
    image.SetOrigin(fixed_grid["origin"])
    image.SetDirection(itk.matrix_from_array(np.reshape(fixed_grid["direction"], (ndim, ndim))))
    vox = np.random.default_rng(14).uniform(0, np.asarray(shape) - 1, (20, ndim))
    lin, off = affine[:ndim, :ndim], affine[:ndim, 3]
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    points_file = str(tmp_path / "points.txt")
    write_transformix_points(points_file, (vox @ lin.T + off) * flip)
    out_dir = str(tmp_path / "out")
    os.makedirs(out_dir)
    itk.transformix_pointset(image, parameter_object(itk, paths[0]), fixed_point_set_file_name=points_file,
                             output_directory=out_dir, log_to_console=False)
    got = read_transformix_points(os.path.join(out_dir, "outputpoints.txt")) * flip
    expected = map_points_chain(steps, vox) @ lin.T + off
    report(f"transformix chain {ndim}-D vs map_points_chain (mm)", got - expected)
    np.testing.assert_allclose(got, expected, atol=1e-3)  # outputpoints.txt: about 6 significant digits
