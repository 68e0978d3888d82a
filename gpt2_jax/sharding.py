"""Device mesh (data, fsdp, tensor) and the rules mapping logical axis names to mesh axes."""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2_jax.config import MeshConfig
from gpt2_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis → mesh axis. FSDP shards the model dimension of every matrix; tensor
# parallelism splits heads and the MLP (Megatron column / row) and the vocabulary.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "qkv": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "norm": None,
}


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one -1 axis takes what is left."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise UserError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise UserError(f"mesh sizes must be positive or -1, got {sizes}")
    if free:
        if n % fixed:
            raise UserError(
                f"mesh {sizes} does not divide the {n} devices; set mesh.* so their product is {n}"
            )
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise UserError(
            f"mesh data×fsdp×tensor = {math.prod(sizes.values())} but there are {n} devices; "
            f"set mesh.* so the product is {n} (or one of them to -1)"
        )
    grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def rules_for(n_kv_head: int, mesh: Mesh) -> dict:
    """RULES, with the fused q|k|v projection replicated along `tensor` when `tensor` does not
    divide n_kv_head (GQA / MQA with few K/V heads): replicating beats splitting a head."""
    rules = dict(RULES)
    if n_kv_head % mesh.shape["tensor"]:
        rules["qkv"] = None
    return rules


def logical_spec(logical_axes, shape, mesh: Mesh, rules: dict | None = None) -> PartitionSpec:
    """PartitionSpec for one parameter; a dimension the mesh axis does not divide is replicated."""
    rules = RULES if rules is None else rules
    spec = []
    used: set[str] = set()
    for name, dim in zip(logical_axes, shape, strict=True):
        axes = rules.get(name) if name else None
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if flat and dim % _axis_size(mesh, flat) == 0 and not used & set(flat):
            used |= set(flat)
            spec.append(axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_specs(params: nnx.State, mesh: Mesh, rules: dict | None = None):
    """The Param state with each value replaced by its PartitionSpec (from `logical_axes`)."""

    def one(v):
        axes = v.get_metadata().get("logical_axes", (None,) * v.ndim)
        return v.replace(logical_spec(axes, v.shape, mesh, rules))

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def named(mesh: Mesh, specs):
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def opt_state_specs(tx: optax.GradientTransformation, opt_state, specs):
    """Optimizer moments shard like their parameters; counters are replicated."""
    return optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        opt_state,
        specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_spec() -> PartitionSpec:
    return PartitionSpec(RULES["batch"], None)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    n = _axis_size(mesh, RULES["batch"])
    if batch_size % n:
        raise UserError(
            f"train.batch_size={batch_size} is not divisible by mesh data×fsdp={n}; "
            f"use a multiple of {n}"
        )


def check_process_batch(mesh: Mesh) -> None:
    """Each process loads its own 1/process_count of the batch rows, so no batch shard may sit
    on devices of two processes (it would need the same rows loaded twice)."""
    n = _axis_size(mesh, RULES["batch"])
    owners: dict[int, set[int]] = {}
    for device, (rows, _) in NamedSharding(mesh, batch_spec()).devices_indices_map((n, 1)).items():
        owners.setdefault(rows.start or 0, set()).add(device.process_index)
    shared = sorted(r for r, procs in owners.items() if len(procs) > 1)
    if shared:
        raise UserError(
            f"batch shard {shared[0]} of mesh {dict(mesh.shape)} spans processes "
            f"{sorted(owners[shared[0]])}; make data×fsdp a multiple of the process count "
            "(mesh.tensor at most the devices of one process)"
        )


def check_heads(n_head: int, mesh: Mesh) -> None:
    t = mesh.shape["tensor"]
    if n_head % t:
        raise UserError(
            f"model.n_head={n_head} is not divisible by mesh.tensor={t}; pick a tensor size "
            "dividing n_head"
        )
