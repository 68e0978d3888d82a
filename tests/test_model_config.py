"""Configs that cannot work fail at construction (or call) with one clear line."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt2_jax.config import ConfigError, ModelConfig
from gpt2_jax.model.gpt import GPT, count_params

TINY = dict(vocab_size=64, n_layer=1, n_head=2, n_embd=16, max_seq_len=8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_embd=30, n_head=4), "not divisible by model.n_head"),
        (dict(n_head=4, n_kv_head=3), "not divisible by model.n_kv_head"),
        (dict(n_embd=12, n_head=4, pos_embedding="rope"), "even head dim"),
        (dict(attention_window=0), "attention_window must be a positive"),
        (dict(attention_window=-3), "attention_window must be a positive"),
        (dict(pos_embedding="alibi"), "unknown model.pos_embedding"),
        (dict(dtype="float8"), "model.dtype"),
        (dict(attention_impl="flash"), "unknown model.attention_impl"),
        (dict(n_layer=0), "model.n_layer must be positive"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        ModelConfig(**{**TINY, **overrides})
    assert "\n" not in str(info.value)


def test_sequence_longer_than_learned_table_is_refused():
    model = GPT(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len=8"):
        model(jnp.zeros((1, 9), jnp.int32))
    rope = GPT(ModelConfig(**TINY, pos_embedding="rope"), rngs=nnx.Rngs(0))
    assert rope(jnp.zeros((1, 9), jnp.int32)).shape == (1, 9, 64)  # RoPE has no table


@pytest.mark.parametrize("bad", [64, 1000, -1])
def test_token_ids_outside_vocab_are_refused(bad):
    model = GPT(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"token ids must lie in \[0, 64\)"):
        model(jnp.array([[1, 2, bad]], jnp.int32))


def test_parameter_count_matches_gpt2_formula():
    cfg = ModelConfig(**TINY, n_kv_head=1)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    d, hd, V, T = cfg.n_embd, cfg.head_dim, cfg.vocab_size, cfg.max_seq_len
    qkv = d * (cfg.n_head + 2) * hd + (cfg.n_head + 2) * hd
    block = 2 * 2 * d + qkv + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = V * d + T * d + cfg.n_layer * block + 2 * d
    assert count_params(model) == expected
    assert count_params(model, matmul_only=True) == expected - T * d


def test_untied_head_and_no_bias():
    cfg = ModelConfig(**TINY, tie_embeddings=False, bias=False)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    assert model.h[0].attn.c_attn.bias is None and model.ln_f.bias is None
    logits = model(jnp.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 64) and np.isfinite(np.asarray(logits)).all()


def test_init_statistics_follow_gpt2():
    cfg = ModelConfig(vocab_size=512, n_layer=4, n_head=4, n_embd=128, max_seq_len=64)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    std = float(np.std(np.asarray(model.h[0].mlp.c_fc.kernel[...])))
    proj_std = float(np.std(np.asarray(model.h[0].mlp.c_proj.kernel[...])))
    assert abs(std - 0.02) < 0.001
    assert abs(proj_std - 0.02 / np.sqrt(2 * cfg.n_layer)) < 0.0005
    assert np.all(np.asarray(model.h[0].attn.c_attn.bias[...]) == 0)
