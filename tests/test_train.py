"""End-to-end tests of the trainer on the real model and the real sparse_events pipeline.

One tiny data set (sparse_events "tiny": 12 train / 6 test videos of 12-24 frames, 32 px)
is built once per session; the demo config is shrunk (ResNet-18 of width 8, 16 px crops,
16 frames, K=4, 4 steps). A persistent compilation cache shared by the runs of this module
keeps repeated runs of the same program (resume, eval-only) cheap.
"""

import functools
import json
import math
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from fva_jax import checkpoints, config_lib, distributed, optim, steps, train
from fva_jax.data import pipeline
from fva_jax.models.full_video import FullVideoModel

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4

# Overrides of configs/demo.py for tests, as `--config.<field>=<value>` flags or in-process.
TINY = {
    "fast_compile": True,  # XLA optimisation level 0: ~3x faster compiles of the tiny steps
    "data.builder_config": "tiny",
    "data.max_frames": 16,
    "data.resize_short": 32,
    "data.crop_size": 16,
    "data.shuffle_buffer": 16,
    "model.width": 8,
    "model.num_clusters": 4,
    "model.chunk_size": 8,
    "train.batch_size": 4,
    "train.num_train_steps": STEPS,
    # 12 train videos / batch 4 = 3 steps per epoch: the first step samples uniformly.
    "train.uniform_warmup_epochs": 1 / 3,
    "train.log_every_steps": 1,
    "schedule.warmup_epochs": 0.0,
    "checkpoint.every_steps": 2,
    "eval.batch_size": 4,
    "eval.also_uniform": True,
    "eval.num_timeline_videos": 2,
}


def tiny_config(data_dir: str, **extra) -> ml_collections.ConfigDict:
    config = config_lib.load_config_file(REPO / "configs" / "demo.py")
    for field, value in {**TINY, "data.data_dir": data_dir, **extra}.items():
        *groups, name = field.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[name] = value
    return config


def flags_for(data_dir: str, **extra) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**TINY, "data.data_dir": data_dir, **extra}.items()]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """sparse_events/tiny built once for the session."""
    path = str(tmp_path_factory.mktemp("tfds"))
    config = tiny_config(path)
    info = pipeline.dataset_info(config.data)  # builds it
    assert info["num_examples"] == {"train": 12, "test": 6}
    return path


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module (and its subprocesses), removed after."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    old = {
        k: getattr(jax.config, k)
        for k in (
            "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes",
        )
    }
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()  # the cache may have been initialised (off) by earlier tests
    yield path
    jax.config.update("jax_compilation_cache_dir", None)
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def full_run(data_dir, compile_cache, tmp_path_factory):
    """An uninterrupted run of the tiny config: (config, workdir, returned metrics)."""
    del compile_cache
    workdir = tmp_path_factory.mktemp("full_run")
    config = tiny_config(data_dir)
    return config, workdir, train.train_and_evaluate(config, str(workdir))


def restore_state(workdir, step: int) -> dict:
    """The raw train state dict of a checkpoint (numpy arrays), read without the trainer."""
    return ocp.StandardCheckpointer().restore(
        pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    )


def reference_eval(config, variables, sampling: str) -> dict:
    """Eval metrics computed the plain way: one video batch at a time, NumPy reductions."""
    info = pipeline.dataset_info(config.data)
    model = FullVideoModel(
        num_classes=info["num_classes"],
        **{**config.model.to_dict(), "dtype": jnp.float32, "sampling": sampling},
    )
    apply = jax.jit(
        functools.partial(model.apply, train=False),
        compiler_options={"xla_backend_optimization_level": 0},
    )
    losses, top1, top5, labels = [], [], [], []
    for batch in pipeline.eval_iterator(config.data, batch_size=2):
        logits, _ = apply(variables, batch["video"], batch["mask"])
        logits = np.asarray(logits, np.float64)
        keep = batch["batch_mask"]
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
            - logits.max(1, keepdims=True)
        )
        y = batch["label"]
        rank = (logits > logits[np.arange(len(y)), y][:, None]).sum(1)
        losses += list(-logp[np.arange(len(y)), y][keep])
        top1 += list((rank < 1)[keep])
        top5 += list((rank < 5)[keep])
        labels += list(y[keep])
    labels, top1 = np.array(labels), np.array(top1, float)
    per_class = [
        top1[labels == c].mean() for c in range(info["num_classes"]) if (labels == c).any()
    ]
    return {
        "loss": np.mean(losses),
        "top1": top1.mean(),
        "top5": np.mean(top5),
        "mean_class_accuracy": np.mean(per_class),
        "num_examples": len(labels),
    }


# Without the uniform-sampling warm-up and evaluation: fewer programs to compile.
CLUSTER_ONLY = {"train.uniform_warmup_epochs": 0.0, "eval.also_uniform": False}

# ----------------------------------------------------------------------------- one run


def test_run_trains_evaluates_and_writes_results(full_run):
    config, workdir, final = full_run
    on_disk = json.loads((workdir / "final_metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(final))
    assert final["step"] == STEPS
    # Cosine schedule without warm-up: the last step (t = 3 of 4) used this learning rate.
    lr = config.schedule.base_lr * 0.5 * (1 + math.cos(math.pi * (STEPS - 1) / STEPS))
    assert final["train"]["learning_rate"] == pytest.approx(lr, rel=1e-6)
    assert math.isfinite(final["train"]["loss"]) and final["train"]["grad_norm"] > 0
    for mode in ("eval", "eval_uniform"):
        assert final[mode]["num_examples"] == 6  # every test video exactly once, padding ignored
        assert set(final[mode]["per_class_accuracy"]) == {
            "red_square",
            "green_disc",
            "blue_triangle",
            "yellow_cross",
        }
    # Checkpoints every 2 steps and at the end; TensorBoard events from process 0.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert list(workdir.glob("events.out.tfevents.*"))
    # Training changed the parameters, and the step counter matches.
    state = restore_state(workdir, STEPS)
    assert int(state["step"]) == STEPS
    assert float(np.abs(np.asarray(state["params"]["trunk"]["fc"]["kernel"])).sum()) > 0


def test_eval_metrics_match_plain_computation(full_run):
    config, workdir, final = full_run
    state = restore_state(workdir, STEPS)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    for mode, sampling in (("eval", "cluster"), ("eval_uniform", "uniform")):
        ref = reference_eval(config, variables, sampling)
        assert final[mode]["num_examples"] == ref["num_examples"]
        for key in ("loss", "top1", "top5", "mean_class_accuracy"):
            assert final[mode][key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (mode, key)


def test_evaluate_mode_reproduces_final_eval(full_run):
    config, workdir, final = full_run
    result = train.evaluate(config, str(workdir))
    assert result["step"] == STEPS
    assert result["eval"] == final["eval"] and result["eval_uniform"] == final["eval_uniform"]
    assert json.loads((workdir / "eval_metrics.json").read_text())["eval"] == final["eval"]


class _Killed(Exception):
    pass


def test_resume_after_kill_gives_identical_metrics(full_run, tmp_path):
    config, full_workdir, final = full_run

    def kill_at_step_3(step):  # after the checkpoint at step 2, before the next one
        if step == 3:
            raise _Killed()

    with pytest.raises(_Killed):
        train.train_and_evaluate(config, str(tmp_path), on_step=kill_at_step_3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    assert not (tmp_path / "final_metrics.json").exists()

    resumed = train.train_and_evaluate(config, str(tmp_path))
    assert resumed == final  # exactly, not approximately
    a, b = restore_state(full_workdir, STEPS), restore_state(tmp_path, STEPS)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_evaluation_during_training_does_not_change_training(full_run, tmp_path):
    config, _, final = full_run
    config = tiny_config(config.data.data_dir, **{"eval.every_steps": 2})
    assert train.train_and_evaluate(config, str(tmp_path)) == final


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, compile_cache, tmp_path):
    del compile_cache
    # A huge learning rate without clipping overflows the weights after the first update.
    config = tiny_config(
        data_dir,
        **{
            "schedule.base_lr": 1e30,
            "optim.grad_clip_norm": 0.0,
            "checkpoint.every_steps": 1,
            **CLUSTER_ONLY,
        },
    )
    with pytest.raises(
        FloatingPointError,
        match=r"training loss is (nan|inf|-inf) at step 2; "
        r"stopping \(the last good checkpoint is step 1",
    ):
        train.train_and_evaluate(config, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    state = restore_state(tmp_path, 1)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


# ----------------------------------------------------------------------------- optimizer


def _toy_params():
    rng = np.random.default_rng(0)
    return {
        "stem": {
            "conv1": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
            "bn1": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        },
        "trunk": {
            "fc": {
                "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
            }
        },
    }


def test_sgd_matches_pytorch_recipe():
    """Clip by global norm, coupled weight decay on kernels only, momentum, lr x5 / x10 on fc."""
    config = config_lib.default_config()
    config.optim.grad_clip_norm = 1.0
    params = _toy_params()
    schedule = lambda step: 0.1 / (1.0 + step)  # pylint: disable=unnecessary-lambda-assignment
    tx = optim.make_optimizer(config, params, schedule)
    opt_state = tx.init(params)
    rng = np.random.default_rng(1)
    ref = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    buf = jax.tree.map(np.zeros_like, ref)
    mults = {
        "stem": {"conv1": {"kernel": 1}, "bn1": {"scale": 1, "bias": 1}},
        "trunk": {"fc": {"kernel": 5, "bias": 10}},
    }
    for step in range(3):
        grads = jax.tree.map(
            lambda p: jnp.asarray(rng.normal(size=p.shape) * 3, jnp.float32), params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Plain reference, as torch.nn.utils.clip_grad_norm_ + torch.optim.SGD per param group.
        g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
        norm = math.sqrt(sum(float((x**2).sum()) for x in jax.tree.leaves(g)))
        g = jax.tree.map(lambda x: x * min(1.0, 1.0 / norm), g)
        g = jax.tree.map(lambda x, p: x + 5e-4 * p * (p.ndim > 1), g, ref)
        buf = jax.tree.map(lambda b, x: 0.9 * b + x, buf, g)
        ref = jax.tree.map(lambda p, b, m: p - schedule(step) * m * b, ref, buf, mults)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref
        )


def test_classifier_name_must_match_a_module():
    config = config_lib.default_config()
    config.optim.classifier_name = "head"
    with pytest.raises(ValueError, match=r"config.optim.classifier_name='head' matches no module"):
        optim.make_optimizer(config, _toy_params(), optax.constant_schedule(0.1))


def test_schedules():
    config = config_lib.default_config()
    config.schedule.base_lr = 0.4
    config.schedule.warmup_epochs = 1.0
    sched = optim.make_schedule(config, total_steps=50, steps_per_epoch=10)
    assert [float(sched(s)) for s in (0, 5, 10)] == pytest.approx([0.0, 0.2, 0.4])
    assert float(sched(30)) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    config.schedule.name = "step"
    config.schedule.step_epochs = (2.0, 4.0)
    sched = optim.make_schedule(config, total_steps=50, steps_per_epoch=10)
    assert [float(sched(s)) for s in (15, 19, 21, 39, 41)] == pytest.approx(
        [0.4, 0.4, 0.04, 0.04, 0.004]
    )


# ----------------------------------------------------------------------------- devices, hosts


def _run_main(args, env_extra, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "fva_jax.main", "--config=configs/demo.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _final_metrics_from_log(log: str) -> dict:
    found = re.findall(r"FINAL_METRICS (\{.*\})", log)
    assert found, log[-3000:]
    return json.loads(found[-1])


def test_four_devices_give_the_same_result_as_one(full_run, data_dir, compile_cache, tmp_path):
    """The same global batches on 4 fake CPU devices (batch sharded 1 per device) through
    main.py: same training losses and evaluation as the in-process 1-device run."""
    _, _, final = full_run
    proc = _run_main(
        [f"--workdir={tmp_path}", *flags_for(data_dir)],
        {
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_COMPILATION_CACHE_DIR": compile_cache,
        },
    )
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert "4 local / 4 global devices" in log
    four = json.loads((tmp_path / "final_metrics.json").read_text())
    assert four == _final_metrics_from_log(log)
    assert four["step"] == final["step"]
    for mode in ("train", "eval", "eval_uniform"):
        for key, value in final[mode].items():
            if key != "per_class_accuracy":
                assert four[mode][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (mode, key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_together_and_agree(data_dir, compile_cache, tmp_path):
    """jax.distributed on localhost (CPU, gloo): 2 processes x 1 device, batch 4 = 2 per host."""
    port = _free_port()
    procs = [
        _run_main(
            [
                f"--workdir={tmp_path}",
                *flags_for(data_dir, **{"train.num_train_steps": 2, **CLUSTER_ONLY}),
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ],
            {"JAX_COMPILATION_CACHE_DIR": compile_cache},
        )
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        finally:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert "process 0 of 2" in logs[0] and "process 1 of 2" in logs[1]
    assert "1 local / 2 global devices" in logs[0]
    results = [_final_metrics_from_log(log) for log in logs]
    assert results[0] == results[1]
    assert results[0] == json.loads((tmp_path / "final_metrics.json").read_text())
    assert results[0]["step"] == 2 and math.isfinite(results[0]["train"]["loss"])
    assert results[0]["eval"]["num_examples"] == 6  # each test video once across both hosts
    # One checkpoint holding both hosts' data-iterator states.
    data_state = json.loads((tmp_path / "checkpoints" / "2" / "data" / "metadata").read_text())
    assert data_state["process_count"] == 2 and len(data_state["states"]) == 2


@pytest.mark.parametrize(
    "env, multi_host",
    [
        ({}, False),
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "4"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0"}, False),
        ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, True),
    ],
)
def test_multi_host_detection(monkeypatch, env, multi_host):
    for var in (
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "JAX_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.multi_host_environment() is multi_host
    # Single process and "auto": jax.distributed stays off (it is not initialised here).
    if not multi_host:
        assert distributed.initialize_distributed(config_lib.default_config().distributed) is False


# ----------------------------------------------------------------------------- init_from


def _write_random_pretrained(config, out_dir, seed: int) -> dict:
    """A ResNet-18 of the config's width, randomly initialised (another seed), written in
    fva_jax.import_weights' format (no stem/trunk level, random BatchNorm statistics).
    Returns the flat {"params/conv1/kernel": array, ...} it wrote."""
    from flax import traverse_util

    from fva_jax import import_weights

    model = FullVideoModel(num_classes=4, **steps.model_kwargs(config))
    frames = config.model.chunk_size
    variables = model.init(
        jax.random.PRNGKey(seed),
        jnp.zeros((1, frames, config.data.crop_size, config.data.crop_size, 3), jnp.uint8),
        jnp.ones((1, frames), bool),
        train=False,
    )
    rng = np.random.default_rng(seed)
    tree = {}
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(jax.device_get(variables[collection]))
        # Drop the stem/trunk level; random non-trivial values everywhere (also BN statistics).
        tree[collection] = traverse_util.unflatten_dict(
            {
                k[1:]: (
                    rng.uniform(0.5, 1.5, v.shape) if k[-1] == "var" else rng.normal(size=v.shape)
                ).astype(np.float32)
                for k, v in flat.items()
            }
        )
    import_weights.save_pretrained(tree, out_dir, arch="resnet18", source="test")
    return tree


def test_init_from_loads_weights_before_training_not_on_resume(full_run, tmp_path, monkeypatch):
    from flax import traverse_util

    config, full_workdir, final = full_run
    pretrained = _write_random_pretrained(config, tmp_path / "weights", seed=7)
    config = tiny_config(config.data.data_dir, **{"train.init_from": str(tmp_path / "weights")})
    loaded = []
    original = train.load_pretrained

    def recording(run, state):
        new = original(run, state)
        loaded.append(jax.device_get((new.params, new.batch_stats, new.opt_state)))
        return new

    monkeypatch.setattr(train, "load_pretrained", recording)

    def stop_after_first_step(step):
        raise _Killed()

    with pytest.raises(_Killed):
        train.train_and_evaluate(config, str(tmp_path / "fresh"), on_step=stop_after_first_step)
    assert len(loaded) == 1
    params, batch_stats, opt_state = loaded[0]
    for collection, tree in (("params", params), ("batch_stats", batch_stats)):
        for path, value in traverse_util.flatten_dict(tree).items():
            # Every model variable (also the fc: same 4 classes) comes from the file.
            np.testing.assert_array_equal(
                value,
                traverse_util.flatten_dict(pretrained[collection])[path[1:]],
                err_msg=f"{collection}/{'/'.join(path)}",
            )
    # The momentum buffers start at zero for the new weights.
    assert all(
        not np.asarray(x).any()
        for x in jax.tree.leaves(opt_state)
        if np.asarray(x).dtype == np.float32
    )

    # A finished (or resumed) run keeps its checkpoint: init_from is not applied again.
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(full_workdir, resumed)
    assert train.train_and_evaluate(config, str(resumed)) == final
    assert len(loaded) == 1


def test_init_from_errors_name_the_problem(data_dir, tmp_path):
    config = tiny_config(data_dir, **{"train.init_from": str(tmp_path / "nowhere")})
    with pytest.raises(Exception, match="nowhere"):
        train.train_and_evaluate(config, str(tmp_path / "w"))


# ----------------------------------------------------------------------------- timelines


def _read_images(workdir) -> dict[tuple[str, int], np.ndarray]:
    """{(tag, step): uint8 (H, W, 3)} of every image summary in the workdir's event files."""
    import tensorflow as tf

    images = {}
    for f in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    data = tf.make_ndarray(value.tensor)  # [width, height, png, ...]
                    images[(value.tag, event.step)] = tf.io.decode_png(data[2], channels=3).numpy()
    return images


def test_cluster_timelines_written_to_tensorboard(full_run):
    from fva_jax import visualize

    config, workdir, _ = full_run
    images = _read_images(workdir)
    assert sorted(images) == [("clusters/video0", STEPS), ("clusters/video1", STEPS)]
    # The same pictures drawn the plain way: the first eval batch through the checkpoint's model.
    state = restore_state(workdir, STEPS)
    info = pipeline.dataset_info(config.data)
    model = FullVideoModel(num_classes=info["num_classes"], **steps.model_kwargs(config))
    batch = next(iter(pipeline.eval_iterator(config.data, batch_size=config.eval.batch_size)))
    logits, seg = model.apply(
        {"params": state["params"], "batch_stats": state["batch_stats"]},
        batch["video"],
        batch["mask"],
        train=False,
    )
    names = info["class_names"]
    for i in range(2):
        n = int(batch["mask"][i].sum())
        title = (
            f"eval video {i}: {n} frames, label {names[batch['label'][i]]}, predicted "
            f"{names[int(np.argmax(logits[i]))]} (step {STEPS})"
        )
        expected = visualize.render_timeline(
            batch["video"][i, :n],
            None,
            np.asarray(seg[i, :n]),
            num_clusters=config.model.num_clusters,
            title=title,
            width=1000,
        )
        got = images[(f"clusters/video{i}", STEPS)]
        assert got.shape == expected.shape and got.shape[1] == 1000
        np.testing.assert_array_equal(got, expected)


def test_no_timelines_when_disabled(data_dir, compile_cache, tmp_path):
    del compile_cache
    config = tiny_config(
        data_dir, **{"eval.num_timeline_videos": 0, "train.num_train_steps": 1, **CLUSTER_ONLY}
    )
    train.train_and_evaluate(config, str(tmp_path))
    assert not _read_images(tmp_path)


# ----------------------------------------------------------------------------- predict


def test_eval_preprocess_matches_tf_pipeline():
    """predict's NumPy/JAX evaluation crop == pipeline.preprocess(train=False) on the same
    frames (non-square, so the crop and the antialiased resize both matter). JPEGs without
    chroma subsampling, decoded by TensorFlow for both: JPEG decoders differ by a few levels
    (PIL vs TF, and TF's cropped vs full decode with subsampled chroma), which is not what is
    tested here."""
    import tensorflow as tf

    from fva_jax import predict

    rng = np.random.default_rng(0)
    frames = (rng.uniform(0, 255, (5, 1, 1, 3)) + rng.normal(0, 40, (5, 48, 64, 3))).clip(0, 255)
    jpegs = [
        tf.io.encode_jpeg(f, quality=100, chroma_downsampling=False).numpy()
        for f in frames.astype(np.uint8)
    ]
    decoded = np.stack([tf.io.decode_jpeg(j, channels=3).numpy() for j in jpegs])
    for resize_short, crop, stride, cap in (
        (32, 16, 1, 16),
        (40, 40, 2, 2),
        (30, 30, 1, 16),
        (256, 224, 1, 16),
    ):
        cfg = ml_collections.ConfigDict(
            dict(
                frame_stride=stride,
                max_frames=cap,
                resize_short=resize_short,
                crop_size=crop,
                crop_scales=(1.0,),
                hflip=False,
            )
        )
        want = pipeline.preprocess(
            {"video": tf.constant(jpegs), "label": tf.constant(0)}, cfg, train=False
        )
        n = int(want["mask"].numpy().sum())
        got = predict.eval_preprocess(decoded[::stride][:cap], cfg)
        assert got.shape == (n, crop, crop, 3), (resize_short, crop)
        diff = np.abs(got.astype(int) - want["video"].numpy()[:n].astype(int))
        assert diff.max() <= 1, (resize_short, crop, diff.max())


def _sparse_events_mp4(path, frames: int = 20):
    """A sparse_events test video (32 px, `frames` frames) written as an mp4 with PyAV."""
    from fva_jax.data import sparse_events
    from fva_jax.data import video as video_lib

    spec = sparse_events.SparseEventsSpec(
        num_classes=4, min_frames=frames, max_frames=frames, size=32, num_train=1, num_test=1
    )
    example = sparse_events.make_video(spec, "test", 0)
    return video_lib.encode_video(path, example["video"], fps=10)


def _parse_predict_output(text: str):
    """{path: (probabilities {class: p}, segments [(id, first, last, size)])} of predict's
    output."""
    out, current = {}, None
    for line in text.splitlines():
        if m := re.fullmatch(r"(\S+): (\d+) of \d+ frames", line):
            current = out.setdefault(m.group(1), ({}, []))
        elif m := re.fullmatch(r"  (\d\.\d{4})  (\S+)", line):
            current[0][m.group(2)] = float(m.group(1))
        elif m := re.fullmatch(r"    #(\d+): (\d+)-(\d+) \((\d+)\)", line):
            current[1].append(tuple(int(g) for g in m.groups()))
    return out


def test_predict_prints_the_models_probabilities_and_segments(full_run, tmp_path, capsys):
    from fva_jax import predict
    from fva_jax.data import video as video_lib

    config, workdir, _ = full_run
    paths = [_sparse_events_mp4(tmp_path / "a.mp4", 20), _sparse_events_mp4(tmp_path / "b.mp4", 9)]
    predict.main([f"--workdir={workdir}", *map(str, paths)])
    printed = _parse_predict_output(capsys.readouterr().out)
    assert sorted(printed) == sorted(map(str, paths))

    # The plain computation: decode, centre crop (resize_short 32 = the stored size, so the
    # crop is the centre 16 px), every frame unpadded, the checkpoint's model in eval mode.
    state = restore_state(workdir, STEPS)
    info = pipeline.dataset_info(config.data)
    model = FullVideoModel(num_classes=info["num_classes"], **steps.model_kwargs(config))
    for path in paths:
        frames = video_lib.decode_video(path)[:, 8:24, 8:24]
        n = len(frames)
        logits, seg = model.apply(
            {"params": state["params"], "batch_stats": state["batch_stats"]},
            frames[None],
            np.ones((1, n), bool),
            train=False,
        )
        z = np.asarray(logits[0], np.float64)
        probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        probabilities, segments = printed[str(path)]
        assert len(probabilities) == min(5, info["num_classes"])
        for name, p in probabilities.items():
            assert p == pytest.approx(probs[info["class_names"].index(name)], abs=6e-5), name
        # The highest first.
        assert list(probabilities.values()) == sorted(probabilities.values(), reverse=True)
        seg = np.asarray(seg[0, :n])
        assert segments == [
            (
                k,
                int(np.flatnonzero(seg == k)[0]),
                int(np.flatnonzero(seg == k)[-1]),
                int((seg == k).sum()),
            )
            for k in np.unique(seg)
        ]
        assert sum(s[3] for s in segments) == n


def test_predict_errors_name_the_workdir_and_the_video(full_run, tmp_path):
    from fva_jax import predict

    _, workdir, _ = full_run
    with pytest.raises(SystemExit, match=f"{tmp_path}.*not a training workdir"):
        predict.main([f"--workdir={tmp_path}", "x.mp4"])
    # A workdir with its config but without checkpoints.
    import shutil

    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    for name in (checkpoints.CONFIG_FILE, checkpoints.DATASET_INFO_FILE):
        shutil.copy(workdir / name, empty / name)
    with pytest.raises(SystemExit, match="no checkpoints in .*no_ckpt/checkpoints"):
        predict.main([f"--workdir={empty}", "x.mp4"])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(SystemExit, match="broken.mp4"):
        predict.main([f"--workdir={workdir}", str(broken)])
