"""benchmarks.brain_model: its map through the headers and its scores against references computed here."""

import json

import numpy as np
import pytest

from benchmarks import brain_model


def _scan(tmp_path, name, image, labels, affine):
    nib = pytest.importorskip("nibabel")
    files = {"image": str(tmp_path / f"{name}_t1.nii.gz"), "labels": str(tmp_path / f"{name}_labels.nii.gz")}
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), files["image"])
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), files["labels"])
    return brain_model.Scan(files)


def test_header_map_and_scores_against_references(tmp_path):
    ii, jj, kk = np.mgrid[0:12, 0:14, 0:10].astype(np.float64)
    image = np.exp(-((ii - 6) ** 2 + (jj - 7) ** 2 + (kk - 5) ** 2) / 12.0) + 0.1 * np.sin(ii + 2 * jj)
    labels = (image > 0.4).astype(np.uint8)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-8.0, 4.0, 1.0]
    fixed = _scan(tmp_path, "f", image, labels, affine)
    # The same content, first axis flipped, the header saying so: every voxel keeps its world position.
    flipped = affine @ np.array([[-1.0, 0, 0, 11], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    moving = _scan(tmp_path, "m", image[::-1], labels[::-1], flipped)
    positions = brain_model.header_map(fixed, moving)
    np.testing.assert_allclose(positions[0], 11 - ii, atol=1e-9)
    np.testing.assert_allclose(positions[1:], np.stack([jj, kk]), atol=1e-9)
    scores = brain_model.score_map(fixed, moving, positions)
    assert scores["brain_dice"] == 1.0 and scores["ncc_brain"] > 0.999999
    assert scores["folding_voxels"] == 0  # the flip is in the headers, not in the map
    # A displacement of one voxel along j (fixed voxels) moves the sampling by one moving voxel along j.
    shift = np.zeros(image.shape + (3,))
    shift[..., 1] = 1.0
    np.testing.assert_allclose(brain_model.header_map(fixed, moving, shift)[1], jj + 1, atol=1e-9)
    # A map that reverses the first axis in the middle folds there.
    folded = positions.copy()
    folded[0, 4:8] = positions[0, 4:8][::-1]
    assert brain_model.score_map(fixed, moving, folded)["folding_voxels"] > 0


def test_bad_sections_are_refused(tmp_path):
    path = tmp_path / "r.json"
    assert brain_model.main(["--sections=nonsense", f"--json={path}"]) == 2
    assert not path.exists()
