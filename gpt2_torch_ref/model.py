"""A plain PyTorch GPT-2 with the same variants as gpt2_jax, written to be read, not to be fast.

Weight names and orientation are Hugging Face GPT-2's (Conv1D weights are [in, out]), so
`GPT.load_state_dict` takes a `transformers.GPT2LMHeadModel` state dict as is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2_torch_ref.config import RefConfig
from gpt2_torch_ref.moe import ExpertConv1D, MoE, Router


class Conv1D(nn.Module):
    """y = x @ W + b with W stored [in, out], as in HF GPT-2."""

    def __init__(self, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x [B, heads, T, hd] by angle pos · θ^(−2i/hd) (rotate-half convention), in fp32;
    returned in x's dtype."""
    hd = x.shape[-1]
    arange = torch.arange(0, hd, 2, dtype=torch.float32, device=x.device)
    inv_freq = 1.0 / (theta ** (arange / hd))
    angle = positions.float()[:, None] * inv_freq[None, :]  # [T, hd/2]
    angle = torch.cat([angle, angle], dim=-1)
    return (x * angle.cos() + rotate_half(x) * angle.sin()).to(x.dtype)


def attention_mask(t: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """True where query i may attend to key j: j <= i and, with a window w, i - w < j."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    return allowed


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.c_attn = Conv1D(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * hd, cfg.bias)
        self.c_proj = Conv1D(cfg.n_head * hd, cfg.n_embd, cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        hd = cfg.head_dim
        q, k, v = self.c_attn(x).split(
            [cfg.n_head * hd, cfg.kv_heads * hd, cfg.kv_heads * hd], dim=-1
        )
        q = q.view(B, T, cfg.n_head, hd).transpose(1, 2)  # [B, n_head, T, hd]
        k = k.view(B, T, cfg.kv_heads, hd).transpose(1, 2)  # [B, kv_heads, T, hd]
        v = v.view(B, T, cfg.kv_heads, hd).transpose(1, 2)
        if cfg.pos_embedding == "rope":
            pos = torch.arange(T, device=x.device)
            q = rope(q, pos, cfg.rope_theta)
            k = rope(k, pos, cfg.rope_theta)
        # Grouped-query attention: each K/V head serves n_head / kv_heads query heads.
        group = cfg.n_head // cfg.kv_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        mask = attention_mask(T, cfg.attention_window, x.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.softmax(scores, dim=-1)  # no attention dropout, as in gpt2_jax
        y = (probs @ v).transpose(1, 2).reshape(B, T, cfg.n_head * hd)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd, cfg.bias)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: RefConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.cfg = cfg
        modules = dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias),
        )
        if cfg.pos_embedding == "learned":
            modules["wpe"] = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 · n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (Conv1D, ExpertConv1D, Router, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, (Conv1D, ExpertConv1D)) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] → logits [B, T, vocab]."""
        T = idx.shape[1]
        x = self.transformer.wte(idx)
        if self.cfg.pos_embedding == "learned":
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def moe_aux(self) -> dict[str, torch.Tensor]:
        """MoE statistics of the last forward, averaged over the MoE layers ({} when dense).

        Keys: lb_loss, z_loss (both differentiable), busiest, idlest, dropped.
        """
        layers = [b.mlp.aux for b in self.transformer.h if isinstance(b.mlp, MoE)]
        if not layers:
            return {}
        if not all(layers):
            raise RuntimeError("moe_aux() needs a forward pass first")
        return {key: torch.stack([aux[key] for aux in layers]).mean() for key in layers[0]}

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict in the shared layout: `lm_head.weight` only when untied."""
        sd = self.state_dict()
        if self.cfg.tie_embeddings:
            sd.pop("lm_head.weight")
        return sd

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load the shared layout (or a transformers GPT2LMHeadModel state dict)."""
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if self.cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
        self.load_state_dict(sd, strict=True)
