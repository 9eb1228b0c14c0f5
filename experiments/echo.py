"""DIRNet on a real echocardiogram: the ultrasound cine that ships with pydicom (``python -m experiments.echo``).

    python -m experiments.echo                      # pydicom's examples_ybr_color.dcm, default settings
    python -m experiments.echo --steps=1000 --logdir=runs/echo_short --export_dir=exports/echo_short
    python -m experiments.echo --images=OTHER_CINE.dcm --mask=SECTOR.npy

**Data.** pydicom's wheel holds a real ultrasound cine, ``pydicom/data/test_files/
examples_ybr_color.dcm`` (a SonoSite echocardiogram: 30 colour frames of 240x320 pixels,
frame time 33 ms, about one heart beat).  It is found in the installed package (its
``data/test_files`` folder, else ``pydicom.data.get_testdata_file(download=False)``), never
downloaded; ``--images=FILE`` takes another
multi-frame ultrasound DICOM instead.  :mod:`dirnet_tf.readers` converts the frames to grey and
takes the pixel size from the ultrasound-region metadata; those describe a 2x larger original, so
the reader halves the region box and doubles the pixel size (1.021 mm, with a
:class:`~dirnet_tf.readers.GeometryWarning`).

**Sector mask.** Only the ultrasound sector may drive the similarity: the text overlay, the depth
scale, the orientation marker and the ECG/status bar outside it must not.  :func:`sector_mask`
builds the mask from the frames: pixels whose intensity varies over time (temporal standard
deviation above ``--mask_threshold`` times its 99th percentile), restricted to the (corrected)
ultrasound region box, opened (3x3), the largest connected part kept, closed (5x5) and filled,
replaced by its convex hull (a phased-array sector is convex) and cut to the box again; static
bright pixels (overlay text or markers: no change over time) inside it are removed with a 2-pixel
margin.  It is written as ``sector_mask.npy`` (and ``.png``) in ``--logdir`` and passed to the
training command as ``--mask`` (:mod:`experiments.train` zeroes everything outside it after the
normalisation); ``sector_mask_check.png`` shows frame 0 with its contour, to check by eye.
``--mask=FILE`` (on the frames' 240x320 grid) uses a given mask instead.

**Training** is :func:`experiments.train.run`, unchanged: this command only prepares the inputs
(file, mask, model grid) and sets flag defaults.  Model grid: ``--spacing`` (default
``--downsample`` (2) times the file's pixel size, 2.04 mm) and ``--shape`` (``auto``: the
smallest grid, a multiple of the coarsest B-spline stage's spacing per axis, that holds the sector mask when
centred on the image: 96x96).  Pairs: ``--pairs=sequence --max_frame_gap=8`` (frames at most 8
apart, both directions); split in time, ``--split_within_groups --split=0.5,0.2,0.3``: frames
0-14 train, 15-20 validation (model selection), 21-29 test (72 pairs).  Model and optimisation
defaults (chosen by runs compared in ``experiments/README.md``): folding-free composed, bounded,
symmetric B-spline steps as in ``python -m experiments.mnist``, here four stages of one pass each
-- ``--stages=8,4,2,2 --passes=1`` (two stages of their own at spacing 2) -- ``--normalize_inputs``,
automatic regressor widths, ``--bending_weight=0.1``, trained end to end -- 3000 steps of batch 8,
Adam 2e-3 with cosine decay, validation and checkpoints every 100 steps (the best validation
checkpoint is exported).  Every flag of
``python -m experiments.train`` applies.

**Evaluation** (a post-step on the export, on the test pairs of the train command's
``eval_pairs.json``), written into ``metrics.json`` under ``echo`` next to the train command's
own numbers:

* NCC inside the sector (model-grid mask) before and after registration, also per frame gap;
* folding fraction (``det J <= 0``), on the whole model grid and inside the sector;
* cycle consistency: for every test pair (a, b) whose reverse (b, a) is a test pair too, the
  round trip ``x -> x + u_ab(x) -> ... + u_ba(...)`` =
  :func:`~dirnet_tf.warping.compose_displacements` ``(u_ba, u_ab)``; its mean length inside the
  sector, in pixels of the model grid and in mm (:func:`cycle_residual`);
* time per pair: DIRNet batched (``--timing_batch_size`` pairs per call, the train command's
  measurement); elastix one pair after another;
* the elastix B-spline baseline (:func:`elastix_register`, parameter file
  ``baselines/elastix/echo_bspline.txt``, the sector as elastix's fixed-image mask) on the same
  pairs and images, with the same scores; speed-up = elastix ms/pair / DIRNet ms/pair.

Displacements are in **pixels of the model grid, ij (array) order**; ``*_mm`` values multiply
them by the model grid spacing.  Figures in ``--logdir``: ``echo_registration.png`` (fixed /
moving / warped / deformation grid of a few test pairs), ``echo_strip.png`` (frames of the cine
with the sector and the split), and the train command's ``registration.png``.
"""

import os
import time
import warnings

import numpy as np
from absl import flags
from scipy import ndimage
from scipy.spatial import Delaunay

from dirnet_tf import files, metrics, readers
from dirnet_tf.inference import load_export, predict
from dirnet_tf.warping import compose_displacements
from experiments import common, train
from experiments.common import define_flag

flags.adopt_module_key_flags(train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_FILE = "examples_ybr_color.dcm"
ELASTIX_PARAMETER_FILE = os.path.join(ROOT, "baselines", "elastix", "echo_bspline.txt")

define_flag("float", "downsample", 2.0, "Model grid spacing as a multiple of the file's pixel size "
            "(used when --spacing is empty).")
define_flag("float", "mask_threshold", 0.06, "Sector mask: a pixel varies over time when its temporal "
            "standard deviation exceeds this fraction of the 99th percentile of all pixels' deviations.")
define_flag("bool", "elastix", True, "Run the elastix B-spline baseline on the test pairs (needs itk-elastix).")
define_flag("string", "elastix_parameter_file", ELASTIX_PARAMETER_FILE, "elastix parameter file of the baseline.")
define_flag("integer", "elastix_threads", 0, "Threads per elastix registration (0: "
            "baselines/elastix/settings.json).")
define_flag("integer", "figure_pairs", 6, "Test pairs shown in echo_registration.png.")

DEFAULTS = dict(
    train.DEFAULTS, images="", pairs="sequence", max_frame_gap=8, split="0.5,0.2,0.3",
    split_within_groups=True, shape="auto", spacing="", eval_pairs=100, grid_spacing=8, stages="8,4,2,2",
    bounded=True, symmetric=True, normalize_inputs=True, filters="auto", convs_per_level="auto", passes=1,
    inference_passes=0, bending_weight=0.1, folding_weight=0.0, steps=3000, batch_size=8,
    learning_rate=2e-3, timing_batch_size=32, log_every=100, eval_every=100, checkpoint_every=100,
    logdir=os.path.join("runs", "echo"), export_dir=os.path.join("exports", "echo"))

# --------------------------------------------------------------------------- inputs


def example_file():
    """Path of pydicom's example echocardiogram ``examples_ybr_color.dcm`` (from the installed wheel).

    Returns
    -------
    str

    Raises
    ------
    FileNotFoundError
        pydicom is not installed or its wheel lacks the file.
    """
    try:
        import pydicom
        from pydicom import data as pydicom_data
    except ImportError as exc:
        raise FileNotFoundError("the example echocardiogram comes with pydicom: `pip install pydicom` "
                                "(or `pip install -e .[medical]`), or give --images=FILE") from exc
    path = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", EXAMPLE_FILE)
    if not os.path.isfile(path):
        try:  # never downloads: this file is one of the test files inside the wheel
            path = pydicom_data.get_testdata_file(EXAMPLE_FILE, download=False)
        except TypeError:  # a pydicom without the download argument: do not risk a download
            path = None
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"pydicom {pydicom.__version__} does not ship {EXAMPLE_FILE}; "
                                "give --images=FILE")
    return path


def portable_path(path):
    """``path`` for a results file (:func:`dirnet_tf.files.portable_path`; pydicom's example as
    ``pydicom:<version>/data/test_files/<name>``)."""
    return files.portable_path(path, ("pydicom",))


def read_cine(path):
    """The frames of a multi-frame (ultrasound) DICOM file as grey :class:`~dirnet_tf.readers.Image` s.

    Metadata corrections of the reader (:class:`~dirnet_tf.readers.GeometryWarning`) are printed once.

    Returns
    -------
    list of Image
        One 2-D image per frame, all in one group, spacing in mm.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", readers.GeometryWarning)
        frames = readers.read_image(path, ndim=2)
    for note in dict.fromkeys(str(w.message) for w in caught):
        print(f"[data] note: {note}", flush=True)
    if len(frames) < 3:
        raise readers.InputError(f"{path}: {len(frames)} frame(s); the echo experiment needs a cine "
                                 "(a multi-frame file)")
    return frames


def ultrasound_box(path, image):
    """The ultrasound region box of a DICOM file on its pixel grid, as the reader interprets it.

    The largest region with physical units of cm (``SequenceOfUltrasoundRegions``), divided by the
    down-sampling factor the reader found (its pixel size over the region's).

    Parameters
    ----------
    path : str
        The DICOM file.
    image : Image
        One of its frames as read by :func:`read_cine` (for the pixel size and the shape).

    Returns
    -------
    tuple of int or None
        ``(row0, row1, col0, col1)``, inclusive pixel bounds, clipped to the image; None when the
        file is not DICOM or has no usable region.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not DICOM (e.g. a .npy stack): no region to use
        return None
    best = None
    for region in getattr(ds, "SequenceOfUltrasoundRegions", None) or []:
        units = (getattr(region, "PhysicalUnitsXDirection", None), getattr(region, "PhysicalUnitsYDirection", None))
        if units != (3, 3):  # 3: cm
            continue
        if not float(getattr(region, "PhysicalDeltaY", 0) or 0) > 0:
            continue
        box = [int(getattr(region, n, 0) or 0) for n in
               ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")]
        area = (box[2] - box[0]) * (box[3] - box[1])
        if best is None or area > best[0]:
            best = (area, box, float(region.PhysicalDeltaY) * 10.0)
    if best is None:
        return None
    _, (x0, y0, x1, y1), delta_mm = best
    factor = max(1, int(round(image.spacing[0] / delta_mm))) if image.spacing_from == "ultrasound-region" else 1
    rows, cols = image.shape
    return (max(0, int(np.floor(y0 / factor))), min(rows - 1, int(np.ceil(y1 / factor))),
            max(0, int(np.floor(x0 / factor))), min(cols - 1, int(np.ceil(x1 / factor))))


def _convex_hull_mask(mask):
    points = np.argwhere(mask)
    if len(points) < 3:
        return mask.copy()
    edges = points[~ndimage.binary_erosion(mask)[tuple(points.T)]]  # the hull of the boundary is the hull
    hull = Delaunay(edges.astype(np.float64))
    grid = np.indices(mask.shape).reshape(2, -1).T
    return (hull.find_simplex(grid) >= 0).reshape(mask.shape) | mask


def sector_mask(frames, box=None, threshold=0.06, static_std=0.5, static_brightness=0.1):
    """The ultrasound sector of a cine: the pixels that change over time, as one convex region.

    Parameters
    ----------
    frames : array ``[T, H, W]``
        Grey frames (any intensity scale).
    box : tuple or None
        ``(row0, row1, col0, col1)`` inclusive (:func:`ultrasound_box`); the mask stays inside it.
    threshold : float
        A pixel varies when its temporal standard deviation exceeds ``threshold`` times the 99th
        percentile of all pixels' deviations.
    static_std, static_brightness : float
        Static overlay: deviation at most ``static_std`` times the threshold and a mean above
        ``static_brightness`` times the 99th percentile of the mean image; such pixels (with a
        2-pixel margin) are removed from the sector.

    Returns
    -------
    np.ndarray of bool ``[H, W]``
    """
    frames = np.asarray(frames, np.float64)
    if frames.ndim != 3 or frames.shape[0] < 2:
        raise ValueError(f"frames must be [T, H, W] with T >= 2, got shape {frames.shape}")
    std, mean = frames.std(axis=0), frames.mean(axis=0)
    limit = threshold * max(np.percentile(std, 99), 1e-12)
    inside_box = np.ones(std.shape, bool)
    if box is not None:
        r0, r1, c0, c1 = box
        inside_box[:] = False
        inside_box[r0:r1 + 1, c0:c1 + 1] = True
    varying = ndimage.binary_opening((std > limit) & inside_box, np.ones((3, 3), bool))
    labels, count = ndimage.label(varying)
    if count == 0:
        raise readers.InputError("no pixel of the cine changes over time: cannot find the ultrasound sector; "
                                 "give --mask=FILE")
    sizes = ndimage.sum(varying, labels, np.arange(1, count + 1))
    sector = labels == 1 + int(np.argmax(sizes))
    sector = ndimage.binary_closing(np.pad(sector, 5), np.ones((5, 5), bool))[5:-5, 5:-5]
    sector = _convex_hull_mask(ndimage.binary_fill_holes(sector)) & inside_box
    static = (std <= static_std * limit) & (mean > static_brightness * max(np.percentile(mean, 99), 1e-12))
    return sector & ~ndimage.binary_dilation(static, iterations=2)


def auto_shape(mask, image_spacing, model_spacing, multiple):
    """Smallest model grid (a multiple of ``multiple`` voxels per axis) holding ``mask`` when centred.

    The training command centres the model grid on the image; the grid must reach the mask pixel
    farthest from the centre on each axis.

    Parameters
    ----------
    mask : array of bool ``[H, W]`` on the image grid.
    image_spacing, model_spacing : sequence of float
        mm per axis.
    multiple : int
        The B-spline grid spacing (voxels).

    Returns
    -------
    tuple of int
    """
    shape = []
    for axis, (n, s, m) in enumerate(zip(mask.shape, image_spacing, model_spacing)):
        index = np.flatnonzero(mask.any(axis=1 - axis))
        reach = np.max(np.abs(index - (n - 1) / 2.0)) + 1.0  # pixels from the centre, with a margin
        voxels = int(np.ceil(2 * reach * s / m))
        shape.append(int(multiple * np.ceil(voxels / multiple)))
    return tuple(shape)


def prepare_inputs(config):
    """The cine file, its frames, the sector mask and the model grid: ``(config for train.run, frames, mask)``.

    Writes ``sector_mask.npy`` / ``sector_mask.png`` / ``sector_mask_check.png`` into the logdir
    (unless ``config["mask"]`` names a mask).
    """
    config = dict(config)
    path = config["images"] or example_file()
    frames = read_cine(path)
    logdir = config["logdir"]
    os.makedirs(logdir, exist_ok=True)
    stack = np.stack([f.array for f in frames])
    if config["mask"]:
        mask = readers.read_image(config["mask"], ndim=2)[0].array != 0
        if mask.shape != frames[0].shape:
            raise readers.InputError(f"--mask={config['mask']} has shape {mask.shape}, the frames "
                                     f"{frames[0].shape}")
        mask_path = config["mask"]
        box = None
    else:
        box = ultrasound_box(path, frames[0])
        mask = sector_mask(stack, box, config["mask_threshold"])
        mask_path = os.path.join(logdir, "sector_mask.npy")
        np.save(mask_path, mask.astype(np.uint8))
        from PIL import Image as PILImage

        PILImage.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(logdir, "sector_mask.png"))
    save_mask_check(os.path.join(logdir, "sector_mask_check.png"), stack, mask, box)
    if not str(config["spacing"]).strip():
        config["spacing"] = ",".join(f"{config['downsample'] * s:.6g}" for s in frames[0].spacing)
    if str(config["shape"]).strip().lower() == "auto":
        spacing = train._floats(config["spacing"], "spacing")
        spacing = (spacing,) * 2 if np.isscalar(spacing) else spacing
        spacings = [int(t) for t in str(config.get("stages") or "").split(",") if t.strip().isdigit()]
        multiple = max(spacings or [int(config["grid_spacing"])])  # the coarsest B-spline stage
        config["shape"] = ",".join(str(n) for n in auto_shape(mask, frames[0].spacing, spacing, multiple))
    config.update(images=path, mask=mask_path)
    print(f"[echo] {len(frames)} frames of {frames[0].shape[0]}x{frames[0].shape[1]} pixels at "
          f"{frames[0].spacing[0]:.4g} mm; sector mask {int(mask.sum())} pixels ({100 * mask.mean():.1f} %) "
          f"-> {mask_path}; model grid {config['shape']} at {config['spacing']} mm", flush=True)
    return config, frames, mask


# --------------------------------------------------------------------------- scores


def cycle_residual(forward, backward, mask=None, spacing=None):
    """Inverse consistency of two registrations: the round trip a -> b -> a.

    ``forward`` registers (fixed a, moving b): ``x -> x + forward(x)`` maps points of a to b;
    ``backward`` registers (fixed b, moving a).  The round trip is
    ``x + forward(x) + backward(x + forward(x))`` = ``x + total(x)`` with ``total`` =
    :func:`~dirnet_tf.warping.compose_displacements` ``(backward, forward)``; for consistent
    registrations ``total`` is 0.

    Parameters
    ----------
    forward, backward : arrays ``[N, H, W, 2]`` (or ``[H, W, 2]``)
        Displacements in pixels of the model grid, ij order.
    mask : array of bool ``[H, W]`` or None
        Pixels (of a) averaged over (default all).
    spacing : sequence of float or None
        mm per axis (default 1: the mm values equal the pixel values).

    Returns
    -------
    dict
        ``pixels`` and ``mm``: float arrays ``[N]``, the mean ``|total|`` inside ``mask`` per pair.
    """
    forward = np.asarray(forward, np.float32)
    backward = np.asarray(backward, np.float32)
    if forward.ndim == 3:
        forward, backward = forward[None], backward[None]
    total = compose_displacements(backward, forward).numpy().astype(np.float64)
    mask = np.ones(total.shape[1:-1], bool) if mask is None else np.asarray(mask, bool)
    spacing = np.ones(total.shape[-1]) if spacing is None else np.asarray(spacing, np.float64)
    pixels = np.linalg.norm(total, axis=-1)[:, mask].mean(axis=1)
    mm = np.linalg.norm(total * spacing, axis=-1)[:, mask].mean(axis=1)
    return {"pixels": pixels, "mm": mm}


def score(fixed, warped, displacement, sector, spacing, eval_pairs):
    """Scores of registrations of the test pairs: NCC in the sector, folding, cycle consistency.

    Parameters
    ----------
    fixed, warped : arrays ``[P, H, W, 1]``
    displacement : array ``[P, H, W, 2]`` (pixels of the model grid, ij order)
    sector : array of bool ``[H, W]`` (model grid)
    spacing : sequence of float (mm per axis)
    eval_pairs : int array ``[P, 2]`` (fixed, moving) frame indices

    Returns
    -------
    (dict, dict)
        Summary (JSON-able) and per-pair arrays (``ncc``, ``folding``).
    """
    ncc = np.array([metrics.ncc(f[..., 0][sector], w[..., 0][sector]) for f, w in zip(fixed, warped)])
    det = metrics.jacobian_determinant(displacement)
    folding = (det <= 0).reshape(len(det), -1).mean(axis=1)
    folding_sector = (det[:, sector] <= 0).mean(axis=1)
    index = {tuple(p): k for k, p in enumerate(np.asarray(eval_pairs).tolist())}
    forward = [k for k, (a, b) in enumerate(np.asarray(eval_pairs).tolist()) if (b, a) in index]
    backward = [index[tuple(np.asarray(eval_pairs)[k][::-1].tolist())] for k in forward]
    summary = {"ncc_sector": float(ncc.mean()), "ncc_sector_median": float(np.median(ncc)),
               "folding_fraction": float(folding.mean()), "folding_fraction_sector": float(folding_sector.mean()),
               "pairs_with_folding": int((folding > 0).sum()),
               "mean_displacement_sector_mm": float(
                   np.linalg.norm(displacement * np.asarray(spacing), axis=-1)[:, sector].mean())}
    if forward:
        cyc = cycle_residual(displacement[forward], displacement[backward], sector, spacing)
        summary.update(cycle_residual_pixels=float(cyc["pixels"].mean()), cycle_residual_mm=float(cyc["mm"].mean()),
                       cycle_pairs=len(forward))
    return summary, {"ncc": ncc, "folding": folding}


def elastix_register(fixed, moving, mask, parameter_file=ELASTIX_PARAMETER_FILE, threads=None):
    """elastix B-spline registration of pairs, with ``mask`` as the fixed-image mask.

    :meth:`benchmarks.elastix_baseline.ElastixRegistration.register_batch` (``warped(p) =
    M(p + displacement(p))``, pixels, ij order) with ``fixed_mask=mask``.

    Parameters
    ----------
    fixed, moving : arrays ``[N, H, W, 1]``
    mask : array of bool ``[H, W]``
    parameter_file : str
    threads : int or None
        Threads per registration (None: ``baselines/elastix/settings.json``).

    Returns
    -------
    dict
        ``warped`` ``[N, H, W, 1]``, ``displacement`` ``[N, H, W, 2]`` and ``seconds`` ``[N]`` (the
        registration with its image conversions; the displacement field is computed afterwards,
        untimed).
    """
    from dirnet_tf.elastix import ElastixRegistration

    reg = ElastixRegistration(parameter_file=parameter_file, threads=threads)
    try:
        return reg.register_batch(fixed, moving, fixed_mask=mask)
    finally:
        reg.close()


def by_gap(eval_pairs, **ncc):
    """Mean of per-pair values per frame gap ``|a - b|``: ``{gap: {"pairs": n, name: mean}}``."""
    gaps = np.abs(np.asarray(eval_pairs)[:, 0] - np.asarray(eval_pairs)[:, 1])
    return {str(int(g)): dict(pairs=int((gaps == g).sum()),
                              **{k: float(np.asarray(v)[gaps == g].mean()) for k, v in ncc.items()})
            for g in np.unique(gaps)}


# --------------------------------------------------------------------------- figures


def save_mask_check(path, frames, mask, box=None):
    """Frame 0 and the temporal standard deviation, with the sector mask's contour (and the box)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, img, title in ((axes[0], frames[0], "frame 0"), (axes[1], frames.std(axis=0), "std over time")):
        ax.imshow(img, cmap="gray")
        ax.contour(mask, [0.5], colors="r", linewidths=1)
        if box is not None:
            r0, r1, c0, c1 = box
            ax.plot([c0, c1, c1, c0, c0], [r0, r0, r1, r1, r0], "y--", lw=0.8)
        ax.set_title(f"{title}: sector mask (red), ultrasound region (yellow)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_strip(path, frames, mask, model_images, splits, every=3):
    """A strip of the cine: frames with the sector contour (top) and the model's input (bottom)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    split_of = {int(i): name for name, members in splits.items() for i in members}
    shown = list(range(0, len(frames), every))
    fig, axes = plt.subplots(2, len(shown), figsize=(1.5 * len(shown), 2.9), squeeze=False)
    for c, t in enumerate(shown):
        axes[0, c].imshow(frames[t], cmap="gray")
        axes[0, c].contour(mask, [0.5], colors="r", linewidths=0.5)
        axes[0, c].set_title(f"frame {t}\n{split_of.get(t, '')}", fontsize=7)
        axes[1, c].imshow(model_images[t, ..., 0], cmap="gray", vmin=0, vmax=1)
        for r in range(2):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    axes[0, 0].set_ylabel("file", fontsize=7)
    axes[1, 0].set_ylabel("model input", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_pairs(ncc_before, count):
    """Indices of ``count`` pairs spread over the range of NCC before registration (hardest first)."""
    order = np.argsort(ncc_before, kind="stable")
    if len(order) <= count:
        return order
    return order[np.unique(np.round(np.linspace(0, len(order) - 1, count)).astype(int))]


def save_registration(path, fixed, moving, pred, elastix_ncc, eval_pairs, ncc_before, ncc_after, count):
    """Fixed / moving / warped / grid of a few test pairs (titles: frames and sector NCC)."""
    import matplotlib.pyplot as plt

    from dirnet_tf.plotting import registration_figure

    keep = figure_pairs(ncc_before, count)
    titles = []
    for k in keep:
        a, b = eval_pairs[k]
        text = f"frame {a} <- {b}\nNCC {ncc_before[k]:.2f} -> {ncc_after[k]:.2f}"
        if elastix_ncc is not None:
            text += f"\n(elastix {elastix_ncc[k]:.2f})"
        titles.append(text)
    fig = registration_figure(fixed[keep], moving[keep], pred["warped"][keep], pred["displacement"][keep],
                              titles=titles, grid_step=4, max_cols=len(keep))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- run


def evaluate_echo(config, frames, mask, result, start):
    """The post-step on the export: sector scores, cycle consistency, elastix, figures.

    Returns
    -------
    dict
        The ``echo`` section of ``metrics.json``.
    """
    data = train.load_collection(config)
    plan = train.make_splits_and_pairs(config, data)
    grid, images, test = data["grid"], data["images"], plan["test"]
    spacing = np.asarray(grid.spacing, np.float64)
    sector = grid.prepare_labels(mask.astype(np.int32), frames[0]) > 0
    fixed, moving = images[test[:, 0]], images[test[:, 1]]
    served, _ = load_export(config["export_dir"])
    pred = predict(served, fixed, moving, batch_size=max(1, config["timing_batch_size"]))
    before = np.array([metrics.ncc(f[..., 0][sector], m[..., 0][sector]) for f, m in zip(fixed, moving)])
    dirnet, per_dirnet = score(fixed, pred["warped"], pred["displacement"], sector, spacing, test)
    dirnet.update(ms_per_pair=result["ms_per_pair"], timing_batch_size=result["timing_batch_size"])
    echo = {"file": portable_path(config["images"]), "frames": len(frames),
            "frame_shape": list(frames[0].shape), "frame_spacing_mm": [float(s) for s in frames[0].spacing],
            "mask": portable_path(config["mask"]), "mask_pixels": int(mask.sum()),
            "sector_pixels_model_grid": int(sector.sum()),
            "model_grid": {"shape": list(grid.shape), "spacing_mm": [float(s) for s in grid.spacing]},
            "units": "displacements and cycle residuals in pixels of the model grid (ij); *_mm in mm",
            "test_frames": [int(i) for i in plan["splits"]["test"]], "pairs": int(len(test)),
            "no_registration": {"ncc_sector": float(before.mean()), "ncc_sector_median": float(np.median(before))},
            "dirnet": dirnet}
    gap_values = {"before": before, "dirnet": per_dirnet["ncc"]}
    elastix_ncc = None
    if config["elastix"]:
        print(f"[echo] elastix on the {len(test)} test pairs ...", flush=True)
        out = elastix_register(fixed, moving, sector, config["elastix_parameter_file"],
                               config["elastix_threads"] or None)
        el, per_el = score(fixed, out["warped"], out["displacement"], sector, spacing, test)
        el.update(ms_per_pair=float(1000 * np.median(out["seconds"])),
                  ms_per_pair_mean=float(1000 * np.mean(out["seconds"])),
                  parameter_file=os.path.relpath(config["elastix_parameter_file"], ROOT),
                  fixed_mask="sector")
        echo["elastix"] = el
        echo["speedup"] = el["ms_per_pair"] / dirnet["ms_per_pair"]
        gap_values["elastix"] = elastix_ncc = per_el["ncc"]
    echo["ncc_sector_by_gap"] = by_gap(test, **gap_values)
    logdir = config["logdir"]
    save_registration(os.path.join(logdir, "echo_registration.png"), fixed, moving, pred, elastix_ncc, test,
                      before, per_dirnet["ncc"], config["figure_pairs"])
    save_strip(os.path.join(logdir, "echo_strip.png"), np.stack([f.array for f in frames]), mask, images,
               plan["splits"])
    echo["seconds"] = time.perf_counter() - start
    echo["comparison"] = comparison(echo)
    return echo


def comparison(echo):
    """Differences a reader checks first: the NCC gain over no registration and the gap to elastix."""
    out = {"ncc_gain": echo["dirnet"]["ncc_sector"] - echo["no_registration"]["ncc_sector"]}
    if "elastix" in echo:
        out["ncc_below_elastix"] = echo["elastix"]["ncc_sector"] - echo["dirnet"]["ncc_sector"]
        out["speedup"] = echo["speedup"]
    return out


def _print_summary(echo):
    rows = [("no registration", echo["no_registration"])] + [(k, echo[k]) for k in ("dirnet", "elastix") if k in echo]
    print("[echo] method            NCC(sector)  folding %  cycle px / mm   ms/pair", flush=True)
    for name, r in rows:
        cyc = (f"{r['cycle_residual_pixels']:.3f} / {r['cycle_residual_mm']:.3f}"
               if "cycle_residual_pixels" in r else "-")
        fold = f"{100 * r['folding_fraction']:.3f}" if "folding_fraction" in r else "-"
        ms = f"{r['ms_per_pair']:.2f}" if "ms_per_pair" in r else "-"
        print(f"[echo] {name:<17} {r['ncc_sector']:.4f}      {fold:>8}   {cyc:<14}  {ms}", flush=True)
    if "speedup" in echo:
        print(f"[echo] speed-up (elastix / DIRNet batched): {echo['speedup']:.0f}x", flush=True)
    c = echo["comparison"]
    print(f"[echo] sector NCC gain over no registration: {c['ncc_gain']:+.4f}"
          + (f"; below elastix by {c['ncc_below_elastix']:.4f}" if "ncc_below_elastix" in c else ""), flush=True)


def run(config):
    """Prepare the echo inputs, train with :func:`experiments.train.run`, then score the export.

    Parameters
    ----------
    config : dict
        Flag values (those of ``python -m experiments.train`` plus this command's).

    Returns
    -------
    dict
        The metrics written to ``metrics.json``: the train command's plus ``echo``.
    """
    start = time.perf_counter()
    config, frames, mask = prepare_inputs(config)
    return train.run_example(config, "echo", lambda result: evaluate_echo(config, frames, mask, result, start),
                             _print_summary, "echo_registration.png and echo_strip.png", portable_path)


def main():
    """Command line: apply this command's defaults, then parse flags and run."""
    common.run_experiment(run, DEFAULTS, errors=(readers.InputError,))


if __name__ == "__main__":
    main()
