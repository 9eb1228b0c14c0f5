"""experiments.brain3d: its resolved defaults, the prepared volumes, a tiny end-to-end run, elastix in 3-D."""

import copy
import json
import os

import numpy as np
import pytest
from absl import flags

from data import brain as brain_data
from experiments import brain3d, common
from test_brain_data import needs_volumes  # the [brain] extra: one skip rule for both files


def _config(*argv):
    values = copy.deepcopy(flags.FLAGS)
    for name, value in brain3d.DEFAULTS.items():
        values.set_default(name, value)
    values(["brain3d", *argv])
    return {name: values[name].value for name in common.defined_flags()}


def _tiny(tmp_path, *argv):
    return _config(f"--logdir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'export'}", "--shape=24,28,24",
                   "--spacing=8", "--stages=4", "--steps=4", "--eval_pairs=2", "--log_every=2", "--eval_every=2",
                   "--checkpoint_every=2", "--timing_batch_size=1", *argv)


def test_defaults_keep_the_example_settings():
    """The example's own model and run settings, whatever the shared flags' defaults are."""
    config = _config()
    expected = dict(pairs="synthetic", shape="96,112,96", spacing="2", stages="16,8", passes=1, inference_passes=0,
                    stagewise=False, bounded=True, symmetric=True, normalize_inputs=True, bending_weight=0.01,
                    folding_weight=0.0, inverse_consistency_weight=0.0, steps=600, batch_size=1, learning_rate=2e-3,
                    lr_schedule="cosine", eval_pairs=6, timing_batch_size=2, synthetic_magnitude=12.0,
                    synthetic_spacing=32.0, synthetic_augment=4.0, brain_train_volume="mni", brain_elastix_pairs=2,
                    brain_inter_template=True, elastix=True, logdir=os.path.join("runs", "brain3d"),
                    export_dir=os.path.join("exports", "brain3d"))
    assert {k: config[k] for k in expected} == expected
    assert config["brain_elastix_parameter_file"].endswith(os.path.join("baselines", "elastix", "brain3d_bspline.txt"))


@needs_volumes
def test_prepared_volumes_are_aligned_on_the_model_grid(tmp_path):
    from dirnet_tf.config import TrainConfig

    settings = TrainConfig.from_dict(_tiny(tmp_path, "--shape=32,36,32", "--spacing=6"), extra_ok=True)
    config, inputs = brain3d.prepare_inputs(settings)
    assert config.images == inputs["mni"]["image"] and config.pairs == "synthetic"
    volumes = {name: brain3d.model_volume(config, inputs, name) for name in brain_data.BRAIN_VOLUMES}
    masks = {name: v["labels"][0] > 0 for name, v in volumes.items()}
    for name, v in volumes.items():
        assert v["images"].shape == (1, 32, 36, 32, 1) and 0 <= v["images"].min() and v["images"].max() <= 1
        centre = np.argwhere(masks[name]).mean(axis=0)
        np.testing.assert_allclose(centre, (np.array([32, 36, 32]) - 1) / 2, atol=1.0)
        assert not masks[name][0].any() and not masks[name][-1].any()  # the brain fits in the box
    from dirnet_tf import metrics

    assert metrics.dice(masks["mni"], masks["robex"])["mean"] > 0.7  # same orientation, centred
    # the superior side of the brain is at the end of the last axis (RAS): the brain is wider below
    area = masks["mni"].sum(axis=(0, 1))
    assert np.argmax(area) < 20


@needs_volumes
def test_tiny_end_to_end_run(tmp_path):
    result = brain3d.run(_tiny(tmp_path, "--noelastix"))
    report = result["brain3d"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["brain3d"]["train_volume"] == "mni" and saved["images"].endswith("mni_t1.nii.gz")
    for key, volume in (("held_out_fields", "mni"), ("held_out_volume", "robex")):
        dirnet = report[key]["dirnet"]
        assert report[key]["volume"] == volume and dirnet["pairs"] == 2
        assert 0 < dirnet["true_displacement_mm_mask"] <= 12 * np.sqrt(3)
        assert dirnet["epe_mm_mask"] >= 0 and 0 <= dirnet["folding_fraction"] <= 1
        assert 0 <= dirnet["labels"]["foreground"]["dice_after"] <= 1
        assert -1 <= dirnet["ncc_before"] <= 1 and dirnet["ms_per_pair"] > 0
    assert set(report["held_out_fields"]["dirnet"]["labels"]) == {"1", "2", "3", "foreground"}
    assert set(report["inter_template"]) == {"mni<-robex", "robex<-mni"}
    for row in report["inter_template"].values():
        assert 0.5 < row["dirnet"]["brain_dice_before"] < 1 and 0 <= row["dirnet"]["brain_dice_after"] <= 1
    assert "speedup" not in report  # no elastix
    assert report["inputs"]["mni"]["sources"][0].startswith("nilearn:")
    for name in ("brain3d_registration.png", "brain3d_templates.png", "registration.png", "eval_pairs.json",
                 "synthetic_test_fields.npz"):
        assert (tmp_path / "run" / name).stat().st_size > 500


def test_elastix_3d_recovers_a_known_translation(tmp_path):
    """Conventions of the 3-D elastix baseline as this example calls it (dirnet_tf.elastix.register_pairs
    with its parameter file): fields in voxels, ij order, backward (fixed grid)."""
    pytest.importorskip("itk")
    from dirnet_tf.elastix import elastix_available, register_pairs
    from dirnet_tf.warping import warp

    if not elastix_available():
        pytest.skip("itk-elastix is not installed")
    text = open(brain3d.ELASTIX_PARAMETER_FILE).read().replace("(MaximumNumberOfIterations 250)",
                                                                "(MaximumNumberOfIterations 60)")
    parameter_file = tmp_path / "short.txt"
    parameter_file.write_text(text)
    shape = (28, 32, 24)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    moving = np.exp(-sum((g - c) ** 2 / (2 * r ** 2) for g, c, r in zip(grid, (14, 15, 12), (5, 6, 4))))
    moving = moving[None, ..., None].astype(np.float32)
    shift = np.array([1.0, -1.5, 0.5], np.float32)  # voxels, ij
    fixed = warp(moving, np.broadcast_to(shift, (1,) + shape + (3,)).copy()).numpy()
    out = register_pairs(fixed, moving, str(parameter_file), ndim=3, spacing=(2.0, 2.0, 2.0), threads=2)
    assert out["displacement"].shape == (1,) + shape + (3,) and out["seconds"][0] > 0
    centre = out["displacement"][0, 10:18, 11:21, 8:16].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(centre, shift, atol=0.35)
