"""Reading matmuls and kernels out of StableHLO text (lowered for a platform, no device)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from gpt2_jax.config import ModelConfig
from gpt2_jax.model.gpt import GPT, cross_entropy

CUDNN_CALL = "__cudnn$fmha"  # cuDNN fused attention's custom calls: ...Softmax, ...Backward
_SPLASH_CALL = re.compile(r'@tpu_custom_call\(.*kernel_name = "(splash_\w+)"')

# `stablehlo.dot_general` and `chlo.ragged_dot`, with the operand and result types.
_MATMUL = re.compile(r"(stablehlo\.dot_general|chlo\.ragged_dot).*: \((.*)\) -> (tensor<\S+>)")
_TENSOR = re.compile(r"tensor<((?:\d+x)*)(\w+)>")
_BATCHING = re.compile(r"batching_dims = \[([\d, ]*)\]")
# A dot algorithm fixes the types the operands are rounded to, whatever they are stored in.
_ALGORITHM = re.compile(r"lhs_precision_type = (\w+), rhs_precision_type = (\w+)")


def matmuls(hlo: str) -> list[tuple[str, list[tuple[tuple[int, ...], str]]]]:
    """(op, [(shape, element type) of each operand]) for every matmul in the module; the
    element type is the one the matmul computes in (a dot algorithm's, where one is set).

    Per-row dot products (every dimension but the contracted one batched: Σ_h a·b, the work
    of an elementwise product, e.g. attention's rowsum(o·do)) are not matmuls and are left out.
    """
    found = []
    for line in hlo.splitlines():
        if m := _MATMUL.search(line):
            operands = [
                (tuple(int(d) for d in dims.split("x") if d), dtype)
                for dims, dtype in _TENSOR.findall(m.group(2))
            ]
            batching = _BATCHING.search(line)
            n_batch = len(batching.group(1).split(",")) if batching else 0
            if all(len(shape) == n_batch + 1 for shape, _ in operands[:2]):
                continue
            if algorithm := _ALGORITHM.search(line):
                operands = [(s, t) for (s, _), t in zip(operands, algorithm.groups(), strict=True)]
            found.append((m.group(1), operands))
    return found


def float_types(operands) -> set[str]:
    """The floating element types among `operands` (integer operands left out)."""
    return {dtype for _, dtype in operands if not dtype.startswith(("i", "ui"))}


def splash_kernels(hlo: str) -> list[str]:
    """The Pallas splash kernels the module calls, one entry per call, sorted."""
    return sorted(m.group(1) for m in _SPLASH_CALL.finditer(hlo))


def lowered_loss_grad(cfg: ModelConfig, platform: str, batch: int = 2) -> str:
    """StableHLO of `cfg`'s loss gradient over [batch, max_seq_len] tokens, lowered for
    `platform` from abstract weights."""
    graphdef, params, rest = nnx.split(
        nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...
    )

    def loss(p, tokens_BT):
        return cross_entropy(nnx.merge(graphdef, p, rest)(tokens_BT[:, :-1]), tokens_BT[:, 1:])

    tokens = jax.ShapeDtypeStruct((batch, cfg.max_seq_len + 1), jnp.int32)
    lowered = jax.jit(jax.grad(loss)).trace(params, tokens).lower(lowering_platforms=(platform,))
    return lowered.as_text()
