"""Hugging Face transformers parity, and properties every variant must have."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2_jax.formats.weights import load_hf_state_dict, to_hf_state_dict
from gpt2_jax.model.gpt import GPT
from gpt2_jax.model.rope import apply_rope, rope_angles
from gpt2_torch_ref import GPT as TorchGPT
from parity_tests.common import (
    BASE,
    SEQ_LEN,
    VARIANTS,
    jax_from_torch,
    record,
    ref_config,
    rel_max_err,
    tokens,
)

# bf16 compute (fp32 params, fp32 softmax and logits) stays within this fraction of the
# largest fp32 logit, for the tiny test models; documented in docs/testing.md.
BF16_LOGIT_BOUND = 2e-2


@pytest.mark.parametrize("tied", [True, False])
def test_random_hf_gpt2_loads_into_both_models(tied):
    hf_cfg = GPT2Config(
        vocab_size=BASE["vocab_size"], n_positions=BASE["max_seq_len"], n_embd=BASE["n_embd"],
        n_layer=BASE["n_layer"], n_head=BASE["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    # Random biases and LayerNorm affines too, so every tensor is exercised.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0.0, 0.1)
    sd = hf.state_dict()
    cfg = dataclasses.replace(VARIANTS["learned-mha-full"], tie_embeddings=tied)

    model = GPT(cfg, rngs=nnx.Rngs(5))
    load_hf_state_dict(model, {k: v.numpy() for k, v in sd.items()})
    ref = TorchGPT(ref_config(cfg))
    ref.load_hf_state_dict(sd)

    x = tokens(2, SEQ_LEN, cfg.vocab_size, seed=3)
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(x).long()).logits.numpy()
        ref_logits = ref(torch.from_numpy(x).long()).numpy()
    jax_logits = np.asarray(model(jnp.asarray(x)))
    assert record("HF logits rel max |jax-hf|", rel_max_err(jax_logits, hf_logits)) <= 1e-5
    assert record("HF logits rel max |torch_ref-hf|", rel_max_err(ref_logits, hf_logits)) <= 1e-5
    # and the weights come back out under the same names
    out = to_hf_state_dict(model)
    for key, value in out.items():
        np.testing.assert_array_equal(value, sd[key].numpy())


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_gqa_equals_mha_with_repeated_kv_heads(pos):
    """A GQA model computes exactly what MHA computes with each K/V head copied per group."""
    gqa_cfg = VARIANTS[f"{pos}-gqa-win"]
    mha_cfg = dataclasses.replace(gqa_cfg, n_kv_head=gqa_cfg.n_head)
    gqa = GPT(gqa_cfg, rngs=nnx.Rngs(7))
    sd = to_hf_state_dict(gqa)
    N, K, H = gqa_cfg.n_head, gqa_cfg.n_kv_head, gqa_cfg.head_dim
    for i in range(gqa_cfg.n_layer):
        for suffix in ("weight", "bias"):
            key = f"transformer.h.{i}.attn.c_attn.{suffix}"
            w = sd[key]
            q, k, v = np.split(w, [N * H, N * H + K * H], axis=-1)

            def expand(t):
                heads = t.reshape(*t.shape[:-1], K, H)
                return np.repeat(heads, N // K, axis=-2).reshape(*t.shape[:-1], N * H)

            sd[key] = np.concatenate([q, expand(k), expand(v)], axis=-1)
    mha = GPT(mha_cfg, rngs=nnx.Rngs(8))
    load_hf_state_dict(mha, sd)
    x = jnp.asarray(tokens(2, SEQ_LEN, gqa_cfg.vocab_size))
    diff = rel_max_err(np.asarray(gqa(x)), np.asarray(mha(x)))
    assert record("GQA vs repeated-KV MHA", diff) <= 1e-6


def test_default_kv_heads_is_mha():
    cfg = dataclasses.replace(VARIANTS["rope-mha-full"], n_kv_head=None)
    assert cfg.n_kv_head == cfg.n_head


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_window_at_least_sequence_equals_full_causal(pos):
    full_cfg = VARIANTS[f"{pos}-mqa-full"]
    full = GPT(full_cfg, rngs=nnx.Rngs(3))
    x = jnp.asarray(tokens(2, SEQ_LEN, full_cfg.vocab_size))
    expected = np.asarray(full(x))
    for window in (SEQ_LEN, 2 * SEQ_LEN):
        windowed = GPT(dataclasses.replace(full_cfg, attention_window=window), rngs=nnx.Rngs(3))
        diff = rel_max_err(np.asarray(windowed(x)), expected)
        assert record("window >= T vs full causal", diff) <= 1e-6


def test_window_really_limits_context():
    """Changing a token more than w positions back leaves the logits untouched; within w, not."""
    cfg = VARIANTS["rope-gqa-win"]
    w = cfg.attention_window
    model = GPT(dataclasses.replace(cfg, n_layer=1), rngs=nnx.Rngs(0))
    x = tokens(1, SEQ_LEN, cfg.vocab_size)
    last = SEQ_LEN - 1
    far, near = x.copy(), x.copy()
    far[0, last - w] = (far[0, last - w] + 1) % cfg.vocab_size
    near[0, last - w + 1] = (near[0, last - w + 1] + 1) % cfg.vocab_size
    base = np.asarray(model(jnp.asarray(x)))[0, last]
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(far)))[0, last], base)
    assert np.abs(np.asarray(model(jnp.asarray(near)))[0, last] - base).max() > 1e-4


def test_rope_scores_depend_only_on_relative_offset():
    H = 16
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, H))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, H))

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, *rope_angles(jnp.array([[m]]), H, 10000.0))
        kn = apply_rope(k, *rope_angles(jnp.array([[n]]), H, 10000.0))
        return float(jnp.sum(qm * kn))

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        base = score(m, n)
        for shift in (1, 7, 40):
            assert (
                record("RoPE q.k shift invariance", abs(score(m + shift, n + shift) - base)) <= 1e-5
            )
    # and the scores do depend on the offset
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


@pytest.mark.parametrize("name", ["learned-mha-full", "rope-gqa-win"])
def test_bf16_compute_within_documented_bound(name):
    cfg = VARIANTS[name]
    ref = TorchGPT(ref_config(cfg))  # fresh torch init, so both dtypes see the same weights
    fp32 = jax_from_torch(cfg, ref)
    bf16 = jax_from_torch(dataclasses.replace(cfg, dtype="bfloat16"), ref)
    x = jnp.asarray(tokens(2, SEQ_LEN, cfg.vocab_size))
    lo, hi = bf16(x), fp32(x)
    assert lo.dtype == jnp.float32  # logits always come out in fp32
    assert bf16.h[0].attn.c_attn.kernel.dtype == jnp.float32  # params stay fp32
    diff = rel_max_err(np.asarray(lo), np.asarray(hi))
    assert record("bf16 vs fp32 logits (rel max)", diff) <= BF16_LOGIT_BOUND
    assert diff > 0  # bf16 really computed in bf16
