"""Geometry of registration results: voxel <-> world affines of images and model grids, ITK grids.

Conventions (as :mod:`dirnet_tf.readers` and :mod:`dirnet_tf.preprocessing`):

* **Voxel indices** are in array order (ij / ijk), integer values at voxel centres.
* **World coordinates** are RAS+ mm (NIfTI/nibabel).  Images without patient geometry (PNG,
  JPEG, TIFF, BMP, ``.npy``, numpy arrays) get the **pixel affine** of :func:`pixel_affine`:
  the physical space in which ITK reads such a file (ITK index ``x`` = array axis ``j``
  (columns), ``y`` = ``i`` (rows), origin 0, identity direction, spacing = the image's
  spacing), written as a RAS+ affine, so that ITK and elastix outputs of such images overlay
  the file as ITK reads it.
* A **model grid** is the grid the network sees; :class:`dirnet_tf.preprocessing.GridTransform`
  (per-axis scale and offset) or :class:`dirnet_tf.world_grid.AffineGridTransform` (a general
  affine: the fixed grid in closest-RAS order, the moving image sampled through the headers)
  maps its voxel indices to the image's (:func:`model_affine` composes that with the image's
  affine).
"""

import numpy as np

from dirnet_tf.itk import itk_geometry

__all__ = ["pixel_affine", "image_affine", "model_affine", "planar_parts", "itk_grid", "voxels_to_world",
           "world_to_voxels"]


def pixel_affine(spacing):
    """RAS+ affine of an image without patient geometry, matching how ITK reads it.

    Parameters
    ----------
    spacing : sequence of float
        mm per array axis (ij or ijk order).

    Returns
    -------
    np.ndarray (4, 4)
        Voxel ``(i, j[, k], 1)`` -> RAS+ mm with ITK physical (LPS) position
        ``(j s_j, i s_i)`` in 2-D and ``(k s_k, j s_j, i s_i)`` in 3-D: the
        reversed array axes, origin 0, identity direction -- the geometry
        ``SimpleITK.ReadImage`` gives a PNG and ``SimpleITK.GetImageFromArray``
        gives a numpy array.
    """
    spacing = [float(s) for s in spacing]
    ndim = len(spacing)
    lps = np.zeros((3, 3))
    for a in range(ndim):
        lps[ndim - 1 - a, a] = spacing[a]
    if ndim == 2:
        lps[2, 2] = 1.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ lps
    return affine


def image_affine(image):
    """The image's voxel -> RAS+ mm affine (4x4), or :func:`pixel_affine` when it has no patient geometry."""
    return np.asarray(image.affine, dtype=np.float64) if image.affine is not None else pixel_affine(image.spacing)


def model_affine(affine, grid_transform):
    """4x4 model-grid voxel -> RAS+ mm: ``affine @ G`` with ``G`` the grid transform's homogeneous matrix.

    Parameters
    ----------
    affine : array (4, 4)
        The original image's voxel -> RAS+ affine (:func:`image_affine`).
    grid_transform : dirnet_tf.preprocessing.GridTransform or dirnet_tf.world_grid.AffineGridTransform
        Model index -> image index of that image: its ``matrix()`` (``(ndim + 1, ndim + 1)``: a
        per-axis scale and offset, or a general affine -- permuted, flipped, oblique) embedded
        in 4x4 (2-D: ``k`` kept).
    """
    m = np.asarray(grid_transform.matrix(), dtype=np.float64)
    n = m.shape[0] - 1
    embed = np.eye(4)
    embed[:n, :n] = m[:n, :n]
    embed[:n, 3] = m[:n, n]
    return np.asarray(affine, dtype=np.float64) @ embed


def planar_parts(affine, ndim):
    """``(linear (3, ndim), translation (3,))`` of a 4x4 voxel -> RAS+ affine (2-D: ``k = 0``)."""
    a = np.asarray(affine, dtype=np.float64)
    return a[:3, :ndim].copy(), a[:3, 3].copy()


def voxels_to_world(affine, voxels, ndim):
    """RAS+ mm ``[..., 3]`` of voxel indices ``[..., ndim]`` (ij order) under a 4x4 affine."""
    linear, translation = planar_parts(affine, ndim)
    return np.asarray(voxels, dtype=np.float64) @ linear.T + translation


def world_to_voxels(affine, world, ndim):
    """Voxel indices ``[P, ndim]`` (ij order) of RAS+ mm points ``[P, 3]`` (2-D: ``[P, 2]`` in plane, or
    ``[P, 3]`` solved in the least-squares sense) under a 4x4 affine."""
    linear, translation = planar_parts(affine, ndim)
    values = np.asarray(world, dtype=np.float64)
    if ndim == 3:
        return np.linalg.solve(linear, (values - translation).T).T
    if values.shape[1] == 3:
        return np.linalg.lstsq(linear, (values - translation).T, rcond=None)[0].T
    return np.linalg.solve(linear[:2], (values - translation[:2]).T).T


def itk_grid(image):
    """ITK geometry of an image's own grid, as ITK reads the file.

    Returns
    -------
    dict
        ``size`` (voxels per ITK index axis), ``spacing`` (mm), ``origin`` (LPS
        mm), ``direction`` (row-major, columns = index axes in LPS), and
        ``order``: the array axes of ITK index axes ``x, y[, z]`` -- the array
        axes themselves for images with an affine (NIfTI/DICOM), reversed for
        images without one (:func:`pixel_affine`).

    Raises
    ------
    ValueError
        For a 2-D image whose plane is not axial (ITK's 2-D space is x-y).
    """
    ndim = image.ndim
    if image.affine is None:
        order = list(range(ndim))[::-1]
        return {"size": [int(image.shape[a]) for a in order], "spacing": [float(image.spacing[a]) for a in order],
                "origin": [0.0] * ndim, "direction": np.eye(ndim).ravel().tolist(), "order": order}
    geometry = itk_geometry(np.asarray(image.affine, dtype=np.float64), ndim)
    return {"size": [int(n) for n in image.shape], "spacing": list(geometry["spacing"]),
            "origin": list(geometry["origin"]), "direction": list(geometry["direction"]),
            "order": list(range(ndim))}
