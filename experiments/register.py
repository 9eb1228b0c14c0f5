"""Register images with an exported DIRNet SavedModel.

    python -m experiments.register --model=EXPORT --fixed=F --moving=M --out=W \\
        [--displacement=D] [--moving_labels=L --out_labels=WL] [--points=P.csv --out_points=Q.csv] \\
        [--transform=T.tfm] [--elastix_transform=E.txt] [--figure=PNG] \\
        [--init=header|center|array] [--refine=N [--refine_similarity=ncc|lncc|mi]]
    python -m experiments.register --model=EXPORT --pairs=pairs.csv [--batch_size=16] [--refine=N]

Inputs
------
``F`` and ``M`` are read like ``python -m experiments.train`` reads images
(:mod:`dirnet_tf.readers`: PNG/JPEG/TIFF/BMP, ``.npy``, NIfTI, DICOM file or
series folder), 2-D or 3-D as the model, any size and spacing.  Formats without
a voxel size (PNG, NPY) get the export's ``--default_spacing`` (1 mm if none).
Each image is brought onto the model grid with the preprocessing stored in the
export (``assets/dirnet.json``, key ``model_grid``:
:class:`dirnet_tf.preprocessing.ModelGrid`): normalised, resampled with its own
spacing, centre-cropped or padded.  Fixed and moving image may differ in shape,
spacing and affine.

Every output lies on the **fixed image's own grid** (its shape; for NIfTI its
affine and header), so ``W`` overlays ``F`` in any viewer.

Geometry
--------
Fixed image F and moving image M are related in **world space**: RAS+ mm, as their headers
(NIfTI/DICOM affines ``A_f``, ``A_m``: voxel ij[k] -> RAS+ mm) say.  ``--init`` chooses how:

* ``header`` (the default for a world-space export, metadata ``"space": "world"``, when both
  images have patient geometry): the model grid lies in F's physical space -- 3-D: along F's array
  axes permuted and flipped to the closest RAS+ order (nibabel's ``as_closest_canonical`` rule; no
  resampling), 2-D: along F's own array axes -- at the model spacing, centred on F's field of view.
  ``T_f`` maps a model index ``q`` to F's voxel (ij) and ``x(q) = A_f T_f q`` is its world
  position.  M is sampled (linear, normalised with its own intensity range) where the fixed grid
  lies: ``T_m(q) = A_m^-1 (x(q) + t)`` with ``t = 0`` (2-D: the least-squares projection onto M's
  plane through the 3x2 linear part of ``A_m``), a general affine map model index -> M's voxel.
  So scans of any orientation, axis order, field of view and voxel size register as they lie in
  the scanner.
* ``center``: as ``header`` with ``t`` (RAS+ mm) = the centre of mass of M's normalised
  intensities minus F's: for scans whose origins are arbitrary.  Images without patient geometry
  (PNG, NPY, arrays) take part in their pixel space (``dirnet_tf.geometry.pixel_affine``).
* ``array``: each image on its own array axes, centred on its own field of view (``T_f``, ``T_m``
  a per-axis scale and offset, ``GridTransform``).  Images without patient geometry get this by
  default, and exports written before the ``space`` key, as well as exports without
  ``model_grid``, always get it, so their outputs are unchanged.  ``--init=header`` with an image
  without patient geometry is an error.

The model returns ``u_m`` (model voxels, ij order) on the fixed model grid.  For a fixed voxel
``p_f`` (ij):

* ``q = T_f^-1(p_f)``: the model index;
* ``q' = q + u_m(q)``: for W, the labels and ``--displacement`` ``u_m`` is the served dense field
  (multilinear between model voxels, or the exact spline of a one-B-spline model, below); for
  points and transforms the map is evaluated exactly (below);
* ``p_m = T_m(q')``: voxel of the moving image (ij);
* ``W(p_f) = M(p_m)``: multilinear interpolation of the original moving intensities (not
  normalised); outside M as the export's ``boundary`` (``border``: the nearest edge value;
  ``zeros``: 0).

Since ``T_m`` holds the header relation and ``t``, every output holds them: W, ``--out_labels``,
``--displacement``, ``--points`` (RAS+ mm or voxels ij), the ITK composite (its first transform,
the geometry step, maps F's model grid to M's: ``x -> x + t`` in LPS mm, the identity for
``header``) and the elastix chain (the geometry file is left out when it is the identity).  The
choice is recorded as ``init = {"mode": ..., "translation_mm": [x, y, z]}`` (RAS+ mm;
``Result.init``).

Outside the model grid's field of view (a fixed image larger than the model
grid) the spline is its finite sum, which fades to zero displacement within two
control-point spacings.

Composed models.  A model of several steps (``DIRNet(stages=("affine", 8, 4),
passes=2, ...)``: an affine step, then B-spline steps) composes them, ``q' =
phi_1(phi_2(... phi_n(q)))`` with ``phi_k(x) = x + u_k(x)`` (the last step is
applied to the fixed point first; :func:`dirnet_tf.warping.compose_displacements`).
Its export serves every step's exact parameters (``step_0``, ``step_1``, ...:
the affine step's ``M`` and ``t`` of ``u(x) = M (x - c) + t`` about the grid
centre ``c``, each B-spline step's control points), named in the metadata's
``steps`` (:func:`dirnet_tf.export_metadata.step_metadata`).  Points and transforms
use this chain, each step evaluated exactly
(:func:`dirnet_tf.spline_np.map_points_chain`); W, the labels and
``--displacement`` use the served dense total field, which represents the chain
up to the multilinear interpolation of ``compose_displacements`` (about 0.01 to
0.02 model voxels on the tests' random models).  An export of composed steps
written before the steps were served gets W and the fields only.

Control points (an export without step outputs: the paper's model).  Its
SavedModel returns only ``warped`` and ``displacement``; the dense field is a
linear function of the control points, so they are
recovered by separable least squares with the B-spline weight matrices
(:func:`dirnet_tf.spline_np.recover_control_points`); this is exact up to
float32 round-off whenever each weight matrix has full column rank (grid
spacing >= 2 and a model grid wider than the control grid), which is checked,
as is the fit (a residual above ``1e-4 + 1e-5 max|u|`` model voxels means the
export's ``grid_spacing`` does not describe its field).  An export without
``grid_spacing`` in its metadata gets the coarsest power-of-two spacing whose
spline reproduces the field exactly.  Where recovery is not exact, W and the
fields interpolate ``u_m`` linearly and ``--points`` / ``--transform`` /
``--elastix_transform`` are refused.

Refinement (``--refine=N``)
--------------------------
After the network's prediction, ``N`` optimiser steps on this pair alone
(instance optimisation, :mod:`dirnet_tf.register_refine`) change the chain's own
parameters -- the affine step's matrix and translation and every B-spline
step's control points, on F's model grid -- through the model's bounded
parametrisation, so a folding-free model stays folding-free.  The objective is
the model's training objective (similarity plus its bending and folding terms)
on the model-grid images; ``--refine_similarity`` replaces the similarity
(``mi``: mutual information, for different contrasts).  Every output, points
and transforms included, follows the refined chain exactly.  Progress is
printed every 10 steps; each refined pair also gets a JSON record beside its
first output (``W.nii.gz`` -> ``W.json``: the initial alignment, iterations,
similarity, objective before and after, seconds).  ``--refine=0`` (default)
is the network's result, unchanged.  2-D pairs of ``--pairs`` are refined
``--batch_size`` at a time.

Outputs (all written under temporary names and renamed only once every output
of every pair succeeded)
------------------------------------------------------------------------------
``--out`` (W, float32 moving intensities): ``.nii.gz``/``.nii`` (fixed affine
and header), ``.mha``/``.nrrd`` (ITK geometry of F), ``.npy`` (array of F's
shape, ij order), ``.png``/``.tif`` (2-D; integer intensities as 8/16-bit
grey, other values as float TIFF).

``--displacement``: ``.npy`` = ``p_m - p_f`` per fixed voxel, float32
``[*fixed_shape, ndim]``, in **voxel indices, ij order** (moving index minus
fixed index; so ``W = map_coordinates(M, grid + D)`` on M's own voxel grid);
``.nii.gz``/``.nii``/``.mha``/``.nrrd`` = the displacement in **mm along the
ITK LPS axes** from each fixed voxel's world position to its moving point, on
the fixed grid (:func:`dirnet_tf.field_images.write_displacement_field`), which
``SimpleITK.DisplacementFieldTransform`` reads as the fixed -> moving point map.
This assumes F and M live in one physical space (both with patient geometry,
or both without, in the pixel space described below).

``--moving_labels=L --out_labels=WL``: an integer label map on M's grid,
carried to F's grid as one-hot maps interpolated at ``p_m`` (multilinear),
argmax (ties: smaller label; nothing sampled: 0); integer output (8/16/32-bit)
with F's affine and header.

``--points=P.csv --out_points=Q.csv``: a header row, one point per row.
Columns ``x,y,z``: world RAS+ mm (NIfTI/DICOM; 2-D: ``x,y`` in plane, ``z``
optional); or ``i,j[,k]``: voxel indices of F, ij order (any format; the only
choice for PNG/NPY).  Other columns are copied.  Q holds the corresponding
points of the moving image in the same kind of coordinates (moving RAS+ mm, or
moving voxel indices ij) -- the transformix ``-def`` direction -- computed by
evaluating the spline (of a composed model: every step, in turn) exactly at each
point (no interpolation of the dense field).  A point outside F (beyond half a
voxel past the border voxel centres) is an error.

``--transform=T.tfm|.txt|.h5``: an ITK ``CompositeTransform`` ``[A, B]`` in
LPS mm: ``B`` = the DIRNet ``BSplineTransform`` on F's model grid, ``A`` = the
affine map from F's model grid to M's model grid (identity when they
coincide), i.e. ``p -> A(B(p))``; ``SimpleITK.Resample(M, F, ReadTransform(T))``
gives W (to within interpolation differences at the image border).  For a
composed model ``[A, T_1, ..., T_n]``: one transform per step on F's model grid
(``AffineTransform`` for the affine step, ``BSplineTransform`` for a B-spline
step); ITK applies the last one first, ``p -> A(T_1(... T_n(p)))``, which is the
chain (W agrees to within the dense field's interpolation).

``--elastix_transform=E.txt``: a transformix parameter file with the same map
and F's grid as output grid.  When the model grids of F and M differ, E.txt is
an ``AffineTransform`` (the geometry step) whose initial transform is the
B-spline, written beside it as ``E.bspline.txt`` and referenced by absolute
path (move both together and edit the path).  For a composed model E.txt starts
a chain of files linked the same way (``InitialTransformParametersFileName``,
``HowToCombineTransforms "Compose"``: each file's initial transform is applied
to a point first): the geometry step (if any) in E.txt, then step ``k`` in
``E.step<k>.txt`` (step 1 in E.txt itself when the grids coincide), down to step
n, which has no initial transform (:func:`dirnet_tf.register_outputs.elastix_paths`).

``--figure``: fixed / moving / warped / deformation grid on the model grid
(3-D: the central slices).

Images without patient geometry (PNG, NPY) live in the pixel space ITK gives
such files (index ``x`` = column ``j``, ``y`` = row ``i``, origin 0, identity
direction, the image's spacing); transforms and NIfTI outputs of them use it.

Many pairs: ``--pairs=CSV`` with columns ``fixed,moving`` and optional columns
named like the flags (``out, displacement, moving_labels, out_labels, points,
out_points, transform, elastix_transform, figure``); relative paths are
relative to the CSV file's folder; 2-D pairs are registered in batches of
``--batch_size``, 3-D pairs one at a time.

Exports without ``model_grid`` (``experiments.mnist``) keep their behaviour:
PNG/JPEG/TIFF/BMP or ``.npy`` images ``[H, W]`` / ``[H, W, C]`` of exactly the
model's input size (an error names both sizes); integer images are scaled to
[0, 1] (uint8 by 255, uint16 by 65535), float images used as they are, RGB(A)
converted to grey (ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` in floating
point, alpha ignored); ``--out`` is the served model's ``warped`` (8-bit PNG
clipped to [0, 1], or float32 ``.npy`` ``[H, W, C]``) and ``--displacement``
``.npy`` its field ``[H, W, 2]`` (pixels, ij: ``warped(x) = moving(x +
displacement(x))``).  The other outputs work as above with the model grid as
the image grid (spacing 1).

Bad input (an unreadable file, a 2-D image for a 3-D model, labels not on the
moving image's grid, points outside the fixed image, an unwritable output)
prints ``error: ...`` naming the file and exits with status 1 (2 for missing
flags), leaving no output file.

Python API
----------
The same engine, from a script (:mod:`dirnet_tf.registration`)::

    import dirnet_tf
    model = dirnet_tf.load_model("exports/mnist")
    result = dirnet_tf.register(model, "a.png", "b.png")    # or numpy arrays, spacing=
    result.warped, result.displacement                      # on the fixed image's grid
    result.save(out="w.png", displacement="d.npy")          # what the same flags write
"""

import sys

from absl import flags

# The command's flags live in a FlagValues of their own: --pairs and --batch_size mean
# something else in the training commands, which may be imported in the same process.
FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "Exported SavedModel directory (e.g. exports/mnist), or the name of a model "
                    "shipped with the package: brain (3-D brain MRI of any contrast).", flag_values=FLAGS)
flags.DEFINE_string("fixed", None, "Fixed image: PNG/JPEG/TIFF, .npy, NIfTI, DICOM file or series folder.",
                    flag_values=FLAGS)
flags.DEFINE_string("moving", None, "Moving image (same formats).", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Warped moving image on the fixed grid (.nii.gz, .nii, .mha, .nrrd, .npy, "
                    ".png, .tif).", flag_values=FLAGS)
flags.DEFINE_string("displacement", None, "Displacement on the fixed grid: .npy (voxel indices, ij) or "
                    ".nii.gz/.nii/.mha/.nrrd (mm, LPS, an ITK displacement field).", flag_values=FLAGS)
flags.DEFINE_string("moving_labels", None, "Integer label map on the moving image's grid.", flag_values=FLAGS)
flags.DEFINE_string("out_labels", None, "Where to write the moving labels carried to the fixed grid.",
                    flag_values=FLAGS)
flags.DEFINE_string("points", None, "CSV of fixed-image points (columns x,y[,z] in RAS mm, or i,j[,k] voxels).",
                    flag_values=FLAGS)
flags.DEFINE_string("out_points", None, "CSV of the corresponding moving-image points.", flag_values=FLAGS)
flags.DEFINE_string("transform", None, "ITK transform file (.tfm, .txt, .h5) of the fixed -> moving map.",
                    flag_values=FLAGS)
flags.DEFINE_string("elastix_transform", None, "transformix parameter file (.txt) of the fixed -> moving map.",
                    flag_values=FLAGS)
flags.DEFINE_string("figure", None, "Optional .png with fixed / moving / warped / grid panels.", flag_values=FLAGS)
flags.DEFINE_string("pairs", None, "CSV with columns fixed,moving and optional output columns named like the flags.",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 16, "Pairs per inference batch with --pairs (2-D; 3-D pairs run one at a time).",
                     flag_values=FLAGS)
flags.DEFINE_enum("init", None, ["header", "center", "array"],
                  "How fixed and moving are related: header = through their headers (world RAS mm); center = "
                  "also align their intensity centres of mass first (arbitrary origins); array = each on its own "
                  "array axes (today's behaviour of images without geometry). Default: header where both "
                  "images have patient geometry and the export is a world-space one, else array.",
                  flag_values=FLAGS)
flags.DEFINE_integer("refine", 0, "Instance optimisation: optimiser steps on each pair after the network "
                     "(0 = the network's result).", flag_values=FLAGS)
flags.DEFINE_enum("refine_similarity", None, ["ncc", "lncc", "mi"],
                  "Similarity of --refine (default: the model's training similarity); mi = mutual information, "
                  "for images of different contrast.", flag_values=FLAGS)

#: Per-pair flags, also the --pairs columns (as :data:`dirnet_tf.register_jobs.PAIR_COLUMNS`; spelled out
#: here so that --help and flag errors need no TensorFlow).
PAIR_COLUMNS = ("fixed", "moving", "moving_labels", "points", "out", "displacement", "out_labels", "out_points",
                "transform", "elastix_transform", "figure")


def _usage_error(message):
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv):
    """Run the command on the parsed :data:`FLAGS`; returns the exit status (0, 1 bad input, 2 usage)."""
    if len(argv) > 1:
        return _usage_error(f"unexpected arguments {argv[1:]}")
    if FLAGS.pairs:
        clash = [n for n in PAIR_COLUMNS if FLAGS[n].value]
        if clash:
            return _usage_error("--pairs gives the pairs and their outputs as CSV columns; do not also give "
                                + ", ".join("--" + n for n in clash))
        missing = [] if FLAGS.model else ["model"]
    else:
        missing = [n for n in ("model", "fixed", "moving", "out") if not FLAGS[n].value]
    if missing:
        return _usage_error("missing " + ", ".join("--" + n for n in missing))
    from dirnet_tf.console import import_tensorflow_quietly

    import_tensorflow_quietly()  # TensorFlow's start-up lines hidden unless the user set TF_CPP_MIN_LOG_LEVEL
    from dirnet_tf.register_jobs import Job, check_jobs, read_pairs
    from dirnet_tf.registration import load_model, run_jobs

    from dirnet_tf.register_refine import check_refine_options

    try:
        if FLAGS.pairs:
            jobs = read_pairs(FLAGS.pairs)
        else:
            jobs = [Job(**{n: FLAGS[n].value for n in PAIR_COLUMNS})]
        check_jobs(jobs)
        model = load_model(FLAGS.model)
        steps, _ = check_refine_options(model, FLAGS.refine, FLAGS.refine_similarity)
        done = run_jobs(model, jobs, FLAGS.batch_size, init=FLAGS.init, refine=steps,
                        refine_similarity=FLAGS.refine_similarity, progress=_progress(steps))
    except (ValueError, OSError, RuntimeError, ImportError) as exc:  # RegisterError, readers.InputError, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for job, s, written in done:
        prefix = "" if len(done) == 1 else f"{job.fixed} <- {job.moving}: "
        refined = s.get("refinement")
        note = (f" after {refined['steps']} refinement steps ({refined['similarity']} objective "
                f"{refined['initial_loss']:.4f} -> {refined['final_loss']:.4f})" if refined else "")
        print(f"{prefix}NCC {s['ncc_before']:.4f} -> {s['ncc_after']:.4f}{note}, folding "
              f"{100 * s['folding']:.2f}% of {'pixels' if model.ndim == 2 else 'voxels'}; wrote {', '.join(written)}")
    return 0


def _progress(steps):
    """Refinement progress on stdout: every 10th step and the last (None without --refine)."""
    if not steps:
        return None

    def report(iteration, objective):
        if iteration % 10 == 0 or iteration == steps:
            print(f"refine: step {iteration}/{steps}, objective {objective:.5f}", flush=True)
    return report


def entry(argv=None):
    """``python -m experiments.register`` / ``dirnet-register``: parse the command line, run :func:`main`.

    ``--help`` prints this module's documentation and every flag, without importing TensorFlow.
    """
    argv = sys.argv if argv is None else argv
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(__doc__ + "\nFlags\n-----\n" + FLAGS.get_help())
        return 0
    try:
        argv = FLAGS(argv)
    except flags.Error as exc:
        return _usage_error(exc)
    return main(argv)


if __name__ == "__main__":
    sys.exit(entry())
