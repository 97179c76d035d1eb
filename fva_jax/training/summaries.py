"""What the trainer reports: TensorBoard event files and log lines, without TensorFlow.

* `SummaryWriter`: scalars, images, texts and hparams as TensorBoard event files, written
  with tensorboard's protos and record framing but without TensorFlow (clu.metric_writers
  imports it, and so does tensorboard's own writer when it is installed), each scalar line
  also logged; only process 0 writes files;
* evaluation scalars, the config as hparams, and pictures of the clusters of a few
  evaluation videos (drawn by fva_jax.training.timeline with matplotlib, imported only when one is
  drawn; timeline does not import this module or the trainer).
"""

import io
import os
import socket
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from fva_jax.training import distributed


class _EventFile:
    """One TensorBoard event file (TFRecord of Event protos), written synchronously.

    tensorboard's EventFileWriter opens files through tf.io.gfile whenever TensorFlow is
    installed (tensorboard.compat), which would import TensorFlow into the training process;
    this opens the file with etils.epath and only borrows tensorboard's record framing."""

    def __init__(self, logdir):
        logdir = epath.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self._file = (logdir / name).open("wb")
        self._records = RecordWriter(self._file)
        self.add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class SummaryWriter:
    """TensorBoard events in `logdir` (None: log lines only, e.g. on processes > 0).

    The same calls as clu's MetricWriter where the trainer used them: write_scalars(step,
    {tag: number}), write_images(step, {tag: uint8 (N, H, W, 3)}), write_texts(step,
    {tag: str}), write_hparams({name: bool/int/float/str}), flush(), close(). Scalars are
    written as TensorBoard 2 tensor summaries (plugin "scalars"), images as PNGs (plugin
    "images": width, height, PNG bytes per image), as tf.summary would.
    """

    def __init__(self, logdir=None):
        self._events = _EventFile(logdir) if logdir is not None else None

    def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        if self._events is not None and values:
            self._events.add(
                event_pb2.Event(
                    wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
                )
            )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        logging.info(
            "[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items()))
        )
        meta = scalar_metadata.create_summary_metadata(display_name="", description="")
        self._write(
            step,
            [
                summary_pb2.Summary.Value(
                    tag=tag,
                    metadata=meta,
                    tensor=tensor_util.make_tensor_proto(np.float32(value)),
                )
                for tag, value in scalars.items()
            ],
        )

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        from PIL import Image  # pylint: disable=g-import-not-at-top

        values = []
        for tag, batch in images.items():
            batch = np.asarray(batch, np.uint8)
            pngs = []
            for image in batch:
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                pngs.append(buffer.getvalue())
            height, width = batch.shape[1:3]
            values.append(
                summary_pb2.Summary.Value(
                    tag=tag,
                    metadata=image_metadata.create_summary_metadata(
                        display_name=tag, description=""
                    ),
                    tensor=tensor_util.make_tensor_proto(
                        [str(width).encode(), str(height).encode(), *pngs]
                    ),
                )
            )
        self._write(step, values)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        meta = text_metadata.create_summary_metadata(display_name="", description="")
        self._write(
            step,
            [
                summary_pb2.Summary.Value(
                    tag=tag, metadata=meta, tensor=tensor_util.make_tensor_proto(text.encode())
                )
                for tag, text in texts.items()
            ],
        )

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The hparams dashboard's session start (bool/int/float/str values), and the same as
        one text table (step 0) for the text dashboard."""
        if self._events is None:
            return
        self._events.add(
            event_pb2.Event(
                wall_time=time.time(), step=0, summary=hparams_summary.hparams_pb(hparams)
            )
        )
        table = "\n".join(f"{k} | {v}" for k, v in sorted(hparams.items()))
        self.write_texts(0, {"hparams": "name | value\n--- | ---\n" + table})

    def flush(self) -> None:
        """Nothing to do: every write is flushed (kept for clu's MetricWriter interface)."""

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def timeline_inputs(
    local: Mapping[str, np.ndarray], per_video: Mapping[str, jax.Array], count: int
) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """(frames, segment_ids, label, prediction) of the first `count` real videos of a batch
    (prediction -1: no unique finite highest logit, steps.eval_step)."""
    if count <= 0:
        return []
    seg = distributed.local_rows(per_video["segment_ids"])
    pred = distributed.local_rows(per_video["prediction"])
    out = []
    for i in np.flatnonzero(np.asarray(local["batch_mask"]))[:count]:
        n = int(np.asarray(local["mask"][i]).sum())
        # A copy: a view would keep the whole step (in Grain's shared memory) alive with it.
        frames = np.array(local["video"][i, :n])
        out.append((frames, seg[i, :n], int(local["label"][i]), int(pred[i])))
    return out


def write_timelines(writer, step: int, timelines, num_clusters: int, class_names) -> None:
    """One TensorBoard image per video, "clusters/video<i>": timeline.render_timeline
    of its frames and segment ids (the model returns no distances, so no curve)."""
    if not timelines:
        return
    from fva_jax.training import timeline  # pylint: disable=g-import-not-at-top  (matplotlib: lazy)

    def name(k):
        if k < 0:  # steps.eval_step: no unique finite highest logit
            return "none (tied or non-finite logits)"
        return class_names[k] if k < len(class_names) else str(k)

    images = {}
    for i, (frames, seg, label, pred) in enumerate(timelines):
        title = (
            f"eval video {i}: {len(frames)} frames, label {name(label)}, predicted "
            f"{name(pred)} (step {step})"
        )
        images[f"clusters/video{i}"] = timeline.render_timeline(
            frames, None, seg, num_clusters=num_clusters, title=title, width=1000
        )[None]
    writer.write_images(step, images)


def write_eval(writer, step: int, results: dict[str, dict[str, Any]]) -> None:
    """The numbers of every evaluation mode, as "<mode>/<metric>" scalars."""
    for name, values in results.items():
        writer.write_scalars(
            step, {f"{name}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        )


def flatten_hparams(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"group.field": value} of a nested config dict; values TensorBoard cannot show as str."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
