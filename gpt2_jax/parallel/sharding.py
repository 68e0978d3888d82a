"""Device mesh (data, fsdp, tensor) and the rules mapping logical axis names to mesh axes."""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2_jax.config import MeshConfig
from gpt2_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis → mesh axis. FSDP shards the model dimension of every matrix but the vocabulary
# ones, which it splits by vocabulary row (with tensor parallelism: Megatron column / row for
# heads and the MLP, and vocabulary rows).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # expert devices split the batch outside the experts
    "vocab": ("tensor", "fsdp"),
    "embed": "fsdp",
    "qkv": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "layers": None,  # the stacked layer axis of model.scan_layers
    "expert": "expert",  # MoE experts (gpt2_jax.model.moe)
}


# The mesh and rules activations are pinned to while a step is traced; None outside a step
# (single-device use, generation), where `constrain` does nothing.
_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
    "activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict | None = None):
    """Within this block, `constrain` pins activations to `mesh` by `rules`."""
    token = _ACTIVATIONS.set((mesh, RULES if rules is None else rules))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """Pin an activation's sharding by logical axis names (one per dimension).

    Without it XLA may resolve FSDP's clash (batch and the weights' embed axis both on `fsdp`)
    by splitting activations along features and all-reducing whole micro-batches.
    """
    active = _ACTIVATIONS.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active() -> tuple[Mesh, dict] | None:
    """The (mesh, rules) activations are pinned to now, or None outside a step."""
    return _ACTIVATIONS.get()


def step_device() -> jax.Device:
    """The device a step is being traced for: the first of the active mesh (which may be a
    compile-only accelerator, `benchmarks/scale.py --target`), else `jax.devices()[0]`."""
    active = _ACTIVATIONS.get()
    return active[0].devices.flat[0] if active is not None else jax.devices()[0]


def split_count(name: str) -> int:
    """How many devices the active mesh splits logical axis `name` over (1 outside a step)."""
    active = _ACTIVATIONS.get()
    if active is None:
        return 1
    mesh, rules = active
    return _axis_size(mesh, rules.get(name))


def tensor_parallel() -> bool:
    """Whether activations are being pinned to a mesh with a `tensor` axis over 1."""
    active = _ACTIVATIONS.get()
    return active is not None and active[0].shape["tensor"] > 1


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over `devices` (default: all); one -1 axis takes
    what is left.

    Devices are placed by `mesh_utils.create_device_mesh`, which follows the physical topology
    (on a TPU slice the innermost axes get the best-connected chips, e.g. an 8-chip axis is a
    ring of neighbours on a v5e 4x2; CPU devices keep their list order). The list order,
    reshaped, is kept instead for a TPU subset that forms no whole block of chips, and where
    that placement would split a tensor group across processes (each process loads the batch
    rows of its own devices).
    """
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
            f"mesh data×fsdp×expert×tensor = {math.prod(sizes.values())} but there are {n} "
            f"devices; set mesh.* so the product is {n} (or one of them to -1)"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    # jax raises any of these (AssertionError too) for a device set that is no physical block
    except (ValueError, NotImplementedError, AssertionError):
        grid = None
    if grid is None or _splits_tensor_groups(grid):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _splits_tensor_groups(grid: np.ndarray) -> bool:
    """Whether some tensor group (the last axis) holds devices of more than one process."""
    procs = np.vectorize(lambda d: getattr(d, "process_index", 0), otypes=[int])(grid)
    return bool((procs != procs[..., :1]).any())


def mesh_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry or rule: None, a name, or a tuple of names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _axis_size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in mesh_axes(axes))


def rules_for(n_kv_head: int, mesh: Mesh) -> dict:
    """RULES, with the fused q|k|v projection replicated along `tensor` when `tensor` does not
    divide n_kv_head (GQA / MQA with few K/V heads): replicating beats splitting a head."""
    rules = dict(RULES)
    if n_kv_head % mesh.shape["tensor"]:
        rules["qkv"] = None
    return rules


def logical_spec(logical_axes, shape, mesh: Mesh, rules: dict | None = None) -> PartitionSpec:
    """PartitionSpec for one array by the logical names of its dimensions.

    A dimension takes the mesh axes of its rule (those over size 1) that no other dimension
    has taken, and none where their product does not divide it. "vocab" dimensions choose
    first: the embedding and head are split by vocabulary over fsdp too, so each device
    computes its slice's gradient whole (activations then split over the other batch axes).
    """
    rules = RULES if rules is None else rules
    spec: list = [None] * len(shape)
    used: set[str] = set()
    order = sorted(range(len(shape)), key=lambda i: logical_axes[i] != "vocab")
    for i in order:
        name, dim = logical_axes[i], shape[i]
        flat = mesh_axes(rules.get(name) if name else None)
        free = tuple(a for a in flat if a not in used and mesh.shape[a] > 1)
        if free and dim % _axis_size(mesh, free) == 0:
            used |= set(free)
            spec[i] = free[0] if len(free) == 1 else free
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


def splits_params(specs, axes, mesh: Mesh) -> bool:
    """Whether any parameter of `specs` is split over one of the mesh `axes` of size > 1."""
    axes = {a for a in axes if mesh.shape[a] > 1}
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
        if any(axes & set(mesh_axes(entry)) for entry in spec):
            return True
    return False


def _batch_free(spec: PartitionSpec) -> tuple:
    """`spec` with the batch axes (data, fsdp) dropped: what a per-replica copy keeps."""
    batch = set(RULES["batch"])
    return tuple(None if a in batch else a for a in spec)


def replica_zeros(params, specs, replicas: int, mesh: Mesh):
    """Zero gradients [replicas, ...] per parameter, one row per batch shard, each row laid
    out like its parameter minus the batch axes (those now index the rows)."""

    def one(p, spec):
        sharded = NamedSharding(mesh, PartitionSpec(RULES["batch"], *_batch_free(spec)))
        return jax.lax.with_sharding_constraint(jnp.zeros((replicas, *p.shape), p.dtype), sharded)

    return jax.tree.map(one, params, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def sum_replicas(grads_R, specs, mesh: Mesh):
    """Sum per-replica gradients [R, ...] into each parameter's layout: a reduce-scatter over
    the batch axis that splits the parameter (fsdp), an all-reduce over the others."""
    batch = RULES["batch"]

    def one(g_R, spec):
        entries = tuple(spec) + (None,) * (g_R.ndim - 1 - len(spec))

        def local(g_1):
            g = g_1[0]
            for axis in batch:  # scatter first, so the all-reduce moves a shard
                if axis in entries and mesh.shape[axis] > 1:
                    dim = entries.index(axis)
                    g = jax.lax.psum_scatter(g, axis, scatter_dimension=dim, tiled=True)
            rest = tuple(a for a in batch if a not in entries and mesh.shape[a] > 1)
            return jax.lax.psum(g, rest) if rest else g

        return jax.shard_map(
            local, mesh=mesh, in_specs=PartitionSpec(batch, *_batch_free(spec)),
            out_specs=spec, check_vma=False,
        )(g_R)  # fmt: skip

    return jax.tree.map(one, grads_R, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec() -> PartitionSpec:
    return PartitionSpec(RULES["batch"], None)


def check_batch(batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
    """Refuse a micro-batch (batch_size / grad_accum) that data × fsdp does not divide: XLA
    would silently replicate it, every device computing every row."""
    n = _axis_size(mesh, RULES["batch"])
    if batch_size % n:
        raise UserError(
            f"train.batch_size={batch_size} is not divisible by mesh data×fsdp×expert={n}; "
            f"use a multiple of {n}"
        )
    micro = batch_size // grad_accum
    if batch_size % grad_accum == 0 and micro % n:
        raise UserError(
            f"the micro-batch train.batch_size/train.grad_accum = {batch_size}/{grad_accum} = "
            f"{micro} is not divisible by mesh data×fsdp×expert={n}; make batch_size a multiple of "
            f"{n * grad_accum} or lower grad_accum"
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
            f"{sorted(owners[shared[0]])}; make data×fsdp×expert a multiple of the process count "
            "(mesh.tensor at most the devices of one process)"
        )


def check_experts(n_experts: int, mesh: Mesh) -> None:
    e = mesh.shape["expert"]
    if e > 1 and (n_experts == 0 or n_experts % e):
        raise UserError(
            f"model.moe_experts={n_experts} is not divisible by mesh.expert={e}; pick an expert "
            "axis dividing the number of experts (mesh.expert=1 without MoE)"
        )


def check_heads(n_head: int, mesh: Mesh) -> None:
    t = mesh.shape["tensor"]
    if n_head % t:
        raise UserError(
            f"model.n_head={n_head} is not divisible by mesh.tensor={t}; pick a tensor size "
            "dividing n_head"
        )
