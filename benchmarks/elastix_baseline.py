"""Iterative B-spline registration with elastix: the baseline DIRNet is compared with.

The registration settings live in committed elastix parameter files,
``baselines/elastix/bspline_gs8.txt``, ``bspline_gs4.txt`` and ``bspline_gs2.txt`` (cubic
B-spline transform with a final control-point spacing of 8, 4 or 2 pixels, 2 resolutions (3 for
spacing 2), 250 iterations per resolution, full sampling, ``AdvancedNormalizedCorrelation``,
adaptive stochastic gradient descent, linear interpolation, 0 outside the
image), and the thread count in ``baselines/elastix/settings.json``.

It needs the optional package ``itk-elastix`` (``pip install -e .[baselines]``
or ``pip install itk-elastix``); importing this module works without it, and
using it then raises an :class:`ImportError` that says how to install it.

Conventions are DIRNet's: for a fixed image ``F`` and a moving image ``M`` the
result is ``warped(p) = M(p + displacement(p))`` with ``displacement`` in pixels,
ij order (``[..., 0]`` along rows), evaluated at every fixed-image pixel ``p``;
``warped`` equals ``dirnet_tf.resample(M, identity + displacement,
boundary="zeros")`` up to float rounding.

Python::

    from benchmarks.elastix_baseline import ElastixRegistration
    reg = ElastixRegistration(grid_spacing=8)          # threads from settings.json
    out = reg.register_batch(fixed, moving)            # [N, 28, 28, 1] each
    out["warped"], out["displacement"], out["seconds"]

Command line (from the repository root), on held-out MNIST test pairs::

    python -m benchmarks.elastix_baseline --grid_spacing=8 --num_pairs=20
    python -m benchmarks.elastix_baseline --grid_spacing=4 --pairs=logs/mnist/eval_pairs.json
"""

import json
import os
import shutil
import sys
import tempfile
import time
import weakref

import numpy as np
from absl import flags

from benchmarks import cli
from data import mnist
from dirnet_tf import metrics
from dirnet_tf.files import write_json

BASELINE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "baselines", "elastix")
SETTINGS_FILE = os.path.join(BASELINE_DIR, "settings.json")
INSTALL_HINT = "install it with `pip install -e .[baselines]` (or `pip install itk-elastix`)"


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
        raise ImportError(f"the elastix baseline needs the package itk-elastix: {INSTALL_HINT} "
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
        unless ``parameter_file`` is given.
    threads : int or None
        Threads per registration (``None``: the committed ``settings.json`` value).
    parameter_file : str or None
        Another elastix parameter file to use instead of the committed one.
    ndim : int
        2 (images) or 3 (volumes).
    """

    def __init__(self, grid_spacing=8, threads=None, parameter_file=None, ndim=2):
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.ndim = int(ndim)
        self.itk = import_itk()
        settings = load_settings()
        self.grid_spacing = int(grid_spacing)
        self.threads = int(threads if threads is not None else settings["threads"])
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        path = parameter_file or globals()["parameter_file"](grid_spacing)
        if not os.path.isfile(path):
            raise ValueError(f"elastix parameter file {path} does not exist")
        self.parameter_file = os.path.abspath(path)
        self.parameters = self.itk.ParameterObject.New()
        self.parameters.AddParameterFile(self.parameter_file)
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
            Voxel size per array axis (default 1): elastix works in these physical units;
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
                                   f"{os.path.basename(self.parameter_file)}): {exc}") from exc
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


# --------------------------------------------------------------------------- command line


def interleave_digits(digits):
    """Order pair indices so that every prefix covers the classes evenly.

    Parameters
    ----------
    digits : array of int ``[P]``
        The class of each pair.

    Returns
    -------
    ndarray of int ``[P]``
        Indices: the first pair of each digit, then the second of each, ...
    """
    digits = np.asarray(digits)
    rank = np.zeros(len(digits), np.int64)
    for d in np.unique(digits):
        members = np.flatnonzero(digits == d)
        rank[members] = np.arange(len(members))
    return np.lexsort((digits, rank))


FLAGS = flags.FlagValues()
flags.DEFINE_integer("grid_spacing", 8, "8, 4 or 2 (the committed parameter files).", flag_values=FLAGS)
flags.DEFINE_integer("threads", None, "Threads per registration (default: baselines/elastix/settings.json).",
                     flag_values=FLAGS)
flags.DEFINE_string("parameter_file", None, "Use this elastix parameter file.", flag_values=FLAGS)
flags.DEFINE_string("pairs", None, "eval_pairs.json saved by the MNIST evaluation (default: draw the "
                    "MNIST evaluation's pairs into runs/bench/eval_pairs.json).", flag_values=FLAGS)
flags.DEFINE_string("hdf5", None, "MNIST HDF5 file (default: data.mnist's).", flag_values=FLAGS)
flags.DEFINE_integer("num_pairs", 20, "Use the first N pairs, spread over the digits (0: all).",
                     flag_values=FLAGS)
flags.DEFINE_string("out", None, "Write a JSON summary here.", flag_values=FLAGS)


def main(argv=None):
    """``python -m benchmarks.elastix_baseline``: register held-out MNIST test pairs."""
    if cli.parse(FLAGS, "benchmarks.elastix_baseline", argv) is None:
        return 2
    args = FLAGS
    if args.pairs:
        record = mnist.load_eval_pairs(args.pairs, hdf5=args.hdf5)
    else:
        record = mnist.draw_eval_pairs(os.path.join("runs", "bench", "eval_pairs.json"),
                                       args.hdf5 or mnist.DEFAULT_HDF5)
    fixed, moving, digits = record["fixed"], record["moving"], record["digits"]
    if args.num_pairs:
        # Interleave the digits so that a prefix covers every class.
        order = interleave_digits(digits)[:args.num_pairs]
        fixed, moving, digits = fixed[order], moving[order], digits[order]

    reg = ElastixRegistration(args.grid_spacing, threads=args.threads,
                              parameter_file=args.parameter_file)
    out = reg.register_batch(fixed, moving, compute_displacement=False)
    before = metrics.ncc(fixed, moving, batched=True)
    after = metrics.ncc(fixed, out["warped"], batched=True)
    summary = {
        "grid_spacing": args.grid_spacing, "threads": reg.threads,
        "parameter_file": os.path.relpath(reg.parameter_file), "pairs": int(len(fixed)),
        "ncc_before": float(before.mean()), "ncc_after": float(after.mean()),
        "ms_per_pair_median": float(1000 * np.median(out["seconds"])),
        "ms_per_pair_mean": float(1000 * np.mean(out["seconds"])),
    }
    print(f"elastix gs={args.grid_spacing} threads={reg.threads}: {len(fixed)} pairs, NCC "
          f"{summary['ncc_before']:.4f} -> {summary['ncc_after']:.4f}, "
          f"{summary['ms_per_pair_median']:.1f} ms/pair (median; mean "
          f"{summary['ms_per_pair_mean']:.1f})")
    if args.out:
        write_json(args.out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
