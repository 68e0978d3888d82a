"""`x @ w` for a weight that fsdp splits, with its gradient reduce-scattered where it is made.

Under a step's mesh (`gpt2_jax.parallel.sharding.active`) a weight `w` [D, F] whose layout
puts a batch axis (fsdp) on one of its dimensions is multiplied inside a `shard_map`: each
device gathers the whole weight over those axes (`all_gather`), multiplies its own rows of
`x`, and, where tensor parallelism splits the contracted dimension (row parallel), sums the
partial outputs over `tensor`. Autodiff turns the gather into its transpose, a
`psum_scatter`, so the weight gradient is reduced onto the weight's layout inside the backward
pass, one layer at a time: no device holds more than its shard of it. Left to the SPMD
partitioner, XLA:CPU reduces the same gradient with a whole-size all-reduce and a slice.

Outside a mesh, or for a weight no batch axis splits, it is the plain matmul.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from gpt2_jax.parallel import sharding


def matmul(x_ND: jax.Array, w_DF: jax.Array, axes: tuple, dtype) -> jax.Array:
    """`x_ND @ w_DF` with both operands in `dtype` (the result too); `axes` are the weight's
    logical axis names (`gpt2_jax.parallel.sharding.RULES`)."""
    active = sharding.active()
    if active is None:
        return x_ND.astype(dtype) @ w_DF.astype(dtype)
    mesh, rules = active
    w_spec = sharding.logical_spec(axes, w_DF.shape, mesh, rules)
    batch = sharding.mesh_axes(sharding.logical_spec(("batch",), x_ND.shape[:1], mesh, rules)[0])
    gathered = [tuple(a for a in sharding.mesh_axes(e) if a in batch) for e in w_spec]
    if not any(gathered):
        return x_ND.astype(dtype) @ w_DF.astype(dtype)
    # Each operand dimension keeps the mesh axes of the weight that do not split the batch.
    kept = [tuple(a for a in sharding.mesh_axes(e) if a not in batch) or None for e in w_spec]
    row_parallel = kept[0]
    x_spec = PartitionSpec(batch or None, row_parallel)
    y_spec = PartitionSpec(batch or None, kept[1])

    # The batch axes that do not split the weight (data): marking the shard as varying there
    # before the gather puts the gradient's sum over them after the reduce-scatter, on the
    # shard, instead of on the whole gradient before it.
    others = tuple(a for a in batch if all(a not in g for g in gathered))

    def local(x_nd, w_df):
        w_df = jax.lax.pcast(w_df, others, to="varying")
        for dim, over in enumerate(gathered):
            if over:
                w_df = jax.lax.all_gather(w_df, over, axis=dim, tiled=True)
        y_nf = x_nd.astype(dtype) @ w_df.astype(dtype)
        return jax.lax.psum(y_nf, row_parallel) if row_parallel else y_nf

    # Rematerialised: the backward gathers the weight again rather than keeping every layer's
    # gathered weight from the forward alive until then (a whole model per device).
    return jax.shard_map(
        jax.checkpoint(local), mesh=mesh, in_specs=(x_spec, w_spec), out_specs=y_spec
    )(x_ND, w_DF)
