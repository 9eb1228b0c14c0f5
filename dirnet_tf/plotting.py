"""Figures of registrations (matplotlib): the paper's fixed / moving / warped / grid panel.

:func:`draw_deformation_grid` draws the sampling grid ``x + u(x)`` of a 2-D
field (where each fixed-image pixel takes its value from in the moving image);
:func:`registration_figure` lays out 2-D pairs in columns with rows fixed / moving /
warped / grid; :func:`volume_figure` shows one 3-D pair as its three central
orthogonal slices; :func:`figure_to_image` renders a figure for
``tf.summary.image``; :func:`save_test_figure` writes a training run's ``registration.png``.
"""

import io
import os

import numpy as np

__all__ = ["draw_deformation_grid", "registration_figure", "volume_figure", "figure_to_image",
           "save_test_figure", "distinct_first"]


def _to_numpy(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def draw_deformation_grid(ax, displacement, step=2, color="tab:red", linewidth=0.6):
    """Draw the sampling grid ``x + u(x)`` of a 2-D field on ``ax`` (image axes, row 0 on top).

    Parameters
    ----------
    ax : matplotlib Axes
    displacement : array ``[H, W, 2]`` in pixels, ij order.
    step : int
        Spacing of the drawn grid lines in pixels.
    color, linewidth
        Line style.
    """
    displacement = _to_numpy(displacement)
    h, w = displacement.shape[:2]
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    si = ii + displacement[..., 0]
    sj = jj + displacement[..., 1]
    for k in range(0, h, step):
        ax.plot(sj[k, :], si[k, :], color=color, lw=linewidth)
    for k in range(0, w, step):
        ax.plot(sj[:, k], si[:, k], color=color, lw=linewidth)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def registration_figure(fixed, moving, warped, displacement, titles=None, grid_step=2, max_cols=8):
    """Matplotlib figure like the paper's: rows fixed / moving / warped / deformation grid.

    The last row draws the sampling grid ``x + u(x)`` (every ``grid_step`` pixels) over
    the (faded) moving image: where each fixed-image pixel takes its value from in the
    moving image. 2-D images only.

    Parameters
    ----------
    fixed, moving, warped : arrays ``[N, H, W, C]`` (first channel shown).
    displacement : array ``[N, H, W, 2]`` in pixels, ij order.
    titles : list of str or None
        Column titles.
    grid_step : int
        Spacing of the drawn grid lines in pixels.
    max_cols : int
        At most this many pairs.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fixed, moving, warped, displacement = (_to_numpy(a) for a in (fixed, moving, warped, displacement))
    n = min(len(fixed), max_cols)
    fig, axes = plt.subplots(4, n, figsize=(1.6 * n, 6.6), squeeze=False)
    rows = ("fixed", "moving", "warped", "grid on moving")
    for c in range(n):
        for r, img in enumerate((fixed[c], moving[c], warped[c], moving[c])):
            ax = axes[r, c]
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=max(1.0, float(img.max())),
                      alpha=0.35 if r == 3 else 1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(rows[r])
        draw_deformation_grid(axes[3, c], displacement[c], grid_step)
        if titles is not None:
            axes[0, c].set_title(titles[c], fontsize=8)
    fig.tight_layout()
    return fig

def figure_to_image(fig, dpi=80):
    """Render a matplotlib figure to a uint8 ``[1, H, W, 4]`` array (for ``tf.summary.image``)."""
    import matplotlib.pyplot as plt
    import tensorflow as tf

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return tf.image.decode_png(buf.getvalue(), channels=4)[None]


def volume_figure(fixed, moving, warped, displacement, title=None, grid_step=4):
    """One 3-D registration as the three central orthogonal slices.

    Rows fixed / moving / warped / grid on moving; columns the central slice across each
    array axis (axis 0, 1, 2).  The grid row draws the in-plane components of the sampling
    grid ``x + u(x)`` of that slice.

    Parameters
    ----------
    fixed, moving, warped : arrays ``[D, H, W, C]`` (first channel shown).
    displacement : array ``[D, H, W, 3]`` in voxels, ij order.
    title : str or None
    grid_step : int
        Spacing of the drawn grid lines in voxels.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fixed, moving, warped, displacement = (_to_numpy(a) for a in (fixed, moving, warped, displacement))
    fig, axes = plt.subplots(4, 3, figsize=(6.0, 8.0), squeeze=False)
    vmax = max(1.0, float(fixed.max()))
    for axis in range(3):
        centre = fixed.shape[axis] // 2
        take = [slice(None)] * 3
        take[axis] = centre
        in_plane = [a for a in range(3) if a != axis]
        for row, image in enumerate((fixed, moving, warped, moving)):
            ax = axes[row, axis]
            ax.imshow(image[tuple(take)][..., 0], cmap="gray", vmin=0, vmax=vmax, alpha=0.35 if row == 3 else 1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        draw_deformation_grid(axes[3, axis], displacement[tuple(take)][..., in_plane], grid_step)
        axes[0, axis].set_title(f"slice {centre} of axis {axis}", fontsize=8)
    for row, name in enumerate(("fixed", "moving", "warped", "grid on moving")):
        axes[row, 0].set_ylabel(name)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_test_figure(path, pred, names, eval_pairs, max_pairs=8):
    """A training run's test pairs as a figure at ``path`` (PNG).

    2-D: up to ``max_pairs`` pairs (columns; rows fixed / moving / warped / grid), pairs of different
    fixed images first (:func:`distinct_first`), titled by file names (on separate lines) and NCC;
    3-D: the first pair's central slices.

    Parameters
    ----------
    path : str
    pred : dict
        :func:`dirnet_tf.evaluation.evaluate_test_pairs`' predictions (``fixed``, ``moving``,
        ``warped``, ``displacement``, ``ncc_before``, ``ncc_after``; ``epe_mm`` for synthetic pairs).
    names : list of str
        The collection's sources.
    eval_pairs : int array ``[P, 2]`` or dict (synthetic pairs, ``index``: the image of each pair)

    Returns
    -------
    str
        ``path``.
    """
    import matplotlib.pyplot as plt

    if isinstance(eval_pairs, dict):  # one image and its known deformation: titles name the image and the error
        fixed_index = np.asarray(eval_pairs["index"])
        labels = [f"{_short(names[i])}\n(synthetic)" for i in fixed_index]
        errors = [f"\nEPE {e:.2f} mm" for e in pred["epe_mm"]]
    else:
        fixed_index = np.asarray(eval_pairs)[:, 0]
        labels = [f"{_short(names[a])}\n<-{_short(names[b])}" for a, b in eval_pairs]
        errors = [""] * len(labels)
    if pred["fixed"].ndim == 4:
        shown = distinct_first(fixed_index, max_pairs)
        titles = [f"{labels[k]}\nNCC {pred['ncc_before'][k]:.2f}->{pred['ncc_after'][k]:.2f}{errors[k]}"
                  for k in shown]
        fig = registration_figure(pred["fixed"][shown], pred["moving"][shown], pred["warped"][shown],
                                  pred["displacement"][shown], titles=titles, max_cols=len(shown))
    else:
        fig = volume_figure(pred["fixed"][0], pred["moving"][0], pred["warped"][0], pred["displacement"][0],
                            title=f"NCC {pred['ncc_before'][0]:.3f} -> {pred['ncc_after'][0]:.3f}{errors[0]}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def distinct_first(keys, count):
    """Indices of up to ``count`` items, those with a ``key`` not seen before first, in order.

    E.g. the fixed image of each test pair: a figure of random pairs then shows different fixed images
    rather than the first fixed image with several moving ones.
    """
    seen, first, rest = set(), [], []
    for k, key in enumerate(np.asarray(keys).tolist()):
        (rest if key in seen else first).append(k)
        seen.add(key)
    return (first + rest)[:max(0, int(count))]


def _short(name, width=18):
    """A file's base name, shortened in the middle to ``width`` characters (figure titles)."""
    base = os.path.basename(str(name))
    return base if len(base) <= width else base[:width // 2 - 1] + ".." + base[-(width - width // 2 - 1):]
