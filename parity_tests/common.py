"""Shared builders for the parity suite: the 12 variants and twin JAX / torch models."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
import torch
from flax import nnx

from gpt2_jax.config import ModelConfig
from gpt2_jax.formats.weights import load_hf_state_dict, to_hf_state_dict
from gpt2_jax.model.gpt import GPT
from gpt2_torch_ref import GPT as TorchGPT
from gpt2_torch_ref import RefConfig

jax.config.update("jax_enable_x64", False)
torch.set_default_dtype(torch.float32)

SEQ_LEN = 16
WINDOW = 5  # smaller than SEQ_LEN
BASE = dict(vocab_size=97, n_layer=2, n_head=4, n_embd=32, max_seq_len=32)

VARIANTS = {
    f"{pos}-{attn}-{'win' if window else 'full'}": ModelConfig(
        **BASE,
        pos_embedding=pos,
        n_kv_head={"mha": 4, "gqa": 2, "mqa": 1}[attn],
        attention_window=WINDOW if window else None,
    )
    for pos, attn, window in itertools.product(("learned", "rope"), ("mha", "gqa", "mqa"), (0, 1))
}


def ref_config(cfg: ModelConfig) -> RefConfig:
    names = {f.name for f in dataclasses.fields(RefConfig)}
    return RefConfig(**{n: getattr(cfg, n) for n in names})


def twin_models(cfg: ModelConfig, seed: int = 0) -> tuple[GPT, TorchGPT]:
    """A JAX model with random GPT-2 init and a torch model holding the same weights."""
    model = GPT(cfg, rngs=nnx.Rngs(seed))
    ref = TorchGPT(ref_config(cfg))
    ref.load_hf_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in to_hf_state_dict(model).items()}
    )
    return model, ref


def jax_from_torch(cfg: ModelConfig, ref: torch.nn.Module) -> GPT:
    model = GPT(cfg, rngs=nnx.Rngs(123))
    load_hf_state_dict(model, {k: v.detach().numpy() for k, v in ref.state_dict().items()})
    return model


def tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int32)


def rel_max_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max(1, max |b|): the logits bound of the parity suite."""
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


# Worst-case differences seen by the suite, printed at the end of the run (see conftest).
WORST: dict[str, float] = {}


def record(check: str, value: float) -> float:
    WORST[check] = max(WORST.get(check, 0.0), value)
    return value
