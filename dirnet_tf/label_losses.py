"""Overlap losses of label maps carried by a predicted field (training without intensity similarity).

A registration network trained on synthetic images with random contrast
(:mod:`dirnet_tf.label_synthesis`, SynthMorph-style) cannot be trained on an intensity
similarity: the two images of a pair have unrelated intensities.  What is known is the label
map of each image.  The moving label map, one-hot encoded, is warped by the predicted field
with multilinear interpolation (:func:`dirnet_tf.warping.warp`, differentiable in the field),
which gives a *soft* label map on the fixed grid, and is compared with the fixed one-hot map:

* :func:`soft_dice` -- per pair, the mean over labels of ``2 sum(f_k w_k) / (sum f_k + sum
  w_k)`` (``f`` fixed one-hot, ``w`` carried moving map, sums over the voxels); labels present
  in neither map are left out of the mean (a label that does not occur says nothing);
  :func:`dice_loss` is ``1 - soft_dice``.
* :func:`one_hot_mse_loss` -- per pair, the mean over voxels and the chosen labels of ``(f_k -
  w_k)^2``.

Soft Dice is the default of :func:`label_objective` because it weighs every label equally
whatever its volume (grey matter, white matter and CSF are all small next to the background),
while the MSE is dominated by the large classes.

:func:`label_objective` adds the model's regularisers (the bending energy of every B-spline
step, the folding penalty) and returns a loss function of the
:class:`dirnet_tf.trainer.Trainer` signature ``(batch, outputs) -> (per_pair [B], parts)``.

Shapes: label maps ``[B, *spatial]`` (integers ``0 .. num_labels - 1``) or one-hot / soft maps
``[B, *spatial, K]``; fields ``[B, *spatial, ndim]`` in voxels of the model grid, ij order.
2-D and 3-D.
"""

import tensorflow as tf

from dirnet_tf.losses import bending_energy, folding_penalty
from dirnet_tf.warping import warp

__all__ = ["LABEL_LOSSES", "one_hot", "soft_dice", "dice_loss", "one_hot_mse_loss", "carry_one_hot",
           "label_objective"]

#: Names of the label losses of :func:`label_objective`.
LABEL_LOSSES = ("dice", "mse")


def one_hot(labels, num_labels):
    """One-hot float32 ``[B, *spatial, num_labels]`` of integer ``labels [B, *spatial]``
    (values outside ``0 .. num_labels - 1`` give all-zero rows)."""
    return tf.one_hot(tf.cast(labels, tf.int32), int(num_labels), dtype=tf.float32)


def _check_maps(fixed, warped):
    fixed = tf.cast(tf.convert_to_tensor(fixed), tf.float32)
    warped = tf.cast(tf.convert_to_tensor(warped), tf.float32)
    if fixed.shape.rank not in (4, 5) or fixed.shape != warped.shape:
        raise ValueError(f"label maps must be one-hot [B, *spatial, K] (2-D or 3-D) of one shape, got fixed "
                         f"{fixed.shape} and warped {warped.shape}")
    return fixed, warped


def _select(maps, labels):
    """The channels ``labels`` of ``maps`` (None: all)."""
    if labels is None:
        return maps
    return tf.gather(maps, list(labels), axis=-1)


def soft_dice(fixed, warped, labels=None, eps=1e-6):
    """Soft Dice per pair, mean over the labels present (``[B]``, in ``[0, 1]``).

    Parameters
    ----------
    fixed, warped : Tensor ``[B, *spatial, K]``
        One-hot (or soft, values in ``[0, 1]``) label maps: the fixed map and the moving map
        carried onto the fixed grid.
    labels : sequence of int or None
        The channels scored (default all; e.g. ``range(1, K)`` leaves out the background).
    eps : float
        Added to numerator and denominator of every label.

    Returns
    -------
    Tensor float32 ``[B]``: ``mean_{k present} (2 sum f_k w_k + eps) / (sum f_k + sum w_k + eps)``,
    a label being present when ``sum f_k + sum w_k > 0``; a pair without any present label
    scores 1.
    """
    fixed, warped = _check_maps(fixed, warped)
    fixed, warped = _select(fixed, labels), _select(warped, labels)
    axes = list(range(1, fixed.shape.rank - 1))
    overlap = tf.reduce_sum(fixed * warped, axis=axes)
    size = tf.reduce_sum(fixed, axis=axes) + tf.reduce_sum(warped, axis=axes)
    dice = (2.0 * overlap + eps) / (size + eps)
    present = tf.cast(size > 0, tf.float32)
    count = tf.reduce_sum(present, axis=-1)
    return tf.where(count > 0, tf.reduce_sum(dice * present, axis=-1) / tf.maximum(count, 1.0), 1.0)


def dice_loss(fixed, warped, labels=None, eps=1e-6, reduction="none"):
    """``1 - soft_dice`` per pair (``reduction="none"``, ``[B]``) or its batch mean (``"mean"``)."""
    values = 1.0 - soft_dice(fixed, warped, labels, eps)
    return tf.reduce_mean(values) if reduction == "mean" else values


def one_hot_mse_loss(fixed, warped, labels=None, reduction="none"):
    """Mean over voxels and the chosen labels of ``(fixed - warped)^2`` per pair (``[B]``), or its
    batch mean (``reduction="mean"``)."""
    fixed, warped = _check_maps(fixed, warped)
    values = tf.reduce_mean(tf.square(_select(fixed, labels) - _select(warped, labels)),
                            axis=list(range(1, fixed.shape.rank)))
    return tf.reduce_mean(values) if reduction == "mean" else values


def carry_one_hot(labels, displacement, num_labels, boundary="border"):
    """The moving label map carried by a field: ``warp(one_hot(labels), displacement)``.

    Parameters
    ----------
    labels : Tensor ``[B, *spatial]`` of integers ``0 .. num_labels - 1`` (or ``[B, *spatial, 1]``).
    displacement : Tensor ``[B, *spatial, ndim]`` (voxels, ij): ``x`` samples the moving map at
        ``x + displacement(x)``.
    num_labels : int
    boundary : str
        ``"border"`` (default: the edge labels extend outside) or ``"zeros"``.

    Returns
    -------
    Tensor float32 ``[B, *spatial, num_labels]``: a soft label map (multilinear interpolation
    of the one-hot map), differentiable in ``displacement``.
    """
    labels = tf.convert_to_tensor(labels)
    displacement = tf.convert_to_tensor(displacement)
    if labels.shape.rank == displacement.shape.rank:
        labels = labels[..., 0]
    return warp(one_hot(labels, num_labels), tf.cast(displacement, tf.float32), boundary=boundary)


def label_objective(model, num_labels, loss="dice", labels=None, bending_weight=None, folding_weight=None):
    """The training loss of a model on label maps: label overlap plus the model's regularisers.

    Parameters
    ----------
    model : dirnet_tf.DIRNet
        A model of composed steps; its ``bending_weight`` / ``folding_weight`` are used unless given,
        and the grid spacing of each B-spline step from :meth:`~dirnet_tf.DIRNet.step_layout`.
    num_labels : int
        One-hot depth ``K``.
    loss : str
        ``"dice"`` (:func:`dice_loss`, default) or ``"mse"`` (:func:`one_hot_mse_loss`).
    labels : sequence of int or None
        Labels scored (default ``1 .. K - 1``: everything but the background).
    bending_weight, folding_weight : float or None

    Returns
    -------
    callable
        ``loss_fn(batch, outputs) -> (per_pair [B], parts)`` with ``batch["fixed_labels"]`` and
        ``batch["moving_labels"]`` integer maps ``[B, *spatial]``; parts ``label_loss``,
        ``dice`` (always, for monitoring) and ``bending_energy`` / ``folding_penalty`` when
        weighted.
    """
    if loss not in LABEL_LOSSES:
        raise ValueError(f"label loss must be one of {LABEL_LOSSES}, got {loss!r}")
    num_labels = int(num_labels)
    labels = list(range(1, num_labels)) if labels is None else [int(k) for k in labels]
    bending = float(model.bending_weight if bending_weight is None else bending_weight)
    folding = float(model.folding_weight if folding_weight is None else folding_weight)
    layout = model.step_layout() or []
    spline_spacings = [spacing for kind, spacing in layout if kind == "spline"]
    image_shape = model.image_shape

    @tf.autograph.experimental.do_not_convert  # no Python control flow on tensors: a tracing trainer need not convert it
    def loss_fn(batch, outputs):
        displacement = tf.cast(outputs["displacement"], tf.float32)
        fixed = one_hot(batch["fixed_labels"], num_labels)
        carried = carry_one_hot(batch["moving_labels"], displacement, num_labels)
        dice = soft_dice(fixed, carried, labels)
        values = 1.0 - dice if loss == "dice" else one_hot_mse_loss(fixed, carried, labels)
        parts = {"label_loss": values, "dice": dice}
        total = values
        if bending and spline_spacings:
            be = tf.add_n([bending_energy(tf.cast(points, tf.float32), image_shape, spacing, reduction="none")
                           for points, spacing in zip(outputs["control_point_steps"], spline_spacings)])
            parts["bending_energy"] = be
            total = total + bending * be
        if folding:
            fp = folding_penalty(displacement, reduction="none")
            parts["folding_penalty"] = fp
            total = total + folding * fp
        return total, parts

    return loss_fn
