"""DIRNet displacements as ITK displacement-field images (SimpleITK objects and files).

Needs numpy and SimpleITK (an optional extra: ``pip install -e .[medical]``,
imported only when used); no TensorFlow.

Units and axes.  The input is a dense displacement at every voxel of a grid,
in **voxels of that grid, ij (array) order** (component ``d`` moves along
array axis ``d``), with the grid's voxel -> **RAS+ mm** affine (4x4; 2-D also a
3x3 in-plane matrix).  The image written is ITK's: size = the array shape
(ITK index ``x`` = array axis ``i``), origin / spacing / direction of the grid
in ITK's **LPS+ mm** (:func:`dirnet_tf.itk.itk_geometry`), and every pixel the
physical displacement ``L u`` in **mm along the LPS axes** (``L`` = the linear
part of voxel -> LPS) -- the convention of ITK/ANTs displacement fields, also
in NIfTI files, whose header geometry is RAS as usual.  Read one back with
``SimpleITK.DisplacementFieldTransform(SimpleITK.ReadImage(path,
SimpleITK.sitkVectorFloat64))``: ``T(p) = p + field(p)`` maps fixed LPS points
to moving ones, as :func:`dirnet_tf.itk.itk_bspline_transform`.
"""

import os

import numpy as np

from dirnet_tf.files import atomic_write, file_extension
from dirnet_tf.itk import import_simpleitk, itk_geometry, lps_affine_parts

__all__ = ["FIELD_IMAGE_EXTENSIONS", "displacement_field_image", "write_displacement_field"]

#: Extensions of displacement-field image files.
FIELD_IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".nrrd")


def displacement_field_image(displacement, affine):
    """A dense voxel displacement as an ITK displacement-field image (LPS mm).

    Parameters
    ----------
    displacement : array_like ``[*shape, ndim]`` (or ``[1, *shape, ndim]``)
        Displacement at every voxel of the fixed (model) grid, in **voxels,
        ij order** (e.g. ``bspline_displacement(cp[None], shape, s)[0]``).
    affine : array_like
        The grid's voxel -> RAS+ mm matrix (4x4; 2-D also 3x3 in-plane).

    Returns
    -------
    SimpleITK.Image
        ``sitkVectorFloat64``, size ``shape`` (ITK x = array axis i), origin /
        spacing / direction of the grid (:func:`dirnet_tf.itk.itk_geometry`), pixel =
        displacement in mm along the LPS axes (``L u``).  Accepted as is by
        ``SimpleITK.DisplacementFieldTransform`` (``T(p) = p + field(p)``).
    """
    d = np.asarray(displacement, dtype=np.float64)
    if d.ndim >= 3 and d.ndim == d.shape[-1] + 2 and d.shape[0] == 1:
        d = d[0]
    ndim = d.shape[-1] if d.ndim else 0
    if ndim not in (2, 3) or d.ndim != ndim + 1:
        raise ValueError(f"displacement must have shape [*spatial, ndim] with ndim 2 or 3 "
                         f"(e.g. [H, W, 2] or [D, H, W, 3]), got {np.shape(displacement)}")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"displacement of shape {np.shape(displacement)} contains non-finite values")
    linear, _ = lps_affine_parts(affine, ndim)
    geometry = itk_geometry(affine, ndim)
    physical = d @ linear.T
    # GetImageFromArray reads [z, y, x, component]: reverse the spatial axes.
    order = list(range(ndim))[::-1] + [ndim]
    sitk = import_simpleitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(physical.transpose(order)), isVector=True)
    image.SetOrigin(geometry["origin"])
    image.SetSpacing(geometry["spacing"])
    image.SetDirection(geometry["direction"])
    return image


def write_displacement_field(path, displacement, affine):
    """Write :func:`displacement_field_image` to ``.nii.gz`` / ``.nii`` / ``.mha`` / ``.nrrd`` atomically.

    ``.mha`` and ``.nrrd`` keep the geometry in double precision and accept
    any (also sheared) affine; NIfTI stores it in float32 (about 1e-7
    relative) and needs orthogonal voxel axes (a ``ValueError`` otherwise).

    The vectors are stored as ITK holds them: mm along the **LPS** axes (the
    convention of ITK/ANTs displacement fields, also in NIfTI files, whose
    header geometry is RAS as usual).  Read it back with
    ``SimpleITK.DisplacementFieldTransform(SimpleITK.ReadImage(path,
    SimpleITK.sitkVectorFloat64))``.

    Parameters
    ----------
    path : str or os.PathLike
        Target file.
    displacement, affine
        As for :func:`displacement_field_image` (voxels ij; voxel -> RAS mm).

    Returns
    -------
    str
        ``path``.
    """
    ext = file_extension(path, FIELD_IMAGE_EXTENSIONS, "a displacement field file")
    image = displacement_field_image(displacement, affine)
    direction = np.reshape(image.GetDirection(), (image.GetDimension(),) * 2)
    if ext in (".nii", ".nii.gz") and not np.allclose(direction.T @ direction, np.eye(len(direction)),
                                                      atol=1e-6):
        raise ValueError(f"{os.fspath(path)}: the affine's voxel axes are not orthogonal (sheared grid); "
                         "NIfTI cannot store that geometry (ITK would silently coerce it) -- "
                         "write .mha or .nrrd instead")
    sitk = import_simpleitk()
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp))
