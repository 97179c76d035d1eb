"""benchmarks/clustering.py: its implementations agree with the library (no timings asserted)."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fva_jax import clustering

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "clustering_benchmark", os.path.join(REPO, "benchmarks", "clustering.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("num_frames,num_features", [(2, 5), (9, 37), (40, 300)])
def test_consecutive_dots_chunked_equals_plain(bench, num_frames, num_features):
    x = jax.random.normal(jax.random.PRNGKey(num_frames), (num_frames, num_features))
    expected = np.einsum("tf,tf->t", np.asarray(x)[:-1], np.asarray(x)[1:])
    np.testing.assert_allclose(bench.consecutive_dots(x), expected, rtol=1e-5, atol=1e-5)
    for chunk_bytes in (1, 4 * num_features * 3, 1 << 20):  # 1 frame, 3 frames, all
        np.testing.assert_allclose(
            bench.consecutive_dots(x, chunk_bytes), expected, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("seed", range(2))
def test_numpy_reference_equals_library(bench, seed):
    x = np.asarray(bench.make_activations(33, 101, num_scenes=4, seed=seed))
    assert x.shape == (33, 101) and np.all(x >= 0) and 0.2 < np.mean(x > 0) < 0.8
    for k in (1, 2, 5, 40):
        np.testing.assert_array_equal(
            bench.numpy_sign_bit_clustering(x, k), clustering.cluster(jnp.asarray(x), k)
        )


def test_benchmark_runs_and_reports_json(bench, capsys):
    bench.main(
        ["--frames", "16", "--features", "40", "100000", "--repeats", "1", "--max-gb", "0.001"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    methods = {r["method"] for r in report["results"]}
    assert methods == {
        "sign-bit (JAX)",
        "cosine (JAX)",
        "sign-bit from packed bits (JAX)",
        "sign-bit (NumPy)",
    }
    for row in report["results"]:
        assert row["frames"] == 16 and row["features"] == 40 and row["frames_per_s"] > 0
        assert row["same_segments_as_numpy"] in (
            (None,) if row["method"].startswith("cosine") else (True,)
        )
    assert report["skipped"] == [{"frames": 16, "features": 100000, "gb": 0.01}]
