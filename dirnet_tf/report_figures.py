"""Figures of a registration report written to files: chosen 2-D pairs, orthogonal slices of volumes.

* :func:`spread_pairs` -- which pairs to show: spread over the range of a score (hardest first);
* :func:`save_pair_figure` -- fixed / moving / warped / deformation grid of 2-D pairs
  (:func:`dirnet_tf.plotting.registration_figure`) saved as an image;
* :func:`save_orthogonal_slices` -- rows of the three central orthogonal slices of RAS volumes
  (images, a deformation grid over the moving image, an error map; :func:`registration_slice_panels`
  lays out one registration), with :func:`display_slice`
  and :func:`display_slice_field` turning a slice and a field's in-plane components into display
  order (superior / anterior up).

Volumes are ``[D, H, W]`` or ``[D, H, W, 1]`` in array (ij) order with RAS world axes;
displacements in voxels, ij order; error maps in mm.
"""

import numpy as np

__all__ = ["spread_pairs", "save_pair_figure", "display_slice", "display_slice_field", "registration_slice_panels",
           "save_orthogonal_slices"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def spread_pairs(scores, count):
    """Indices of ``count`` pairs spread over the range of ``scores`` (lowest first; all if fewer)."""
    order = np.argsort(scores, kind="stable")
    if len(order) <= count:
        return order
    return order[np.unique(np.round(np.linspace(0, len(order) - 1, count)).astype(int))]


def save_pair_figure(path, fixed, moving, warped, displacement, titles, grid_step=4, dpi=110):
    """Fixed / moving / warped / grid of 2-D pairs, one column each, saved to ``path``.

    ``fixed``, ``moving``, ``warped`` ``[P, H, W, 1]``; ``displacement`` ``[P, H, W, 2]`` (pixels,
    ij); ``titles`` one per pair.  Returns ``path``.
    """
    plt = _pyplot()
    from dirnet_tf.plotting import registration_figure

    fig = registration_figure(fixed, moving, warped, displacement, titles=titles, grid_step=grid_step,
                              max_cols=len(fixed))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def display_slice(volume, axis):
    """Central slice across ``axis`` of an RAS volume ``[D, H, W]``, oriented for display (superior / anterior up)."""
    centre = volume.shape[axis] // 2
    plane = np.take(volume, centre, axis=axis)  # 2-D, the other two axes in order
    return plane.T[::-1]


def display_slice_field(field, axis):
    """The in-plane components of ``field`` ``[D, H, W, 3]`` on :func:`display_slice`'s slice, in
    display (row, col) order (voxels)."""
    in_plane = [a for a in range(3) if a != axis]
    plane = np.take(field, field.shape[axis] // 2, axis=axis)[..., in_plane]  # [A, B, 2] (u_a, u_b)
    rows = -plane[..., 1].T[::-1]  # display rows run against axis b
    cols = plane[..., 0].T[::-1]
    return np.stack([rows, cols], axis=-1)


def registration_slice_panels(fixed, moving, warped, displacement, baseline_warped=None, true_displacement=None,
                              spacing=None):
    """The rows of :func:`save_orthogonal_slices` for one 3-D registration.

    fixed / moving / DIRNet warped / (elastix warped) / DIRNet's grid over the moving image /
    (endpoint error against ``true_displacement``, in mm).

    Parameters
    ----------
    fixed, moving, warped, baseline_warped : arrays ``[D, H, W, 1]`` (``baseline_warped`` optional)
    displacement, true_displacement : arrays ``[D, H, W, 3]`` (voxels, ij; ``true_displacement`` optional)
    spacing : sequence of 3 float or None
        mm per axis, for the endpoint error (None: 1).

    Returns
    -------
    list of (name, kind, value)
    """
    panels = [("fixed", "image", fixed), ("moving", "image", moving), ("DIRNet warped", "image", warped)]
    if baseline_warped is not None:
        panels.append(("elastix warped", "image", baseline_warped))
    panels.append(("DIRNet grid", "grid", (displacement, moving)))
    if true_displacement is not None:
        scale = np.asarray(1.0 if spacing is None else spacing)
        panels.append(("endpoint error", "error", np.linalg.norm((displacement - true_displacement) * scale, axis=-1)))
    return panels


def save_orthogonal_slices(path, panels, title, grid_step=4):
    """Rows of three orthogonal central slices (sagittal, coronal, axial), saved to ``path``.

    Parameters
    ----------
    path : str
    panels : list of (name, kind, value)
        ``kind``: ``"image"`` (``[D, H, W, 1]`` or ``[D, H, W]``, intensities in [0, 1]),
        ``"grid"`` (``value = (field, moving)``: a field ``[D, H, W, 3]`` in voxels drawn over the
        moving image) or ``"error"`` (a map in mm, colour scale 0-4 mm).
    title : str
    grid_step : int
        Spacing of the drawn grid lines (voxels).

    Returns
    -------
    str
        ``path``.
    """
    plt = _pyplot()
    from dirnet_tf.plotting import draw_deformation_grid

    fig, axes = plt.subplots(len(panels), 3, figsize=(7.2, 2.3 * len(panels)), squeeze=False)
    for row, (name, kind, value) in enumerate(panels):
        for axis, view in enumerate(("sagittal", "coronal", "axial")):
            ax = axes[row, axis]
            if kind == "grid":
                field, background = value
                ax.imshow(display_slice(np.asarray(background)[..., 0], axis), cmap="gray", vmin=0, vmax=1,
                          alpha=0.4)
                draw_deformation_grid(ax, display_slice_field(np.asarray(field), axis), grid_step, linewidth=0.4)
            elif kind == "error":
                shown = ax.imshow(display_slice(np.asarray(value), axis), cmap="magma", vmin=0, vmax=4)
                if axis == 2:
                    fig.colorbar(shown, ax=ax, fraction=0.046, label="mm")
            else:
                image = np.asarray(value)
                image = image[..., 0] if image.ndim == 4 else image
                ax.imshow(display_slice(image, axis), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(view, fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.3 * len(panels))))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
