"""DICOM (``dirnet_tf.dicom``, through ``dirnet_tf.readers.read_image``) on files the tests write.

Geometry is checked against references written here from the format
definition (DICOM PS3.3 C.7.6.2.1.1 for the patient position of a pixel), not
against the reader's own helpers.  Skipped when pydicom is absent.
"""

import pathlib
import warnings

import numpy as np
import pytest

from dirnet_tf import dicom
from dirnet_tf.image_lists import list_images
from dirnet_tf.readers import GeometryWarning, ImageReadError, read_image
from test_readers import world


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


def test_text_file_named_dcm(tmp_path):
    pytest.importorskip("pydicom")
    path = tmp_path / "notes.dcm"
    path.write_text("this is not DICOM\n" * 20)
    with pytest.raises(ImageReadError, match="notes.dcm"):
        read_image(path)


def test_public_dataset_pixels_and_plane_geometry(tmp_path):
    pytest.importorskip("pydicom")
    pixels = np.arange(12).reshape(3, 4)
    path = write_dicom(tmp_path / "m1.dcm", pixels, (0.7, 0.4), (1.0, 2.0, 3.0), OBLIQUE,
                       extra={"PhotometricInterpretation": "MONOCHROME1", "RescaleSlope": 3})
    ds = dicom.read_dataset(path)
    np.testing.assert_array_equal(dicom.grey_pixels(ds), -3.0 * pixels)  # MONOCHROME1: negated, bright = high
    spacing, position, orientation = dicom.plane_geometry(ds)
    assert spacing == (0.7, 0.4)
    np.testing.assert_array_equal(position, (1.0, 2.0, 3.0))
    np.testing.assert_allclose(orientation, OBLIQUE)
    affine = dicom.plane_affine(spacing, position, orientation)
    np.testing.assert_allclose(world(affine, (2, 3)), lps_to_ras(dicom_lps(position, OBLIQUE, spacing, 2, 3)),
                               atol=1e-9)
    # A DICOM file without extension is recognised by its magic bytes; other files are not.
    bare = tmp_path / "IM0001"
    bare.write_bytes(pathlib.Path(path).read_bytes())
    (tmp_path / "README").write_text("not DICOM")
    assert dicom.is_dicom_file(bare) and not dicom.is_dicom_file(tmp_path / "README")
    assert dicom.list_dicom_files(str(tmp_path)) == [str(bare), path]
    with warnings.catch_warnings(), pytest.raises(ImageReadError, match=r"README: not a readable DICOM file"):
        warnings.simplefilter("ignore")  # pydicom's warnings while it tries to parse the text leniently
        dicom.read_dataset(tmp_path / "README")
