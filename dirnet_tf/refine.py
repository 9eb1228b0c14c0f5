"""Instance optimisation ("refinement") of a registration's chain of steps, per pair.

A trained DIRNet predicts, for one pair, the parameters of a chain of composed steps
(:meth:`dirnet_tf.DIRNet.step_layout`: an optional affine step, then B-spline steps).
:func:`refine_steps` takes those parameters as the starting point and optimises them for that
pair alone -- a few dozen gradient steps on the model's own training objective -- as elastix
optimises a transform, but starting from the network's answer instead of the identity.

**What is optimised.**  The chain's own parameters, through the model's bounded
parametrisation: every B-spline step's control points ``c = L tanh(r / L)`` with ``L = 0.99 *
injectivity_bound(spacing, ndim)`` (:func:`dirnet_tf.bspline.bounded_control_points`), the affine
matrix entries ``l tanh(p / l)`` with ``l = AFFINE_MATRIX_BOUND / ndim``
(:mod:`dirnet_tf.affine`), the translation free.  The given (bounded) values are inverted once,
``r = L atanh(clip(c / L))``, and the optimiser moves ``r``, so every step stays inside its bound
and the refined chain is as folding-free as the network's.  With ``bounded=False`` (e.g. the
paper's single unbounded spline) the values are optimised directly.

**The objective** is the training objective (:func:`dirnet_tf.losses.registration_objective`),
per pair: ``similarity(fixed, warped) + bending_weight * sum of the spline steps' bending
energies + folding_weight * folding_penalty(total displacement)``, with ``warped`` and the total
field built as the model builds them (each step's dense field, composed with
:func:`dirnet_tf.warping.compose_displacements`, the moving image resampled once).  The bending
energy is computed exactly as quadratic forms on the control grids (``c^T (G_0 x ... x G_n) c``
with ``G = B^T B`` of each axis' derivative basis), equal to
:func:`dirnet_tf.losses.bending_energy` and cheaper.  Pairs of a batch are independent: the
gradient is that of the sum of the per-pair objectives, Adam is element-wise, and the best
parameters are kept per pair.

**Never worse.**  The returned parameters are, per pair, the best of the given ones, the iterates
whose objective was evaluated on the model grid (all of them on the dense path) and the last
iterate (always evaluated on the model grid), so ``final_loss <= initial_loss`` exactly, both
being the dense objective on the model grid.  **Never folds more.**  An iterate whose total field
folds (``det J <= 0`` by finite differences, as :func:`dirnet_tf.metrics.jacobian_determinant`
counts it) at more voxels than the given chain's is never returned: a bounded chain is injective
step by step, but its dense composition is interpolated, and the optimiser could otherwise push
it into a fold there (measured once in 200 MNIST pairs at 50 iterations before this rule).

**Optimiser.**  Adam (``beta = 0.7, 0.999``) with a cosine step-size decay from
``learning_rate`` to 0.3 of it over the ``num_steps`` iterations.  Step sizes are in model
voxels: ``learning_rate`` (default :data:`DEFAULT_LEARNING_RATE` = 0.4) for the translation and
for the control points of a spline of grid spacing 8; a spline of spacing ``s`` takes steps
``learning_rate * s / 8`` per axis (in proportion to its injectivity bound, so coarse grids move
faster than fine ones); an affine matrix entry ``M_ij`` takes steps ``learning_rate / r_j`` with
``r_j`` the rms distance of the grid from its centre along axis ``j`` (a step then moves the grid
by about ``learning_rate`` voxels).  Chosen by measurement, 20-50 iterations, starting both from
the identity (MNI <- ROBEX brain templates; echo frames) and from a network-like partial answer
(a known smooth deformation, start at 60 % of it plus noise): a single voxel step for every
grid was either too slow from the identity (0.1-0.2) or overshot the fine grids near an answer
(0.8); spacing-relative steps at 0.4 were within 1 % of the best setting on every case (3-D,
30 iterations, from the identity: NCC 0.728 -> 0.940; near the answer: 0.957 -> 0.996).  The
momentum and the end of the decay were then chosen on the experiments' own exports (network
answer, then ``N`` iterations; ``beta_1``, final fraction): on MNIST test pairs (1000, NCC at
N=50) 0.9, 0.1: 0.9895; 0.9, 0.3: 0.9901; 0.8, 0.1: 0.9903; 0.7, 0.3: 0.9909; 0.8, 1 (no
decay): 0.9912, but without a decay the 3-D endpoint error grows with N (MNI held-out fields,
0.36 mm at N=30, 0.40 mm at N=100), and 0.7, 0.3 gave the best brain3d results at N=30-100
(endpoint error on MNI 0.34 / 0.32 / 0.32 mm at N=30 / 60 / 100, against 0.51 / 0.37 / 0.33
with 0.9, 0.1) and a better echo sector NCC (N=30: 0.9713 against 0.9699).

**The fast path (strided sub-grid).**  On the whole grid an iteration costs about 0.09 s for a
96 x 112 x 96 volume (two spline steps) on this 2-core CPU, too slow next to elastix.  Above
:data:`DENSE_MAX_VOXELS` voxels the iterations therefore evaluate the same construction on every
``stride``-th voxel along each axis (:func:`auto_stride`: 3 for 96 x 112 x 96, 2 for 128 x 128, 1
for 28 x 28), from an offset drawn at random every iteration so that all voxels take part: the
splines exactly at those voxels (separable bases), the composition on the sub-grid (interpolated
at the stride's spacing instead of 1 voxel), the moving image sampled exactly at the mapped
points.  ``lncc`` uses a window of ``round(9 / stride)`` (odd, >= 3) sub-grid voxels for the
9-voxel training window and the folding penalty finite differences at the stride's spacing; the
bending energies stay exact.  The last iterate is then evaluated on the whole grid.  A random
subset of 8192 voxels with the chain evaluated exactly at them (elastix's sampling; an earlier
version of this module) was both slower and less accurate (3-D: 33 ms/iteration, NCC 0.938).

**Measured** (this 2-core CPU, nothing else running, TF 2.21; ``B`` pairs refined together):

==========================================  ======  ================  ========================
case (steps)                                stride  ms / iteration    whole call
==========================================  ======  ================  ========================
brain 96x112x96, [16, 8], ``ncc``           3       7.1               0.36 s at N=30
                                            2       14                0.62 s
                                            1       89                2.9 s
the same, ``mi`` / ``lncc``                 3       15 / 34           0.84 s / 2.9 s
echo 96x96, [8, 4, 2, 2], B=72              2       34 (0.47 / pair)  24 ms / pair at N=40
28x28 digits, [8, 8, 4, 4, 2, 2], B=1000    1       143 (0.14 / pair) 6.4 ms / pair at N=40
==========================================  ======  ================  ========================

A whole call adds the whole-grid objective of the given and of the kept parameters (and, for
``lncc``, its 9-voxel window on the whole grid, 0.9 s in 3-D); the first call for a new grid also
traces the functions (about 1-1.5 s; every batch size shares that trace).  Against elastix on the
same pairs (``python -m benchmarks.refinement``, ``baselines/results/README.md``): N=40 is 9-9.5x
faster on brain volumes and 14-16x on echo and MNIST pairs, network included.  Where the time went
before: autodiff of the Jacobian's slices padded each slice to the whole field, the separable
B-spline contractions transposed their operands (now :func:`dirnet_tf.bspline.contract_separable`),
and every iteration was one call from Python (now chunks of :data:`_CHUNK` in one
``tf.while_loop``).

All arrays are model-grid arrays: images ``[B, *shape, C]`` (already normalised as the model
sees them), displacements and control points in model voxels, ij order.
"""

import dataclasses
import itertools
import time

import numpy as np
import tensorflow as tf

from dirnet_tf import losses
from dirnet_tf.affine import AFFINE_MATRIX_BOUND, affine_displacement
from dirnet_tf.bspline import bspline_displacement, contract_separable, injectivity_bound
from dirnet_tf.resample_op import BOUNDARY_MODES, resample
from dirnet_tf.spline_np import axis_basis, control_grid_shape, normalize_spacing
from dirnet_tf.warping import compose_displacements, warp

__all__ = ["REFINE_SIMILARITIES", "DEFAULT_LEARNING_RATE", "DENSE_MAX_VOXELS", "RefineResult", "refine_steps",
           "auto_stride"]

#: Similarities the refinement optimises (names of :func:`dirnet_tf.losses.get`).
REFINE_SIMILARITIES = ("ncc", "lncc", "mi")
#: Adam step size in model voxels (translation; control points of a spline of spacing 8).
DEFAULT_LEARNING_RATE = 0.4
#: Largest grid (voxels, by number of spatial axes) refined on every voxel; larger ones on a sub-grid.
DENSE_MAX_VOXELS = {2: 8192, 3: 65536}

_SPACING_REF = 8.0  # the spline spacing whose control points step by learning_rate voxels
_FINAL_LR = 0.3  # the cosine decay ends at this fraction of the learning rate
_ADAM = (0.7, 0.999, 1e-8)
_MARGIN = 0.99  # dirnet_tf.bspline.bounded_control_points's margin, as DIRNet uses it
_LNCC_WINDOW = 9  # dirnet_tf.losses.local_ncc_loss's default window, the training one


@dataclasses.dataclass
class RefineResult:
    """What :func:`refine_steps` returns (numpy arrays; ``B`` pairs).

    Attributes
    ----------
    params : list of np.ndarray
        Refined parameters per step, shapes as given: ``[B, ndim * (ndim + 1)]`` (affine: row-major
        matrix, then translation in model voxels) or ``[B, *K, ndim]`` control points (model voxels,
        ij); bounded values, like the served ones.
    warped : np.ndarray ``[B, *shape, C]``
        The moving image warped by the refined chain (the model's construction).
    displacement : np.ndarray ``[B, *shape, ndim]``
        The refined total field, model voxels ij.
    initial_loss, final_loss : np.ndarray ``[B]``
        The objective on the model grid of the given and of the returned parameters;
        ``final_loss <= initial_loss`` for every pair.
    steps : int
        Optimiser iterations run.
    history : list of float
        Per iteration, the mean over the batch of the objective of the parameters that the
        iteration started from (on the sub-grid of that iteration when ``stride > 1``).
    seconds : float
        Wall time of the call.
    """

    params: list
    warped: np.ndarray
    displacement: np.ndarray
    initial_loss: np.ndarray
    final_loss: np.ndarray
    steps: int
    history: list
    seconds: float


def auto_stride(shape):
    """The sub-grid stride :func:`refine_steps` uses for a model grid (1: every voxel).

    The smallest ``s >= 1`` with ``prod(n // s) <= DENSE_MAX_VOXELS[ndim]``.
    """
    shape = tuple(int(n) for n in shape)
    limit = DENSE_MAX_VOXELS[len(shape)]
    stride = 1
    while np.prod([max(n // stride, 1) for n in shape]) > limit and stride < min(shape):
        stride += 1
    return stride


class _Problem:
    """One kind of refinement (grid, steps, objective), with its compiled functions (traced once per batch size)."""

    def __init__(self, shape, layout, similarity, bending_weight, folding_weight, bounded, boundary):
        self.shape, self.ndim, self.layout = shape, len(shape), layout
        self.similarity_name = similarity
        self.similarity = losses.get(similarity)
        self.bending_weight, self.folding_weight = float(bending_weight), float(folding_weight)
        self.boundary = boundary
        ndim = self.ndim
        self.limits, scales, self.grams, self.shapes = [], [], [], []
        radius = [max(np.sqrt((n * n - 1) / 12.0), 1.0) for n in shape]  # rms of x_j - c_j
        for kind, spacing in layout:
            if kind == "affine":
                nn = ndim * ndim
                limit = np.full(nn + ndim, np.inf)
                if bounded:
                    limit[:nn] = AFFINE_MATRIX_BOUND / ndim
                scale = np.concatenate([[1.0 / radius[j] for _ in range(ndim) for j in range(ndim)], np.ones(ndim)])
                self.grams.append(None)
                self.shapes.append((nn + ndim,))
            else:
                limit = np.array([_MARGIN * b for b in injectivity_bound(spacing, ndim)]) if bounded \
                    else np.full(ndim, np.inf)
                scale = np.asarray(spacing, np.float64) / _SPACING_REF
                self.grams.append(_bending_grams(shape, spacing))
                self.shapes.append(control_grid_shape(shape, spacing) + (ndim,))
            self.limits.append(limit)
            scales.append(scale)
        # All parameters of a pair as one flat vector (one Adam update, one squash).
        self.sizes = [int(np.prod(sh)) for sh in self.shapes]
        self.flat_limit = np.concatenate([np.broadcast_to(lim, sh).ravel()
                                          for lim, sh in zip(self.limits, self.shapes)])
        self.flat_scale = np.concatenate([np.broadcast_to(sc, sh).ravel() for sc, sh in zip(scales, self.shapes)]
                                         ).astype(np.float32)
        self.centre = np.array([(n - 1) / 2.0 for n in shape], np.float32)
        self._bases = {}
        # reduce_retracing: one trace serves every batch size (a last, smaller batch does not retrace)
        self.forward = tf.function(self._forward, autograph=False, reduce_retracing=True)
        self.folds = tf.function(self._folds, autograph=False, reduce_retracing=True)
        self.iterate = tf.function(self._iterate, autograph=False, reduce_retracing=True)

    # -- the parametrisation ------------------------------------------------------------------
    def squash(self, raw):
        """Flat optimised parameters ``[B, P]`` -> the chain's, per step: ``l tanh(r / l)`` where bounded."""
        finite = np.isfinite(self.flat_limit)
        lim = tf.constant(np.where(finite, self.flat_limit, 1.0).astype(np.float32))
        if finite.all():
            raw = lim * tf.tanh(raw / lim)
        elif finite.any():
            raw = tf.where(tf.constant(finite), lim * tf.tanh(raw / lim), raw)
        parts = tf.split(raw, self.sizes, axis=1)
        return [tf.reshape(p, tf.concat([[-1], sh], 0)) for p, sh in zip(parts, self.shapes)]

    def unsquash(self, values):
        """The inverse of :meth:`squash` (numpy, float64 inside): ``l atanh(clip(c / l))``, flat ``[B, P]``."""
        flat = np.concatenate([np.asarray(v, np.float64).reshape(len(v), -1) for v in values], 1)
        finite = np.isfinite(self.flat_limit)
        lim = np.where(finite, self.flat_limit, 1.0)
        ratio = np.clip(flat / lim, -1.0 + 1e-6, 1.0 - 1e-6)
        return np.where(finite, lim * np.arctanh(ratio), flat).astype(np.float32)

    def check_bounds(self, values):
        for k, (v, limit) in enumerate(zip(values, self.limits)):
            excess = np.abs(np.asarray(v, np.float64)) - limit * (1 + 1e-5)
            if np.any(excess > 0):
                kind, spacing = self.layout[k]
                what = "affine matrix" if kind == "affine" else f"spline (spacing {spacing}) control points"
                raise ValueError(
                    f"params[{k}] (the {what}) exceed the bound of a bounded chain by up to "
                    f"{float(np.max(excess)):.3g}; pass bounded=False to refine an unbounded chain")

    # -- the objective on the model grid (the model's construction) ---------------------------
    def _forward(self, fixed, moving, values):
        return self._objective(fixed, moving, values)[:3]

    def _objective(self, fixed, moving, values):
        """``(loss [B], warped, total, det)``; ``det`` is the total field's Jacobian determinant where
        the folding penalty computed it (``folding_weight > 0``), else None."""
        total = None
        for (kind, spacing), p in zip(self.layout, values):
            field = affine_displacement(p, self.shape) if kind == "affine" else \
                bspline_displacement(p, self.shape, spacing)
            total = field if total is None else compose_displacements(total, field)
        warped = warp(moving, total, boundary=self.boundary)
        loss = self.similarity(fixed, warped, reduction="none") + self._regularisers(values)
        det = None
        if self.folding_weight:  # losses.folding_penalty(total), its determinant kept for the fold count
            det = losses.jacobian_determinant(total)
            loss = loss + self.folding_weight * losses.folding_penalty_of(det, reduction="none")
        return loss, warped, total, det

    def _regularisers(self, values):
        energies = [_bending_energy(p, g) for p, g in zip(values, self.grams) if g is not None]
        if not self.bending_weight or not energies:
            return 0.0
        return self.bending_weight * tf.add_n(energies)

    # -- the objective on a sub-grid: every stride-th voxel from an offset --------------------
    def _strided_bases(self, stride):
        """Per spline step and axis, the basis at ``o + stride * j`` for every offset ``o``.

        Numpy ``[stride, n // stride, K]`` (constants are made inside each traced function).
        """
        if stride not in self._bases:
            bases = []
            for kind, spacing in self.layout:
                grid = None if kind == "affine" else control_grid_shape(self.shape, spacing)
                bases.append(None if kind == "affine" else [
                    np.stack([axis_basis(o + stride * np.arange(n // stride), s, k) for o in range(stride)])
                    .astype(np.float32) for n, s, k in zip(self.shape, spacing, grid)])
            self._bases[stride] = bases
        return self._bases[stride]

    def _strided_loss(self, fixed, moving, values, offset, stride):
        ndim = self.ndim
        sub = [n // stride for n in self.shape]
        grid = tf.stack(tf.meshgrid(*[tf.cast(offset[a] + stride * tf.range(n), tf.float32)
                                      for a, n in enumerate(sub)], indexing="ij"), -1)  # [*sub, ndim] voxels
        total = None
        for (kind, _), p, basis in zip(self.layout, values, self._strided_bases(stride)):
            if kind == "affine":
                matrix = tf.reshape(p[:, :ndim * ndim], [-1, ndim, ndim])
                field = tf.einsum("bij,...j->b...i", matrix, grid - self.centre) + tf.reshape(
                    p[:, ndim * ndim:], [-1] + [1] * ndim + [ndim])
            else:
                field = contract_separable(p, [tf.gather(tf.constant(basis[a]), offset[a]) for a in range(ndim)])
            if total is not None:  # compose_displacements on the sub-grid (its index = (x - o) / stride)
                coords = (grid + field - tf.cast(offset, tf.float32)) / float(stride)
                field = field + resample(total, coords, boundary="border")
            total = field
        warped = resample(moving, grid + total, boundary=self.boundary)
        begin = tf.concat([[0], offset, [0]], 0)
        end = tf.concat([[tf.shape(fixed)[0]], offset + stride * (np.array(sub) - 1) + 1, [tf.shape(fixed)[-1]]], 0)
        fixed_sub = tf.strided_slice(fixed, begin, end, [1] + [stride] * ndim + [1])
        if self.similarity_name == "lncc":
            window = max(3, int(round(_LNCC_WINDOW / stride)) // 2 * 2 + 1)
            sim = losses.local_ncc_loss(fixed_sub, warped, window=window, reduction="none")
        else:
            sim = self.similarity(fixed_sub, warped, reduction="none")
        loss = sim + self._regularisers(values)
        if self.folding_weight:  # finite differences at the stride's spacing
            loss = loss + self.folding_weight * losses.folding_penalty(total / float(stride), reduction="none")
        return loss

    # -- one Adam iteration -------------------------------------------------------------------
    def _adam(self, raw, grad, m, v, t, lr):
        b1, b2, eps = _ADAM
        grad = tf.where(tf.math.is_finite(grad), grad, tf.zeros_like(grad))
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        step = (m / (1 - b1 ** t)) / (tf.sqrt(v / (1 - b2 ** t)) + eps)
        return raw - (lr * tf.constant(self.flat_scale)) * step, m, v

    def _folds(self, total, det=None):
        """Voxels per pair where the field folds: ``det J <= 0`` by finite differences, as
        :func:`dirnet_tf.metrics.jacobian_determinant` counts them (float32 ``[B]``)."""
        if det is None:
            det = losses.jacobian_determinant(total)
        return tf.reduce_sum(tf.cast(det <= 0, tf.float32), axis=list(range(1, det.shape.rank)))

    def _dense_step(self, fixed, moving, raw, m, v, t, lr, best_raw, best_loss, max_folds):
        with tf.GradientTape() as tape:
            tape.watch(raw)
            loss, _, field, det = self._objective(fixed, moving, self.squash(raw))
            total = tf.reduce_sum(loss)
        improved = (loss < best_loss) & (self._folds(field, det) <= max_folds)
        best_raw = tf.where(improved[:, None], raw, best_raw)
        raw, m, v = self._adam(raw, tape.gradient(total, raw), m, v, t, lr)
        return loss, raw, m, v, best_raw, tf.where(improved, loss, best_loss)

    def _strided_step(self, fixed, moving, raw, m, v, t, lr, offset, stride):
        with tf.GradientTape() as tape:
            tape.watch(raw)
            loss = self._strided_loss(fixed, moving, self.squash(raw), offset, stride)
            total = tf.reduce_sum(loss)
        raw, m, v = self._adam(raw, tape.gradient(total, raw), m, v, t, lr)
        return loss, raw, m, v

    def _iterate(self, fixed, moving, state, max_folds, first, last, steps, lr, seed, stride):
        """Iterations ``first .. last - 1`` (0-based) of ``steps``, in one graph (a ``tf.while_loop``).

        ``state = (raw, m, v, best_raw, best_loss)``; returns the new state and the
        objective of every iteration's starting point ``[last - first, B]``.  The step size of
        iteration ``i`` follows the cosine decay ``lr (f + (1 - f) (1 + cos(pi i / steps)) / 2)``;
        the sub-grid offset of iteration ``i`` is drawn from ``seed`` and ``i`` alone
        (``tf.random.stateless_uniform``), so a run is the same however it is cut into calls.
        """
        raw, m, v, best_raw, best_loss = state
        ndim = self.ndim

        def body(i, raw, m, v, best_raw, best_loss, history):
            t = tf.cast(i + 1, tf.float32)
            frac = tf.cast(i, tf.float32) / tf.cast(steps, tf.float32)
            rate = lr * (_FINAL_LR + (1 - _FINAL_LR) * 0.5 * (1 + tf.cos(np.pi * frac)))
            if stride == 1:
                loss, raw, m, v, best_raw, best_loss = self._dense_step(fixed, moving, raw, m, v, t, rate,
                                                                        best_raw, best_loss, max_folds)
            else:
                offset = tf.random.stateless_uniform([ndim], tf.stack([seed, i]), 0, stride, dtype=tf.int32)
                loss, raw, m, v = self._strided_step(fixed, moving, raw, m, v, t, rate, offset, stride)
            return i + 1, raw, m, v, best_raw, best_loss, history.write(i - first, loss)

        history = tf.TensorArray(tf.float32, size=last - first, element_shape=best_loss.shape)
        _, raw, m, v, best_raw, best_loss, history = tf.while_loop(
            lambda i, *_: i < last, body, (first, raw, m, v, best_raw, best_loss, history))
        return (raw, m, v, best_raw, best_loss), history.stack()


#: Iterations per call of the compiled loop (``progress`` is called after each call).
_CHUNK = 10


def _bending_grams(shape, spacing):
    """The bending energy's quadratic forms: per term ``d <= e`` one ``G_a = B_a^T B_a`` (``K_a x K_a``) per axis."""
    ndim = len(shape)
    grid = control_grid_shape(shape, spacing)
    grams = [[(b.T @ b).astype(np.float32) for b in (axis_basis(np.arange(n), s, k, o) for o in range(3))]
             for n, s, k in zip(shape, spacing, grid)]
    terms = []
    for d, e in itertools.combinations_with_replacement(range(ndim), 2):
        orders = [0] * ndim
        orders[d] += 1
        orders[e] += 1
        terms.append(([grams[a][orders[a]] for a in range(ndim)], 1.0 if d == e else 2.0))
    return terms, float(np.prod(shape))


def _bending_energy(points, grams):
    """:func:`dirnet_tf.losses.bending_energy` per pair, exactly: ``sum_c c^T Q c / N``, ``Q = sum w G_0 x ... x G_n``.

    ``Q`` is symmetric, so the gradient ``2 Q c / N`` comes with the value (no backward pass).
    """
    terms, count = grams
    ndim = points.shape.rank - 2

    @tf.custom_gradient
    def energy(c):
        qc = tf.add_n([weight * contract_separable(c, [tf.constant(g) for g in mats]) for mats, weight in terms])
        qc = qc / count

        def grad(upstream):
            return 2.0 * tf.reshape(upstream, [-1] + [1] * (ndim + 1)) * qc

        return tf.reduce_sum(c * qc, axis=list(range(1, ndim + 2))), grad

    return energy(points)


_PROBLEMS = {}
_MAX_PROBLEMS = 16


def _problem(shape, layout, similarity, bending_weight, folding_weight, bounded, boundary):
    """The cached :class:`_Problem` (its tf.functions are traced once per batch size)."""
    key = (shape, tuple(layout), similarity, float(bending_weight), float(folding_weight), bool(bounded), boundary)
    if key not in _PROBLEMS:
        if len(_PROBLEMS) >= _MAX_PROBLEMS:
            _PROBLEMS.pop(next(iter(_PROBLEMS)))
        _PROBLEMS[key] = _Problem(shape, layout, similarity, bending_weight, folding_weight, bounded, boundary)
    return _PROBLEMS[key]


def refine_steps(fixed, moving, layout, params, num_steps, similarity="ncc", bending_weight=0.0,
                 folding_weight=0.0, bounded=True, boundary="border", learning_rate=None, progress=None,
                 stride="auto", seed=0, allow_folding=False):
    """Refine a chain of composed steps on its pair(s): Adam on the training objective, never worse.

    Parameters
    ----------
    fixed, moving : array ``[B, *shape, C]`` float32
        The model's inputs on its grid (2 or 3 spatial axes), already normalised; ``B`` pairs,
        refined independently.
    layout : list
        ``("affine", None)`` or ``("spline", grid_spacing)`` per step, in order, exactly
        :meth:`dirnet_tf.DIRNet.step_layout` (the paper's model: ``[("spline", s)]`` with
        ``bounded=False``).
    params : list of arrays
        The steps' parameters as served (bounded values): ``[B, ndim * (ndim + 1)]`` for an
        affine step, control points ``[B, *K, ndim]`` (model voxels, ij) for a spline step.
    num_steps : int
        Optimiser iterations, >= 0 (0: the given chain, recomputed).
    similarity : str
        One of :data:`REFINE_SIMILARITIES` (``"ncc"``, ``"lncc"``, ``"mi"``).
    bending_weight, folding_weight : float
        The training objective's weights (the export's ``config``).
    bounded : bool
        Optimise through the bounded parametrisation (a model trained with ``bounded``); then the
        given parameters must lie within the bounds.
    boundary : str
        The model's resampling boundary, ``"border"`` or ``"zeros"``.
    learning_rate : float or None
        Adam step size in model voxels (None: :data:`DEFAULT_LEARNING_RATE`; see the module
        docstring for the per-step scaling).
    progress : callable or None
        ``progress(iteration, mean_objective)`` after every iteration (1-based).
    stride : "auto" or int
        Sub-grid stride of the iterations (1: every voxel, the model's construction exactly;
        "auto": :func:`auto_stride`).  The returned losses are always on the whole grid.
    seed : int
        Seed of the sub-grid offsets (the result is deterministic for a given seed).
    allow_folding : bool
        Also keep iterates whose field folds at more voxels than the given chain's (only for
        experiments; by default they are never returned, see the module docstring).

    Returns
    -------
    RefineResult

    Raises
    ------
    ValueError
        Negative or fractional ``num_steps``, an unknown similarity, a boundary not in
        ``("border", "zeros")``, images or parameters of the wrong shapes, parameters outside the
        bounds of a bounded chain, a non-positive learning rate or stride.
    """
    start = time.perf_counter()
    steps = _check_steps(num_steps)
    similarity = {"local_ncc": "lncc"}.get(similarity, similarity)  # the older spelling (losses.get)
    if similarity not in REFINE_SIMILARITIES:
        raise ValueError(f"unknown refinement similarity {similarity!r}; use one of {list(REFINE_SIMILARITIES)}")
    if boundary not in BOUNDARY_MODES:
        raise ValueError(f"boundary must be one of {list(BOUNDARY_MODES)}, got {boundary!r}")
    fixed, moving = _check_images(fixed, moving)
    shape = tuple(fixed.shape[1:-1])
    ndim = len(shape)
    layout = _check_layout(layout, ndim)
    params = _check_params(params, layout, shape, fixed.shape[0])
    lr = DEFAULT_LEARNING_RATE if learning_rate is None else float(learning_rate)
    if not lr > 0 or not np.isfinite(lr):
        raise ValueError(f"learning_rate must be a positive number of model voxels, got {learning_rate!r}")
    stride = auto_stride(shape) if stride == "auto" else int(stride)
    if stride < 1 or min(shape) // stride < 2:
        raise ValueError(f"stride must be 'auto' or an int >= 1 leaving >= 2 voxels per axis of {shape}, "
                         f"got {stride!r}")
    problem = _problem(shape, layout, similarity, bending_weight, folding_weight, bounded, boundary)
    if bounded:
        problem.check_bounds(params)

    f, m = tf.constant(fixed), tf.constant(moving)
    given = [tf.constant(p) for p in params]
    loss0, warped0, total0 = (t.numpy() for t in problem.forward(f, m, given))
    history = []
    if steps == 0:
        return RefineResult(params, warped0, total0, loss0, loss0.copy(), 0, history, time.perf_counter() - start)

    raw = tf.constant(problem.unsquash(params))  # [B, P]: all steps' parameters of a pair
    mom, vel = tf.zeros_like(raw), tf.zeros_like(raw)
    best_raw, best_loss = raw, tf.constant(loss0)
    folds0 = problem.folds(tf.constant(total0))  # an iterate that folds more than the given chain is never kept
    if allow_folding:
        folds0 = tf.fill(tf.shape(folds0), np.float32(np.inf))
    state = (raw, mom, vel, best_raw, best_loss)
    for first in range(0, steps, _CHUNK):
        last = min(first + _CHUNK, steps)
        state, chunk = problem.iterate(f, m, state, folds0, tf.constant(first), tf.constant(last),
                                       tf.constant(steps), tf.constant(lr, tf.float32),
                                       tf.constant(int(seed), tf.int32), stride)
        for it, value in enumerate(np.mean(chunk.numpy(), axis=1), first):
            history.append(float(value))
            if progress is not None:
                progress(it + 1, history[-1])
    raw, _, _, best_raw, best_loss = state
    best_values = [b.numpy() for b in problem.squash(best_raw)]  # the best iterate seen (dense path)
    return _choose(problem, f, m, params, (loss0, warped0, total0), problem.squash(raw), best_values,
                   best_loss.numpy(), steps, history, start, folds0.numpy())


def _choose(problem, f, m, params, initial, last, best_values, best_loss, steps, history, start, folds0):
    """Per pair the best of (given, best iterate seen on the whole grid, last iterate), with its outputs;
    an iterate whose field folds at more voxels than the given chain's (``folds0``) is not taken."""
    loss0, warped0, total0 = initial
    loss_last, warped_last, total_last = (t.numpy() for t in problem.forward(f, m, last))
    take_last = (loss_last < np.minimum(best_loss, loss0)) & (problem.folds(tf.constant(total_last)).numpy() <= folds0)
    take_best = ~take_last & (best_loss < loss0)
    chosen = [np.where(_rows(take_last, p), lv.numpy(), np.where(_rows(take_best, p), bv, p))
              for p, lv, bv in zip(params, last, best_values)]
    final = np.where(take_last, loss_last, loss0)
    warped = np.where(_rows(take_last, warped0), warped_last, warped0)
    total = np.where(_rows(take_last, total0), total_last, total0)
    if take_best.any():  # outputs of the best iterates (their loss was evaluated inside the step)
        loss_b, warped_b, total_b = (t.numpy() for t in problem.forward(f, m, [tf.constant(c) for c in chosen]))
        ok = take_best & (loss_b <= loss0) & (problem.folds(tf.constant(total_b)).numpy() <= folds0)
        chosen = [np.where(_rows(take_best & ~ok, c), p, c) for c, p in zip(chosen, params)]
        final = np.where(ok, loss_b, final)
        warped = np.where(_rows(ok, warped), warped_b, warped)
        total = np.where(_rows(ok, total), total_b, total)
    return RefineResult([c.astype(np.float32) for c in chosen], warped, total, loss0, final, steps, history,
                        time.perf_counter() - start)


def _rows(mask, like):
    """``mask [B]`` broadcastable against ``like [B, ...]``."""
    return np.asarray(mask).reshape((-1,) + (1,) * (np.ndim(like) - 1))


def _check_steps(num_steps):
    try:
        steps = int(num_steps)
    except (TypeError, ValueError):
        raise ValueError(f"num_steps must be a whole number of iterations >= 0, got {num_steps!r}") from None
    if steps != num_steps or steps < 0:
        raise ValueError(f"num_steps must be a whole number of iterations >= 0 (0 = no refinement), got {num_steps!r}")
    return steps


def _check_images(fixed, moving):
    fixed = np.asarray(fixed, np.float32)
    moving = np.asarray(moving, np.float32)
    if fixed.ndim not in (4, 5) or fixed.shape[0] < 1:
        raise ValueError(f"fixed must be [B, H, W, C] or [B, D, H, W, C] with B >= 1, got shape {fixed.shape}")
    if moving.shape != fixed.shape:
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} must have the same shape")
    if not (np.all(np.isfinite(fixed)) and np.all(np.isfinite(moving))):
        raise ValueError("fixed and moving must be finite")
    return fixed, moving


def _check_layout(layout, ndim):
    out = []
    for k, step in enumerate(layout):
        kind, spacing = step
        if kind == "affine":
            out.append(("affine", None))
        elif kind == "spline" and spacing is not None:
            out.append(("spline", normalize_spacing(spacing, ndim)))
        else:
            raise ValueError(f"layout[{k}] must be ('affine', None) or ('spline', grid_spacing), got {step!r}")
    if not out:
        raise ValueError("layout holds no step")
    return out


def _check_params(params, layout, shape, batch):
    params = [np.asarray(p, np.float32) for p in params]
    if len(params) != len(layout):
        raise ValueError(f"{len(params)} parameter arrays for a layout of {len(layout)} steps")
    ndim = len(shape)
    for k, ((kind, spacing), p) in enumerate(zip(layout, params)):
        want = (batch, ndim * (ndim + 1)) if kind == "affine" else \
            (batch,) + control_grid_shape(shape, spacing) + (ndim,)
        if p.shape != want:
            raise ValueError(f"params[{k}] of the {kind} step must have shape {want}, got {p.shape}")
        if not np.all(np.isfinite(p)):
            raise ValueError(f"params[{k}] holds non-finite values")
    return params
