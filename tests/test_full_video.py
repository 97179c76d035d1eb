"""FullVideo and its ResNet specialisation FullVideoModel: two-pass chunked clustering against
plain references, sampling baselines, the stored reference of the ResNet model."""

import functools
import pathlib
import re

import flax.linen as nn
import full_video_reference
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fva_jax import clustering
from fva_jax.models import plans
from fva_jax.models.full_video import (
    FullVideo,
    FullVideoModel,
    choose_plan,
    dense_indices,
    uniform_indices,
)
from fva_jax.models.resnet import ResNetStem, normalize_images
from fva_jax.training import steps

B, T, PX, K = 2, 10, 16, 3
LENGTHS = (10, 7)  # the second video has 3 padded frames


def make_videos(seed=0, b=B, t=T, lengths=LENGTHS):
    """Smoothly drifting noise with a few cuts, so that the distances vary along time."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (b, 4, PX, PX, 3))
    drift = rng.normal(0, 12, (b, t, PX, PX, 3)).cumsum(axis=1)
    scene = np.arange(t) * 4 // t  # 4 scenes
    v = np.clip(base[:, scene] + drift, 0, 255).astype(np.uint8)
    mask = np.arange(t)[None] < np.asarray(lengths)[:, None]
    return jnp.asarray(v), jnp.asarray(mask)


def tiny(**kw):
    args = dict(
        num_classes=5, backbone="resnet18", width=8, num_clusters=K, chunk_size=4, dropout_rate=0.0
    )
    args.update(kw)
    return FullVideoModel(**args)


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@functools.lru_cache(maxsize=None)
def readme_backbone():
    """(Stem, Trunk): the small CNN of the README's "Your own backbone" example, as printed
    (its code up to the model's construction)."""
    section = README.read_text().split("## Your own backbone", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(example.split("\nmodel = ")[0], namespace)  # noqa: S102 - the repository's own README
    return namespace["Stem"], namespace["Trunk"]


def model_of(backbone, **kw):
    """The tiny ResNet ("resnet") or FullVideo around the README's CNN ("readme_cnn")."""
    if backbone == "resnet":
        return tiny(**kw)
    stem, trunk = readme_backbone()
    return FullVideo(stem(), trunk(), **{"num_clusters": K, "chunk_size": 4, **kw})


@functools.lru_cache(maxsize=None)
def init_variables(model):
    v, m = make_videos()
    return jax.jit(lambda v, m: model.init({"params": jax.random.key(0)}, v, m, train=False))(v, m)


@functools.lru_cache(maxsize=None)
def cached_loss_and_grads(model, method=None):
    """loss_and_grads, compiled once per (model, method) for the whole module."""
    return loss_and_grads(model, method)


def loss_and_grads(model, method=None):
    """jit'd (variables, videos, mask, labels) -> ((loss, (segment ids, new batch_stats,
    logits)), grads); a model without batch statistics gets {}."""

    def loss_fn(params, batch_stats, videos, mask, labels):
        (logits, seg), upd = model.apply(
            {"params": params, "batch_stats": batch_stats},
            videos,
            mask,
            train=True,
            rngs={"dropout": jax.random.key(1), "sampling": jax.random.key(2)},
            mutable=["batch_stats"],
            method=method,
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (seg, upd.get("batch_stats", {}), logits)

    grad = jax.value_and_grad(loss_fn, has_aux=True)
    return jax.jit(
        lambda variables, *a: grad(variables["params"], variables.get("batch_stats", {}), *a)
    )


def assert_trees_close(a, b, rtol=1e-4, scale_tol=1e-4):
    """Leaf by leaf. Float32 sums taken in another order (chunks vs. all frames) differ by
    ~1e-6 relative, amplified up to ~1e-5 of a leaf's largest entry by training-mode BatchNorm
    over the few (B*K) samples of the last stage, so small entries are compared with an
    absolute tolerance of scale_tol * max|leaf|."""
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        y = np.asarray(y)
        atol = scale_tol * float(np.abs(y).max()) + 1e-9
        np.testing.assert_allclose(
            np.asarray(x), y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


LABELS = jnp.array([1, 3])


@pytest.mark.parametrize("backbone", ["resnet", "readme_cnn"])
@pytest.mark.parametrize(
    "plan,chunk", [("recompute", 3), ("recompute", 4), ("keep_stem", 3), ("unchunked", 4)]
)
def test_every_plan_equals_unchunked_reference(backbone, plan, chunk):
    """Logits, loss, every gradient leaf, batch statistics and segment ids equal the unchunked
    math of the plain (unfolded) stem, for every memory plan, for the tiny ResNet (folded
    stem, BatchNorm) and for FullVideo around the README's small CNN.

    chunk=3 and 4 do not divide T=10 (the last chunk overlaps the previous one); window=2
    crosses chunk boundaries in pass 1; the first video is unpadded, the second has padded
    frames.
    """
    model = model_of(backbone, chunk_size=chunk, window=2, plan=plan)
    variables = init_variables(model_of(backbone))  # the same parameters for every chunk size
    v, m = make_videos()
    (loss, (seg, stats, logits)), grads = cached_loss_and_grads(model)(variables, v, m, LABELS)
    # The reference applies the clustering library to all frames' activations at once.
    ref = cached_loss_and_grads(model_of(backbone, chunk_size=4, window=2), "unchunked")
    (rloss, (rseg, rstats, rlogits)), rgrads = ref(variables, v, m, LABELS)
    np.testing.assert_array_equal(np.asarray(seg), np.asarray(rseg))
    assert seg.shape == (B, T) and seg.dtype == jnp.int32
    assert (np.asarray(seg)[1, LENGTHS[1] :] == K).all() and len(np.unique(np.asarray(seg)[0])) == K
    assert logits.shape == (B, 5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(rlogits), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(rloss), rtol=1e-5)
    assert_trees_close(grads, rgrads)
    assert_trees_close(stats, rstats)
    # Gradients reach every stem parameter (through every plan's backward).
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["stem"]))
    if backbone == "resnet":
        # Stem BatchNorm runs on its running statistics (unchanged), trunk BatchNorm trains.
        assert_trees_close(stats["stem"], variables["batch_stats"]["stem"], rtol=0, scale_tol=0)
        assert not np.allclose(
            stats["trunk"]["layer2_0"]["bn1"]["mean"],
            variables["batch_stats"]["trunk"]["layer2_0"]["bn1"]["mean"],
        )


def assert_matches_fingerprint(want, got, name):
    """A fingerprint entry of tests/full_video_reference.py: values, or norm and projections
    (compared up to 1e-4 of the norm: float32 sums in another order)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale + 1e-9, err_msg=name)


@pytest.mark.parametrize("plan", ["unchunked", "recompute"])
def test_resnet_reproduces_the_stored_reference(plan):
    """The ResNet model computes what it computed before FullVideo generalised it
    (tests/data/full_video_resnet18.npz, made by tests/full_video_reference.py with the
    model of commit c5092d6): clustered logits in eval and training mode, segment ids, the
    gradients of every parameter and the new batch statistics, on an unpadded and a padded
    video."""
    want = np.load(full_video_reference.PATH)
    model = FullVideoModel(**{**full_video_reference.MODEL_KWARGS, "plan": plan})
    got = full_video_reference.outputs(model, full_video_reference.variables_for(model))
    assert sorted(got) == sorted(want.files)
    for name in ("segment_ids", "eval_segment_ids"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("train_logits", "eval_logits", "loss"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    for name in sorted(got):
        if name.startswith(("grad/", "batch_stats/")):
            assert_matches_fingerprint(want[name], got[name], name)


def test_slope_method_matches_unchunked():
    """Slope boundaries follow the largest distances, so this also checks pass 1's distances:
    window 4 > chunk 3, so windows span up to three chunks."""
    model = tiny(chunk_size=3, cluster_method="slope", window=4, plan="keep_stem")
    variables = init_variables(tiny())
    v, m = make_videos()
    logits, seg = jax.jit(functools.partial(model.apply, train=False))(variables, v, m)
    rlogits, rseg = jax.jit(functools.partial(model.apply, train=False, method="unchunked"))(
        variables, v, m
    )
    np.testing.assert_array_equal(np.asarray(seg), np.asarray(rseg))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(rlogits), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("plan", ["recompute", "keep_stem"])
def test_padded_frames_are_ignored(plan):
    model = tiny(chunk_size=4, window=2, plan=plan)
    variables = init_variables(tiny())
    v, m = make_videos()
    noisy = v.at[1, LENGTHS[1] :].set(255 - v[1, LENGTHS[1] :])
    step = cached_loss_and_grads(model)
    (loss, (seg, _, _)), grads = step(variables, v, m, LABELS)
    (loss2, (seg2, _, _)), grads2 = step(variables, noisy, m, LABELS)
    np.testing.assert_array_equal(np.asarray(seg), np.asarray(seg2))
    # Not exact: on GPUs segment_sum's atomic adds sum in a varying order (H200: loss 1.8e-6
    # relative), amplified in the gradients as in assert_trees_close. Padding that leaked in
    # (inverted frames here) would change them by far more.
    np.testing.assert_allclose(float(loss), float(loss2), rtol=1e-5)
    assert_trees_close(grads, grads2)


class LinearStemModel(FullVideoModel):
    """Test-only: an affine stem (conv1 + average pool; no BatchNorm, no ReLU, no max-pool)."""

    def _make_stem(self):
        return ResNetStem(
            depth=18, width=self.width, cluster_point="stage1", linear=True, dtype=self.dtype
        )


def test_linear_stem_clustering_loses_nothing():
    """The paper's premise, exactly: with a stem that is linear before the cluster point,
    the mean of the stem outputs of a segment's frames is the stem output of the mean frame.
    So the clustered two-pass model has the loss and gradients of the whole network run on
    each segment's average input frame, a model in which every frame enters the stem directly.
    """
    model = LinearStemModel(
        num_classes=5, backbone="resnet18", width=8, num_clusters=K, chunk_size=3, dropout_rate=0.0
    )
    v, m = make_videos(seed=1)
    # The affine stem has only conv1; reuse the tiny ResNet-18's conv1 and trunk (no new init).
    full = init_variables(tiny())
    variables = {
        "params": {
            "stem": {"conv1": full["params"]["stem"]["conv1"]},
            "trunk": full["params"]["trunk"],
        },
        "batch_stats": {"trunk": full["batch_stats"]["trunk"]},
    }
    assert jax.tree.structure(variables) == jax.tree.structure(
        jax.eval_shape(
            lambda v, m: model.init({"params": jax.random.key(0)}, v, m, train=False), v, m
        )
    )
    (loss, (seg, _, _)), grads = loss_and_grads(model)(variables, v, m, LABELS)

    def mean_frame_model(module, videos, mask, seg, *, train):
        frames, counts = clustering.aggregate(normalize_images(videos), seg, K, mask)
        x = module.stem(frames.reshape((-1,) + frames.shape[2:]), use_running_average=True)
        return module._head(x.reshape((B, K) + x.shape[1:]), counts > 0, train), seg

    ref = loss_and_grads(model, functools.partial(mean_frame_model, seg=seg))
    (rloss, _), rgrads = ref(variables, v, m, LABELS)
    np.testing.assert_allclose(float(loss), float(rloss), rtol=1e-5)
    assert_trees_close(grads, rgrads)


@pytest.mark.parametrize("k", [4, 1])
def test_degenerate_videos_are_finite(k):
    """Video 0: all frames identical (distance 0 everywhere); video 1: 2 frames (< K = 4)."""
    v, m = make_videos(lengths=(T, 2))
    v = v.at[0].set(v[0, 0])
    model = tiny(num_clusters=k, chunk_size=4)
    variables = init_variables(tiny())
    (loss, (seg, _, _)), grads = cached_loss_and_grads(model)(variables, v, m, LABELS)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    seg = np.asarray(seg)
    assert (seg[1, :2] == [0, min(k, 2) - 1]).all() and (seg[1, 2:] == k).all()
    assert sorted(set(seg[0])) == list(range(k))  # identical frames: still k equal segments
    if k > 1:  # the baselines on the same videos (K=1 is no special case for them)
        for sampling in ("uniform", "dense"):
            logits, _ = jax.jit(
                functools.partial(tiny(num_clusters=k, sampling=sampling).apply, train=False)
            )(variables, v, m)
            assert np.isfinite(np.asarray(logits)).all()


def test_sampling_indices():
    lengths = jnp.array([10, 3, 1, 0])
    np.testing.assert_array_equal(uniform_indices(lengths, 4)[0], [1, 3, 6, 8])  # TSN centres
    np.testing.assert_array_equal(uniform_indices(lengths, 4)[1], [0, 1, 1, 2])
    np.testing.assert_array_equal(uniform_indices(lengths, 4)[2:], 0)
    u = jax.random.uniform(jax.random.key(0), (4, 4))
    idx = np.asarray(uniform_indices(lengths, 4, u))
    for row, n in zip(idx, [10, 3, 1, 0]):
        lo = [j * n // 4 for j in range(4)]
        hi = [max((j + 1) * n // 4, lo[j] + 1) for j in range(4)]
        assert all(lo[j] <= min(row[j], max(n - 1, 0)) <= max(hi[j] - 1, 0) for j in range(4))
        assert row.max() <= max(n - 1, 0)
    draws = np.stack(
        [
            np.asarray(
                uniform_indices(jnp.array([100]), 4, jax.random.uniform(jax.random.key(s), (1, 4)))
            )[0]
            for s in range(20)
        ]
    )
    assert (
        len({tuple(r) for r in draws}) > 1
        and (draws[:, 1] >= 25).all()
        and (draws[:, 1] < 50).all()
    )
    np.testing.assert_array_equal(
        dense_indices(jnp.array([20]), 4, 2)[0], [6, 8, 10, 12]
    )  # span 7, start 13//2
    np.testing.assert_array_equal(
        dense_indices(jnp.array([5]), 4, 2)[0], [0, 2, 4, 4]
    )  # short: repeat last
    starts = [
        int(dense_indices(jnp.array([20]), 4, 2, jnp.array([[x]]))[0, 0]) for x in (0.0, 0.5, 0.999)
    ]
    assert starts == [0, 7, 13]


@pytest.mark.parametrize("backbone", ["resnet", "readme_cnn"])
def test_baselines_equal_all_frames_when_they_pick_every_frame(backbone):
    """uniform (K = T, centre) and dense (stride 1) pick every frame once, in order: then they
    are the all-frames network (ResNet: shift along time; logits averaged)."""
    t = 4
    v, m = make_videos(t=t, lengths=(t, t))
    variables = init_variables(model_of(backbone))
    want, _ = model_of(backbone, num_clusters=t).apply(
        variables, v, m, train=False, method="all_frames"
    )
    for sampling in ("uniform", "dense"):
        got, seg = model_of(backbone, num_clusters=t, sampling=sampling, dense_stride=1).apply(
            variables, v, m, train=False
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(seg), np.tile(np.arange(t), (B, 1)))


def test_bad_config_and_inputs():
    v, m = make_videos()
    with pytest.raises(ValueError, match="sampling"):
        tiny(sampling="random").init(jax.random.key(0), v, m, train=False)
    with pytest.raises(ValueError, match="chunk_size"):
        tiny(chunk_size=0).init(jax.random.key(0), v, m, train=False)
    with pytest.raises(ValueError, match="mask"):
        tiny().init(jax.random.key(0), v, m[:, :5], train=False)
    with pytest.raises(ValueError, match="plan='fast'"):
        tiny(plan="fast").init(jax.random.key(0), v, m, train=False)
    with pytest.raises(ValueError, match="activation_budget_mb must be > 0, or -1"):
        tiny(activation_budget_mb=0).init(jax.random.key(0), v, m, train=False)


def test_uniform_training_trains_stem_batchnorm_and_draws_offsets():
    """Baselines train the whole network: stem BatchNorm on batch statistics (its running mean
    moves), and the "sampling" rng picks the frames (different keys, different logits)."""
    model = tiny(sampling="uniform")
    variables = init_variables(tiny())
    v, m = make_videos()

    @jax.jit
    def run(key):
        return model.apply(
            variables,
            v,
            m,
            train=True,
            rngs={"sampling": key, "dropout": key},
            mutable=["batch_stats"],
        )

    (logits, seg), upd = run(jax.random.key(0))
    (logits2, _), _ = run(jax.random.key(1))
    assert not np.allclose(
        upd["batch_stats"]["stem"]["bn1"]["mean"], variables["batch_stats"]["stem"]["bn1"]["mean"]
    )
    assert not np.allclose(np.asarray(logits), np.asarray(logits2))
    np.testing.assert_array_equal(
        np.asarray(seg)[1], [0, 0, 1, 1, 2, 2, 2, K, K, K]
    )  # TSN segments of 7 frames


def with_empty_slots(videos, mask, slots):
    """The batch with an empty slot (all-black video, all-False mask, as the data pipeline
    fills a step's remaining slots) inserted before each row index in ``slots``."""
    black = jnp.zeros_like(videos[:1])
    none = jnp.zeros_like(mask[:1])
    for row in sorted(slots, reverse=True):
        videos = jnp.concatenate([videos[:row], black, videos[row:]])
        mask = jnp.concatenate([mask[:row], none, mask[row:]])
    return videos, mask


@functools.lru_cache(maxsize=None)
def trainer_loss_and_grads(model):
    """steps.loss_and_grads (what the trainer minimises) for ``model``, jit'd with fast
    compiles (the compile dominates these tests); fixed rngs."""
    rngs = {"dropout": jax.random.key(1), "sampling": jax.random.key(2)}
    return jax.jit(
        lambda variables, batch: steps.loss_and_grads(
            variables["params"], variables["batch_stats"], batch, model=model, rngs=rngs
        ),
        compiler_options={"xla_backend_optimization_level": 0},
    )


@pytest.mark.parametrize(
    "sampling,plan",
    [
        ("uniform", "auto"),
        ("dense", "auto"),
        ("cluster", "unchunked"),
        ("cluster", "keep_stem"),
        ("cluster", "recompute"),
    ],
)
def test_empty_slots_never_touch_batch_statistics_or_gradients(sampling, plan):
    """A training step with empty slots gives the loss, gradients and new batch_stats of the
    same step on its real videos alone, in every training mode and plan (dropout off).

    The sampled modes get K-frame videos, as in the trainer's warm-up (the host picks the K
    frames): then uniform and dense (stride 1) both take every frame once, in order, whatever
    the random draws (whose shape follows the batch), so one reference serves both. The
    clustered plans are compared with the unchunked plan on the real videos (every plan
    equals it: test_every_plan_equals_unchunked_reference). Both batches hold the same real
    videos, so the loss is normalised by the same count.
    """
    if sampling == "cluster":
        model, reference_model = tiny(plan=plan), tiny(plan="unchunked")
        videos, mask = make_videos()
    else:
        model = tiny(sampling=sampling, dense_stride=1)
        reference_model = tiny(sampling="uniform", dense_stride=1)
        videos, mask = make_videos(t=K, lengths=(K, K))
    variables = init_variables(tiny())
    real = {"video": videos, "mask": mask, "label": LABELS, "batch_mask": jnp.ones(B, bool)}
    padded_videos, padded_mask = with_empty_slots(videos, mask, slots=(1, 2))
    padded = {
        "video": padded_videos,
        "mask": padded_mask,
        "label": jnp.array([LABELS[0], 0, LABELS[1], 0]),
        "batch_mask": jnp.array([True, False, True, False]),
    }
    (loss, (logits, stats)), grads = trainer_loss_and_grads(model)(variables, padded)
    (want_loss, (want_logits, want_stats)), want_grads = trainer_loss_and_grads(reference_model)(
        variables, real
    )
    assert_trees_close(stats, want_stats)
    assert_trees_close(grads, want_grads)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(logits)[[0, 2]], np.asarray(want_logits), rtol=1e-4, atol=1e-5
    )


def test_bfloat16_model_shapes():
    """bfloat16 compute: float32 logits and parameters, int32 segment ids (traced, not run)."""
    model = tiny(dtype=jnp.bfloat16, backbone="resnet50")
    v, m = make_videos()
    variables = jax.eval_shape(
        lambda v, m: model.init({"params": jax.random.key(0)}, v, m, train=False), v, m
    )
    (logits, seg), _ = jax.eval_shape(
        lambda vs, v, m: model.apply(
            vs, v, m, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
        ),
        variables,
        v,
        m,
    )
    assert logits.shape == (B, 5) and logits.dtype == jnp.float32
    assert seg.shape == (B, T) and seg.dtype == jnp.int32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


# ----------------------------------------------------------------------------- plans


def toy_stem(calls):
    """A cheap differentiable per-frame stem, uint8 (N, 8, 8, 3) -> (N, 2, 2, 3), that counts
    the frames it is run on (a debug callback, so it counts inside cond, scan and remat)."""

    def count(n):
        calls.append(int(n))

    def apply(params, frames):
        n = frames.shape[0]
        jax.debug.callback(count, n)
        x = frames.astype(jnp.float32) / 255.0 - 0.5
        x = x.reshape(n, 2, 4, 2, 4, 3).mean(axis=(2, 4))
        return jax.nn.relu(jnp.tanh(x @ params["w"] + params["b"]))

    return apply


def test_plans_agree_and_skip_chunks_of_padding():
    """The three plans on a toy stem: equal segment ids, sums and gradients; T=14 is no
    multiple of the chunk (4); chunks 2 and 3 (frames 8..13) hold only padding in both videos
    and are never run: not in pass 1, not in the backward."""
    rng = np.random.default_rng(0)
    b, t, chunk, k = 2, 14, 4, 3
    videos = jnp.asarray(rng.integers(0, 256, (b, t, 8, 8, 3), np.uint8))
    mask = jnp.asarray(np.arange(t)[None] < np.array([[7], [5]]))
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(0, 0.1, 3), jnp.float32),
    }
    probe = jnp.asarray(rng.normal(size=(b, k, 2, 2, 3)), jnp.float32)
    results, calls = {}, {}
    for plan in ("unchunked", "keep_stem", "recompute"):
        calls[plan] = []

        def loss(p, plan=plan):
            sums, counts, seg = plans.clustered_sums(
                plan,
                toy_stem(calls[plan]),
                p,
                videos,
                mask,
                num_clusters=k,
                method="cumulative",
                window=2,
                chunk_size=chunk,
            )
            return jnp.sum(sums * probe), (sums, counts, seg)

        (_, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        jax.effects_barrier()
        results[plan] = (aux, grads)
    (want_sums, want_counts, want_seg), want_grads = results["unchunked"]
    np.testing.assert_array_equal(np.sum(want_counts, axis=1), [7, 5])  # valid frames only
    assert (np.asarray(want_counts) > 0).all()
    for plan in ("keep_stem", "recompute"):
        (sums, counts, seg), grads = results[plan]
        np.testing.assert_array_equal(seg, want_seg)
        np.testing.assert_array_equal(counts, want_counts)
        np.testing.assert_allclose(sums, want_sums, rtol=1e-6, atol=1e-6)
        for name in params:
            np.testing.assert_allclose(grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
    # Frames run per plan: unchunked all 28 at once (its forward; autodiff reuses it);
    # keep_stem: pass 1 and the backward, 2 valid chunks each; recompute: pass 1, pass 2 and
    # its rematerialisation. Each chunk holds b * chunk = 8 frames.
    assert calls["unchunked"] == [b * t]
    assert calls["keep_stem"] == [b * chunk] * (2 * 2)
    assert calls["recompute"] == [b * chunk] * (3 * 2)


def test_auto_picks_the_fastest_plan_that_fits_the_budget(caplog):
    """Estimates: unchunked grows with T, keep_stem less, recompute not at all; the budget
    decides; the model runs the chosen plan and logs it once per traced shape."""
    shape = (B, 256, PX, PX, 3)
    estimates = choose_plan(tiny(), shape).estimates
    longer = choose_plan(tiny(), (B, 512, PX, PX, 3)).estimates
    assert estimates["unchunked"] > estimates["keep_stem"] > estimates["recompute"] > 0
    assert longer["recompute"] == estimates["recompute"]
    assert longer["unchunked"] - estimates["unchunked"] > 2 * (
        longer["keep_stem"] - estimates["keep_stem"]
    )
    # keep_stem keeps the stem outputs in the compute dtype: half the bytes a frame in bf16.
    growth = {
        dtype: np.diff(
            [
                choose_plan(tiny(dtype=dtype), (B, t, PX, PX, 3)).estimates["keep_stem"]
                for t in (4096, 8192)
            ]
        )[0]
        for dtype in (jnp.float32, jnp.bfloat16)
    }
    assert growth[jnp.float32] == 2 * growth[jnp.bfloat16] > 0
    mib = {name: value / 2**20 for name, value in estimates.items()}
    for budget, want in [
        (1.01 * mib["unchunked"], "unchunked"),
        (0.99 * mib["unchunked"], "keep_stem"),
        (0.99 * mib["keep_stem"], "recompute"),
        (0.5 * mib["recompute"], "recompute"),  # nothing fits: memory flat in T
    ]:
        choice = choose_plan(tiny(activation_budget_mb=budget), shape)
        assert choice.plan == want and choice.budget_source == "model.activation_budget_mb"
    assert choose_plan(tiny(plan="keep_stem"), shape).plan == "keep_stem"  # forced
    default = choose_plan(tiny(), shape)  # CPU reports no memory: the stated default
    assert default.budget_bytes == int(plans.NO_REPORT_BUDGET_MB * 2**20)

    model = tiny(activation_budget_mb=0.99 * mib["unchunked"])
    v, m = make_videos(t=256, lengths=(256, 100))
    variables = init_variables(tiny())
    caplog.set_level("INFO")
    train_apply = functools.partial(
        model.apply, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
    )
    for _ in range(2):  # traced twice, logged once (a training step: training's estimates)
        jax.eval_shape(train_apply, variables, v, m)
    logged = [r.getMessage() for r in caplog.records if str(v.shape) in r.getMessage()]
    assert len(logged) == 1 and "plan keep_stem" in logged[0], logged


def test_evaluation_chooses_its_plan_from_forward_only_estimates(caplog):
    """Without gradient (train=False) nothing is kept for a backward pass: under a budget at
    which a training step of these videos needs "recompute", evaluation keeps the faster
    "keep_stem", logs that once per (shape, train), and gives the unchunked logits."""
    b, t, chunk = 2, 128, 4
    shape = (b, t, PX, PX, 3)
    training = choose_plan(tiny(chunk_size=chunk), shape).estimates
    forward = choose_plan(tiny(chunk_size=chunk), shape, train=False).estimates
    assert all(forward[plan] < training[plan] for plan in training), (forward, training)
    budget_mb = (forward["keep_stem"] + training["keep_stem"]) / 2 / 2**20
    model = tiny(chunk_size=chunk, activation_budget_mb=budget_mb)
    assert training["recompute"] < budget_mb * 2**20  # training's choice fits, a real choice
    assert choose_plan(model, shape).plan == "recompute"
    evaluation = choose_plan(model, shape, train=False)
    assert evaluation.plan == "keep_stem" and not evaluation.train

    v, m = make_videos(seed=4, t=t, lengths=(t, 77))
    variables = init_variables(tiny())
    caplog.set_level("INFO")
    evaluate = functools.partial(model.apply, train=False)
    logits, seg = jax.jit(evaluate)(variables, v, m)
    jax.eval_shape(evaluate, variables, v, m)  # traced again: logged once
    jax.eval_shape(  # a training trace of the same shape logs its own choice
        lambda vs: model.apply(
            vs, v, m, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
        ),
        variables,
    )
    logged = [r.getMessage() for r in caplog.records if str(v.shape) in r.getMessage()]
    assert len(logged) == 2, logged
    assert "plan keep_stem (forward only" in logged[0], logged
    assert "plan recompute (training step" in logged[1], logged
    reference = functools.partial(tiny().apply, train=False, method="unchunked")
    want, want_seg = jax.jit(reference)(variables, v, m)
    np.testing.assert_array_equal(np.asarray(seg), np.asarray(want_seg))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-6)


class TokenStem(nn.Module):
    """Frames (N, 4, 4, 3) uint8 -> tokens (N, 16, 8): features shaped as a ViT's, not (h, w, c)."""

    @nn.compact
    def __call__(self, x, *, train, mask=None):
        x = x.reshape(x.shape[0], -1, 3).astype(jnp.float32) / 255.0 - 0.5
        return nn.Dense(8, use_bias=False)(x)


class TokenTrunk(nn.Module):
    """Cluster means (B, K, 16, 8) -> logits (B, 5): pooled over tokens and steps."""

    @nn.compact
    def __call__(self, x, *, train, mask):
        pooled = jnp.sum(jnp.mean(x, axis=2) * mask[..., None], axis=1)
        return nn.Dense(5, use_bias=False)(pooled / jnp.maximum(mask.sum(1), 1)[:, None])


def test_estimates_and_plans_for_token_features():
    """FullVideo with (tokens, d) features: the plans' estimates come from the abstract shapes
    of this stem and trunk (the stem's VJP keeps its float input, 16*3 float32 values a frame;
    the trunk's keeps the pooled (8,) means of a video; the stem outputs 16*8 values), and
    every plan gives the unchunked logits and segment ids."""
    b, t, k, chunk = 2, 64, 3, 8
    model = FullVideo(TokenStem(), TokenTrunk(), num_clusters=k, chunk_size=chunk, window=2)
    choice = choose_plan(model, (b, t, 4, 4, 3))
    v = -(-b // jax.device_count())
    r, o, h = 16 * 3 * 4, 16 * 8, 8 * 4
    common = v * h + 2 * v * k * o * 4
    assert choice.estimates == {
        "unchunked": v * t * (r + 4 * o) + common,
        "keep_stem": max(v * t * o * 4 + v * chunk * (r + 4 * o), v * chunk * (r + 4 * o) + common),
        "recompute": v * chunk * (r + 4 * o) + common,
    }
    rng = np.random.default_rng(3)
    videos = jnp.asarray(rng.integers(0, 256, (b, 12, 4, 4, 3), np.uint8))
    mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [9]]))
    variables = model.init(jax.random.key(0), videos, mask, train=False)
    want, want_seg = model.apply(variables, videos, mask, train=False, method="unchunked")
    for plan in ("unchunked", "keep_stem", "recompute"):
        logits, seg = model.clone(plan=plan, chunk_size=5).apply(
            variables, videos, mask, train=False
        )
        np.testing.assert_array_equal(np.asarray(seg), np.asarray(want_seg), err_msg=plan)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-6)
    # Forward only (train=False): the stem's forward peak per frame, read off its jaxpr: the
    # uint8 frame (48 bytes) stays; its reshaped copy (48) becomes float32 (192), divided
    # (192) and shifted (192) one after another, and at the Dense the shifted input (192)
    # and the output tokens (16*8 float32, 512) are live with the frame: 48 + 192 + 512.
    forward = choose_plan(model, (b, t, 4, 4, 3), train=False)
    f = 48 + 192 + 512
    head = forward.estimates["recompute"] - v * chunk * (f + 4 * o) - v * k * o * 4
    assert head >= v * k * o * 4  # the trunk's forward holds at least its input, the K means
    assert forward.estimates == {
        "unchunked": v * t * (f + 4 * o) + v * k * o * 4 + head,
        "keep_stem": v * t * o * 4 + v * chunk * (f + 4 * o) + v * k * o * 4 + head,
        "recompute": v * chunk * (f + 4 * o) + v * k * o * 4 + head,
    }
    with pytest.raises(TypeError, match="FullVideo's stem must be a flax.linen Module"):
        FullVideo(lambda x: x, TokenTrunk()).init(jax.random.key(0), videos, mask, train=False)


class _NoisyTokenTrunk(TokenTrunk):
    """A trunk that draws from an RNG stream other than "dropout"."""

    @nn.compact
    def __call__(self, x, *, train, mask):
        logits = super().__call__(x, train=train, mask=mask)
        return logits + (jax.random.normal(self.make_rng("noise"), logits.shape) if train else 0)


def test_a_user_fold_stem_hook_and_rng_streams_give_one_line_hints():
    """fold_stem: a folded module built unbound (parent=None) gives the plain stem's results in
    every plan; one built bound to the model is named with the fix. A trunk drawing from a
    stream other than "dropout" is named with the fix when the plan is chosen by budget."""
    rng = np.random.default_rng(4)
    videos = jnp.asarray(rng.integers(0, 256, (2, 10, 4, 4, 3), np.uint8))
    mask = jnp.asarray(np.arange(10)[None] < np.array([[10], [7]]))

    def unbound(stem):
        return stem.clone(parent=None), lambda variables: variables

    def bound(stem):
        return TokenStem(), lambda variables: variables

    plain = FullVideo(TokenStem(), TokenTrunk(), num_clusters=3, chunk_size=4, plan="unchunked")
    variables = plain.init(jax.random.key(0), videos, mask, train=False)
    want, want_seg = plain.apply(variables, videos, mask, train=False)
    for plan in ("unchunked", "keep_stem", "recompute"):
        folded = plain.clone(fold_stem=unbound, plan=plan)
        logits, seg = folded.apply(variables, videos, mask, train=False)
        np.testing.assert_array_equal(np.asarray(seg), np.asarray(want_seg), err_msg=plan)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(
        TypeError, match=r"fold_stem hook built its folded module bound.*parent=None"
    ):
        plain.clone(fold_stem=bound, plan="recompute").apply(variables, videos, mask, train=False)
    noisy = FullVideo(TokenStem(), _NoisyTokenTrunk(), num_clusters=3, chunk_size=4)
    with pytest.raises(ValueError, match=r'"dropout" RNG stream only.*draw only from "dropout"'):
        noisy.init(  # a training step chooses its plan from training estimates
            {"params": jax.random.key(0), "noise": jax.random.key(1)}, videos, mask, train=True
        )
