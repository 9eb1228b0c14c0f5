"""dirnet_tf.inference: atomic SavedModel export, loading, prediction and timing."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from dirnet_tf.inference import export_saved_model, load_export, predict, time_per_pair
from test_trainer import SHAPE, blob_images, small_model


def test_export_is_atomic_and_matches_the_model(tmp_path):
    model = small_model()
    rng = np.random.default_rng(1)
    final = model.regressor.trainable_variables[-2:]
    for v in final:  # a non-trivial deformation
        v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))
    target = tmp_path / "exports" / "m"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old export")
    export_saved_model(model, str(target), SHAPE, 1, metadata={"grid_spacing": 4})
    assert not (target / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path / "exports")) == ["m"]  # no temp dirs left
    with open(target / "assets" / "dirnet.json") as f:
        assert json.load(f) == {"grid_spacing": 4}
    fn, metadata = load_export(str(target))
    assert metadata == {"grid_spacing": 4}
    images, _ = blob_images(6)
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
    pred = predict(fn, images[:3], images[3:], batch_size=2)
    np.testing.assert_allclose(pred["warped"], out["warped"].numpy(), atol=1e-6)
    timing = time_per_pair(model, images[:3], images[3:], batch_size=8, repeats=3, warmup=1)
    assert timing["ms_per_pair"] > 0 and timing["batch_size"] == 8 and len(timing["times_s"]) == 3


def test_a_failing_export_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    """Writing into the target only once the new export is complete: removing the old export
    first (then saving in place) would lose it when the second save fails half-way."""
    import dirnet_tf.inference as inference

    model = small_model()
    images, _ = blob_images(6)
    target = tmp_path / "m"
    export_saved_model(model, str(target), SHAPE, 1, metadata={"version": 1})
    before = sorted(os.listdir(target))
    first, _ = load_export(str(target))
    expected = first(fixed=tf.constant(images[:3]), moving=tf.constant(images[3:]))["warped"].numpy()

    def broken_save(obj, export_dir, signatures=None, **kwargs):
        os.makedirs(os.path.join(export_dir, "variables"), exist_ok=True)
        with open(os.path.join(export_dir, "saved_model.pb"), "wb") as fh:
            fh.write(b"half")  # a partial write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(inference.tf.saved_model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_saved_model(model, str(target), SHAPE, 1, metadata={"version": 2})
    monkeypatch.undo()
    assert sorted(os.listdir(target)) == before
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary directory left behind
    again, metadata = load_export(str(target))
    assert metadata == {"version": 1}
    np.testing.assert_array_equal(
        again(fixed=tf.constant(images[:3]), moving=tf.constant(images[3:]))["warped"].numpy(), expected)


def _composed_model(stages=("affine", 8, 4)):
    import dirnet_tf

    model = dirnet_tf.DIRNet(SHAPE, 4, filters=4, stages=stages, passes=2, bounded=True, symmetric=True)
    rng = np.random.default_rng(3)
    for v in model.trainable_variables:
        v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))
    return model


def test_export_of_composed_steps_serves_every_step(tmp_path):
    """A model of composed steps: ``step_0`` ... ``step_4`` hold each step's exact parameters, named
    in the metadata, and composing them (last step applied first) gives the served total field.

    Plausible bugs caught: a step left out or served out of order, the affine parameters
    before the symmetric difference or the control points before the bound, metadata that
    names other outputs than the signature's.
    """
    from dirnet_tf.affine import affine_displacement
    from dirnet_tf.bspline import bspline_displacement
    from dirnet_tf.warping import compose_displacements

    model = _composed_model()
    target = str(tmp_path / "m")
    export_saved_model(model, target, SHAPE, 1, metadata={"grid_spacing": 4})
    fn, metadata = load_export(target)
    assert metadata["grid_spacing"] == 4
    assert metadata["steps"] == [{"kind": "affine", "grid_spacing": None, "output": "step_0"}] + [
        {"kind": "spline", "grid_spacing": [s, s], "output": f"step_{n}"} for n, s in ((1, 8), (2, 8), (3, 4), (4, 4))]
    images, _ = blob_images(4)
    out = fn(fixed=tf.constant(images[:2]), moving=tf.constant(images[2:]))
    assert set(out) == {"warped", "displacement"} | {f"step_{n}" for n in range(5)}
    assert out["step_0"].shape == (2, 6) and out["step_1"].shape == (2, 5, 5, 2) and out["step_3"].shape == (2, 7, 7, 2)
    ref = model({"fixed": images[:2], "moving": images[2:]})
    for n, params in enumerate(ref["step_params"]):
        np.testing.assert_allclose(out[f"step_{n}"].numpy(), params.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["step_4"].numpy(), ref["control_points"].numpy(), atol=1e-5)
    total = None
    for step in metadata["steps"]:
        params = out[step["output"]]
        u = (affine_displacement(params, SHAPE) if step["kind"] == "affine"
             else bspline_displacement(params, SHAPE, step["grid_spacing"]))
        total = u if total is None else compose_displacements(total, u)
    assert np.abs(out["displacement"].numpy()).max() > 0.2
    np.testing.assert_allclose(total.numpy(), out["displacement"].numpy(), atol=1e-4)
    pred = predict(fn, images[:2], images[2:], batch_size=1)  # predict keeps the step outputs
    np.testing.assert_allclose(pred["step_3"], out["step_3"].numpy(), atol=1e-6)


def test_experiment_export_records_the_steps_of_composed_models_only(tmp_path):
    """``dirnet_tf.training.export_model``: a composed model's metadata lists its steps; the paper's does not,
    and its signature keeps exactly ``warped`` and ``displacement``."""
    from types import SimpleNamespace

    import dirnet_tf
    from dirnet_tf.training import export_model

    for name, model in (("composed", _composed_model(("affine", 4))), ("paper", dirnet_tf.DIRNet(SHAPE, 4, filters=4))):
        path = export_model(SimpleNamespace(model=model), {"export_dir": str(tmp_path / name)}, SHAPE)
        fn, metadata = load_export(path)
        outputs = set(fn.structured_outputs)
        if name == "paper":
            assert "steps" not in metadata and outputs == {"warped", "displacement"}
        else:
            assert metadata["steps"] == [{"kind": "affine", "grid_spacing": None, "output": "step_0"},
                                         {"kind": "spline", "grid_spacing": [4, 4], "output": "step_1"},
                                         {"kind": "spline", "grid_spacing": [4, 4], "output": "step_2"}]
            assert metadata["stages"] == ["affine", 4] and metadata["bounded"] is True
            assert outputs == {"warped", "displacement", "step_0", "step_1", "step_2"}


def test_export_logs_nothing_and_leaves_the_loggers_as_they_were(tmp_path):
    """tf.saved_model.save logs 'Sharding callback duration', 'Function `serve` contains input
    name(s) resource with unsupported characters', 'Assets written to' at info level, and resets
    the absl logger's level on the way; the export hides the first and undoes the second."""
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("absl", "tensorflow")]
    before = [(logger, logger.level) for logger in loggers + [logging.getLogger()]]
    try:
        for logger in loggers:
            logger.setLevel(logging.DEBUG)
            logger.addHandler(handler)
        export_saved_model(small_model(), str(tmp_path / "m"), SHAPE, 1)
        export_saved_model(small_model(), str(tmp_path / "m"), SHAPE, 1)
        assert [r.getMessage() for r in records if r.levelno < logging.ERROR] == []
        assert [logger.level for logger in loggers] == [logging.DEBUG, logging.DEBUG]
        logging.getLogger("absl").info("shown again")  # the filter is gone after the export
        assert [r.getMessage() for r in records] == ["shown again"]
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        for logger, level in before:
            logger.setLevel(level)
