"""DIRNet: regressor + cubic B-spline transformer + resampler as one Keras model."""

import keras
import tensorflow as tf

from dirnet_tf import losses as _losses
from dirnet_tf.bspline import control_grid_shape, normalize_spacing
from dirnet_tf.layers import BSplineTransformer, Regressor, Resampler

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
        self._objective = _losses.registration_objective(
            similarity, self.bending_weight, self.folding_weight, self.image_shape, self.grid_spacing)
        self.passes = int(passes)
        if self.passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes!r}")
        self.regressor = Regressor(
            self.image_shape,
            self.grid_spacing,
            filters=filters,
            pointwise_filters=pointwise_filters,
            batch_norm=batch_norm,
            activation=activation,
            convs_per_level=convs_per_level,
            name="regressor",
            dtype=self.dtype_policy,
        )
        # Pixel positions and the compiled resampler stay in float32 under a
        # mixed-precision policy (the regressor computes in the policy's dtype).
        geometry_dtype = None
        if self.dtype_policy.compute_dtype in ("float16", "bfloat16"):
            geometry_dtype = "float32"
        self.transformer = BSplineTransformer(
            self.image_shape, self.grid_spacing, name="bspline", dtype=geometry_dtype
        )
        self.resampler = Resampler(boundary, name="resampler", dtype=geometry_dtype)
        self._build_all()

    @property
    def input_dtype(self):
        # Images enter in the resampler's dtype (float32 under mixed precision),
        # so the moving image is warped at full precision; the regressor casts
        # its own input to its compute dtype.
        return self.resampler.compute_dtype

    def _build_all(self):
        image = (None,) + self.image_shape + (self.channels,)
        self.regressor.build(image[:-1] + (2 * self.channels,))
        self.transformer.build((None,) + self.grid_shape + (self.ndim,))
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
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        similarity = config.get("similarity", "ncc")
        if isinstance(similarity, dict):
            config["similarity"] = keras.saving.deserialize_keras_object(similarity)
        return cls(**config)
