"""Backward matmuls in the compute dtype: the LM head's and the experts' gradients, read from
the StableHLO a CUDA GPU gets (lowered here without one), plus the fp32 equivalence of
`gpt2_jax.ops.mixed_matmul` with plain autodiff."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt2_jax.config import ModelConfig
from gpt2_jax.model.gpt import GPT
from gpt2_jax.model.moe import MoE
from gpt2_jax.ops import mixed_matmul
from tests.hlo_helpers import float_types, matmuls


def _cuda_hlo(f, *args) -> str:
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


# ------------------------------------------------------------------------------- LM head

HEAD = ModelConfig(vocab_size=500, vocab_pad_multiple=64, n_layer=1, n_head=2, n_embd=32,
                   max_seq_len=16, dtype="bfloat16")  # fmt: skip


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("impl", ["full", "chunked"])
def test_lm_head_forward_and_backward_matmuls_take_bf16_operands(impl, tie):
    # Every matmul with a vocab-wide (512) operand is the head's: logits, d hidden, d table.
    model = GPT(dataclasses.replace(HEAD, tie_embeddings=tie), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.zeros((2, 16), jnp.int32)

    def loss(p):
        return nnx.merge(graphdef, p, rest).loss(tokens, tokens, impl=impl, chunk=8)

    V = HEAD.padded_vocab
    head = [(op, x) for op, x in matmuls(_cuda_hlo(jax.grad(loss), params)) if V in sum(
        (shape for shape, _ in x), ())]  # fmt: skip
    assert len(head) >= 3, head
    for op, operands in head:
        assert float_types(operands) == {"bf16"}, (op, operands)


# ------------------------------------------------------------------------------- experts

MOE = ModelConfig(n_embd=16, n_head=2, n_layer=1, moe_experts=4, moe_top_k=2, dropout=0.0,
                  dtype="bfloat16")  # fmt: skip


@pytest.mark.parametrize(
    "impl, cf, n_expert_matmuls",
    [("ragged", None, 6), ("grouped", None, 6), ("grouped", 1.0, 6), ("dense", None, 6)],
    ids=["ragged", "grouped", "capacity", "dense"],
)
def test_expert_matmuls_forward_and_backward_take_bf16_operands(impl, cf, n_expert_matmuls):
    # The expert matmuls are those with an F-wide (4·16 = 64) operand: 2 forward, 4 backward.
    # (The router's fp32 matmul and the fp32 sum over the k choices are fp32 by design.)
    cfg = dataclasses.replace(MOE, moe_impl=impl, moe_capacity_factor=cf)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jnp.zeros((2, 24, cfg.n_embd), jnp.float32)

    def objective(p, x):
        return jnp.sum(nnx.merge(graphdef, p, rest)(x))

    F = 4 * cfg.n_embd
    found = matmuls(_cuda_hlo(jax.grad(objective, argnums=(0, 1)), params, x))
    experts = [(op, o) for op, o in found if F in sum((shape for shape, _ in o), ())]
    assert len(experts) == n_expert_matmuls, experts
    if impl == "ragged":
        assert {op for op, _ in experts} == {"chlo.ragged_dot"}
    for op, operands in experts:
        assert float_types(operands) == {"bf16"}, (op, operands)


# ------------------------------------------------------------------- fp32 = plain autodiff


def _sizes():
    return jnp.array([3, 0, 5, 2], jnp.int32)  # 10 of 12 rows owned, one empty group


def test_fp32_ragged_dot_and_gradients_equal_autodiff():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((12, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 8, 6)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((12, 6)), jnp.float32)

    def ours(x, w):
        return jnp.sum(r * mixed_matmul.ragged_dot(x, w, _sizes(), jnp.float32))

    def ref(x, w):
        return jnp.sum(r * jax.lax.ragged_dot(x, w, _sizes(), preferred_element_type=jnp.float32))

    got, want = jax.value_and_grad(ours, (0, 1))(x, w), jax.value_and_grad(ref, (0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_fp32_einsum_and_gradients_equal_autodiff():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 8, 5)), jnp.float32)
    eq = "btd,edf->btef"

    def ours(a, b):
        return jnp.sum(jnp.sin(mixed_matmul.einsum(eq, a, b, jnp.float32)))

    def ref(a, b):
        return jnp.sum(jnp.sin(jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)))

    got, want = jax.value_and_grad(ours, (0, 1))(a, b), jax.value_and_grad(ref, (0, 1))(a, b)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_bf16_gradients_come_back_in_each_operands_dtype():
    # An fp32 weight cast inside gets an fp32 gradient (not rounded through bf16).
    x = jnp.ones((12, 8), jnp.bfloat16)
    w = jnp.full((4, 8, 6), 0.1, jnp.float32)
    dx, dw = jax.grad(
        lambda x, w: jnp.sum(mixed_matmul.ragged_dot(x, w, _sizes(), jnp.bfloat16)), (0, 1)
    )(x, w)
    assert (dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.float32)
    np.testing.assert_array_equal(dw[1], 0.0)  # the empty group
    np.testing.assert_array_equal(dw[2], 5.0)  # five rows of ones, each cotangent 1


def test_einsum_rejects_an_index_summed_inside_one_operand():
    with pytest.raises(ValueError, match="unsupported einsum"):
        mixed_matmul.einsum("ab,bc->c", jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.float32)
