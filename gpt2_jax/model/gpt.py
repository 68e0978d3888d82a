"""GPT-2 in Flax NNX: learned or rotary positions, MHA / GQA / MQA, full or sliding-window.

Shape suffixes: B batch, T query length, S key length, D n_embd, N query heads, K kv heads,
H head dim, F MLP width, V vocab (the padded width, `ModelConfig.padded_vocab`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax.config import LOSS_IMPLS, ConfigError, ModelConfig
from gpt2_jax.errors import UserError
from gpt2_jax.model import layer_stack
from gpt2_jax.model.attention import dot_product_attention
from gpt2_jax.model.moe import STATS, MoE
from gpt2_jax.model.rope import apply_rope, rope_angles
from gpt2_jax.ops import fsdp_matmul, mixed_matmul, vocab_lookup
from gpt2_jax.ops.chunked_loss import chunked_cross_entropy
from gpt2_jax.ops.vocab_mask import mask_vocab
from gpt2_jax.parallel import sharding
from gpt2_jax.parallel.sharding import constrain, tensor_parallel

REMAT_POLICIES = ("none", "block", "dots")
RESIDUAL = ("batch", None, None)  # the residual stream's logical axes: batch-split only


# Parameters carry logical axis names (`logical_axes` metadata); gpt2_jax.parallel.sharding maps
# them to mesh axes. A plain metadata key keeps construction free of any mesh.
def _with_axes(init, axes: tuple[str | None, ...]):
    return nnx.with_metadata(init, logical_axes=axes)


def _init(std: float, axes: tuple[str | None, ...]):
    return _with_axes(jax.nn.initializers.normal(std), axes)


def _zeros(axes: tuple[str | None, ...]):
    return _with_axes(jax.nn.initializers.zeros, axes)


class Dense(nnx.Linear):
    """`nnx.Linear` applied to the rows of a [..., d_in] input flattened to 2-D.

    The reshape is free, and it matters on XLA:CPU: contracting a [B, T, d] activation over
    (B, T) for the weight gradient makes XLA transpose it first, and it fuses the whole
    chain of residual-gradient sums into each such transpose, so every layer's backward
    recomputed the later layers' (quadratic in depth: 515 → 222 ms per layer at d 256).
    """

    def __call__(self, x_XD: jax.Array) -> jax.Array:
        lead = x_XD.shape[:-1]
        x_ND = x_XD.reshape(-1, x_XD.shape[-1])
        if not sharding.active():
            return super().__call__(x_ND).reshape(*lead, -1)
        # Under a mesh: an fsdp-split kernel's gradient is reduce-scattered where it is made.
        kernel = self.kernel[...]
        axes = self.kernel.get_metadata().get("logical_axes", (None,) * 2)[-2:]  # no layer axis
        y_NF = fsdp_matmul.matmul(x_ND, kernel, axes, self.dtype)
        if self.bias is not None:
            y_NF = y_NF + self.bias[...].astype(self.dtype)
        return y_NF.reshape(*lead, -1)


def _dense(cfg: ModelConfig, d_in: int, d_out: int, std: float, axes, *, rngs, bias=None):
    return Dense(
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

    def _project(self, x_BTD: jax.Array) -> list[jax.Array]:
        """The q, k and v projections [B, T, ·] of the fused c_attn.

        Under tensor parallelism the kernel's columns are regrouped per K/V head (its query
        heads, then its k and v) and split by group, so every rank computes its own heads'
        q, k and v in one matmul; cutting the fused [q | k | v] output instead would straddle
        ranks and move activations between them.
        """
        cfg = self.cfg
        K, H, G = cfg.n_kv_head, cfg.head_dim, cfg.n_head // cfg.n_kv_head
        nq, nk = cfg.n_head * H, K * H
        if not tensor_parallel():
            qkv = self.c_attn(x_BTD)
            return [qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]]
        dtype = jnp.dtype(cfg.compute_dtype)

        def grouped(a):  # [..., nq + 2 nk] → [..., K, (G + 2) H]
            lead = a.shape[:-1]
            q, k, v = a[..., :nq], a[..., nq : nq + nk], a[..., nq + nk :]
            parts = (q.reshape(*lead, K, G * H), k.reshape(*lead, K, H), v.reshape(*lead, K, H))
            return jnp.concatenate(parts, axis=-1)

        w_DKX = constrain(grouped(self.c_attn.kernel[...].astype(dtype)), None, "heads", None)
        y_BTKX = jnp.einsum("btd,dkx->btkx", x_BTD.astype(dtype), w_DKX)
        if cfg.bias:
            y_BTKX = y_BTKX + grouped(self.c_attn.bias[...].astype(dtype))
        B, T = x_BTD.shape[:2]
        q_BTX = y_BTKX[..., : G * H].reshape(B, T, nq)
        k_BTX = y_BTKX[..., G * H : (G + 1) * H].reshape(B, T, nk)
        return [q_BTX, k_BTX, y_BTKX[..., (G + 1) * H :].reshape(B, T, nk)]

    def qkv(self, x_BTD: jax.Array, rope_cs) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Project to q [B,T,N,H] and k, v [B,T,K,H], with RoPE applied when configured."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        q_BTX, k_BTX, v_BTX = self._project(x_BTD)
        q_BTNH = q_BTX.reshape(B, T, cfg.n_head, cfg.head_dim)
        k_BTKH = k_BTX.reshape(B, T, cfg.n_kv_head, cfg.head_dim)
        v_BTKH = v_BTX.reshape(B, T, cfg.n_kv_head, cfg.head_dim)
        if rope_cs is not None:
            q_BTNH = apply_rope(q_BTNH, *rope_cs)
            k_BTKH = apply_rope(k_BTKH, *rope_cs)
        heads = ("batch", None, "heads", None)
        return constrain(q_BTNH, *heads), constrain(k_BTKH, *heads), constrain(v_BTKH, *heads)

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
        h_BTF = constrain(jax.nn.gelu(self.c_fc(x_BTD), approximate=True), "batch", None, "mlp")
        return self.dropout(self.c_proj(h_BTF))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block; its MLP is routed over experts (`MoE`) when
    `cfg.is_moe_layer(i)`. `__call__` returns the output and the MoE stats (None if dense)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
        self.ln_1 = _layer_norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs=rngs)
        self.mlp = MoE(cfg, rngs=rngs) if moe else MLP(cfg, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, rope_cs) -> tuple[jax.Array, dict | None]:
        x_BTD = constrain(x_BTD + self.attn(self.ln_1(x_BTD), rope_cs), *RESIDUAL)
        h_BTD = self.ln_2(x_BTD)
        if isinstance(self.mlp, MoE):
            y_BTD, stats = self.mlp.routed(h_BTD)
        else:
            y_BTD, stats = self.mlp(h_BTD), None
        return constrain(x_BTD + y_BTD, *RESIDUAL), stats


def _remat_block(policy: str):
    if policy == "none":
        return lambda block, x, rope_cs: block(x, rope_cs)
    jax_policy = {
        "block": None,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[policy]
    return nnx.remat(lambda block, x, rope_cs: block(x, rope_cs), policy=jax_policy)


def _mean_stats(per_layer: list[dict]) -> dict[str, jax.Array]:
    """The MoE stats averaged over the MoE layers ({} for a dense model)."""
    if not per_layer:
        return {}
    return {k: sum(s[k] for s in per_layer) / len(per_layer) for k in STATS}


class GPT(nnx.Module):
    """GPT-2 language model; `__call__` maps token ids [B, T] to fp32 logits [B, T, V], -inf
    at the padded ids (vocab_size <= id < padded_vocab)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ConfigError(f"unknown train.remat={remat!r}; use one of {REMAT_POLICIES}")
        self.cfg = cfg
        self.remat = remat
        pdtype, dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.compute_dtype)
        self.wte = nnx.Embed(
            cfg.padded_vocab, cfg.n_embd, dtype=dtype, param_dtype=pdtype,
            embedding_init=_init(0.02, ("vocab", "embed")), rngs=rngs,
        )  # fmt: skip
        if cfg.pos_embedding == "learned":
            self.wpe = nnx.Embed(
                cfg.max_seq_len, cfg.n_embd, dtype=dtype, param_dtype=pdtype,
                embedding_init=_init(0.02, (None, "embed")), rngs=rngs,
            )  # fmt: skip
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
        if cfg.scan_layers:  # moe_every is 1 here (ModelConfig): the layers are all alike
            moe = cfg.moe_experts > 0
            self.h = layer_stack.stacked(lambda r: Block(cfg, rngs=r, moe=moe), cfg.n_layer, rngs)
        else:
            self.h = nnx.List(
                [Block(cfg, rngs=rngs, moe=cfg.is_moe_layer(i)) for i in range(cfg.n_layer)]
            )
        self.ln_f = _layer_norm(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(
                cfg, cfg.n_embd, cfg.padded_vocab, 0.02, ("embed", "vocab"), rngs=rngs, bias=False
            )

    def table(self) -> jax.Array:
        """The token embedding table [V, D] in the compute dtype (`_split_vocab`)."""
        return self._split_vocab(self.wte.embedding[...], 0)

    def _split_vocab(self, w: jax.Array, axis: int) -> jax.Array:
        """`w` in the compute dtype; under a mesh split by vocabulary (dimension `axis`) over
        tensor and fsdp and whole along features, its vocabulary padded with zeros to a
        multiple of the splitting devices (past vocab_size: masked like vocab_pad_multiple's).

        The lookup (`ops.vocab_lookup`) and the head then compute each device's share of the
        gradient whole on that device; a table split along features would be gathered whole
        and its gradient would be a whole-table partial sum on every device.
        """
        w = w.astype(jnp.dtype(self.cfg.compute_dtype))
        pad = -w.shape[axis] % sharding.split_count("vocab")
        if pad:
            w = jnp.pad(w, [(0, pad if i == axis else 0) for i in range(w.ndim)])
        names = [None] * w.ndim
        names[axis] = "vocab"
        return constrain(w, *names)

    def embed(
        self, tokens_BT: jax.Array, positions_BT: jax.Array, table_VD: jax.Array | None = None
    ) -> tuple[jax.Array, object]:
        """Token (+ learned position) embeddings and the RoPE (cos, sin) or None; `table_VD`
        is `table()` where the caller has it already."""
        table_VD = self.table() if table_VD is None else table_VD
        x_BTD = vocab_lookup.lookup(table_VD, tokens_BT)
        rope_cs = None
        if self.cfg.pos_embedding == "learned":
            wpe_TD = constrain(self.wpe.embedding[...], None, None)  # gathered over fsdp
            x_BTD = x_BTD + jnp.take(wpe_TD.astype(x_BTD.dtype), positions_BT, axis=0)
        else:
            rope_cs = rope_angles(positions_BT, self.cfg.head_dim, self.cfg.rope_theta)
        return self.drop(x_BTD), rope_cs

    def head(self) -> tuple[jax.Array, str]:
        """The LM head weight in the compute dtype and its layout: the tied table [V, D]
        ("VD") or the untied kernel [D, V] ("DV"), as `_split_vocab` lays it out."""
        if self.cfg.tie_embeddings:
            return self.table(), "VD"
        return self._split_vocab(self.lm_head.kernel[...], 1), "DV"

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """Final LayerNorm and LM head; fp32 logits over the padded vocab (under a training
        mesh, padded on to `_split_vocab`'s width), the columns past vocab_size at -inf."""
        x_BTD = self.ln_f(x_BTD)
        w, layout = self.head()
        B, T, D = x_BTD.shape  # rows flattened to 2-D, as in `Dense`
        # mixed_matmul: autodiff of an fp32-output einsum runs the backward f32 × f32.
        equation = "nd,vd->nv" if layout == "VD" else "nd,dv->nv"
        logits_NV = mixed_matmul.einsum(equation, x_BTD.reshape(B * T, D), w, w.dtype)
        # The padded width stays (its vocab axis divides the mesh); -inf keeps the padded ids
        # out of the loss, argmax and sampling. A no-op, no graph change, when unpadded.
        return mask_vocab(logits_NV.reshape(B, T, -1), self.cfg.vocab_size)

    def loss(
        self, tokens_BT: jax.Array, targets_BT: jax.Array, *, impl: str = "full", chunk: int = 128
    ) -> jax.Array:
        """Mean next-token cross-entropy (fp32). impl "full" materialises the logits;
        "chunked" fuses head and loss `chunk` positions at a time (`gpt2_jax.ops.chunked_loss`)."""
        return self.loss_and_stats(tokens_BT, targets_BT, impl=impl, chunk=chunk)[0]

    def loss_and_stats(
        self, tokens_BT: jax.Array, targets_BT: jax.Array, *, impl: str = "full", chunk: int = 128
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`loss` and the MoE stats averaged over the MoE layers (`gpt2_jax.model.moe.STATS`; {} for
        a dense model)."""
        if impl not in LOSS_IMPLS:
            raise ConfigError(f"unknown train.loss_impl={impl!r}; use one of {LOSS_IMPLS}")
        # One table for the lookup and the tied head: under a mesh its layout is then changed
        # once, and so is its summed gradient (`_split_vocab`).
        table_VD = self.table() if self.cfg.tie_embeddings else None
        x_BTD, stats = self.hidden_and_stats(tokens_BT, table_VD=table_VD)
        if impl == "full":
            if sharding.split_count("vocab") == 1:
                return cross_entropy(self.logits(x_BTD), targets_BT), stats
            # Under a mesh splitting the vocabulary: the fused head over one chunk of the
            # whole sequence (the same [B, T, V] logits), whose split the SPMD partitioner
            # would not find (it gathers the table and all-reduces its gradient).
            chunk = x_BTD.shape[1]
        x_BTD = self.ln_f(x_BTD)
        w, layout = self.head() if table_VD is None else (table_VD, "VD")
        loss = chunked_cross_entropy(
            x_BTD.astype(w.dtype), w, targets_BT,
            n_valid=self.cfg.vocab_size, chunk=chunk, layout=layout,
        )  # fmt: skip
        return loss, stats

    def hidden(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        """The last block's output [B, T, D] (before the final LayerNorm and the LM head)."""
        return self.hidden_and_stats(tokens_BT, positions_BT)[0]

    def hidden_and_stats(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        table_VD: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`hidden` and the MoE stats averaged over the MoE layers ({} for a dense model);
        `table_VD` as in `embed`."""
        check_tokens(tokens_BT, self.cfg)
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BTD, rope_cs = self.embed(tokens_BT, positions_BT, table_VD)
        x_BTD = constrain(x_BTD, *RESIDUAL)
        run_block = _remat_block(self.remat)
        if self.cfg.scan_layers:
            x_BTD, stats = layer_stack.scan(
                self.h, x_BTD, lambda b, x_BTD: run_block(b, x_BTD, rope_cs)
            )
            return x_BTD, {} if stats is None else {k: jnp.mean(v) for k, v in stats.items()}
        per_layer = []
        for block in self.h:
            x_BTD, stats = run_block(block, x_BTD, rope_cs)
            per_layer += [] if stats is None else [stats]
        return x_BTD, _mean_stats(per_layer)

    def blocks(self) -> list[Block]:
        """The blocks in order, in either layout (scanned: views of the stacked arrays)."""
        if self.cfg.scan_layers:
            return layer_stack.layers(self.h, self.cfg.n_layer)
        return list(self.h)

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        logits_BTV = self.logits(self.hidden(tokens_BT, positions_BT))[..., : self.cfg.padded_vocab]
        return constrain(logits_BTV, "batch", None, "vocab")


def with_layout(model: GPT, scan_layers: bool) -> GPT:
    """`model` with its blocks unrolled (False) or stacked and scanned (True): the same weights
    (copied), a fresh RNG state; `model` itself is returned when it has that layout already."""
    if model.cfg.scan_layers == scan_layers:
        return model
    cfg = dataclasses.replace(model.cfg, scan_layers=scan_layers)

    def build() -> GPT:
        return GPT(cfg, rngs=nnx.Rngs(0), remat=model.remat)

    graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    # Under jit the parameter initialisers are dead code: only the RNG state is computed.
    rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
    params = layer_stack.relayout(nnx.state(model, nnx.Param), abstract_params)
    return nnx.merge(graphdef, params, rest)


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
    """Parameter count, padded vocab rows included (they are stored and the head multiplies
    them); `matmul_only` counts what one token multiplies (the MFU convention): no lookup
    tables (`wpe`, and `wte` when the head is untied; a tied `wte` is the head's matmul, at the
    padded width, so it counts) and, of each MoE layer's experts, the k of E it runs."""
    n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if not matmul_only:
        return int(n)
    cfg = model.cfg
    if cfg.pos_embedding == "learned":
        n -= model.wpe.embedding.size
    if not cfg.tie_embeddings:
        n -= model.wte.embedding.size
    if cfg.moe_experts:  # either layout, from shapes alone: no layer is sliced out
        flat = jax.tree_util.tree_leaves_with_path(nnx.state(model.h, nnx.Param))
        experts = sum(p.size for path, p in flat if "experts" in jax.tree_util.keystr(path))
        n -= experts * (cfg.moe_experts - cfg.moe_top_k) // cfg.moe_experts
    return int(n)


def check_compute_dtype(dtype: str, source: str = "--dtype float16") -> None:
    """Refuse float16 on CPU, where XLA has no float16 attention matmul."""
    if dtype == "float16" and jax.default_backend() == "cpu":
        raise UserError(
            f"{source} is not supported by XLA:CPU matmuls (no F16 x F16 -> F32 dot_general); "
            "use --dtype float32 or bfloat16, or run on a GPU"
        )
