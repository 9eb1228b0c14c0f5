"""experiments.echo: pydicom's real echocardiogram, its sector mask, cycle consistency, a tiny run."""

import copy
import json
import os

import numpy as np
import pytest
from absl import flags

from experiments import common, echo


def _config(*argv):
    """The flag values of ``python -m experiments.echo ARGV`` (parsed into a copy of the flags)."""
    values = copy.deepcopy(flags.FLAGS)
    for name, value in echo.DEFAULTS.items():
        values.set_default(name, value)
    values(["echo", *argv])
    return {name: values[name].value for name in common._DEFINED}


@pytest.fixture(scope="module")
def cine():
    """The example file's frames, stacked ``[T, H, W]``, its region box and the sector mask."""
    pytest.importorskip("pydicom")
    path = echo.example_file()
    frames = echo.read_cine(path)
    stack = np.stack([f.array for f in frames])
    box = echo.ultrasound_box(path, frames[0])
    return {"path": path, "frames": frames, "stack": stack, "box": box, "mask": echo.sector_mask(stack, box)}


def test_example_cine_is_30_grey_frames_with_the_corrected_pixel_size(cine):
    frames = cine["frames"]
    assert os.path.basename(cine["path"]) == "examples_ybr_color.dcm"
    assert len(frames) == 30 and {f.shape for f in frames} == {(240, 320)}
    assert len({f.group for f in frames}) == 1 and cine["stack"].ndim == 3  # grey, one cine
    np.testing.assert_allclose(frames[0].spacing, (1.021, 1.021), atol=1e-3)  # 2 x 0.5105 mm
    # The region box (x 84-595, y 31-414 in the metadata) halved, as the reader does.
    assert cine["box"] == (15, 207, 42, 298)


def test_sector_mask_covers_the_fan_and_excludes_the_static_overlay(cine):
    mask, stack, (r0, r1, c0, c1) = cine["mask"], cine["stack"], cine["box"]
    assert mask.shape == (240, 320) and mask.dtype == bool
    assert 0.15 < mask.mean() < 0.40
    # Inside the ultrasound region box only.
    outside_box = np.ones_like(mask)
    outside_box[r0:r1 + 1, c0:c1 + 1] = False
    assert not mask[outside_box].any()
    # Hand-checked pixels (row, column) inside the fan: septum, LV cavity, valve plane, far field.
    for point in [(130, 160), (100, 175), (150, 145), (185, 160), (60, 170)]:
        assert mask[point], point
    # ... and outside it: the "PLA" label, the orientation marker, the depth scale, "19", the status bar.
    for point in [(5, 15), (20, 190), (100, 300), (202, 292), (230, 160), (5, 305)]:
        assert not mask[point], point
    # Every visible pixel that never changes over time (text, markers, scale) is outside the mask.
    std, mean = stack.std(axis=0), stack.mean(axis=0)
    static_overlay = (std < 1e-3) & (mean > 10)
    assert static_overlay.sum() > 500  # the overlay is there ...
    assert not (static_overlay & mask).any()  # ... and none of it in the sector
    # The strongly changing pixels (the beating heart) are inside.
    moving = std > 0.3 * np.percentile(std, 99)
    assert (moving & mask).sum() > 0.97 * moving.sum()


def test_sector_mask_of_a_synthetic_fan_with_static_text():
    """A flickering fan with a static bright label inside: the label is cut out, the fan kept."""
    rng = np.random.default_rng(0)
    t, h, w = 12, 80, 100
    rows, cols = np.mgrid[:h, :w]
    angle = np.arctan2(cols - 50, rows - 5)
    fan = (np.hypot(rows - 5, cols - 50) < 70) & (np.abs(angle) < 0.6) & (rows > 5)
    frames = 20 * rng.random((t, h, w)) * fan + 5 * fan
    frames[:, 40:44, 45:55] = 200.0  # static text inside the fan
    frames[:, 2:6, 2:12] = 200.0  # static text outside
    mask = echo.sector_mask(frames)
    assert not mask[40:44, 45:55].any() and not mask[2:6, 2:12].any()
    assert mask[60, 50] and mask[30, 50] and not mask[70, 5]
    inner = fan.copy()
    inner[36:48, 41:59] = False
    assert mask[inner].mean() > 0.95


def test_cycle_residual_of_translations():
    """A translation and its inverse give 0; two equal translations give twice the shift."""
    shift = np.array([1.5, -2.0], np.float32)
    forward = np.broadcast_to(shift, (2, 16, 20, 2)).copy()
    spacing = (2.0, 0.5)
    zero = echo.cycle_residual(forward, -forward, spacing=spacing)
    np.testing.assert_allclose(zero["pixels"], 0, atol=1e-6)
    np.testing.assert_allclose(zero["mm"], 0, atol=1e-6)
    twice = echo.cycle_residual(forward, forward, spacing=spacing)
    np.testing.assert_allclose(twice["pixels"], 2 * np.linalg.norm(shift), rtol=1e-6)
    np.testing.assert_allclose(twice["mm"], 2 * np.linalg.norm(shift * np.array(spacing)), rtol=1e-6)
    # One pair ([H, W, 2]) and a mask: the mean is over the masked pixels only.
    mask = np.zeros((16, 20), bool)
    mask[4:8, 5:9] = True
    one = echo.cycle_residual(forward[0], 0.5 * forward[0], mask=mask)
    np.testing.assert_allclose(one["pixels"], [1.5 * np.linalg.norm(shift)], rtol=1e-6)


def test_cycle_residual_of_a_contraction_and_its_exact_inverse():
    """x -> c + s (x - c) and y -> c + (y - c) / s compose to the identity (linear fields are
    interpolated exactly), so the residual is 0 where the round trip stays inside the grid."""
    h, w, s = 24, 30, 0.8
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    grid = np.stack(np.mgrid[:h, :w], axis=-1).astype(np.float64)
    forward = ((s - 1) * (grid - centre))[None].astype(np.float32)
    backward = ((1 / s - 1) * (grid - centre))[None].astype(np.float32)
    inner = np.zeros((h, w), bool)
    inner[4:-4, 4:-4] = True
    np.testing.assert_allclose(echo.cycle_residual(forward, backward, mask=inner)["pixels"], 0, atol=1e-4)
    # The other order is inconsistent by |(s - 1) + (1/s - 1)| times the distance to the centre.
    wrong = echo.cycle_residual(forward, forward, mask=inner)["pixels"][0]
    expected = np.linalg.norm(((s - 1) * (2 + (s - 1))) * (grid - centre), axis=-1)[inner].mean()
    np.testing.assert_allclose(wrong, expected, rtol=1e-4)


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
    from dirnet_tf import metrics
    from dirnet_tf.inference import load_export, predict
    from experiments import train

    cfg = dict(config, images=echo.example_file(), mask=str(logdir / "sector_mask.npy"), shape="48,48",
               spacing=",".join(str(s) for s in section["model_grid"]["spacing_mm"]))
    data = train.load_collection(cfg)
    test = train.make_splits_and_pairs(cfg, data)["test"]
    frame = echo.read_cine(cfg["images"])[0]
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
