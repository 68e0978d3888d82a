"""Plain PyTorch reference of the gpt2_jax variants, with Hugging Face GPT-2 weight names."""

from gpt2_torch_ref.config import RefConfig
from gpt2_torch_ref.loader import load_folder
from gpt2_torch_ref.model import GPT

__all__ = ["GPT", "RefConfig", "load_folder"]
