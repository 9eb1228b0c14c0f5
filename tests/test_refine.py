"""Instance optimisation of a chain of composed steps (dirnet_tf.refine), 2-D and 3-D.

References are built here from the library's primitives (affine_displacement,
bspline_displacement, compose_displacements, warp, losses.*), not from refine's own code.
"""

import numpy as np
import pytest
import tensorflow as tf

import dirnet_tf
from dirnet_tf import losses, metrics, refine
from dirnet_tf.affine import AFFINE_MATRIX_BOUND, affine_displacement
from dirnet_tf.bspline import bspline_displacement, injectivity_bound
from dirnet_tf.spline_np import control_grid_shape
from dirnet_tf.warping import compose_displacements, warp

SHAPE_2D = (32, 28)
SHAPE_3D = (16, 20, 12)
LAYOUT_2D = [("affine", None), ("spline", (8, 8)), ("spline", (4, 4))]
LAYOUT_3D = [("affine", None), ("spline", (8, 8, 8)), ("spline", (4, 4, 4))]


def _images(shape, n=1, seed=0):
    """Smooth random blob images ``[n, *shape, 1]`` in [0, 1]."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    out = []
    for _ in range(n):
        img = np.zeros(shape)
        for _ in range(6):
            centre = [rng.uniform(0.2 * s, 0.8 * s) for s in shape]
            width = rng.uniform(0.08, 0.18) * min(shape)
            img += rng.uniform(0.4, 1.0) * np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / (2 * width ** 2))
        out.append(img / img.max())
    return np.stack(out)[..., None].astype(np.float32)


def _random_params(layout, shape, batch, fraction, seed):
    """Chain parameters inside the bounds: spline control points at up to ``fraction`` of 0.99 x the bound."""
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    out = []
    for kind, spacing in layout:
        if kind == "affine":
            matrix = rng.uniform(-0.05, 0.05, (batch, ndim * ndim))
            out.append(np.concatenate([matrix, rng.uniform(-1.5, 1.5, (batch, ndim))], 1).astype(np.float32))
        else:
            limit = 0.99 * np.asarray(injectivity_bound(spacing, ndim))
            size = (batch,) + control_grid_shape(shape, spacing) + (ndim,)
            out.append((rng.uniform(-1, 1, size) * limit * fraction).astype(np.float32))
    return out


def _chain(moving, layout, params, boundary="border"):
    """The model's construction, from the library's primitives: (warped, total displacement)."""
    shape = moving.shape[1:-1]
    total = None
    for (kind, spacing), p in zip(layout, params):
        field = affine_displacement(p, shape) if kind == "affine" else bspline_displacement(p, shape, spacing)
        total = field if total is None else compose_displacements(total, field)
    return warp(moving, total, boundary=boundary).numpy(), total.numpy()


def _zeros(layout, shape, batch):
    return [np.zeros_like(p) for p in _random_params(layout, shape, batch, 0.0, 0)]


def _known_pair(shape, layout, batch=1, seed=0, fraction=0.8):
    """fixed = the moving image warped by a known chain; (fixed, moving, true params)."""
    moving = _images(shape, batch, seed)
    true = _random_params(layout, shape, batch, fraction, seed + 100)
    fixed, _ = _chain(moving, layout, true)
    return fixed, moving, true


# --------------------------------------------------------------------------- #
# num_steps = 0: the model's own outputs and objective
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_zero_steps_reproduces_a_real_dirnet_and_its_objective(shape):
    """A random bounded, symmetric, staged DIRNet: its step_params recomputed by refine_steps with
    num_steps=0 give its warped image, its displacement and its training objective per pair."""
    tf.keras.utils.set_random_seed(3)
    model = dirnet_tf.DIRNet(shape, 4, filters=4, stages=("affine", 8, 4), bounded=True, symmetric=True,
                             normalize_inputs=True, bending_weight=0.3, folding_weight=2.0)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:  # non-trivial steps (the output layers start at zero)
        v.assign(rng.normal(0.0, 0.3, v.shape).astype(np.float32))
    fixed, moving = _images(shape, 2, seed=1), _images(shape, 2, seed=2)
    out = model({"fixed": fixed, "moving": moving})
    params = [p.numpy() for p in out["step_params"]]
    assert max(np.abs(p).max() for p in params) > 0.1  # really a non-trivial chain
    result = refine.refine_steps(fixed, moving, model.step_layout(), params, 0, similarity="ncc",
                                 bending_weight=0.3, folding_weight=2.0, bounded=True)
    np.testing.assert_allclose(result.warped, out["warped"].numpy(), atol=1e-5)
    np.testing.assert_allclose(result.displacement, out["displacement"].numpy(), atol=1e-4)
    np.testing.assert_allclose(result.initial_loss, model.objective(fixed, out)[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.final_loss, result.initial_loss)
    assert result.steps == 0 and result.history == []
    for got, given in zip(result.params, params):
        np.testing.assert_array_equal(got, given)


def test_zero_steps_reproduces_the_papers_unbounded_model():
    tf.keras.utils.set_random_seed(4)
    model = dirnet_tf.DIRNet(SHAPE_2D, 4, filters=4)
    rng = np.random.default_rng(1)
    for v in model.trainable_variables:
        v.assign(rng.normal(0.0, 0.3, v.shape).astype(np.float32))
    fixed, moving = _images(SHAPE_2D, 1, seed=3), _images(SHAPE_2D, 1, seed=4)
    out = model({"fixed": fixed, "moving": moving})
    assert model.step_layout() is None
    points = out["control_points"].numpy()
    result = refine.refine_steps(fixed, moving, [("spline", 4)], [points], 0, bounded=False)
    np.testing.assert_allclose(result.warped, out["warped"].numpy(), atol=1e-5)
    np.testing.assert_allclose(result.displacement, out["displacement"].numpy(), atol=1e-4)
    refined = refine.refine_steps(fixed, moving, [("spline", 4)], [points], 10, bounded=False)
    assert (refined.final_loss <= refined.initial_loss).all()


# --------------------------------------------------------------------------- #
# The pieces of the objective
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("shape,spacing", [((30, 26), (4, 5)), ((14, 17, 12), (4, 4, 3))])
def test_bending_energy_quadratic_form_equals_losses_value_and_gradient(shape, spacing):
    rng = np.random.default_rng(0)
    points = tf.constant(rng.normal(size=(2,) + control_grid_shape(shape, spacing) + (len(shape),)), tf.float32)
    grams = refine._bending_grams(shape, spacing)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(points)
        ours = refine._bending_energy(points, grams)
        reference = losses.bending_energy(points, shape, spacing, reduction="none")
        weighted_ours = tf.reduce_sum(ours * [1.0, 3.0])
        weighted_ref = tf.reduce_sum(reference * [1.0, 3.0])
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(weighted_ours, points).numpy(),
                               tape.gradient(weighted_ref, points).numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape,layout", [(SHAPE_2D, LAYOUT_2D), (SHAPE_3D, LAYOUT_3D)])
def test_sub_grid_objective_is_the_whole_grid_one_at_stride_one_and_samples_it_at_stride_two(shape, layout):
    """Stride 1 is the model's construction; at stride 2 a single step's warped image is the
    whole-grid one at every second voxel (from the offset)."""
    fixed, moving = _images(shape, 2, seed=5), _images(shape, 2, seed=6)
    params = [tf.constant(p) for p in _random_params(layout, shape, 2, 0.7, 1)]
    problem = refine._problem(shape, refine._check_layout(layout, len(shape)), "ncc", 0.2, 0.5, True, "border")
    dense = problem.forward(fixed, moving, params)[0].numpy()
    strided = problem._strided_loss(fixed, moving, params, tf.zeros(len(shape), tf.int32), 1).numpy()
    np.testing.assert_allclose(strided, dense, rtol=1e-5)

    one = refine._problem(shape, refine._check_layout(layout[2:], len(shape)), "ncc", 0.0, 0.0, True, "border")
    warped, _ = _chain(moving, layout[2:], params[2:])
    offset = np.array([1, 0, 1][:len(shape)])
    sub = tuple(slice(o, o + 2 * (n // 2) - 1, 2) for o, n in zip(offset, shape))
    want = losses.ncc_loss(fixed[(slice(None),) + sub], warped[(slice(None),) + sub], reduction="none").numpy()
    got = one._strided_loss(fixed, moving, params[2:], tf.constant(offset, tf.int32), 2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --------------------------------------------------------------------------- #
# Never worse; better on a known deformation; bounds; folding
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("stride", [1, 2])
def test_refinement_never_increases_the_objective(stride):
    """Unrelated noisy pairs (little to gain), several seeds, and a learning rate that diverges:
    final <= initial for every pair, and the returned params give exactly final_loss."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        fixed = (_images(SHAPE_2D, 2, seed) + rng.normal(0, 0.3, (2,) + SHAPE_2D + (1,))).astype(np.float32)
        moving = _images(SHAPE_2D, 2, seed + 10)
        params = _random_params(LAYOUT_2D, SHAPE_2D, 2, 0.5, seed)
        for lr in (None, 1e4):
            result = refine.refine_steps(fixed, moving, LAYOUT_2D, params, 6, similarity="ncc", bending_weight=0.5,
                                         learning_rate=lr, stride=stride, seed=seed)
            assert (result.final_loss <= result.initial_loss).all(), (seed, lr, result)
            check = refine.refine_steps(fixed, moving, LAYOUT_2D, result.params, 0, bending_weight=0.5)
            np.testing.assert_allclose(check.initial_loss, result.final_loss, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(check.warped, result.warped, atol=1e-6)


@pytest.mark.parametrize("shape,layout,stride", [(SHAPE_2D, LAYOUT_2D, 1), (SHAPE_2D, LAYOUT_2D, 2),
                                                 (SHAPE_3D, LAYOUT_3D, 2)])
def test_refinement_recovers_a_known_smooth_deformation(shape, layout, stride):
    """fixed = moving warped by a known bounded chain; from the identity the objective drops clearly
    and the field moves towards the true one."""
    fixed, moving, true = _known_pair(shape, layout)
    _, true_field = _chain(moving, layout, true)
    start = _zeros(layout, shape, 1)
    result = refine.refine_steps(fixed, moving, layout, start, 40, stride=stride)
    assert result.initial_loss[0] > -0.9 and result.final_loss[0] < -0.975
    inner = (slice(None),) + tuple(slice(3, n - 3) for n in shape)
    before = np.abs(true_field[inner]).mean()
    after = np.abs(result.displacement[inner] - true_field[inner]).mean()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("shape,layout,learning_rate", [(SHAPE_2D, LAYOUT_2D, 2.0), (SHAPE_3D, LAYOUT_3D, 1.0)])
def test_refined_steps_stay_within_their_bounds_and_never_fold(shape, layout, learning_rate):
    """A deformation at the bounds and an aggressive step size push the steps against their bounds;
    every spline step stays within 0.99 x its injectivity bound, the affine matrix within its bound,
    and the refined field does not fold."""
    fixed, moving, _ = _known_pair(shape, layout, seed=2, fraction=1.0)
    result = refine.refine_steps(fixed, moving, layout, _zeros(layout, shape, 1), 15, learning_rate=learning_rate,
                                 stride=1)
    assert result.final_loss[0] < result.initial_loss[0]
    ndim = len(shape)
    near = 0.0
    for (kind, spacing), p in zip(layout, result.params):
        if kind == "affine":
            assert np.abs(p[:, :ndim * ndim]).max() <= AFFINE_MATRIX_BOUND / ndim
        else:
            limit = 0.99 * np.asarray(injectivity_bound(spacing, ndim))
            ratio = np.abs(p).reshape(-1, ndim) / limit
            assert ratio.max() <= 1.0
            near = max(near, ratio.max())
    assert near > 0.95  # the bound was really approached
    assert metrics.folding_fraction(result.displacement).max() == 0


@pytest.mark.parametrize("stride", [1, 2])
def test_an_iterate_that_folds_is_never_returned(stride):
    """An unbounded chain (nothing keeps the steps injective) from the identity towards a target made
    by a chain that folds, with large steps and no folding penalty: without the rule the result folds,
    with it the result never folds (the start does not)."""
    moving = _images(SHAPE_2D, 2, 4)
    fixed, target_field = _chain(moving, LAYOUT_2D, _random_params(LAYOUT_2D, SHAPE_2D, 2, 3.0, 104))
    assert (metrics.jacobian_determinant(target_field) <= 0).sum() > 0
    start = _zeros(LAYOUT_2D, SHAPE_2D, 2)
    folded_any = False
    for lr in (2.0, 5.0):
        result = refine.refine_steps(fixed, moving, LAYOUT_2D, start, 20, bounded=False, learning_rate=lr,
                                     stride=stride)
        assert (metrics.jacobian_determinant(result.displacement) <= 0).sum() == 0
        assert (result.final_loss <= result.initial_loss).all()
        # the same iterations without the rule fold
        last = refine.refine_steps(fixed, moving, LAYOUT_2D, start, 20, bounded=False, learning_rate=lr,
                                   stride=stride, allow_folding=True)
        folded_any |= bool((metrics.jacobian_determinant(last.displacement) <= 0).any())
    assert folded_any, "the test never made the optimiser fold; it checks nothing"


# --------------------------------------------------------------------------- #
# Batches, similarities, progress
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("shape,layout,stride", [(SHAPE_2D, LAYOUT_2D, 1), (SHAPE_3D, LAYOUT_3D, 2)])
def test_each_pair_of_a_batch_is_refined_as_if_alone(shape, layout, stride):
    fixed, moving, _ = _known_pair(shape, layout, batch=3, seed=3)
    start = _random_params(layout, shape, 3, 0.3, 8)
    batch = refine.refine_steps(fixed, moving, layout, start, 8, bending_weight=0.1, stride=stride)
    for n in range(3):
        alone = refine.refine_steps(fixed[n:n + 1], moving[n:n + 1], layout, [p[n:n + 1] for p in start], 8,
                                    bending_weight=0.1, stride=stride)
        np.testing.assert_allclose(batch.final_loss[n:n + 1], alone.final_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batch.initial_loss[n:n + 1], alone.initial_loss, rtol=1e-6)
        for got, want in zip(batch.params, alone.params):
            np.testing.assert_allclose(got[n:n + 1], want, atol=2e-4)
        np.testing.assert_allclose(batch.displacement[n:n + 1], alone.displacement, atol=1e-3)


@pytest.mark.parametrize("similarity", ["lncc", "mi"])
@pytest.mark.parametrize("shape,layout,stride", [(SHAPE_2D, LAYOUT_2D, 1), (SHAPE_3D, LAYOUT_3D, 2)])
def test_lncc_and_mi_refinement_lowers_their_objective(similarity, shape, layout, stride):
    fixed, moving, _ = _known_pair(shape, layout, seed=4)
    if similarity == "mi":  # a different contrast: MI's use case
        fixed = (1.0 - fixed) ** 2
    result = refine.refine_steps(fixed, moving, layout, _zeros(layout, shape, 1), 20, similarity=similarity,
                                 stride=stride)
    warped, _ = _chain(moving, layout, _zeros(layout, shape, 1))
    reference = losses.get(similarity)(fixed, warped, reduction="none").numpy()
    np.testing.assert_allclose(result.initial_loss, reference, rtol=1e-5)
    assert result.final_loss[0] < result.initial_loss[0] - 0.02 * abs(result.initial_loss[0])


@pytest.mark.parametrize("stride", [1, 2])
def test_a_run_is_the_same_however_its_iterations_are_cut_into_calls(stride, monkeypatch):
    """The iterations run in compiled chunks of refine._CHUNK; step sizes and sub-grid offsets depend on
    the iteration alone, so chunks of 3 and of 10 give the same result (and 13 iterations cross chunks)."""
    fixed, moving, _ = _known_pair(SHAPE_2D, LAYOUT_2D, seed=6)
    start = _random_params(LAYOUT_2D, SHAPE_2D, 1, 0.3, 9)
    runs = []
    for chunk in (3, 10):
        monkeypatch.setattr(refine, "_CHUNK", chunk)
        runs.append(refine.refine_steps(fixed, moving, LAYOUT_2D, start, 13, bending_weight=0.1, stride=stride))
    np.testing.assert_allclose(runs[0].history, runs[1].history, rtol=1e-5)
    np.testing.assert_allclose(runs[0].final_loss, runs[1].final_loss, rtol=1e-5)
    for a, b in zip(runs[0].params, runs[1].params):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert runs[0].final_loss[0] < runs[0].initial_loss[0]


def test_progress_is_called_every_iteration_with_the_history():
    fixed, moving, _ = _known_pair(SHAPE_2D, LAYOUT_2D, seed=5)
    calls = []
    result = refine.refine_steps(fixed, moving, LAYOUT_2D, _zeros(LAYOUT_2D, SHAPE_2D, 1), 7,
                                 progress=lambda i, loss: calls.append((i, loss)))
    assert [i for i, _ in calls] == list(range(1, 8))
    assert [loss for _, loss in calls] == result.history and result.steps == 7
    assert result.history[-1] < result.history[0]
    assert result.seconds > 0


def test_auto_stride():
    assert refine.auto_stride((28, 28)) == 1
    assert refine.auto_stride((128, 128)) == 2
    assert refine.auto_stride((96, 112, 96)) == 3
    assert refine.auto_stride((16, 20, 12)) == 1


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_errors_are_clear():
    fixed, moving = _images(SHAPE_2D, 1, 0), _images(SHAPE_2D, 1, 1)
    params = _zeros(LAYOUT_2D, SHAPE_2D, 1)
    with pytest.raises(ValueError, match="num_steps must be a whole number of iterations >= 0"):
        refine.refine_steps(fixed, moving, LAYOUT_2D, params, -1)
    with pytest.raises(ValueError, match="whole number"):
        refine.refine_steps(fixed, moving, LAYOUT_2D, params, 2.5)
    with pytest.raises(ValueError, match=r"unknown refinement similarity 'mse'.*\['ncc', 'lncc', 'mi'\]"):
        refine.refine_steps(fixed, moving, LAYOUT_2D, params, 1, similarity="mse")
    with pytest.raises(ValueError, match=r"params\[1\] of the spline step must have shape \(1, 7, 7, 2\)"):
        refine.refine_steps(fixed, moving, LAYOUT_2D, [params[0], params[2], params[2]], 1)
    too_far = [params[0], params[1] + 10.0, params[2]]
    with pytest.raises(ValueError, match="exceed the bound of a bounded chain.*bounded=False"):
        refine.refine_steps(fixed, moving, LAYOUT_2D, too_far, 1)
    refine.refine_steps(fixed, moving, LAYOUT_2D, too_far, 0, bounded=False)  # fine unbounded
    with pytest.raises(ValueError, match="boundary"):
        refine.refine_steps(fixed, moving, LAYOUT_2D, params, 1, boundary="reflect")
    with pytest.raises(ValueError, match="stride must be"):
        refine.refine_steps(fixed, moving, LAYOUT_2D, params, 1, stride=20)
    with pytest.raises(ValueError, match="same shape"):
        refine.refine_steps(fixed, moving[:, :-1], LAYOUT_2D, params, 1)
