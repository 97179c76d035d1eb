"""Tests for fva_jax.training.timeline and fva_jax.tools.visualize: pixel values of the rendered
timeline follow the segments."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from fva_jax import clustering, config_lib
from fva_jax.data import video as video_lib
from fva_jax.models import full_video, resnet
from fva_jax.tools import visualize as vis
from fva_jax.training import checkpoints, steps, timeline

SEG = np.array([0] * 7 + [1] * 5 + [2] * 10 + [3] * 8)
SCENE_GRAY = (30, 90, 150, 210)


def _solid_frames(seg, h=16, w=24):
    """Frame t is one solid gray, SCENE_GRAY[seg[t]]: the colour says the segment."""
    frames = np.zeros((len(seg), h, w, 3), np.uint8)
    for t, s in enumerate(seg):
        frames[t] = SCENE_GRAY[s]
    return frames


def _distances(seg):
    d = np.full(len(seg), 0.02)
    d[np.flatnonzero(np.diff(seg))] = 0.4  # a cut after frame t
    d[-1] = 0.0
    return d


def _col(box, t, num_frames):
    left, _, width, _ = box
    return int(left + (t + 0.5) * width / num_frames)


def _check_band(image, layout, seg, num_clusters):
    """Rows near the top and bottom of the band (clear of the segment numbers) at every frame."""
    want = timeline.cluster_colors(seg, num_clusters)
    _, top, _, h = layout.band
    for t in range(len(seg)):
        col = _col(layout.band, t, len(seg))
        for row in (top + 5, top + h - 5):
            np.testing.assert_array_equal(image[row, col], want[t], err_msg=f"frame {t} row {row}")


def test_timeline_pixels_follow_segments():
    frames, d, k = _solid_frames(SEG), _distances(SEG), 4
    image = timeline.render_timeline(frames, d, SEG, num_clusters=k, width=800, title="synthetic")
    layout = timeline.timeline_layout(len(SEG), frames.shape[1:3], width=800)
    assert image.dtype == np.uint8 and image.shape == (layout.height, layout.width, 3)
    _check_band(image, layout, SEG, k)
    colors = timeline.cluster_colors(SEG, k).astype(float)

    # Curve panel: boundary columns are black lines; segment centres show the segment's tint.
    left, top, width, h = layout.curve
    for b in np.flatnonzero(np.diff(SEG)):
        col = int(round(left + (b + 1) * width / len(SEG)))  # x = b + 0.5
        cols = image[top + 10 : top + h - 10, col - 1 : col + 2].astype(int).sum(-1).min(-1)
        assert (cols < 60).mean() > 0.9, f"no boundary line after frame {b}"
    for s in range(k):
        where = np.flatnonzero(SEG == s)
        t = (where[0] + where[-1]) // 2
        col = _col(layout.curve, t, len(SEG))
        tint = 255 * (1 - 0.28) + colors[t] * 0.28
        np.testing.assert_allclose(image[top + 5, col], tint, atol=2, err_msg=f"segment {s}")
        assert image[top + 10 : top + h - 10, col].astype(int).sum(-1).min() > 60  # no line here

    # Thumbnails: border in the cluster colour of the frame shown, inside the frame's pixels.
    left, top, width, h = layout.thumbs
    n = layout.num_thumbnails
    shown = timeline.thumbnail_frames(len(SEG), n)
    assert n == (800 - 90) // 90 and np.all(np.diff(shown) > 0)  # one per ~90 px
    edges = np.round(np.linspace(0, width, n + 1)).astype(int)
    for i, t in enumerate(shown):
        x0, x1 = left + edges[i], left + edges[i + 1]
        np.testing.assert_allclose(image[top + 1, (x0 + x1) // 2], colors[t], atol=1)
        np.testing.assert_allclose(image[top + h // 2, (x0 + x1) // 2], frames[t, 0, 0], atol=1)


def test_timeline_without_distances_and_with_padding():
    seg = np.concatenate([SEG[:20], [4] * 6])  # 6 padding frames (id == K)
    frames = _solid_frames(np.minimum(seg, 3))
    image = timeline.render_timeline(frames, None, seg, num_clusters=4, width=600)
    layout = timeline.timeline_layout(len(seg), frames.shape[1:3], width=600, with_curve=False)
    assert layout.curve is None and image.shape == (layout.height, 600, 3)
    _check_band(image, layout, seg, 4)
    np.testing.assert_array_equal(timeline.cluster_colors(seg, 4)[-6:], 255)


def test_palette_contrasts_neighbours():
    ids = np.arange(40)
    colors = timeline.cluster_colors(ids, 40).astype(int)
    assert np.all(np.abs(np.diff(colors, axis=0)).sum(-1) > 60)  # consecutive segments differ


def test_render_errors():
    frames = _solid_frames(SEG)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(T,\) = \(30,\)"):
        timeline.render_timeline(frames, None, SEG[:-1])
    with pytest.raises(ValueError, match="distances must have shape"):
        timeline.render_timeline(frames, np.zeros(3), SEG)
    with pytest.raises(ValueError, match="frames must be uint8"):
        timeline.render_timeline(frames.astype(np.float32), None, SEG)


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory):
    """An mp4 of 3 scenes (random textures, slight motion) with cuts after frames 9 and 21."""
    rng = np.random.default_rng(0)
    lengths = (10, 12, 14)
    frames = []
    for n in lengths:
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        texture = np.repeat(
            np.repeat(coarse, 8, axis=0), 8, axis=1
        )  # 8x8 blocks: a 1-pixel pan changes little
        frames += [np.roll(texture, i, axis=1)[8:40, 8:56] for i in range(n)]
    path = tmp_path_factory.mktemp("video") / "cuts.mp4"
    video_lib.encode_video(path, np.stack(frames))
    return path, np.repeat(np.arange(3), lengths)


def test_cli_finds_planted_cuts_and_draws_them(tmp_path, cut_video, capsys):
    path, want = cut_video
    out = tmp_path / "clusters.png"
    result = vis.main(
        [
            str(path),
            "--out",
            str(out),
            "--num-clusters",
            "3",
            "--method",
            "slope",
            "--resize",
            "32",
            "--width",
            "700",
        ]
    )
    np.testing.assert_array_equal(result["segment_ids"], want)
    assert capsys.readouterr().out.startswith(f"{path}: 36 of 36 frames, 3 segments")
    image = np.asarray(Image.open(out).convert("RGB"))
    layout = timeline.timeline_layout(len(want), (32, 48), width=700)
    assert image.shape == (layout.height, 700, 3)
    _check_band(image, layout, want, 3)


def test_cli_flags_drop_frames_and_say_how_many(tmp_path, cut_video, capsys):
    path, _ = cut_video
    args = [str(path), "--out", str(tmp_path / "c.png"), "--num-clusters", "2", "--resize", "32"]
    result = vis.main(args + ["--stride", "3", "--max-frames", "5"])
    assert (result["frames"], result["total_frames"]) == (5, 36)
    assert len(result["segment_ids"]) == 5
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: 5 of 36 frames (--stride 3 --max-frames 5 dropped 31), ")


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="missing.mp4"):
        vis.main([str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "x.png")])


def _model_config(**fields):
    config = config_lib.default_config()
    config.model.update(fields)
    return config


def test_stem_follows_the_run_config():
    for backbone, point, width in (("resnet50", "maxpool", 8), ("resnet18", "stage2", 16)):
        config = _model_config(
            backbone=backbone, width=width, num_clusters=2, cluster_point=point, chunk_size=2
        )
        model = full_video.FullVideoModel(num_classes=3, **steps.model_kwargs(config))
        shapes = jax.eval_shape(
            lambda m=model: m.init(
                jax.random.PRNGKey(0),
                jnp.zeros((1, 2, 32, 32, 3), jnp.uint8),
                jnp.ones((1, 2), bool),
                train=False,
            )
        )
        stem, _, _ = vis.stem_from_config(config.model, shapes["params"], shapes["batch_stats"])
        assert (stem.depth, stem.width, stem.cluster_point) == (int(backbone[6:]), width, point)
        # A config that does not describe the checkpoint is refused, not guessed around.
        for other in ({"width": width * 2}, {"cluster_point": "stage1"}):
            with pytest.raises(ValueError, match="not the one config.model describes"):
                vis.stem_from_config(
                    _model_config(**dict(config.model.to_dict(), **other)).model,
                    shapes["params"],
                    shapes["batch_stats"],
                )


def test_workdir_checkpoint_stem_gives_the_models_segments(tmp_path, cut_video):
    """--workdir: segments from the checkpoint's stem equal the model's own clustering."""
    path, _ = cut_video
    frames = video_lib.decode_video(path, resize=32)
    model = full_video.FullVideoModel(
        num_classes=3,
        backbone="resnet18",
        width=8,
        num_clusters=3,
        cluster_method="cumulative",
        chunk_size=8,
    )
    videos, mask = jnp.asarray(frames[None]), jnp.ones((1, len(frames)), bool)
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(1), videos[:, :2], mask[:, :2], train=False, method="unchunked"
        )
    )
    # Random values (no init compile); non-trivial running statistics, so that using them matters.
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            np.abs(rng.normal(size=v.shape)) + 0.5
            if p[-1].key == "var"
            else rng.normal(size=v.shape) * 0.3
        ).astype(np.float32),
        shapes,
    )
    # The layout fva_jax.training.train writes: config.json, dataset_info.json, checkpoints/.
    config = _model_config(
        backbone="resnet18", width=8, num_clusters=3, cluster_method="cumulative", chunk_size=8
    )
    # Trained on capped, strided clips: the tool still uses every frame of the user's video.
    config.data.update(max_frames=16, frame_stride=2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / checkpoints.CONFIG_FILE).write_text(json.dumps(config_lib.to_dict(config)))
    (tmp_path / "run" / checkpoints.DATASET_INFO_FILE).write_text("{}")
    mngr = ocp.CheckpointManager(tmp_path / "run" / "checkpoints")
    state = {
        "step": np.int32(5),
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": {},
        "rng": np.zeros(2, np.uint32),
    }
    mngr.save(
        5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({}))
    )
    mngr.wait_until_finished()
    mngr.close()

    result = vis.main(
        [
            str(path),
            "--out",
            str(tmp_path / "c.png"),
            "--num-clusters",
            "3",
            "--resize",
            "32",
            "--workdir",
            str(tmp_path / "run"),
            "--chunk-size",
            "8",
        ]
    )
    _, want = jax.jit(lambda v: model.apply(v, videos, mask, train=False, method="unchunked"))(
        variables
    )
    np.testing.assert_array_equal(result["segment_ids"], np.asarray(want)[0])
    assert result["frames"] == result["total_frames"] == len(frames) == 36
    # Distances: the model's own stem (bound inside FullVideoModel) on all frames at once.
    feats = model.apply(
        variables,
        videos[0],
        method=lambda m, x: m.stem(resnet.normalize_images(x), use_running_average=True),
    )
    feats = np.asarray(feats).reshape(len(frames), -1)
    d_want = clustering.hamming_distances(
        clustering.sign_bits(feats), 1, num_features=feats.shape[1]
    )
    np.testing.assert_allclose(result["distances"], np.asarray(d_want), atol=1e-6)
    assert result["distances"][:-1].min() > 0  # the stem sees the motion inside scenes too
    with pytest.raises(SystemExit, match="no checkpoint .*checkpoints/7/state"):
        vis.main(
            [
                str(path),
                "--out",
                str(tmp_path / "d.png"),
                "--workdir",
                str(tmp_path / "run"),
                "--step",
                "7",
            ]
        )
    with pytest.raises(SystemExit, match="config.json.* not found"):
        vis.main([str(path), "--out", str(tmp_path / "d.png"), "--workdir", str(tmp_path / "none")])
    no_checkpoints = tmp_path / "no_checkpoints"
    no_checkpoints.mkdir()
    for name in (checkpoints.CONFIG_FILE, checkpoints.DATASET_INFO_FILE):
        (no_checkpoints / name).write_text((tmp_path / "run" / name).read_text())
    with pytest.raises(SystemExit, match="no checkpoints in"):
        vis.main([str(path), "--out", str(tmp_path / "d.png"), "--workdir", str(no_checkpoints)])
