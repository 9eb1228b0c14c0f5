"""Readers (``dirnet_tf.readers``) on files the tests write in each real format.

Geometry is checked against references written here from the format
definitions (DICOM PS3.3 C.7.6.2.1.1 for the patient position of a pixel, the
affine handed to nibabel for NIfTI), not against the reader's own helpers.
nibabel and pydicom tests are skipped when those optional packages are absent.
"""

import os
import sys
import warnings

import h5py
import numpy as np
import pytest
from PIL import Image as PILImage

from dirnet_tf import readers
from dirnet_tf.readers import GeometryWarning, ImageReadError, InputError, list_images, read_image, read_labels

LUMA = np.array([0.299, 0.587, 0.114])


# --------------------------------------------------------------------------- #
# Writers
# --------------------------------------------------------------------------- #


def write_png(path, array):
    PILImage.fromarray(np.asarray(array)).save(path)
    return str(path)


def write_npy(path, array):
    np.save(path, np.asarray(array))
    return str(path)


def rotation(axis, degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    r = np.eye(3)
    a, b = [(1, 2), (0, 2), (0, 1)][axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def nifti_affine(spacing, translation):
    """A rotated, anisotropic affine: rotation @ diag(spacing), plus translation (mm)."""
    aff = np.eye(4)
    aff[:3, :3] = rotation(2, 30) @ rotation(0, 10) @ np.diag(spacing)
    aff[:3, 3] = translation
    return aff


def write_dicom(path, pixels, spacing=(0.7, 0.4), position=(10.0, -20.0, 5.0),
                orientation=(1, 0, 0, 0, 1, 0), instance=1, series_uid=None, frames=None, extra=None):
    """A minimal MR DICOM file (explicit VR little endian, uint16 MONOCHROME2).

    ``pixels`` is ``(rows, cols)`` or, with ``frames``, ``(frames, rows, cols)``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "MR"
    pixels = np.asarray(pixels)
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if spacing is not None:
        ds.PixelSpacing = [float(v) for v in spacing]
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.InstanceNumber = instance
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def dicom_lps(position, orientation, spacing, row, col):
    """Patient position (LPS mm) of pixel (row, col), DICOM PS3.3 C.7.6.2.1.1."""
    x_dir, y_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    # Delta_i = column spacing (PixelSpacing[1]), Delta_j = row spacing (PixelSpacing[0]).
    return np.asarray(position, float) + x_dir * spacing[1] * col + y_dir * spacing[0] * row


def lps_to_ras(p):
    return np.asarray(p, float) * np.array([-1.0, -1.0, 1.0])


def world(affine, index):
    idx = list(index) + [0.0] * (3 - len(index))
    return (np.asarray(affine) @ np.array(idx + [1.0]))[:3]


# --------------------------------------------------------------------------- #
# PNG / NPY / HDF5
# --------------------------------------------------------------------------- #


def test_png_grey(tmp_path):
    pixels = (np.arange(35).reshape(5, 7) * 7).astype(np.uint8)
    path = write_png(tmp_path / "a.png", pixels)
    (img,) = read_image(path)
    assert img.array.dtype == np.float32 and img.shape == (5, 7)
    np.testing.assert_array_equal(img.array, pixels)
    assert img.spacing == (1.0, 1.0) and img.spacing_from == "default" and img.affine is None
    (img,) = read_image(path, default_spacing=(0.5, 0.25))
    assert img.spacing == (0.5, 0.25)
    with pytest.raises(ImageReadError, match="a.png.*ndim=3"):
        read_image(path, ndim=3)


def test_png_rgb_to_grey(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1, :] = (10, 200, 40)
    (img,) = read_image(write_png(tmp_path / "c.png", rgb))
    assert img.shape == (2, 3)
    np.testing.assert_allclose(img.array, rgb.astype(float) @ LUMA, atol=1e-4)


def test_npy_2d_and_3d(tmp_path):
    a2 = np.arange(12, dtype=np.int16).reshape(3, 4)
    (img,) = read_image(write_npy(tmp_path / "a.npy", a2))
    assert img.shape == (3, 4) and img.array.dtype == np.float32
    np.testing.assert_array_equal(img.array, a2)

    a3 = np.random.default_rng(0).random((4, 5, 6))
    path = write_npy(tmp_path / "v.npy", a3)
    (vol,) = read_image(path)  # default: a volume
    assert vol.shape == (4, 5, 6) and vol.spacing == (1.0, 1.0, 1.0)
    (vol,) = read_image(path, ndim=3, default_spacing=2.0)
    assert vol.spacing == (2.0, 2.0, 2.0)
    stack = read_image(path, ndim=2)
    assert len(stack) == 4 and all(s.shape == (5, 6) for s in stack)
    np.testing.assert_allclose(stack[2].array, a3[2], rtol=1e-6)
    assert stack[2].source == f"{path}[2]"
    with pytest.raises(ImageReadError, match="fewer axes"):
        read_image(tmp_path / "a.npy", ndim=3)


def test_hdf5_dataset_and_labels(tmp_path):
    images = np.random.default_rng(1).random((3, 8, 9)).astype(np.float32)
    labels = (images > 0.5).astype(np.uint8)
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["labels"] = labels
        f["images"].attrs["spacing_mm"] = [0.8, 1.2]
    read = read_image(f"{path}:/images")
    assert len(read) == 3 and read[1].source == f"{path}:/images[1]"
    np.testing.assert_array_equal(read[1].array, images[1])
    assert read[0].spacing == (0.8, 1.2) and read[0].spacing_from == "hdf5"

    entries, skipped = list_images(f"{path}:/images", labels=f"{path}:/labels")
    assert skipped == [] and len(entries) == 3
    np.testing.assert_array_equal(entries[2].label.array, labels[2])
    assert entries[2].label.array.dtype == np.int32

    with pytest.raises(ImageReadError, match=r"no dataset /nope.*/images"):
        read_image(f"{path}:/nope")
    with pytest.raises(ImageReadError, match="name the dataset"):
        read_image(path)  # two candidate datasets


# --------------------------------------------------------------------------- #
# NIfTI
# --------------------------------------------------------------------------- #


def test_nifti_3d_rotated_anisotropic(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(2).random((6, 7, 5)).astype(np.float32)
    spacing = (0.8, 1.3, 2.5)
    affine = nifti_affine(spacing, (-12.0, 30.5, 7.25))
    path = str(tmp_path / "vol.nii.gz")
    nib.save(nib.Nifti1Image(data, affine), path)

    (img,) = read_image(path)
    assert img.shape == (6, 7, 5) and img.spacing_from == "nifti" and img.header is not None
    np.testing.assert_allclose(img.array, data, rtol=1e-6)
    np.testing.assert_allclose(img.spacing, spacing, rtol=1e-5)
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    np.testing.assert_allclose(world(img.affine, (2, 3, 4)), (affine @ [2, 3, 4, 1])[:3], atol=1e-4)

    slices = read_image(path, ndim=2)  # a stack of 2-D slices along the third axis
    assert len(slices) == 5 and slices[3].shape == (6, 7) and slices[3].group == path
    np.testing.assert_allclose(slices[3].array, data[..., 3], rtol=1e-6)
    np.testing.assert_allclose(world(slices[3].affine, (1, 2)), (affine @ [1, 2, 3, 1])[:3], atol=1e-4)
    np.testing.assert_allclose(slices[3].spacing, spacing[:2], rtol=1e-5)


def test_nifti_2d(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.arange(20, dtype=np.float32).reshape(4, 5)
    affine = nifti_affine((0.6, 1.7, 1.0), (1.0, 2.0, 3.0))
    path = str(tmp_path / "slice.nii")
    nib.save(nib.Nifti1Image(data, affine), path)
    (img,) = read_image(path)
    assert img.ndim == 2 and img.shape == (4, 5)
    np.testing.assert_array_equal(img.array, data)
    np.testing.assert_allclose(img.spacing, (0.6, 1.7), rtol=1e-5)
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)


# --------------------------------------------------------------------------- #
# DICOM
# --------------------------------------------------------------------------- #

OBLIQUE = (np.cos(0.3), np.sin(0.3), 0.0, 0.0, 0.0, -1.0)  # rows run obliquely in x-y, columns head->feet


def test_dicom_single_frame_geometry(tmp_path):
    pytest.importorskip("pydicom")
    pixels = np.arange(6 * 8).reshape(6, 8) * 3
    position, spacing = (12.5, -40.0, 101.0), (0.7, 0.4)
    path = write_dicom(tmp_path / "one.dcm", pixels, spacing, position, OBLIQUE,
                       extra={"RescaleSlope": 2, "RescaleIntercept": -10})
    (img,) = read_image(path)
    assert img.shape == (6, 8) and img.spacing == spacing and img.spacing_from == "dicom"
    np.testing.assert_array_equal(img.array, pixels * 2 - 10)
    for row, col in [(0, 0), (3, 5), (5, 7)]:
        expected = lps_to_ras(dicom_lps(position, OBLIQUE, spacing, row, col))
        np.testing.assert_allclose(world(img.affine, (row, col)), expected, atol=1e-6)


def test_dicom_multi_frame_is_one_group(tmp_path):
    pytest.importorskip("pydicom")
    frames = np.stack([np.full((5, 6), 10 * f) + np.arange(6) for f in range(4)])
    path = write_dicom(tmp_path / "cine.dcm", frames, frames=4)
    images = read_image(path)
    assert len(images) == 4
    assert {im.group for im in images} == {path}
    assert images[2].source == f"{path}[frame 2]"
    for f, im in enumerate(images):
        np.testing.assert_array_equal(im.array, frames[f])
        assert im.spacing == (0.7, 0.4)
    with pytest.raises(ImageReadError, match="series"):
        read_image(path, ndim=3)


def test_dicom_enhanced_multi_frame_per_frame_geometry(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    def item(**kwargs):
        ds = Dataset()
        for key, value in kwargs.items():
            setattr(ds, key, value)
        return ds

    positions = [(0.0, 0.0, 4.0 * f) for f in range(3)]
    shared = item(PixelMeasuresSequence=[item(PixelSpacing=[0.5, 0.8])],
                  PlaneOrientationSequence=[item(ImageOrientationPatient=list(OBLIQUE))])
    per_frame = [item(PlanePositionSequence=[item(ImagePositionPatient=list(p))]) for p in positions]
    path = write_dicom(tmp_path / "enhanced.dcm", np.zeros((3, 4, 5)), spacing=None, position=None, frames=3,
                       extra={"SharedFunctionalGroupsSequence": [shared],
                              "PerFrameFunctionalGroupsSequence": per_frame})
    images = read_image(path)
    assert len(images) == 3 and images[0].spacing == (0.5, 0.8)
    for f, im in enumerate(images):
        expected = lps_to_ras(dicom_lps(positions[f], OBLIQUE, (0.5, 0.8), 2, 3))
        np.testing.assert_allclose(world(im.affine, (2, 3)), expected, atol=1e-6)


def test_dicom_series_sorted_by_position(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.uid import generate_uid

    folder = tmp_path / "series"
    folder.mkdir()
    orientation = OBLIQUE
    normal = np.cross(orientation[:3], orientation[3:])
    origin, step, spacing = np.array([5.0, -3.0, 40.0]), 2.5, (0.9, 0.6)
    uid = generate_uid()
    # file names and InstanceNumbers deliberately disagree with the position order
    order = [3, 0, 4, 1, 2]
    for n, k in enumerate(order):
        pixels = np.full((4, 5), 100 * k) + np.arange(5)
        write_dicom(folder / f"IM{n:02d}.dcm", pixels, spacing, origin + k * step * normal, orientation,
                    instance=10 - n, series_uid=uid)
    (vol,) = read_image(folder)
    assert vol.shape == (4, 5, 5) and vol.spacing_from == "dicom"
    np.testing.assert_allclose(vol.spacing, (0.9, 0.6, 2.5), rtol=1e-6)
    for k in range(5):
        np.testing.assert_array_equal(vol.array[..., k], np.full((4, 5), 100 * k) + np.arange(5))
    for index in [(0, 0, 0), (3, 4, 2), (1, 2, 4)]:
        lps = dicom_lps(origin + index[2] * step * normal, orientation, spacing, index[0], index[1])
        np.testing.assert_allclose(world(vol.affine, index), lps_to_ras(lps), atol=1e-6)

    entries, skipped = list_images(folder)  # a folder made of one series is one volume
    assert len(entries) == 1 and skipped == [] and entries[0].image.shape == (4, 5, 5)
    entries, _ = list_images(folder, ndim=2)  # ... or its slices one by one
    assert len(entries) == 5 and entries[0].image.shape == (4, 5)


def test_ultrasound_region_inside_image(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType = 1, 1
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 2, 1
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 9, 6
    region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = 3, 3
    region.PhysicalDeltaX, region.PhysicalDeltaY = 0.02, 0.03
    path = write_dicom(tmp_path / "us.dcm", np.zeros((8, 10)), spacing=None, position=None,
                       extra={"SequenceOfUltrasoundRegions": [region]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        (img,) = read_image(path)
    assert img.spacing_from == "ultrasound-region" and img.affine is None and img.notes == []
    np.testing.assert_allclose(img.spacing, (0.3, 0.2))  # (row, col) mm from cm deltas (Y, X)


def test_pydicom_echo_file():
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("examples_ybr_color.dcm")
    if path is None:
        pytest.skip("pydicom test file examples_ybr_color.dcm not shipped")
    with pytest.warns(GeometryWarning, match=r"outside the 320x240 image.*2x down-sample"):
        images = read_image(path)
    assert len(images) == 30
    assert all(im.shape == (240, 320) and im.array.dtype == np.float32 for im in images)
    assert len({im.group for im in images}) == 1 and images[0].group is not None
    assert images[0].spacing_from == "ultrasound-region"
    np.testing.assert_allclose(images[0].spacing, (1.021, 1.021), atol=2e-3)
    assert images[0].notes and "down-sample" in images[0].notes[0]
    assert 5.0 < images[10].array.mean() < 250.0  # decoded, grey, not blank


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def test_corrupt_files_name_the_file(tmp_path):
    good = write_png(tmp_path / "ok.png", np.zeros((16, 16), np.uint8))
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.png"):
        read_image(truncated)
    with pytest.raises(ImageReadError, match="missing.npy: no such file"):
        read_image(tmp_path / "missing.npy")
    (tmp_path / "what.xyz").write_text("hello")
    with pytest.raises(ImageReadError, match="what.xyz: unsupported file type"):
        read_image(tmp_path / "what.xyz")


def test_corrupt_nifti(tmp_path):
    pytest.importorskip("nibabel")
    path = tmp_path / "garbage.nii"
    path.write_bytes(os.urandom(600))
    with pytest.raises(ImageReadError, match="garbage.nii: not a readable NIfTI"):
        read_image(path)


def test_text_file_named_dcm(tmp_path):
    pytest.importorskip("pydicom")
    path = tmp_path / "notes.dcm"
    path.write_text("this is not DICOM\n" * 20)
    with pytest.raises(ImageReadError, match="notes.dcm"):
        read_image(path)


def test_partial_folder_reads_valid_and_reports_skipped(tmp_path):
    write_png(tmp_path / "a.png", np.full((6, 6), 7, np.uint8))
    write_npy(tmp_path / "b.npy", np.ones((6, 6)))
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "readme.md").write_text("not an image")
    entries, skipped = list_images(tmp_path)
    assert [os.path.basename(e.image.source) for e in entries] == ["a.png", "b.npy"]
    reasons = dict((os.path.basename(p), r) for p, r in skipped)
    assert set(reasons) == {"c.png", "readme.md"}
    assert "c.png" in reasons["c.png"] and "corrupt" in reasons["c.png"]
    # every file broken -> an error that lists them
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="no readable image.*x.png"):
        list_images(tmp_path / "only")


def test_mixed_2d_3d_is_an_error(tmp_path):
    write_npy(tmp_path / "flat.npy", np.zeros((5, 5)))
    write_npy(tmp_path / "vol.npy", np.zeros((5, 5, 5)))
    with pytest.raises(InputError, match=r"mixed.*flat.npy.*vol.npy"):
        list_images(tmp_path)
    entries, _ = list_images(tmp_path, ndim=2)  # the volume read as 5 slices is fine
    assert len(entries) == 6


def test_labels_by_stem_and_shape_mismatch(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    write_npy(images / "case1.npy", np.random.default_rng(3).random((8, 8)))
    write_npy(images / "case2.npy", np.random.default_rng(4).random((8, 8)))
    lab = np.zeros((8, 8), np.uint8)
    lab[2:5, 3:6] = 2
    write_png(labels / "case1.png", lab)
    with pytest.warns(UserWarning, match="1 image.*no label map"):
        entries, _ = list_images(images, labels=labels)
    assert entries[0].label is not None and entries[1].label is None
    np.testing.assert_array_equal(entries[0].label.array, lab)
    assert entries[0].label.array.dtype == np.int32

    write_npy(labels / "case2.npy", np.zeros((8, 9), np.int32))
    with pytest.raises(InputError, match=r"case2.npy.*\(8, 9\).*case2.npy.*\(8, 8\)") as info:
        list_images(images, labels=labels)
    assert str(labels / "case2.npy") in str(info.value) and str(images / "case2.npy") in str(info.value)

    write_npy(tmp_path / "fractional.npy", np.full((3, 3), 0.5))
    with pytest.raises(ImageReadError, match="not an integer label map"):
        read_labels(tmp_path / "fractional.npy")


def test_csv_and_txt_lists_relative_to_the_list(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_npy(data / "x.npy", np.zeros((4, 4)))
    write_npy(data / "y.npy", np.ones((4, 4)))
    write_npy(data / "y_lab.npy", np.eye(4, dtype=np.int32))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "pairs.csv").write_text("image,label,group\n../data/y.npy,../data/y_lab.npy,p1\n../data/x.npy,,p1\n")
    entries, skipped = list_images(lists / "pairs.csv")
    assert skipped == [] and [os.path.basename(e.image.source) for e in entries] == ["y.npy", "x.npy"]
    assert entries[0].image.group == "p1" and entries[1].image.group == "p1"
    np.testing.assert_array_equal(entries[0].label.array, np.eye(4))
    assert entries[1].label is None

    (lists / "some.txt").write_text("# two images\n../data/x.npy\n\n../data/missing.npy\n")
    entries, skipped = list_images(lists / "some.txt")
    assert len(entries) == 1 and len(skipped) == 1 and "missing.npy" in skipped[0][0]

    (lists / "bad.csv").write_text("path\n../data/x.npy\n")
    with pytest.raises(InputError, match="bad.csv.*`image` column"):
        list_images(lists / "bad.csv")


def test_glob_sorted(tmp_path):
    for name in ["b2.npy", "a1.npy", "c3.npy"]:
        write_npy(tmp_path / name, np.zeros((3, 3)))
    entries, _ = list_images(str(tmp_path / "*.npy"))
    assert [os.path.basename(e.image.source) for e in entries] == ["a1.npy", "b2.npy", "c3.npy"]
    with pytest.raises(InputError, match="matches no files"):
        list_images(str(tmp_path / "*.png"))


@pytest.mark.parametrize("module, suffix", [("nibabel", "x.nii"), ("pydicom", "x.dcm")])
def test_missing_optional_dependency_message(tmp_path, monkeypatch, module, suffix):
    path = tmp_path / suffix
    path.write_bytes(b"\0" * 400)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[medical\]"):
        readers.read_image(path)
