"""World-space model grids: fixed and moving image related through their headers.

:meth:`dirnet_tf.preprocessing.ModelGrid.prepare` brings one image onto the model grid along
its own array axes (a diagonal :class:`~dirnet_tf.preprocessing.GridTransform`).  Here a pair
is brought onto ONE grid in physical space, the fixed image's model grid:

* **fixed** (:func:`prepare_fixed`): 3-D images with patient geometry are first viewed in the
  array order closest to RAS+ (:func:`closest_ras_orientation`, the rule of nibabel's
  ``io_orientation`` / ``as_closest_canonical``: array axes permuted and flipped, no
  resampling), then prepared as today at the model spacing, but centred exactly on the image's
  centre (``ModelGrid.prepare(exact_centre=True)``: no half-voxel rounding, so a symmetric crop
  does not move the grid).  The model index -> fixed index map is then a signed permutation with
  scales (an :class:`AffineGridTransform`); for an image already in RAS+ array order it is the
  :class:`GridTransform` of ``ModelGrid.prepare(image, exact_centre=True)``.  In world space the
  upper intensity percentile of both images is taken over their voxels brighter than the lower
  percentile (``foreground_high``: not the empty background), so that cropping empty background changes neither the grid nor the
  intensities the network sees.  2-D images, and images without
  patient geometry, keep their own array axes.
* **moving** (:func:`prepare_moving`): sampled (linear, its own intensity range, padding as
  ``ModelGrid.prepare``) at the world positions ``x(q) + t`` of the fixed model grid's voxels
  ``q`` (RAS+ mm, ``x(q) = A_f T_f q``), mapped into moving voxel indices through the moving
  image's affine ``A_m`` (3-D: its inverse; 2-D: the least-squares in-plane projection
  through the 3x2 linear part).  ``t`` (RAS+ mm) is 0 for ``init='header'`` and the
  difference of the intensity centres of mass (:func:`center_of_mass_world`) for
  ``init='center'``.  The moving grid transform, model index -> moving index, is a general
  affine :class:`AffineGridTransform`.

Images without patient geometry (PNG, NPY, arrays) live in the pixel space of
:func:`dirnet_tf.geometry.pixel_affine`.  Units: voxel indices in array order (ij / ijk),
integer at voxel centres; world coordinates RAS+ mm.  No TensorFlow is needed here.
"""

import dataclasses
import json

import numpy as np
from scipy import ndimage

from dirnet_tf.geometry import image_affine
from dirnet_tf.preprocessing import apply_intensity_range, displacement_to_image, intensity_range
from dirnet_tf.readers import Image, InputError

__all__ = ["AffineGridTransform", "closest_ras_orientation", "canonical_index_matrix", "canonical_image",
           "prepare_fixed", "prepare_moving", "prepare_world_pair", "center_of_mass_world", "world_to_index_matrix",
           "transform_from_dict"]

AFFINE_TRANSFORM_FORMAT = "dirnet-tf-affine-grid-transform-v1"
_EDGE_TOLERANCE = 1e-6  # voxels, as dirnet_tf.preprocessing


@dataclasses.dataclass
class AffineGridTransform:
    """A model grid placed in an image by a general affine map (model index -> image index).

    The duck-typed counterpart of :class:`dirnet_tf.preprocessing.GridTransform` (whose map is a
    per-axis scale and offset).

    Attributes
    ----------
    model_shape, model_spacing : tuple
        The model grid: voxels, and mm per model axis.
    image_shape, image_spacing : tuple
        The image: voxels, and mm per array axis.
    index_matrix : list of list of float
        ``(ndim + 1, ndim + 1)`` homogeneous matrix: model index (ij) -> image index (ij).
    image_affine : list or None
        The image's 4x4 RAS+ affine (array index -> mm), None if it has no patient geometry.
    source, spacing_from : str
        From the :class:`~dirnet_tf.readers.Image`.
    intensity : dict
        ``{'mode', 'low', 'high', 'pad_value', 'percentiles'}`` as ``GridTransform.intensity``.
    """

    model_shape: tuple
    model_spacing: tuple
    image_shape: tuple
    image_spacing: tuple
    index_matrix: list
    image_affine: list = None
    source: str = ""
    spacing_from: str = "default"
    intensity: dict = dataclasses.field(default_factory=dict)

    @property
    def ndim(self):
        """Number of spatial axes."""
        return len(self.model_shape)

    def matrix(self):
        """``(ndim + 1, ndim + 1)`` homogeneous matrix: model index -> image index (float64 copy)."""
        return np.array(self.index_matrix, dtype=np.float64)

    def model_to_image_index(self, points):
        """Model-grid voxel indices ``(..., ndim)`` -> image voxel indices (float64, same shape)."""
        m, n = self.matrix(), self.ndim
        return np.asarray(points, dtype=np.float64) @ m[:n, :n].T + m[:n, n]

    def image_to_model_index(self, points):
        """Image voxel indices ``(..., ndim)`` -> model-grid voxel indices (float64, same shape)."""
        inv, n = np.linalg.inv(self.matrix()), self.ndim
        return np.asarray(points, dtype=np.float64) @ inv[:n, :n].T + inv[:n, n]

    def model_affine(self):
        """4x4 model-grid index ``(i, j, k, 1)`` -> RAS+ mm, or None when the image affine is unknown."""
        if self.image_affine is None:
            return None
        return np.asarray(self.image_affine, dtype=np.float64) @ embed_4x4(self.matrix())

    def inside_mask(self):
        """Bool array of ``model_shape``: True where the model voxel lies within the image's extent
        (at most half a voxel beyond its border voxel centres)."""
        m, n = self.matrix(), self.ndim
        axes = [np.arange(size, dtype=np.float64).reshape([-1 if c == d else 1 for c in range(n)])
                for d, size in enumerate(self.model_shape)]
        out = np.ones(tuple(self.model_shape), dtype=bool)
        for a in range(n):  # one image axis at a time: one model-grid array in memory
            p = m[a, n] + sum(m[a, c] * axes[c] for c in range(n))
            out &= (p >= -0.5 - _EDGE_TOLERANCE) & (p <= self.image_shape[a] - 0.5 + _EDGE_TOLERANCE)
        return out

    def displacement_to_image(self, displacement, units="mm"):
        """Displacement vectors in model voxels ``(..., ndim)`` -> the image's units (no resampling).

        ``units``: ``voxels`` (image voxels per array axis), ``mm`` (mm per array axis) or
        ``world`` (a RAS+ vector in mm, ``(..., 3)``; needs the image affine).
        """
        return displacement_to_image(self, displacement, units)

    def to_dict(self):
        """JSON-serialisable dict (see :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        d["format"] = AFFINE_TRANSFORM_FORMAT
        for key in ("model_shape", "model_spacing", "image_shape", "image_spacing"):
            d[key] = list(d[key])
        d["index_matrix"] = self.matrix().tolist()
        if d["image_affine"] is not None:
            d["image_affine"] = np.asarray(d["image_affine"], dtype=np.float64).tolist()
        return d

    def to_json(self):
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict` (accepts a JSON string too)."""
        if isinstance(d, str):
            d = json.loads(d)
        d = dict(d)
        if d.pop("format", AFFINE_TRANSFORM_FORMAT) != AFFINE_TRANSFORM_FORMAT:
            raise InputError(f"not a {AFFINE_TRANSFORM_FORMAT} description")
        for key, kind in (("model_shape", int), ("model_spacing", float), ("image_shape", int),
                          ("image_spacing", float)):
            d[key] = tuple(kind(v) for v in d[key])
        d["index_matrix"] = np.asarray(d["index_matrix"], dtype=np.float64).tolist()
        return cls(**d)

    from_json = from_dict


def transform_from_dict(d):
    """A :class:`~dirnet_tf.preprocessing.GridTransform` or :class:`AffineGridTransform` from its dict / JSON."""
    from dirnet_tf.preprocessing import TRANSFORM_FORMAT, GridTransform

    if isinstance(d, str):
        d = json.loads(d)
    if d.get("format", TRANSFORM_FORMAT) == AFFINE_TRANSFORM_FORMAT:
        return AffineGridTransform.from_dict(d)
    return GridTransform.from_dict(d)


def embed_4x4(matrix):
    """A ``(n + 1, n + 1)`` homogeneous index map (n = 2 or 3) as 4x4 acting on ``(i, j, k, 1)`` (2-D: k kept)."""
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0] - 1
    out = np.eye(4)
    out[:n, :n] = m[:n, :n]
    out[:n, 3] = m[:n, n]
    return out


# --------------------------------------------------------------------------- #
# Orientation
# --------------------------------------------------------------------------- #


def closest_ras_orientation(affine, ndim=3):
    """For each array axis, the RAS+ axis it is closest to and the sign: ``[(ras_axis, +1 | -1), ...]``.

    The rule of nibabel's ``io_orientation``: the linear part with unit columns is replaced by
    its closest orthonormal matrix (SVD), then each array axis in turn takes the world axis of
    its largest absolute component among those not yet taken.

    Parameters
    ----------
    affine : array (4, 4)
        Voxel ``(i, j, k, 1)`` -> RAS+ mm.
    ndim : int
        Array axes considered (the first ``ndim`` columns).
    """
    a = np.asarray(affine, dtype=np.float64)
    rzs = a[:3, :ndim]
    zooms = np.sqrt(np.sum(rzs * rzs, axis=0))
    zooms[zooms == 0] = 1.0
    p, s, qs = np.linalg.svd(rzs / zooms, full_matrices=False)
    tol = s.max() * max(rzs.shape) * np.finfo(np.float64).eps
    keep = s > tol
    r = p[:, keep] @ qs[keep]
    out = []
    for axis in range(ndim):
        col = r[:, axis]
        if np.allclose(col, 0):
            raise InputError(f"affine {a.tolist()}: array axis {axis} has no direction in world space")
        world = int(np.argmax(np.abs(col)))
        out.append((world, -1 if col[world] < 0 else 1))
        r[world, :] = 0
    return out


def canonical_index_matrix(shape, affine):
    """The homogeneous map (4x4) from the closest-RAS view's voxel index to the image's own index.

    Parameters
    ----------
    shape : sequence of 3 int
        The image's array shape.
    affine : array (4, 4)
        Its voxel -> RAS+ mm affine.

    Returns
    -------
    matrix : np.ndarray (4, 4)
        ``p = matrix @ (k, 1)``: a signed permutation (and shifts ``n - 1`` for flipped axes).
    canonical_shape : tuple of int
    """
    orientation = closest_ras_orientation(affine, 3)
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    canonical_shape = [0, 0, 0]
    for axis, (world, sign) in enumerate(orientation):
        m[axis, world] = sign
        m[axis, 3] = 0.0 if sign > 0 else shape[axis] - 1
        canonical_shape[world] = int(shape[axis])
    return m, tuple(canonical_shape)


def canonical_image(image):
    """The 3-D image viewed in its closest-RAS array order (no resampling) and the index map.

    Returns
    -------
    canonical : dirnet_tf.readers.Image
        Array transposed and flipped, spacing permuted, affine ``A @ matrix``.
    matrix : np.ndarray (4, 4)
        Canonical voxel index -> the image's voxel index (:func:`canonical_index_matrix`).
    """
    matrix, _ = canonical_index_matrix(image.shape, image.affine)
    source_axis = [int(np.argmax(np.abs(matrix[:3, c]))) for c in range(3)]  # image axis of canonical axis c
    array = np.transpose(image.array, source_axis)
    flips = tuple(c for c in range(3) if matrix[source_axis[c], c] < 0)
    if flips:
        array = np.flip(array, flips)
    spacing = tuple(float(image.spacing[a]) for a in source_axis)
    affine = np.asarray(image.affine, dtype=np.float64) @ matrix
    return Image(np.ascontiguousarray(array), spacing, affine, image.source, image.group, None,
                 image.spacing_from), matrix


# --------------------------------------------------------------------------- #
# Preparation
# --------------------------------------------------------------------------- #


def prepare_fixed(grid, image):
    """The fixed image on the model grid in its closest-RAS array order (3-D with geometry).

    Parameters
    ----------
    grid : dirnet_tf.preprocessing.ModelGrid
    image : dirnet_tf.readers.Image

    Returns
    -------
    array : np.ndarray float32 of ``grid.shape``
    transform : GridTransform or AffineGridTransform
        Model index -> fixed index: ``grid.prepare(image, exact_centre=True)``'s own transform
        when the image is 2-D, has no patient geometry or is already in RAS+ array order; else the
        canonical view's transform composed with the axis permutation / flips.  The grid's centre
        is the image's centre exactly, so a symmetric crop does not move it.
    """
    if image.ndim != 3 or image.affine is None:
        return grid.prepare(image, exact_centre=True, foreground_high=True)
    canonical, matrix = canonical_image(image)
    if np.array_equal(matrix, np.eye(4)):
        return grid.prepare(image, exact_centre=True, foreground_high=True)
    array, transform = grid.prepare(canonical, exact_centre=True, foreground_high=True)
    index = matrix @ embed_4x4(transform.matrix())
    return array, AffineGridTransform(
        tuple(grid.shape), tuple(grid.spacing), tuple(image.shape), tuple(float(s) for s in image.spacing),
        index.tolist(), np.asarray(image.affine, dtype=np.float64).tolist(), image.source, image.spacing_from,
        dict(transform.intensity))


def world_to_index_matrix(affine, ndim):
    """``(ndim + 1, 4)`` map of homogeneous RAS+ mm ``(x, y, z, 1)`` -> voxel index (ij[k]).

    3-D: the inverse of the affine; 2-D: the least-squares projection onto the image plane
    through the pseudo-inverse of its 3x2 linear part.
    """
    a = np.asarray(affine, dtype=np.float64)
    out = np.zeros((ndim + 1, 4))
    out[ndim, 3] = 1.0
    if ndim == 3:
        out[:] = np.linalg.inv(a)
        return out
    pinv = np.linalg.pinv(a[:3, :2])
    out[:2, :3] = pinv
    out[:2, 3] = -pinv @ a[:3, 3]
    return out


def moving_index_matrix(fixed_model_affine, moving_affine, ndim, translation=(0.0, 0.0, 0.0)):
    """``(ndim + 1, ndim + 1)`` homogeneous map: fixed model index -> moving voxel index.

    ``p_m = W_m^-1 (F q + t)`` with ``F`` the fixed model grid's 4x4 affine, ``t`` RAS+ mm and
    ``W_m^-1`` :func:`world_to_index_matrix` of the moving affine.
    """
    shifted = np.asarray(fixed_model_affine, dtype=np.float64).copy()
    shifted[:3, 3] += np.asarray(translation, dtype=np.float64)
    full = world_to_index_matrix(moving_affine, ndim) @ shifted  # (ndim + 1, 4) acting on (i, j, k, 1)
    out = np.eye(ndim + 1)
    out[:ndim, :ndim] = full[:ndim, :ndim]
    out[:ndim, ndim] = full[:ndim, 3]
    return out


def prepare_moving(grid, image, fixed_model_affine, translation=(0.0, 0.0, 0.0), mask=None):
    """The moving image sampled at the world positions of the fixed model grid (shifted by ``translation``).

    Parameters
    ----------
    grid : dirnet_tf.preprocessing.ModelGrid
        Shape, normalisation (the moving image's own intensity range, as ``ModelGrid.prepare``).
    image : dirnet_tf.readers.Image
        The moving image; without patient geometry its pixel affine is used.
    fixed_model_affine : array (4, 4)
        Fixed model index ``(i, j, k, 1)`` -> RAS+ mm (2-D: ``k = 0``).
    translation : sequence of 3 float
        ``t``, RAS+ mm: the moving image is sampled at ``x(q) + t``.
    mask : np.ndarray of bool, optional
        Moving voxels that define the normalisation statistics.

    Returns
    -------
    array : np.ndarray float32 of ``grid.shape``
        Linear interpolation of the normalised moving image; padding (0 after ``percentile`` /
        ``minmax``, the image minimum with ``none``) outside its extent.
    transform : AffineGridTransform
        Model index -> moving index.
    """
    ndim = grid.ndim
    if image.ndim != ndim:
        raise InputError(f"{image.source or 'image'}: {image.ndim}-D image does not fit the {ndim}-D model grid")
    matrix = moving_index_matrix(fixed_model_affine, image_affine(image), ndim, translation)
    low, high = intensity_range(image.array, grid.normalize, mask, grid.percentiles, foreground_high=True)
    normed = apply_intensity_range(image.array, low, high)
    pad = 0.0 if grid.normalize != "none" else float(image.array.min())
    affine = None if image.affine is None else np.asarray(image.affine, dtype=np.float64).tolist()
    transform = AffineGridTransform(tuple(grid.shape), tuple(grid.spacing), tuple(image.shape),
                                    tuple(float(s) for s in image.spacing), matrix.tolist(), affine, image.source,
                                    image.spacing_from)
    out = ndimage.affine_transform(normed, matrix[:ndim, :ndim], matrix[:ndim, ndim], output_shape=grid.shape,
                                   order=1, mode="nearest", prefilter=False).astype(np.float32)
    out[~transform.inside_mask()] = pad
    transform.intensity = {"mode": grid.normalize, "low": low, "high": high, "pad_value": pad,
                           "percentiles": list(grid.percentiles) if grid.normalize == "percentile" else None,
                           "foreground_high": True}
    return out, transform


def prepare_world_pair(grid, fixed, moving, init="header"):
    """Fixed and moving image on one model grid in world space.

    Parameters
    ----------
    grid : dirnet_tf.preprocessing.ModelGrid
    fixed, moving : dirnet_tf.readers.Image
    init : {'header', 'center'}
        ``center``: the moving image is sampled at ``x + t``, ``t`` (RAS+ mm) the moving minus
        the fixed centre of mass (:func:`center_of_mass_world`); ``header``: ``t = 0``.

    Returns
    -------
    fixed_array, fixed_transform, moving_array, moving_transform, translation
        :func:`prepare_fixed`, :func:`prepare_moving`, and ``t`` (3 floats, RAS+ mm).
    """
    if init not in ("header", "center"):
        raise InputError(f"init must be 'header' or 'center' for a world-space pair, got {init!r}")
    fixed_array, fixed_transform = prepare_fixed(grid, fixed)
    translation = np.zeros(3)
    if init == "center":
        translation = center_of_mass_world(grid, moving) - center_of_mass_world(grid, fixed)
    fixed_model = image_affine(fixed) @ embed_4x4(fixed_transform.matrix())
    moving_array, moving_transform = prepare_moving(grid, moving, fixed_model, translation)
    return fixed_array, fixed_transform, moving_array, moving_transform, translation


def center_of_mass_world(grid, image):
    """Centre of mass (RAS+ mm, 3 values) of the image's normalised intensities.

    The weights are the intensities normalised as ``grid`` does (``percentile`` / ``minmax``:
    in [0, 1]; ``none``: the intensities minus their minimum) on the image's own grid; the
    centre in voxel indices is placed with the image's affine (or its pixel affine).  An image
    of constant intensity gives the centre of its field of view.
    """
    low, high = intensity_range(image.array, grid.normalize, None, grid.percentiles, foreground_high=True)
    weights = apply_intensity_range(image.array, low, high).astype(np.float64)
    if grid.normalize == "none":
        weights = weights - weights.min()
    total = weights.sum()
    shape = image.shape
    if not total > 0:
        index = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    else:
        index = np.array([np.sum(weights.sum(axis=tuple(b for b in range(len(shape)) if b != a))
                                 * np.arange(shape[a])) / total for a in range(len(shape))])
    a = image_affine(image)
    return a[:3, : len(shape)] @ index + a[:3, 3]
