"""The synthetic beating-heart phantom: exact labels, motion, determinism, HDF5 layout."""

import numpy as np
import pytest
from scipy import ndimage

from data import cardiac_phantom as cp
from data import cardiac_h5 as sb

SMALL = dict(n_slices=2, n_phases=8, size=40)


def test_contraction_curve():
    c = cp.contraction_curve(10, 3)
    assert c[0] == 0.0 and c[3] == pytest.approx(1.0)
    assert np.all(np.diff(c[:4]) > 0) and np.all(np.diff(c[3:]) < 0)
    assert np.all((c >= 0) & (c <= 1))
    with pytest.raises(ValueError, match="es_phase"):
        cp.contraction_curve(10, 10)


def test_circular_phantom_labels_are_exact_discs():
    rng = np.random.default_rng(5)
    subj = cp.make_subject(rng, shape_noise=0.0, noise=0.0, **SMALL)
    centre = np.array(subj["attrs"]["lv_centre_ed_px"])
    ii, jj = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    rho = np.hypot(ii - centre[0], jj - centre[1])
    for s in range(2):
        r_endo = subj["attrs"]["endo_radius_ed_px"][s]
        r_epi = subj["attrs"]["epi_radius_ed_px"][s]
        expected = np.where(rho < r_endo, 1, np.where(rho < r_epi, 2, 0))
        np.testing.assert_array_equal(subj["labels"][s, 0], expected)
    # Shape noise 0: the ES cavity is a concentric disc inside the ED one, the myocardial area is conserved.
    es = int(subj["es_phase"][0])
    ed_cav, es_cav = subj["labels"][0, 0] == 1, subj["labels"][0, es] == 1
    assert np.all(ed_cav[es_cav]) and es_cav.sum() < 0.7 * ed_cav.sum()
    ed_myo, es_myo = (subj["labels"][0, 0] == 2).sum(), (subj["labels"][0, es] == 2).sum()
    assert abs(int(ed_myo) - int(es_myo)) < 0.08 * ed_myo


def test_phantom_structure_and_image_label_agreement():
    subj = cp.make_subject(np.random.default_rng(1), **SMALL)
    images, labels = subj["images"], subj["labels"]
    assert images.shape == labels.shape == (2, 8, 40, 40)
    assert images.dtype == np.float32 and labels.dtype == np.uint8
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert subj["annotated"].all() and subj["annotated"].shape == (2, 8, 2)
    np.testing.assert_array_equal(subj["ed_phase"], [0, 0])
    es = int(subj["es_phase"][0])
    assert 0 < es < 8
    for s in range(2):
        for t in range(8):
            cavity, myo = labels[s, t] == 1, labels[s, t] == 2
            assert cavity.sum() > 10 and myo.sum() > 10
            # The myocardium encloses the cavity: the cavity never touches the background.
            grown = ndimage.binary_dilation(cavity, structure=np.ones((3, 3)))
            assert not np.any(grown & (labels[s, t] == 0))
            # Blood is bright, myocardium dark (away from the edges).
            inner = ndimage.binary_erosion(cavity, iterations=1)
            core_myo = ndimage.binary_erosion(myo, iterations=1)
            assert images[s, t][inner].mean() > images[s, t][core_myo].mean() + 0.3
        # The cavity is largest at ED and smallest at ES.
        areas = (labels[s] == 1).sum(axis=(1, 2))
        assert areas.argmax() == 0 and areas.argmin() == es


def test_phantom_is_deterministic_and_split_by_subject(tmp_path):
    a, splits = cp.make_phantom(2, 1, 1, seed=3, **SMALL)
    b, _ = cp.make_phantom(2, 1, 1, seed=3, **SMALL)
    c, _ = cp.make_phantom(2, 1, 1, seed=4, **SMALL)
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name]["images"], b[name]["images"])
    assert not np.array_equal(a["PH-train-000"]["images"], c["PH-train-000"]["images"])
    assert not np.array_equal(a["PH-train-000"]["images"], a["PH-train-001"]["images"])
    assert [len(splits[s]) for s in sb.SPLITS] == [2, 1, 1]
    assert len(set(sum(splits.values(), []))) == 4
    # Written in the same layout as the Sunnybrook converter, read back unchanged.
    path = tmp_path / "ph.h5"
    assert cp.main([f"--out={path}", "--n_train=1", "--n_valid=0", "--n_test=1", "--n_slices=1",
                    "--n_phases=4", "--size=32", "--seed=3"]) == 0
    data = sb.load_h5(str(path))
    assert data["splits"] == {"train": ["PH-train-000"], "valid": [], "test": ["PH-test-000"]}
    assert data["attrs"]["spacing_mm"] == [1.5, 1.5]
    again, _ = cp.make_phantom(1, 0, 1, seed=3, n_slices=1, n_phases=4, size=32)
    np.testing.assert_array_equal(data["patients"]["PH-test-000"]["labels"], again["PH-test-000"]["labels"])
    np.testing.assert_allclose(data["patients"]["PH-test-000"]["images"], again["PH-test-000"]["images"])
    with pytest.raises(ValueError, match="size"):
        cp.make_subject(np.random.default_rng(0), size=8)
