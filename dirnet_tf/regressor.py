"""The DIRNet ConvNet regressor: image pair -> B-spline control-point displacements.

Architecture (de Vos et al. 2017): the fixed and moving images, concatenated on
the channel axis, pass through alternating 3x3 convolutions (zero padding) and
2x2 average-pooling downsamplings, then 1x1 convolutions, with ELU activations
(optionally batch normalisation before each activation).  A final linear 1x1
convolution outputs ``ndim`` displacement components per control point; its
kernel and bias start at zero, so an untrained network predicts the identity
transform.

Geometry -- how the output lands exactly on the control grid.  Along an axis
with spacing ``s = 2**p`` the network pools ``p`` times by 2 (axes with a
smaller spacing stop pooling earlier).  With ``N`` pixels there are ``K =
ceil((N - 1) / s) + 3`` control points, control point ``k`` at pixel ``(k - 1)
* s``; points ``1 .. K - 2`` cover the image and one extra point lies outside
it on either side.  The input is zero-padded to exactly ``(K - 2) * s``
pixels, ``(s - 1) // 2`` before the image and the rest after it, so the ``p``
poolings give exactly ``K - 2`` cells, cell ``j`` being the block of ``s``
pixels centred (to within half a pixel) on control point ``j + 1``.  The
coarse map is then zero-padded by one cell per side (``K`` cells) and the last
3x3 convolution fills the two outer cells from their inner neighbours.  So
every output is computed from the image neighbourhood of its own control
point, for any image size; nothing is resized or cropped.

Cost: the first convolution/activation/pooling level is evaluated only on the
part of the padded input that the image reaches (always at inference; in
training only without batch normalisation, whose batch statistics span the
whole map); the rest of that map is the constant ``act(bias)`` and is filled
in directly (exactly the same outputs; about 30% less inference time for
28x28 images at spacing 8).
"""

import math

import keras
import numpy as np

from dirnet_tf.spline_np import control_grid_shape, normalize_spacing

__all__ = ["Regressor", "regressor_padding", "AUTO_FILTERS", "auto_filters", "auto_convs_per_level"]

# The "auto" widths of the 3x3 convolutions, finest level first; the last entry
# repeats at every coarser level.
AUTO_FILTERS = (8, 16, 32)


def auto_filters(levels):
    """The ``"auto"`` widths for ``levels`` resolution levels: :data:`AUTO_FILTERS` for the
    finest levels, its last entry repeated for every coarser level."""
    return [AUTO_FILTERS[min(level, len(AUTO_FILTERS) - 1)] for level in range(levels)]


def auto_convs_per_level(levels):
    """The ``"auto"`` convolution counts for ``levels`` levels: one per level, two at the coarsest."""
    return [1] * (levels - 1) + [2]


def _log2_spacing(spacing):
    levels = []
    for s in spacing:
        p = int(round(math.log2(s))) if s >= 1 else -1
        if s < 1 or 2**p != s:
            raise ValueError(
                f"the regressor needs grid spacings that are powers of two (one 2x2 pooling per "
                f"factor 2), got grid_spacing {tuple(spacing)}"
            )
        levels.append(p)
    return levels


def regressor_padding(image_shape, grid_spacing):
    """Zero padding the regressor applies to its input, per axis.

    Parameters
    ----------
    image_shape : sequence of int
        Spatial image size.
    grid_spacing : int or sequence of int
        Control-point spacing (pixels).

    Returns
    -------
    list of ``(before, after)`` pairs; ``N + before + after == (K - 2) * s``.
    """
    shape = tuple(int(n) for n in image_shape)
    spacing = normalize_spacing(grid_spacing, len(shape))
    grid = control_grid_shape(shape, spacing)
    pads = []
    for n, s, k in zip(shape, spacing, grid):
        before = (s - 1) // 2
        after = (k - 2) * s - n - before
        pads.append((before, after))
    return pads


@keras.saving.register_keras_serializable(package="dirnet_tf")
class Regressor(keras.layers.Layer):
    """ConvNet regressor mapping a concatenated image pair to control points.

    Parameters
    ----------
    image_shape : sequence of int
        Spatial size ``(H, W)`` or ``(D, H, W)`` of the images.
    grid_spacing : int or sequence of int
        Control-point spacing in pixels; powers of two only (``log2 s``
        poolings along each axis).
    filters : int, sequence of int or ``"auto"``
        Width of the 3x3 convolutions: one int for all, or one per
        convolution (``max(log2 s) + 1`` of them: one before every pooling
        and one after the last); ``"auto"``: :func:`auto_filters` (8, 16, then
        32 at every coarser level).
    pointwise_filters : int or sequence of int or None
        Widths of the hidden 1x1 convolutions; default two of width
        ``filters[-1]``.  The final linear 1x1 layer comes on top.
    convs_per_level : int, sequence of int or ``"auto"``
        Number of 3x3 convolutions (all of that level's width) at each
        resolution level, ``max(log2 s) + 1`` entries: before each pooling
        and after the last.  Default 1 (the paper); extra convolutions at the
        coarse levels add capacity and receptive field at little cost.
        ``"auto"``: :func:`auto_convs_per_level` (1 per level, 2 at the
        coarsest).
    batch_norm : bool
        Batch normalisation between every hidden convolution and its
        activation.
    activation : str
        Hidden activation (default ``"elu"``, as in the paper).
    **kwargs
        Passed to ``keras.layers.Layer``.

    Call arguments
    --------------
    pair : Tensor ``[B, *image_shape, C]`` (fixed and moving concatenated on
        channels), or a ``(fixed, moving)`` tuple which is concatenated here.
    training : bool, for batch normalisation.

    Returns
    -------
    Tensor ``[B, *control_grid_shape(image_shape, grid_spacing), ndim]``,
    displacements in pixels (ij order).
    """

    def __init__(
        self,
        image_shape,
        grid_spacing,
        filters=16,
        pointwise_filters=None,
        batch_norm=False,
        activation="elu",
        convs_per_level=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_shape = tuple(int(n) for n in image_shape)
        ndim = len(self.image_shape)
        if ndim not in (2, 3):
            raise ValueError(f"image_shape must have 2 or 3 entries, got {image_shape!r}")
        self.ndim = ndim
        self.grid_spacing = normalize_spacing(grid_spacing, ndim)
        self.grid_shape = control_grid_shape(self.image_shape, self.grid_spacing)
        self.levels = _log2_spacing(self.grid_spacing)
        depth = max(self.levels)
        self.filters = self._per_level(filters, depth + 1, "filters", auto_filters)
        self.convs_per_level = self._per_level(convs_per_level, depth + 1, "convs_per_level",
                                               auto_convs_per_level)
        filters = self.filters
        if pointwise_filters is None:
            pointwise_filters = [filters[-1]] * 2
        elif isinstance(pointwise_filters, int):
            pointwise_filters = [pointwise_filters]
        self.pointwise_filters = [int(f) for f in pointwise_filters]
        self.batch_norm = bool(batch_norm)
        self.activation = activation
        self.padding = regressor_padding(self.image_shape, self.grid_spacing)

        conv = keras.layers.Conv2D if ndim == 2 else keras.layers.Conv3D
        pool = keras.layers.AveragePooling2D if ndim == 2 else keras.layers.AveragePooling3D
        zero_pad = keras.layers.ZeroPadding2D if ndim == 2 else keras.layers.ZeroPadding3D

        # Sublayers follow this layer's dtype policy; under mixed precision the
        # output layer computes in float32 (displacements in pixels).
        policy = self.dtype_policy
        output_policy = "float32" if policy.compute_dtype in ("float16", "bfloat16") else policy

        def block(width, kernel, name, padding="same"):
            layers = [
                conv(width, kernel, padding=padding, use_bias=not self.batch_norm,
                     kernel_initializer="he_normal", name=name, dtype=policy)
            ]
            if self.batch_norm:
                layers.append(keras.layers.BatchNormalization(name=name + "_bn", dtype=policy))
            layers.append(keras.layers.Activation(activation, name=name + "_act", dtype=policy))
            return layers

        # In 3-D the border convolution pads explicitly (2 cells, "valid"), which gives the
        # same values as 1 cell + "same": TensorFlow 2.21's oneDNN graph rewrite fuses a Pad
        # followed by a "same" Conv3D wrongly at inference (the pad is dropped, the output
        # loses a cell per side); eager mode and 2-D are not affected.
        explicit_border = ndim == 3 and depth > 0
        stack = []
        for level in range(depth + 1):
            if level == depth:
                # K - 2 cells -> K: one border cell per side, filled by the 3x3 conv.
                stack.append(zero_pad(padding=2 if explicit_border else 1, name="grid_border", dtype=policy))
            # The first convolution gets its zero padding explicitly (see call).
            valid = level == 0 or (level == depth and explicit_border)
            stack += block(filters[level], 3, f"conv{level}", padding="valid" if valid else "same")
            for extra in range(1, self.convs_per_level[level]):
                stack += block(filters[level], 3, f"conv{level}_{extra}")
            if level < depth:
                size = tuple(2 if level < p else 1 for p in self.levels)
                stack.append(
                    pool(pool_size=size, strides=size, name=f"pool{level}", dtype=policy)
                )
        for i, width in enumerate(self.pointwise_filters):
            stack += block(width, 1, f"pointwise{i}")
        # Every sublayer is an attribute of its own: tf.train.Checkpoint (used by
        # the trainer) follows attributes but not Keras-tracked lists, whose
        # layers would silently be left out of checkpoints.
        self._stack_names = []
        for layer in stack:
            setattr(self, layer.name, layer)
            self._stack_names.append(layer.name)
        self.output_conv = conv(
            ndim, 1, padding="same", kernel_initializer="zeros", bias_initializer="zeros",
            name="control_points", dtype=output_policy,
        )
        # The first-level shortcut needs conv -> (BN) -> act -> pool at full resolution.
        self._first_level = (
            self._first_level_geometry() if depth and self.convs_per_level[0] == 1 else None
        )

    @property
    def _stack(self):
        """The hidden layers in call order."""
        return [getattr(self, name) for name in self._stack_names]

    def _per_level(self, value, levels, name, auto):
        """One positive int per resolution level, from an int, a sequence or ``"auto"``."""
        if isinstance(value, str) and value.strip().lower() == "auto":
            return auto(levels)
        if isinstance(value, (int, np.integer)):
            value = [value] * levels
        value = [int(v) for v in value]
        if len(value) != levels or any(v < 1 for v in value):
            raise ValueError(
                f"{name} must be a positive int or {levels} positive ints (one per resolution "
                f"level for grid_spacing {self.grid_spacing}), got {value!r}"
            )
        return value

    def _first_level_geometry(self):
        """Static geometry of the shortcut for the first conv + activation + pool.

        Away from the image the zero-padded input makes the first convolution
        output its bias, so after the activation and the pooling those cells
        hold the constant ``act(bias)``.  The shortcut runs the first level only
        on the pooling-aligned region that touches the image and fills the rest
        with that constant -- the same values, at a fraction of the cost when
        the padding is large.  (In training mode with batch normalisation the
        batch statistics cover the whole padded map, so the plain path is used.)
        """
        pool_sizes = self._stack[3 if self.batch_norm else 2].pool_size
        in_pads, region, pooled = [], [], []
        for n, (before, after), ps in zip(self.image_shape, self.padding, pool_sizes):
            total = n + before + after
            r0 = max(0, before - 1) // ps * ps
            r1 = min(total, -(-(before + n + 1) // ps) * ps)
            in_pads.append((before + 1 - r0, r1 + 1 - before - n))
            region.append((r0 // ps, (r1 - r0) // ps))
            pooled.append(total // ps)
        mask = np.ones(pooled, np.float32)
        mask[tuple(slice(a, a + b) for a, b in region)] = 0.0
        out_pads = [(a, t - a - b) for (a, b), t in zip(region, pooled)]
        return {"in_pads": in_pads, "out_pads": out_pads, "outside": mask[None, ..., None]}

    def build(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(
            input_shape[0], (list, tuple)
        ):
            channels = sum(int(s[-1]) for s in input_shape)
            input_shape = tuple(input_shape[0][:-1]) + (channels,)
        self._check_shape(input_shape)
        shape = (input_shape[0],) + tuple(
            n + b + a + 2 for n, (b, a) in zip(self.image_shape, self.padding)
        ) + (input_shape[-1],)
        for layer in self._stack:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.output_conv.build(shape)
        self.built = True

    def _check_shape(self, shape):
        shape = tuple(shape)
        if len(shape) != self.ndim + 2 or any(
            s is not None and s != n for s, n in zip(shape[1:-1], self.image_shape)
        ):
            raise ValueError(
                f"Regressor for image_shape {self.image_shape} expects input [B, "
                f"{', '.join(map(str, self.image_shape))}, C], got shape {shape}"
            )
        if shape[-1] is None:
            raise ValueError(f"Regressor needs a known channel count, got input shape {shape}")

    def call(self, pair, training=None):
        if isinstance(pair, (list, tuple)):
            pair = keras.ops.concatenate(list(pair), axis=-1)
        self._check_shape(pair.shape)
        stack = self._stack
        if self._first_level is not None and not (self.batch_norm and training):
            geometry = self._first_level
            n = 4 if self.batch_norm else 3
            first, stack = stack[:n], stack[n:]
            x = keras.ops.pad(pair, [(0, 0)] + geometry["in_pads"] + [(0, 0)])
            x = self._run(first, x, training=False)
            # The value of every cell the image does not reach: the first level
            # applied to an all-zero input (conv -> bias or 0, then BN/act; the
            # pooling of a constant is that constant).
            conv0 = first[0]
            constant = keras.ops.zeros((1,) * (self.ndim + 1) + (conv0.filters,), x.dtype)
            if conv0.use_bias:
                constant = constant + keras.ops.cast(conv0.bias, x.dtype)
            constant = self._run(first[1:-1], constant, training=False)
            outside = keras.ops.cast(geometry["outside"], x.dtype)
            x = keras.ops.pad(x, [(0, 0)] + geometry["out_pads"] + [(0, 0)]) + outside * constant
        else:
            pads = [(b + 1, a + 1) for b, a in self.padding]
            x = keras.ops.pad(pair, [(0, 0)] + pads + [(0, 0)])
        return self.output_conv(self._run(stack, x, training))

    @staticmethod
    def _run(layers, x, training):
        for layer in layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                x = layer(x, training=training)
            else:
                x = layer(x)
        return x

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(
            input_shape[0], (list, tuple)
        ):
            input_shape = input_shape[0]
        return (input_shape[0],) + self.grid_shape + (self.ndim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            image_shape=list(self.image_shape),
            grid_spacing=list(self.grid_spacing),
            filters=list(self.filters),
            pointwise_filters=list(self.pointwise_filters),
            batch_norm=self.batch_norm,
            activation=self.activation,
            convs_per_level=list(self.convs_per_level),
        )
        return config
