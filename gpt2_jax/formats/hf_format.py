"""Hugging Face folders: config.json + model.safetensors (or pytorch_model.bin, or shards).

A model is written in the first format that computes it exactly (`export_format`):

- `gpt2` (GPT2LMHeadModel): learned positions, MHA, no window, biases;
- `starcoder2` (Starcoder2ForCausalLM): every RoPE variant (`gpt2_jax.formats.hf_archs`);
- `gpt_bigcode` (GPTBigCodeForCausalLM, multi_query): learned positions, MQA, no window, biases;
- `gpt2_jax`: the rest (learned positions with GQA, a window or no biases; every MoE model).
  GPT-2's keys and weight names plus ours, and the modeling code transformers runs with
  `trust_remote_code=True` (`auto_map`; `gpt2_jax.formats.hf_remote`).

Every config.json also carries our keys `n_kv_head`, `pos_embedding`, `rope_theta`,
`attention_window` and `bias` (transformers ignores them); a MoE model (always `gpt2_jax`)
adds `moe_experts`, `moe_top_k`, `moe_every` and `moe_capacity_factor`. Reading accepts the
four formats and the older files that were model_type gpt2 with those keys, GPT-2 weights
with or without the `transformer.` prefix, and refuses anything else in one line.

Weights are written in float32 or bfloat16 (`save_hf_folder(..., dtype=)`, config.json's
`torch_dtype` / `dtype`); every folder also gets a generation_config.json with GPT-2's
<|endoftext|> as bos and eos when the vocabulary holds it.

Folders hold the logical vocabulary: `model.vocab_pad_multiple` padding is trimmed on export
and config.json neither carries it nor counts it in vocab_size; reading pads (with zero rows)
only when asked, e.g. `load_hf_folder(path, vocab_pad_multiple=128)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from gpt2_jax.config import ConfigError, ModelConfig, model_config_from_dict
from gpt2_jax.errors import UserError
from gpt2_jax.formats import hf_archs, hf_remote
from gpt2_jax.formats.hf_tokenizer import write_tokenizer_files
from gpt2_jax.formats.weights import load_hf_state_dict, to_hf_state_dict
from gpt2_jax.model.gpt import GPT

EXTRA_KEYS = ("n_kv_head", "pos_embedding", "rope_theta", "attention_window", "bias")
MOE_KEYS = ("moe_experts", "moe_top_k", "moe_every", "moe_capacity_factor")
FORMATS = {
    "gpt2": "GPT-2 (GPT2LMHeadModel)",
    "starcoder2": "Starcoder2 (Starcoder2ForCausalLM)",
    "gpt_bigcode": "GPTBigCode (GPTBigCodeForCausalLM)",
    "gpt2_jax": "gpt2_jax's extended GPT-2",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
DTYPES = ("float32", "bfloat16")  # what save_hf_folder writes weights in


def is_standard_gpt2(cfg: ModelConfig) -> bool:
    """Whether `transformers.GPT2LMHeadModel` can represent this config exactly."""
    return (
        cfg.pos_embedding == "learned"
        and cfg.n_kv_head == cfg.n_head
        and cfg.attention_window is None
        and cfg.bias
        and cfg.moe_experts == 0
    )


def export_format(cfg: ModelConfig) -> str:
    """The model_type `save_hf_folder` writes for `cfg` (see the module docstring)."""
    if cfg.moe_experts:  # no transformers architecture has GPT-2 MLP experts
        return "gpt2_jax"
    if is_standard_gpt2(cfg):
        return "gpt2"
    if cfg.pos_embedding == "rope":
        return "starcoder2"
    if cfg.n_kv_head == 1 and cfg.attention_window is None and cfg.bias:
        return "gpt_bigcode"
    return "gpt2_jax"


def _gpt2_config(cfg: ModelConfig, model_type: str) -> dict:
    d = {
        "model_type": model_type,
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
        **hf_archs.special_tokens(cfg.vocab_size),
    }
    if model_type == "gpt2":
        d["architectures"] = ["GPT2LMHeadModel"]
    else:  # gpt2_jax: the folder's own modeling code, which keeps no KV cache
        d |= {"architectures": [hf_remote.ARCHITECTURE], "auto_map": hf_remote.AUTO_MAP}
        d["use_cache"] = False
    return d


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """config.json for `cfg` in its export format with weights in `dtype`, plus our extra keys."""
    _check_dtype(dtype)
    fmt = export_format(cfg)
    if fmt == "starcoder2":
        d = hf_archs.starcoder2_config(cfg)
    elif fmt == "gpt_bigcode":
        d = hf_archs.bigcode_config(cfg)
    else:
        d = _gpt2_config(cfg, fmt)
    moe = MOE_KEYS if cfg.moe_experts else ()
    d |= {"torch_dtype": dtype, "dtype": dtype}  # transformers 4.x reads the first, 5.x both
    return {**d, **{key: getattr(cfg, key) for key in (*EXTRA_KEYS, *moe)}}


def generation_config_dict(cfg: ModelConfig) -> dict:
    """generation_config.json: GPT-2's <|endoftext|> as bos and eos (None without it)."""
    return hf_archs.special_tokens(cfg.vocab_size)


def _gpt2_fields(d: dict) -> dict:
    """ModelConfig fields of a GPT-2 config.json (transformers' or ours)."""
    hf_archs.check_options(
        d,
        "gpt2",
        {
            "activation_function": ("gelu_new", hf_archs.TANH_GELUS),
            # transformers GPT-2 options that change the computation and that our model lacks.
            "scale_attn_weights": (True, (True,)),
            "scale_attn_by_inverse_layer_idx": (False, (False,)),
            "add_cross_attention": (False, (False,)),
        },
    )
    vocab, n_layer, n_head, n_embd = hf_archs.require(
        d, "gpt2", "vocab_size", "n_layer", "n_head", "n_embd"
    )
    if d.get("n_inner") not in (None, 4 * n_embd if isinstance(n_embd, int) else None):
        raise UserError(f"n_inner={d['n_inner']!r} is not 4·n_embd; not supported")
    fields = {
        "vocab_size": vocab,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "max_seq_len": d.get("n_positions", 1024),
        "dropout": d.get("resid_pdrop", 0.0),
        "layer_norm_eps": d.get("layer_norm_epsilon", 1e-5),
        "tie_embeddings": d.get("tie_word_embeddings", True),
    }
    return {**fields, **{key: d[key] for key in (*EXTRA_KEYS, *MOE_KEYS) if key in d}}


def _arch_fields(d: dict) -> dict:
    """ModelConfig fields of a Starcoder2 / GPTBigCode config.json. Our extra keys, which every
    export carries, fill in what the architecture leaves open (rope_theta of a learned model)
    and must agree with the rest (a hand-edited file is refused, not guessed at)."""
    fmt = d["model_type"]
    fields = hf_archs.starcoder2_fields(d) if fmt == "starcoder2" else hf_archs.bigcode_fields(d)
    for key in EXTRA_KEYS:
        if key not in d:
            continue
        if key in fields and d[key] != fields[key]:
            raise UserError(
                f"{fmt} config.json: gpt2_jax's key {key}={d[key]!r} disagrees with the "
                f"{fmt} keys, which give {fields[key]!r}"
            )
        fields[key] = d[key]
    return fields


def model_config_from_hf(d: object, **overrides) -> ModelConfig:
    """ModelConfig from a config.json dict of any format `load_hf_folder` reads; values are
    type-checked, and `overrides` set ModelConfig fields on top."""
    if not isinstance(d, dict):
        raise UserError(f"config.json holds a {type(d).__name__}, not a JSON object")
    model_type = d.get("model_type", "gpt2")
    if not isinstance(model_type, str) or model_type not in FORMATS:
        raise UserError(
            f"config.json has model_type={model_type!r}; gpt2_jax reads {', '.join(FORMATS)}"
        )
    fields = _gpt2_fields(d) if model_type in ("gpt2", "gpt2_jax") else _arch_fields(d)
    return model_config_from_dict({**fields, **overrides})


def is_hf_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any((p / f).is_file() for f in WEIGHT_FILES)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except KeyError:  # a dtype numpy lacks (bfloat16): read through jax, which has it
        import jax
        from safetensors.flax import load_file as load_jax

        with jax.default_device(jax.devices("cpu")[0]):  # host memory, not the accelerator's
            return {k: np.asarray(v) for k, v in load_jax(path).items()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from None


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path.parent} holds only pytorch_model.bin; install torch to read it (pip install "
            "torch)"
        ) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}
    except Exception as e:  # truncated zips and bad pickles raise several unrelated types
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}".splitlines()[0]) from None


def read_hf_state(path: str | Path) -> dict[str, np.ndarray]:
    """Flat weight dict of an HF folder, from model.safetensors (preferred), its shards
    (model.safetensors.index.json) or pytorch_model.bin."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return _read_safetensors(p / "model.safetensors")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a safetensors index (no weight_map)") from None
        state = {}
        for shard in shards:
            if not (p / shard).is_file():
                raise UserError(f"{index} names the shard {shard}, which {p} lacks")
            state.update(_read_safetensors(p / shard))
        return state
    return _read_torch_bin(p / "pytorch_model.bin")


def canonical_state(model_type: str, state: dict, cfg: ModelConfig) -> dict:
    """A checkpoint's tensors in our flat GPT-2-named layout (`gpt2_jax.formats.weights`)."""
    try:
        if model_type == "starcoder2":
            return hf_archs.from_starcoder2(state, cfg)
        if model_type == "gpt_bigcode":
            return hf_archs.from_bigcode(state, cfg)
    except UserError:
        raise
    except ValueError as e:  # numpy reshapes / concatenations of mis-sized tensors
        raise UserError(f"{model_type} weights do not fit config.json: {e}") from None
    # transformers' GPT2LMHeadModel also loads GPT2Model-style names without `transformer.`.
    return {
        k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
        for k, v in state.items()
    }


def read_hf_config(path: str | Path) -> dict:
    """The parsed config.json of a folder; one-line errors for unreadable JSON."""
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{f} is not valid JSON: {e}") from None


def load_hf_folder(path: str | Path, **overrides) -> GPT:
    """Build a GPT from an HF folder of any format above; `overrides` set ModelConfig fields
    (e.g. dtype)."""
    p = Path(path)
    if not is_hf_folder(p):
        raise UserError(
            f"{p} is not a GPT-2 folder (needs config.json and model.safetensors or "
            "pytorch_model.bin)"
        )
    d = read_hf_config(p)
    try:
        cfg = model_config_from_hf(d, **overrides)
    except ConfigError as e:
        raise UserError(f"{p / 'config.json'}: {e}") from None
    state = canonical_state(d.get("model_type", "gpt2"), read_hf_state(p), cfg)
    model = GPT(cfg, rngs=nnx.Rngs(0))  # after reading: a damaged file fails before the init
    load_hf_state_dict(model, state)
    return model


def save_hf_folder(model: GPT, path: str | Path, dtype: str = "float32") -> Path:
    """Write config.json + model.safetensors (`dtype`, contiguous) + generation_config.json in
    the model's export format into `path`, the modeling code of a `gpt2_jax` folder, and GPT-2's
    tokenizer files when they fit its vocabulary and can be read."""
    import ml_dtypes
    from safetensors.numpy import save_file

    _check_dtype(dtype)
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state = to_hf_state_dict(model)
    fmt = export_format(cfg)
    if fmt == "starcoder2":
        state = hf_archs.to_starcoder2(state, cfg)
    elif fmt == "gpt_bigcode":
        state = hf_archs.to_bigcode(state)
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    # Through fp32, so a bf16 model's weights are written as they are, and others rounded once.
    tensors = {
        k: np.ascontiguousarray(np.asarray(v, np.float32).astype(np_dtype))
        for k, v in state.items()
    }
    save_file(tensors, str(p / "model.safetensors"), metadata={"format": "pt"})
    (p / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
    generation = json.dumps(generation_config_dict(cfg), indent=2) + "\n"
    (p / "generation_config.json").write_text(generation)
    if fmt == "gpt2_jax":
        hf_remote.write_remote_code(p)
    write_tokenizer_files(p, cfg.vocab_size, cfg.max_seq_len)
    return p
