"""experiments.train (dirnet_tf.train, dirnet_tf.train_data) on tiny collections the tests write: 2-D PNGs
with labels, 3-D volumes, synthetic pairs, bad input.  The settings are parsed from flags as the command
does, with ``--preset=paper`` (the paper's model: one stage, fast)."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from dirnet_tf import metrics, pair_plans, train_data
from dirnet_tf.config import PRESETS
from dirnet_tf.readers import InputError
from dirnet_tf.training import train as train_api
from experiments import common, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(*argv):
    """The TrainConfig of ``python -m experiments.train --preset=paper ARGV`` (parsed into a copy of the flags)."""
    values = copy.deepcopy(flags.FLAGS)
    for name, value in train.DEFAULTS.items():
        values.set_default(name, value)
    values(["train", *argv])
    config = common.config_from_flags({name: values[name].value for name in common.defined_flags()})
    return config.replace(**{k: v for k, v in PRESETS["paper"].items() if not values[k].present})


def _blobs(folder, shape, n, seed=0, labels_folder=None, suffix=".png"):
    """Gaussian blobs at random places (and their > 0.5 label maps) written as files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        centre = [rng.uniform(0.4 * s, 0.6 * s) for s in shape]
        radius = rng.uniform(0.15, 0.22) * min(shape)
        image = np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / (2 * radius ** 2))
        if suffix == ".png":
            Image.fromarray((image * 255).astype(np.uint8)).save(os.path.join(folder, f"im{k}.png"))
        else:
            np.save(os.path.join(folder, f"im{k}.npy"), image.astype(np.float32))
        if labels_folder:
            os.makedirs(labels_folder, exist_ok=True)
            Image.fromarray((image > 0.5).astype(np.uint8)).save(os.path.join(labels_folder, f"im{k}.png"))


def test_2d_pngs_with_labels_train_export_evaluate_and_resume(tmp_path):
    """A corrupt file is skipped and recorded; labels give Dice/HD95/MAD; metrics.json equals a
    recomputation from the export; a second run with more steps resumes."""
    _blobs(tmp_path / "img", (36, 32), 8, labels_folder=tmp_path / "lab")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    logdir, export = tmp_path / "run", tmp_path / "export"
    args = [f"--images={tmp_path / 'img'}", f"--labels={tmp_path / 'lab'}", f"--logdir={logdir}",
            f"--export_dir={export}", "--grid_spacing=4", "--batch_size=4", "--log_every=5", "--eval_every=5",
            "--checkpoint_every=5", "--split=0.5,0.25,0.25", "--learning_rate=5e-3"]
    result = train_api(_config(*args, "--steps=10"))
    with open(logdir / "skipped.json") as f:
        skipped = json.load(f)
    assert [os.path.basename(s["path"]) for s in skipped] == ["broken.png"]
    assert result["pairs"] == 2 and result["split"] == {"train": 4, "valid": 2, "test": 2}
    assert set(result["labels"]) == {"1"} and 0 <= result["labels"]["1"]["dice_after"] <= 1
    assert result["spacing_mm"] == [1.0, 1.0]
    # metrics.json holds what a recomputation from the export gives.
    from dirnet_tf.inference import load_export, predict

    with open(logdir / "metrics.json") as f:
        saved = json.load(f)
    served, metadata = load_export(str(export))
    assert metadata["model_grid"]["shape"] == [36, 32] and metadata["displacement_units"].startswith("voxels")
    data = train_data.load_collection(_config(*args))
    plan = train_data.make_splits_and_pairs(_config(*args), data)
    fixed, moving = data["images"][plan["test"][:, 0]], data["images"][plan["test"][:, 1]]
    pred = predict(served, fixed, moving)
    after = np.mean([metrics.ncc(f, w) for f, w in zip(fixed, pred["warped"])])
    np.testing.assert_allclose(saved["ncc_after"], after, rtol=1e-6)
    np.testing.assert_allclose(saved["mean_displacement_voxels"],
                               np.linalg.norm(pred["displacement"], axis=-1).mean(), rtol=1e-5)
    assert (logdir / "registration.png").stat().st_size > 1000
    # Resume: 10 more steps continue from step 10.
    again = train_api(_config(*args, "--steps=20"))
    assert again["step"] == 20
    assert json.loads((logdir / "flags.json").read_text())["steps"] == 20


def test_3d_volumes_on_an_anisotropic_model_grid(tmp_path):
    """3-D .npy volumes in one group (a CSV list), resampled with their spacing onto another
    grid; the sequence split in time (train frames before valid before test); sequence pairs."""
    _blobs(tmp_path / "vol", (18, 20, 14), 8, suffix=".npy")
    rows = "\n".join(f"vol/im{k}.npy,cine" for k in range(8))
    (tmp_path / "list.csv").write_text("image,group\n" + rows + "\n")
    config = _config(f"--images={tmp_path / 'list.csv'}", f"--logdir={tmp_path / 'run'}",
                     f"--export_dir={tmp_path / 'export'}", "--grid_spacing=4", "--batch_size=2",
                     "--steps=4", "--log_every=2", "--eval_every=2", "--default_spacing=1.5,1,2",
                     "--spacing=2", "--shape=14,12,14", "--split=0.5,0.25,0.25", "--split_within_groups",
                     "--pairs=sequence", "--max_frame_gap=1")
    data = train_data.load_collection(config)
    assert data["images"].shape == (8, 14, 12, 14, 1)
    plan = train_data.make_splits_and_pairs(config, data)
    assert plan["splits"]["train"].tolist() == [0, 1, 2, 3]
    assert plan["splits"]["valid"].tolist() == [4, 5] and plan["splits"]["test"].tolist() == [6, 7]
    assert sorted(map(tuple, plan["test"].tolist())) == [(6, 7), (7, 6)]
    result = train_api(config)
    assert result["pairs"] == 2 and result["spacing_mm"] == [2.0, 2.0, 2.0]
    assert 0 <= result["folding_fraction"] <= 1 and result["mean_displacement_mm"] >= 0
    with open(tmp_path / "run" / "flags.json") as f:
        assert json.load(f)["shape"] == "14,12,14"


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path):
    _blobs(tmp_path / "img", (20, 20), 3)
    with pytest.raises(InputError, match="--images is required"):
        train_data.load_collection(_config())
    config = _config(f"--images={tmp_path / 'img'}", "--pairs=within_group")
    data = train_data.load_collection(config)
    with pytest.raises(ValueError, match="group"):
        train_data.make_splits_and_pairs(config, data)
    np.save(tmp_path / "img" / "vol.npy", np.zeros((4, 5, 6), np.float32))
    proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--images={tmp_path / 'img'}",
                           f"--logdir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'exp'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "2-D and 3-D images are mixed" in proc.stderr and "Traceback" not in proc.stderr


def test_synthetic_pairs_from_one_image_record_the_true_fields(tmp_path):
    """--pairs=synthetic on a single 2-D image with labels: endpoint error, Dice against the true
    field, the true test fields on disk, all equal to a recomputation from the export."""
    from dirnet_tf.inference import load_export, predict
    from dirnet_tf.synthetic import endpoint_error
    from dirnet_tf.warping import warp

    _blobs(tmp_path / "img", (32, 28), 1, labels_folder=tmp_path / "lab")
    args = [f"--images={tmp_path / 'img' / 'im0.png'}", f"--labels={tmp_path / 'lab' / 'im0.png'}",
            f"--logdir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'export'}", "--pairs=synthetic",
            "--grid_spacing=4", "--batch_size=4", "--steps=6", "--log_every=3", "--eval_every=3",
            "--eval_pairs=3", "--synthetic_magnitude=3", "--synthetic_spacing=8", "--synthetic_augment=1"]
    result = train_api(_config(*args))
    assert result["pairs"] == 3 and result["split"]["train"] == 1
    assert result["synthetic"]["test_images"] == "training images" and result["synthetic"]["magnitude_mm"] == 3
    assert 0 < result["true_displacement_mm"] <= 3 * np.sqrt(2) and result["epe_mm"] > 0
    assert "epe_mm_mask" in result and result["true_displacement_mm_mask"] > 0
    assert set(result["labels"]) == {"1", "foreground"} and 0 <= result["labels"]["1"]["dice_after"] <= 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    record = json.loads((tmp_path / "run" / "eval_pairs.json").read_text())
    assert record["mode"] == "synthetic" and len(record["pairs"]) == 3 and record["true_fields_dtype"] == "float32"
    fields = np.load(tmp_path / "run" / "synthetic_test_fields.npz")
    data = train_data.load_collection(_config(*args))
    plan = train_data.make_splits_and_pairs(_config(*args), data)
    test = plan["test"]
    np.testing.assert_array_equal(fields["displacement"], test["displacement"])
    # the true field maps the moving image onto the fixed one (up to the random intensity changes)
    warped = warp(test["moving"], test["displacement"]).numpy()
    assert metrics.ncc(warped, test["fixed"]) > metrics.ncc(test["moving"], test["fixed"])
    served, _ = load_export(str(tmp_path / "export"))
    pred = predict(served, test["fixed"], test["moving"])
    np.testing.assert_allclose(saved["epe_mm"], endpoint_error(pred["displacement"], fields["displacement"],
                                                               (1.0, 1.0)).mean(), rtol=1e-5)


def test_synthetic_pairs_in_3d_with_held_out_volumes_and_a_mask(tmp_path):
    _blobs(tmp_path / "vol", (18, 20, 14), 4, suffix=".npy")
    mask = np.zeros((18, 20, 14), np.uint8)
    mask[2:-2, 2:-2, 2:-2] = 1
    np.save(tmp_path / "mask.npy", mask)
    config = _config(f"--images={tmp_path / 'vol'}", f"--mask={tmp_path / 'mask.npy'}",
                     f"--logdir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'export'}", "--pairs=synthetic",
                     "--grid_spacing=4", "--batch_size=2", "--steps=2", "--log_every=1", "--eval_every=2",
                     "--eval_pairs=2", "--default_spacing=2", "--split=0.5,0.25,0.25",
                     "--synthetic_magnitude=4", "--synthetic_spacing=8", "--timing_batch_size=2")
    result = train_api(config)
    assert result["split"] == {"train": 2, "valid": 1, "test": 1}
    assert result["synthetic"]["test_images"] == "held-out images"
    assert result["synthetic"]["control_spacing_voxels"] == [4, 4, 4]
    assert result["pairs"] == 2 and "epe_mm_mask" in result and "labels" not in result
    plan = train_data.make_splits_and_pairs(config, train_data.load_collection(config))
    assert set(plan["test"]["index"].tolist()) <= set(plan["splits"]["test"].tolist())
    assert set(plan["valid"]["index"].tolist()) <= set(plan["splits"]["valid"].tolist())


def test_synthetic_mode_parsing_and_one_image_rules(tmp_path):
    assert pair_plans.parse_pairs_spec("synthetic") == ("synthetic", None)
    with pytest.raises(pair_plans.PairingError, match="takes no argument"):
        pair_plans.parse_pairs_spec("synthetic:3")
    assert pair_plans.pair_candidates(["a"], "synthetic") is None
    with pytest.raises(pair_plans.PairingError, match="synthetic_evaluation_pairs"):
        pair_plans.evaluation_pairs(["a"], "synthetic")
    _blobs(tmp_path / "img", (20, 20), 1)
    with pytest.raises(InputError, match="needs at least two"):  # one image is enough only for synthetic pairs
        train_data.load_collection(_config(f"--images={tmp_path / 'img'}"))
    assert len(train_data.load_collection(_config(f"--images={tmp_path / 'img'}", "--pairs=synthetic"))["images"]) == 1


def _command(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_bad_arguments_name_the_flag_exit_1_and_write_nothing(tmp_path):
    """--steps=0 / -5, a missing pair list, a --shape with the wrong number of values, a --labels folder
    that matches no image: ``error: ...`` naming the flag or file, exit status 1, no traceback, and no
    file left in --logdir."""
    _blobs(tmp_path / "img", (20, 20), 4)
    _blobs(tmp_path / "other", (20, 20), 2)
    os.rename(tmp_path / "other" / "im0.png", tmp_path / "other" / "zz0.png")
    os.rename(tmp_path / "other" / "im1.png", tmp_path / "other" / "zz1.png")
    images = f"--images={tmp_path / 'img'}"
    cases = [
        ([images, "--steps=0"], "--steps=0: give the number of training steps"),
        ([images, "--steps=-5"], "--steps=-5: give the number of training steps"),
        ([images, f"--pairs=list:{tmp_path / 'missing.csv'}"], "missing.csv"),
        ([images, "--shape=28,28,28"], "--shape=28,28,28: give 2 values, one per axis of the 2-D images"),
        ([images, "--shape=32"], "--shape=32: give 2 values"),
        ([images, f"--labels={tmp_path / 'other'}"], str(tmp_path / "other")),
    ]
    for k, (args, message) in enumerate(cases):
        logdir = tmp_path / f"run{k}"
        proc = _command(*args, f"--logdir={logdir}", f"--export_dir={tmp_path / f'export{k}'}")
        assert proc.returncode == 1, (args, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        assert "np.int64" not in proc.stderr
        assert not logdir.exists() or not os.listdir(logdir), (args, os.listdir(logdir))
        assert not (tmp_path / f"export{k}").exists()


def test_a_split_without_test_pairs_says_nothing_will_be_evaluated(tmp_path, capsys):
    _blobs(tmp_path / "img", (20, 20), 4)
    config = _config(f"--images={tmp_path / 'img'}", f"--logdir={tmp_path / 'run'}", "--steps=1",
                     f"--export_dir={tmp_path / 'export'}", "--grid_spacing=4", "--batch_size=2", "--log_every=1")
    result = train_api(config)
    out = capsys.readouterr().out
    assert "split {'train': 2, 'valid': 1, 'test': 1}" in out
    assert "the test split holds 1 image(s) and no pair: nothing will be evaluated" in out
    assert "the valid split holds 1 image(s) and no pair: no model selection" in out
    assert "pairs" not in result and (tmp_path / "run" / "skipped.json").exists()


def test_ctrl_c_prints_one_line_saying_how_to_resume(tmp_path):
    import signal
    import time

    _blobs(tmp_path / "img", (20, 20), 4)
    logdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", f"--images={tmp_path / 'img'}",
                             f"--logdir={logdir}", f"--export_dir={tmp_path / 'export'}", "--preset=paper",
                             "--grid_spacing=4", "--batch_size=2", "--steps=100000", "--log_every=1",
                             "--steps_per_execution=1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:  # wait until training runs
            if "step " in line and "/100000" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted") and "the same command again" in last, err
    assert sum(line.startswith("interrupted") for line in err.splitlines()) == 1, err


def test_registration_figure_shows_different_fixed_images_first():
    """--pairs=random test pairs often share a fixed image; the figure takes pairs of new fixed images first."""
    from dirnet_tf.pair_plans import evaluation_pairs
    from dirnet_tf.plotting import distinct_first

    pairs = np.asarray(evaluation_pairs(list(range(10)), "random", max_pairs=50, seed=0))
    shown = distinct_first(pairs[:, 0], 8)
    assert len(shown) == 8 and len(set(pairs[shown, 0].tolist())) == 8
    assert distinct_first([3, 3, 3, 4], 8) == [0, 3, 1, 2] and distinct_first([1, 2], 1) == [0]
