"""Displacement-field images (dirnet_tf.field_images) resampled by SimpleITK.

Cases and tolerances: :mod:`tests.transform_cases`.
"""

import numpy as np
import pytest

from dirnet_tf.field_images import write_displacement_field
from dirnet_tf.itk import map_points_world
from tests.transform_cases import (
    analytic,
    case,
    inside_grid,
    need_simpleitk,
    nifti_moving,
    ours,
    report,
    resample_itk,
    voxels,
)


@pytest.fixture
def sitk():
    return need_simpleitk()


@pytest.mark.parametrize("ndim, ext", [(2, ".nii.gz"), (3, ".nii.gz"), (2, ".mha"), (3, ".mha"), (3, ".nrrd")])
def test_displacement_field_file_resamples_like_warp(sitk, tmp_path, ndim, ext):
    shape, spacing, cp, affine = case(ndim, seed=2)
    moving = analytic(voxels(shape))
    u, warped = ours(cp, shape, spacing, moving)
    path = write_displacement_field(str(tmp_path / f"field{ext}"), u, affine)
    field = sitk.ReadImage(path, sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    image = sitk.ReadImage(nifti_moving(tmp_path, moving, affine), sitk.sitkFloat64)
    itk_warped = resample_itk(sitk, image, transform)
    inside = inside_grid(u, shape)
    diff = (itk_warped - warped)[inside]
    report(f"displacement field {ndim}-D {ext} vs warp", diff)
    assert np.max(np.abs(diff)) < 1e-5  # NIfTI geometry is stored in float32
    # At voxel centres the field transform is the spline map.
    vox = voxels(shape).reshape(-1, ndim)[::7]
    flip = np.array([-1.0, -1.0, 1.0])[:ndim]
    lin, off = affine[:ndim, :ndim], affine[:ndim, 3]
    got = np.array([transform.TransformPoint(((lin @ v + off) * flip).tolist()) for v in vox]) * flip
    # NIfTI keeps the geometry in float32 (~4e-7 mm here); MetaImage / NRRD in double.
    atol = 1e-5 if ext.startswith(".nii") else 1e-9
    np.testing.assert_allclose(got, map_points_world(cp, spacing, affine, vox @ lin.T + off), atol=atol)
