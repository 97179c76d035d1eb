"""End-to-end tests of the trainer on the real model and the real data pipeline
(fva_jax.data.pipeline) over the generated sparse_events sets, built once for this module:
"tiny" (12 train / 6 test videos of 14-24 frames, 32 px, 4 classes) for most runs and
"long_tiny" (16 / 8 videos of 13-246 frames) where widely varying lengths matter.

The demo config is shrunk (ResNet-18 of width 8, K=4, chunks of 8 frames, 32 frames per
device, at most 2 length buckets, the centre 16 px of the stored 32 px frames at test):
one sampled-frame warm-up epoch (3 steps of 4 videos) then one full-video epoch (10 steps:
2 of 2 videos in the 16-frame bucket, 8 of one video in the 24-frame bucket). The runs read
through tests/recorded_pipeline.py (the pipeline itself, recording which videos each step
held). A persistent compilation cache shared by the runs of this module keeps repeated runs
of the same programs (resume, eval-only, other processes) cheap.
"""

import collections
import functools
import io
import json
import math
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import types

import flax.linen
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import recorded_pipeline
from jax.experimental.compilation_cache import compilation_cache

from fva_jax import config_lib
from fva_jax.data import batch_plan, builders, frames, pipeline
from fva_jax.data import records as records_lib
from fva_jax.models.full_video import FullVideoModel
from fva_jax.training import (
    checkpoints,
    distributed,
    epochs,
    evaluation,
    experiment,
    faults,
    optim,
    steps,
    train,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLED_STEPS, FULL_STEPS = 3, 10
STEPS = SAMPLED_STEPS + FULL_STEPS
NUM_TRAIN, NUM_TEST = 12, 6  # sparse_events "tiny"

# Overrides of configs/demo.py for tests, as `--config.<field>=<value>` flags or in-process
# (data.data_dir is added: the module's data sets).
TINY = {
    "fast_compile": True,  # XLA optimisation level 0: ~3x faster compiles of the tiny steps
    "data.builder_config": "tiny",
    "data.resize_short": 32,  # = the stored frames' size: the test crop is their centre 16 px
    "data.crop_size": 16,
    "data.frames_per_device": 32,
    "data.max_buckets": 2,
    "data.num_workers": 0,  # steps read in this process (one test reads with a Grain worker)
    "model.width": 8,
    "model.num_clusters": 4,
    "model.chunk_size": 8,
    "train.batch_size": 4,
    "train.num_epochs": 2.0,
    "train.uniform_warmup_epochs": 1,
    "train.log_every_steps": 1,
    "schedule.warmup_epochs": 0.0,
    "checkpoint.every_steps": 4,
    "checkpoint.keep": 4,  # every checkpoint of the run (the resume tests restart from step 4)
    "eval.batch_size": 4,
    "eval.also_uniform": True,
    "eval.num_timeline_videos": 2,
}

# Without the sampled-frame warm-up and evaluation: fewer programs to compile.
CLUSTER_ONLY = {"train.uniform_warmup_epochs": 0, "eval.also_uniform": False}


def _overrides(data_dir, extra) -> dict:
    return {**TINY, "data.data_dir": str(data_dir or ""), **extra}


def tiny_config(data_dir=None, **extra) -> ml_collections.ConfigDict:
    config = config_lib.load_config_file(REPO / "configs" / "demo.py")
    for field, value in _overrides(data_dir, extra).items():
        *groups, name = field.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[name] = value
    return config


def flags_for(data_dir, **extra) -> list[str]:
    return [f"--config.{k}={v}" for k, v in _overrides(data_dir, extra).items()]


def train_run(config, workdir, **kwargs) -> dict:
    return train.train_and_evaluate(config, str(workdir), data=recorded_pipeline, **kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """sparse_events "tiny" and "long_tiny", built in this test session (building may import
    TensorFlow; training must not)."""
    path = tmp_path_factory.mktemp("tfds")
    for name in ("tiny", "long_tiny"):
        builders.prepare(builders.get_builder("sparse_events", name, str(path)))
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
    """An uninterrupted run of the tiny config: (config, workdir, returned metrics, the
    recorded data steps of the run)."""
    del compile_cache
    workdir = tmp_path_factory.mktemp("full_run")
    config = tiny_config(data_dir)
    recorded_pipeline.STEP_LOG.clear()
    final = train_run(config, workdir)
    return config, workdir, final, list(recorded_pipeline.STEP_LOG)


def restore_state(workdir, step: int) -> dict:
    """The raw train state dict of a checkpoint (numpy arrays), read without the trainer."""
    return ocp.StandardCheckpointer().restore(
        pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    )


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir())


def split_videos(config, split: str) -> list[dict]:
    """Every video of a split as TFDS's own data source reads it (frames decoded by TFDS,
    not by the pipeline), in the data source's order (the pipeline's video indices):
    [dict(frames uint8 (T, 32, 32, 3), label)]."""
    builder = builders.get_builder(
        "sparse_events", config.data.builder_config, config.data.data_dir
    )
    return [
        {"frames": np.stack(ex["video"]), "label": int(ex["label"])}
        for ex in builder.as_data_source(split)
    ]


def plain_apply(config, sampling: str | None = None):
    """(variables, video, mask) -> (logits, segment ids) of the config's model in eval mode
    (with `sampling` instead of the config's), jitted at XLA optimisation level 0 (the module's
    compilation cache makes repeated shapes cheap; op by op, a call takes tens of seconds)."""
    model = FullVideoModel(
        num_classes=pipeline.dataset_info(config.data)["num_classes"],
        **steps.model_kwargs(config, sampling=sampling or config.model.sampling),
    )
    return jax.jit(
        functools.partial(model.apply, train=False),
        compiler_options={"xla_backend_optimization_level": 0},
    )


def reference_eval(config, variables, mode: str) -> dict:
    """Eval metrics computed the plain way: one test video at a time, read by TFDS, its centre
    16 px (data.resize_short = the stored 32 px: no resize), whole (padded to its own chunk
    multiple) with the clustered model, or its K TSN-centre frames with the uniform model;
    NumPy reductions."""
    assert (config.data.resize_short, config.data.crop_size) == (32, 16)
    info = pipeline.dataset_info(config.data)
    apply = plain_apply(config, "uniform" if mode == "sampled" else config.model.sampling)
    logits, labels = [], []
    chunk, k = config.model.chunk_size, config.model.num_clusters
    for video in split_videos(config, config.data.eval_split):
        frames = video["frames"][:, 8:24, 8:24]
        if mode == "sampled":  # the centre frame of each of K equal segments
            frames = frames[(2 * np.arange(k) + 1) * len(frames) // (2 * k)]
        padded = -(-len(frames) // chunk) * chunk if mode == "full" else len(frames)
        batch = np.zeros((1, padded) + frames.shape[1:], np.uint8)
        batch[0, : len(frames)] = frames
        out, _ = apply(variables, batch, np.arange(padded)[None] < len(frames))
        logits.append(np.asarray(out[0], np.float64))
        labels.append(video["label"])
    logits, y = np.stack(logits), np.array(labels)
    top = logits.max(1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    # The rule of steps.topk_correct: finite logits; rivals are the other classes >= the label.
    label_logit = logits[np.arange(len(y)), y][:, None]
    rank = np.where(np.isfinite(logits).all(1), (logits >= label_logit).sum(1) - 1, 99)
    top1 = (rank < 1).astype(float)
    per_class = [top1[y == c].mean() for c in range(info["num_classes"]) if (y == c).any()]
    return {
        "loss": -logp[np.arange(len(y)), y].mean(),
        "top1": top1.mean(),
        "top5": (rank < 5).mean(),
        "mean_class_accuracy": np.mean(per_class),
        "num_examples": len(y),
    }


def check_recorded_steps(records, data, num_frames=None) -> None:
    """Each recorded row holds its video's label and frames (its whole length, or
    num_frames), empty slots none; `data` is the split's pipeline.TrainData / EvalData."""
    for record in records:
        _, mode, _, _, shape, videos, frames, labels = record
        assert len(videos) == len(frames) == len(labels) == shape[0], record
        for v, n, y in zip(videos, frames, labels):
            if v < 0:
                assert n == 0, record
                continue
            want = num_frames if mode == "sampled" else int(data.lengths[v])
            assert (n, y) == (want, int(data.labels[v])), (record, v)


def read_events(workdir) -> dict[str, dict[int, object]]:
    """{tag: {step: value}} of every event file in workdir, read without TensorFlow: scalars
    as float, images as uint8 (H, W, 3), texts as str."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out = {}
    for f in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                if plugin == "scalars":
                    v = float(tensor_util.make_ndarray(value.tensor))
                elif plugin == "images":
                    png = value.tensor.string_val[2]  # [width, height, png, ...]
                    v = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                elif plugin == "text":
                    v = value.tensor.string_val[0].decode()
                else:
                    v = plugin
                out.setdefault(value.tag, {})[event.step] = v
    return out


# ----------------------------------------------------------------------------- one run


def test_run_trains_evaluates_and_writes_results(full_run):
    config, workdir, final, _ = full_run
    on_disk = json.loads((workdir / "final_metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(final))
    assert final["step"] == STEPS
    # Cosine schedule without warm-up: the last step (t = STEPS - 1) used this learning rate.
    lr = config.schedule.base_lr * 0.5 * (1 + math.cos(math.pi * (STEPS - 1) / STEPS))
    assert final["train"]["learning_rate"] == pytest.approx(lr, rel=1e-5)
    assert math.isfinite(final["train"]["loss"]) and final["train"]["grad_norm"] > 0
    class_names = pipeline.dataset_info(config.data)["class_names"]
    for mode in ("eval", "eval_uniform"):
        assert final[mode]["num_examples"] == NUM_TEST  # every test video once, padding ignored
        assert set(final[mode]["per_class_accuracy"]) == set(class_names)
    # Checkpoints every 4 steps and at the end; TensorBoard events from process 0.
    assert checkpoint_steps(workdir) == [4, 8, 12, STEPS]
    events = read_events(workdir)
    assert sorted(events["train/loss"]) == list(range(1, STEPS + 1))
    assert events["train/learning_rate"][STEPS] == pytest.approx(lr, rel=1e-5)
    assert events["eval/top1"][STEPS] == pytest.approx(final["eval"]["top1"])
    assert events["eval_uniform/top1"][STEPS] == pytest.approx(final["eval_uniform"]["top1"])
    assert "steps_per_sec" in events and "_hparams_/session_start_info" in events
    assert "model.num_clusters | 4" in events["hparams"][0]
    # Training changed the parameters, and the step counter matches.
    state = restore_state(workdir, STEPS)
    assert int(state["step"]) == STEPS
    assert float(np.abs(np.asarray(state["params"]["trunk"]["fc"]["kernel"])).sum()) > 0


def test_epochs_read_every_video_once_in_their_mode(full_run):
    """Epoch 0 sampled (K frames, 4 videos per step), epoch 1 full videos in their length
    buckets (the pipeline's plan); by the batches' own video indices, every training video once
    per epoch, each row holding its video's label and frames, and every test video once per
    evaluation mode."""
    config, _, _, log = full_run
    layout = dict(process_index=0, process_count=1, local_device_count=1)
    train_data = pipeline.TrainData(config, **layout)
    eval_data = pipeline.EvalData(config, **layout)
    train_log = [r for r in log if r[0] == "train"]
    assert [r[1:4] for r in train_log] == [
        *(("sampled", 0, i) for i in range(SAMPLED_STEPS)),
        *(("full", 1, i) for i in range(FULL_STEPS)),
    ]
    for epoch, mode in ((0, "sampled"), (1, "full")):
        seen = [v for r in train_log if r[2] == epoch for v in r[5] if v >= 0]
        assert sorted(seen) == list(range(NUM_TRAIN)), epoch
        shapes = [r[4][:2] for r in train_log if r[2] == epoch]
        assert shapes == train_data.plan(mode, epoch).shapes(), epoch
    assert collections.Counter(r[4][:2] for r in train_log if r[1] == "sampled") == {(4, 4): 3}
    # The 4 videos of <= 16 frames two at a time, the 8 of 17-24 frames one at a time.
    assert collections.Counter(r[4][:2] for r in train_log if r[1] == "full") == {
        (2, 16): 2,
        (1, 24): 8,
    }
    check_recorded_steps(train_log, train_data, num_frames=config.model.num_clusters)
    for mode in ("full", "sampled"):
        eval_log = [r for r in log if r[0] == "test" and r[1] == mode]
        seen = [v for r in eval_log for v in r[5] if v >= 0]
        assert sorted(seen) == list(range(NUM_TEST)), mode
        check_recorded_steps(eval_log, eval_data, num_frames=config.model.num_clusters)


def test_batch_index_stays_on_the_host(data_dir):
    """The pipeline's per-row video index is for the host: global_batch copies the keys the
    steps read to the devices, unchanged, and leaves "index" out."""
    layout = dict(process_index=0, process_count=1, local_device_count=1)
    local = next(iter(pipeline.EvalData(tiny_config(data_dir), **layout).iterator("full")))
    assert local["index"].dtype == np.int32 and local["index"].shape == local["label"].shape
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    run = types.SimpleNamespace(
        batch_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    )
    on_devices = experiment.global_batch(run, local)
    assert "index" not in on_devices
    for key in ("video", "mask", "label", "batch_mask"):
        np.testing.assert_array_equal(np.asarray(on_devices[key]), local[key])


def test_eval_metrics_match_plain_computation(full_run):
    config, workdir, final, _ = full_run
    state = restore_state(workdir, STEPS)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    for name, mode in (("eval", "full"), ("eval_uniform", "sampled")):
        ref = reference_eval(config, variables, mode)
        assert final[name]["num_examples"] == ref["num_examples"]
        for key in ("loss", "top1", "top5", "mean_class_accuracy"):
            assert final[name][key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (name, key)


def test_evaluate_mode_reproduces_final_eval(full_run):
    config, workdir, final, _ = full_run
    result = train.evaluate(config, str(workdir))  # the default data module: the pipeline
    assert result["step"] == STEPS
    assert result["eval"] == final["eval"] and result["eval_uniform"] == final["eval_uniform"]
    assert json.loads((workdir / "eval_metrics.json").read_text())["eval"] == final["eval"]


class _Killed(Exception):
    pass


def test_resume_after_kill_gives_identical_metrics(full_run, tmp_path):
    """Killed after step 6 (the last checkpoint at step 4, inside the full-video epoch) and
    restarted, here reading through a Grain worker process: exactly the uninterrupted run's
    metrics and parameters, the data resumed where the checkpoint was."""
    config, full_workdir, final, _ = full_run

    def kill_at_step_6(step):
        if step == 6:
            raise _Killed()

    with pytest.raises(_Killed):
        train_run(config, tmp_path, on_step=kill_at_step_6)
    assert checkpoint_steps(tmp_path) == [4]
    assert not (tmp_path / "final_metrics.json").exists()
    data_state = json.loads((tmp_path / "checkpoints" / "4" / "data" / "metadata").read_text())
    assert data_state["data_state"] == {"epoch": 1, "step": 1}  # 3 sampled steps + 1 full

    recorded_pipeline.STEP_LOG.clear()
    with_worker = config.copy_and_resolve_references()
    with_worker.data.num_workers = 1
    resumed = train_run(with_worker, tmp_path)
    assert resumed == final  # exactly, not approximately
    train_log = [r for r in recorded_pipeline.STEP_LOG if r[0] == "train"]
    assert [r[1:4] for r in train_log] == [("full", 1, i) for i in range(1, FULL_STEPS)]
    full_log = [r for r in full_run[3] if r[0] == "train" and r[1:3] == ("full", 1)]
    assert train_log == full_log[1:]  # the same videos, frames and labels in the same steps
    a, b = restore_state(full_workdir, STEPS), restore_state(tmp_path, STEPS)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # The worker count may change on resume; config.json keeps the first start's config, the
    # resumed start's is beside it, and the tools read the latest.
    assert json.loads((tmp_path / "config.json").read_text())["data"]["num_workers"] == 0
    resumed_config = json.loads((tmp_path / "config.resumed-4.json").read_text())
    assert resumed_config == json.loads(json.dumps(with_worker.to_dict()))
    assert checkpoints.load_run_config(tmp_path)[0].data.num_workers == 1


def test_evaluation_during_training_does_not_change_training(full_run, tmp_path):
    config, _, final, _ = full_run
    config = tiny_config(config.data.data_dir, **{"eval.every_steps": 4})
    assert train_run(config, tmp_path) == final
    assert sorted(read_events(tmp_path)["eval/top1"]) == [4, 8, 12, STEPS]


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
        faults.NonFiniteError,
        match=r"training stopped at step 2: the loss is (nan|inf|-inf)"
        r".* \(the last good checkpoint is step 1",
    ):
        train_run(config, tmp_path)
    assert checkpoint_steps(tmp_path) == [1]
    state = restore_state(tmp_path, 1)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def copy_run(full_workdir, workdir, last_step: int = STEPS) -> pathlib.Path:
    """A copy of a run's config files and checkpoints up to `last_step` in `workdir`."""
    workdir = pathlib.Path(workdir)
    shutil.copytree(full_workdir / "checkpoints", workdir / "checkpoints")
    for name in (checkpoints.CONFIG_FILE, checkpoints.DATASET_INFO_FILE):
        shutil.copy(full_workdir / name, workdir / name)
    for step in checkpoint_steps(workdir):
        if step > last_step:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    return workdir


def forget_stored_settings(workdir, step: int, fields=None) -> None:
    """Removes the run's settings (or only `fields` of them) from checkpoint `step`'s data
    JSON, as a checkpoint written before they were stored."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "data" / "metadata"
    data = json.loads(path.read_text())
    if fields is None:
        del data["config"], data["total_steps"]
    else:
        for field in fields:
            del data["config"][field]
    path.write_text(json.dumps(data))


@jax.custom_vjp
def _nan_gradient(x):
    return x


_nan_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.full_like(g, jnp.nan),))


class _NanGradientOnFullVideos(FullVideoModel):
    """FullVideoModel whose full-video (clustered) logits are unchanged but whose gradient
    is NaN; the sampled-frame model (sampling="uniform") is untouched."""

    def __call__(self, videos, mask, *, train: bool):
        logits, segment_ids = super().__call__(videos, mask, train=train)
        return (_nan_gradient(logits) if self.sampling == "cluster" else logits), segment_ids


def test_nan_gradient_at_a_save_step_stops_before_saving(data_dir, compile_cache, tmp_path):
    """Step 4, the first full-video step, has a finite loss and a NaN gradient, and is a save
    step: the run stops there naming the step and the gradient norm; checkpoint 2 (finite)
    is the latest; nothing of step 4 is written (no checkpoint, no scalars)."""
    del compile_cache
    config = tiny_config(data_dir, **{"checkpoint.every_steps": 2, "eval.also_uniform": False})
    with pytest.raises(faults.NonFiniteError) as error:
        train_run(config, tmp_path, model_cls=_NanGradientOnFullVideos)
    message = str(error.value)
    assert re.match(
        r"training stopped at step 4: the gradient norm is nan \(the last good checkpoint is "
        rf"step 2 in {re.escape(str(tmp_path))}/checkpoints; nothing of step 4 was saved\)",
        message,
    ), message
    assert "\n" not in message and (error.value.step, error.value.latest_step) == (4, 2)
    assert checkpoint_steps(tmp_path) == [2]
    state = restore_state(tmp_path, 2)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    assert sorted(read_events(tmp_path)["train/loss"]) == [1, 2, 3]


def test_changed_epochs_on_resume_are_rejected(full_run, tmp_path):
    """A checkpoint's data position that does not match its step under the current config
    (here: a longer warm-up) is an error naming the fields, not a silent mismatch; also for a
    checkpoint that does not store the run's settings (check_resume cannot refuse it)."""
    config, full_workdir, _, _ = full_run
    # Resume from step 4: epoch 1 (full videos), data step 1.
    copy_run(full_workdir, tmp_path, last_step=4)
    forget_stored_settings(tmp_path, 4)
    config = tiny_config(
        config.data.data_dir, **{"train.uniform_warmup_epochs": 2, "train.num_epochs": 3.0}
    )
    with pytest.raises(ValueError, match=r"uniform_warmup_epochs.*changed"):
        train_run(config, tmp_path)


class _NoData:
    """A data module that fails when touched: a refused resume opens no data set."""

    def __getattr__(self, name):
        raise AssertionError(f"the data set was opened (data.{name})")


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("seed", 1, "config.seed 0 -> 1"),
        ("data.crop_size", 24, "config.data.crop_size 16 -> 24"),
        ("model.num_clusters", 2, "config.model.num_clusters 4 -> 2"),
        ("train.uniform_warmup_epochs", 2, "config.train.uniform_warmup_epochs 1.0 -> 2.0"),
    ],
)
def test_resume_with_changed_settings_is_refused_before_reading_data(
    full_run, tmp_path, field, value, shown
):
    """A changed field that shapes the data order, the crops or the model stops the run
    before the data set is opened, with one line naming the field and both values, and
    nothing in the workdir changes."""
    config, full_workdir, _, _ = full_run
    workdir = copy_run(full_workdir, tmp_path / "run", last_step=8)
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    changed = tiny_config(config.data.data_dir, **{field: value})
    with pytest.raises(config_lib.ConfigError) as refused:
        train.train_and_evaluate(changed, str(workdir), data=_NoData())
    message = str(refused.value)
    assert "\n" not in message
    assert f"cannot resume checkpoint step 8 in {workdir}/checkpoints: {shown} changed" in message
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_an_evaluation_that_does_not_count_every_video_once_is_not_reported():
    """The metrics must count exactly the split's videos (dataset_info), or nothing is
    reported: a video read twice or left out over the hosts is an error naming both counts."""
    run = types.SimpleNamespace(
        config=tiny_config("unused"), info={"num_examples": {"train": 12, "test": NUM_TEST}}
    )
    evaluation._check_every_video_counted(run, "eval", NUM_TEST)
    for counted in (NUM_TEST - 1, NUM_TEST + 1):
        with pytest.raises(ValueError, match=rf"eval: the metrics count {counted} videos, the "):
            evaluation._check_every_video_counted(run, "eval", counted)


def test_resume_on_another_device_count_is_refused_before_reading_data(full_run, tmp_path):
    """A checkpoint written with another number of devices (the batch plan depends on it) is
    refused before the data set is opened, with one line naming both layouts."""
    config, full_workdir, _, _ = full_run
    workdir = copy_run(full_workdir, tmp_path / "run", last_step=8)
    path = workdir / "checkpoints" / "8" / "data" / "metadata"
    data = json.loads(path.read_text())
    data["device_count"] = jax.device_count() + 1
    path.write_text(json.dumps(data))
    with pytest.raises(config_lib.ConfigError) as refused:
        train.train_and_evaluate(config, str(workdir), data=_NoData())
    message = str(refused.value)
    assert "\n" not in message
    assert (
        f"cannot resume checkpoint step 8 in {workdir}/checkpoints: it was written by 1 "
        f"processes with {jax.device_count() + 1} devices, this run has 1 with "
        f"{jax.device_count()}"
    ) in message


def test_resume_with_changed_seed_exits_2_through_main(full_run, data_dir, tmp_path):
    """fva_jax.main prints the refusal as one line and exits with status 2."""
    _, full_workdir, _, _ = full_run
    workdir = copy_run(full_workdir, tmp_path / "run")
    proc = _run_main([f"--workdir={workdir}", *flags_for(data_dir, seed=7)], {})
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith("fva_jax.main:")]
    assert lines == [
        f"fva_jax.main: config error: cannot resume checkpoint step {STEPS} in "
        f"{workdir}/checkpoints: config.seed 0 -> 7 changed since it was written (a resumed "
        "run must continue the same run; config_lib.RESUMABLE_FIELDS lists what may change). "
        f"Restore them (the run's config: {workdir}/config.json), or use a new --workdir"
    ], log[-3000:]
    assert "Traceback" not in log


def test_resume_length_longer_warns_shorter_refused_unless_finished(full_run, tmp_path):
    """More epochs or steps: allowed with a warning. Fewer: refused, unless the run had
    finished; switching between num_epochs and num_train_steps: refused."""
    config, full_workdir, _, _ = full_run
    data_dir = config.data.data_dir
    finished = copy_run(full_workdir, tmp_path / "finished")
    midway = copy_run(full_workdir, tmp_path / "midway", last_step=4)
    longer = tiny_config(data_dir, **{"train.num_epochs": 3.0})
    shorter = tiny_config(data_dir, **{"train.num_epochs": 1.5})
    for workdir in (finished, midway):
        assert checkpoints.check_resume(config, workdir) == []
        [warning] = checkpoints.check_resume(longer, workdir)
        assert warning.startswith("config.train.num_epochs 2.0 -> 3.0: training longer")
        assert "the learning-rate schedule is recomputed" in warning
    assert checkpoints.check_resume(shorter, finished) == []  # nothing left to train
    with pytest.raises(config_lib.ConfigError, match=r"config\.train\.num_epochs 2\.0 -> 1\.5 "):
        checkpoints.check_resume(shorter, midway)
    in_steps = tiny_config(data_dir, **{"train.num_train_steps": 20})
    with pytest.raises(config_lib.ConfigError, match=r"config\.train\.num_train_steps -1 -> 20"):
        checkpoints.check_resume(in_steps, midway)


def test_finished_run_rerun_shorter_only_evaluates(full_run, tmp_path):
    """A finished run started again with fewer epochs trains nothing and evaluates its last
    checkpoint: the uninterrupted run's metrics; its config is kept beside config.json."""
    config, full_workdir, final, _ = full_run
    workdir = copy_run(full_workdir, tmp_path / "run")
    shorter = tiny_config(config.data.data_dir, **{"train.num_epochs": 1.5})
    assert train_run(shorter, workdir) == final
    assert checkpoint_steps(workdir) == checkpoint_steps(full_workdir)
    assert json.loads((workdir / "config.json").read_text()) == json.loads(
        json.dumps(config.to_dict())
    )
    assert checkpoints.load_run_config(workdir)[0].train.num_epochs == 1.5


def test_checkpoint_without_stored_settings_resumes_with_a_warning(full_run, tmp_path):
    """A checkpoint written before the settings were stored (or without some of them): not
    refused, one warning naming what cannot be checked."""
    config, full_workdir, _, _ = full_run
    old = copy_run(full_workdir, tmp_path / "old", last_step=4)
    forget_stored_settings(old, 4)
    changed = tiny_config(config.data.data_dir, seed=1)
    [warning] = checkpoints.check_resume(changed, old)
    assert warning.startswith(f"checkpoint step 4 in {old}/checkpoints was written before")
    assert "a changed seed, crop, bucket, model or optimizer setting cannot be detected" in warning
    partial = copy_run(full_workdir, tmp_path / "partial", last_step=4)
    forget_stored_settings(partial, 4, ["model.window", "data.hflip"])
    [warning] = checkpoints.check_resume(config, partial)
    assert "does not store config.data.hflip, config.model.window (written by" in warning


def test_persistent_compilation_cache_in_workdir(compile_cache, tmp_path):
    """Without a cache configured, compiled programs go to WORKDIR/compilation_cache (where a
    restarted run finds them); the setting does not outlive the run, and a cache configured
    already (JAX_COMPILATION_CACHE_DIR, here this module's) is left alone."""
    config = tiny_config()
    with train.compilation_cache_for(config, tmp_path / "kept"):
        assert jax.config.jax_compilation_cache_dir == compile_cache
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
        with train.compilation_cache_for(config, tmp_path):
            assert jax.config.jax_compilation_cache_dir == str(tmp_path / "compilation_cache")
            jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()
        assert list((tmp_path / "compilation_cache").iterdir())
        assert not jax.config.jax_compilation_cache_dir
        with train.compilation_cache_for(tiny_config(compilation_cache_dir="off"), tmp_path):
            assert not jax.config.jax_compilation_cache_dir
    finally:
        compilation_cache.set_cache_dir(compile_cache)
        compilation_cache.reset_cache()


# ----------------------------------------------------------------------------- epochs, schedule


def test_epoch_plan_modes_starts_and_cuts():
    plan = epochs.EpochPlan(
        steps_per_mode={"sampled": 3, "full": 8}, warmup_epochs=1, full_video=True, num_epochs=3
    )
    assert [(e.index, e.mode, e.first_step, e.num_steps) for e in plan.epochs] == [
        (0, "sampled", 0, 3),
        (1, "full", 3, 8),
        (2, "full", 11, 8),
    ]
    assert plan.total_steps == 19
    # Fractions of an epoch count that epoch's own steps.
    assert [plan.epoch_to_step(x) for x in (0, 0.5, 1, 1.5, 2.25, 4)] == [0, 2, 3, 7, 13, 27]
    assert [plan.position(s) for s in (0, 2, 3, 10, 11, 19)] == [
        (0, 0),
        (0, 2),
        (1, 0),
        (1, 7),
        (2, 0),
        (2, 8),
    ]
    assert plan.describe() == "1 sampled epoch (3 steps each), then 2 full epochs (8 steps each)"
    half = epochs.EpochPlan(
        steps_per_mode={"sampled": 3, "full": 8}, warmup_epochs=1, full_video=True, num_epochs=1.5
    )
    assert [(e.mode, e.num_steps) for e in half.epochs] == [("sampled", 3), ("full", 4)]
    by_steps = epochs.EpochPlan(
        steps_per_mode={"sampled": 3, "full": 8},
        warmup_epochs=1,
        full_video=True,
        num_epochs=40,
        num_train_steps=20,
    )
    assert [(e.index, e.num_steps) for e in by_steps.epochs] == [(0, 3), (1, 8), (2, 8), (3, 1)]
    sampled_only = epochs.EpochPlan(
        steps_per_mode={"sampled": 5}, warmup_epochs=0, full_video=False, num_epochs=2
    )
    assert [e.mode for e in sampled_only.epochs] == ["sampled", "sampled"]


def test_schedules():
    config = config_lib.default_config()
    config.schedule.base_lr = 0.4
    config.schedule.warmup_epochs = 1.0
    sched = optim.make_schedule(config, total_steps=50, epoch_to_step=lambda e: round(e * 10))
    assert [float(sched(s)) for s in (0, 5, 10)] == pytest.approx([0.0, 0.2, 0.4])
    assert float(sched(30)) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    config.schedule.name = "step"
    config.schedule.step_epochs = (2.0, 4.0)
    sched = optim.make_schedule(config, total_steps=50, epoch_to_step=lambda e: round(e * 10))
    assert [float(sched(s)) for s in (15, 19, 21, 39, 41)] == pytest.approx(
        [0.4, 0.4, 0.04, 0.04, 0.004]
    )


def test_schedule_epochs_follow_the_steps_of_each_epoch():
    """With a 3-step sampled epoch and 8-step full epochs, warm-up 1.5 epochs ends at step
    3 + 4 = 7 and a step decay at epoch 2 falls at step 11."""
    plan = epochs.EpochPlan(
        steps_per_mode={"sampled": 3, "full": 8}, warmup_epochs=1, full_video=True, num_epochs=3
    )
    config = config_lib.default_config()
    config.schedule.base_lr = 0.7
    config.schedule.warmup_epochs = 1.5
    config.schedule.name = "step"
    config.schedule.step_epochs = (2.0,)
    sched = optim.make_schedule(config, plan.total_steps, plan.epoch_to_step)
    assert [float(sched(s)) for s in (0, 7, 10, 11)] == pytest.approx([0.0, 0.7, 0.7, 0.07])
    assert float(sched(3.5)) == pytest.approx(0.35)


class _PlannedTrainData:
    """The TrainData API of one process over plans made by fva_jax.data.batch_plan alone (no
    videos): plan(mode, epoch) and iterator(mode, epoch=, start_step=), whose batches hold
    labels 0 and masks of the plan's rows."""

    def __init__(self, lengths, process_index: int, process_count: int):
        self.lengths, self.process_index, self.process_count = lengths, process_index, process_count

    def plan(self, mode: str, epoch: int = 0):
        layout = dict(seed=3, epoch=epoch, process_count=self.process_count, local_device_count=1)
        if mode == "sampled":
            return batch_plan.sampled_plan(
                len(self.lengths), **layout, global_batch=4, num_frames=2, shuffle=True
            )
        return batch_plan.full_plan(
            self.lengths,
            **layout,
            frames_per_device=64,
            chunk_size=8,
            buckets=(16, 32, 64, 128),
            shuffle=True,
        )

    def steps_per_epoch(self, mode: str) -> int:
        return self.plan(mode).num_steps

    def iterator(self, mode: str, *, epoch: int, start_step: int = 0):
        plan = self.plan(mode, epoch)
        for step in range(start_step, plan.num_steps):
            real = plan.rows(step, self.process_index) >= 0
            yield {
                "video": np.zeros((len(real), 1, 1, 1, 3), np.uint8),
                "mask": np.ones((len(real), 1), bool),
                "label": np.zeros(len(real), np.int32),
                "batch_mask": real,
            }


class _RowLogits(flax.linen.Module):
    """logits = a zero-initialised parameter per batch row (rows x 2 classes): the gradient
    of the loss w.r.t. row i's label logit is weight_i x (1/2 - 1)."""

    @flax.linen.compact
    def __call__(self, video, mask, *, train: bool):
        del mask, train
        return self.param("bias", flax.linen.initializers.zeros, (64, 2))[: video.shape[0]], None


@pytest.mark.parametrize("process_count", [1, 2])
def test_every_video_of_an_epoch_weighs_the_same_in_the_loss(process_count):
    """The weight of each video in the objective (read off the gradient of
    steps.loss_and_grads on the trainer's batches, all processes' rows together) is the same
    for every video of an epoch, whatever its length bucket (1, 2 or 4 videos per device and
    step here) and its step's empty slots, and a step read after a resume weighs the same.
    Over the epoch the weights add up to its number of steps (the learning rate's meaning)."""
    lengths = np.array([5, 9, 12, 15, 16, 17, 20, 30, 31, 33, 40, 50, 63, 64, 70, 90, 100, 128])
    hosts = [_PlannedTrainData(lengths, p, process_count) for p in range(process_count)]
    plan = epochs.EpochPlan(
        steps_per_mode={m: hosts[0].steps_per_epoch(m) for m in ("sampled", "full")},
        warmup_epochs=1,
        full_video=True,
        num_epochs=3,
    )
    model = _RowLogits()
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 1, 1, 1, 3)), None, train=False)
    grad_fn = jax.jit(functools.partial(steps.loss_and_grads, batch_stats={}, model=model, rngs={}))

    def weights_of_each_video(start: int) -> dict[tuple[int, int], float]:
        """{(epoch, video): weight} of every step after `start`, by process 0..n-1 rows."""
        runs = [types.SimpleNamespace(plan=plan, train_data=h) for h in hosts]
        out = {}
        for per_host in zip(*(train._train_batches(r, start) for r in runs)):
            epoch, i = per_host[0][:2]
            batch = {k: np.concatenate([b[2][k] for b in per_host]) for k in per_host[0][2]}
            _, grads = grad_fn(params["params"], batch=batch)
            weight = -2 * np.asarray(grads["bias"])[: len(batch["label"]), 0]
            rows = np.concatenate(
                [hosts[0].plan(epoch.mode, epoch.index).rows(i, p) for p in range(process_count)]
            )
            assert np.all(weight[rows < 0] == 0), (epoch.index, i, weight)
            out.update({(epoch.index, int(v)): float(w) for v, w in zip(rows, weight) if v >= 0})
        return out

    weights = weights_of_each_video(0)
    assert len(weights) == 3 * len(lengths)  # every video once per epoch
    for e in plan.epochs:
        per_video = np.array([weights[e.index, v] for v in range(len(lengths))])
        np.testing.assert_allclose(per_video, per_video.mean(), rtol=1e-6, err_msg=str(e))
        assert per_video.sum() == pytest.approx(e.steps_per_epoch, rel=1e-6)
    full = plan.epochs[1]
    assert len(set(hosts[0].plan("full", 1).videos_per_device)) == 3  # several buckets
    resume_at = full.first_step + 2  # mid-epoch
    resumed = weights_of_each_video(resume_at)
    assert resumed and all(weights[key] == w for key, w in resumed.items())


def test_uniform_warmup_must_be_whole_epochs():
    config = tiny_config(**{"train.uniform_warmup_epochs": 1.5})
    with pytest.raises(config_lib.ConfigError, match=r"uniform_warmup_epochs must be a whole"):
        config_lib.validate_config(config)


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


# ----------------------------------------------------------------------------- devices, hosts


def _run_main(args, env_extra):
    """tests/run_main.py (fva_jax.main) in its own process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **env_extra}
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "run_main.py"), "--config=configs/demo.py", *args],
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


def _data_steps_from_log(log: str) -> list[tuple]:
    """The recorded data steps (tests/recorded_pipeline.py) of a run's log."""
    return [
        tuple(tuple(x) if isinstance(x, list) else x for x in json.loads(m))
        for m in re.findall(r"DATA_STEP (\[.*\])", log)
    ]


# The sampling baseline: every step sampled (K frames, 4 videos), so the global batches do not
# depend on the number of devices.
SAMPLED_ONLY = {
    "model.sampling": "uniform",
    "train.uniform_warmup_epochs": 0,
    "train.num_epochs": 1.0,
    "eval.also_uniform": False,
}


def test_four_devices_give_the_same_result_as_one(data_dir, compile_cache, tmp_path):
    """The same global batches on 4 fake CPU devices (batch sharded 1 per device) through
    main.py: same training losses and evaluation as the in-process 1-device run; the batches'
    own video indices name every training video once in the epoch and every test video once
    in the evaluation."""
    one = train_run(tiny_config(data_dir, **SAMPLED_ONLY), tmp_path / "one")
    proc = _run_main(
        [f"--workdir={tmp_path / 'four'}", *flags_for(data_dir, **SAMPLED_ONLY)],
        {
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_COMPILATION_CACHE_DIR": compile_cache,
            "FVA_RECORD_DATA_STEPS": "1",
        },
    )
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert "4 local / 4 global devices" in log
    four = json.loads((tmp_path / "four" / "final_metrics.json").read_text())
    assert four == _final_metrics_from_log(log)
    assert four["step"] == one["step"] == SAMPLED_STEPS
    for mode in ("train", "eval"):
        for key, value in one[mode].items():
            if key != "per_class_accuracy":
                assert four[mode][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (mode, key)
    reads = _data_steps_from_log(log)
    assert [r[:4] for r in reads] == [
        *(("train", "sampled", 0, i) for i in range(SAMPLED_STEPS)),
        *(("test", "sampled", 0, i) for i in range(2)),  # 6 test videos, 4 per step
    ]
    layout = dict(process_index=0, process_count=1, local_device_count=4)
    config = tiny_config(data_dir, **SAMPLED_ONLY)
    k = config.model.num_clusters
    for split, data, count in (
        ("train", pipeline.TrainData(config, **layout), NUM_TRAIN),
        ("test", pipeline.EvalData(config, **layout), NUM_TEST),
    ):
        split_reads = [r for r in reads if r[0] == split]
        assert sorted(v for r in split_reads for v in r[5] if v >= 0) == list(range(count))
        check_recorded_steps(split_reads, data, num_frames=k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# sparse_events "long_tiny" (16 train videos of 16-209 frames, 8 test of 13-246) in 2 length
# buckets, full videos only, 2 epochs, a checkpoint only at the end.
LONG_TWO_EPOCHS = {
    "data.builder_config": "long_tiny",
    "train.num_epochs": 2.0,
    "checkpoint.every_steps": 1000,
    "eval.num_timeline_videos": 0,
    **CLUSTER_ONLY,
}


def test_two_processes_train_together_and_agree(data_dir, compile_cache, tmp_path):
    """jax.distributed on localhost (CPU, gloo): 2 processes x 1 device, two full-video epochs
    over videos of widely varying lengths. Both run the same shapes at every step (the
    pipeline's plan for 2 processes); by the batches' own video indices, every training video
    is read once per epoch across the two (each row with its video's frames and label) and
    every test video once in evaluation; both end with the same metrics."""
    port = _free_port()
    procs = [
        _run_main(
            [
                f"--workdir={tmp_path}",
                *flags_for(data_dir, **LONG_TWO_EPOCHS),
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ],
            {"JAX_COMPILATION_CACHE_DIR": compile_cache, "FVA_RECORD_DATA_STEPS": "1"},
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
    config = tiny_config(data_dir, **LONG_TWO_EPOCHS)
    layout = dict(process_index=0, process_count=2, local_device_count=1)
    train_data = pipeline.TrainData(config, **layout)
    eval_data = pipeline.EvalData(config, **layout)
    steps_per_epoch = train_data.steps_per_epoch("full")
    assert results[0]["step"] == 2 * steps_per_epoch and math.isfinite(results[0]["train"]["loss"])
    assert results[0]["eval"]["num_examples"] == 8  # each test video once across both hosts

    reads = [_data_steps_from_log(log) for log in logs]
    # The same splits, modes, epochs, steps and (rows, frames) shapes on both, in order.
    assert [r[:5] for r in reads[0]] == [r[:5] for r in reads[1]]
    train_reads = [r for r in reads[0] if r[0] == "train"]
    assert [r[1:4] for r in train_reads] == [
        ("full", e, i) for e in (0, 1) for i in range(steps_per_epoch)
    ]
    for epoch in (0, 1):
        shapes = [r[4][:2] for r in train_reads if r[2] == epoch]
        assert shapes == train_data.plan("full", epoch).shapes(), epoch
        seen = [
            v for p in (0, 1) for r in reads[p] if r[:3] == ("train", "full", epoch) for v in r[5]
        ]
        assert sorted(v for v in seen if v >= 0) == list(range(16)), epoch
    assert len({r[4][1] for r in train_reads}) >= 2  # lengths vary: several padded lengths
    for p in (0, 1):
        check_recorded_steps([r for r in reads[p] if r[0] == "train"], train_data)
        check_recorded_steps([r for r in reads[p] if r[0] == "test"], eval_data)
    seen = [v for p in (0, 1) for r in reads[p] if r[0] == "test" for v in r[5] if v >= 0]
    assert sorted(seen) == list(range(8))
    # One checkpoint holding the global data position and the host layout.
    last = 2 * steps_per_epoch
    data_state = json.loads(
        (tmp_path / "checkpoints" / str(last) / "data" / "metadata").read_text()
    )
    assert data_state["process_count"] == 2
    assert data_state["data_state"] == {"epoch": 1, "step": steps_per_epoch}


def test_training_imports_no_tensorflow(data_dir, compile_cache, tmp_path):
    """A few steps and an evaluation on the real pipeline in a process where
    `import tensorflow` fails (an import hook first on sys.meta_path; the data set was built
    beforehand by this session): metrics, checkpoints and TensorBoard events are written, and
    TensorFlow is not in sys.modules afterwards."""
    proc = _run_main(
        [
            f"--workdir={tmp_path}",
            *flags_for(data_dir, **{"train.num_train_steps": 2, **CLUSTER_ONLY}),
        ],
        {"JAX_COMPILATION_CACHE_DIR": compile_cache, "FVA_BLOCK_TENSORFLOW": "1"},
    )
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert log.rstrip().endswith("TENSORFLOW_IMPORTED False"), log[-3000:]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["step"] == 2 and final["eval"]["num_examples"] == NUM_TEST
    assert checkpoint_steps(tmp_path) == [2]
    events = read_events(tmp_path)
    assert sorted(events["train/loss"]) == [1, 2]
    assert sorted(events["eval/top1"]) == [2]
    assert set(events["clusters/video0"]) == {2}


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
    fva_jax.tools.import_weights' format (no stem/trunk level, random BatchNorm statistics).
    Returns the flat {"params/conv1/kernel": array, ...} it wrote."""
    from flax import traverse_util

    from fva_jax.tools import import_weights

    model = FullVideoModel(num_classes=4, **steps.model_kwargs(config))
    frames = config.model.chunk_size
    # Only the variables' shapes are needed (eval_shape: nothing runs or compiles).
    variables = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.PRNGKey(seed),
        jnp.zeros((1, frames, config.data.crop_size, config.data.crop_size, 3), jnp.uint8),
        jnp.ones((1, frames), bool),
    )
    rng = np.random.default_rng(seed)
    tree = {}
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(variables[collection])
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

    config, full_workdir, final, _ = full_run
    pretrained = _write_random_pretrained(config, tmp_path / "weights", seed=7)
    config = tiny_config(config.data.data_dir, **{"train.init_from": str(tmp_path / "weights")})
    loaded = []
    original = experiment.load_pretrained

    def recording(run, state):
        new = original(run, state)
        loaded.append(jax.device_get((new.params, new.batch_stats, new.opt_state)))
        return new

    monkeypatch.setattr(experiment, "load_pretrained", recording)

    def stop_after_first_step(step):
        raise _Killed()

    with pytest.raises(_Killed):
        train_run(config, tmp_path / "fresh", on_step=stop_after_first_step)
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
    resumed = tmp_path / "resumed"
    shutil.copytree(full_workdir, resumed)
    assert train_run(config, resumed) == final
    assert len(loaded) == 1


def test_init_from_errors_name_the_problem(data_dir, tmp_path):
    config = tiny_config(data_dir, **{"train.init_from": str(tmp_path / "nowhere")})
    with pytest.raises(Exception, match="nowhere"):
        train_run(config, tmp_path / "w")


# ----------------------------------------------------------------------------- timelines


def test_cluster_timelines_written_to_tensorboard(full_run):
    from fva_jax.training import timeline

    config, workdir, _, _ = full_run
    events = read_events(workdir)
    images = {tag: v for tag, v in events.items() if tag.startswith("clusters/")}
    assert {tag: sorted(v) for tag, v in images.items()} == {
        "clusters/video0": [STEPS],
        "clusters/video1": [STEPS],
    }
    # The same pictures drawn the plain way: the first real videos of the first "eval" (full
    # video) batches of the pipeline through the checkpoint's model.
    state = restore_state(workdir, STEPS)
    names = pipeline.dataset_info(config.data)["class_names"]
    apply = plain_apply(config)
    drawn = 0
    for batch in pipeline.EvalData(config).iterator("full"):
        logits, seg = apply(
            {"params": state["params"], "batch_stats": state["batch_stats"]},
            batch["video"],
            batch["mask"],
        )
        for i in np.flatnonzero(batch["batch_mask"]):
            if drawn == 2:
                break
            n = int(batch["mask"][i].sum())
            title = (
                f"eval video {drawn}: {n} frames, label {names[batch['label'][i]]}, predicted "
                f"{names[int(np.argmax(logits[i]))]} (step {STEPS})"
            )
            expected = timeline.render_timeline(
                batch["video"][i, :n],
                None,
                np.asarray(seg[i, :n]),
                num_clusters=config.model.num_clusters,
                title=title,
                width=1000,
            )
            got = images[f"clusters/video{drawn}"][STEPS]
            assert got.shape == expected.shape and got.shape[1] == 1000
            np.testing.assert_array_equal(got, expected)
            drawn += 1
    assert drawn == 2


def test_no_timelines_when_disabled(data_dir, compile_cache, tmp_path):
    del compile_cache
    # The programs of test_training_imports_no_tensorflow (2 steps): compiled once.
    config = tiny_config(
        data_dir, **{"eval.num_timeline_videos": 0, "train.num_train_steps": 2, **CLUSTER_ONLY}
    )
    train_run(config, tmp_path)
    events = read_events(tmp_path)
    assert "train/loss" in events
    assert not [tag for tag in events if tag.startswith("clusters/")]


# ----------------------------------------------------------------------------- predict


def test_predict_frames_match_the_pipelines_eval_crop(data_dir, tmp_path):
    """predict's evaluation frames of a stored test video (its JPEG frames written as a
    folder, decoded by predict: PIL) equal the frames the pipeline's evaluation gives that
    video (simplejpeg, frames.centre_crop_window / crop_resize), for centre squares kept
    as they are, shrunk (area averaging) and enlarged (bilinear). Tolerance: 1 level, for a
    JPEG decoder's rounding (PIL and simplejpeg both wrap libjpeg-turbo; here they agree
    exactly); a different resize filter (predict's JAX antialiased bilinear resize before,
    several levels off) fails."""
    from array_record.python import array_record_data_source

    from fva_jax.tools import predict

    builder = builders.get_builder("sparse_events", "tiny", str(data_dir))
    records = array_record_data_source.ArrayRecordDataSource(
        list(builder.info.splits["test"].file_instructions)
    )
    for resize_short, crop_size, side in (
        (32, 16, 16),  # the centre 16 px, no resize
        (24, 16, 21),  # shrunk 21 -> 16 px
        (20, 16, 26),  # shrunk 26 -> 16 px
        (40, 24, 19),  # enlarged 19 -> 24 px
        (32, 32, 32),  # the whole frame
    ):
        config = tiny_config(
            data_dir, **{"data.resize_short": resize_short, "data.crop_size": crop_size}
        )
        assert frames.centre_crop_window(32, 32, crop_size, resize_short)[2] == side
        eval_data = pipeline.EvalData(
            config, process_index=0, process_count=1, local_device_count=1
        )
        batch = next(iter(eval_data.iterator("full")))
        video = int(eval_data.plan("full").rows(0, 0)[0])
        n = int(batch["mask"][0].sum())
        folder = tmp_path / f"video_{resize_short}_{crop_size}"
        folder.mkdir()
        jpegs = records_lib.parse_record(records[video])["video"]
        for i, jpeg in enumerate(jpegs):
            (folder / f"{i:05d}.jpg").write_bytes(jpeg)
        got = predict.load_video(folder, config.data)
        assert got.used == got.total == n == len(jpegs)
        diff = np.abs(got.frames.astype(int) - batch["video"][0, :n].astype(int))
        assert diff.max() <= 1, (resize_short, crop_size, diff.max())


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
    from fva_jax.data import video as video_lib
    from fva_jax.tools import predict

    config, workdir, _, _ = full_run
    paths = [_sparse_events_mp4(tmp_path / "a.mp4", 20), _sparse_events_mp4(tmp_path / "b.mp4", 9)]
    predict.main([f"--workdir={workdir}", *map(str, paths)])
    printed = _parse_predict_output(capsys.readouterr().out)
    assert sorted(printed) == sorted(map(str, paths))

    # The plain computation: decode, centre crop (resize_short 32 = the stored size, so the
    # crop is the centre 16 px), every frame unpadded, the checkpoint's model in eval mode.
    state = restore_state(workdir, STEPS)
    info = json.loads((workdir / checkpoints.DATASET_INFO_FILE).read_text())
    apply = plain_apply(config)
    for path in paths:
        frames = video_lib.decode_video(path)[:, 8:24, 8:24]
        n = len(frames)
        logits, seg = apply(
            {"params": state["params"], "batch_stats": state["batch_stats"]},
            frames[None],
            np.ones((1, n), bool),
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
    from fva_jax.tools import predict

    _, workdir, _, _ = full_run
    with pytest.raises(SystemExit, match=f"{tmp_path}.*not a training workdir"):
        predict.main([f"--workdir={tmp_path}", "x.mp4"])
    # A workdir with its config but without checkpoints.
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
