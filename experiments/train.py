"""Train DIRNet on your own 2-D images or 3-D volumes (``python -m experiments.train``).

    python -m experiments.train --images=DIR_OR_GLOB_OR_LIST [--labels=DIR] [--pairs=MODE] \\
        --logdir=runs/mine --export_dir=exports/mine [--shape=..] [--spacing=..] [--preset=paper] [...]

(also installed as ``dirnet-train``).  The same from Python: ``dirnet_tf.train(TrainConfig(images=...))``
(:mod:`dirnet_tf.training`, settings :class:`dirnet_tf.config.TrainConfig`, one per flag).

**Model** (default): the folding-free composed model -- B-spline stages chosen from the model grid
(``--stages=auto``: powers of two from the coarsest spacing with at least 3 control intervals across
the smallest axis, halving down to 2 voxels in 2-D or 4 in 3-D, at most 3 stages; 8,4,2 on 28x28),
two bounded symmetric passes per stage trained one stage after another, normalised inputs, bending
0.01, folding 1.0 and inverse-consistency 0.03 losses.  ``--preset=paper``: the paper's model (one
stage at ``--grid_spacing``, one unconstrained pass, no regulariser); flags given on the command line
win over the preset.

**Images** (``--images``): a folder (every readable image in it, sorted by name), a glob,
a ``.csv`` list (header ``image``, optional ``label`` and ``group`` columns) or ``.txt``
list, one file, or ``FILE.h5:/dataset``.  Formats: PNG/JPEG/TIFF/BMP (colour -> grey),
``.npy`` (``--ndim`` decides whether a 3-D array is a volume or a stack of 2-D images),
NIfTI, DICOM (a file -- a multi-frame file is one group of 2-D frames -- or a folder
holding one series), HDF5; see :mod:`dirnet_tf.readers`.  Unreadable files are skipped
and listed (console and ``skipped.json`` in ``--logdir``).

**Model grid**: every image is resampled with its own spacing (from the NIfTI/DICOM
header, ``--default_spacing`` for formats without one) onto ``--shape`` voxels at
``--spacing`` mm, centre-cropped or padded, and normalised (``--normalize``); by default
the grid is the first image's.  ``--mask``: a file with one mask on the images' own grid
(non-zero = used); voxels outside it are set to 0 after normalisation, so that static
overlays do not drive the similarity.  The grid and the normalisation are stored in the
export (``assets/dirnet.json``, key ``model_grid``); displacements are in **voxels of the
model grid, ij (array) order**; ``metrics.json`` also gives them in mm.

**Pairs** (``--pairs``): ``random``, ``within_group``, ``sequence`` (frames of one group at
most ``--max_frame_gap`` apart), ``atlas:PATH``, ``list:CSV`` (see :mod:`dirnet_tf.pair_plans`), or
``synthetic``: every pair is one image and a copy of it deformed by a known random smooth field
(:mod:`dirnet_tf.synthetic`): ``moving`` = the image, ``fixed`` = the image warped by the field ``u``
(so ``warp(moving, u) == fixed`` exactly and ``u`` is the true answer on the fixed grid), each with
random intensity changes.  ``--synthetic_magnitude`` (largest displacement per axis, mm),
``--synthetic_spacing`` (control-point spacing, mm: the smoothness; fields beyond the injectivity
bound are composed of small ones), ``--synthetic_gamma`` / ``--synthetic_scale`` /
``--synthetic_noise`` (intensity changes), ``--synthetic_augment`` (mm; a random deformation of
the image first, a new moving image per pair).  Fields are drawn on the fly from ``--seed``
(training) and ``--split_seed`` (validation and test: other random streams, so held-out fields);
one image is enough.  The evaluation adds the endpoint error of the recovered field against the
true one in mm (``epe_mm``; inside the labelled foreground, or the ``--mask``, as ``epe_mm_mask``),
the mean true displacement, and Dice of the labels carried by the recovered field against the
labels carried by the true field; ``synthetic_test_fields.npz`` holds the true test fields.
**Splits** (``--split=TRAIN,VALID,TEST``, ``--split_seed``) are made by group, never one
group in two splits; ``--split_within_groups`` instead cuts every group in time (first
frames train, then valid, then test) -- for a collection that is one sequence.

**Labels** (``--labels``, a folder of label maps named like the images, or the CSV
``label`` column) are used only for evaluation: Dice per label, HD95 and MAD in mm.

Outputs in ``--logdir``: checkpoints, ``flags.json``, TensorBoard events (2-D: pairs;
3-D: the central orthogonal slices), ``skipped.json``, ``eval_pairs.json``,
``metrics.json`` (NCC, folding, displacement in voxels and mm, Dice/HD95/MAD with labels,
time per pair) and ``registration.png``; the SavedModel goes to ``--export_dir``.
"""

import os

from absl import flags

from dirnet_tf.config import GROUPS, PRESETS
from experiments import common
from experiments.common import define_flag

common.define_flags(GROUPS)
define_flag("string", "preset", "", "A named setting (flags given on the command line still win): 'paper' -- the "
            "paper's model (one B-spline stage at --grid_spacing, one regressor pass, no constraint, no "
            "regulariser); empty: the default, the folding-free composed model.")
flags.adopt_module_key_flags(common)  # --help lists every flag of the command (defined in common)

# The settings of this command are TrainConfig's defaults; the output folders are named after it.
DEFAULTS = dict(logdir=os.path.join("runs", "train"), export_dir=os.path.join("exports", "train"))


def run(config):
    """Train / export / evaluate: :func:`dirnet_tf.train` of ``config`` (a TrainConfig or a dict of
    flag values); returns its metrics dict."""
    from dirnet_tf.training import train

    return train(config)


def main():
    """Command line: apply this command's defaults, then parse flags and run."""
    from dirnet_tf.readers import InputError

    common.run_experiment(run, DEFAULTS, errors=(InputError,), presets=PRESETS)


if __name__ == "__main__":
    main()
