"""Preprocessing to a model grid, and its geometric inverse.

A :class:`ModelGrid` is the grid a model works on: ``shape`` (voxels) at
``spacing`` (mm), plus an intensity normalisation mode.  :meth:`ModelGrid.prepare`
brings an :class:`~dirnet_tf.readers.Image` onto it:

1. intensities are normalised on the original image (:func:`normalize`;
   default: 1st-99th percentile -> [0, 1], clipped);
2. the image is resampled with its own spacing to the model spacing (linear;
   nearest for label maps, :meth:`ModelGrid.prepare_labels`), giving an
   intermediate grid of ``m = round(n * image_spacing / model_spacing)``
   voxels per axis whose centre is the image's centre;
3. that grid is centre-cropped or zero-padded to ``shape`` (when the size
   difference is odd, the extra voxel is cropped / padded at the end).

Steps 2 and 3 are one interpolation: the whole geometry is a per-axis scale and
offset between index spaces, recorded in a :class:`GridTransform`::

    image_index[a] = scale[a] * model_index[a] + offset[a]     (a = array axis)
    scale[a] = model_spacing[a] / image_spacing[a]

Indices are voxel indices in array order (ij / ijk) whose integer values are
voxel centres.  The model grid's axes are parallel to the image's array axes,
so with the image's affine (RAS+ mm, see :mod:`dirnet_tf.readers`) the model
grid has the affine ``image_affine @ [[diag(scale), offset], [0, 1]]``
(:meth:`GridTransform.model_affine`).  A displacement computed on the model
grid (in model voxels) can be brought back onto the original image grid, in
image voxels, mm along the array axes or RAS+ mm, with
:meth:`GridTransform.field_to_image`.

Voxels of the model grid outside the image's extent (more than half a voxel
beyond its border voxel centres) are padding: value 0 after ``percentile`` or
``minmax`` normalisation, the image minimum with ``none``, label 0.

This is one image on its own array axes (``init="array"`` of
:func:`dirnet_tf.register_engine.prepare_pair`).  A pair related through its headers, in world
space (``init="header"`` / ``"center"``), is prepared by :mod:`dirnet_tf.world_grid`, whose
:class:`~dirnet_tf.world_grid.AffineGridTransform` (a general affine model index -> image
index) has the same interface as :class:`GridTransform`.

Both :class:`ModelGrid` and :class:`GridTransform` serialise to JSON, so the
preprocessing can be stored with a model export and undone later.  No
TensorFlow is needed here (numpy and scipy).
"""

import dataclasses
import json

import numpy as np
from scipy import ndimage

from dirnet_tf.readers import Image, InputError

__all__ = ["ModelGrid", "GridTransform", "normalize", "intensity_range", "apply_intensity_range",
           "displacement_to_image"]

FORMAT = "dirnet-tf-model-grid-v1"
TRANSFORM_FORMAT = "dirnet-tf-grid-transform-v1"
NORMALIZE_MODES = ("percentile", "minmax", "none")
_EDGE_TOLERANCE = 1e-6  # voxels, for the "inside the image" test of half-voxel borders


def _round_half_up(x):
    return int(np.floor(x + 0.5))


def intensity_range(array, mode="percentile", mask=None, percentiles=(1.0, 99.0), foreground_high=False):
    """The ``(low, high)`` intensities that :func:`normalize` maps to 0 and 1.

    Parameters
    ----------
    array : np.ndarray
        Image intensities (any shape).
    mode : {'percentile', 'minmax', 'none'}
        ``percentile``: the given percentiles; ``minmax``: minimum and maximum;
        ``none``: no normalisation, returns ``(None, None)``.
    mask : np.ndarray of bool, optional
        Voxels that define the statistics (same shape as ``array``); all when None.
    percentiles : (float, float)
        Lower and upper percentile (0-100) for ``percentile``.
    foreground_high : bool
        ``percentile`` only: take the upper percentile over the voxels brighter than the lower
        one (the object, not the empty background at or below it), so that cropping or padding
        background does not change it (world-space registration); the lower percentile stays
        over all voxels.

    Returns
    -------
    (float, float) or (None, None)
        For a constant image (or percentiles that coincide) ``percentile``
        falls back to ``minmax``; if that is constant too, ``high == low``.
    """
    if mode not in NORMALIZE_MODES:
        raise InputError(f"normalize mode must be one of {NORMALIZE_MODES}, got {mode!r}")
    if mode == "none":
        return None, None
    values = np.asarray(array, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != values.shape:
            raise InputError(f"mask of shape {mask.shape} does not match the image of shape {values.shape}")
        values = values[mask]
    elif isinstance(array, np.ndarray) and np.may_share_memory(values, array):
        values = values.copy()  # the percentiles below reorder it: never the caller's array
    if values.size == 0:
        raise InputError("cannot normalise: the mask selects no voxel")
    if mode == "percentile":
        # ``values`` is this function's own copy, so the percentiles may reorder it in place (one copy
        # of a large volume fewer); a percentile depends on the values only, not on their order.
        if foreground_high:
            low = np.percentile(values, percentiles[0], overwrite_input=True)
            bright = values[values > low]
            high = (np.percentile(bright, percentiles[1], overwrite_input=True) if bright.size
                    else np.percentile(values, percentiles[1], overwrite_input=True))
        else:
            low, high = np.percentile(values, percentiles, overwrite_input=True)
        if high > low:
            return float(low), float(high)
    return float(values.min()), float(values.max())


def apply_intensity_range(array, low, high):
    """``clip((array - low) / (high - low), 0, 1)`` as float32; zeros when ``high <= low``; unchanged if None."""
    array = np.asarray(array, dtype=np.float32)
    if low is None:
        return array.copy()
    if not high > low:
        return np.zeros_like(array)
    return np.clip((array - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)


def normalize(array, mode="percentile", mask=None, percentiles=(1.0, 99.0)):
    """Normalise intensities to [0, 1] (``percentile`` / ``minmax``) or leave them (``none``).

    Parameters are those of :func:`intensity_range`; returns a float32 array
    of the same shape.  Values below ``low`` become 0, above ``high`` 1.
    """
    low, high = intensity_range(array, mode, mask, percentiles)
    return apply_intensity_range(array, low, high)


def _as_tuple(values, ndim, what, kind=float):
    arr = np.atleast_1d(np.asarray(values, dtype=float)).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, ndim)
    if arr.size != ndim:
        raise InputError(f"{what} {values!r} must have {ndim} values (one per array axis)")
    return tuple(kind(v) for v in arr)


def displacement_to_image(transform, displacement, units="mm"):
    """Displacement vectors in model voxels ``(..., ndim)`` -> the image's units, through the linear
    part of ``transform.matrix()`` (model index -> image index) of a :class:`GridTransform` or a
    :class:`dirnet_tf.world_grid.AffineGridTransform` (see :meth:`GridTransform.displacement_to_image`)."""
    d = np.asarray(displacement, dtype=np.float64)
    n = transform.ndim
    if d.shape[-1] != n:
        raise InputError(f"displacement must end with {n} components, got shape {d.shape}")
    vox = d @ transform.matrix()[:n, :n].T
    if units == "voxels":
        return vox
    if units == "mm":
        return vox * np.asarray(transform.image_spacing)
    if units == "world":
        if transform.image_affine is None:
            raise InputError(f"{transform.source}: the image has no affine (no patient geometry); use units='mm'")
        return vox @ np.asarray(transform.image_affine)[:3, :n].T
    raise InputError(f"units must be 'voxels', 'mm' or 'world', got {units!r}")


@dataclasses.dataclass
class GridTransform:
    """Geometry (and intensity mapping) of one image brought onto a model grid.

    Attributes
    ----------
    model_shape, model_spacing : tuple
        The model grid: voxels, and mm per array axis.
    image_shape, image_spacing : tuple
        The original image: voxels, and mm per array axis.
    scale, offset : tuple of float
        ``image_index = scale * model_index + offset`` per array axis (voxels).
    crop_start : tuple of int
        First voxel of the intermediate grid kept (negative: padding before).
    intermediate_shape : tuple of int
        The resampled-but-not-cropped grid size (``round(n * s / S)``).
    image_affine : list or None
        The image's 4x4 RAS+ affine (array index -> mm), None if unknown.
    source, spacing_from : str
        From the :class:`~dirnet_tf.readers.Image`.
    intensity : dict
        ``{'mode', 'low', 'high', 'pad_value'}``: input ``low`` -> 0,
        ``high`` -> 1 (None for mode ``none``).
    """

    model_shape: tuple
    model_spacing: tuple
    image_shape: tuple
    image_spacing: tuple
    scale: tuple
    offset: tuple
    crop_start: tuple
    intermediate_shape: tuple
    image_affine: list = None
    source: str = ""
    spacing_from: str = "default"
    intensity: dict = dataclasses.field(default_factory=dict)

    @property
    def ndim(self):
        """Number of spatial axes."""
        return len(self.model_shape)

    def matrix(self):
        """``(ndim + 1, ndim + 1)`` homogeneous matrix: model index -> image index."""
        m = np.eye(self.ndim + 1)
        m[: self.ndim, : self.ndim] = np.diag(self.scale)
        m[: self.ndim, self.ndim] = self.offset
        return m

    def model_to_image_index(self, points):
        """Model-grid voxel indices ``(..., ndim)`` -> original-image voxel indices (float, same shape)."""
        points = np.asarray(points, dtype=np.float64)
        return points * np.asarray(self.scale) + np.asarray(self.offset)

    def image_to_model_index(self, points):
        """Original-image voxel indices ``(..., ndim)`` -> model-grid voxel indices (float, same shape)."""
        points = np.asarray(points, dtype=np.float64)
        return (points - np.asarray(self.offset)) / np.asarray(self.scale)

    def model_affine(self):
        """4x4 model-grid index ``(i, j, k, 1)`` -> world RAS+ mm, or None when the image affine is unknown."""
        if self.image_affine is None:
            return None
        embed = np.eye(4)
        embed[: self.ndim, : self.ndim] = np.diag(self.scale)
        embed[: self.ndim, 3] = self.offset
        return np.asarray(self.image_affine, dtype=np.float64) @ embed

    def inside_mask(self):
        """Bool array of ``model_shape``: True where the model voxel lies within the image's extent."""
        masks = []
        for a in range(self.ndim):
            idx = self.scale[a] * np.arange(self.model_shape[a]) + self.offset[a]
            masks.append((idx >= -0.5 - _EDGE_TOLERANCE) & (idx <= self.image_shape[a] - 0.5 + _EDGE_TOLERANCE))
        out = masks[0]
        for m in masks[1:]:
            out = np.multiply.outer(out, m)
        return out

    def displacement_to_image(self, displacement, units="mm"):
        """Convert displacement vectors from model voxels to the image's units (no resampling).

        Parameters
        ----------
        displacement : array ``(..., ndim)``
            Components in model-grid voxels along the array axes.
        units : {'voxels', 'mm', 'world'}
            ``voxels``: image voxels per array axis (``d * scale``); ``mm``: mm
            per array axis (``d * model_spacing``); ``world``: a RAS+ vector in
            mm, shape ``(..., 3)`` (needs the image affine).
        """
        return displacement_to_image(self, displacement, units)

    def field_to_image(self, field, units="mm"):
        """Bring a displacement field from the model grid onto the original image grid.

        Parameters
        ----------
        field : array ``(*model_shape, ndim)``
            Displacement in model voxels along the array axes, per model voxel.
        units : {'voxels', 'mm', 'world'}
            See :meth:`displacement_to_image`.

        Returns
        -------
        np.ndarray ``(*image_shape, ndim)`` (``(*image_shape, 3)`` for
        ``world``), float64; linear interpolation of the field at each image
        voxel's model-grid position; NaN where the image voxel lies outside the
        model grid (cropped away).
        """
        field = np.asarray(field, dtype=np.float64)
        if field.shape != tuple(self.model_shape) + (self.ndim,):
            raise InputError(f"field of shape {field.shape} is not on the model grid "
                             f"{tuple(self.model_shape)} + ({self.ndim},)")
        inv_scale = 1.0 / np.asarray(self.scale)
        inv_offset = -np.asarray(self.offset) * inv_scale
        sampled = np.stack([
            ndimage.affine_transform(field[..., c], inv_scale, inv_offset, output_shape=tuple(self.image_shape),
                                     order=1, mode="nearest")
            for c in range(self.ndim)
        ], axis=-1)
        inside = None
        for a in range(self.ndim):
            idx = inv_scale[a] * np.arange(self.image_shape[a]) + inv_offset[a]
            m = (idx >= -0.5 - _EDGE_TOLERANCE) & (idx <= self.model_shape[a] - 0.5 + _EDGE_TOLERANCE)
            inside = m if inside is None else np.multiply.outer(inside, m)
        out = self.displacement_to_image(sampled, units)
        out[~inside] = np.nan
        return out

    def to_dict(self):
        """JSON-serialisable dict (see :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        d["format"] = TRANSFORM_FORMAT
        for key in ("model_shape", "model_spacing", "image_shape", "image_spacing", "scale", "offset",
                    "crop_start", "intermediate_shape"):
            d[key] = list(d[key])
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
        if d.pop("format", TRANSFORM_FORMAT) != TRANSFORM_FORMAT:
            raise InputError(f"not a {TRANSFORM_FORMAT} description")
        ints = ("model_shape", "image_shape", "crop_start", "intermediate_shape")
        for key in ("model_shape", "model_spacing", "image_shape", "image_spacing", "scale", "offset",
                    "crop_start", "intermediate_shape"):
            d[key] = tuple(int(v) if key in ints else float(v) for v in d[key])
        return cls(**d)

    from_json = from_dict


@dataclasses.dataclass(frozen=True)
class ModelGrid:
    """The grid a model works on.

    Parameters
    ----------
    shape : sequence of int
        Voxels per array axis (2 or 3 axes).
    spacing : float or sequence of float
        mm per array axis.
    normalize : {'percentile', 'minmax', 'none'}
        Intensity normalisation (:func:`normalize`).
    percentiles : (float, float)
        For ``percentile``: input percentiles mapped to 0 and 1.
    """

    shape: tuple
    spacing: tuple = 1.0
    normalize: str = "percentile"
    percentiles: tuple = (1.0, 99.0)

    def __post_init__(self):
        shape = tuple(int(s) for s in np.atleast_1d(self.shape))
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise InputError(f"model grid shape {self.shape!r} must be 2 or 3 positive voxel counts")
        spacing = _as_tuple(self.spacing, len(shape), "model grid spacing")
        if min(spacing) <= 0 or not np.all(np.isfinite(spacing)):
            raise InputError(f"model grid spacing {self.spacing!r} must be positive (mm)")
        if self.normalize not in NORMALIZE_MODES:
            raise InputError(f"normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        percentiles = tuple(float(p) for p in self.percentiles)
        if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise InputError(f"percentiles {self.percentiles!r} must be (low, high) with 0 <= low < high <= 100")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "percentiles", percentiles)

    @property
    def ndim(self):
        """Number of spatial axes."""
        return len(self.shape)

    # ----------------------------- JSON ---------------------------------- #

    def to_dict(self):
        """JSON-serialisable description."""
        return {"format": FORMAT, "shape": list(self.shape), "spacing": list(self.spacing),
                "normalize": self.normalize, "percentiles": list(self.percentiles)}

    def to_json(self):
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text):
        """Inverse of :meth:`to_json` (accepts the dict too)."""
        d = json.loads(text) if isinstance(text, str) else dict(text)
        if d.get("format", FORMAT) != FORMAT:
            raise InputError(f"not a {FORMAT} description: format {d.get('format')!r}")
        return cls(tuple(d["shape"]), tuple(d["spacing"]), d.get("normalize", "percentile"),
                   tuple(d.get("percentiles", (1.0, 99.0))))

    from_dict = from_json

    # --------------------------- geometry -------------------------------- #

    def transform_for(self, image_shape, image_spacing, image_affine=None, source="", spacing_from="default",
                      exact_centre=False):
        """The :class:`GridTransform` for an image of ``image_shape`` voxels at ``image_spacing`` mm.

        ``exact_centre``: the model grid's centre falls exactly on the image's centre (step 3
        without its half-voxel rounding, which an odd size difference otherwise causes), so that
        cropping an image symmetrically does not move the grid (world-space registration).
        """
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != self.ndim:
            raise InputError(f"{source or 'image'}: {len(image_shape)}-D image of shape {image_shape} "
                             f"does not fit the {self.ndim}-D model grid {self.shape}")
        image_spacing = _as_tuple(image_spacing, self.ndim, f"{source or 'image'} spacing")
        scale, offset, start, inter = [], [], [], []
        for n, s, size, spacing in zip(image_shape, image_spacing, self.shape, self.spacing):
            m = max(1, _round_half_up(n * s / spacing))
            first = (m - size) // 2 if m >= size else -((size - m) // 2)
            k = spacing / s
            scale.append(k)
            if exact_centre:
                offset.append((n - 1) / 2.0 - (size - 1) / 2.0 * k)
            else:
                offset.append((n - 1) / 2.0 + (first - (m - 1) / 2.0) * k)
            start.append(first)
            inter.append(m)
        affine = None if image_affine is None else np.asarray(image_affine, dtype=float).tolist()
        return GridTransform(self.shape, self.spacing, image_shape, image_spacing, tuple(scale), tuple(offset),
                             tuple(start), tuple(inter), affine, source, spacing_from)

    def _transform(self, image, exact_centre=False):
        return self.transform_for(image.shape, image.spacing, image.affine, image.source, image.spacing_from,
                                  exact_centre)

    def model_to_image_index(self, points, image):
        """Model-grid voxel indices ``(..., ndim)`` -> voxel indices of ``image`` (an Image)."""
        return self._transform(image).model_to_image_index(points)

    def image_to_model_index(self, points, image):
        """Voxel indices of ``image`` ``(..., ndim)`` -> model-grid voxel indices."""
        return self._transform(image).image_to_model_index(points)

    # --------------------------- resampling ------------------------------ #

    def prepare(self, image, mask=None, exact_centre=False, foreground_high=False):
        """Normalise and resample an image onto the model grid.

        Parameters
        ----------
        image : dirnet_tf.readers.Image
            Its ``spacing`` (mm per array axis) is honoured.
        mask : np.ndarray of bool, optional
            Image voxels that define the normalisation statistics.
        exact_centre : bool
            See :meth:`transform_for`.
        foreground_high : bool
            See :func:`intensity_range`.

        Returns
        -------
        array : np.ndarray float32 of ``self.shape``
        transform : GridTransform
            Geometry and intensity mapping (JSON-serialisable).
        """
        image = _as_image(image)
        transform = self._transform(image, exact_centre)
        low, high = intensity_range(image.array, self.normalize, mask, self.percentiles, foreground_high)
        normed = apply_intensity_range(image.array, low, high)
        pad = 0.0 if self.normalize != "none" else float(image.array.min())
        out = ndimage.affine_transform(normed, np.asarray(transform.scale), np.asarray(transform.offset),
                                       output_shape=self.shape, order=1, mode="nearest", prefilter=False)
        out = out.astype(np.float32)
        out[~transform.inside_mask()] = pad
        transform.intensity = {"mode": self.normalize, "low": low, "high": high, "pad_value": pad,
                               "percentiles": list(self.percentiles) if self.normalize == "percentile" else None}
        if foreground_high:
            transform.intensity["foreground_high"] = True
        return out, transform

    def prepare_labels(self, labels, image):
        """Resample an integer label map of ``image`` onto the model grid (nearest neighbour, padding 0).

        Parameters
        ----------
        labels : dirnet_tf.readers.Image or np.ndarray
            Integer values, same shape as ``image.array``.
        image : dirnet_tf.readers.Image
            The image the labels belong to (its spacing is used).

        Returns
        -------
        np.ndarray int32 of ``self.shape``.
        """
        image = _as_image(image)
        array = labels.array if isinstance(labels, Image) else np.asarray(labels)
        name = labels.source if isinstance(labels, Image) else "label map"
        if array.shape != image.shape:
            raise InputError(f"{name} has shape {array.shape} but its image {image.source} has shape {image.shape}")
        if not np.array_equal(array, np.round(array)):
            raise InputError(f"{name}: label maps must hold whole numbers")
        transform = self._transform(image)
        out = ndimage.affine_transform(array.astype(np.int32), np.asarray(transform.scale),
                                       np.asarray(transform.offset), output_shape=self.shape, order=0,
                                       mode="nearest", prefilter=False)
        out[~transform.inside_mask()] = 0
        return out.astype(np.int32)


def _as_image(image):
    if not isinstance(image, Image):
        raise InputError(f"expected a dirnet_tf.readers.Image (array + spacing), got {type(image).__name__}")
    return image
