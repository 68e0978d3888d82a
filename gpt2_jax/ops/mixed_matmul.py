"""Matmuls in the compute dtype with fp32 accumulation and output, backward included.

Autodiff of `dot_general(..., preferred_element_type=f32)` hands the transposed matmuls an
fp32 cotangent, so XLA converts the other (bf16) operand to fp32 and runs both backward
matmuls f32 × f32: off the bf16 tensor cores on GPU. These `custom_vjp`s cast the cotangent
to the compute dtype first, then accumulate in fp32 as the forward does. In fp32 the cast is
a no-op and the backward is autodiff's.

Operands may come in another dtype (fp32 parameters): they are cast inside, and each gets its
gradient in its own dtype, so an fp32 weight's gradient is never rounded to the compute dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32


def _transposed_equations(equation: str) -> tuple[str, str]:
    """The einsums giving each operand's gradient from the output's: (d lhs, d rhs)."""
    inputs, out = equation.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    for mine, other in ((lhs, rhs), (rhs, lhs)):
        # An index only in one operand is summed there; its transpose would be a broadcast.
        if len(set(mine)) != len(mine) or not set(mine) <= set(other) | set(out):
            raise ValueError(f"unsupported einsum for mixed_matmul.einsum: {equation!r}")
    return f"{out},{rhs}->{lhs}", f"{out},{lhs}->{rhs}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def einsum(equation: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """`jnp.einsum(equation, a, b)` with both operands in `dtype`, fp32 out; the backward's
    matmuls also take `dtype` operands. Two operands, explicit `->`, every index of an
    operand also in the other operand or the output."""
    _transposed_equations(equation)
    return jnp.einsum(equation, a.astype(dtype), b.astype(dtype), preferred_element_type=f32)


def _einsum_fwd(equation, a, b, dtype):
    return einsum(equation, a, b, dtype), (a, b)


def _einsum_bwd(equation, dtype, residuals, g):
    a, b = residuals
    da_eq, db_eq = _transposed_equations(equation)
    g = g.astype(dtype)
    da = jnp.einsum(da_eq, g, b.astype(dtype), preferred_element_type=f32)
    db = jnp.einsum(db_eq, g, a.astype(dtype), preferred_element_type=f32)
    return da.astype(a.dtype), db.astype(b.dtype)


einsum.defvjp(_einsum_fwd, _einsum_bwd)

# Row-ragged x [M, K] by grouped w [G, K, N]: the two transposes of `lax.ragged_dot`.
_DX_DIMS = lax.RaggedDotDimensionNumbers(  # g [M, N] · w [G, K, N] over N → [M, K]
    dot_dimension_numbers=(((1,), (2,)), ((), ())),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
_DW_DIMS = lax.RaggedDotDimensionNumbers(  # x [M, K] · g [M, N] over each group's rows → [G, K, N]
    dot_dimension_numbers=(((0,), (0,)), ((), ())),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def ragged_dot(x_MK: jax.Array, w_GKN: jax.Array, sizes_G: jax.Array, dtype) -> jax.Array:
    """`lax.ragged_dot(x, w, sizes)` with operands in `dtype`, fp32 [M, N] out; the backward's
    grouped matmuls also take `dtype` operands."""
    x, w = x_MK.astype(dtype), w_GKN.astype(dtype)
    return lax.ragged_dot(x, w, sizes_G, preferred_element_type=f32)


def _ragged_fwd(x_MK, w_GKN, sizes_G, dtype):
    return ragged_dot(x_MK, w_GKN, sizes_G, dtype), (x_MK, w_GKN, sizes_G)


def _ragged_bwd(dtype, residuals, g_MN):
    x_MK, w_GKN, sizes_G = residuals
    g_MN, x, w = g_MN.astype(dtype), x_MK.astype(dtype), w_GKN.astype(dtype)
    dx_MK = lax.ragged_dot_general(g_MN, w, sizes_G, _DX_DIMS, preferred_element_type=f32)
    dw_GKN = lax.ragged_dot_general(x, g_MN, sizes_G, _DW_DIMS, preferred_element_type=f32)
    return dx_MK.astype(x_MK.dtype), dw_GKN.astype(w_GKN.dtype), None


ragged_dot.defvjp(_ragged_fwd, _ragged_bwd)
