"""DIRNet, the regressor and the Keras layers: geometry, identity at init,
gradients, training with fit, serialisation, 2-D and 3-D."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import dirnet_tf
from dirnet_tf import layers
from dirnet_tf.regressor import regressor_padding


def _pair(shape, batch=2, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    size = (batch,) + tuple(shape) + (channels,)
    return rng.random(size, dtype=np.float32), rng.random(size, dtype=np.float32)


def _randomize_output_layer(model, scale=0.3, seed=1):
    conv = model.regressor.output_conv
    rng = np.random.default_rng(seed)
    conv.kernel.assign(rng.normal(scale=scale, size=conv.kernel.shape).astype(np.float32))
    conv.bias.assign(rng.normal(scale=scale, size=conv.bias.shape).astype(np.float32))


@pytest.mark.parametrize(
    "shape,spacing",
    [((28, 28), 8), ((28, 28), 4), ((30, 17), (4, 2)), ((13, 21), (1, 8)), ((9, 10, 11), (2, 4, 1))],
)
def test_regressor_lands_on_control_grid(shape, spacing):
    grid = dirnet_tf.control_grid_shape(shape, spacing)
    reg = layers.Regressor(shape, spacing, filters=4)
    fixed, moving = _pair(shape, batch=1)
    out = reg(np.concatenate([fixed, moving], -1))
    assert tuple(out.shape) == (1,) + grid + (len(shape),)
    # Same through the (fixed, moving) tuple form.
    assert tuple(reg((fixed, moving)).shape) == tuple(out.shape)
    # The padding tiles the (K - 2) inner control cells exactly.
    s = spacing if isinstance(spacing, tuple) else (spacing,) * len(shape)
    for n, sd, k, (before, after) in zip(shape, s, grid, regressor_padding(shape, spacing)):
        assert before >= 0 and after >= 0 and n + before + after == (k - 2) * sd


@pytest.mark.parametrize("shape,spacing,convs", [((21, 17), (4, 8), 1), ((21, 17), (4, 8), [2, 1, 3, 2]),
                                                 ((9, 12, 7), (2, 4, 1), 1), ((9, 12, 7), (2, 4, 1), [1, 2, 3])])
def test_regressor_cells_are_centred_on_their_control_points(shape, spacing, convs):
    # With pass-through weights (3x3 kernels = centre tap from channel 0 to 0,
    # ELU is the identity on positive values) the output at control point k is
    # the mean of the input over the cell of k: an impulse at the pixel of
    # control point k, (k - 1) * s, must show up at index k and nowhere else.
    # Extra 3x3 convolutions per level (convs_per_level) keep this geometry.
    reg = layers.Regressor(shape, spacing, filters=2, pointwise_filters=[2], convs_per_level=convs)
    expected = [convs] * len(reg.filters) if isinstance(convs, int) else convs
    kernels = [layer for layer in reg._stack if hasattr(layer, "kernel_size") and layer.kernel_size[0] == 3]
    assert len(kernels) == sum(expected)
    reg.build((1,) + shape + (2,))
    for layer in reg._stack + [reg.output_conv]:
        if hasattr(layer, "kernel"):
            kernel = np.zeros(layer.kernel.shape, np.float32)
            kernel[tuple(n // 2 for n in kernel.shape[:-2]) + (0, 0)] = 1.0
            layer.kernel.assign(kernel)
            layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
    grid = dirnet_tf.control_grid_shape(shape, spacing)
    rng = np.random.default_rng(9)
    for _ in range(4):
        k = tuple(int(rng.integers(1, g - 1)) for g in grid)
        pixel = tuple((kd - 1) * sd for kd, sd in zip(k, spacing))
        if any(p >= n for p, n in zip(pixel, shape)):
            continue
        pair = np.zeros((1,) + shape + (2,), np.float32)
        pair[(0,) + pixel + (0,)] = 1.0
        out = reg(pair).numpy()[0, ..., 0]
        assert np.unravel_index(np.argmax(out), out.shape) == k
        np.testing.assert_allclose(out[k], 1.0 / np.prod(spacing), rtol=1e-5)
        assert np.count_nonzero(out) == 1


@pytest.mark.parametrize("shape,spacing,batch_norm", [((28, 28), 8, False), ((21, 17), (8, 2), True),
                                                      ((7, 9, 6), (4, 2, 1), False)])
def test_regressor_first_level_shortcut_is_exact(shape, spacing, batch_norm):
    # The first level runs only where the image reaches and fills the rest of
    # the padded map with the constant act(bias): same outputs as running the
    # whole zero-padded input through the layers.
    reg = layers.Regressor(shape, spacing, filters=4, batch_norm=batch_norm)
    reg.build((2,) + shape + (2,))
    assert reg._first_level is not None
    rng = np.random.default_rng(11)
    for weight in reg.weights:
        value = rng.normal(scale=0.5, size=weight.shape)
        if "variance" in weight.path:
            value = np.abs(value) + 0.5
        weight.assign(value.astype(np.float32))
    fixed, moving = _pair(shape, seed=12)
    pair = np.concatenate([fixed, moving], -1)
    fast = reg(pair).numpy()
    geometry, reg._first_level = reg._first_level, None
    try:
        plain = reg(pair).numpy()
    finally:
        reg._first_level = geometry
    assert np.abs(plain).max() > 0.1
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)


def test_regressor_convs_per_level_gradients_round_trip(tmp_path):
    shape = (28, 28)
    model = dirnet_tf.DIRNet(shape, 8, filters=[4, 6, 8, 8], convs_per_level=[1, 1, 2, 3])
    reg = model.regressor
    assert reg.convs_per_level == [1, 1, 2, 3] and reg._first_level is not None
    # Each extra 3x3 convolution sees its level's width and map size (28x28 at
    # spacing 8: padded 40 -> 20 -> 10 -> 5 cells + border = 7).
    sizes = {"conv2_1": (10, 10), "conv3_1": (7, 7), "conv3_2": (7, 7)}
    pads = [(0, 0)] + [(b + 1, a + 1) for b, a in regressor_padding(shape, 8)] + [(0, 0)]
    x = keras.ops.pad(np.concatenate(_pair(shape, batch=1), -1), pads)
    seen = {}
    for layer in reg._stack:
        if layer.name in sizes:
            seen[layer.name] = tuple(x.shape[1:3])
            assert tuple(layer.kernel.shape) == (3, 3, 8, 8)
        x = layer(x)
    assert seen == sizes
    fixed, moving = _pair(shape, batch=3, seed=21)
    _, grads = _grads(model, fixed, moving)
    keras.optimizers.Adam(1e-2).apply_gradients(zip(grads, model.trainable_weights))
    _, grads = _grads(model, fixed, moving)
    for w, g in zip(model.trainable_weights, grads):
        assert g is not None and np.abs(g.numpy()).max() > 0, w.path
    path = os.path.join(tmp_path, "deep.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.regressor.convs_per_level == [1, 1, 2, 3]
    a = model({"fixed": fixed, "moving": moving})
    b = loaded({"fixed": fixed, "moving": moving})
    assert np.abs(a["displacement"].numpy()).max() > 0
    np.testing.assert_array_equal(a["displacement"].numpy(), b["displacement"].numpy())
    # Extra full-resolution convolutions: the first-level shortcut no longer applies.
    assert layers.Regressor(shape, 8, filters=4, convs_per_level=[2, 1, 1, 1])._first_level is None
    with pytest.raises(ValueError, match=r"convs_per_level must be .*4 positive ints.*\[1, 2\]"):
        layers.Regressor(shape, 8, convs_per_level=[1, 2])
    with pytest.raises(ValueError, match="convs_per_level"):
        layers.Regressor(shape, 8, convs_per_level=0)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_tf_checkpoint_holds_every_weight(tmp_path, batch_norm):
    """tf.train.Checkpoint (the trainer's checkpoints and its best-model copy) must
    save and restore every variable of the model, not only the directly named layers."""
    kw = dict(filters=[4, 6, 8], convs_per_level=[1, 2, 2], batch_norm=batch_norm)
    model = dirnet_tf.DIRNet((16, 16), 4, **kw)
    rng = np.random.default_rng(3)
    for v in model.weights:
        v.assign(rng.normal(0, 0.2, v.shape).astype(np.float32))
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    saved = [k for k in tf.train.load_checkpoint(path).get_variable_to_shape_map() if k.startswith("model/")]
    assert len(saved) == len(model.weights)
    other = dirnet_tf.DIRNet((16, 16), 4, **kw)
    tf.train.Checkpoint(model=other).restore(path).assert_existing_objects_matched()
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    f, m = _pair((16, 16))
    np.testing.assert_array_equal(model({"fixed": f, "moving": m})["displacement"].numpy(),
                                  other({"fixed": f, "moving": m})["displacement"].numpy())


def test_regressor_rejects_non_power_of_two_spacing():
    with pytest.raises(ValueError, match=r"powers of two.*\(4, 3\)"):
        layers.Regressor((16, 16), (4, 3))
    with pytest.raises(ValueError, match="expects input"):
        layers.Regressor((16, 16), 4)(np.zeros((1, 16, 15, 2), np.float32))


def test_identity_at_init_and_contract():
    shape = (28, 28)
    model = dirnet_tf.DIRNet(shape, 8)
    assert model.image_shape == shape and model.grid_spacing == (8, 8)
    assert model.boundary == "border"
    fixed, moving = _pair(shape)
    out = model({"fixed": fixed, "moving": moving})
    assert set(out) == {"warped", "displacement", "control_points"}
    assert tuple(out["control_points"].shape) == (2,) + dirnet_tf.control_grid_shape(shape, 8) + (2,)
    np.testing.assert_array_equal(out["displacement"].numpy(), 0.0)
    np.testing.assert_allclose(out["warped"].numpy(), moving, atol=1e-6)

    # With a non-trivial output layer: warped == resample(moving, grid + displacement).
    for boundary in ("border", "zeros"):
        model = dirnet_tf.DIRNet(shape, 4, boundary=boundary, filters=8)
        _randomize_output_layer(model)
        out = model({"fixed": fixed, "moving": moving})
        disp = out["displacement"].numpy()
        assert np.abs(disp).max() > 0.1
        expected = dirnet_tf.resample(
            moving, dirnet_tf.identity_grid(shape) + disp, boundary=boundary
        ).numpy()
        np.testing.assert_allclose(out["warped"].numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(
            disp,
            dirnet_tf.bspline_displacement(out["control_points"], shape, 4).numpy(),
            atol=1e-6,
        )
        graph = tf.function(lambda f, m: model({"fixed": f, "moving": m}))
        np.testing.assert_allclose(graph(fixed, moving)["warped"].numpy(), out["warped"].numpy(),
                                   atol=1e-5)


@pytest.mark.parametrize("passes", [2, 3])
def test_refinement_passes_add_control_point_updates(passes):
    """passes > 1: c <- c + regressor(fixed, warp(moving, c)), one B-spline in the end."""
    shape = (16, 16)
    fixed, moving = _pair(shape, seed=4)
    model = dirnet_tf.DIRNet(shape, 4, filters=6, passes=passes)
    _randomize_output_layer(model, scale=0.2)
    out = model({"fixed": fixed, "moving": moving})
    grid = dirnet_tf.identity_grid(shape)
    cps = model.regressor(np.concatenate([fixed, moving], -1)).numpy()
    for _ in range(passes - 1):  # explicit reference, step by step
        disp = dirnet_tf.bspline_displacement(cps, shape, 4).numpy()
        warped = dirnet_tf.resample(moving, grid + disp, boundary="border").numpy()
        cps = cps + model.regressor(np.concatenate([fixed, warped], -1)).numpy()
    disp = dirnet_tf.bspline_displacement(cps, shape, 4).numpy()
    np.testing.assert_allclose(out["control_points"].numpy(), cps, atol=1e-5)
    np.testing.assert_allclose(out["displacement"].numpy(), disp, atol=1e-5)
    np.testing.assert_allclose(out["warped"].numpy(),
                               dirnet_tf.resample(moving, grid + disp, boundary="border").numpy(), atol=1e-5)
    single = dirnet_tf.DIRNet(shape, 4, filters=6)
    single.set_weights(model.get_weights())
    first = single({"fixed": fixed, "moving": moving})["control_points"].numpy()
    assert np.abs(first - cps).max() > 1e-3  # the later passes changed the result
    # every pass shares the regressor's weights, and all of them are trained
    with tf.GradientTape() as tape:
        loss = model.registration_loss(fixed, model({"fixed": fixed, "moving": moving}, training=True))
    grads = tape.gradient(loss, model.trainable_weights)
    assert len(model.trainable_weights) == len(single.trainable_weights)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    assert dirnet_tf.DIRNet.from_config(model.get_config()).passes == passes
    with pytest.raises(ValueError, match="passes"):
        dirnet_tf.DIRNet(shape, 4, passes=0)


def _grads(model, fixed, moving):
    with tf.GradientTape() as tape:
        out = model({"fixed": fixed, "moving": moving}, training=True)
        loss = model.registration_loss(fixed, out)
    return loss, tape.gradient(loss, model.trainable_weights)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_gradients_reach_every_weight(batch_norm):
    shape = (20, 24)
    model = dirnet_tf.DIRNet(shape, 4, filters=8, batch_norm=batch_norm)
    fixed, moving = _pair(shape, batch=3, seed=2)
    _, grads = _grads(model, fixed, moving)
    names = [w.path for w in model.trainable_weights]
    final = [g for w, g in zip(model.trainable_weights, grads) if "control_points" in w.path]
    assert len(final) == 2 and all(np.abs(g.numpy()).max() > 0 for g in final), names
    opt = keras.optimizers.Adam(1e-3)
    opt.apply_gradients(zip(grads, model.trainable_weights))
    _, grads = _grads(model, fixed, moving)
    for w, g in zip(model.trainable_weights, grads):
        assert g is not None and np.abs(g.numpy()).max() > 0, w.path


def test_fit_unsupervised_and_jit_guard():
    shape = (16, 16)
    model = dirnet_tf.DIRNet(shape, 4, filters=4, bending_weight=0.01, folding_weight=0.1)
    assert model.resampler.supports_jit is False
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert model.jit_compile is False  # "auto" never picks XLA for the custom op
    with pytest.warns(UserWarning, match="jit_compile"):
        model.jit_compile = True
    assert model.jit_compile is False
    fixed, moving = _pair(shape, batch=8, seed=3)
    ds = tf.data.Dataset.from_tensor_slices({"fixed": fixed, "moving": moving}).batch(4)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(ds, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 2 and np.isfinite(losses).all()
    # The loss fit reports is the registration objective (evaluate does the same).
    out = model({"fixed": fixed, "moving": moving})
    expected = float(model.registration_loss(fixed, out))
    assert abs(model.evaluate(tf.data.Dataset.from_tensor_slices(
        {"fixed": fixed, "moving": moving}).batch(8), verbose=0) - expected) < 1e-4
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert all(changed)


def test_loss_terms_are_pure_and_weighted():
    shape = (16, 12)
    model = dirnet_tf.DIRNet(shape, 4, filters=4, bending_weight=0.5, folding_weight=2.0,
                             similarity="mse")
    _randomize_output_layer(model, scale=1.0)
    fixed, moving = _pair(shape)
    out = model({"fixed": fixed, "moving": moving})
    terms = model.loss_terms(fixed, out)
    sim = dirnet_tf.losses.mse_loss(fixed, out["warped"])
    bend = dirnet_tf.losses.bending_energy(out["control_points"], shape, 4)
    fold = dirnet_tf.losses.folding_penalty(out["displacement"])
    np.testing.assert_allclose(float(terms["similarity"]), float(sim), rtol=1e-6)
    np.testing.assert_allclose(float(terms["bending_energy"]), float(bend), rtol=1e-6)
    np.testing.assert_allclose(float(terms["folding_penalty"]), float(fold), rtol=1e-6)
    np.testing.assert_allclose(float(terms["total"]), float(sim + 0.5 * bend + 2.0 * fold),
                               rtol=1e-5)
    assert float(bend) > 0
    assert not model.losses  # nothing was added as a side effect


def test_keras_round_trip_2d(tmp_path):
    shape = (24, 20)
    model = dirnet_tf.DIRNet(shape, (8, 4), boundary="zeros", filters=[4, 6, 8, 8],
                             pointwise_filters=[5, 3], batch_norm=True, similarity="lncc",
                             bending_weight=0.1)
    _randomize_output_layer(model)
    fixed, moving = _pair(shape, seed=4)
    # A training-mode call updates the batch-norm statistics away from their init values.
    bn = model.regressor._stack[1]
    assert isinstance(bn, keras.layers.BatchNormalization)
    model({"fixed": fixed, "moving": moving}, training=True)
    assert np.abs(bn.moving_mean.numpy()).max() > 0
    path = os.path.join(tmp_path, "dirnet.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, dirnet_tf.DIRNet)
    assert loaded.image_shape == shape and loaded.grid_spacing == (8, 4)
    assert loaded.boundary == "zeros" and loaded.similarity == "lncc"
    assert loaded.bending_weight == 0.1
    a = model({"fixed": fixed, "moving": moving})
    b = loaded({"fixed": fixed, "moving": moving})
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_3d_forward_gradient_round_trip(tmp_path):
    shape = (8, 10, 9)
    model = dirnet_tf.DIRNet(shape, (4, 2, 4), filters=4, channels=2)
    fixed, moving = _pair(shape, batch=2, channels=2, seed=5)
    out = model({"fixed": fixed, "moving": moving})
    np.testing.assert_allclose(out["warped"].numpy(), moving, atol=1e-6)
    _randomize_output_layer(model)
    out = model({"fixed": fixed, "moving": moving})
    assert tuple(out["displacement"].shape) == (2,) + shape + (3,)
    assert tuple(out["control_points"].shape) == (2,) + dirnet_tf.control_grid_shape(
        shape, (4, 2, 4)) + (3,)
    expected = dirnet_tf.resample(moving, dirnet_tf.identity_grid(shape) + out["displacement"],
                                  boundary="border")
    np.testing.assert_allclose(out["warped"].numpy(), expected.numpy(), atol=1e-6)
    loss, grads = _grads(model, fixed, moving)
    assert np.isfinite(float(loss))
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    assert np.abs(grads[-2].numpy()).max() > 0  # output kernel
    assert sum(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads) == len(grads)
    path = os.path.join(tmp_path, "dirnet3d.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    b = loaded({"fixed": fixed, "moving": moving})
    for key in out:
        np.testing.assert_array_equal(out[key].numpy(), b[key].numpy())


def test_layers_serialise_and_compose():
    shape = (12, 10)
    transformer = layers.BSplineTransformer(shape, (4, 2))
    clone = layers.BSplineTransformer.from_config(transformer.get_config())
    grid = dirnet_tf.control_grid_shape(shape, (4, 2))
    cp = np.random.default_rng(7).normal(size=(2,) + grid + (2,)).astype(np.float32)
    np.testing.assert_array_equal(transformer(cp).numpy(), clone(cp).numpy())
    np.testing.assert_allclose(transformer(cp).numpy(),
                               dirnet_tf.bspline_displacement(cp, shape, (4, 2)).numpy())
    resampler = layers.Resampler(boundary="zeros")
    assert layers.Resampler.from_config(resampler.get_config()).boundary == "zeros"
    image = np.random.default_rng(8).random((2,) + shape + (3,), dtype=np.float32)
    disp = transformer(cp)
    np.testing.assert_allclose(
        resampler(image, disp).numpy(),
        dirnet_tf.resample(image, dirnet_tf.identity_grid(shape) + disp, "zeros").numpy(),
        atol=1e-6,
    )
    reg = layers.Regressor(shape, (4, 2), filters=[3, 4, 5], batch_norm=True)
    reg2 = layers.Regressor.from_config(reg.get_config())
    assert reg2.get_config() == reg.get_config()
    # A functional model from the three layers serialises too.
    f = keras.Input(shape + (1,))
    m = keras.Input(shape + (1,))
    cps = reg(keras.ops.concatenate([f, m], axis=-1))
    warped = layers.Resampler()(m, layers.BSplineTransformer(shape, (4, 2))(cps))
    functional = keras.Model([f, m], warped)
    restored = keras.Model.from_config(functional.get_config())
    assert [type(x).__name__ for x in restored.layers] == [
        type(x).__name__ for x in functional.layers]
    with pytest.raises(ValueError, match="boundary"):
        layers.Resampler(boundary="wrap")


def test_bad_inputs():
    model = dirnet_tf.DIRNet((16, 16), 4, filters=4)
    fixed, moving = _pair((16, 16))
    with pytest.raises(ValueError, match="'fixed' and 'moving'"):
        model({"fixed": fixed, "mov": moving})
    with pytest.raises(ValueError, match=r"expects moving of shape \[B, 16, 16, 1\]"):
        model({"fixed": fixed, "moving": moving[:, :, :15]})
    with pytest.raises(ValueError, match="similarity"):
        dirnet_tf.DIRNet((16, 16), 4, similarity="nope")
    with pytest.raises(ValueError, match="boundary"):
        dirnet_tf.DIRNet((16, 16), 4, boundary="reflect")


def test_mixed_precision_keeps_geometry_in_float32(tmp_path):
    shape = (16, 12)
    model = dirnet_tf.DIRNet(shape, 4, filters=4, dtype="mixed_float16")
    assert model.regressor._stack[0].compute_dtype == "float16"
    assert model.transformer.compute_dtype == "float32"
    assert model.resampler.compute_dtype == "float32"
    fixed, moving = _pair(shape)
    out = model({"fixed": fixed, "moving": moving})
    assert {k: v.dtype for k, v in out.items()} == {
        "warped": tf.float32, "displacement": tf.float32, "control_points": tf.float32}
    np.testing.assert_allclose(out["warped"].numpy(), moving, atol=1e-6)
    with tf.GradientTape() as tape:
        loss = model.registration_loss(fixed, model({"fixed": fixed, "moving": moving}))
    grads = tape.gradient(loss, model.trainable_weights)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    path = os.path.join(tmp_path, "mixed.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.dtype_policy.name == "mixed_float16"
    assert loaded.regressor._stack[0].compute_dtype == "float16"


def test_explicit_xla_and_symbolic_inputs():
    shape = (12, 16)
    model = dirnet_tf.DIRNet(shape, 4, filters=4)
    _randomize_output_layer(model)
    fixed, moving = _pair(shape, seed=10)
    eager = model({"fixed": fixed, "moving": moving})["warped"].numpy()
    # Inside an XLA-compiled function the resampler falls back to stock TF ops.
    xla = tf.function(lambda f, m: model({"fixed": f, "moving": m})["warped"], jit_compile=True)
    np.testing.assert_allclose(xla(fixed, moving).numpy(), eager, atol=1e-5)
    # DIRNet composes into a functional model.
    f = keras.Input(shape + (1,), name="fixed")
    m = keras.Input(shape + (1,), name="moving")
    wrapped = keras.Model({"fixed": f, "moving": m}, model({"fixed": f, "moving": m})["warped"])
    np.testing.assert_allclose(wrapped({"fixed": fixed, "moving": moving}).numpy(), eager,
                               atol=1e-6)


def test_3d_model_in_a_graph_matches_eager():
    """Inside tf.function (inference graphs, SavedModels) a 3-D DIRNet gives the eager result.
    TensorFlow 2.21's oneDNN rewrite of Pad + 'same' Conv3D drops the padding in graphs, which
    shrank the control grid by one cell per side (and the B-spline then failed to reshape)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    shape = (16, 12, 14)
    model = dirnet_tf.DIRNet(shape, 4, filters=4, convs_per_level="auto")
    _randomize_output_layer(model, scale=0.5)
    pair = {"fixed": rng.random((2,) + shape + (1,)).astype(np.float32),
            "moving": rng.random((2,) + shape + (1,)).astype(np.float32)}
    eager = model(pair, training=False)
    graph = tf.function(lambda p: model(p, training=False))(pair)
    assert graph["control_points"].shape == (2,) + model.grid_shape + (3,)
    np.testing.assert_allclose(graph["displacement"].numpy(), eager["displacement"].numpy(), atol=1e-5)
    np.testing.assert_allclose(graph["warped"].numpy(), eager["warped"].numpy(), atol=1e-5)
    assert np.abs(eager["displacement"].numpy()).max() > 0.1
