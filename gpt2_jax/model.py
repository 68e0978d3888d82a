"""GPT-2 in Flax NNX: learned or rotary positions, MHA / GQA / MQA, full or sliding-window.

Shape suffixes: B batch, T query length, S key length, D n_embd, N query heads, K kv heads,
H head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax.attention import dot_product_attention
from gpt2_jax.config import ConfigError, ModelConfig
from gpt2_jax.rope import apply_rope, rope_angles

REMAT_POLICIES = ("none", "block", "dots")


# Parameters carry logical axis names (`logical_axes` metadata); gpt2_jax.sharding maps them
# to mesh axes. A plain metadata key keeps construction free of any mesh.
def _with_axes(init, axes: tuple[str | None, ...]):
    return nnx.with_metadata(init, logical_axes=axes)


def _init(std: float, axes: tuple[str | None, ...]):
    return _with_axes(jax.nn.initializers.normal(std), axes)


def _zeros(axes: tuple[str | None, ...]):
    return _with_axes(jax.nn.initializers.zeros, axes)


def _dense(cfg: ModelConfig, d_in: int, d_out: int, std: float, axes, *, rngs, bias=None):
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=cfg.bias if bias is None else bias,
        dtype=jnp.dtype(cfg.compute_dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=_init(std, axes),
        bias_init=_zeros(axes[-1:]),
        rngs=rngs,
    )


def _layer_norm(cfg: ModelConfig, *, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.n_embd,
        epsilon=cfg.layer_norm_eps,
        use_bias=cfg.bias,
        use_fast_variance=False,  # two-pass variance, as torch computes it
        dtype=jnp.dtype(cfg.compute_dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        scale_init=_with_axes(jax.nn.initializers.ones, ("norm",)),
        bias_init=_zeros(("norm",)),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Fused q|k|v projection (HF `c_attn` layout), causal grouped attention, output projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        n_qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.c_attn = _dense(cfg, cfg.n_embd, n_qkv, 0.02, ("embed", "qkv"), rngs=rngs)
        self.c_proj = _dense(
            cfg, cfg.n_head * cfg.head_dim, cfg.n_embd, resid_std, ("heads", "embed"), rngs=rngs
        )
        self.resid_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def qkv(self, x_BTD: jax.Array, rope_cs) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Project to q [B,T,N,H] and k, v [B,T,K,H], with RoPE applied when configured."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        qkv = self.c_attn(x_BTD)
        nq, nk = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        q_BTNH = qkv[..., :nq].reshape(B, T, cfg.n_head, cfg.head_dim)
        k_BTKH = qkv[..., nq : nq + nk].reshape(B, T, cfg.n_kv_head, cfg.head_dim)
        v_BTKH = qkv[..., nq + nk :].reshape(B, T, cfg.n_kv_head, cfg.head_dim)
        if rope_cs is not None:
            q_BTNH = apply_rope(q_BTNH, *rope_cs)
            k_BTKH = apply_rope(k_BTKH, *rope_cs)
        return q_BTNH, k_BTKH, v_BTKH

    def out(self, y_BTNH: jax.Array) -> jax.Array:
        B, T = y_BTNH.shape[:2]
        return self.resid_dropout(self.c_proj(y_BTNH.reshape(B, T, -1)))

    def __call__(self, x_BTD: jax.Array, rope_cs) -> jax.Array:
        q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, rope_cs)
        y_BTNH = dot_product_attention(
            q_BTNH, k_BTKH, v_BTKH, window=self.cfg.attention_window, impl=self.cfg.attention_impl
        )
        return self.out(y_BTNH)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.c_fc = _dense(cfg, cfg.n_embd, 4 * cfg.n_embd, 0.02, ("embed", "mlp"), rngs=rngs)
        self.c_proj = _dense(
            cfg, 4 * cfg.n_embd, cfg.n_embd, resid_std, ("mlp", "embed"), rngs=rngs
        )
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        h_BTF = jax.nn.gelu(self.c_fc(x_BTD), approximate=True)
        return self.dropout(self.c_proj(h_BTF))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, rope_cs) -> jax.Array:
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), rope_cs)
        return x_BTD + self.mlp(self.ln_2(x_BTD))


def _remat_block(policy: str):
    if policy == "none":
        return lambda block, x, rope_cs: block(x, rope_cs)
    jax_policy = {
        "block": None,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[policy]
    return nnx.remat(lambda block, x, rope_cs: block(x, rope_cs), policy=jax_policy)


class GPT(nnx.Module):
    """GPT-2 language model; `__call__` maps token ids [B, T] to fp32 logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ConfigError(f"unknown train.remat={remat!r}; use one of {REMAT_POLICIES}")
        self.cfg = cfg
        self.remat = remat
        pdtype, dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        self.wte = nnx.Embed(
            cfg.vocab_size, cfg.n_embd, dtype=dtype, param_dtype=pdtype,
            embedding_init=_init(0.02, ("vocab", "embed")), rngs=rngs,
        )  # fmt: skip
        if cfg.pos_embedding == "learned":
            self.wpe = nnx.Embed(
                cfg.max_seq_len, cfg.n_embd, dtype=dtype, param_dtype=pdtype,
                embedding_init=_init(0.02, (None, "embed")), rngs=rngs,
            )  # fmt: skip
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(
                cfg, cfg.n_embd, cfg.vocab_size, 0.02, ("embed", "vocab"), rngs=rngs, bias=False
            )

    def embed(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> tuple[jax.Array, object]:
        """Token (+ learned position) embeddings and the RoPE (cos, sin) or None."""
        x_BTD = self.wte(tokens_BT)
        rope_cs = None
        if self.cfg.pos_embedding == "learned":
            x_BTD = x_BTD + self.wpe(positions_BT)
        else:
            rope_cs = rope_angles(positions_BT, self.cfg.head_dim, self.cfg.rope_theta)
        return self.drop(x_BTD), rope_cs

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """Final LayerNorm and LM head; logits in fp32."""
        x_BTD = self.ln_f(x_BTD)
        dtype = jnp.dtype(self.cfg.compute_dtype)
        if self.cfg.tie_embeddings:
            w_VD = self.wte.embedding[...].astype(dtype)
            return jnp.einsum(
                "btd,vd->btv", x_BTD.astype(dtype), w_VD, preferred_element_type=jnp.float32
            )
        return self.lm_head(x_BTD).astype(jnp.float32)

    def hidden(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        """The last block's output [B, T, D] (before the final LayerNorm and the LM head)."""
        check_tokens(tokens_BT, self.cfg)
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD, rope_cs = self.embed(tokens_BT, positions_BT)
        run_block = _remat_block(self.remat)
        for block in self.h:
            x_BTD = run_block(block, x_BTD, rope_cs)
        return x_BTD

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden(tokens_BT, positions_BT))


def check_tokens(tokens_BT, cfg: ModelConfig) -> None:
    """Refuse sequences the model cannot take; token values are checked when concrete."""
    if tokens_BT.ndim != 2:
        raise ConfigError(f"tokens must be [batch, seq], got shape {tuple(tokens_BT.shape)}")
    T = tokens_BT.shape[1]
    if cfg.pos_embedding == "learned" and T > cfg.max_seq_len:
        raise ConfigError(
            f"sequence length {T} exceeds model.max_seq_len={cfg.max_seq_len} with learned "
            "positions; shorten the sequence or use pos_embedding=rope"
        )
    if not isinstance(tokens_BT, jax.core.Tracer):
        arr = np.asarray(tokens_BT)
        if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
            raise ConfigError(
                f"token ids must lie in [0, {cfg.vocab_size}), got range "
                f"[{arr.min()}, {arr.max()}]; check the tokenizer matches model.vocab_size"
            )


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood in fp32."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.mean(lse_BT - target_BT)


def count_params(model: GPT, *, matmul_only: bool = False) -> int:
    """Parameter count; `matmul_only` leaves out the lookup tables (the MFU convention): `wpe`,
    and `wte` when the head is untied (a tied `wte` is the head's matmul, so it counts)."""
    n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if matmul_only and model.cfg.pos_embedding == "learned":
        n -= model.wpe.embedding.size
    if matmul_only and not model.cfg.tie_embeddings:
        n -= model.wte.embedding.size
    return int(n)
