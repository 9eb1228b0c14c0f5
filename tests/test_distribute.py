"""Multi-device training: MirroredStrategy on two logical CPUs, a two-worker
MultiWorkerMirroredStrategy run on 127.0.0.1, and mixed precision.

Each distributed run happens in a fresh subprocess (logical devices and the
collective runtime must be configured before TensorFlow initialises).  The runs
train the same tiny DIRNet with :class:`dirnet_tf.trainer.Trainer` from the same
initial weights on the same global batches; the final weights and the last loss
must agree with single-device training.
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
GLOBAL_BATCH = 8
TIMEOUT_S = 240

# One script for every role; argv: role, output json, logdir.
WORKER_SCRIPT = r'''
import json, os, sys
role, out_path, logdir = sys.argv[1], sys.argv[2], sys.argv[3]
import tensorflow as tf
if role == "local":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    one = lambda: tf.distribute.OneDeviceStrategy("/cpu:0")
    mirrored = lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    # name -> (strategy, Trainer options beyond one step per call)
    strategies = {"single": (one, {}), "mirrored": (mirrored, {}),
                  "mirrored_all_steps_in_one_call": (mirrored, dict(log_every=int(os.environ["DT_STEPS"]),
                                                                     steps_per_execution=int(os.environ["DT_STEPS"]))),
                  "mirrored_jit": (mirrored, dict(jit_compile=True))}
else:  # a MultiWorkerMirroredStrategy worker; TF_CONFIG is set by the test
    mwms = tf.distribute.MultiWorkerMirroredStrategy()  # before any other op
    strategies = {"multi_worker": (lambda: mwms, {})}
import keras
import numpy as np
import dirnet_tf
from dirnet_tf.pairs import same_group_pair_sampler
from dirnet_tf.trainer import Trainer

# The Trainer uses Adam, whose steps hardly depend on the gradient's scale: train with plain
# SGD here so that a wrong cross-replica gradient normalisation changes the weights.
keras.optimizers.Adam = lambda learning_rate: keras.optimizers.SGD(learning_rate)

STEPS, BATCH = int(os.environ["DT_STEPS"]), int(os.environ["DT_BATCH"])
rng = np.random.default_rng(0)
ii, jj = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
centres = rng.uniform(5, 11, (24, 2))
widths = rng.uniform(1.5, 3.0, 24)
images = np.exp(-((ii - centres[:, 0, None, None]) ** 2 + (jj - centres[:, 1, None, None]) ** 2)
                / (2 * widths[:, None, None] ** 2))[..., None].astype(np.float32)
groups = rng.integers(0, 2, 24)

def graph_op_types(fn):
    types = set()
    for cf in fn._list_all_concrete_functions():
        gd = cf.graph.as_graph_def()
        types.update(n.op for n in gd.node)
        for f in gd.library.function:
            types.update(n.op for n in f.node_def)
    return sorted(t for t in types if t.startswith("Dirnet"))

result = {"pid": os.getpid()}
for name, (make, options) in strategies.items():
    strategy = make()
    kwargs = dict(log_every=1, steps_per_execution=10)
    kwargs.update(options)
    trainer = Trainer(
        lambda: dirnet_tf.DIRNet((16, 16), 4, filters=4),
        same_group_pair_sampler(images, groups, BATCH, seed=5),
        os.path.join(logdir, name), steps=STEPS, batch_size=BATCH, learning_rate=float(os.environ["DT_LR"]),
        lr_schedule="constant", strategy=strategy, eval_every=0, checkpoint_every=0,
        seed=1, print_fn=lambda *a: None, config={"strategy": name}, **kwargs)
    initial = [w.tolist() for w in trainer.model.get_weights()]
    calls = []
    step_fn = trainer._make_train_step()
    def counting(iterator, n, step_fn=step_fn, calls=calls):
        calls.append(int(n))
        return step_fn(iterator, n)
    trainer._train_step = counting
    summary = trainer.train()
    result[name] = {
        "initial_weights": initial, "optimizer": type(trainer.optimizer).__name__,
        "replicas": int(strategy.num_replicas_in_sync), "is_chief": bool(trainer.is_chief),
        "last_loss": summary["last_loss"], "step": summary["step"],
        "weights": [w.tolist() for w in trainer.model.get_weights()],
        "dirnet_ops": graph_op_types(step_fn), "calls": calls, "jit_compile": trainer.jit_compile,
    }
with open(out_path, "w") as f:
    json.dump(result, f)
'''


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(TF_CPP_MIN_LOG_LEVEL="2", DT_STEPS=str(STEPS), DT_BATCH=str(GLOBAL_BATCH),
               DT_LR="2.0")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _finish(procs, names):
    """Wait for subprocesses with one shared deadline; kill them all on timeout."""
    deadline = time.monotonic() + TIMEOUT_S
    outputs = {}
    try:
        for proc, name in zip(procs, names):
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs[name] = out
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.communicate()
        pytest.fail(f"distributed training subprocesses did not finish within {TIMEOUT_S} s")
    for proc, name in zip(procs, names):
        assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{outputs[name][-4000:]}"


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "dist_worker.py"
    path.write_text(WORKER_SCRIPT)
    return str(path)


@pytest.fixture(scope="module")
def local_runs(script, tmp_path_factory):
    """Single-device and 2-replica mirrored training in one subprocess."""
    work = tmp_path_factory.mktemp("local")
    out = work / "local.json"
    proc = subprocess.Popen([sys.executable, script, "local", str(out), str(work / "logs")], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _finish([proc], ["local"])
    return json.loads(out.read_text())


def _assert_same_training(a, b, rtol=1e-4, atol=1e-5):
    assert a["step"] == b["step"] == STEPS
    np.testing.assert_allclose(a["last_loss"], b["last_loss"], rtol=rtol, atol=atol)
    assert len(a["weights"]) == len(b["weights"])
    for wa, wb in zip(a["weights"], b["weights"]):
        np.testing.assert_allclose(np.asarray(wa), np.asarray(wb), rtol=rtol, atol=atol)


def test_mirrored_two_logical_cpus_matches_single_device(local_runs):
    single, mirrored = local_runs["single"], local_runs["mirrored"]
    assert single["replicas"] == 1 and mirrored["replicas"] == 2
    # The compiled op (forward and gradient) runs inside the replica context.
    assert {"Dirnet>Resample", "Dirnet>ResampleGrad"} <= set(mirrored["dirnet_ops"])
    assert np.isfinite(single["last_loss"])
    # Same start; training moved the weights (so the comparison below is not trivially true) ...
    for a, b in zip(single["initial_weights"], mirrored["initial_weights"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = max(np.abs(np.asarray(a) - np.asarray(b)).max()
                for a, b in zip(single["initial_weights"], single["weights"]))
    assert moved > 1e-3 and single["optimizer"] == "SGD"
    # ... and two replicas with half the global batch each reach the same weights.
    _assert_same_training(single, mirrored)


def test_mirrored_several_steps_per_call_and_jit_request_match_single_device(local_runs):
    """All steps in one tf.function call across replicas (a wrong per-replica loop or
    reduction inside the multi-step call would change the weights), and --jit_compile with
    two replicas: ignored (XLA cannot compile the cross-replica reduction), same training."""
    single = local_runs["single"]
    multi = local_runs["mirrored_all_steps_in_one_call"]
    assert multi["replicas"] == 2 and multi["calls"] == [STEPS]
    assert local_runs["mirrored"]["calls"] == [1] * STEPS
    # The weights after all steps (last_loss is the mean over the steps of the last call,
    # here all three, so it is not comparable with the one-step-per-call run's).
    assert multi["step"] == STEPS
    for wa, wb in zip(single["weights"], multi["weights"]):
        np.testing.assert_allclose(np.asarray(wa), np.asarray(wb), rtol=1e-4, atol=1e-5)
    jit = local_runs["mirrored_jit"]
    assert jit["replicas"] == 2 and jit["jit_compile"] is False
    # The op itself ran (not its XLA twin), and training matches single-device training.
    assert {"Dirnet>Resample", "Dirnet>ResampleGrad"} <= set(jit["dirnet_ops"])
    _assert_same_training(single, jit)


def test_two_worker_multi_worker_mirrored_run_agrees(script, local_runs, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    logdir = tmp_path / "logs"
    procs, outs = [], []
    for index in range(2):
        out = tmp_path / f"worker{index}.json"
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen([sys.executable, script, "worker", str(out), str(logdir)], cwd=ROOT,
                                      env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        outs.append(out)
    _finish(procs, ["worker 0", "worker 1"])
    w0, w1 = (json.loads(o.read_text()) for o in outs)
    r0, r1 = w0["multi_worker"], w1["multi_worker"]
    assert r0["replicas"] == r1["replicas"] == 2
    assert r0["is_chief"] and not r1["is_chief"]
    assert {"Dirnet>Resample", "Dirnet>ResampleGrad"} <= set(r0["dirnet_ops"])
    # Both workers hold the same model, equal to single-device training on the global batch.
    _assert_same_training(r0, r1, rtol=1e-6, atol=1e-7)
    _assert_same_training(local_runs["single"], r0)
    # Checkpoints: the chief's are kept, the other worker's temporary directory is gone.
    run_dir = logdir / "multi_worker"
    assert glob.glob(str(run_dir / f"ckpt-{STEPS}.index"))
    assert not glob.glob(str(run_dir / ".worker-*"))
    # Summaries come from the chief only (event file names carry the writer's pid).
    events = glob.glob(str(run_dir / "events.out.tfevents.*"))
    assert events, "the chief wrote no TensorBoard events"
    assert all(f".{w1['pid']}." not in os.path.basename(e) for e in events)
    assert any(f".{w0['pid']}." in os.path.basename(e) for e in events)


def test_mixed_precision_dtypes_on_cpu():
    """float16 regressor, float32 B-spline field and resampling; one train step stays close
    to the float32 one from the same weights."""
    import dirnet_tf

    rng = np.random.default_rng(0)
    ii, jj = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    c = rng.uniform(6, 10, (8, 2))
    images = np.exp(-((ii - c[:, 0, None, None]) ** 2 + (jj - c[:, 1, None, None]) ** 2) / 8.0)
    images = images[..., None].astype(np.float32)
    batch = {"fixed": tf.constant(images[:4]), "moving": tf.constant(images[4:])}

    keras.utils.set_random_seed(0)  # the initial weights, whatever ran before in this process
    policy = keras.mixed_precision.dtype_policy()
    try:
        keras.mixed_precision.set_dtype_policy("mixed_float16")
        mixed = dirnet_tf.DIRNet((16, 16), 4, filters=4)  # DIRNet keeps its geometry in float32 itself
    finally:
        keras.mixed_precision.set_dtype_policy(policy)
    plain = dirnet_tf.DIRNet((16, 16), 4, filters=4)
    # Random weights everywhere (the regressor's last layer starts at zero = identity).
    wrng = np.random.default_rng(1)
    weights = [w + wrng.normal(0.0, 0.1, w.shape).astype(w.dtype) for w in mixed.get_weights()]
    mixed.set_weights(weights)
    plain.set_weights(weights)

    assert mixed.regressor.compute_dtype == "float16"
    assert mixed.transformer.compute_dtype == "float32" and mixed.resampler.compute_dtype == "float32"
    assert all(v.dtype == "float32" for v in mixed.trainable_variables)

    @tf.function
    def forward(model):
        return model(batch, training=False)

    out = forward(mixed)
    assert out["displacement"].dtype == tf.float32 and out["warped"].dtype == tf.float32
    graph = forward.get_concrete_function(mixed).graph
    # The convolutions run in float16 ...
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    assert convs and any(op.outputs[0].dtype == tf.float16 for op in convs)
    # ... the compiled resampler in float32.
    resample_nodes = [op for op in graph.get_operations() if op.type == "Dirnet>Resample"]
    assert resample_nodes and all(op.outputs[0].dtype == tf.float32 for op in resample_nodes)
    ref = plain(batch, training=False)
    assert np.abs(ref["displacement"].numpy()).max() > 0.1  # a real deformation
    np.testing.assert_allclose(out["displacement"].numpy(), ref["displacement"].numpy(), atol=5e-3)
    np.testing.assert_allclose(out["warped"].numpy(), ref["warped"].numpy(), atol=5e-3)

    # Gradients through the loss-scaled float16 path match the float32 ones.
    loss_fn = lambda batch, outputs: plain.objective(batch["fixed"], outputs)  # noqa: E731
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0))

    def grads(model, scale):
        with tf.GradientTape() as tape:
            per_pair, _ = loss_fn(batch, model(batch, training=True))
            loss = tf.reduce_mean(per_pair)
            scaled = opt.scale_loss(loss) if scale else loss
        g = tape.gradient(scaled, model.trainable_variables)
        factor = 1.0 / float(opt.dynamic_scale) if scale else 1.0
        return float(loss), [x.numpy() * factor for x in g]

    opt.build(mixed.trainable_variables)
    loss16, g16 = grads(mixed, True)
    loss32, g32 = grads(plain, False)
    assert abs(loss16 - loss32) < 5e-3
    assert all(np.all(np.isfinite(g)) and g.dtype == np.float32 for g in g16)
    flat16 = np.concatenate([g.ravel() for g in g16])
    flat32 = np.concatenate([g.ravel() for g in g32])
    cos = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
    assert cos > 0.99, f"float16 gradients point elsewhere (cosine {cos:.4f})"

