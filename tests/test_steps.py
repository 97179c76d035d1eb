"""fva_jax.training.steps on tiny stand-in models: the ranking metrics (ties and non-finite
logits count as wrong), the eval prediction that agrees with top-1, the loss the trainer
minimises with and without the batch's "weight", and the reported training loss."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fva_jax.training import steps

NAN, INF = float("nan"), float("inf")


def plain_topk_correct(logits, labels, k: int) -> np.ndarray:
    """The rule written out, one video at a time: every logit is finite and fewer than k other
    classes have a logit greater than or equal to the label's."""
    out = []
    for row, y in zip(np.asarray(logits, np.float64), labels):
        rivals = sum(1 for c, v in enumerate(row) if c != y and v >= row[y])
        out.append(float(np.isfinite(row).all() and rivals < k))
    return np.array(out)


def per_class_accuracy(logits, labels, mask=None) -> float:
    m = steps.PerClassAccuracy.from_model_output(
        logits=jnp.asarray(logits, jnp.float32), labels=jnp.asarray(labels), mask=mask
    )
    return float(m.compute())


# (logits of one video, label, top-1, top-2)
_RANKING_CASES = [
    # A collapsed / zero-initialised classifier: every class ties, nothing is right.
    ([0.0, 0.0, 0.0], 0, 0, 0),
    ([0.0, 0.0, 0.0], 2, 0, 0),
    ([2.5, 2.5, 2.5, 2.5], 3, 0, 0),
    # NaN or Inf logits.
    ([NAN, NAN, NAN], 1, 0, 0),
    ([0.0, NAN, -1.0], 1, 0, 0),  # NaN at the label
    ([1.0, NAN, 0.0], 0, 0, 0),  # NaN elsewhere: the output is broken
    ([INF, 0.0, -1.0], 0, 0, 0),  # +Inf at the label is not finite
    ([-INF, 0.0, 1.0], 2, 0, 0),  # so is -Inf elsewhere
    ([INF, INF, INF], 2, 0, 0),
    # A clear winner.
    ([0.1, 3.0, -2.0], 1, 1, 1),
    ([0.1, 3.0, -2.0], 0, 0, 1),
    # Ties around k: second place shared with one class is out of the top 2.
    ([5.0, 1.0, 1.0, 0.0], 1, 0, 0),
    ([5.0, 1.0, 0.0, 0.0], 1, 0, 1),
    ([1.0, 1.0, 0.0, -1.0], 2, 0, 0),
    ([1.0, 2.0, 0.0, -1.0], 0, 0, 1),
]


def test_topk_correct_counts_ties_and_non_finite_logits_as_wrong():
    for num_classes in (3, 4):  # one call per shape
        cases = [c for c in _RANKING_CASES if len(c[0]) == num_classes]
        logits = np.array([c[0] for c in cases], np.float32)
        labels = np.array([c[1] for c in cases], np.int32)
        for k, want in ((1, [c[2] for c in cases]), (2, [c[3] for c in cases])):
            got = np.asarray(steps.topk_correct(jnp.asarray(logits), jnp.asarray(labels), k))
            np.testing.assert_array_equal(got, np.array(want, np.float32), err_msg=f"top-{k}")
            np.testing.assert_array_equal(got, plain_topk_correct(logits, labels, k))
        # k beyond the number of classes: right exactly when every logit is finite.
        got = steps.topk_correct(jnp.asarray(logits), jnp.asarray(labels), 5)
        finite = np.isfinite(logits).all(axis=1)
        np.testing.assert_array_equal(np.asarray(got), finite.astype(np.float32))


def test_topk_correct_matches_the_rule_on_random_logits_with_ties():
    rng = np.random.default_rng(0)
    logits = rng.integers(-2, 3, size=(200, 6)).astype(np.float32)  # many ties
    logits[rng.random(logits.shape) < 0.03] = NAN
    labels = rng.integers(0, 6, size=200).astype(np.int32)
    for k in (1, 2, 5):
        got = steps.topk_correct(jnp.asarray(logits), jnp.asarray(labels), k)
        np.testing.assert_array_equal(np.asarray(got), plain_topk_correct(logits, labels, k))


def test_per_class_accuracy_follows_the_top1_rule():
    labels = np.array([0, 1, 2, 0])
    assert per_class_accuracy(np.zeros((4, 3)), labels) == 0.0  # all tied (argmax says 1/3)
    assert per_class_accuracy(np.full((4, 3), NAN), labels) == 0.0
    clear = np.eye(3)[labels] * 4.0
    assert per_class_accuracy(clear, labels) == 1.0
    # Class 0: one right, one tied with class 2; class 1 right; class 2 wrong: (0.5+1+0)/3.
    logits = np.array([[3.0, 0, 0], [0, 1, 0], [2, 0, 1], [1, 0, 1]])
    assert per_class_accuracy(logits, labels) == pytest.approx(0.5)
    # Padding slots do not count, whatever their logits.
    mask = jnp.array([True, True, False, False])
    assert per_class_accuracy(logits, labels, mask) == pytest.approx(1.0)
    top1 = steps.topk_correct(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), 1)
    np.testing.assert_array_equal(np.asarray(top1), [1, 1, 0, 0])


class _FixedLogits(nn.Module):
    """A stand-in for FullVideoModel: logits = a per-row bias parameter (rows x classes),
    plus `shift` (a constant); segment ids of zeros."""

    rows: int
    num_classes: int
    shift: tuple = ()

    @nn.compact
    def __call__(self, video, mask, *, train: bool):
        del train
        bias = self.param("bias", nn.initializers.zeros, (self.rows, self.num_classes))
        logits = bias[: video.shape[0]]
        if self.shift:
            logits = logits + jnp.asarray(self.shift, jnp.float32)
        return logits, jnp.zeros(mask.shape, jnp.int32)


def _batch(labels, batch_mask, **extra):
    b = len(labels)
    return {
        "video": jnp.zeros((b, 2, 1, 1, 3), jnp.uint8),
        "mask": jnp.ones((b, 2), bool),
        "label": jnp.asarray(labels, jnp.int32),
        "batch_mask": jnp.asarray(batch_mask, bool),
        **{k: jnp.asarray(v) for k, v in extra.items()},
    }


def _state(model, batch):
    variables = model.init(jax.random.PRNGKey(0), batch["video"], batch["mask"], train=False)
    return steps.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats={},
        opt_state=optax.sgd(0.1).init(variables["params"]),
        rng=jax.random.PRNGKey(1),
    )


def test_eval_prediction_is_a_class_only_where_top1_counts_it():
    shift = ((0.0, 2.0, 2.0), (0.0, 3.0, 1.0), (NAN, 0.0, 1.0), (0.0, 0.0, 0.0))
    model = _FixedLogits(rows=4, num_classes=3, shift=shift)
    batch = _batch([1, 1, 2, 0], [True] * 4)
    m, per_video = jax.jit(functools.partial(steps.eval_step, model=model))(
        _state(model, batch), batch
    )
    np.testing.assert_array_equal(np.asarray(per_video["prediction"]), [-1, 1, -1, -1])
    assert float(m.compute()["top1"]) == 0.25  # only row 1: prediction == label
    # Class 1: one of two right; classes 2 and 0: none.
    assert float(m.compute()["mean_class_accuracy"]) == pytest.approx(0.5 / 3)


def test_loss_weights_videos_by_the_batch_weight_and_reports_the_mean():
    """With "weight", the objective is sum(cross-entropy * weight) (here checked through each
    row's gradient: weight x (softmax - onehot)); without it, the mean over real videos. The
    reported train loss is the mean cross-entropy over real videos either way."""
    shift = ((1.0, 0.0), (0.0, 2.0), (0.5, 0.5), (3.0, -3.0))
    model = _FixedLogits(rows=4, num_classes=2, shift=shift)
    labels, real = np.array([0, 0, 1, 1]), np.array([True, True, True, False])
    logits = np.array(shift, np.float64)
    ce = np.log(np.exp(logits).sum(1)) - logits[np.arange(4), labels]
    softmax_minus_onehot = np.exp(logits) / np.exp(logits).sum(1, keepdims=True) - np.eye(2)[labels]
    weight = np.array([0.25, 0.25, 0.25, 0.0], np.float32)
    for extra, coefficient in (
        ({"weight": weight}, weight),
        ({}, real / real.sum()),
    ):
        batch = _batch(labels, real, **extra)
        state = _state(model, batch)
        (loss, _), grads = jax.jit(
            functools.partial(steps.loss_and_grads, model=model, rngs={}, batch_stats={})
        )(state.params, batch=batch)
        assert float(loss) == pytest.approx(float((ce * coefficient).sum()), rel=1e-6)
        np.testing.assert_allclose(
            np.asarray(grads["bias"]), coefficient[:, None] * softmax_minus_onehot, atol=1e-6
        )
        _, metrics = jax.jit(
            functools.partial(
                steps.train_step, model=model, tx=optax.sgd(0.1), schedule=lambda _: 0.1
            )
        )(state, batch)
        reported = metrics.compute()
        assert float(reported["loss"]) == pytest.approx(float(ce[real].mean()), rel=1e-6)
        assert float(reported["grad_norm"]) == pytest.approx(
            float(np.linalg.norm(coefficient[:, None] * softmax_minus_onehot)), rel=1e-5
        )
