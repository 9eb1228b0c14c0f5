"""Registration evaluation metrics (numpy / scipy, float64; not differentiable).

All functions take numpy arrays (TF tensors are converted) and return Python
floats or numpy arrays.  Conventions:

* images ``[*spatial]`` or ``[*spatial, C]`` -- :func:`ncc` compares two
  images of equal shape over all their elements;
* label maps are integer arrays ``[*spatial]`` (0 = background);
* binary masks are boolean/0-1 arrays ``[*spatial]`` with 2 or 3 axes;
* displacement fields are ``[*spatial, ndim]`` or batched ``[B, *spatial,
  ndim]`` in pixels, ij order.

Surface distances (:func:`surface_distances`, :func:`hd95`, :func:`mad`): the
surface of a mask is its boundary pixels, the mask pixels with at least one
8-connected (2-D) / 26-connected (3-D) neighbour outside the mask (pixels on
the image edge count as boundary).  For each boundary pixel of either mask
the Euclidean distance to the nearest boundary pixel of the other mask is
taken; distances from both directions are pooled.  HD95 is their 95th
percentile (``np.percentile``, linear interpolation), MAD their mean; in
pixels, or in mm when ``spacing`` (per axis) is given.  Two empty masks give
0; exactly one empty mask gives ``inf``.
"""

import numpy as np
from scipy import ndimage

from dirnet_tf import losses as _losses

__all__ = [
    "ncc",
    "dice",
    "surface",
    "surface_distances",
    "hd95",
    "mad",
    "jacobian_determinant",
    "folding_fraction",
    "registration_scores",
    "inverse_consistency",
]


def _np(x):
    if hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x)


def ncc(a, b, batched=False):
    """Global normalised cross-correlation of two images (or of every pair of a batch), float64.

    The same definition as the training similarity (:func:`dirnet_tf.losses.ncc`, the one
    implementation), evaluated in float64 without its stabiliser; a constant image gives 0.

    Parameters
    ----------
    a, b : array_like of the same shape (any shape).
    batched : bool
        The first axis indexes pairs: one NCC per pair.

    Returns
    -------
    float in ``[-1, 1]``; an array ``[P]`` with ``batched``.
    """
    a = _np(a).astype(np.float64)
    b = _np(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ncc needs images of the same shape, got {a.shape} and {b.shape}")
    flat_a = a.reshape(len(a) if batched else 1, -1)
    flat_b = b.reshape(flat_a.shape)
    if flat_a.size == 0:
        return np.zeros(len(flat_a)) if batched else 0.0
    constant = (np.ptp(flat_a, axis=1) == 0) | (np.ptp(flat_b, axis=1) == 0)
    values = _losses.ncc(flat_a[..., None], flat_b[..., None], eps=0.0).numpy()
    values = np.where(constant, 0.0, values)
    return values if batched else float(values[0])


def dice(labels_a, labels_b, labels=None, background=0):
    """Dice overlap of two label maps, per label and averaged.

    Parameters
    ----------
    labels_a, labels_b : integer arrays of the same shape.
    labels : sequence of int or None
        Labels to score; default every label present in either map except
        ``background``.  For binary masks pass booleans (label 1 is scored).
    background : int or None
        Label excluded from the default list.

    Returns
    -------
    dict with ``"per_label"`` (``{label: dice}``) and ``"mean"`` (mean over
    the scored labels).  A label absent from both maps scores 1; with no
    labels to score at all (two empty masks) the mean is 1.
    """
    a = _np(labels_a)
    b = _np(labels_b)
    if a.shape != b.shape:
        raise ValueError(f"dice needs label maps of the same shape, got {a.shape} and {b.shape}")
    if a.dtype == bool or b.dtype == bool:
        a = a.astype(np.int64)
        b = b.astype(np.int64)
        if labels is None:
            labels = [1]
    if labels is None:
        labels = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()))
        labels = [lab for lab in labels if lab != background]
    per_label = {}
    for lab in labels:
        in_a = a == lab
        in_b = b == lab
        total = int(in_a.sum()) + int(in_b.sum())
        per_label[lab] = 1.0 if total == 0 else 2.0 * float((in_a & in_b).sum()) / total
    mean = float(np.mean(list(per_label.values()))) if per_label else 1.0
    return {"per_label": per_label, "mean": mean}


def _mask(mask):
    mask = _np(mask).astype(bool)
    if mask.ndim not in (2, 3):
        raise ValueError(f"masks must be 2-D or 3-D, got shape {mask.shape}")
    return mask


def surface(mask):
    """Boundary pixels of a binary mask (8-/26-connected neighbourhood).

    Parameters
    ----------
    mask : array_like, 2-D or 3-D.

    Returns
    -------
    bool array: mask pixels with a neighbour (including diagonals) outside the
    mask or outside the image.
    """
    mask = _mask(mask)
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _spacing(spacing, ndim):
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        return (float(spacing),) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} must have one entry per axis ({ndim})")
    return spacing


def surface_distances(mask_a, mask_b, spacing=None):
    """Distances from each surface pixel of one mask to the other's surface.

    Parameters
    ----------
    mask_a, mask_b : binary arrays of the same 2-D/3-D shape.
    spacing : float or sequence of float or None
        Pixel size per axis (e.g. mm); default 1.

    Returns
    -------
    ``(d_ab, d_ba)``: distances from the surface pixels of ``a`` to the
    nearest surface pixel of ``b`` and vice versa (1-D float arrays).  If
    exactly one mask is empty the non-empty side gets ``inf`` distances.
    """
    a = _mask(mask_a)
    b = _mask(mask_b)
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, got {a.shape} and {b.shape}")
    sampling = _spacing(spacing, a.ndim)
    sa, sb = surface(a), surface(b)

    def to_surface(src, dst):
        if not src.any():
            return np.zeros(0)
        if not dst.any():
            return np.full(int(src.sum()), np.inf)
        dist = ndimage.distance_transform_edt(~dst, sampling=sampling)
        return dist[src]

    return to_surface(sa, sb), to_surface(sb, sa)


def hd95(mask_a, mask_b, spacing=None):
    """95th-percentile (symmetric) Hausdorff distance between two masks.

    Parameters
    ----------
    mask_a, mask_b : binary arrays of the same 2-D/3-D shape.
    spacing : float or sequence of float or None
        Pixel size per axis; default 1 (result in pixels).

    Returns
    -------
    float: 95th percentile of the pooled surface distances (0 for two empty
    masks, ``inf`` if exactly one is empty).
    """
    d_ab, d_ba = surface_distances(mask_a, mask_b, spacing)
    pooled = np.concatenate([d_ab, d_ba])
    if pooled.size == 0:
        return 0.0
    if np.isinf(pooled).any():
        return float("inf")
    return float(np.percentile(pooled, 95))


def mad(mask_a, mask_b, spacing=None):
    """Mean absolute surface distance between two masks.

    Parameters
    ----------
    mask_a, mask_b : binary arrays of the same 2-D/3-D shape.
    spacing : float or sequence of float or None
        Pixel size per axis; default 1.

    Returns
    -------
    float: mean of the pooled surface distances (0 for two empty masks,
    ``inf`` if exactly one is empty).
    """
    d_ab, d_ba = surface_distances(mask_a, mask_b, spacing)
    pooled = np.concatenate([d_ab, d_ba])
    if pooled.size == 0:
        return 0.0
    return float(pooled.mean())


def _field(displacement):
    u = _np(displacement).astype(np.float64)
    if u.ndim < 3:
        raise ValueError(f"displacement must be [*spatial, ndim] or [B, *spatial, ndim], got {u.shape}")
    ndim = u.shape[-1]
    if ndim not in (2, 3):
        raise ValueError(f"displacement must have 2 or 3 components, got shape {u.shape}")
    if u.ndim == ndim + 1:
        return u, False
    if u.ndim == ndim + 2:
        return u, True
    raise ValueError(
        f"displacement with {ndim} components must be [*spatial({ndim} axes), {ndim}] or "
        f"[B, *spatial, {ndim}], got shape {u.shape}"
    )


def jacobian_determinant(displacement, spacing=None):
    """Jacobian determinant of ``x + u(x)`` per pixel.

    Derivatives by ``np.gradient`` (central differences, one-sided first-order
    at the edges).

    Parameters
    ----------
    displacement : array ``[*spatial, ndim]`` or ``[B, *spatial, ndim]``.
    spacing : float or sequence or None
        Physical pixel size per axis, if the displacement is in those units
        too; default 1 (pixels).

    Returns
    -------
    array ``[*spatial]`` or ``[B, *spatial]``.
    """
    u, batched = _field(displacement)
    ndim = u.shape[-1]
    sampling = _spacing(spacing, ndim)
    offset = 1 if batched else 0
    for n in u.shape[offset:offset + ndim]:
        if n < 2:
            raise ValueError(f"every spatial axis needs >= 2 pixels, got displacement {u.shape}")
    jac = np.empty(u.shape[:-1] + (ndim, ndim))
    for c in range(ndim):
        for d in range(ndim):
            jac[..., c, d] = np.gradient(u[..., c], sampling[d], axis=offset + d)
        jac[..., c, c] += 1.0
    return np.linalg.det(jac)


def folding_fraction(displacement, spacing=None):
    """Fraction of pixels where the transform folds (``det J <= 0``).

    Parameters
    ----------
    displacement : array ``[*spatial, ndim]`` or ``[B, *spatial, ndim]``.
    spacing : float or sequence or None
        See :func:`jacobian_determinant`.

    Returns
    -------
    float for one field, array ``[B]`` for a batch.
    """
    u, batched = _field(displacement)
    det = jacobian_determinant(u, spacing)
    if batched:
        return (det <= 0).reshape(det.shape[0], -1).mean(axis=1)
    return float((det <= 0).mean())


def registration_scores(fixed, warped, displacement, threshold=0.5):
    """Per-pair scores of a batch of registrations: NCC, foreground Dice, folding.

    Parameters
    ----------
    fixed, warped : arrays ``[P, *spatial, C]``.
    displacement : array ``[P, *spatial, ndim]`` (pixels, ij order).
    threshold : float
        Foreground of an image for the Dice: its first channel ``> threshold``.

    Returns
    -------
    dict of arrays ``[P]``
        ``ncc`` (:func:`ncc` of fixed and warped), ``dice`` (mean :func:`dice` of the
        foregrounds) and ``folding`` (:func:`folding_fraction`).
    """
    fixed, warped = _np(fixed), _np(warped)
    ncc_values = ncc(fixed, warped, batched=True)
    dice_values = np.array([dice(f[..., 0] > threshold, w[..., 0] > threshold)["mean"]
                            for f, w in zip(fixed, warped)])
    folding = np.asarray(folding_fraction(displacement)) if len(fixed) else np.zeros(0)
    return {"ncc": ncc_values, "dice": dice_values, "folding": folding}


def inverse_consistency(forward, backward, spacing=None):
    """Mean residual of registering a -> b and b -> a and composing the two (0 = consistent).

    ``forward`` maps the fixed image a to the moving image b (``x -> x + forward(x)``),
    ``backward`` the other way; their composition ``x -> x + forward(x) + backward(x +
    forward(x))`` should be the identity.  ``backward`` is interpolated linearly (edge values
    outside).

    Parameters
    ----------
    forward, backward : arrays ``[*spatial, ndim]`` or batched ``[B, *spatial, ndim]`` (pixels, ij).
    spacing : float or sequence or None
        Pixel size per axis: the residual in mm instead of pixels.

    Returns
    -------
    float for one pair, array ``[B]`` for a batch: the mean norm of the residual.
    """
    forward, batched = _field(forward)
    backward, _ = _field(backward)
    if forward.shape != backward.shape:
        raise ValueError(f"forward {forward.shape} and backward {backward.shape} fields differ in shape")
    if not batched:
        forward, backward = forward[None], backward[None]
    ndim = forward.shape[-1]
    scale = np.asarray(_spacing(spacing, ndim))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in forward.shape[1:-1]], indexing="ij"), -1)
    out = []
    for f, b in zip(forward, backward):
        where = np.moveaxis(grid + f, -1, 0)
        back = np.stack([ndimage.map_coordinates(b[..., c], where, order=1, mode="nearest")
                         for c in range(ndim)], -1)
        out.append(float(np.linalg.norm((f + back) * scale, axis=-1).mean()))
    return np.asarray(out) if batched else out[0]
