"""Conversion between the NNX model and the flat Hugging Face GPT-2 weight dict.

The flat layout uses HF GPT-2 names and Conv1D orientation ([in, out]); `c_attn` columns are
q (n_head·hd) | k (n_kv_head·hd) | v (n_kv_head·hd). A MoE layer's MLP is
`mlp.router.weight` [D, E], `mlp.experts.c_fc.weight` [E, D, 4D] / `.bias` [E, 4D] and
`mlp.experts.c_proj.weight` [E, 4D, D] / `.bias` [E, D]. `lm_head.weight` ([V, D]) appears only
when embeddings are untied. The flat dict holds the logical vocabulary (V = vocab_size rows):
a padded model's extra rows (`model.vocab_pad_multiple`) are trimmed on the way out and
filled with zeros on the way in; they are never looked up and their logits are -inf, so their
values never matter.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax.errors import UserError
from gpt2_jax.model.gpt import GPT, with_layout
from gpt2_jax.model.layer_stack import relayout
from gpt2_jax.model.moe import MoE

# Buffers some transformers versions keep in GPT-2 state dicts; they are not weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# The vocab axis of the parameters padded to ModelConfig.padded_vocab, in our orientation.
_VOCAB_AXIS = {"transformer.wte.weight": 0, "lm_head.weight": 1}


def _vocab_shape(model: GPT, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` of our parameter `name` with its vocab axis (if any) cut to vocab_size."""
    if name not in _VOCAB_AXIS:
        return tuple(shape)
    axis = _VOCAB_AXIS[name]
    return tuple(model.cfg.vocab_size if a == axis else n for a, n in enumerate(shape))


def _param_table(model: GPT) -> dict[str, tuple[nnx.Param, bool]]:
    """HF name → (our parameter, whether the HF array is the transpose of ours)."""
    table: dict[str, tuple[nnx.Param, bool]] = {
        "transformer.wte.weight": (model.wte.embedding, False)
    }
    if model.cfg.pos_embedding == "learned":
        table["transformer.wpe.weight"] = (model.wpe.embedding, False)

    def norm(prefix: str, ln: nnx.LayerNorm) -> None:
        table[f"{prefix}.weight"] = (ln.scale, False)
        if ln.bias is not None:
            table[f"{prefix}.bias"] = (ln.bias, False)

    def linear(prefix: str, lin: nnx.Module, transpose: bool = False) -> None:
        table[f"{prefix}.weight"] = (lin.kernel, transpose)
        if lin.bias is not None:
            table[f"{prefix}.bias"] = (lin.bias, False)

    for i, block in enumerate(model.h):
        p = f"transformer.h.{i}"
        norm(f"{p}.ln_1", block.ln_1)
        linear(f"{p}.attn.c_attn", block.attn.c_attn)
        linear(f"{p}.attn.c_proj", block.attn.c_proj)
        norm(f"{p}.ln_2", block.ln_2)
        if isinstance(block.mlp, MoE):  # experts [E, in, out], router [D, E]: as stored
            table[f"{p}.mlp.router.weight"] = (block.mlp.router, False)
            linear(f"{p}.mlp.experts.c_fc", block.mlp.experts.c_fc)
            linear(f"{p}.mlp.experts.c_proj", block.mlp.experts.c_proj)
        else:
            linear(f"{p}.mlp.c_fc", block.mlp.c_fc)
            linear(f"{p}.mlp.c_proj", block.mlp.c_proj)
    norm("transformer.ln_f", model.ln_f)
    if not model.cfg.tie_embeddings:
        linear("lm_head", model.lm_head, transpose=True)
    return table


def to_hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's parameters as a flat HF-named dict of fp32-or-param-dtype numpy arrays,
    vocab padding trimmed (either layer layout)."""
    model = with_layout(model, False)
    out = {}
    for name, (param, transpose) in _param_table(model).items():
        arr = np.asarray(param[...])
        arr = arr[tuple(slice(n) for n in _vocab_shape(model, name, arr.shape))]
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def load_hf_state_dict(model: GPT, state: Mapping[str, object], *, strict: bool = True) -> None:
    """Copy a flat HF-named dict (numpy / torch / jax arrays) into `model` in place.

    Refuses missing keys, unexpected keys (when `strict`) and shape mismatches with one line.
    A tied `lm_head.weight` equal to the embedding (as HF stores it) is accepted and ignored.
    Vocab tensors have vocab_size rows; a padded model's extra rows are set to zeros.
    A scanned model is filled through an unrolled twin, then restacked.
    """
    if model.cfg.scan_layers:
        twin = with_layout(model, False)
        load_hf_state_dict(twin, state, strict=strict)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, relayout(nnx.state(twin, nnx.Param), params))
        return
    table = _param_table(model)
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing = sorted(set(table) - set(state))
    unexpected = sorted(set(state) - set(table))
    if missing:
        raise UserError(
            f"weights are missing {len(missing)} tensors for this config, e.g. {missing[0]!r}; "
            "check the config matches the checkpoint"
        )
    if strict and unexpected:
        raise UserError(
            f"weights have {len(unexpected)} tensors this config does not use, e.g. "
            f"{unexpected[0]!r}; check the config matches the checkpoint"
        )
    for name, (param, transpose) in table.items():
        arr = _to_numpy(state[name])
        if transpose:
            arr = arr.T
        want = _vocab_shape(model, name, param.shape)
        if arr.shape != want:
            raise UserError(
                f"shape mismatch for {name}: checkpoint {tuple(arr.shape)} vs model "
                f"{want}; check the config matches the checkpoint"
            )
        value = jnp.asarray(arr, dtype=param.dtype)
        if want != tuple(param.shape):  # padded vocab rows: zeros
            value = jnp.pad(value, [(0, p - w) for p, w in zip(param.shape, want, strict=True)])
        param.set_value(value)


def _to_numpy(x: object) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = (
            x.detach().float().cpu().numpy()
            if str(x.dtype) == "torch.bfloat16"
            else x.detach().cpu().numpy()
        )
    return np.asarray(x)
