"""Training pairs synthesised from label maps (SynthMorph-style): anatomy without a fixed contrast.

A network that has only seen one contrast registers only that contrast.  Following SynthMorph
(Hoffmann et al., 2022), every training image here is *drawn* from a label map with random
intensities, so the network cannot rely on any contrast and must learn the shapes:

1. **A label map** (integers ``0 .. num_labels - 1`` on the canonical grid, 0 = background) is
   picked at random from the given maps (e.g. :mod:`data.brain_labels`), or generated from
   smoothed noise (:func:`random_shapes`: "shapes" beyond any anatomy we have).
2. **Two deformations** of it, independent: the fixed and the moving map.  Each is a random
   smooth field (:class:`dirnet_tf.synthetic.SyntheticDeformation`: a coarse and a fine cubic
   B-spline, injective by construction) followed by a random affine map about the grid centre
   (rotations, scales, shears, translations; :func:`random_affine`); the label map is sampled
   at the deformed positions by nearest neighbour (:func:`deform_labels`; outside it: 0).
3. **Two images**, one per map, with independent contrasts (:func:`synthesize_images`): a
   random mean intensity per label (background dark with probability ``dark_background``) and
   a random per-label texture (Gaussian, per voxel), then a Gaussian blur of random width per
   axis, with probability ``thick_probability`` a thick-slice acquisition along a random axis
   (blur across the slices and linear interpolation from every ``f``-th slice, ``f`` up to
   ``thick_max_factor`` voxels), a smooth multiplicative bias field, a min-max rescaling to
   ``[0, 1]``, a random gamma and additive Gaussian noise, and a final rescaling to ``[0, 1]``.

The network is then trained on the overlap of the fixed map and the moving map carried by its
field (:mod:`dirnet_tf.label_losses`), never on intensities.

**Why these choices.**  Nearest-neighbour label sampling keeps labels crisp and costs one
gather per map (the image's partial-volume look comes from the blur).  Intensities are drawn
after the deformation, on the model grid, so nothing is resampled twice.  Everything is
TensorFlow and stateless (one random key per pair), so pairs are made inside ``tf.data`` in
parallel with the training step and a resumed run continues the exact stream.

**Streams.**  Pair (or batch) ``i`` of stream ``s`` under ``seed`` is a function of
:func:`dirnet_tf.synthetic.stream_key` ``(seed, s, i)`` only: the training sampler draws
stream :data:`TRAIN`, validation and test pairs come from :data:`VALID` and :data:`TEST`, whose
keys never coincide with training keys.

Units: positions and fields in voxels of the model grid (ij order), lengths in mm where a name
says ``mm``; intensities of the synthesised images in ``[0, 1]``.  2-D and 3-D.
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from dirnet_tf.resample_op import resample
from dirnet_tf.synthetic import TEST, TRAIN, VALID, SyntheticDeformation, stream_key
from dirnet_tf.warping import compose_displacements, identity_grid

__all__ = ["SynthesisSettings", "PairSynthesizer", "random_affine", "deform_labels", "random_shapes",
           "draw_intensities", "synthesize_images", "gaussian_blur", "TRAIN", "VALID", "TEST"]


@dataclasses.dataclass(frozen=True)
class SynthesisSettings:
    """The random ranges of :class:`PairSynthesizer` (mm where the name says so).

    Attributes
    ----------
    rotation_deg : float
        Largest rotation about each axis (uniform in ``[-r, r]``; 3-D: three axes, 2-D: one).
    scale : float
        Scale per axis ``exp(U(-log(1 + s), log(1 + s)))``.
    shear : float
        Off-diagonal shear terms ``U(-shear, shear)``.
    translation_mm : float
        Translation per axis ``U(-t, t)`` mm.
    coarse_magnitude_mm, coarse_spacing_mm, fine_magnitude_mm, fine_spacing_mm : float
        The two random B-spline fields (largest displacement per axis and control-point spacing,
        mm; a magnitude of 0 leaves the field out).
    texture : float
        Largest standard deviation of the per-voxel texture of a label (intensities in ``[0, 1]``).
    dark_background : float
        Probability that label 0 is black (0), as in skull-stripped or masked scans.
    blur_mm : float
        Largest Gaussian blur sigma per axis, mm.
    thick_probability : float
        Probability of a thick-slice acquisition along one random axis.
    thick_max_factor : int
        Largest slice distance of it, voxels of the model grid (at least 2).
    bias : float
        Largest standard deviation of the log bias field.
    bias_spacing_mm : float
        Control spacing of the bias field (its smoothness), mm.
    gamma : float
        Standard deviation of ``log(gamma)``.
    noise : float
        Largest standard deviation of the additive noise (after the rescaling to ``[0, 1]``).
    """

    rotation_deg: float = 12.0
    scale: float = 0.12
    shear: float = 0.04
    translation_mm: float = 15.0
    coarse_magnitude_mm: float = 8.0
    coarse_spacing_mm: float = 32.0
    fine_magnitude_mm: float = 3.0
    fine_spacing_mm: float = 16.0
    texture: float = 0.08
    dark_background: float = 0.8
    blur_mm: float = 2.0
    thick_probability: float = 0.3
    thick_max_factor: int = 4
    bias: float = 0.3
    bias_spacing_mm: float = 64.0
    gamma: float = 0.25
    noise: float = 0.05

    def replace(self, **changes):
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """JSON-able settings."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- geometry


def _rotation(angles, ndim):
    """Rotation matrices ``[B, ndim, ndim]`` of angles ``[B, 1]`` (2-D) or ``[B, 3]`` (3-D), radians."""
    c, s = tf.cos(angles), tf.sin(angles)
    one, zero = tf.ones_like(c[:, 0]), tf.zeros_like(c[:, 0])
    if ndim == 2:
        return tf.stack([tf.stack([c[:, 0], -s[:, 0]], -1), tf.stack([s[:, 0], c[:, 0]], -1)], 1)
    mats = []
    for a, (i, j) in enumerate(((1, 2), (0, 2), (0, 1))):
        rows = [[one, zero, zero], [zero, one, zero], [zero, zero, one]]
        rows[i][i], rows[i][j], rows[j][i], rows[j][j] = c[:, a], -s[:, a], s[:, a], c[:, a]
        mats.append(tf.stack([tf.stack(r, -1) for r in rows], 1))
    return mats[0] @ mats[1] @ mats[2]


def random_affine(key, batch_size, ndim, spacing, settings):
    """Random affine maps about the grid centre: ``(matrix [B, ndim, ndim], translation [B, ndim])``.

    In voxels of the model grid (ij): a point ``x`` maps to ``c + matrix (x - c) + translation``
    (``c`` the grid centre).  The map is drawn in mm (``rotation @ shear @ diag(scale)``) and
    expressed in voxels through ``spacing`` (mm per axis).
    """
    b = int(batch_size)
    keys = tf.random.experimental.stateless_split(key, 4)
    n_angles = 1 if ndim == 2 else 3
    angles = tf.random.stateless_uniform([b, n_angles], keys[0], -1.0, 1.0) * math.radians(settings.rotation_deg)
    log_scale = math.log1p(settings.scale)
    scales = tf.exp(tf.random.stateless_uniform([b, ndim], keys[1], -1.0, 1.0) * log_scale)
    upper = np.triu(np.ones((ndim, ndim), np.float32), 1)
    shear = tf.eye(ndim, batch_shape=[b]) + upper * tf.random.stateless_uniform(
        [b, ndim, ndim], keys[2], -1.0, 1.0) * settings.shear
    matrix_mm = _rotation(angles, ndim) @ shear @ tf.linalg.diag(scales)
    d = tf.constant(np.asarray(spacing, np.float32))
    matrix = matrix_mm * d[None, None, :] / d[None, :, None]  # D^-1 M D
    translation = tf.random.stateless_uniform([b, ndim], keys[3], -1.0, 1.0) * settings.translation_mm / d
    return matrix, translation


def deform_labels(label_maps, positions):
    """Nearest-neighbour samples of integer label maps at voxel positions (0 outside).

    Parameters
    ----------
    label_maps : Tensor int ``[B, *spatial]``
    positions : Tensor float ``[B, *out, ndim]`` (voxels of the label maps, ij)

    Returns
    -------
    Tensor int32 ``[B, *out]``.
    """
    label_maps = tf.cast(label_maps, tf.int32)
    size = tf.constant([int(n) for n in label_maps.shape[1:]], tf.int32)
    index = tf.cast(tf.round(positions), tf.int32)
    inside = tf.reduce_all((index >= 0) & (index < size), axis=-1)
    index = tf.clip_by_value(index, 0, size - 1)
    values = tf.gather_nd(label_maps, index, batch_dims=1)
    return tf.where(inside, values, 0)


def random_shapes(key, batch_size, shape, num_labels, feature_voxels=8.0):
    """Random label maps from smoothed noise: labels ``1 .. num_labels - 1`` inside a random blob.

    Each label map is the argmax of ``num_labels - 1`` noise volumes drawn on a coarse grid
    (one value every ``feature_voxels`` voxels) and upsampled linearly; outside a random,
    noise-perturbed ellipsoid (half-axes 30-45 % of the grid) the label is 0.

    Returns
    -------
    Tensor int32 ``[B, *shape]``.
    """
    shape = tuple(int(n) for n in shape)
    ndim, b = len(shape), int(batch_size)
    keys = tf.random.experimental.stateless_split(key, 4)
    coarse = tuple(max(2, int(math.ceil((n - 1) / feature_voxels)) + 1) for n in shape)
    grid = identity_grid(shape)
    coords = grid * tf.constant([(c - 1) / max(n - 1, 1) for c, n in zip(coarse, shape)], tf.float32)
    coords = tf.broadcast_to(coords, (b,) + shape + (ndim,))
    noise = tf.random.stateless_normal((b,) + coarse + (num_labels - 1,), keys[0])
    fields = resample(noise, coords, boundary="border")
    labels = tf.argmax(fields, axis=-1, output_type=tf.int32) + 1
    centre = tf.constant([(n - 1) / 2.0 for n in shape], tf.float32)
    radii = tf.random.stateless_uniform([b, ndim], keys[1], 0.30, 0.45) * tf.constant(shape, tf.float32)
    radii = tf.reshape(radii, [b] + [1] * ndim + [ndim])
    r2 = tf.reduce_sum(tf.square((grid - centre) / radii), axis=-1)
    wobble = resample(tf.random.stateless_normal((b,) + coarse + (1,), keys[2]), coords, boundary="border")[..., 0]
    inside = r2 + 0.25 * wobble < 1.0
    return tf.where(inside, labels, 0)


# ----------------------------------------------------------------------------- intensities


def draw_intensities(key, batch_size, num_labels, settings):
    """Random per-label intensities: ``(means [B, K], stds [B, K])``, means in ``[0, 1]``.

    Label 0 (background) has mean 0 and no texture with probability ``dark_background``.
    """
    b, k = int(batch_size), int(num_labels)
    keys = tf.random.experimental.stateless_split(key, 3)
    means = tf.random.stateless_uniform([b, k], keys[0])
    stds = tf.random.stateless_uniform([b, k], keys[1]) * settings.texture
    dark = tf.random.stateless_uniform([b, 1], keys[2]) < settings.dark_background
    first = tf.constant(np.arange(k) == 0)[None, :] & dark
    return tf.where(first, 0.0, means), tf.where(first, 0.0, stds)


def _gaussian_kernel(sigma, radius):
    """Normalised 1-D Gaussian ``[2 radius + 1]`` of a scalar sigma (voxels; ~0 gives a delta)."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    w = tf.exp(-0.5 * tf.square(x / tf.maximum(sigma, 1e-3)))
    return w / tf.reduce_sum(w)


def gaussian_blur(image, sigmas, radius):
    """Separable Gaussian blur of one image ``[1, *spatial, 1]`` (sigma per axis, voxels; edges
    reflected).  ``radius`` (static int) is the kernel half-width."""
    ndim = image.shape.rank - 2
    out = image
    for axis in range(ndim):
        kernel = _gaussian_kernel(sigmas[axis], radius)
        kshape = [1] * ndim + [1, 1]
        kshape[axis] = 2 * radius + 1
        pad = [[0, 0]] * (ndim + 2)
        pad[axis + 1] = [radius, radius]
        size = int(image.shape[axis + 1])
        if size > radius:
            out = tf.pad(out, pad, mode="SYMMETRIC")
        else:  # tiny grids: edge values repeated
            out = tf.pad(out, pad, mode="CONSTANT")
        out = tf.nn.convolution(out, tf.reshape(kernel, kshape), padding="VALID")
    return out


def _thick_slices(image, axis, factor, phase):
    """Linear interpolation of one image from every ``factor``-th slice along ``axis`` (from ``phase``)."""
    n = int(image.shape[axis + 1])
    x = tf.range(n, dtype=tf.int32)
    f = tf.maximum(factor, 1)
    j = tf.math.floordiv(x - phase, f)
    s0 = phase + j * f
    w = tf.cast(x - s0, tf.float32) / tf.cast(f, tf.float32)
    a = tf.gather(image, tf.clip_by_value(s0, 0, n - 1), axis=axis + 1)
    b = tf.gather(image, tf.clip_by_value(s0 + f, 0, n - 1), axis=axis + 1)
    shape = [1] * image.shape.rank
    shape[axis + 1] = n
    w = tf.reshape(w, shape)
    return (1.0 - w) * a + w * b


def _rescale(image):
    low, high = tf.reduce_min(image), tf.reduce_max(image)
    return (image - low) / tf.maximum(high - low, 1e-6)


def synthesize_images(labels, key, num_labels, spacing, settings, stages=None):
    """Images ``[B, *spatial, 1]`` in ``[0, 1]`` drawn from label maps ``[B, *spatial]``.

    Parameters
    ----------
    labels : Tensor int ``[B, *spatial]``
    key : Tensor int ``[2]``
    num_labels : int
    spacing : sequence of float
        mm per axis of the grid.
    settings : SynthesisSettings
    stages : set of str or None
        The steps applied, of ``{"texture", "blur", "thick", "bias", "gamma", "noise"}`` (default
        all); the per-label means are always drawn.  For tests: without them every voxel of a
        label has exactly its label's mean, rescaled.

    Returns
    -------
    Tensor float32 ``[B, *spatial, 1]``.
    """
    stages = {"texture", "blur", "thick", "bias", "gamma", "noise"} if stages is None else set(stages)
    labels = tf.cast(labels, tf.int32)
    shape = tuple(int(n) for n in labels.shape[1:])
    ndim, b = len(shape), int(labels.shape[0])
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (ndim,))
    keys = tf.random.experimental.stateless_split(key, 10)
    means, stds = draw_intensities(keys[0], b, num_labels, settings)
    image = tf.gather(means, labels, batch_dims=1)
    if "texture" in stages and settings.texture:
        image += tf.gather(stds, labels, batch_dims=1) * tf.random.stateless_normal(tf.shape(image), keys[1])
    image = image[..., None]
    max_blur = settings.blur_mm / spacing if "blur" in stages else np.zeros(ndim)
    thick = "thick" in stages and settings.thick_probability > 0 and settings.thick_max_factor >= 2
    max_sigma = max(float(np.max(max_blur)), 0.4 * settings.thick_max_factor if thick else 0.0)
    radius = int(math.ceil(3 * max_sigma))
    sigmas = tf.random.stateless_uniform([b, ndim], keys[2]) * tf.constant(max_blur, tf.float32)
    if thick:
        use = tf.random.stateless_uniform([b], keys[3]) < settings.thick_probability
        axis = tf.random.stateless_uniform([b], keys[4], 0, ndim, dtype=tf.int32)
        factor = tf.random.stateless_uniform([b], keys[5], 2, settings.thick_max_factor + 1, dtype=tf.int32)
        factor = tf.where(use, factor, 1)
        phase = tf.random.stateless_uniform([b], keys[6], 0, 1 << 30, dtype=tf.int32) % factor
        on_axis = tf.equal(axis[:, None], tf.range(ndim)[None, :]) & use[:, None]
        sigmas = tf.where(on_axis, tf.maximum(sigmas, 0.4 * tf.cast(factor, tf.float32)[:, None]), sigmas)
    rows = []
    for i in range(b):
        one = image[i:i + 1]
        if radius > 0:
            one = gaussian_blur(one, sigmas[i], radius)
        if thick:
            def thin(one=one, i=i):
                for a in range(ndim):
                    one = _thick_slices(one, a, tf.where(on_axis[i, a], factor[i], 1), phase[i])
                return one
            one = tf.cond(use[i], thin, lambda one=one: one)
        rows.append(one)
    image = tf.concat(rows, 0)
    if "bias" in stages and settings.bias:
        coarse = tuple(max(2, int(math.ceil(n * s / settings.bias_spacing_mm)) + 1) for n, s in zip(shape, spacing))
        coords = identity_grid(shape) * tf.constant([(c - 1) / max(n - 1, 1) for c, n in zip(coarse, shape)],
                                                    tf.float32)
        strength = tf.random.stateless_uniform([b] + [1] * (ndim + 1), keys[7]) * settings.bias
        log_bias = tf.random.stateless_normal((b,) + coarse + (1,), keys[8]) * strength
        image *= tf.exp(resample(log_bias, tf.broadcast_to(coords, (b,) + shape + (ndim,)), boundary="border"))
    gamma_key, noise_key, level_key = tf.unstack(tf.random.experimental.stateless_split(keys[9], 3))
    rows = []
    for i in range(b):
        one = _rescale(image[i:i + 1])
        if "gamma" in stages and settings.gamma:
            g = tf.exp(settings.gamma * tf.random.stateless_normal([], tf.random.experimental.stateless_fold_in(
                gamma_key, i)))
            one = tf.pow(tf.maximum(one, 0.0), g)
        if "noise" in stages and settings.noise:
            level = settings.noise * tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(
                level_key, i))
            one = tf.maximum(one + level * tf.random.stateless_normal(
                tf.shape(one), tf.random.experimental.stateless_fold_in(noise_key, i)), 0.0)
            one = _rescale(one)
        rows.append(one)
    return tf.concat(rows, 0)


# ----------------------------------------------------------------------------- pairs


class PairSynthesizer:
    """Synthetic training pairs from label maps (see the module docstring).

    Parameters
    ----------
    label_maps : array int ``[N, *shape]`` or None
        The anatomies, labels ``0 .. num_labels - 1``, on the model grid (``N`` may be 0 when
        only shapes are used).
    probabilities : sequence of float
        Probability of each label map, then of a random shapes map (``N + 1`` values, normalised).
    shape : sequence of int
        The model grid (voxels).
    spacing : float or sequence of float
        mm per axis of the grid.
    num_labels : int
        One-hot depth: every label map's values are below it; shapes use ``1 .. num_labels - 1``.
    settings : SynthesisSettings or None
    names : sequence of str or None
        Names of the label maps (``describe``).
    """

    def __init__(self, label_maps, probabilities, shape, spacing, num_labels, settings=None, names=None):
        self.shape = tuple(int(n) for n in shape)
        self.ndim = len(self.shape)
        if self.ndim not in (2, 3):
            raise ValueError(f"shape must have 2 or 3 entries, got {shape!r}")
        self.spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, np.float64), (self.ndim,)))
        self.num_labels = int(num_labels)
        self.settings = settings or SynthesisSettings()
        maps = np.zeros((0,) + self.shape, np.int32) if label_maps is None else np.asarray(label_maps, np.int32)
        if maps.shape[1:] != self.shape:
            raise ValueError(f"label maps {maps.shape} are not on the grid {self.shape}")
        if maps.size and (maps.min() < 0 or maps.max() >= self.num_labels):
            raise ValueError(f"label values must lie in 0 .. {self.num_labels - 1}, got {maps.min()} .. {maps.max()}")
        p = np.asarray(probabilities, np.float64)
        if p.shape != (len(maps) + 1,) or p.min() < 0 or p.sum() <= 0:
            raise ValueError(f"give {len(maps) + 1} probabilities >= 0 (the label maps, then shapes), got {p.tolist()}")
        self.probabilities = p / p.sum()
        self.names = list(names) if names is not None else [f"map{i}" for i in range(len(maps))]
        self._maps = tf.constant(maps if len(maps) else np.zeros((1,) + self.shape, np.int32))
        self._logits = tf.constant(np.log(np.maximum(self.probabilities, 1e-30))[None, :], tf.float32)
        s = self.settings
        self._fields = [SyntheticDeformation(self.shape, self.spacing, magnitude, spacing_mm)
                        for magnitude, spacing_mm in ((s.coarse_magnitude_mm, s.coarse_spacing_mm),
                                                      (s.fine_magnitude_mm, s.fine_spacing_mm)) if magnitude > 0]

    def positions(self, key, batch_size):
        """Voxel positions ``[B, *shape, ndim]`` of one random deformation: the label map is read at
        ``c + A (x + u(x) - c) + t`` (``u`` the smooth fields composed, ``A, t`` :func:`random_affine`)."""
        keys = tf.random.experimental.stateless_split(key, 1 + len(self._fields))
        u = None
        for k, field in enumerate(self._fields):
            step = field.fields(keys[1 + k], batch_size)
            u = step if u is None else compose_displacements(u, step)
        grid = identity_grid(self.shape)
        x = tf.broadcast_to(grid, (int(batch_size),) + self.shape + (self.ndim,)) if u is None else grid[None] + u
        matrix, translation = random_affine(keys[0], batch_size, self.ndim, self.spacing, self.settings)
        centre = tf.constant([(n - 1) / 2.0 for n in self.shape], tf.float32)
        flat = tf.reshape(x - centre, [int(batch_size), -1, self.ndim])
        moved = tf.einsum("bij,bnj->bni", matrix, flat) + translation[:, None, :] + centre
        return tf.reshape(moved, (int(batch_size),) + self.shape + (self.ndim,))

    def source_maps(self, key, batch_size):
        """``(label maps [B, *shape], source [B])``: one label map per pair (source ``N`` = shapes)."""
        keys = tf.random.experimental.stateless_split(key, 2)
        b = int(batch_size)
        source = tf.reshape(tf.random.stateless_categorical(self._logits, b, keys[0], dtype=tf.int32), [b])
        n = len(self.names)
        chosen = tf.gather(self._maps, tf.minimum(source, max(n - 1, 0)))
        if self.probabilities[-1] > 0:  # made only when a pair of the batch needs them
            is_shapes = tf.reshape(source == n, [b] + [1] * self.ndim)
            chosen = tf.cond(tf.reduce_any(is_shapes),
                             lambda: tf.where(is_shapes, random_shapes(keys[1], b, self.shape, self.num_labels),
                                              chosen),
                             lambda: chosen)
        return chosen, source

    def pair(self, key, batch_size):
        """A batch of pairs made with ``key``.

        Returns
        -------
        dict of Tensors
            ``fixed``, ``moving`` float32 ``[B, *shape, 1]`` in ``[0, 1]``; ``fixed_labels``,
            ``moving_labels`` int32 ``[B, *shape]``; ``source`` int32 ``[B]`` (index of the label
            map, ``N`` for shapes).
        """
        keys = tf.random.experimental.stateless_split(key, 5)
        maps, source = self.source_maps(keys[0], batch_size)
        out = {"source": source}
        for name, k_geo, k_img in (("fixed", keys[1], keys[2]), ("moving", keys[3], keys[4])):
            labels = deform_labels(maps, self.positions(k_geo, batch_size))
            out[name + "_labels"] = labels
            out[name] = synthesize_images(labels, k_img, self.num_labels, self.spacing, self.settings)
        return out

    def sampler(self, seed, batch_size, stream=TRAIN):
        """``sample(step) -> batch`` of :meth:`pair` with :func:`stream_key` ``(seed, stream, step)``
        (usable inside ``tf.data``)."""
        seed, batch_size, stream = int(seed), int(batch_size), int(stream)

        @tf.autograph.experimental.do_not_convert  # plain TF (tf.cond where needed): tf.data need not convert it
        def sample(step):
            out = self.pair(stream_key(seed, stream, step), batch_size)
            return {k: v for k, v in out.items() if k != "source"}

        return sample

    def evaluation_pairs(self, seed, stream, count):
        """``count`` pairs of ``stream`` (numpy): pair ``i`` is made from :func:`stream_key`
        ``(seed, stream, i)`` alone (so 4 pairs are the first 4 of 8).  Keys as :meth:`pair`."""
        if getattr(self, "_pair_one", None) is None:  # traced once per synthesizer
            self._pair_one = tf.function(lambda key: self.pair(key, 1), autograph=False)
        rows = [{k: v.numpy() for k, v in self._pair_one(stream_key(seed, stream, i)).items()}
                for i in range(int(count))]
        if not rows:
            raise ValueError("evaluation_pairs needs count >= 1")
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def describe(self):
        """JSON-able description (what a run records)."""
        return {"label_maps": self.names, "probabilities": dict(zip(self.names + ["shapes"],
                                                                    self.probabilities.tolist())),
                "num_labels": self.num_labels, "grid_shape": list(self.shape), "spacing_mm": list(self.spacing),
                "settings": self.settings.to_dict()}
