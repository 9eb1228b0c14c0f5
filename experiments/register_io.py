"""Geometry, spline recovery and file output for ``python -m experiments.register``.

Nothing here runs the network: this module turns the model's dense
displacement into the registration's spatial map on the images' own grids and
writes the results.  Conventions (see also :mod:`experiments.register`):

* **Voxel indices** are in array order (ij / ijk) with integer values at voxel
  centres, as :mod:`dirnet_tf.readers` and :mod:`dirnet_tf.preprocessing`.
* **World coordinates** are RAS+ mm (NIfTI/nibabel).  Images without patient
  geometry (PNG, JPEG, TIFF, BMP, ``.npy``) get the **pixel affine** of
  :func:`pixel_affine`: the physical space in which ITK reads such a file
  (ITK index ``x`` = array axis ``j`` (columns), ``y`` = ``i`` (rows), origin
  0, identity direction, spacing = the image's spacing), written as a RAS+
  affine.  ITK and elastix outputs of such images therefore overlay the file
  as ITK reads it.
* The model's displacement ``u_m`` is in **voxels of the model grid, ij
  order**, defined by cubic B-spline control points ``cp`` (model voxels, ij)
  with ``u_m(q) = sum_k cp[k] prod_d beta3(q_d / s_d - k_d + 1)``
  (:mod:`dirnet_tf.bspline`) -- or, for a model of composed steps, the
  composition of its steps (:func:`dirnet_tf.transforms.map_points_steps`),
  whose elastix files :func:`elastix_chain` links.
"""

import csv
import math
import os
import re
import uuid

import numpy as np

from dirnet_tf.elastix_params import elastix_numbers
from dirnet_tf.field_images import write_displacement_field
from dirnet_tf.files import file_extension
from dirnet_tf.itk import itk_geometry

__all__ = [
    "RegisterError", "pixel_affine", "image_affine", "model_affine", "planar_parts", "itk_grid",
    "axis_basis", "spline_on_axes", "recover_control_points", "fit_tolerance", "detect_grid_spacing",
    "read_points", "write_points", "output_extension", "check_writable", "Staging", "write_array", "write_field",
    "elastix_chain",
]

#: Output extensions per kind of output (lower case; compound extensions first).
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".nrrd", ".npy", ".png", ".tif", ".tiff")
FIELD_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".nrrd", ".npy")
TRANSFORM_EXTENSIONS = (".tfm", ".txt", ".h5", ".hdf5")
FIGURE_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
_ALL_EXTENSIONS = (".nii.gz",) + tuple(sorted({e for e in IMAGE_EXTENSIONS + FIELD_EXTENSIONS + TRANSFORM_EXTENSIONS
                                                + FIGURE_EXTENSIONS + (".csv",)} - {".nii.gz"}))


class RegisterError(ValueError):
    """Bad input to the registration command; the message names the file."""


# --------------------------------------------------------------------------- #
# Geometry
# --------------------------------------------------------------------------- #


def pixel_affine(spacing):
    """RAS+ affine of an image without patient geometry, matching how ITK reads it.

    Parameters
    ----------
    spacing : sequence of float
        mm per array axis (ij or ijk order).

    Returns
    -------
    np.ndarray (4, 4)
        Voxel ``(i, j[, k], 1)`` -> RAS+ mm with ITK physical (LPS) position
        ``(j s_j, i s_i)`` in 2-D and ``(k s_k, j s_j, i s_i)`` in 3-D: the
        reversed array axes, origin 0, identity direction -- the geometry
        ``SimpleITK.ReadImage`` gives a PNG and ``SimpleITK.GetImageFromArray``
        gives a numpy array.
    """
    spacing = [float(s) for s in spacing]
    ndim = len(spacing)
    lps = np.zeros((3, 3))
    for a in range(ndim):
        lps[ndim - 1 - a, a] = spacing[a]
    if ndim == 2:
        lps[2, 2] = 1.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ lps
    return affine


def image_affine(image):
    """The image's RAS+ affine, or :func:`pixel_affine` when the file has no patient geometry."""
    return np.asarray(image.affine, dtype=np.float64) if image.affine is not None else pixel_affine(image.spacing)


def model_affine(affine, grid_transform):
    """4x4 model-grid voxel -> RAS+ mm: ``affine @ [[diag(scale), offset], [0, 1]]``.

    Parameters
    ----------
    affine : array (4, 4)
        The original image's voxel -> RAS+ affine (:func:`image_affine`).
    grid_transform : dirnet_tf.preprocessing.GridTransform
        Model index -> image index of that image.
    """
    embed = np.eye(4)
    n = grid_transform.ndim
    embed[:n, :n] = np.diag(grid_transform.scale)
    embed[:n, 3] = grid_transform.offset
    return np.asarray(affine, dtype=np.float64) @ embed


def planar_parts(affine, ndim):
    """``(linear (3, ndim), translation (3,))`` of a 4x4 voxel -> RAS+ affine (2-D: ``k = 0``)."""
    a = np.asarray(affine, dtype=np.float64)
    return a[:3, :ndim].copy(), a[:3, 3].copy()


def itk_grid(image):
    """ITK geometry of the fixed image's own grid, as ITK reads the file.

    Returns
    -------
    dict
        ``size`` (voxels per ITK index axis), ``spacing`` (mm), ``origin`` (LPS
        mm), ``direction`` (row-major, columns = index axes in LPS), and
        ``order``: the array axes of ITK index axes ``x, y[, z]`` -- the array
        axes themselves for images with an affine (NIfTI/DICOM), reversed for
        images without one (:func:`pixel_affine`).

    Raises
    ------
    ValueError
        For a 2-D image whose plane is not axial (ITK's 2-D space is x-y).
    """

    ndim = image.ndim
    if image.affine is None:
        order = list(range(ndim))[::-1]
        return {"size": [int(image.shape[a]) for a in order], "spacing": [float(image.spacing[a]) for a in order],
                "origin": [0.0] * ndim, "direction": np.eye(ndim).ravel().tolist(), "order": order}
    geometry = itk_geometry(np.asarray(image.affine, dtype=np.float64), ndim)
    return {"size": [int(n) for n in image.shape], "spacing": list(geometry["spacing"]),
            "origin": list(geometry["origin"]), "direction": list(geometry["direction"]),
            "order": list(range(ndim))}


# --------------------------------------------------------------------------- #
# B-spline: evaluation on tensor grids, recovery of the control points
# --------------------------------------------------------------------------- #


def _control_grid(shape, spacing):
    return tuple(int(math.ceil((n - 1) / s)) + 3 for n, s in zip(shape, spacing))


def _beta3(t):
    """Uniform cubic B-spline (as :func:`dirnet_tf.bspline.cubic_bspline`, numpy only)."""
    a = np.abs(t)
    return np.where(a < 1.0, 2.0 / 3.0 - a * a + 0.5 * a ** 3, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


def axis_basis(positions, spacing, num_points):
    """``B[x, k] = beta3(positions[x] / spacing - k + 1)``: one axis of the tensor-product spline.

    Parameters
    ----------
    positions : array (n,)
        Model-grid voxel indices along one array axis (any real values).
    spacing : int
        Control-point spacing in model voxels.
    num_points : int
        Control points along the axis.
    """
    x = np.asarray(positions, dtype=np.float64)[:, None]
    k = np.arange(num_points, dtype=np.float64)[None, :]
    return _beta3(x / float(spacing) - k + 1.0)


def spline_on_axes(control_points, grid_spacing, axes):
    """The B-spline displacement on the tensor grid ``axes[0] x axes[1] (x axes[2])``.

    Parameters
    ----------
    control_points : array ``[*K, ndim]``
        Model voxels, ij order.
    grid_spacing : sequence of int
        Model voxels per axis.
    axes : list of 1-D arrays
        Model-grid voxel indices along each array axis (e.g. the model index
        of every row / column of the fixed image).

    Returns
    -------
    np.ndarray ``[len(axes[0]), ..., ndim]`` float64
        ``u`` in model voxels, ij order: the exact spline sum (control points
        beyond the grid count as zero), evaluated separably.
    """
    out = np.asarray(control_points, dtype=np.float64)
    for d, q in enumerate(axes):
        basis = axis_basis(q, grid_spacing[d], out.shape[d])
        out = np.moveaxis(np.tensordot(basis, out, axes=([1], [d])), 0, d)
    return out


def recover_control_points(displacement, grid_spacing):
    """Control points whose B-spline reproduces a dense displacement on the model grid.

    The dense field is linear in the control points, separably: ``u = W_0 C
    W_1^T`` per component in 2-D (``W_d[x, k] = beta3(x / s_d - k + 1)``,
    ``N_d x K_d``).  The least-squares solution ``C = W_0^+ U W_1^+T`` is exact
    (up to float round-off in ``u``) when every ``W_d`` has full column rank,
    which holds for spacing >= 2 and ``N_d`` >= ``K_d`` + 1 or so; otherwise
    the minimum-norm solution still reproduces ``u`` at the model voxels but
    not between them.

    Parameters
    ----------
    displacement : array ``[*model_shape, ndim]``
        Model voxels, ij order (the served model's ``displacement``).
    grid_spacing : sequence of int
        Control-point spacing in model voxels.

    Returns
    -------
    tuple
        ``(control_points [*K, ndim] float64 (model voxels, ij), exact (bool:
        all W_d of full column rank), residual (max |spline - u| at the model
        voxels, model voxels))``.
    """
    u = np.asarray(displacement, dtype=np.float64)
    shape = u.shape[:-1]
    grid = _control_grid(shape, grid_spacing)
    out, exact = u, True
    for d, (n, s, k) in enumerate(zip(shape, grid_spacing, grid)):
        w = axis_basis(np.arange(n), s, k)
        exact = exact and n >= k and np.linalg.matrix_rank(w) == k
        out = np.moveaxis(np.tensordot(np.linalg.pinv(w), out, axes=([1], [d])), 0, d)
    check = spline_on_axes(out, grid_spacing, [np.arange(n) for n in shape])
    return out, bool(exact), float(np.max(np.abs(check - u))) if u.size else 0.0


def fit_tolerance(displacement):
    """Largest residual (model voxels) accepted for a float32 field to be a spline: ``1e-4 + 1e-5 max|u|``."""
    return 1e-4 + 1e-5 * float(np.max(np.abs(displacement))) if np.size(displacement) else 1e-4


def detect_grid_spacing(displacement, candidates=(64, 32, 16, 8, 4, 2)):
    """The coarsest control-point spacing whose B-spline reproduces ``displacement`` exactly.

    Used for exports whose metadata does not record ``grid_spacing``.  A
    coarser spline space is contained in every finer one, and with full-rank
    weight matrices a spline is determined by its samples, so the coarsest
    exact fit is the model's own spline (up to round-off).

    Returns
    -------
    tuple of int or None
    """
    u = np.asarray(displacement, dtype=np.float64)
    shape, ndim = u.shape[:-1], u.shape[-1]
    for s in candidates:
        spacing = (int(s),) * ndim
        if any(n < k for n, k in zip(shape, _control_grid(shape, spacing))):
            continue
        _, exact, residual = recover_control_points(u, spacing)
        if exact and residual <= fit_tolerance(u):
            return spacing
    return None


# --------------------------------------------------------------------------- #
# Points
# --------------------------------------------------------------------------- #

VOXEL_COLUMNS = ("i", "j", "k")
WORLD_COLUMNS = ("x", "y", "z")


def read_points(path, ndim, has_affine):
    """Read a CSV of points: a header row, then one point per row.

    Coordinate columns (case-insensitive): ``i, j[, k]`` -- voxel indices of
    the fixed image, ij order (any image); or ``x, y, z`` -- world RAS+ mm
    (images with patient geometry; 2-D images: ``x, y`` in the image plane,
    ``z`` optional).  Other columns are carried to the output unchanged.

    Returns
    -------
    dict
        ``header`` (list of str), ``rows`` (lists of str), ``lines`` (file line
        of each row), ``kind`` (``'voxel'`` or ``'world'``), ``columns``
        (indices of the coordinate columns), ``values`` float64 ``[P, ncols]``.
    """
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            table = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise RegisterError(f"cannot read the points file {path}: {exc}") from exc
    if not table or not any(c.strip() for c in table[0]):
        raise RegisterError(f"points file {path} is empty; it needs a header row naming the coordinate columns")
    header = [c.strip() for c in table[0]]
    lower = [c.lower() for c in header]
    voxel = list(VOXEL_COLUMNS[:ndim])
    world = list(WORLD_COLUMNS[:ndim]) if ndim == 3 else ["x", "y"] + (["z"] if "z" in lower else [])
    has_voxel = all(c in lower for c in voxel)
    has_world = all(c in lower for c in world)
    if has_voxel and has_world:
        raise RegisterError(f"points file {path}: give either voxel columns {','.join(voxel)} or world columns "
                            f"{','.join(world)}, not both")
    if has_world and not has_affine:
        raise RegisterError(f"points file {path}: columns {','.join(world)} are world mm coordinates, but the fixed "
                            "image has no patient geometry (PNG/NPY); give voxel columns "
                            f"{','.join(voxel)} (ij order)")
    if not (has_voxel or has_world):
        raise RegisterError(f"points file {path}: the header {header} names no coordinate columns; expected "
                            f"{','.join(voxel)} (voxels, ij order)"
                            + (f" or {','.join(world)} (RAS+ mm)" if has_affine else ""))
    names = voxel if has_voxel else world
    columns = [lower.index(c) for c in names]
    rows, lines, values = [], [], []
    for line, row in enumerate(table[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        try:
            values.append([float(row[c]) for c in columns])
        except (ValueError, IndexError):
            raise RegisterError(f"points file {path}, line {line}: {row} does not hold numbers in columns "
                                f"{','.join(names)}") from None
        if not np.all(np.isfinite(values[-1])):
            raise RegisterError(f"points file {path}, line {line}: non-finite coordinates {row}")
        rows.append(list(row) + [""] * (len(header) - len(row)))
        lines.append(line)
    if not rows:
        raise RegisterError(f"points file {path} holds no points (only a header)")
    return {"header": header, "rows": rows, "lines": lines, "kind": "voxel" if has_voxel else "world",
            "columns": columns, "values": np.asarray(values, dtype=np.float64), "path": os.fspath(path)}


def write_points(path, table, values):
    """Write ``table`` (from :func:`read_points`) with its coordinate columns replaced by ``values``."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(table["header"])
        for row, point in zip(table["rows"], np.asarray(values, dtype=np.float64)):
            row = list(row)
            for c, v in zip(table["columns"], point):
                row[c] = repr(float(v))
            writer.writerow(row)


# --------------------------------------------------------------------------- #
# Output files
# --------------------------------------------------------------------------- #


def output_extension(path, allowed, flag):
    """The (lower-case) extension of ``path`` among ``allowed``, or a RegisterError naming ``--flag``."""
    try:
        return file_extension(path, allowed, "the file")
    except ValueError:
        raise RegisterError(f"--{flag}={path}: unsupported file type; use one of {', '.join(allowed)}") from None


def _split_extension(path):
    name = os.path.basename(path)
    lower = name.lower()
    for ext in sorted(_ALL_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    return os.path.splitext(name)


def check_writable(path, flag):
    """Fail early (RegisterError) when ``path`` cannot be created: a parent is a file or not writable."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise RegisterError(f"--{flag}={path} is a directory; give a file name")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RegisterError(f"--{flag}={path}: cannot create it, {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RegisterError(f"--{flag}={path}: the directory {parent} is not writable")


class Staging:
    """Write outputs under temporary names beside their targets; rename them all at the end.

    ``write(path, writer)`` calls ``writer(tmp)`` with a temporary file name in
    ``path``'s directory that keeps ``path``'s extension (ITK and nibabel pick
    the format from it).  :meth:`commit` renames every temporary file to its
    target; :meth:`abort` removes them, and the directories this object
    created, so that a failed run leaves nothing behind.
    """

    def __init__(self):
        self.items = []
        self.created = []

    def _makedirs(self, directory):
        missing = []
        while not os.path.exists(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for d in reversed(missing):
            os.mkdir(d)
            self.created.append(d)

    def write(self, path, writer, flag="out"):
        """Write one output (see the class docstring); errors become RegisterError naming ``--flag``."""
        path = os.path.abspath(os.fspath(path))
        directory = os.path.dirname(path)
        base, ext = _split_extension(path)
        tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp{ext}")
        try:
            self._makedirs(directory)
            self.items.append((tmp, path))
            writer(tmp)
        except RegisterError:
            raise
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            raise RegisterError(f"cannot write --{flag}={path}: {exc}") from exc
        if not os.path.exists(tmp):
            raise RegisterError(f"cannot write --{flag}={path}: nothing was written")
        return path

    def commit(self):
        """Rename every staged file to its target (``os.replace``); returns the targets."""
        done = []
        for tmp, path in self.items:
            os.replace(tmp, path)
            done.append(path)
        self.items, self.created = [], []
        return done

    def abort(self):
        """Remove the staged files and the directories created for them (if empty)."""
        for tmp, _ in self.items:
            if os.path.exists(tmp):
                os.remove(tmp)
        for d in sorted(self.created, key=len, reverse=True):
            try:
                os.rmdir(d)
            except OSError:
                pass
        self.items, self.created = [], []


def _nifti_image(array, affine, header):
    import nibabel as nib

    array = np.asarray(array)
    if header is not None:
        header = header.copy()
        shape = tuple(int(n) for n in header.get_data_shape())
        # Keep trailing singleton axes of the fixed file (a 2-D image stored as [H, W, 1]).
        if shape[: array.ndim] == array.shape and all(n == 1 for n in shape[array.ndim:]):
            array = array.reshape(shape)
        cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        image = cls(array, affine, header=header)
        image.header.set_data_dtype(array.dtype)
        image.header.set_slope_inter(None, None)
        return image
    return nib.Nifti1Image(array, affine)


def _sitk_image(array, image, vector=False):
    import SimpleITK as sitk

    grid = itk_grid(image)
    ndim = image.ndim
    order = grid["order"][::-1] + ([ndim] if vector else [])  # numpy axes of GetImageFromArray: z, y, x
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, order)), isVector=vector)
    out.SetSpacing(grid["spacing"])
    out.SetOrigin(grid["origin"])
    out.SetDirection(grid["direction"])
    return out


def _integer_dtype(values, what):
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise RegisterError(f"{what}: values {low}..{high} do not fit a 32-bit integer image")


def write_array(tmp, array, image, ext, labels=False):
    """Write an image on the fixed grid (``array`` of ``image.shape``) to ``tmp`` in the format of ``ext``.

    * ``.nii`` / ``.nii.gz``: the fixed image's affine, and its NIfTI header
      (dimensions, units, qform/sform codes, description) when it is a NIfTI file;
    * ``.mha`` / ``.nrrd``: SimpleITK with the ITK geometry of :func:`itk_grid`;
    * ``.npy``: the array as is (float32 intensities, integer labels), ij order;
    * ``.png`` / ``.tif``: 2-D only; values rounded to 8-bit grey (all within
      0..255) or 16-bit grey (0..65535); a ``.tif`` of non-integer values is
      32-bit float instead.  Non-integer values all within [0, 1] (float
      images) are refused for PNG rather than rounded to 0 and 1.
    """
    array = np.asarray(array)
    if labels:
        array = array.astype(_integer_dtype(array, tmp))
    else:
        array = array.astype(np.float32)
    if ext in (".nii", ".nii.gz"):
        _nifti_image(array, image_affine(image), image.header if image.affine is not None else None).to_filename(tmp)
    elif ext in (".mha", ".nrrd"):
        import SimpleITK as sitk

        sitk.WriteImage(_sitk_image(array, image), tmp)
    elif ext == ".npy":
        np.save(tmp, array)
    else:
        from PIL import Image as PILImage

        if array.ndim != 2:
            raise RegisterError(f"a {ext} file holds a 2-D image; write the {array.ndim}-D result as .nii.gz or .npy")
        whole = np.array_equal(array, np.round(array))
        if ext in (".tif", ".tiff") and not whole:
            PILImage.fromarray(array.astype(np.float32)).save(tmp)
            return
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < -0.5 or high >= 65535.5 or (not whole and high <= 1.0):
            raise RegisterError(f"the result's intensities {low:.4g}..{high:.4g} do not fit an 8/16-bit {ext} "
                                "file; write .nii.gz, .npy, .mha or .tif (float)")
        data = np.clip(np.rint(array), 0, 65535)
        PILImage.fromarray(data.astype(np.uint8 if high < 255.5 else np.uint16)).save(tmp)


def write_field(tmp, field, image, ext):
    """Write a displacement on the fixed grid: ``.npy`` as given, other formats via SimpleITK/transforms.

    Parameters
    ----------
    field : array ``[*fixed_shape, ndim]``
        For ``.npy``: moving voxel index minus fixed voxel index (ij order,
        float32).  For NIfTI/MHA/NRRD: the displacement in voxels of the fixed
        grid (ij order) that :func:`dirnet_tf.transforms.write_displacement_field`
        turns into mm along the LPS axes (ITK's convention).
    """
    if ext == ".npy":
        np.save(tmp, np.asarray(field, dtype=np.float32))
        return

    write_displacement_field(tmp, field, image_affine(image))


# --------------------------------------------------------------------------- #
# elastix
# --------------------------------------------------------------------------- #


def _replace_line(text, key, value):
    pattern = re.compile(rf"^\({key} [^\n]*\)$", re.MULTILINE)
    if not pattern.search(text):
        raise RuntimeError(f"elastix parameter text has no ({key} ...) line")
    return pattern.sub(lambda _: f"({key} {value})", text)


def _fixed_grid_lines(text, grid):
    ndim = len(grid["size"])
    direction = np.reshape(grid["direction"], (ndim, ndim)).ravel(order="F")  # elastix: column-major
    text = _replace_line(text, "Size", " ".join(str(int(n)) for n in grid["size"]))
    text = _replace_line(text, "Index", " ".join("0" for _ in range(ndim)))
    text = _replace_line(text, "Spacing", elastix_numbers(grid["spacing"]))
    text = _replace_line(text, "Origin", elastix_numbers(grid["origin"]))
    return _replace_line(text, "Direction", elastix_numbers(direction))


def elastix_chain(texts, paths, fixed_grid):
    """Link elastix parameter files into one transformix chain on the fixed image's grid.

    Parameters
    ----------
    texts : list of str
        Parameter files (e.g. :func:`dirnet_tf.transforms.elastix_step_parameters`
        on the FIXED model grid) in warp order: ``texts[0]`` is the file given to
        transformix, and the initial transform of each file is the next one.
        With ``HowToCombineTransforms Compose`` elastix maps a point through the
        initial transform first, so the chain is ``p -> T_0(T_1(... T_n(p)))``
        -- the order of an ITK ``CompositeTransform`` of the same list.
    paths : list of str
        Where each text is written (``paths[0]``: the main file).  Each file
        records the absolute path of the next (transformix resolves relative
        names against its working directory, not the file's folder).
    fixed_grid : dict
        :func:`itk_grid` of the fixed image: the grid transformix resamples onto
        (replaces the model grid in ``Size`` / ``Spacing`` / ``Origin`` / ``Direction``).

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
