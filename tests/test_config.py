"""dirnet_tf.config: TrainConfig (dict round trip, unknown keys, presets), the default-stage rule,
the parsers, and a regression check that the commands resolve to exactly their earlier settings."""

import json
import os
import subprocess
import sys

import pytest

from dirnet_tf.config import (PRESETS, TrainConfig, default_stages, fields_of, parse_floats, parse_int_list,
                              parse_stages, resolve_stages)
from dirnet_tf.files import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_int_list_and_json_file(tmp_path):
    assert parse_int_list("32") == 32
    assert parse_int_list("8, 16,32") == [8, 16, 32]
    assert parse_int_list("") is None
    with pytest.raises(ValueError, match="comma list"):
        parse_int_list("8,x")
    path = write_json(str(tmp_path / "d" / "flags.json"), {"b": 1, "a": "x"})
    with open(path) as f:
        assert json.load(f) == {"a": "x", "b": 1}
    assert os.listdir(tmp_path / "d") == ["flags.json"]  # no temporary file left


def test_parse_floats_and_stages():
    from dirnet_tf.readers import InputError

    assert parse_floats("", "spacing") is None and parse_floats("1.5", "spacing") == 1.5
    assert parse_floats("2,1,1", "spacing") == (2.0, 1.0, 1.0)
    with pytest.raises(InputError, match="--spacing=a,b: give numbers"):
        parse_floats("a,b", "spacing")
    assert parse_stages("") is None and parse_stages("affine,8,4") == ["affine", 8, 4]
    assert parse_stages("auto") == "auto" and resolve_stages("auto", (28, 28)) == [8, 4, 2]
    assert resolve_stages("8,4", (28, 28)) == [8, 4] and resolve_stages("", (28, 28)) is None
    with pytest.raises(ValueError, match="--stages=8,x"):
        parse_stages("8,x")


def test_default_stage_rule():
    """Coarsest: the largest power of two with >= 3 control intervals across the smallest axis;
    halving down to 2 (2-D) or 4 (3-D) voxels, at most 3 stages."""
    assert default_stages((28, 28)) == [8, 4, 2]  # MNIST: the MNIST default's stages
    assert default_stages((64, 64)) == [16, 8, 4]
    assert default_stages((36, 32)) == [8, 4, 2]
    assert default_stages((16, 16)) == [4, 2]
    assert default_stages((8, 8)) == [2]
    assert default_stages((5, 40)) == [1]
    assert default_stages((96, 112, 96)) == [32, 16, 8]
    assert default_stages((48, 48, 48)) == [16, 8, 4]
    assert default_stages((14, 12, 14)) == [4]
    assert default_stages((256, 256)) == [64, 32, 16]
    for shape in [(n, n) for n in range(3, 300, 7)] + [(n, n + 5, n) for n in range(3, 200, 11)]:
        stages = default_stages(shape)
        assert min(shape) / stages[0] >= 3 or stages == [1], shape
        assert min(shape) / (2 * stages[0]) < 3, shape  # the coarsest that fits
        assert all(a == 2 * b for a, b in zip(stages, stages[1:])) and 1 <= len(stages) <= 3, shape
    with pytest.raises(ValueError, match="at least one voxel"):
        default_stages((0, 4))


def test_train_config_dict_round_trip_unknown_keys_and_presets():
    config = TrainConfig()
    record = config.to_dict()
    assert TrainConfig.from_dict(record) == config
    assert set(record) == {f.name for f in fields_of()}
    # The default is the folding-free composed model.
    assert (config.stages, config.bounded, config.symmetric, config.normalize_inputs, config.stagewise,
            config.passes) == ("auto", True, True, True, True, 2)
    assert (config.bending_weight, config.folding_weight, config.inverse_consistency_weight) == (0.01, 1.0, 0.03)
    with pytest.raises(ValueError, match="unknown training setting.*stepz"):
        TrainConfig.from_dict({"stepz": 3})
    own = TrainConfig.from_dict({"steps": 3, "digits": "9"}, extra_ok=True)
    assert own.steps == 3 and own.extra == {"digits": "9"} and own.to_dict()["digits"] == "9"
    assert TrainConfig.from_dict(own.to_dict(), extra_ok=True) == own
    paper = config.with_preset("paper")
    assert (paper.stages, paper.passes, paper.bounded, paper.folding_weight, paper.stagewise) == (
        "", 1, False, 0.0, False)
    assert config.with_preset("") == config
    with pytest.raises(ValueError, match="--preset=nope"):
        config.with_preset("nope")
    every = {f.metadata["group"] for f in fields_of()}
    assert every == {"model", "objective", "optimisation", "run", "data", "pairing", "split", "synthetic",
                     "evaluation"}
    assert all(f.metadata["help"] for f in fields_of())


def test_choices_match_the_library():
    from dirnet_tf import losses
    from dirnet_tf.preprocessing import NORMALIZE_MODES
    from dirnet_tf.trainer import STRATEGIES

    choices = {f.name: f.metadata["choices"] for f in fields_of()}
    assert tuple(choices["similarity"]) == tuple(losses.SIMILARITIES)
    assert tuple(choices["strategy"]) == tuple(STRATEGIES)
    assert tuple(choices["normalize"]) == tuple(NORMALIZE_MODES)


_RESOLVE = """
import json, sys, importlib
from absl import flags
module = importlib.import_module("experiments." + sys.argv[1])
from experiments import common
for name, value in module.DEFAULTS.items():
    flags.FLAGS.set_default(name, value)
out = {}
for preset in sys.argv[2:]:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog"] + ([f"--preset={preset}"] if preset else []))
    if preset:
        common.apply_preset(module.PRESETS, flags.FLAGS["preset"].value)
    out[preset] = common.config_from_flags().to_dict()
print(json.dumps(out))
"""

# The settings the commands resolved to before the training pipeline moved into the library
# (read from the code of that time): the MNIST default and presets, the cardiac MRI command, and
# experiments.train, whose old default is now --preset=paper.
OLD_RESOLVED = {
    'mnist': {
        'batch_norm': False, 'batch_size': 16, 'bending_weight': 0.01, 'bounded': True,
        'checkpoint_every': 500, 'convs_per_level': 'auto', 'digits': 'all', 'eval_every': 1000,
        'eval_per_digit': 100, 'evaluate': True, 'export': True, 'export_dir': 'exports/mnist',
        'export_only': False, 'filters': 'auto', 'folding_weight': 1.0, 'grid_spacing': 8,
        'inference_passes': 0, 'inverse_consistency_weight': 0.03, 'jit_compile': True,
        'learning_rate': 0.005, 'log_every': 100, 'logdir': 'runs/mnist', 'lr_schedule': 'cosine',
        'mixed_precision': False, 'mnist_hdf5': 'datasets/mnist.h5', 'mnist_source': None,
        'normalize_inputs': True, 'passes': 2, 'pointwise_filters': '', 'preset': '', 'resume': True,
        'seed': 0, 'select_best': True, 'similarity': 'ncc', 'stages': '8,4,2', 'stagewise': True,
        'steps': 6000, 'steps_per_execution': 10, 'strategy': 'default', 'symmetric': True,
        'valid_per_digit': 30,
    },
    'mnist:paper': {
        'batch_norm': False, 'batch_size': 32, 'bending_weight': 0.0, 'bounded': False,
        'checkpoint_every': 500, 'convs_per_level': 'auto', 'digits': 'all', 'eval_every': 1000,
        'eval_per_digit': 100, 'evaluate': True, 'export': True, 'export_dir': 'exports/mnist',
        'export_only': False, 'filters': 'auto', 'folding_weight': 0.0, 'grid_spacing': 8,
        'inference_passes': 0, 'inverse_consistency_weight': 0.0, 'jit_compile': True,
        'learning_rate': 0.005, 'log_every': 100, 'logdir': 'runs/mnist', 'lr_schedule': 'cosine',
        'mixed_precision': False, 'mnist_hdf5': 'datasets/mnist.h5', 'mnist_source': None,
        'normalize_inputs': False, 'passes': 1, 'pointwise_filters': '', 'preset': 'paper', 'resume': True,
        'seed': 0, 'select_best': True, 'similarity': 'ncc', 'stages': '', 'stagewise': False,
        'steps': 19000, 'steps_per_execution': 10, 'strategy': 'default', 'symmetric': False,
        'valid_per_digit': 30,
    },
    'mnist:accurate': {
        'batch_norm': False, 'batch_size': 32, 'bending_weight': 0.01, 'bounded': True,
        'checkpoint_every': 500, 'convs_per_level': 'auto', 'digits': 'all', 'eval_every': 1000,
        'eval_per_digit': 100, 'evaluate': True, 'export': True, 'export_dir': 'exports/mnist',
        'export_only': False, 'filters': 'auto', 'folding_weight': 1.0, 'grid_spacing': 8,
        'inference_passes': 0, 'inverse_consistency_weight': 0.0, 'jit_compile': True,
        'learning_rate': 0.005, 'log_every': 100, 'logdir': 'runs/mnist', 'lr_schedule': 'cosine',
        'mixed_precision': False, 'mnist_hdf5': 'datasets/mnist.h5', 'mnist_source': None,
        'normalize_inputs': True, 'passes': 3, 'pointwise_filters': '', 'preset': 'accurate', 'resume': True,
        'seed': 0, 'select_best': True, 'similarity': 'ncc', 'stages': '8,4', 'stagewise': True,
        'steps': 6000, 'steps_per_execution': 10, 'strategy': 'default', 'symmetric': True,
        'valid_per_digit': 30,
    },
    'mnist:additive': {
        'batch_norm': False, 'batch_size': 32, 'bending_weight': 0.0, 'bounded': False,
        'checkpoint_every': 500, 'convs_per_level': 'auto', 'digits': 'all', 'eval_every': 1000,
        'eval_per_digit': 100, 'evaluate': True, 'export': True, 'export_dir': 'exports/mnist',
        'export_only': False, 'filters': 'auto', 'folding_weight': 1.0, 'grid_spacing': 8,
        'inference_passes': 3, 'inverse_consistency_weight': 0.0, 'jit_compile': True,
        'learning_rate': 0.005, 'log_every': 100, 'logdir': 'runs/mnist', 'lr_schedule': 'cosine',
        'mixed_precision': False, 'mnist_hdf5': 'datasets/mnist.h5', 'mnist_source': None,
        'normalize_inputs': False, 'passes': 2, 'pointwise_filters': '', 'preset': 'additive',
        'resume': True, 'seed': 0, 'select_best': True, 'similarity': 'ncc', 'stages': '',
        'stagewise': False, 'steps': 19000, 'steps_per_execution': 10, 'strategy': 'default',
        'symmetric': False, 'valid_per_digit': 30,
    },
    'cardiac': {
        'batch_norm': False, 'batch_size': 32, 'bending_weight': 0.0, 'bounded': False,
        'checkpoint_every': 250, 'convs_per_level': '1', 'data': 'datasets/sunnybrook.h5', 'eval_every': 250,
        'evaluate': True, 'export_dir': 'exports/cardiac', 'export_only': False, 'figure_pairs': 6,
        'filters': '32', 'folding_weight': 0.0, 'grid_spacing': 8, 'image_size': 0, 'inference_passes': 0,
        'inverse_consistency_weight': 0.0, 'jit_compile': False, 'learning_rate': 0.001, 'log_every': 50,
        'logdir': 'runs/cardiac', 'lr_schedule': 'cosine', 'mixed_precision': False,
        'normalize_inputs': False, 'passes': 1, 'phantom_noise': 0.03, 'phantom_phases': 20,
        'phantom_seed': 0, 'phantom_slices': 3, 'phantom_spacing': 1.5, 'phantom_subjects': '24,4,8',
        'pointwise_filters': '', 'resume': True, 'seed': 0, 'select_best': True, 'similarity': 'ncc',
        'stages': '', 'stagewise': False, 'steps': 800, 'steps_per_execution': 10, 'strategy': 'default',
        'symmetric': False, 'synthetic': False, 'timing_batch_size': 64,
    },
    'train': {
        'batch_norm': False, 'batch_size': 8, 'bending_weight': 0.0, 'bounded': False,
        'checkpoint_every': 250, 'convs_per_level': 'auto', 'default_spacing': '', 'eval_every': 250,
        'eval_pairs': 50, 'evaluate': True, 'export_dir': 'exports/train', 'export_only': False,
        'filters': 'auto', 'folding_weight': 0.0, 'grid_spacing': 8, 'images': None, 'inference_passes': 0,
        'inverse_consistency_weight': 0.0, 'jit_compile': False, 'labels': None, 'learning_rate': 0.001,
        'log_every': 50, 'logdir': 'runs/train', 'lr_schedule': 'cosine', 'mask': None, 'max_frame_gap': 1,
        'mixed_precision': False, 'ndim': 0, 'normalize': 'percentile', 'normalize_inputs': False,
        'pairs': 'random', 'passes': 1, 'pointwise_filters': '', 'resume': True, 'seed': 0,
        'select_best': True, 'shape': '', 'similarity': 'ncc', 'spacing': '', 'split': '0.8,0.1,0.1',
        'split_seed': 0, 'split_within_groups': False, 'stages': '', 'stagewise': False, 'steps': 2000,
        'steps_per_execution': 10, 'strategy': 'default', 'symmetric': False, 'synthetic_augment': 0.0,
        'synthetic_gamma': 0.1, 'synthetic_magnitude': 4.0, 'synthetic_noise': 0.01, 'synthetic_scale': 0.1,
        'synthetic_spacing': 32.0, 'timing_batch_size': 8,
    },
}


def _resolve(command, *presets):
    proc = subprocess.run([sys.executable, "-c", _RESOLVE, command, *presets], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_commands_resolve_to_their_earlier_settings():
    """Every flag value of the MNIST default and presets and of the cardiac command is what it was;
    ``experiments.train --preset=paper`` is the earlier ``experiments.train`` default."""
    resolved = _resolve("mnist", "", "paper", "accurate", "additive")
    for preset in ("", "paper", "accurate", "additive"):
        old = OLD_RESOLVED["mnist" + (":" + preset if preset else "")]
        new = resolved[preset]
        assert {k: new.get(k, "MISSING") for k in old} == old, preset
    new = _resolve("cardiac", "")[""]
    assert {k: new.get(k, "MISSING") for k in OLD_RESOLVED["cardiac"]} == OLD_RESOLVED["cardiac"]
    resolved = _resolve("train", "", "paper")
    old = OLD_RESOLVED["train"]
    assert {k: resolved["paper"].get(k, "MISSING") for k in old} == old
    default = resolved[""]
    assert {k: v for k, v in default.items() if k in old and v != old[k]} == {
        "stages": "auto", "passes": 2, "stagewise": True, "bounded": True, "symmetric": True,
        "normalize_inputs": True, "bending_weight": 0.01, "folding_weight": 1.0, "inverse_consistency_weight": 0.03}
    assert {k: v for k, v in default.items() if k in old} == dict(old, **{
        k: getattr(TrainConfig(), k) for k in PRESETS["paper"]})
