"""Reading matmuls and kernels out of StableHLO text (lowered for a platform, no device)."""

from __future__ import annotations

import re

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
