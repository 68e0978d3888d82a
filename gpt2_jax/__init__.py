"""GPT-2 in JAX/Flax NNX with RoPE, grouped-query and sliding-window attention.

The library API (docs/library.md): configs, models, weights on disk, training, generation,
perplexity and the GPT-2 tokenizer. Everything else lives in the sub-packages.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from gpt2_jax.config import Config, ModelConfig
from gpt2_jax.data.tokenizer import decode as detokenize
from gpt2_jax.data.tokenizer import encode as tokenize
from gpt2_jax.decode.generation import generate as generate_tokens
from gpt2_jax.formats.hf_format import save_hf_folder
from gpt2_jax.formats.loading import load_model
from gpt2_jax.model.gpt import GPT
from gpt2_jax.training.init_from import load_config

if TYPE_CHECKING:
    from gpt2_jax.evaluate import evaluate as score_tokens
    from gpt2_jax.train import train as train_model

try:
    __version__ = version("gpt2-jax")
except PackageNotFoundError:  # a source checkout on sys.path, never installed
    __version__ = "0+unknown"

# Loaded on first use: these modules are also `python -m` entry points, which runpy warns
# about (and runs twice) when the package's import has already imported them.
_FROM_CLI_MODULES = {
    "score_tokens": ("gpt2_jax.evaluate", "evaluate"),
    "train_model": ("gpt2_jax.train", "train"),
}

__all__ = [
    "GPT",
    "Config",
    "ModelConfig",
    "detokenize",
    "generate_tokens",
    "load_config",
    "load_model",
    "save_hf_folder",
    "score_tokens",
    "tokenize",
    "train_model",
]


def __getattr__(name: str):
    if name in _FROM_CLI_MODULES:
        module, attr = _FROM_CLI_MODULES[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_CLI_MODULES})
