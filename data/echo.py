"""An echocardiography cine as DIRNet inputs: pydicom's example file, the ultrasound sector mask.

**Data.** pydicom's wheel holds a real ultrasound cine, ``pydicom/data/test_files/
examples_ybr_color.dcm`` (a SonoSite echocardiogram: 30 colour frames of 240x320 pixels, frame
time 33 ms, about one heart beat).  :func:`example_echo_file` finds it in the installed package
(its ``data/test_files`` folder, else ``pydicom.data.get_testdata_file(download=False)``); it is
never downloaded.  :func:`read_echo_cine` reads any multi-frame ultrasound DICOM with
:mod:`dirnet_tf.readers`, which converts the frames to grey and takes the pixel size from the
ultrasound-region metadata; those describe a 2x larger original, so the reader halves the region
box and doubles the pixel size (1.021 mm, with a :class:`~dirnet_tf.readers.GeometryWarning`).

**Sector mask.** Only the ultrasound sector may drive the similarity: the text overlay, the depth
scale, the orientation marker and the ECG/status bar outside it must not.  :func:`sector_mask`
builds the mask from the frames: pixels whose intensity varies over time (temporal standard
deviation above ``threshold`` times its 99th percentile), restricted to the (corrected)
ultrasound region box (:func:`ultrasound_box`), opened (3x3), the largest connected part kept,
closed (5x5) and filled, replaced by its convex hull (a phased-array sector is convex) and cut to
the box again; static bright pixels (overlay text or markers: no change over time) inside it are
removed with a 2-pixel margin.

**Model grid.** :func:`sector_grid_shape` is the smallest grid, a multiple of the coarsest
B-spline stage's spacing per axis, that holds the sector mask when centred on the image.

:func:`prepare_echo_inputs` does all of it for a training run: it reads the cine, builds (or
reads) the mask and writes ``sector_mask.npy`` / ``.png`` and the check figure
``sector_mask_check.png`` (:func:`save_mask_check`).  Arrays are ``[row, column]`` (ij) on the
frames' pixel grid; spacings in mm.
"""

import collections
import os
import warnings

import numpy as np
from scipy import ndimage
from scipy.spatial import Delaunay

from dirnet_tf import files, readers

__all__ = ["EXAMPLE_FILE", "ECHO_INSTALL_HINT", "EchoInputs", "example_echo_file", "portable_echo_path",
           "read_echo_cine", "ultrasound_box", "convex_hull_mask", "sector_mask", "sector_grid_shape",
           "save_mask_check", "save_cine_strip", "prepare_echo_inputs"]

EXAMPLE_FILE = "examples_ybr_color.dcm"
ECHO_INSTALL_HINT = ("the example echocardiogram comes with pydicom: `pip install pydicom` "
                "(or `pip install -e .[medical]`), or give --images=FILE")

#: What :func:`prepare_echo_inputs` returns: the cine ``path``, its ``frames`` (list of grey
#: :class:`~dirnet_tf.readers.Image`), the sector ``mask`` (bool ``[H, W]`` on the frames' grid),
#: ``mask_path`` (the file given to training) and the ultrasound region ``box`` (or None).
EchoInputs = collections.namedtuple("EchoInputs", ["path", "frames", "mask", "mask_path", "box"])


def example_echo_file():
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
        raise FileNotFoundError(ECHO_INSTALL_HINT) from exc
    try:
        return files.package_file("pydicom", f"data/test_files/{EXAMPLE_FILE}")
    except FileNotFoundError:
        pass
    try:  # never downloads: this file is one of the test files inside the wheel
        path = pydicom_data.get_testdata_file(EXAMPLE_FILE, download=False)
    except TypeError:  # a pydicom without the download argument: do not risk a download
        path = None
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"pydicom {pydicom.__version__} does not ship {EXAMPLE_FILE}; "
                                "give --images=FILE")
    return path


def portable_echo_path(path):
    """``path`` for a results file (:func:`dirnet_tf.files.portable_path`; pydicom's example as
    ``pydicom:<version>/data/test_files/<name>``)."""
    return files.portable_path(path, ("pydicom",))


def read_echo_cine(path):
    """The frames of a multi-frame (ultrasound) DICOM file as grey :class:`~dirnet_tf.readers.Image` s.

    Metadata corrections of the reader (:class:`~dirnet_tf.readers.GeometryWarning`) are printed once.

    Returns
    -------
    list of Image
        One 2-D image per frame, all in one group, spacing in mm.

    Raises
    ------
    dirnet_tf.readers.InputError
        Fewer than three frames.
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
        One of its frames as read by :func:`read_echo_cine` (for the pixel size and the shape).

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


def convex_hull_mask(mask):
    """``mask`` (bool ``[H, W]``) with every pixel inside the convex hull of its pixels set."""
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
    sector = convex_hull_mask(ndimage.binary_fill_holes(sector)) & inside_box
    static = (std <= static_std * limit) & (mean > static_brightness * max(np.percentile(mean, 99), 1e-12))
    return sector & ~ndimage.binary_dilation(static, iterations=2)


def sector_grid_shape(mask, image_spacing, model_spacing, multiple):
    """Smallest model grid (a multiple of ``multiple`` voxels per axis) holding ``mask`` when centred.

    The training pipeline centres the model grid on the image; the grid must reach the mask pixel
    farthest from the centre on each axis.

    Parameters
    ----------
    mask : array of bool ``[H, W]`` on the image grid.
    image_spacing, model_spacing : sequence of float
        mm per axis.
    multiple : int
        The B-spline grid spacing (voxels of the model grid).

    Returns
    -------
    tuple of int
        Voxels per axis (ij order).
    """
    shape = []
    for axis, (n, s, m) in enumerate(zip(mask.shape, image_spacing, model_spacing)):
        index = np.flatnonzero(mask.any(axis=1 - axis))
        reach = np.max(np.abs(index - (n - 1) / 2.0)) + 1.0  # pixels from the centre, with a margin
        voxels = int(np.ceil(2 * reach * s / m))
        shape.append(int(multiple * np.ceil(voxels / multiple)))
    return tuple(shape)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_mask_check(path, frames, mask, box=None):
    """Frame 0 and the temporal standard deviation, with the sector mask's contour (and the box).

    ``frames`` ``[T, H, W]``, ``mask`` bool ``[H, W]``, ``box`` as :func:`ultrasound_box`.
    Returns ``path``.
    """
    plt = _pyplot()
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


def save_cine_strip(path, frames, mask, model_images, splits, every=3):
    """A strip of the cine: frames with the sector contour (top) and the model's input (bottom).

    ``frames`` ``[T, H, W]`` (file grid), ``model_images`` ``[T, h, w, 1]`` (model grid, in
    [0, 1]), ``splits`` ``{name: frame indices}`` (shown in the titles).  Returns ``path``.
    """
    plt = _pyplot()
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


def prepare_echo_inputs(logdir, images="", mask="", threshold=0.06):
    """Read the cine and find (or read) its sector mask; write the mask files into ``logdir``.

    Parameters
    ----------
    logdir : str
        Created; receives ``sector_mask.npy`` (uint8 0/1), ``sector_mask.png`` (unless ``mask``
        names a mask) and ``sector_mask_check.png``.
    images : str
        A multi-frame ultrasound DICOM ("": pydicom's example, :func:`example_echo_file`).
    mask : str
        A mask file on the frames' grid (any readable format, non-zero = sector); "": build it
        with :func:`sector_mask`.
    threshold : float
        :func:`sector_mask`'s ``threshold``.

    Returns
    -------
    EchoInputs
    """
    path = images or example_echo_file()
    frames = read_echo_cine(path)
    os.makedirs(logdir, exist_ok=True)
    stack = np.stack([f.array for f in frames])
    if mask:
        sector = readers.read_image(mask, ndim=2)[0].array != 0
        if sector.shape != frames[0].shape:
            raise readers.InputError(f"--mask={mask} has shape {sector.shape}, the frames {frames[0].shape}")
        mask_path, box = mask, None
    else:
        box = ultrasound_box(path, frames[0])
        sector = sector_mask(stack, box, threshold)
        mask_path = os.path.join(logdir, "sector_mask.npy")
        np.save(mask_path, sector.astype(np.uint8))
        from PIL import Image as PILImage

        PILImage.fromarray(sector.astype(np.uint8) * 255).save(os.path.join(logdir, "sector_mask.png"))
    save_mask_check(os.path.join(logdir, "sector_mask_check.png"), stack, sector, box)
    return EchoInputs(path, frames, sector, mask_path, box)
