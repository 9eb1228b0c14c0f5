"""Loading the compiled resampler: a missing or wrong library gives a clear error.

Each case copies the imported ``dirnet_tf`` package into a temporary directory,
damages its ``_resample_ops.so`` (or leaves it intact, the control case) and
imports the copy in a fresh interpreter whose working directory and
``PYTHONPATH`` hold only that copy.  ``import dirnet_tf`` must still succeed;
``dirnet_tf.load_ops()`` and ``dirnet_tf.resample(...)`` must then raise a
``RuntimeError`` that says to run ``make build-ops``.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dirnet_tf

LIBRARY_NAME = "_resample_ops.so"

# Imports the package, then calls load_ops() and resample() on a 2x2 image,
# printing what happened as one JSON line.
_PROBE = r"""
import json
import numpy as np
import dirnet_tf


def attempt(fn):
    try:
        value = fn()
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"value": value}


image = np.arange(4.0).reshape(1, 2, 2, 1)
coords = np.array([[[0.5, 0.5], [0.0, 1.0], [0.25, 0.0]]])
result = {
    "file": dirnet_tf.__file__,
    "load_ops": attempt(lambda: sorted(n for n in dir(dirnet_tf.load_ops()) if "resample" in n)),
    "resample": attempt(lambda: dirnet_tf.resample(image, coords).numpy().ravel().tolist()),
}
print("PROBE " + json.dumps(result))
"""

_NO_OPS_SOURCE = "int dirnet_test_library_without_ops(void) { return 0; }\n"
# Stands in for a library built against another TensorFlow: it needs a
# TensorFlow symbol that the running TensorFlow does not export.
_UNDEFINED_SYMBOL_SOURCE = (
    "extern void _ZN10tensorflow30DirnetNoSuchSymbolForThisTestEv(void);\n"
    "void dirnet_test_call(void) { _ZN10tensorflow30DirnetNoSuchSymbolForThisTestEv(); }\n"
)


def _compile_shared_library(source, target, workdir):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc/gcc) to build a stand-in shared library")
    source_file = os.path.join(workdir, "stand_in.c")
    with open(source_file, "w", encoding="utf-8") as f:
        f.write(source)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", target, source_file], check=True)


def _damage(variant, library, workdir):
    """Puts the library of the package copy into the state named by ``variant``."""
    if variant == "intact":
        return
    os.remove(library)
    if variant == "missing":
        return
    if variant == "text_file":
        with open(library, "w", encoding="utf-8") as f:
            f.write("This is not a shared library.\n")
    elif variant == "library_without_ops":
        _compile_shared_library(_NO_OPS_SOURCE, library, workdir)
    elif variant == "undefined_symbol":
        _compile_shared_library(_UNDEFINED_SYMBOL_SOURCE, library, workdir)
    else:
        raise ValueError(f"unknown variant {variant!r}")


def _probe_package_copy(variant, tmp_path, probe=_PROBE):
    """Imports a (damaged) copy of the package in a subprocess; returns the probe's report."""
    source_dir = os.path.dirname(os.path.abspath(dirnet_tf.__file__))
    site = tmp_path / "site"
    copy_dir = site / "dirnet_tf"
    shutil.copytree(source_dir, copy_dir, ignore=shutil.ignore_patterns("__pycache__"))
    _damage(variant, str(copy_dir / LIBRARY_NAME), str(tmp_path))
    workdir = tmp_path / "cwd"  # an empty working directory: nothing importable there
    workdir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="-1")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"import dirnet_tf failed ({variant}):\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert len(lines) == 1, proc.stdout + proc.stderr[-4000:]
    report = json.loads(lines[0][len("PROBE "):])
    # The copy was imported, not the repository or an installed package.
    assert os.path.realpath(report["file"]) == os.path.realpath(copy_dir / "__init__.py")
    return report


def test_intact_copy_loads_the_op(tmp_path):
    """Control case: the copying itself keeps the op working."""
    report = _probe_package_copy("intact", tmp_path)
    assert "error" not in report["load_ops"], report["load_ops"]
    assert "dirnet_resample" in report["load_ops"]["value"]
    assert "error" not in report["resample"], report["resample"]
    # Bilinear values of [[0, 1], [2, 3]] at (0.5, 0.5), (0, 1), (0.25, 0).
    np.testing.assert_allclose(report["resample"]["value"], [1.5, 1.0, 0.5])


@pytest.mark.parametrize("variant", ["missing", "text_file", "library_without_ops",
                                     "undefined_symbol"])
def test_broken_library_gives_a_build_hint(variant, tmp_path):
    report = _probe_package_copy(variant, tmp_path)
    for call in ("load_ops", "resample"):
        outcome = report[call]
        assert outcome.get("error") == "RuntimeError", f"{call}() with a {variant} library: {outcome}"
        assert "make build-ops" in outcome["message"], outcome["message"]


# Loads a SavedModel holding the op: with TensorFlow alone (no dirnet_tf), and with
# dirnet_tf.inference.load_export.
_SAVED_MODEL_PROBE = r"""
import json, sys
import tensorflow as tf

def attempt(fn):
    try:
        fn()
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"loaded": True}

export = sys.argv[1] if len(sys.argv) > 1 else EXPORT
plain = attempt(lambda: tf.saved_model.load(export))
import dirnet_tf
from dirnet_tf.inference import load_export
result = {"file": dirnet_tf.__file__, "plain": plain, "load_export": attempt(lambda: load_export(export))}
print("PROBE " + json.dumps(result))
"""


@pytest.mark.parametrize("variant", ["intact", "missing"])
def test_loading_a_saved_model_names_the_op_and_the_fix(variant, tmp_path):
    """Without the op, TensorFlow's own loader names the unregistered op (Dirnet>Resample), and
    dirnet_tf.inference.load_export says to run make build-ops; with it, load_export works."""
    from dirnet_tf.inference import export_saved_model

    export = tmp_path / "export"
    export_saved_model(dirnet_tf.DIRNet((12, 12), 4, filters=2), str(export), (12, 12))
    report = _probe_package_copy(variant, tmp_path, _SAVED_MODEL_PROBE.replace("EXPORT", repr(str(export))))
    assert report["plain"].get("error"), report  # TensorFlow alone cannot load it ...
    assert "Dirnet>Resample" in report["plain"]["message"]  # ... and says which op is missing
    if variant == "intact":
        assert report["load_export"] == {"loaded": True}
    else:
        assert report["load_export"]["error"] == "RuntimeError"
        assert "make build-ops" in report["load_export"]["message"]
