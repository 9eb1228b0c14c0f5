"""ITK geometry of DIRNet grids, and DIRNet results as ITK transforms (SimpleITK objects and files).

Needs numpy, plus SimpleITK for the transform objects and files (an optional
extra: ``pip install -e .[medical]``, imported only when used,
:func:`import_simpleitk`).  This module uses no TensorFlow.  Displacement-field
images are :mod:`dirnet_tf.field_images`, elastix parameter files
:mod:`dirnet_tf.elastix_params`, and the voxel-space spline itself
:mod:`dirnet_tf.spline_np`.

Units and axes, in short: control points, displacements and voxel maps come in
**voxels of the model grid, ij (array) order**; affines map voxel indices to
**RAS+ mm**; everything ITK holds is **LPS+ mm** along ITK's ``x, y[, z]``
index axes (= array axes ``i, j[, k]``).

Geometry
--------
A DIRNet registration gives control points ``cp`` of shape ``[*K, ndim]`` in
**voxels of the model grid, ij (array) order** (component ``d`` moves along
array axis ``d``).  Control point ``k`` sits at voxel ``(k - 1) * s`` and the
displacement is

    ``u(x) = sum_k cp[k] prod_d beta3(x_d / s_d - k_d + 1)``

(:func:`dirnet_tf.spline_np.spline_displacement_at`, :func:`dirnet_tf.bspline.bspline_displacement`), with ``warped(x) =
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
(``tests/test_itk.py``, ``tests/test_elastix_params.py``).

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
:func:`dirnet_tf.elastix_params.elastix_step_parameters` (elastix files, chained by their initial
transforms) and :func:`dirnet_tf.spline_np.map_points_chain` (points, every spline summed exactly).
An affine step ``u(x) = M (x - c) + t`` about the grid centre ``c``
(:mod:`dirnet_tf.affine`) is the voxel map
:func:`dirnet_tf.spline_np.affine_step_matrix`.  When the moving image's model grid has its
own affine (each image of a pair is brought onto the model grid with its own
geometry), the moving voxel ``phi(x)`` lies at ``A_moving phi(x)``: the ITK
map is ``[itk_affine_transform(eye, affine, moving_affine), bspline]``
(:func:`map_points_world` takes the same ``moving_affine``).
"""

import numpy as np

from dirnet_tf.files import atomic_write, file_extension
from dirnet_tf.spline_np import control_points_array, homogeneous_matrix, map_points_bspline, step_kind

__all__ = [
    "DEFAULT_MARGIN",
    "ITK_TRANSFORM_EXTENSIONS",
    "import_simpleitk",
    "ras_affine_parts",
    "lps_affine_parts",
    "itk_geometry",
    "map_points_world",
    "itk_bspline_grid",
    "itk_bspline_transform",
    "physical_affine_map",
    "itk_affine_transform",
    "itk_step_transforms",
    "write_itk_transform",
]

#: Default number of zero control points added on each side of the exported grid.
DEFAULT_MARGIN = 3
#: Extensions of ITK transform files (text or HDF5).
ITK_TRANSFORM_EXTENSIONS = (".tfm", ".txt", ".h5", ".hdf5")
_INSTALL_HINT = "run `pip install -e .[medical]` (or `pip install SimpleITK`)"


def import_simpleitk():
    """The SimpleITK module, or an ImportError with the install hint (an optional extra)."""
    try:
        import SimpleITK as sitk  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError(
            "Exporting ITK transforms needs SimpleITK, an optional extra of dirnet-tf: "
            f"{_INSTALL_HINT}."
        ) from exc
    return sitk


# --------------------------------------------------------------------------- #
# Geometry: voxel ij -> RAS mm -> ITK LPS mm
# --------------------------------------------------------------------------- #


def ras_affine_parts(affine, ndim):
    """Validate a grid affine: voxel ij -> RAS+ mm as ``(linear [ndim, ndim], translation [ndim])``.

    ``affine`` is 4x4 (3-D; 2-D: axial plane, ``k = 0``) or, for 2-D, a 3x3 in-plane
    homogeneous matrix; see the module docstring.  ValueError for a wrong shape, a
    non-finite or singular matrix, or an oblique 2-D plane.
    """
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


def lps_affine_parts(affine, ndim):
    """Voxel ij -> ITK physical LPS mm as ``(L [ndim, ndim], o [ndim])`` (``p_LPS = L v + o``)."""
    linear, translation = ras_affine_parts(affine, ndim)
    flip = np.diag([-1.0, -1.0, 1.0][:ndim])
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
    linear, origin = lps_affine_parts(affine, ndim)
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    return {"origin": tuple(float(v) for v in origin),
            "spacing": tuple(float(v) for v in spacing),
            "direction": tuple(float(v) for v in direction.ravel())}


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
        Moving points in RAS+ mm (the voxel map :func:`dirnet_tf.spline_np.map_points_bspline`
        placed with the affines; what :func:`itk_bspline_transform` gives in LPS).
    """
    cp, spacing, _ = control_points_array(control_points, grid_spacing)
    ndim = cp.shape[-1]
    pts = np.asarray(points_ras_mm, dtype=np.float64)
    three_in_two = ndim == 2 and pts.ndim >= 1 and pts.shape[-1] == 3 and np.shape(affine) == (4, 4)
    if pts.ndim < 1 or (pts.shape[-1] != ndim and not three_in_two):
        raise ValueError(f"points_ras_mm must have shape (..., {ndim}) for {ndim}-D control points, "
                         f"got {pts.shape}")
    lin_f, t_f = ras_affine_parts(affine, ndim)
    lin_m, t_m = ras_affine_parts(affine if moving_affine is None else moving_affine, ndim)
    planar = pts[..., :ndim]
    voxels = np.linalg.solve(lin_f, (planar - t_f).reshape(-1, ndim).T).T
    moved = map_points_bspline(cp, spacing, voxels) @ lin_m.T + t_m
    out = pts.copy()
    out[..., :ndim] = moved.reshape(planar.shape)
    return out


# --------------------------------------------------------------------------- #
# ITK transforms
# --------------------------------------------------------------------------- #


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


def itk_bspline_grid(control_points, grid_spacing, affine, image_shape, margin):
    """Everything ITK and elastix need of a DIRNet B-spline: its padded coefficient grid in LPS mm.

    Parameters are those of :func:`itk_bspline_transform`.

    Returns
    -------
    dict
        ``ndim``; ``size`` (nodes per grid axis = array axis, margin included),
        ``origin`` (LPS mm of node 0), ``spacing`` (mm), ``direction``
        (``ndim x ndim`` array, columns = grid axes in LPS); ``parameters``
        (coefficients in mm along LPS, component by component, grid axis 0
        fastest: ITK's order); ``image_shape`` (as validated, or None),
        ``image_origin`` (LPS mm of voxel 0) and ``image_spacing`` (mm per voxel).
    """
    cp, spacing, image_shape = control_points_array(control_points, grid_spacing, image_shape)
    ndim = cp.shape[-1]
    margin = _margin(margin)
    linear, origin = lps_affine_parts(affine, ndim)
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
    grid = itk_bspline_grid(control_points, grid_spacing, affine, image_shape, margin)
    sitk = import_simpleitk()
    transform = sitk.BSplineTransform(grid["ndim"], 3)
    fixed = (list(map(float, grid["size"])) + grid["origin"].tolist() + grid["spacing"].tolist()
             + grid["direction"].ravel().tolist())  # direction row-major
    transform.SetFixedParameters(fixed)
    transform.SetParameters(grid["parameters"].tolist())
    return transform


def physical_affine_map(matrix, affine, moving_affine=None):
    """A homogeneous voxel map (fixed voxel ij -> moving voxel ij) in ITK physical space.

    ``matrix`` is a 3x3 / 4x4 homogeneous voxel map, ``affine`` and
    ``moving_affine`` (default ``affine``) the grids' voxel -> RAS+ mm matrices.
    Returns ``(linear [ndim, ndim], offset [ndim])`` of fixed LPS mm -> moving
    LPS mm: ``p -> linear p + offset``.
    """
    m = homogeneous_matrix(matrix)
    ndim = m.shape[0] - 1
    lin_f, o_f = lps_affine_parts(affine, ndim)
    lin_m, o_m = lps_affine_parts(affine if moving_affine is None else moving_affine, ndim)
    inv_f = np.linalg.inv(lin_f)
    lin = lin_m @ m[:ndim, :ndim] @ inv_f
    return lin, lin_m @ (m[:ndim, ndim] - m[:ndim, :ndim] @ inv_f @ o_f) + o_m


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
    lin, offset = physical_affine_map(matrix, affine, moving_affine)
    sitk = import_simpleitk()
    transform = sitk.AffineTransform(len(offset))
    transform.SetMatrix(lin.ravel().tolist())
    transform.SetTranslation(offset.tolist())
    return transform


def itk_step_transforms(steps, affine, image_shape=None, margin=DEFAULT_MARGIN):
    """One SimpleITK transform per step (LPS mm), in warp order: ``[T_1, ..., T_n]``.

    Parameters
    ----------
    steps : sequence of dict
        As for :func:`dirnet_tf.spline_np.map_points_chain` (voxels of the model grid, ij).
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
        if step_kind(step) == "affine":
            out.append(itk_affine_transform(step["matrix"], affine))
        else:
            out.append(itk_bspline_transform(step["control_points"], step["grid_spacing"], affine, image_shape,
                                             margin))
    return out


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
    file_extension(path, ITK_TRANSFORM_EXTENSIONS, "an ITK transform file")
    sitk = import_simpleitk()
    flat = _flatten_transforms(sitk, transforms)
    transform = flat[0] if len(flat) == 1 else sitk.CompositeTransform(flat)
    return atomic_write(path, lambda tmp: sitk.WriteTransform(transform, tmp))
