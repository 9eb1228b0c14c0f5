"""dirnet_tf.pairs: the deterministic same-group pair sampler and the input iterator."""

import numpy as np
import pytest
import tensorflow as tf

from dirnet_tf.pairs import make_input_iterator, same_group_pair_sampler
from test_trainer import _images


def test_same_group_sampler_is_deterministic_per_step():
    images, groups = _images(60)
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
