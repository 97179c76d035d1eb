"""Tests for fva_jax.tools.predict and fva_jax.tools.user_video: every frame of the user's
video, whatever cap or stride the run trained with, and a printed count of the frames used.

The run directory is written directly (config.json, dataset_info.json, an orbax checkpoint of
a tiny model with random variables), without training.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from fva_jax import config_lib
from fva_jax.data import video as video_lib
from fva_jax.models import full_video
from fva_jax.tools import predict, user_video
from fva_jax.training import checkpoints, steps

NUM_FRAMES = 37  # longer than the run's cap (16) and not a multiple of its chunk size (8)
CLASS_NAMES = ["walk", "jump", "wave"]


def _clip(num_frames=NUM_FRAMES, h=24, w=32, seed=0):
    """uint8 (T, h, w, 3): coarse random blocks drifting by a pixel per frame, with a scene
    change every 9 frames, so that the frames differ and the clustering has something to cut."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in range(num_frames):
        if t % 9 == 0:
            coarse = rng.integers(0, 256, (h // 4, w // 4 + 2, 3), dtype=np.uint8)
            texture = np.repeat(np.repeat(coarse, 4, axis=0), 4, axis=1)
        frames.append(np.roll(texture, t, axis=1)[:, :w])
    return np.stack(frames)


def _frame_folder(path, frames):
    """A folder of PNG frames (lossless: decoding gives `frames` back exactly)."""
    path.mkdir()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(path / f"{t:05d}.png")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, model, variables) of a run trained on clips capped at 16 frames and strided by
    2, as fva_jax.training.train leaves it: config.json, dataset_info.json, checkpoints/<step>/."""
    config = config_lib.default_config()
    config.data.update(max_frames=16, frame_stride=2, resize_short=24, crop_size=16)
    config.model.update(
        backbone="resnet18", width=8, num_clusters=3, cluster_method="cumulative", chunk_size=8
    )
    model = full_video.FullVideoModel(num_classes=len(CLASS_NAMES), **steps.model_kwargs(config))
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0),
            jnp.zeros((1, 2, 16, 16, 3), jnp.uint8),
            jnp.ones((1, 2), bool),
            train=False,
        )
    )
    # Random values (no init compile); running variances kept positive.
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            np.abs(rng.normal(size=v.shape)) + 0.5
            if p[-1].key == "var"
            else rng.normal(size=v.shape) * 0.3
        ).astype(np.float32),
        shapes,
    )
    workdir = tmp_path_factory.mktemp("run")
    (workdir / checkpoints.CONFIG_FILE).write_text(json.dumps(config_lib.to_dict(config)))
    (workdir / checkpoints.DATASET_INFO_FILE).write_text(
        json.dumps({"num_classes": 3, "class_names": CLASS_NAMES, "num_examples": {}})
    )
    mngr = ocp.CheckpointManager(workdir / "checkpoints")
    state = {
        "step": np.int32(3),
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": {},
        "rng": np.zeros(2, np.uint32),
    }
    mngr.save(
        3, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({}))
    )
    mngr.wait_until_finished()
    mngr.close()
    return workdir, model, variables


def _direct(model, variables, frames):
    """The model in eval mode on exactly these frames: no padding, every frame valid."""
    logits, seg = model.apply(
        variables, jnp.asarray(frames[None]), jnp.ones((1, len(frames)), bool), train=False
    )
    return np.asarray(logits[0]), np.asarray(seg[0])


def _softmax(logits):
    z = np.asarray(logits, np.float64)
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


def _printed(text):
    """{path: (header after "path: ", {class: p}, [(id, first, last, size)])} of predict's
    output."""
    out, current = {}, None
    for line in text.splitlines():
        if m := re.fullmatch(r"(\S+): (\d+ of \d+ frames.*)", line):
            current = out.setdefault(m.group(1), (m.group(2), {}, []))
        elif m := re.fullmatch(r"  (\d\.\d{4})  (\S+)", line):
            current[1][m.group(2)] = float(m.group(1))
        elif m := re.fullmatch(r"    #(\d+): (\d+)-(\d+) \((\d+)\)", line):
            current[2].append(tuple(int(g) for g in m.groups()))
    return out


def test_clip_longer_than_the_training_cap_is_used_whole(run, tmp_path, capsys):
    workdir, model, variables = run
    frames = _clip()
    folder = _frame_folder(tmp_path / "clip", frames)
    (result,) = predict.main([f"--workdir={workdir}", str(folder)])
    text = capsys.readouterr().out
    assert "trained with data.frame_stride 2, data.max_frames 16; predict uses every frame" in text
    header, probabilities, segments = _printed(text)[str(folder)]
    assert header == f"{NUM_FRAMES} of {NUM_FRAMES} frames"
    assert (result["frames"], result["total_frames"]) == (NUM_FRAMES, NUM_FRAMES)

    # The plain computation: the centre 16 px (resize_short 24 = the frames' short side), all
    # 37 frames, unpadded. predict pads to 40 (a multiple of chunk_size 8) and masks the rest.
    logits, seg = _direct(model, variables, frames[:, 4:20, 8:24])
    np.testing.assert_allclose(result["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result["segment_ids"], seg)
    assert len(np.unique(seg)) == 3  # three segments to check, not one
    probs = _softmax(logits)
    assert list(probabilities) == [CLASS_NAMES[i] for i in np.argsort(-probs, kind="stable")]
    for name, p in probabilities.items():
        assert p == pytest.approx(probs[CLASS_NAMES.index(name)], abs=6e-5), name
    assert segments == [
        (k, int(np.flatnonzero(seg == k)[0]), int(np.flatnonzero(seg == k)[-1]), (seg == k).sum())
        for k in np.unique(seg)
    ]
    assert sum(s[3] for s in segments) == NUM_FRAMES


def test_stride_and_cap_flags_drop_frames_and_say_how_many(run, tmp_path, capsys):
    workdir, model, variables = run
    frames = _clip()
    path = video_lib.encode_video(tmp_path / "clip.mp4", frames)
    folder = _frame_folder(tmp_path / "clip", frames)
    results = predict.main(
        [f"--workdir={workdir}", "--stride=2", "--max-frames=10", str(path), str(folder)]
    )
    printed = _printed(capsys.readouterr().out)
    # Frames 0, 2, ..., 18 of 37: the cap ended the decode, the container's count gives 37.
    for result in results:
        header, _, segments = printed[result["path"]]
        assert header == "10 of 37 frames (--stride 2 --max-frames 10 dropped 27)"
        assert (result["frames"], result["total_frames"]) == (10, 37)
        # Segments in source frame numbers: every used frame is an even source frame.
        assert segments[0][1] == 0 and segments[-1][2] == 18
        assert all(first % 2 == 0 and last % 2 == 0 for _, first, last, _ in segments)
    # The lossless folder: exactly the model on source frames 0, 2, ..., 18.
    logits, seg = _direct(model, variables, frames[0:20:2, 4:20, 8:24])
    np.testing.assert_allclose(results[1]["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(results[1]["segment_ids"], seg)

    # A stride alone; a cap that is not reached drops nothing and is not named.
    (result,) = predict.main([f"--workdir={workdir}", "--stride=3", "--max-frames=50", str(folder)])
    header = _printed(capsys.readouterr().out)[str(folder)][0]
    assert header == "13 of 37 frames (--stride 3 dropped 24)"
    assert result["segments"][-1][2] == 36


def test_predict_flag_errors(run):
    workdir, _, _ = run
    for flag in ("--stride=0", "--max-frames=0"):
        with pytest.raises(SystemExit):
            predict.main([f"--workdir={workdir}", flag, "x.mp4"])


def test_read_counts_every_frame_of_the_video(tmp_path):
    frames = _clip(20, seed=2)
    mp4 = video_lib.encode_video(tmp_path / "a.mp4", frames)
    webm = video_lib.encode_video(tmp_path / "a.webm", frames)  # declares no frame count
    folder = _frame_folder(tmp_path / "a", frames)
    assert video_lib.probe_video(webm)["num_frames"] == 0
    for path in (mp4, webm, folder):
        whole = user_video.read(path)
        assert (whole.used, whole.total, whole.describe()) == (20, 20, "20 of 20 frames")
        # 0 is "no cap", as in the configs.
        assert user_video.read(path, max_frames=0).describe() == "20 of 20 frames"
        capped = user_video.read(path, max_frames=6)
        assert capped.describe() == "6 of 20 frames (--max-frames 6 dropped 14)"
        strided = user_video.read(path, stride=3, max_frames=100)
        assert strided.describe() == "7 of 20 frames (--stride 3 dropped 13)"
        np.testing.assert_array_equal(strided.frame_numbers, np.arange(0, 20, 3))
        np.testing.assert_array_equal(
            user_video.read(path, stride=3, resize=12).frames,
            video_lib.decode_video(path, stride=3, resize=12),
        )
    np.testing.assert_array_equal(user_video.read(folder, stride=3).frames, frames[::3])
    # A declared count that the decoded frames contradict is not believed: frames are counted.
    assert user_video.count_frames(mp4, kept=3, stride=2, capped=False) == 20
    with pytest.raises(video_lib.VideoDecodeError, match="missing.mp4"):
        user_video.read(tmp_path / "missing.mp4")


def test_padded_length_is_the_next_multiple_of_the_chunk():
    assert [predict.padded_length(n, 8) for n in (1, 7, 8, 9, 37, 40)] == [8, 8, 8, 16, 40, 40]


def test_eval_preprocess_is_the_pipelines_centre_crop():
    """Non-square frames: the centre square of side round(30 * 16 / 24) = 20, shrunk to 16 px
    with OpenCV's area averaging as the pipeline's evaluation (enlarged bilinearly when the
    square is smaller than the crop)."""
    import cv2

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (9, 30, 40, 3), dtype=np.uint8)
    cfg = config_lib.default_config().data
    for resize_short, crop_size, (y, x, side), interpolation in (
        (24, 16, (5, 10, 20), cv2.INTER_AREA),
        (60, 24, (9, 14, 12), cv2.INTER_LINEAR),
        (30, 30, (0, 5, 30), None),
    ):
        cfg.update(resize_short=resize_short, crop_size=crop_size)
        got = predict.eval_preprocess(frames, cfg)
        crops = frames[:, y : y + side, x : x + side]
        if interpolation is not None:
            crops = [
                cv2.resize(c, (crop_size, crop_size), interpolation=interpolation) for c in crops
            ]
        np.testing.assert_array_equal(got, np.stack(crops), err_msg=str((resize_short, crop_size)))
