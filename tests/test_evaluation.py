"""dirnet_tf.evaluation: the scores every experiment reports, against hand-computed values."""

import numpy as np
import pytest
import tensorflow as tf

from dirnet_tf import evaluation, metrics
from dirnet_tf.warping import warp


def shifting_model(shift):
    """A stand-in for an export's signature: a constant displacement ``shift`` (voxels, ij)."""
    shift = np.asarray(shift, np.float32)

    def fn(fixed, moving):
        disp = tf.broadcast_to(tf.constant(shift), tf.concat([tf.shape(fixed)[:-1], [len(shift)]], 0))
        return {"warped": warp(moving, disp), "displacement": disp}

    return fn


def square_images(shape, count, offset):
    """``count`` images holding a bright box, and the same boxes moved by ``offset`` voxels."""
    rng = np.random.default_rng(0)
    fixed = np.zeros((count,) + shape + (1,), np.float32)
    moving = np.zeros_like(fixed)
    for n in range(count):
        lo = [s // 4 + int(rng.integers(0, 2)) for s in shape]
        box = tuple(slice(a, a + s // 3) for a, s in zip(lo, shape))
        moved = tuple(slice(a + o, a + o + s // 3) for a, o, s in zip(lo, offset, shape))
        fixed[(n,) + box] = 1.0
        moving[(n,) + moved] = 1.0
    return fixed + 0.1, moving + 0.1


@pytest.mark.parametrize("shape", [(24, 20), (12, 14, 10)])
def test_a_shift_that_undoes_the_motion_scores_perfectly(shape):
    offset = (2,) + (1,) * (len(shape) - 1)
    fixed, moving = square_images(shape, 3, offset)
    spacing = (1.5,) + (0.5,) * (len(shape) - 1)
    labels = ((fixed[..., 0] > 0.5).astype(np.int32), (moving[..., 0] > 0.5).astype(np.int32))
    result, pred = evaluation.evaluate_pairs(shifting_model(offset), fixed, moving, spacing=spacing, labels=labels,
                                             batch_size=2, timing_batch_size=2)
    np.testing.assert_allclose(pred["warped"], fixed, atol=1e-6)
    assert result["pairs"] == 3
    np.testing.assert_allclose(result["ncc_after"], 1.0, atol=1e-6)
    np.testing.assert_allclose(result["ncc_before"], np.mean(metrics.ncc(fixed, moving, batched=True)))
    assert result["ncc_before"] < 0.9
    assert result["folding_fraction"] == 0 and result["pairs_with_folding"] == 0
    length = np.linalg.norm(offset)
    np.testing.assert_allclose(result["mean_displacement_voxels"], length, rtol=1e-6)
    np.testing.assert_allclose(result["mean_displacement_mm"], np.linalg.norm(np.multiply(offset, spacing)),
                               rtol=1e-6)
    # The same constant field both ways composes to twice the shift, not to the identity.
    np.testing.assert_allclose(result["inverse_consistency_px"], 2 * length, rtol=1e-5)
    np.testing.assert_allclose(result["inverse_consistency_mm"], 2 * np.linalg.norm(np.multiply(offset, spacing)),
                               rtol=1e-5)
    # It moves identical images too: the identity check sees it.
    np.testing.assert_allclose(result["identity"]["identical"]["mean_abs_displacement_px"], length, rtol=1e-6)
    assert result["identity"]["half_intensity"]["ncc"] < 0.999
    dice = result["labels"]["1"]
    np.testing.assert_allclose(dice["dice_after"], 1.0)
    assert dice["dice_before"] < 0.8 and dice["pairs"] == 3
    assert dice["hd95_mm_after"] == 0 and dice["mad_mm_after"] == 0
    assert result["ms_per_pair"] > 0 and result["timing_batch_size"] == 2


def test_a_model_that_does_nothing_is_consistent_and_the_identity():
    fixed, moving = square_images((16, 16), 2, (1, 0))
    result, pred = evaluation.evaluate_pairs(shifting_model((0.0, 0.0)), fixed, moving)
    np.testing.assert_allclose(result["ncc_after"], result["ncc_before"], atol=1e-6)
    assert result["inverse_consistency_px"] == 0
    for check in result["identity"].values():
        assert check["mean_abs_displacement_px"] == 0
        np.testing.assert_allclose(check["ncc"], 1.0, atol=1e-6)
    assert "mean_displacement_mm" not in result and "labels" not in result
    np.testing.assert_array_equal(pred["folding"], 0)


def test_optional_parts_can_be_left_out():
    fixed, moving = square_images((16, 16), 2, (1, 0))
    result, _ = evaluation.evaluate_pairs(shifting_model((1.0, 0.0)), fixed, moving, inverse=False, identity=False)
    assert "inverse_consistency_px" not in result and "identity" not in result


def test_displacement_length_is_the_mean_length_not_the_length_of_the_mean():
    """A field of opposite signs in two halves: every voxel moves 2 voxels (3 mm), the mean field is 0."""
    disp = np.zeros((1, 8, 6, 2), np.float32)
    disp[0, :4, :, 1] = 2.0
    disp[0, 4:, :, 1] = -2.0
    images = np.random.default_rng(0).random((1, 8, 6, 1)).astype(np.float32)
    result, _ = evaluation.field_scores(images, images, images, disp, spacing=(1.0, 1.5))
    assert result["mean_displacement_voxels"] == pytest.approx(2.0)
    assert result["max_displacement_voxels"] == pytest.approx(2.0)
    assert result["mean_displacement_mm"] == pytest.approx(3.0)
