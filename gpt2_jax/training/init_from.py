"""`train.init_from=PATH`: start a run (step 0, fresh optimizer) from the weights in PATH.

PATH is a gpt2_jax run / checkpoint or a Hugging Face folder `gpt2_jax.formats.loading` reads
(GPT-2, Starcoder2, GPTBigCode or gpt2_jax's own format). The run's model config is PATH's,
with the `model.*` keys the config file or command line sets on top; where those differ from
PATH's, the weights are changed by documented surgery, each with a one-line notice:

- `n_kv_head` smaller (dividing the source's): each group of K and V heads is mean-pooled
  (c_attn columns and biases), the GQA paper's conversion (Ainslie et al., 2023) for uptraining;
- `attention_window`: the same weights, windowed;
- `max_seq_len` with learned positions: larger keeps the table and initialises the new rows as
  at init; with RoPE any length (no weights);
- `pos_embedding` learned → rope: the position table is dropped (a warning: the model must
  relearn positions);
- `dtype`, `attention_impl`, `dropout`, `scan_layers` change no weights;
- `vocab_pad_multiple` (either way): the same weights over the vocab_size ids; padded rows are
  dropped, or added as zeros (never looked up, their logits -inf).

Anything else (n_embd, n_layer, n_head, vocab_size, bias, tied head, rope → learned, a larger
n_kv_head, a shorter table) cannot map and is a one-line error naming the key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from gpt2_jax import config
from gpt2_jax.config import (
    Config,
    ConfigError,
    ModelConfig,
    model_config_from_dict,
    to_dict,
)
from gpt2_jax.errors import UserError, notice
from gpt2_jax.formats.checkpoint import newest_meta_of, warn
from gpt2_jax.formats.hf_format import is_hf_folder, model_config_from_hf, read_hf_config
from gpt2_jax.formats.loading import load_model
from gpt2_jax.formats.weights import load_hf_state_dict, to_hf_state_dict
from gpt2_jax.model.gpt import GPT

NO_WEIGHTS = (
    "dtype", "attention_impl", "dropout", "attention_window", "scan_layers",
    "moe_capacity_factor", "moe_aux_loss_coef", "moe_z_loss_coef", "moe_impl",
)  # fmt: skip


def source_config(path: str | Path) -> ModelConfig:
    """The model config of PATH, read without loading its weights."""
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"train.init_from={str(path)!r} does not exist; point it at a gpt2_jax run or "
            "checkpoint, or a Hugging Face folder (config.json + model.safetensors)"
        )
    try:
        if is_hf_folder(p):
            return model_config_from_hf(read_hf_config(p))
        return model_config_from_dict(newest_meta_of(p.absolute())["model"])
    except UserError as e:
        raise UserError(f"train.init_from={str(path)!r}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """`gpt2_jax.config.load_config`, with `train.init_from=PATH` taking PATH's model config
    (the keys the file or overrides set go on top as surgery)."""
    return config.load_config(path, overrides, model_source=lambda p: to_dict(source_config(p)))


def plan(source: ModelConfig, target: ModelConfig) -> list[str]:
    """One notice per change of `target` against `source`; raises on a change that cannot map."""
    notes = []
    for key in (k for k, v in to_dict(target).items() if to_dict(source)[k] != v):
        old, new = getattr(source, key), getattr(target, key)
        if key in NO_WEIGHTS:
            notes.append(f"{key} {old!r} → {new!r}: the same weights")
        elif key == "n_kv_head" and new < old and old % new == 0:
            notes.append(
                f"n_kv_head {old} → {new}: K/V heads mean-pooled in groups of {old // new}"
            )
        elif key == "max_seq_len" and target.pos_embedding == "rope":
            notes.append(f"max_seq_len {old} → {new}: RoPE has no position table")
        elif key == "max_seq_len" and new > old and source.pos_embedding == "learned":
            notes.append(f"max_seq_len {old} → {new}: position rows {old}..{new - 1} start "
                         "from random init")  # fmt: skip
        elif key == "vocab_pad_multiple":
            n_pad = target.padded_vocab - target.vocab_size
            pad = f"{n_pad} padded rows of zeros" if n_pad else "no padded rows"
            notes.append(f"vocab_pad_multiple {old} → {new}: the same weights over the "
                         f"{target.vocab_size} ids, {pad}")  # fmt: skip
        elif key == "pos_embedding" and (old, new) == ("learned", "rope"):
            notes.append("pos_embedding learned → rope: the position table is dropped; the "
                         "model must relearn positions")  # fmt: skip
        else:
            raise ConfigError(
                f"train.init_from cannot map model.{key}: {old!r} → {new!r} (only n_kv_head "
                "down, attention_window, max_seq_len up, learned → rope, vocab_pad_multiple, "
                "dtype, attention_impl, dropout and scan_layers can change); remove "
                f"model.{key} from the config and command line"
            )
    return notes


def initial_model(target: ModelConfig, path: str | Path, seed: int) -> GPT:
    """A GPT of config `target` holding PATH's weights after the surgery `plan` describes."""
    source = load_model(path)
    for note in plan(source.cfg, target):
        (warn if "dropped" in note else notice)(f"train.init_from {path}: {note}")
    state = to_hf_state_dict(source)
    fresh = GPT(target, rngs=nnx.Rngs(seed))
    init = to_hf_state_dict(fresh)
    if target.pos_embedding != "learned":
        state.pop("transformer.wpe.weight", None)
    elif "transformer.wpe.weight" in state:
        wpe = init["transformer.wpe.weight"].copy()
        wpe[: min(len(wpe), len(state["transformer.wpe.weight"]))] = state[
            "transformer.wpe.weight"
        ][: len(wpe)]
        state["transformer.wpe.weight"] = wpe
    if target.n_kv_head != source.cfg.n_kv_head:
        for i in range(target.n_layer):
            for kind in ("weight", "bias"):
                name = f"transformer.h.{i}.attn.c_attn.{kind}"
                if name in state:
                    state[name] = pool_kv(state[name], source.cfg, target.n_kv_head)
    load_hf_state_dict(fresh, state)
    return fresh


def pool_kv(c_attn: np.ndarray, cfg: ModelConfig, n_kv_head: int) -> np.ndarray:
    """c_attn columns q | k | v (last axis) with K and V mean-pooled from cfg.n_kv_head heads
    to `n_kv_head`: new head j is the mean of old heads j·g … j·g + g − 1 (g = old / new),
    the old heads that served the query heads new head j serves."""
    hd, q = cfg.head_dim, cfg.n_head * cfg.head_dim
    kv = cfg.n_kv_head * hd
    group = cfg.n_kv_head // n_kv_head

    def pooled(x: np.ndarray) -> np.ndarray:
        heads = x.reshape(*x.shape[:-1], n_kv_head, group, hd)
        return heads.mean(axis=-2).reshape(*x.shape[:-1], n_kv_head * hd)

    k, v = c_attn[..., q : q + kv], c_attn[..., q + kv :]
    return np.concatenate([c_attn[..., :q], pooled(k), pooled(v)], axis=-1)
