"""Load a GPT-2 folder (config.json + model.safetensors or pytorch_model.bin) into the reference.

Reads transformers' standard GPT-2 keys plus the extra keys gpt2_jax writes for variants
transformers cannot represent: `n_kv_head`, `pos_embedding`, `rope_theta`, `attention_window`
and `bias`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt2_torch_ref.model import GPT, RefConfig

# RefConfig field → config.json key, for the keys whose names differ from ours.
_HF_KEYS = {
    "max_seq_len": "n_positions",
    "layer_norm_eps": "layer_norm_epsilon",
    "tie_embeddings": "tie_word_embeddings",
    "dropout": "resid_pdrop",
}
_EXTRA_KEYS = ("n_kv_head", "pos_embedding", "rope_theta", "attention_window", "bias")


def config_from_dict(d: dict) -> RefConfig:
    """RefConfig from a GPT-2 config.json dict (transformers' or gpt2_jax's)."""
    if d.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json has model_type={d.get('model_type')!r}, not gpt2")
    kwargs = {name: d[name] for name in ("vocab_size", "n_layer", "n_head", "n_embd")}
    for name, key in _HF_KEYS.items():
        if key in d:
            kwargs[name] = d[key]
    for name in _EXTRA_KEYS:
        if name in d:
            kwargs[name] = d[name]
    return RefConfig(**kwargs)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a folder, from model.safetensors (preferred) or pytorch_model.bin, in fp32."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(str(p / "model.safetensors"))
    elif (p / "pytorch_model.bin").is_file():
        sd = torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{p} has neither model.safetensors nor pytorch_model.bin")
    return {k: v.float() for k, v in sd.items()}


def load_folder(path: str | Path) -> GPT:
    """A `GPT` in eval mode built from the folder's config.json with its weights loaded."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has no config.json; not a GPT-2 folder")
    cfg = config_from_dict(json.loads((p / "config.json").read_text()))
    model = GPT(cfg)
    model.load_hf_state_dict(read_state_dict(p))
    return model.eval()
