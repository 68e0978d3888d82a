"""Causal (optionally sliding-window) grouped-query attention by jax's Pallas splash kernel (TPU).

Same contract as `gpt2_jax.model.attention`: q [B, T, N, H], k and v [B, T, K, H] with N a
multiple of K; window w lets query i see keys i - w < j <= i; softmax(q·kᵀ / sqrt(H)) · v.

`jax.experimental.pallas.ops.tpu.splash_attention` is a FlashAttention kernel over one
sequence, q [N, T, H] and k, v [K, T, H]: this module scales q by 1/sqrt(H) (the kernel does
not scale), moves heads before time and vmaps the kernel over the batch. GQA is native to the
kernel's MHA variant: query head h reads K/V head h // (N/K) from the K/V blocks it is given,
and its backward sums dk, dv over each group inside the dkv kernel, so K/V heads are never
repeated (MQA is K = 1 of the same path). The masks are the kernel's lazy ones, computed in the
kernel rather than loaded: `CausalMask`, or with a window `LocalMask((w - 1, 0))`, i.e.
i - (w - 1) <= j <= i, which is causal by itself. Both run forward and backward (its custom
VJP: a dq and a dkv kernel that recompute the scores from the saved log-sum-exp), and whole
blocks the mask hides are skipped, so a window costs O(T·w).

Constraints (the installed kernel's; `supported`): T a multiple of 128. Every block, of
queries and of keys, forward and backward, must be a multiple of the 128-lane vector width
and divide T; one block is used throughout, the largest of BLOCKS dividing T (untuned: no TPU
has run it here). Any head dim: the kernel pads it to whole 128-lane vectors (compiled for a
TPU v5e here at H = 1 to 2048), so H < 128 leaves part of each vector idle.

Under a step's mesh (`sharding.active()`) a pallas_call cannot be partitioned by XLA, so the
kernel runs inside a `shard_map`: the batch split as the rules split "batch", the heads as
they split "heads" (tensor) where q's and k's heads are split alike (N and K both divide by it:
a rank's query heads then read exactly its K/V heads), otherwise whole on every rank.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as kernel_lib,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as mask_lib,
)
from jax.sharding import Mesh, PartitionSpec

from gpt2_jax.errors import UserError
from gpt2_jax.parallel import sharding

LANES = 128  # a TPU vector register's lanes: every splash block is a multiple of it
BLOCKS = (512, 256, 128)  # tried largest first; the first dividing T is used everywhere


def block_size(seq_len: int) -> int | None:
    """The query / key block for sequences of `seq_len`, or None where none divides it."""
    return next((b for b in BLOCKS if seq_len % b == 0), None)


def supported(seq_len: int) -> bool:
    """Whether splash attention runs for sequences of `seq_len` (any head dim and window)."""
    return seq_len > 0 and seq_len % LANES == 0


def _make_kernel(
    seq_len: int, heads: int, window: int | None, interpret: bool
) -> kernel_lib.SplashAttentionKernel:
    """The splash kernel for one sequence of `heads` query heads (a pytree: call it, vmap it)."""
    shape = (seq_len, seq_len)
    if window is None:
        mask = mask_lib.CausalMask(shape)
    else:
        mask = mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    b = block_size(seq_len)
    blocks = kernel_lib.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    return kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([mask] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _local(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    *,
    window: int | None,
    interpret: bool,
) -> jax.Array:
    """Splash attention on arrays held whole (one device, or one shard_map shard)."""
    _, T, N, H = q_BTNH.shape
    kernel = _make_kernel(T, N, window, interpret)
    # Scaled in fp32: a bf16 1/sqrt(H) would be off by up to 2^-9 for every logit alike.
    q_BTNH = (q_BTNH.astype(jnp.float32) / math.sqrt(H)).astype(q_BTNH.dtype)
    q_BNTH = jnp.swapaxes(q_BTNH, 1, 2)
    k_BKTH, v_BKTH = jnp.swapaxes(k_BTKH, 1, 2), jnp.swapaxes(v_BTKH, 1, 2)
    y_BNTH = jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)
    return jnp.swapaxes(y_BNTH, 1, 2)


def _specs(
    q_BTNH: jax.Array, k_BTKH: jax.Array, mesh: Mesh, rules: dict
) -> tuple[PartitionSpec, PartitionSpec]:
    """(q and output, k and v) specs: batch as the rules split it, heads over their axes only
    where both q's and k's heads are split alike (else a rank's q heads would need K/V heads
    that another rank holds)."""
    names = ("batch", None, "heads", None)
    q_spec = sharding.logical_spec(names, q_BTNH.shape, mesh, rules)
    kv_spec = sharding.logical_spec(names, k_BTKH.shape, mesh, rules)
    if q_spec[2] != kv_spec[2]:
        q_spec = PartitionSpec(q_spec[0], None, None, None)
        kv_spec = PartitionSpec(kv_spec[0], None, None, None)
    return q_spec, kv_spec


def splash_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    *,
    window: int | None,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention by the splash kernel, [B, T, N, H] out; `interpret` runs the kernel in
    Pallas's interpreter (any platform, slow: tests). UserError where `supported` is false."""
    T = q_BTNH.shape[1]
    if not supported(T):
        raise UserError(
            f"attention_impl=splash needs a sequence length that is a multiple of {LANES}, got "
            f"{T}; use attention_impl=auto or pad the sequence"
        )
    local = functools.partial(_local, window=window, interpret=interpret)
    active = sharding.active()
    if active is None:
        return local(q_BTNH, k_BTKH, v_BTKH)
    mesh, rules = active
    q_spec, kv_spec = _specs(q_BTNH, k_BTKH, mesh, rules)
    # check_vma off: pallas_call's outputs carry no record of the mesh axes they vary over.
    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False
    )(q_BTNH, k_BTKH, v_BTKH)
