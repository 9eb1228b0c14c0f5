"""experiments.cardiac: label warping, contour metrics, pairs, the missing-data error and a tiny end-to-end run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from data import cardiac_phantom
from dirnet_tf.warping import warp_labels
from data import cardiac
from dirnet_tf.evaluation import structure_scores, summarise_structures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_slices=2, n_phases=6, size=32)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _scipy_warp_labels(labels, displacement, num_labels=3):
    """Independent reference: bilinear one-hot warping with edge clamping, then argmax."""
    h, w = labels.shape
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([ii + displacement[..., 0], jj + displacement[..., 1]])
    stack = [ndimage.map_coordinates((labels == c).astype(np.float64), coords, order=1, mode="nearest")
             for c in range(num_labels)]
    return np.argmax(np.stack(stack, -1), -1)


def _dice(a, b):
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def test_warp_labels_matches_scipy_reference():
    rng = np.random.default_rng(0)
    subj = cardiac_phantom.make_subject(rng, **TINY)
    labels = subj["labels"][:, 0]  # [2, 32, 32]
    smooth = [ndimage.gaussian_filter(rng.normal(size=(2, 32, 32)), 4, axes=(1, 2)) for _ in range(2)]
    disp = np.stack(smooth, -1)
    disp *= 3.0 / np.abs(disp).max()  # up to 3 pixels, also across the image edge
    got = warp_labels(labels, disp.astype(np.float32), cardiac.NUM_LABELS).numpy()
    assert got.shape == labels.shape and got.dtype == labels.dtype
    for k in range(2):
        ref = _scipy_warp_labels(labels[k], disp[k])
        assert np.mean(got[k] != ref) < 0.003, np.mean(got[k] != ref)
        assert not np.array_equal(got[k], labels[k])
    np.testing.assert_array_equal(
        warp_labels(labels, np.zeros(labels.shape + (2,), np.float32), cardiac.NUM_LABELS).numpy(), labels)
    with pytest.raises(ValueError, match=r"\(30, 32\) must match"):
        warp_labels(labels, np.zeros((2, 30, 32, 2), np.float32), cardiac.NUM_LABELS)


def test_contour_metrics_on_hand_made_squares():
    fixed = np.zeros((1, 30, 30), np.uint8)
    fixed[0, 5:15, 5:15] = 1
    moving = np.zeros_like(fixed)
    moving[0, 5:15, 7:17] = 1  # shifted 2 columns: overlap 10x8 -> Dice 0.8
    annotated = np.array([[True, False]])
    per_pair = structure_scores(fixed, moving, fixed, annotated, (1.5, 1.5), cardiac.STRUCTURES)
    cav = per_pair["lv_cavity"]
    assert cav["dice_before"][0] == pytest.approx(0.8)
    assert cav["dice_after"][0] == 1.0 and cav["hd95_mm_after"][0] == 0.0 and cav["mad_mm_after"][0] == 0.0
    # The left and right edges are 2 columns = 3 mm apart, the others overlap partly: HD95 is 3 mm.
    assert cav["hd95_mm_before"][0] == pytest.approx(3.0)
    assert 0.0 < cav["mad_mm_before"][0] < 3.0
    assert np.isnan(per_pair["myocardium"]["dice_before"][0])  # not annotated -> not scored
    summary = summarise_structures(per_pair, np.array([True]))
    assert summary["lv_cavity"]["pairs"] == 1 and summary["myocardium"]["pairs"] == 0
    assert summary["lv_cavity"]["dice_before"]["mean"] == pytest.approx(0.8)
    assert summary["myocardium"]["dice_after"]["mean"] is None


def test_contour_metrics_hd95_mad_in_mm_with_anisotropic_spacing():
    """HD95 / MAD (mm) per structure on hand-made label maps with 2 mm x 0.5 mm pixels.

    One 10x12 pair: label 1 (LV cavity) is a 2x2 square at rows 1-2, cols 1-2
    in the fixed map and at rows 2-3, cols 3-4 in the moving one (offset +1,
    +2 pixels; a 2x2 square is all surface).  Nearest surface pixel of the
    other mask, offset (rows, cols) -> mm = hypot(2 * rows, 0.5 * cols):

    * fixed -> moving: (1,1): (1,2) sqrt(5); (1,2): (1,1) sqrt(4.25);
      (2,1): (0,2) 1.0; (2,2): (0,1) 0.5;
    * moving -> fixed: (2,3): 0.5; (2,4): 1.0; (3,3): sqrt(4.25); (3,4): sqrt(5).

    Label 2 (myocardium) is a 3x3 block at rows 4-6, cols 0-2 in the fixed
    map (surface: the ring of 8; the centre (5, 1) is interior) and the single
    pixel (5, 5) in the moving one:

    * ring -> pixel: rows 4 and 6: (1,5) sqrt(10.25), (1,4) sqrt(8), (1,3) 2.5;
      (5,0): (0,5) 2.5; (5,2): (0,3) 1.5;
    * pixel -> ring: (5,2), (0,3) 1.5.

    The "warped" map has the fixed cavity (0 mm) and the moving myocardium.

    Plausible bugs caught: spacing not passed to the surface metrics (pixels
    reported as mm), spacing in x/y order, before/after swapped, structures
    (labels) swapped, or the wrong map compared (moving instead of warped).
    """
    fixed = np.zeros((1, 10, 12), np.uint8)
    moving = np.zeros_like(fixed)
    fixed[0, 1:3, 1:3] = 1
    moving[0, 2:4, 3:5] = 1
    fixed[0, 4:7, 0:3] = 2
    moving[0, 5, 5] = 2
    warped = np.where(fixed == 1, 1, np.where(moving == 2, 2, 0)).astype(np.uint8)

    def mm(di, dj):
        return float(np.hypot(2.0 * di, 0.5 * dj))

    cavity = [mm(1, 2), mm(1, 1), mm(0, 2), mm(0, 1), mm(0, 1), mm(0, 2), mm(1, 1), mm(1, 2)]
    myo = [mm(1, 5), mm(1, 4), mm(1, 3)] * 2 + [mm(0, 5), mm(0, 3), mm(0, 3)]
    per_pair = structure_scores(fixed, moving, warped, np.array([[True, True]]), (2.0, 0.5), cardiac.STRUCTURES)
    cav, myo_values = per_pair["lv_cavity"], per_pair["myocardium"]
    assert cav["hd95_mm_before"][0] == pytest.approx(np.percentile(cavity, 95))
    assert cav["mad_mm_before"][0] == pytest.approx(np.mean(cavity))
    assert cav["hd95_mm_after"][0] == 0.0 and cav["mad_mm_after"][0] == 0.0 and cav["dice_after"][0] == 1.0
    assert cav["dice_before"][0] == 0.0  # the squares do not overlap
    for when in ("before", "after"):
        assert myo_values[f"hd95_mm_{when}"][0] == pytest.approx(np.percentile(myo, 95))
        assert myo_values[f"mad_mm_{when}"][0] == pytest.approx(np.mean(myo))
    # Swapped or isotropic spacing gives other values, so neither bug could pass.
    for spacing in ((0.5, 2.0), (1.0, 1.0)):
        other = structure_scores(fixed, moving, warped, np.array([[True, True]]), spacing, cardiac.STRUCTURES)
        assert other["lv_cavity"]["mad_mm_before"][0] != pytest.approx(np.mean(cavity))
        assert other["myocardium"]["hd95_mm_before"][0] != pytest.approx(np.percentile(myo, 95))


def test_frames_and_ed_es_pairs():
    patients, splits = cardiac_phantom.make_phantom(2, 0, 1, seed=1, **TINY)
    images, groups = cardiac.training_frames(patients, splits["train"])
    assert images.shape == (2 * 2 * 6, 32, 32, 1) and groups.shape == (24,)
    assert np.array_equal(np.bincount(groups), [6, 6, 6, 6])  # one group per (subject, slice)
    np.testing.assert_array_equal(images[6:12, ..., 0], patients["PH-train-000"]["images"][1])
    pairs = cardiac.ed_es_pairs(patients, splits["test"])
    assert len(pairs["records"]) == 4 and pairs["fixed"].shape == (4, 32, 32, 1)
    subj = patients["PH-test-000"]
    es = int(subj["es_phase"][0])
    r0, r1 = pairs["records"][:2]
    assert (r0["direction"], r0["fixed_phase"], r0["moving_phase"]) == ("ES->ED", 0, es)
    assert (r1["direction"], r1["fixed_phase"], r1["moving_phase"]) == ("ED->ES", es, 0)
    np.testing.assert_array_equal(pairs["fixed"][0, ..., 0], subj["images"][0, 0])
    np.testing.assert_array_equal(pairs["moving_labels"][0], subj["labels"][0, es])
    np.testing.assert_array_equal(pairs["fixed"][1], pairs["moving"][0])
    assert pairs["annotated"].all()


def test_missing_data_fails_with_instructions(tmp_path):
    missing = tmp_path / "nothere.h5"
    config = dict(synthetic=False, data=str(missing), image_size=0)
    with pytest.raises(cardiac.CardiacDataError) as info:
        cardiac.load_data(config)
    message = str(info.value)
    assert str(missing) in message and "python -m data.sunnybrook --raw_dir=" in message and "--synthetic" in message
    # The command line exits with status 1, prints the instructions and trains nothing (no phantom fallback).
    logdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "experiments.cardiac", f"--data={missing}", f"--logdir={logdir}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "python -m data.sunnybrook" in proc.stderr
    assert not logdir.exists()


def test_tiny_end_to_end_phantom_run(tmp_path):
    logdir, export = tmp_path / "run", tmp_path / "export"
    args = ["--synthetic", "--steps=30", "--image_size=32", "--phantom_subjects=2,1,1", "--phantom_slices=2",
            "--phantom_phases=6", "--phantom_seed=2", "--grid_spacing=8", "--filters=8", "--batch_size=8",
            "--log_every=10", "--eval_every=15", "--checkpoint_every=15", "--timing_batch_size=8",
            "--figure_pairs=2", f"--logdir={logdir}", f"--export_dir={export}"]
    proc = subprocess.run([sys.executable, "-m", "experiments.cardiac"] + args, cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[eval]" in proc.stdout and "lv_cavity" in proc.stdout
    for name in ("metrics.json", "eval_pairs.json", "flags.json", "cardiac_registration.png", "checkpoint"):
        assert (logdir / name).exists(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(logdir))
    metrics = json.loads((logdir / "metrics.json").read_text())
    records = json.loads((logdir / "eval_pairs.json").read_text())["pairs"]
    assert metrics["pairs"] == len(records) == 4 and metrics["step"] == 30
    assert set(metrics["per_direction"]) == {"ES->ED", "ED->ES"}
    assert 0.0 <= metrics["folding_fraction"] <= 1.0 and metrics["ms_per_pair"] > 0

    # Recompute everything independently from the exported model and the regenerated phantom.
    import tensorflow as tf

    import dirnet_tf

    patients, _ = cardiac_phantom.make_phantom(2, 1, 1, seed=2, **TINY)
    served = tf.saved_model.load(str(export)).signatures["serving_default"]
    fixed = np.stack([patients[r["patient"]]["images"][r["slice"], r["fixed_phase"]] for r in records])[..., None]
    moving = np.stack([patients[r["patient"]]["images"][r["slice"], r["moving_phase"]] for r in records])[..., None]
    out = served(fixed=tf.constant(fixed), moving=tf.constant(moving))
    disp = out["displacement"].numpy()
    grid = dirnet_tf.identity_grid((32, 32)).numpy()
    expected = dirnet_tf.resample(tf.constant(moving), tf.constant(grid[None] + disp), boundary="border")
    np.testing.assert_allclose(out["warped"].numpy(), expected.numpy(), atol=1e-5)
    for structure, label in cardiac.STRUCTURES.items():
        before, after = [], []
        for k, r in enumerate(records):
            f_lab = patients[r["patient"]]["labels"][r["slice"], r["fixed_phase"]] == label
            m_lab = patients[r["patient"]]["labels"][r["slice"], r["moving_phase"]]
            before.append(_dice(f_lab, m_lab == label))
            after.append(_dice(f_lab, _scipy_warp_labels(m_lab, disp[k]) == label))
        entry = metrics["structures"][structure]
        assert entry["pairs"] == 4
        assert entry["dice_before"]["mean"] == pytest.approx(np.mean(before), abs=1e-9)
        assert entry["dice_after"]["mean"] == pytest.approx(np.mean(after), abs=0.02)
        assert entry["hd95_mm_before"]["mean"] > 0 and entry["mad_mm_before"]["mean"] > 0

    # metrics.json against an exact recomputation.  The run saves no warped labels,
    # so they are rebuilt from the export's displacements with the library's
    # warp_labels (the scipy reference above only agrees to ~1%); the surface
    # metrics use the phantom's known 1.5 mm pixels.  Catches: spacing not
    # passed (pixels reported as mm), before/after or structures swapped,
    # means over the wrong pairs.
    from dirnet_tf import metrics as M

    assert metrics["spacing_mm"] == [cardiac_phantom.DEFAULT_SPACING] * 2 == [1.5, 1.5]
    moving_labels = np.stack([patients[r["patient"]]["labels"][r["slice"], r["moving_phase"]] for r in records])
    warped_labels = warp_labels(moving_labels, disp, cardiac.NUM_LABELS, "border").numpy()
    for structure, label in cardiac.STRUCTURES.items():
        entry = metrics["structures"][structure]
        values = {k: [] for k in ("dice_after", "hd95_mm_before", "hd95_mm_after", "mad_mm_before", "mad_mm_after")}
        for k, r in enumerate(records):
            f_lab = patients[r["patient"]]["labels"][r["slice"], r["fixed_phase"]] == label
            for when, other in (("before", moving_labels[k] == label), ("after", warped_labels[k] == label)):
                values[f"hd95_mm_{when}"].append(M.hd95(f_lab, other, spacing=(1.5, 1.5)))
                values[f"mad_mm_{when}"].append(M.mad(f_lab, other, spacing=(1.5, 1.5)))
            values["dice_after"].append(_dice(f_lab, warped_labels[k] == label))
        for key, v in values.items():
            assert np.isfinite(v).all(), (structure, key)
            assert entry[key]["mean"] == pytest.approx(np.mean(v), abs=1e-9), (structure, key)


def test_load_data_from_hdf5_file_with_resizing(tmp_path):
    path = tmp_path / "cardiac.h5"
    cardiac_phantom.write_phantom(str(path), 1, 1, 1, seed=4, n_slices=1, n_phases=4, size=32, spacing=1.25)
    data = cardiac.load_data(dict(synthetic=False, data=str(path), image_size=0))
    assert data["spacing"] == [1.25, 1.25] and data["image_size"] == 32
    assert data["splits"]["test"] == ["PH-test-000"]
    original = data["patients"]["PH-test-000"]
    cropped = cardiac.load_data(dict(synthetic=False, data=str(path), image_size=24))["patients"]["PH-test-000"]
    np.testing.assert_array_equal(cropped["labels"], original["labels"][..., 4:28, 4:28])
    padded = cardiac.load_data(dict(synthetic=False, data=str(path), image_size=36))["patients"]["PH-test-000"]
    np.testing.assert_array_equal(padded["images"][..., 2:34, 2:34], original["images"])
    assert padded["images"][..., :2, :].max() == 0 and padded["labels"].shape[-2:] == (36, 36)
    # A file without test patients cannot be evaluated: a clear error, not a crash later.
    cardiac_phantom.write_phantom(str(tmp_path / "notest.h5"), 1, 1, 0, seed=4, n_slices=1, n_phases=4, size=32)
    with pytest.raises(cardiac.CardiacDataError, match=r"split\(s\) \['test'\]"):
        cardiac.load_data(dict(synthetic=False, data=str(tmp_path / "notest.h5"), image_size=0))
