"""The README is true: its Python API example runs as written, and its layout table matches the tree."""

import glob
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.register_assert_rewrite("register_fixtures")
from register_fixtures import digit  # noqa: E402 - after the assert-rewrite registration

pytest_plugins = ["register_fixtures"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        return fh.read()


def _section(text, title):
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_api_example_runs_as_written(export_dir, tmp_path):
    """The README's example, unchanged, in a folder holding ``exports/mnist`` (an export of a 28x28
    model) and two 28x28 PNG images ``a.png`` and ``b.png``: it prints the shapes it promises and
    writes the files it names, whose contents agree with what it printed."""
    api = _section(_readme(), "Python API")
    code = re.search(r"```python\n(.*?)```", api, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15, "the issue asks for an example of at most 15 lines"
    shutil.copytree(export_dir, tmp_path / "exports" / "mnist")
    rng = np.random.default_rng(5)
    Image.fromarray(digit(rng)).save(tmp_path / "a.png")
    Image.fromarray(digit(rng)).save(tmp_path / "b.png")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "(28, 28)" and lines[1] == "(28, 28, 2)", done.stdout
    for name in ("w.png", "d.npy", "t.tfm"):
        assert (tmp_path / name).is_file(), name
    displacement = np.load(tmp_path / "d.npy")
    assert displacement.shape == (28, 28, 2) and np.abs(displacement).max() > 0.1  # a real deformation
    # map_points of a grid point equals that point plus the saved displacement there (to the dense
    # field's interpolation of the exact spline: none at a voxel centre)
    mapped = np.array([float(v) for v in re.findall(r"-?\d+\.\d*(?:e[-+]?\d+)?", lines[2])])
    assert mapped.shape == (2,), lines[2]
    expected = np.array([14.0, 9.5]) + 0.5 * (displacement[14, 9] + displacement[14, 10])
    np.testing.assert_allclose(mapped, expected, atol=0.02)


def test_layout_table_matches_the_tree():
    """Every library module appears in the README's layout table, and every module or folder the
    table names exists."""
    layout = _section(_readme(), "Layout")
    named = set(re.findall(r"`([\w/]+\.py)`", layout))
    modules = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "dirnet_tf", "*.py"))} - {"__init__.py"}
    missing = sorted(modules - named)
    assert not missing, f"library modules not in the README layout: {missing}"
    for name in sorted(named):
        candidates = [os.path.join(REPO, "dirnet_tf", name), os.path.join(REPO, "data", name),
                      os.path.join(REPO, "experiments", name), os.path.join(REPO, name)]
        assert any(os.path.isfile(c) for c in candidates), f"the README layout names {name}, which does not exist"
    for folder in re.findall(r"^\| `(\w+)/` \|", layout, re.M):
        assert os.path.isdir(os.path.join(REPO, folder)), folder
