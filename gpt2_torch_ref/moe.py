"""Mixture-of-Experts MLP for the reference: a top-k router over E GPT-2 MLPs.

Written to be read, not to be fast: each expert runs on the tokens routed to it, one expert
after another. Weight names and [in, out] orientation follow the Conv1D convention of the
dense model, with the experts stacked on a leading axis:

    router.weight          [D, E]
    experts.c_fc.weight    [E, D, 4D]     experts.c_fc.bias    [E, 4D]
    experts.c_proj.weight  [E, 4D, D]     experts.c_proj.bias  [E, D]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2_torch_ref.config import RefConfig


class Router(nn.Module):
    """Token → expert logits, z = x @ W with W [D, E] and no bias, computed in fp32."""

    def __init__(self, n_embd: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_embd, n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 even for a bf16 model: the top-k choice and the softmax are sensitive to rounding.
        return x.float() @ self.weight.float()


class ExpertConv1D(nn.Module):
    """E Conv1D layers stacked: expert e computes y = x @ W[e] + b[e], W [E, in, out]."""

    def __init__(self, n_experts: int, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_experts, n_out)) if bias else None

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        y = x @ self.weight[e]
        return y if self.bias is None else y + self.bias[e]


class Experts(nn.Module):
    """E independent GPT-2 MLPs: c_proj(gelu_tanh(c_fc(x)))."""

    def __init__(self, n_experts: int, n_embd: int, bias: bool):
        super().__init__()
        self.c_fc = ExpertConv1D(n_experts, n_embd, 4 * n_embd, bias)
        self.c_proj = ExpertConv1D(n_experts, 4 * n_embd, n_embd, bias)

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on tokens x [n, D] → [n, D]."""
        return self.c_proj(F.gelu(self.c_fc(x, e), approximate="tanh"), e)


def expert_capacity(capacity_factor: float, seq_len: int, top_k: int, n_experts: int) -> int:
    """Assignments one expert takes per sequence: ceil(cf · T · k / E)."""
    return math.ceil(capacity_factor * seq_len * top_k / n_experts)


def capacity_keep(chosen: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments survive a per-sequence capacity: chosen [B, T, k] → bool [B, T, k].

    Assignments queue per sequence in position-major order (token 0's choices, then token 1's,
    ...), so whether a token is kept depends only on it and earlier tokens: the layer stays
    causal. An assignment is kept iff fewer than `capacity` earlier ones went to its expert.
    """
    B, T, k = chosen.shape
    queue = chosen.reshape(B, T * k)  # row-major reshape is exactly the position-major order
    onehot = F.one_hot(queue, n_experts)  # [B, T·k, E]
    earlier = onehot.cumsum(dim=1) - onehot  # per expert, how many assignments came before
    rank = (earlier * onehot).sum(dim=-1)  # the count for each assignment's own expert
    return (rank < capacity).reshape(B, T, k)


class MoE(nn.Module):
    """Top-k routed experts in place of a block's dense MLP.

    After each call, `self.aux` holds this layer's statistics as fp32 scalars: `lb_loss`
    (load balance, E · Σ_e f_e · P_e), `z_loss` (mean logsumexp(z)²), `busiest` / `idlest`
    (max / min f_e) and `dropped` (share of assignments over capacity).
    """

    def __init__(self, cfg: RefConfig):
        super().__init__()
        if not 1 <= cfg.moe_top_k <= cfg.moe_experts:
            raise ValueError(f"moe_top_k={cfg.moe_top_k} must lie in [1, {cfg.moe_experts}]")
        self.n_experts = cfg.moe_experts
        self.top_k = cfg.moe_top_k
        self.capacity_factor = cfg.moe_capacity_factor
        self.router = Router(cfg.n_embd, cfg.moe_experts)
        self.experts = Experts(cfg.moe_experts, cfg.n_embd, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.aux: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        E, k = self.n_experts, self.top_k
        N = B * T
        z = self.router(x)  # [B, T, E], fp32

        # Top-k by a stable descending sort, so equal logits go to the lower expert index
        # (torch.topk makes no promise about ties, and the JAX model must pick the same ones).
        chosen = torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :k]
        weights = F.softmax(torch.gather(z, -1, chosen), dim=-1)  # [B, T, k], over the k only

        if self.capacity_factor is None:
            keep = torch.ones_like(chosen, dtype=torch.bool)
        else:
            capacity = expert_capacity(self.capacity_factor, T, k, E)
            keep = capacity_keep(chosen, E, capacity)

        # Flatten tokens; chosen experts of one token are distinct, so each (token, expert)
        # pair below is hit at most once.
        x_flat = x.reshape(N, D)
        chosen_flat, weights_flat = chosen.reshape(N, k), weights.reshape(N, k)
        experts = torch.arange(E, device=x.device)
        routed = (chosen_flat[..., None] == experts) & keep.reshape(N, k, 1)  # [N, k, E]
        out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
        for e in range(E):
            token, slot = routed[..., e].nonzero(as_tuple=True)
            y = self.experts(x_flat[token], e).float()
            # A dropped assignment adds nothing; the kept weights are not renormalised.
            out = out.index_add(0, token, weights_flat[token, slot, None] * y)

        self.aux = self._statistics(z, chosen, keep)
        return self.dropout(out.reshape(B, T, D).to(x.dtype))

    def _statistics(
        self, z: torch.Tensor, chosen: torch.Tensor, keep: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Router statistics over all B·T tokens of the call (counts before capacity drops)."""
        E, k = self.n_experts, self.top_k
        z = z.reshape(-1, E)  # [N, E]
        assignments = z.shape[0] * k
        counts = torch.bincount(chosen.reshape(-1), minlength=E)
        f = counts.float() / assignments  # share of assignments per expert; no gradient
        p = F.softmax(z, dim=-1).mean(dim=0)  # mean router probability per expert
        return dict(
            lb_loss=E * (f * p).sum(),  # 1.0 when both f and P are uniform
            z_loss=(torch.logsumexp(z, dim=-1) ** 2).mean(),  # keeps the logits small
            busiest=f.max(),
            idlest=f.min(),
            dropped=(~keep).sum().float() / assignments,
        )
