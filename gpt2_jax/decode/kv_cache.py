"""Preallocated K/V cache and the cached forward pass, built from the model's hooks.

The cache holds n_kv_head heads per layer, so GQA / MQA caches are n_kv_head/n_head of MHA's.
Absolute position p lives in slot p mod S and `pos_BS` records which position each slot holds
(-1 = empty). Full-attention models get one slot per position; sliding-window models keep a
rolling cache of w (+ slack) slots, constant in generated length, and can run past
`max_seq_len` with RoPE. Keys are cached after RoPE, so each keeps its absolute rotation.

Decoding rounds prompt and cache lengths up to buckets (`bucket_len`), so nearby lengths share
compiled steps, and runs on `decode_state(model)`: the model's state as few device arrays,
matmul weights already in the compute dtype, made once per model.
"""

from __future__ import annotations

import collections
import functools
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gpt2_jax.config import ModelConfig
from gpt2_jax.model.attention import dot_product_attention
from gpt2_jax.model.gpt import GPT

CACHE_BUCKET = 256  # decode lengths round up to multiples of this: one compile per bucket
# Shorter lengths round up to powers of two: padding a 3-token prompt of many rows to 256
# would multiply its prefill work (and memory) by 85.
MIN_BUCKET = 16
CASTS: collections.Counter = collections.Counter()  # compute-dtype weight copies made


class KVCache(NamedTuple):
    """Per-layer keys and values [B, S, K, H] and the absolute position in each slot."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    pos_BS: jax.Array  # int32, -1 = empty

    @property
    def size(self) -> int:
        return self.pos_BS.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.k, *self.v))


def cache_size(cfg: ModelConfig, total_len: int, *, ahead: int = 0) -> int:
    """Slots for a run of `total_len` positions whose writes run at most `ahead` positions
    past the earliest query still to come (chunk length − 1, or rejected speculative tokens).

    Full attention keeps every position; a window of w needs w + ahead slots so that no slot a
    later query can see is overwritten.
    """
    if cfg.attention_window is None:
        return total_len
    return min(total_len, cfg.attention_window + ahead)


def bucket_len(cfg: ModelConfig, n: int) -> int:
    """`n` rounded up to a multiple of CACHE_BUCKET, or below that to a power of two of at
    least MIN_BUCKET; learned positions cap it at max_seq_len, but never below `n`."""
    if n > CACHE_BUCKET:
        up = -(-n // CACHE_BUCKET) * CACHE_BUCKET
    else:
        up = max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    if cfg.pos_embedding == "learned":
        up = min(up, cfg.max_seq_len)
    return max(n, up)


def init_cache(cfg: ModelConfig, batch: int, size: int) -> KVCache:
    shape = (batch, size, cfg.n_kv_head, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, jnp.dtype(cfg.compute_dtype)) for _ in range(cfg.n_layer))
    return KVCache(zeros, zeros, jnp.full((batch, size), -1, jnp.int32))


def bytes_per_token(cfg: ModelConfig) -> int:
    """Cache bytes one position costs per sequence: K and V of every layer."""
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize


def _embed(model: GPT, tokens_BT: jax.Array, positions_BT: jax.Array):
    if model.cfg.pos_embedding == "learned":
        # Speculative verification may score tokens past the table; their outputs are never
        # kept, and clamping keeps them finite (an out-of-range gather would give NaN).
        positions_BT = jnp.minimum(positions_BT, model.cfg.max_seq_len - 1)
    return model.embed(tokens_BT, positions_BT)


def prefill(
    model: GPT,
    tokens_BP: jax.Array,
    size: int,
    *,
    length: jax.Array | int | None = None,
    all_logits: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Run a prompt at positions 0..P-1 from an empty cache of `size` slots.

    Only the first `length` tokens (default P; may be traced) are the prompt; the rest is
    padding, which causal attention keeps out of the prompt's positions and the cache marks
    empty. Attention is the model's own causal (window) attention, so the logits are the full
    forward's. Returns the logits [B, V] at position length − 1 (all [B, P, V] with
    `all_logits`) and the cache holding the last min(length, size) prompt positions.
    """
    cfg = model.cfg
    B, P = tokens_BP.shape
    length = P if length is None else length
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    x_BPD, rope_cs = _embed(model, tokens_BP, positions_BP)
    # Slot s holds the newest prompt position p ≡ s (mod size), or none (-1).
    slot_S = jnp.arange(size, dtype=jnp.int32)
    pos_S = jnp.where(slot_S < length, slot_S + size * ((length - 1 - slot_S) // size), -1)
    gather_S = jnp.maximum(pos_S, 0)
    filled_1S11 = (pos_S >= 0)[None, :, None, None]

    def store(a_BPKH: jax.Array) -> jax.Array:
        a_BSKH = jnp.take(a_BPKH, gather_S, axis=1).astype(jnp.dtype(cfg.compute_dtype))
        return jnp.where(filled_1S11, a_BSKH, 0)

    ks, vs = [], []
    for block in model.blocks():
        q_BPNH, k_BPKH, v_BPKH = block.attn.qkv(block.ln_1(x_BPD), rope_cs)
        y_BPNH = dot_product_attention(
            q_BPNH, k_BPKH, v_BPKH, window=cfg.attention_window, impl=cfg.attention_impl
        )
        x_BPD = x_BPD + block.attn.out(y_BPNH)
        x_BPD = x_BPD + block.mlp(block.ln_2(x_BPD))
        ks.append(store(k_BPKH))
        vs.append(store(v_BPKH))
    pos_BS = jnp.broadcast_to(pos_S, (B, size))
    if not all_logits:
        x_BPD = jax.lax.dynamic_slice_in_dim(x_BPD, length - 1, 1, axis=1)
    logits = model.logits(x_BPD)
    return (logits if all_logits else logits[:, 0]), KVCache(tuple(ks), tuple(vs), pos_BS)


def visible_mask(query_pos_BT: jax.Array, key_pos_BS: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S]: key slot s is filled and query t may see it (causal, within the window)."""
    q_BT1, k_B1S = query_pos_BT[:, :, None], key_pos_BS[:, None, :]
    mask_BTS = (k_B1S >= 0) & (k_B1S <= q_BT1)
    if window is not None:
        mask_BTS &= k_B1S > q_BT1 - window
    return mask_BTS


def forward_cached(
    model: GPT, cache: KVCache, tokens_BT: jax.Array, positions_BT: jax.Array
) -> tuple[jax.Array, KVCache]:
    """Logits [B, T, V] of new tokens at absolute `positions_BT` (contiguous within a row).

    Their K/V are written into the cache first and the queries attend over the whole cache.
    Slots holding positions ≥ a query's (left by rejected speculative tokens) are masked, so
    rolling back is just moving the position back. T must be ≤ size − w + 1 for a window.
    """
    cfg = model.cfg
    B, _ = tokens_BT.shape
    slots_BT = positions_BT % cache.size
    rows_B1 = jnp.arange(B)[:, None]
    pos_BS = cache.pos_BS.at[rows_B1, slots_BT].set(positions_BT)
    mask_BTS = visible_mask(positions_BT, pos_BS, cfg.attention_window)
    x_BTD, rope_cs = _embed(model, tokens_BT, positions_BT)
    ks, vs = [], []
    for block, k_BSKH, v_BSKH in zip(model.blocks(), cache.k, cache.v, strict=True):
        q_BTNH, k_BTKH, v_BTKH = block.attn.qkv(block.ln_1(x_BTD), rope_cs)
        k_BSKH = k_BSKH.at[rows_B1, slots_BT].set(k_BTKH.astype(k_BSKH.dtype))
        v_BSKH = v_BSKH.at[rows_B1, slots_BT].set(v_BTKH.astype(v_BSKH.dtype))
        y_BTNH = dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, window=cfg.attention_window, mask_BTS=mask_BTS
        )
        x_BTD = x_BTD + block.attn.out(y_BTNH)
        x_BTD = x_BTD + block.mlp(block.ln_2(x_BTD))
        ks.append(k_BSKH)
        vs.append(v_BSKH)
    return model.logits(x_BTD), KVCache(tuple(ks), tuple(vs), pos_BS)


# ------------------------------------------------------------------------- decoding weights


class DecodeState(NamedTuple):
    """A model as the jitted decoding steps take it: `graph` static, `leaves` arrays."""

    graph: tuple  # graphdef, RNG treedef and shapes, state treedef, packing: hashable
    leaves: tuple  # device arrays: the state's matrices, then its vectors packed per dtype


_DECODE_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _device_leaf(x, dtype):
    if not isinstance(x, jax.Array):
        x = jnp.asarray(x)  # host arrays are uploaded here, once, not at every jitted call
    elif not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(
                "decoding needs the model's arrays on this process; gather them first "
                "(e.g. multihost_utils.process_allgather)"
            )
        x = x.addressable_data(0)  # a replicated array's local copy: decode without peers
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


@functools.cache
def _key_data_shape(impl) -> tuple:
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape


def _rng_spec(x) -> tuple:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return impl, x.shape + _key_data_shape(impl)
    return None, x.shape, x.dtype


def _zero_rng(spec: tuple) -> jax.Array:
    if spec[0] is None:
        return jnp.zeros(spec[1], spec[2])
    return jax.random.wrap_key_data(jnp.zeros(spec[1], jnp.uint32), impl=spec[0])


def _pack(leaves: list) -> tuple[tuple, tuple]:
    """(layout, arrays): the vectors (biases, LayerNorm parameters) concatenated into one
    array per dtype, after the other leaves. Every array costs each jitted call host time,
    and vectors feed elementwise ops, into which slicing them back out fuses."""
    kept, packs, ends, slots = [], {}, {}, []
    for x in leaves:
        if x.ndim == 1:
            start = ends.get(x.dtype, 0)
            packs.setdefault(x.dtype, []).append(x)
            ends[x.dtype] = start + x.size
            slots.append((x.dtype, start, start + x.size))
        else:
            slots.append((None, len(kept)))
            kept.append(x)
    index = {dtype: len(kept) + i for i, dtype in enumerate(packs)}
    layout = tuple((s[1],) if s[0] is None else (index[s[0]], *s[1:]) for s in slots)
    return layout, (*kept, *(jnp.concatenate(group) for group in packs.values()))


def _unpack(layout: tuple, arrays) -> list:
    return [arrays[e[0]] if len(e) == 1 else arrays[e[0]][e[1] : e[2]] for e in layout]


def decoding_model(graph: tuple, leaves) -> GPT:
    """The model of a `DecodeState` (in a jitted step), in eval mode. Its dropout RNG streams
    are zeros: eval mode never draws from them, and passing them would cost every call."""
    graphdef, rng_treedef, rng_specs, treedef, layout = graph
    rngs = jax.tree.unflatten(rng_treedef, [_zero_rng(s) for s in rng_specs])
    model = nnx.merge(graphdef, rngs, jax.tree.unflatten(treedef, _unpack(layout, leaves)))
    model.eval()
    return model


def decode_state(model: GPT) -> DecodeState:
    """The model's state for decoding: device arrays, with the Linear and Embed weights in the
    compute dtype. Those layers cast their weights at every use, so casting once gives the
    same values; LayerNorm applies its parameters in fp32, so they stay as they are.

    Made once per model and reused while its graph and arrays are the same objects.
    """
    graphdef, rngs, state = nnx.split(model, nnx.RngState, ...)
    rng_leaves, rng_treedef = jax.tree.flatten(rngs)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    structure = (graphdef, rng_treedef, tuple(map(_rng_spec, rng_leaves)), treedef)
    leaves = [x for _, x in flat]
    hit = _DECODE_STATES.get(model)
    if hit is not None and hit[0] == structure:
        if all(a is b for a, b in zip(hit[1], leaves, strict=True)):
            return hit[2]
    dtype = jnp.dtype(model.cfg.compute_dtype)
    cast = {p for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear | nnx.Embed)}

    def target(keypath, x):
        module = tuple(k.key for k in keypath if isinstance(k, jax.tree_util.DictKey))[:-1]
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        return dtype if module in cast and floating and x.dtype != dtype else None

    dtypes = [target(kp, x) for kp, x in flat]
    if any(d is not None for d in dtypes):
        CASTS["copies"] += 1
    layout, arrays = _pack(list(map(_device_leaf, leaves, dtypes)))
    out = DecodeState((*structure, layout), arrays)
    _DECODE_STATES[model] = (structure, tuple(leaves), out)
    return out
