"""The benchmark scripts' building blocks (not timings): the pure-TF resampler layer they
compare against, tiny resampler and training-throughput runs, the registration scoring and
comparison of every DIRNet row with its elastix row."""

import sys

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from dirnet_tf.layers import Resampler
from benchmarks import registration as br
from benchmarks import resample as bres
from benchmarks import training as bt


def _field(rng, b, shape):
    return rng.normal(0, 1.5, (b,) + shape + (len(shape),)).astype(np.float32)


@pytest.mark.parametrize("shape", [(9, 11), (5, 6, 7)])
@pytest.mark.parametrize("boundary", ["border", "zeros"])
def test_pure_tf_resampler_layer_matches_scipy_and_op_layer(shape, boundary):
    rng = np.random.default_rng(len(shape))
    image = rng.random((2,) + shape + (1,)).astype(np.float32)
    disp = _field(rng, 2, shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    coords = (grid + disp).astype(np.float64)
    mode = "nearest" if boundary == "border" else "grid-constant"
    ref = np.stack([ndimage.map_coordinates(image[k, ..., 0].astype(np.float64),
                                            np.moveaxis(coords[k], -1, 0), order=1, mode=mode, cval=0.0)
                    for k in range(2)])[..., None]
    pure = bt.PureTFResampler(boundary)
    op = Resampler(boundary)
    np.testing.assert_allclose(pure(image, disp).numpy(), ref, atol=1e-5)

    d = tf.Variable(disp)
    grads = []
    for layer in (pure, op):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(tf.constant(image), d) ** 2)
        grads.append(tape.gradient(loss, d).numpy())
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-4)
    assert np.abs(grads[0]).max() > 0


def test_parse_case():
    assert bt.parse_case("2d:32") == {"name": "2d 28x28 B=32", "image_shape": (28, 28), "batch_size": 32}
    assert bt.parse_case("3d:2:16")["image_shape"] == (16, 16, 16)
    for bad in ("4d:2", "2d", "2d:x", "2d:0", "2d:2:16:1"):
        with pytest.raises(ValueError, match="2d:BATCH"):
            bt.parse_case(bad)


def test_tiny_resampler_benchmark_run(tmp_path):
    import json

    # The methods compute the same thing: the null stand-in keeps the output shape.
    image, coords, _ = bres.make_inputs(2, (6, 7))
    assert bres.null_resample(tf.constant(image), tf.constant(coords)).shape == (2, 6, 7, 1)
    out = tmp_path / "b.json"
    bres.main(["--cases=2d-28", "--rounds=2", "--target_ms=1", "--loop=2", f"--json={out}",
               "--skip=keras-mapcoord,tf-gather,tf-gather-xla,tf-gather-xla-loop,torch-grid_sample"])
    results = json.loads(out.read_text())["results"]["2d-28"]
    assert set(results) == {"op", "op-loop", "op-eager", "tf-null"}
    for method in results.values():
        for mode in bres.MODES:
            assert len(method[mode]["samples_ms"]) == 2 and method[mode]["median_ms"] > 0


def test_tiny_training_throughput_run():
    case = {"name": "tiny", "image_shape": (16, 16), "batch_size": 4}
    r = bt.bench_case(case, variants=("op", "pure_tf"), grid_spacing=4, filters=4, steps=2, rounds=2)
    assert set(r["variants"]) == {"op", "pure_tf"}
    # Same weights and batches: the first train step gives the same loss with both resamplers.
    assert abs(r["first_step_loss"]["op"] - r["first_step_loss"]["pure_tf"]) < 1e-4
    for v in r["variants"].values():
        assert v["pairs_per_s"] > 0 and v["pairs_per_s_min"] <= v["pairs_per_s"] <= v["pairs_per_s_max"]
    assert r["op_speedup"]["pure_tf"] == pytest.approx(
        r["variants"]["op"]["pairs_per_s"] / r["variants"]["pure_tf"]["pairs_per_s"])
    assert "| tiny |" in bt.format_table([r])


def test_quality_scores_and_comparison():
    rng = np.random.default_rng(0)
    fixed = (rng.random((3, 28, 28, 1)) > 0.7).astype(np.float32)
    moving = np.roll(fixed, 2, axis=1)
    disp = np.zeros((3, 28, 28, 2), np.float32)
    disp[1, 10:14, 10:14, 0] = -3.0  # rows pulled up by 3 pixels: the map folds at the block's top edge
    disp[1, 10:14, 10:14, 1] = np.arange(4)[:, None] * 0.5
    summary, per = br.quality(fixed, moving, fixed, disp, np.array([1, 1, 2]))
    assert summary["ncc"] == pytest.approx(1.0) and summary["dice"] == pytest.approx(1.0)
    u0, u1 = disp[1, ..., 0].astype(np.float64), disp[1, ..., 1].astype(np.float64)
    det = ((1 + np.gradient(u0, axis=0)) * (1 + np.gradient(u1, axis=1))
           - np.gradient(u0, axis=1) * np.gradient(u1, axis=0))
    assert 0 < (det <= 0).mean() < 0.1
    assert per["folding"][1] == pytest.approx((det <= 0).mean())
    assert per["folding"][0] == 0 and summary["pairs_with_folding"] == 1
    assert set(summary["per_digit_ncc"]) == {"1", "2"}

    rows = {"DIRNet gs=8": {"ms_per_pair": 0.5, "ncc": 0.925, "folding_fraction": 0.0},
            "elastix gs=8": {"ms_per_pair": 80.0, "ncc": 0.93, "folding_fraction": 0.001},
            "DIRNet gs=4": {"ms_per_pair": 1.0, "ncc": 0.90, "folding_fraction": 0.01},
            br.MODELS["default"][0]: {"ms_per_pair": 2.0, "ncc": 0.96, "folding_fraction": 0.0},
            "elastix gs=4": {"ms_per_pair": 80.0, "ncc": 0.97, "folding_fraction": 0.001},
            "elastix gs=2": {"ms_per_pair": 150.0, "ncc": 0.99, "folding_fraction": 0.03}}
    t = br.compare(rows)
    assert set(t) == {"gs8", "gs4", "default"}  # no paper row given
    assert t["gs8"]["speedup"] == pytest.approx(160) and t["gs4"]["speedup"] == pytest.approx(80)
    # The default's finest stage has spacing 2: it is compared with elastix at spacing 2.
    assert t["default"]["speedup"] == pytest.approx(75) and t["default"]["elastix"] == "elastix gs=2"
    assert t["gs8"]["ncc_dirnet_minus_elastix"] == pytest.approx(-0.005)
    assert t["gs4"]["ncc_dirnet_minus_elastix"] == pytest.approx(-0.07)
    assert (t["gs4"]["folding_dirnet"], t["gs4"]["folding_elastix"]) == (0.01, 0.001)


def test_benchmark_trains_missing_models_with_valid_experiment_flags(tmp_path, monkeypatch):
    import copy
    import importlib

    from absl import flags

    importlib.import_module("experiments.mnist")  # defines the experiment's flags

    calls = []
    monkeypatch.setattr(br.subprocess, "run", lambda cmd, check: calls.append(cmd))
    for name in br.MODELS:
        export_dir, logdir = br.ensure_model(name, None, root=str(tmp_path / "runs"),
                                             exports=str(tmp_path / "exports"), steps=7)
        assert export_dir == str(tmp_path / "exports" / f"mnist_{name}")
        assert logdir == str(tmp_path / "runs" / f"mnist_{name}")
    assert len(calls) == len(br.MODELS)
    for (name, (_, gs, train_flags)), cmd in zip(br.MODELS.items(), calls):
        assert cmd[1:3] == ["-m", "experiments.mnist"]
        parsed = copy.deepcopy(flags.FLAGS)  # the global flags stay unparsed
        parsed(["mnist", *cmd[3:]])
        mnist = sys.modules["experiments.mnist"]

        def effective(flag):  # as experiments.mnist resolves it: command line, then preset, then default
            if parsed[flag].present:
                return parsed[flag].value
            preset = mnist.PRESETS.get(parsed.preset) or {} if parsed.preset else {}
            return preset[flag] if flag in preset else mnist.DEFAULTS.get(flag, parsed[flag].value)

        spacings = [int(t) for t in str(effective("stages") or "").split(",") if t.strip().isdigit()]
        finest = min(spacings) if spacings else int(effective("grid_spacing"))
        assert finest == gs and parsed.steps == 7, name
        for flag in train_flags:
            key, value = flag[2:].split("=")
            assert str(getattr(parsed, key)) == value
    with pytest.raises(ValueError, match="not a SavedModel"):
        br.ensure_model("gs8", str(tmp_path))


def test_registration_table_names_the_regressor_passes(tmp_path):
    common = {"ncc": 0.9, "dice": 0.8, "folding_fraction": 0.001, "pairs_with_folding": 3, "pairs": 10}
    rows = {"DIRNet gs=8": dict(common, ms_per_pair=0.7, ms_per_pair_batch1=3.0, timing_batch_size=256,
                                passes=2),
            "elastix gs=8": dict(common, ms_per_pair=120.0, threads=2, inverse_consistency_px=0.25)}
    table = br.format_table(rows, {"ncc": 0.4, "dice": 0.4}).splitlines()
    assert table[3].startswith("| DIRNet gs=8 (2 passes) | 0.9000 |") and "| - |" in table[3]
    assert table[4].startswith("| elastix gs=8 | 0.9000 |") and "2 threads" in table[4]
    assert "| 0.250 |" in table[4] and "inverse consistency" in table[0]

    export = tmp_path / "export"
    (export / "assets").mkdir(parents=True)
    (export / "assets" / "dirnet.json").write_text('{"grid_spacing": [4, 4], "passes": 4}')
    assert br.export_info(str(export))["passes"] == 4 and br.export_grid_spacing(str(export)) == 4
    (export / "assets" / "dirnet.json").write_text("not json")
    assert br.export_info(str(export)) == {} and br.export_grid_spacing(str(export)) is None


_HARNESS_OK = """GPU: NVIDIA H200 (sm_90)
ok   float  ndim=2 boundary=zeros  C=1 B=3 P=500: out 0.00e+00  grad_image 0.00e+00  grad_coords 0.00e+00  coords-only 0.00e+00
time  2D B=32 28^2 C=1 float: forward+backward 0.021 ms (median of 20)
time  3D B=2 64^3 C=1 float: forward+backward 0.150 ms (median of 20; forward alone 0.050 ms; coords-only forward+backward 0.080 ms)
ALL GPU CHECKS PASSED
"""


def _fake_harness(tmp_path, text, code):
    script = tmp_path / "harness"
    script.write_text("#!/bin/sh\ncat <<'END'\n" + text + "END\nexit %d\n" % code)
    script.chmod(0o755)
    return script


def test_gpu_harness_report_is_parsed():
    from benchmarks import resample_gpu as bg
    report = bg.parse_harness_output(_HARNESS_OK)
    assert report["gpu"] == "NVIDIA H200 (sm_90)" and report["passed"] and not report["no_gpu"]
    assert report["times"] == [{"ndim": 2, "batch": 32, "size": 28, "ms": 0.021},
                               {"ndim": 3, "batch": 2, "size": 64, "ms": 0.150, "fwd": 0.05,
                                "coords_only": 0.08}]
    failed = bg.parse_harness_output(_HARNESS_OK.replace("ALL GPU CHECKS PASSED", "GPU CHECKS FAILED"))
    assert not failed["passed"]
    assert bg.parse_harness_output("NO GPU: the CUDA harness compiled ...\n")["no_gpu"]


def test_gpu_bench_reports_only_when_the_checks_pass(tmp_path, monkeypatch):
    import json
    import sys
    from benchmarks import resample_gpu as bg
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without PyTorch
    out = tmp_path / "gpu.json"
    ok = _fake_harness(tmp_path, _HARNESS_OK, 0)
    assert bg.main(["--harness", str(ok), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["ndim"], r["ours_ms"], r["grid_sample_ms"], r["ours_coords_only_ms"],
             r["ours_forward_ms"]) for r in rows] == [(2, 0.021, None, None, None),
                                                      (3, 0.15, None, 0.08, 0.05)]
    out.unlink()
    bad = _fake_harness(tmp_path, _HARNESS_OK.replace("ALL GPU CHECKS PASSED", "GPU CHECKS FAILED"), 1)
    assert bg.main(["--harness", str(bad), "--out", str(out)]) == 1 and not out.exists()
    assert bg.main(["--harness", str(tmp_path / "missing"), "--out", str(out)]) == 2
