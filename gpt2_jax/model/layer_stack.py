"""Scanned layers (`model.scan_layers`): the blocks' parameters stacked on a leading layer axis
and run by one `jax.lax.scan`, so the compiled graph holds one block whatever the depth.

The two layouts hold the same numbers: unrolled `h/{i}/attn/c_attn/kernel` [D, X] is row i of
stacked `h/attn/c_attn/kernel` [L, D, X]. `relayout` moves any tree that holds parameters (the
parameters, Adam's moments, a whole TrainState) from one layout to the other by those paths.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS = "layers"  # the logical axis of the stack (replicated: every device runs every layer)
STACK = "h"  # the attribute of GPT holding the blocks, in both layouts


def stacked(make_block: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """One module whose every Variable has a leading axis of n layers, each layer initialised
    from its own split of `rngs` (dropout streams included)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(rngs: nnx.Rngs) -> nnx.Module:
        return make_block(rngs)

    stack = make(rngs)
    for _, param in nnx.iter_graph(stack):
        if isinstance(param, nnx.Param):
            axes = param.get_metadata().get("logical_axes", (None,) * (param.ndim - 1))
            param.set_metadata(logical_axes=(LAYERS, *axes))
    return stack


def scan(stack: nnx.Module, x, run_layer: Callable[[nnx.Module, jax.Array], tuple]):
    """`run_layer(block, x) -> (x, y)` for each layer of `stack` in order; returns the last x
    and the y's stacked on a leading layer axis. With dropout active, each layer's RNG
    counters are written back, as an unrolled loop would leave them; otherwise nothing is
    written, so a model closed over by a jit (evaluation) is never mutated."""
    graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
    draws = any(
        isinstance(m, nnx.Dropout) and m.rate > 0 and not m.deterministic
        for _, m in nnx.iter_graph(stack)
    )

    def body(x, layer):
        block = nnx.merge(graphdef, *layer)
        x, y = run_layer(block, x)
        return x, (y, nnx.split(block, nnx.Param, ...)[2] if draws else None)

    x, (ys, rest) = jax.lax.scan(body, x, (params, rest))
    if draws:
        nnx.update(stack, rest)
    return x, ys


def layers(stack: nnx.Module, n: int) -> list[nnx.Module]:
    """The n layers of `stack` as separate modules (each a slice of the stacked arrays)."""
    graphdef, state = nnx.split(stack)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]


def _key(entry) -> object:
    return getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry)))


def _layer_index(path: tuple) -> int | None:
    """Where the layer index of an unrolled path sits (right after STACK), else None."""
    for j, k in enumerate(path[:-1]):
        if k == STACK and isinstance(path[j + 1], int):
            return j + 1
    return None


def _is_stacked(path: tuple) -> bool:
    return STACK in path and _layer_index(path) is None


def relayout(tree, target):
    """`tree`'s arrays arranged as `target` (a tree of the other layout, or of the same; any
    leaves, e.g. ShapeDtypeStructs): unrolled layers are stacked, stacked ones sliced."""
    source = {tuple(map(_key, p)): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    target_paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves = []
    for path, want in target_paths:
        path = tuple(map(_key, path))
        if path in source:
            leaf = source[path]
        elif (j := _layer_index(path)) is not None:  # unrolled target, stacked source
            leaf = source[path[:j] + path[j + 1 :]][path[j]]
        elif _is_stacked(path):  # stacked target, unrolled source
            j = path.index(STACK) + 1
            leaf = jnp.stack([source[path[:j] + (i,) + path[j:]] for i in range(want.shape[0])])
        else:
            raise KeyError(f"{'/'.join(map(str, path))} has no counterpart in the source tree")
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)
