"""dirnet_tf.training: pair sampler, resume, NaN guard, loss, export, evaluation helpers."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

import dirnet_tf
from dirnet_tf import training

SHAPE = (16, 16)


def _images(n=40, seed=0):
    """Blobs at random positions: enough structure for NCC to have gradients."""
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    centres = rng.uniform(5, 11, (n, 2))
    widths = rng.uniform(1.5, 3.0, n)
    images = np.exp(-((ii - centres[:, 0, None, None]) ** 2 + (jj - centres[:, 1, None, None]) ** 2)
                    / (2 * widths[:, None, None] ** 2))
    return images[..., None].astype(np.float32), rng.integers(0, 3, n)


def _model():
    return dirnet_tf.DIRNet(SHAPE, 4, filters=4)


def _trainer(logdir, steps, sampler=None, **kw):
    images, groups = _images()
    sampler = sampler or training.same_group_pair_sampler(images, groups, 4, seed=3)
    kw = dict(dict(lr_schedule="constant", log_every=2, checkpoint_every=2), **kw)
    return training.Trainer(_model, training.make_registration_loss("ncc"), sampler, str(logdir), steps=steps,
                            batch_size=4, learning_rate=1e-2, eval_every=0, seed=1,
                            print_fn=lambda *a: None, **kw)


def test_same_group_sampler_is_deterministic_per_step():
    images, groups = _images(60)
    groups[-1] = 7  # a group of one image can never be paired
    # encode the image index in the pixels to recover which images were drawn
    tagged = images.copy()
    tagged[:, 0, 0, 0] = np.arange(len(images))
    sample = training.same_group_pair_sampler(tagged, groups, 64, seed=11)
    a = sample(tf.constant(5, tf.int64))
    b = sample(tf.constant(5, tf.int64))
    c = sample(tf.constant(6, tf.int64))
    np.testing.assert_array_equal(a["fixed"].numpy(), b["fixed"].numpy())
    assert not np.array_equal(a["fixed"].numpy(), c["fixed"].numpy())
    seen = set()
    for step in range(20):
        batch = sample(tf.constant(step, tf.int64))
        fi = batch["fixed"].numpy()[:, 0, 0, 0].astype(int)
        mi = batch["moving"].numpy()[:, 0, 0, 0].astype(int)
        assert (groups[fi] == groups[mi]).all()
        assert (fi != mi).all()
        np.testing.assert_array_equal(batch["fixed"].numpy()[:, 1:], images[fi][:, 1:])
        seen.update(fi.tolist())
    assert len(images) - 1 not in seen
    assert len(seen) >= 50  # covers (nearly) every pairable image
    # a resumed stream continues the same sequence
    it = training.make_input_iterator(sample, 64, start_step=3)
    np.testing.assert_array_equal(next(it)["fixed"].numpy(), sample(tf.constant(3, tf.int64))["fixed"].numpy())
    np.testing.assert_array_equal(next(it)["moving"].numpy(), sample(tf.constant(4, tf.int64))["moving"].numpy())
    with pytest.raises(ValueError, match="no group has two images"):
        training.same_group_pair_sampler(images[:3], np.arange(3), 4)


def test_registration_loss_matches_numpy():
    rng = np.random.default_rng(0)
    fixed = rng.random((3, 8, 8, 1)).astype(np.float32)
    warped = rng.random((3, 8, 8, 1)).astype(np.float32)
    cps = rng.normal(size=(3,) + dirnet_tf.control_grid_shape((8, 8), 4) + (2,)).astype(np.float32)
    out = {"warped": warped, "control_points": cps,
           "displacement": dirnet_tf.bspline_displacement(cps, (8, 8), 4)}
    per_pair, parts = training.make_registration_loss("ncc")({"fixed": fixed}, out)

    def ncc(a, b):  # the documented definition of dirnet_tf.losses.ncc (eps = 1e-5)
        a, b = a - a.mean(), b - b.mean()
        return (a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean() + 1e-5)

    ref = np.array([ncc(f, w) for f, w in zip(fixed, warped)])
    np.testing.assert_allclose(parts["ncc"].numpy(), ref, atol=1e-4)
    np.testing.assert_allclose(per_pair.numpy(), -ref, atol=1e-4)
    mse, _ = training.make_registration_loss("mse")({"fixed": fixed}, out)
    np.testing.assert_allclose(mse.numpy(), ((fixed - warped) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
    reg, parts = training.make_registration_loss("ncc", bending_weight=0.5, folding_weight=2.0,
                                                 image_shape=(8, 8), grid_spacing=4)({"fixed": fixed}, out)
    np.testing.assert_allclose(
        reg.numpy(), -ref + 0.5 * parts["bending_energy"].numpy() + 2.0 * parts["folding_penalty"].numpy(),
        rtol=1e-5, atol=1e-5)
    assert (parts["bending_energy"].numpy() > 0).all()
    with pytest.raises(ValueError, match="unknown similarity"):
        training.make_registration_loss("nope")


def _weights(trainer):
    return [v.numpy() for v in trainer.model.weights]


def test_resume_continues_the_same_run(tmp_path):
    straight = _trainer(tmp_path / "a", 6)
    result = straight.train()
    assert result["step"] == 6 and result["resumed_from"] is None and np.isfinite(result["last_loss"])

    first = _trainer(tmp_path / "b", 3, config={"steps": 3, "seed": 1})
    first.train()
    assert int(first.step.numpy()) == 3
    with open(tmp_path / "b" / "flags.json") as f:
        assert json.load(f) == {"steps": 3, "seed": 1}
    resumed = _trainer(tmp_path / "b", 6)
    result = resumed.train()
    assert result["resumed_from"].endswith("ckpt-3")
    assert result["step"] == 6
    assert resumed.manager.latest_checkpoint.endswith("ckpt-6")
    for a, b in zip(_weights(straight), _weights(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # the run moved away from the initial weights (so the comparison means something)
    fresh = _trainer(tmp_path / "c", 0)
    assert max(np.abs(a - b).max() for a, b in zip(_weights(fresh), _weights(straight))) > 1e-3
    # --noresume starts again from step 0
    again = _trainer(tmp_path / "b", 2, resume=False)
    assert again.train()["step"] == 2


def test_steps_per_execution_and_xla_step_train_the_same_model(tmp_path):
    """Several steps per tf.function call, and the XLA-compiled step (which swaps the
    op for its pure-TF twin), follow the one-step-per-call trajectory."""
    runs = {}
    for name, kw in {"one": dict(steps_per_execution=1), "five": dict(steps_per_execution=5),
                     "xla": dict(steps_per_execution=5, jit_compile=True)}.items():
        trainer = _trainer(tmp_path / name, 7, log_every=100, checkpoint_every=100, **kw)
        calls = []
        step_fn = trainer._make_train_step()

        def counting(iterator, n, step_fn=step_fn, calls=calls):
            calls.append(int(n))
            return step_fn(iterator, n)

        trainer._train_step = counting
        summary = trainer.train()
        assert summary["step"] == 7 and int(trainer.step.numpy()) == 7
        runs[name] = (_weights(trainer), calls, _dirnet_ops(step_fn))
    assert runs["one"][1] == [1] * 7
    assert runs["five"][1] == [5, 2] and runs["xla"][1] == [5, 2]  # never past the end
    fresh = _weights(_trainer(tmp_path / "fresh", 0))
    assert max(np.abs(a - b).max() for a, b in zip(fresh, runs["one"][0])) > 1e-3
    for other in ("five", "xla"):
        for a, b in zip(runs["one"][0], runs[other][0]):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    # the plain step runs the compiled op; inside XLA the pure-TF twin replaces it
    assert "Dirnet>Resample" in runs["five"][2] and "Dirnet>ResampleGrad" in runs["five"][2]
    assert not runs["xla"][2]


def _dirnet_ops(fn):
    found = set()
    for concrete in fn._list_all_concrete_functions():
        graph = concrete.graph.as_graph_def()
        nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
        found.update(n.op for n in nodes if n.op.startswith("Dirnet"))
    return found


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    images, groups = _images()
    good = training.same_group_pair_sampler(images, groups, 4, seed=0)

    def poisoned(step):
        batch = good(step)
        poison = tf.where(step >= 4, np.float32(np.nan), np.float32(0.0))
        return {"fixed": batch["fixed"] + poison, "moving": batch["moving"]}

    trainer = _trainer(tmp_path, 10, sampler=poisoned)
    with pytest.raises(training.TrainingDivergedError, match=r"nan at step 5.*ckpt-4"):
        trainer.train()
    assert trainer.manager.latest_checkpoint.endswith("ckpt-4")
    assert not any(name.startswith("ckpt-5") for name in os.listdir(tmp_path))


def test_export_is_atomic_and_matches_the_model(tmp_path):
    model = _model()
    rng = np.random.default_rng(1)
    final = model.regressor.trainable_variables[-2:]
    for v in final:  # a non-trivial deformation
        v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))
    target = tmp_path / "exports" / "m"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old export")
    training.export_saved_model(model, str(target), SHAPE, 1, metadata={"grid_spacing": 4})
    assert not (target / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path / "exports")) == ["m"]  # no temp dirs left
    with open(target / "assets" / "dirnet.json") as f:
        assert json.load(f) == {"grid_spacing": 4}
    fn = tf.saved_model.load(str(target)).signatures["serving_default"]
    images, _ = _images(6)
    out = fn(fixed=tf.constant(images[:3]), moving=tf.constant(images[3:]))
    assert set(out) == {"warped", "displacement"}
    assert out["warped"].shape == (3,) + SHAPE + (1,) and out["displacement"].shape == (3,) + SHAPE + (2,)
    ref = model({"fixed": images[:3], "moving": images[3:]})
    np.testing.assert_allclose(out["displacement"].numpy(), ref["displacement"].numpy(), atol=1e-5)
    disp = out["displacement"].numpy()
    assert np.abs(disp).max() > 0.1
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    for b in range(3):
        coords = (grid + disp[b]).transpose(2, 0, 1)
        expected = ndimage.map_coordinates(images[3 + b, ..., 0], coords, order=1, mode="nearest")
        np.testing.assert_allclose(out["warped"].numpy()[b, ..., 0], expected, atol=1e-5)
    pred = training.predict(fn, images[:3], images[3:], batch_size=2)
    np.testing.assert_allclose(pred["warped"], out["warped"].numpy(), atol=1e-6)
    timing = training.time_per_pair(model, images[:3], images[3:], batch_size=8, repeats=3, warmup=1)
    assert timing["ms_per_pair"] > 0 and timing["batch_size"] == 8 and len(timing["times_s"]) == 3


def test_mixed_precision_is_dtype_correct_on_cpu(tmp_path):
    trainer = _trainer(tmp_path, 2, mixed_precision=True)
    assert trainer.model.regressor.compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in trainer.model.trainable_variables)
    assert keras_policy_name() == "float32"  # the global policy is restored
    result = trainer.train()
    assert np.isfinite(result["last_loss"])
    images, _ = _images(4)
    out = trainer.model({"fixed": images[:2], "moving": images[2:]})
    assert out["warped"].dtype == tf.float32 and out["displacement"].dtype == tf.float32


def keras_policy_name():
    import keras

    return keras.mixed_precision.dtype_policy().name


def test_parse_int_list_and_flags_file(tmp_path):
    assert training.parse_int_list("32") == 32
    assert training.parse_int_list("8, 16,32") == [8, 16, 32]
    assert training.parse_int_list("") is None
    with pytest.raises(ValueError, match="comma list"):
        training.parse_int_list("8,x")
    path = training.dump_flags(str(tmp_path / "d"), {"b": 1, "a": "x"})
    with open(path) as f:
        assert json.load(f) == {"a": "x", "b": 1}


def test_auto_regressor_levels_fit_every_grid_spacing():
    for spacing in (1, 2, 4, 8, 16):
        levels = int(np.log2(spacing)) + 1
        widths = training.regressor_levels(spacing, "auto", training.auto_filters)
        convs = training.regressor_levels(spacing, "auto", training.auto_convs_per_level)
        assert len(widths) == levels and len(convs) == levels
        assert widths[0] == training.AUTO_FILTERS[0] and convs[-1] == 2 and set(convs[:-1]) <= {1}
        assert all(w == training.AUTO_FILTERS[-1] for w in widths[len(training.AUTO_FILTERS):])
    assert training.regressor_levels(8, "16,32,48,48", training.auto_filters) == [16, 32, 48, 48]
    assert training.regressor_levels(8, "auto", training.auto_convs_per_level) == [1, 1, 1, 2]
    assert training.regressor_levels(4, "24", training.auto_filters) == 24
    # The auto widths build a working 28x28 model at spacing 4 (3 levels) and 8 (4 levels).
    for spacing in (4, 8):
        config = {"grid_spacing": spacing, "filters": "auto", "convs_per_level": "auto"}
        model = training.build_dirnet((28, 28), config)
        assert model.regressor.filters == training.regressor_levels(spacing, "auto", training.auto_filters)
