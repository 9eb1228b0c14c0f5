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

:func:`structure_scores` / :func:`summarise_structures` score carried label maps per named
structure where it is annotated (the cardiac contours).  :func:`evaluate_test_pairs` scores the test pairs of a training run (index pairs of a
collection, or synthetic pairs with a known true field, then also :func:`synthetic_scores`).

An experiment adds what only it can measure (Dice of MNIST digits, contours of the
heart, the sector of an echocardiogram) to the same dictionary.
"""

import numpy as np

from dirnet_tf import metrics, synthetic
from dirnet_tf.inference import predict, time_per_pair
from dirnet_tf.warping import warp_labels

__all__ = ["evaluate_pairs", "field_scores", "identity_check", "label_scores", "synthetic_scores",
           "evaluate_test_pairs", "structure_scores", "summarise_structures", "DISPLACEMENT_UNITS"]

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


def synthetic_scores(predicted, test, spacing, boundary="border"):
    """Scores of recovered fields against the true fields of synthetic pairs.

    Parameters
    ----------
    predicted : array ``[P, *spatial, ndim]``
        Recovered backward fields (voxels, ij), on the fixed grid.
    test : dict
        Synthetic pairs (:func:`dirnet_tf.train_data.synthetic_plan`): ``displacement`` (true),
        optional ``region``, ``fixed_labels`` and ``moving_labels``.
    spacing : sequence of float (mm per axis)
    boundary : str

    Returns
    -------
    (dict, dict)
        Summary (``epe_mm`` mean endpoint error, ``true_displacement_mm`` the mean true
        displacement (= the endpoint error of no registration), their ``*_mask`` values inside
        ``region``, ``labels``: Dice / HD95 / MAD of the labels carried by ``predicted`` against
        those carried by the true field, with ``foreground`` = all labels > 0) and per-pair
        ``epe_mm`` / ``epe_mm_mask``.
    """
    true = np.asarray(test["displacement"])
    spacing = np.asarray(spacing, np.float64)
    epe = synthetic.endpoint_error(predicted, true, spacing)
    true_mm = np.linalg.norm(true * spacing, axis=-1)
    out = {"epe_mm": float(epe.mean()), "epe_mm_median": float(np.median(epe)), "epe_mm_max_pair": float(epe.max()),
           "true_displacement_mm": float(true_mm.mean()), "max_true_displacement_mm": float(true_mm.max())}
    per_pair = {"epe_mm": epe}
    region = test.get("region")
    if region is not None:
        epe_mask = synthetic.endpoint_error(predicted, true, spacing, region)
        out.update(epe_mm_mask=float(np.nanmean(epe_mask)), epe_mm_mask_median=float(np.nanmedian(epe_mask)),
                   true_displacement_mm_mask=float(np.nanmean(synthetic.masked_mean(true_mm, region))),
                   mask_voxels_mean=float(np.asarray(region).reshape(len(region), -1).sum(axis=1).mean()))
        per_pair["epe_mm_mask"] = epe_mask
    if "fixed_labels" in test:
        fixed_labels = np.asarray(test["fixed_labels"], np.int32)
        moving_labels = np.asarray(test["moving_labels"], np.int32)
        labels = label_scores(fixed_labels, moving_labels, predicted, boundary, spacing)
        foreground = label_scores((fixed_labels > 0).astype(np.int32), (moving_labels > 0).astype(np.int32),
                                  predicted, boundary, spacing)
        if "1" in foreground:
            labels["foreground"] = foreground["1"]
        out["labels"] = labels
        out["labels_note"] = ("Dice/HD95/MAD of the moving labels carried by the recovered field against the "
                              "moving labels carried by the true field (= the fixed image's labels)")
    return out, per_pair


def evaluate_test_pairs(fn, data, eval_pairs, boundary, spacing, timing_batch_size=8):
    """Score the registration of a training run's ``eval_pairs`` by ``fn`` (an exported model).

    Parameters
    ----------
    fn : keras.Model or SavedModel signature
    data : dict or None
        The collection (:func:`dirnet_tf.train_data.load_collection`: ``images``, ``labels``);
        unused for synthetic pairs.
    eval_pairs : int array ``[P, 2]`` or dict
        (fixed, moving) image indices, or the synthetic pairs of
        :func:`dirnet_tf.train_data.synthetic_plan` (then :func:`synthetic_scores` are added).
    boundary : str
    spacing : sequence of float
        Model-grid voxel size, mm per axis.
    timing_batch_size : int

    Returns
    -------
    tuple
        ``(metrics dict, predictions dict)``: :func:`evaluate_pairs`' scores (displacements in
        model voxels and mm) and its predictions plus ``fixed`` / ``moving``.
    """
    if isinstance(eval_pairs, dict):  # synthetic pairs
        fixed, moving, labels = eval_pairs["fixed"], eval_pairs["moving"], None
    else:
        images = data["images"]
        fixed, moving = images[eval_pairs[:, 0]], images[eval_pairs[:, 1]]
        labels = None
        if data["labels"] is not None:
            labels = (data["labels"][eval_pairs[:, 0]], data["labels"][eval_pairs[:, 1]])
    result, pred = evaluate_pairs(fn, fixed, moving, spacing=spacing, labels=labels, boundary=boundary,
                                  batch_size=max(1, timing_batch_size), timing_batch_size=timing_batch_size)
    pred.update(fixed=fixed, moving=moving)
    if isinstance(eval_pairs, dict):
        scores, per_pair = synthetic_scores(pred["displacement"], eval_pairs, spacing, boundary)
        result.update(scores)
        pred.update(per_pair)
    return result, pred


def _stats(values):
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
            "median": float(np.median(finite)) if finite.size else None,
            "n": int(values.size), "n_infinite": int(values.size - finite.size)}


def structure_scores(fixed_labels, moving_labels, warped_labels, annotated, spacing, structures):
    """Per-pair Dice / HD95 / MAD (mm) before and after registration, per named structure.

    Parameters
    ----------
    fixed_labels, moving_labels, warped_labels : integer arrays ``[P, *spatial]``
        ``warped_labels``: the moving labels carried by the registration.
    annotated : bool ``[P, S]``
        Whether structure ``s`` (in the order of ``structures``) is annotated in pair ``p``.
    spacing : sequence of float
        Pixel size in mm per axis.
    structures : dict
        ``name -> label value``.

    Returns
    -------
    dict
        ``structure -> {"<metric>_before|after": array [P]}`` (metrics ``dice``, ``hd95_mm``,
        ``mad_mm``; NaN where the structure is not annotated in the pair).
    """
    n = len(fixed_labels)
    result = {}
    for k, (structure, label) in enumerate(structures.items()):
        values = {f"{m}_{w}": np.full(n, np.nan) for m in ("dice", "hd95_mm", "mad_mm")
                  for w in ("before", "after")}
        for i in range(n):
            if not annotated[i, k]:
                continue
            fixed = fixed_labels[i] == label
            for when, other in (("before", moving_labels[i]), ("after", warped_labels[i])):
                mask = other == label
                values[f"dice_{when}"][i] = metrics.dice(fixed, mask)["mean"]
                values[f"hd95_mm_{when}"][i] = metrics.hd95(fixed, mask, spacing)
                values[f"mad_mm_{when}"][i] = metrics.mad(fixed, mask, spacing)
        result[structure] = values
    return result


def summarise_structures(per_pair, select):
    """Mean / std / median (and counts) of every metric of :func:`structure_scores` over the pairs
    ``select`` (bool ``[P]``), per structure, with ``pairs``: how many were annotated."""
    out = {}
    for structure, values in per_pair.items():
        entry = {}
        for key, v in values.items():
            v = v[select]
            entry[key] = _stats(v[~np.isnan(v)])
        entry["pairs"] = int((~np.isnan(values["dice_before"][select])).sum())
        out[structure] = entry
    return out
