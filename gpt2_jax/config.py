"""Frozen config dataclasses, loaded from YAML and overridden by `section.key=value`."""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt2_jax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
POS_EMBEDDINGS = ("learned", "rope")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "blocked", "cudnn", "splash")
LOSS_IMPLS = ("full", "chunked")
MOE_IMPLS = ("auto", "grouped", "ragged", "dense")


def _key(default: Any, meaning: str) -> Any:
    """A config field with its one-line meaning (`--help`, and the start of docs/config.md's)."""
    return field(default=default, metadata={"help": meaning})


class ConfigError(UserError):
    """A config value that cannot work."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one GPT-2 variant; names match HF GPT-2 where they exist."""

    vocab_size: int = _key(50257, "the logical vocabulary: token ids lie in [0, vocab_size)")
    vocab_pad_multiple: int = _key(1, "pads the embedding and an untied head to a multiple of it")
    n_layer: int = _key(12, "transformer blocks")
    n_head: int = _key(12, "query heads")
    n_kv_head: int | None = _key(
        None, "K/V heads (null = `n_head`, MHA; 1 = MQA; between: GQA); must divide `n_head`"
    )
    n_embd: int = _key(768, "model width d")
    max_seq_len: int = _key(1024, "size of the learned position table")
    pos_embedding: str = _key("learned", "`learned` | `rope` (RoPE needs an even head dim)")
    rope_theta: float = _key(10000.0, "RoPE base frequency")
    attention_window: int | None = _key(None, "null = full causal")
    dropout: float = _key(0.0, "dropout rate, in [0, 1)")
    bias: bool = _key(True, "biases in the linear layers")
    tie_embeddings: bool = _key(True, "LM head shares the token embedding")
    layer_norm_eps: float = _key(1e-5, "LayerNorm epsilon")
    dtype: str = _key("auto", "compute dtype: `auto` = bfloat16 on GPU/TPU, float32 on CPU")
    param_dtype: str = _key("float32", "parameter (and optimizer state) dtype")
    attention_impl: str = _key(
        "auto", "`auto` | `xla` | `chunked` | `blocked` | `cudnn` | `splash` (attention.md)"
    )
    scan_layers: bool = _key(
        False, "blocks stacked on a layer axis and run by one `jax.lax.scan` (training.md)"
    )
    moe_experts: int = _key(0, "Mixture-of-Experts: experts per MoE layer")
    moe_top_k: int = _key(2, "experts per token, in [1, moe_experts]")
    moe_every: int = _key(1, "layer i's MLP is routed when i % every == every − 1")
    moe_capacity_factor: float | None = _key(None, "null = dropless")
    moe_aux_loss_coef: float = _key(0.01, "load-balance loss weight in the training loss")
    moe_z_loss_coef: float = _key(0.001, "router z-loss weight in the training loss")
    moe_impl: str = _key(
        "auto",
        "`auto` = `ragged` on TPU (`jax.lax.ragged_dot`, a grouped-matmul kernel there), "
        "`grouped` elsewhere (sorted rows, blocked per-expert matmuls; XLA:CPU and XLA:GPU run "
        "`ragged_dot` as every expert on every row)",
    )

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        pad = self.vocab_pad_multiple
        if not isinstance(pad, int) or isinstance(pad, bool) or pad <= 0:
            raise ConfigError(
                f"model.vocab_pad_multiple must be a positive int, got {pad!r}; use 1 for no "
                "padding or e.g. 128 (pads 50257 to 50304)"
            )
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                "pick n_head dividing n_embd"
            )
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"model.n_head={self.n_head} is not divisible by model.n_kv_head="
                f"{self.n_kv_head}; pick n_kv_head dividing n_head (1 = MQA)"
            )
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ConfigError(
                f"unknown model.pos_embedding={self.pos_embedding!r}; use one of {POS_EMBEDDINGS}"
            )
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"RoPE needs an even head dim, got n_embd/n_head={self.head_dim}; "
                "change n_embd or n_head"
            )
        if self.attention_window is not None and self.attention_window <= 0:
            raise ConfigError(
                f"model.attention_window must be a positive int or null, got "
                f"{self.attention_window}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for name, options in (("dtype", ("auto", *DTYPES)), ("param_dtype", DTYPES)):
            if getattr(self, name) not in options:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}; use one of {options}")
        self._check_moe()
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"unknown model.attention_impl={self.attention_impl!r}; use one of "
                f"{ATTENTION_IMPLS}"
            )

    def _check_moe(self) -> None:
        E, k, every = self.moe_experts, self.moe_top_k, self.moe_every
        if E < 0:
            raise ConfigError(f"model.moe_experts must be >= 0 (0 = dense MLP), got {E}")
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError(f"unknown model.moe_impl={self.moe_impl!r}; use one of {MOE_IMPLS}")
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        cf = self.moe_capacity_factor
        if cf is not None and cf <= 0:
            raise ConfigError(
                f"model.moe_capacity_factor must be positive or null (dropless), got {cf}"
            )
        if E == 0:
            return
        if not 1 <= k <= E:
            raise ConfigError(
                f"model.moe_top_k={k} must lie in [1, moe_experts={E}]; lower top_k or add experts"
            )
        if not 1 <= every <= self.n_layer:
            raise ConfigError(
                f"model.moe_every={every} must lie in [1, n_layer={self.n_layer}] so that some "
                "layer is MoE; use 1 for every layer, 2 for every second"
            )
        if every > 1 and self.scan_layers:
            raise ConfigError(
                f"model.moe_every={every} mixes dense and MoE layers, which one scanned stack "
                "cannot hold; set model.scan_layers=false or model.moe_every=1"
            )

    def is_moe_layer(self, i: int) -> bool:
        """Whether block i routes its MLP over experts."""
        return self.moe_experts > 0 and i % self.moe_every == self.moe_every - 1

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding (columns of the head): vocab_size rounded up to
        vocab_pad_multiple."""
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def compute_dtype(self) -> str:
        """`dtype`, with auto resolved: bfloat16 on GPU/TPU, float32 on CPU.

        Resolved at use, not at construction: configs are built before
        jax.distributed.initialize, which must precede any backend query.
        """
        if self.dtype != "auto":
            return self.dtype
        import jax

        return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


@dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it is tokenised."""

    source: str = _key(
        "shakespeare",
        "`shakespeare` (the built-in plays), a path or glob of `.txt/.md/.jsonl/.json/.parquet`, "
        "or `hf:<dataset>[:<config>]`",
    )
    prepared_dir: str | None = _key(None, "where the tokenised shards go")
    val_fraction: float = _key(
        0.05, "share of documents held out for validation (by a hash of each document)"
    )
    text_field: str = _key("text", "JSON field / parquet or dataset column holding the text")
    decode_errors: str = _key("strict", "`strict`: a byte that is not UTF-8 is an error")
    streaming: bool = _key(
        False,
        "stream huge sources with a resumable read-ahead loader instead of preparing `train.bin`",
    )
    shuffle_buffer: int = _key(0, "streaming only: documents shuffled in a buffer")
    num_threads: int = _key(0, "tokeniser threads (prepare and the streaming read-ahead)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, logging and run-directory settings."""

    batch_size: int = _key(16, "global batch, in sequences")
    seq_len: int = _key(256, "training sequence length")
    grad_accum: int = _key(1, "micro-batches per step, scanned inside the jitted step")
    max_steps: int = _key(1000, "optimizer steps")
    lr: float = _key(6e-4, "peak learning rate")
    min_lr: float = _key(6e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = _key(100, "linear warmup steps")
    weight_decay: float = _key(
        0.1, "AdamW weight decay (matrices and embeddings; not biases and LayerNorm)"
    )
    beta1: float = _key(0.9, "AdamW β₁")
    beta2: float = _key(0.95, "AdamW β₂")
    grad_clip: float = _key(1.0, "global-norm clipping")
    seed: int = _key(
        0, "the run's random state is (seed, step): initialisation, dropout and batch order"
    )
    eval_every: int = _key(250, "steps between validation evaluations")
    eval_steps: int = _key(20, "batches per evaluation")
    log_every: int = _key(10, "steps between logged metrics")
    sample_every: int = _key(0, "steps between generated samples")
    out_dir: str = _key(
        "out", "the run directory: checkpoints, `metrics.jsonl`, `config.yaml`, `loss.png`"
    )
    init_from: str | None = _key(
        None, "start from these weights (a run, checkpoint or HF folder) (training.md)"
    )
    remat: str = _key(
        "none",
        "activation rematerialisation per block: `none` | `block` (recompute the whole block in "
        "the backward pass) | `dots` (keep the outputs of matmuls without batch dimensions, "
        "recompute the rest)",
    )
    resume: bool = _key(True, "resume from the newest complete checkpoint in `out_dir`")
    overwrite: bool = _key(
        False, "with `resume=false`: delete `checkpoints/` and `metrics.jsonl` and start over"
    )
    skip_nonfinite: bool = _key(
        False, "skip (and count) updates with a non-finite loss or gradient instead of stopping"
    )
    allow_data_change: bool = _key(
        False, "resume on data other than the checkpoint's (recorded in `metrics.jsonl`)"
    )
    peak_flops: float | None = _key(None, "peak FLOP/s per device for MFU")
    loss_impl: str = _key(
        "chunked", "`chunked` (fused LM head + loss, no [tokens, V] logits) | `full`"
    )
    loss_chunk: int = _key(128, "sequence positions per chunk of the chunked loss")
    profile_steps: list[int] | None = _key(
        None, "`[START, STOP]`: a `jax.profiler` trace of those steps → `out_dir/profile`"
    )

    def __post_init__(self) -> None:
        if self.loss_impl not in LOSS_IMPLS:
            raise ConfigError(
                f"unknown train.loss_impl={self.loss_impl!r}; use one of {LOSS_IMPLS}"
            )
        if self.loss_chunk <= 0:
            raise ConfigError(
                f"train.loss_chunk must be a positive number of positions, got {self.loss_chunk}"
            )


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = _key(500, "steps between saves (and one at the end)")
    keep: int = _key(3, "newest checkpoints kept")
    async_save: bool = _key(True, "write checkpoints in the background while training goes on")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh; -1 takes the devices left over."""

    data: int = _key(-1, "data parallelism (the outermost axis)")
    fsdp: int = _key(
        1,
        "FSDP: shards every matrix's model dimension (parameters and optimizer state) and the "
        "batch",
    )
    tensor: int = _key(
        1,
        "tensor parallelism (innermost): heads, the MLP (Megatron column / row) and the vocabulary",
    )
    # Splits MoE experts (each device holds E / expert) and the batch; in the device grid it
    # sits between fsdp and tensor (gpt2_jax.parallel.sharding.MESH_AXES).
    expert: int = _key(1, "splits MoE experts (each device holds E / expert) and the batch")
    distributed: str | bool = _key(
        "auto", "`auto` | `on` | `off`: when to call `jax.distributed.initialize()`"
    )

    def __post_init__(self) -> None:
        # YAML 1.1 reads a bare on / off (mesh.distributed=on) as a boolean.
        if isinstance(self.distributed, bool):
            object.__setattr__(self, "distributed", "on" if self.distributed else "off")


@dataclass(frozen=True)
class WandbConfig:
    mode: str = _key("disabled", "`disabled` | `offline` | `online`")
    project: str = _key("gpt2-jax", "wandb project")
    name: str | None = _key(None, "run name")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, converting the few lossless cases."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, key) for v in value]
    name = str(tp) if origin is list else getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key} expects {name}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown config key {full!r}; valid keys: {', '.join(sorted(names))}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """Build a validated `Config` from nested plain data; unknown keys are errors."""
    return _build(Config, data, "")


def model_config_from_dict(data: dict) -> ModelConfig:
    return _build(ModelConfig, data, "model")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` → (['section', 'key'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.key, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


# The named configs ship inside the package, so `--config NAME` works from a wheel too.
CONFIG_DIR = Path(str(importlib.resources.files("gpt2_jax") / "configs"))


def config_names() -> list[str]:
    """The names `--config NAME` accepts without a path: gpt2_jax/configs/*.yaml that hold
    config sections (sweep.yaml there is a wandb sweep, not a config)."""
    sections = {f.name for f in dataclasses.fields(Config)} | {"base"}
    return sorted(
        p.stem
        for p in CONFIG_DIR.glob("*.yaml")
        if set(yaml.safe_load(p.read_text()) or {}) <= sections
    )


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, else a named config (with or without .yaml)."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return Path(name)


def read_config_file(path: str | Path, chain: tuple[Path, ...] = ()) -> dict:
    """The YAML of `path` as a dict, with `base: NAME` (a config name, or a path relative to
    this file) merged under it key by key, recursively; a cycle of bases is refused."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} not found; use a path or one of {', '.join(config_names())}"
        )
    if p.resolve() in chain:
        cycle = " → ".join(str(c) for c in (*chain, p.resolve()))
        raise ConfigError(f"config bases form a cycle: {cycle}; remove one of the base: keys")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{p}: base must be a config name or path, got {base!r}")
    near = p.parent / base
    base_path = near if near.is_file() else resolve_config_path(base)
    merged = read_config_file(base_path, (*chain, p.resolve()))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(
    path: str | Path | None = None,
    overrides: list[str] = (),
    *,
    model_source: Callable[[str], dict] | None = None,
) -> Config:
    """Read `path` (YAML, with its `base:` chain; None = all defaults) and apply
    `section.key=value` overrides.

    With `train.init_from=PATH` the model is PATH's: `model_source(PATH)` gives its `model`
    section, and the keys set here go on top as weight surgery. Reading PATH is the formats'
    business, so without `model_source` such a config is refused; load it with
    `gpt2_jax.training.init_from.load_config`, which passes one."""
    data = {} if path is None else read_config_file(path)
    for text in overrides:
        (section, key), value = parse_override(text)
        sec = data.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"config section {section!r} is not a mapping")
        sec[key] = value
    train = data.get("train")
    if isinstance(train, dict) and train.get("init_from"):
        if model_source is None:
            raise ConfigError(
                "train.init_from needs the model config of its source; load this config with "
                "gpt2_jax.training.init_from.load_config (as python -m gpt2_jax.train does)"
            )
        model = data.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError(f"config section 'model' must be a mapping, got {model!r}")
        data["model"] = {**model_source(train["init_from"]), **model}
    return config_from_dict(data)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for YAML / JSON / checkpoints)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
