"""benchmarks.refinement: the re-oriented copies keep every voxel's world position, and a section
without its export is reported as skipped (with the command that makes it), not left out."""

import json

import numpy as np
import pytest

from benchmarks import refinement


def test_reoriented_copy_keeps_world_positions(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    data = rng.normal(size=(10, 12, 14)).astype(np.float32)
    affine = np.array([[1.5, 0, 0, -7.0], [0, 1.0, 0.1, 3.0], [0, 0, 2.0, 11.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "a.nii.gz"))
    out = refinement.reoriented_copy(str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), crop=0.2)
    copy = nib.load(out)
    values, copy_affine = np.asanyarray(copy.dataobj), copy.affine
    assert values.shape != data.shape and values.size < data.size  # permuted and cropped
    # every voxel of the copy holds the value of the original voxel at the same world position
    index = np.stack(np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij"), -1).reshape(-1, 3)
    world = index @ copy_affine[:3, :3].T + copy_affine[:3, 3]
    original = np.rint((world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).astype(int)
    np.testing.assert_array_equal(values.reshape(-1), data[tuple(original.T)])
    assert np.linalg.det(copy_affine[:3, :3]) * np.linalg.det(affine[:3, :3]) < 0  # one axis flipped


def test_missing_export_is_reported_as_skipped(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert refinement.main([f"--sections=echo", f"--echo_export={tmp_path / 'none'}", f"--json={path}"]) == 0
    report = json.loads(path.read_text())
    assert "python -m experiments.echo" in report["echo"]["skipped"]
    assert refinement.main(["--sections=nonsense", f"--json={path}"]) == 2
