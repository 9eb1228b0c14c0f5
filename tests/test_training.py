"""dirnet_tf.training: DIRNet and its trainer from a TrainConfig, stage-wise training, export, and
``dirnet_tf.train`` against ``python -m experiments.train`` (identical outputs)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dirnet_tf.config import PRESETS, TrainConfig
from dirnet_tf.regressor import AUTO_FILTERS, Regressor, auto_convs_per_level, auto_filters
from dirnet_tf.training import build_dirnet, make_trainer, train_and_export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = PRESETS["paper"]


def test_auto_regressor_rules_fit_every_grid_spacing():
    for spacing in (1, 2, 4, 8, 16):
        levels = {1: 1, 2: 2, 4: 3, 8: 4, 16: 5}[spacing]
        reg = Regressor((32, 32), spacing, filters="auto", convs_per_level="auto")
        assert reg.filters == auto_filters(levels) and reg.convs_per_level == auto_convs_per_level(levels)
        assert len(reg.filters) == levels and reg.convs_per_level[-1] == 2
        assert set(reg.convs_per_level[:-1]) <= {1} and reg.filters[0] == AUTO_FILTERS[0]
        assert all(w == AUTO_FILTERS[-1] for w in reg.filters[len(AUTO_FILTERS):])
    assert auto_filters(4) == [8, 16, 32, 32] and auto_convs_per_level(4) == [1, 1, 1, 2]
    assert Regressor((28, 28), 8, filters="16,32,48,48".split(",")).filters == [16, 32, 48, 48]
    with pytest.raises(ValueError, match="filters must be"):
        Regressor((28, 28), 8, filters=[8, 16])


def test_build_dirnet_takes_regressor_and_objective_from_the_config():
    for spacing in (4, 8):
        config = {"grid_spacing": spacing, "filters": "auto", "convs_per_level": "auto", "passes": 2,
                  "similarity": "lncc", "bending_weight": 0.25, "folding_weight": 3.0}
        model = build_dirnet(TrainConfig(**dict(PAPER, **config)), (28, 28))
        levels = {4: 3, 8: 4}[spacing]
        assert model.regressor.filters == auto_filters(levels)
        assert model.regressor.convs_per_level == auto_convs_per_level(levels)
        assert model.passes == 2
        # The objective the trainer optimises is the one the saved config records.
        saved = model.get_config()
        assert (saved["similarity"], saved["bending_weight"], saved["folding_weight"]) == ("lncc", 0.25, 3.0)
    model = build_dirnet(TrainConfig(**PAPER, grid_spacing=8, filters="4,4,8,8"), (28, 28))
    assert model.regressor.filters == [4, 4, 8, 8] and model.similarity == "ncc"


def test_similarity_lncc_flag_reaches_local_ncc():
    """``similarity="lncc"``: the model built from the config minimises ``-local_ncc`` (9-pixel windows).

    Plausible bugs caught: ``build_dirnet`` not passing ``similarity`` on (the
    model keeps the default global NCC), "lncc" mapped to the wrong loss in
    ``losses.SIMILARITIES``, or another window than the 9 the flag's help
    promises.  The references are the library's loss functions applied to the
    model's own outputs, and the check that global NCC gives a different value.
    """
    import numpy as np
    import tensorflow as tf

    from dirnet_tf import losses

    shape = (24, 24)
    config = TrainConfig(**PAPER, grid_spacing=8, filters="4", similarity="lncc")
    model = build_dirnet(config, shape)
    rng = np.random.default_rng(0)
    ii, jj = np.meshgrid(np.arange(24.0), np.arange(24.0), indexing="ij")
    # Local structure that global NCC judges differently: a blob plus a slow ramp, and noise.
    fixed = np.stack([np.exp(-((ii - c) ** 2 + (jj - 12) ** 2) / 20) + 0.03 * jj for c in (9, 14)])
    moving = fixed[:, :, ::-1] + 0.05 * rng.normal(size=fixed.shape)
    fixed = tf.constant(fixed[..., None], tf.float32)
    moving = tf.constant(moving[..., None], tf.float32)
    outputs = model({"fixed": fixed, "moving": moving})
    per_pair, parts = model.objective(fixed, outputs)
    expected = -losses.local_ncc(fixed, outputs["warped"], window=9).numpy()
    np.testing.assert_allclose(per_pair.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts["similarity"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.loss_terms(fixed, outputs)["total"].numpy(), expected.mean(), rtol=1e-5)
    # Not the global NCC loss, nor local NCC with another window.
    global_loss = losses.ncc_loss(fixed, outputs["warped"], reduction="none").numpy()
    assert np.abs(per_pair.numpy() - global_loss).min() > 1e-2, (per_pair.numpy(), global_loss)
    other_window = -losses.local_ncc(fixed, outputs["warped"], window=5).numpy()
    assert np.abs(per_pair.numpy() - other_window).min() > 1e-3, (per_pair.numpy(), other_window)
    # The "ncc" part stays the global NCC (monitoring) whatever the similarity.
    np.testing.assert_allclose(parts["ncc"].numpy(), -global_loss, rtol=1e-5, atol=1e-6)


def _tiny_config(logdir, **overrides):
    config = TrainConfig(grid_spacing=8, filters="auto", convs_per_level="1", passes=1, similarity="ncc",
                  bending_weight=0.0, folding_weight=0.0, stages="affine,8,4", bounded=True, symmetric=False,
                  normalize_inputs=True, stagewise=True, logdir=str(logdir), steps=6, batch_size=2,
                  learning_rate=1e-2, lr_schedule="constant", mixed_precision=False, log_every=3,
                  eval_every=3, checkpoint_every=3, resume=True, seed=0, export_only=False, select_best=True,
                  inference_passes=0, steps_per_execution=1, export=False, inverse_consistency_weight=0.0,
                  jit_compile=False)
    return config.replace(**overrides)


def test_stagewise_training_freezes_the_earlier_stages(tmp_path):
    """Stage 2 trains with stage 1 frozen at the weights stage 1 selected; end to end, both move."""
    import numpy as np

    from dirnet_tf.pairs import random_pair_sampler

    rng = np.random.default_rng(0)
    images = rng.random((6, 16, 16, 1)).astype(np.float32)
    sampler = random_pair_sampler(images, 2, 0)
    validation = {"fixed": images[:2], "moving": images[2:4]}
    config = _tiny_config(tmp_path / "run")
    run = train_and_export(config, (16, 16), sampler, validation)
    assert sorted(os.listdir(config.logdir)) == ["stage1", "stage2"]
    model = run.trainer.model
    assert int(run.trainer.step.numpy()) == 3 and run.train_seconds > 0
    # Stage 1 as its own phase selected it: a trainer of that phase restores the same weights.
    phase1 = make_trainer(config.replace(stages="affine,8", steps=3, logdir=os.path.join(config.logdir, "stage1")),
                          (16, 16), sampler, None, validation)
    assert phase1.restore_best()
    affine_final = model.stage_layers()[0][0].get_weights()
    for final, selected in zip(model.stage_layers()[:2], phase1.model.stage_layers()):
        for a, b in zip(sum((layer.get_weights() for layer in final), []),
                        sum((layer.get_weights() for layer in selected), [])):
            np.testing.assert_array_equal(a, b)
    assert [layers[0].trainable for layers in model.stage_layers()] == [False, False, True]
    # The last stage learnt (its regressor starts at the identity: a zero output layer).
    assert max(np.abs(w).max() for w in model.stage_layers()[2][0].get_weights()[-2:]) > 0
    # End to end (no --stagewise): one run, and its affine stage differs from the stage-wise one.
    joint = train_and_export(_tiny_config(tmp_path / "joint", stagewise=False), (16, 16), sampler, validation)
    assert not os.path.isdir(tmp_path / "joint" / "stage1")
    assert any(not np.array_equal(a, b) for a, b in
               zip(joint.trainer.model.stage_layers()[0][0].get_weights(), affine_final))


def _blob_pngs(folder, shape, n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        centre = [rng.uniform(0.4 * s, 0.6 * s) for s in shape]
        radius = rng.uniform(0.15, 0.22) * min(shape)
        image = np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / (2 * radius ** 2))
        Image.fromarray((image * 255).astype(np.uint8)).save(os.path.join(folder, f"im{k}.png"))


# Keys of metrics.json that are measured times or name the run's own paths.
_RUN_SPECIFIC = {"ms_per_pair", "ms_per_pair_min", "train_seconds", "train_steps_per_second", "model", "eval_pairs"}


def _assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), where
    else:
        assert a == b, where


def test_the_api_and_the_command_give_identical_runs(tmp_path):
    """``dirnet_tf.train(TrainConfig(...))`` and ``python -m experiments.train`` with the same settings
    (the default, folding-free model: stages 4,2 on 20x20, trained stage-wise) write the same metrics,
    settings, export metadata and an export that registers alike."""
    import dirnet_tf
    from dirnet_tf.inference import load_export, predict

    _blob_pngs(tmp_path / "img", (20, 20), 8)
    settings = dict(images=str(tmp_path / "img"), steps=4, batch_size=2, log_every=2, eval_every=2,
                    checkpoint_every=2, split="0.5,0.25,0.25", timing_batch_size=2, learning_rate=5e-3)
    cli_run, cli_export = tmp_path / "cli", tmp_path / "cli_export"
    proc = subprocess.run([sys.executable, "-m", "experiments.train", f"--logdir={cli_run}",
                           f"--export_dir={cli_export}"] + [f"--{k}={v}" for k, v in settings.items()],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    api_run, api_export = tmp_path / "api", tmp_path / "api_export"
    result = dirnet_tf.train(TrainConfig(**settings), logdir=str(api_run), export_dir=str(api_export))
    assert sorted(p.name for p in api_run.iterdir() if p.is_dir()) == ["stage1", "stage2"]
    cli_metrics = json.loads((cli_run / "metrics.json").read_text())
    api_metrics = json.loads((api_run / "metrics.json").read_text())
    assert result == api_metrics or json.loads(json.dumps(result)) == api_metrics
    drop = lambda m: {k: v for k, v in m.items() if k not in _RUN_SPECIFIC}  # noqa: E731
    _assert_same(drop(cli_metrics), drop(api_metrics))
    assert cli_metrics["pairs"] == 2 and cli_metrics["step"] == 2  # the last phase's steps
    for name in ("skipped.json", "eval_pairs.json", "registration.png"):
        assert (cli_run / name).exists() and (api_run / name).exists(), name
    cli_flags = json.loads((cli_run / "stage2" / "flags.json").read_text())
    api_flags = json.loads((api_run / "stage2" / "flags.json").read_text())
    paths = {"logdir", "export_dir", "preset"}
    assert {k: v for k, v in cli_flags.items() if k not in paths} == {
        k: v for k, v in api_flags.items() if k not in paths}
    assert cli_flags["stages"] == "4,2" and cli_flags["inverse_consistency_weight"] == 0.03
    cli_fn, cli_meta = load_export(str(cli_export))
    api_fn, api_meta = load_export(str(api_export))
    for meta in (cli_meta, api_meta):
        assert "flags" not in meta  # the settings are under "config", the voxel size under "default_spacing"
        for path in paths:
            meta["config"].pop(path, None)
    assert cli_meta == api_meta
    assert cli_meta["default_spacing"] is None and cli_meta["model_grid"]["shape"] == [20, 20]
    assert cli_meta["stages"] == [4, 2] and cli_meta["config"]["stages"] == "auto"
    rng = np.random.default_rng(1)
    fixed, moving = rng.random((2, 3, 20, 20, 1)).astype(np.float32)
    a, b = predict(cli_fn, fixed, moving), predict(api_fn, fixed, moving)
    np.testing.assert_allclose(a["displacement"], b["displacement"], rtol=1e-5, atol=1e-6)
    assert np.abs(a["displacement"]).max() > 0
