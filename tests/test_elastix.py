"""dirnet_tf.elastix: committed parameter files, conventions (ij order, warped = M(p + u)), errors.

The registration tests need ``itk-elastix`` (``pip install -e .[baselines]``;
``make test`` installs it); without it they are skipped.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from dirnet_tf import elastix as eb

requires_elastix = pytest.mark.skipif(not eb.elastix_available(),
                                      reason="needs itk-elastix: pip install -e .[baselines]")


def _read_parameter_file(path):
    """Minimal independent parser of the elastix ``(Key value ...)`` format."""
    params = {}
    with open(path) as f:
        for line in f:
            line = line.split("//")[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"\((\w+)\s+(.*)\)", line)
            assert m, f"unparsable line in {path}: {line!r}"
            params[m.group(1)] = [v.strip('"') for v in m.group(2).split()]
    return params


@pytest.mark.parametrize("gs", [8, 4])
def test_committed_parameter_files(gs):
    params = _read_parameter_file(eb.parameter_file(gs))
    assert params["Transform"] == ["BSplineTransform"]
    assert params["Metric"] == ["AdvancedNormalizedCorrelation"]
    assert params["NumberOfResolutions"] == ["2"]
    assert params["MaximumNumberOfIterations"] == ["250"]
    assert params["ImageSampler"] == ["Full"]
    assert [float(v) for v in params["FinalGridSpacingInVoxels"]] == [gs, gs]
    assert params["FixedImageDimension"] == ["2"]
    assert eb.load_settings()["threads"] >= 1


def test_unknown_grid_spacing_and_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="grid spacing 5"):
        eb.parameter_file(5)
    bad = tmp_path / "settings.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="settings.json"):
        eb.load_settings(str(bad))


def test_missing_itk_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "itk", None)  # makes `import itk` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[baselines\]"):
        eb.import_itk()
    assert not eb.elastix_available()


def _blob(h, w, center, sigma=(3.0, 4.5)):
    ii, jj = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.exp(-((ii - center[0]) ** 2) / (2 * sigma[0] ** 2)
                  - ((jj - center[1]) ** 2) / (2 * sigma[1] ** 2)).astype(np.float32)


def _ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def translated_pair_result():
    """A blob moved by 2 rows and -1 column; elastix (gs 8) registers it back."""
    h, w = 32, 36
    fixed = _blob(h, w, (15.0, 18.0))
    moving = _blob(h, w, (17.0, 17.0))  # moving(p + (2, -1)) == fixed(p)
    reg = eb.ElastixRegistration(grid_spacing=8, threads=1)
    return fixed, moving, reg.register(fixed, moving)


@requires_elastix
def test_registration_recovers_translation_in_ij_order(translated_pair_result):
    fixed, moving, out = translated_pair_result
    assert out["warped"].shape == fixed.shape and out["warped"].dtype == np.float32
    assert out["displacement"].shape == fixed.shape + (2,)
    assert out["seconds"] > 0
    assert _ncc(fixed, moving) < 0.9
    assert _ncc(fixed, out["warped"]) > 0.99
    # Where the blob is, the displacement is the translation, row component first.
    core = fixed > 0.3
    du = out["displacement"][core]
    np.testing.assert_allclose(np.median(du, axis=0), [2.0, -1.0], atol=0.25)


@requires_elastix
def test_warped_is_moving_sampled_at_identity_plus_displacement(translated_pair_result):
    fixed, moving, out = translated_pair_result
    grid = np.stack(np.meshgrid(np.arange(fixed.shape[0]), np.arange(fixed.shape[1]),
                                indexing="ij"), axis=-1).astype(np.float64)
    coords = grid + out["displacement"]
    reference = ndimage.map_coordinates(moving.astype(np.float64), np.moveaxis(coords, -1, 0),
                                        order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(out["warped"], reference, atol=2e-4)


@requires_elastix
def test_batch_api_and_shape_errors():
    reg = eb.ElastixRegistration(grid_spacing=4, threads=1)
    a = np.stack([_blob(20, 20, (9.0, 10.0), (3.0, 2.5)), _blob(20, 20, (10.0, 9.0), (2.5, 3.5))])
    b = np.stack([_blob(20, 20, (10.5, 10.0), (3.0, 2.5)), _blob(20, 20, (10.0, 10.0), (2.5, 3.5))])
    out = reg.register_batch(a[..., None], b[..., None], compute_displacement=False)
    assert out["warped"].shape == (2, 20, 20, 1) and out["displacement"] is None
    assert out["seconds"].shape == (2,)
    for k in range(2):
        assert _ncc(a[k], out["warped"][k, ..., 0]) > _ncc(a[k], b[k])
    with pytest.raises(ValueError, match=r"\(2, 20, 20\).*\(2, 20, 18\)"):
        reg.register_batch(a, b[:, :, :18])
    with pytest.raises(ValueError, match=r"shape \(2, 20, 20, 3\)"):
        reg.register_batch(np.zeros((2, 20, 20, 3)), np.zeros((2, 20, 20, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        reg.register_batch(np.full((20, 20), np.nan), a[0])
    with pytest.raises(ValueError, match="does not exist"):
        eb.ElastixRegistration(parameter_file=os.path.join("nowhere", "p.txt"))


def test_importing_the_library_needs_no_itk():
    """``import dirnet_tf`` and ``dirnet_tf.elastix`` never import the optional itk package."""
    code = ("import sys; import dirnet_tf, dirnet_tf.elastix; "
            "print('itk' in sys.modules, 'benchmarks' in sys.modules, 'experiments' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["False", "False", "False"]


def test_register_pairs_without_itk_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "itk", None)
    with pytest.raises(ImportError, match="itk-elastix"):
        eb.register_pairs(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)), eb.parameter_file(8))


@requires_elastix
def test_register_pairs_matches_the_class_and_takes_a_mask():
    a = np.stack([_blob(20, 20, (9.0, 10.0), (3.0, 2.5)), _blob(20, 20, (10.0, 9.0), (2.5, 3.5))])[..., None]
    b = np.stack([_blob(20, 20, (10.5, 10.0), (3.0, 2.5)), _blob(20, 20, (10.0, 10.0), (2.5, 3.5))])[..., None]
    path = eb.parameter_file(4)
    out = eb.register_pairs(a, b, path, threads=1)
    reg = eb.ElastixRegistration(parameter_file=path, threads=1)
    ref = reg.register_batch(a, b)
    reg.close()
    assert out["warped"].shape == (2, 20, 20, 1) and out["displacement"].shape == (2, 20, 20, 2)
    np.testing.assert_allclose(out["warped"], ref["warped"], atol=1e-5)
    np.testing.assert_allclose(out["displacement"], ref["displacement"], atol=1e-5)
    mask = np.zeros((20, 20), bool)
    mask[3:17, 3:17] = True
    masked = eb.register_pairs(a, b, path, fixed_mask=mask, threads=1, compute_displacement=False)
    assert masked["displacement"] is None and masked["seconds"].shape == (2,)


@requires_elastix
def test_register_pairs_3d_with_spacing_returns_voxels():
    """A volume shifted by one voxel along the first axis (2 mm voxels there): the field is ~1 voxel."""
    d, h, w = 12, 14, 16
    ii, jj, kk = np.mgrid[0:d, 0:h, 0:w].astype(np.float64)
    blob = lambda c: np.exp(-((ii - c) ** 2 / 8.0 + (jj - 7) ** 2 / 8.0 + (kk - 8) ** 2 / 10.0))  # noqa: E731
    fixed, moving = blob(5.5)[None, ..., None], blob(6.5)[None, ..., None]
    settings = eb.load_settings()
    path = os.path.join(eb.BASELINE_DIR, "brain3d_bspline.txt")
    assert settings["threads"] >= 1 and os.path.isfile(path)
    out = eb.register_pairs(fixed, moving, path, ndim=3, spacing=(2.0, 1.0, 1.0), threads=1)
    assert out["displacement"].shape == (1, d, h, w, 3)
    core = fixed[0, ..., 0] > 0.5
    np.testing.assert_allclose(np.median(out["displacement"][0][core], axis=0), [1.0, 0.0, 0.0], atol=0.3)


@requires_elastix
def test_parameter_files_run_in_sequence_and_overrides_reach_every_map():
    """Affine then B-spline (the brain baseline's two files) with mutual information across contrasts:
    a volume translated and given a non-monotonic contrast is registered back."""
    d = 24
    ii, jj, kk = np.mgrid[0:d, 0:d, 0:d].astype(np.float64)

    def scene(shift):
        a = np.exp(-((ii - 10 - shift) ** 2 + (jj - 12) ** 2 + (kk - 11) ** 2) / 18.0)
        b = np.exp(-((ii - 15 - shift) ** 2 + (jj - 9) ** 2 + (kk - 14) ** 2) / 10.0)
        return a + 0.6 * b

    fixed = scene(0.0)
    moving = scene(1.5)
    moving = np.where(moving > 0.05, 1.2 - moving, 0.0)  # non-monotonic: background stays dark
    files = [os.path.join(eb.BASELINE_DIR, n) for n in ("brain_affine.txt", "brain3d_bspline.txt")]
    overrides = {"Metric": "AdvancedMattesMutualInformation", "MaximumNumberOfIterations": "150",
                 "FinalGridSpacingInPhysicalUnits": ["16", "16", "16"]}
    reg = eb.ElastixRegistration(parameter_file=files, threads=1, ndim=3, overrides=overrides)
    try:
        assert reg.parameters.GetNumberOfParameterMaps() == 2
        assert [reg.parameters.GetParameter(n, "Transform")[0] for n in range(2)] == ["AffineTransform",
                                                                                     "BSplineTransform"]
        assert all(reg.parameters.GetParameter(n, "Metric")[0] == overrides["Metric"] for n in range(2))
        out = reg.register_batch(fixed[None], moving[None], spacing=(1.0, 1.0, 1.0))
    finally:
        reg.close()
    core = fixed > 0.3
    np.testing.assert_allclose(np.median(out["displacement"][0][core], axis=0), [1.5, 0.0, 0.0], atol=0.35)
    with pytest.raises(ValueError, match="nowhere.txt does not exist"):
        eb.ElastixRegistration(parameter_file=[files[0], "nowhere.txt"], ndim=3)
