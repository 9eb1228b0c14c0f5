"""Output files of a registration, staged: every file under a temporary name until all succeeded.

What ``experiments.register`` and :meth:`dirnet_tf.registration.Result.save` write, on the
**fixed image's own grid** (its shape; for NIfTI its affine and header):

* the warped image (``out``) and carried labels (``out_labels``): :func:`write_array`
  (``.nii.gz``/``.nii``, ``.mha``/``.nrrd``, ``.npy``, ``.png``/``.tif``);
* the displacement (``displacement``): :func:`write_field` -- ``.npy`` in voxel indices (ij
  order, moving index minus fixed index), other formats in mm along ITK's LPS axes;
* points (``out_points``, :mod:`dirnet_tf.points`), the ITK transform (``transform``,
  :func:`itk_transforms`), transformix parameter files (``elastix_transform``,
  :func:`elastix_parameters`, :func:`elastix_paths`), a figure (``figure``).

:class:`Staging` writes each file under :func:`dirnet_tf.files.temporary_name` beside its
target; :meth:`Staging.commit` renames them all, :meth:`Staging.abort` removes them.
"""

import json
import os

import numpy as np

from dirnet_tf.elastix_params import elastix_affine_parameters, elastix_chain, elastix_step_parameters
from dirnet_tf.field_images import write_displacement_field
from dirnet_tf.files import file_extension, split_extension, temporary_name
from dirnet_tf.geometry import image_affine, itk_grid, model_affine
from dirnet_tf.itk import itk_affine_transform, itk_step_transforms, write_itk_transform
from dirnet_tf.points import write_points
from dirnet_tf.register_engine import model_steps, summary
from dirnet_tf.register_errors import RegisterError

__all__ = ["IMAGE_EXTENSIONS", "FIELD_EXTENSIONS", "TRANSFORM_EXTENSIONS", "FIGURE_EXTENSIONS", "OUTPUT_EXTENSIONS",
           "output_extension", "check_writable", "Staging", "write_array", "write_field", "write_model_image",
           "model_affines", "itk_transforms", "elastix_parameters", "elastix_paths",
           "save_figure", "write_outputs", "record_path", "registration_record"]

#: Output extensions per kind of output (lower case; compound extensions first).
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".nrrd", ".npy", ".png", ".tif", ".tiff")
FIELD_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".nrrd", ".npy")
TRANSFORM_EXTENSIONS = (".tfm", ".txt", ".h5", ".hdf5")
FIGURE_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
#: Allowed extensions per output (flag / ``--pairs`` column / :meth:`Result.save` argument).
OUTPUT_EXTENSIONS = {"out": IMAGE_EXTENSIONS, "displacement": FIELD_EXTENSIONS, "out_labels": IMAGE_EXTENSIONS,
                     "out_points": (".csv",), "transform": TRANSFORM_EXTENSIONS, "elastix_transform": (".txt",),
                     "figure": FIGURE_EXTENSIONS}


def output_extension(path, allowed, flag):
    """The (lower-case) extension of ``path`` among ``allowed``, or a RegisterError naming ``--flag``."""
    try:
        return file_extension(path, allowed, "the file")
    except ValueError:
        raise RegisterError(f"--{flag}={path}: unsupported file type; use one of {', '.join(allowed)}") from None


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

    ``write(path, writer)`` calls ``writer(tmp)`` with :func:`dirnet_tf.files.temporary_name`
    of ``path`` (same directory, same extension: ITK and nibabel pick the format from it).
    :meth:`commit` renames every temporary file to its target; :meth:`abort` removes them, and
    the directories this object created, so that a failed run leaves nothing behind.
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
        tmp = temporary_name(path)
        try:
            self._makedirs(os.path.dirname(path))
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


# --------------------------------------------------------------------------- #
# Images and fields
# --------------------------------------------------------------------------- #


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
    * ``.mha`` / ``.nrrd``: SimpleITK with the ITK geometry of :func:`dirnet_tf.geometry.itk_grid`;
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
    """Write a displacement on the fixed grid: ``.npy`` as given, other formats as an ITK displacement field.

    Parameters
    ----------
    field : array ``[*fixed_shape, ndim]``
        For ``.npy``: moving voxel index minus fixed voxel index (ij order,
        float32).  For NIfTI/MHA/NRRD: the displacement in voxels of the fixed
        grid (ij order) that :func:`dirnet_tf.field_images.write_displacement_field`
        turns into mm along the LPS axes (ITK's convention).
    """
    if ext == ".npy":
        np.save(tmp, np.asarray(field, dtype=np.float32))
        return
    write_displacement_field(tmp, field, image_affine(image))


def write_model_image(path, image):
    """Write ``[H, W, C]`` in ``[0, 1]`` as an 8-bit PNG (clipped) or as float32 ``.npy`` (exports without a grid)."""
    if path.lower().endswith(".npy"):
        np.save(path, image.astype(np.float32))
        return
    from PIL import Image as PILImage

    data = np.clip(np.rint(np.clip(image, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    PILImage.fromarray(data[..., 0] if data.shape[-1] == 1 else data).save(path)


# --------------------------------------------------------------------------- #
# Transforms
# --------------------------------------------------------------------------- #


def model_affines(result):
    """4x4 voxel -> RAS+ mm affines of the fixed and the moving image's model grids."""
    return (model_affine(image_affine(result["fixed_image"]), result["fixed_grid"]),
            model_affine(image_affine(result["moving_image"]), result["moving_grid"]))


def itk_transforms(model, result):
    """``[A, T_1, ..., T_n]`` SimpleITK transforms (warp order, LPS mm): the geometry step, then the steps.

    ``A`` maps F's model grid to M's (identity when they coincide); ``T_k`` is step k on F's
    model grid (an ``AffineTransform`` or a ``BSplineTransform``).  As a ``CompositeTransform``
    (ITK applies the last transform first) it maps ``p -> A(T_1(... T_n(p)))``.
    """
    steps = model_steps(result, "--transform")
    fixed_model, moving_model = model_affines(result)
    return ([itk_affine_transform(np.eye(model.ndim + 1), fixed_model, moving_model)]
            + itk_step_transforms(steps, fixed_model, model.shape))


def elastix_parameters(model, result, path):
    """``[(path, text), ...]`` of ``--elastix_transform=path``: the file for transformix first, then its chain.

    The geometry step (when F's and M's model grids differ), then every step, linked by
    :func:`dirnet_tf.elastix_params.elastix_chain` and named by :func:`elastix_paths`.
    """
    steps = model_steps(result, "--elastix_transform")
    fixed_model, moving_model = model_affines(result)
    texts = [elastix_step_parameters(step, fixed_model, model.shape, interpolation_order=1) for step in steps]
    geometry = not np.allclose(fixed_model, moving_model, rtol=0, atol=1e-9)
    if geometry:
        texts.insert(0, elastix_affine_parameters(np.eye(model.ndim + 1), fixed_model, model.shape, moving_model,
                                                  interpolation_order=1))
    paths = elastix_paths(path, len(steps), geometry, single=result.get("chain") is None)
    return list(zip(paths, elastix_chain(texts, paths, itk_grid(result["fixed_image"]))))


def elastix_paths(path, num_steps, geometry, single=False):
    """The files of ``--elastix_transform=E.txt``, the one given to transformix first.

    ``E.txt`` holds the geometry step when there is one, else the first step; step ``k`` of a
    model of composed steps is ``E.step<k>.txt`` (unless it is in ``E.txt``), the one recovered
    B-spline of an export without step outputs (``single``) ``E.bspline.txt``.  Each file's
    initial transform is the next.
    """
    base, ext = os.path.splitext(os.fspath(path))
    names = [f"{base}.bspline{ext}"] if single else [f"{base}.step{k}{ext}" for k in range(1, num_steps + 1)]
    return [os.fspath(path)] + (names if geometry else names[1:])


# --------------------------------------------------------------------------- #
# One job's outputs
# --------------------------------------------------------------------------- #


def save_figure(model, result, path):
    """Fixed / moving / warped / deformation grid on the model grid (3-D: the central slices) as ``path``."""
    import matplotlib.pyplot as plt

    from dirnet_tf.plotting import registration_figure, volume_figure

    args = (result["fixed"], result["moving"], result["warped"], result["displacement"])
    if model.ndim == 2:
        fig = registration_figure(*(a[None] for a in args))
    else:
        fig = volume_figure(*args)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _text_writer(text):
    def write(tmp):
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(text)
    return write


def write_outputs(model, job, result, staging):
    """Stage every output of one job (``job``: a :class:`dirnet_tf.register_jobs.Job`) from a finished
    ``result`` (:func:`dirnet_tf.register_engine.finish`); returns the target paths."""
    fixed = result["fixed_image"]
    written = []

    def stage(name, path, writer):
        written.append(staging.write(path, writer, name))

    if job.out:
        if model.grid is None:
            stage("out", job.out, lambda tmp: write_model_image(tmp, result["image"]))
        else:
            ext = output_extension(job.out, IMAGE_EXTENSIONS, "out")
            stage("out", job.out, lambda tmp: write_array(tmp, result["image"], fixed, ext))
    if job.displacement:
        ext = output_extension(job.displacement, FIELD_EXTENSIONS, "displacement")
        field = result["field"] if ext == ".npy" else result["field_fixed"]
        stage("displacement", job.displacement, lambda tmp: write_field(tmp, field, fixed, ext))
    if job.out_labels:
        ext = output_extension(job.out_labels, IMAGE_EXTENSIONS, "out_labels")
        stage("out_labels", job.out_labels,
              lambda tmp: write_array(tmp, result["warped_labels"], fixed, ext, labels=True))
    if job.out_points:
        stage("out_points", job.out_points, lambda tmp: write_points(tmp, result["points"], result["points_moving"]))
    if job.transform:
        stage("transform", job.transform, lambda tmp: write_itk_transform(tmp, itk_transforms(model, result)))
    if job.elastix_transform:
        try:
            files = elastix_parameters(model, result, job.elastix_transform)
        except RegisterError:
            raise
        except ValueError as exc:
            raise RegisterError(f"cannot write --elastix_transform={job.elastix_transform}: {exc}") from exc
        for path, text in reversed(files):  # the chain's end first, the file for transformix last
            stage("elastix_transform", path, _text_writer(text))
    if job.figure:
        stage("figure", job.figure, lambda tmp: save_figure(model, result, tmp))
    if result.get("refinement") and written:
        record = registration_record(model, job, result)
        stage("record", record_path(job), _text_writer(json.dumps(record, indent=2, default=float) + "\n"))
    return written


def record_path(job):
    """The JSON record of a refined registration: beside the job's first output, ``<name>.json``
    (``W.nii.gz`` -> ``W.json``)."""
    first = next(iter(job.outputs().values()))
    stem, _ = split_extension(first)
    return os.path.join(os.path.dirname(os.path.abspath(first)), stem + ".json")


def registration_record(model, job, result):
    """What a refined registration did (JSON-ready): inputs, the initial alignment (``init``: mode
    and translation, RAS mm), the refinement (iterations, similarity, objective before and after,
    seconds) and the model-grid scores (:func:`dirnet_tf.register_engine.summary`)."""
    from dirnet_tf import __version__

    return {"dirnet_tf_version": __version__, "model": os.fspath(model.path), "fixed": job.fixed,
            "moving": job.moving, "outputs": job.outputs(), "init": result.get("init"),
            "refinement": result["refinement"], "scores_model_grid": summary(result)}
