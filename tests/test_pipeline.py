"""tf.data pipeline: shapes, masks, crop geometry, determinism, resume, multi-host eval."""

import collections
import hashlib
import io
import json

import data_fakes
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from fva_jax.data import pipeline
from fva_jax.data.video import VideoDecodeError


def _config(data_dir, **kw):
    c = ml_collections.ConfigDict(
        dict(
            name="sparse_events",
            builder_config="tiny",
            data_dir=str(data_dir),
            manual_dir="",
            train_split="train",
            eval_split="test",
            max_frames=16,
            frame_stride=1,
            resize_short=32,
            crop_size=24,
            crop_scales=(1.0, 0.875, 0.75, 0.66),
            hflip=True,
            shuffle_buffer=8,
            skip_corrupt=False,
        )
    )
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    pipeline.get_builder(_config(d))  # builds sparse_events/tiny (12 train, 6 test)
    return d


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def _ids(batch):
    """Content hash of each real example (identifies a video when crops are fixed)."""
    return [
        hashlib.md5(batch["video"][i].tobytes()).hexdigest() + f"/{batch['label'][i]}"
        for i in range(len(batch["label"]))
        if batch["batch_mask"][i]
    ]


# --------------------------------------------------------------------------- batches


def test_dataset_info(data_dir):
    info = pipeline.dataset_info(_config(data_dir))
    assert info["num_classes"] == 4
    assert info["class_names"][:2] == ["red_square", "green_disc"]
    assert info["num_examples"] == {"train": 12, "test": 6}


def test_train_batch_shapes_and_masks(data_dir):
    cfg = _config(data_dir, max_frames=10, frame_stride=2)
    batch = next(
        pipeline.train_iterator(cfg, batch_size=4, seed=0, process_index=0, process_count=1)
    )
    assert batch["video"].shape == (4, 10, 24, 24, 3) and batch["video"].dtype == np.uint8
    assert batch["mask"].shape == (4, 10) and batch["mask"].dtype == bool
    assert batch["label"].dtype == np.int32 and batch["batch_mask"].all()
    # tiny videos have 12..24 frames: stride 2 keeps 6..12, capped at 10.
    n = batch["mask"].sum(1)
    assert ((n >= 6) & (n <= 10)).all()
    for i in range(4):  # mask is a prefix; padded frames are zero
        np.testing.assert_array_equal(batch["mask"][i], np.arange(10) < n[i])
        assert not batch["video"][i, n[i] :].any() and batch["video"][i, : n[i]].any()


def test_eval_masks_and_labels_match_stored_videos(data_dir):
    cfg = _config(data_dir, max_frames=8, frame_stride=3)
    b = pipeline.get_builder(cfg)
    stored = list(tfds.as_numpy(b.as_dataset(split="test", shuffle_files=False)))
    batches = list(pipeline.eval_iterator(cfg, batch_size=4, process_index=0, process_count=1))
    assert len(batches) == 2
    mask = np.concatenate([x["mask"] for x in batches])
    labels = np.concatenate([x["label"] for x in batches])
    bmask = np.concatenate([x["batch_mask"] for x in batches])
    np.testing.assert_array_equal(bmask, [True] * 6 + [False] * 2)
    for i, ex in enumerate(stored):  # eval order = stored order
        assert labels[i] == ex["label"]
        assert mask[i].sum() == min(-(-ex["num_frames"] // 3), 8)
    assert not mask[6:].any()


# --------------------------------------------------------------------------- preprocess


def _gradient_jpegs(n, h=48, w=64, quality=100):
    """n identical frames whose red channel = 4*x and green = 4*y (crop geometry readout)."""
    y, x = np.mgrid[0:h, 0:w]
    f = np.stack([x * 4, y * 4, np.full_like(x, 128)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(f).save(buf, format="JPEG", quality=quality)
    return f, [buf.getvalue()] * n


def _pre(cfg, jpegs, train, seed=(0, 0)):
    ex = {"video": tf.constant(jpegs), "label": tf.constant(3, tf.int64)}
    out = pipeline.preprocess(ex, cfg, train, tf.constant(seed, tf.int64) if train else None)
    return {k: v.numpy() for k, v in out.items()}


def test_stride_cap_pad_and_centre_crop_match_numpy(tmp_path):
    frames = [np.full((32, 48, 3), 20 * i, np.uint8) for i in range(10)]
    for f in frames:
        f[:4, :4] = 255
    jpegs = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    cfg = _config(tmp_path, max_frames=5, frame_stride=3, resize_short=32, crop_size=16)
    out = _pre(cfg, jpegs, train=False)
    # Frames 0, 3, 6, 9 then one padding frame.
    np.testing.assert_array_equal(out["mask"], [1, 1, 1, 1, 0])
    np.testing.assert_allclose(out["video"][:4].mean(axis=(1, 2, 3)), [0, 60, 120, 180], atol=2)
    assert not out["video"][4].any() and out["label"] == 3 and out["batch_mask"]
    # Centre crop of 16/32 of the shorter side = rows 8:24, cols 16:32, no resize needed.
    ref = tf.io.decode_jpeg(jpegs[3]).numpy()[8:24, 16:32]
    np.testing.assert_array_equal(out["video"][1], ref)


def test_centre_crop_geometry_with_resize(tmp_path):
    f, jpegs = _gradient_jpegs(3)
    # Shorter side 48; a 24 crop of 32 -> 36 px of the stored frame, centred (rows 6:42,
    # cols 14:50), resized to 24: compare with PIL's antialiased bilinear resize.
    cfg = _config(tmp_path, max_frames=3, resize_short=32, crop_size=24)
    v = _pre(cfg, jpegs, train=False)["video"][0].astype(float)
    decoded = tf.io.decode_jpeg(jpegs[0]).numpy()
    ref = np.asarray(Image.fromarray(decoded[6:42, 14:50]).resize((24, 24), Image.BILINEAR), float)
    assert np.abs(v - ref).mean() < 1.5 and np.abs(v - ref).max() < 8
    # Red encodes 4*x: the crop is centred on x = 31.5 (pixels 14..49), green on y = 23.5.
    assert abs(v[..., 0].mean() / 4 - 31.5) < 0.5 and abs(v[..., 1].mean() / 4 - 23.5) < 0.5


def test_train_crop_follows_tsn_multiscale_and_is_shared_by_frames(tmp_path):
    f, jpegs = _gradient_jpegs(4)
    scales = (1.0, 0.875, 0.75, 0.66)
    allowed = {(round(a * 48), round(b * 48)) for a, b in pipeline._tsn_scale_pairs(scales)}
    cfg = _config(tmp_path, max_frames=4, resize_short=48, crop_size=24, crop_scales=scales)
    sizes, flips = set(), collections.Counter()
    for s in range(40):
        v = _pre(cfg, jpegs, train=True, seed=(7, s))["video"]
        for t in range(1, 4):  # one crop (and flip) for every frame of the video
            np.testing.assert_array_equal(v[t], v[0])
        red, green = v[0, :, :, 0].astype(float) / 4, v[0, :, :, 1].astype(float) / 4
        flipped = red[:, 0].mean() > red[:, -1].mean()
        flips[flipped] += 1
        x0, x1 = sorted([red[:, 0].mean(), red[:, -1].mean()])
        y0, y1 = green[0].mean(), green[-1].mean()
        # Endpoints are pixel centres: extent = (last - first) * crop / (crop - 1).
        cw, ch = (x1 - x0) * 24 / 23, (y1 - y0) * 24 / 23
        match = min(allowed, key=lambda a: abs(a[0] - ch) + abs(a[1] - cw))
        assert abs(match[0] - ch) < 2 and abs(match[1] - cw) < 2, (ch, cw)
        sizes.add(match)
        assert -1 < x0 and x1 < 64 and -1 < y0 and y1 < 48
    assert len(sizes) >= 4  # several scale pairs are drawn
    assert 8 <= flips[True] <= 32  # flips about half of the videos
    # The same seed reproduces the crop; hflip=False never flips.
    np.testing.assert_array_equal(
        _pre(cfg, jpegs, True, (7, 3))["video"], _pre(cfg, jpegs, True, (7, 3))["video"]
    )
    cfg.hflip = False
    for s in range(10):
        red = _pre(cfg, jpegs, True, (7, s))["video"][0, :, :, 0].astype(float)
        assert red[:, 0].mean() < red[:, -1].mean()


# --------------------------------------------------------------------------- determinism


def test_deterministic_order_and_epochs(data_dir):
    cfg = _config(data_dir)
    kw = dict(batch_size=4, process_index=0, process_count=1)
    a = _take(pipeline.train_iterator(cfg, seed=3, **kw), 6)  # 3 batches per epoch
    b = _take(pipeline.train_iterator(cfg, seed=3, **kw), 6)
    assert all(_same(x, y) for x, y in zip(a, b))
    c = _take(pipeline.train_iterator(cfg, seed=4, **kw), 3)
    assert not all(_same(x, y) for x, y in zip(a, c))
    # Epoch 2 is another permutation of the same 12 videos (check with fixed crops).
    fixed = _config(data_dir, crop_scales=(1.0,), hflip=False, crop_size=32)
    e = _take(pipeline.train_iterator(fixed, seed=3, **kw), 6)
    ep0 = [i for x in e[:3] for i in _ids(x)]
    ep1 = [i for x in e[3:] for i in _ids(x)]
    assert len(set(ep0)) == 12 and sorted(ep0) == sorted(ep1) and ep0 != ep1


@pytest.mark.parametrize("consumed", [2, 3, 4])  # mid-epoch, epoch end, next epoch
def test_resume_from_state_gives_same_next_batch(data_dir, consumed):
    cfg = _config(data_dir)
    kw = dict(batch_size=4, seed=5, process_index=0, process_count=1)
    it = pipeline.train_iterator(cfg, **kw)
    ref = _take(it, consumed + 2)
    it = pipeline.train_iterator(cfg, **kw)
    _take(it, consumed)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in a checkpoint
    resumed = pipeline.train_iterator(cfg, state=state, **kw)
    got = _take(resumed, 2)
    assert _same(got[0], ref[consumed]) and _same(got[1], ref[consumed + 1])
    with pytest.raises(ValueError, match="seed"):
        pipeline.train_iterator(cfg, **{**kw, "seed": 6}, state=state)


def test_train_hosts_read_disjoint_slices(data_dir):
    cfg = _config(data_dir, crop_scales=(1.0,), hflip=False, crop_size=32)
    seen = []
    for host in range(2):
        it = pipeline.train_iterator(cfg, batch_size=3, seed=0, process_index=host, process_count=2)
        assert it.batches_per_epoch == 2
        seen.append({i for x in _take(it, 2) for i in _ids(x)})
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]


@pytest.mark.parametrize("batch_size", [2, 4])
def test_eval_every_video_exactly_once_across_hosts(data_dir, batch_size):
    cfg = _config(data_dir, eval_split="test[:5]")  # 5 videos: hosts get 3 and 2
    single = [
        i
        for x in pipeline.eval_iterator(cfg, batch_size=5, process_index=0, process_count=1)
        for i in _ids(x)
    ]
    assert len(single) == 5
    seen, lengths = [], []
    for host in range(2):
        ev = pipeline.eval_iterator(cfg, batch_size=batch_size, process_index=host, process_count=2)
        batches = list(ev)
        assert len(batches) == len(ev)
        lengths.append(len(batches))
        for x in batches:
            assert x["video"].shape[0] == batch_size
            pad = ~x["batch_mask"]
            assert not x["mask"][pad].any() and not x["video"][pad].any()
            seen += _ids(x)
    assert lengths[0] == lengths[1] == -(-3 // batch_size)  # same number of steps per host
    assert collections.Counter(seen) == collections.Counter(single)


# --------------------------------------------------------------------------- errors


def test_config_errors_name_the_field(data_dir):
    with pytest.raises(ValueError, match="crop_size"):
        pipeline.train_iterator(
            _config(data_dir, crop_size=64), batch_size=2, seed=0, process_index=0, process_count=1
        )
    with pytest.raises(ValueError, match="crop_scales"):
        pipeline.eval_iterator(
            _config(data_dir, crop_scales=(1.5,)), batch_size=2, process_index=0, process_count=1
        )
    with pytest.raises(ValueError, match="fewer than the per-host batch size"):
        pipeline.train_iterator(
            _config(data_dir), batch_size=13, seed=0, process_index=0, process_count=1
        )
    bad = _config(data_dir)
    del bad["hflip"]
    with pytest.raises(ValueError, match="hflip"):
        pipeline.dataset_info(bad)


def test_corrupt_files_per_config_flag(tmp_path):
    manual = tmp_path / "manual"
    expected = data_fakes.write_something_something_v1(manual)["default"]
    (manual / "20bn-something-something-v1" / "4242" / "00002.jpg").write_bytes(b"broken")
    cfg = _config(
        tmp_path / "a",
        name="something_something_v1",
        builder_config="",
        manual_dir=str(manual),
        train_split="train",
        eval_split="validation",
        resize_short=16,
        crop_size=16,
    )
    with pytest.raises(VideoDecodeError, match="4242.*00002.jpg"):
        pipeline.dataset_info(cfg)
    cfg.skip_corrupt = True
    info = pipeline.dataset_info(cfg)
    assert info["num_examples"] == {"train": len(expected["train"]) - 1, "validation": 2}
    assert info["num_classes"] == 174
    batch = next(
        pipeline.train_iterator(cfg, batch_size=2, seed=0, process_index=0, process_count=1)
    )
    assert batch["video"].shape == (2, 16, 16, 16, 3)
