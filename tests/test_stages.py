"""DIRNet as composed steps: bounded (folding-free) B-spline steps, affine + coarse-to-fine stages,
symmetric steps (identity on identical images), normalised inputs."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

import dirnet_tf
from dirnet_tf import losses, metrics
from dirnet_tf.affine import affine_displacement
from dirnet_tf.bspline import bspline_jacobian_determinant, injectivity_bound

SHAPE = (28, 24)


def _images(n=2, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    out = []
    for _ in range(n):
        centre = [rng.uniform(0.35 * s, 0.65 * s) for s in shape]
        out.append(np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / (2 * 4.0 ** 2)))
    return np.stack(out)[..., None].astype(np.float32)


def _randomize(model, scale, seed=1):
    """Random weights everywhere (output layers included: the identity start is undone)."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(rng.normal(0.0, scale, v.shape).astype(np.float32))


def _fd_det(displacement):
    return metrics.jacobian_determinant(np.asarray(displacement))


@pytest.mark.parametrize("shape,spacing", [(SHAPE, 4), ((14, 12, 10), 4)])
def test_bounded_steps_never_fold_and_the_same_weights_unbounded_do(shape, spacing):
    """Huge regressor outputs: every bounded step stays below the injectivity bound, its analytic
    det J is positive at every pixel, and the composed field does not fold; the same network
    without the bound folds (so the test can fail)."""
    fixed, moving = _images(2, shape), _images(2, shape, seed=1)
    bounded = dirnet_tf.DIRNet(shape, spacing, filters=4, passes=2, bounded=True)
    free = dirnet_tf.DIRNet(shape, spacing, filters=4, passes=2, normalize_inputs=True)
    _randomize(bounded, 0.6)
    for v in bounded.regressor.output_conv.trainable_variables:  # outputs far past the bound
        v.assign(20.0 * v)
    free.set_weights(bounded.get_weights())
    out = bounded({"fixed": fixed, "moving": moving})
    limit = np.asarray(injectivity_bound(spacing, len(shape)))
    assert len(out["control_point_steps"]) == 2
    for points in out["control_point_steps"]:
        values = np.abs(points.numpy()).reshape(-1, len(shape))
        assert (values < limit).all() and values.max() > 0.5 * limit.min()  # near the bound, below it
        det = bspline_jacobian_determinant(points, shape, spacing).numpy()
        assert det.min() > 0
    assert _fd_det(out["displacement"]).min() > 0
    unbounded = free({"fixed": fixed, "moving": moving})
    assert metrics.folding_fraction(unbounded["displacement"].numpy()).max() > 0


def test_identical_images_give_the_identity_and_swapping_negates_the_step():
    fixed, moving = _images(2), _images(2, seed=3)
    model = dirnet_tf.DIRNet(SHAPE, 4, filters=4, symmetric=True, normalize_inputs=True, bounded=True)
    _randomize(model, 0.3)
    same = model({"fixed": fixed, "moving": fixed})
    assert np.abs(same["displacement"].numpy()).max() == 0.0
    np.testing.assert_array_equal(same["warped"].numpy(), fixed)
    # Intensity scale does not matter (normalised inputs), and the result stays the identity.
    scaled = model({"fixed": fixed, "moving": 0.5 * fixed})
    assert np.abs(scaled["displacement"].numpy()).max() < 1e-5
    ab = model({"fixed": fixed, "moving": moving})["control_points"].numpy()
    ba = model({"fixed": moving, "moving": fixed})["control_points"].numpy()
    assert np.abs(ab).max() > 0.1
    np.testing.assert_allclose(ab, -ba, atol=1e-6)
    # Without symmetry the same weights do move identical images.
    plain = dirnet_tf.DIRNet(SHAPE, 4, filters=4, normalize_inputs=True, bounded=True)
    plain.set_weights(model.get_weights())
    assert np.abs(plain({"fixed": fixed, "moving": fixed})["displacement"].numpy()).max() > 0.01


def test_normalised_inputs_make_the_result_independent_of_intensity_scale():
    fixed, moving = _images(2), _images(2, seed=3)
    model = dirnet_tf.DIRNet(SHAPE, 4, filters=4, normalize_inputs=True)
    _randomize(model, 0.3)
    a = model({"fixed": fixed, "moving": moving})
    b = model({"fixed": 3.0 * fixed + 1.0, "moving": 0.5 * moving})
    np.testing.assert_allclose(a["displacement"].numpy(), b["displacement"].numpy(), atol=1e-4)
    np.testing.assert_allclose(b["warped"].numpy(), 0.5 * a["warped"].numpy(), atol=1e-5)  # warps the image


def test_affine_displacement_matches_numpy():
    rng = np.random.default_rng(0)
    params = rng.normal(0, 0.2, (2, 6)).astype(np.float32)
    u = affine_displacement(params, SHAPE).numpy()
    ii, jj = np.meshgrid(np.arange(SHAPE[0]) - (SHAPE[0] - 1) / 2, np.arange(SHAPE[1]) - (SHAPE[1] - 1) / 2,
                         indexing="ij")
    for b in range(2):
        m, t = params[b, :4].reshape(2, 2), params[b, 4:]
        ref = np.stack([m[0, 0] * ii + m[0, 1] * jj + t[0], m[1, 0] * ii + m[1, 1] * jj + t[1]], -1)
        np.testing.assert_allclose(u[b], ref, atol=1e-5)


def test_stages_compose_and_warp_the_moving_image_once():
    """affine, 8, 4: the total field is the composition of the steps, and warped is the moving
    image resampled once at x + displacement (the export contract)."""
    fixed, moving = _images(2), _images(2, seed=3)
    model = dirnet_tf.DIRNet(SHAPE, 8, filters=4, stages=("affine", 8, 4), bounded=True, bending_weight=0.5)
    _randomize(model, 0.05)
    out = model({"fixed": fixed, "moving": moving})
    assert [int(s) for s in model.grid_spacing] == [4, 4] and len(out["control_point_steps"]) == 2
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    disp = out["displacement"].numpy()
    assert np.abs(disp).max() > 0.1
    for b in range(2):
        coords = np.moveaxis(grid + disp[b], -1, 0)
        ref = ndimage.map_coordinates(moving[b, ..., 0], coords, order=1, mode="nearest")
        np.testing.assert_allclose(out["warped"].numpy()[b, ..., 0], ref, atol=1e-5)
    # The bending term is the sum over the B-spline steps, each at its own spacing.
    terms = model.loss_terms(fixed, out)
    expected = sum(losses.bending_energy(p, SHAPE, s) for p, s in zip(out["control_point_steps"], (8, 4)))
    np.testing.assert_allclose(float(terms["bending_energy"]), float(expected), rtol=1e-5)
    # A fresh model (output layers at zero) is the identity.
    fresh = dirnet_tf.DIRNet(SHAPE, 8, filters=4, stages=("affine", 8, 4), bounded=True)
    assert np.abs(fresh({"fixed": fixed, "moving": moving})["displacement"].numpy()).max() == 0.0


def test_staged_model_round_trips_and_checkpoints_every_stage(tmp_path):
    fixed, moving = _images(2), _images(2, seed=3)
    model = dirnet_tf.DIRNet(SHAPE, 8, filters=4, stages=("affine", 8, 4), bounded=True, symmetric=True,
                             normalize_inputs=True, passes=2)
    _randomize(model, 0.05)
    path = str(tmp_path / "m.keras")
    model.save(path)
    import keras

    loaded = keras.models.load_model(path)
    assert (loaded.stages, loaded.bounded, loaded.symmetric, loaded.passes) == (("affine", 8, 4), True, True, 2)
    np.testing.assert_allclose(loaded({"fixed": fixed, "moving": moving})["displacement"].numpy(),
                               model({"fixed": fixed, "moving": moving})["displacement"].numpy(), atol=1e-5)
    # tf.train.Checkpoint (the trainer's) holds every stage's variables.
    checkpoint = tf.train.Checkpoint(model=model)
    saved = checkpoint.save(str(tmp_path / "ckpt"))
    names = {name for name, _ in tf.train.list_variables(saved)}
    assert sum("affine_regressor" in n for n in names) >= 2
    assert sum("regressor_1" in n for n in names) >= 2
    other = dirnet_tf.DIRNet(SHAPE, 8, filters=4, stages=("affine", 8, 4), bounded=True, symmetric=True,
                             normalize_inputs=True, passes=2)
    tf.train.Checkpoint(model=other).restore(saved).assert_existing_objects_matched()
    for a, b in zip(model.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape,stages,scale", [(SHAPE, (8, 4), 0.2), ((12, 14, 10), (4,), 0.6)])
@pytest.mark.parametrize("compiled", [False, True])
def test_inverse_consistency_training_registers_both_ways(shape, stages, scale, compiled):
    """With ``inverse_consistency_weight`` a training call returns the other direction under
    ``"inverse"`` (equal to registering the swapped pair), the objective averages the two
    directions and adds the weighted residual, which equals the numpy metric
    (:func:`dirnet_tf.metrics.inverse_consistency`, both ways round); inference is unchanged."""
    fixed, moving = _images(3, shape), _images(3, shape, seed=5)
    weight = 0.25
    model = dirnet_tf.DIRNet(shape, 4, filters=4, stages=stages, bounded=True, normalize_inputs=True,
                             bending_weight=0.1, inverse_consistency_weight=weight)
    _randomize(model, scale)
    call = tf.function(model.__call__) if compiled else model.__call__
    out = call({"fixed": fixed, "moving": moving}, training=True)
    ab = model({"fixed": fixed, "moving": moving})
    ba = model({"fixed": moving, "moving": fixed})
    assert "inverse" not in ab
    np.testing.assert_allclose(out["displacement"].numpy(), ab["displacement"].numpy(), atol=1e-5)
    np.testing.assert_allclose(out["inverse"]["displacement"].numpy(), ba["displacement"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(out["inverse"]["fixed"].numpy(), moving)
    u_ab, u_ba = ab["displacement"].numpy(), ba["displacement"].numpy()
    assert np.abs(u_ab).mean() > 0.1  # the fields are not trivial

    total, parts = model.objective(fixed, out)
    plain = losses.registration_objective("ncc", 0.1, image_shape=shape, grid_spacing=4,
                                          step_spacings=model._step_spacings())
    t_ab, p_ab = plain(fixed, ab)
    t_ba, p_ba = plain(moving, ba)
    ic = 0.5 * (metrics.inverse_consistency(u_ab, u_ba) + metrics.inverse_consistency(u_ba, u_ab))
    assert ic.min() > 0.05
    np.testing.assert_allclose(parts["inverse_consistency"].numpy(), ic, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(parts["ncc"].numpy(), 0.5 * (p_ab["ncc"] + p_ba["ncc"]).numpy(), atol=1e-5)
    np.testing.assert_allclose(total.numpy(), 0.5 * (t_ab + t_ba).numpy() + weight * ic, rtol=1e-3, atol=2e-3)
    # The weight is saved with the model.
    assert dirnet_tf.DIRNet.from_config(model.get_config()).inverse_consistency_weight == weight


def test_inverse_consistency_loss_gradient_and_zero_for_inverse_fields():
    """The loss is ~0 for a field and its exact inverse (a translation), positive otherwise,
    and its gradient matches finite differences (2-D)."""
    shift = np.zeros((1, 10, 12, 2), np.float32)
    shift[..., 0], shift[..., 1] = 0.7, -1.3
    # A constant field equals its own edge extension, so the composition is exact at every pixel.
    value = losses.inverse_consistency_loss(shift, -shift, reduction="none").numpy()
    assert value.shape == (1,) and value[0] < 0.01
    rng = np.random.default_rng(2)
    a = tf.constant(rng.normal(0, 0.5, (1, 6, 5, 2)))
    b = tf.constant(rng.normal(0, 0.5, (1, 6, 5, 2)))
    assert losses.inverse_consistency_loss(a, b).numpy() > 0.1
    fn = tf.function(lambda x: losses.inverse_consistency_loss(x, b))
    theoretical, numerical = tf.test.compute_gradient(fn, [a], delta=1e-4)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-3)
    assert np.abs(theoretical[0]).max() > 0.01
    with pytest.raises(ValueError, match="differ in shape"):
        losses.inverse_consistency_loss(a, b[:, :5])
