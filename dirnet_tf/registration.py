"""Register images with an exported model, from Python: ``load_model``, ``register``, ``Result``.

    import dirnet_tf
    model = dirnet_tf.load_model("exports/mnist")        # a SavedModel export and its metadata
    result = dirnet_tf.register(model, fixed, moving)   # file paths, or numpy arrays (spacing=)
    result.warped          # the moving image on the fixed image's grid (the fixed image's shape)
    result.displacement    # [*fixed_shape, ndim]: moving voxel index minus fixed voxel index, ij order
    result.save(out="w.nii.gz", displacement="d.nii.gz", transform="t.tfm")

Inputs are read like ``python -m experiments.register`` reads them (:mod:`dirnet_tf.readers`:
PNG/JPEG/TIFF/BMP, ``.npy``, NIfTI, DICOM file or series folder, ``FILE.h5:/dataset``), or
given as numpy arrays of the model's dimensionality (grey, no channel axis).  Arrays carry no
patient geometry: they live in the pixel space of PNG/NPY files
(:func:`dirnet_tf.geometry.pixel_affine`) with the given ``spacing`` (mm per array axis).

:meth:`Result.save` writes exactly the files that the same flags of ``experiments.register``
write (every output staged and renamed only when all succeeded); the command's module docstring
describes each output, its units and axes.  :func:`run_jobs` is the command's batch runner.
"""

import dataclasses
import os

import numpy as np

from dirnet_tf import register_engine
from dirnet_tf.export_metadata import ExportInfo, ExportMetadataError, parse_metadata
from dirnet_tf.geometry import world_to_voxels
from dirnet_tf.label_carrying import carry_labels
from dirnet_tf.register_errors import RegisterError
from dirnet_tf.register_jobs import Job, check_jobs, wanted_outputs
from dirnet_tf.register_outputs import Staging, write_outputs
from dirnet_tf.register_refine import check_refine_options, refine_prepared

__all__ = ["ExportedModel", "load_model", "register", "Result", "run_jobs", "RegisterError"]


@dataclasses.dataclass
class ExportedModel:
    """A served model and what its metadata says about it.

    Attributes
    ----------
    fn : callable
        ``fn(fixed=..., moving=...) -> {"warped", "displacement", ...}`` (the serving signature;
        a model of composed steps also returns the outputs named in ``info.steps``).
    info : dirnet_tf.export_metadata.ExportInfo
        Model input size (voxels, ij), channels, preprocessing (``grid``), control-point
        spacing (model voxels), boundary, default spacing (mm), composed steps.
    path : str
        The export directory (for messages).
    """

    fn: object
    info: ExportInfo
    path: str

    shape = property(lambda self: self.info.shape, doc="Model input size (voxels, ij order).")
    ndim = property(lambda self: self.info.ndim, doc="Spatial axes (2 or 3).")
    channels = property(lambda self: self.info.channels, doc="Channels per image.")
    grid = property(lambda self: self.info.grid, doc="The ModelGrid preprocessing, or None (images of the "
                                                      "model's size, as ``experiments.mnist``).")
    grid_spacing = property(lambda self: self.info.grid_spacing, doc="Control-point spacing (model voxels) or None.")
    boundary = property(lambda self: self.info.boundary, doc="``border`` or ``zeros``.")
    default_spacing = property(lambda self: self.info.default_spacing, doc="mm per voxel for formats without one.")
    steps = property(lambda self: self.info.steps, doc="Composed steps served by the export, or None.")
    space = property(lambda self: self.info.space, doc="``world`` (images related through their headers by "
                                                        "default) or ``array`` (exports written before).")
    metadata = property(lambda self: self.info.metadata, doc="The raw ``assets/dirnet.json``.")


def load_model(path):
    """Load an exported model (:func:`dirnet_tf.inference.load_export`) as an :class:`ExportedModel`.

    ``path`` is an export directory, or the name of a model shipped inside the package
    (:data:`dirnet_tf.pretrained.PRETRAINED`: ``"brain"``); a directory of that name that holds a
    SavedModel wins over the shipped model.

    Raises
    ------
    RegisterError
        ``path`` is neither a SavedModel directory nor a shipped model's name, or its metadata does
        not describe it.
    """
    from dirnet_tf.inference import load_export
    from dirnet_tf.pretrained import resolve

    path = resolve(os.fspath(path))
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "saved_model.pb")):
        raise RegisterError(f"{path} is not a SavedModel directory (no saved_model.pb); "
                            "export one with `python -m experiments.mnist --export_only` or "
                            "`python -m experiments.train`, or name a shipped model (`brain`)")
    try:
        fn, metadata = load_export(path)
    except ValueError as exc:
        raise RegisterError(str(exc)) from exc
    spec = fn.structured_input_signature[1]
    if set(spec) != {"fixed", "moving"}:
        raise RegisterError(f"{path}: serving_default takes {sorted(spec)}, expected fixed and moving")
    shape = spec["fixed"].shape
    outputs = getattr(fn, "structured_outputs", None)
    try:
        info = parse_metadata(metadata, path, tuple(int(n) for n in shape[1:-1]), int(shape[-1]),
                              served_outputs=set(outputs) if isinstance(outputs, dict) else None)
    except ExportMetadataError as exc:
        raise RegisterError(str(exc)) from exc
    return ExportedModel(fn, info, path)


def _spacings(spacing):
    """``spacing`` -> (fixed spacing, moving spacing): a pair of per-image values (each None, a
    number or a sequence) when both items are None or sequences, else one value for both."""
    if (isinstance(spacing, (tuple, list)) and len(spacing) == 2
            and all(s is None or np.ndim(s) == 1 for s in spacing)):
        return tuple(spacing)
    return spacing, spacing


def _source(value, what):
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else f"<{what} array>"


class Result:
    """One registration: the moving image mapped onto the fixed image's grid.

    Attributes
    ----------
    model : ExportedModel
    details : dict
        The engine's record (:func:`dirnet_tf.register_engine.finish`): ``fixed``, ``moving``
        (model inputs ``[*model_shape, C]``), ``warped``, ``displacement`` (the served outputs
        on the model grid, model voxels ij), ``fixed_image``, ``moving_image``
        (:class:`dirnet_tf.readers.Image`), ``spline``, ``chain``, ...
    """

    def __init__(self, model, details, fixed_source, moving_source):
        self.model, self.details = model, details
        self._sources = (fixed_source, moving_source)

    @property
    def warped(self):
        """The moving image on the fixed image's grid: float32 ``fixed_image.shape`` (original moving
        intensities; for exports without ``model_grid`` the served ``warped``, ``[H, W]`` for one
        channel, ``[H, W, C]`` otherwise)."""
        image = self.details["image"]
        return image[..., 0] if self.model.grid is None and image.shape[-1] == 1 else image

    @property
    def displacement(self):
        """float32 ``[*fixed_shape, ndim]``: moving voxel index minus fixed voxel index (ij order), so
        ``warped = map_coordinates(moving, grid + displacement)`` on the moving image's voxel grid."""
        return self.details["field"]

    @property
    def fixed_image(self):
        """The fixed image (:class:`dirnet_tf.readers.Image`) on its own grid."""
        return self.details["fixed_image"]

    @property
    def moving_image(self):
        """The moving image (:class:`dirnet_tf.readers.Image`) on its own grid."""
        return self.details["moving_image"]

    @property
    def refinement(self):
        """The refinement record (iterations, similarity, objective before / after, seconds), or None
        without ``refine``."""
        return self.details.get("refinement")

    @property
    def init(self):
        """How the images were related: ``{"mode": "header" | "center" | "array", "translation_mm":
        [x, y, z]}`` (the initial translation, RAS mm)."""
        return self.details.get("init")

    def summary(self):
        """``{"ncc_before", "ncc_after", "folding"}`` on the model grid (what the command prints)."""
        return register_engine.summary(self.details)

    def warp_labels(self, labels):
        """Carry an integer label map of the moving image to the fixed image's grid.

        Parameters
        ----------
        labels : numpy array or path
            Integer labels on the moving image's grid (its shape), or a file
            (:func:`dirnet_tf.readers.read_labels`).

        Returns
        -------
        np.ndarray int64 ``fixed_shape``
            At every fixed voxel the label whose one-hot map, interpolated multilinearly at the
            moving point, is largest (ties: the smaller label; nothing sampled: 0) -- exactly
            ``--out_labels``.
        """
        moving = self.moving_image
        if isinstance(labels, (str, os.PathLike)):
            labels = register_engine.read_moving_labels(os.fspath(labels), moving, self.model.ndim)
        labels = np.asarray(labels)
        if labels.shape != moving.shape:
            raise RegisterError(f"labels of shape {labels.shape} are not on the moving image's grid "
                                f"{moving.shape}")
        if not (np.issubdtype(labels.dtype, np.integer) or np.array_equal(labels, np.round(labels))):
            raise RegisterError("labels must be whole numbers")
        labels = labels.astype(np.int64)
        out = np.zeros(self.fixed_image.shape, np.int64)
        for rows, _, p_m in register_engine.fixed_slabs(self.model, self.details):
            out[rows] = carry_labels(labels, np.moveaxis(p_m, -1, 0), self.model.boundary)
        return out

    def map_points(self, points, coordinates="voxel"):
        """Map fixed-image points to the moving image, evaluating the spline (chain) exactly.

        Parameters
        ----------
        points : array ``[P, ndim]`` (or ``[ndim]``)
            ``coordinates="voxel"``: voxel indices of the fixed image, ij order.
            ``coordinates="world"``: RAS+ mm (``[P, 3]``; 2-D images also ``[P, 2]`` in plane),
            only for a fixed image with patient geometry (NIfTI/DICOM).
        coordinates : {"voxel", "world"}

        Returns
        -------
        np.ndarray float64, the shape of ``points``
            Moving voxel indices (ij) or moving RAS+ mm -- the transformix ``-def`` direction,
            as ``--points`` / ``--out_points``.  A point outside the fixed image (beyond half a
            voxel past the border voxel centres) is an error.
        """
        if coordinates not in ("voxel", "world"):
            raise ValueError(f"coordinates must be 'voxel' or 'world', not {coordinates!r}")
        values = np.asarray(points, dtype=np.float64)
        single = values.ndim == 1
        values = np.atleast_2d(values)
        fixed = self.fixed_image
        if coordinates == "world":
            if fixed.affine is None:
                raise RegisterError("world coordinates need a fixed image with patient geometry; give voxel "
                                    "indices (ij order)")
            voxels = world_to_voxels(fixed.affine, values, self.model.ndim)
        else:
            voxels = values
        if voxels.shape[-1] != self.model.ndim:
            raise ValueError(f"points of shape {values.shape} for a {self.model.ndim}-D image")
        shape = np.asarray(fixed.shape, dtype=np.float64)
        outside = np.any((voxels < -0.5 - 1e-6) | (voxels > shape - 0.5 + 1e-6), axis=1)
        if outside.any():
            n = int(np.argmax(outside))
            raise RegisterError(f"point {n} {values[n].tolist()} lies outside the fixed image {fixed.source} "
                                f"(voxel {np.round(voxels[n], 3).tolist()}, ij order)")
        out = register_engine.map_fixed_points(self.model, self.details, voxels, coordinates, values.shape[1],
                                               what="map_points")
        return out[0] if single else out

    def save(self, out=None, displacement=None, transform=None, elastix_transform=None, moving_labels=None,
             out_labels=None, points=None, out_points=None, figure=None):
        """Write the outputs named (every argument optional): exactly what ``experiments.register``
        writes for the flags of the same names, all staged and renamed only when all succeeded.

        Returns
        -------
        list of str
            The files written (absolute paths).
        """
        job = Job(self._sources[0], self._sources[1], moving_labels=moving_labels, points=points, out=out,
                  displacement=displacement, out_labels=out_labels, out_points=out_points, transform=transform,
                  elastix_transform=elastix_transform, figure=figure)
        job = Job(**{k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
                     for k, v in dataclasses.asdict(job).items()})
        if not job.outputs() and not (job.moving_labels or job.points):
            return []
        check_jobs([job], self.model)
        if job.moving_labels:
            register_engine.attach_labels(self.model, self.details, job.moving_labels)
        if job.points:
            register_engine.attach_points(self.model, self.details, job.points)
        register_engine.finish(self.model, self.details, wanted_outputs(job))
        staging = Staging()
        try:
            written = write_outputs(self.model, job, self.details, staging)
            staging.commit()
        except BaseException:
            staging.abort()
            raise
        return written


def register(model, fixed, moving, spacing=None, init=None, refine=0, refine_similarity=None, progress=None):
    """Register ``moving`` to ``fixed`` with ``model``.

    Parameters
    ----------
    model : ExportedModel or str
        :func:`load_model`'s result, or an export directory.
    fixed, moving : str, os.PathLike or numpy array
        Image files, or arrays of the model's dimensionality (grey; no patient geometry).
    spacing : None, number, sequence, or a pair of them
        mm per array axis of array inputs: one value (or one per axis) for both images, or a pair
        ``(fixed_spacing, moving_spacing)`` of sequences (or None).  None: the export's default
        spacing, else 1 mm.  Files use their own spacing.
    init : {None, "header", "center", "array"}
        How the two images are related before the network sees them
        (:func:`dirnet_tf.register_engine.prepare_pair`): ``"header"`` through their headers (world
        RAS mm), ``"center"`` the same after aligning their intensity centres of mass, ``"array"``
        each image on its own array axes and field-of-view centre (images without patient
        geometry always).  None: ``"header"`` when both images have patient geometry and the
        export is a world-space export, else ``"array"``.
    refine : int
        Instance optimisation: optimiser steps on this pair after the network's prediction
        (:mod:`dirnet_tf.register_refine`); 0 (default) keeps the network's result.
    refine_similarity : {None, "ncc", "lncc", "mi"}
        Similarity of the refinement (None: the model's training similarity); ``"mi"`` (mutual
        information) for images of different contrast.  Only with ``refine > 0``.
    progress : callable or None
        ``progress(iteration, objective)`` during refinement.

    Returns
    -------
    Result
    """
    model = model if isinstance(model, ExportedModel) else load_model(model)
    steps, similarity = check_refine_options(model, refine, refine_similarity)
    details = register_engine.prepare_pair(model, fixed, moving, _spacings(spacing), init=init)
    register_engine.infer(model, [details])
    refine_prepared(model, [details], steps, similarity, progress)
    register_engine.finish(model, details, {"image", "field"})
    return Result(model, details, _source(fixed, "fixed"), _source(moving, "moving"))


def run_jobs(model, jobs, batch_size=16, init=None, refine=0, refine_similarity=None, progress=None):
    """Register every job (:class:`dirnet_tf.register_jobs.Job`) and write its outputs; nothing is left
    behind unless all succeed.

    2-D pairs are run through the model (and refined) ``batch_size`` at a time, 3-D pairs one at a
    time; ``init``, ``refine``, ``refine_similarity`` and ``progress`` as :func:`register`.
    Returns one ``(job, summary dict, written paths)`` per job; the summary also holds ``init``
    and, for a refined job, its ``refinement`` record.
    """
    steps, similarity = check_refine_options(model, refine, refine_similarity)
    check_jobs(jobs, model)
    step = max(1, int(batch_size)) if model.ndim == 2 else 1
    staging = Staging()
    done = []
    try:
        for start in range(0, len(jobs), step):
            chunk = jobs[start:start + step]
            prepared = []
            for job in chunk:
                try:
                    details = register_engine.prepare_pair(model, job.fixed, job.moving, init=init)
                    if job.moving_labels:
                        register_engine.attach_labels(model, details, job.moving_labels)
                    if job.points:
                        register_engine.attach_points(model, details, job.points)
                    prepared.append(details)
                except RegisterError as exc:
                    raise RegisterError(f"{exc} ({job.where})" if job.where else str(exc)) from exc
            register_engine.infer(model, prepared, batch_size=step)
            refine_prepared(model, prepared, steps, similarity, progress)
            for job, details in zip(chunk, prepared):
                try:
                    register_engine.finish(model, details, wanted_outputs(job))
                    written = write_outputs(model, job, details, staging)
                except RegisterError as exc:
                    raise RegisterError(f"{exc} ({job.where})" if job.where else str(exc)) from exc
                summary = register_engine.summary(details)
                summary["init"] = details.get("init")
                if details.get("refinement"):
                    summary["refinement"] = details["refinement"]
                done.append((job, summary, written))
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    return done
