"""Export DIRNet B-spline results as transforms that ITK, SimpleITK and elastix open.

Needs numpy, plus SimpleITK for the ITK objects and files (an optional extra:
``pip install -e .[medical]``, imported only when used).  This module uses no
TensorFlow (importing the ``dirnet_tf`` package still loads it).

Geometry
--------
A DIRNet registration gives control points ``cp`` of shape ``[*K, ndim]`` in
**voxels of the model grid, ij (array) order** (component ``d`` moves along
array axis ``d``).  Control point ``k`` sits at voxel ``(k - 1) * s`` and the
displacement is

    ``u(x) = sum_k cp[k] prod_d beta3(x_d / s_d - k_d + 1)``

(:func:`dirnet_tf.bspline.bspline_displacement`), with ``warped(x) =
moving(x + u(x))``.  The spatial map ``phi(x) = x + u(x)`` therefore takes a
point of the FIXED image to the point of the MOVING image it is sampled from,
the direction in which ITK and elastix transforms work (``TransformPoint``
maps fixed physical points to moving physical points, and resampling pulls
moving intensities through it).  ``u`` is defined by the finite sum at every
point of space (it vanishes more than two grid spacings outside the grid).

World coordinates.  The model grid has a 4x4 ``affine`` mapping voxel indices
``(i, j, k, 1)`` to **RAS+ mm** (the NIfTI convention of
:class:`dirnet_tf.readers.Image`; ``GridTransform.model_affine()``).  ITK's
physical space is **LPS+ mm**: ``p_LPS = F p_RAS`` with ``F = diag(-1, -1, 1)``.
ITK image index ``(x, y, z)`` is taken equal to our ``(i, j, k)`` -- the
axis order ITK uses when it reads a NIfTI file whose nibabel array is
``[i, j, k]`` -- so ``SimpleITK.GetArrayFromImage`` returns the transposed
array ``[k, j, i]``.  Writing ``A`` for the linear part and ``t`` for the
translation of the affine, the ITK geometry of the grid is::

    p_LPS = L v + o,   L = F A,   o = F t           (v = voxel index, ij order)
    spacing[d] = |L[:, d]|,   direction = L / spacing (column d = axis d)
    origin = o

2-D images live in the in-plane ``(x, y)`` coordinates, as ITK reads a 2-D
NIfTI file: a 4x4 affine contributes its top-left 2x2 block and the first two
translation entries (its third row and column are ignored; the plane must be
axial, i.e. the in-plane axes must have no z component, otherwise a
``ValueError`` is raised because a 2-D ITK transform cannot represent an
oblique plane).  A 2-D affine may also be given as a 3x3 homogeneous matrix
mapping ``(i, j, 1)`` to in-plane RAS-like mm ``(x, y, 1)`` (x towards the
right, y anterior -- the same numbers as the top-left block of a 4x4); both
in-plane axes are then flipped, ``F = diag(-1, -1)``.

Displacements map through the linear part only: a voxel displacement ``dv``
is the physical displacement ``L dv`` (mm, LPS).

ITK's B-spline transform
------------------------
``itk::BSplineTransform`` (order 3) stores the FixedParameters
``[grid size (ndim), grid origin (ndim), grid spacing (ndim), grid direction
(ndim x ndim, row-major)]``: the coefficient grid is an image whose index
``n`` sits at ``origin + direction diag(spacing) n`` (LPS mm).  A point ``p``
is converted to its continuous grid index ``c`` and displaced by
``sum_n coef[n] prod_d beta3(c_d - n_d)`` -- the basis is centred on the grid
nodes, exactly our ``beta3(x_d / s_d - k_d + 1)`` when node ``n = k`` sits at
voxel ``(k - 1) s``.  Parameters are the coefficients of physical component 0
(LPS x) at all nodes, then component 1, ..., each flattened with grid axis 0
varying fastest.  ITK evaluates the sum only where ``1 <= c_d <= size_d - 2``
for every axis (all four supporting nodes inside the grid; elastix: ``1 <=
c_d < size_d - 2``) and returns the point unchanged elsewhere.  On our grid of
``K = ceil((N - 1) / s) + 3`` nodes per axis the image spans ``1 <= c_d <=
(N - 1) / s + 1 <= K - 2``: voxel 0 sits exactly on the lower limit (round-off
decides), and elastix leaves the last voxel unmoved when ``N - 1`` is a
multiple of ``s``.  The exported grid is therefore padded with ``margin``
zero coefficients on each side (default 3): zero coefficients change the sum
nowhere, and with 3 the exported transform equals ``phi`` at every point of
space (our sum vanishes where ITK stops evaluating it).  These facts were
verified numerically against SimpleITK and transformix
(``tests/test_transforms.py``).

Composite transforms
--------------------
An ITK ``CompositeTransform`` built from the list ``[T0, T1, ..., Tn]`` maps a
fixed point as ``T0(T1(...Tn(p)))``: the LAST transform is applied to the
point first.  Warping an image first by ``A`` and then the result by ``B``
gives ``m(phi_A(phi_B(x)))``, so the list ``[A, B]`` in *warp order* is
exactly the ITK list: :func:`write_itk_transform` keeps the order it is
given.  (An affine pre-alignment followed by a DIRNet B-spline is
``[affine, bspline]``.)  A DIRNet of composed steps (an affine step, then
B-spline steps; ``DIRNet.step_layout``) has the sampling map ``phi_1 o ... o
phi_n`` (:func:`dirnet_tf.warping.compose_displacements`), so its steps in the
model's order are already that list: :func:`itk_step_transforms` (ITK),
:func:`elastix_step_parameters` (elastix files, chained by their initial
transforms) and :func:`map_points_steps` (points, every spline summed exactly).
An affine step ``u(x) = M (x - c) + t`` about the grid centre ``c``
(:mod:`dirnet_tf.affine`) is the voxel map :func:`affine_step_matrix`.  When the moving image's model grid has its own
affine (each image of a pair is brought onto the model grid with its own
geometry), the moving voxel ``phi(x)`` lies at ``A_moving phi(x)``: the ITK
map is ``[itk_affine_transform(eye, affine, moving_affine), bspline]``
(:func:`map_points_world` takes the same ``moving_affine``).

elastix
-------
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
"""

import math
import os
import uuid

import numpy as np

from dirnet_tf.bspline import cubic_bspline

__all__ = [
    "DEFAULT_MARGIN",
    "itk_bspline_transform",
    "itk_affine_transform",
    "write_itk_transform",
    "displacement_field_image",
    "write_displacement_field",
    "elastix_transform_parameters",
    "write_elastix_transform",
    "spline_displacement_at",
    "map_points",
    "map_points_world",
    "itk_geometry",
    "affine_step_matrix",
    "elastix_affine_parameters",
    "map_points_steps",
    "itk_step_transforms",
    "elastix_step_parameters",
]

#: Default number of zero control points added on each side of the exported grid.
DEFAULT_MARGIN = 3
ITK_TRANSFORM_EXTENSIONS = (".tfm", ".txt", ".h5", ".hdf5")
FIELD_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".nrrd")
_INSTALL_HINT = "run `pip install -e .[medical]` (or `pip install SimpleITK`)"
_POINT_CHUNK = 65536  # points per block in spline_displacement_at (bounds memory)


def _import_sitk():
    try:
        import SimpleITK as sitk  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError(
            "Exporting ITK transforms needs SimpleITK, an optional extra of dirnet-tf: "
            f"{_INSTALL_HINT}."
        ) from exc
    return sitk


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #


def _spacing(grid_spacing, ndim):
    """Grid spacing as a tuple of ``ndim`` positive ints (voxels), like ``bspline.normalize_spacing``."""
    message = f"grid_spacing {grid_spacing!r} must be one positive int or {ndim} (one per axis, voxels)"
    values = np.atleast_1d(np.asarray(grid_spacing, dtype=object))
    if values.ndim != 1 or values.size not in (1, ndim):
        raise ValueError(message)
    if values.size == 1:
        values = np.repeat(values, ndim)
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(message) from None
        if isinstance(v, (bool, np.bool_)) or not np.isfinite(f) or f < 1 or f != int(f):
            raise ValueError(message)
        out.append(int(f))
    return tuple(out)


def _grid_shape(image_shape, spacing):
    """``K_d = ceil((N_d - 1) / s_d) + 3`` (the rule of ``bspline.control_grid_shape``)."""
    return tuple(int(math.ceil((n - 1) / s)) + 3 for n, s in zip(image_shape, spacing))


def _control_points(control_points, grid_spacing, image_shape=None):
    """Validate ``[*K, ndim]`` (or ``[1, *K, ndim]``) control points -> float64 array, spacing, shape."""
    cp = np.asarray(control_points, dtype=np.float64)
    shape = cp.shape
    if cp.ndim >= 2 and cp.ndim == cp.shape[-1] + 2 and cp.shape[0] == 1:
        cp = cp[0]  # one registration of a batch
    ndim = cp.shape[-1] if cp.ndim else 0
    if ndim not in (2, 3) or cp.ndim != ndim + 1:
        raise ValueError(
            f"control_points must have shape [*K, ndim] with ndim 2 or 3 (e.g. [K0, K1, 2] or "
            f"[K0, K1, K2, 3]; a leading batch axis of 1 is allowed), got {shape}"
        )
    if min(cp.shape[:-1]) < 1:
        raise ValueError(f"control_points of shape {shape} has an empty grid axis")
    if not np.all(np.isfinite(cp)):
        raise ValueError(f"control_points of shape {shape} contain non-finite values")
    spacing = _spacing(grid_spacing, ndim)
    if image_shape is not None:
        image_shape = tuple(int(n) for n in np.atleast_1d(image_shape))
        if len(image_shape) != ndim or min(image_shape) < 1:
            raise ValueError(
                f"image_shape {image_shape} must have {ndim} positive entries for control points of "
                f"shape {shape}"
            )
        expected = _grid_shape(image_shape, spacing)
        if tuple(cp.shape[:-1]) != expected:
            raise ValueError(
                f"control_points of shape {shape} do not fit image_shape {image_shape} with "
                f"grid_spacing {spacing}: expected [{', '.join(map(str, expected))}, {ndim}] "
                f"(K = ceil((N - 1) / s) + 3)"
            )
    return cp, spacing, image_shape


def _affine_parts(affine, ndim):
    """Voxel ij -> RAS mm as ``(linear [ndim, ndim], translation [ndim])``; see the module docstring."""
    a = np.asarray(affine, dtype=np.float64)
    if ndim == 3 and a.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 matrix (voxel ijk -> RAS mm) for 3-D control points, "
                         f"got shape {a.shape}")
    if ndim == 2 and a.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"affine must be a 4x4 matrix (voxel ij0 -> RAS mm) or a 3x3 in-plane "
                         f"homogeneous matrix for 2-D control points, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"affine of shape {a.shape} contains non-finite values")
    n = a.shape[0] - 1
    bottom = np.zeros(n + 1)
    bottom[-1] = 1.0
    if not np.allclose(a[-1], bottom):
        raise ValueError(f"affine of shape {a.shape} must end with the row {bottom.tolist()}, got {a[-1].tolist()}")
    linear = a[:ndim, :ndim].copy()
    translation = a[:ndim, n].copy()
    if ndim == 2 and n == 3:
        scale = np.abs(a[:3, :2]).max()
        if np.abs(a[2, :2]).max() > 1e-6 * max(scale, 1e-300):
            raise ValueError(
                "affine: the 2-D image's axes have a z component (oblique or non-axial plane: "
                f"column i {a[:3, 0].tolist()}, column j {a[:3, 1].tolist()}); a 2-D ITK transform "
                "lives in the x-y plane -- pass a 3x3 in-plane affine instead"
            )
    det = np.linalg.det(linear)
    if not abs(det) > 1e-12 * max(np.abs(linear).max(), 1e-300) ** ndim:
        raise ValueError(f"affine of shape {a.shape} has a singular linear part {linear.tolist()}")
    return linear, translation


def _lps_flip(ndim):
    return np.diag([-1.0, -1.0, 1.0][:ndim])


def _lps_parts(affine, ndim):
    """Voxel ij -> ITK physical LPS mm as ``(L [ndim, ndim], o [ndim])``."""
    linear, translation = _affine_parts(affine, ndim)
    flip = _lps_flip(ndim)
    return flip @ linear, flip @ translation


def itk_geometry(affine, ndim=None):
    """ITK image geometry of a grid (what SimpleITK reports for it).

    Parameters
    ----------
    affine : array_like
        4x4 voxel ``(i, j, k, 1)`` -> RAS+ mm (2-D: ``k = 0``), or for 2-D a
        3x3 in-plane homogeneous matrix (see the module docstring).
    ndim : int, optional
        2 or 3 spatial axes; default 2 for a 3x3 affine, 3 for a 4x4 one
        (a 2-D grid with a 4x4 affine needs ``ndim=2``).

    Returns
    -------
    dict
        ``origin`` (LPS mm, ITK x, y[, z] order), ``spacing`` (mm per ITK
        index axis = per array axis i, j[, k]), ``direction`` (row-major
        ``ndim x ndim`` tuple, columns = directions of the index axes in
        LPS), as tuples of float ready for ``SetOrigin`` / ``SetSpacing`` /
        ``SetDirection``.
    """
    if ndim is None:
        ndim = 2 if np.shape(affine) == (3, 3) else 3
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    linear, origin = _lps_parts(affine, ndim)
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    return {"origin": tuple(float(v) for v in origin),
            "spacing": tuple(float(v) for v in spacing),
            "direction": tuple(float(v) for v in direction.ravel())}


def _margin(margin):
    message = f"margin must be a non-negative int (control points), got {margin!r}"
    if isinstance(margin, (bool, np.bool_)):
        raise ValueError(message)
    try:
        value = int(margin)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if value != margin or value < 0:
        raise ValueError(message)
    return value


def _bspline_grid(control_points, grid_spacing, affine, image_shape, margin):
    """Everything ITK and elastix need: grid size/origin/spacing/direction and LPS coefficients."""
    cp, spacing, image_shape = _control_points(control_points, grid_spacing, image_shape)
    ndim = cp.shape[-1]
    margin = _margin(margin)
    linear, origin = _lps_parts(affine, ndim)
    voxel_size = np.linalg.norm(linear, axis=0)
    direction = linear / voxel_size
    s = np.asarray(spacing, dtype=np.float64)
    # Node n of the padded grid is our control point k = n - margin, at voxel (n - margin - 1) s.
    grid_origin = linear @ (-(margin + 1.0) * s) + origin
    grid_spacing_mm = s * voxel_size
    coef = cp @ linear.T  # mm, LPS components
    coef = np.pad(coef, [(margin, margin)] * ndim + [(0, 0)])
    size = tuple(int(n) for n in coef.shape[:-1])
    # ITK order: component by component, grid axis 0 (= array axis i = ITK x) fastest.
    params = np.concatenate([coef[..., c].ravel(order="F") for c in range(ndim)])
    return {"ndim": ndim, "size": size, "origin": grid_origin, "spacing": grid_spacing_mm,
            "direction": direction, "parameters": params, "image_shape": image_shape,
            "image_origin": origin, "image_spacing": voxel_size}


# --------------------------------------------------------------------------- #
# ITK transforms
# --------------------------------------------------------------------------- #


def itk_bspline_transform(control_points, grid_spacing, affine, image_shape=None, margin=DEFAULT_MARGIN):
    """The DIRNet B-spline as a ``SimpleITK.BSplineTransform`` (order 3) in LPS mm.

    Parameters
    ----------
    control_points : array_like ``[*K, ndim]`` (or ``[1, *K, ndim]``)
        Control-point displacements in **voxels of the model grid, ij order**.
    grid_spacing : int or sequence of int
        Control-point spacing in voxels of the model grid, per array axis.
    affine : array_like
        The model grid's 4x4 voxel ``(i, j, k, 1)`` -> RAS+ mm matrix (2-D:
        4x4 with ``k = 0``, axial plane, or a 3x3 in-plane matrix).  Both
        fixed and moving image are on this grid.
    image_shape : sequence of int, optional
        Spatial shape of the model grid (voxels, ij order); when given, the
        control grid is checked against it.
    margin : int
        Zero control points added on each side (default 3: the ITK
        transform then equals our map at every point of space; 1 covers the
        image plus one grid spacing; 0 keeps our grid, and whether ITK moves
        voxel 0 then depends on round-off -- elastix also leaves the last
        voxel unmoved when ``(N - 1) % s == 0``).

    Returns
    -------
    SimpleITK.BSplineTransform
        Maps fixed LPS points (mm) to moving LPS points (mm):
        ``T(p) = p + L u(L^-1 (p - o))`` with ``L``, ``o`` the grid's voxel ->
        LPS geometry.  Its coefficients are displacements in mm along the LPS
        axes (``c_mm = L c_voxel``).

    Raises
    ------
    ValueError
        Control points of a wrong shape (for ``image_shape``), an affine that
        is not 4x4 (3-D) / 4x4 or 3x3 (2-D), singular or oblique in 2-D.
    ImportError
        Without SimpleITK (``pip install -e .[medical]``).
    """
    grid = _bspline_grid(control_points, grid_spacing, affine, image_shape, margin)
    sitk = _import_sitk()
    transform = sitk.BSplineTransform(grid["ndim"], 3)
    fixed = (list(map(float, grid["size"])) + grid["origin"].tolist() + grid["spacing"].tolist()
             + grid["direction"].ravel().tolist())  # direction row-major
    transform.SetFixedParameters(fixed)
    transform.SetParameters(grid["parameters"].tolist())
    return transform


def itk_affine_transform(matrix, affine, moving_affine=None):
    """A voxel-space affine map as a ``SimpleITK.AffineTransform`` in LPS mm.

    Parameters
    ----------
    matrix : array_like ``(ndim + 1, ndim + 1)``
        Homogeneous map from FIXED voxel indices (ij order) to MOVING voxel
        indices (ij order), the same direction as our displacements
        (``warped(x) = moving(matrix @ x)``).  The identity with a
        ``moving_affine`` gives the map between two grids.
    affine : array_like
        Fixed grid: 4x4 voxel -> RAS+ mm (2-D: 4x4 axial or 3x3 in-plane).
    moving_affine : array_like, optional
        Moving grid, same format; default ``affine`` (same grid).

    Returns
    -------
    SimpleITK.AffineTransform
        Fixed LPS mm -> moving LPS mm: ``p -> L_m (M L_f^-1 (p - o_f) + b) + o_m``
        (centre 0).
    """
    lin, offset = _physical_affine(matrix, affine, moving_affine)
    sitk = _import_sitk()
    transform = sitk.AffineTransform(len(offset))
    transform.SetMatrix(lin.ravel().tolist())
    transform.SetTranslation(offset.tolist())
    return transform


def _homogeneous(matrix):
    """Validate a 3x3 (2-D) or 4x4 (3-D) homogeneous voxel map -> float64 array."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] not in (3, 4):
        raise ValueError(f"matrix must be a 3x3 (2-D) or 4x4 (3-D) homogeneous voxel map, got shape {m.shape}")
    ndim = m.shape[0] - 1
    if not np.allclose(m[-1], np.eye(ndim + 1)[-1]):
        raise ValueError(f"matrix of shape {m.shape} must end with the row {np.eye(ndim + 1)[-1].tolist()}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"matrix of shape {m.shape} contains non-finite values")
    return m


def _physical_affine(matrix, affine, moving_affine=None):
    """A homogeneous voxel map as ``(linear, offset)`` of fixed LPS mm -> moving LPS mm."""
    m = _homogeneous(matrix)
    ndim = m.shape[0] - 1
    lin_f, o_f = _lps_parts(affine, ndim)
    lin_m, o_m = _lps_parts(affine if moving_affine is None else moving_affine, ndim)
    inv_f = np.linalg.inv(lin_f)
    lin = lin_m @ m[:ndim, :ndim] @ inv_f
    return lin, lin_m @ (m[:ndim, ndim] - m[:ndim, :ndim] @ inv_f @ o_f) + o_m


def affine_step_matrix(params, image_shape):
    """The homogeneous voxel map of an affine step of a DIRNet (:mod:`dirnet_tf.affine`).

    Parameters
    ----------
    params : array_like ``[ndim * (ndim + 1)]`` (or ``[1, ndim * (ndim + 1)]``)
        Row-major ``M`` then ``t`` (voxels), ij order, as
        :func:`dirnet_tf.affine.affine_displacement` takes them.
    image_shape : sequence of int
        The model grid; its centre ``c = (N - 1) / 2`` is the centre of ``M``.

    Returns
    -------
    np.ndarray ``(ndim + 1, ndim + 1)`` float64
        ``x -> x + M (x - c) + t`` (model voxels, ij), for :func:`itk_affine_transform`
        and :func:`elastix_affine_parameters`.
    """
    shape = tuple(int(n) for n in np.atleast_1d(image_shape))
    ndim = len(shape)
    p = np.asarray(params, dtype=np.float64)
    if p.ndim == 2 and p.shape[0] == 1:
        p = p[0]
    if ndim not in (2, 3) or p.shape != (ndim * (ndim + 1),) or not np.all(np.isfinite(p)):
        raise ValueError(f"affine step parameters must be {ndim * (ndim + 1)} finite numbers (M row-major, "
                         f"then t) for image_shape {shape}, got shape {np.shape(params)}")
    m = p[: ndim * ndim].reshape(ndim, ndim)
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    out = np.eye(ndim + 1)
    out[:ndim, :ndim] += m
    out[:ndim, ndim] = p[ndim * ndim:] - m @ centre
    return out


def file_extension(path, allowed, what):
    """The (lower-case) extension of ``path`` among ``allowed`` (longest first), else ValueError."""
    name = os.fspath(path).lower()
    for ext in sorted(allowed, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    raise ValueError(f"{os.fspath(path)}: {what} must end with one of {', '.join(allowed)}")


def _atomic_write(path, ext, write):
    """Call ``write(tmp)`` on a temporary name in the target directory, then ``os.replace`` it to ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)[: -len(ext)] if ext else os.path.basename(path)
    # The temporary name keeps the extension: ITK chooses the file format from it.
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex}.tmp{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _flatten_transforms(sitk, transforms):
    if isinstance(transforms, sitk.Transform):
        transforms = [transforms]
    try:
        items = list(transforms)
    except TypeError:
        raise ValueError(f"transforms must be a SimpleITK.Transform or a sequence of them, "
                         f"got {type(transforms).__name__}") from None
    flat = []
    for t in items:
        if not isinstance(t, sitk.Transform):
            raise ValueError(f"transforms must be SimpleITK.Transform objects, got {type(t).__name__}")
        if isinstance(t, sitk.CompositeTransform):
            flat.extend(t.GetNthTransform(n) for n in range(t.GetNumberOfTransforms()))
        else:
            flat.append(t)
    if not flat:
        raise ValueError("transforms is empty: give at least one SimpleITK.Transform")
    dims = {t.GetDimension() for t in flat}
    if len(dims) != 1:
        raise ValueError(f"transforms mix dimensions {sorted(dims)}; a composite needs one dimension")
    return flat


def write_itk_transform(path, transforms):
    """Write one ITK transform, or several as a ``CompositeTransform``, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        ``.tfm`` / ``.txt`` (ITK text, full double precision) or ``.h5`` /
        ``.hdf5`` (ITK HDF5).  Written under a temporary name in the same
        directory and renamed, so readers never see a partial file and a
        failed write leaves an existing file untouched.
    transforms : SimpleITK.Transform or sequence of them
        Several transforms are listed in **warp order** (first warp first):
        ``[A, B]`` means "warp by A, then warp the result by B", i.e. the
        point map ``p -> A(B(p))``, which is exactly how ITK applies the
        composite ``[A, B]`` (last transform first).  Nested composites are
        flattened in the same order.

    Returns
    -------
    str
        ``path``.
    """
    ext = file_extension(path, ITK_TRANSFORM_EXTENSIONS, "an ITK transform file")
    sitk = _import_sitk()
    flat = _flatten_transforms(sitk, transforms)
    transform = flat[0] if len(flat) == 1 else sitk.CompositeTransform(flat)
    return _atomic_write(path, ext, lambda tmp: sitk.WriteTransform(transform, tmp))


# --------------------------------------------------------------------------- #
# Dense displacement fields
# --------------------------------------------------------------------------- #


def displacement_field_image(displacement, affine):
    """A dense voxel displacement as an ITK displacement-field image (LPS mm).

    Parameters
    ----------
    displacement : array_like ``[*shape, ndim]`` (or ``[1, *shape, ndim]``)
        Displacement at every voxel of the fixed (model) grid, in **voxels,
        ij order** (e.g. ``bspline_displacement(cp[None], shape, s)[0]``).
    affine : array_like
        The grid's voxel -> RAS+ mm matrix (4x4; 2-D also 3x3 in-plane).

    Returns
    -------
    SimpleITK.Image
        ``sitkVectorFloat64``, size ``shape`` (ITK x = array axis i), origin /
        spacing / direction of the grid (:func:`itk_geometry`), pixel =
        displacement in mm along the LPS axes (``L u``).  Accepted as is by
        ``SimpleITK.DisplacementFieldTransform`` (``T(p) = p + field(p)``).
    """
    d = np.asarray(displacement, dtype=np.float64)
    if d.ndim >= 3 and d.ndim == d.shape[-1] + 2 and d.shape[0] == 1:
        d = d[0]
    ndim = d.shape[-1] if d.ndim else 0
    if ndim not in (2, 3) or d.ndim != ndim + 1:
        raise ValueError(f"displacement must have shape [*spatial, ndim] with ndim 2 or 3 "
                         f"(e.g. [H, W, 2] or [D, H, W, 3]), got {np.shape(displacement)}")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"displacement of shape {np.shape(displacement)} contains non-finite values")
    linear, _ = _lps_parts(affine, ndim)
    geometry = itk_geometry(affine, ndim)
    physical = d @ linear.T
    # GetImageFromArray reads [z, y, x, component]: reverse the spatial axes.
    order = list(range(ndim))[::-1] + [ndim]
    sitk = _import_sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(physical.transpose(order)), isVector=True)
    image.SetOrigin(geometry["origin"])
    image.SetSpacing(geometry["spacing"])
    image.SetDirection(geometry["direction"])
    return image


def write_displacement_field(path, displacement, affine):
    """Write :func:`displacement_field_image` to ``.nii.gz`` / ``.nii`` / ``.mha`` / ``.nrrd`` atomically.

    ``.mha`` and ``.nrrd`` keep the geometry in double precision and accept
    any (also sheared) affine; NIfTI stores it in float32 (about 1e-7
    relative) and needs orthogonal voxel axes (a ``ValueError`` otherwise).

    The vectors are stored as ITK holds them: mm along the **LPS** axes (the
    convention of ITK/ANTs displacement fields, also in NIfTI files, whose
    header geometry is RAS as usual).  Read it back with
    ``SimpleITK.DisplacementFieldTransform(SimpleITK.ReadImage(path,
    SimpleITK.sitkVectorFloat64))``.

    Parameters
    ----------
    path : str or os.PathLike
        Target file.
    displacement, affine
        As for :func:`displacement_field_image` (voxels ij; voxel -> RAS mm).

    Returns
    -------
    str
        ``path``.
    """
    ext = file_extension(path, FIELD_EXTENSIONS, "a displacement field file")
    image = displacement_field_image(displacement, affine)
    direction = np.reshape(image.GetDirection(), (image.GetDimension(),) * 2)
    if ext in (".nii", ".nii.gz") and not np.allclose(direction.T @ direction, np.eye(len(direction)),
                                                      atol=1e-6):
        raise ValueError(f"{os.fspath(path)}: the affine's voxel axes are not orthogonal (sheared grid); "
                         "NIfTI cannot store that geometry (ITK would silently coerce it) -- "
                         "write .mha or .nrrd instead")
    sitk = _import_sitk()
    return _atomic_write(path, ext, lambda tmp: sitk.WriteImage(image, tmp))


# --------------------------------------------------------------------------- #
# elastix
# --------------------------------------------------------------------------- #


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
        Zero control points added on each side (see :func:`itk_bspline_transform`).
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
    grid = _bspline_grid(control_points, grid_spacing, affine, image_shape, margin)
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
        as for :func:`itk_affine_transform` (e.g. :func:`affine_step_matrix`).
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
        :func:`itk_affine_transform`.
    """
    _interpolation_order(interpolation_order)
    lin, offset = _physical_affine(matrix, affine, moving_affine)
    ndim = len(offset)
    shape = tuple(int(n) for n in np.atleast_1d(image_shape))
    if len(shape) != ndim or min(shape) < 1:
        raise ValueError(f"image_shape {image_shape!r} must have {ndim} positive entries for a {ndim}-D matrix")
    params = np.concatenate([lin.ravel(), offset])
    transform = ['(Transform "AffineTransform")', f"(NumberOfParameters {params.size})",
                 f"(TransformParameters {elastix_numbers(params)})",
                 f"(CenterOfRotationPoint {elastix_numbers([0.0] * ndim)})"]
    return _elastix_text("Affine map", transform, affine, shape, interpolation_order, default_pixel_value)


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
    linear, origin = _lps_parts(affine, ndim)
    spacing = np.linalg.norm(linear, axis=0)
    direction = (linear / spacing).ravel(order="F")  # elastix: column-major
    lines = [
        f"// {what} exported by dirnet_tf.transforms (physical space: ITK LPS mm).",
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

    return _atomic_write(path, "", write)


# --------------------------------------------------------------------------- #
# Exact evaluation at points
# --------------------------------------------------------------------------- #


def spline_displacement_at(control_points, grid_spacing, points_ij):
    """The B-spline displacement ``u`` evaluated exactly at arbitrary points.

    Parameters
    ----------
    control_points : array_like ``[*K, ndim]`` (or ``[1, *K, ndim]``)
        Control-point displacements in voxels of the model grid, ij order.
    grid_spacing : int or sequence of int
        Control-point spacing in voxels.
    points_ij : array_like ``(..., ndim)``
        Points in (fractional) voxel coordinates of the model grid, ij order;
        any position, inside or outside the image.

    Returns
    -------
    np.ndarray ``(..., ndim)``, float64
        ``u(x) = sum_k cp[k] prod_d beta3(x_d / s_d - k_d + 1)`` in voxels,
        ij order: the sum over the (at most) 4 control points per axis whose
        basis functions are non-zero at ``x`` -- no interpolation of a dense
        field; control points beyond the grid count as zero.
    """
    cp, spacing, _ = _control_points(control_points, grid_spacing)
    ndim = cp.shape[-1]
    pts = np.asarray(points_ij, dtype=np.float64)
    if pts.ndim < 1 or pts.shape[-1] != ndim:
        raise ValueError(f"points_ij must have shape (..., {ndim}) for control points of shape "
                         f"{np.shape(control_points)}, got {pts.shape}")
    flat = pts.reshape(-1, ndim)
    out = np.empty_like(flat)
    grid = np.asarray(cp.shape[:-1])
    offsets = np.arange(4)
    for start in range(0, len(flat), _POINT_CHUNK):
        block = flat[start:start + _POINT_CHUNK]
        idx, weights = [], []
        for d in range(ndim):
            t = block[:, d] / spacing[d] + 1.0  # continuous control-grid index
            k = np.floor(t).astype(np.int64)[:, None] - 1 + offsets  # the 4 supporting nodes
            w = cubic_bspline(t[:, None] - k)
            inside = (k >= 0) & (k < grid[d])
            weights.append(np.where(inside, w, 0.0))
            idx.append(np.clip(k, 0, grid[d] - 1))
        if ndim == 2:
            values = cp[idx[0][:, :, None], idx[1][:, None, :]]  # (P, 4, 4, 2)
            out[start:start + len(block)] = np.einsum("pa,pb,pabc->pc", weights[0], weights[1], values)
        else:
            values = cp[idx[0][:, :, None, None], idx[1][:, None, :, None], idx[2][:, None, None, :]]
            out[start:start + len(block)] = np.einsum("pa,pb,pe,pabec->pc", weights[0], weights[1],
                                                      weights[2], values)
    return out.reshape(pts.shape)


def map_points(control_points, grid_spacing, points_ij):
    """The spatial map ``phi(x) = x + u(x)`` at arbitrary points (fixed voxel -> moving voxel).

    Parameters
    ----------
    control_points : array_like ``[*K, ndim]`` (or ``[1, *K, ndim]``)
        Control-point displacements in voxels of the model grid, ij order.
    grid_spacing : int or sequence of int
        Control-point spacing in voxels.
    points_ij : array_like ``(..., ndim)``
        Fixed-image points in (fractional) voxel coordinates, ij order.

    Returns
    -------
    np.ndarray ``(..., ndim)``, float64
        The moving-image points, voxels, ij order (exact spline sum, see
        :func:`spline_displacement_at`).
    """
    pts = np.asarray(points_ij, dtype=np.float64)
    return pts + spline_displacement_at(control_points, grid_spacing, pts)


def map_points_world(control_points, grid_spacing, affine, points_ras_mm, moving_affine=None):
    """The registration's point map in world coordinates: fixed RAS+ mm -> moving RAS+ mm.

    This is the convention of ``transformix -def`` (input points in the fixed
    image, output points in the moving image), expressed in RAS instead of
    ITK's LPS.

    Parameters
    ----------
    control_points : array_like ``[*K, ndim]`` (or ``[1, *K, ndim]``)
        Control-point displacements in voxels of the model grid, ij order.
    grid_spacing : int or sequence of int
        Control-point spacing in voxels.
    affine : array_like
        Fixed model grid: 4x4 voxel -> RAS+ mm (2-D: 4x4 axial or 3x3 in-plane).
    points_ras_mm : array_like ``(..., ndim)``
        Fixed points in RAS+ mm.  For 2-D: in-plane ``(x, y)``, or ``(x, y, z)``
        with a 4x4 affine (``z`` is passed through unchanged).
    moving_affine : array_like, optional
        The moving image's model grid, when it differs from the fixed one
        (each image of a pair brought onto the model grid with its own
        geometry): the moving voxel ``phi(x)`` is placed with this affine.
        Default: ``affine``.

    Returns
    -------
    np.ndarray, same shape as ``points_ras_mm``, float64
        Moving points in RAS+ mm.
    """
    cp, spacing, _ = _control_points(control_points, grid_spacing)
    ndim = cp.shape[-1]
    pts = np.asarray(points_ras_mm, dtype=np.float64)
    three_in_two = ndim == 2 and pts.ndim >= 1 and pts.shape[-1] == 3 and np.shape(affine) == (4, 4)
    if pts.ndim < 1 or (pts.shape[-1] != ndim and not three_in_two):
        raise ValueError(f"points_ras_mm must have shape (..., {ndim}) for {ndim}-D control points, "
                         f"got {pts.shape}")
    lin_f, t_f = _affine_parts(affine, ndim)
    lin_m, t_m = _affine_parts(affine if moving_affine is None else moving_affine, ndim)
    planar = pts[..., :ndim]
    voxels = np.linalg.solve(lin_f, (planar - t_f).reshape(-1, ndim).T).T
    moved = map_points(cp, spacing, voxels) @ lin_m.T + t_m
    out = pts.copy()
    out[..., :ndim] = moved.reshape(planar.shape)
    return out


# --------------------------------------------------------------------------- #
# Chains of composed steps
# --------------------------------------------------------------------------- #


def _step(step):
    """Validate one step of a chain: ``{"kind": "affine", "matrix"}`` or ``{"kind": "spline", ...}``."""
    kind = step.get("kind") if isinstance(step, dict) else None
    if kind == "affine" and "matrix" in step:
        return kind
    if kind == "spline" and "control_points" in step and "grid_spacing" in step:
        return kind
    raise ValueError(f"a step must be {{'kind': 'affine', 'matrix': ...}} or {{'kind': 'spline', "
                     f"'control_points': ..., 'grid_spacing': ...}}, got {step!r:.200}")


def map_points_steps(steps, points_ij):
    """The composed map ``phi_1(phi_2(... phi_n(x)))`` of a chain of steps at arbitrary points.

    Parameters
    ----------
    steps : sequence of dict
        In the order a model of composed steps predicts them (``DIRNet.step_layout``):
        ``{"kind": "affine", "matrix": (ndim + 1, ndim + 1)}`` (a homogeneous voxel
        map, e.g. :func:`affine_step_matrix`) or ``{"kind": "spline",
        "control_points": [*K, ndim], "grid_spacing": s}`` (``phi(x) = x + u(x)``,
        :func:`map_points`), all in voxels of one model grid, ij order.  The LAST
        step is applied to a fixed point first (the composition of
        :func:`dirnet_tf.warping.compose_displacements`).
    points_ij : array_like ``(..., ndim)``
        Fixed points, (fractional) voxels of the model grid, ij order.

    Returns
    -------
    np.ndarray ``(..., ndim)`` float64
        Moving points: every spline summed exactly at the point the later steps
        moved it to (no interpolation of a dense field).
    """
    x = np.asarray(points_ij, dtype=np.float64)
    for step in reversed(list(steps)):
        if _step(step) == "affine":
            m = _homogeneous(step["matrix"])
            x = x @ m[:-1, :-1].T + m[:-1, -1]
        else:
            x = map_points(step["control_points"], step["grid_spacing"], x)
    return x


def itk_step_transforms(steps, affine, image_shape=None, margin=DEFAULT_MARGIN):
    """One SimpleITK transform per step (LPS mm), in warp order: ``[T_1, ..., T_n]``.

    Parameters
    ----------
    steps : sequence of dict
        As for :func:`map_points_steps`.
    affine : array_like
        The model grid's voxel -> RAS+ mm matrix, as for :func:`itk_bspline_transform`.
    image_shape, margin
        As for :func:`itk_bspline_transform`.

    Returns
    -------
    list of SimpleITK.Transform
        ``AffineTransform`` (:func:`itk_affine_transform`) or ``BSplineTransform``
        (:func:`itk_bspline_transform`) per step, in the order of ``steps``: as an
        ITK ``CompositeTransform`` (:func:`write_itk_transform`) it maps ``p ->
        T_1(T_2(... T_n(p)))`` -- ITK applies the last transform first, as the chain.
    """
    out = []
    for step in steps:
        if _step(step) == "affine":
            out.append(itk_affine_transform(step["matrix"], affine))
        else:
            out.append(itk_bspline_transform(step["control_points"], step["grid_spacing"], affine, image_shape,
                                             margin))
    return out


def elastix_step_parameters(step, affine, image_shape, **kwargs):
    """The elastix parameter text of one step (:func:`elastix_affine_parameters` or
    :func:`elastix_transform_parameters`); ``kwargs`` go to either."""
    if _step(step) == "affine":
        return elastix_affine_parameters(step["matrix"], affine, image_shape, **kwargs)
    return elastix_transform_parameters(step["control_points"], step["grid_spacing"], affine, image_shape, **kwargs)
