"""Scoring several registration methods on the same pairs (DIRNet, a baseline such as elastix, none).

The worked examples (``experiments.echo``, ``experiments.brain3d``) compare methods with these:

* :func:`cycle_residual` -- inverse consistency of a pair registered both ways (a -> b -> a);
* :func:`masked_ncc` and :func:`masked_registration_scores` -- NCC inside a region (the sector of
  an echocardiogram), folding on the whole grid and inside the region, the mean displacement in
  mm and, for the pairs whose reverse is scored too, the cycle residual;
* :func:`scores_by_gap` -- per-pair values averaged per frame gap of sequence pairs;
* :func:`warp_and_score` -- any method's field applied with DIRNet's resampler and scored
  (:func:`dirnet_tf.evaluation.field_scores`), against the true field of synthetic pairs
  (:func:`dirnet_tf.evaluation.synthetic_scores`) and with the Dice of carried masks;
* :func:`compare_on_synthetic_pairs` and :func:`compare_on_real_pairs` -- an export and a baseline
  (a callable, e.g. :func:`dirnet_tf.elastix.register_pairs` with its settings) on the same pairs.

A baseline is ``baseline(fixed, moving) -> {"displacement": [N, *spatial, ndim], "seconds": [N]}``
(the convention of :func:`dirnet_tf.elastix.register_pairs`).

Displacements are backward fields in voxels of the model grid, ij (array) order, ``[P,
*spatial, ndim]``: ``warped(x) = moving(x + u(x))``; ``*_mm`` values multiply them by the grid
spacing (mm per axis).
"""

import numpy as np

from dirnet_tf import evaluation, metrics
from dirnet_tf.warping import compose_displacements, warp, warp_labels

__all__ = ["cycle_residual", "reverse_pair_indices", "masked_ncc", "masked_registration_scores", "scores_by_gap",
           "warp_and_score", "compare_on_synthetic_pairs", "compare_on_real_pairs"]


def cycle_residual(forward, backward, mask=None, spacing=None):
    """Inverse consistency of two registrations: the round trip a -> b -> a.

    ``forward`` registers (fixed a, moving b): ``x -> x + forward(x)`` maps points of a to b;
    ``backward`` registers (fixed b, moving a).  The round trip is
    ``x + forward(x) + backward(x + forward(x))`` = ``x + total(x)`` with ``total`` =
    :func:`~dirnet_tf.warping.compose_displacements` ``(backward, forward)`` (``backward``
    interpolated linearly, border values outside); for consistent registrations ``total`` is 0.
    :func:`dirnet_tf.metrics.inverse_consistency` is the same residual without a mask, in numpy.

    Parameters
    ----------
    forward, backward : arrays ``[N, H, W, 2]`` (or ``[H, W, 2]``; 3-D fields likewise)
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
    if forward.ndim == backward.shape[-1] + 1:
        forward, backward = forward[None], backward[None]
    total = compose_displacements(backward, forward).numpy().astype(np.float64)
    mask = np.ones(total.shape[1:-1], bool) if mask is None else np.asarray(mask, bool)
    spacing = np.ones(total.shape[-1]) if spacing is None else np.asarray(spacing, np.float64)
    pixels = np.linalg.norm(total, axis=-1)[:, mask].mean(axis=1)
    mm = np.linalg.norm(total * spacing, axis=-1)[:, mask].mean(axis=1)
    return {"pixels": pixels, "mm": mm}


def reverse_pair_indices(pairs):
    """The pairs whose reverse is in the list too.

    Parameters
    ----------
    pairs : int array ``[P, 2]`` (fixed, moving) image indices

    Returns
    -------
    (list of int, list of int)
        ``forward`` indices ``k`` with ``pairs[k] = (a, b)`` and ``(b, a)`` present, and the index
        of that reverse pair for each.
    """
    listed = np.asarray(pairs).tolist()
    index = {tuple(p): k for k, p in enumerate(listed)}
    forward = [k for k, (a, b) in enumerate(listed) if (b, a) in index]
    backward = [index[tuple(listed[k][::-1])] for k in forward]
    return forward, backward


def masked_ncc(fixed, other, mask):
    """NCC of each pair inside ``mask``: float array ``[P]``.

    ``fixed``, ``other`` ``[P, *spatial, C]`` (first channel), ``mask`` bool ``[*spatial]``.
    """
    return np.array([metrics.ncc(f[..., 0][mask], o[..., 0][mask]) for f, o in zip(fixed, other)])


def masked_registration_scores(fixed, warped, displacement, mask, spacing, pairs):
    """Scores of registrations of pairs inside a region: NCC, folding, displacement, cycle consistency.

    Parameters
    ----------
    fixed, warped : arrays ``[P, H, W, 1]``
    displacement : array ``[P, H, W, 2]`` (pixels of the model grid, ij order)
    mask : array of bool ``[H, W]`` (model grid)
    spacing : sequence of float (mm per axis)
    pairs : int array ``[P, 2]`` (fixed, moving) image indices; pairs whose reverse is listed give
        the cycle residual (:func:`cycle_residual`)

    Returns
    -------
    (dict, dict)
        Summary (JSON-able: ``ncc_sector``, ``ncc_sector_median``, ``folding_fraction``,
        ``folding_fraction_sector``, ``pairs_with_folding``, ``mean_displacement_sector_mm`` and,
        with reverse pairs, ``cycle_residual_pixels``, ``cycle_residual_mm``, ``cycle_pairs``) and
        per-pair arrays (``ncc``, ``folding``).
    """
    ncc = masked_ncc(fixed, warped, mask)
    det = metrics.jacobian_determinant(displacement)
    folding = (det <= 0).reshape(len(det), -1).mean(axis=1)
    folding_sector = (det[:, mask] <= 0).mean(axis=1)
    forward, backward = reverse_pair_indices(pairs)
    summary = {"ncc_sector": float(ncc.mean()), "ncc_sector_median": float(np.median(ncc)),
               "folding_fraction": float(folding.mean()), "folding_fraction_sector": float(folding_sector.mean()),
               "pairs_with_folding": int((folding > 0).sum()),
               "mean_displacement_sector_mm": float(
                   np.linalg.norm(displacement * np.asarray(spacing), axis=-1)[:, mask].mean())}
    if forward:
        cyc = cycle_residual(displacement[forward], displacement[backward], mask, spacing)
        summary.update(cycle_residual_pixels=float(cyc["pixels"].mean()), cycle_residual_mm=float(cyc["mm"].mean()),
                       cycle_pairs=len(forward))
    return summary, {"ncc": ncc, "folding": folding}


def scores_by_gap(pairs, **values):
    """Mean of per-pair values per frame gap ``|a - b|``: ``{"gap": {"pairs": n, name: mean}}``.

    ``pairs`` int ``[P, 2]`` frame indices; each keyword a per-pair array ``[P]``.
    """
    gaps = np.abs(np.asarray(pairs)[:, 0] - np.asarray(pairs)[:, 1])
    return {str(int(g)): dict(pairs=int((gaps == g).sum()),
                              **{k: float(np.asarray(v)[gaps == g].mean()) for k, v in values.items()})
            for g in np.unique(gaps)}


def warp_and_score(fixed, moving, displacement, spacing, boundary="border", test=None, fixed_mask=None,
                   moving_mask=None):
    """Warp ``moving`` by a field (any method's) with DIRNet's resampler and score the result.

    :func:`dirnet_tf.evaluation.field_scores` (NCC, folding, displacement), plus the endpoint error
    / label scores of recovered fields for synthetic pairs and the Dice of a carried mask for real
    pairs.

    Parameters
    ----------
    fixed, moving : arrays ``[P, *spatial, 1]``
    displacement : array ``[P, *spatial, ndim]`` (voxels, ij)
    spacing : sequence of float (mm per axis)
    boundary : str
        Resampler boundary (see :func:`dirnet_tf.warping.warp`).
    test : dict or None
        Synthetic pairs (true ``displacement``, ``region``, labels): adds
        :func:`dirnet_tf.evaluation.synthetic_scores`.
    fixed_mask, moving_mask : arrays of bool ``[P, *spatial]`` or None
        Real pairs: ``brain_dice_before`` / ``brain_dice_after`` (the moving mask carried by the field).

    Returns
    -------
    (dict, np.ndarray)
        Summary and the warped images ``[P, *spatial, 1]``.
    """
    displacement = np.asarray(displacement, np.float32)
    warped = warp(np.asarray(moving, np.float32), displacement, boundary=boundary).numpy()
    out, _ = evaluation.field_scores(fixed, moving, warped, displacement, spacing)
    if test is not None:
        scores, _ = evaluation.synthetic_scores(displacement, test, spacing, boundary)
        out.update(scores)
    if fixed_mask is not None:
        carried = warp_labels(np.asarray(moving_mask, np.int32), displacement, 2, boundary).numpy() > 0
        out["brain_dice_before"] = float(np.mean([metrics.dice(f, m)["mean"] for f, m in zip(fixed_mask, moving_mask)]))
        out["brain_dice_after"] = float(np.mean([metrics.dice(f, c)["mean"] for f, c in zip(fixed_mask, carried)]))
    return out, warped


def compare_on_synthetic_pairs(fn, test, spacing, boundary="border", timing_batch_size=8, baseline=None,
                               baseline_pairs=0, baseline_name="elastix"):
    """An export on synthetic pairs with known true fields, and a baseline on the first pairs.

    Parameters
    ----------
    fn : keras.Model or SavedModel signature
    test : dict
        Synthetic pairs (:func:`dirnet_tf.train_data.synthetic_plan`): ``fixed``, ``moving``, true
        ``displacement`` (voxels, ij), optional ``region`` and labels.
    spacing : sequence of float (mm per axis)
    boundary : str
    timing_batch_size : int
    baseline : callable or None
        See the module docstring; run on the first ``baseline_pairs`` pairs (none when 0 or None).
    baseline_name : str
        Key of the baseline's scores.

    Returns
    -------
    (dict, dict)
        The report (``dirnet``: :func:`dirnet_tf.evaluation.evaluate_test_pairs`; with a baseline
        also ``baseline_name``: :func:`warp_and_score` with ``seconds_per_volume`` (median) and
        ``seconds_per_volume_mean``, and ``dirnet_same_pairs``: the export's scores on those
        pairs) and the first pair for a figure (``fixed``, ``moving``, ``dirnet_warped``,
        ``dirnet_displacement``, ``true_displacement``, ``epe`` mm, ``baseline_warped``).
    """
    from dirnet_tf.evaluation import evaluate_test_pairs

    result, pred = evaluate_test_pairs(fn, None, test, boundary, spacing, timing_batch_size)
    report = {"dirnet": result}
    figure = {"fixed": test["fixed"][0], "moving": test["moving"][0], "dirnet_warped": pred["warped"][0],
              "dirnet_displacement": pred["displacement"][0], "true_displacement": test["displacement"][0],
              "epe": pred["epe_mm"][0]}
    count = min(int(baseline_pairs or 0), len(test["fixed"]))
    if baseline is not None and count > 0:
        subset = {k: v[:count] for k, v in test.items()}
        out = baseline(subset["fixed"], subset["moving"])
        scores, warped = warp_and_score(subset["fixed"], subset["moving"], out["displacement"], spacing, boundary,
                                        subset)
        scores.update(seconds_per_volume=float(np.median(out["seconds"])),
                      seconds_per_volume_mean=float(np.mean(out["seconds"])))
        same, _ = warp_and_score(subset["fixed"], subset["moving"], pred["displacement"][:count], spacing, boundary,
                                 subset)
        report.update({baseline_name: scores, "dirnet_same_pairs": same})
        figure["baseline_warped"] = warped[0]
    return report, figure


def compare_on_real_pairs(fn, fixed, moving, fixed_mask, moving_mask, spacing, boundary="border", baseline=None,
                          baseline_name="elastix"):
    """An export and a baseline on real pairs with masks: NCC, folding, mask Dice before / after.

    Parameters
    ----------
    fn : keras.Model or SavedModel signature
    fixed, moving : arrays ``[P, *spatial, 1]``
    fixed_mask, moving_mask : arrays of bool ``[P, *spatial]``
    spacing : sequence of float (mm per axis)
    boundary : str
    baseline : callable or None (see the module docstring)
    baseline_name : str

    Returns
    -------
    (dict, dict)
        ``{"dirnet": scores, baseline_name: scores with seconds_per_volume (first pair)}``
        (:func:`warp_and_score`) and the first pair for a figure (``fixed``, ``moving``,
        ``dirnet_warped``, ``dirnet_displacement``, ``baseline_warped``).
    """
    from dirnet_tf.inference import predict

    masks = {"fixed_mask": fixed_mask, "moving_mask": moving_mask}
    pred = predict(fn, fixed, moving, batch_size=1)
    dirnet, warped = warp_and_score(fixed, moving, pred["displacement"], spacing, boundary, **masks)
    row = {"dirnet": dirnet}
    figure = {"fixed": fixed[0], "moving": moving[0], "dirnet_warped": warped[0],
              "dirnet_displacement": pred["displacement"][0]}
    if baseline is not None:
        out = baseline(fixed, moving)
        scores, baseline_warped = warp_and_score(fixed, moving, out["displacement"], spacing, boundary, **masks)
        scores["seconds_per_volume"] = float(out["seconds"][0])
        row[baseline_name] = scores
        figure["baseline_warped"] = baseline_warped[0]
    return row, figure
