"""The export's metadata, ``assets/dirnet.json``: one schema, written and read here only.

A SavedModel written by :func:`dirnet_tf.inference.export_saved_model` carries beside its
``serving_default`` signature a JSON file that says what a user of the model needs to know.
:func:`model_metadata` builds it when a model is exported, :func:`read_metadata` reads it and
:func:`parse_metadata` interprets it as an :class:`ExportInfo`.

Keys (all optional except where a model needs them; units and axis order stated):

``image_shape``
    Model input size, voxels per array axis (ij order).
``channels``
    Channels per image.
``grid_spacing``
    Control-point spacing of the finest B-spline stage, in model voxels: one int, or one per axis.
``boundary``
    How the model samples outside the moving image: ``"border"`` or ``"zeros"``.
``passes``
    Regressor passes per B-spline stage at inference.
``stages``, ``bounded``, ``symmetric``, ``normalize_inputs``
    A model of composed steps (:class:`dirnet_tf.DIRNet` arguments of the same names).
``steps``
    A model of composed steps: per step ``{"kind": "affine" | "spline", "grid_spacing": [s, ...]
    or null, "output": "step_<n>"}``, in the order of the model's ``step_params`` (the total map
    is ``phi_1 o ... o phi_n``: the last step is applied to a fixed point first), each naming the
    serving output that holds the step's exact parameters (:func:`step_metadata`).
``model_grid``
    The preprocessing of a model trained on images of any size
    (:meth:`dirnet_tf.preprocessing.ModelGrid.to_dict`): shape, spacing in mm, normalisation.
``space``
    How a pair is brought onto the model grid at registration (model-grid exports):
    ``"world"`` (written by :func:`model_metadata` for model-grid exports): fixed and moving
    related through their headers, in world space (RAS+ mm; ``init=None`` of
    :func:`dirnet_tf.register_engine.prepare_pair` resolves to ``"header"`` for images with
    patient geometry); ``"array"``: each image on its own array axes and field-of-view centre.
    Exports written before the key existed are ``"array"``, so they give the outputs they gave.
``default_spacing``
    Voxel size in mm given to image formats without one (PNG, NPY): a number or one per axis.
``config``
    The training configuration (:meth:`dirnet_tf.config.TrainConfig.to_dict`), for the record.
``dirnet_tf_version``
    The library version that wrote the export.

Exports written by earlier versions kept the training's flag values under ``flags`` (the
voxel size of formats without one as the string ``flags.default_spacing``); they are read too.
"""

import dataclasses
import json
import os

from dirnet_tf.spline_np import normalize_spacing
from dirnet_tf.preprocessing import ModelGrid

__all__ = ["METADATA_FILE", "SPACES", "ExportMetadataError", "ExportInfo", "step_output", "step_metadata",
           "model_metadata", "write_metadata", "read_metadata", "parse_metadata"]

METADATA_FILE = os.path.join("assets", "dirnet.json")
#: Values of the metadata's ``space``.
SPACES = ("world", "array")


class ExportMetadataError(ValueError):
    """An export's metadata that does not describe its model; the message names the export."""


def step_output(n):
    """Name of the serving signature's output holding the parameters of step ``n`` (0-based)."""
    return f"step_{int(n)}"


def step_metadata(model):
    """The ``steps`` of an export's metadata: each step's kind, grid spacing and output name.

    Parameters
    ----------
    model : keras.Model
        A DIRNet-like model; its ``step_layout()`` (if any) lists the composed steps.

    Returns
    -------
    list of dict or None
        ``{"kind": "affine" | "spline", "grid_spacing": [s, ...] or None, "output":
        "step_<n>"}`` in the order of the model's ``step_params``; None for a model without
        composed steps (the paper's model).
    """
    layout = model.step_layout() if callable(getattr(model, "step_layout", None)) else None
    if not layout:
        return None
    return [{"kind": kind, "grid_spacing": None if spacing is None else [int(s) for s in spacing],
             "output": step_output(n)} for n, (kind, spacing) in enumerate(layout)]


def model_metadata(model, image_shape, channels=1, **extra):
    """The metadata of an export of ``model`` (see the module docstring for the keys).

    Parameters
    ----------
    model : dirnet_tf.DIRNet
    image_shape : sequence of int
        Model input size (voxels, ij order).
    channels : int
    **extra
        Further keys (``model_grid``, ``default_spacing``, ``config``, ...), added as given.  With a
        ``model_grid``, ``space`` is ``"world"`` unless given.

    Returns
    -------
    dict
    """
    from dirnet_tf import __version__

    spacing = [int(v) for v in model.grid_spacing]  # the finest B-spline stage's
    record = {"image_shape": [int(n) for n in image_shape], "channels": int(channels),
              "grid_spacing": spacing[0] if len(set(spacing)) == 1 else spacing, "boundary": model.boundary,
              "passes": int(model.passes), "dirnet_tf_version": __version__}
    steps = step_metadata(model)
    if steps is not None:
        record.update(stages=list(model.stages), bounded=bool(model.bounded), symmetric=bool(model.symmetric),
                      normalize_inputs=bool(model.normalize_inputs), steps=steps)
    if extra.get("model_grid"):
        record["space"] = "world"
    record.update(extra)
    return record


def write_metadata(export_dir, metadata):
    """Write ``metadata`` to ``export_dir/assets/dirnet.json``; returns the path."""
    path = os.path.join(export_dir, METADATA_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(metadata, fh, indent=2, sort_keys=True, default=str)
    return path


def read_metadata(export_dir):
    """The metadata of the export in ``export_dir`` as a dict (``{}`` where there is none).

    Raises
    ------
    ExportMetadataError
        The file exists but is not a JSON object.
    """
    path = os.path.join(export_dir, METADATA_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as fh:
            metadata = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ExportMetadataError(f"{path}: unreadable export metadata ({exc}); export the model again") from exc
    if not isinstance(metadata, dict):
        raise ExportMetadataError(f"{path}: the export metadata is not a JSON object; export the model again")
    return metadata


@dataclasses.dataclass
class ExportInfo:
    """What an export's metadata says about its model.

    Attributes
    ----------
    shape : tuple of int
        Model input size (voxels, ij order).
    channels : int
    grid : dirnet_tf.preprocessing.ModelGrid or None
        The preprocessing (None: images must have the model's size, as for ``experiments.mnist``).
    grid_spacing : tuple of int or None
        Control-point spacing in model voxels (None: not recorded).
    boundary : str
        ``border`` or ``zeros``.
    default_spacing : float, tuple or None
        mm per voxel for formats without one.
    steps : list of dict or None
        A model of composed steps: ``{"kind": "affine" | "spline", "grid_spacing": tuple or None,
        "output": name}`` per step (see :func:`step_metadata`); None where the export serves no
        step parameters.
    passes : int or None
    metadata : dict
        The raw metadata.
    space : str
        ``"world"`` (fixed and moving related through their headers) or ``"array"`` (each image
        on its own array axes; exports without the ``space`` key).
    """

    shape: tuple
    channels: int = 1
    grid: object = None
    grid_spacing: tuple = None
    boundary: str = "border"
    default_spacing: object = None
    steps: list = None
    passes: int = None
    metadata: dict = dataclasses.field(default_factory=dict)
    space: str = "array"

    @property
    def ndim(self):
        """Spatial axes of the model (2 or 3)."""
        return len(self.shape)


def _default_spacing(metadata):
    value = metadata.get("default_spacing")
    if value is None:  # exports written before the key existed: the training's flag value
        value = (metadata.get("flags") or {}).get("default_spacing")
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        values = [float(v) for v in (value if isinstance(value, (list, tuple)) else str(value).split(","))
                  if str(v).strip()]
    except (TypeError, ValueError):
        return None
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _steps(metadata, path, ndim, served_outputs):
    steps = metadata.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) and s.get("output") for s in steps):
        return None  # the paper's model, or composed steps exported before their parameters were served
    served = set(served_outputs) if served_outputs is not None else None
    parsed = []
    for n, step in enumerate(steps):
        kind, name = step.get("kind"), step["output"]
        try:
            if kind not in ("affine", "spline") or (served is not None and name not in served):
                raise ValueError(f"expected kind affine or spline and an output among {sorted(served or [])}")
            spacing = normalize_spacing(step["grid_spacing"], ndim) if kind == "spline" else None
        except (ValueError, TypeError, KeyError) as exc:
            raise ExportMetadataError(f"{path}: step {n} of the metadata, {step}, does not describe the served "
                                      f"model: {exc}") from exc
        parsed.append({"kind": kind, "grid_spacing": spacing, "output": name})
    return parsed


def parse_metadata(metadata, path, shape, channels=1, served_outputs=None):
    """Interpret an export's metadata for a model of input size ``shape``.

    Parameters
    ----------
    metadata : dict
        :func:`read_metadata`'s result.
    path : str
        The export (for messages).
    shape : sequence of int
        The served model's input size (voxels, ij order).
    channels : int
    served_outputs : iterable of str or None
        The serving signature's output names, checked against ``steps`` (None: not checked).

    Returns
    -------
    ExportInfo

    Raises
    ------
    ExportMetadataError
        The metadata contradicts the served model.
    """
    shape = tuple(int(n) for n in shape)
    metadata = dict(metadata or {})
    grid = None
    if metadata.get("model_grid"):
        try:
            grid = ModelGrid.from_dict(metadata["model_grid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ExportMetadataError(f"{path}: unusable model_grid in the export's metadata: {exc}") from exc
        if grid.shape != shape:
            raise ExportMetadataError(f"{path}: the model grid {grid.shape} of the metadata is not the model's "
                                      f"input size {shape}")
    spacing = metadata.get("grid_spacing")
    if spacing is not None:
        try:
            if isinstance(spacing, str):
                spacing = [int(s) for s in spacing.split(",") if s.strip()]
                spacing = spacing[0] if len(spacing) == 1 else spacing
            spacing = normalize_spacing(spacing, len(shape))
        except (ValueError, TypeError) as exc:
            raise ExportMetadataError(f"{path}: grid_spacing {metadata['grid_spacing']!r} in the metadata: "
                                      f"{exc}") from exc
    passes = metadata.get("passes")
    space = metadata.get("space", "array")
    if space not in SPACES:
        raise ExportMetadataError(f"{path}: space {space!r} in the metadata must be one of {', '.join(SPACES)}")
    return ExportInfo(shape=shape, channels=int(channels), grid=grid, grid_spacing=spacing,
                      boundary=metadata.get("boundary", "border"), default_spacing=_default_spacing(metadata),
                      steps=_steps(metadata, path, len(shape), served_outputs),
                      passes=None if passes is None else int(passes), metadata=metadata,
                      space=space)
