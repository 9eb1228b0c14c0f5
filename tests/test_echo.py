"""experiments.echo: its resolved defaults and a tiny end-to-end run on pydicom's real echocardiogram."""

import copy
import json
import os

import numpy as np
import pytest
from absl import flags

from data import echo as echo_data
from experiments import common, echo


def _config(*argv):
    """The flag values of ``python -m experiments.echo ARGV`` (parsed into a copy of the flags)."""
    values = copy.deepcopy(flags.FLAGS)
    for name, value in echo.DEFAULTS.items():
        values.set_default(name, value)
    values(["echo", *argv])
    return {name: values[name].value for name in common.defined_flags()}


def test_defaults_keep_the_example_settings():
    """The example's own model and run settings, whatever the shared flags' defaults are."""
    config = _config()
    expected = dict(pairs="sequence", max_frame_gap=8, split="0.5,0.2,0.3", split_within_groups=True, shape="auto",
                    spacing="", stages="8,4,2,2", passes=1, inference_passes=0, stagewise=False, bounded=True,
                    symmetric=True, normalize_inputs=True, bending_weight=0.1, folding_weight=0.0,
                    inverse_consistency_weight=0.0, steps=3000, batch_size=8, learning_rate=2e-3, eval_pairs=100,
                    timing_batch_size=32, downsample=2.0, mask_threshold=0.06, elastix=True, figure_pairs=6,
                    logdir=os.path.join("runs", "echo"), export_dir=os.path.join("exports", "echo"))
    assert {k: config[k] for k in expected} == expected
    assert config["elastix_parameter_file"].endswith(os.path.join("baselines", "elastix", "echo_bspline.txt"))


def test_tiny_end_to_end_run(tmp_path):
    """A few training steps at 4 mm on the last frames; metrics.json holds the train command's
    numbers and the echo section (sector NCC, folding, cycle consistency, elastix, speed-up)."""
    pytest.importorskip("pydicom")
    from dirnet_tf.elastix import elastix_available

    with_elastix = elastix_available()
    logdir, export = tmp_path / "run", tmp_path / "export"
    config = _config(f"--logdir={logdir}", f"--export_dir={export}", "--steps=6", "--log_every=3",
                     "--eval_every=3", "--checkpoint_every=3", "--downsample=4", "--max_frame_gap=1",
                     "--split=0.8,0.1,0.1", "--timing_batch_size=4", "--figure_pairs=2",
                     "--elastix" if with_elastix else "--noelastix")
    result = echo.run(config)
    with open(logdir / "metrics.json") as f:
        saved = json.load(f)
    assert saved["pairs"] == 4 and saved["split"] == {"train": 24, "valid": 3, "test": 3}
    section = saved["echo"]
    assert section == json.loads(json.dumps(result["echo"]))
    assert section["frames"] == 30 and section["test_frames"] == [27, 28, 29] and section["pairs"] == 4
    assert section["model_grid"]["shape"] == [48, 48]
    np.testing.assert_allclose(section["model_grid"]["spacing_mm"], 4.084, atol=1e-3)
    for name in ("no_registration", "dirnet") + (("elastix",) if with_elastix else ()):
        assert -1 <= section[name]["ncc_sector"] <= 1
    for name in ("dirnet",) + (("elastix",) if with_elastix else ()):
        r = section[name]
        assert 0 <= r["folding_fraction"] <= 1 and 0 <= r["folding_fraction_sector"] <= 1
        assert r["cycle_pairs"] == 4 and r["cycle_residual_pixels"] >= 0
        np.testing.assert_allclose(r["cycle_residual_mm"], 4.084 * r["cycle_residual_pixels"], rtol=1e-3)
        assert r["ms_per_pair"] > 0
    assert section["ncc_sector_by_gap"]["1"]["pairs"] == 4
    comparison = section["comparison"]
    np.testing.assert_allclose(comparison["ncc_gain"],
                               section["dirnet"]["ncc_sector"] - section["no_registration"]["ncc_sector"])
    assert ("ncc_below_elastix" in comparison) == with_elastix
    if with_elastix:
        np.testing.assert_allclose(comparison["ncc_below_elastix"],
                                   section["elastix"]["ncc_sector"] - section["dirnet"]["ncc_sector"])
        assert comparison["speedup"] == section["speedup"]
    if with_elastix:
        ratio = section["elastix"]["ms_per_pair"] / section["dirnet"]["ms_per_pair"]
        np.testing.assert_allclose(section["speedup"], ratio)
        assert section["elastix"]["parameter_file"] == os.path.join("baselines", "elastix", "echo_bspline.txt")
    # The sector NCC is that of the export's predictions inside the sector on the model grid.
    from dirnet_tf import metrics, train_data
    from dirnet_tf.config import TrainConfig
    from dirnet_tf.inference import load_export, predict

    spacing = ",".join(str(s) for s in section["model_grid"]["spacing_mm"])
    cfg = TrainConfig.from_dict(dict(config, images=echo_data.example_echo_file(), mask=str(logdir / "sector_mask.npy"),
                                     shape="48,48", spacing=spacing), extra_ok=True)
    data = train_data.load_collection(cfg)
    test = train_data.make_splits_and_pairs(cfg, data)["test"]
    frame = echo_data.read_echo_cine(cfg.images)[0]
    sector = data["grid"].prepare_labels(np.load(logdir / "sector_mask.npy").astype(np.int32), frame) > 0
    assert section["sector_pixels_model_grid"] == sector.sum() > 0
    fixed, moving = data["images"][test[:, 0]], data["images"][test[:, 1]]
    warped = predict(load_export(str(export))[0], fixed, moving)["warped"]
    expected = np.mean([metrics.ncc(f[..., 0][sector], w[..., 0][sector]) for f, w in zip(fixed, warped)])
    np.testing.assert_allclose(section["dirnet"]["ncc_sector"], expected, rtol=1e-5)
    before = np.mean([metrics.ncc(f[..., 0][sector], m[..., 0][sector]) for f, m in zip(fixed, moving)])
    np.testing.assert_allclose(section["no_registration"]["ncc_sector"], before, rtol=1e-6)
    # The sector mask is the --mask of the train command, on the frames' grid.
    mask = np.load(logdir / "sector_mask.npy")
    assert mask.shape == (240, 320) and set(np.unique(mask)) == {0, 1}
    with open(logdir / "flags.json") as f:
        recorded = json.load(f)
    assert recorded["mask"] == str(logdir / "sector_mask.npy") and recorded["pairs"] == "sequence"
    assert recorded["split_within_groups"] is True and recorded["shape"] == "48,48"
    for name in ("echo_registration.png", "echo_strip.png", "sector_mask_check.png", "registration.png"):
        assert (logdir / name).stat().st_size > 5000, name
