"""`optim.clip_by_global_norm` matches optax's, state included (checkpoints stay loadable)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_jax.training.optim import clip_by_global_norm


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clipped, and left alone
def test_clip_matches_optax(max_norm):
    rng = np.random.default_rng(0)
    grads = {"w": jnp.asarray(rng.standard_normal((64, 32), np.float32)),
             "b": jnp.asarray(rng.standard_normal((32,), np.float32))}  # fmt: skip
    ours, ref = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(ref.init(grads))
    got, _ = jax.jit(ours.update)(grads, ours.init(grads))
    want, _ = jax.jit(ref.update)(grads, ref.init(grads))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=0)  # a multiply for a divide: 1 ulp
    norm = float(optax.tree.norm(got))
    assert norm == pytest.approx(min(max_norm, float(optax.tree.norm(grads))), rel=1e-6)
