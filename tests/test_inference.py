"""dirnet_tf.inference: atomic SavedModel export, loading, prediction and timing."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from dirnet_tf.inference import export_saved_model, load_export, predict, time_per_pair
from test_trainer import SHAPE, _images, _model


def test_export_is_atomic_and_matches_the_model(tmp_path):
    model = _model()
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
    pred = predict(fn, images[:3], images[3:], batch_size=2)
    np.testing.assert_allclose(pred["warped"], out["warped"].numpy(), atol=1e-6)
    timing = time_per_pair(model, images[:3], images[3:], batch_size=8, repeats=3, warmup=1)
    assert timing["ms_per_pair"] > 0 and timing["batch_size"] == 8 and len(timing["times_s"]) == 3


def test_a_failing_export_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    """Writing into the target only once the new export is complete: removing the old export
    first (then saving in place) would lose it when the second save fails half-way."""
    import dirnet_tf.inference as inference

    model = _model()
    images, _ = _images(6)
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
