"""Embedding lookup from a table split by vocabulary rows across devices.

`lookup(table_VD, tokens_BT)` equals `jnp.take(table_VD, tokens_BT, axis=0)`. Under a step's
mesh (`gpt2_jax.parallel.sharding.active`) with the table's rows split over mesh axes
(`"vocab"`: tensor and fsdp), every device looks up the ids that fall in its rows and zeros
elsewhere, and the partial rows are summed across the row-splitting axes. Where an axis also
splits the batch (fsdp), the ids are first gathered over it and the sum is a reduce-scatter
back to the device's own rows. Its transpose is the mirror image: the output gradient is
gathered, and each device adds it into its own table rows only; no device ever holds a
gradient of the whole table. XLA's own partitioning of this gather gathers the whole table
instead, and its gradient is then a whole-table partial sum on every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gpt2_jax.parallel import sharding


def lookup(table_VD: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """Rows `table_VD[tokens_BT]` ([B, T, D]); ids outside [0, V) give zero rows under a mesh
    that splits the table and are clamped otherwise (callers check ids beforehand)."""
    active = sharding.active()
    if active is None:
        return jnp.take(table_VD, tokens_BT, axis=0)
    mesh, rules = active
    table_spec = sharding.logical_spec(("vocab", None), table_VD.shape, mesh, rules)
    rows = sharding.mesh_axes(table_spec[0])
    if not rows:
        return jnp.take(table_VD, tokens_BT, axis=0)
    ids_spec = sharding.logical_spec(("batch", None), tokens_BT.shape, mesh, rules)
    batch = sharding.mesh_axes(ids_spec[0])
    shared = tuple(a for a in rows if a in batch)  # split both: gather ids, scatter rows
    only_rows = tuple(a for a in rows if a not in batch)  # ids replicated there: sum rows

    def local(table_vD, ids_bT):
        if shared:
            ids_bT = jax.lax.all_gather(ids_bT, shared, axis=0, tiled=True)
        v = table_vD.shape[0]
        start = jax.lax.axis_index(rows) * v
        local_bT = ids_bT - start
        mine_bT = (local_bT >= 0) & (local_bT < v)
        x_bTD = jnp.take(table_vD, jnp.where(mine_bT, local_bT, 0), axis=0)
        x_bTD = jnp.where(mine_bT[..., None], x_bTD, jnp.zeros((), x_bTD.dtype))
        if only_rows:
            x_bTD = jax.lax.psum(x_bTD, only_rows)
        if shared:
            x_bTD = jax.lax.psum_scatter(x_bTD, shared, scatter_dimension=0, tiled=True)
        return x_bTD

    out_spec = PartitionSpec(ids_spec[0], None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(table_spec, ids_spec), out_specs=out_spec)(
        table_VD, tokens_BT
    )
