"""Synthetic registration pairs with a known deformation (``--pairs=synthetic``).

One image ``I`` (on the model grid) gives a pair whose exact answer is known:

* a random, smooth and injective displacement field ``u`` is drawn on the grid
  (:meth:`SyntheticDeformation.fields`, in voxels of the grid, ij order);
* ``moving := I`` and ``fixed := warp(I, u)``, i.e. ``fixed(x) = I(x + u(x))``
  (multilinear interpolation, :func:`dirnet_tf.warping.warp`);
* then independent random intensity changes are applied to each image (gamma,
  scale and additive Gaussian noise, :meth:`SyntheticDeformation.intensity`).

A registration of the pair is a backward displacement field on the fixed grid,
``warped(x) = moving(x + u_pred(x))`` (the convention of the whole package), and
``warp(moving, u)`` is ``fixed`` itself, by construction, up to the intensity
changes.  So ``u`` is the ground truth on the fixed grid **exactly**: no field
inversion is involved (drawing a field ``v`` and setting ``moving := warp(fixed,
v)`` would instead require the inverse of ``x -> x + v(x)``, known only
approximately).  The endpoint error of a registration is ``|u_pred(x) - u(x)|``
in mm, averaged over the fixed grid (:func:`endpoint_error`).

With ``augment > 0`` the image is first warped by another random field of that
magnitude (``I' = warp(I, b)``, a new "anatomy" for every pair) and ``I'`` takes
the place of ``I`` above, so that a network trained on a single image does not
always see the same moving image; ``u`` stays exact, as ``fixed = warp(I', u)``.

**The fields.**  Control points of a cubic B-spline
(:func:`dirnet_tf.bspline.bspline_displacement`) with a spacing of ``spacing``
mm are drawn independently and uniformly in ``[-magnitude, magnitude]`` mm per
axis, so ``|u_a(x)| <= magnitude`` everywhere (a B-spline is a convex
combination of its control points) and the field is as smooth as the control
grid is coarse.  When the magnitude exceeds the injectivity bound of the grid
(:data:`dirnet_tf.bspline.INJECTIVITY_BOUND`: 0.48 / 0.40 of the spacing in 2-D /
3-D) the control points are divided by ``2**n`` to get below it and the field
is composed with itself ``n`` times (scaling and squaring: ``u <- u + u(x +
u(x))``, :func:`dirnet_tf.warping.compose_displacements`), so the map stays a
composition of injective maps and ``|u_a| <= magnitude`` still holds.

**Streams and seeds.**  Every pair is a function of a stateless random key
only: the training sampler draws batch ``step`` of stream ``TRAIN`` of the
training seed (:func:`synthetic_pair_sampler`), evaluation pairs come from the
``VALID`` and ``TEST`` streams (:func:`synthetic_evaluation_pairs`).  Keys of
different streams never coincide, so evaluation fields are held out from the
training fields whatever the seeds.

Everything is vectorised TensorFlow (the separable B-spline transformer and the
compiled resampler), usable inside ``tf.data``.
"""

import math

import numpy as np
import tensorflow as tf

from dirnet_tf.bspline import INJECTIVITY_BOUND, bspline_displacement
from dirnet_tf.spline_np import control_grid_shape
from dirnet_tf.warping import compose_displacements, warp, warp_labels

__all__ = ["SyntheticDeformation", "synthetic_pair_sampler", "synthetic_evaluation_pairs", "stream_key",
           "endpoint_error", "TRAIN", "VALID", "TEST"]

#: Stream ids of the random keys (see :func:`stream_key`).
TRAIN, VALID, TEST = 0, 1, 2
# Fraction of the injectivity bound the control points may reach.
_MARGIN = 0.95


def stream_key(seed, stream, index):
    """The stateless random key of pair (or batch) ``index`` of ``stream`` under ``seed``.

    Parameters
    ----------
    seed : int
    stream : int
        :data:`TRAIN`, :data:`VALID` or :data:`TEST`.
    index : int or int64 scalar Tensor
        The training step or the evaluation pair number.

    Returns
    -------
    Tensor int64 ``[2]``, a key of ``tf.random.stateless_*``.
    """
    base = tf.constant([int(seed), int(stream)], tf.int64)
    base = tf.random.experimental.stateless_fold_in(base, tf.constant(int(stream) + 7919, tf.int64))
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


class SyntheticDeformation:
    """Random smooth deformations and intensity changes on one model grid.

    Parameters
    ----------
    image_shape : sequence of int
        Spatial shape of the grid, ``(H, W)`` or ``(D, H, W)``.
    voxel_spacing : float or sequence of float
        mm per array axis of the grid.
    magnitude : float
        Largest displacement per axis, mm (``|u_a(x)| <= magnitude``).
    spacing : float
        Control-point spacing of the random B-spline, mm (rounded to whole
        voxels per axis, at least 1): the larger, the smoother.
    gamma : float
        Standard deviation of ``log(gamma)`` of the random gamma change
        (0: none).  The gamma acts on each image's own ``[min, max]`` range.
    scale : float
        Largest relative change of the intensity scale, ``1 + U(-scale, scale)``.
    noise : float
        Standard deviation of additive Gaussian noise, relative to the image's
        intensity range (``max - min``).
    augment : float
        Largest displacement per axis (mm) of a random deformation applied to
        the image before the pair is made (a new moving image per pair); 0: off.
    boundary : str
        Resampling boundary of the warps (``"border"``).
    """

    def __init__(self, image_shape, voxel_spacing=1.0, magnitude=4.0, spacing=32.0, gamma=0.0, scale=0.0,
                 noise=0.0, augment=0.0, boundary="border"):
        self.image_shape = tuple(int(n) for n in image_shape)
        self.ndim = len(self.image_shape)
        if self.ndim not in (2, 3) or min(self.image_shape) < 2:
            raise ValueError(f"image_shape must be 2 or 3 sizes >= 2, got {image_shape!r}")
        vs = np.broadcast_to(np.asarray(voxel_spacing, np.float64).reshape(-1), (self.ndim,))
        if not np.all(np.isfinite(vs)) or vs.min() <= 0:
            raise ValueError(f"voxel spacing must be positive mm, got {voxel_spacing!r}")
        self.voxel_spacing = tuple(float(v) for v in vs)
        for name, value in (("magnitude", magnitude), ("gamma", gamma), ("scale", scale), ("noise", noise),
                            ("augment", augment)):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"--synthetic_{name}={value}: give a number >= 0")
        if not np.isfinite(spacing) or spacing <= 0:
            raise ValueError(f"--synthetic_spacing={spacing}: give the control-point spacing in mm (> 0)")
        if scale >= 1:
            raise ValueError(f"--synthetic_scale={scale}: the relative scale change must be below 1")
        self.magnitude = float(magnitude)
        self.spacing = float(spacing)
        self.gamma, self.scale, self.noise = float(gamma), float(scale), float(noise)
        self.augment = float(augment)
        self.boundary = boundary
        self.control_spacing = tuple(max(1, int(round(self.spacing / v))) for v in self.voxel_spacing)
        self.grid_shape = control_grid_shape(self.image_shape, self.control_spacing)

    # ------------------------------------------------------------------ fields

    def squarings(self, magnitude=None):
        """Self-compositions ``n`` needed to keep ``magnitude`` (mm) / ``2**n`` below the bound."""
        magnitude = self.magnitude if magnitude is None else float(magnitude)
        ratio = max(magnitude / v / (_MARGIN * INJECTIVITY_BOUND[self.ndim] * s)
                    for v, s in zip(self.voxel_spacing, self.control_spacing))
        return 0 if ratio <= 1 else int(math.ceil(math.log2(ratio)))

    def fields(self, key, batch_size, magnitude=None):
        """Random displacement fields ``[B, *image_shape, ndim]`` (voxels, ij order), float32.

        Parameters
        ----------
        key : Tensor int ``[2]``
            Stateless random key.
        batch_size : int
        magnitude : float or None
            mm; default ``self.magnitude``.
        """
        magnitude = self.magnitude if magnitude is None else float(magnitude)
        n = self.squarings(magnitude)
        amplitude = tf.constant([magnitude / v / 2 ** n for v in self.voxel_spacing], tf.float32)
        points = tf.random.stateless_uniform((int(batch_size),) + self.grid_shape + (self.ndim,), key,
                                             minval=-1.0, maxval=1.0) * amplitude
        u = bspline_displacement(points, self.image_shape, self.control_spacing)
        for _ in range(n):
            u = compose_displacements(u, u, boundary="border")
        return u

    def intensity(self, images, key):
        """Random gamma, scale and noise of every image of a batch ``[B, *spatial, C]`` (independent per image)."""
        if not (self.gamma or self.scale or self.noise):
            return images
        b = tf.shape(images)[0]
        keys = tf.random.experimental.stateless_split(key, 3)
        per_image = [b] + [1] * (images.shape.rank - 1)
        axes = list(range(1, images.shape.rank))
        low = tf.reduce_min(images, axis=axes, keepdims=True)
        span = tf.maximum(tf.reduce_max(images, axis=axes, keepdims=True) - low, 1e-6)
        out = images
        if self.gamma:
            g = tf.exp(self.gamma * tf.random.stateless_normal(per_image, keys[0]))
            out = low + span * tf.pow(tf.clip_by_value((out - low) / span, 0.0, 1.0), g)
        if self.scale:
            out = out * (1.0 + tf.random.stateless_uniform(per_image, keys[1], -self.scale, self.scale))
        if self.noise:
            out = out + self.noise * span * tf.random.stateless_normal(tf.shape(images), keys[2])
        return out

    def pairs(self, images, key, batch_size, labels=None, num_labels=None):
        """A batch of synthetic pairs made from ``images`` (vectorised over the batch).

        Parameters
        ----------
        images : Tensor ``[N, *image_shape, C]`` float32
            The images a pair is made from (one drawn uniformly per pair).
        key : Tensor int ``[2]``
        batch_size : int
        labels : Tensor ``[N, *image_shape]`` int, optional
            Label maps of ``images``; then the result also has ``moving_labels``
            and ``fixed_labels`` (the moving labels carried by the true field).
        num_labels : int, optional
            Labels ``0 .. num_labels - 1`` (default: ``max(labels) + 1``, eager only).

        Returns
        -------
        dict of Tensors
            ``fixed``, ``moving`` ``[B, *image_shape, C]``; ``displacement``
            ``[B, *image_shape, ndim]`` (the true field, voxels, ij): ``warp(moving
            before its intensity change, displacement) == fixed before its own``;
            ``index`` ``[B]`` int64 (the image each pair was made from).
        """
        keys = tf.random.experimental.stateless_split(key, 5)
        n = tf.shape(images, out_type=tf.int64)[0]
        index = tf.random.stateless_uniform([int(batch_size)], keys[0], minval=0, maxval=n, dtype=tf.int64)
        source = tf.gather(images, index)
        moving_labels = None
        if labels is not None:
            moving_labels = tf.gather(labels, index)
            num_labels = int(tf.reduce_max(labels)) + 1 if num_labels is None else int(num_labels)
        if self.augment:
            base = self.fields(keys[1], batch_size, self.augment)
            source = warp(source, base, boundary=self.boundary)
            if labels is not None:
                moving_labels = warp_labels(moving_labels, base, num_labels, self.boundary)
        u = self.fields(keys[2], batch_size)
        fixed = warp(source, u, boundary=self.boundary)
        out = {"fixed": self.intensity(fixed, keys[3]), "moving": self.intensity(source, keys[4]),
               "displacement": u, "index": index}
        if labels is not None:
            out["moving_labels"] = moving_labels
            out["fixed_labels"] = warp_labels(moving_labels, u, num_labels, self.boundary)
        return out

    def describe(self):
        """JSON-able settings (what a results file records)."""
        return {"magnitude_mm": self.magnitude, "spacing_mm": self.spacing,
                "control_spacing_voxels": list(self.control_spacing), "squarings": self.squarings(),
                "gamma": self.gamma, "scale": self.scale, "noise": self.noise, "augment_mm": self.augment,
                "voxel_spacing_mm": list(self.voxel_spacing),
                "construction": "moving = image (optionally pre-warped by augment); fixed = warp(moving, u); "
                                "u = true backward field on the fixed grid, |u_a| <= magnitude; "
                                "independent gamma/scale/noise on each image"}


def synthetic_pair_sampler(images, batch_size, seed, deformation):
    """Training sampler of synthetic pairs: ``sample(step) -> {"fixed", "moving"}``.

    Batch ``step`` is drawn with :func:`stream_key` ``(seed, TRAIN, step)``, so a
    resumed run continues the exact stream and evaluation pairs (other streams)
    never repeat a training field.

    Parameters
    ----------
    images : array ``[N, *spatial, C]`` (``N >= 1``)
    batch_size : int
    seed : int
    deformation : SyntheticDeformation
    """
    images = np.asarray(images, np.float32)
    if images.ndim != deformation.ndim + 2 or tuple(images.shape[1:-1]) != deformation.image_shape:
        raise ValueError(f"images {images.shape} do not match the synthetic grid {deformation.image_shape}")
    if images.shape[0] < 1:
        raise ValueError("--pairs=synthetic needs at least one image")
    images_t = tf.constant(images)
    batch_size, seed = int(batch_size), int(seed)

    def sample(step):
        out = deformation.pairs(images_t, stream_key(seed, TRAIN, step), batch_size)
        return {"fixed": out["fixed"], "moving": out["moving"]}

    return sample


def synthetic_evaluation_pairs(images, count, seed, deformation, stream=TEST, labels=None):
    """A fixed set of ``count`` synthetic pairs with their true fields (numpy).

    Pair ``i`` is made with the key :func:`stream_key` ``(seed, stream, i)``
    alone, so a set of 10 pairs is the first 10 of a set of 50.

    Parameters
    ----------
    images : array ``[N, *spatial, C]``
    count : int
    seed : int
    deformation : SyntheticDeformation
    stream : int
        :data:`VALID` or :data:`TEST` (or :data:`TRAIN`, to look at training pairs).
    labels : array ``[N, *spatial]`` of int, optional

    Returns
    -------
    dict of numpy arrays
        ``fixed``, ``moving``, ``displacement`` (true, voxels), ``index`` and with
        labels ``fixed_labels``, ``moving_labels``.
    """
    images_t = tf.constant(np.asarray(images, np.float32))
    labels_t = num_labels = None
    if labels is not None:
        labels = np.asarray(labels, np.int32)
        labels_t, num_labels = tf.constant(labels), int(labels.max()) + 1
    rows = []
    for i in range(int(count)):
        out = deformation.pairs(images_t, stream_key(seed, stream, i), 1, labels=labels_t, num_labels=num_labels)
        rows.append({k: v.numpy() for k, v in out.items()})
    if not rows:
        raise ValueError("synthetic_evaluation_pairs needs count >= 1")
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def endpoint_error(predicted, true, spacing, mask=None):
    """Mean endpoint error ``|u_pred(x) - u_true(x)|`` in mm, per pair.

    Parameters
    ----------
    predicted, true : arrays ``[P, *spatial, ndim]``
        Backward displacement fields on the fixed grid, voxels, ij order.
    spacing : sequence of float
        mm per array axis.
    mask : array of bool ``[P, *spatial]`` or ``[*spatial]``, optional
        Only voxels inside it are averaged (a pair with an empty mask gives NaN).

    Returns
    -------
    np.ndarray ``[P]`` float64 (mm).
    """
    predicted = np.asarray(predicted, np.float64)
    true = np.asarray(true, np.float64)
    if predicted.shape != true.shape:
        raise ValueError(f"predicted {predicted.shape} and true {true.shape} fields differ in shape")
    error = np.linalg.norm((predicted - true) * np.asarray(spacing, np.float64), axis=-1)
    return masked_mean(error, mask)


def masked_mean(values, mask=None):
    """Mean of ``values [P, *spatial]`` per pair, inside ``mask`` when given (NaN for an empty mask)."""
    values = np.asarray(values, np.float64)
    flat = values.reshape(len(values), -1)
    if mask is None:
        return flat.mean(axis=1)
    mask = np.broadcast_to(np.asarray(mask, bool), values.shape).reshape(flat.shape)
    count = mask.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (flat * mask).sum(axis=1) / np.maximum(count, 1), np.nan)
