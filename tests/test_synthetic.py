"""dirnet_tf.synthetic: exact ground truth, smooth injective fields of the requested size, seeded streams."""

import numpy as np
import pytest
import tensorflow as tf

from dirnet_tf import metrics
from dirnet_tf.bspline import INJECTIVITY_BOUND
from dirnet_tf.pairs import make_input_iterator
from dirnet_tf.synthetic import (TEST, TRAIN, VALID, SyntheticDeformation, endpoint_error, masked_mean,
                                 stream_key, synthetic_evaluation_pairs, synthetic_pair_sampler)
from dirnet_tf.warping import warp, warp_labels

CASES = [  # shape, voxel spacing (mm), magnitude (mm), control spacing (mm)
    ((40, 36), (1.0, 1.5), 5.0, 16.0),
    ((20, 24, 18), 2.0, 6.0, 16.0),
]


def _blobs(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    out = []
    for _ in range(n):
        centre = [rng.uniform(0.35 * s, 0.65 * s) for s in shape]
        radius = rng.uniform(0.2, 0.3) * min(shape)
        out.append(np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / (2 * radius ** 2)))
    return np.stack(out)[..., None].astype(np.float32)


@pytest.mark.parametrize("shape,voxel,magnitude,spacing", CASES)
@pytest.mark.parametrize("augment", [0.0, 3.0])
def test_ground_truth_is_exact(shape, voxel, magnitude, spacing, augment):
    # catches: a field of the wrong direction (forward instead of backward), fixed and moving swapped,
    # the field applied to another image than the returned moving one
    d = SyntheticDeformation(shape, voxel, magnitude, spacing, augment=augment)
    images = tf.constant(_blobs(3, shape))
    out = d.pairs(images, stream_key(0, TRAIN, 5), 4)
    assert out["fixed"].shape == (4,) + shape + (1,) and out["displacement"].shape == (4,) + shape + (len(shape),)
    again = warp(out["moving"], out["displacement"]).numpy()
    np.testing.assert_allclose(again, out["fixed"].numpy(), atol=1e-6)
    assert np.abs(out["fixed"].numpy() - out["moving"].numpy()).max() > 0.05  # a real deformation
    if not augment:  # the moving image is one of the images, unchanged
        np.testing.assert_array_equal(out["moving"].numpy(), tf.gather(images, out["index"]).numpy())


def test_labels_follow_the_true_field():
    shape = (24, 20)
    images = _blobs(2, shape)
    labels = (images[..., 0] > 0.5).astype(np.int32)
    d = SyntheticDeformation(shape, 1.0, 4.0, 12.0, augment=2.0)
    made = synthetic_evaluation_pairs(images, 3, 0, d, TEST, labels=labels)
    carried = warp_labels(made["moving_labels"], made["displacement"], 2).numpy()
    np.testing.assert_array_equal(carried, made["fixed_labels"])
    assert (made["fixed_labels"] != labels[made["index"]]).any()


@pytest.mark.parametrize("shape,voxel,magnitude,spacing", CASES)
def test_fields_are_smooth_injective_and_of_the_requested_magnitude(shape, voxel, magnitude, spacing):
    # catches: control points above the injectivity bound (folding), a magnitude in voxels instead
    # of mm, fields far below the requested size
    d = SyntheticDeformation(shape, voxel, magnitude, spacing)
    assert d.squarings() == 0
    u = d.fields(stream_key(3, TRAIN, 0), 6).numpy()
    mm = np.abs(u) * np.broadcast_to(np.asarray(voxel, float), (len(shape),))
    assert mm.max() <= magnitude + 1e-4
    assert mm.reshape(6, -1).max(axis=1).min() > 0.3 * magnitude  # every field is of about that size
    assert metrics.jacobian_determinant(u).min() > 0
    # smooth: neighbouring voxels move by much less than the field itself
    steps = max(np.abs(np.diff(u, axis=a + 1)).max() for a in range(len(shape)))
    assert steps < 0.5 * np.abs(u).max()


@pytest.mark.parametrize("ndim", [2, 3])
def test_large_magnitudes_are_composed_of_injective_steps(ndim):
    shape = (48, 40) if ndim == 2 else (24, 28, 20)
    d = SyntheticDeformation(shape, 1.0, magnitude=6.0, spacing=6.0)
    bound = INJECTIVITY_BOUND[ndim] * 6
    assert d.squarings() == int(np.ceil(np.log2(6.0 / (0.95 * bound))))
    u = d.fields(stream_key(0, TRAIN, 1), 3).numpy()
    assert metrics.jacobian_determinant(u).min() > 0
    assert np.abs(u).max() <= 6.0 + 1e-4
    assert np.abs(u).max() > bound  # larger than one bounded B-spline could be


def test_seeds_are_reproducible_and_evaluation_fields_are_held_out():
    # catches: test fields equal to training fields (the same random key), a stream that depends on
    # anything but (seed, step), evaluation pairs that change with the set size
    shape = (24, 24)
    images = _blobs(2, shape)
    d = SyntheticDeformation(shape, 1.0, 4.0, 12.0, gamma=0.1, scale=0.1, noise=0.01)
    sample = synthetic_pair_sampler(images, 2, seed=7, deformation=d)
    a, b = sample(tf.constant(3, tf.int64)), sample(tf.constant(3, tf.int64))
    np.testing.assert_array_equal(a["fixed"].numpy(), b["fixed"].numpy())
    assert set(a) == {"fixed", "moving"}
    other = synthetic_pair_sampler(images, 2, seed=8, deformation=d)(tf.constant(3, tf.int64))
    assert not np.allclose(a["fixed"].numpy(), other["fixed"].numpy())
    train_fields = np.concatenate([d.fields(stream_key(0, TRAIN, i), 1).numpy() for i in range(4)])
    test = synthetic_evaluation_pairs(images, 4, 0, d, TEST)
    valid = synthetic_evaluation_pairs(images, 4, 0, d, VALID)
    for field in test["displacement"]:
        assert min(np.abs(field - t).max() for t in train_fields) > 0.1
        assert min(np.abs(field - v).max() for v in valid["displacement"]) > 0.1
    again = synthetic_evaluation_pairs(images, 2, 0, d, TEST)
    for key in ("fixed", "moving", "displacement", "index"):
        np.testing.assert_array_equal(again[key], test[key][:2])


def test_intensity_changes():
    shape = (20, 20, 16)
    images = _blobs(1, shape)
    clean = SyntheticDeformation(shape, 2.0, 0.0, 16.0)
    out = clean.pairs(tf.constant(images), stream_key(0, TRAIN, 0), 2)
    np.testing.assert_allclose(out["fixed"].numpy(), out["moving"].numpy(), atol=1e-6)  # magnitude 0
    changed = SyntheticDeformation(shape, 2.0, 0.0, 16.0, gamma=0.3, scale=0.2, noise=0.02)
    out = changed.pairs(tf.constant(images), stream_key(0, TRAIN, 0), 2)
    fixed, moving = out["fixed"].numpy(), out["moving"].numpy()
    assert 0.005 < np.abs(fixed - moving).mean() < 0.2
    assert np.isfinite(fixed).all() and metrics.ncc(fixed[0], moving[0]) > 0.6


def test_sampler_runs_in_the_input_pipeline():
    shape = (16, 20)
    d = SyntheticDeformation(shape, 1.0, 3.0, 8.0, augment=1.0, noise=0.01)
    sample = synthetic_pair_sampler(_blobs(1, shape), 3, seed=1, deformation=d)
    batch = next(make_input_iterator(sample, 3, start_step=2))
    np.testing.assert_allclose(batch["fixed"].numpy(), sample(tf.constant(2, tf.int64))["fixed"].numpy(), atol=1e-6)


def test_endpoint_error_in_mm_and_inside_a_mask():
    true = np.zeros((2, 6, 5, 2), np.float32)
    pred = true.copy()
    pred[0, ..., 0] = 1.0  # one voxel along axis 0 = 2 mm
    pred[1, :3, :, 1] = 2.0  # two voxels along axis 1 = 3 mm, in the first half only
    np.testing.assert_allclose(endpoint_error(pred, true, (2.0, 1.5)), [2.0, 1.5])
    mask = np.zeros((6, 5), bool)
    mask[:3] = True
    np.testing.assert_allclose(endpoint_error(pred, true, (2.0, 1.5), mask), [2.0, 3.0])
    assert np.isnan(masked_mean(np.ones((1, 3)), np.zeros((1, 3), bool)))[0]
    with pytest.raises(ValueError, match="differ in shape"):
        endpoint_error(pred[:1], true, 1.0)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="synthetic_magnitude"):
        SyntheticDeformation((8, 8), 1.0, magnitude=-1.0)
    with pytest.raises(ValueError, match="synthetic_spacing"):
        SyntheticDeformation((8, 8), 1.0, spacing=0.0)
    with pytest.raises(ValueError, match="synthetic_scale"):
        SyntheticDeformation((8, 8), 1.0, scale=1.5)
    with pytest.raises(ValueError, match="do not match"):
        synthetic_pair_sampler(np.zeros((1, 9, 8, 1)), 1, 0, SyntheticDeformation((8, 8)))


def test_endpoint_error_against_a_nonzero_true_field_by_hand():
    """``|u_pred - u_true|`` in mm with a true field that is not zero, worked out by hand: a comparison
    against ``-true`` (or ``pred + true``) gives other numbers."""
    true = np.zeros((2, 4, 3, 2), np.float32)
    true[0, ..., 0] = 2.0  # 2 voxels along axis 0
    true[1, ..., 1] = -1.0  # -1 voxel along axis 1
    pred = np.zeros_like(true)
    pred[0, ..., 0] = 1.5  # 0.5 voxel short along axis 0 = 0.5 * 2 mm = 1 mm
    pred[0, ..., 1] = 1.0  # and 1 voxel off along axis 1 = 3 mm: |(1, 3)| = sqrt(10) mm
    pred[1, ..., 1] = -1.0  # exact
    pred[1, :2, :, 0] = 2.0  # 2 voxels off along axis 0 (4 mm) in half of the voxels
    np.testing.assert_allclose(endpoint_error(pred, true, (2.0, 3.0)), [np.sqrt(10.0), 2.0], rtol=1e-12)
    np.testing.assert_allclose(endpoint_error(true, true, (2.0, 3.0)), [0.0, 0.0])
