"""experiments.common: the flags of every command come from TrainConfig; --help lists them all with the
command's documentation; the library imports neither absl nor the commands."""

import ast
import glob
import os
import subprocess
import sys

import pytest

from dirnet_tf.config import SHARED_GROUPS, fields_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_library_does_not_import_absl_or_the_commands():
    """absl (command-line flags) belongs to the entry points, never to the library; nor does the
    library climb back into experiments/ or benchmarks/."""
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "dirnet_tf", "*.py")):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{os.path.basename(path)}: {n}" for n in names
                          if n.split(".")[0] in ("absl", "experiments", "benchmarks")]
    assert not offenders


def test_shared_flags_are_the_config_fields():
    from absl import flags

    from experiments import common

    common.define_flags()
    for field in fields_of():
        if field.metadata["group"] in SHARED_GROUPS:
            assert field.name in flags.FLAGS and field.name in common.defined_flags(), field.name
            assert flags.FLAGS[field.name].help.endswith(field.metadata["help"]), field.name


def test_train_help_lists_every_flag_and_the_documentation():
    """``--help`` (not only ``--helpfull``) shows the data, pairing, split and synthetic flags too."""
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]  # (absl's --help exits with status 1)
    assert "Train DIRNet on your own 2-D images or 3-D volumes" in proc.stdout
    listed = {line.strip().split(":")[0].lstrip("-").replace("[no]", "") for line in proc.stdout.splitlines()
              if line.strip().startswith("--")}
    expected = {f.name for f in fields_of()} | {"preset"}
    assert expected <= listed, sorted(expected - listed)


def test_a_command_run_in_process_restores_the_sigint_handler(monkeypatch):
    """run_experiment installs its Ctrl-C handler for the run only: afterwards (normal exit, error or
    interrupt) the process's SIGINT handler is the one it had, so a trainer used later in the same
    process still defers Ctrl-C during a checkpoint."""
    import signal

    from absl import flags as absl_flags

    from experiments import common, train  # noqa: F401 - train defines the shared flags (--logdir, ...)

    monkeypatch.setattr(sys, "argv", ["cmd"])
    before = signal.getsignal(signal.SIGINT)
    outcomes = {"ok": lambda config: None, "error": lambda config: (_ for _ in ()).throw(ValueError("bad")),
                "interrupt": lambda config: signal.raise_signal(signal.SIGINT)}
    for name, run in outcomes.items():
        with pytest.raises(SystemExit) as exit_info:
            common.run_experiment(run, {})
        assert exit_info.value.code == {"ok": 0, "error": 1, "interrupt": 130}[name]
        assert signal.getsignal(signal.SIGINT) is before, name
    assert absl_flags.FLAGS.is_parsed()
