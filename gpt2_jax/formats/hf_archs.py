"""Starcoder2 and GPTBigCode folders: their config.json keys and weight layouts.

gpt2_jax's weights travel as a flat dict with HF GPT-2 names in Conv1D orientation ([in, out]),
`c_attn` columns q | k | v (`gpt2_jax.formats.weights`). These functions map that dict and
ModelConfig fields to and from the two transformers architectures that compute our other
variants exactly:

- Starcoder2 (RoPE, any n_kv_head, optional sliding window): pre-LayerNorm blocks, rotate-half
  RoPE on q and k with inv_freq θ^(−2i/hd), scale 1/sqrt(hd), tanh GELU MLP of width
  `intermediate_size`, split q/k/v/o `nn.Linear`s ([out, in]). transformers >= 5 masks key j
  for query i unless i - w < j <= i, the same window as ours, so `sliding_window` is our w.
  Its LayerNorms always have a bias (`use_bias` covers only the linears): a bias-free model is
  written with zero LayerNorm biases, and read back only when those are zero.
- GPTBigCode (learned positions, MQA): GPT-2's block with `nn.Linear`s; with `multi_query`
  `c_attn` outputs q (D) | k (hd) | v (hd), our layout for n_kv_head = 1. Without it, `c_attn`
  interleaves q|k|v per head; that MHA model is read (as ours with n_kv_head = n_head), never
  written.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from gpt2_jax.errors import UserError

TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")  # jax.nn.gelu(approximate=True), both
EOT = 50256


def special_tokens(vocab_size: int) -> dict:
    """bos / eos ids: GPT-2's <|endoftext|> when the vocabulary holds it, else none."""
    eot = EOT if vocab_size > EOT else None
    return {"bos_token_id": eot, "eos_token_id": eot}


def check_options(d: dict, fmt: str, rules: Mapping[str, tuple]) -> None:
    """Refuse config keys whose value changes the computation away from ours.

    `rules` maps a key to (default when absent, allowed values)."""
    for key, (default, allowed) in rules.items():
        value = d.get(key, default)
        if value not in allowed:
            raise UserError(
                f"{fmt} config.json sets {key}={value!r}; gpt2_jax supports only "
                f"{' or '.join(repr(a) for a in allowed)}"
            )


def require(d: dict, fmt: str, *keys: str) -> list:
    missing = [k for k in keys if k not in d]
    if missing:
        raise UserError(f"{fmt} config.json lacks the key {missing[0]!r}")
    return [d[k] for k in keys]


class Tensors:
    """A checkpoint's tensors, taken one by one; names what is missing or left over."""

    def __init__(self, state: Mapping[str, object], fmt: str, ignore: tuple[str, ...] = ()):
        self.fmt = fmt
        self.left = {k: v for k, v in state.items() if not k.endswith(ignore)}

    def take(self, name: str) -> np.ndarray:
        if name not in self.left:
            raise UserError(
                f"{self.fmt} weights lack {name!r}; check the config matches the checkpoint"
            )
        return np.asarray(self.left.pop(name))

    def done(self, tied: bool) -> None:
        if tied:
            self.left.pop("lm_head.weight", None)  # the tied copy transformers may store
        if self.left:
            raise UserError(
                f"{self.fmt} weights have {len(self.left)} tensors gpt2_jax does not use, e.g. "
                f"{sorted(self.left)[0]!r}; check the config matches the checkpoint"
            )


# ------------------------------------------------------------------------------- Starcoder2


def starcoder2_config(cfg) -> dict:
    """config.json of a Starcoder2ForCausalLM computing `cfg` (a RoPE ModelConfig)."""
    return {
        "model_type": "starcoder2",
        "architectures": ["Starcoder2ForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": 4 * cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_seq_len,
        "norm_epsilon": cfg.layer_norm_eps,
        # transformers >= 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": cfg.attention_window,
        "use_bias": cfg.bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "residual_dropout": cfg.dropout,
        "embedding_dropout": cfg.dropout,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        **special_tokens(cfg.vocab_size),
    }


def _rope_theta(d: dict) -> object:
    params, scaling = d.get("rope_parameters"), d.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise UserError(f"starcoder2 config.json has {key}={value!r}; expected an object")
        kind = value.get("rope_type", value.get("type", "default"))
        extra = sorted(set(value) - {"rope_type", "type", "rope_theta"})
        if kind != "default" or extra:
            raise UserError(
                f"starcoder2 config.json sets {key}={value!r}; gpt2_jax supports only plain "
                "RoPE (rope_type 'default', no scaling)"
            )
    if params is not None and "rope_theta" in params:
        theta = params["rope_theta"]
        if "rope_theta" in d and d["rope_theta"] != theta:
            raise UserError(
                f"starcoder2 config.json has rope_theta={d['rope_theta']!r} but "
                f"rope_parameters.rope_theta={theta!r}"
            )
        return theta
    return d.get("rope_theta", 10000.0)


def starcoder2_fields(d: dict) -> dict:
    """ModelConfig fields of a Starcoder2 config.json; absent keys take transformers' defaults."""
    check_options(d, "starcoder2", {"hidden_act": ("gelu_pytorch_tanh", TANH_GELUS)})
    vocab, hidden, inner, layers, heads = require(
        d, "starcoder2", "vocab_size", "hidden_size", "intermediate_size",
        "num_hidden_layers", "num_attention_heads",
    )  # fmt: skip
    if isinstance(hidden, int) and inner != 4 * hidden:
        raise UserError(
            f"starcoder2 config.json has intermediate_size={inner!r}; gpt2_jax's MLP is "
            f"4·hidden_size = {4 * hidden}"
        )
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        check_options(d, "starcoder2", {"head_dim": (None, (None, hidden // heads))})
    return {
        "vocab_size": vocab,
        "n_layer": layers,
        "n_head": heads,
        "n_kv_head": d.get("num_key_value_heads", 2),  # Starcoder2Config's default
        "n_embd": hidden,
        "max_seq_len": d.get("max_position_embeddings", 4096),
        "pos_embedding": "rope",
        "rope_theta": _rope_theta(d),
        "attention_window": d.get("sliding_window"),
        "dropout": d.get("residual_dropout", 0.0),
        "bias": d.get("use_bias", True),
        "tie_embeddings": d.get("tie_word_embeddings", True),
        "layer_norm_eps": d.get("norm_epsilon", 1e-5),
    }


def _qkv_columns(cfg) -> dict[str, slice]:
    """Where q, k and v lie among the c_attn output columns."""
    nq, nk = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return {"q": slice(0, nq), "k": slice(nq, nq + nk), "v": slice(nq + nk, None)}


def to_starcoder2(state: Mapping[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """Our flat GPT-2-named dict → Starcoder2ForCausalLM's state dict."""
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"]}
    zeros = np.zeros(cfg.n_embd, np.float32)

    def norm(ours: str, theirs: str) -> None:
        out[f"{theirs}.weight"] = state[f"{ours}.weight"]
        out[f"{theirs}.bias"] = state.get(f"{ours}.bias", zeros)  # Starcoder2 always has one

    def linear(ours: str, theirs: str, cols: slice = slice(None)) -> None:
        out[f"{theirs}.weight"] = state[f"{ours}.weight"][:, cols].T
        if cfg.bias:
            out[f"{theirs}.bias"] = state[f"{ours}.bias"][cols]

    for i in range(cfg.n_layer):
        c, s = f"transformer.h.{i}", f"model.layers.{i}"
        norm(f"{c}.ln_1", f"{s}.input_layernorm")
        for proj, cols in _qkv_columns(cfg).items():
            linear(f"{c}.attn.c_attn", f"{s}.self_attn.{proj}_proj", cols)
        linear(f"{c}.attn.c_proj", f"{s}.self_attn.o_proj")
        norm(f"{c}.ln_2", f"{s}.post_attention_layernorm")
        linear(f"{c}.mlp.c_fc", f"{s}.mlp.c_fc")
        linear(f"{c}.mlp.c_proj", f"{s}.mlp.c_proj")
    norm("transformer.ln_f", "model.norm")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def from_starcoder2(state: Mapping[str, object], cfg) -> dict[str, np.ndarray]:
    """Starcoder2ForCausalLM's state dict → our flat GPT-2-named dict; refuses what is missing,
    left over, or a non-zero LayerNorm bias in a `use_bias: false` model."""
    t = Tensors(state, "starcoder2", ignore=(".rotary_emb.inv_freq",))
    out = {"transformer.wte.weight": t.take("model.embed_tokens.weight")}

    def norm(theirs: str, ours: str) -> None:
        out[f"{ours}.weight"] = t.take(f"{theirs}.weight")
        bias = t.take(f"{theirs}.bias")
        if cfg.bias:
            out[f"{ours}.bias"] = bias
        elif np.any(bias != 0):
            raise UserError(
                f"starcoder2 weights: {theirs}.bias is not zero in a use_bias=false model; "
                "gpt2_jax's bias=false model has no LayerNorm biases"
            )

    def linear(theirs: str) -> tuple[np.ndarray, np.ndarray | None]:
        w = t.take(f"{theirs}.weight").T
        return w, (t.take(f"{theirs}.bias") if cfg.bias else None)

    def put(ours: str, w: np.ndarray, b: np.ndarray | None) -> None:
        out[f"{ours}.weight"] = w
        if b is not None:
            out[f"{ours}.bias"] = b

    for i in range(cfg.n_layer):
        c, s = f"transformer.h.{i}", f"model.layers.{i}"
        norm(f"{s}.input_layernorm", f"{c}.ln_1")
        q, k, v = (linear(f"{s}.self_attn.{p}_proj") for p in "qkv")
        put(
            f"{c}.attn.c_attn",
            np.concatenate([q[0], k[0], v[0]], axis=1),
            np.concatenate([q[1], k[1], v[1]]) if cfg.bias else None,
        )
        put(f"{c}.attn.c_proj", *linear(f"{s}.self_attn.o_proj"))
        norm(f"{s}.post_attention_layernorm", f"{c}.ln_2")
        put(f"{c}.mlp.c_fc", *linear(f"{s}.mlp.c_fc"))
        put(f"{c}.mlp.c_proj", *linear(f"{s}.mlp.c_proj"))
    norm("model.norm", "transformer.ln_f")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t.take("lm_head.weight")
    t.done(cfg.tie_embeddings)
    return out


# ------------------------------------------------------------------------------- GPTBigCode

_BIGCODE_LINEARS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
                    ".mlp.c_proj.weight")  # fmt: skip


def bigcode_config(cfg) -> dict:
    """config.json of a GPTBigCodeForCausalLM (multi_query) computing `cfg` (learned, MQA)."""
    return {
        "model_type": "gpt_bigcode",
        "architectures": ["GPTBigCodeForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "multi_query": True,
        "activation_function": "gelu_pytorch_tanh",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "scale_attn_weights": True,
        "attention_softmax_in_fp32": True,
        "scale_attention_softmax_in_fp32": True,
        "add_cross_attention": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        **special_tokens(cfg.vocab_size),
    }


def bigcode_fields(d: dict) -> dict:
    """ModelConfig fields of a GPTBigCode config.json; absent keys take transformers' defaults."""
    check_options(
        d,
        "gpt_bigcode",
        {
            "activation_function": ("gelu_pytorch_tanh", TANH_GELUS),
            "scale_attn_weights": (True, (True,)),
            "add_cross_attention": (False, (False,)),
            "multi_query": (True, (True, False)),
        },
    )
    vocab, n_embd, n_layer, n_head = require(
        d, "gpt_bigcode", "vocab_size", "n_embd", "n_layer", "n_head"
    )
    if d.get("n_inner") not in (None, 4 * n_embd if isinstance(n_embd, int) else None):
        raise UserError(f"gpt_bigcode config.json has n_inner={d['n_inner']!r}; not 4·n_embd")
    return {
        "vocab_size": vocab,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_kv_head": 1 if d.get("multi_query", True) else n_head,
        "n_embd": n_embd,
        "max_seq_len": d.get("n_positions", 1024),
        "pos_embedding": "learned",
        "attention_window": None,
        "dropout": d.get("resid_pdrop", 0.1),  # GPTBigCodeConfig's default
        "bias": True,
        "tie_embeddings": d.get("tie_word_embeddings", True),
        "layer_norm_eps": d.get("layer_norm_epsilon", 1e-5),
    }


def to_bigcode(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat dict (n_kv_head = 1) → GPTBigCodeForCausalLM's: the same names, linears
    transposed to [out, in]."""
    return {k: (v.T if k.endswith(_BIGCODE_LINEARS) else v) for k, v in state.items()}


def from_bigcode(state: Mapping[str, object], cfg) -> dict[str, np.ndarray]:
    """GPTBigCodeForCausalLM's state dict → our flat dict. With n_kv_head == n_head (no
    multi_query) each head's interleaved q|k|v rows are regrouped into q | k | v."""
    t = Tensors(state, "gpt_bigcode", ignore=(".attn.bias", ".attn.masked_bias"))
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"{p}.{m}.weight", f"{p}.{m}.bias"]
    names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    out = {}
    regroup = cfg.n_kv_head != 1  # MHA: c_attn rows are [q_h | k_h | v_h] for each head h
    for name in names:
        arr = t.take(name)
        if regroup and ".c_attn." in name and len(arr) == 3 * cfg.n_embd:
            arr = arr.reshape(cfg.n_head, 3, cfg.head_dim, -1).swapaxes(0, 1).reshape(arr.shape)
        out[name] = arr.T if name.endswith(_BIGCODE_LINEARS) else arr
    t.done(cfg.tie_embeddings)
    return out
