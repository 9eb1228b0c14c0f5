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
    batch = metrics.ncc(np.stack([a, a, a]), np.stack([3 * a - 7, -a, np.ones_like(a)]), batched=True)
    np.testing.assert_allclose(batch, [1.0, -1.0, 0.0], atol=1e-12)
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


def _collapse_and_fold_field():
    """An 8x6 field whose finite-difference det J is exactly 0 on a known block.

    Only ``u_0`` is non-zero, so ``J = [[1 + du0/di, du0/dj], [0, 1]]`` and
    ``det J = 1 + du0/di`` exactly, whatever ``du0/dj`` is.

    * columns 1-2: ``u_0 = -clip(i, 2, 5)``, i.e. rows 0..7 hold
      ``[-2, -2, -2, -3, -4, -5, -5, -5]``; ``np.gradient`` along i gives
      ``[0, 0, -0.5, -1, -1, -0.5, 0, 0]`` (halves and integers: exact in
      float), so det J = ``[1, 1, 0.5, 0, 0, 0.5, 1, 1]``: rows 3-4 collapse
      (``x_0 + u_0 = 2 + ...`` stays put), det exactly 0 at 2 x 2 = 4 pixels;
    * column 5: ``u_0 = -2 i`` maps ``i -> -i``: det J = -1 at all 8 pixels;
    * columns 0, 3, 4: identity, det 1.

    Returns
    -------
    ``(u [8, 6, 2], det [8, 6])``, the second written out by hand.
    """
    i = np.arange(8.0)
    u = np.zeros((8, 6, 2))
    u[:, 1:3, 0] = -np.clip(i, 2, 5)[:, None]
    u[:, 5, 0] = -2 * i
    det_by_hand = np.ones((8, 6))
    det_by_hand[:, 1:3] = np.array([1, 1, 0.5, 0, 0, 0.5, 1, 1])[:, None]
    det_by_hand[:, 5] = -1.0
    return u, det_by_hand


def test_folding_counts_det_exactly_zero():
    """``folding_fraction`` counts ``det J == 0`` as folding (``det <= 0``).

    Plausible bugs caught: ``det < 0`` instead of ``det <= 0`` (collapsed
    pixels, where the transform is not invertible, slip through: 8/48 instead
    of 12/48), or a tolerance such as ``det <= 1e-3`` turned into ``det < -tol``.
    """
    u, det_by_hand = _collapse_and_fold_field()
    det = metrics.jacobian_determinant(u)
    np.testing.assert_array_equal(det, det_by_hand)  # exactly 0 where the hand says so
    assert int((det_by_hand == 0).sum()) == 4 and int((det_by_hand < 0).sum()) == 8
    # Hand count: 4 collapsed + 8 folded pixels of 48.
    assert metrics.folding_fraction(u) == 12 / 48
    # Batched, next to an identity field (no folding at all).
    np.testing.assert_array_equal(metrics.folding_fraction(np.stack([u, np.zeros_like(u)])), [12 / 48, 0.0])
    # Only collapsed pixels, no negative determinant: still folding.
    collapsed = u.copy()
    collapsed[:, 5] = 0.0
    assert metrics.folding_fraction(collapsed) == 4 / 48


# Anisotropic pixels: 2 mm between rows, 0.5 mm between columns.
ROW_MM, COL_MM = 2.0, 0.5


def _mm(di, dj):
    return math.hypot(ROW_MM * di, COL_MM * dj)


def anisotropic_square_cases():
    """Two hand-worked mask pairs on a 10x12 grid and their pooled surface distances (mm).

    Case "squares": 2x2 square A at rows 1-2, cols 1-2 and 2x2 square B at rows
    2-3, cols 3-4 (offset (+1, +2) pixels).  A 2x2 square is all surface.
    Nearest surface pixel of the other square (offset in pixels -> mm with
    2 mm rows, 0.5 mm columns):

    * A -> B: (1,1)->(2,3): (1,2) sqrt(4+1); (1,2)->(2,3): (1,1) sqrt(4+.25);
      (2,1)->(2,3): (0,2) 1.0; (2,2)->(2,3): (0,1) 0.5;
    * B -> A: (2,3)->(2,2): 0.5; (2,4)->(2,2): 1.0; (3,3)->(2,2): (1,1)
      sqrt(4.25); (3,4)->(2,2): (1,2) sqrt(5).

    Case "ring": 3x3 block A at rows 4-6, cols 0-2 -- its surface is the ring of
    8, the centre (5, 1) is interior -- and the single pixel B = (5, 5).

    * A ring -> B: rows 4 and 6, cols 0/1/2: (1,5) sqrt(4+6.25), (1,4)
      sqrt(4+4), (1,3) sqrt(4+2.25) = 2.5 (twice each); row 5: (5,0) -> (0,5)
      2.5, (5,2) -> (0,3) 1.5;
    * B -> A ring: nearest is (5, 2), (0,3) 1.5.

    Returns
    -------
    dict name -> ``(mask_a, mask_b, hand-listed pooled distances in mm)``.
    """
    sq_a = np.zeros((10, 12), bool)
    sq_b = np.zeros((10, 12), bool)
    sq_a[1:3, 1:3] = True
    sq_b[2:4, 3:5] = True
    sq_d = [_mm(1, 2), _mm(1, 1), _mm(0, 2), _mm(0, 1),  # A -> B
            _mm(0, 1), _mm(0, 2), _mm(1, 1), _mm(1, 2)]  # B -> A
    ring_a = np.zeros((10, 12), bool)
    ring_b = np.zeros((10, 12), bool)
    ring_a[4:7, 0:3] = True
    ring_b[5, 5] = True
    ring_d = [_mm(1, 5), _mm(1, 4), _mm(1, 3), _mm(0, 5), _mm(0, 3), _mm(1, 5), _mm(1, 4), _mm(1, 3),
              _mm(0, 3)]
    return {"squares": (sq_a, sq_b, sq_d), "ring": (ring_a, ring_b, ring_d)}


def test_hd95_and_mad_anisotropic_spacing_by_hand():
    """HD95 / MAD in mm with unequal row and column spacing, against hand-listed distances.

    Plausible bugs caught: spacing applied in the wrong axis order (x/y swap:
    the "squares" case is not symmetric under it), spacing ignored (pixels
    reported as mm), distances from one direction only, interior pixels
    treated as surface (the ring's centre would add a 2.0 mm distance), or the
    percentile taken on ``d_ab`` and ``d_ba`` separately.
    """
    for name, (a, b, hand) in anisotropic_square_cases().items():
        d_ab, d_ba = metrics.surface_distances(a, b, spacing=(ROW_MM, COL_MM))
        np.testing.assert_allclose(np.sort(np.concatenate([d_ab, d_ba])), np.sort(hand), err_msg=name)
        assert metrics.hd95(a, b, spacing=(ROW_MM, COL_MM)) == pytest.approx(np.percentile(hand, 95)), name
        assert metrics.mad(a, b, spacing=(ROW_MM, COL_MM)) == pytest.approx(np.mean(hand)), name
        # Symmetric in its arguments.
        assert metrics.hd95(b, a, spacing=(ROW_MM, COL_MM)) == pytest.approx(np.percentile(hand, 95)), name
        # The swapped spacing is a different geometry (so a swap bug cannot pass).
        assert metrics.mad(a, b, spacing=(COL_MM, ROW_MM)) != pytest.approx(np.mean(hand)), name


def test_inverse_consistency_by_hand():
    """A translation and its inverse compose to 0; a translation with itself to twice the shift
    (a sign error in the composition would swap the two); mm with anisotropic spacing."""
    shape = (12, 10)
    t = np.zeros(shape + (2,))
    t[..., 0], t[..., 1] = 1.5, -0.5
    assert metrics.inverse_consistency(t, -t) == pytest.approx(0.0, abs=1e-12)
    assert metrics.inverse_consistency(t, t) == pytest.approx(2 * np.hypot(1.5, 0.5))
    assert metrics.inverse_consistency(t, t, spacing=(2.0, 1.0)) == pytest.approx(2 * np.hypot(3.0, 0.5))
    # A linear field u(x) = a x (scaling by 1 + a) is undone by v(y) = -a / (1 + a) y exactly,
    # where the composed position stays inside the grid.
    ii = np.arange(shape[0], dtype=float)[:, None] * np.ones(shape)
    a = 0.1
    u = np.stack([a * ii, np.zeros(shape)], -1)
    v = np.stack([-a / (1 + a) * ii, np.zeros(shape)], -1)
    batch = metrics.inverse_consistency(np.stack([u, t]), np.stack([v, -t]))
    assert batch.shape == (2,) and batch[1] == pytest.approx(0.0, abs=1e-12)
    # Rows whose image x + u(x) leaves the grid see v clamped at the edge: exact inside only.
    assert batch[0] < 0.05
