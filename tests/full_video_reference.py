"""A stored reference of the ResNet full-video model's outputs, and how it was made.

``tests/data/full_video_resnet18.npz`` holds, for a tiny ResNet-18 (width 8, 32 px, K=4) with
fixed weights drawn here from NumPy (so the reference does not depend on Flax's initialisers),
on a batch of one unpadded and one padded video: the clustered (sampling="cluster") logits in
eval and in training mode, the segment ids, and a fingerprint of the gradients of a
cross-entropy loss with respect to every parameter and of the new batch statistics. It was
written by the ``FullVideoModel`` of commit c5092d6 (before the model became a specialisation
of the generic ``FullVideo``), so that tests/test_full_video.py can check that the model still
computes the same thing. Re-make it (only when the model's math is meant to change) from the
repository root with

    PYTHONPATH=$PWD python tests/full_video_reference.py

Fingerprint: a leaf of at most ``FULL_LEAF_SIZE`` values is stored whole; a larger one as its
L2 norm and ``PROJECTIONS`` dot products with fixed random unit-variance directions (seeded by
the leaf's path), which a different gradient would not reproduce. That keeps the file at a
few tens of KB.
"""

from __future__ import annotations

import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

PATH = pathlib.Path(__file__).resolve().parent / "data" / "full_video_resnet18.npz"
B, T, PX, K = 2, 12, 32, 4
LENGTHS = (12, 8)  # the first video is unpadded, the second has 4 padded frames
LABELS = (1, 3)
MODEL_KWARGS = dict(
    num_classes=5,
    backbone="resnet18",
    width=8,
    num_clusters=K,
    chunk_size=5,
    dropout_rate=0.0,
    plan="unchunked",
)
FULL_LEAF_SIZE = 600
PROJECTIONS = 16


def videos_and_mask():
    """(videos (B, T, PX, PX, 3) uint8, mask (B, T)): drifting noise with 3 scene cuts."""
    rng = np.random.default_rng(7)
    base = rng.uniform(0, 255, (B, 4, PX, PX, 3))
    drift = rng.normal(0, 12, (B, T, PX, PX, 3)).cumsum(axis=1)
    scene = np.arange(T) * 4 // T
    videos = np.clip(base[:, scene] + drift, 0, 255).astype(np.uint8)
    mask = np.arange(T)[None] < np.asarray(LENGTHS)[:, None]
    return jnp.asarray(videos), jnp.asarray(mask)


def _leaf_name(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def variables_for(model):
    """Fixed weights for ``model``'s variables, drawn from NumPy leaf by leaf in path order:
    He-normal kernels, BatchNorm scales around 1, small biases and means, variances in
    [0.5, 2] (so that folding the stem BatchNorm is not the identity)."""
    videos, mask = videos_and_mask()
    shapes = jax.eval_shape(
        lambda v, m: model.init({"params": jax.random.key(0)}, v, m, train=False), videos, mask
    )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(0)
    values = []
    for path, leaf in sorted(leaves, key=lambda item: _leaf_name(item[0])):
        name, shape = _leaf_name(path), leaf.shape
        if name.endswith("kernel"):
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif name.endswith("scale"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("var"):
            value = rng.uniform(0.5, 2.0, shape)
        else:  # biases, running means
            value = rng.normal(0, 0.1, shape)
        values.append((name, jnp.asarray(value, leaf.dtype)))
    by_name = dict(values)
    return jax.tree_util.tree_unflatten(treedef, [by_name[_leaf_name(p)] for p, _ in leaves])


def outputs(model, variables):
    """{name: array} of the model on the reference batch (see the module docstring)."""
    videos, mask = videos_and_mask()
    labels = jnp.asarray(LABELS)

    def loss_fn(params):
        (logits, seg), updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            videos,
            mask,
            train=True,
            rngs={"dropout": jax.random.key(1), "sampling": jax.random.key(2)},
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, seg, updates["batch_stats"])

    (loss, (logits, seg, stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"]
    )
    eval_logits, eval_seg = jax.jit(lambda v: model.apply(v, videos, mask, train=False))(variables)
    out = {
        "loss": np.asarray(loss),
        "train_logits": np.asarray(logits),
        "eval_logits": np.asarray(eval_logits),
        "segment_ids": np.asarray(seg),
        "eval_segment_ids": np.asarray(eval_seg),
    }
    out.update(fingerprint("grad", grads))
    out.update(fingerprint("batch_stats", stats))
    return out


def fingerprint(prefix: str, tree) -> dict:
    """{prefix/leaf path: the leaf} for small leaves; {.../@norm, .../@projections} for large."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = f"{prefix}/{_leaf_name(path)}"
        flat = np.asarray(leaf, np.float64).reshape(-1)
        if flat.size <= FULL_LEAF_SIZE:
            out[name] = flat.astype(np.float32)
            continue
        directions = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(
            (PROJECTIONS, flat.size)
        )
        out[f"{name}@norm"] = np.float32(np.linalg.norm(flat))
        out[f"{name}@projections"] = (directions @ flat).astype(np.float32)
    return out


def main() -> None:
    from fva_jax.models.full_video import FullVideoModel

    model = FullVideoModel(**MODEL_KWARGS)
    np.savez_compressed(PATH, **outputs(model, variables_for(model)))
    print(f"wrote {PATH} ({PATH.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
