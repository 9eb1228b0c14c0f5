"""dirnet_tf.label_losses: soft Dice / one-hot MSE against numpy, gradients by finite differences."""

import numpy as np
import pytest
import tensorflow as tf

from dirnet_tf import label_losses
from dirnet_tf.model import DIRNet


def _np_soft_dice(f, w, labels=None, eps=1e-6):
    f, w = np.asarray(f, np.float64), np.asarray(w, np.float64)
    if labels is not None:
        f, w = f[..., labels], w[..., labels]
    out = []
    for a, b in zip(f, w):
        scores = []
        for k in range(a.shape[-1]):
            size = a[..., k].sum() + b[..., k].sum()
            if size > 0:
                scores.append((2 * (a[..., k] * b[..., k]).sum() + eps) / (size + eps))
        out.append(np.mean(scores) if scores else 1.0)
    return np.array(out)


def _np_carry(labels, u, k):
    """One-hot of labels, sampled multilinearly at x + u (edge-clamped), numpy."""
    from scipy import ndimage

    out = []
    for lab, disp in zip(labels, u):
        onehot = np.eye(k)[lab]
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in lab.shape], indexing="ij"), -1) + disp
        coords = [grid[..., d] for d in range(lab.ndim)]
        out.append(np.stack([ndimage.map_coordinates(onehot[..., c], coords, order=1, mode="nearest")
                             for c in range(k)], -1))
    return np.stack(out)


def _maps(rng, shape, k, b=2):
    fixed = np.eye(k)[rng.integers(0, k, (b,) + shape)]
    warped = rng.uniform(size=(b,) + shape + (k,))
    warped /= warped.sum(-1, keepdims=True)
    return fixed.astype(np.float32), warped.astype(np.float32)


@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 6)])
@pytest.mark.parametrize("compiled", [False, True])
def test_soft_dice_and_mse_match_numpy(shape, compiled):
    rng = np.random.default_rng(0)
    fixed, warped = _maps(rng, shape, 4)
    fixed[1, ..., 3] = 0  # label 3 absent from pair 1's fixed map ...
    warped[1, ..., 3] = 0  # ... and from its warped map: left out of that pair's mean
    dice = tf.function(label_losses.soft_dice) if compiled else label_losses.soft_dice
    mse = tf.function(label_losses.one_hot_mse_loss) if compiled else label_losses.one_hot_mse_loss
    np.testing.assert_allclose(dice(fixed, warped).numpy(), _np_soft_dice(fixed, warped), rtol=1e-5)
    np.testing.assert_allclose(dice(fixed, warped, [1, 2, 3]).numpy(), _np_soft_dice(fixed, warped, [1, 2, 3]),
                               rtol=1e-5)
    np.testing.assert_allclose(label_losses.dice_loss(fixed, warped).numpy(), 1 - _np_soft_dice(fixed, warped),
                               rtol=1e-5, atol=1e-6)
    ref = ((fixed[..., 1:] - warped[..., 1:]) ** 2).reshape(2, -1).mean(1)
    np.testing.assert_allclose(mse(fixed, warped, [1, 2, 3]).numpy(), ref, rtol=1e-5)
    # identical one-hot maps: Dice 1, MSE 0; disjoint: Dice 0
    np.testing.assert_allclose(label_losses.soft_dice(fixed, fixed).numpy(), 1.0, rtol=1e-6)
    assert np.all(label_losses.one_hot_mse_loss(fixed, fixed).numpy() == 0)
    shifted = np.roll(fixed, 1, axis=-1)
    np.testing.assert_allclose(label_losses.soft_dice(fixed, shifted).numpy(), 0.0, atol=1e-5)


@pytest.mark.parametrize("shape", [(7, 6), (5, 6, 4)])
def test_carried_labels_match_numpy_interpolation(shape):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (2,) + shape)
    u = rng.uniform(-1.5, 1.5, (2,) + shape + (len(shape),)).astype(np.float32)
    carried = label_losses.carry_one_hot(labels, u, 3).numpy()
    np.testing.assert_allclose(carried, _np_carry(labels, u, 3), atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 4)])
@pytest.mark.parametrize("loss", ["dice", "mse"])
@pytest.mark.parametrize("compiled", [False, True])
def test_gradient_in_the_field_matches_finite_differences(shape, loss, compiled):
    rng = np.random.default_rng(2)
    ndim = len(shape)
    fixed = rng.integers(0, 3, (1,) + shape)
    moving = rng.integers(0, 3, (1,) + shape)
    # fractional parts in [0.3, 0.7]: every sample stays inside one interpolation cell under +-eps
    u0 = (rng.integers(-1, 2, (1,) + shape + (ndim,)) + rng.uniform(0.3, 0.7, (1,) + shape + (ndim,)))

    def value(u):
        carried = label_losses.carry_one_hot(moving, u, 3)
        f = label_losses.one_hot(fixed, 3)
        if loss == "dice":
            return tf.reduce_sum(label_losses.dice_loss(f, carried, [1, 2]))
        return tf.reduce_sum(label_losses.one_hot_mse_loss(f, carried, [1, 2]))

    def gradient(u):
        with tf.GradientTape() as tape:
            tape.watch(u)
            out = value(u)
        return tape.gradient(out, u)

    grad_fn = tf.function(gradient) if compiled else gradient
    u = tf.constant(u0, tf.float32)
    g = grad_fn(u).numpy()
    eps = 1e-2
    flat = u0.reshape(-1)
    for index in rng.choice(flat.size, 12, replace=False):
        plus, minus = flat.copy(), flat.copy()
        plus[index] += eps
        minus[index] -= eps
        numeric = (float(value(tf.constant(plus.reshape(u0.shape), tf.float32)))
                   - float(value(tf.constant(minus.reshape(u0.shape), tf.float32)))) / (2 * eps)
        assert g.reshape(-1)[index] == pytest.approx(numeric, rel=2e-2, abs=2e-4)
    assert np.abs(g).max() > 0


def test_label_objective_adds_the_regularisers():
    model = DIRNet((16, 16), 4, stages=("affine", 8, 4), bounded=True, symmetric=True, normalize_inputs=True,
                   bending_weight=0.5, folding_weight=2.0)
    rng = np.random.default_rng(3)
    batch = {"fixed": rng.uniform(size=(2, 16, 16, 1)).astype(np.float32),
             "moving": rng.uniform(size=(2, 16, 16, 1)).astype(np.float32),
             "fixed_labels": rng.integers(0, 4, (2, 16, 16)), "moving_labels": rng.integers(0, 4, (2, 16, 16))}
    outputs = model(batch, training=False)
    total, parts = label_losses.label_objective(model, 4)(batch, outputs)
    assert set(parts) == {"label_loss", "dice", "bending_energy", "folding_penalty"}
    expected = parts["label_loss"] + 0.5 * parts["bending_energy"] + 2.0 * parts["folding_penalty"]
    np.testing.assert_allclose(total.numpy(), expected.numpy(), rtol=1e-6)
    carried = label_losses.carry_one_hot(batch["moving_labels"], outputs["displacement"], 4)
    np.testing.assert_allclose(parts["dice"].numpy(), _np_soft_dice(np.eye(4)[batch["fixed_labels"]],
                                                                     carried.numpy(), [1, 2, 3]), rtol=1e-5)
    _, mse_parts = label_losses.label_objective(model, 4, loss="mse", bending_weight=0, folding_weight=0)(
        batch, outputs)
    assert set(mse_parts) == {"label_loss", "dice"}
    with pytest.raises(ValueError, match="label loss"):
        label_losses.label_objective(model, 4, loss="ncc")
    with pytest.raises(ValueError, match="one-hot"):
        label_losses.soft_dice(np.zeros((1, 4, 4, 2)), np.zeros((1, 4, 4, 3)))
