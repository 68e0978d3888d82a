"""The reference model's configuration: the architecture fields of gpt2_jax's ModelConfig."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RefConfig:
    """The architecture fields of gpt2_jax.config.ModelConfig, nothing else."""

    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    n_embd: int = 768
    max_seq_len: int = 1024
    pos_embedding: str = "learned"
    rope_theta: float = 10000.0
    attention_window: int | None = None
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    # Mixture-of-Experts (gpt2_torch_ref.moe): block i is routed when i % every == every - 1.
    moe_experts: int = 0  # 0 = dense MLP in every block
    moe_top_k: int = 2
    moe_every: int = 1
    moe_capacity_factor: float | None = None  # None = dropless; else ceil(cf·T·k/E) per expert

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def is_moe_layer(self, i: int) -> bool:
        """Whether block i (0-based) has a MoE in place of the dense MLP."""
        return self.moe_experts > 0 and i % self.moe_every == self.moe_every - 1
