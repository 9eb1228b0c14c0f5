"""Shared fixtures and reference computations of the registration tests (tests/test_register*.py).

Loaded as a pytest plugin (``pytest_plugins = ["register_fixtures"]``), so the exports are built
once per session.  Exports: ``export_dir`` (an MNIST-style 28x28 export without a model grid),
``grid2d`` / ``grid3d`` (exports with a model grid), ``chain2d`` / ``chain3d`` (models of composed
steps); references computed here with numpy/scipy from the Keras models' own parameters.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

import dirnet_tf
from dirnet_tf.inference import export_saved_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    model = dirnet_tf.DIRNet((28, 28), 8, filters=4)
    rng = np.random.default_rng(2)
    for v in model.regressor.trainable_variables[-2:]:  # a non-trivial deformation
        v.assign(rng.normal(0, 0.5, v.shape).astype(np.float32))
    path = str(tmp_path_factory.mktemp("model") / "export")
    export_saved_model(model, path, (28, 28), 1)
    return path


def digit(rng, size=28):
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    c = rng.uniform(10, 18, 2)
    r = np.hypot(ii - c[0], jj - c[1])
    return (np.clip(1.5 - np.abs(r - rng.uniform(5, 8)), 0, 1) * 255).astype(np.uint8)


def run_cli(args):
    return subprocess.run([sys.executable, "-m", "experiments.register"] + args, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def run_main(args):
    """``experiments.register.main`` in this process with the given flags (restored afterwards)."""
    from experiments import register

    register.FLAGS.unparse_flags()
    try:
        register.FLAGS(["register"] + args)
        return register.main(["register"])
    finally:
        register.FLAGS.unparse_flags()


class ExportBundle:
    """An export on disk, the Keras model it was made from, and its ModelGrid."""

    def __init__(self, path, model, grid, grid_spacing):
        self.path, self.model, self.grid, self.grid_spacing = path, model, grid, grid_spacing


def grid_export(tmp_path_factory, shape, spacing_mm, grid_spacing, scale, seed):
    """A tiny randomised DIRNet exported with the metadata of ``experiments.train``."""
    from dirnet_tf.preprocessing import ModelGrid

    model = dirnet_tf.DIRNet(shape, grid_spacing, filters=4)
    rng = np.random.default_rng(seed)
    for v in model.regressor.trainable_variables[-2:]:  # displacements of about 1-2 model voxels
        v.assign(rng.normal(0, scale, v.shape).astype(np.float32))
    return write_export(tmp_path_factory, model, ModelGrid(shape, spacing_mm, "percentile"), grid_spacing)


def write_export(tmp_path_factory, model, grid, grid_spacing):
    """Export ``model`` with the metadata of ``experiments.train`` (export_saved_model adds a chain's ``steps``)."""
    metadata = {"model_grid": grid.to_dict(), "spacing_mm": list(grid.spacing), "image_shape": list(grid.shape),
                "channels": 1, "grid_spacing": grid_spacing, "boundary": "border", "passes": model.passes,
                "displacement_units": "voxels of the model grid, ij (array) order"}
    path = str(tmp_path_factory.mktemp("grid_model") / "export")
    export_saved_model(model, path, grid.shape, 1, metadata)
    return ExportBundle(path, model, grid, grid_spacing)


@pytest.fixture(scope="session")
def grid2d(tmp_path_factory):
    return grid_export(tmp_path_factory, (16, 20), (2.0, 1.5), 4, 1.0, 2)


@pytest.fixture(scope="session")
def grid3d(tmp_path_factory):
    return grid_export(tmp_path_factory, (10, 12, 8), (2.0, 1.5, 2.5), 4, 0.6, 3)


def rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def oblique_affine(spacing, angle, translation, axis=(0.0, 0.0, 1.0), flip=False):
    """Voxel -> RAS mm: a rotation about ``axis`` (2-D: in plane), anisotropic spacing, an offset."""
    a = np.eye(4)
    diag = list(spacing) + ([2.5] if len(spacing) == 2 else [])
    if flip:
        diag[0] = -diag[0]
    a[:3, :3] = rotation(axis, angle) @ np.diag(diag)
    a[:3, 3] = translation
    return a


def smooth(shape, seed):
    """A smooth positive test image (intensities about 150..450, not normalised)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    v = np.ones(shape)
    for _ in range(4):
        w = rng.normal(0, 0.25, len(shape))
        v = v + rng.uniform(0.3, 1.0) * np.sin(sum(wi * gi for wi, gi in zip(w, grid)) + rng.uniform(0, 6))
    return (100 * v + 300).astype(np.float32)


def nifti(path, array, affine):
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(array), affine)
    image.header["descrip"] = b"dirnet register test"
    image.header.set_xyzt_units("mm", "sec")
    image.to_filename(str(path))
    return str(path)


def nifti_pair(tmp_path, ndim):
    """Fixed and moving NIfTI files: different shapes, spacings and (non-identity, anisotropic) affines."""
    if ndim == 2:
        fixed = nifti(tmp_path / "f.nii.gz", smooth((31, 41), 0), oblique_affine((1.0, 0.75), 0.3, (-20, 15, 4)))
        moving = nifti(tmp_path / "m.nii.gz", smooth((26, 35), 1), oblique_affine((1.3, 0.9), 0.25, (-18, 13, 4)))
    else:
        fixed = nifti(tmp_path / "f.nii.gz", smooth((15, 17, 9), 0),
                       oblique_affine((1.2, 1.0, 2.0), 0.5, (31.5, -22.0, 14.25), (0.3, -0.5, 0.8), flip=True))
        moving = nifti(tmp_path / "m.nii.gz", smooth((13, 20, 8), 1),
                        oblique_affine((1.5, 0.9, 2.2), 0.45, (30.0, -21.0, 15.0), (0.3, -0.5, 0.8), flip=True))
    return fixed, moving


def voxel_grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)


def reference_mapping(bundle, fixed_path, moving_path):
    """The composed mapping computed here, from the Keras model's own control points.

    Returns ``(W, p_m, u_model, mapping)``: the moving image (scipy, linear,
    edge-clamped) at ``p_m = T_m(q + u(q))``, ``q = T_f^-1(p_f)`` for every fixed
    voxel ``p_f``; ``u`` is the spline of the network's control points (never the
    dense field); the served dense field ``u_model``; ``mapping(p_f) -> p_m`` for
    any fixed voxel indices.
    """
    from dirnet_tf import readers
    from dirnet_tf.spline_np import spline_displacement_at

    fixed, moving = readers.read_image(fixed_path)[0], readers.read_image(moving_path)[0]
    f, t_f = bundle.grid.prepare(fixed)
    m, t_m = bundle.grid.prepare(moving)
    out = bundle.model({"fixed": f[None, ..., None], "moving": m[None, ..., None]})
    cp = out["control_points"].numpy()[0].astype(np.float64)

    def mapping(p_f):
        q = (np.asarray(p_f, float) - np.asarray(t_f.offset)) / np.asarray(t_f.scale)
        return (q + spline_displacement_at(cp, bundle.grid_spacing, q)) * np.asarray(t_m.scale) + np.asarray(t_m.offset)

    p_m = mapping(voxel_grid(fixed.shape))
    w = ndimage.map_coordinates(moving.array.astype(np.float64), np.moveaxis(p_m, -1, 0), order=1, mode="nearest")
    return w, p_m, out["displacement"].numpy()[0], mapping


def inside_image(p_m, shape):
    return np.all((p_m >= 0) & (p_m <= np.asarray(shape) - 1), axis=-1)


def listing(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def itk_elastix():
    itk = pytest.importorskip("itk")
    try:
        itk.TransformixFilter  # noqa: B018 - lazy attribute; missing without itk-elastix
    except AttributeError:
        pytest.skip("needs itk-elastix")
    return itk


def world_points(affine, voxels, ndim):
    return np.asarray(voxels, float) @ np.asarray(affine)[:3, :ndim].T + np.asarray(affine)[:3, 3]


def random_chain_model(shape, seed, gains, stages=("affine", 8, 4), passes=2):
    """An untrained DIRNet(stages, passes, bounded, symmetric) with random, non-trivial steps.

    ``gains``: factors of the output layers -- the affine matrix and translation columns, then the
    regressor of each B-spline stage in order.
    """
    model = dirnet_tf.DIRNet(shape, stages[-1], filters=4, stages=stages, passes=passes, bounded=True,
                             symmetric=True)
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))
    ndim = len(shape)
    dense = model.affine_regressor.output_dense
    kernel = dense.kernel.numpy()
    kernel[:, : ndim * ndim] *= gains[0]
    kernel[:, ndim * ndim:] *= gains[1]
    dense.kernel.assign(kernel)
    dense.bias.assign(np.zeros(dense.bias.shape, np.float32))  # the bounded matrix stays far from saturation
    names = ["regressor"] + [f"regressor_{k}" for k in range(1, len(gains) - 2)]
    for name, gain in zip(names, gains[2:]):
        for v in getattr(model, name).output_conv.trainable_variables:
            v.assign(gain * v)
    return model


def chain_export(tmp_path_factory, shape, spacing_mm, seed, gains):
    """A tiny DIRNet(stages=("affine", 8, 4), passes=2, bounded, symmetric) with random, non-trivial steps.

    ``gains``: factors of the output layers -- the affine matrix and translation columns, then the
    regressors of the spacing-8 and spacing-4 stages -- chosen (for the images of :func:`nifti_pair`) so
    that the affine step shears by ~0.02-0.06 and shifts by ~1.5 voxels and every B-spline step
    moves by ~0.6-1.3 voxels (below the bounds, 3.84 and 1.92 voxels in 2-D).
    """
    from dirnet_tf.preprocessing import ModelGrid

    model = random_chain_model(shape, seed, gains)
    return write_export(tmp_path_factory, model, ModelGrid(shape, spacing_mm, "percentile"), 4)


@pytest.fixture(scope="session")
def chain2d(tmp_path_factory):
    return chain_export(tmp_path_factory, (32, 32), (1.0, 1.0), 2, (1.0, 50.0, 27.0, 3.0))


@pytest.fixture(scope="session")
def chain3d(tmp_path_factory):
    return chain_export(tmp_path_factory, (16, 16, 16), (1.2, 1.2, 1.2), 3, (1.5, 25.0, 3.5, 1.2))


def beta3(t):
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a ** 2 + a ** 3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def spline_sum(cp, spacing, x):
    """``sum_k cp[k] prod_d beta3(x_d / s_d - k_d + 1)`` over EVERY control point (brute force, numpy)."""
    x = np.asarray(x, float)
    flat = x.reshape(-1, x.shape[-1])
    weights = [beta3(flat[:, d, None] / s - np.arange(k)[None, :] + 1) for d, (s, k) in
               enumerate(zip(spacing, cp.shape[:-1]))]
    subscripts = "pa,pb,abz->pz" if len(weights) == 2 else "pa,pb,pc,abcz->pz"
    return np.einsum(subscripts, *weights, cp).reshape(x.shape)


class ChainReference:
    """The registration of one pair computed here from the Keras model's own step parameters.

    ``chain(q)``: ``phi_1(... phi_n(q))`` on the model grid, each step written out in numpy
    (affine ``q + M (q - c) + t``, B-splines by :func:`spline_sum`); ``trace(q)``: the positions
    after each step (last step first); ``mapping(p_f)``: fixed voxel -> moving voxel through the grid
    transforms; ``p_m`` / ``image``: the mapping of every fixed voxel and the moving image there
    (scipy, linear, edge-clamped); ``u_model``: the model's dense total field.
    """

    def __init__(self, bundle, fixed_path, moving_path):
        from dirnet_tf import readers

        self.fixed, self.moving = readers.read_image(fixed_path)[0], readers.read_image(moving_path)[0]
        f, self.t_f = bundle.grid.prepare(self.fixed)
        m, self.t_m = bundle.grid.prepare(self.moving)
        out = bundle.model({"fixed": f[None, ..., None], "moving": m[None, ..., None]})
        self.shape = bundle.grid.shape
        self.steps = [(kind, spacing, p.numpy()[0].astype(np.float64))
                      for (kind, spacing), p in zip(bundle.model.step_layout(), out["step_params"])]
        self.u_model = out["displacement"].numpy()[0].astype(np.float64)
        self.p_m = self.mapping(voxel_grid(self.fixed.shape))
        self.image = ndimage.map_coordinates(self.moving.array.astype(np.float64), np.moveaxis(self.p_m, -1, 0),
                                             order=1, mode="nearest")

    def trace(self, q):
        x, positions = np.asarray(q, float), []
        centre = (np.asarray(self.shape) - 1) / 2
        for kind, spacing, p in reversed(self.steps):
            if kind == "affine":
                n = x.shape[-1]
                x = x + (x - centre) @ p[: n * n].reshape(n, n).T + p[n * n:]
            else:
                x = x + spline_sum(p, spacing, x)
            positions.append(x)
        return positions

    def chain(self, q):
        return self.trace(q)[-1]

    def model_index(self, p_f):
        return (np.asarray(p_f, float) - np.asarray(self.t_f.offset)) / np.asarray(self.t_f.scale)

    def mapping(self, p_f):
        return self.chain(self.model_index(p_f)) * np.asarray(self.t_m.scale) + np.asarray(self.t_m.offset)

    def interior(self, q, margin=1.0):
        """Points whose every intermediate position (and ``q``) lies ``margin`` inside the model grid:
        there the model's dense composition never clamps a field at the grid's border."""
        upper = np.asarray(self.shape) - 1 - margin
        return np.all([np.all((x >= margin) & (x <= upper), -1) for x in [np.asarray(q, float)] + self.trace(q)],
                      axis=0)

    def fixed_interior(self):
        """Fixed voxels inside the model grid's chain (:meth:`interior`) whose moving point lies inside M."""
        q = self.model_index(voxel_grid(self.fixed.shape))
        return self.interior(q) & inside_image(self.p_m, self.moving.shape)


def points_csv(path, columns, points, extra=None):
    rows = [",".join(repr(float(v)) for v in p) + ("" if extra is None else f",{extra}") for p in points]
    path.write_text(",".join(columns) + ("" if extra is None else ",note") + "\n" + "\n".join(rows) + "\n")
    return str(path)
