"""Temperature / top-k / top-p filters against a NumPy reference, and seeded sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.decode.sampling import Sampling, categorical, keep_top_k, keep_top_p, probs, sample
from gpt2_jax.errors import UserError


def _logits(rows=6, vocab=20, seed=0):
    # Distinct values, so the right set is unambiguous.
    rng = np.random.default_rng(seed)
    return rng.permutation(rows * vocab).reshape(rows, vocab).astype(np.float32) / 7.0


def _ref_top_k(row, k):
    return set(np.argsort(-row, kind="stable")[:k].tolist())


def _ref_top_p(row, p):
    order = np.argsort(-row, kind="stable")
    e = np.exp(row[order].astype(np.float64) - row.max())
    prob = e / e.sum()
    kept, mass = [], 0.0
    for tok, pr in zip(order, prob, strict=True):
        kept.append(int(tok))
        mass += pr
        if mass >= p:
            break
    return set(kept)


@pytest.mark.parametrize("k", [1, 3, 19, 20, 25])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = _logits()
    keep = np.asarray(keep_top_k(jnp.asarray(logits), k))
    for row, kept in zip(logits, keep, strict=True):
        assert set(np.flatnonzero(kept).tolist()) == _ref_top_k(row, min(k, 20))


def test_top_k_tie_keeps_exactly_k():
    keep = np.asarray(keep_top_k(jnp.array([[1.0, 3.0, 3.0, 3.0, 0.0]]), 2))
    assert keep.sum() == 2 and keep[0, 1] and keep[0, 2]


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    logits = _logits(seed=1) / 3.0  # flatter, so larger sets are needed
    keep = np.asarray(keep_top_p(jnp.asarray(logits), p))
    for row, kept in zip(logits, keep, strict=True):
        assert set(np.flatnonzero(kept).tolist()) == _ref_top_p(row, p)


def test_probs_combine_temperature_top_k_top_p():
    logits = _logits(rows=4, seed=2) / 5.0
    got = np.asarray(probs(jnp.asarray(logits), 0.7, top_k=8, top_p=0.6))
    for row, pr in zip(logits, got, strict=True):
        scaled = row / 0.7
        topk = _ref_top_k(scaled, 8)
        masked = np.where(np.isin(np.arange(20), list(topk)), scaled, -np.inf)
        kept = _ref_top_p(masked, 0.6)
        ref = np.where(np.isin(np.arange(20), list(kept)), np.exp(scaled - scaled.max()), 0.0)
        np.testing.assert_allclose(pr, ref / ref.sum(), atol=1e-6)


def test_greedy_is_one_hot_argmax():
    logits = jnp.asarray(_logits())
    p = np.asarray(probs(logits, 0.0, top_k=3))
    np.testing.assert_array_equal(p.argmax(-1), np.argmax(logits, -1))
    assert p.max(-1).min() == 1.0
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    np.testing.assert_array_equal(sample(logits, keys, 0.0), np.argmax(logits, -1))
    # The same compiled function serves both: temperature is traced.
    traced = jax.jit(lambda lg, k, t: sample(lg, k, t))
    np.testing.assert_array_equal(traced(logits, keys, 0.0), np.argmax(logits, -1))
    assert (np.asarray(traced(logits * 0, keys, 1.0)) != 0).any()


def test_sampling_is_seeded_and_stays_in_the_kept_set():
    logits = jnp.asarray(np.tile(_logits(rows=1, seed=3) / 4.0, (4000, 1)))
    s = Sampling(temperature=1.3, top_k=5, top_p=0.9)
    keys = jax.random.split(jax.random.PRNGKey(7), 4000)
    draw = lambda ks: np.asarray(sample(logits, ks, s.temperature, **s.filters))  # noqa: E731
    a, b = draw(keys), draw(keys)
    np.testing.assert_array_equal(a, b)
    assert (a != draw(jax.random.split(jax.random.PRNGKey(8), 4000))).any()
    p = np.asarray(probs(logits[:1], s.temperature, **s.filters))[0]
    assert set(np.unique(a).tolist()) == set(np.flatnonzero(p > 0).tolist())  # all kept occur
    # Frequencies within 5 standard errors of the kept distribution.
    freq = np.bincount(a, minlength=20) / 4000
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / 4000) + 1e-9)


def test_categorical_takes_unnormalised_weights_and_never_draws_zero_weight():
    # Zero weight at both ends and in the middle; rows sum to 3, not 1.
    w = np.array([0.0, 1.2, 0.0, 0.3, 1.5, 0.0, 0.0], np.float32)
    n = 20000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    drawn = np.asarray(categorical(keys, jnp.tile(jnp.asarray(w), (n, 1))))
    p = w / w.sum()
    freq = np.bincount(drawn, minlength=len(w)) / n
    assert set(np.unique(drawn).tolist()) == {1, 3, 4}
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9)


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        Sampling(**kwargs)
