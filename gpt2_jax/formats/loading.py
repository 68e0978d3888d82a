"""Load a model for evaluation or generation from whatever a user points at."""

from __future__ import annotations

from pathlib import Path

from gpt2_jax.errors import UserError
from gpt2_jax.formats import checkpoint
from gpt2_jax.formats.hf_format import is_hf_folder, load_hf_folder
from gpt2_jax.model.gpt import GPT


def load_model(path: str | Path, **overrides) -> GPT:
    """Weights only, from an HF folder (GPT-2, Starcoder2, GPTBigCode or gpt2_jax's extended
    GPT-2: `gpt2_jax.formats.hf_format`), a training run's `out_dir` (its newest complete
    checkpoint) or one checkpoint directory.

    `overrides` set ModelConfig fields that do not change the weights (dtype, attention_impl).
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} does not exist")
    if is_hf_folder(p):
        return load_hf_folder(p, **overrides)
    return checkpoint.load_model_weights(p.absolute(), **overrides)  # orbax wants absolute paths
