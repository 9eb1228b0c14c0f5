"""Register images with an exported DIRNet SavedModel.

    python -m experiments.register --model=EXPORT --fixed=F --moving=M --out=W \\
        [--displacement=D] [--moving_labels=L --out_labels=WL] [--points=P.csv --out_points=Q.csv] \\
        [--transform=T.tfm] [--elastix_transform=E.txt] [--figure=PNG]
    python -m experiments.register --model=EXPORT --pairs=pairs.csv [--batch_size=16]

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
The model returns ``u_m`` (model voxels, ij order) on the fixed image's model
grid, sampling the moving image's model grid.  For a fixed voxel ``p_f`` (ij):

* ``q = T_f^-1(p_f)``: model index (``GridTransform.image_to_model_index`` of F);
* ``q' = q + u_m(q)``: for W, the labels and ``--displacement`` ``u_m`` is the
  served dense field (multilinear between model voxels, or the exact spline of a
  one-B-spline model, below); for points and transforms the map is evaluated
  exactly (below);
* ``p_m = T_m(q')``: voxel of the moving image (``GridTransform.model_to_image_index``
  of M, with M's own shape and spacing);
* ``W(p_f) = M(p_m)``: multilinear interpolation of the original moving
  intensities (not normalised); outside M as the export's ``boundary``
  (``border``: the nearest edge value; ``zeros``: 0).

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
``steps`` (:func:`dirnet_tf.inference.step_metadata`).  Points and transforms
use this chain, each step evaluated exactly
(:func:`dirnet_tf.transforms.map_points_steps`); W, the labels and
``--displacement`` use the served dense total field, which represents the chain
up to the multilinear interpolation of ``compose_displacements`` (about 0.01 to
0.02 model voxels on the tests' random models).  An export of composed steps
written before the steps were served gets W and the fields only.

Control points (an export without step outputs: the paper's model).  Its
SavedModel returns only ``warped`` and ``displacement``; the dense field is a
linear function of the control points, so they are
recovered by separable least squares with the B-spline weight matrices
(:func:`experiments.register_io.recover_control_points`); this is exact up to
float32 round-off whenever each weight matrix has full column rank (grid
spacing >= 2 and a model grid wider than the control grid), which is checked,
as is the fit (a residual above ``1e-4 + 1e-5 max|u|`` model voxels means the
export's ``grid_spacing`` does not describe its field).  An export without
``grid_spacing`` in its metadata gets the coarsest power-of-two spacing whose
spline reproduces the field exactly.  Where recovery is not exact, W and the
fields interpolate ``u_m`` linearly and ``--points`` / ``--transform`` /
``--elastix_transform`` are refused.

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
the fixed grid (:func:`dirnet_tf.transforms.write_displacement_field`), which
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
n, which has no initial transform (:func:`elastix_paths`).

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
"""

import csv
import dataclasses
import os
import sys

import numpy as np
from absl import app, flags
from scipy import ndimage

from dirnet_tf import metrics, readers, transforms
from dirnet_tf.bspline import control_grid_shape, normalize_spacing
from dirnet_tf.inference import load_export, predict
from dirnet_tf.plotting import registration_figure, volume_figure
from dirnet_tf.preprocessing import ModelGrid
from dirnet_tf.readers import Image, InputError
from experiments import register_io as rio
from experiments.register_io import RegisterError

# The command's flags live in a FlagValues of their own: --pairs and --batch_size mean
# something else in the training commands, which may be imported in the same process.
FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "Exported SavedModel directory (e.g. exports/mnist).", flag_values=FLAGS)
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

# Grey from RGB: ITU-R 601 luma weights (as dirnet_tf.readers).
LUMA = np.array([0.299, 0.587, 0.114])
#: Per-pair input and output names (flags and --pairs columns).
INPUTS = ("fixed", "moving", "moving_labels", "points")
OUTPUTS = ("out", "displacement", "out_labels", "out_points", "transform", "elastix_transform", "figure")
PAIR_COLUMNS = INPUTS + OUTPUTS
_OUTPUT_EXTENSIONS = {"out": rio.IMAGE_EXTENSIONS, "displacement": rio.FIELD_EXTENSIONS,
                      "out_labels": rio.IMAGE_EXTENSIONS, "out_points": (".csv",),
                      "transform": rio.TRANSFORM_EXTENSIONS, "elastix_transform": (".txt",),
                      "figure": rio.FIGURE_EXTENSIONS}
_EDGE = 1e-6  # voxels: tolerance of the "inside the fixed image" test of points


def read_image(path, channels=1):
    """Read an image file as float32 ``[H, W, channels]`` in ``[0, 1]`` (integers scaled).

    The reader of exports without ``model_grid`` (``experiments.mnist``).

    Parameters
    ----------
    path : str
        Image (Pillow formats) or ``.npy``.
    channels : int
        Channels the model expects: RGB(A) is converted to grey (:data:`LUMA`
        weights, alpha ignored) for 1, grey is repeated for 3.

    Returns
    -------
    numpy.ndarray
    """
    if not os.path.isfile(path):
        raise RegisterError(f"image file {path} does not exist")
    try:
        if path.lower().endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as img:
                if channels == 1 and img.mode not in ("L", "I;16", "I;16B", "I", "F"):
                    img = img.convert("RGB")  # to grey below, like an RGB .npy
                elif channels == 3 and img.mode != "RGB":
                    img = img.convert("RGB")
                array = np.array(img)
    except RegisterError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure
        raise RegisterError(f"cannot read image {path}: {exc}") from exc
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        info = np.iinfo(array.dtype) if array.dtype != bool else None
        array = array.astype(np.float32) / (float(info.max) if info else 1.0)
    else:
        array = array.astype(np.float32)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise RegisterError(f"image {path} has shape {array.shape}; expected [H, W] or [H, W, C]")
    if array.shape[-1] != channels:
        if array.shape[-1] in (3, 4) and channels == 1:
            array = (array[..., :3].astype(np.float64) @ LUMA)[..., None].astype(np.float32)
        elif array.shape[-1] == 1 and channels == 3:
            array = np.repeat(array, 3, axis=-1)
        else:
            raise RegisterError(f"image {path} has {array.shape[-1]} channels; the model expects {channels}")
    if not np.isfinite(array).all():
        raise RegisterError(f"image {path} contains non-finite values")
    return array


# --------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Export:
    """A served model and what its metadata says about it.

    Attributes
    ----------
    fn : callable
        ``fn(fixed=..., moving=...) -> {"warped", "displacement", ...}`` (the serving
        signature; a model of composed steps also returns the outputs named in ``steps``).
    metadata : dict
        ``assets/dirnet.json``.
    path : str
    shape : tuple of int
        Model input size (voxels, ij order).
    channels : int
    grid : dirnet_tf.preprocessing.ModelGrid or None
        The preprocessing (None: images must have the model's size, ``experiments.mnist``).
    grid_spacing : tuple of int or None
        Control-point spacing in model voxels (None: detected from the field).
    boundary : str
        ``border`` or ``zeros``: how the model samples outside the moving image.
    default_spacing : float, tuple or None
        mm per voxel for formats without one (the training's ``--default_spacing``).
    steps : list of dict or None
        A model of composed steps: ``{"kind": "affine" | "spline", "grid_spacing":
        tuple or None, "output": name}`` per step, in the model's order, each
        naming the serving output with its exact parameters (metadata ``steps``,
        :func:`dirnet_tf.inference.step_metadata`).  None: the export serves no
        step parameters (one B-spline, recovered from the dense field).
    """

    fn: object
    metadata: dict
    path: str
    shape: tuple
    channels: int = 1
    grid: object = None
    grid_spacing: tuple = None
    boundary: str = "border"
    default_spacing: object = None
    steps: list = None

    @property
    def ndim(self):
        """Spatial axes of the model (2 or 3)."""
        return len(self.shape)

    @classmethod
    def from_metadata(cls, fn, metadata, path, shape, channels=1):
        """Interpret ``assets/dirnet.json`` (see ``experiments.common.export`` and ``experiments.train``)."""

        shape = tuple(int(n) for n in shape)
        metadata = dict(metadata or {})
        grid = None
        if metadata.get("model_grid"):
            try:
                grid = ModelGrid.from_dict(metadata["model_grid"])
            except (InputError, KeyError, TypeError) as exc:
                raise RegisterError(f"{path}: unusable model_grid in the export's metadata: {exc}") from exc
            if grid.shape != shape:
                raise RegisterError(f"{path}: the model grid {grid.shape} of the metadata is not the model's "
                                    f"input size {shape}")
        spacing = metadata.get("grid_spacing")
        if spacing is not None:
            try:
                if isinstance(spacing, str):
                    spacing = [int(s) for s in spacing.split(",") if s.strip()]
                    spacing = spacing[0] if len(spacing) == 1 else spacing
                spacing = normalize_spacing(spacing, len(shape))
            except (ValueError, TypeError) as exc:
                raise RegisterError(f"{path}: grid_spacing {metadata['grid_spacing']!r} in the metadata: "
                                    f"{exc}") from exc
        default_spacing = None
        flag = (metadata.get("flags") or {}).get("default_spacing")
        if flag not in (None, ""):
            try:
                values = [float(v) for v in str(flag).split(",") if v.strip()]
            except ValueError:
                values = []
            default_spacing = (values[0] if len(values) == 1 else tuple(values)) if values else None
        return cls(fn, metadata, path, shape, int(channels), grid, spacing, metadata.get("boundary", "border"),
                   default_spacing, _served_steps(fn, metadata, path, len(shape)))


def _served_steps(fn, metadata, path, ndim):
    """The metadata's ``steps`` that name serving outputs (see :attr:`Export.steps`), else None."""
    steps = metadata.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) and s.get("output") for s in steps):
        return None  # the paper's model, or composed steps exported before their parameters were served
    outputs = getattr(fn, "structured_outputs", None)
    served = set(outputs) if isinstance(outputs, dict) else None
    parsed = []
    for n, step in enumerate(steps):
        kind, name = step.get("kind"), step["output"]
        try:
            if kind not in ("affine", "spline") or (served is not None and name not in served):
                raise ValueError(f"expected kind affine or spline and an output among {sorted(served or [])}")
            spacing = normalize_spacing(step["grid_spacing"], ndim) if kind == "spline" else None
        except (ValueError, TypeError, KeyError) as exc:
            raise RegisterError(f"{path}: step {n} of the metadata, {step}, does not describe the served "
                                f"model: {exc}") from exc
        parsed.append({"kind": kind, "grid_spacing": spacing, "output": name})
    return parsed


def load_model(path):
    """Load an exported model (:func:`dirnet_tf.inference.load_export`) as an :class:`Export`."""

    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "saved_model.pb")):
        raise RegisterError(f"{path} is not a SavedModel directory (no saved_model.pb); "
                            "export one with `python -m experiments.mnist --export_only` or "
                            "`python -m experiments.train`")
    try:
        fn, metadata = load_export(path)
    except ValueError as exc:
        raise RegisterError(str(exc)) from exc
    spec = fn.structured_input_signature[1]
    if set(spec) != {"fixed", "moving"}:
        raise RegisterError(f"{path}: serving_default takes {sorted(spec)}, expected fixed and moving")
    shape = spec["fixed"].shape
    return Export.from_metadata(fn, metadata, path, tuple(int(n) for n in shape[1:-1]), int(shape[-1]))


# --------------------------------------------------------------------------- #
# One registration
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Job:
    """One pair and its outputs (file paths or None); ``where`` names it in messages."""

    fixed: str
    moving: str
    moving_labels: str = None
    points: str = None
    out: str = None
    displacement: str = None
    out_labels: str = None
    out_points: str = None
    transform: str = None
    elastix_transform: str = None
    figure: str = None
    where: str = ""

    def outputs(self):
        """``{flag: path}`` of the outputs asked for."""
        return {name: getattr(self, name) for name in OUTPUTS if getattr(self, name)}


def _identity_transform(shape):

    return ModelGrid(shape, 1.0, "none").transform_for(shape, 1.0)


def _read_one(model, path, what):

    if not os.path.exists(path) and not readers._H5_SPEC.match(os.fspath(path)):
        raise RegisterError(f"the {what} image {path} does not exist")
    try:
        images = readers.read_image(path, ndim=model.ndim, default_spacing=model.default_spacing)
    except readers.InputError as exc:
        raise RegisterError(f"cannot read the {what} image for the {model.ndim}-D model {model.path}: {exc}") from exc
    except ImportError as exc:
        raise RegisterError(f"cannot read the {what} image {path}: {exc}") from exc
    if len(images) != 1:
        raise RegisterError(f"the {what} image {path} holds {len(images)} {model.ndim}-D images; the model "
                            f"registers one {model.ndim}-D image per file")
    return images[0]


def _read_labels(path, moving, ndim):

    if not os.path.exists(path):
        raise RegisterError(f"the moving label map {path} does not exist")
    try:
        labels = readers.read_labels(path, ndim=ndim)
    except readers.InputError as exc:
        raise RegisterError(f"cannot read the moving label map {path}: {exc}") from exc
    if len(labels) != 1:
        raise RegisterError(f"the moving label map {path} holds {len(labels)} label maps; give one")
    if labels[0].shape != moving.shape:
        raise RegisterError(f"the moving label map {path} has shape {labels[0].shape} but the moving image "
                            f"{moving.source} has shape {moving.shape}; labels must be on the moving image's grid")
    return labels[0].array


def _fixed_voxels(table, image):
    """Points of a :func:`register_io.read_points` table -> fixed voxel indices ``[P, ndim]`` (ij)."""
    ndim = image.ndim
    values = table["values"]
    if table["kind"] == "voxel":
        return values.copy()
    linear, translation = rio.planar_parts(image.affine, ndim)
    if ndim == 3:
        return np.linalg.solve(linear, (values - translation).T).T
    if values.shape[1] == 3:
        return np.linalg.lstsq(linear, (values - translation).T, rcond=None)[0].T
    return np.linalg.solve(linear[:2], (values - translation[:2]).T).T


def _check_inside(points, image, table):
    shape = np.asarray(image.shape, dtype=np.float64)
    bad = np.any((points < -0.5 - _EDGE) | (points > shape - 0.5 + _EDGE), axis=1)
    if bad.any():
        n = int(np.argmax(bad))
        row = table["rows"][n]
        raise RegisterError(f"points file {table['path']}, line {table['lines'][n]}: the point "
                            f"{[row[c] for c in table['columns']]} lies outside the fixed image {image.source} "
                            f"(voxel {np.round(points[n], 3).tolist()}, ij order; the image spans -0.5 to "
                            f"{(shape - 0.5).tolist()})")


def prepare(model, job):
    """Read and check one pair's inputs and bring them onto the model grid.

    Returns
    -------
    dict
        ``fixed``, ``moving``: model inputs float32 ``[*model_shape, channels]``;
        ``fixed_image``, ``moving_image``: :class:`dirnet_tf.readers.Image` on
        their own grids; ``fixed_grid``, ``moving_grid``:
        :class:`dirnet_tf.preprocessing.GridTransform` (model index -> image
        index); ``labels`` (int32 on the moving grid) or None; ``points``
        (table) and ``points_fixed`` (fixed voxel indices, ij) or None.
    """

    if model.grid is None:
        arrays = {}
        for name, path in (("fixed", job.fixed), ("moving", job.moving)):
            image = read_image(path, model.channels)
            if image.shape[:2] != model.shape:
                raise RegisterError(
                    f"the {name} image {path} is {image.shape[0]}x{image.shape[1]} pixels but the model "
                    f"{model.path} expects {model.shape[0]}x{model.shape[1]}"
                )
            arrays[name] = image
        identity = _identity_transform(model.shape)
        result = {"fixed": arrays["fixed"], "moving": arrays["moving"],
                  "fixed_image": Image(arrays["fixed"][..., 0], (1.0, 1.0), None, job.fixed),
                  "moving_image": Image(arrays["moving"][..., 0], (1.0, 1.0), None, job.moving),
                  "fixed_grid": identity, "moving_grid": identity}
    else:
        if model.channels != 1:
            raise RegisterError(f"{model.path}: a model grid export with {model.channels} channels; "
                                "images are read as grey (1 channel)")
        fixed = _read_one(model, job.fixed, "fixed")
        moving = _read_one(model, job.moving, "moving")
        fixed_array, fixed_grid = model.grid.prepare(fixed)
        moving_array, moving_grid = model.grid.prepare(moving)
        result = {"fixed": fixed_array[..., None], "moving": moving_array[..., None], "fixed_image": fixed,
                  "moving_image": moving, "fixed_grid": fixed_grid, "moving_grid": moving_grid}
    result["labels"] = None
    if job.moving_labels:
        result["labels"] = _read_labels(job.moving_labels, result["moving_image"], model.ndim)
    result["points"] = result["points_fixed"] = None
    if job.points:
        fixed = result["fixed_image"]
        table = rio.read_points(job.points, model.ndim, fixed.affine is not None)
        points = _fixed_voxels(table, fixed)
        _check_inside(points, fixed, table)
        result["points"], result["points_fixed"] = table, points
    return result


def infer(model, prepared, batch_size=16):
    """Run the served model on prepared pairs (in batches); adds ``warped``, ``displacement`` and
    ``step_outputs`` (``{output name: parameters}`` of a model of composed steps, else empty) to each."""

    if not prepared:
        return prepared
    out = predict(model.fn, np.stack([p["fixed"] for p in prepared]), np.stack([p["moving"] for p in prepared]),
                  batch_size=max(1, int(batch_size)))
    names = [step["output"] for step in model.steps or ()]
    missing = [name for name in names if name not in out]
    if missing:
        raise RegisterError(f"{model.path}: the model does not return {', '.join(missing)}, which its metadata "
                            "names as step outputs")
    for n, p in enumerate(prepared):
        p["warped"] = out["warped"][n]
        p["displacement"] = out["displacement"][n]
        p["step_outputs"] = {name: out[name][n] for name in names}
    return prepared


def _spline(model, displacement):
    """Recovered control points and whether they define the field exactly."""
    spacing = model.grid_spacing
    info = {"spacing": spacing, "control_points": None, "exact": False, "residual": None, "problem": None}
    composed = len(model.metadata.get("steps") or ())
    if model.steps is not None:
        info["problem"] = f"the export composes {len(model.steps)} steps (they are used as a chain)"
        return info
    if composed > 1:
        info["problem"] = (f"the export {model.path} composes {composed} steps but does not serve their parameters "
                           "(it was exported by an older version); export it again (e.g. `--export_only`) to map "
                           "points and write transforms")
        return info
    if spacing is None:
        spacing = info["spacing"] = rio.detect_grid_spacing(displacement)
    if spacing is None:
        info["problem"] = (f"the export {model.path} does not record grid_spacing and no B-spline grid of spacing "
                           "2..64 reproduces its displacement")
        return info
    cp, exact, residual = rio.recover_control_points(displacement, spacing)
    info.update(control_points=cp, residual=residual)
    tolerance = rio.fit_tolerance(displacement)
    if not exact:
        info["problem"] = (f"the control points of grid spacing {spacing} on the {tuple(displacement.shape[:-1])} "
                           "model grid are not determined by the dense field (the grid is too fine or the image "
                           "too small)")
    elif residual > tolerance:
        info["problem"] = (f"the export's displacement is not a cubic B-spline of grid spacing {spacing} "
                           f"(residual {residual:.3g} model voxels); its metadata does not describe the model")
    else:
        info["exact"] = True
    return info


def _chain(model, result):
    """The served steps for :func:`dirnet_tf.transforms.map_points_steps` (None without step outputs)."""
    if model.steps is None:
        return None
    chain = []
    for n, step in enumerate(model.steps):
        params = np.asarray(result["step_outputs"][step["output"]], dtype=np.float64)
        if step["kind"] == "affine":
            try:
                chain.append({"kind": "affine", "matrix": transforms.affine_step_matrix(params, model.shape)})
            except ValueError as exc:
                raise RegisterError(f"{model.path}: step {n} ({step['output']}): {exc}") from exc
            continue
        expected = tuple(control_grid_shape(model.shape, step["grid_spacing"])) + (model.ndim,)
        if params.shape != expected:
            raise RegisterError(f"{model.path}: step {n} ({step['output']}) has shape {params.shape}; B-spline control "
                                f"points of grid spacing {step['grid_spacing']} on the {model.shape} model grid are "
                                f"{expected}")
        chain.append({"kind": "spline", "control_points": params, "grid_spacing": step["grid_spacing"]})
    return chain


def _is_identity(grid_transform, shape):
    return (tuple(grid_transform.image_shape) == tuple(shape) and np.allclose(grid_transform.scale, 1.0)
            and np.allclose(grid_transform.offset, 0.0))


def _fixed_axes(result):
    """Model index of every fixed voxel, one 1-D array per axis (``GridTransform.image_to_model_index``)."""
    t = result["fixed_grid"]
    return [(np.arange(n, dtype=np.float64) - t.offset[d]) / t.scale[d] for d, n in enumerate(t.image_shape)]


def _model_field_at(result, rows):
    """``u_m(q)`` (model voxels, ij) at the fixed voxels of ``rows`` (a slice of axis 0)."""

    axes = _fixed_axes(result)
    axes[0] = axes[0][rows]
    if result["identity"]:
        return np.asarray(result["displacement"][rows], dtype=np.float64)
    spline = result["spline"]
    if spline["exact"]:
        return rio.spline_on_axes(spline["control_points"], spline["spacing"], axes)
    q = np.stack(np.meshgrid(*axes, indexing="ij"))
    field = np.asarray(result["displacement"], dtype=np.float64)
    return np.stack([ndimage.map_coordinates(field[..., c], q, order=1, mode="nearest")
                     for c in range(field.shape[-1])], axis=-1)


def _sample(array, positions, boundary, order=1):

    mode = "nearest" if boundary == "border" else "grid-constant"
    return ndimage.map_coordinates(np.asarray(array, dtype=np.float64), positions, order=order, mode=mode,
                                   cval=0.0, prefilter=False)


def _carry_labels(labels, positions, boundary):
    values = np.unique(labels)
    best = np.zeros(positions.shape[1:])
    out = np.zeros(positions.shape[1:], dtype=np.int64)
    for v in values:
        weight = _sample((labels == v).astype(np.float32), positions, boundary)
        better = weight > best + 1e-12
        out[better] = v
        best = np.maximum(best, weight)
    return out


def _world(affine, voxels, ndim):
    linear, translation = rio.planar_parts(affine, ndim)
    return voxels @ linear.T + translation


def finish(model, result, want=None, slab_voxels=1 << 21):
    """Compose the geometry and compute the outputs on the fixed grid.

    Parameters
    ----------
    model : Export
    result : dict
        From :func:`prepare` and :func:`infer`.
    want : set of str or None
        Outputs to compute among ``image``, ``field``, ``field_fixed``,
        ``labels``, ``points`` (None: all that the inputs allow).
    slab_voxels : int
        Fixed voxels per block (bounds memory on large volumes).

    Adds to ``result``
    ------------------
    spline : dict
        ``control_points [*K, ndim]`` (model voxels, ij), ``spacing`` (model
        voxels), ``exact``, ``residual`` (model voxels), ``problem`` (why not exact).
    chain : list of dict or None
        A model of composed steps: its steps (:func:`dirnet_tf.transforms.map_points_steps`:
        ``affine`` homogeneous matrices and ``spline`` control points, model voxels,
        ij) from the served step outputs; None otherwise.
    image : float32 ``[*fixed_shape]``
        W: moving intensities at ``p_m`` (for exports without ``model_grid``:
        the served ``warped`` ``[H, W, C]``, as before).
    field : float32 ``[*fixed_shape, ndim]``
        ``p_m - p_f``: moving voxel index minus fixed voxel index (ij order).
    field_fixed : float32 ``[*fixed_shape, ndim]``
        The moving point's world position minus the fixed voxel's, in voxels
        of the FIXED grid (ij order); times the fixed affine's linear part it is
        the displacement in mm.
    warped_labels : int64 ``[*fixed_shape]`` or None
    points_moving : float64 ``[P, ncols]`` or None
        Moving points in the kind of coordinates of the input (voxels ij of
        the moving image, or RAS+ mm).
    """
    ndim = model.ndim
    fixed, moving = result["fixed_image"], result["moving_image"]
    if want is None:
        want = {"image", "field", "field_fixed", "labels", "points"}
    result["identity"] = _is_identity(result["fixed_grid"], model.shape)
    result["spline"] = _spline(model, result["displacement"])
    result["chain"] = _chain(model, result)
    moving_grid = result["moving_grid"]
    shape = fixed.shape
    image = np.zeros(shape, np.float32) if "image" in want and model.grid is not None else None
    field = np.zeros(shape + (ndim,), np.float32) if "field" in want else None
    field_fixed = np.zeros(shape + (ndim,), np.float32) if "field_fixed" in want else None
    labels = result["labels"]
    warped_labels = np.zeros(shape, np.int64) if labels is not None and "labels" in want else None
    if any(x is not None for x in (image, field, field_fixed, warped_labels)):
        affine_f, affine_m = rio.image_affine(fixed), rio.image_affine(moving)
        linear_f, translation_f = rio.planar_parts(affine_f, ndim)
        step = max(1, slab_voxels // max(1, int(np.prod(shape[1:]))))
        for start in range(0, shape[0], step):
            rows = slice(start, min(shape[0], start + step))
            axes = _fixed_axes(result)
            grid_q = np.stack(np.meshgrid(axes[0][rows], *axes[1:], indexing="ij"), -1)
            p_f = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64)[rows if d == 0 else slice(None)]
                                         for d, n in enumerate(shape)], indexing="ij"), -1)
            q = grid_q + _model_field_at(result, rows)
            p_m = moving_grid.model_to_image_index(q)
            positions = np.moveaxis(p_m, -1, 0)
            if image is not None:
                image[rows] = _sample(moving.array, positions, model.boundary)
            if warped_labels is not None:
                warped_labels[rows] = _carry_labels(labels, positions, model.boundary)
            if field is not None:
                field[rows] = p_m - p_f
            if field_fixed is not None:
                world = _world(affine_m, p_m, ndim)
                if ndim == 3:
                    v = np.linalg.solve(linear_f, (world - translation_f).reshape(-1, 3).T).T
                else:
                    v = np.linalg.solve(linear_f[:2], (world[..., :2] - translation_f[:2]).reshape(-1, 2).T).T
                field_fixed[rows] = v.reshape(p_f.shape) - p_f
    if model.grid is None:
        image = result["warped"]
        if field is not None:
            field = np.asarray(result["displacement"], np.float32)
    result.update(image=image, field=field, field_fixed=field_fixed, warped_labels=warped_labels,
                  points_moving=None)
    if result["points"] is not None and "points" in want:
        result["points_moving"] = map_points(model, result, result["points_fixed"], result["points"]["kind"],
                                             result["points"]["values"].shape[1])
    return result


def _require_spline(result, what):
    spline = result["spline"]
    if not spline["exact"]:
        raise RegisterError(f"{what} needs the exact B-spline, but {spline['problem']}")
    return spline


def model_steps(result, what):
    """The map from the fixed to the moving model grid as steps (:func:`dirnet_tf.transforms.map_points_steps`).

    The served chain of a model of composed steps, else the one recovered
    B-spline (a RegisterError naming ``what`` when it is not exact).
    """
    if result.get("chain") is not None:
        return result["chain"]
    spline = _require_spline(result, what)
    return [{"kind": "spline", "control_points": spline["control_points"], "grid_spacing": spline["spacing"]}]


def map_points(model, result, points_fixed, kind="voxel", columns=None):
    """Map fixed voxel indices through the registration, evaluating the spline exactly.

    Parameters
    ----------
    points_fixed : array ``[P, ndim]``
        Voxel indices of the fixed image (ij order).
    kind : {'voxel', 'world'}
        Output coordinates: voxel indices of the moving image (ij order), or
        world RAS+ mm (``columns`` = 3 for a 2-D image gives x, y, z).

    Returns
    -------
    np.ndarray ``[P, columns]`` float64
        ``T_m(phi_1(... phi_n(q)))`` with ``q = T_f^-1(p_f)`` and the steps of
        :func:`model_steps` (one spline ``phi(q) = q + u(q)`` for an export
        without step outputs), each spline summed exactly
        (:func:`dirnet_tf.transforms.map_points_steps`), in moving voxels or
        moving RAS+ mm.
    """

    steps = model_steps(result, "--points")
    q = result["fixed_grid"].image_to_model_index(points_fixed)
    p_m = result["moving_grid"].model_to_image_index(transforms.map_points_steps(steps, q))
    if kind == "voxel":
        return p_m
    world = _world(rio.image_affine(result["moving_image"]), p_m, model.ndim)
    return world[:, : (columns or model.ndim)]


def model_affines(result):
    """4x4 voxel -> RAS+ mm affines of the fixed and the moving image's model grids."""
    return (rio.model_affine(rio.image_affine(result["fixed_image"]), result["fixed_grid"]),
            rio.model_affine(rio.image_affine(result["moving_image"]), result["moving_grid"]))


def itk_transforms(model, result):
    """``[A, T_1, ..., T_n]`` SimpleITK transforms (warp order, LPS mm): the geometry step, then the steps.

    ``A`` maps F's model grid to M's (identity when they coincide); ``T_k`` is
    step k on F's model grid (:func:`dirnet_tf.transforms.itk_step_transforms`:
    an ``AffineTransform`` or a ``BSplineTransform``).  As a ``CompositeTransform``
    (ITK applies the last transform first) it maps ``p -> A(T_1(... T_n(p)))``.
    """

    steps = model_steps(result, "--transform")
    fixed_model, moving_model = model_affines(result)
    return ([transforms.itk_affine_transform(np.eye(model.ndim + 1), fixed_model, moving_model)]
            + transforms.itk_step_transforms(steps, fixed_model, model.shape))


def elastix_parameters(model, result, path):
    """``[(path, text), ...]`` of ``--elastix_transform=path``: the file for transformix first, then its chain.

    The geometry step (when F's and M's model grids differ), then every step
    (:func:`dirnet_tf.transforms.elastix_step_parameters`), linked by
    :func:`register_io.elastix_chain` and named by :func:`elastix_paths`.
    """

    steps = model_steps(result, "--elastix_transform")
    fixed_model, moving_model = model_affines(result)
    texts = [transforms.elastix_step_parameters(step, fixed_model, model.shape, interpolation_order=1)
             for step in steps]
    geometry = not np.allclose(fixed_model, moving_model, rtol=0, atol=1e-9)
    if geometry:
        texts.insert(0, transforms.elastix_affine_parameters(np.eye(model.ndim + 1), fixed_model, model.shape,
                                                             moving_model, interpolation_order=1))
    paths = elastix_paths(path, len(steps), geometry, single=result.get("chain") is None)
    return list(zip(paths, rio.elastix_chain(texts, paths, rio.itk_grid(result["fixed_image"]))))


def elastix_paths(path, num_steps, geometry, single=False):
    """The files of ``--elastix_transform=E.txt``, the one given to transformix first.

    ``E.txt`` holds the geometry step when there is one, else the first step;
    step ``k`` of a model of composed steps is ``E.step<k>.txt`` (unless it is in
    ``E.txt``), the one recovered B-spline of an export without step outputs
    (``single``) ``E.bspline.txt``.  Each file's initial transform is the next.
    """
    base, ext = os.path.splitext(os.fspath(path))
    names = [f"{base}.bspline{ext}"] if single else [f"{base}.step{k}{ext}" for k in range(1, num_steps + 1)]
    return [os.fspath(path)] + (names if geometry else names[1:])


# --------------------------------------------------------------------------- #
# Pairs, checks, outputs
# --------------------------------------------------------------------------- #


def register(model, fixed_path, moving_path, moving_labels=None, points=None):
    """Register ``moving_path`` to ``fixed_path`` with ``model`` (an :class:`Export` or an export directory).

    Returns
    -------
    dict
        ``fixed``, ``moving`` (model inputs ``[*model_shape, C]``), ``warped``,
        ``displacement`` (served outputs on the model grid; model voxels, ij),
        and everything :func:`prepare` and :func:`finish` add (``image`` = W on
        the fixed grid, ``field``, ``field_fixed``, ``warped_labels``,
        ``points_moving``, ``spline``, ``chain``, ...).
    """
    model = model if isinstance(model, Export) else load_model(model)
    job = Job(fixed_path, moving_path, moving_labels=moving_labels, points=points)
    result = infer(model, [prepare(model, job)])[0]
    return finish(model, result)


def read_pairs(path):
    """Jobs of a ``--pairs`` CSV (paths relative to its folder)."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
            rows = list(reader)
    except (OSError, UnicodeDecodeError) as exc:
        raise RegisterError(f"cannot read --pairs={path}: {exc}") from exc
    if "fixed" not in columns or "moving" not in columns:
        raise RegisterError(f"--pairs={path}: the header row needs `fixed` and `moving` columns; found "
                            f"{list(columns)}")
    unknown = sorted(set(columns) - set(PAIR_COLUMNS) - {""})
    if unknown:
        raise RegisterError(f"--pairs={path}: unknown column(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(PAIR_COLUMNS)}")
    jobs = []
    for line, row in enumerate(rows, start=2):
        values = {name: (row.get(columns[name]) or "").strip() for name in PAIR_COLUMNS if name in columns}
        if not any(values.values()):
            continue
        resolved = {k: (v if os.path.isabs(v) else os.path.join(base, v)) if v else None for k, v in values.items()}
        jobs.append(Job(**resolved, where=f"{path}, line {line}"))
    if not jobs:
        raise RegisterError(f"--pairs={path} lists no pairs")
    return jobs


def check_jobs(jobs, model=None):
    """Fail early on what can be checked before reading images: missing names, output types, clashes.

    ``model`` (an :class:`Export`, when loaded) tells how many elastix files a chain has.
    """
    steps = model.steps if model is not None else None
    seen = {}
    for job in jobs:
        where = f" ({job.where})" if job.where else ""
        for name in ("fixed", "moving"):
            if not getattr(job, name):
                raise RegisterError(f"no {name} image{where}")
        for a, b in (("moving_labels", "out_labels"), ("points", "out_points")):
            if bool(getattr(job, a)) != bool(getattr(job, b)):
                given, missing = (a, b) if getattr(job, a) else (b, a)
                raise RegisterError(f"--{given} needs --{missing}{where}")
        outputs = job.outputs()
        if not outputs:
            raise RegisterError(f"nothing to write{where}: give --out or another output")
        for name, path in outputs.items():
            rio.output_extension(path, _OUTPUT_EXTENSIONS[name], name)
            rio.check_writable(path, name)
            targets = [path]
            if name == "elastix_transform":
                targets = elastix_paths(path, len(steps or [None]), True, single=steps is None)
            for target in targets:
                key = os.path.abspath(target)
                if key in seen:
                    raise RegisterError(f"--{name}={path}{where} is also written as --{seen[key]}; "
                                        "give every output its own file")
                seen[key] = name


def write_image(path, image):
    """Write ``[H, W, C]`` in ``[0, 1]`` as an 8-bit PNG (clipped) or as float32 ``.npy`` (exports without a grid)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".npy"):
        np.save(path, image.astype(np.float32))
        return
    from PIL import Image

    data = np.clip(np.rint(np.clip(image, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(data[..., 0] if data.shape[-1] == 1 else data).save(path)


def _save_figure(model, result, path):
    import matplotlib.pyplot as plt


    args = (result["fixed"], result["moving"], result["warped"], result["displacement"])
    if model.ndim == 2:
        fig = registration_figure(*(a[None] for a in args))
    else:
        fig = volume_figure(*args)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def write_outputs(model, job, result, staging):
    """Stage every output of one job (see :class:`register_io.Staging`); returns the target paths."""

    fixed = result["fixed_image"]
    written = []

    def stage(name, path, writer):
        written.append(staging.write(path, writer, name))

    if job.out:
        if model.grid is None:
            stage("out", job.out, lambda tmp: write_image(tmp, result["image"]))
        else:
            ext = rio.output_extension(job.out, rio.IMAGE_EXTENSIONS, "out")
            stage("out", job.out, lambda tmp: rio.write_array(tmp, result["image"], fixed, ext))
    if job.displacement:
        ext = rio.output_extension(job.displacement, rio.FIELD_EXTENSIONS, "displacement")
        field = result["field"] if ext == ".npy" else result["field_fixed"]
        stage("displacement", job.displacement, lambda tmp: rio.write_field(tmp, field, fixed, ext))
    if job.out_labels:
        ext = rio.output_extension(job.out_labels, rio.IMAGE_EXTENSIONS, "out_labels")
        stage("out_labels", job.out_labels,
              lambda tmp: rio.write_array(tmp, result["warped_labels"], fixed, ext, labels=True))
    if job.out_points:
        stage("out_points", job.out_points,
              lambda tmp: rio.write_points(tmp, result["points"], result["points_moving"]))
    if job.transform:
        stage("transform", job.transform,
              lambda tmp: transforms.write_itk_transform(tmp, itk_transforms(model, result)))
    if job.elastix_transform:
        try:
            files = elastix_parameters(model, result, job.elastix_transform)
        except RegisterError:
            raise
        except ValueError as exc:
            raise RegisterError(f"cannot write --elastix_transform={job.elastix_transform}: {exc}") from exc

        def text_writer(text):
            def write(tmp):
                with open(tmp, "w", encoding="ascii") as fh:
                    fh.write(text)
            return write

        for path, text in reversed(files):  # the chain's end first, the file for transformix last
            stage("elastix_transform", path, text_writer(text))
    if job.figure:
        stage("figure", job.figure, lambda tmp: _save_figure(model, result, tmp))
    return written


def _wanted(job):
    want = set()
    if job.out:
        want.add("image")
    if job.displacement:
        want.add("field" if job.displacement.lower().endswith(".npy") else "field_fixed")
    if job.out_labels:
        want.add("labels")
    if job.out_points:
        want.add("points")
    return want


def summary(result):
    """NCC before / after and the folding fraction (model grid) of one result."""

    return {"ncc_before": float(metrics.ncc(result["fixed"], result["moving"])),
            "ncc_after": float(metrics.ncc(result["fixed"], result["warped"])),
            "folding": float(metrics.folding_fraction(result["displacement"]))}


def run(model, jobs, batch_size=16):
    """Register every job and write its outputs; nothing is left behind unless all succeed.

    2-D pairs are run through the model ``batch_size`` at a time, 3-D pairs
    one at a time.  Returns one ``(job, summary dict, written paths)`` per job.
    """
    check_jobs(jobs, model)
    step = max(1, int(batch_size)) if model.ndim == 2 else 1
    staging = rio.Staging()
    done = []
    try:
        for start in range(0, len(jobs), step):
            chunk = jobs[start:start + step]
            prepared = []
            for job in chunk:
                try:
                    prepared.append(prepare(model, job))
                except RegisterError as exc:
                    raise RegisterError(f"{exc} ({job.where})" if job.where else str(exc)) from exc
            infer(model, prepared, batch_size=step)
            for job, result in zip(chunk, prepared):
                try:
                    finish(model, result, _wanted(job))
                    written = write_outputs(model, job, result, staging)
                except RegisterError as exc:
                    raise RegisterError(f"{exc} ({job.where})" if job.where else str(exc)) from exc
                done.append((job, summary(result), written))
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    return done


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.pairs:
        clash = [n for n in PAIR_COLUMNS if FLAGS[n].value]
        if clash:
            print("error: --pairs gives the pairs and their outputs as CSV columns; do not also give "
                  + ", ".join("--" + n for n in clash), file=sys.stderr)
            return 2
        missing = [] if FLAGS.model else ["model"]
    else:
        missing = [n for n in ("model", "fixed", "moving", "out") if not FLAGS[n].value]
    if missing:
        print("error: missing " + ", ".join("--" + n for n in missing), file=sys.stderr)
        return 2
    try:
        if FLAGS.pairs:
            jobs = read_pairs(FLAGS.pairs)
        else:
            jobs = [Job(**{n: FLAGS[n].value for n in PAIR_COLUMNS})]
        check_jobs(jobs)
        model = load_model(FLAGS.model)
        done = run(model, jobs, FLAGS.batch_size)
    except (ValueError, OSError, RuntimeError, ImportError) as exc:  # RegisterError, readers.InputError, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for job, s, written in done:
        prefix = "" if len(done) == 1 else f"{job.fixed} <- {job.moving}: "
        print(f"{prefix}NCC {s['ncc_before']:.4f} -> {s['ncc_after']:.4f}, folding {100 * s['folding']:.2f}% "
              f"of {'pixels' if model.ndim == 2 else 'voxels'}; wrote {', '.join(written)}")
    return 0


def entry(argv=None):
    """``python -m experiments.register``: parse the command line into :data:`FLAGS`, run :func:`main`."""
    argv = sys.argv if argv is None else argv
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(__doc__.split("\n\n")[0] + "\n\n" + FLAGS.get_help())
        return 0
    try:
        argv = FLAGS(argv)
    except flags.Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return main(argv)
    except app.UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
