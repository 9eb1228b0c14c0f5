"""Readers (``dirnet_tf.readers``) on files the tests write in each real format: PNG, NPY, HDF5, NIfTI.

Geometry is checked against references written here from the format
definitions (the affine handed to nibabel for NIfTI, the NIfTI sform/qform
rules), not against the reader's own helpers.  nibabel tests are skipped when
that optional package is absent.  DICOM is tested in ``test_dicom.py``,
collections (folders, lists, labels) in ``test_image_lists.py``.
"""

import os
import pathlib
import sys

import h5py
import numpy as np
import pytest
from PIL import Image as PILImage

from dirnet_tf import readers
from dirnet_tf.image_lists import list_images
from dirnet_tf.readers import ImageReadError, read_image

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


def rotated_affine(spacing, translation):
    """A rotated, anisotropic affine: rotation @ diag(spacing), plus translation (mm)."""
    aff = np.eye(4)
    aff[:3, :3] = rotation(2, 30) @ rotation(0, 10) @ np.diag(spacing)
    aff[:3, 3] = translation
    return aff


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
    affine = rotated_affine(spacing, (-12.0, 30.5, 7.25))
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
    affine = rotated_affine((0.6, 1.7, 1.0), (1.0, 2.0, 3.0))
    path = str(tmp_path / "slice.nii")
    nib.save(nib.Nifti1Image(data, affine), path)
    (img,) = read_image(path)
    assert img.ndim == 2 and img.shape == (4, 5)
    np.testing.assert_array_equal(img.array, data)
    np.testing.assert_allclose(img.spacing, (0.6, 1.7), rtol=1e-5)
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)


def write_nifti_forms(path, data, sform, sform_code, qform, qform_code):
    """A NIfTI-1 file whose sform and qform (and their codes) are set apart; checks the file holds them."""
    nib = pytest.importorskip("nibabel")
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    header.set_qform(qform, code=qform_code)  # also sets the voxel sizes (pixdim) to the qform's
    header.set_sform(sform, code=sform_code)
    nib.save(nib.Nifti1Image(data, None, header), str(path))
    saved = nib.load(str(path)).header
    assert (int(saved["sform_code"]), int(saved["qform_code"])) == (sform_code, qform_code)
    np.testing.assert_allclose(saved.get_sform(), sform, atol=1e-5)
    np.testing.assert_allclose(saved.get_qform(), qform, atol=1e-4)
    return str(path)


# The qform: a rotation, voxel sizes and an offset.  The sform: another
# rotation with a shear (x grows along j), which no qform can hold.
QFORM = rotated_affine((0.9, 1.1, 2.0), (4.0, -6.0, 10.0))
SHEAR = np.array([[1.0, 0.3, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
SFORM = SHEAR @ rotated_affine((0.8, 1.2, 2.5), (-3.0, 7.0, 1.5))


def test_nifti_sform_wins_when_its_code_is_set(tmp_path):
    data = np.random.default_rng(5).random((4, 5, 6)).astype(np.float32)
    path = write_nifti_forms(tmp_path / "both.nii", data, SFORM, 2, QFORM, 1)
    (img,) = read_image(path)
    np.testing.assert_allclose(img.affine, SFORM, atol=1e-5)
    # Spacing: the length of each sheared column of the sform, by hand.
    np.testing.assert_allclose(img.spacing, np.sqrt((SFORM[:3, :3] ** 2).sum(axis=0)), rtol=1e-5)
    np.testing.assert_allclose(world(img.affine, (1, 2, 3)), (SFORM @ [1, 2, 3, 1])[:3], atol=1e-4)
    slices = read_image(path, ndim=2)  # the slices carry the sform too
    np.testing.assert_allclose(world(slices[4].affine, (2, 1)), (SFORM @ [2, 1, 4, 1])[:3], atol=1e-4)


def test_nifti_qform_when_the_sform_code_is_zero(tmp_path):
    data = np.random.default_rng(6).random((4, 5, 6)).astype(np.float32)
    path = write_nifti_forms(tmp_path / "qform.nii", data, SFORM, 0, QFORM, 1)
    (img,) = read_image(path)
    np.testing.assert_allclose(img.affine, QFORM, atol=1e-4)
    np.testing.assert_allclose(img.spacing, (0.9, 1.1, 2.0), rtol=1e-5)


def test_nifti_without_codes_uses_the_voxel_sizes(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    path = write_nifti_forms(tmp_path / "none.nii", data, SFORM, 0, QFORM, 0)
    (img,) = read_image(path)
    # The NIfTI fallback (method 1 of nifti1.h, as nibabel's base affine): voxel sizes only, x flipped
    # (radiological), centred on the grid.
    expected = np.diag([-0.9, 1.1, 2.0, 1.0])
    expected[:3, 3] = -expected[:3, :3] @ ((np.array(data.shape) - 1) / 2.0)
    np.testing.assert_allclose(img.affine, expected, atol=1e-5)
    np.testing.assert_allclose(img.spacing, (0.9, 1.1, 2.0), rtol=1e-5)

# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def test_corrupt_files_name_the_file(tmp_path):
    good = write_png(tmp_path / "ok.png", np.zeros((16, 16), np.uint8))
    data = pathlib.Path(good).read_bytes()
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


@pytest.mark.parametrize("module, suffix", [("nibabel", "x.nii"), ("pydicom", "x.dcm")])
def test_missing_optional_dependency_message(tmp_path, monkeypatch, module, suffix):
    path = tmp_path / suffix
    path.write_bytes(b"\0" * 400)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[medical\]"):
        readers.read_image(path)


# --------------------------------------------------------------------------- #
# Public helpers: HDF5 specs, Pillow decoding, grey conversion
# --------------------------------------------------------------------------- #


def test_split_hdf5_spec():
    assert readers.split_hdf5_spec("a/b.H5:/group/images") == ("a/b.H5", "/group/images")
    assert readers.split_hdf5_spec("data.hdf5:/x") == ("data.hdf5", "/x")
    assert readers.split_hdf5_spec("data.h5") is None
    assert readers.split_hdf5_spec("image.png") is None
    assert readers.split_hdf5_spec("C:/data/a.nii") is None


def test_decode_pil_keeps_values_and_types(tmp_path):
    grey16 = (np.arange(12).reshape(3, 4) * 5000).astype(np.uint16)
    path16 = tmp_path / "g16.png"
    PILImage.fromarray(grey16).save(path16)
    (a,) = readers.decode_pil(path16)
    assert a.shape == (3, 4) and a.dtype.kind in "ui"
    np.testing.assert_array_equal(a, grey16)

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 7
    path = tmp_path / "rgba.png"
    PILImage.fromarray(rgba).save(path)
    (a,) = readers.decode_pil(path)
    assert a.shape == (2, 2, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, rgba[..., :3])

    grey = write_png(tmp_path / "g.png", np.full((2, 3), 9, np.uint8))
    (a,) = readers.decode_pil(grey, rgb=True)  # every frame as RGB
    assert a.shape == (2, 3, 3) and (a == 9).all()

    indices = np.array([[0, 1], [2, 1]], np.uint8)
    pal = PILImage.fromarray(indices, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "p.png")
    (a,) = readers.decode_pil(tmp_path / "p.png", palette=True)
    np.testing.assert_array_equal(a, indices)
    (a,) = readers.decode_pil(tmp_path / "p.png")  # colours
    np.testing.assert_array_equal(a[1, 0], (0, 0, 255))

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageReadError, match=r"broken.png: unreadable or corrupt image file") as info:
        readers.decode_pil(broken)
    assert str(info.value).startswith(f"{broken}: ")


def test_rgb_to_grey_by_hand():
    rgba = np.array([[[255, 0, 0, 9], [0, 255, 0, 0]], [[0, 0, 255, 255], [10, 200, 40, 1]]], np.uint8)
    grey = readers.rgb_to_grey(rgba)  # alpha ignored
    assert grey.shape == (2, 2) and grey.dtype == np.float64
    np.testing.assert_allclose(grey, [[0.299 * 255, 0.587 * 255], [0.114 * 255, 2.99 + 117.4 + 4.56]])
    with pytest.raises(ValueError, match=r"\[\.\.\., 3 or 4\].*\(2, 5\)"):
        readers.rgb_to_grey(np.zeros((2, 5)))
