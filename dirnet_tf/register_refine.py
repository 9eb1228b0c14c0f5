"""Instance optimisation of prepared pairs: the served chain refined on each pair (``refine=N``).

After the network's prediction (:func:`dirnet_tf.register_engine.infer`) the chain's own
parameters -- the affine step's matrix and translation and every B-spline step's control points,
in model voxels (ij) on the fixed image's model grid -- are optimised for ``N`` iterations on
that pair alone (:func:`dirnet_tf.refine.refine_steps`), through the model's bounded
parametrisation, so a folding-free model stays folding-free.  The objective is the model's
training objective: its similarity (or ``refine_similarity``: ``ncc``, ``lncc`` or ``mi``) on
the model-grid images plus its bending and folding terms (the export's ``config``; inverse
consistency, a two-direction training term, is not part of it).  The refined parameters replace
the served ones, so W, the fields, labels, points, the ITK composite and the elastix chain all
follow the refined chain exactly.

Each refined pair records ``refinement`` (:func:`refinement_record`): iterations, similarity,
objective before and after, seconds.
"""

import numpy as np

from dirnet_tf import spline_np
from dirnet_tf.register_errors import RegisterError

__all__ = ["REFINE_SIMILARITIES", "check_refine_options", "model_objective", "refine_prepared",
           "refinement_record", "refined_function"]

#: Similarities of ``refine_similarity`` / ``--refine_similarity``.
REFINE_SIMILARITIES = ("ncc", "lncc", "mi")


def _training_config(model):
    """The export's training settings (``config``; ``flags`` of older exports), as a dict."""
    metadata = model.metadata or {}
    config = metadata.get("config") or metadata.get("flags") or {}
    return config if isinstance(config, dict) else {}


def _weight(config, name):
    try:
        return float(config.get(name) or 0.0)
    except (TypeError, ValueError):
        return 0.0


def model_objective(model):
    """``(similarity, bending_weight, folding_weight, bounded)`` of the export's training objective.

    The similarity is the training similarity when it is one of :data:`REFINE_SIMILARITIES`
    (``mse`` and custom losses fall back to ``ncc``); ``bounded`` is the export's bounded
    parametrisation (metadata ``bounded``).
    """
    config = _training_config(model)
    similarity = str(config.get("similarity") or "ncc").lower()
    if similarity not in REFINE_SIMILARITIES:
        similarity = "ncc"
    return (similarity, _weight(config, "bending_weight"), _weight(config, "folding_weight"),
            bool((model.metadata or {}).get("bounded", False)))


def check_refine_options(model, refine, refine_similarity=None):
    """Validate ``refine`` and ``refine_similarity`` for ``model``; returns ``(steps, similarity)``.

    Raises
    ------
    RegisterError
        ``refine`` is not a whole number >= 0; ``refine_similarity`` is unknown or given without
        ``refine > 0``; the export cannot be refined (composed steps exported before their
        parameters were served).
    """
    try:
        steps = int(refine)
        if steps != refine:
            raise ValueError
    except (TypeError, ValueError):
        raise RegisterError(f"--refine={refine!r} must be a whole number of optimiser steps (0 = no refinement)") \
            from None
    if steps < 0:
        raise RegisterError(f"--refine={steps} is negative; give the number of optimiser steps (0 = no refinement, "
                            "e.g. --refine=50)")
    if refine_similarity is not None:
        name = str(refine_similarity).lower()
        if name not in REFINE_SIMILARITIES:
            raise RegisterError(f"--refine_similarity={refine_similarity} is unknown; use one of "
                                f"{', '.join(REFINE_SIMILARITIES)}")
        if steps == 0:
            raise RegisterError(f"--refine_similarity={name} has no effect without refinement; give --refine=N "
                                "(N > 0 optimiser steps) as well")
        similarity = name
    else:
        similarity = model_objective(model)[0]
    if steps and model.steps is None and len((model.metadata or {}).get("steps") or ()) > 1:
        raise RegisterError(f"--refine needs the parameters of every step, but the export {model.path} composes "
                            f"{len(model.metadata['steps'])} steps without serving them (exported by an older "
                            "version); export it again (e.g. `--export_only`) to refine")
    return steps, similarity


def _layout_and_params(model, prepared):
    """The chain of every prepared pair as ``(layout, [params [B, ...] per step], bounded)``."""
    _, _, _, bounded = model_objective(model)
    if model.steps is not None:
        layout = [(s["kind"], None if s["grid_spacing"] is None else tuple(int(v) for v in s["grid_spacing"]))
                  for s in model.steps]
        params = [np.stack([np.asarray(p["step_outputs"][s["output"]], np.float32) for p in prepared])
                  for s in model.steps]
        return layout, params, bounded
    # The paper's model: one (unbounded) B-spline, its control points recovered from the dense field.
    points = []
    for p in prepared:
        spacing = model.grid_spacing or spline_np.detect_grid_spacing(p["displacement"])
        cp, exact, _ = (None, False, None) if spacing is None else spline_np.recover_control_points(
            p["displacement"], spacing)
        if not exact:
            raise RegisterError(f"--refine needs the control points of the export {model.path}, but its field is "
                                "not a B-spline recoverable on the model grid; export it again to refine")
        points.append(np.asarray(cp, np.float32))
    spacing = tuple(int(v) for v in spline_np.normalize_spacing(spacing, model.ndim))
    return [("spline", spacing)], [np.stack(points)], False


def refinement_record(result, similarity, n):
    """The ``refinement`` entry of pair ``n`` of a :class:`dirnet_tf.refine.RefineResult` (JSON-ready):
    what was optimised and how far (seconds: the whole batch's)."""
    return {"steps": int(result.steps), "similarity": similarity,
            "initial_loss": float(result.initial_loss[n]), "final_loss": float(result.final_loss[n]),
            "seconds": float(result.seconds),
            "objective": "the model's training objective with this similarity, on the fixed image's model grid"}


def refine_prepared(model, prepared, steps, similarity, progress=None):
    """Refine inferred pairs in place (one batch; 3-D: one pair).

    Parameters
    ----------
    model : dirnet_tf.registration.ExportedModel
    prepared : list of dict
        Pairs after :func:`dirnet_tf.register_engine.infer`.
    steps : int
        Optimiser iterations (0: nothing changes).
    similarity : str
        One of :data:`REFINE_SIMILARITIES`.
    progress : callable or None
        ``progress(iteration, mean_objective)``, called every iteration.

    Each pair's ``warped``, ``displacement`` and step parameters (``step_outputs``; the recovered
    spline of the paper's model) become the refined ones and ``refinement`` records the run.
    """
    if not steps or not prepared:
        return prepared
    from dirnet_tf.refine import refine_steps

    _, bending, folding, _ = model_objective(model)
    layout, params, bounded = _layout_and_params(model, prepared)
    fixed = np.stack([np.asarray(p["fixed"], np.float32) for p in prepared])
    moving = np.stack([np.asarray(p["moving"], np.float32) for p in prepared])
    result = refine_steps(fixed, moving, layout, params, steps, similarity=similarity, bending_weight=bending,
                          folding_weight=folding, bounded=bounded, boundary=model.boundary, progress=progress)
    for n, p in enumerate(prepared):
        p["warped"] = result.warped[n]
        p["displacement"] = result.displacement[n]
        if model.steps is not None:
            p["step_outputs"] = {s["output"]: result.params[k][n] for k, s in enumerate(model.steps)}
        for key in ("spline", "chain", "identity"):  # recomputed from the refined parameters
            p.pop(key, None)
        p["refinement"] = refinement_record(result, similarity, n)
    return prepared


def refined_function(model, steps, similarity=None):
    """The export's serving function followed by ``steps`` refinement iterations, for arrays.

    A drop-in for ``model.fn`` in :func:`dirnet_tf.inference.predict` and the evaluation
    functions of :mod:`dirnet_tf.evaluation` / :mod:`dirnet_tf.comparison`, which work on
    model-grid arrays: ``call(fixed=[B, *shape, C], moving=...)`` returns the served outputs
    (``warped``, ``displacement``, the step parameters) after refining every pair of the batch
    together.  The last call's per-pair records are kept in ``call.records``.

    Parameters
    ----------
    model : dirnet_tf.registration.ExportedModel
    steps : int
        Refinement iterations (0: the served function's outputs).
    similarity : str or None
        As ``refine_similarity`` (None: the model's training similarity).
    """
    import tensorflow as tf

    steps, similarity = check_refine_options(model, steps, similarity if steps else None)

    def call(fixed, moving):
        out = {k: v.numpy() for k, v in model.fn(fixed=tf.constant(fixed), moving=tf.constant(moving)).items()}
        prepared = [{"fixed": np.asarray(fixed)[n], "moving": np.asarray(moving)[n], "warped": out["warped"][n],
                     "displacement": out["displacement"][n],
                     "step_outputs": {s["output"]: out[s["output"]][n] for s in model.steps or ()}}
                    for n in range(len(out["warped"]))]
        refine_prepared(model, prepared, steps, similarity)
        call.records = [p.get("refinement") for p in prepared]
        result = {"warped": np.stack([p["warped"] for p in prepared]),
                  "displacement": np.stack([p["displacement"] for p in prepared])}
        for s in model.steps or ():
            result[s["output"]] = np.stack([p["step_outputs"][s["output"]] for p in prepared])
        return {k: tf.constant(v) for k, v in result.items()}

    call.records = []
    return call
