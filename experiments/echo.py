"""DIRNet on a real echocardiogram: the ultrasound cine that ships with pydicom (``python -m experiments.echo``).

    python -m experiments.echo                      # pydicom's examples_ybr_color.dcm, default settings
    python -m experiments.echo --steps=1000 --logdir=runs/echo_short --export_dir=exports/echo_short
    python -m experiments.echo --images=OTHER_CINE.dcm --mask=SECTOR.npy

**Data** (:mod:`data.echo`).  pydicom's wheel holds a real ultrasound cine, ``pydicom/data/
test_files/examples_ybr_color.dcm`` (a SonoSite echocardiogram: 30 colour frames of 240x320
pixels, frame time 33 ms, about one heart beat), found in the installed package and never
downloaded; ``--images=FILE`` takes another multi-frame ultrasound DICOM instead.  The reader
converts the frames to grey and takes the pixel size from the ultrasound-region metadata
(corrected to 1.021 mm, with a :class:`~dirnet_tf.readers.GeometryWarning`).

**Sector mask.** Only the ultrasound sector may drive the similarity: the text overlay, the depth
scale, the orientation marker and the ECG/status bar outside it must not.
:func:`data.echo.sector_mask` builds it from the frames (pixels whose temporal standard deviation
exceeds ``--mask_threshold`` times its 99th percentile, inside the ultrasound region box, as one
convex region without the static overlay).  It is written as ``sector_mask.npy`` (and ``.png``) in
``--logdir`` and passed to training as ``--mask`` (everything outside it is zeroed after the
normalisation); ``sector_mask_check.png`` shows frame 0 with its contour, to check by eye.
``--mask=FILE`` (on the frames' 240x320 grid) uses a given mask instead.

**Training** is the library's training pipeline, unchanged: this command only prepares the inputs
(file, mask, model grid) and sets flag defaults.  Model grid: ``--spacing`` (default
``--downsample`` (2) times the file's pixel size, 2.04 mm) and ``--shape`` (``auto``: the
smallest grid, a multiple of the coarsest B-spline stage's spacing per axis, that holds the sector mask when
centred on the image: 96x96).  Pairs: ``--pairs=sequence --max_frame_gap=8`` (frames at most 8
apart, both directions); split in time, ``--split_within_groups --split=0.5,0.2,0.3``: frames
0-14 train, 15-20 validation (model selection), 21-29 test (72 pairs).  Model and optimisation
defaults (chosen by runs compared in ``experiments/README.md``): folding-free composed, bounded,
symmetric B-spline steps as in ``python -m experiments.mnist``, here four stages of one pass each
-- ``--stages=8,4,2,2 --passes=1`` (two stages of their own at spacing 2) -- ``--normalize_inputs``,
automatic regressor widths, ``--bending_weight=0.1``, trained end to end -- 3000 steps of batch 8,
Adam 2e-3 with cosine decay, validation and checkpoints every 100 steps (the best validation
checkpoint is exported).  Every flag of ``python -m experiments.train`` applies.

**Evaluation** (a post-step on the export, on the test pairs of the training run's
``eval_pairs.json``; scores from :mod:`dirnet_tf.comparison`), written into ``metrics.json`` under
``echo`` next to the training run's own numbers:

* NCC inside the sector (model-grid mask) before and after registration, also per frame gap;
* folding fraction (``det J <= 0``), on the whole model grid and inside the sector;
* cycle consistency: for every test pair (a, b) whose reverse (b, a) is a test pair too, the
  round trip ``x -> x + u_ab(x) -> ... + u_ba(...)``; its mean length inside the sector, in pixels
  of the model grid and in mm (:func:`dirnet_tf.comparison.cycle_residual`);
* time per pair: DIRNet batched (``--timing_batch_size`` pairs per call, the training run's
  measurement); elastix one pair after another;
* the elastix B-spline baseline (:func:`dirnet_tf.elastix.register_pairs`, parameter file
  ``baselines/elastix/echo_bspline.txt``, the sector as elastix's fixed-image mask) on the same
  pairs and images, with the same scores; speed-up = elastix ms/pair / DIRNet ms/pair.

Displacements are in **pixels of the model grid, ij (array) order**; ``*_mm`` values multiply
them by the model grid spacing.  Figures in ``--logdir``: ``echo_registration.png`` (fixed /
moving / warped / deformation grid of a few test pairs), ``echo_strip.png`` (frames of the cine
with the sector and the split), and the training run's ``registration.png``.
"""

import os
import time

import numpy as np
from absl import flags

from data import echo as echo_data
from dirnet_tf import readers
from dirnet_tf.config import PRESETS, TrainConfig, parse_floats
from dirnet_tf.console import import_tensorflow_quietly
from dirnet_tf.elastix import BASELINE_DIR, register_pairs
from dirnet_tf.report_figures import save_pair_figure, spread_pairs
from experiments import common, train
from experiments.common import define_flag

# TensorFlow is imported by the functions that need it (dirnet_tf.comparison, inference, train_data,
# training), after main() has quietened it.

flags.adopt_module_key_flags(train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ELASTIX_PARAMETER_FILE = os.path.join(BASELINE_DIR, "echo_bspline.txt")

define_flag("float", "downsample", 2.0, "Model grid spacing as a multiple of the file's pixel size "
            "(used when --spacing is empty).")
define_flag("float", "mask_threshold", 0.06, "Sector mask: a pixel varies over time when its temporal "
            "standard deviation exceeds this fraction of the 99th percentile of all pixels' deviations.")
define_flag("bool", "elastix", True, "Run the elastix B-spline baseline on the test pairs (needs itk-elastix).")
define_flag("string", "elastix_parameter_file", ELASTIX_PARAMETER_FILE, "elastix parameter file of the baseline.")
define_flag("integer", "elastix_threads", 0, "Threads per elastix registration (0: "
            "baselines/elastix/settings.json).")
define_flag("integer", "figure_pairs", 6, "Test pairs shown in echo_registration.png.")

# The paper's settings first (every model/objective default the shared flags changed), then this example's.
DEFAULTS = {**PRESETS["paper"], **dict(
    images="", pairs="sequence", max_frame_gap=8, split="0.5,0.2,0.3",
    split_within_groups=True, shape="auto", spacing="", eval_pairs=100, grid_spacing=8, stages="8,4,2,2",
    bounded=True, symmetric=True, normalize_inputs=True, filters="auto", convs_per_level="auto", passes=1,
    inference_passes=0, bending_weight=0.1, folding_weight=0.0, steps=3000, batch_size=8,
    learning_rate=2e-3, timing_batch_size=32, log_every=100, eval_every=100, checkpoint_every=100,
    logdir=os.path.join("runs", "echo"), export_dir=os.path.join("exports", "echo"))}


def prepare_inputs(config):
    """The cine, its sector mask and the model grid: ``(TrainConfig for training, data.echo.EchoInputs)``.

    ``config`` is a :class:`~dirnet_tf.config.TrainConfig` with this command's flags in ``extra``.
    Writes ``sector_mask.npy`` / ``sector_mask.png`` / ``sector_mask_check.png`` into the logdir
    (unless ``config.mask`` names a mask); resolves ``--spacing`` (empty) and ``--shape=auto``.
    """
    inputs = echo_data.prepare_echo_inputs(config.logdir, config.images, config.mask, config.extra["mask_threshold"])
    first, mask = inputs.frames[0], inputs.mask
    spacing, shape = config.spacing, config.shape
    if not str(spacing).strip():
        spacing = ",".join(f"{config.extra['downsample'] * s:.6g}" for s in first.spacing)
    if str(shape).strip().lower() == "auto":
        model_spacing = parse_floats(spacing, "spacing")
        model_spacing = (model_spacing,) * 2 if np.isscalar(model_spacing) else model_spacing
        spacings = [int(t) for t in str(config.stages or "").split(",") if t.strip().isdigit()]
        multiple = max(spacings or [int(config.grid_spacing)])  # the coarsest B-spline stage
        shape = ",".join(str(n) for n in echo_data.sector_grid_shape(mask, first.spacing, model_spacing, multiple))
    config = config.replace(images=inputs.path, mask=inputs.mask_path, spacing=spacing, shape=shape)
    print(f"[echo] {len(inputs.frames)} frames of {first.shape[0]}x{first.shape[1]} pixels at "
          f"{first.spacing[0]:.4g} mm; sector mask {int(mask.sum())} pixels ({100 * mask.mean():.1f} %) "
          f"-> {inputs.mask_path}; model grid {config.shape} at {config.spacing} mm", flush=True)
    return config, inputs


def save_registration(path, fixed, moving, pred, elastix_ncc, eval_pairs, ncc_before, ncc_after, count):
    """Fixed / moving / warped / grid of ``count`` test pairs spread over the NCC before registration."""
    keep = spread_pairs(ncc_before, count)
    titles = []
    for k in keep:
        a, b = eval_pairs[k]
        text = f"frame {a} <- {b}\nNCC {ncc_before[k]:.2f} -> {ncc_after[k]:.2f}"
        if elastix_ncc is not None:
            text += f"\n(elastix {elastix_ncc[k]:.2f})"
        titles.append(text)
    return save_pair_figure(path, fixed[keep], moving[keep], pred["warped"][keep], pred["displacement"][keep],
                            titles, grid_step=4)


def evaluate_echo(config, inputs, result, start):
    """The post-step on the export: sector scores, cycle consistency, elastix, figures.

    Returns
    -------
    dict
        The ``echo`` section of ``metrics.json``.
    """
    from dirnet_tf import comparison, train_data
    from dirnet_tf.inference import load_export, predict

    frames, mask, own = inputs.frames, inputs.mask, config.extra
    data = train_data.load_collection(config)
    plan = train_data.make_splits_and_pairs(config, data)
    grid, images, test = data["grid"], data["images"], plan["test"]
    spacing = np.asarray(grid.spacing, np.float64)
    sector = grid.prepare_labels(mask.astype(np.int32), frames[0]) > 0
    fixed, moving = images[test[:, 0]], images[test[:, 1]]
    served, _ = load_export(config.export_dir)
    pred = predict(served, fixed, moving, batch_size=max(1, config.timing_batch_size))
    before = comparison.masked_ncc(fixed, moving, sector)
    dirnet, per_dirnet = comparison.masked_registration_scores(fixed, pred["warped"], pred["displacement"], sector,
                                                               spacing, test)
    dirnet.update(ms_per_pair=result["ms_per_pair"], timing_batch_size=result["timing_batch_size"])
    portable = echo_data.portable_echo_path
    echo = {"file": portable(config.images), "frames": len(frames),
            "frame_shape": list(frames[0].shape), "frame_spacing_mm": [float(s) for s in frames[0].spacing],
            "mask": portable(config.mask), "mask_pixels": int(mask.sum()),
            "sector_pixels_model_grid": int(sector.sum()),
            "model_grid": {"shape": list(grid.shape), "spacing_mm": [float(s) for s in grid.spacing]},
            "units": "displacements and cycle residuals in pixels of the model grid (ij); *_mm in mm",
            "test_frames": [int(i) for i in plan["splits"]["test"]], "pairs": int(len(test)),
            "no_registration": {"ncc_sector": float(before.mean()), "ncc_sector_median": float(np.median(before))},
            "dirnet": dirnet}
    gap_values = {"before": before, "dirnet": per_dirnet["ncc"]}
    elastix_ncc = None
    if own["elastix"]:
        print(f"[echo] elastix on the {len(test)} test pairs ...", flush=True)
        out = register_pairs(fixed, moving, own["elastix_parameter_file"], fixed_mask=sector,
                             threads=own["elastix_threads"] or None)
        el, per_el = comparison.masked_registration_scores(fixed, out["warped"], out["displacement"], sector,
                                                           spacing, test)
        el.update(ms_per_pair=float(1000 * np.median(out["seconds"])),
                  ms_per_pair_mean=float(1000 * np.mean(out["seconds"])),
                  parameter_file=os.path.relpath(own["elastix_parameter_file"], ROOT),
                  fixed_mask="sector")
        echo["elastix"] = el
        echo["speedup"] = el["ms_per_pair"] / dirnet["ms_per_pair"]
        gap_values["elastix"] = elastix_ncc = per_el["ncc"]
    echo["ncc_sector_by_gap"] = comparison.scores_by_gap(test, **gap_values)
    logdir = config.logdir
    save_registration(os.path.join(logdir, "echo_registration.png"), fixed, moving, pred, elastix_ncc, test,
                      before, per_dirnet["ncc"], own["figure_pairs"])
    echo_data.save_cine_strip(os.path.join(logdir, "echo_strip.png"), np.stack([f.array for f in frames]), mask,
                              images, plan["splits"])
    echo["seconds"] = time.perf_counter() - start
    echo["comparison"] = comparison_summary(echo)
    return echo


def comparison_summary(echo):
    """Differences a reader checks first: the NCC gain over no registration and the gap to elastix."""
    out = {"ncc_gain": echo["dirnet"]["ncc_sector"] - echo["no_registration"]["ncc_sector"]}
    if "elastix" in echo:
        out["ncc_below_elastix"] = echo["elastix"]["ncc_sector"] - echo["dirnet"]["ncc_sector"]
        out["speedup"] = echo["speedup"]
    return out


def print_summary(echo):
    """The console table of the ``echo`` section: one row per method, the speed-up and the NCC gain."""
    rows = [("no registration", echo["no_registration"])] + [(k, echo[k]) for k in ("dirnet", "elastix") if k in echo]
    print("[echo] method            NCC(sector)  folding %  cycle px / mm   ms/pair", flush=True)
    for name, r in rows:
        cyc = (f"{r['cycle_residual_pixels']:.3f} / {r['cycle_residual_mm']:.3f}"
               if "cycle_residual_pixels" in r else "-")
        fold = f"{100 * r['folding_fraction']:.3f}" if "folding_fraction" in r else "-"
        ms = f"{r['ms_per_pair']:.2f}" if "ms_per_pair" in r else "-"
        print(f"[echo] {name:<17} {r['ncc_sector']:.4f}      {fold:>8}   {cyc:<14}  {ms}", flush=True)
    if "speedup" in echo:
        print(f"[echo] speed-up (elastix / DIRNet batched): {echo['speedup']:.0f}x", flush=True)
    c = echo["comparison"]
    print(f"[echo] sector NCC gain over no registration: {c['ncc_gain']:+.4f}"
          + (f"; below elastix by {c['ncc_below_elastix']:.4f}" if "ncc_below_elastix" in c else ""), flush=True)


def run(config):
    """Prepare the echo inputs, train, then score the export.

    Parameters
    ----------
    config : TrainConfig or dict
        The settings (a dict: flag values, those of ``python -m experiments.train`` plus this
        command's, which a TrainConfig keeps in ``extra``).

    Returns
    -------
    dict
        The metrics written to ``metrics.json``: the training run's plus ``echo``.
    """
    from dirnet_tf.training import train_with_report

    start = time.perf_counter()
    config, inputs = prepare_inputs(TrainConfig.from_dict(config, extra_ok=True)
                                    if isinstance(config, dict) else config)
    return train_with_report(config, "echo", lambda result: evaluate_echo(config, inputs, result, start),
                             print_summary, "echo_registration.png and echo_strip.png", echo_data.portable_echo_path)


def main():
    """Command line: apply this command's defaults, parse flags, import TensorFlow quietly and run."""

    def quiet_run(config):
        import_tensorflow_quietly()
        return run(config)

    common.run_experiment(quiet_run, DEFAULTS, errors=(readers.InputError,), presets=PRESETS)


if __name__ == "__main__":
    main()
