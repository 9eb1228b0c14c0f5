"""Carry an integer label map to other positions: the label with the largest multilinear weight.

At a (fractional) position ``p`` of the label map's voxel grid (ij order), every label ``v`` has
the weight ``w_v(p)``: its one-hot map interpolated multilinearly at ``p``, i.e. the sum of the
multilinear corner weights ``prod_d (1 - |p_d - c_d|)`` over the ``2^ndim`` corners ``c`` of the
voxel cell around ``p`` that hold ``v``.  The carried label is the ``v`` with the largest weight;
ties (within ``1e-12``) go to the smaller label, and where no label is sampled (all weights 0,
``zeros`` boundary outside the map) the result is 0.  Outside the map, ``border`` repeats the edge
voxels (clamped corners), ``zeros`` counts the corners outside as holding no label.

:func:`carry_labels` computes this from the ``2^ndim`` corners of each position, at a cost that
does not grow with the number of labels; :func:`carry_labels_one_hot` is the definition written
out (one interpolated one-hot map per label, ``scipy.ndimage.map_coordinates``), kept as the
reference the tests and ``benchmarks/label_carrying.py`` compare with.
"""

import itertools

import numpy as np
from scipy import ndimage

__all__ = ["TIE_TOLERANCE", "carry_labels", "carry_labels_one_hot"]

#: A larger label wins only with a weight more than this above the best smaller label's.
TIE_TOLERANCE = 1e-12
_CHUNK = 1 << 18  # positions per block (bounds the corner arrays' memory)


def _check(labels, positions, boundary):
    labels = np.asarray(labels)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape[0] != labels.ndim:
        raise ValueError(f"positions {positions.shape} must be [ndim, ...] with ndim = {labels.ndim}")
    if boundary not in ("border", "zeros"):
        raise ValueError(f"boundary must be 'border' or 'zeros', not {boundary!r}")
    return labels, positions


def carry_labels_one_hot(labels, positions, boundary="border"):
    """The carried labels by definition: one one-hot map per label, interpolated (see the module docstring).

    Parameters
    ----------
    labels : integer array ``[*shape]``
    positions : float array ``[ndim, *out]``
        Voxel indices of ``labels`` (ij order) to sample at.
    boundary : {"border", "zeros"}

    Returns
    -------
    np.ndarray int64 ``[*out]``
    """
    labels, positions = _check(labels, positions, boundary)
    mode = "nearest" if boundary == "border" else "grid-constant"
    best = np.zeros(positions.shape[1:])
    out = np.zeros(positions.shape[1:], dtype=np.int64)
    for v in np.unique(labels):
        weight = ndimage.map_coordinates((labels == v).astype(np.float64), positions, order=1, mode=mode, cval=0.0,
                                         prefilter=False)
        better = weight > best + TIE_TOLERANCE
        out[better] = v
        best = np.maximum(best, weight)
    return out


def _carry_block(flat_labels, shape, pos, boundary):
    """:func:`carry_labels` of positions ``pos`` ``[ndim, n]`` in a map of ``shape`` (raveled: ``flat_labels``)."""
    ndim, n = pos.shape
    strides = np.cumprod((1,) + tuple(shape[:0:-1]))[::-1]  # C order, in elements
    base = np.floor(pos)
    frac = pos - base
    base = base.astype(np.int64)
    # Per axis: the two corner offsets (flat index parts) and their multilinear weights.
    parts = []
    for d in range(ndim):
        weights = []
        offsets = []
        for o in (0, 1):
            i = base[d] + o
            w = frac[d] if o else 1.0 - frac[d]
            if boundary == "zeros":  # a corner outside holds no label
                w = np.where((i >= 0) & (i < shape[d]), w, 0.0)
            weights.append(w)
            offsets.append(np.clip(i, 0, shape[d] - 1) * strides[d])
        parts.append((offsets, weights))
    corners = list(itertools.product((0, 1), repeat=ndim))
    corner_labels = np.empty((n, len(corners)), dtype=flat_labels.dtype)
    corner_weights = np.empty((n, len(corners)))
    for c, choice in enumerate(corners):
        index = parts[0][0][choice[0]]
        weight = parts[0][1][choice[0]]
        for d in range(1, ndim):
            index = index + parts[d][0][choice[d]]
            weight = weight * parts[d][1][choice[d]]
        corner_labels[:, c] = np.take(flat_labels, index)
        corner_weights[:, c] = weight
    # Corners in ascending label order: a label's weight is the sum over its run of corners, and the
    # labels are visited in ascending order, each taking over only with a weight above the best so far
    # (as the one-hot definition, which visits the labels in ascending order).
    order = np.argsort(corner_labels, axis=1, kind="stable")
    corner_labels = np.take_along_axis(corner_labels, order, axis=1)
    corner_weights = np.take_along_axis(corner_weights, order, axis=1)
    best = np.zeros(n)
    out = np.zeros(n, dtype=np.int64)
    total = np.zeros(n)
    last = len(corners) - 1
    for c in range(len(corners)):
        label = corner_labels[:, c]
        total = corner_weights[:, c] + (np.where(label == corner_labels[:, c - 1], total, 0.0) if c else 0.0)
        if c < last:
            candidate = np.where(label != corner_labels[:, c + 1], total, -1.0)  # the run of this label ends
        else:
            candidate = total
        better = candidate > best + TIE_TOLERANCE
        out[better] = label[better]
        best = np.maximum(best, candidate)
    return out


def carry_labels(labels, positions, boundary="border"):
    """The carried labels (see the module docstring), from the ``2^ndim`` corners of each position.

    Gives the output of :func:`carry_labels_one_hot` (the same corner weights, summed in
    another order: the decisions agree unless two labels' weights differ by about 1e-12 +- 1e-16)
    at ``O(2^ndim)`` work per position (and a sort of the ``2^ndim`` corner labels), whatever the number of labels.

    Parameters
    ----------
    labels : integer array ``[*shape]``
    positions : float array ``[ndim, *out]``
        Voxel indices of ``labels`` (ij order) to sample at.
    boundary : {"border", "zeros"}

    Returns
    -------
    np.ndarray int64 ``[*out]``
    """
    labels, positions = _check(labels, positions, boundary)
    ndim = labels.ndim
    flat = positions.reshape(ndim, -1)
    out = np.zeros(flat.shape[1], dtype=np.int64)
    flat_labels = np.ascontiguousarray(labels).ravel()
    for start in range(0, flat.shape[1], _CHUNK):
        block = slice(start, start + _CHUNK)
        out[block] = _carry_block(flat_labels, labels.shape, flat[:, block], boundary)
    return out.reshape(positions.shape[1:])
