"""Input pipeline (fva_jax/data/pipeline.py, frames.py, records.py, streams.py): batches,
plans across hosts, crops, sampled frames, determinism, resume, bad data, and reading without
TensorFlow."""

import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import data_fakes
import numpy as np
import pytest

from fva_jax import config_lib
from fva_jax.data import builders, frames, pipeline, records, streams
from fva_jax.data import sparse_events as se
from fva_jax.data import video as video_lib


def _config(data_dir, builder_config="tiny", **overrides):
    """Small settings: 32 px stored frames, crop 24, chunk 8, 64 frames per device."""
    c = config_lib.default_config()
    c.data.builder_config = builder_config
    c.data.data_dir = str(data_dir)
    c.data.resize_short = 32
    c.data.crop_size = 24
    c.data.frames_per_device = 64
    c.data.max_buckets = 4
    c.data.num_workers = 0
    c.data.prefetch = 1
    c.model.chunk_size = 8
    c.model.num_clusters = 4
    c.train.batch_size = 4
    c.eval.batch_size = 4
    for key, value in overrides.items():
        group, name = key.split("__")
        c[group][name] = value
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    for config in ("tiny", "long_tiny"):
        builders.prepare(builders.get_builder("sparse_events", config, str(d)))
    builders.prepare(data_fakes.GradientVideos(config="grad", data_dir=str(d)))
    return d


@pytest.fixture
def gradient(data_dir, monkeypatch):
    """Makes data.name "sparse_events" read GradientVideos (config "grad")."""
    monkeypatch.setitem(builders.BUILDERS, "sparse_events", data_fakes.GradientVideos)
    return data_dir


def _layout(pi=0, pc=1, ld=1):
    return dict(process_index=pi, process_count=pc, local_device_count=ld)


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- info, batches


def test_dataset_info(data_dir):
    info = pipeline.dataset_info(_config(data_dir).data)
    assert info["num_classes"] == 4
    assert info["class_names"][:2] == ["red_square", "green_disc"]
    assert info["num_examples"] == {"train": 12, "test": 6}


def test_full_batches_shapes_masks_and_contents(data_dir):
    cfg = _config(data_dir, "long_tiny")
    data = pipeline.TrainData(cfg, **_layout(ld=2))
    assert len(data.buckets) <= 4 and data.buckets[-1] >= data.lengths.max()
    assert data.lengths.max() > 5 * data.lengths.min()  # widely varying lengths
    plan = data.plan("full", epoch=1)
    batches = list(data.iterator("full", epoch=1))
    assert len(batches) == data.steps_per_epoch("full") == plan.num_steps
    for step, batch in enumerate(batches):
        rows = plan.rows(step, 0)
        b, length = len(rows), int(plan.lengths[step])
        assert b == 2 * max(1, 64 // length) and length % 8 == 0
        assert batch["video"].shape == (b, length, 24, 24, 3) and batch["video"].dtype == np.uint8
        assert batch["mask"].shape == (b, length) and batch["mask"].dtype == bool
        assert batch["label"].dtype == np.int32 and batch["batch_mask"].dtype == bool
        np.testing.assert_array_equal(batch["batch_mask"], rows >= 0)
        assert batch["index"].dtype == np.int32
        np.testing.assert_array_equal(batch["index"], rows)  # the planned videos, -1 if none
        for r, video in enumerate(rows):
            n = data.lengths[video] if video >= 0 else 0
            np.testing.assert_array_equal(batch["mask"][r], np.arange(length) < n)  # a prefix
            assert not batch["video"][r, n:].any()  # padding and empty slots are zero
            if video >= 0:
                assert batch["video"][r, :n].reshape(n, -1).any(axis=1).all()
                assert batch["label"][r] == data.labels[video]
    data.close()


def test_stride_cap_and_centre_crop_match_numpy(gradient):
    # Stored frames 48x64; centre crop round(48 * 24 / 32) = 36 px, resized to 24.
    cfg = _config(gradient, "grad", data__frame_stride=3, data__max_frames=6)
    data = pipeline.EvalData(cfg, **_layout())
    plan = data.plan("full")
    for step, batch in enumerate(data.iterator("full")):
        for r, video in enumerate(plan.rows(step, 0)):
            if video < 0:
                continue
            t = data_fakes.gradient_length("test", int(data.video_ids[video].split("/")[1]))
            kept = np.arange(0, t, 3)[:6]  # stride 3, cap 6
            n = len(kept)
            assert batch["mask"][r].sum() == n == data.lengths[video]
            seen = data_fakes.read_gradient(batch["video"][r, :n])
            np.testing.assert_array_equal(seen["frames"], kept)
            # Centred on the frame centre (x 31.5, y 23.5), 36 px wide, not mirrored.
            assert abs(seen["x"] - 31.5) < 0.6 and abs(seen["y"] - 23.5) < 0.6
            assert abs(seen["width"] - 36) < 1.5 and abs(seen["height"] - 36) < 1.5
            assert not seen["flipped"]
    # Exact pixels where no resize is needed: crop 24 of resize_short 48 = 24 px of 48.
    cfg = _config(gradient, "grad", data__resize_short=48)
    data = pipeline.EvalData(cfg, **_layout())
    batch = next(iter(data.iterator("full")))
    video = data.plan("full").rows(0, 0)[0]
    import simplejpeg  # pylint: disable=g-import-not-at-top

    with builders_source(gradient, "test") as source:
        ex = records.parse_record(source[int(video)])
        ref = simplejpeg.decode_jpeg(ex["video"][1], colorspace="RGB")[12:36, 20:44]
    np.testing.assert_array_equal(batch["video"][0, 1], ref)


class builders_source:  # pylint: disable=invalid-name
    """Raw records of a split of the gradient set, as a context manager."""

    def __init__(self, data_dir, split):
        b = data_fakes.GradientVideos(config="grad", data_dir=str(data_dir))
        from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top

        self._source = array_record_data_source.ArrayRecordDataSource(
            b.info.splits[split].file_instructions
        )

    def __enter__(self):
        return self._source

    def __exit__(self, *exc):
        self._source.__exit__(*exc)


def test_centre_and_train_crop_geometry_unit():
    frame = data_fakes.gradient_frames(1)[0]
    out = np.zeros((24, 24, 3), np.uint8)
    window = frames.centre_crop_window(48, 64, 24, 32)
    assert window == (6, 14, 36, 36)
    frames.crop_resize(frame, window, 24, False, out)
    seen = data_fakes.read_gradient(out[None])
    assert abs(seen["x"] - 31.5) < 0.5 and abs(seen["y"] - 23.5) < 0.5
    # TSN multi-scale: (scale_h, scale_w) with |i - j| <= 1, a random position, flips.
    scales = (1.0, 0.875, 0.75, 0.66)
    pairs = frames.tsn_scale_pairs(scales)
    assert len(pairs) == 10 and (1.0, 0.75) not in pairs and (0.875, 0.75) in pairs
    allowed = {(round(a * 48), round(b * 48)) for a, b in pairs}
    rng = np.random.default_rng(0)
    sizes, flips = set(), 0
    for _ in range(200):
        (y, x, ch, cw), flip = frames.train_crop_window(48, 64, scales, True, rng.random(4))
        assert (ch, cw) in allowed and 0 <= y <= 48 - ch and 0 <= x <= 64 - cw
        sizes.add((ch, cw))
        flips += flip
        frames.crop_resize(frame, (y, x, ch, cw), 24, flip, out)
        seen = data_fakes.read_gradient(out[None])
        assert abs(seen["width"] - cw) < 1.5 and abs(seen["height"] - ch) < 1.5
        assert abs(seen["x"] - (x + (cw - 1) / 2)) < 0.7 and seen["flipped"] == flip
    assert sizes == allowed and 70 < flips < 130
    for _ in range(20):
        assert not frames.train_crop_window(48, 64, scales, False, rng.random(4))[1]


def test_train_crop_is_one_per_video_and_deterministic(gradient):
    cfg = _config(gradient, "grad", data__resize_short=48)
    data = pipeline.TrainData(cfg, **_layout())
    plan = data.plan("full", epoch=0)
    flips, sizes = collections.Counter(), set()
    batches = list(data.iterator("full", epoch=0))
    for step, batch in enumerate(batches):
        for r, video in enumerate(plan.rows(step, 0)):
            if video < 0:
                continue
            n = data.lengths[video]
            seen = data_fakes.read_gradient(batch["video"][r, :n])
            np.testing.assert_array_equal(seen["frames"], np.arange(n))  # every frame
            # One crop (and flip) for all frames: red is the same on every frame.
            assert np.ptp(seen["per_frame_red"]) < 0.5
            flips[seen["flipped"]] += 1
            sizes.add(round(seen["width"]))
    assert len(sizes) >= 2 and sum(flips.values()) == 8
    again = list(pipeline.TrainData(cfg, **_layout()).iterator("full", epoch=0))
    assert all(_same(a, b) for a, b in zip(batches, again))


# --------------------------------------------------------------------------- sampled frames


@pytest.mark.parametrize("sampling", ["uniform", "dense", "cluster"])
def test_sampled_mode_decodes_the_models_frames(gradient, sampling):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from fva_jax.models import full_video  # pylint: disable=g-import-not-at-top

    cfg = _config(gradient, "grad", model__sampling=sampling, model__dense_stride=3)
    cfg.data.frame_stride = 2  # selections index the strided frames
    k = 4
    for train in (False, True):
        cls = pipeline.TrainData if train else pipeline.EvalData
        data = cls(cfg, **_layout(ld=2))
        it = data.iterator("sampled", epoch=3) if train else data.iterator("sampled")
        plan = data.plan("sampled", 3 if train else 0)
        for step, batch in enumerate(it):
            assert batch["video"].shape == (4, k, 24, 24, 3)
            rows = plan.rows(step, 0)
            np.testing.assert_array_equal(batch["mask"], (rows >= 0)[:, None].repeat(k, 1))
            for r, video in enumerate(rows):
                if video < 0:
                    continue
                length = int(data.lengths[video])
                got = data_fakes.read_gradient(batch["video"][r])["frames"] // 2
                lengths = jnp.asarray([length])
                if not train:  # the model's own selection at test time
                    if sampling == "dense":
                        ref = full_video.dense_indices(lengths, k, 3)
                    else:
                        ref = full_video.uniform_indices(lengths, k)
                    np.testing.assert_array_equal(got, np.asarray(ref)[0])
                elif sampling == "dense":  # consecutive frames 3 apart (or clipped)
                    assert (np.diff(got) == 3).all() or got[-1] == length - 1
                else:  # one frame from each TSN segment
                    lo = np.arange(k) * length // k
                    hi = np.maximum((np.arange(k) + 1) * length // k, lo + 1)
                    assert ((got >= lo) & (got < hi) | (got == length - 1)).all(), (got, length)
        if train:
            data.close()


def test_host_selection_equals_model_selection():
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from fva_jax.models import full_video  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(0)
    lengths = np.concatenate([np.arange(1, 40), rng.integers(40, 3000, 60)])
    for k, stride in ((1, 1), (3, 2), (8, 1), (16, 4)):
        u = rng.random((len(lengths), k), dtype=np.float32)
        models = (
            full_video.uniform_indices(jnp.asarray(lengths), k, jnp.asarray(u)),
            full_video.uniform_indices(jnp.asarray(lengths), k),
            full_video.dense_indices(jnp.asarray(lengths), k, stride, jnp.asarray(u[:, :1])),
            full_video.dense_indices(jnp.asarray(lengths), k, stride),
        )
        for i, length in enumerate(lengths.tolist()):
            hosts = (
                frames.uniform_indices(length, k, u[i]),
                frames.uniform_indices(length, k),
                frames.dense_indices(length, k, stride, u[i, :1]),
                frames.dense_indices(length, k, stride),
            )
            for host, model in zip(hosts, models):
                np.testing.assert_array_equal(host, np.asarray(model)[i], err_msg=f"{length} {k}")


def test_model_on_host_frames_equals_model_on_whole_videos(data_dir):
    """Test-time uniform sampling: the model on the K host-chosen frames (T = K, all valid)
    gives the logits of the model choosing K frames itself from the whole video."""
    import jax  # pylint: disable=g-import-not-at-top

    from fva_jax.models.full_video import FullVideoModel  # pylint: disable=g-import-not-at-top

    cfg = _config(data_dir, "tiny", data__crop_size=16)
    data = pipeline.EvalData(cfg, **_layout())
    whole = {}
    plan = data.plan("full")
    for step, batch in enumerate(data.iterator("full")):
        for r, video in enumerate(plan.rows(step, 0)):
            if video >= 0:
                whole[int(video)] = batch["video"][r][batch["mask"][r]]
    sampled = next(iter(data.iterator("sampled")))
    videos = [int(v) for v in data.plan("sampled").rows(0, 0)]
    # One batch, one compilation: rows 0..3 the whole videos, rows 4..7 the host's K = 4
    # frames padded to the same T (the model's uniform rule on 4 valid frames takes them all).
    t = max(len(whole[v]) for v in videos)
    clips = np.zeros((8, t, 16, 16, 3), np.uint8)
    mask = np.zeros((8, t), bool)
    for i, v in enumerate(videos):
        clips[i, : len(whole[v])], mask[i, : len(whole[v])] = whole[v], True
        clips[4 + i, :4], mask[4 + i, :4] = sampled["video"][i], sampled["mask"][i]
    assert sampled["mask"].all()
    model = FullVideoModel(
        num_classes=4, backbone="resnet18", width=4, num_clusters=4, sampling="uniform"
    )
    fast = {"xla_backend_optimization_level": 0}  # ~3x faster compiles on CPU
    variables = jax.jit(
        lambda x, m: model.init(jax.random.key(0), x, m, train=False), compiler_options=fast
    )(clips[:1, :4], mask[:1, :4])
    logits, _ = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False), compiler_options=fast)(
        variables, clips, mask
    )
    np.testing.assert_allclose(np.asarray(logits[4:]), np.asarray(logits[:4]), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(logits[0] - logits[1])).max() > 1e-6  # different videos differ


# --------------------------------------------------------------------------- determinism, resume


def test_deterministic_per_seed_and_epoch(data_dir):
    cfg = _config(data_dir)
    a = pipeline.TrainData(cfg, **_layout())
    epochs = [list(a.iterator("full", epoch=e)) for e in range(2)]  # one stream, two epochs
    b = pipeline.TrainData(cfg, **_layout())
    assert all(_same(x, y) for x, y in zip(epochs[1], b.iterator("full", epoch=1)))
    assert not all(_same(x, y) for x, y in zip(epochs[0], epochs[1]))
    cfg.seed = 1
    c = pipeline.TrainData(cfg, **_layout())
    assert not all(_same(x, y) for x, y in zip(epochs[0], c.iterator("full", epoch=0)))
    # The same videos every epoch (labels as a multiset), each once.
    labels = [np.sort(np.concatenate([x["label"][x["batch_mask"]] for x in e])) for e in epochs]
    np.testing.assert_array_equal(labels[0], labels[1])
    assert len(labels[0]) == 12


@pytest.mark.parametrize("mode", ["full", "sampled"])
def test_resume_from_state_gives_the_same_next_batches(data_dir, mode):
    cfg = _config(data_dir, "long_tiny")
    data = pipeline.TrainData(cfg, **_layout(ld=2))
    steps = data.steps_per_epoch(mode)
    ref = list(data.iterator(mode, epoch=2)) + list(data.iterator(mode, epoch=3))
    for done in (1, steps - 1, steps, steps + 1):  # mid-epoch, last step, epoch end, next
        state = json.loads(json.dumps({"epoch": 2 + done // steps, "step": done % steps}))
        resumed = pipeline.TrainData(cfg, **_layout(ld=2))
        got = list(resumed.iterator(mode, epoch=state["epoch"], start_step=state["step"]))
        got += list(resumed.iterator(mode, epoch=state["epoch"] + 1))
        for a, b in zip(got, ref[done:]):
            assert _same(a, b)
    with pytest.raises(ValueError, match="start_step"):
        data.iterator(mode, epoch=0, start_step=steps + 1)
    data.close()


def test_workers_give_the_same_batches_as_the_main_process(data_dir):
    cfg = _config(data_dir, "long_tiny", data__num_workers=2, data__prefetch=3)
    with_workers = pipeline.TrainData(cfg, **_layout())
    cfg0 = _config(data_dir, "long_tiny")
    in_process = pipeline.TrainData(cfg0, **_layout())
    for epoch in (0, 1):  # the second epoch continues the same worker stream
        for a, b in zip(
            with_workers.iterator("full", epoch=epoch), in_process.iterator("full", epoch=epoch)
        ):
            assert _same(a, b)
    # A resume in the middle restarts the stream at the right step.
    a = next(iter(with_workers.iterator("full", epoch=5, start_step=3)))
    b = next(iter(in_process.iterator("full", epoch=5, start_step=3)))
    assert _same(a, b)
    with_workers.close()


@pytest.mark.parametrize("workers, prefetch", [(0, 2), (2, 2), (1, 4)])  # bounds 3, 9, 7
def test_steps_in_memory_are_bounded(tmp_path, workers, prefetch):
    """Host memory: a consumer that holds one step and waits leaves at most
    max_steps_in_memory steps made (buffered, being decoded, held)."""
    import time  # pylint: disable=g-import-not-at-top

    calls = tmp_path / "calls"
    calls.mkdir()
    it = streams.grain_iterator(data_fakes.CountingStep(calls), 0, 100, workers, prefetch)
    assert next(it)["x"][0] == 0
    bound = streams.max_steps_in_memory(workers, prefetch)
    deadline = time.time() + 60
    while len(os.listdir(calls)) < bound - 1 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # anything beyond the bound would have been made by now
    made = len(os.listdir(calls))
    assert bound - 1 <= made <= bound, (made, bound)
    assert [next(it)["x"][0] for _ in range(5)] == [1, 2, 3, 4, 5]  # in order
    streams.close_iterator(it)


_HOLDS_STEPS_AT_EXIT = """
import os, sys
sys.path.insert(0, sys.argv[1])  # tests/, for data_fakes
import data_fakes
from fva_jax.data import streams

if __name__ == "__main__":
    stream = streams.Stream("full", 0, data_fakes.CountingStep(sys.argv[2]), 0, 50, 2, 4)
    held = [stream.next()["x"] for _ in range(5)]  # e.g. the device prefetch queue
    assert [int(x[0]) for x in held] == [0, 1, 2, 3, 4], held
    stream.close()  # drops the steps still buffered in this process and in the workers
    print("CLOSED", flush=True)
    os._exit(0)  # no garbage collection: the held steps are still alive at exit
"""


def test_a_stream_with_workers_leaves_no_shared_memory_to_unlink(tmp_path):
    """Steps read from Grain workers live in shared memory. Once closed, a stream leaves no
    shared memory name behind, neither of the steps this process still holds at exit nor of
    those it had buffered: multiprocessing's resource_tracker reports no leak of shared memory,
    even after an exit without garbage collection (os._exit; the tracker then reports the
    semaphores of Grain's queues, which no finalizer released: not what this test is about)."""
    script = tmp_path / "holds_steps.py"
    script.write_text(_HOLDS_STEPS_AT_EXIT)
    calls = tmp_path / "calls"
    calls.mkdir()
    out = subprocess.run(
        [sys.executable, str(script), str(pathlib.Path(__file__).parent), str(calls)],
        env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "CLOSED" in out.stdout, log[-3000:]
    assert "leaked shared_memory" not in log and "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------------- hosts


def _videos_held(batch, data, mode) -> list[int]:
    """The dataset indices a batch says its rows hold (its "index", -1: empty slot), after
    checking each row against the video it names: that video's label and frame count (whole,
    or K = 4 in mode "sampled"); empty slots have no frames."""
    index = batch["index"]
    assert index.dtype == np.int32 and index.shape == batch["batch_mask"].shape
    real = index >= 0
    np.testing.assert_array_equal(batch["batch_mask"], real)
    videos = index[real]
    np.testing.assert_array_equal(batch["label"][real], data.labels[videos])
    frames = data.lengths[videos] if mode == "full" else np.full(len(videos), 4)
    np.testing.assert_array_equal(batch["mask"][real].sum(1), frames)
    assert not batch["mask"][~real].any() and not batch["video"][~real].any()
    return videos.tolist()


@pytest.mark.parametrize("mode", ["full", "sampled"])
@pytest.mark.parametrize("processes, devices", [(1, 4), (2, 2), (3, 2)])
def test_every_training_video_once_per_epoch_by_the_batches_indices(
    data_dir, mode, processes, devices
):
    """Over all processes, the batches' own indices (not the plan's rows) name every training
    video exactly once per epoch, across two epochs read as one stream; every process runs the
    same shape at every step."""
    cfg = _config(data_dir, "long_tiny", train__batch_size=12)
    hosts = [pipeline.TrainData(cfg, **_layout(pi, processes, devices)) for pi in range(processes)]
    steps = {h.steps_per_epoch(mode) for h in hosts}
    assert len(steps) == 1
    steps = steps.pop()
    for epoch in (0, 1):
        per_host = [list(h.iterator(mode, epoch=epoch)) for h in hosts]
        assert all(len(batches) == steps for batches in per_host)
        seen = collections.Counter()
        for step in range(steps):
            shapes = {batches[step]["video"].shape for batches in per_host}
            assert len(shapes) == 1  # the same (b, L) on every host
            for h, batches in zip(hosts, per_host):
                seen.update(_videos_held(batches[step], h, mode))
        assert seen == collections.Counter(range(16)), (epoch, seen)
    for h in hosts:
        h.close()


@pytest.mark.parametrize("mode", ["full", "sampled"])
def test_every_test_video_once_per_evaluation_by_the_batches_indices(data_dir, mode):
    """1 process x 4 devices and 2 processes x 1 device: the batches' own indices name every
    test video exactly once per evaluation, each with the same frames in both layouts."""
    cfg = _config(data_dir, "long_tiny", eval__batch_size=4)
    single = pipeline.EvalData(cfg, **_layout(ld=4))
    reference = collections.defaultdict(list)
    for batch in single.iterator(mode):
        for r, video in zip(np.flatnonzero(batch["batch_mask"]), _videos_held(batch, single, mode)):
            reference[video].append(batch["video"][r][batch["mask"][r]])
    assert sorted(reference) == list(range(8)) and {len(v) for v in reference.values()} == {1}
    seen = collections.Counter()
    hosts = [pipeline.EvalData(cfg, **_layout(pi, 2, 1)) for pi in range(2)]
    assert hosts[0].num_steps(mode) == hosts[1].num_steps(mode)
    per_host = [list(h.iterator(mode)) for h in hosts]
    for step in range(hosts[0].num_steps(mode)):
        assert per_host[0][step]["video"].shape == per_host[1][step]["video"].shape
        for h, batches in zip(hosts, per_host):
            batch = batches[step]
            for r, video in zip(np.flatnonzero(batch["batch_mask"]), _videos_held(batch, h, mode)):
                seen[video] += 1
                np.testing.assert_array_equal(
                    batch["video"][r][batch["mask"][r]], reference[video][0]
                )
    assert seen == collections.Counter(range(8))


def test_a_record_other_than_the_planned_one_is_a_data_error(data_dir, monkeypatch):
    """A reader that got another video's record than the plan's (here every read shifted by
    one record) is caught: the record's video_id names another dataset index."""
    read = records.Records.__getitem__
    monkeypatch.setattr(records.Records, "__getitem__", lambda self, i: read(self, (i + 1) % 6))
    data = pipeline.EvalData(_config(data_dir), **_layout(ld=4))
    planned = int(data.plan("full").rows(0, 0)[0])
    got = (planned + 1) % 6
    with pytest.raises(pipeline.DataError) as e:
        next(iter(data.iterator("full")))
    assert str(e.value).startswith(f"video {data.video_ids[planned]!r} in ")  # file, record
    assert (
        f"of split 'test': the plan reads it as video {planned}, but the record holds "
        f"{data.video_ids[got]!r}, which the frame index lists as video {got}"
    ) in str(e.value)
    assert "rebuild the data set" in str(e.value)


# --------------------------------------------------------------------------- errors


def test_config_errors_name_the_field(data_dir):
    def error(**overrides):
        with pytest.raises(config_lib.ConfigError) as e:
            pipeline.TrainData(_config(data_dir, **overrides), **_layout(ld=2))
        return str(e.value)

    assert "config.data.frames_per_device" in error(data__frames_per_device=4)
    assert "config.data.bucket_lengths cannot hold the longest video (24 frames" in error(
        data__bucket_lengths=(8, 16)
    )
    assert "config.data.resize_short" in error(data__crop_size=64)
    assert "config.data.crop_scales" in error(data__crop_scales=(1.5,))
    assert "'validation'" in error(data__train_split="validation")
    with pytest.raises(config_lib.ConfigError, match="config.train.batch_size"):
        pipeline.TrainData(_config(data_dir, train__batch_size=3), **_layout(ld=2)).plan("sampled")
    with pytest.raises(config_lib.ConfigError, match="config.eval.batch_size"):
        pipeline.EvalData(_config(data_dir, eval__batch_size=5), **_layout(ld=2)).num_steps(
            "sampled"
        )
    bad = _config(data_dir)
    del bad.data["hflip"]
    with pytest.raises(config_lib.ConfigError, match="hflip"):
        pipeline.TrainData(bad, **_layout())


def test_corrupt_files_at_build_per_config_flag(tmp_path):
    manual = tmp_path / "manual"
    expected = data_fakes.write_something_something_v1(manual)["default"]
    (manual / "20bn-something-something-v1" / "4242" / "00002.jpg").write_bytes(b"broken")
    cfg = _config(tmp_path / "a", "", data__name="something_something_v1")
    cfg.data.update(dict(manual_dir=str(manual), eval_split="validation", skip_corrupt=False))
    cfg.data.resize_short = cfg.data.crop_size = 16
    with pytest.raises(video_lib.VideoDecodeError, match="4242.*00002.jpg"):
        pipeline.dataset_info(cfg.data)
    cfg.data.skip_corrupt = True
    info = pipeline.dataset_info(cfg.data)
    assert info["num_examples"] == {"train": len(expected["train"]) - 1, "validation": 2}
    data = pipeline.TrainData(cfg, **_layout())
    batch = next(iter(data.iterator("full", epoch=0)))
    assert batch["video"].shape[2:] == (16, 16, 3)


def test_trainer_build_has_the_cli_corrupt_video_policy(tmp_path, capsys):
    """The trainer's automatic build and `python -m fva_jax.data.build` share one default: a
    corrupt video stops the build, named with both ways to skip it; skipping prints each one."""
    # The CLI's default, read from its --helpfull in a process of its own (importing the module
    # here would define its absl flags a second time beside fva_jax.main's).
    helpfull = subprocess.run(
        [sys.executable, "-m", "fva_jax.data.build", "--helpfull"],
        capture_output=True,
        text=True,
    ).stdout  # absl exits 1 after --helpfull
    cli_default = re.search(r"--\[no\]skip_corrupt:.*?\(default: '(\w+)'\)", helpfull, re.S)
    assert config_lib.default_config().data.skip_corrupt is False
    assert cli_default.group(1) == "false", helpfull
    manual = tmp_path / "manual"
    data_fakes.write_something_something_v1(manual)
    bad = manual / "20bn-something-something-v1" / "4242"
    (bad / "00002.jpg").write_bytes(b"broken")
    cfg = _config(tmp_path / "a", "", data__name="something_something_v1")
    cfg.data.update(dict(manual_dir=str(manual), eval_split="validation"))
    with pytest.raises(video_lib.VideoDecodeError) as e:
        pipeline.dataset_info(cfg.data)
    assert str(bad) in str(e.value)
    assert "--skip_corrupt" in str(e.value) and "--config.data.skip_corrupt=True" in str(e.value)
    cfg.data.skip_corrupt = True
    pipeline.dataset_info(cfg.data)
    assert f"something_something_v1/default/train: 2 videos, 1 corrupt skipped: {bad}" in (
        capsys.readouterr().out
    )


def _rewrite_record(shard, position, change):
    """Rewrites record `position` of an ArrayRecord shard with change(tf.Example)."""
    from array_record.python import array_record_data_source, array_record_module  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

    with array_record_data_source.ArrayRecordDataSource([str(shard)]) as source:
        raw = [source[i] for i in range(len(source))]
    ex = tf_example_pb2.Example.FromString(raw[position])
    change(ex.features.feature)
    raw[position] = ex.SerializeToString()
    writer = array_record_module.ArrayRecordWriter(str(shard), "group_size:1")
    for r in raw:
        writer.write(r)
    writer.close()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("count", r"the frame index says \d+ frames of 'test/\d+', the record holds \d+"),
        ("frames", r"stored num_frames is \d+ but it holds \d+ frames"),
        ("jpeg", r"frame 1 cannot be decoded"),
        ("empty", r"has zero frames"),
        # Record 2 holds another video's id (that of record 3, or one the index lacks).
        (
            "id",
            r"the plan reads it as video 2, but the record holds 'ID3', which the frame "
            r"index lists as video 3",
        ),
        (
            "unknown id",
            r"the plan reads it as video 2, but the record holds 'test/none', "
            r"which the frame index of this split does not list",
        ),
    ],
)
def test_files_changed_after_build_are_named_at_read_time(tmp_path, damage, message):
    builder = builders.get_builder("sparse_events", "tiny", str(tmp_path))
    builders.prepare(builder)
    (shard,) = builder.info.splits["test"].file_instructions
    ids = records.read_frame_index(builder)[os.path.basename(shard.filename)]["video_id"]
    video_id = ids[2]
    message = message.replace("ID3", ids[3])

    def change(feature):
        jpegs, count = feature["video"].bytes_list.value, feature["num_frames"].int64_list.value
        if damage in ("id", "unknown id"):
            feature["video_id"].bytes_list.value[:] = [
                (ids[3] if damage == "id" else "test/none").encode()
            ]
        elif damage == "count":  # consistent record, but not what the index says
            del jpegs[-1]
            count[0] -= 1
        elif damage == "frames":
            count[0] += 1
        elif damage == "jpeg":
            jpegs[1] = b"not a jpeg"
        else:
            del jpegs[:]
            count[0] = 0

    _rewrite_record(shard.filename, 2, change)
    data = pipeline.EvalData(_config(tmp_path), **_layout())
    with pytest.raises(pipeline.DataError, match=f"'{video_id}'.*" + message) as e:
        list(data.iterator("full"))
    assert "sparse_events-test.array_record" in str(e.value)


# --------------------------------------------------------------------------- no TensorFlow


def test_reads_batches_without_tensorflow(data_dir):
    """In a process where `import tensorflow` fails (an import hook first on sys.meta_path),
    the pipeline reads training and evaluation batches, in this process and in Grain
    workers, and TensorFlow is never imported."""
    script = textwrap.dedent(
        f"""
        import importlib.util, sys

        class BlockTensorFlow:
            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow" or name.startswith("tensorflow."):
                    return importlib.util.spec_from_loader(name, self)
                return None

            def create_module(self, spec):
                raise ImportError(f"{{spec.name}} is blocked in this test")

            def exec_module(self, module):
                raise ImportError("unreachable")

        sys.meta_path.insert(0, BlockTensorFlow())

        def main():
            try:
                import tensorflow  # noqa: F401
            except ImportError:
                pass
            else:
                raise SystemExit("the hook did not block tensorflow")
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            import test_pipeline as t
            from fva_jax.data import pipeline
            for workers in (0, 1):
                cfg = t._config({str(data_dir)!r}, "long_tiny", data__num_workers=workers)
                train = pipeline.TrainData(cfg, **t._layout(ld=2))
                n = sum(b["mask"].sum() for e in (0, 1) for b in train.iterator("full", epoch=e))
                assert n == 2 * train.lengths.sum(), n
                train.close()
                ev = pipeline.EvalData(cfg, **t._layout(ld=2))
                assert sum(b["batch_mask"].sum() for b in ev.iterator("sampled")) == 8
            print("tensorflow imported:", "tensorflow" in sys.modules)

        if __name__ == "__main__":
            main()
        """
    )
    path = data_dir / "no_tf.py"
    path.write_text(script)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tensorflow imported: False" in out.stdout


def test_long_config_lengths_are_breakfast_like():
    spec = se.LONG_SPEC
    lengths = [se.video_length(spec, "train", i) for i in range(spec.num_train)]
    assert 300 <= min(lengths) and max(lengths) <= 9000 and max(lengths) > 6000
    assert 1800 < np.mean(lengths) < 3000 and spec.size == 32
    i = int(np.argmin(lengths))  # make_video draws the same length (shortest video: cheap)
    assert se.make_video(spec, "train", i)["num_frames"] == lengths[i]
    tiny = se.LONG_TINY_SPEC
    assert [se.video_length(tiny, "train", i) for i in range(3)] == [
        se.make_video(tiny, "train", i)["num_frames"] for i in range(3)
    ]
