"""transformers configuration of gpt2_jax's extended GPT-2 (model_type `gpt2_jax`).

Shipped as remote code in the folders `python -m gpt2_jax.convert to-hf` writes under that
model_type (config.json's `auto_map` names it); see modeling_gpt2_jax.py. config.json holds
GPT-2's keys (`n_embd`, `n_layer`, `n_head`, `n_positions`, ...) plus gpt2_jax's `n_kv_head`,
`pos_embedding`, `rope_theta`, `attention_window`, `bias` and, for a Mixture-of-Experts model,
`moe_experts`, `moe_top_k`, `moe_every`, `moe_capacity_factor`; this class keeps them all as
attributes, and the model reads them through the torch reference's own config reader.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class Gpt2JaxConfig(PretrainedConfig):
    model_type = "gpt2_jax"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        layer_norm_epsilon: float = 1e-5,
        resid_pdrop: float = 0.0,
        tie_word_embeddings: bool = True,
        use_cache: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.layer_norm_epsilon = layer_norm_epsilon
        self.resid_pdrop = resid_pdrop
        self.tie_word_embeddings = tie_word_embeddings
        self.use_cache = use_cache  # the model keeps no KV cache (modeling_gpt2_jax.py)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
