"""dirnet_tf.console: TensorFlow's start-up noise hidden, the user's settings and real errors kept.

Each case runs a fresh interpreter that loads ``dirnet_tf/console.py`` as a file (not through the
package, whose ``__init__`` imports TensorFlow) with a fake ``tensorflow`` package on its path
that writes start-up lines to file descriptor 2 the way the real one does.
"""

import os
import subprocess
import sys
import textwrap

CONSOLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dirnet_tf", "console.py")

FAKE_TENSORFLOW = r'''
import os
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
os.write(2, b"I0000 00:00:1796610764.707866   12851 port.cc:153] oneDNN custom operations are on. You may see\n")
os.write(2, b"I0000 00:00:1796610764.708163   12851 cudart_stub.cc:31] Could not find cuda drivers on your "
            b"machine, GPU will not be used.\n")
os.write(2, b"E0000 00:00:1796610771.056785   12851 something.cc:52] a real problem\n")
LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
if os.environ.get("FAKE_TF_FAIL"):
    raise ImportError("broken tensorflow")
'''


def _run(tmp_path, code, **env):
    package = tmp_path / "tensorflow"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(FAKE_TENSORFLOW)
    prelude = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("console", {CONSOLE!r})
        console = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(console)
    """)
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environ.update(PYTHONPATH=str(tmp_path), **env)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          env=environ, cwd=str(tmp_path), timeout=60)


def test_quiet_tensorflow_sets_the_level_without_importing_tensorflow(tmp_path):
    out = _run(tmp_path, """
        import os, warnings, logging
        warnings.simplefilter("default")  # show DeprecationWarnings, as pytest does
        level = console.quiet_tensorflow()
        assert "tensorflow" not in sys.modules
        print(level, os.environ["TF_CPP_MIN_LOG_LEVEL"], logging.getLogger("tensorflow").level)
        warnings.warn_explicit("old", DeprecationWarning, "x.py", 1, module="tensorflow.python.ops")
        warnings.warn_explicit("ours", DeprecationWarning, "y.py", 1, module="dirnet_tf.readers")
    """)
    assert out.returncode == 0, out.stderr
    level, env_level, logger_level = out.stdout.split()
    assert level == env_level and level in ("2", "3") and int(logger_level) == 40
    assert "ours" in out.stderr and "old" not in out.stderr


def test_a_level_the_user_set_is_kept(tmp_path):
    out = _run(tmp_path, "print(console.quiet_tensorflow(level=1))", TF_CPP_MIN_LOG_LEVEL="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
    out = _run(tmp_path, "print(console.quiet_tensorflow(level=1))")
    assert out.stdout.strip() == "1"


def test_import_hides_only_the_start_up_lines(tmp_path):
    out = _run(tmp_path, """
        tf = console.import_tensorflow_quietly()
        print(tf.LEVEL, tf is console.import_tensorflow_quietly())
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == "True" and out.stdout.split()[0] in ("2", "3")
    assert out.stderr.splitlines() == ["E0000 00:00:1796610771.056785   12851 something.cc:52] a real problem"]


def test_a_failing_import_still_shows_its_lines_and_error(tmp_path):
    out = _run(tmp_path, "console.import_tensorflow_quietly()", FAKE_TF_FAIL="1")
    assert out.returncode != 0
    assert "a real problem" in out.stderr and "ImportError: broken tensorflow" in out.stderr
    assert "oneDNN" not in out.stderr
