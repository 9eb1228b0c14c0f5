"""Parzen-window mutual information (``losses.mutual_information`` / ``mi_loss``).

The reference below is written from the documented definition alone, in float64
numpy: explicit Gaussian kernels, the joint histogram as a sum over an explicit
``[N, bins, bins]`` tensor (small inputs only) and the MI sum as loops over the bins.
"""

import numpy as np
import pytest
import tensorflow as tf

from dirnet_tf import losses

EPS = 1e-10  # the documented epsilon inside both logarithms


def mi_ref(a, b, bins=32, sigma=None, mask=None, ranges=None):
    """MI (nats) of one pair ``a``, ``b`` ``[*spatial, C]``; ``mask`` ``[*spatial, 1]`` weights.

    ``ranges``: ``((lo_a, hi_a), (lo_b, hi_b))`` to use instead of each image's own
    minimum and maximum over the selected voxels (for the frozen-range derivative).
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    m = np.ones(a.shape) if mask is None else np.broadcast_to(np.asarray(mask, np.float64), a.shape)
    a, b, m = a.ravel(), b.ravel(), m.ravel()
    selected = m > 0
    sigma = 1.0 / (bins - 1) if sigma is None else sigma
    centres = np.array([k / (bins - 1) for k in range(bins)])

    def kernel_weights(x, given):
        lo, hi = given if given is not None else (x[selected].min(), x[selected].max())
        unit = np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)
        # Unselected voxels (weight 0) may lie outside [0, 1]: clipped, only to stay finite.
        unit = np.where(selected, unit, np.clip(unit, 0.0, 1.0))
        k = np.exp(-((unit[:, None] - centres[None, :]) ** 2) / (2 * sigma**2))
        return k / k.sum(axis=1, keepdims=True)

    wa = kernel_weights(a, None if ranges is None else ranges[0])
    wb = kernel_weights(b, None if ranges is None else ranges[1])
    cube = m[:, None, None] * wa[:, :, None] * wb[:, None, :]  # [N, bins, bins]
    p = cube.sum(axis=0) / m.sum()
    pa, pb = p.sum(axis=1), p.sum(axis=0)
    mi = 0.0
    for i in range(bins):
        for j in range(bins):
            mi += p[i, j] * (np.log(p[i, j] + EPS) - np.log(pa[i] * pb[j] + EPS))
    return mi


def related_pair(rng, shape):
    """A pair with shared structure: b is a nonlinear function of a plus noise."""
    a = rng.random(shape)
    b = np.cos(3 * a) + 0.3 * rng.random(shape)
    return a, b


@pytest.mark.parametrize("shape", [(2, 9, 8, 1), (3, 5, 6, 4, 1), (2, 7, 6, 2), (2, 40, 1)])
@pytest.mark.parametrize("bins,sigma", [(32, None), (8, 0.05)])
def test_matches_numpy_reference(shape, bins, sigma):
    """2-D, 3-D, two channels and point samples; with and without a 0/1 and a weight mask."""
    rng = np.random.default_rng(0)
    a, b = related_pair(rng, shape)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    got = losses.mutual_information(a32, b32, bins=bins, sigma=sigma).numpy()
    assert got.shape == (shape[0],) and got.dtype == np.float32
    ref = [mi_ref(a32[i], b32[i], bins, sigma) for i in range(shape[0])]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)
    # Unrelated pairs score lower than related ones (the reference is not trivially constant).
    assert min(ref) > mi_ref(a32[0], rng.random(shape[1:]), bins, sigma)
    mask_shape = shape[:-1] + (1,)
    for mask in ((rng.random(mask_shape) > 0.4).astype(np.float32), rng.random(mask_shape).astype(np.float32)):
        got = losses.mutual_information(a32, b32, bins=bins, sigma=sigma, mask=mask).numpy()
        ref = [mi_ref(a32[i], b32[i], bins, sigma, mask[i]) for i in range(shape[0])]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)


def test_mask_selects_voxels():
    """A 0/1 mask gives the MI of the selected voxels alone (as point samples)."""
    rng = np.random.default_rng(1)
    a, b = related_pair(rng, (1, 6, 7, 5, 1))
    mask = rng.random((1, 6, 7, 5, 1)) > 0.5
    # Put the extremes outside the mask: the intensity range must come from the selected voxels.
    a[~mask] = np.where(rng.random((~mask).sum()) > 0.5, 5.0, -5.0)
    got = losses.mutual_information(a, b, mask=mask.astype(np.float64)).numpy()
    alone = losses.mutual_information(a[mask][None, :, None], b[mask][None, :, None]).numpy()
    np.testing.assert_allclose(got, alone, rtol=1e-9)
    none = losses.mutual_information(a, b, mask=np.zeros(mask.shape))
    np.testing.assert_array_equal(none.numpy(), [0.0])


def finite_difference(fn, x, index, h):
    up, down = x.copy(), x.copy()
    up[index] += h
    down[index] -= h
    return (fn(up) - fn(down)) / (2 * h)


@pytest.mark.parametrize("shape,masked", [((1, 6, 5, 1), False), ((1, 3, 4, 3, 1), True)])
def test_gradient_matches_finite_differences(shape, masked):
    """d MI / d warped (float64) against central differences.

    Voxels that are not the warped image's minimum or maximum: the function itself.
    Every voxel: the reference with the intensity range frozen at its unperturbed
    value, which is the documented gradient (range under ``stop_gradient``).
    """
    rng = np.random.default_rng(2)
    a, b = related_pair(rng, shape)
    mask = (rng.random(shape) > 0.25).astype(np.float64) if masked else None
    bins = 8
    warped = tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch(warped)
        value = losses.mutual_information(a, warped, bins=bins, mask=mask)
    grad = tape.gradient(value, warped).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() > 1e-3

    def own(x):
        return float(losses.mutual_information(a, x, bins=bins, mask=mask)[0])

    sel = np.ones(shape, bool) if mask is None else mask > 0
    ranges = ((a[sel].min(), a[sel].max()), (b[sel].min(), b[sel].max()))

    def frozen(x):
        return mi_ref(a[0], x[0], bins, mask=None if mask is None else mask[0], ranges=ranges)

    scale = np.abs(grad).max()
    checked = 0
    for index in np.ndindex(*shape):
        fd_frozen = finite_difference(frozen, b, index, 1e-6)
        np.testing.assert_allclose(grad[index], fd_frozen, atol=1e-6 * scale, err_msg=str(index))
        if sel[index] and b[index] not in ranges[1]:
            fd_own = finite_difference(own, b, index, 1e-6)
            np.testing.assert_allclose(grad[index], fd_own, atol=1e-6 * scale, err_msg=str(index))
            checked += 1
        elif not sel[index]:
            assert grad[index] == 0.0
    assert checked >= 0.5 * sel.sum()


def test_eager_and_graph_agree():
    rng = np.random.default_rng(3)
    a, b = (x.astype(np.float32) for x in related_pair(rng, (2, 6, 7, 5, 1)))
    mask = (rng.random((2, 6, 7, 5, 1)) > 0.3).astype(np.float32)

    def value_and_grad(fixed, warped, weights):
        with tf.GradientTape() as tape:
            tape.watch(warped)
            value = losses.mi_loss(fixed, warped, reduction="none", mask=weights)
        return value, tape.gradient(value, warped)

    spec = tf.TensorSpec([None, None, None, None, 1], tf.float32)  # unknown sizes in the graph
    graph = tf.function(value_and_grad, input_signature=[spec] * 3)
    eager = value_and_grad(tf.constant(a), tf.constant(b), tf.constant(mask))
    traced = graph(tf.constant(a), tf.constant(b), tf.constant(mask))
    np.testing.assert_allclose(traced[0].numpy(), eager[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(traced[1].numpy(), eager[1].numpy(), rtol=1e-5, atol=1e-7)


def four_tissue_image(rng, shape=(48, 40)):
    """Blobs of 4 tissue labels with about equal areas, intensities 0, 1/3, 2/3, 1."""
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    smooth = np.sin(ii / 5.0) + np.cos(jj / 4.0) + 0.3 * rng.random(shape)
    labels = np.searchsorted(np.quantile(smooth, [0.25, 0.5, 0.75]), smooth)
    return labels


def test_properties():
    rng = np.random.default_rng(4)
    labels = four_tissue_image(rng)
    levels = np.array([0.0, 1.0, 2.0, 3.0]) / 3.0
    x = levels[labels][None, ..., None].astype(np.float32)
    # A non-monotonic one-to-one remap of the tissues (another contrast), uncorrelated with x.
    remapped = levels[np.array([2, 0, 3, 1])][labels][None, ..., None].astype(np.float32)
    noise = rng.random(x.shape).astype(np.float32)
    mi_self = float(losses.mutual_information(x, x)[0])
    mi_remap = float(losses.mutual_information(x, remapped)[0])
    mi_noise = float(losses.mutual_information(x, noise)[0])
    assert mi_self > 1.0 and mi_noise < 0.1 * mi_self
    assert abs(mi_remap - mi_self) < 0.02 * mi_self
    assert float(losses.ncc(x, x)[0]) > 0.999 and abs(float(losses.ncc(x, remapped)[0])) < 0.2
    # An affine intensity change of either image leaves MI unchanged (same normalised image).
    np.testing.assert_allclose(float(losses.mutual_information(3 * x - 1, -2 * remapped)[0]),
                               float(losses.mutual_information(x, 1 - remapped)[0]), rtol=1e-5)
    # Monotone in dependence: a partly scrambled copy scores between noise and the copy.
    scrambled = x.copy().ravel()
    part = rng.random(scrambled.size) < 0.5
    scrambled[part] = rng.permutation(scrambled[part])
    mi_half = float(losses.mutual_information(x, scrambled.reshape(x.shape))[0])
    assert mi_noise < mi_half < mi_self
    # Bounded by log(bins) (the joint histogram of a copy is nearly diagonal).
    assert mi_self < np.log(32)


@pytest.mark.parametrize("ndim", [2, 3])
def test_constant_image_gives_zero_and_finite_gradient(ndim):
    shape = (2,) + (5,) * ndim + (1,)
    const = tf.fill(shape, 0.7)
    varying = tf.constant(np.random.default_rng(5).random(shape), tf.float32)
    for a, b in [(const, const), (const, varying), (varying, const)]:
        with tf.GradientTape() as tape:
            tape.watch(b)
            value = losses.mutual_information(a, b)
        grad = tape.gradient(value, b)
        np.testing.assert_allclose(value.numpy(), 0.0, atol=1e-6)
        assert np.isfinite(grad.numpy()).all()
    # Also when the mask selects only equal voxels of a varying image.
    mask = np.zeros(shape, np.float32)
    mask[:, 0] = 1.0
    flat = varying.numpy()
    flat[:, 0] = 0.2
    with tf.GradientTape() as tape:
        b = tf.constant(flat)
        tape.watch(b)
        value = losses.mutual_information(varying, b, mask=mask)
    np.testing.assert_allclose(value.numpy(), 0.0, atol=1e-6)
    assert np.isfinite(tape.gradient(value, b).numpy()).all()


def test_registered_as_mi_similarity():
    rng = np.random.default_rng(6)
    fixed, warped = (x.astype(np.float32) for x in related_pair(rng, (3, 8, 9, 1)))
    mi = losses.mutual_information(fixed, warped).numpy()
    assert losses.get("mi") is losses.mi_loss and "mi" in losses.SIMILARITIES
    np.testing.assert_allclose(losses.get("mi")(fixed, warped, reduction="none").numpy(), -mi, rtol=1e-6)
    np.testing.assert_allclose(float(losses.mi_loss(fixed, warped)), -mi.mean(), rtol=1e-6)
    per_pair, parts = losses.registration_objective(similarity="mi")(fixed, {"warped": warped})
    assert per_pair.shape == (3,)
    np.testing.assert_allclose(per_pair.numpy(), -mi, rtol=1e-6)
    np.testing.assert_allclose(parts["similarity"].numpy(), -mi, rtol=1e-6)


def test_bad_arguments():
    x = np.zeros((1, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="bins"):
        losses.mutual_information(x, x, bins=1)
    with pytest.raises(ValueError, match="sigma"):
        losses.mutual_information(x, x, sigma=0.0)
    with pytest.raises(ValueError, match="mask"):
        losses.mutual_information(x, x, mask=np.ones((1, 4, 3, 1)))
    with pytest.raises(ValueError, match="mask"):
        losses.mutual_information(x, x, mask=np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        losses.mutual_information(x, x[:, :3])
