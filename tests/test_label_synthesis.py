"""dirnet_tf.label_synthesis: images follow their label maps, geometry, seeded and held-out streams."""

import numpy as np
import pytest
import tensorflow as tf

from dirnet_tf import label_synthesis as ls
from dirnet_tf.synthetic import TEST, TRAIN, VALID, stream_key

KEY = tf.constant([3, 4], tf.int64)


def _labels(shape, k=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, k, (2,) + shape).astype(np.int32)


@pytest.mark.parametrize("shape", [(12, 10), (8, 9, 7)])
def test_without_texture_and_degradations_each_label_is_one_intensity(shape):
    labels = _labels(shape)
    settings = ls.SynthesisSettings()
    image = ls.synthesize_images(labels, KEY, 4, 2.0, settings, stages=()).numpy()[..., 0]
    keys = tf.random.experimental.stateless_split(KEY, 10)
    means = ls.draw_intensities(keys[0], 2, 4, settings)[0].numpy()
    for b in range(2):
        expected = means[b][labels[b]]
        expected = (expected - expected.min()) / (expected.max() - expected.min())  # the rescaling to [0, 1]
        np.testing.assert_allclose(image[b], expected, atol=1e-6)


def test_texture_keeps_the_label_means_and_spreads():
    """With texture, every label's voxels have its drawn mean and standard deviation, up to the final
    rescaling to [0, 1] (an increasing affine map: it keeps the order of the means and the ratio of a
    standard deviation to a difference of means)."""
    shape = (24, 24, 24)
    labels = np.stack([np.repeat(np.arange(4), 6)[:, None, None] * np.ones(shape, np.int32)] * 2)
    settings = ls.SynthesisSettings(texture=0.05, dark_background=0.0)
    image = ls.synthesize_images(labels, KEY, 4, 2.0, settings, stages={"texture"}).numpy()[..., 0]
    means, stds = (v.numpy() for v in ls.draw_intensities(tf.random.experimental.stateless_split(KEY, 10)[0], 2, 4,
                                                           settings))
    for b in range(2):
        got_means = np.array([image[b][labels[b] == k].mean() for k in range(4)])
        got_stds = np.array([image[b][labels[b] == k].std() for k in range(4)])
        assert list(np.argsort(got_means)) == list(np.argsort(means[b]))
        lo, hi = np.argmin(means[b]), np.argmax(means[b])
        scale = (got_means[hi] - got_means[lo]) / (means[b][hi] - means[b][lo])
        np.testing.assert_allclose(got_stds / scale, stds[b], rtol=0.1, atol=2e-3)  # 3456 voxels per label
        np.testing.assert_allclose((got_means - got_means[lo]) / scale, means[b] - means[b][lo], atol=5e-3)


def test_dark_background_and_intensity_ranges():
    settings = ls.SynthesisSettings(dark_background=1.0)
    means, stds = ls.draw_intensities(KEY, 50, 5, settings)
    assert np.all(means.numpy()[:, 0] == 0) and np.all(stds.numpy()[:, 0] == 0)
    means = ls.draw_intensities(KEY, 400, 5, ls.SynthesisSettings(dark_background=0.5))[0].numpy()
    assert 0.35 < np.mean(means[:, 0] == 0) < 0.65
    assert 0 <= means.min() and means.max() <= 1
    full = ls.synthesize_images(_labels((16, 14, 12)), KEY, 4, 2.0, ls.SynthesisSettings()).numpy()
    assert full.shape == (2, 16, 14, 12, 1) and full.min() >= 0 and full.max() <= 1 + 1e-6


def test_blur_and_thick_slices():
    image = tf.random.stateless_uniform((1, 20, 18, 1), KEY)
    same = ls.gaussian_blur(image, tf.constant([1e-4, 1e-4]), 3)
    np.testing.assert_allclose(same.numpy(), image.numpy(), atol=1e-6)
    constant = ls.gaussian_blur(tf.ones((1, 20, 18, 1)), tf.constant([1.5, 0.7]), 5)
    np.testing.assert_allclose(constant.numpy(), 1.0, rtol=1e-5)
    blurred = ls.gaussian_blur(image, tf.constant([1.5, 1.5]), 5).numpy()
    assert blurred.std() < 0.6 * image.numpy().std()
    thick = ls._thick_slices(image, 0, tf.constant(3), tf.constant(1)).numpy()
    np.testing.assert_allclose(thick[:, 1::3], image.numpy()[:, 1::3], atol=1e-6)  # the acquired slices
    np.testing.assert_allclose(thick[:, 2], (2 * image.numpy()[:, 1] + image.numpy()[:, 4]) / 3, atol=1e-6)
    np.testing.assert_allclose(ls._thick_slices(image, 1, tf.constant(1), tf.constant(0)).numpy(), image.numpy())


@pytest.mark.parametrize("shape", [(12, 10), (8, 9, 7)])
def test_deform_labels_nearest_and_zero_outside(shape):
    labels = tf.constant(_labels(shape, 5))
    ndim = len(shape)
    grid = tf.stack(tf.meshgrid(*[tf.range(n, dtype=tf.float32) for n in shape], indexing="ij"), -1)[None]
    grid = tf.tile(grid, [2] + [1] * (ndim + 1))
    np.testing.assert_array_equal(ls.deform_labels(labels, grid + 0.3).numpy(), labels.numpy())
    shift = np.zeros(ndim, np.float32)
    shift[0] = 2
    moved = ls.deform_labels(labels, grid + shift).numpy()
    np.testing.assert_array_equal(moved[:, :-2], labels.numpy()[:, 2:])
    assert np.all(moved[:, -2:] == 0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_affine_within_its_ranges(ndim):
    settings = ls.SynthesisSettings(rotation_deg=10, scale=0.1, shear=0.0, translation_mm=6)
    matrix, translation = ls.random_affine(KEY, 64, ndim, [2.0] * ndim, settings)
    det = np.linalg.det(matrix.numpy())
    assert np.all(det > 1.1 ** -ndim - 1e-5) and np.all(det < 1.1 ** ndim + 1e-5)
    assert np.abs(translation.numpy()).max() <= 3.0 + 1e-6  # 6 mm / 2 mm voxels
    eye, zero = ls.random_affine(KEY, 3, ndim, [2.0] * ndim, ls.SynthesisSettings(
        rotation_deg=0, scale=0, shear=0, translation_mm=0))
    np.testing.assert_allclose(eye.numpy(), np.broadcast_to(np.eye(ndim), (3, ndim, ndim)), atol=1e-6)
    assert np.all(zero.numpy() == 0)
    # anisotropic voxels: a rotation in mm is not a rotation in voxels, but D M D^-1 is
    m, _ = ls.random_affine(KEY, 4, ndim, [1.0] + [3.0] * (ndim - 1), ls.SynthesisSettings(
        scale=0, shear=0, translation_mm=0))
    d = np.diag([1.0] + [3.0] * (ndim - 1))
    mm = d @ m.numpy() @ np.linalg.inv(d)
    np.testing.assert_allclose(mm @ np.swapaxes(mm, 1, 2), np.broadcast_to(np.eye(ndim), mm.shape), atol=1e-5)


def test_identity_settings_give_the_grid():
    settings = ls.SynthesisSettings(rotation_deg=0, scale=0, shear=0, translation_mm=0, coarse_magnitude_mm=0,
                                    fine_magnitude_mm=0)
    synth = ls.PairSynthesizer(None, [1.0], (8, 9, 7), 2.0, 4, settings)
    pos = synth.positions(KEY, 2).numpy()
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (8, 9, 7)], indexing="ij"), -1)
    np.testing.assert_allclose(pos, np.broadcast_to(grid, pos.shape), atol=1e-4)


def _synth(shape=(16, 18, 14)):
    maps = np.stack([_labels(shape, 4, seed=5)[0], _labels(shape, 4, seed=6)[0]])
    return ls.PairSynthesizer(maps, [0.4, 0.3, 0.3], shape, 4.0, 6, names=["a", "b"])


def test_pairs_follow_their_label_maps_and_shapes_are_made():
    synth = _synth()
    out = synth.pair(KEY, 6)
    assert out["fixed"].shape == (6, 16, 18, 14, 1) and out["fixed_labels"].shape == (6, 16, 18, 14)
    sources = out["source"].numpy()
    for b, source in enumerate(sources):
        values = set(np.unique(out["fixed_labels"][b].numpy()))
        assert values <= set(range(6 if source == 2 else 4))
    shapes = ls.random_shapes(KEY, 2, (20, 22, 18), 6).numpy()
    assert shapes[:, 0, 0, 0].tolist() == [0, 0] and set(np.unique(shapes)) == set(range(6))
    assert ls.random_shapes(KEY, 1, (20, 22), 4).shape == (1, 20, 22)  # 2-D too


def test_streams_are_seeded_and_held_out():
    synth = _synth()
    sample = synth.sampler(seed=7, batch_size=1)
    a, b = sample(tf.constant(3, tf.int64)), sample(tf.constant(3, tf.int64))
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    other = synth.sampler(seed=8, batch_size=1)(tf.constant(3, tf.int64))
    assert not np.array_equal(other["fixed"].numpy(), a["fixed"].numpy())
    valid = synth.evaluation_pairs(7, VALID, 3)
    np.testing.assert_array_equal(synth.evaluation_pairs(7, VALID, 2)["moving"], valid["moving"][:2])
    test = synth.evaluation_pairs(7, TEST, 3)
    train = [sample(tf.constant(i, tf.int64))["fixed"].numpy()[0] for i in range(3)]
    for i in range(3):
        assert not np.array_equal(valid["fixed"][i], test["fixed"][i])
        assert not any(np.array_equal(valid["fixed"][i], t) for t in train)
    # the keys themselves: no training key of the first 200 steps is a validation or test key
    keys = {s: {tuple(stream_key(7, s, i).numpy()) for i in range(200)} for s in (TRAIN, VALID, TEST)}
    assert not keys[TRAIN] & keys[VALID] and not keys[TRAIN] & keys[TEST] and not keys[VALID] & keys[TEST]


def test_bad_arguments():
    with pytest.raises(ValueError, match="probabilities"):
        ls.PairSynthesizer(np.zeros((2, 4, 4, 4), np.int32), [1.0], (4, 4, 4), 1.0, 3)
    with pytest.raises(ValueError, match="label values"):
        ls.PairSynthesizer(np.full((1, 4, 4, 4), 5, np.int32), [1.0, 0.0], (4, 4, 4), 1.0, 3)
    with pytest.raises(ValueError, match="grid"):
        ls.PairSynthesizer(np.zeros((1, 4, 4, 5), np.int32), [1.0, 0.0], (4, 4, 4), 1.0, 3)
