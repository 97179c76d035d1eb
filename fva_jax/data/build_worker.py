"""Decoding work of the dataset builders, in a module light enough for worker processes.

The builders decode videos in `spawn`ed processes; those import this module, which
needs only NumPy, PyAV and PIL (not TensorFlow).
"""

from fva_jax.data.video import VideoDecodeError, decode_video, encode_jpegs


def decode_item(args):
    """(key, path, label, video_id, decode kwargs, jpeg quality) -> (key, example dict)
    or (key, VideoDecodeError) when the video cannot be decoded."""
    key, path, label, video_id, kw, quality = args
    try:
        frames = decode_video(path, **kw)
    except VideoDecodeError as e:
        return key, e
    return key, {
        "video": encode_jpegs(frames, quality),
        "num_frames": len(frames),
        "label": label,
        "video_id": video_id,
    }
