"""Hugging Face GPT-2 folders: config.json + model.safetensors (or pytorch_model.bin).

Variants that transformers' GPT-2 cannot represent keep the standard keys and add
`n_kv_head`, `pos_embedding`, `rope_theta`, `attention_window` and `bias`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from gpt2_jax.config import ConfigError, ModelConfig
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT
from gpt2_jax.weights import load_hf_state_dict, to_hf_state_dict

EXTRA_KEYS = ("n_kv_head", "pos_embedding", "rope_theta", "attention_window", "bias")


def is_standard_gpt2(cfg: ModelConfig) -> bool:
    """Whether `transformers.GPT2LMHeadModel` can represent this config exactly."""
    return (
        cfg.pos_embedding == "learned"
        and cfg.n_kv_head == cfg.n_head
        and cfg.attention_window is None
        and cfg.bias
    )


def hf_config_dict(cfg: ModelConfig) -> dict:
    """A GPT2Config-compatible dict, plus our extra keys."""
    d = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }
    for key in EXTRA_KEYS:
        d[key] = getattr(cfg, key)
    return d


def model_config_from_hf(d: dict, **overrides) -> ModelConfig:
    """ModelConfig from a GPT-2 config.json dict (ours or transformers')."""
    if d.get("model_type", "gpt2") != "gpt2":
        raise UserError(
            f"config.json has model_type={d.get('model_type')!r}; only gpt2 is supported"
        )
    if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(
            f"activation_function={d['activation_function']!r} is not GPT-2's tanh GELU"
        )
    if d.get("n_inner") not in (None, 4 * d.get("n_embd", 0)):
        raise UserError(f"n_inner={d['n_inner']} is not 4·n_embd; not supported")
    # transformers GPT-2 options that change the computation and that our model lacks.
    for key, supported in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if key in d and bool(d[key]) != supported:
            raise UserError(f"config.json sets {key}={d[key]}; only {supported} is supported")
    try:
        kwargs = dict(
            vocab_size=d["vocab_size"],
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            n_embd=d["n_embd"],
            max_seq_len=d.get("n_positions", 1024),
            dropout=float(d.get("resid_pdrop", 0.0)),
            layer_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        )
    except KeyError as e:
        raise UserError(f"config.json lacks the GPT-2 key {e.args[0]!r}") from None
    for key in EXTRA_KEYS:
        if key in d:
            kwargs[key] = d[key]
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def is_hf_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / "pytorch_model.bin").is_file()
    )


def read_hf_state(path: str | Path) -> dict[str, np.ndarray]:
    """Flat weight dict of an HF folder, from safetensors (preferred) or pytorch_model.bin."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        return load_file(p / "model.safetensors")
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{p} holds only pytorch_model.bin; install torch to read it (pip install torch)"
        ) from None
    sd = torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}


def load_hf_folder(path: str | Path, **overrides) -> GPT:
    """Build a GPT from an HF GPT-2 folder; `overrides` set ModelConfig fields (e.g. dtype)."""
    p = Path(path)
    if not is_hf_folder(p):
        raise UserError(
            f"{p} is not a GPT-2 folder (needs config.json and model.safetensors or "
            "pytorch_model.bin)"
        )
    try:
        cfg = model_config_from_hf(json.loads((p / "config.json").read_text()), **overrides)
    except (json.JSONDecodeError, ConfigError) as e:
        raise UserError(f"{p / 'config.json'}: {e}") from None
    model = GPT(cfg, rngs=nnx.Rngs(0))
    load_hf_state_dict(model, read_hf_state(p))
    return model


def save_hf_folder(model: GPT, path: str | Path) -> Path:
    """Write config.json + model.safetensors (fp32, contiguous) into `path`."""
    from safetensors.numpy import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: np.ascontiguousarray(v, dtype=np.float32) for k, v in to_hf_state_dict(model).items()
    }
    save_file(tensors, str(p / "model.safetensors"), metadata={"format": "pt"})
    (p / "config.json").write_text(json.dumps(hf_config_dict(model.cfg), indent=2) + "\n")
    return p
