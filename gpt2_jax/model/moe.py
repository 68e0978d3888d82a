"""Mixture-of-Experts MLP: top-k routing over E GPT-2 MLPs, dropless or with a capacity.

The math (the torch reference `gpt2_torch_ref.moe` computes the same):
- router logits z = x·W_r in fp32 (W_r [D, E], no bias); the k largest are chosen, ties to
  the lower expert index; weights = softmax over the k chosen logits;
- output = Σ over the chosen experts of weight · expert(x), summed in fp32;
- with `moe_capacity_factor` cf, each sequence is a group: an expert keeps at most
  C = ceil(cf·T·k/E) of the sequence's assignments, taken position-major (token 0's choices,
  then token 1's, …), so at a given length T a token's routing never depends on later tokens
  (C itself grows with T); a dropped assignment adds nothing, the others are not renormalised;
- per layer: load-balance loss E·Σ_e f_e·P_e (f_e: share of the N·k assignments made to e,
  before drops; P_e: mean router probability of e) and z-loss mean(logsumexp(z)²).

Paths (`model.moe_impl`), all the same function: `grouped` sorts the assignments by expert and
runs `grouped_mlp` (O(N·k) on every backend), `ragged` the same rows through
`jax.lax.ragged_dot`, `dense` every expert on every token (the test reference). A capacity
factor switches `grouped` / `ragged` to fixed [E, C] slots per sequence.

Under a mesh the experts run in a `shard_map`: each device holds E / mesh.expert experts, the
tokens of the devices along `expert` are gathered, and each device returns its experts' share
of every token's output, summed back with one reduce-scatter.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from gpt2_jax.config import ModelConfig
from gpt2_jax.ops import mixed_matmul
from gpt2_jax.ops.grouped_mlp import grouped_mlp
from gpt2_jax.parallel import sharding

EXPERT = "expert"  # the logical (and mesh) axis of the experts
STATS = ("lb_loss", "z_loss", "busiest", "idlest", "dropped")
f32 = jnp.float32


def _param(rngs: nnx.Rngs, init, shape, dtype, axes) -> nnx.Param:
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


class ExpertLinear(nnx.Module):
    """E stacked Conv1D-oriented linears: kernel [E, in, out], bias [E, out]."""

    def __init__(self, cfg, d_in, d_out, std, axes, *, rngs: nnx.Rngs):
        E, dtype = cfg.moe_experts, jnp.dtype(cfg.param_dtype)
        init = jax.nn.initializers.normal(std)
        self.kernel = _param(rngs, init, (E, d_in, d_out), dtype, (EXPERT, *axes))
        zeros = jax.nn.initializers.zeros
        self.bias = _param(rngs, zeros, (E, d_out), dtype, (EXPERT, axes[-1])) if cfg.bias else None

    def bias_or_zeros(self) -> jax.Array:
        if self.bias is not None:
            return self.bias[...]
        E, _, d_out = self.kernel.shape
        return jnp.zeros((E, d_out), self.kernel.dtype)


class Experts(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.n_embd, 4 * cfg.n_embd
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.c_fc = ExpertLinear(cfg, D, F, 0.02, ("embed", "mlp"), rngs=rngs)
        self.c_proj = ExpertLinear(cfg, F, D, resid_std, ("mlp", "embed"), rngs=rngs)

    def weights(self) -> tuple[jax.Array, ...]:
        """w1 [E, D, F], b1 [E, F], w2 [E, F, D], b2 [E, D] (zeros without biases)."""
        fc, proj = self.c_fc, self.c_proj
        return fc.kernel[...], fc.bias_or_zeros(), proj.kernel[...], proj.bias_or_zeros()


class MoE(nnx.Module):
    """Routed MLP; `__call__` gives the output, `routed` the output and this layer's stats."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = jax.nn.initializers.normal(0.02)
        shape = (cfg.n_embd, cfg.moe_experts)
        self.router = _param(rngs, init, shape, jnp.dtype(cfg.param_dtype), ("embed", None))
        self.experts = Experts(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return self.routed(x_BTD)[0]

    def routed(self, x_BTD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        route = route_tokens(x_BTD, self.router[...], cfg.moe_top_k, cfg.moe_capacity_factor)
        weights = self.experts.weights()
        dtype = jnp.dtype(cfg.compute_dtype)
        y_BTD = apply_experts(
            x_BTD.astype(dtype), route.idx_BTK, route.w_BTK, route.slot_BTK, weights,
            impl=resolve_impl(cfg.moe_impl), capacity=route.capacity,
        )  # fmt: skip
        return self.dropout(y_BTD.astype(x_BTD.dtype)), route.stats


class Route(NamedTuple):
    """Routing decisions: chosen experts and weights [B, T, k], each assignment's slot in its
    expert's queue (the count of earlier assignments to that expert in the sequence, or -1
    when dropped), the capacity C (None = dropless) and the layer's stats."""

    idx_BTK: jax.Array
    w_BTK: jax.Array
    slot_BTK: jax.Array
    capacity: int | None
    stats: dict[str, jax.Array]


def route_tokens(x_BTD: jax.Array, router_DE: jax.Array, k: int, cf: float | None) -> Route:
    """Top-k routing, capacity slots and the aux statistics (module docstring)."""
    B, T, _ = x_BTD.shape
    E = router_DE.shape[-1]
    z_BTE = jnp.einsum(
        "btd,de->bte", x_BTD.astype(f32), router_DE.astype(f32),
        precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    top_BTK, idx_BTK = jax.lax.top_k(z_BTE, k)  # equal logits: the lower index first
    w_BTK = jax.nn.softmax(top_BTK, axis=-1)
    onehot_BTKE = jax.nn.one_hot(idx_BTK, E, dtype=jnp.int32)
    # Position-major: the slot of (t, j) counts the sequence's earlier assignments to its expert.
    upto_BTKE = jnp.cumsum(onehot_BTKE.reshape(B, T * k, E), axis=1).reshape(B, T, k, E)
    slot_BTK = jnp.sum((upto_BTKE - onehot_BTKE) * onehot_BTKE, axis=-1)
    capacity = None
    if cf is not None:
        capacity = max(1, math.ceil(cf * T * k / E))
        slot_BTK = jnp.where(slot_BTK < capacity, slot_BTK, -1)
    f_E = jnp.sum(onehot_BTKE, axis=(0, 1, 2)).astype(f32) / (B * T * k)
    p_E = jnp.mean(jax.nn.softmax(z_BTE, axis=-1), axis=(0, 1))
    stats = {
        "lb_loss": E * jnp.sum(f_E * p_E),
        "z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(z_BTE, axis=-1))),
        "busiest": jnp.max(f_E),
        "idlest": jnp.min(f_E),
        "dropped": jnp.mean((slot_BTK < 0).astype(f32)),
    }
    return Route(idx_BTK, w_BTK, slot_BTK, capacity, stats)


def resolve_impl(impl: str) -> str:
    """`auto`: "ragged" on TPU, "grouped" elsewhere, for the device the step is traced for.

    XLA's TPU compiler runs `ragged_dot` as a grouped-matmul kernel (the rows' FLOPs); XLA:CPU
    and XLA:GPU run it as every expert on every row (E× the FLOPs; docs/moe.md).
    """
    if impl != "auto":
        return impl
    return "ragged" if sharding.step_device().platform == "tpu" else "grouped"


def apply_experts(x_BTD, idx_BTK, w_BTK, slot_BTK, weights, *, impl: str, capacity):
    """Σ_j w · expert_j(x) in fp32 [B, T, D]; under a mesh, experts split over `expert`."""
    local = functools.partial(_local_experts, impl=impl, capacity=capacity)
    active = sharding.active()
    if active is None:
        return local(x_BTD, idx_BTK, w_BTK, slot_BTK, weights, 0)
    mesh, rules = active
    spec = sharding.logical_spec(("batch", None, None), x_BTD.shape, mesh, rules)
    ep = mesh.shape[EXPERT]
    batch_axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    gather = ep > 1 and EXPERT in batch_axes
    w_spec = PartitionSpec(EXPERT) if ep > 1 else PartitionSpec()

    def body(x, idx, w, slot, weights):
        if gather:  # every device of the expert group sees the group's tokens
            x, idx, w, slot = (jax.lax.all_gather(a, EXPERT, tiled=True) for a in (x, idx, w, slot))
        first = jax.lax.axis_index(EXPERT) * weights[0].shape[0] if ep > 1 else 0
        y = local(x, idx, w, slot, weights, first)
        if gather:
            return jax.lax.psum_scatter(y, EXPERT, scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, EXPERT) if ep > 1 else y

    # check_vma=False: grouped_mlp's loop carries start as constants, not per-device values.
    return jax.shard_map(
        body, mesh=mesh, in_specs=(spec, spec, spec, spec, (w_spec,) * 4), out_specs=spec,
        check_vma=False,
    )(x_BTD, idx_BTK, w_BTK, slot_BTK, weights)  # fmt: skip


def _local_experts(x_BTD, idx_BTK, w_BTK, slot_BTK, weights, first, *, impl, capacity):
    """The share of Σ_j w · expert_j(x) that experts [first, first + E_local) compute."""
    E_loc = weights[0].shape[0]
    e_BTK = idx_BTK - first  # local expert index; outside [0, E_loc) elsewhere
    keep_BTK = (e_BTK >= 0) & (e_BTK < E_loc) & (slot_BTK >= 0)
    w_BTK = jnp.where(keep_BTK, w_BTK, 0.0)
    if impl == "dense":
        y_BTED = _dense_experts(x_BTD, weights)
        c_BTE = jnp.einsum("btk,btke->bte", w_BTK, jax.nn.one_hot(e_BTK, E_loc, dtype=f32))
        return jnp.einsum("bte,bted->btd", c_BTE, y_BTED)
    if capacity is not None:
        y_BTKD = _capacity_experts(x_BTD, e_BTK, slot_BTK, keep_BTK, weights, capacity)
    else:
        y_BTKD = _sorted_experts(x_BTD, jnp.where(keep_BTK, e_BTK, E_loc), weights, impl)
    return jnp.einsum("btk,btkd->btd", w_BTK, y_BTKD)


def _dense_experts(x_BTD, weights):
    """Every expert on every token: [B, T, E, D] fp32."""
    dtype = x_BTD.dtype
    w1, b1, w2, b2 = weights
    b1, b2 = b1.astype(dtype), b2.astype(dtype)
    h_BTEF = mixed_matmul.einsum("btd,edf->btef", x_BTD, w1, dtype) + b1
    a_BTEF = jax.nn.gelu(h_BTEF.astype(dtype), approximate=True)
    return mixed_matmul.einsum("btef,efd->bted", a_BTEF, w2, dtype) + b2


def _sorted_experts(x_BTD, e_BTK, weights, impl):
    """Dropless: the N·k assignments sorted by expert (E_loc = not here, sorted last), one row
    each; [B, T, k, D] fp32, zero for assignments to other devices' experts."""
    B, T, k = e_BTK.shape
    D = x_BTD.shape[-1]
    E_loc = weights[0].shape[0]
    e_A = e_BTK.reshape(-1)
    order_A = jnp.argsort(e_A, stable=True)  # row r holds assignment order_A[r]
    sizes_E = jnp.bincount(e_A, length=E_loc + 1)[:E_loc].astype(jnp.int32)
    starts_E = (jnp.cumsum(sizes_E) - sizes_E).astype(jnp.int32)
    rows_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.size, dtype=order_A.dtype))
    x_AD = jnp.repeat(x_BTD.reshape(B * T, 1, D), k, axis=1).reshape(-1, D)  # row (n, j)
    x_AD = _permute(x_AD, order_A, rows_A)
    if impl == "ragged":
        y_AD = _ragged_mlp(x_AD, sizes_E, weights)
    else:
        block = _block_size(B * T * k, E_loc)
        x_AD = jnp.pad(x_AD, ((0, block), (0, 0)))  # spare rows for the last block
        y_AD = grouped_mlp(x_AD, starts_E, sizes_E, *weights, block)[: B * T * k]
    return _permute(y_AD, rows_A, order_A).reshape(B, T, k, D)


@jax.custom_vjp
def _permute(x_AD, perm_A, inverse_A):
    """x_AD[perm_A], with the backward a gather by the inverse permutation: autodiff would
    scatter-add, which XLA:CPU runs row by row."""
    return jnp.take(x_AD, perm_A, axis=0)


def _permute_fwd(x_AD, perm_A, inverse_A):
    return _permute(x_AD, perm_A, inverse_A), (perm_A, inverse_A)


def _permute_bwd(residuals, dy_AD):
    perm_A, inverse_A = residuals
    return jnp.take(dy_AD, inverse_A, axis=0), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _block_size(rows: int, experts: int) -> int:
    """Rows per matmul of `grouped_mlp`: a quarter of an expert's mean share, as a power of two
    in [16, 256], so the rows computed past experts' ends stay under ~1/8 of the work."""
    target = max(rows // (4 * experts), 1)
    return int(np.clip(1 << (target.bit_length() - 1), 16, 256))


def _ragged_mlp(x_AD, sizes_E, weights):
    """The grouped MLP by `jax.lax.ragged_dot`; rows past Σ sizes (other devices') get zeros.

    On GPU, XLA lowers `ragged_dot` to one dense dot over an expert-masked copy of the rows:
    every expert on every row (docs/moe.md)."""
    dtype = x_AD.dtype
    w1, b1, w2, b2 = weights
    b1, b2 = b1.astype(dtype), b2.astype(dtype)
    E_loc = w1.shape[0]
    owner_A = jnp.searchsorted(jnp.cumsum(sizes_E), jnp.arange(x_AD.shape[0]), side="right")
    mine_A1 = (owner_A < E_loc)[:, None]
    owner_A = jnp.minimum(owner_A, E_loc - 1)
    h_AF = mixed_matmul.ragged_dot(x_AD, w1, sizes_E, dtype) + b1[owner_A]
    a_AF = jax.nn.gelu(h_AF.astype(dtype), approximate=True)
    y_AD = mixed_matmul.ragged_dot(a_AF, w2, sizes_E, dtype) + b2[owner_A]
    return jnp.where(mine_A1, y_AD, 0.0)


def _capacity_experts(x_BTD, e_BTK, slot_BTK, keep_BTK, weights, capacity):
    """Fixed slots: each sequence's kept assignments fill [E_loc, C] slots, one batched
    matmul per expert; [B, T, k, D] fp32 (dropped assignments read slot 0, weighted 0)."""
    B, T, k = e_BTK.shape
    E_loc = weights[0].shape[0]
    dtype = x_BTD.dtype
    b_BTK = jnp.broadcast_to(jnp.arange(B)[:, None, None], (B, T, k))
    t_BTK = jnp.broadcast_to(jnp.arange(T)[None, :, None], (B, T, k))
    e_idx = jnp.where(keep_BTK, e_BTK, E_loc)  # out of bounds: the scatter drops it
    token_BEC = jnp.full((B, E_loc, capacity), T, jnp.int32)  # T = the zero row: empty slot
    token_BEC = token_BEC.at[b_BTK, e_idx, slot_BTK].set(t_BTK, mode="drop")
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, 1), (0, 0)))
    x_BECD = jnp.take_along_axis(x_BTD[:, None], token_BEC[..., None], axis=2)
    w1, b1, w2, b2 = weights
    b1, b2 = b1.astype(dtype), b2.astype(dtype)
    h_BECF = mixed_matmul.einsum("becd,edf->becf", x_BECD, w1, dtype)
    a_BECF = jax.nn.gelu((h_BECF + b1[:, None]).astype(dtype), approximate=True)
    y_BECD = mixed_matmul.einsum("becf,efd->becd", a_BECF, w2, dtype) + b2[:, None]
    e_safe = jnp.clip(e_BTK, 0, E_loc - 1)
    return y_BECD[b_BTK, e_safe, jnp.maximum(slot_BTK, 0)]
