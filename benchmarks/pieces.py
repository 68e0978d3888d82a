"""Where a training step's time goes: each piece of a GPT-2 layer, ours against HF's torch.

    python -m benchmarks pieces [--n-embd 256] [--n-head 8] [--batch-size 8]
        [--seq-len 256] [--attention-impl auto] [--repeats 5] [--rounds 3] [--json]

Forward + backward (gradients of the inputs and the parameters, for a fixed random
cotangent) of: the attention core (q, k, v → y; torch `scaled_dot_product_attention`),
the attention module (c_attn, core, c_proj; HF `GPT2Attention`), the MLP (`GPT2MLP`), one
LayerNorm, the whole block (`GPT2Block`), the tied LM head with the cross-entropy, and one
AdamW update of a block's parameters. Each figure is the best of `--repeats` calls after a
warm-up; ours and torch take turns for `--rounds` rounds and the best round is kept. fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import numpy as np

from gpt2_jax.errors import ArgParser, UserError, cli_main

PIECES = ("attention core", "attention module", "mlp", "layernorm", "block",
          "lm head + loss", "adamw (one block)")  # fmt: skip


def _best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _ours(a: argparse.Namespace, rng: np.random.Generator) -> dict[str, Callable[[], object]]:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from gpt2_jax.config import ModelConfig
    from gpt2_jax.model.attention import dot_product_attention
    from gpt2_jax.model.gpt import GPT, Block, cross_entropy

    B, T, D, N = a.batch_size, a.seq_len, a.n_embd, a.n_head
    cfg = ModelConfig(n_layer=1, n_head=N, n_embd=D, max_seq_len=T,
                      attention_impl=a.attention_impl)  # fmt: skip
    block = Block(cfg, rngs=nnx.Rngs(0))

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    x_BTD, ct_BTD = normal(B, T, D), normal(B, T, D)

    def grad_of(module: nnx.Module, call, ct, *inputs):
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def loss(p, *xs):
            return jnp.sum(call(nnx.merge(graphdef, p, rest), *xs) * ct)

        step = jax.jit(jax.grad(loss, argnums=tuple(range(1 + len(inputs)))))
        return lambda: jax.block_until_ready(step(params, *inputs))

    H = D // N
    qkv = [normal(B, T, N, H) for _ in range(4)]

    @jax.jit
    def core(q, k, v, ct):
        def loss(q, k, v):
            y = dot_product_attention(q, k, v, window=None, impl=a.attention_impl)
            return jnp.sum(y * ct)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    gpt = GPT(cfg, rngs=nnx.Rngs(0))
    targets_BT = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    tx = optax.adamw(6e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    params = nnx.state(block, nnx.Param)
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)

    @jax.jit
    def adamw(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    return {
        "attention core": lambda: jax.block_until_ready(core(*qkv)),
        "attention module": grad_of(block.attn, lambda m, x: m(x, None), ct_BTD, x_BTD),
        "mlp": grad_of(block.mlp, lambda m, x: m(x), ct_BTD, x_BTD),
        "layernorm": grad_of(block.ln_1, lambda m, x: m(x), ct_BTD, x_BTD),
        "block": grad_of(block, lambda m, x: m(x, None)[0], ct_BTD, x_BTD),
        "lm head + loss": grad_of(
            gpt, lambda m, x: cross_entropy(m.logits(x), targets_BT), jnp.ones(()), x_BTD
        ),
        "adamw (one block)": lambda: jax.block_until_ready(adamw(params, opt_state)),
    }


def _torch(a: argparse.Namespace, rng: np.random.Generator) -> dict[str, Callable[[], object]]:
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    B, T, D, N = a.batch_size, a.seq_len, a.n_embd, a.n_head
    cfg = GPT2Config(n_embd=D, n_head=N, n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    block = GPT2Block(cfg, layer_idx=0)

    def tensor(*shape, grad=True):
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).requires_grad_(grad)

    x_BTD, ct_BTD = tensor(B, T, D), tensor(B, T, D, grad=False)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def grad_of(module, call, ct, *inputs):
        wrt = [*inputs, *module.parameters()]
        return lambda: torch.autograd.grad((call(*inputs) * ct).sum(), wrt)

    H = D // N
    q, k, v = (tensor(B, N, T, H) for _ in range(3))
    ct_BNTH = tensor(B, N, T, H, grad=False)
    wte = torch.nn.Parameter(0.02 * torch.randn(cfg.vocab_size, D))
    targets = torch.from_numpy(rng.integers(0, cfg.vocab_size, (B * T,)))

    def head_loss(x):
        return F.cross_entropy(block.ln_2(x).flatten(0, 1) @ wte.T, targets)

    opt = torch.optim.AdamW(block.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    for p in block.parameters():
        p.grad = torch.full_like(p, 0.01)

    def core():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad((y * ct_BNTH).sum(), (q, k, v))

    return {
        "attention core": core,
        "attention module": grad_of(block.attn, lambda x: first(block.attn(x)), ct_BTD, x_BTD),
        "mlp": grad_of(block.mlp, block.mlp, ct_BTD, x_BTD),
        "layernorm": grad_of(block.ln_1, block.ln_1, ct_BTD, x_BTD),
        "block": grad_of(block, lambda x: first(block(x)), ct_BTD, x_BTD),
        "lm head + loss": lambda: torch.autograd.grad(head_loss(x_BTD), (x_BTD, wte)),
        "adamw (one block)": opt.step,
    }


def run(a: argparse.Namespace) -> list[dict]:
    import jax
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    ours, theirs = _ours(a, np.random.default_rng(0)), _torch(a, np.random.default_rng(0))
    records = []
    for piece in PIECES:
        ms = {"ours": [], "torch": []}
        for _ in range(a.rounds):
            ms["ours"].append(_best_ms(ours[piece], a.repeats))
            ms["torch"].append(_best_ms(theirs[piece], a.repeats))
        ours_ms, torch_ms = min(ms["ours"]), min(ms["torch"])
        records.append({
            "piece": piece, "ours_ms": ours_ms, "torch_ms": torch_ms,
            "ours_over_torch_time": ours_ms / torch_ms, "n_embd": a.n_embd, "n_head": a.n_head,
            "batch_size": a.batch_size, "seq_len": a.seq_len,
            "attention_impl": a.attention_impl, "device": jax.devices()[0].device_kind,
        })  # fmt: skip
    return records


def _table(records: list[dict]) -> str:
    r0 = records[0]
    lines = [
        f"d={r0['n_embd']} H={r0['n_head']} B={r0['batch_size']} T={r0['seq_len']}, fp32, "
        f"fwd+bwd (attention_impl={r0['attention_impl']}); time ratio > 1: ours slower",
        f"{'piece':<20} {'ours ms':>9} {'torch ms':>9} {'ours/torch':>10}",
    ]
    for r in records:
        lines.append(f"{r['piece']:<20} {r['ours_ms']:9.2f} {r['torch_ms']:9.2f} "
                     f"{r['ours_over_torch_time']:10.2f}")  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m benchmarks pieces", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--attention-impl", default="auto", help="model.attention_impl for ours")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per piece and round")
    p.add_argument("--rounds", type=int, default=3, help="turns ours and torch take")
    p.add_argument("--json", action="store_true", help="one JSON object per piece")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    for name in ("n_embd", "n_head", "batch_size", "seq_len", "repeats", "rounds"):
        if getattr(a, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if a.n_embd % a.n_head:
        raise UserError("--n-embd must be divisible by --n-head")
    from gpt2_jax.model.attention import resolve_impl

    resolve_impl(a.attention_impl, np.float32)  # an unknown impl is a one-line error
    records = run(a)
    if a.json:
        for r in records:
            print(json.dumps(r))
    else:
        print(_table(records))
    return 0
