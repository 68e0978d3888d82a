"""LM head + cross-entropy fused over sequence chunks: the [tokens, vocab] logits never exist.

`chunked_cross_entropy(x, w, y)` equals `cross_entropy(x @ w.T, y)` (padded ids masked), but
it walks the sequence `chunk` positions at a time, so at most [batch, chunk, vocab] logits are
alive. Under differentiation the forward pass also turns each chunk's logits into that
chunk's gradient of `x` and its share of the head weights' gradient (softmax minus one-hot);
the backward pass only scales those two by the incoming cotangent. The head matmul is done
three times per chunk (logits, dx, dw), as in the unfused path, never a fourth.

Under a step's mesh whose vocabulary axes (tensor, fsdp) split the head weight by vocabulary,
the walk runs inside a `shard_map`: each device gathers a chunk's rows over the axes that split
both the rows and the vocabulary (fsdp), computes the logits of its own vocabulary slice, and
takes the log-sum-exp and the target logit with collectives over the vocabulary axes. Its dw
is then its own slice of the head's gradient, whole (summed once over the remaining batch
axes), and dx is reduce-scattered back to its own rows: no device holds a whole-vocabulary
gradient or logits of the whole vocabulary.

Shape suffixes as in `gpt2_jax.model.gpt`; C is the chunk length, N = B·C rows of one chunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gpt2_jax.ops.vocab_mask import mask_vocab
from gpt2_jax.parallel import sharding

SCOPE = "lm_head_loss"
# The head weight's orientation: the tied embedding table is [V, D], an untied kernel [D, V].
_EQUATIONS = {  # layout → (logits, dx, dw)
    "VD": ("nd,vd->nv", "nv,vd->nd", "nv,nd->vd"),
    "DV": ("nd,dv->nv", "nv,dv->nd", "nv,nd->dv"),
}


def chunked_cross_entropy(
    x_BTD: jax.Array,
    w: jax.Array,
    targets_BT: jax.Array,
    *,
    n_valid: int,
    chunk: int,
    layout: str = "VD",
) -> jax.Array:
    """Mean next-token NLL (fp32) of the logits `x_BTD @ w` (w [V, D] for layout "VD", [D, V]
    for "DV"), with ids >= n_valid excluded, computed `chunk` sequence positions at a time.

    Matmul operands stay in their dtype (the compute dtype) with fp32 accumulation.
    """
    if layout not in _EQUATIONS:
        raise ValueError(f"layout must be one of {tuple(_EQUATIONS)}, got {layout!r}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return _fused(n_valid, chunk, layout, x_BTD, w, targets_BT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(n_valid, chunk, layout, x_BTD, w, targets_BT):
    return _walk(n_valid, chunk, layout, x_BTD, w, targets_BT, grads=False)[0]


def _fused_fwd(n_valid, chunk, layout, x_BTD, w, targets_BT):
    loss, dx_BTD, dw = _walk(n_valid, chunk, layout, x_BTD, w, targets_BT, grads=True)
    return loss, (dx_BTD, dw)


def _fused_bwd(n_valid, chunk, layout, residuals, g):
    dx_BTD, dw = residuals
    return (g * dx_BTD).astype(dx_BTD.dtype), (g * dw).astype(dw.dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _walk(n_valid, chunk, layout, x_BTD, w, targets_BT, *, grads: bool):
    """(mean loss, dx, dw): full chunks in a loop, a shorter last chunk after it; dx and dw
    are the gradients of the mean loss (None without `grads`)."""
    # The scope names these ops in the HLO, for `bench profile`.
    with jax.named_scope(SCOPE):
        split = _Split.of(x_BTD.shape[0], w, layout)
        if split is None:
            loss_BT, dx_BTD, dw = _walk_chunks(
                n_valid, chunk, layout, x_BTD, w, targets_BT, grads=grads
            )
            return jnp.mean(loss_BT), dx_BTD, dw
        return split.run(n_valid, chunk, layout, x_BTD, w, targets_BT, grads=grads)


@dataclasses.dataclass(frozen=True)
class _Split:
    """The mesh axes of a walk inside a `shard_map`: `vocab` split the head's vocabulary,
    `rows` the batch; rows are gathered over the axes in both (`shared`)."""

    mesh: object = None
    vocab: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()

    @staticmethod
    def of(batch: int, w, layout: str) -> _Split | None:
        """The split of the active mesh, or None outside one or where it splits no vocab."""
        active = sharding.active()
        if active is None:
            return None
        mesh, rules = active
        names = ("vocab", None) if layout == "VD" else (None, "vocab")
        w_spec = sharding.logical_spec(names, w.shape, mesh, rules)
        vocab = sharding.mesh_axes(w_spec[names.index("vocab")])
        rows = sharding.mesh_axes(sharding.logical_spec(("batch",), (batch,), mesh, rules)[0])
        return _Split(mesh, vocab, rows) if vocab else None

    @property
    def shared(self) -> tuple[str, ...]:
        return tuple(a for a in self.vocab if a in self.rows)

    def offset(self, v: int):
        """The first vocabulary id of this device's slice of width v."""
        return jax.lax.axis_index(self.vocab) * v if self.vocab else 0

    def gather_rows(self, a):
        return jax.lax.all_gather(a, self.shared, axis=0, tiled=True) if self.shared else a

    def own_rows(self, a, n: int):
        """This device's n rows of gathered rows `a`."""
        if not self.shared:
            return a
        return jax.lax.dynamic_slice_in_dim(a, jax.lax.axis_index(self.shared) * n, n)

    def scatter_rows(self, partial):
        """Sum partial row gradients over the vocabulary axes, keeping this device's rows."""
        only_vocab = tuple(a for a in self.vocab if a not in self.shared)
        if only_vocab:
            partial = jax.lax.psum(partial, only_vocab)
        if self.shared:
            partial = jax.lax.psum_scatter(partial, self.shared, scatter_dimension=0, tiled=True)
        return partial

    def vmax(self, a):
        return jax.lax.pmax(a, self.vocab) if self.vocab else a

    def vsum(self, a):
        return jax.lax.psum(a, self.vocab) if self.vocab else a

    def run(self, n_valid, chunk, layout, x_BTD, w, targets_BT, *, grads: bool):
        """`_walk_chunks` inside a `shard_map` over this split (see the module docstring)."""
        B, T, _ = x_BTD.shape
        rows = PartitionSpec(self.rows or None)
        w_spec = PartitionSpec(*((self.vocab, None) if layout == "VD" else (None, self.vocab)))
        not_vocab = tuple(a for a in self.rows if a not in self.vocab)

        def local(x_bTD, w_local, t_bT):
            loss_bT, dx_bTD, dw = _walk_chunks(
                n_valid, chunk, layout, x_bTD, w_local, t_bT, grads=grads, split=self, n=B * T
            )
            loss = jnp.sum(loss_bT)
            loss = (jax.lax.psum(loss, self.rows) if self.rows else loss) / (B * T)
            if grads and not_vocab:
                dw = jax.lax.psum(dw, not_vocab)  # once per call: not per chunk
            return loss, dx_bTD, dw

        out = (PartitionSpec(), rows, w_spec if grads else None)
        return jax.shard_map(
            local, mesh=self.mesh, in_specs=(rows, w_spec, rows), out_specs=out, check_vma=False
        )(x_BTD, w, targets_BT)


def _walk_chunks(n_valid, chunk, layout, x_BTD, w, targets_BT, *, grads, split=None, n=None):
    """(per-token losses [B, T], dx, dw) of this device's rows; n = tokens of the mean (all
    devices'), `split` the walk's mesh axes inside a shard_map (None: one device's view)."""
    B, T, D = x_BTD.shape
    C = min(chunk, T)
    n_full, rest = divmod(T, C)
    scale = 1.0 / (n or B * T)
    split = split or _Split()
    one = functools.partial(_chunk, n_valid, layout, w, scale=scale, grads=grads, split=split)

    def step(start, length, carry):
        x_BCD = jax.lax.dynamic_slice_in_dim(x_BTD, start, length, axis=1)
        t_BC = jax.lax.dynamic_slice_in_dim(targets_BT, start, length, axis=1)
        loss_BT, dx_BTD, dw = carry
        loss_BC, dx_BCD, dw_c = one(x_BCD, t_BC)
        loss_BT = jax.lax.dynamic_update_slice_in_dim(loss_BT, loss_BC, start, axis=1)
        if grads:
            dx_BTD = jax.lax.dynamic_update_slice_in_dim(dx_BTD, dx_BCD, start, axis=1)
            dw = dw_c if dw is None else dw + dw_c
        return loss_BT, dx_BTD, dw

    # Per-token losses, averaged at the end as `cross_entropy` does: the same sum order.
    loss_BT = jnp.zeros((B, T), jnp.float32)
    dx_BTD = jnp.zeros_like(x_BTD) if grads else None
    if not split.vocab:  # (inside a shard_map there is nothing to pin)
        loss_BT = sharding.constrain(loss_BT, "batch", None)
        dx_BTD = sharding.constrain(dx_BTD, "batch", None, None) if grads else None
    # The first chunk starts dw, outside the loop: a zero-filled [V, D] table to add it to
    # was one more pass over the table (30 ms per step at d 768 on CPU).
    carry = step(0, C, (loss_BT, dx_BTD, None))
    carry = jax.lax.fori_loop(1, n_full, lambda i, c: step(i * C, C, c), carry)
    if rest:
        carry = step(n_full * C, rest, carry)
    loss_BT, dx_BTD, dw = carry
    return loss_BT, dx_BTD, None if dw is None else dw.astype(w.dtype)


def _chunk(n_valid, layout, w, x_BCD, t_BC, *, scale: float, grads: bool, split: _Split):
    """Per-token losses [B, C] of one chunk and, with `grads`, its dx [B, C, D] and dw (fp32).
    Under a split, N counts the rows gathered over `split.shared` and V is the local slice."""
    B, C, D = x_BCD.shape
    logits_eq, dx_eq, dw_eq = _EQUATIONS[layout]
    x_ND = split.gather_rows(x_BCD).reshape(-1, D)  # 2-D operands: see `gpt2_jax.model.Dense`
    t_N = split.gather_rows(t_BC).reshape(-1)
    logits_NV = jnp.einsum(logits_eq, x_ND, w, preferred_element_type=jnp.float32)
    V = logits_NV.shape[-1]
    ids_V = split.offset(V) + jnp.arange(V)  # the vocabulary ids of these columns
    if split.vocab:
        logits_NV = jnp.where(ids_V < n_valid, logits_NV, -jnp.inf)
    else:
        logits_NV = mask_vocab(sharding.constrain(logits_NV, "batch", "vocab"), n_valid)
    # The exponentials are taken once and serve both the log-sum-exp and the softmax: a
    # second exp pass over [N, V] (jax.nn.logsumexp, then exp(logits - lse)) cost 20% of the
    # head's time on CPU.
    max_N = split.vmax(jnp.max(logits_NV, axis=-1))
    exp_NV = jnp.exp(logits_NV - max_N[:, None])
    sum_N = split.vsum(jnp.sum(exp_NV, axis=-1))
    local_N = t_N - split.offset(V)
    mine_N = (local_N >= 0) & (local_N < V)  # always, on one device
    picked_N = jnp.take_along_axis(logits_NV, jnp.where(mine_N, local_N, 0)[:, None], axis=-1)
    target_N = split.vsum(jnp.where(mine_N, picked_N[:, 0], 0.0))
    loss_BC = split.own_rows((max_N + jnp.log(sum_N) - target_N).reshape(-1, C), B)
    if not grads:
        return loss_BC, None, None
    # d(mean loss)/d(logits) = (softmax - one_hot) / tokens
    one_hot_NV = ids_V == t_N[:, None]
    d_NV = (exp_NV * (scale / sum_N)[:, None] - one_hot_NV * scale).astype(x_ND.dtype)
    dx_ND = jnp.einsum(dx_eq, d_NV, w, preferred_element_type=jnp.float32)
    dx_BCD = split.scatter_rows(dx_ND.reshape(-1, C, D))
    dw = jnp.einsum(dw_eq, d_NV, x_ND, preferred_element_type=jnp.float32)
    return loss_BC, dx_BCD.astype(x_BCD.dtype), dw
