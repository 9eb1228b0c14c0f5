"""benchmarks.elastix_baseline: the command's pair order (the registration is tested in test_elastix.py)."""

import numpy as np

from benchmarks import elastix_baseline as eb


def test_interleave_digits_covers_classes():
    digits = np.repeat([3, 1, 7], 4)
    order = eb.interleave_digits(digits)
    assert sorted(order.tolist()) == list(range(12))
    assert sorted(digits[order[:3]].tolist()) == [1, 3, 7]
    assert sorted(digits[order[3:6]].tolist()) == [1, 3, 7]
