"""dirnet_tf.pairs: the deterministic samplers (same group, pair list, random) and the input iterator."""

import numpy as np
import pytest
import tensorflow as tf

from dirnet_tf.pair_plans import PairingError, pair_candidates
from dirnet_tf.pairs import make_input_iterator, pair_list_sampler, random_pair_sampler, same_group_pair_sampler


def _blobs(n, seed=0, shape=(16, 16)):
    """``n`` Gaussian blobs at random positions ``[n, H, W, 1]`` and a random group (0..2) of each."""
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    centres = rng.uniform(5, 11, (n, 2))
    widths = rng.uniform(1.5, 3.0, n)
    images = np.exp(-((ii - centres[:, 0, None, None]) ** 2 + (jj - centres[:, 1, None, None]) ** 2)
                    / (2 * widths[:, None, None] ** 2))
    return images[..., None].astype(np.float32), rng.integers(0, 3, n)


def _pairs(array):
    return {tuple(int(v) for v in row) for row in array}


def _tagged(n, spatial=(4, 5)):
    """Images whose pixel 0 holds their index (to recover which images a sampler drew)."""
    rng = np.random.default_rng(n)
    images = rng.uniform(0.0, 1.0, (n, *spatial, 1)).astype(np.float32)
    images[(slice(None),) + (0,) * (len(spatial) + 1)] = np.arange(n)
    return images


def _drawn(batch):
    """(fixed index, moving index) of each pair of a sampler batch of tagged images."""
    f = batch["fixed"].numpy()
    m = batch["moving"].numpy()
    flat = lambda x: x.reshape(x.shape[0], -1)[:, 0].astype(int)  # noqa: E731
    return list(zip(flat(f).tolist(), flat(m).tolist()))


# --------------------------------------------------------------------------- #
# Modes on hand-made layouts
# --------------------------------------------------------------------------- #


def test_same_group_sampler_is_deterministic_per_step():
    images, groups = _blobs(60)
    groups[-1] = 7  # a group of one image can never be paired
    # encode the image index in the pixels to recover which images were drawn
    tagged = images.copy()
    tagged[:, 0, 0, 0] = np.arange(len(images))
    sample = same_group_pair_sampler(tagged, groups, 64, seed=11)
    a = sample(tf.constant(5, tf.int64))
    b = sample(tf.constant(5, tf.int64))
    c = sample(tf.constant(6, tf.int64))
    np.testing.assert_array_equal(a["fixed"].numpy(), b["fixed"].numpy())
    assert not np.array_equal(a["fixed"].numpy(), c["fixed"].numpy())
    seen = set()
    for step in range(20):
        batch = sample(tf.constant(step, tf.int64))
        fi = batch["fixed"].numpy()[:, 0, 0, 0].astype(int)
        mi = batch["moving"].numpy()[:, 0, 0, 0].astype(int)
        assert (groups[fi] == groups[mi]).all()
        assert (fi != mi).all()
        np.testing.assert_array_equal(batch["fixed"].numpy()[:, 1:], images[fi][:, 1:])
        seen.update(fi.tolist())
    assert len(images) - 1 not in seen
    assert len(seen) >= 50  # covers (nearly) every pairable image
    # a resumed stream continues the same sequence
    it = make_input_iterator(sample, 64, start_step=3)
    np.testing.assert_array_equal(next(it)["fixed"].numpy(), sample(tf.constant(3, tf.int64))["fixed"].numpy())
    np.testing.assert_array_equal(next(it)["moving"].numpy(), sample(tf.constant(4, tf.int64))["moving"].numpy())
    with pytest.raises(ValueError, match="no group has two images"):
        same_group_pair_sampler(images[:3], np.arange(3), 4)


def test_pair_list_sampler_is_deterministic_and_draws_only_listed_pairs():
    # catches: a stream that is not a function of (seed, step), pairs outside the list (e.g. a
    # wrong re-indexing of the kept images), fixed/moving swapped, some pairs never drawn
    images = _tagged(12)
    allowed = pair_candidates([None, "a", None, "a", "a", None, "b", "b", None, None, None, None],
                              "within_group", subset=[1, 3, 4, 6, 7])
    assert len(allowed) == 8
    sample = pair_list_sampler(images, allowed, 16, seed=3)
    a, b = sample(tf.constant(5, tf.int64)), sample(tf.constant(5, tf.int64))
    np.testing.assert_array_equal(a["fixed"].numpy(), b["fixed"].numpy())
    np.testing.assert_array_equal(a["moving"].numpy(), b["moving"].numpy())
    assert _drawn(a) != _drawn(sample(tf.constant(6, tf.int64)))
    assert _drawn(a) != _drawn(pair_list_sampler(images, allowed, 16, seed=4)(tf.constant(5, tf.int64)))
    seen = set()
    for step in range(12):
        batch = sample(tf.constant(step, tf.int64))
        drawn = _drawn(batch)
        assert set(drawn) <= _pairs(allowed)
        f = [p[0] for p in drawn]
        np.testing.assert_array_equal(batch["fixed"].numpy(), images[f])  # whole images, not just the tag
        seen.update(drawn)
    assert seen == _pairs(allowed)  # 192 draws of 8 pairs: all appear


def test_samplers_on_3d_images():
    # catches: samplers that assume 2-D images (rank-4 gathers, reshapes)
    images = _tagged(5, spatial=(3, 4, 2))
    pairs = np.array([[0, 4], [4, 0], [2, 3]])
    batch = pair_list_sampler(images, pairs, 8, seed=0)(tf.constant(0, tf.int64))
    assert batch["fixed"].shape == (8, 3, 4, 2, 1) and batch["moving"].shape == (8, 3, 4, 2, 1)
    assert set(_drawn(batch)) <= _pairs(pairs)
    batch = random_pair_sampler(images, 8, seed=0)(tf.constant(0, tf.int64))
    assert batch["moving"].shape == (8, 3, 4, 2, 1)
    drawn = _drawn(batch)
    assert all(f != m for f, m in drawn)
    np.testing.assert_array_equal(batch["moving"].numpy(), images[[m for _, m in drawn]])


def test_random_pair_sampler_draws_distinct_images_and_covers_all_pairs():
    # catches: fixed == moving, an off-by-one that never draws the last image or a pair,
    # a stream that is not a function of (seed, step)
    images = _tagged(4)
    sample = random_pair_sampler(images, 32, seed=9)
    np.testing.assert_array_equal(sample(tf.constant(2, tf.int64))["moving"].numpy(),
                                  sample(tf.constant(2, tf.int64))["moving"].numpy())
    assert _drawn(sample(tf.constant(2, tf.int64))) != _drawn(sample(tf.constant(3, tf.int64)))
    seen = set()
    for step in range(8):
        drawn = _drawn(sample(tf.constant(step, tf.int64)))
        assert all(f != m for f, m in drawn)
        seen.update(drawn)
    assert seen == {(f, m) for f in range(4) for m in range(4) if f != m}


def test_new_samplers_run_inside_tf_data():
    # catches: Python-side logic that breaks when tf.data traces the sampler with a symbolic step
    images = _tagged(6)
    for sample in (pair_list_sampler(images, [[0, 1], [2, 5]], 4, seed=1), random_pair_sampler(images, 4, seed=1)):
        it = make_input_iterator(sample, 4, start_step=7)
        np.testing.assert_array_equal(next(it)["fixed"].numpy(), sample(tf.constant(7, tf.int64))["fixed"].numpy())
        np.testing.assert_array_equal(next(it)["moving"].numpy(), sample(tf.constant(8, tf.int64))["moving"].numpy())


def test_samplers_need_two_images():
    # catches: a sampler built from one image (endless self-registration or a crash in TF)
    with pytest.raises(PairingError, match="--pairs=random needs at least two usable images, got 1"):
        random_pair_sampler(_tagged(1), 4)
    with pytest.raises(PairingError, match="the pair list is empty"):
        pair_list_sampler(_tagged(3), np.zeros((0, 2), int), 4)
