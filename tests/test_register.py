"""``python -m experiments.register``: register two image files with an exported model."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import dirnet_tf
from dirnet_tf.inference import export_saved_model
from experiments import register

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    model = dirnet_tf.DIRNet((28, 28), 8, filters=4)
    rng = np.random.default_rng(2)
    for v in model.regressor.trainable_variables[-2:]:  # a non-trivial deformation
        v.assign(rng.normal(0, 0.5, v.shape).astype(np.float32))
    path = str(tmp_path_factory.mktemp("model") / "export")
    export_saved_model(model, path, (28, 28), 1)
    return path


def _digit(rng, size=28):
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    c = rng.uniform(10, 18, 2)
    r = np.hypot(ii - c[0], jj - c[1])
    return (np.clip(1.5 - np.abs(r - rng.uniform(5, 8)), 0, 1) * 255).astype(np.uint8)


def _cli(args):
    return subprocess.run([sys.executable, "-m", "experiments.register"] + args, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_register_png_pair(tmp_path, export_dir):
    rng = np.random.default_rng(0)
    fixed, moving = _digit(rng), _digit(rng)
    Image.fromarray(fixed).save(tmp_path / "a.png")
    Image.fromarray(moving).convert("RGB").save(tmp_path / "b.png")  # RGB is turned into grey
    out, disp, fig = tmp_path / "o" / "warped.png", tmp_path / "d.npy", tmp_path / "f.png"
    proc = _cli([f"--model={export_dir}", f"--fixed={tmp_path / 'a.png'}", f"--moving={tmp_path / 'b.png'}",
                 f"--out={out}", f"--displacement={disp}", f"--figure={fig}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NCC" in proc.stdout
    d = np.load(disp)
    assert d.shape == (28, 28, 2) and d.dtype == np.float32 and np.abs(d).max() > 0.2
    grid = np.stack(np.meshgrid(np.arange(28), np.arange(28), indexing="ij"), -1)
    reference = ndimage.map_coordinates(moving / 255.0, (grid + d).transpose(2, 0, 1), order=1, mode="nearest")
    warped = np.asarray(Image.open(out))
    assert warped.dtype == np.uint8 and warped.shape == (28, 28)
    assert np.abs(warped.astype(int) - np.rint(reference * 255)).max() <= 1
    assert os.path.getsize(fig) > 1000


def test_register_in_process_matches_scaling(tmp_path, export_dir):
    rng = np.random.default_rng(1)
    fixed, moving = _digit(rng), _digit(rng)
    np.save(tmp_path / "f.npy", fixed)  # uint8 .npy: scaled by 1/255 as well
    Image.fromarray(moving).save(tmp_path / "m.png")
    result = register.register(export_dir, str(tmp_path / "f.npy"), str(tmp_path / "m.png"))
    np.testing.assert_allclose(result["fixed"][..., 0], fixed / 255.0, atol=1e-7)
    np.testing.assert_allclose(result["moving"][..., 0], moving / 255.0, atol=1e-7)
    assert result["warped"].shape == (28, 28, 1) and result["displacement"].shape == (28, 28, 2)
    grid = np.stack(np.meshgrid(np.arange(28), np.arange(28), indexing="ij"), -1)
    reference = ndimage.map_coordinates(moving / 255.0, (grid + result["displacement"]).transpose(2, 0, 1),
                                        order=1, mode="nearest")
    np.testing.assert_allclose(result["warped"][..., 0], reference, atol=1e-5)
    img16 = (np.arange(28 * 28).reshape(28, 28) * 80).astype(np.uint16)
    Image.fromarray(img16).save(tmp_path / "w16.png")
    np.testing.assert_allclose(register.read_image(str(tmp_path / "w16.png"))[..., 0], img16 / 65535.0, atol=1e-6)


def test_wrong_size_and_bad_files(tmp_path, export_dir, capsys):
    Image.fromarray(np.zeros((32, 30), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "ok.png")
    # the command's main, in this process (the PNG test above runs it as a subprocess)
    from absl import flags

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["register", f"--model={export_dir}", f"--fixed={tmp_path / 'ok.png'}",
                 f"--moving={tmp_path / 'big.png'}", f"--out={tmp_path / 'o.png'}"])
    assert register.main(["register"]) == 1
    err = capsys.readouterr().err
    assert "big.png" in err and "32x30" in err and "28x28" in err
    assert not os.path.exists(tmp_path / "o.png")
    with pytest.raises(register.RegisterError, match="does not exist"):
        register.register(export_dir, str(tmp_path / "nope.png"), str(tmp_path / "ok.png"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(register.RegisterError, match="junk.png"):
        register.register(export_dir, str(tmp_path / "junk.png"), str(tmp_path / "ok.png"))
    with pytest.raises(register.RegisterError, match="not a SavedModel"):
        register.register(str(tmp_path), str(tmp_path / "ok.png"), str(tmp_path / "ok.png"))


def test_missing_flags_exit_nonzero_and_are_named(tmp_path):
    """Without --model/--fixed/--moving/--out the command stops before loading anything.

    Plausible bugs caught: a missing flag reaching ``register`` as ``None`` (a
    traceback, or exit status 0 with nothing written), or a message that does
    not say which flags are missing (or names one that was given).
    """
    proc = _cli([f"--out={tmp_path / 'w.png'}", f"--fixed={tmp_path / 'a.png'}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    message = [line for line in proc.stderr.splitlines() if "missing" in line]
    assert len(message) == 1, proc.stderr[-2000:]
    named = {word.strip(",") for word in message[0].split() if word.startswith("--")}
    assert named == {"--model", "--moving"}
    assert not os.path.exists(tmp_path / "w.png")
    proc = _cli([])
    assert proc.returncode == 2
    assert all(f"--{n}" in proc.stderr for n in ("model", "fixed", "moving", "out"))


def _run_main(args):
    """``register.main`` in this process with the given flags (restored afterwards)."""
    from absl import flags

    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["register"] + args)
        return register.main(["register"])
    finally:
        flags.FLAGS.unparse_flags()


def test_npy_output_is_the_models_warped_image(tmp_path, export_dir):
    """``--out=x.npy`` holds the served model's ``warped`` output, float32, unclipped.

    The moving image is a float ``.npy`` with values up to 2 (used as is), so
    the warped image exceeds 1 somewhere.  Plausible bugs caught: the ``.npy``
    path going through the 8-bit PNG conversion (rounded to 1/255, clipped to
    [0, 1]), another output (moving, fixed) written, or a channel axis lost.
    """
    from dirnet_tf.inference import load_export

    rng = np.random.default_rng(3)
    fixed = _digit(rng)
    moving = (2.0 * _digit(rng) / 255.0).astype(np.float32)
    Image.fromarray(fixed).save(tmp_path / "f.png")
    np.save(tmp_path / "m.npy", moving)
    out = tmp_path / "out" / "warped.npy"
    assert _run_main([f"--model={export_dir}", f"--fixed={tmp_path / 'f.png'}",
                      f"--moving={tmp_path / 'm.npy'}", f"--out={out}"]) == 0
    warped = np.load(out)
    fn, _ = load_export(export_dir)
    expected = fn(fixed=(fixed / 255.0).astype(np.float32)[None, ..., None], moving=moving[None, ..., None])
    expected = expected["warped"].numpy()[0]
    assert warped.dtype == np.float32 and warped.shape == (28, 28, 1)
    np.testing.assert_allclose(warped, expected, rtol=0, atol=1e-6)
    assert warped.max() > 1.05  # not clipped to [0, 1]
    assert np.abs(warped * 255 - np.rint(warped * 255)).max() > 1e-3  # not quantised to 8 bits
    assert not np.allclose(warped[..., 0], moving, atol=1e-3)  # really warped


def test_rgb_input_is_converted_to_luma_grey(tmp_path, export_dir):
    """RGB(A) PNG and RGB ``.npy`` give the same grey: ``(0.299 R + 0.587 G + 0.114 B) / 255``.

    The reference is computed here in float64 from the pixel values.
    Plausible bugs caught: PNG and ``.npy`` converted differently (Pillow's
    integer "L" conversion rounds to 1/255; a channel mean differs by up to
    0.2 on saturated colours), alpha mixed into the grey, channels reordered
    (BGR), or a colour image rejected for a one-channel model.
    """
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (28, 28, 3)).astype(np.uint8)
    rgb[0, :3] = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # saturated: luma 0.299, 0.587, 0.114
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    rgba = np.concatenate([rgb, rng.integers(0, 256, (28, 28, 1)).astype(np.uint8)], -1)
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ca.png")
    np.save(tmp_path / "c.npy", rgb)
    np.save(tmp_path / "ca.npy", rgba)
    for name in ("c.png", "ca.png", "c.npy", "ca.npy"):
        grey = register.read_image(str(tmp_path / name))
        assert grey.shape == (28, 28, 1) and grey.dtype == np.float32, name
        np.testing.assert_allclose(grey[..., 0], luma, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(register.read_image(str(tmp_path / "c.png"))[0, :3, 0], [0.299, 0.587, 0.114],
                               atol=1e-6)
    # End to end: the RGB file registers exactly like its grey version.
    np.save(tmp_path / "grey.npy", luma.astype(np.float32))
    fixed = str(tmp_path / "c.npy")
    from_rgb = register.register(export_dir, fixed, str(tmp_path / "ca.png"))
    from_grey = register.register(export_dir, fixed, str(tmp_path / "grey.npy"))
    np.testing.assert_allclose(from_rgb["warped"], from_grey["warped"], atol=1e-5)  # inputs equal to ~1e-7
    np.testing.assert_allclose(from_rgb["displacement"], from_grey["displacement"], atol=1e-5)
