"""Sunnybrook loader on synthetic fixtures written in the real format (pydicom DICOM + contour text)."""

import json
import os
import sys

import h5py
import numpy as np
import pytest

from data import sunnybrook as sb
from data import sunnybrook_files as sbf
from data.cardiac_h5 import load_h5

pytest.importorskip("pydicom", reason="optional extra .[medical] (installed by `make test`)")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

NATIVE_SPACING = 2.0  # mm, fixtures; converted to 1.5 mm
OUT_SPACING = 1.5
CROP = 32


def write_dicom(path, pixels, spacing, position_z, trigger, number):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [spacing, spacing]
    # Slice normal along -z so that the position along the normal is -z: the loader
    # must use IPP . normal, not the raw z.
    ds.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
    ds.ImagePositionPatient = [0.0, 0.0, float(position_z)]
    ds.SliceLocation = float(position_z)
    ds.TriggerTime = float(trigger)
    ds.InstanceNumber = number
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def rectangle(x0, x1, y0, y1):
    """Contour text (x = column, y = row) of an axis-aligned rectangle."""
    pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    return "".join(f"{x:.3f} {y:.3f}\n" for x, y in pts)


def cavity_box(t):
    """Endocardium rectangle (x0, x1, y0, y1) in native pixels at phase t: contracts at t=2."""
    shrink = {0: 0.0, 1: 1.0, 2: 2.3, 3: 1.0}[t]
    return (15.3 + shrink, 24.6 - shrink, 12.2 + shrink, 21.7 - shrink)


def epi_box(t):
    x0, x1, y0, y1 = cavity_box(t)
    return (x0 - 3.07, x1 + 3.07, y0 - 3.07, y1 + 3.07)


def make_patient(image_root, contour_root, folder, pid, series, n_slices=2, n_phases=4, contoured=(0, 2),
                 shape=(36, 40), broken=(), odd_size=(), extra_series=None, missing_contour=None, seed=0):
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(image_root, folder)
    os.makedirs(img_dir, exist_ok=True)
    numbers = {}
    for s in range(n_slices):
        for t in range(n_phases):
            n = s * n_phases + t + 1
            numbers[(s, t)] = n
            path = os.path.join(img_dir, f"IM-{series}-{n:04d}.dcm")
            if n in broken:
                with open(path, "wb") as f:
                    f.write(b"this is not a DICOM file" * 4)
                continue
            shp = (shape[0] + 3, shape[1]) if n in odd_size else shape
            img = 200 + rng.integers(0, 20, size=shp)
            x0, x1, y0, y1 = cavity_box(t)
            ii, jj = np.meshgrid(np.arange(shp[0]), np.arange(shp[1]), indexing="ij")
            img[(jj > x0) & (jj < x1) & (ii > y0) & (ii < y1)] = 900
            # Slices are written in decreasing z (increasing position along the normal -z);
            # trigger times increase with t.
            write_dicom(path, img, NATIVE_SPACING, position_z=-8.0 * s, trigger=40.0 * t + 3, number=n)
    if extra_series:
        # A localiser-like series with a single image must not be picked.
        write_dicom(os.path.join(img_dir, f"IM-{extra_series}-0001.dcm"), np.zeros(shape), 1.0, 0.0, 0.0, 1)
    if contour_root is not None:
        cdir = os.path.join(contour_root, pid, "contours-manual", "IRCCI-expert")
        os.makedirs(cdir, exist_ok=True)
        for s in range(n_slices):
            for t in contoured:
                n = numbers[(s, t)]
                with open(os.path.join(cdir, f"IM-0001-{n:04d}-icontour-manual.txt"), "w") as f:
                    f.write(rectangle(*cavity_box(t)))
                with open(os.path.join(cdir, f"IM-0001-{n:04d}-ocontour-manual.txt"), "w") as f:
                    f.write(rectangle(*epi_box(t)))
        if missing_contour:
            with open(os.path.join(cdir, f"IM-0001-{missing_contour:04d}-icontour-manual.txt"), "w") as f:
                f.write(rectangle(*cavity_box(0)))
    return numbers


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sunnybrook_raw")
    images = root / "challenge_training"
    contours = root / "contours"
    # Patient in the training group; image folder drops the leading zero; third slice has a broken file;
    # a contour refers to an image that does not exist; one image has an inconsistent size.
    make_patient(str(images), str(contours), "SC-HF-I-1", "SC-HF-I-01", "0004", n_slices=3,
                 broken=(10,), missing_contour=99, odd_size=(), seed=1)
    # Validation patient with an extra series, a full-size mismatch in one frame (slice 1 dropped).
    make_patient(str(root / "challenge_validation"), str(contours), "SC-HF-NI-07", "SC-HF-NI-07", "0523",
                 extra_series="0001", odd_size=(6,), seed=2)
    # Online patient without contours at all.
    make_patient(str(root / "challenge_online"), None, "SC-HYP-9", "SC-HYP-09", "0003", seed=3)
    return root


@pytest.fixture(scope="module")
def converted(raw_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sunnybrook_h5") / "sb.h5"
    report = sb.convert(str(raw_dataset), str(out), spacing=OUT_SPACING, crop_size=CROP, verbose=False)
    return out, report


def test_normalize_patient_id():
    assert sbf.normalize_patient_id("SC-HF-I-1") == "SC-HF-I-01"
    assert sbf.normalize_patient_id("sc-hf-ni-034") == "SC-HF-NI-34"
    assert sbf.normalize_patient_id("/x/y/SC-N-2/") == "SC-N-02"
    assert sbf.normalize_patient_id("SC-XYZ-1") is None
    # Every default-table entry is in canonical form and the challenge has 15 per group.
    assert all(sbf.normalize_patient_id(p) == p for p in sbf.DEFAULT_SERIES)
    groups = [g for g, _ in sbf.DEFAULT_SERIES.values()]
    assert len(sbf.DEFAULT_SERIES) == 45
    assert {g: groups.count(g) for g in set(groups)} == {"training": 15, "validation": 15, "online": 15}


def test_read_contour_converts_xy_to_ij(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("10.5 3.25\n\n11.0 4.0\n 12 7 \n")
    pts = sbf.read_contour(str(path))
    np.testing.assert_array_equal(pts, [[3.25, 10.5], [4.0, 11.0], [7.0, 12.0]])
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\n3 four\n5 6\n")
    with pytest.raises(sbf.SunnybrookError, match=r"bad\.txt, line 2"):
        sbf.read_contour(str(bad))
    short = tmp_path / "short.txt"
    short.write_text("1 2\n3 4\n")
    with pytest.raises(sbf.SunnybrookError, match="at least 3 points"):
        sbf.read_contour(str(short))


def _inside_convex(points, centres):
    """Independent reference: strictly left of every edge of a counter-clockwise convex polygon."""
    inside = np.ones(len(centres), bool)
    for a, b in zip(points, np.roll(points, -1, axis=0)):
        cross = (b[0] - a[0]) * (centres[:, 1] - a[1]) - (b[1] - a[1]) * (centres[:, 0] - a[0])
        inside &= cross > 0
    return inside


def test_rasterize_polygon_matches_hand_made_polygons():
    shape = (20, 24)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    centres = np.stack([ii.ravel(), jj.ravel()], 1).astype(float)
    # Triangle in ij, orientation made counter-clockwise in (i, j) for the reference.
    tri = np.array([[2.3, 3.1], [15.7, 6.2], [6.4, 20.9]])
    if (tri[1, 0] - tri[0, 0]) * (tri[2, 1] - tri[0, 1]) - (tri[1, 1] - tri[0, 1]) * (tri[2, 0] - tri[0, 0]) < 0:
        tri = tri[::-1]
    got = sb.rasterize_polygon(tri, shape)
    np.testing.assert_array_equal(got, _inside_convex(tri, centres).reshape(shape))
    assert 30 < got.sum() < 200
    # Rectangle from a contour file (x = column, y = row): rows 4..9, columns 2..13 exactly.
    rect = np.array([[3.5, 1.5], [3.5, 13.5], [9.5, 13.5], [9.5, 1.5]])
    mask = sb.rasterize_polygon(rect, shape)
    expected = np.zeros(shape, bool)
    expected[4:10, 2:14] = True
    np.testing.assert_array_equal(mask, expected)
    # Partly outside the grid: clipped, no error.
    assert sb.rasterize_polygon(rect + [15, 0], shape).sum() == (20 - 19) * 12
    with pytest.raises(ValueError, match="points_ij"):
        sb.rasterize_polygon(np.zeros((2, 2)), shape)


def test_conversion_layout_and_report(converted):
    out, report = converted
    skipped = "\n".join(f"{p}: {r}" for p, r in report.skipped)
    # The broken DICOM, the contour without image, the odd-sized image and the uncontoured patient are named.
    assert "IM-0004-0010.dcm" in skipped and "unreadable DICOM" in skipped
    assert "IM-0001-0099-icontour-manual.txt" in skipped and "image IM-0004-0099.dcm is not in the converted series" in skipped
    assert "IM-0523-0006.dcm" in skipped and "inconsistent size" in skipped
    assert "SC-HYP-09: no contour files" in skipped
    assert sorted(report.converted) == ["SC-HF-I-01", "SC-HF-NI-07", "SC-HYP-09"]

    data = load_h5(str(out))
    assert data["splits"] == {"train": ["SC-HF-I-01"], "valid": ["SC-HF-NI-07"], "test": ["SC-HYP-09"]}
    assert data["attrs"]["spacing_mm"] == [OUT_SPACING, OUT_SPACING]
    assert any("IM-0004-0010.dcm" in p for p, _ in data["attrs"]["skipped"])
    p1 = data["patients"]["SC-HF-I-01"]
    # Slice 3 lost a phase to the broken file -> dropped; slices 1-2 remain with 4 phases.
    assert p1["images"].shape == (2, 4, CROP, CROP) and p1["images"].dtype == np.float32
    assert p1["labels"].shape == (2, 4, CROP, CROP) and p1["labels"].dtype == np.uint8
    assert p1["attrs"]["series"] == "0004" and p1["attrs"]["group"] == "training"
    assert p1["attrs"]["native_spacing_mm"] == [NATIVE_SPACING, NATIVE_SPACING]
    assert 0.0 <= p1["images"].min() and p1["images"].max() <= 1.0
    # Slices sorted by position along the normal, phases by trigger time.
    np.testing.assert_allclose(p1["slice_locations"], [0.0, 8.0])
    np.testing.assert_allclose(p1["trigger_times"], [[3, 43, 83, 123]] * 2)
    np.testing.assert_array_equal(p1["annotated"][:, :, 0], [[1, 0, 1, 0]] * 2)
    np.testing.assert_array_equal(p1["ed_phase"], [0, 0])
    np.testing.assert_array_equal(p1["es_phase"], [2, 2])
    p2 = data["patients"]["SC-HF-NI-07"]
    assert p2["attrs"]["series"] == "0523"  # not the single-image series 0001
    assert p2["images"].shape[:2] == (1, 4)  # slice with the odd-sized frame dropped
    p3 = data["patients"]["SC-HYP-09"]
    assert p3["images"].shape[:2] == (2, 4) and not p3["annotated"].any() and p3["labels"].max() == 0
    np.testing.assert_array_equal(p3["ed_phase"], [-1, -1])
    with h5py.File(out, "r") as f:
        src = f["SC-HF-I-01/source_files"][()]
        assert src.shape == (2, 4) and src[0, 0].decode().endswith(os.path.join("SC-HF-I-1", "IM-0004-0001.dcm"))


def test_labels_match_independent_reference(converted):
    out, _ = converted
    p1 = load_h5(str(out))["patients"]["SC-HF-I-01"]
    origin = np.array(p1["attrs"]["crop_origin"])
    scale = OUT_SPACING / NATIVE_SPACING
    k = np.arange(CROP)
    # Native (row, column) of each output pixel centre.
    rows = (origin[0] + k) * scale
    cols = (origin[1] + k) * scale
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    for t in (0, 2):
        x0, x1, y0, y1 = cavity_box(t)
        cavity = (cc > x0) & (cc < x1) & (rr > y0) & (rr < y1)
        ex0, ex1, ey0, ey1 = epi_box(t)
        epi = (cc > ex0) & (cc < ex1) & (rr > ey0) & (rr < ey1)
        expected = np.where(cavity, 1, np.where(epi, 2, 0))
        for s in range(2):
            np.testing.assert_array_equal(p1["labels"][s, t], expected)
    # The crop is centred on the LV: the cavity centre lies near the middle of the crop.
    centre = np.argwhere(p1["labels"][0, 0] == 1).mean(axis=0)
    assert np.all(np.abs(centre - (CROP - 1) / 2) <= 1.5)
    # Images follow the same geometry: the bright cavity lies under label 1.
    img = p1["images"][0, 0]
    assert img[p1["labels"][0, 0] == 1].mean() > 0.9 > 0.3 > img[p1["labels"][0, 0] == 2].mean()
    # Unannotated phases carry no labels.
    assert p1["labels"][:, [1, 3]].max() == 0


def test_series_json_override_and_random_split(raw_dataset, tmp_path):
    override = tmp_path / "series.json"
    # Wrong series for SC-HF-I-01 on purpose: the loader notes it and detects the right one; SC-HYP-9 gets
    # an explicit folder.
    override.write_text(json.dumps({
        "SC-HF-I-1": {"series": ["0777"]},
        "SC-HYP-09": {"image_dir": "challenge_online/SC-HYP-9", "group": "validation"},
    }))
    out = tmp_path / "sb.h5"
    report = sb.convert(str(raw_dataset), str(out), spacing=OUT_SPACING, crop_size=CROP, series_json=str(override),
                        split="random", split_seed=3, verbose=False)
    data = load_h5(str(out))
    assert data["patients"]["SC-HF-I-01"]["attrs"]["series"] == "0004"
    assert data["patients"]["SC-HF-I-01"]["attrs"]["series_from"] == "detected"
    assert any("0777" in r and "detected series 0004" in r for _, r in report.notes)
    assert not any("0777" in r for _, r in report.skipped)
    assert data["patients"]["SC-HYP-09"]["attrs"]["group"] == "validation"
    members = sum(data["splits"].values(), [])
    assert sorted(members) == sorted(report.converted) and len(set(members)) == len(members)
    # Same seed -> same split; the split is by patient.
    again = sb.split_patients({p: "" for p in members}, mode="random", seed=3)
    assert again == data["splits"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"SC-HF-I-1": {"group": "nope"}}))
    with pytest.raises(sbf.SunnybrookError, match="bad.json.*group"):
        sbf.load_series_table(str(bad))


def test_split_patients_by_patient():
    groups = {f"SC-N-{i:02d}": g for i, g in enumerate(["training"] * 5 + ["validation"] * 3 + ["online"] * 2)}
    split = sb.split_patients(groups)
    assert [len(split[s]) for s in sb.SPLITS] == [5, 3, 2]
    assert all(groups[p] == "online" for p in split["test"])
    many = {f"SC-N-{i:02d}": "" for i in range(45)}
    a = sb.split_patients(many, mode="random", seed=0)
    b = sb.split_patients(many, mode="random", seed=1)
    assert a != b and sorted(sum(a.values(), [])) == sorted(many)
    assert [len(a[s]) for s in sb.SPLITS] == [15, 15, 15]
    tiny = sb.split_patients({"SC-N-01": "", "SC-N-02": "", "SC-N-03": ""}, mode="random", seed=0)
    assert all(len(v) == 1 for v in tiny.values())
    with pytest.raises(sbf.SunnybrookError, match="SC-N-00.*--split=random"):
        sb.split_patients({"SC-N-00": ""})


def test_cli_and_errors(raw_dataset, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    assert sb.main([f"--raw_dir={raw_dataset}", f"--out={out}", "--crop_size=24"]) == 0
    assert load_h5(str(out))["patients"]["SC-HF-I-01"]["images"].shape[2:] == (24, 24)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sb.main([f"--raw_dir={empty}", f"--out={tmp_path / 'x.h5'}"]) == 1
    assert "No Sunnybrook patient folders" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()
    with pytest.raises(FileNotFoundError, match="nothere.h5"):
        load_h5(str(tmp_path / "nothere.h5"))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="junk.h5"):
        load_h5(str(junk))


def test_missing_pydicom_message(tmp_path, monkeypatch):
    path = str(tmp_path / "IM-0004-0001.dcm")
    write_dicom(path, np.zeros((4, 4)), NATIVE_SPACING, 0.0, 0.0, 1)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[medical\]"):
        sb.read_dicom_frame(path)


def test_read_dicom_frame_and_skip_lines_name_the_file_once(tmp_path, capsys):
    pixels = np.arange(20).reshape(4, 5) * 7
    path = str(tmp_path / "IM-0004-0001.dcm")
    write_dicom(path, pixels, 1.25, position_z=-8.0, trigger=43.0, number=1)
    got, spacing, position, trigger = sb.read_dicom_frame(path)
    assert got.dtype == np.float32 and got.shape == (4, 5)
    np.testing.assert_array_equal(got, pixels)
    assert spacing == (1.25, 1.25) and trigger == 43.0
    assert position == 8.0  # along the normal (0, 1, 0) x (1, 0, 0) = -z, not the raw z
    broken = tmp_path / "IM-0004-0002.dcm"
    broken.write_bytes(b"this is not a DICOM file" * 4)
    with pytest.raises(sbf.SunnybrookError, match="unreadable DICOM") as info:
        sb.read_dicom_frame(str(broken))
    assert str(broken) not in str(info.value)
    report = sb.Report(verbose=True)
    cine = sb.read_cine_slices(str(tmp_path), {1: "IM-0004-0001.dcm", 2: "IM-0004-0002.dcm"}, report)
    assert cine["pixels"].shape == (1, 1, 4, 5) and cine["files"] == [[path]]
    err = capsys.readouterr().err
    assert f"[sunnybrook] skipped {broken}: unreadable DICOM" in err and err.count(str(broken)) == 1
