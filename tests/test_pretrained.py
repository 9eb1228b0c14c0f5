"""The models shipped inside the package (``dirnet_tf.load_model("brain")``, ``--model=brain``)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dirnet_tf
from dirnet_tf import pretrained
from dirnet_tf.register_errors import RegisterError
from test_brain_data import needs_volumes  # the [brain] extra: one skip rule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRAIN = os.path.join(pretrained.MODELS_DIR, "brain")

# Run in a fresh interpreter, from a folder without any export: the name alone must find the model.
FRESH_SCRIPT = """
import json, sys
import numpy as np
import nibabel as nib
import dirnet_tf
from dirnet_tf import metrics

folder = sys.argv[1]
model = dirnet_tf.load_model("brain")
result = dirnet_tf.register(model, folder + "/mni_t1.nii.gz", folder + "/robex_t1.nii.gz")
fixed_mask = np.asarray(nib.load(folder + "/mni_labels.nii.gz").dataobj) > 0
carried = result.warp_labels(folder + "/robex_labels.nii.gz") > 0
det = metrics.jacobian_determinant(result.displacement[None])
print(json.dumps({"path": model.path, "shape": list(result.warped.shape), "init": result.init,
                  "dice": float(metrics.dice(fixed_mask, carried)["mean"]), "folding": int((det <= 0).sum())}))
"""


@pytest.fixture(scope="module")
def small_templates(tmp_path_factory):
    """Both brain templates as NIfTI (T1 and labels) on 96x112x96 boxes of 2 mm, each centred on its brain
    (:func:`data.brain.write_aligned_volumes`), written once for this module's tests."""
    from data import brain as brain_data

    folder = tmp_path_factory.mktemp("templates")
    return folder, brain_data.write_aligned_volumes(str(folder), (48, 56, 48), (4.0, 4.0, 4.0))


def test_shipped_brain_model_is_small_and_documented():
    files = [os.path.join(d, f) for d, _, names in os.walk(BRAIN) for f in names]
    assert sum(os.path.getsize(f) for f in files) < 8 * 2 ** 20
    card = open(os.path.join(BRAIN, "README.md"), encoding="utf-8").read()
    assert "python -m experiments.synthbrain" in card and "licen" in card.lower()


def test_brain_metadata_matches_its_signature():
    model = dirnet_tf.load_model("brain")
    assert os.path.samefile(model.path, BRAIN)
    spec = model.fn.structured_input_signature[1]
    metadata = json.load(open(os.path.join(BRAIN, "assets", "dirnet.json"), encoding="utf-8"))
    for name in ("fixed", "moving"):
        assert tuple(spec[name].shape[1:]) == tuple(metadata["image_shape"]) + (metadata["channels"],)
    assert model.ndim == 3 and model.shape == tuple(metadata["image_shape"])
    assert metadata["space"] == "world" and metadata["symmetric"] and metadata["bounded"]
    kinds = [step["kind"] for step in metadata["steps"]]
    assert kinds[0] == "affine" and set(kinds[1:]) == {"spline"}
    assert {"warped", "displacement"} <= set(model.fn.structured_outputs)
    grid = metadata["model_grid"]
    assert model.grid.shape == tuple(metadata["image_shape"]) and grid["normalize"] == "percentile"


@needs_volumes
def test_brain_loads_by_name_in_a_fresh_process_and_registers_two_templates(tmp_path, small_templates):
    from data import brain as brain_data
    from dirnet_tf import metrics, readers

    folder, inputs = small_templates
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", FRESH_SCRIPT, str(folder)], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert os.path.samefile(out["path"], BRAIN) and out["init"]["mode"] == "header"
    fixed = readers.read_labels(inputs["mni"]["labels"], ndim=3)[0].array > 0
    assert out["shape"] == list(fixed.shape)
    # Before registration (the two templates as their headers place them) vs after.
    import nibabel as nib

    moving = nib.load(inputs["robex"]["labels"])
    before = brain_data.resample_world(np.asarray(moving.dataobj), moving.affine,
                                       nib.load(inputs["mni"]["labels"]).affine, fixed.shape, order=0) > 0
    dice_before = metrics.dice(fixed, before)["mean"]
    assert dice_before < 0.8 and out["dice"] > dice_before + 0.12 and out["dice"] > 0.88
    assert out["folding"] == 0


def test_unknown_model_name_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RegisterError, match=r"unknown model 'brian'.*'brain'"):
        dirnet_tf.load_model("brian")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(RegisterError, match="notamodel is not a SavedModel directory"):
        dirnet_tf.load_model("notamodel")


def test_a_folder_holding_a_savedmodel_wins_over_the_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "brain").mkdir()
    (tmp_path / "brain" / "saved_model.pb").write_bytes(b"")
    assert pretrained.resolve("brain") == "brain"
    os.remove(tmp_path / "brain" / "saved_model.pb")
    assert os.path.samefile(pretrained.resolve("brain"), BRAIN)


def test_a_2d_image_given_to_the_brain_model_is_a_clear_error(tmp_path):
    from PIL import Image

    from register_fixtures import run_main

    png = tmp_path / "slice.png"
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(png)
    model = dirnet_tf.load_model("brain")
    with pytest.raises(RegisterError, match=r"slice\.png.*2-D.*give a volume"):
        dirnet_tf.register(model, str(png), str(png))
    with pytest.raises(RegisterError, match=r"shape \(32, 32\); the 3-D model .* registers 3-D arrays"):
        dirnet_tf.register(model, np.zeros((32, 32)), np.zeros((32, 32)))
    code = run_main(["--model=brain", f"--fixed={png}", f"--moving={png}", f"--out={tmp_path / 'w.nii.gz'}"])
    assert code == 1 and not (tmp_path / "w.nii.gz").exists()


@needs_volumes
def test_brain_model_refines_across_contrasts_with_mutual_information(tmp_path, small_templates):
    import nibabel as nib

    from data import brain_labels
    from dirnet_tf import metrics

    _, inputs = small_templates
    t1 = nib.load(inputs["robex"]["image"])
    mask = np.asarray(nib.load(inputs["robex"]["labels"]).dataobj) > 0
    t2_path = str(tmp_path / "robex_t2.nii.gz")
    nib.save(nib.Nifti1Image(brain_labels.t2_like_contrast(np.asarray(t1.dataobj), mask), t1.affine), t2_path)
    model = dirnet_tf.load_model("brain")
    network = dirnet_tf.register(model, inputs["mni"]["image"], t2_path)
    refined = dirnet_tf.register(model, inputs["mni"]["image"], t2_path, refine=4, refine_similarity="mi")
    record = refined.refinement
    assert record["steps"] == 4 and record["similarity"] == "mi"
    assert record["final_loss"] <= record["initial_loss"]
    assert network.refinement is None and not np.allclose(network.displacement, refined.displacement)
    det = metrics.jacobian_determinant(refined.displacement[None])
    assert (det <= 0).sum() == 0
