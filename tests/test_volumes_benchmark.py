"""``benchmarks.volumes`` (3-D training seconds per step and peak memory): its command line,
its table, the failure reasons, and one tiny real run of both variants in fresh processes
(not a timing test)."""

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks import volumes as bv


def test_parse_shapes():
    assert bv.parse_shape("96x112x96") == (96, 112, 96)
    assert bv.parse_shape(" 64X64x64 ") == (64, 64, 64)
    assert bv.parse_shape("16\u00d716\u00d716") == (16, 16, 16)
    assert bv.parse_shapes(bv.DEFAULT_SHAPES) == [(64, 64, 64), (96, 112, 96), (128, 128, 128)]
    for bad in ("64x64", "64x64x64x64", "64xax64", "4x64x64", "", "-8x8x8", "64x64x64.5"):
        with pytest.raises(ValueError, match="DxHxW"):
            bv.parse_shapes(bad) if bad == "" else bv.parse_shape(bad)
    assert bv.parse_variants("pure_tf, op") == ["pure_tf", "op"]
    with pytest.raises(ValueError, match="subset"):
        bv.parse_variants("op,xla")


@pytest.mark.parametrize("argv, message", [
    (["--shapes=64x64"], "DxHxW"),
    (["--shapes=64x64x64,big"], "DxHxW"),
    (["--variants=op,torch"], "subset"),
    (["--grid_spacing=6"], "power of two"),
    (["--steps=0"], "--steps"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["stray"], "unexpected arguments"),
])
def test_bad_command_line_exits_2_with_a_message(argv, message, capsys, tmp_path):
    out = tmp_path / "never.json"
    assert bv.main(argv + [f"--out={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: python -m benchmarks.volumes") and message in err
    assert not out.exists()


def _ok(variant, shape=(96, 112, 96), tf_peak=None):
    r = {"shape": list(shape), "voxels": 96 * 112 * 96, "variant": variant, "status": "ok",
         "params": 75339, "s_per_step": 1.234, "first_step_s": 9.87, "peak_rss_gib": 1.5,
         "rss_increment_gib": 0.0456, "tf_memory": {"device": "CPU:0", "error": "ValueError: no"}}
    if tf_peak is not None:
        r["tf_memory"] = {"device": "CPU:0", "peak_gib": tf_peak, "current_gib": 0.0}
    return r


def test_format_table():
    failed = {"shape": [128, 128, 128], "voxels": 128**3, "variant": "pure_tf", "status": "failed",
              "reason": "killed by SIGKILL (out of memory?)"}
    table = bv.format_table([_ok("op"), failed])
    lines = table.splitlines()
    assert lines[0].startswith("| volume | voxels (M) | resampler | parameters | s / step |")
    assert "TF peak" not in lines[0]  # no case reported one
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    assert lines[2] == "| 96×112×96 | 1.03 | op | 75,339 | 1.23 | 9.9 | 1.50 | 0.046 |"
    assert "| 128×128×128 | 2.10 | pure_tf | — | failed: killed by SIGKILL (out of memory?) |" in lines[3]

    table = bv.format_table([_ok("op", tf_peak=0.25), _ok("pure_tf"), failed])
    lines = table.splitlines()
    assert lines[0].endswith("| TF peak (GiB) |") and len({line.count("|") for line in lines}) == 1
    assert lines[2].endswith("| 0.25 |") and lines[3].endswith("| n/a |")


def test_failure_reason():
    assert bv.failure_reason(-int(signal.SIGKILL)) == "killed by SIGKILL (out of memory?)"
    assert bv.failure_reason(-int(signal.SIGSEGV)) == "killed by SIGSEGV"
    assert bv.failure_reason(None, timeout_s=60) == "timed out after 60 s"
    reason = bv.failure_reason(1, "Traceback ...\n  File x\nMemoryError: boom\n\n")
    assert reason == "exit status 1: MemoryError: boom"
    assert bv.failure_reason(3) == "exit status 3: no error message"


def test_tiny_cases_in_fresh_processes():
    """Both variants at 16^3, one timed step each, each in its own fresh process.

    The two processes run side by side to keep the test short (their timings are
    then meaningless; only the fields are checked).
    """
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda v: bv.run_case_subprocess((16, 16, 16), v, steps=1),
                                ["op", "pure_tf"]))
    assert [r["variant"] for r in results] == ["op", "pure_tf"]
    for r in results:
        assert r["status"] == "ok", r
        assert r["shape"] == [16, 16, 16] and r["voxels"] == 16**3 and r["grid_spacing"] == 8
        for key in ("s_per_step", "first_step_s", "peak_rss_gib", "rss_before_model_gib",
                    "rss_increment_gib", "params", "wall_s"):
            assert r[key] > 0, key
        assert r["peak_rss_gib"] > r["rss_before_model_gib"]
        assert len(r["s_per_step_all"]) == 1 and len(r["losses"]) == 2
        # The default 3-D regressor: auto widths and convolutions per level.
        assert r["filters"] == [8, 16, 32, 32] and r["convs_per_level"] == [1, 1, 1, 2]
        assert r["control_grid"] == [5, 5, 5]
        assert r["tf_memory"]["device"] in ("CPU:0", "GPU:0")
        assert "peak_gib" in r["tf_memory"] or "error" in r["tf_memory"]
    # Same seed, same weights and volumes: both resamplers give the same first loss.
    assert results[0]["losses"][0] == pytest.approx(results[1]["losses"][0], abs=1e-5)
    assert results[0]["params"] == results[1]["params"]
    assert "| 16×16×16 | 0.00 | pure_tf | " in bv.format_table(results)


def test_main_runs_every_case_and_writes_json(tmp_path, capsys, monkeypatch):
    """main() runs each shape x variant (here a stand-in for the process) and records them all."""
    calls = []

    def fake_case(shape, variant, grid_spacing, steps, seed, timeout_s):
        calls.append((shape, variant, grid_spacing, steps, timeout_s))
        if shape == (32, 32, 32) and variant == "pure_tf":
            return {"shape": list(shape), "voxels": 32**3, "variant": variant, "status": "failed",
                    "reason": "killed by SIGKILL (out of memory?)"}
        return _ok(variant, shape)

    monkeypatch.setattr(bv, "run_case_subprocess", fake_case)
    out = tmp_path / "sub" / "bench_volumes.json"
    argv = ["--shapes=16x16x16,32x32x32", "--grid_spacing=4", "--steps=2", "--case_timeout=9",
            f"--out={out}"]
    assert bv.main(argv) == 0
    assert calls == [((16, 16, 16), "op", 4, 2, 9.0), ((16, 16, 16), "pure_tf", 4, 2, 9.0),
                     ((32, 32, 32), "op", 4, 2, 9.0), ((32, 32, 32), "pure_tf", 4, 2, 9.0)]
    record = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert record["table"] in printed and "failed: killed by SIGKILL" in record["table"]
    assert record["command"] == "python -m benchmarks.volumes " + " ".join(argv)
    assert record["grid_spacing"] == 4 and record["steps"] == 2 and record["batch_size"] == 1
    assert len(record["results"]) == 4 and record["machine"]
    assert record["tf_memory_info"] == {"device": "CPU:0", "error": "ValueError: no"}


def test_a_failing_case_is_reported_not_raised(tmp_path):
    """An error inside the case's process comes back as a failed result with its reason."""
    r = bv.run_case_subprocess((16, 16, 16), "op", grid_spacing=8, steps=1, timeout_s=0.01)
    assert r["status"] == "failed" and r["reason"] == "timed out after 0.01 s"
    assert r["shape"] == [16, 16, 16] and r["variant"] == "op"


def test_case_process_writes_its_failure(tmp_path, monkeypatch):
    """The case process (``--case_out``) writes an error as a failed result and exits 1."""
    def out_of_memory(*args, **kwargs):
        raise MemoryError("OOM when allocating tensor with shape[1,136,136,136,8]\nmore detail")

    monkeypatch.setattr(bv, "run_case", out_of_memory)
    out = tmp_path / "case.json"
    assert bv.main(["--shapes=16x16x16", "--variants=op", f"--case_out={out}"]) == 1
    assert json.loads(out.read_text()) == {
        "status": "failed", "reason": "MemoryError: OOM when allocating tensor with shape[1,136,136,136,8]"}
    assert bv.main(["--variants=op", f"--case_out={out}"]) == 2  # one shape and one variant only
