"""Figures of registrations (matplotlib): the paper's fixed / moving / warped / grid panel.

:func:`draw_deformation_grid` draws the sampling grid ``x + u(x)`` of a 2-D
field (where each fixed-image pixel takes its value from in the moving image);
:func:`registration_figure` lays out pairs in columns with rows fixed / moving /
warped / grid; :func:`figure_to_image` renders a figure for
``tf.summary.image``.
"""

import io

import numpy as np

__all__ = ["draw_deformation_grid", "registration_figure", "figure_to_image"]


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
