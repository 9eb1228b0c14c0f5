"""experiments.synthbrain and data.brain_labels: defaults, label maps, a tiny run that is interrupted,
resumes and exports a model that dirnet_tf.load_model loads."""

import copy
import json
import os

import numpy as np
import pytest
from absl import flags

from data import brain_labels
from experiments import common, synthbrain
from test_brain_data import needs_volumes  # the [brain] extra: one skip rule


def _config(*argv):
    values = copy.deepcopy(flags.FLAGS)
    for name, value in synthbrain.DEFAULTS.items():
        values.set_default(name, value)
    values(["synthbrain", *argv])
    return {name: values[name].value for name in common.defined_flags()}


def _tiny(tmp_path, *argv):
    return _config(f"--logdir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'export'}", "--shape=16,18,16",
                   "--spacing=12", "--stages=affine,4", "--steps=4", "--eval_pairs=1", "--log_every=1",
                   "--eval_every=2", "--checkpoint_every=1", "--synth_sources=shapes=1", *argv)


def test_defaults():
    config = _config()
    expected = dict(shape="96,112,96", spacing="2", stages="affine,16,8", passes=1, bounded=True, symmetric=True,
                    normalize_inputs=True, bending_weight=0.01, stagewise=False, batch_size=1, steps=3000,
                    label_loss="dice", logdir=os.path.join("runs", "synthbrain"),
                    export_dir=os.path.join("exports", "synthbrain"))
    assert {k: config[k] for k in expected} == expected
    assert synthbrain.parse_sources(config["synth_sources"]) == {"mni": 0.3, "robex": 0.2, "robex_head": 0.2,
                                                                 "shapes": 0.3}


def test_bad_sources():
    with pytest.raises(ValueError, match="unknown label map 'oasis'"):
        synthbrain.parse_sources("oasis=1")
    with pytest.raises(ValueError, match="at least one positive"):
        synthbrain.parse_sources("mni=0")
    with pytest.raises(ValueError, match=">= 0"):
        synthbrain.parse_sources("mni=-1,shapes=1")


def test_kmeans_1d_finds_the_three_levels():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(m, 0.05, 500) for m in (2.0, 0.5, 1.2)])
    centres, assignment = brain_labels.kmeans_1d(values, 3)
    np.testing.assert_allclose(centres, [0.5, 1.2, 2.0], atol=0.02)
    assert assignment[:500].tolist() == [2] * 500 and assignment[500:1000].tolist() == [0] * 500


def test_t2_like_contrast_follows_the_tissues_and_is_not_monotonic():
    rng = np.random.default_rng(3)
    tissue = rng.integers(1, 4, size=(20, 20, 20))  # 1 CSF, 2 grey, 3 white matter
    tissue[:3] = 0
    t1 = np.choose(tissue, [0.0, 0.25, 0.55, 0.85]) + np.where(tissue > 0, rng.normal(0, 0.02, tissue.shape), 0)
    t2 = brain_labels.t2_like_contrast(t1, tissue > 0)
    assert t2.dtype == np.float32 and t2.shape == t1.shape and np.all(t2[:3] == 0)
    means = [float(t2[tissue == k].mean()) for k in (1, 2, 3)]  # CSF: the peak of the map, noise lowers it
    levels = brain_labels.T2_LIKE_LEVELS
    np.testing.assert_allclose(means, [levels["CSF"], levels["grey matter"], levels["white matter"]], atol=0.06)
    # Each label's intensities stay with that label (no two tissues overlap), and the order is not T1's.
    assert t2[tissue == 1].min() > t2[tissue == 2].max() > 0 and t2[tissue == 2].min() > t2[tissue == 3].max()
    t1_order = np.argsort([t1[tissue == k].mean() for k in (0, 1, 2, 3)])
    t2_order = np.argsort([t2[tissue == k].mean() for k in (0, 1, 2, 3)])
    assert t1_order.tolist() == [0, 1, 2, 3] and t2_order.tolist() == [0, 3, 2, 1]
    with pytest.raises(ValueError, match="mask is empty"):
        brain_labels.t2_like_contrast(t1, np.zeros_like(tissue))


def test_mni_labels_derive_csf():
    gm = np.zeros((20, 20, 20))
    wm = np.zeros((20, 20, 20))
    gm[4:16, 4:16, 4:16] = 0.9
    wm[7:13, 7:13, 7:13], gm[7:13, 7:13, 7:13] = 0.8, 0.1
    gm[9:11, 9:11, 9:11] = wm[9:11, 9:11, 9:11] = 0.1  # a "ventricle" inside the white matter
    labels = brain_labels.mni_label_map(gm, wm)
    assert labels[0, 0, 0] == 0 and labels[5, 5, 5] == 2 and labels[8, 8, 8] == 3
    assert np.all(labels[9:11, 9:11, 9:11] == 1)


@needs_volumes
def test_canonical_label_maps_on_a_small_grid():
    maps, affines = brain_labels.canonical_label_maps((24, 28, 24), 8.0)
    assert maps.shape == (3, 24, 28, 24) and set(affines) == set(brain_labels.SOURCES)
    mni, robex, head = maps
    assert set(np.unique(mni)) == {0, 1, 2, 3} and set(np.unique(robex)) == {0, 1, 2, 3}
    assert set(np.unique(head)) == set(range(7))
    # the same brain (each map resampled per label on its own: a few boundary voxels may differ)
    assert np.mean(np.where(head <= 3, head, 0) != robex) < 1e-3
    for m in (mni, robex):  # the brain is centred in the box and fits in it
        centre = np.argwhere((m >= 1) & (m <= 3)).mean(axis=0)
        np.testing.assert_allclose(centre, (np.array([24, 28, 24]) - 1) / 2, atol=1.0)
        assert not np.any(m[0]) and not np.any(m[-1])
    assert (np.sum(mni == 3) > 0.5 * np.sum(mni == 2))  # white matter is not a sliver


def test_tiny_run_is_interrupted_resumes_and_exports(tmp_path):
    import dirnet_tf

    lines = []

    def interrupt_at_step_3(*args):
        line = " ".join(str(a) for a in args)
        lines.append(line)
        if line.startswith("[train] step 3/4"):
            raise KeyboardInterrupt

    config = _tiny(tmp_path)
    with pytest.raises(KeyboardInterrupt, match="resume from the last checkpoint \\(step 2\\)"):
        synthbrain.run(config, print_fn=interrupt_at_step_3)
    assert any(line.startswith("[valid] step 2:") and "dice" in line for line in lines)
    resumed = []
    result = synthbrain.run(config, print_fn=lambda *a: resumed.append(" ".join(str(x) for x in a)))
    assert any("resumed from" in line and "at step 2" in line for line in resumed)
    assert [line.split()[2] for line in resumed if line.startswith("[train] step")] == ["3/4", "4/4"]
    assert result["step"] == 4 and 0 <= result["best_validation_dice"] <= 1
    assert result["test"]["pairs"] == 1 and result["test"]["folding_fraction"] == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 4
    # Exporting again (another folder, no scoring) keeps what the training run measured.
    again = synthbrain.run(dict(config, export_only=True, evaluate=False, export_dir=str(tmp_path / "again")),
                           print_fn=lambda *a: None)
    assert os.path.exists(tmp_path / "again" / "saved_model.pb")
    kept = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again == kept and kept["model"] == str(tmp_path / "again") and kept["test"] == metrics["test"]
    assert {k: kept[k] for k in ("step", "train_seconds", "best_validation_dice", "summary")} == {
        k: metrics[k] for k in ("step", "train_seconds", "best_validation_dice", "summary")}
    model = dirnet_tf.load_model(str(tmp_path / "export"))
    assert model.shape == (16, 18, 16) and model.grid.spacing == (12.0, 12.0, 12.0)
    assert [s["kind"] for s in model.steps] == ["affine", "spline"]
    assert model.metadata["space"] == "world" and model.metadata["training"]["label_loss"] == "dice"
    assert model.metadata["model_grid"]["normalize"] == "percentile"
    assert set(model.metadata["training"]["licences"].values()) >= {"BSD-3-Clause (nilearn 0.14.1)"}
    rng = np.random.default_rng(0)
    pair = rng.uniform(size=(2, 1, 16, 18, 16, 1)).astype(np.float32)
    out = model.fn(fixed=pair[0], moving=pair[1])
    assert out["displacement"].shape == (1, 16, 18, 16, 3)
