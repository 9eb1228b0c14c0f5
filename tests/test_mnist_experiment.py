"""End to end: ``python -m experiments.mnist`` trains, logs, checkpoints, resumes, evaluates
and exports; the SavedModel reloads in a fresh process and matches an independent warp."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from scipy import ndimage

from data import mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic_digits(n, digit, rng):
    """Stroke-like images of two classes: '1' = a slanted bar, '2' = a ring, jittered."""
    ii, jj = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    out = np.empty((n, 28, 28), np.float32)
    for k in range(n):
        ci, cj = rng.uniform(11, 17, 2)
        if digit == 1:
            slope = rng.uniform(-0.4, 0.4)
            dist = np.abs((jj - cj) - slope * (ii - ci)) / np.sqrt(1 + slope**2)
            img = np.clip(2.0 - dist, 0, 1) * (np.abs(ii - ci) < rng.uniform(7, 10))
        else:
            r = np.hypot(ii - ci, (jj - cj) * rng.uniform(0.8, 1.25))
            img = np.clip(1.5 - np.abs(r - rng.uniform(5, 8)), 0, 1)
        out[k] = np.floor(img * 255) / 256.0
    return out


@pytest.fixture(scope="module")
def hdf5(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp("data") / "mnist.h5")
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = mnist.FORMAT_VERSION
        f.attrs["source"] = "synthetic test fixture"
        for split, n in (("train", 60), ("valid", 12), ("test", 21)):
            labels = np.repeat([1, 2, 7], n // 3 + 1)[:n].astype(np.int64)
            images = np.empty((n, 28, 28), np.float32)
            for d in (1, 2, 7):
                images[labels == d] = _synthetic_digits(int((labels == d).sum()), 1 if d == 1 else 2, rng)
            f.create_dataset(f"{split}/images", data=images)
            f.create_dataset(f"{split}/labels", data=labels)
    return path


def _run(args, check=True, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "experiments.mnist"] + args, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def _common(hdf5, logdir, export_dir):
    return [f"--mnist_hdf5={hdf5}", f"--logdir={logdir}", f"--export_dir={export_dir}", "--digits=1,2",
            "--filters=4", "--batch_size=4", "--learning_rate=0.01", "--lr_schedule=constant",
            "--log_every=2", "--eval_every=2", "--checkpoint_every=2", "--valid_per_digit=2",
            "--eval_per_digit=3", "--seed=3"]


def _checkpoint_values(logdir):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(logdir)))
    names = sorted(n for n in reader.get_variable_to_shape_map()
                   if n.startswith("optimizer/") and n.endswith("VARIABLE_VALUE"))
    return {n: reader.get_tensor(n) for n in names}


def _foreground_dice(a, b, threshold=0.5):
    """Dice of the ``> threshold`` foregrounds, by hand (1 when both are empty)."""
    a, b = a[..., 0] > threshold, b[..., 0] > threshold
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def _assert_metrics_match_recomputation(metrics, logdir):
    """metrics.json against a recomputation from the export and the saved eval pairs.

    The export the run evaluated (``metrics["model"]``) is reloaded here and run
    on the pairs of ``eval_pairs.json``; NCC (global, :func:`dirnet_tf.metrics.ncc`),
    the foreground Dice (by hand above) and the folding fraction
    (:func:`dirnet_tf.metrics.folding_fraction`; 0 before registration) are
    recomputed per pair and averaged, overall and per digit.

    Plausible bugs caught: before/after swapped, the Dice or NCC of the moving
    instead of the warped image, folding measured on the zero field, per-digit
    numbers averaged over the wrong pairs or pairs counted twice, or a
    different model (e.g. the last instead of the exported checkpoint) scored.
    """
    import tensorflow as tf

    from dirnet_tf import metrics as M
    from dirnet_tf.inference import load_export

    served, _ = load_export(metrics["model"])
    record = mnist.load_eval_pairs(str(logdir / "eval_pairs.json"))
    fixed, moving, digits = record["fixed"], record["moving"], record["digits"]
    out = served(fixed=tf.constant(fixed), moving=tf.constant(moving))
    warped, disp = out["warped"].numpy(), out["displacement"].numpy()
    per_pair = {
        "ncc_before": np.array([M.ncc(f, m) for f, m in zip(fixed, moving)]),
        "ncc_after": np.array([M.ncc(f, w) for f, w in zip(fixed, warped)]),
        "dice_before": np.array([_foreground_dice(f, m) for f, m in zip(fixed, moving)]),
        "dice_after": np.array([_foreground_dice(f, w) for f, w in zip(fixed, warped)]),
        "folding_fraction": np.array([M.folding_fraction(d) for d in disp]),
    }
    assert not np.allclose(per_pair["ncc_before"], per_pair["ncc_after"])  # the model does something
    assert metrics["pairs"] == len(digits)
    for key, values in per_pair.items():
        assert metrics[key] == pytest.approx(values.mean(), abs=1e-6), key
    assert metrics["pairs_with_folding"] == int((per_pair["folding_fraction"] > 0).sum())
    assert sum(v["pairs"] for v in metrics["per_digit"].values()) == metrics["pairs"]
    assert set(metrics["per_digit"]) == {str(d) for d in np.unique(digits)}
    for digit, entry in metrics["per_digit"].items():
        select = digits == int(digit)
        assert entry["pairs"] == int(select.sum()), digit
        for key, values in per_pair.items():
            assert entry[key] == pytest.approx(values[select].mean(), abs=1e-6), (digit, key)
    # Inverse consistency: the a->b field composed with the b->a one (interpolated by hand).
    back = served(fixed=tf.constant(moving), moving=tf.constant(fixed))["displacement"].numpy()
    grid = np.stack(np.meshgrid(np.arange(28), np.arange(28), indexing="ij"), -1)
    residuals = []
    for f, b in zip(disp, back):
        where = np.moveaxis(grid + f, -1, 0)
        interpolated = np.stack([ndimage.map_coordinates(b[..., c], where, order=1, mode="nearest")
                                 for c in range(2)], -1)
        residuals.append(np.linalg.norm(f + interpolated, axis=-1).mean())
    assert metrics["inverse_consistency_px"] == pytest.approx(np.mean(residuals), rel=1e-5)
    same = served(fixed=tf.constant(fixed), moving=tf.constant(fixed))["displacement"].numpy()
    assert metrics["identity"]["identical"]["mean_abs_displacement_px"] == pytest.approx(
        np.linalg.norm(same, axis=-1).mean(), rel=1e-5, abs=1e-9)


def test_train_resume_evaluate_export_reload(tmp_path, hdf5):
    logdir, export_dir = tmp_path / "run", tmp_path / "export"
    # End to end: one run directory (stage-wise training, the default, is tested with the presets).
    common = _common(hdf5, logdir, export_dir) + ["--nostagewise"]

    first = _run(common + ["--steps=4", "--noevaluate"])
    assert "step 4/4" in first.stdout and "steps/s" in first.stdout and "ETA" in first.stdout
    assert os.path.exists(logdir / "ckpt-4.index")
    with open(logdir / "flags.json") as f:
        flags = json.load(f)
    assert flags["steps"] == 4 and flags["digits"] == "1,2" and flags["strategy"] == "default"

    # "interrupted" at step 4: the same command with more steps continues from there
    second = _run(common + ["--steps=6"])
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    assert "step 6/6" in second.stdout and "step 2/6" not in second.stdout
    assert os.path.exists(logdir / "ckpt-6.index")

    # an uninterrupted run reaches the same weights: same step count, same data order
    straight = _run(_common(hdf5, tmp_path / "straight", tmp_path / "export2")
                    + ["--nostagewise", "--steps=6", "--noevaluate", "--noexport"])
    del straight
    a, b = _checkpoint_values(logdir), _checkpoint_values(tmp_path / "straight")
    assert a.keys() == b.keys() and len(a) > 4
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)

    # evaluation outputs
    with open(logdir / "metrics.json") as f:
        metrics = json.load(f)
    for key in ("ncc_before", "ncc_after", "dice_before", "dice_after", "folding_fraction", "ms_per_pair"):
        assert np.isfinite(metrics[key]), key
    assert metrics["pairs"] == 6 and set(metrics["per_digit"]) == {"1", "2"}
    assert metrics["ms_per_pair"] > 0
    with open(logdir / "eval_pairs.json") as f:
        pairs = json.load(f)
    assert pairs["split"] == "test" and pairs["seed"] == 0 and pairs["per_digit"] == 3
    assert os.path.samefile(pairs["hdf5"], hdf5)
    _, labels = mnist.read_hdf5(hdf5, "test")
    arr = np.asarray(pairs["pairs"])
    assert arr.shape == (6, 3) and sorted(arr[:, 2].tolist()) == [1, 1, 1, 2, 2, 2]
    assert (labels[arr[:, 0]] == arr[:, 2]).all() and (labels[arr[:, 1]] == arr[:, 2]).all()
    assert pairs["pairs"] == mnist.make_eval_pairs(labels, (1, 2), 3, seed=0)
    _assert_metrics_match_recomputation(metrics, logdir)
    assert os.path.getsize(logdir / "mnist_registration.png") > 1000

    # TensorBoard: scalars and the image panel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    for tag in ("train/loss", "train/ncc", "validation/loss", "validation/ncc",
                "validation/fixed_moving_warped_grid"):
        assert tag in tags, (tag, tags)
    steps = sorted({e.step for e in events.Tensors("train/loss")})
    assert steps == [2, 4, 6]

    # export only, from the checkpoint, into another directory
    only = tmp_path / "export_only"
    _run(_common(hdf5, logdir, only) + ["--nostagewise", "--steps=6", "--export_only"])
    assert os.path.exists(only / "saved_model.pb")

    # reload in a fresh process and compare with an independent (scipy) warp
    script = f"""
import json, numpy as np, tensorflow as tf
from scipy import ndimage
import dirnet_tf
from data import mnist
fn = tf.saved_model.load({str(only)!r}).signatures["serving_default"]
rec = mnist.load_eval_pairs({str(logdir / "eval_pairs.json")!r})
out = fn(fixed=tf.constant(rec["fixed"]), moving=tf.constant(rec["moving"]))
w, d = out["warped"].numpy(), out["displacement"].numpy()
assert w.shape == rec["moving"].shape and w.dtype == np.float32, w.shape
assert d.shape == rec["moving"].shape[:-1] + (2,), d.shape
grid = np.stack(np.meshgrid(np.arange(28), np.arange(28), indexing="ij"), -1)
err = 0.0
for b in range(len(w)):
    ref = ndimage.map_coordinates(rec["moving"][b, ..., 0], (grid + d[b]).transpose(2, 0, 1),
                                  order=1, mode="nearest")
    err = max(err, float(np.abs(ref - w[b, ..., 0]).max()))
print(json.dumps({{"err": err, "max_disp": float(np.abs(d).max())}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["err"] < 1e-5
    assert result["max_disp"] > 0.05  # trained away from the identity, so the check is not trivial


def test_bad_input_gives_clear_errors(tmp_path, hdf5):
    proc = _run(_common(hdf5, tmp_path / "r", tmp_path / "e") + ["--steps=1", "--batch_size=0"], check=False)
    assert proc.returncode == 1 and "--batch_size" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run([f"--mnist_hdf5={tmp_path / 'missing.h5'}", f"--mnist_source={tmp_path / 'nothing.npz'}",
                 f"--logdir={tmp_path / 'r2'}", "--steps=1"], check=False)
    assert proc.returncode == 1 and "nothing.npz" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run(_common(hdf5, tmp_path / "r3", tmp_path / "e3") + ["--export_only"], check=False)
    assert proc.returncode == 1 and "no checkpoint" in proc.stderr


def test_presets_set_their_flags_and_the_command_line_wins(tmp_path, hdf5):
    """--preset=accurate trains stage-wise (one run directory per stage) with 3 passes and a folding
    penalty; a flag given next to a preset keeps its command-line value."""
    logdir = tmp_path / "accurate"
    _run(_common(hdf5, logdir, tmp_path / "e1") + ["--preset=accurate", "--steps=4", "--noevaluate"])
    assert sorted(p.name for p in logdir.iterdir() if p.is_dir()) == ["stage1", "stage2"]
    with open(logdir / "stage2" / "flags.json") as f:
        last = json.load(f)
    assert (last["passes"], last["folding_weight"], last["stagewise"], last["stages"]) == (3, 1.0, True, "8,4")
    with open(logdir / "stage1" / "flags.json") as f:
        assert json.load(f)["stages"] == "8"
    paper = tmp_path / "paper"
    _run(_common(hdf5, paper, tmp_path / "e2") + ["--preset=paper", "--passes=2", "--steps=2", "--noevaluate"])
    with open(paper / "flags.json") as f:
        flags = json.load(f)
    assert (flags["passes"], flags["bounded"], flags["stages"], flags["steps"]) == (2, False, "", 2)
    assert (flags["stagewise"], flags["inverse_consistency_weight"]) == (False, 0.0)
    # The default: stages 8, 4, 2 trained one after another, with the inverse-consistency loss.
    default = tmp_path / "default"
    _run(_common(hdf5, default, tmp_path / "e3") + ["--steps=3", "--noevaluate"])
    assert sorted(p.name for p in default.iterdir() if p.is_dir()) == ["stage1", "stage2", "stage3"]
    with open(default / "stage3" / "flags.json") as f:
        flags = json.load(f)
    assert (flags["stages"], flags["passes"], flags["inverse_consistency_weight"], flags["folding_weight"]) == (
        "8,4,2", 2, 0.03, 1.0)
