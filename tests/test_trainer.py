"""dirnet_tf.trainer: resume, NaN guard, steps per call and XLA, mixed precision, best checkpoint."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import dirnet_tf
from dirnet_tf.pairs import same_group_pair_sampler
from dirnet_tf.trainer import Trainer, TrainingDivergedError

SHAPE = (16, 16)


def blob_images(n=40, seed=0):
    """Blobs at random positions: enough structure for NCC to have gradients."""
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    centres = rng.uniform(5, 11, (n, 2))
    widths = rng.uniform(1.5, 3.0, n)
    images = np.exp(-((ii - centres[:, 0, None, None]) ** 2 + (jj - centres[:, 1, None, None]) ** 2)
                    / (2 * widths[:, None, None] ** 2))
    return images[..., None].astype(np.float32), rng.integers(0, 3, n)



def small_model():
    return dirnet_tf.DIRNet(SHAPE, 4, filters=4)



def _trainer(logdir, steps, sampler=None, **kw):
    images, groups = blob_images()
    sampler = sampler or same_group_pair_sampler(images, groups, 4, seed=3)
    kw = dict(dict(lr_schedule="constant", log_every=2, checkpoint_every=2, eval_every=0), **kw)
    return Trainer(small_model, sampler, str(logdir), steps=steps, batch_size=4, learning_rate=1e-2,
                   seed=1, print_fn=lambda *a: None, **kw)



def _weights(trainer):
    return [v.numpy() for v in trainer.model.weights]



def test_resume_continues_the_same_run(tmp_path):
    straight = _trainer(tmp_path / "a", 6)
    result = straight.train()
    assert result["step"] == 6 and result["resumed_from"] is None and np.isfinite(result["last_loss"])

    first = _trainer(tmp_path / "b", 3, config={"steps": 3, "seed": 1})
    first.train()
    assert int(first.step.numpy()) == 3
    with open(tmp_path / "b" / "flags.json") as f:
        assert json.load(f) == {"steps": 3, "seed": 1}
    resumed = _trainer(tmp_path / "b", 6)
    result = resumed.train()
    assert result["resumed_from"].endswith("ckpt-3")
    assert result["step"] == 6
    assert resumed.manager.latest_checkpoint.endswith("ckpt-6")
    for a, b in zip(_weights(straight), _weights(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # the run moved away from the initial weights (so the comparison means something)
    fresh = _trainer(tmp_path / "c", 0)
    assert max(np.abs(a - b).max() for a, b in zip(_weights(fresh), _weights(straight))) > 1e-3
    # --noresume starts again from step 0
    again = _trainer(tmp_path / "b", 2, resume=False)
    assert again.train()["step"] == 2



def test_steps_per_execution_and_xla_step_train_the_same_model(tmp_path):
    """Several steps per tf.function call, and the XLA-compiled step (which swaps the
    op for its pure-TF twin), follow the one-step-per-call trajectory."""
    runs = {}
    for name, kw in {"one": dict(steps_per_execution=1), "five": dict(steps_per_execution=5),
                     "xla": dict(steps_per_execution=5, jit_compile=True)}.items():
        trainer = _trainer(tmp_path / name, 7, log_every=100, checkpoint_every=100, **kw)
        calls = []
        step_fn = trainer._make_train_step()

        def counting(iterator, n, step_fn=step_fn, calls=calls):
            calls.append(int(n))
            return step_fn(iterator, n)

        trainer._train_step = counting
        summary = trainer.train()
        assert summary["step"] == 7 and int(trainer.step.numpy()) == 7
        runs[name] = (_weights(trainer), calls, _dirnet_ops(step_fn))
    assert runs["one"][1] == [1] * 7
    assert runs["five"][1] == [5, 2] and runs["xla"][1] == [5, 2]  # never past the end
    fresh = _weights(_trainer(tmp_path / "fresh", 0))
    assert max(np.abs(a - b).max() for a, b in zip(fresh, runs["one"][0])) > 1e-3
    for other in ("five", "xla"):
        for a, b in zip(runs["one"][0], runs[other][0]):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    # the plain step runs the compiled op; inside XLA the pure-TF twin replaces it
    assert "Dirnet>Resample" in runs["five"][2] and "Dirnet>ResampleGrad" in runs["five"][2]
    assert not runs["xla"][2]



def _dirnet_ops(fn):
    found = set()
    for concrete in fn._list_all_concrete_functions():
        graph = concrete.graph.as_graph_def()
        nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
        found.update(n.op for n in nodes if n.op.startswith("Dirnet"))
    return found



def _nan_from_step(sampler, first_bad_step):
    """``sampler`` whose fixed images are NaN from batch ``first_bad_step`` on (the loss diverges)."""

    def sample(step):
        batch = sampler(step)
        poison = tf.where(step >= first_bad_step, np.float32(np.nan), np.float32(0.0))
        return {"fixed": batch["fixed"] + poison, "moving": batch["moving"]}

    return sample


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    images, groups = blob_images()
    poisoned = _nan_from_step(same_group_pair_sampler(images, groups, 4, seed=0), 4)
    trainer = _trainer(tmp_path, 10, sampler=poisoned)
    with pytest.raises(TrainingDivergedError, match=r"nan at step 5.*ckpt-4"):
        trainer.train()
    assert trainer.manager.latest_checkpoint.endswith("ckpt-4")
    assert not any(name.startswith("ckpt-5") for name in os.listdir(tmp_path))



def test_mixed_precision_is_dtype_correct_on_cpu(tmp_path):
    trainer = _trainer(tmp_path, 2, mixed_precision=True)
    assert trainer.model.regressor.compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in trainer.model.trainable_variables)
    assert keras_policy_name() == "float32"  # the global policy is restored
    result = trainer.train()
    assert np.isfinite(result["last_loss"])
    images, _ = blob_images(4)
    out = trainer.model({"fixed": images[:2], "moving": images[2:]})
    assert out["warped"].dtype == tf.float32 and out["displacement"].dtype == tf.float32



def keras_policy_name():
    import keras

    return keras.mixed_precision.dtype_policy().name


def _scripted_validation(trainer, script):
    """Replace the validation NCC by ``script[step]`` (the selection logic is what is tested)."""
    trainer.evaluate_validation = lambda batch_size=256: {"ncc": script[int(trainer.step.numpy())]}
    return trainer


def _validated_trainer(logdir, steps, script, **kw):
    images, _ = blob_images(8)
    validation = {"fixed": images[:4], "moving": images[4:]}
    return _scripted_validation(
        _trainer(logdir, steps, validation=validation, eval_every=2, panel_pairs=2, **kw), script)


def test_best_validation_checkpoint_is_selected_exported_and_survives_resume(tmp_path):
    """The checkpoint with the best validation NCC (step 4 here, not the last) is the one
    selected and exported, and its score survives a resume: an inverted 'improved' test, or a
    best-state reader that forgets the score on resume, picks another checkpoint."""
    from dirnet_tf.inference import export_saved_model, load_export
    from dirnet_tf.training import train_or_restore

    script = {2: 0.5, 4: 0.9, 6: 0.7, 8: 0.8}
    first = _validated_trainer(tmp_path, 6, script)
    first.train()
    with open(tmp_path / "best" / "best.json") as f:
        assert json.load(f) == {"validation_ncc": 0.9}
    assert tf.train.latest_checkpoint(str(tmp_path / "best")).endswith("-4")
    # A resumed run (to step 8, where the NCC 0.8 is below the stored best) keeps step 4.
    resumed = _validated_trainer(tmp_path, 8, script)
    summary, _ = train_or_restore(resumed, {"export_only": False, "select_best": True, "logdir": str(tmp_path)})
    assert summary["best_validation_ncc"] == 0.9
    assert tf.train.latest_checkpoint(str(tmp_path / "best")).endswith("-4")
    # The selected weights are those of ckpt-4 (saved by the checkpoint manager), not the last.
    at4 = _trainer(tmp_path / "other", 8)
    at4.restore(str(tmp_path / "ckpt-4"))
    at8 = _trainer(tmp_path / "other8", 8)
    at8.restore(str(tmp_path / "ckpt-8"))
    for a, b in zip(_weights(resumed), _weights(at4)):
        np.testing.assert_array_equal(a, b)
    assert max(np.abs(a - b).max() for a, b in zip(_weights(at4), _weights(at8))) > 1e-4
    # ... and so is the export.
    images, _ = blob_images(6)
    export_dir = export_saved_model(resumed.model, str(tmp_path / "export"), SHAPE, 1)
    served, _ = load_export(export_dir)
    out = served(fixed=tf.constant(images[:3]), moving=tf.constant(images[3:]))
    ref = at4.model({"fixed": images[:3], "moving": images[3:]})
    np.testing.assert_allclose(out["displacement"].numpy(), ref["displacement"].numpy(), atol=1e-6)


def test_interrupted_run_resumes_to_the_same_weights_under_the_cosine_schedule(tmp_path):
    """A run killed after its step-4 checkpoint and restarted with the same command ends
    bit-identical to an uninterrupted run, under the default cosine schedule (warm-up and
    decay depend on the step, so a schedule or optimizer state that is not restored, or a
    data stream that restarts, would differ)."""
    images, groups = blob_images()
    killed_after_step_4 = _nan_from_step(same_group_pair_sampler(images, groups, 4, seed=3), 4)

    straight = _trainer(tmp_path / "straight", 8, lr_schedule="cosine")
    straight.train()
    interrupted = _trainer(tmp_path / "run", 8, sampler=killed_after_step_4, lr_schedule="cosine")
    with pytest.raises(TrainingDivergedError):
        interrupted.train()
    assert interrupted.manager.latest_checkpoint.endswith("ckpt-4")
    resumed = _trainer(tmp_path / "run", 8, lr_schedule="cosine")
    result = resumed.train()
    assert result["resumed_from"].endswith("ckpt-4") and result["step"] == 8
    for a, b in zip(_weights(straight), _weights(resumed)):
        np.testing.assert_array_equal(a, b)
    lr = resumed.optimizer.learning_rate
    assert float(lr.numpy() if hasattr(lr, "numpy") else lr) < 1e-2  # the cosine decayed


def _interrupt_on_call(trainer, call):
    """Make the ``call``-th call of the compiled training function raise ``KeyboardInterrupt``
    (what Ctrl-C does while TensorFlow runs it)."""
    step_fn = trainer._make_train_step()
    calls = []

    def interrupted(iterator, n):
        calls.append(int(n))
        if len(calls) == call:
            raise KeyboardInterrupt
        return step_fn(iterator, n)

    trainer._train_step = interrupted
    return trainer


def test_ctrl_c_keeps_the_last_checkpoint_says_so_in_one_line_and_resumes_to_the_same_weights(tmp_path):
    """Ctrl-C during train(): a TrainingInterrupted (still a KeyboardInterrupt) whose message is
    the one line to print, nothing written after the last checkpoint, and the same command
    resumes to the weights of an uninterrupted run."""
    from dirnet_tf.trainer import TrainingInterrupted

    kw = dict(lr_schedule="cosine", log_every=2, checkpoint_every=4, steps_per_execution=10)
    straight = _trainer(tmp_path / "straight", 8, **kw)
    straight.train()
    # calls of 2 steps (logging every 2): steps 1-2, 3-4 (ckpt-4), 5-6, then Ctrl-C in the 4th call
    interrupted = _interrupt_on_call(_trainer(tmp_path / "run", 8, **kw), 4)
    with pytest.raises(TrainingInterrupted) as info:
        interrupted.train()
    assert isinstance(info.value, KeyboardInterrupt)
    assert str(info.value) == ("interrupted at step 6; run the same command again to resume from the "
                               "last checkpoint (step 4)")
    assert info.value.step == 6 and info.value.checkpoint_step == 4
    assert info.value.checkpoint.endswith("ckpt-4") and info.value.__cause__ is None
    assert tf.train.latest_checkpoint(str(tmp_path / "run")).endswith("ckpt-4")
    assert not any(name.startswith(("ckpt-6", "ckpt-8")) for name in os.listdir(tmp_path / "run"))
    resumed = _trainer(tmp_path / "run", 8, **kw)
    result = resumed.train()
    assert result["resumed_from"].endswith("ckpt-4") and result["step"] == 8
    for a, b in zip(_weights(straight), _weights(resumed)):
        np.testing.assert_array_equal(a, b)


def test_ctrl_c_before_any_checkpoint_says_the_run_starts_again(tmp_path):
    from dirnet_tf.trainer import TrainingInterrupted

    trainer = _interrupt_on_call(_trainer(tmp_path, 8, checkpoint_every=4), 1)
    with pytest.raises(TrainingInterrupted, match=r"^interrupted at step 0; no checkpoint was written yet, "
                                                  r"so running the same command again starts from step 0$"):
        trainer.train()
    assert tf.train.latest_checkpoint(str(tmp_path)) is None


def test_ctrl_c_while_a_checkpoint_is_written_finishes_it_first(tmp_path):
    """SIGINT arriving inside the checkpoint save is held until the save is complete.

    Python's own Ctrl-C handler is installed for the test: a suite started in the background
    inherits SIGINT ignored, and the trainer (rightly) leaves such a process's handling alone."""
    import signal

    from dirnet_tf.trainer import TrainingInterrupted

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_during_save(tmp_path, TrainingInterrupted)
    finally:
        signal.signal(signal.SIGINT, inherited)


def _ctrl_c_during_save(tmp_path, TrainingInterrupted):
    import signal

    trainer = _trainer(tmp_path, 8, checkpoint_every=4, log_every=4)
    save = trainer.manager.save

    def save_with_sigint(**kw):
        if kw.get("checkpoint_number") == 4:
            signal.raise_signal(signal.SIGINT)
        return save(**kw)

    trainer.manager.save = save_with_sigint
    with pytest.raises(TrainingInterrupted, match=r"at step 4; .*\(step 4\)$"):
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-4")
    restored = _trainer(tmp_path / "other", 8)
    restored.restore(str(tmp_path / "ckpt-4"))
    assert int(restored.step.numpy()) == 4


def test_validation_and_panel_trace_the_eval_step_once(tmp_path):
    """Validation batches of uneven size and the panel's pairs run one traced graph (no
    'tf.function retracing' warnings)."""
    images, _ = blob_images(10)
    validation = {"fixed": images[:5], "moving": images[5:]}
    trainer = _trainer(tmp_path, 2, validation=validation, eval_every=2, panel_pairs=3)
    metrics = trainer.evaluate_validation(batch_size=2)  # batches of 2, 2, 1
    assert np.isfinite(metrics["ncc"])
    trainer.train()
    assert trainer._eval_step.experimental_get_tracing_count() == 1
