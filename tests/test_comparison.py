"""dirnet_tf.comparison: cycle consistency, masked scores, per-gap tables, scores of any method's field."""

import numpy as np

from dirnet_tf import comparison


def test_cycle_residual_of_translations():
    """A translation and its inverse give 0; two equal translations give twice the shift."""
    shift = np.array([1.5, -2.0], np.float32)
    forward = np.broadcast_to(shift, (2, 16, 20, 2)).copy()
    spacing = (2.0, 0.5)
    zero = comparison.cycle_residual(forward, -forward, spacing=spacing)
    np.testing.assert_allclose(zero["pixels"], 0, atol=1e-6)
    np.testing.assert_allclose(zero["mm"], 0, atol=1e-6)
    twice = comparison.cycle_residual(forward, forward, spacing=spacing)
    np.testing.assert_allclose(twice["pixels"], 2 * np.linalg.norm(shift), rtol=1e-6)
    np.testing.assert_allclose(twice["mm"], 2 * np.linalg.norm(shift * np.array(spacing)), rtol=1e-6)
    # One pair ([H, W, 2]) and a mask: the mean is over the masked pixels only.
    mask = np.zeros((16, 20), bool)
    mask[4:8, 5:9] = True
    one = comparison.cycle_residual(forward[0], 0.5 * forward[0], mask=mask)
    np.testing.assert_allclose(one["pixels"], [1.5 * np.linalg.norm(shift)], rtol=1e-6)


def test_cycle_residual_of_a_contraction_and_its_exact_inverse():
    """x -> c + s (x - c) and y -> c + (y - c) / s compose to the identity (linear fields are
    interpolated exactly), so the residual is 0 where the round trip stays inside the grid."""
    h, w, s = 24, 30, 0.8
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    grid = np.stack(np.mgrid[:h, :w], axis=-1).astype(np.float64)
    forward = ((s - 1) * (grid - centre))[None].astype(np.float32)
    backward = ((1 / s - 1) * (grid - centre))[None].astype(np.float32)
    inner = np.zeros((h, w), bool)
    inner[4:-4, 4:-4] = True
    np.testing.assert_allclose(comparison.cycle_residual(forward, backward, mask=inner)["pixels"], 0, atol=1e-4)
    # The other order is inconsistent by |(s - 1) + (1/s - 1)| times the distance to the centre.
    wrong = comparison.cycle_residual(forward, forward, mask=inner)["pixels"][0]
    expected = np.linalg.norm(((s - 1) * (2 + (s - 1))) * (grid - centre), axis=-1)[inner].mean()
    np.testing.assert_allclose(wrong, expected, rtol=1e-4)


def test_reverse_pairs_and_scores_by_gap():
    pairs = np.array([[0, 1], [1, 0], [2, 4], [1, 2], [4, 2]])
    forward, backward = comparison.reverse_pair_indices(pairs)
    assert forward == [0, 1, 2, 4] and backward == [1, 0, 4, 2]
    table = comparison.scores_by_gap(pairs, ncc=[0.1, 0.3, 0.5, 0.7, 0.9])
    assert table == {"1": {"pairs": 3, "ncc": np.mean([0.1, 0.3, 0.7])}, "2": {"pairs": 2, "ncc": 0.7}}


def test_masked_scores_of_identity_fields():
    """Zero fields: the warped image is the fixed one (NCC 1), no folding, a zero cycle residual."""
    rng = np.random.default_rng(0)
    fixed = rng.random((2, 12, 14, 1)).astype(np.float32)
    mask = np.zeros((12, 14), bool)
    mask[2:10, 3:11] = True
    zero = np.zeros((2, 12, 14, 2), np.float32)
    summary, per_pair = comparison.masked_registration_scores(fixed, fixed, zero, mask, (2.0, 2.0), [[0, 1], [1, 0]])
    np.testing.assert_allclose(per_pair["ncc"], 1, atol=1e-5)
    assert summary["folding_fraction"] == summary["folding_fraction_sector"] == 0
    assert summary["cycle_pairs"] == 2 and summary["cycle_residual_mm"] == 0
    assert summary["mean_displacement_sector_mm"] == 0
    np.testing.assert_allclose(comparison.masked_ncc(fixed, fixed[::-1], mask),
                               [np.corrcoef(fixed[0, ..., 0][mask], fixed[1, ..., 0][mask])[0, 1]] * 2, rtol=1e-4)


def test_warp_and_score_carries_the_moving_mask():
    """A one-voxel shift: the warped image is the moving one shifted back, and so is its mask (Dice 1)."""
    fixed_mask = np.zeros((1, 10, 12), bool)
    fixed_mask[0, 3:7, 4:9] = True
    moving_mask = np.roll(fixed_mask, 1, axis=1)  # the moving object sits one row further down
    fixed, moving = fixed_mask[..., None].astype(np.float32), moving_mask[..., None].astype(np.float32)
    shift = np.zeros((1, 10, 12, 2), np.float32)
    shift[..., 0] = 1.0  # warped(x) = moving(x + (1, 0))
    scores, warped = comparison.warp_and_score(fixed, moving, shift, (2.0, 2.0), fixed_mask=fixed_mask,
                                               moving_mask=moving_mask)
    np.testing.assert_allclose(warped[0, :9, ..., 0], moving[0, 1:, ..., 0])
    assert scores["brain_dice_before"] < 0.8 and scores["brain_dice_after"] == 1.0
    assert scores["ncc_after"] > scores["ncc_before"] and scores["folding_fraction"] == 0
    np.testing.assert_allclose(scores["mean_displacement_mm"], 2.0)
