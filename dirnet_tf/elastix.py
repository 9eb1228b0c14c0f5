"""Iterative B-spline registration with elastix (optional): the baseline DIRNet is compared with.

This module wraps ``itk-elastix``, an optional extra (``pip install -e .[baselines]`` or
``pip install itk-elastix``).  Importing it -- and importing ``dirnet_tf`` -- works without
the package; registering then raises an :class:`ImportError` that says how to install it.

The committed registration settings live in the repository's ``baselines/elastix/``:
``settings.json`` (threads per registration, parameter file per grid spacing) and the elastix
parameter files ``bspline_gs8.txt``, ``bspline_gs4.txt``, ``bspline_gs2.txt`` (2-D MNIST
baseline), ``echo_bspline.txt`` and ``brain3d_bspline.txt``.

Conventions are DIRNet's: for a fixed image ``F`` and a moving image ``M`` the result is
``warped(p) = M(p + displacement(p))``, ``displacement`` in voxels of the fixed grid, ij order
(``[..., 0]`` along the first array axis), at every fixed-image voxel ``p``; ``warped`` equals
``dirnet_tf.resample(M, identity + displacement, boundary="zeros")`` up to float rounding.
Images are given to elastix with origin 0, identity directions and ``spacing`` (mm per array
axis, default 1), so elastix works in mm and the field it returns is converted back to voxels.

Python::

    from dirnet_tf.elastix import register_pairs
    out = register_pairs(fixed, moving, "baselines/elastix/echo_bspline.txt", fixed_mask=sector)
    out["warped"], out["displacement"], out["seconds"]
"""

import json
import os
import shutil
import tempfile
import time
import weakref

import numpy as np

__all__ = [
    "BASELINE_DIR", "SETTINGS_FILE", "ELASTIX_INSTALL_HINT", "import_itk", "elastix_available", "load_settings",
    "parameter_file", "ElastixRegistration", "register_pairs",
]

#: The committed elastix settings: ``baselines/elastix`` beside ``dirnet_tf`` (a repository checkout or an
#: editable install; elsewhere pass ``parameter_file`` and ``threads`` explicitly).
BASELINE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "baselines", "elastix")
#: Threads per registration and the parameter file of each grid spacing.
SETTINGS_FILE = os.path.join(BASELINE_DIR, "settings.json")
ELASTIX_INSTALL_HINT = "install it with `pip install -e .[baselines]` (or `pip install itk-elastix`)"


def import_itk():
    """Import ``itk`` with the elastix module.

    Returns
    -------
    module
        The ``itk`` package.

    Raises
    ------
    ImportError
        When ``itk-elastix`` is not installed; the message says how to install it.
    """
    try:
        import itk  # noqa: PLC0415 - optional dependency
        itk.ElastixRegistrationMethod  # noqa: B018 - lazy attribute; fails without itk-elastix
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"the elastix baseline needs the package itk-elastix: {ELASTIX_INSTALL_HINT} "
                          f"({type(exc).__name__}: {exc})") from exc
    return itk


def elastix_available():
    """Whether ``itk-elastix`` can be imported.

    Returns
    -------
    bool
    """
    try:
        import_itk()
    except ImportError:
        return False
    return True


def load_settings(path=SETTINGS_FILE):
    """Read the committed baseline settings (thread count, parameter file per grid spacing).

    Parameters
    ----------
    path : str
        ``settings.json`` (default: the committed one).

    Returns
    -------
    dict
        ``{"threads": int, "parameter_files": {"8": path, "4": path}}`` with absolute paths.

    Raises
    ------
    ValueError
        The file is missing or malformed, or its thread count is below 1.
    """
    try:
        with open(path) as f:
            settings = json.load(f)
        threads = int(settings["threads"])
        files = {str(k): os.path.join(os.path.dirname(os.path.abspath(path)), v)
                 for k, v in settings["parameter_files"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid elastix baseline settings file: {exc}") from exc
    if threads < 1:
        raise ValueError(f"{path}: threads must be >= 1, got {threads}")
    return {"threads": threads, "parameter_files": files}


def parameter_file(grid_spacing, settings_path=SETTINGS_FILE):
    """Path of the committed elastix parameter file for a grid spacing.

    Parameters
    ----------
    grid_spacing : int
        Final control-point spacing in pixels (a key of ``settings.json``: 8, 4 or 2).
    settings_path : str
        The settings file that lists the parameter files.

    Returns
    -------
    str
    """
    files = load_settings(settings_path)["parameter_files"]
    key = str(int(grid_spacing))
    if key not in files:
        raise ValueError(f"no elastix parameter file for grid spacing {grid_spacing}; "
                         f"{settings_path} has {sorted(files, key=int)}")
    if not os.path.isfile(files[key]):
        raise ValueError(f"elastix parameter file {files[key]} (grid spacing {grid_spacing}) is missing")
    return files[key]


def _as_batch(name, array, ndim=2):
    """Images ``[N, *spatial]`` or ``[N, *spatial, 1]`` (or one 2-D image ``[H, W]`` / ``[H, W, 1]``,
    one volume ``[D, H, W]``) -> float32 ``[N, *spatial]`` with ``ndim`` spatial axes."""
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a numeric image array, got dtype {array.dtype}")
    if array.ndim == ndim + 2 and array.shape[-1] == 1:
        array = array[..., 0]
    elif array.ndim == ndim:
        array = array[None]
    elif ndim == 2 and array.ndim == 3 and array.shape[-1] == 1 and array.shape[0] != 1:
        # one [H, W, 1] image (a batch of [H, W] images would rarely have W == 1)
        array = array[None, ..., 0]
    if array.ndim != ndim + 1 or min(array.shape[1:]) < 4:
        axes = "H, W" if ndim == 2 else "D, H, W"
        raise ValueError(f"{name} must be {ndim}-D single-channel images [N, {axes}(, 1)] of at least 4 "
                         f"pixels per axis, got shape {np.shape(array)}")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite pixel values")
    return array


class ElastixRegistration:
    """Pairwise iterative B-spline registration with elastix.

    Parameters
    ----------
    grid_spacing : int
        Final control-point spacing in pixels; selects ``bspline_gs{grid_spacing}.txt``
        (listed in ``settings.json``) unless ``parameter_file`` is given.
    threads : int or None
        Threads per registration (``None``: the committed ``settings.json`` value).
    parameter_file : str, sequence of str, or None
        Another elastix parameter file to use instead of the committed one, or several run one
        after another (e.g. affine, then B-spline), each starting from the previous result.
    ndim : int
        2 (images) or 3 (volumes).
    overrides : dict or None
        Parameter name -> value (a string, or a list of strings) set in every parameter map, e.g.
        ``{"Metric": "AdvancedMattesMutualInformation"}`` for images of different contrast.

    Raises
    ------
    ImportError
        ``itk-elastix`` is not installed (the message says how to install it).
    ValueError
        A bad ``ndim`` or ``threads``, or a missing parameter file.
    """

    def __init__(self, grid_spacing=8, threads=None, parameter_file=None, ndim=2, overrides=None):
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.ndim = int(ndim)
        self.itk = import_itk()
        self.grid_spacing = int(grid_spacing)
        self.threads = int(threads if threads is not None else load_settings()["threads"])
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        paths = parameter_file or globals()["parameter_file"](grid_spacing)
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        for path in paths:
            if not os.path.isfile(path):
                raise ValueError(f"elastix parameter file {path} does not exist")
        self.parameter_files = [os.path.abspath(p) for p in paths]
        self.parameter_file = self.parameter_files[-1]
        self.parameters = self.itk.ParameterObject.New()
        for path in self.parameter_files:
            self.parameters.AddParameterFile(path)
        for name, value in (overrides or {}).items():
            self.parameters.SetParameter(name, [str(v) for v in value] if isinstance(value, (list, tuple))
                                         else str(value))
        # Results must come back in memory; the files leave them to elastix's defaults otherwise.
        self.parameters.SetParameter("WriteResultImage", "true")
        # transformix writes the deformation field to a file as well: keep it out of the cwd.
        self._scratch = tempfile.mkdtemp(prefix="dirnet_elastix_")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._scratch, True)

    def close(self):
        """Delete the scratch directory that transformix writes into."""
        self._cleanup()

    def _image(self, array, spacing=None, dtype=np.float32):
        """An ITK image of ``array`` (origin 0, ``spacing`` per array axis, default 1)."""
        image = self.itk.image_from_array(np.ascontiguousarray(array, dtype=dtype))
        spacing = [1.0] * self.ndim if spacing is None else [float(v) for v in spacing]
        image.SetSpacing(spacing[::-1])  # ITK orders axes x, y(, z): the reverse of the array's
        image.SetOrigin([0.0] * self.ndim)
        return image

    def register(self, fixed, moving, compute_displacement=True):
        """Register one pair.

        Parameters
        ----------
        fixed, moving : array ``[H, W]`` (or ``[H, W, 1]``), same shape.
        compute_displacement : bool
            Also return the dense displacement field (computed with transformix
            after the timed registration).

        Returns
        -------
        dict
            ``warped`` float32 ``[H, W]``, ``displacement`` float32 ``[H, W, 2]``
            (ij order, pixels; ``None`` when not computed) and ``seconds`` (wall
            time of the registration alone, including the numpy/ITK conversions).
        """
        out = self.register_batch(fixed, moving, compute_displacement)
        return {"warped": out["warped"][0, ..., 0],
                "displacement": None if out["displacement"] is None else out["displacement"][0],
                "seconds": float(out["seconds"][0])}

    def register_batch(self, fixed, moving, compute_displacement=True, progress=None, spacing=None,
                       fixed_mask=None):
        """Register pairs one after another (elastix has no batched mode).

        Parameters
        ----------
        fixed, moving : arrays ``[N, *spatial]`` or ``[N, *spatial, 1]`` with the same shape
            (``ndim`` spatial axes).
        compute_displacement : bool
            Also return the dense displacement fields (not timed).
        progress : callable or None
            Called as ``progress(done, total)`` after each pair.
        spacing : sequence of float or None
            Voxel size per array axis (mm, default 1): elastix works in these physical units;
            the returned displacement is converted back to voxels.
        fixed_mask : array ``[*spatial]`` or None
            Where the fixed image counts (non-zero), elastix's fixed-image mask, for every pair.

        Returns
        -------
        dict
            ``warped`` float32 ``[N, *spatial, 1]``, ``displacement`` float32
            ``[N, *spatial, ndim]`` (ij order, voxels) or ``None``, ``seconds`` float64 ``[N]``.
        """
        fixed = _as_batch("fixed", fixed, self.ndim)
        moving = _as_batch("moving", moving, self.ndim)
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed and moving must have the same shape, got {fixed.shape} "
                             f"and {moving.shape}")
        itk = self.itk
        n, shape = fixed.shape[0], fixed.shape[1:]
        options = {}
        if fixed_mask is not None:
            options["fixed_mask"] = self._image(np.asarray(fixed_mask) != 0, spacing, np.uint8)
        warped = np.zeros((n,) + shape + (1,), np.float32)
        displacement = np.zeros((n,) + shape + (self.ndim,), np.float32) if compute_displacement else None
        scale = np.ones(self.ndim) if spacing is None else np.asarray(spacing, np.float64)
        seconds = np.zeros(n, np.float64)
        for k in range(n):
            start = time.perf_counter()
            f_img, m_img = self._image(fixed[k], spacing), self._image(moving[k], spacing)
            try:
                result, transform = itk.elastix_registration_method(
                    f_img, m_img, parameter_object=self.parameters,
                    number_of_threads=self.threads, log_to_console=False, **options)
            except Exception as exc:  # noqa: BLE001 - ITK raises RuntimeError subclasses
                raise RuntimeError(f"elastix failed on pair {k} ({'x'.join(map(str, shape))}, "
                                   f"{' + '.join(os.path.basename(p) for p in self.parameter_files)}): "
                                   f"{exc}") from exc
            warped[k, ..., 0] = itk.array_from_image(result)
            seconds[k] = time.perf_counter() - start
            if compute_displacement:
                transformix = itk.TransformixFilter.New(
                    moving_image=m_img, transform_parameter_object=transform)
                transformix.SetComputeDeformationField(True)
                transformix.SetOutputDirectory(self._scratch)
                transformix.LogToConsoleOff()
                transformix.UpdateLargestPossibleRegion()
                field = np.asarray(itk.array_from_image(transformix.GetOutputDeformationField()), np.float64)
                # ITK vectors are (x, y(, z)) in physical units: flip to ij and divide by the spacing.
                displacement[k] = field[..., ::-1] / scale
            if progress is not None:
                progress(k + 1, n)
        return {"warped": warped, "displacement": displacement, "seconds": seconds}


def register_pairs(fixed, moving, parameter_file, ndim=2, spacing=None, fixed_mask=None, threads=None,
                   compute_displacement=True, progress=None, overrides=None):
    """Register 2-D or 3-D pairs with elastix, one after another, with one parameter file.

    A one-call form of :meth:`ElastixRegistration.register_batch` that deletes transformix's
    scratch folder afterwards.

    Parameters
    ----------
    fixed, moving : arrays ``[N, *spatial, 1]`` or ``[N, *spatial]``, same shape
        ``ndim`` spatial axes (``[N, H, W, 1]`` or ``[N, D, H, W, 1]``); one pair without the
        batch axis is accepted too.
    parameter_file : str or sequence of str
        The elastix parameter file (e.g. ``baselines/elastix/echo_bspline.txt``), or files run one
        after another (:class:`ElastixRegistration`).
    ndim : int
        2 (images) or 3 (volumes).
    spacing : sequence of ``ndim`` float or None
        mm per array axis (None: 1 per axis); elastix registers in mm, the displacement comes back
        in voxels.
    fixed_mask : array ``[*spatial]`` or None
        elastix's fixed-image mask (non-zero: the metric counts there), the same for every pair.
    threads : int or None
        Threads per registration (None: ``baselines/elastix/settings.json``).
    overrides : dict or None
        Parameters set in every map (:class:`ElastixRegistration`).
    compute_displacement : bool
        Also compute the dense displacement fields with transformix (after the timing).
    progress : callable or None
        Called as ``progress(done, total)`` after each pair.

    Returns
    -------
    dict
        ``warped`` float32 ``[N, *spatial, 1]`` (elastix's result image), ``displacement`` float32
        ``[N, *spatial, ndim]`` (voxels, ij order, ``warped(p) = moving(p + displacement(p))``; None
        when not computed) and ``seconds`` float64 ``[N]`` (the registration with its image
        conversions; the field is computed afterwards, untimed).

    Raises
    ------
    ImportError
        ``itk-elastix`` is not installed (the message says how to install it).
    ValueError
        Missing parameter file, bad shapes or non-finite pixels.
    RuntimeError
        elastix failed on a pair (the message names the pair).
    """
    registration = ElastixRegistration(parameter_file=parameter_file, threads=threads, ndim=ndim, overrides=overrides)
    try:
        return registration.register_batch(fixed, moving, compute_displacement=compute_displacement,
                                           progress=progress, spacing=spacing, fixed_mask=fixed_mask)
    finally:
        registration.close()
