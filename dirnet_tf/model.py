"""DIRNet: regressor + cubic B-spline transformer + resampler as one Keras model."""

import keras
import tensorflow as tf

from dirnet_tf import losses as _losses
from dirnet_tf.affine import AffineRegressor, affine_displacement
from dirnet_tf.bspline import bounded_control_points
from dirnet_tf.spline_np import control_grid_shape, normalize_spacing
from dirnet_tf.layers import BSplineTransformer, Regressor, Resampler
from dirnet_tf.warping import compose_displacements

__all__ = ["DIRNet"]


@keras.saving.register_keras_serializable(package="dirnet_tf")
class DIRNet(keras.Model):
    """Deformable image registration network (de Vos et al. 2017).

    Parameters
    ----------
    image_shape : sequence of int
        Spatial size ``(H, W)`` or ``(D, H, W)`` of fixed and moving images.
    grid_spacing : int or sequence of int
        B-spline control-point spacing in pixels (powers of two, see
        :class:`dirnet_tf.layers.Regressor`).
    boundary : str
        Resampling boundary: ``"border"`` (default) or ``"zeros"``.
    channels : int
        Channels ``C`` of each image (default 1).
    filters, pointwise_filters, batch_norm, activation, convs_per_level
        Regressor settings (see :class:`dirnet_tf.layers.Regressor`); the
        default width is 16.
    similarity : str or callable
        Similarity loss of the objective (:meth:`objective`, used by the
        trainer and by ``fit``): ``"ncc"`` (default, ``-NCC``), ``"lncc"``
        (local NCC), ``"mse"`` or a function ``(fixed, warped,
        reduction="none") -> [B]``.
    bending_weight : float
        Weight of :func:`dirnet_tf.losses.bending_energy` (default 0, the
        paper's setting).
    folding_weight : float
        Weight of :func:`dirnet_tf.losses.folding_penalty` (default 0).
    passes : int
        Regressor passes (default 1, the paper).  With ``passes > 1`` the same
        regressor (shared weights) looks again at the fixed image and the
        moving image warped by the current estimate, and its output is added
        to the control points: ``c <- c + regressor(fixed, warp(moving, c))``.
        The result is still one cubic B-spline on the same control grid; each
        pass costs one more regressor evaluation.  Training is end to end: the
        gradient also flows through the warped image that a later pass sees
        into the earlier passes (on MNIST this trained markedly better than
        treating that image as a constant).
    stages : sequence or None
        The transform as successive stages, e.g. ``("affine", 8, 4)``: an affine
        stage (:class:`dirnet_tf.affine.AffineRegressor`, identity at start) and
        B-spline stages from coarse to fine (each an int grid spacing, with a
        regressor of its own and ``passes`` passes).  Every step sees the fixed
        image and the moving image warped by the steps before it, and the steps
        are **composed** (:func:`dirnet_tf.warping.compose_displacements`), not
        added; ``displacement`` is the total field and ``warped`` the moving
        image resampled once at ``x + displacement(x)``.  ``None`` (default):
        one B-spline stage at ``grid_spacing``, as in the paper.
    bounded : bool
        Folding-free by construction: every B-spline step's control points are
        squashed below the injectivity bound
        (:func:`dirnet_tf.bspline.bounded_control_points`, 0.48 / 0.40 of the
        spacing in 2-D / 3-D) and the affine matrix below 0.9 / ndim per entry,
        so each step is injective, and passes are composed (not added) so the
        total map is a composition of injective maps.
    symmetric : bool
        Every step predicts ``r(F, W) - r(W, F)`` (the regressor on both orders):
        identical inputs give exactly the identity, and swapping fixed and moving
        negates the step.
    normalize_inputs : bool
        The regressors see each image standardised (zero mean, unit standard
        deviation per image), so a change of intensity scale does not change the
        result; the moving image itself is warped as it is.
    inverse_consistency_weight : float
        Weight of :func:`dirnet_tf.losses.inverse_consistency_loss` (default 0).
        When it is positive, a call with ``training=True`` registers every pair
        both ways (one batch of ``2B``) and returns the other direction under
        ``"inverse"``; the objective then averages the two directions' terms and
        adds the weighted residual of composing the two fields.  Inference
        (``training=False``, the export) registers one way only, as before.
    **kwargs
        Passed to ``keras.Model`` (e.g. ``name``).

    Call
    ----
    ``model({"fixed": f, "moving": m})`` (or ``model((f, m))``) with each image
    ``[B, *image_shape, C]`` returns a dict:

    * ``"warped"``: ``resample(m, identity_grid(image_shape) + displacement,
      boundary=model.boundary)``, ``[B, *image_shape, C]``;
    * ``"displacement"``: dense field ``[B, *image_shape, ndim]``, pixels, ij;
    * ``"control_points"``: ``[B, *control_grid_shape, ndim]``.

    A model of composed steps (any of ``stages``, ``bounded``, ``symmetric``,
    ``normalize_inputs``) also returns ``"control_point_steps"`` (the B-spline
    steps' control points) and ``"step_params"``: every step's parameters in
    the order of :meth:`step_layout` -- ``[B, ndim * (ndim + 1)]`` for an affine
    step (as :func:`dirnet_tf.affine.affine_displacement` takes them), the
    (bounded) control points ``[B, *control_grid, ndim]`` (pixels, ij) for a
    B-spline step.  ``displacement`` is their composition ``phi_1 o ... o
    phi_n`` (``phi_k(x) = x + u_k(x)``; ``phi_n`` is applied to the fixed point
    first), sampled on the pixel grid.

    Training
    --------
    The objective is defined once, by :func:`dirnet_tf.losses.registration_objective`
    with this model's ``similarity``, ``bending_weight`` and ``folding_weight``
    (all saved by ``get_config``).  :meth:`objective` gives it per pair (the
    trainer uses it), :meth:`registration_loss` / :meth:`loss_terms` its batch
    mean.
    ``model.compile(optimizer)`` without a ``loss`` followed by
    ``model.fit(dataset)`` (elements ``{"fixed": ..., "moving": ...}``) trains
    unsupervised on the same objective.  If ``compile`` is given a ``loss``,
    Keras's normal supervised behaviour applies instead.
    """

    def __init__(
        self,
        image_shape,
        grid_spacing,
        boundary="border",
        channels=1,
        filters=16,
        pointwise_filters=None,
        batch_norm=False,
        activation="elu",
        convs_per_level=1,
        similarity="ncc",
        bending_weight=0.0,
        folding_weight=0.0,
        passes=1,
        stages=None,
        bounded=False,
        symmetric=False,
        normalize_inputs=False,
        inverse_consistency_weight=0.0,
        **kwargs,
    ):
        kwargs.setdefault("name", "dirnet")
        super().__init__(**kwargs)
        self.image_shape = tuple(int(n) for n in image_shape)
        if len(self.image_shape) not in (2, 3):
            raise ValueError(f"image_shape must have 2 or 3 entries, got {image_shape!r}")
        self.ndim = len(self.image_shape)
        self.grid_spacing = normalize_spacing(grid_spacing, self.ndim)
        self.grid_shape = control_grid_shape(self.image_shape, self.grid_spacing)
        self.channels = int(channels)
        self.boundary = boundary
        self.similarity = similarity
        self.bending_weight = float(bending_weight)
        self.folding_weight = float(folding_weight)
        self.passes = int(passes)
        if self.passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes!r}")
        self.stages = None if stages is None else tuple(_parse_stage(st) for st in stages)
        if self.stages is not None and not any(st != "affine" for st in self.stages):
            raise ValueError(f"stages must hold at least one B-spline grid spacing, got {stages!r}")
        self.bounded = bool(bounded)
        self.symmetric = bool(symmetric)
        self.normalize_inputs = bool(normalize_inputs)
        self.inverse_consistency_weight = float(inverse_consistency_weight)
        spline_spacings = ([self.grid_spacing] if self.stages is None else
                           [normalize_spacing(st, self.ndim) for st in self.stages if st != "affine"])
        # The finest B-spline stage gives the model's grid (metadata, transform export).
        self.grid_spacing = spline_spacings[-1]
        self.grid_shape = control_grid_shape(self.image_shape, self.grid_spacing)
        self._spline_spacings = spline_spacings
        # Pixel positions and the compiled resampler stay in float32 under a
        # mixed-precision policy (the regressor computes in the policy's dtype).
        geometry_dtype = None
        if self.dtype_policy.compute_dtype in ("float16", "bfloat16"):
            geometry_dtype = "float32"
        # Saved as given: the stages' regressors have as many levels as their own spacing needs.
        self._regressor_args = {"filters": filters, "pointwise_filters": pointwise_filters,
                                "convs_per_level": convs_per_level}
        regressor_options = dict(filters=filters, pointwise_filters=pointwise_filters, batch_norm=batch_norm,
                                 activation=activation, convs_per_level=convs_per_level, dtype=self.dtype_policy)
        # The first B-spline stage keeps the names of the one-stage model (checkpoints).
        self._spline_names = []
        for k, spacing in enumerate(spline_spacings):
            suffix = "" if k == 0 else f"_{k}"
            setattr(self, "regressor" + suffix,
                    Regressor(self.image_shape, spacing, name="regressor" + suffix, **regressor_options))
            setattr(self, "transformer" + suffix,
                    BSplineTransformer(self.image_shape, spacing, name="bspline" + suffix, dtype=geometry_dtype))
            self._spline_names.append(("regressor" + suffix, "transformer" + suffix))
        if self.stages is not None and "affine" in self.stages:
            width = filters if isinstance(filters, int) else 16
            self.affine_regressor = AffineRegressor(self.image_shape, filters=width, bounded=self.bounded,
                                                    name="affine_regressor", dtype=self.dtype_policy)
        self.resampler = Resampler(boundary, name="resampler", dtype=geometry_dtype)
        self._objective = _losses.registration_objective(
            similarity, self.bending_weight, self.folding_weight, self.image_shape, self.grid_spacing,
            step_spacings=None if self._legacy else self._step_spacings(),
            inverse_consistency_weight=self.inverse_consistency_weight)
        self._build_all()

    @property
    def _legacy(self):
        """The paper's model and its additive refinement passes (one B-spline stage, no options)."""
        return self.stages is None and not (self.bounded or self.symmetric or self.normalize_inputs)

    def _steps(self):
        """The steps of the general path, in order: ``("affine", None)`` or ``("spline", k)``."""
        stages = self.stages if self.stages is not None else (None,)
        steps, k = [], 0
        for stage in stages:
            if stage == "affine":
                steps.append(("affine", None))
            else:
                steps += [("spline", k)] * self.passes
                k += 1
        return steps

    def step_layout(self):
        """The composed steps in call order, or None for the paper's model.

        Returns
        -------
        list or None
            ``("affine", None)`` or ``("spline", grid_spacing)`` per step, in the
            order of the call's ``step_params`` (the order in which the steps are
            predicted; the total map is ``phi_1 o ... o phi_n``); None for the
            paper's model and its additive passes (one B-spline, ``control_points``).
        """
        if self._legacy:
            return None
        return [(kind, None if k is None else tuple(int(s) for s in self._spline_spacings[k]))
                for kind, k in self._steps()]

    def stage_layers(self):
        """The layers holding each stage's weights, in stage order.

        Returns
        -------
        list of list of keras.layers.Layer
            ``[affine_regressor]`` for an affine stage, ``[regressor, transformer]`` for a
            B-spline stage; the paper's model is one B-spline stage.  Used to train the
            stages one after another (copy the earlier stages' weights into a model with
            one more stage and freeze them).
        """
        out, k = [], 0
        for stage in (self.stages if self.stages is not None else (None,)):
            if stage == "affine":
                out.append([self.affine_regressor])
            else:
                out.append([getattr(self, name) for name in self._spline_names[k]])
                k += 1
        return out

    def _step_spacings(self):
        """Grid spacing of every B-spline step (for the bending energy of each)."""
        return [self._spline_spacings[k] for kind, k in self._steps() if kind == "spline"]

    @property
    def input_dtype(self):
        # Images enter in the resampler's dtype (float32 under mixed precision),
        # so the moving image is warped at full precision; the regressor casts
        # its own input to its compute dtype.
        return self.resampler.compute_dtype

    def _build_all(self):
        image = (None,) + self.image_shape + (self.channels,)
        pair = image[:-1] + (2 * self.channels,)
        for (regressor, transformer), spacing in zip(self._spline_names, self._spline_spacings):
            getattr(self, regressor).build(pair)
            getattr(self, transformer).build((None,) + control_grid_shape(self.image_shape, spacing) + (self.ndim,))
        if hasattr(self, "affine_regressor"):
            self.affine_regressor.build(pair)
        self.resampler.build(image, (None,) + self.image_shape + (self.ndim,))
        self.built = True

    def build(self, input_shape=None):
        self._build_all()

    def _unpack(self, inputs):
        if isinstance(inputs, dict):
            missing = {"fixed", "moving"} - set(inputs)
            if missing:
                raise ValueError(
                    f"DIRNet inputs must be a dict with keys 'fixed' and 'moving', "
                    f"got keys {sorted(inputs)}"
                )
            fixed, moving = inputs["fixed"], inputs["moving"]
        elif isinstance(inputs, (list, tuple)) and len(inputs) == 2:
            fixed, moving = inputs
        else:
            raise ValueError(
                "DIRNet must be called on {'fixed': f, 'moving': m} (or a (fixed, moving) pair)"
            )
        fixed = tf.convert_to_tensor(fixed)
        moving = tf.convert_to_tensor(moving)
        expected = (None,) + self.image_shape + (self.channels,)
        for name, x in (("fixed", fixed), ("moving", moving)):
            shape = tuple(x.shape)
            if len(shape) != len(expected) or any(
                e is not None and s is not None and e != s for e, s in zip(expected, shape)
            ):
                raise ValueError(
                    f"DIRNet({self.image_shape}, channels={self.channels}) expects {name} of "
                    f"shape [B, {', '.join(map(str, expected[1:]))}], got {shape}"
                )
        dtype = self.resampler.compute_dtype
        return tf.cast(fixed, dtype), tf.cast(moving, dtype)

    def call(self, inputs, training=None):
        fixed, moving = self._unpack(inputs)
        if not (training and self.inverse_consistency_weight):
            return self._register(fixed, moving, training)
        # Both directions in one batch: [a; b] registered to [b; a].
        both = self._register(tf.concat([fixed, moving], 0), tf.concat([moving, fixed], 0), training)
        half = tf.shape(fixed)[0]
        forward = tf.nest.map_structure(lambda t: t[:half], both)
        inverse = tf.nest.map_structure(lambda t: t[half:], both)
        inverse["fixed"] = moving
        forward["inverse"] = inverse
        return forward

    def _register(self, fixed, moving, training):
        """The model's outputs for one direction (see the class docstring)."""
        if not self._legacy:
            return self._call_steps(fixed, moving, training)
        # Pass 1 sees the moving image; every later pass the current warped one.
        control_points, warped = None, moving
        for _ in range(self.passes):
            pair = tf.concat([fixed, warped], axis=-1)  # cast to the regressor's dtype by Keras
            update = self.regressor(pair, training=training)
            control_points = update if control_points is None else (
                control_points + tf.cast(update, control_points.dtype))
            displacement = self.transformer(control_points)
            warped = self.resampler(moving, displacement)
        return {
            "warped": warped,
            "displacement": displacement,
            "control_points": control_points,
        }

    def _call_steps(self, fixed, moving, training):
        """Stages and passes as composed steps (see ``stages``, ``bounded``, ``symmetric``)."""
        seen_fixed = _standardize(fixed) if self.normalize_inputs else fixed
        total, warped, control_point_steps, step_params = None, moving, [], []
        for kind, k in self._steps():
            seen_warped = _standardize(warped) if self.normalize_inputs else warped
            forward = tf.concat([seen_fixed, seen_warped], axis=-1)
            backward = tf.concat([seen_warped, seen_fixed], axis=-1)
            if kind == "affine":
                params = self.affine_regressor(forward)
                if self.symmetric:
                    params = params - self.affine_regressor(backward)
                params = tf.cast(params, moving.dtype)
                step_params.append(params)
                step = affine_displacement(params, self.image_shape)
            else:
                regressor, transformer = (getattr(self, name) for name in self._spline_names[k])
                points = regressor(forward, training=training)
                if self.symmetric:
                    points = points - regressor(backward, training=training)
                points = tf.cast(points, moving.dtype)
                if self.bounded:
                    points = bounded_control_points(points, self._spline_spacings[k], self.ndim)
                control_point_steps.append(points)
                step_params.append(points)
                step = transformer(points)
            total = step if total is None else compose_displacements(total, step)
            warped = self.resampler(moving, total)
        outputs = {"warped": warped, "displacement": total, "control_point_steps": control_point_steps,
                   "step_params": step_params}
        if control_point_steps:
            outputs["control_points"] = control_point_steps[-1]
        return outputs

    def objective(self, fixed, outputs):
        """The registration objective per pair (pure; no state is changed).

        Parameters
        ----------
        fixed : Tensor ``[B, *image_shape, C]``.
        outputs : dict returned by calling the model.

        Returns
        -------
        tuple
            ``(per_pair_loss [B], {name: per_pair_value [B]})``, float32; the parts
            are ``similarity``, ``ncc`` and, when weighted, ``bending_energy`` and
            ``folding_penalty`` (see :func:`dirnet_tf.losses.registration_objective`).
        """
        return self._objective(fixed, outputs)

    def loss_terms(self, fixed, outputs):
        """Batch means of the objective and of its parts.

        Parameters
        ----------
        fixed : Tensor ``[B, *image_shape, C]``.
        outputs : dict returned by calling the model.

        Returns
        -------
        dict of float32 scalars: ``total`` (the loss to minimise) and the parts of
        :meth:`objective`.
        """
        total, parts = self.objective(fixed, outputs)
        terms = {k: tf.reduce_mean(v) for k, v in parts.items()}
        terms["total"] = tf.reduce_mean(total)
        return terms

    def registration_loss(self, fixed, outputs):
        """Scalar objective to minimise: the batch mean of :meth:`objective`.

        Parameters
        ----------
        fixed : Tensor ``[B, *image_shape, C]``.
        outputs : dict returned by calling the model.
        """
        return tf.reduce_mean(self.objective(fixed, outputs)[0])

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self._compile_loss is not None:
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        fixed, _ = self._unpack(x)
        loss = self.registration_loss(fixed, y_pred)
        for extra in self.losses:
            loss = loss + self._aggregate_additional_loss(extra)
        return loss

    def get_config(self):
        reg = self.regressor
        similarity = self.similarity
        if not isinstance(similarity, str):
            similarity = keras.saving.serialize_keras_object(similarity)
        return {
            "name": self.name,
            "dtype": self.dtype_policy.name,
            "image_shape": list(self.image_shape),
            "grid_spacing": list(self.grid_spacing),
            "boundary": self.boundary,
            "channels": self.channels,
            "filters": list(reg.filters),
            "pointwise_filters": list(reg.pointwise_filters),
            "batch_norm": reg.batch_norm,
            "activation": reg.activation,
            "convs_per_level": list(reg.convs_per_level),
            "similarity": similarity,
            "bending_weight": self.bending_weight,
            "folding_weight": self.folding_weight,
            "passes": self.passes,
            **({} if self._legacy else {k: (list(v) if isinstance(v, (list, tuple)) else v)
                                        for k, v in self._regressor_args.items()}),
            "stages": None if self.stages is None else list(self.stages),
            "bounded": self.bounded,
            "symmetric": self.symmetric,
            "normalize_inputs": self.normalize_inputs,
            "inverse_consistency_weight": self.inverse_consistency_weight,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        similarity = config.get("similarity", "ncc")
        if isinstance(similarity, dict):
            config["similarity"] = keras.saving.deserialize_keras_object(similarity)
        return cls(**config)


def _parse_stage(stage):
    """``"affine"``, or a B-spline grid spacing (int, or a per-axis sequence)."""
    if isinstance(stage, str):
        if stage.strip().lower() == "affine":
            return "affine"
        try:
            return int(stage)
        except ValueError:
            raise ValueError(f"a stage is 'affine' or a B-spline grid spacing, got {stage!r}") from None
    return stage if isinstance(stage, (int, tuple)) else tuple(stage)


def _standardize(images):
    """Each image minus its mean, over its standard deviation (all pixels and channels)."""
    axes = list(range(1, images.shape.rank))
    mean, variance = tf.nn.moments(images, axes=axes, keepdims=True)
    return (images - mean) * tf.math.rsqrt(variance + 1e-6)
