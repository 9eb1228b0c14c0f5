"""experiments.common (flags, DIRNet from flags) and the regressor's "auto" rules it relies on."""

import ast
import glob
import json
import os

import pytest

from dirnet_tf.files import write_json
from dirnet_tf.regressor import AUTO_FILTERS, Regressor, auto_convs_per_level, auto_filters
from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_int_list_and_json_file(tmp_path):
    assert common.parse_int_list("32") == 32
    assert common.parse_int_list("8, 16,32") == [8, 16, 32]
    assert common.parse_int_list("") is None
    with pytest.raises(ValueError, match="comma list"):
        common.parse_int_list("8,x")
    path = write_json(str(tmp_path / "d" / "flags.json"), {"b": 1, "a": "x"})
    with open(path) as f:
        assert json.load(f) == {"a": "x", "b": 1}
    assert os.listdir(tmp_path / "d") == ["flags.json"]  # no temporary file left


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


def test_build_dirnet_takes_regressor_and_objective_from_the_flags():
    for spacing in (4, 8):
        config = {"grid_spacing": spacing, "filters": "auto", "convs_per_level": "auto", "passes": 2,
                  "similarity": "lncc", "bending_weight": 0.25, "folding_weight": 3.0}
        model = common.build_dirnet((28, 28), config)
        levels = {4: 3, 8: 4}[spacing]
        assert model.regressor.filters == auto_filters(levels)
        assert model.regressor.convs_per_level == auto_convs_per_level(levels)
        assert model.passes == 2
        # The objective the trainer optimises is the one the saved config records.
        saved = model.get_config()
        assert (saved["similarity"], saved["bending_weight"], saved["folding_weight"]) == ("lncc", 0.25, 3.0)
    model = common.build_dirnet((28, 28), {"grid_spacing": 8, "filters": "4,4,8,8"})
    assert model.regressor.filters == [4, 4, 8, 8] and model.similarity == "ncc"


def test_library_does_not_import_absl():
    """absl (command-line flags) belongs to the entry points, never to the library."""
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "dirnet_tf", "*.py")):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{os.path.basename(path)}: {n}" for n in names if n.split(".")[0] == "absl"]
    assert not offenders


def test_similarity_lncc_flag_reaches_local_ncc():
    """``--similarity=lncc``: the model built from the flags minimises ``-local_ncc`` (9-pixel windows).

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
    config = {"grid_spacing": 8, "filters": "4", "similarity": "lncc"}
    model = common.build_dirnet(shape, config)
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
    config = dict(grid_spacing=8, filters="auto", convs_per_level="1", passes=1, similarity="ncc",
                  bending_weight=0.0, folding_weight=0.0, stages="affine,8,4", bounded=True, symmetric=False,
                  normalize_inputs=True, stagewise=True, logdir=str(logdir), steps=6, batch_size=2,
                  learning_rate=1e-2, lr_schedule="constant", mixed_precision=False, log_every=3,
                  eval_every=3, checkpoint_every=3, resume=True, seed=0, export_only=False, select_best=True,
                  inference_passes=0, steps_per_execution=1, export=False)
    config.update(overrides)
    return config


def test_stagewise_training_freezes_the_earlier_stages(tmp_path):
    """Stage 2 trains with stage 1 frozen at the weights stage 1 selected; end to end, both move."""
    import numpy as np

    from dirnet_tf.pairs import random_pair_sampler

    rng = np.random.default_rng(0)
    images = rng.random((6, 16, 16, 1)).astype(np.float32)
    sampler = random_pair_sampler(images, 2, 0)
    validation = {"fixed": images[:2], "moving": images[2:4]}
    config = _tiny_config(tmp_path / "run")
    run = common.train_and_export(config, (16, 16), sampler, validation)
    assert sorted(os.listdir(config["logdir"])) == ["stage1", "stage2"]
    model = run.trainer.model
    assert int(run.trainer.step.numpy()) == 3 and run.train_seconds > 0
    # Stage 1 as its own phase selected it: a trainer of that phase restores the same weights.
    phase1 = common.trainer_from_config(dict(config, stages="affine,8", steps=3,
                                             logdir=os.path.join(config["logdir"], "stage1")),
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
    joint = common.train_and_export(_tiny_config(tmp_path / "joint", stagewise=False), (16, 16), sampler,
                                    validation)
    assert not os.path.isdir(tmp_path / "joint" / "stage1")
    assert any(not np.array_equal(a, b) for a, b in
               zip(joint.trainer.model.stage_layers()[0][0].get_weights(), affine_final))
