"""dirnet_tf.label_carrying: the corner-weight label carrying gives exactly the one-hot definition."""

import numpy as np
import pytest

from dirnet_tf.label_carrying import carry_labels, carry_labels_one_hot


@pytest.mark.parametrize("boundary", ["border", "zeros"])
@pytest.mark.parametrize("ndim,shape", [(2, (37, 45)), (3, (14, 17, 11))])
@pytest.mark.parametrize("num_labels", [2, 17, 150])
def test_corner_weights_equal_the_one_hot_definition(ndim, shape, num_labels, boundary):
    """Random label maps with many (non-consecutive, some negative) labels, positions inside, on the
    border and outside the map, many exactly on voxels and half-way between (exact ties).

    Plausible bugs caught: ties won by the larger label, a label's corner weights not summed (the
    single heaviest corner wins instead), clamped instead of dropped corners for ``zeros`` (and the
    reverse), 0 not returned where nothing is sampled, an off-by-one corner.
    """
    rng = np.random.default_rng(num_labels + 10 * ndim)
    values = rng.choice(np.arange(-5, 4 * num_labels), num_labels, replace=False)
    labels = values[rng.integers(0, num_labels, shape)]
    if num_labels > 2:  # blocks of one label as well as salt and pepper
        labels[: shape[0] // 3] = values[0]
    count = 4000 if ndim == 2 else 6000
    positions = np.stack([rng.uniform(-2.5, n + 1.5, count) for n in shape])
    positions[:, : count // 4] = np.round(positions[:, : count // 4] * 2) / 2  # voxels and half-way points
    got = carry_labels(labels, positions, boundary)
    expected = carry_labels_one_hot(labels, positions, boundary)
    assert got.dtype == np.int64 and got.shape == (count,)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got)) > min(num_labels, 10) // 2
    if boundary == "zeros":
        far = np.any((positions < -1) | (positions > np.asarray(shape)[:, None]), axis=0)
        assert far.any() and np.all(got[far] == 0)  # nothing sampled


def test_hand_computed_weights_and_ties():
    """2-D cell with corners 7, 3 / 3, 9: label 3 holds two corners, so it wins at the cell centre
    (0.5 against 0.25 each); on the edge between 7 and 3 the two tie and the smaller label (3)
    wins; a nested output shape is kept."""
    labels = np.array([[7, 3], [3, 9]])
    positions = np.array([[[0.5, 0.0, 0.1], [0.0, 0.0, 1.0]], [[0.5, 0.5, 0.0], [0.9, 0.0, 1.0]]])
    got = carry_labels(labels, positions)
    np.testing.assert_array_equal(got, [[3, 3, 7], [3, 7, 9]])
    np.testing.assert_array_equal(got, carry_labels_one_hot(labels, positions))
