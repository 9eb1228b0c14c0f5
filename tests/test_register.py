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
