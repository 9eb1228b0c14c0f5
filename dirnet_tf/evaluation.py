"""Scoring a trained model on evaluation pairs: the numbers every experiment reports.

:func:`evaluate_pairs` registers the pairs with a model (a ``keras.Model`` or an export's
signature) and returns, in one dictionary:

* similarity: NCC before and after (mean, median, spread);
* plausibility: the fraction of pixels that fold (``det J <= 0``), the displacement
  length in voxels of the model grid and, given the voxel size, in mm;
* inverse consistency: each pair registered both ways, the two fields composed, the
  mean residual (voxels, and mm given the voxel size);
* a field that means something everywhere: every fixed image registered to itself and
  to itself at half the intensity -- the mean displacement length and the NCC;
* time per pair (batched, median of repeated calls);
* with label maps: Dice per label before and after, HD95 and MAD in mm
  (:func:`label_scores`).

An experiment adds what only it can measure (Dice of MNIST digits, contours of the
heart, the sector of an echocardiogram) to the same dictionary.
"""

import numpy as np

from dirnet_tf import metrics
from dirnet_tf.inference import predict, time_per_pair
from dirnet_tf.warping import warp_labels

__all__ = ["evaluate_pairs", "field_scores", "label_scores"]

DISPLACEMENT_UNITS = "voxels of the model grid, ij (array) order; *_mm: times spacing_mm"


def evaluate_pairs(fn, fixed, moving, spacing=None, labels=None, boundary="border", batch_size=64,
                   timing_batch_size=64, inverse=True, identity=True):
    """Register ``moving`` to ``fixed`` with ``fn`` and score the result.

    Parameters
    ----------
    fn : keras.Model or SavedModel signature
        See :func:`dirnet_tf.inference.predict`.
    fixed, moving : float arrays ``[P, *spatial, C]``.
    spacing : sequence of float or None
        Voxel size in mm per axis (ij); adds the ``*_mm`` values.
    labels : tuple or None
        ``(fixed_labels, moving_labels)``, integer ``[P, *spatial]``: adds ``labels``
        (:func:`label_scores`).
    boundary : str
        The model's resampling boundary (to carry the labels).
    batch_size, timing_batch_size : int
        Prediction batch; batch of the time-per-pair measurement.
    inverse : bool
        Also register every pair the other way round (``inverse_consistency_*``).
    identity : bool
        Also register every fixed image to itself and to half of itself (``identity``).

    Returns
    -------
    tuple
        ``(result, pred)``: the scores (floats, JSON-ready) and the predictions
        (``warped``, ``displacement``, per pair ``ncc_before``, ``ncc_after``,
        ``folding``, and ``inverse_consistency`` when computed).
    """
    fixed = np.asarray(fixed, np.float32)
    moving = np.asarray(moving, np.float32)
    pred = predict(fn, fixed, moving, batch_size)
    disp = pred["displacement"]
    result, per_pair = field_scores(fixed, moving, pred["warped"], disp, spacing)
    timing = time_per_pair(fn, fixed, moving, batch_size=max(1, min(timing_batch_size, len(fixed))))
    result.update(ms_per_pair=timing["ms_per_pair"], ms_per_pair_min=timing["ms_per_pair_min"],
                  timing_batch_size=timing["batch_size"], timing_repeats=timing["repeats"])
    if inverse:
        reverse = predict(fn, moving, fixed, batch_size)["displacement"]
        residual = metrics.inverse_consistency(disp, reverse)
        result["inverse_consistency_px"] = float(np.mean(residual))
        if spacing is not None:
            result["inverse_consistency_mm"] = float(np.mean(metrics.inverse_consistency(
                disp, reverse, result["spacing_mm"])))
        pred["inverse_consistency"] = residual
    if identity:
        result["identity"] = identity_check(fn, fixed, batch_size)
    if labels is not None:
        result["labels"] = label_scores(labels[0], labels[1], disp, boundary, spacing)
    pred.update(per_pair)
    return result, pred


def field_scores(fixed, moving, warped, displacement, spacing=None):
    """The scores of given registrations (any method's): NCC, folding, displacement length.

    Parameters
    ----------
    fixed, moving, warped : arrays ``[P, *spatial, C]``.
    displacement : array ``[P, *spatial, ndim]`` (voxels, ij).
    spacing : sequence of float or None
        Voxel size in mm per axis; adds the ``*_mm`` values and ``spacing_mm``.

    Returns
    -------
    tuple
        ``(result, per_pair)``: the summary (floats, JSON-ready) and per pair ``ncc_before``,
        ``ncc_after``, ``folding``.
    """
    disp = np.asarray(displacement)
    ndim = disp.shape[-1]
    ncc_before = metrics.ncc(fixed, moving, batched=True)
    ncc_after = metrics.ncc(fixed, warped, batched=True)
    folding = np.asarray(metrics.folding_fraction(disp)).reshape(-1)
    length = np.linalg.norm(disp, axis=-1)
    result = {
        "pairs": int(len(disp)),
        "ncc_before": float(ncc_before.mean()), "ncc_after": float(ncc_after.mean()),
        "ncc_after_median": float(np.median(ncc_after)), "ncc_after_std": float(ncc_after.std()),
        "folding_fraction": float(folding.mean()), "folding_fraction_max": float(folding.max()),
        "pairs_with_folding": int((folding > 0).sum()),
        "mean_displacement_voxels": float(length.mean()), "max_displacement_voxels": float(length.max()),
        "displacement_units": DISPLACEMENT_UNITS,
    }
    if spacing is not None:
        scale = np.broadcast_to(np.asarray(spacing, np.float64), (ndim,))
        length_mm = np.linalg.norm(disp * scale, axis=-1)
        result.update(mean_displacement_mm=float(length_mm.mean()), max_displacement_mm=float(length_mm.max()),
                      spacing_mm=[float(s) for s in scale])
    return result, {"ncc_before": ncc_before, "ncc_after": ncc_after, "folding": folding}


def identity_check(fn, images, batch_size=64):
    """Each image registered to itself, and to itself at half the intensity.

    A model whose field means something everywhere returns (nearly) zero displacement
    for both: NCC cannot see an intensity scale, and nothing should move.

    Returns
    -------
    dict
        ``{"identical": {...}, "half_intensity": {...}}``, each with
        ``mean_abs_displacement_px`` (mean displacement length over every voxel) and ``ncc``.
    """
    out = {}
    for name, other in (("identical", images), ("half_intensity", 0.5 * images)):
        same = predict(fn, images, other, batch_size)
        out[name] = {"mean_abs_displacement_px": float(np.linalg.norm(same["displacement"], axis=-1).mean()),
                     "ncc": float(np.mean(metrics.ncc(other, same["warped"], batched=True)))}
    return out


def label_scores(fixed_labels, moving_labels, displacement, boundary="border", spacing=None):
    """Dice, HD95 and MAD per label, before and after carrying the moving labels.

    Parameters
    ----------
    fixed_labels, moving_labels : integer arrays ``[P, *spatial]``.
    displacement : ``[P, *spatial, ndim]`` (voxels, ij).
    boundary : str
        Resampling boundary of the label warp (:func:`dirnet_tf.warping.warp_labels`).
    spacing : sequence of float or None
        Voxel size in mm (distances in voxels when ``None``).

    Returns
    -------
    dict
        ``{label: {"dice_before", "dice_after", "hd95_mm_after", "mad_mm_after", "pairs"}}`` over
        the pairs where both maps hold the label.
    """
    fixed_labels = np.asarray(fixed_labels)
    moving_labels = np.asarray(moving_labels)
    num_labels = int(max(fixed_labels.max(), moving_labels.max())) + 1
    warped = np.asarray(warp_labels(moving_labels, np.asarray(displacement, np.float32), num_labels, boundary))
    scores = {}
    for value in range(1, num_labels):
        rows = {"dice_before": [], "dice_after": [], "hd95_mm_after": [], "mad_mm_after": []}
        for f, m, w in zip(fixed_labels, moving_labels, warped):
            if not (f == value).any() or not (m == value).any():
                continue
            rows["dice_before"].append(metrics.dice(f == value, m == value)["mean"])
            rows["dice_after"].append(metrics.dice(f == value, w == value)["mean"])
            rows["hd95_mm_after"].append(metrics.hd95(f == value, w == value, spacing))
            rows["mad_mm_after"].append(metrics.mad(f == value, w == value, spacing))
        if rows["dice_before"]:
            scores[str(value)] = dict({k: float(np.mean(v)) for k, v in rows.items()},
                                      pairs=len(rows["dice_before"]))
    return scores
