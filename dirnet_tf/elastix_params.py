"""DIRNet results as elastix / transformix parameter files (text, numpy only).

No SimpleITK and no TensorFlow are needed: the files are plain text.  The
B-spline grid and its coefficients are those of the ITK export
(:func:`dirnet_tf.itk.itk_bspline_grid`), so an elastix file and an ITK
transform of the same result map every point alike.

Units and axes.  Inputs are in **voxels of the model grid, ij (array) order**
(control points, affine-step voxel maps, ``image_shape``) with the grid's voxel
-> **RAS+ mm** affine (4x4; 2-D also 3x3 in-plane).  Everything written is in
ITK physical space, **LPS+ mm**, along ITK's index axes ``x, y[, z]`` = array
axes ``i, j[, k]`` (the geometry of :mod:`dirnet_tf.itk`).

elastix works in ITK physical space (LPS for NIfTI files read through ITK).
Its ``BSplineTransform`` uses the same grid (``GridSize``, ``GridIndex``,
``GridOrigin`` = node of index 0, ``GridSpacing``) and the same coefficient
order as ITK, but writes ``Direction`` and ``GridDirection`` **column-major**
(``d00 d10 d01 d11``).  ``Size`` / ``Spacing`` / ``Origin`` / ``Direction``
describe the fixed image, i.e. the grid transformix resamples onto.  Its
``AffineTransform`` (:func:`elastix_affine_parameters`) maps ``p -> A (p - c) +
t + c`` with ``TransformParameters`` = ``A`` row-major then ``t``; we write
``c = 0``.  A file whose ``InitialTransformParametersFileName`` names another
(with ``HowToCombineTransforms "Compose"``) maps a point through that initial
transform first.

A model of composed steps gives one file per step
(:func:`elastix_step_parameters`, in the model's order); chained through their
initial transforms (the first file names the second, ...; :func:`elastix_chain`,
which also puts every file on the fixed image's own grid) they map a point
through the last step first, as the ITK composite of
:func:`dirnet_tf.itk.itk_step_transforms`.
"""

import os
import re

import numpy as np

from dirnet_tf.files import atomic_write
from dirnet_tf.itk import DEFAULT_MARGIN, itk_bspline_grid, lps_affine_parts, physical_affine_map
from dirnet_tf.spline_np import step_kind

__all__ = [
    "elastix_numbers",
    "elastix_transform_parameters",
    "elastix_affine_parameters",
    "elastix_step_parameters",
    "write_elastix_transform",
    "elastix_chain",
]


def elastix_numbers(values):
    """Floats as an elastix parameter-file value list (full precision, space-separated)."""
    return " ".join(repr(float(v)) for v in values)


def _ints(values):
    return " ".join(str(int(v)) for v in values)


def _interpolation_order(order):
    if isinstance(order, bool) or order not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"interpolation_order must be 0..5 (B-spline order), got {order!r}")


def _elastix_text(what, transform_lines, affine, image_shape, interpolation_order, default_pixel_value,
                  extra_lines=()):
    """An elastix parameter file: the transform, the fixed image (``affine``, ``image_shape``), resampling."""
    ndim = len(image_shape)
    linear, origin = lps_affine_parts(affine, ndim)
    spacing = np.linalg.norm(linear, axis=0)
    direction = (linear / spacing).ravel(order="F")  # elastix: column-major
    lines = [
        f"// {what} exported by dirnet_tf.elastix_params (physical space: ITK LPS mm).",
        *transform_lines,
        '(InitialTransformParameterFileName "NoInitialTransform")',
        '(InitialTransformParametersFileName "NoInitialTransform")',
        '(UseBinaryFormatForTransformationParameters "false")',
        '(HowToCombineTransforms "Compose")',
        "",
        "// Fixed image (the grid transformix resamples onto)",
        f"(FixedImageDimension {ndim})",
        f"(MovingImageDimension {ndim})",
        '(FixedInternalImagePixelType "float")',
        '(MovingInternalImagePixelType "float")',
        f"(Size {_ints(image_shape)})",
        f"(Index {_ints([0] * ndim)})",
        f"(Spacing {elastix_numbers(spacing)})",
        f"(Origin {elastix_numbers(origin)})",
        f"(Direction {elastix_numbers(direction)})",
        '(UseDirectionCosines "true")',
        "",
        *extra_lines,
        "// Resampling",
        '(Interpolator "BSplineInterpolator")',
        "(BSplineInterpolationOrder 1)",
        '(ResampleInterpolator "FinalBSplineInterpolator")',
        f"(FinalBSplineInterpolationOrder {int(interpolation_order)})",
        '(Resampler "DefaultResampler")',
        f"(DefaultPixelValue {repr(float(default_pixel_value))})",
        '(ResultImageFormat "nii")',
        '(ResultImagePixelType "float")',
        '(CompressResultImage "false")',
    ]
    return "\n".join(lines) + "\n"


def elastix_transform_parameters(control_points, grid_spacing, affine, image_shape,
                                 margin=DEFAULT_MARGIN, interpolation_order=1, default_pixel_value=0.0):
    """Text of an elastix ``TransformParameters.0.txt`` holding the DIRNet B-spline.

    Parameters
    ----------
    control_points : array_like ``[*K, ndim]`` (or ``[1, *K, ndim]``)
        Control-point displacements in voxels of the model grid, ij order.
    grid_spacing : int or sequence of int
        Control-point spacing in voxels of the model grid.
    affine : array_like
        The model grid's voxel -> RAS+ mm matrix (4x4; 2-D also 3x3 in-plane).
    image_shape : sequence of int
        Spatial shape of the fixed (model) grid in voxels, ij order -- the
        grid transformix resamples onto (``Size``; ITK x = array axis i).
    margin : int
        Zero control points added on each side (see :func:`dirnet_tf.itk.itk_bspline_transform`).
    interpolation_order : int
        ``FinalBSplineInterpolationOrder`` (0 to 5) used by transformix to
        resample the moving image: 1 = multilinear, as :func:`dirnet_tf.warp`
        (default); 3 = cubic B-spline (smoother, but near the border it
        mirrors the image); 0 = nearest neighbour (label maps).
    default_pixel_value : float
        Value of output voxels that map outside the moving image.

    Returns
    -------
    str
        The parameter file (elastix's ``(Key value ...)`` syntax).  All
        coordinates are ITK physical LPS mm; ``Direction`` and
        ``GridDirection`` are column-major, as elastix writes them.
    """
    if image_shape is None:
        raise ValueError("image_shape (the fixed grid, voxels ij) is required for an elastix transform")
    _interpolation_order(interpolation_order)
    grid = itk_bspline_grid(control_points, grid_spacing, affine, image_shape, margin)
    ndim = grid["ndim"]
    params = grid["parameters"]
    transform = ['(Transform "BSplineTransform")', f"(NumberOfParameters {params.size})",
                 f"(TransformParameters {elastix_numbers(params)})"]
    bspline_grid = [
        "// B-spline grid",
        f"(GridSize {_ints(grid['size'])})",
        f"(GridIndex {_ints([0] * ndim)})",
        f"(GridSpacing {elastix_numbers(grid['spacing'])})",
        f"(GridOrigin {elastix_numbers(grid['origin'])})",
        f"(GridDirection {elastix_numbers(grid['direction'].ravel(order='F'))})",
        "(BSplineTransformSplineOrder 3)",
        '(UseCyclicTransform "false")',
        "",
    ]
    return _elastix_text("DIRNet cubic B-spline", transform, affine, grid["image_shape"], interpolation_order,
                         default_pixel_value, bspline_grid)


def elastix_affine_parameters(matrix, affine, image_shape, moving_affine=None, interpolation_order=1,
                              default_pixel_value=0.0):
    """Text of an elastix ``AffineTransform`` parameter file of a voxel-space affine map.

    Parameters
    ----------
    matrix : array_like ``(ndim + 1, ndim + 1)``
        Homogeneous map from fixed voxel indices to moving voxel indices (ij),
        as for :func:`dirnet_tf.itk.itk_affine_transform` (e.g.
        :func:`dirnet_tf.spline_np.affine_step_matrix`).
    affine : array_like
        The fixed grid's voxel -> RAS+ mm matrix (4x4; 2-D also 3x3 in-plane).
    image_shape : sequence of int
        Spatial shape of the fixed grid (``Size``), voxels ij.
    moving_affine : array_like, optional
        The moving grid (default ``affine``).
    interpolation_order, default_pixel_value
        As for :func:`elastix_transform_parameters`.

    Returns
    -------
    str
        The parameter file: ``p -> A p + t`` in ITK LPS mm (``TransformParameters``
        = ``A`` row-major then ``t``, centre of rotation 0), the same map as
        :func:`dirnet_tf.itk.itk_affine_transform`.
    """
    _interpolation_order(interpolation_order)
    lin, offset = physical_affine_map(matrix, affine, moving_affine)
    ndim = len(offset)
    shape = tuple(int(n) for n in np.atleast_1d(image_shape))
    if len(shape) != ndim or min(shape) < 1:
        raise ValueError(f"image_shape {image_shape!r} must have {ndim} positive entries for a {ndim}-D matrix")
    params = np.concatenate([lin.ravel(), offset])
    transform = ['(Transform "AffineTransform")', f"(NumberOfParameters {params.size})",
                 f"(TransformParameters {elastix_numbers(params)})",
                 f"(CenterOfRotationPoint {elastix_numbers([0.0] * ndim)})"]
    return _elastix_text("Affine map", transform, affine, shape, interpolation_order, default_pixel_value)


def elastix_step_parameters(step, affine, image_shape, **kwargs):
    """The elastix parameter text of one step (:func:`elastix_affine_parameters` or
    :func:`elastix_transform_parameters`); ``kwargs`` go to either."""
    if step_kind(step) == "affine":
        return elastix_affine_parameters(step["matrix"], affine, image_shape, **kwargs)
    return elastix_transform_parameters(step["control_points"], step["grid_spacing"], affine, image_shape, **kwargs)


def write_elastix_transform(path, control_points, grid_spacing, affine, image_shape, **kwargs):
    """Write :func:`elastix_transform_parameters` to ``path`` atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Target file, usually ``TransformParameters.0.txt``.
    control_points, grid_spacing, affine, image_shape, **kwargs
        As for :func:`elastix_transform_parameters`.

    Returns
    -------
    str
        ``path``.
    """
    text = elastix_transform_parameters(control_points, grid_spacing, affine, image_shape, **kwargs)

    def write(tmp):
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(text)

    return atomic_write(path, write)


# --------------------------------------------------------------------------- #
# Chains of parameter files
# --------------------------------------------------------------------------- #


def _replace_line(text, key, value):
    pattern = re.compile(rf"^\({key} [^\n]*\)$", re.MULTILINE)
    if not pattern.search(text):
        raise RuntimeError(f"elastix parameter text has no ({key} ...) line")
    return pattern.sub(lambda _: f"({key} {value})", text)


def _fixed_grid_lines(text, grid):
    ndim = len(grid["size"])
    direction = np.reshape(grid["direction"], (ndim, ndim)).ravel(order="F")  # elastix: column-major
    text = _replace_line(text, "Size", _ints(grid["size"]))
    text = _replace_line(text, "Index", _ints([0] * ndim))
    text = _replace_line(text, "Spacing", elastix_numbers(grid["spacing"]))
    text = _replace_line(text, "Origin", elastix_numbers(grid["origin"]))
    return _replace_line(text, "Direction", elastix_numbers(direction))


def elastix_chain(texts, paths, fixed_grid):
    """Link elastix parameter files into one transformix chain on the fixed image's grid.

    Parameters
    ----------
    texts : list of str
        Parameter files (e.g. :func:`elastix_step_parameters` on the FIXED model grid) in
        warp order: ``texts[0]`` is the file given to transformix, and the initial transform
        of each file is the next one.  With ``HowToCombineTransforms Compose`` elastix maps a
        point through the initial transform first, so the chain is ``p -> T_0(T_1(...
        T_n(p)))`` -- the order of an ITK ``CompositeTransform`` of the same list.
    paths : list of str
        Where each text is written (``paths[0]``: the main file).  Each file records the
        absolute path of the next (transformix resolves relative names against its working
        directory, not the file's folder).
    fixed_grid : dict
        The ITK geometry of the grid transformix resamples onto (the fixed image as ITK reads
        it): ``size`` (voxels per ITK index axis), ``spacing`` (mm), ``origin`` (LPS mm),
        ``direction`` (row-major, columns = index axes in LPS), e.g.
        :func:`dirnet_tf.geometry.itk_grid`; it replaces ``Size`` / ``Index`` / ``Spacing`` /
        ``Origin`` / ``Direction`` of every text.

    Returns
    -------
    list of str
        The linked texts, one per path.
    """
    out = []
    for k, text in enumerate(texts):
        text = _fixed_grid_lines(text, fixed_grid)
        if k + 1 < len(texts):
            initial = '"' + os.path.abspath(paths[k + 1]) + '"'
            text = _replace_line(text, "InitialTransformParameterFileName", initial)
            text = _replace_line(text, "InitialTransformParametersFileName", initial)
        out.append(text)
    return out
