"""Load an HF folder (config.json + model.safetensors or pytorch_model.bin) into the reference.

Reads transformers' GPT-2 (weights with or without the `transformer.` prefix), Starcoder2 and
GPTBigCode folders, and gpt2_jax's extended GPT-2 (model_type `gpt2_jax`, or the older `gpt2`
files) with its keys `n_kv_head`, `pos_embedding`, `rope_theta`, `attention_window`, `bias`
and the Mixture-of-Experts keys `moe_experts`, `moe_top_k`, `moe_every`, `moe_capacity_factor`.
Written apart from gpt2_jax's own reader, so that the two check each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt2_torch_ref.config import RefConfig
from gpt2_torch_ref.model import GPT

# RefConfig field → config.json key, for the keys whose names differ from ours.
_HF_KEYS = {
    "max_seq_len": "n_positions",
    "layer_norm_eps": "layer_norm_epsilon",
    "tie_embeddings": "tie_word_embeddings",
    "dropout": "resid_pdrop",
}
_EXTRA_KEYS = (
    "n_kv_head",
    "pos_embedding",
    "rope_theta",
    "attention_window",
    "bias",
    "moe_experts",
    "moe_top_k",
    "moe_every",
    "moe_capacity_factor",
)
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"config.json: {message}; the reference cannot compute it")


def _starcoder2_config(d: dict) -> RefConfig:
    _check(d.get("hidden_act", "gelu_pytorch_tanh") in _TANH_GELUS, "hidden_act is not tanh GELU")
    _check(d["intermediate_size"] == 4 * d["hidden_size"], "intermediate_size is not 4·hidden")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    _check(rope.get("rope_type", rope.get("type", "default")) == "default", "RoPE is scaled")
    return RefConfig(
        vocab_size=d["vocab_size"],
        n_layer=d["num_hidden_layers"],
        n_head=d["num_attention_heads"],
        n_kv_head=d.get("num_key_value_heads", 2),  # Starcoder2Config's default
        n_embd=d["hidden_size"],
        max_seq_len=d.get("max_position_embeddings", 4096),
        pos_embedding="rope",
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        attention_window=d.get("sliding_window"),
        bias=d.get("use_bias", True),
        tie_embeddings=d.get("tie_word_embeddings", True),
        layer_norm_eps=d.get("norm_epsilon", 1e-5),
    )


def _bigcode_config(d: dict) -> RefConfig:
    _check(d.get("activation_function", "gelu_pytorch_tanh") in _TANH_GELUS, "not tanh GELU")
    _check(d.get("n_inner") in (None, 4 * d["n_embd"]), "n_inner is not 4·n_embd")
    _check(d.get("scale_attn_weights", True), "attention is unscaled")
    return RefConfig(
        vocab_size=d["vocab_size"],
        n_layer=d["n_layer"],
        n_head=d["n_head"],
        n_kv_head=1 if d.get("multi_query", True) else d["n_head"],
        n_embd=d["n_embd"],
        max_seq_len=d.get("n_positions", 1024),
        tie_embeddings=d.get("tie_word_embeddings", True),
        layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
    )


def config_from_dict(d: dict) -> RefConfig:
    """RefConfig from a config.json dict of any format this module reads."""
    model_type = d.get("model_type", "gpt2")
    if model_type == "starcoder2":
        return _starcoder2_config(d)
    if model_type == "gpt_bigcode":
        return _bigcode_config(d)
    if model_type not in ("gpt2", "gpt2_jax"):
        raise ValueError(f"config.json has model_type={model_type!r}, which the reference lacks")
    kwargs = {name: d[name] for name in ("vocab_size", "n_layer", "n_head", "n_embd")}
    for name, key in _HF_KEYS.items():
        if key in d:
            kwargs[name] = d[key]
    for name in _EXTRA_KEYS:
        if name in d:
            kwargs[name] = d[name]
    return RefConfig(**kwargs)


def _from_starcoder2(sd: dict[str, torch.Tensor], cfg: RefConfig) -> dict[str, torch.Tensor]:
    """Starcoder2 names and [out, in] linears → GPT-2 names and Conv1D [in, out] weights."""
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"]}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    names = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
             "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.c_fc",
             "mlp.c_proj": "mlp.c_proj"}  # fmt: skip
    if not cfg.bias:  # Starcoder2's LayerNorms keep a bias even with use_bias=false
        layers = [f"model.layers.{i}." for i in range(cfg.n_layer)]
        norms = [
            f"{p}{n}.bias" for p in layers for n in ("input_layernorm", "post_attention_layernorm")
        ]
        norms.append("model.norm.bias")
        _check(not any(sd[n].any() for n in norms), "use_bias=false, non-zero LayerNorm biases")
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        for o, t in names.items():
            w = sd[f"{theirs}{t}.weight"]
            out[f"{ours}{o}.weight"] = w if o.startswith("ln") else w.T
            if cfg.bias:
                out[f"{ours}{o}.bias"] = sd[f"{theirs}{t}.bias"]
        qkv = [sd[f"{theirs}self_attn.{p}_proj.weight"].T for p in "qkv"]
        out[f"{ours}attn.c_attn.weight"] = torch.cat(qkv, dim=1)
        if cfg.bias:
            qkv = [sd[f"{theirs}self_attn.{p}_proj.bias"] for p in "qkv"]
            out[f"{ours}attn.c_attn.bias"] = torch.cat(qkv)
    out["transformer.ln_f.weight"] = sd["model.norm.weight"]
    if cfg.bias:
        out["transformer.ln_f.bias"] = sd["model.norm.bias"]
    return out


def _from_bigcode(sd: dict[str, torch.Tensor], cfg: RefConfig) -> dict[str, torch.Tensor]:
    """GPTBigCode's [out, in] linears → Conv1D [in, out]; per-head q|k|v rows regrouped."""
    out = {}
    hd = cfg.head_dim
    for name, w in sd.items():
        if ".c_attn." in name and cfg.kv_heads > 1:  # MHA rows: [q_h | k_h | v_h] per head h
            w = w.reshape(cfg.n_head, 3, hd, -1).transpose(0, 1).reshape(w.shape)
        linear = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        out[name] = w.T if linear else w
    return out


def to_reference_state(
    model_type: str, sd: dict[str, torch.Tensor], cfg: RefConfig
) -> dict[str, torch.Tensor]:
    """A folder's tensors in the reference's GPT-2 layout."""
    if model_type == "starcoder2":
        return _from_starcoder2(sd, cfg)
    if model_type == "gpt_bigcode":
        return _from_bigcode(sd, cfg)
    # GPT2LMHeadModel also accepts GPT2Model-style names, without `transformer.`.
    return {
        k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
        for k, v in sd.items()
    }


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a folder, from model.safetensors (preferred), its shards or pytorch_model.bin,
    in fp32."""
    from safetensors.torch import load_file

    p = Path(path)
    index = p / "model.safetensors.index.json"
    if (p / "model.safetensors").is_file():
        sd = load_file(str(p / "model.safetensors"))
    elif index.is_file():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(str(p / shard)))
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
    d = json.loads((p / "config.json").read_text())
    cfg = config_from_dict(d)
    model = GPT(cfg)
    sd = to_reference_state(d.get("model_type", "gpt2"), read_state_dict(p), cfg)
    model.load_hf_state_dict(sd)
    return model.eval()
