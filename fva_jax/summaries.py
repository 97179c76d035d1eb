"""What the trainer writes to TensorBoard besides training scalars: evaluation scalars, the
config as hparams, and pictures of the clusters of a few evaluation videos.

The pictures are drawn by fva_jax.visualize (matplotlib), imported only when one is drawn;
visualize does not import this module or the trainer.
"""

from typing import Any, Mapping

import jax
import numpy as np

from fva_jax import distributed


def timeline_inputs(
    local: Mapping[str, np.ndarray], per_video: Mapping[str, jax.Array], count: int
) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """(frames, segment_ids, label, prediction) of the first `count` real videos of a batch."""
    if count <= 0:
        return []
    seg = distributed.local_rows(per_video["segment_ids"])
    pred = distributed.local_rows(per_video["prediction"])
    out = []
    for i in np.flatnonzero(np.asarray(local["batch_mask"]))[:count]:
        n = int(np.asarray(local["mask"][i]).sum())
        out.append(
            (np.asarray(local["video"][i, :n]), seg[i, :n], int(local["label"][i]), int(pred[i]))
        )
    return out


def write_timelines(writer, step: int, timelines, num_clusters: int, class_names) -> None:
    """One TensorBoard image per video, "clusters/video<i>": fva_jax.visualize.render_timeline
    of its frames and segment ids (the model returns no distances, so no curve)."""
    if not timelines:
        return
    from fva_jax import visualize  # pylint: disable=g-import-not-at-top  (matplotlib: lazy)

    def name(k):
        return class_names[k] if k < len(class_names) else str(k)

    images = {}
    for i, (frames, seg, label, pred) in enumerate(timelines):
        title = (
            f"eval video {i}: {len(frames)} frames, label {name(label)}, predicted "
            f"{name(pred)} (step {step})"
        )
        images[f"clusters/video{i}"] = visualize.render_timeline(
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
