"""Model-grid preprocessing (``dirnet_tf.preprocessing``) against independent references.

Resampling is checked against analytic functions of physical position (mm)
evaluated at the model-grid voxel centres, whose positions are written here
from the definition (model grid centred on the image centre, ``shape`` voxels
at ``spacing`` mm); centre crop/pad against hand-written arrays.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dirnet_tf.preprocessing import GridTransform, ModelGrid, normalize
from dirnet_tf.readers import Image, InputError


def centre_positions(n_image, s_image, n_model, s_model):
    """Physical positions (mm, image index 0 at 0 mm) of model voxel centres along one axis."""
    return (n_image - 1) / 2 * s_image + (np.arange(n_model) - (n_model - 1) / 2) * s_model


def f2(x0, x1):
    """Smooth test function of position (mm), values in [0.1, 0.9]."""
    return 0.5 + 0.2 * np.sin(2 * np.pi * x0 / 15.0) + 0.2 * np.cos(2 * np.pi * x1 / 40.0)


def test_anisotropic_2d_matches_analytic_function():
    n, s = (40, 30), (0.5, 2.0)  # extent 20 x 60 mm
    x0, x1 = np.meshgrid(np.arange(n[0]) * s[0], np.arange(n[1]) * s[1], indexing="ij")
    image = Image(f2(x0, x1).astype(np.float32), s)
    grid = ModelGrid((16, 64), (1.0, 1.0), normalize="none")  # crop along axis 0, pad along axis 1
    out, transform = grid.prepare(image)
    assert out.shape == (16, 64) and out.dtype == np.float32

    p0, p1 = centre_positions(n[0], s[0], 16, 1.0), centre_positions(n[1], s[1], 64, 1.0)
    expected = f2(*np.meshgrid(p0, p1, indexing="ij"))
    # model voxels whose centre lies within the image's sample positions
    inner = np.multiply.outer((p0 >= 0) & (p0 <= (n[0] - 1) * s[0]), (p1 >= 0) & (p1 <= (n[1] - 1) * s[1]))
    assert inner.sum() > 0.8 * 16 * 60
    np.testing.assert_allclose(out[inner], expected[inner], atol=4e-3)
    # padding: outside the image's extent (half a voxel beyond the border centres)
    outside = np.multiply.outer(np.ones(16, bool), (p1 < -0.5 * s[1]) | (p1 > (n[1] - 0.5) * s[1]))
    assert outside.sum() == 16 * 4
    np.testing.assert_array_equal(out[outside], image.array.min())
    np.testing.assert_array_equal(transform.inside_mask(), ~outside)
    # the index mapping agrees with the physical positions
    v = np.array([[0, 0], [7, 31], [15, 63]], float)
    np.testing.assert_allclose(transform.model_to_image_index(v) * np.array(s),
                               np.stack([p0[[0, 7, 15]], p1[[0, 31, 63]]], axis=-1), atol=1e-9)


def test_anisotropic_3d_linear_function_exact():
    n, s = (12, 10, 8), (1.0, 1.5, 3.0)  # extents 12, 15, 24 mm
    S, N = (1.5, 1.5, 2.0), (6, 12, 12)  # intermediate 8, 10, 12 -> crop 1, pad 1, equal
    coef = np.array([0.03, -0.02, 0.01])
    grids = np.meshgrid(*[np.arange(k) * sp for k, sp in zip(n, s)], indexing="ij")
    image = Image((0.5 + sum(c * g for c, g in zip(coef, grids))).astype(np.float32), s)
    out, transform = ModelGrid(N, S, normalize="none").prepare(image)
    pos = [centre_positions(a, b, c, d) for a, b, c, d in zip(n, s, N, S)]
    expected = 0.5 + sum(c * g for c, g in zip(coef, np.meshgrid(*pos, indexing="ij")))
    inner = np.ones(N, bool)
    for axis, (p, k, sp) in enumerate(zip(pos, n, s)):
        shape = [1, 1, 1]
        shape[axis] = -1
        inner &= ((p >= 0) & (p <= (k - 1) * sp)).reshape(shape)
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-5)  # trilinear is exact on linear data
    assert transform.crop_start == (1, -1, 0) and transform.intermediate_shape == (8, 10, 12)
    np.testing.assert_allclose(transform.scale, np.array(S) / np.array(s))


def test_centre_crop_and_pad_hand_made():
    arr = np.arange(30, dtype=np.float32).reshape(5, 6) + 100
    out, _ = ModelGrid((3, 8), 1.0, normalize="none").prepare(Image(arr, (1.0, 1.0)))
    p = 100.0  # pad value with normalize='none': the image minimum
    expected = np.array([
        [p, 106, 107, 108, 109, 110, 111, p],
        [p, 112, 113, 114, 115, 116, 117, p],
        [p, 118, 119, 120, 121, 122, 123, p],
    ])
    np.testing.assert_array_equal(out, expected)

    # odd differences: the extra voxel is cropped / padded at the end
    arr = np.arange(20, dtype=np.float32).reshape(4, 5) + 1
    out, _ = ModelGrid((3, 8), 1.0, normalize="none").prepare(Image(arr, (1.0, 1.0)))
    p = 1.0
    expected = np.array([
        [p, 1, 2, 3, 4, 5, p, p],
        [p, 6, 7, 8, 9, 10, p, p],
        [p, 11, 12, 13, 14, 15, p, p],
    ])
    np.testing.assert_array_equal(out, expected)

    # normalised images pad with 0
    out, _ = ModelGrid((3, 8), 1.0, normalize="minmax").prepare(Image(arr, (1.0, 1.0)))
    np.testing.assert_allclose(out[0, :6], [0, 0, 1 / 19, 2 / 19, 3 / 19, 4 / 19], atol=1e-6)
    assert out[:, 6:].max() == 0


def test_labels_nearest_and_shape_check():
    lab = np.random.default_rng(5).integers(0, 4, size=(4, 4)).astype(np.int32)
    image = Image(np.zeros((4, 4), np.float32), (1.0, 1.0), source="img.npy")
    grid = ModelGrid((8, 8), 0.5)  # 2x up-sampling, no crop
    out = grid.prepare_labels(Image(lab, (1.0, 1.0), source="lab.npy"), image)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, np.repeat(np.repeat(lab, 2, axis=0), 2, axis=1))

    out = ModelGrid((2, 6), 1.0).prepare_labels(lab, image)  # crop rows 1-2, pad a column each side
    expected = np.zeros((2, 6), np.int32)
    expected[:, 1:5] = lab[1:3]
    np.testing.assert_array_equal(out, expected)

    with pytest.raises(InputError, match=r"lab.npy.*\(4, 5\).*img.npy.*\(4, 4\)"):
        grid.prepare_labels(Image(np.zeros((4, 5), np.int32), (1.0, 1.0), source="lab.npy"), image)


def test_normalize_modes():
    x = np.linspace(0.0, 100.0, 101)
    out = normalize(x)  # 1st-99th percentile -> [0, 1]: 1 -> 0, 99 -> 1, clipped
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[[0, 1, 50, 99, 100]], [0, 0, 49 / 98, 1, 1], atol=1e-6)
    np.testing.assert_allclose(normalize(x, "minmax"), x / 100, atol=1e-6)
    np.testing.assert_array_equal(normalize(x, "none"), x.astype(np.float32))
    np.testing.assert_array_equal(normalize(np.full(7, 3.0)), np.zeros(7))
    mask = x <= 50
    np.testing.assert_allclose(normalize(x, "minmax", mask=mask)[[25, 50, 80]], [0.5, 1.0, 1.0], atol=1e-6)
    with pytest.raises(InputError, match="normalize mode"):
        normalize(x, "zscore")


def test_json_round_trip_and_index_mapping():
    grid = ModelGrid((20, 24), (1.25, 0.75), normalize="percentile", percentiles=(2, 98))
    assert ModelGrid.from_json(grid.to_json()) == grid
    assert json.loads(grid.to_json())["shape"] == [20, 24]

    rng = np.random.default_rng(6)
    affine = np.eye(4)
    angle = 0.4
    affine[:2, :2] = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([0.6, 1.1])
    affine[:3, 3] = (4.0, -7.0, 2.0)
    image = Image(rng.random((30, 17)).astype(np.float32), (0.6, 1.1), affine, "img.nii")
    out, transform = grid.prepare(image)
    restored = GridTransform.from_json(json.loads(json.dumps(transform.to_dict())))
    assert restored == transform
    assert transform.intensity["mode"] == "percentile" and transform.intensity["high"] > transform.intensity["low"]

    points = rng.uniform(-3, 25, size=(50, 2))
    np.testing.assert_allclose(restored.image_to_model_index(restored.model_to_image_index(points)), points)
    np.testing.assert_allclose(grid.model_to_image_index(points, image), transform.model_to_image_index(points))
    # the model grid's own affine: a model voxel lands where its image index lands
    model_affine = restored.model_affine()
    for v in points[:5]:
        i = transform.model_to_image_index(v)
        np.testing.assert_allclose(model_affine @ [v[0], v[1], 0, 1], affine @ [i[0], i[1], 0, 1], atol=1e-9)
    # model voxel steps are model-spacing long in mm
    np.testing.assert_allclose(np.linalg.norm(model_affine[:3, :2], axis=0), (1.25, 0.75))


def test_field_back_to_image_grid():
    image = Image(np.zeros((40, 30), np.float32), (0.5, 2.0), source="fixed")
    grid = ModelGrid((16, 64), (1.0, 1.0))
    _, transform = grid.prepare(image)
    field = np.zeros((16, 64, 2))
    field[..., 0] = 1.5  # model voxels along axis 0
    field[..., 1] = -2.0
    mm = transform.field_to_image(field, units="mm")
    vox = transform.field_to_image(field, units="voxels")
    assert mm.shape == (40, 30, 2)
    # axis 0 of the image (20 mm) is cropped to 16 mm: 2 mm = 4 image rows lost at each end
    assert np.isnan(mm[:4]).all() and np.isnan(mm[-4:]).all()
    assert not np.isnan(mm[5:-5]).any()
    np.testing.assert_allclose(mm[5:-5], np.broadcast_to([1.5, -2.0], mm[5:-5].shape))  # 1 mm model voxels
    np.testing.assert_allclose(vox[5:-5], np.broadcast_to([3.0, -1.0], vox[5:-5].shape))  # image: 0.5, 2 mm

    # a field linear in physical position comes back linear in physical position
    p0 = centre_positions(40, 0.5, 16, 1.0)
    field = np.zeros((16, 64, 2))
    field[..., 0] = 0.1 * p0[:, None]  # model voxels (= mm here)
    back = transform.field_to_image(field, units="mm")
    x0 = np.arange(40) * 0.5
    rows = slice(5, 35)
    np.testing.assert_allclose(back[rows, :, 0], np.broadcast_to(0.1 * x0[rows, None], (30, 30)), atol=1e-9)
    with pytest.raises(InputError, match="no affine"):
        transform.field_to_image(field, units="world")


def test_dimension_mismatch_and_bad_grid():
    with pytest.raises(InputError, match="3-D image.*2-D model grid"):
        ModelGrid((8, 8), 1.0).prepare(Image(np.zeros((4, 4, 4), np.float32), (1.0, 1.0, 1.0), source="v"))
    with pytest.raises(InputError, match="spacing"):
        ModelGrid((8, 8), (1.0, 0.0))
    with pytest.raises(InputError, match="normalize"):
        ModelGrid((8, 8), 1.0, normalize="z")


def test_modules_do_not_need_tensorflow():
    """readers and preprocessing import with TensorFlow blocked (the package __init__ is bypassed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys, types\n"
        "sys.modules['tensorflow'] = None\n"
        f"pkg = types.ModuleType('dirnet_tf'); pkg.__path__ = [{os.path.join(root, 'dirnet_tf')!r}]\n"
        "sys.modules['dirnet_tf'] = pkg\n"
        "import numpy as np\n"
        "from dirnet_tf import readers, preprocessing\n"
        "img = readers.Image(np.ones((4, 4), np.float32), (1.0, 1.0))\n"
        "print(preprocessing.ModelGrid((2, 2), 1.0).prepare(img)[0].shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 2)"


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int16])
def test_intensity_range_equals_numpy_percentiles_and_leaves_the_input_alone(dtype):
    from dirnet_tf.preprocessing import intensity_range

    rng = np.random.default_rng(5)
    image = (rng.gamma(2.0, 40.0, size=(20, 24, 18))).astype(dtype)
    image[:4] = 0  # empty background
    before = image.copy()
    values = image.astype(np.float64)
    low, high = np.percentile(values, [2.0, 98.0])
    assert intensity_range(image, "percentile", percentiles=(2.0, 98.0)) == (low, high)
    bright_high = np.percentile(values[values > low], 98.0)
    assert intensity_range(image, "percentile", percentiles=(2.0, 98.0), foreground_high=True) == (low, bright_high)
    assert bright_high != high
    np.testing.assert_array_equal(image, before)
