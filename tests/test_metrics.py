"""Registration metrics on hand-computed cases."""

import math

import numpy as np
import pytest

from dirnet_tf import metrics


def test_ncc_hand_cases():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert metrics.ncc(a, 3 * a - 7) == pytest.approx(1.0)
    assert metrics.ncc(a, -a) == pytest.approx(-1.0)
    # centred: a' = (-1.5, -.5, .5, 1.5), b = (1, 0, 0, 1) -> b' = (.5, -.5, -.5, .5)
    # sum a'b' = -.75 + .25 - .25 + .75 = 0
    assert metrics.ncc(a, np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.0)
    # b = (0, 0, 0, 1): b' = (-.25, -.25, -.25, .75); sum a'b' = .375+.125-.125+1.125 = 1.5
    # |a'|^2 = 5, |b'|^2 = .75 -> 1.5 / sqrt(3.75)
    assert metrics.ncc(a, np.array([[0.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.5 / math.sqrt(3.75))
    assert metrics.ncc(a, np.ones_like(a)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        metrics.ncc(a, a[:1])


def test_dice_hand_cases():
    a = np.array([[1, 1, 0], [0, 2, 2]])
    b = np.array([[1, 0, 0], [2, 2, 0]])
    result = metrics.dice(a, b)
    # label 1: |A|=2, |B|=1, overlap 1 -> 2/3; label 2: |A|=2, |B|=2, overlap 1 -> 1/2
    assert result["per_label"] == {1: pytest.approx(2 / 3), 2: pytest.approx(0.5)}
    assert result["mean"] == pytest.approx((2 / 3 + 0.5) / 2)
    # A requested label absent from both maps scores 1; two empty masks give 1.
    assert metrics.dice(a, b, labels=[1, 3])["per_label"][3] == 1.0
    empty = np.zeros((4, 4), bool)
    assert metrics.dice(empty, empty)["mean"] == 1.0
    assert metrics.dice(empty, ~empty)["mean"] == 0.0
    m = np.zeros((3, 3, 3), bool)
    m[1, 1, :2] = True
    n = np.zeros((3, 3, 3), bool)
    n[1, 1, 1:] = True
    assert metrics.dice(m, n)["mean"] == pytest.approx(0.5)  # 2*1/(2+2)


def test_surface_is_8_and_26_connected_boundary():
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True  # 4x4 block: 12 boundary pixels, 4 inner ones
    surf = metrics.surface(mask)
    assert surf.sum() == 12 and not surf[2:4, 2:4].any()
    # A pixel whose only outside neighbour is diagonal is boundary (8-connectivity).
    plus = np.zeros((5, 5), bool)
    plus[1:4, 1:4] = True
    plus[1, 3] = False  # corner removed: centre (2, 2) now touches it diagonally
    assert metrics.surface(plus)[2, 2]
    # Image-edge pixels count as boundary.
    assert metrics.surface(np.ones((3, 3), bool)).sum() == 8
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert metrics.surface(cube).sum() == 26 and not metrics.surface(cube)[2, 2, 2]


def test_hd95_and_mad_hand_cases():
    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[1, 1] = True
    b[4, 5] = True
    assert metrics.hd95(a, b) == pytest.approx(5.0)
    assert metrics.mad(a, b) == pytest.approx(5.0)
    assert metrics.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(math.sqrt(36 + 16))
    # Two parallel one-pixel lines 3 rows apart: every distance is 3.
    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[2, 0:5] = True
    b[5, 0:5] = True
    assert metrics.hd95(a, b) == pytest.approx(3.0)
    assert metrics.mad(a, b, spacing=0.5) == pytest.approx(1.5)
    # Line of 4 vs its first pixel: distances a->b = 0, 1, 2, 3 and b->a = 0.
    # Pooled sorted [0, 0, 1, 2, 3]: mean 6/5; 95th percentile at index 3.8 -> 2.8.
    a = np.zeros((5, 6), bool)
    b = np.zeros((5, 6), bool)
    a[0, 0:4] = True
    b[0, 0] = True
    d_ab, d_ba = metrics.surface_distances(a, b)
    np.testing.assert_allclose(sorted(d_ab), [0, 1, 2, 3])
    np.testing.assert_allclose(d_ba, [0])
    assert metrics.mad(a, b) == pytest.approx(1.2)
    assert metrics.hd95(a, b) == pytest.approx(2.8)
    # Filled masks: only boundary pixels count. 3x3 block vs the same block
    # shifted by one column: boundary rings, hand-counted distances.
    a = np.zeros((7, 7), bool)
    b = np.zeros((7, 7), bool)
    a[2:5, 1:4] = True
    b[2:5, 2:5] = True
    # a's ring = a minus its centre (3, 2); b's ring = b minus (3, 3).  From a's
    # ring: column 1 (3 px) is 1 away from b's column 2; (3, 3) is b's centre,
    # 1 away from b's ring; the other 4 pixels lie on b's ring.  Symmetric for b.
    d_ab, d_ba = metrics.surface_distances(a, b)
    assert sorted(d_ab.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert sorted(d_ba.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert metrics.mad(a, b) == pytest.approx(0.5)
    # 3-D: two voxels (1, 2, 2) apart -> 3.
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[0, 0, 0] = True
    b[1, 2, 2] = True
    assert metrics.hd95(a, b) == pytest.approx(3.0)
    assert metrics.mad(a, b, spacing=(1, 1, 2)) == pytest.approx(math.sqrt(1 + 4 + 16))


def test_empty_masks():
    empty = np.zeros((5, 5), bool)
    full = np.zeros((5, 5), bool)
    full[2, 2] = True
    assert metrics.hd95(empty, empty) == 0.0 and metrics.mad(empty, empty) == 0.0
    assert metrics.hd95(empty, full) == math.inf and metrics.mad(full, empty) == math.inf
    with pytest.raises(ValueError, match="same shape"):
        metrics.hd95(empty, np.zeros((5, 4), bool))


def test_jacobian_determinant_hand_cases():
    # Linear field u = A x: det(I + A) everywhere (differences are exact).
    x = np.stack(np.meshgrid(np.arange(4.0), np.arange(5.0), indexing="ij"), -1)
    A = np.array([[0.5, 0.25], [0.0, -0.5]])
    u = x @ A.T
    np.testing.assert_allclose(metrics.jacobian_determinant(u), 1.5 * 0.5)
    # Quadratic u_0 = x_0^2 along x_0 = 0..3: np.gradient -> [1, 2, 4, 5] (one-sided edges).
    u = np.zeros((4, 3, 2))
    u[..., 0] = (np.arange(4.0) ** 2)[:, None]
    det = metrics.jacobian_determinant(u)
    np.testing.assert_allclose(det[:, 0], [2, 3, 5, 6])
    # Spacing divides the derivative: same field in mm with 2 mm pixels.
    np.testing.assert_allclose(metrics.jacobian_determinant(u, spacing=(2, 1))[:, 1],
                               [1.5, 2, 3, 3.5])
    # Folding: u_0 = -2 x_0 maps x_0 -> -x_0 (det -1); half the image folded.
    u = np.zeros((2, 6, 4, 2))
    u[0, ..., 0] = -2 * np.arange(6.0)[:, None]
    assert metrics.folding_fraction(u[0]) == 1.0
    np.testing.assert_allclose(metrics.folding_fraction(u), [1.0, 0.0])
    half = np.zeros((6, 4, 2))
    half[:, :2, 1] = -1.5 * np.arange(2.0)  # columns 0..1: d u_1 / d x_1 = -1.5 -> det -0.5
    half[:, 2:, 1] = -1.5  # then constant: gradient at column 1 is (-1.5 - 0) / 2 -> det .25
    det = metrics.jacobian_determinant(half)
    np.testing.assert_allclose(det[0], [-0.5, 0.25, 1.0, 1.0])
    assert metrics.folding_fraction(half) == pytest.approx(0.25)
    # 3-D linear field, batched.
    x = np.stack(np.meshgrid(*[np.arange(3.0)] * 3, indexing="ij"), -1)
    B = np.diag([1.0, -0.5, 0.2])
    u = np.stack([x @ B.T, np.zeros_like(x)])
    np.testing.assert_allclose(metrics.jacobian_determinant(u)[0], 2 * 0.5 * 1.2)
    np.testing.assert_allclose(metrics.jacobian_determinant(u)[1], 1.0)
    with pytest.raises(ValueError, match="displacement"):
        metrics.jacobian_determinant(np.zeros((3, 4, 4, 4, 4, 3)))
