"""Do the clusters isolate the event of a sparse_events video? (why slope beats cumulative there)

For the first --videos test videos of sparse_events (generated in memory, no TFDS needed), with
the stem of a trained run (`--workdir`, e.g. a configs/demo.py run) or, without it, the fixed
random-weight features of fva_jax.tools.clustering_demo: the frames go through the run's evaluation
crop and the stem, their sign bits give Hamming distances, and each clustering method splits
them into K segments. Prints, per method, the purity of the event's segment (the fraction of
that segment's frames that show the event; 1.0 = the event has a segment of its own) and how
much the event onset stands out from the background's frame-to-frame distance.

    python benchmarks/event_isolation.py --workdir=/tmp/fva_demo

Last line: {"purity": {"cumulative": ..., "slope": ...}, "onset_over_background": ..., ...}.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

from fva_jax import clustering
from fva_jax.data import sparse_events
from fva_jax.tools import clustering_tools, predict, visualize
from fva_jax.training import checkpoints


def event_purity(segment_ids: np.ndarray, start: int, length: int) -> float:
    """Fraction of the frames of the segment holding most of the event that are event frames."""
    k = np.bincount(segment_ids[start : start + length]).argmax()
    in_segment = segment_ids == k
    return float(in_segment[start : start + length].sum() / in_segment.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="", help="a trained run ('' = random conv features)")
    p.add_argument("--videos", type=int, default=32)
    p.add_argument("--num-clusters", type=int, default=8)
    args = p.parse_args()

    if args.workdir:
        features, what = visualize.load_checkpoint_stem(args.workdir)
        data_config = checkpoints.load_run_config(args.workdir)[0].data
    else:
        features, what = visualize.random_feature_fn(), "random-weight conv features"
        data_config = None
    # sparse_events/small, as configs/demo.py trains on
    spec = sparse_events.SparseEventsSpec(num_train=256, num_test=64, min_frames=48, max_frames=128)

    purity = {m: [] for m in clustering.METHODS}
    ratios = []
    for i in range(args.videos):
        v = sparse_events.make_video(spec, "test", i)
        frames = predict.eval_preprocess(v["video"], data_config) if data_config else v["video"]
        bits, num_features = clustering_tools.chunked_sign_bits(features, frames)
        d = np.asarray(clustering.hamming_distances(jnp.asarray(bits), num_features=num_features))
        start, n = v["event_start"], spec.event_frames
        onset = (
            d[start - 1] if start > 0 else d[start + n - 1]
        )  # the jump into (or out of) the event
        ratios.append(onset / max(np.median(d), 1e-9))
        for m in purity:
            seg = np.asarray(clustering.segmenter(m)(jnp.asarray(d), args.num_clusters))
            purity[m].append(event_purity(seg, start, n))

    print(f"{what}; {args.videos} test videos of sparse_events/small, K={args.num_clusters}")
    print(f"  event onset distance / median frame distance: {np.median(ratios):.1f} (median)")
    for m, values in purity.items():
        print(
            f"  {m:>10}: event segment purity {np.mean(values):.3f} (mean), "
            f"{np.mean(np.asarray(values) == 1.0):.2f} of videos with the event alone "
            "in its segment"
        )
    print(
        json.dumps(
            {
                "purity": {m: float(np.mean(v)) for m, v in purity.items()},
                "onset_over_background": float(np.median(ratios)),
                "videos": args.videos,
                "num_clusters": args.num_clusters,
                "features": what,
            }
        )
    )


if __name__ == "__main__":
    main()
