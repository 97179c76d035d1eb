"""TFDS builders built from tiny fake copies of the official layouts (tests/data_fakes.py)."""

import json

import data_fakes
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from fva_jax.data import builder_base, builders, official_sets, records
from fva_jax.data import sparse_events as se
from fva_jax.data.video import VideoDecodeError


def _build(name, config, tmp_path, manual_dir, **kw):
    kw.setdefault("num_workers", 0)
    b = builders.get_builder(name, config, str(tmp_path / "tfds"), **kw)
    builders.prepare(b, str(manual_dir))
    return b


def _read(b, split):
    """{video_id: example} through TFDS's own data_source (NumPy decoding, no TensorFlow)."""
    out = {}
    for ex in b.as_data_source(split):
        ex["video"] = np.stack(ex["video"])
        out[ex["video_id"].decode()] = ex
    return out


def _check_split(b, split, expected):
    got = _read(b, split)
    assert sorted(got) == sorted(expected)
    for vid, (label, t, grey) in expected.items():
        ex = got[vid]
        assert ex["label"] == label and ex["num_frames"] == t
        assert ex["video"].shape == (t, data_fakes.H, data_fakes.W, 3)
        # The flat region of the frames carries this file's grey level.
        assert abs(float(ex["video"][:, -8:, -8:].mean()) - grey) < 6, vid


@pytest.mark.parametrize(
    "name,config,class_names",
    [
        ("breakfast", "s1", data_fakes.BREAKFAST_CLASSES),
        ("ucf101", "split1", data_fakes.UCF_CLASSES),
        ("hmdb51", "split2", data_fakes.HMDB_CLASSES),
        ("something_something_v1", "default", data_fakes.SS_CLASSES),
        ("something_something_v2", "default", data_fakes.SS_CLASSES),
    ],
)
def test_builds_official_layout(tmp_path, name, config, class_names):
    expected = data_fakes.WRITERS[name](tmp_path / "manual")[config]
    b = _build(name, config, tmp_path, tmp_path / "manual")
    assert b.info.features["label"].names == class_names
    assert set(b.info.splits) == set(expected)
    for split, exp in expected.items():
        _check_split(b, split, exp)
    # Reading back from data_dir alone (a fresh builder, as the pipeline does).
    again = builders.get_builder(name, config, str(tmp_path / "tfds"))
    assert again.is_prepared()
    assert again.info.features["label"].names == class_names
    assert str(again.version) == "2.0.0" and again.info.file_format.value == "array_record"
    # The frame index lists every record's frame count in data_source order.
    index = records.read_frame_index(again)
    for split, exp in expected.items():
        listed = {}
        for f in again.info.splits[split].file_instructions:
            entry = index[f.filename.split("/")[-1]]
            listed.update(zip(entry["video_id"], entry["num_frames"].tolist()))
        assert listed == {vid: t for vid, (_, t, _) in exp.items()}


def test_something_something_v2_reads_both_label_layouts(tmp_path):
    """Today's labels zip unpacks to labels/{labels,train,validation}.json; the older release
    named them something-something-v2-*.json. Both build the same set; neither names both."""
    built = {}
    for layout in ("current", "older"):
        manual = tmp_path / layout / "manual"
        expected = data_fakes.write_something_something_v2(manual, labels_layout=layout)
        b = _build("something_something_v2", "default", tmp_path / layout, manual)
        assert b.info.features["label"].names == data_fakes.SS_CLASSES
        for split, exp in expected["default"].items():
            _check_split(b, split, exp)
        built[layout] = {s: sorted(_read(b, s)) for s in ("train", "validation")}
    assert built["current"] == built["older"]
    (tmp_path / "current" / "manual" / "labels" / "train.json").unlink()
    with pytest.raises(builders.MissingDataError) as e:
        _build("something_something_v2", "default", tmp_path / "none", tmp_path / "current/manual")
    assert "labels/train.json" in str(e.value)
    assert "something-something-v2-train.json" in str(e.value)


def test_breakfast_other_split_and_storage_resize(tmp_path):
    expected = data_fakes.write_breakfast(tmp_path / "manual")
    b = _build("breakfast", "s3", tmp_path, tmp_path / "manual")
    for split, exp in expected["s3"].items():
        _check_split(b, split, exp)
    # The stereo ch1 near-duplicate is left out; P29 (s3's test range) is in test.
    assert list(_read(b, "test")) == ["P29/cam02/P29_milk.avi"]
    # A custom config bounds storage: shorter side 12 (24x32 -> 12x16), every 2nd frame.
    cfg = builder_base.VideoConfig(name="s1_small", split_index=1, resize_short=12, frame_stride=2)
    small = official_sets.Breakfast(config=cfg, data_dir=str(tmp_path / "tfds2"), num_workers=0)
    builders.prepare(small, str(tmp_path / "manual"))
    ex = _read(small, "test")["P03/cam01/P03_cereals.avi"]
    assert ex["video"].shape == (3, 12, 16, 3) and ex["num_frames"] == 3  # frames 0, 2, 4


def test_parallel_decoding_matches_serial(tmp_path):
    data_fakes.write_hmdb51(tmp_path / "manual")
    serial = _build("hmdb51", "split1", tmp_path / "a", tmp_path / "manual", num_workers=0)
    parallel = _build("hmdb51", "split1", tmp_path / "b", tmp_path / "manual", num_workers=2)
    for split in ("train", "test"):
        a, b = _read(serial, split), _read(parallel, split)
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k]["video"], b[k]["video"])


@pytest.mark.parametrize("name", sorted(data_fakes.WRITERS))
def test_missing_data_explains_where(tmp_path, name):
    empty = tmp_path / "manual"
    empty.mkdir()
    (empty / "unrelated.txt").write_text("x")
    with pytest.raises(builders.MissingDataError) as e:
        _build(name, "", tmp_path, empty)
    msg = str(e.value)
    assert str(empty) in msg and "manual_dir" in msg and "python -m fva_jax.data.build" in msg
    # An empty / missing manual_dir gets the same kind of message.
    with pytest.raises(builders.MissingDataError, match="does not exist or is empty"):
        _build(name, "", tmp_path, tmp_path / "nowhere")


def test_corrupt_file_stops_or_is_skipped(tmp_path, capsys):
    manual = tmp_path / "manual"
    expected = data_fakes.write_ucf101(manual)["split1"]
    bad = manual / "UCF-101" / "Archery" / "v_Archery_g09_c01.avi"  # a train video
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(VideoDecodeError) as e:
        _build("ucf101", "split1", tmp_path / "stop", manual)
    assert str(bad) in str(e.value) and "skip_corrupt" in str(e.value)
    b = _build("ucf101", "split1", tmp_path / "skip", manual, skip_corrupt=True)
    out = capsys.readouterr().out
    assert "ucf101/split1/train: 1 videos, 1 corrupt skipped" in out and str(bad) in out
    assert sorted(_read(b, "train")) == sorted(
        set(expected["train"]) - {"Archery/v_Archery_g09_c01.avi"}
    )
    assert len(expected["train"]) == 2
    assert sorted(_read(b, "test")) == sorted(expected["test"])
    assert b.skipped["train"] == [str(bad)]


def test_skipped_videos_are_all_named(tmp_path, capsys):
    """With skip_corrupt, the split's summary names every skipped video, however many."""
    b = builders.get_builder("ucf101", "split1", str(tmp_path), skip_corrupt=True)
    paths = [f"/data/UCF-101/X/v_X_g{i:02d}_c01.avi" for i in range(25)]
    results = [(p, VideoDecodeError(p, "no video stream")) for p in paths]
    skipped = []
    assert list(b._collect("train", results, skipped)) == [] and skipped == paths
    out = capsys.readouterr().out
    assert "ucf101/split1/train: 0 videos, 25 corrupt skipped: " + ", ".join(paths) in out


def test_unknown_name_and_config():
    with pytest.raises(ValueError, match="known: sparse_events"):
        builders.get_builder("kinetics")
    with pytest.raises(ValueError, match="s1, s2, s3, s4"):
        builders.get_builder("breakfast", "split1")


def test_ucf101_kept_out_of_global_registry():
    # TFDS ships its own (download-based) ucf101; ours must not clash with it.
    assert "sparse_events" in tfds.list_builders(with_community_datasets=False)
    assert tfds.builder_cls("ucf101") is not official_sets.Ucf101


# --------------------------------------------------------------------------- sparse_events


def test_sparse_events_tiny_build_is_deterministic(tmp_path):
    a = _build("sparse_events", "tiny", tmp_path / "a", "")
    b = _build("sparse_events", "tiny", tmp_path / "b", "")
    spec = a.builder_config.spec
    assert a.info.splits["train"].num_examples == spec.num_train
    assert a.info.splits["test"].num_examples == spec.num_test
    assert a.info.features["label"].names == se.class_names(spec.num_classes)
    ra, rb = _read(a, "test"), _read(b, "test")
    assert sorted(ra) == sorted(rb)
    for k, ex in ra.items():
        np.testing.assert_array_equal(ex["video"], rb[k]["video"])
        ref = se.make_video(spec, "test", int(k.split("/")[1]))
        assert ex["label"] == ref["label"] and ex["num_frames"] == ref["num_frames"]
        assert ex["event_start"] == ref["event_start"]
        assert np.abs(ex["video"].astype(int) - ref["video"]).mean() < 4  # JPEG


def _colour_fraction(frame, colour, tol=45):
    return float((np.abs(frame.astype(int) - colour).max(-1) < tol).mean())


def test_sparse_events_event_is_short_and_visible():
    spec = se.SparseEventsSpec()
    hits, lengths = 0, []
    for i in range(60):
        v = se.make_video(spec, "train", i)
        t, s, video = v["num_frames"], v["event_start"], v["video"]
        lengths.append(t)
        assert video.shape == (t, 64, 64, 3) and spec.min_frames <= t <= spec.max_frames
        colour = se.EVENTS[v["label"]][1]
        ev = set(range(s, s + spec.event_frames))
        for f in range(t):
            frac = _colour_fraction(video[f], colour)
            # The class colour covers a large area during the event and never otherwise.
            assert (frac > 0.04) if f in ev else (frac < 0.002), (i, f, frac)
        uniform8 = set(np.linspace(0, t - 1, 8).round().astype(int).tolist())
        hits += bool(uniform8 & ev)
    assert max(lengths) - min(lengths) > 100  # variable length
    assert hits / 60 < 0.4  # 8 uniform frames usually miss the event
    # Different videos differ; the same (split, index) is reproducible.
    np.testing.assert_array_equal(
        se.make_video(spec, "test", 3)["video"], se.make_video(spec, "test", 3)["video"]
    )
    assert se.make_video(spec, "test", 3)["num_frames"] != se.make_video(spec, "test", 4)[
        "num_frames"
    ] or not np.array_equal(
        se.make_video(spec, "test", 3)["video"], se.make_video(spec, "test", 4)["video"]
    )


def test_sparse_events_spec_validation():
    with pytest.raises(ValueError):
        se.SparseEventsSpec(num_classes=1)
    with pytest.raises(ValueError):
        se.SparseEventsSpec(min_frames=2, event_frames=4)
    with pytest.raises(ValueError):
        se.SparseEventsSpec(size=15)


def test_build_command_line(tmp_path):
    import subprocess
    import sys  # pylint: disable=g-import-not-at-top,multiple-imports

    cmd = [
        sys.executable,
        "-m",
        "fva_jax.data.build",
        "--name=sparse_events",
        "--config=tiny",
        f"--data_dir={tmp_path}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "sparse_events/tiny" in out and "train: 12, test: 6" in out
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "fva_jax.data.build",
            "--name=hmdb51",
            f"--data_dir={tmp_path}",
            f"--manual_dir={tmp_path / 'none'}",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "testTrainMulti_7030_splits" in bad.stderr


# --------------------------------------------------------------------------- index, versions


def test_frame_index_follows_data_source_order(tmp_path):
    b = _build("sparse_events", "long_tiny", tmp_path, "")
    index = records.read_frame_index(b)
    source = b.as_data_source("train")
    (shard,) = b.info.splits["train"].file_instructions
    entry = index[shard.filename.split("/")[-1]]
    assert len(entry["num_frames"]) == len(source) == 16
    for i in range(len(source)):
        ex = source[i]
        assert entry["video_id"][i] == ex["video_id"].decode()
        assert entry["num_frames"][i] == ex["num_frames"] == len(ex["video"])
        assert entry["label"][i] == ex["label"]
    # Breakfast-like lengths scaled down: widely varying.
    assert entry["num_frames"].max() > 5 * entry["num_frames"].min()
    # A deleted index is rewritten by prepare (e.g. after `tfds build`).
    path = tmp_path / "tfds" / "sparse_events" / "long_tiny" / "2.0.0" / records.FRAME_INDEX
    path.unlink()
    builders.prepare(b)
    assert json.loads(path.read_text())["shards"][shard.filename.split("/")[-1]]["num_frames"] == (
        entry["num_frames"].tolist()
    )


def test_old_version_asks_for_a_rebuild(tmp_path):
    # A data_dir holding only a 1.0.0 build (TFRecord + tfds.features.Video) of breakfast/s1,
    # and no official download to rebuild from.
    old = tmp_path / "tfds" / "breakfast" / "s1" / "1.0.0"
    old.mkdir(parents=True)
    (old / "dataset_info.json").write_text("{}")
    b = builders.get_builder("breakfast", "s1", str(tmp_path / "tfds"))
    assert builders.older_versions(b) == ["1.0.0"]
    with pytest.raises(builders.MissingDataError) as e:
        builders.prepare(b, str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "1.0.0" in msg and "Rebuild it as version 2.0.0" in msg
    assert "python -m fva_jax.data.build --name=breakfast --config=s1" in msg
    assert f"--data_dir={tmp_path / 'tfds'}" in msg
    # Without an old version the plain "where is the download" message stays.
    other = builders.get_builder("breakfast", "s2", str(tmp_path / "tfds"))
    with pytest.raises(builders.MissingDataError) as e:
        builders.prepare(other, str(tmp_path / "nowhere"))
    assert "Rebuild" not in str(e.value) and "does not exist or is empty" in str(e.value)


class _BadEvents(builders.SparseEvents):
    """sparse_events/tiny with one broken test video (set BROKEN to the kind of damage)."""

    BROKEN = "zero"
    # TFDS looks for metadata files in the builder's package; this test module has none.
    pkg_dir_path = epath.Path(builders.__file__).parent

    def _generate_examples(self, split, n):
        for key, ex in super()._generate_examples(split, n):
            if key == "test/000002":
                if self.BROKEN == "zero":
                    ex = {**ex, "video": [], "num_frames": 0}
                else:
                    ex = {**ex, "num_frames": ex["num_frames"] + 1}
            yield key, ex


@pytest.mark.parametrize(
    "broken, reason",
    [("zero", "has zero frames"), ("count", r"stored num_frames is \d+ but it holds \d+ frames")],
)
def test_bad_video_is_named_at_build_time(tmp_path, monkeypatch, broken, reason):
    monkeypatch.setattr(_BadEvents, "BROKEN", broken)
    # The examples are damaged after the generator's own check (check_video, run on every
    # example the builders yield): the pass that writes the frame index still stops.
    b = _BadEvents(config="tiny", data_dir=str(tmp_path))
    with pytest.raises(records.BadVideoError, match="'test/000002' in .*" + reason):
        builders.prepare(b)
    assert not (tmp_path / "__bad_events" / "tiny" / "2.0.0" / records.FRAME_INDEX).exists()


def test_check_video():
    records.check_video("a.avi", 3, 3)
    with pytest.raises(records.BadVideoError, match="'a.avi' in x has zero frames"):
        records.check_video("a.avi", 0, 0, "x")
    with pytest.raises(
        records.BadVideoError, match="'a.avi': stored num_frames is 4 but it holds 3"
    ):
        records.check_video("a.avi", 4, 3)
