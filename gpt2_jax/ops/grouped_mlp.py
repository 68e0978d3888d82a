"""The experts' GPT-2 MLPs over rows sorted by expert, in blocks: compute O(rows), not O(rows·E).

XLA computes `jax.lax.ragged_dot` as every group on every row, on CPU (E times the work; see
BENCHMARKS.md) and on CUDA GPUs (one dense dot over group-masked rows; docs/moe.md). Here a
`lax.scan` over the experts takes one expert's weights at a time, and an inner loop with a
data-dependent trip count walks that expert's rows `block` at a time: ceil(n_e / block)
matmuls of [block, D] × [D, F] per expert.
A block that runs past the expert's last row computes on the next expert's rows, and the next
expert overwrites them, so rows need no padding between experts, only `block` spare rows at
the end.

A `jax.custom_vjp` with the same loops for the backward: autodiff of a dynamic slice would add
a zero-padded copy of every weight gradient per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32


def _gelu(h):
    return jax.nn.gelu(h, approximate=True)


def _rows(a, r0, block):
    return lax.dynamic_slice_in_dim(a, r0, block, axis=0)


def _put(a, new, r0):
    """Write `new` over rows r0.. of `a`. Experts run in row order, so rows a block writes
    past its expert's end belong to a later expert, which overwrites them; a masked write
    instead (read, select, write) makes XLA:CPU copy the whole buffer every block."""
    return lax.dynamic_update_slice_in_dim(a, new.astype(a.dtype), r0, 0)


def _dot_t(a_MK, b_NK):
    """a · bᵀ in fp32, contracting the last axes (no transposed copy of b)."""
    return lax.dot_general(a_MK, b_NK, (((1,), (1,)), ((), ())), preferred_element_type=f32)


def _block_mask(r0, start, size, block):
    return (r0 + jnp.arange(block) < start + size)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def grouped_mlp(x_AD, starts_E, sizes_E, w1_EDF, b1_EF, w2_EFD, b2_ED, block):
    """Rows [starts_E[e], starts_E[e] + sizes_E[e]) of x_AD go through expert e's
    gelu(x·w1 + b1)·w2 + b2; fp32 [A, D] out, zero on rows no expert owns.

    x_AD needs `block` spare rows after the last owned row. Matmul operands are x's dtype
    (the compute dtype), accumulated in fp32.
    """
    return _forward(x_AD, starts_E, sizes_E, w1_EDF, b1_EF, w2_EFD, b2_ED, block)[0]


def _forward(x_AD, starts_E, sizes_E, w1_EDF, b1_EF, w2_EFD, b2_ED, block):
    A, D = x_AD.shape
    dtype = x_AD.dtype

    def expert(carry, inputs):
        start, size, w1_DF, b1_F, w2_FD, b2_D = inputs

        def one_block(i, carry):
            y_AD, h_AF = carry
            r0 = start + i * block
            h_bF = jnp.dot(_rows(x_AD, r0, block), w1_DF, preferred_element_type=f32) + b1_F
            h_bF = h_bF.astype(dtype)
            y_bD = jnp.dot(_gelu(h_bF), w2_FD, preferred_element_type=f32) + b2_D
            return _put(y_AD, y_bD, r0), _put(h_AF, h_bF, r0)

        n_blocks = (size + block - 1) // block
        return lax.fori_loop(0, n_blocks, one_block, carry), None

    w = tuple(a.astype(dtype) for a in (w1_EDF, b1_EF, w2_EFD, b2_ED))
    init = (jnp.zeros((A, D), f32), jnp.zeros((A, w1_EDF.shape[-1]), dtype))
    (y_AD, h_AF), _ = lax.scan(expert, init, (starts_E, sizes_E, *w))
    owned_A1 = (jnp.arange(A) < jnp.sum(sizes_E))[:, None]  # the last block's spill: zeros
    return jnp.where(owned_A1, y_AD, 0.0), h_AF


def _fwd(x_AD, starts_E, sizes_E, w1_EDF, b1_EF, w2_EFD, b2_ED, block):
    y_AD, h_AF = _forward(x_AD, starts_E, sizes_E, w1_EDF, b1_EF, w2_EFD, b2_ED, block)
    return y_AD, (x_AD, starts_E, sizes_E, w1_EDF, w2_EFD, h_AF)


def _bwd(block, residuals, dy_AD):
    x_AD, starts_E, sizes_E, w1_EDF, w2_EFD, h_AF = residuals
    dtype = x_AD.dtype
    D, F = w1_EDF.shape[1:]

    def expert(dx_AD, inputs):
        start, size, w1_DF, w2_FD = inputs

        def one_block(i, carry):
            dx_AD, dw1_DF, db1_F, dw2_FD, db2_D = carry
            r0 = start + i * block
            valid = _block_mask(r0, start, size, block)
            dy_bD = jnp.where(valid, _rows(dy_AD, r0, block), 0).astype(dtype)
            a_bF, gelu_vjp = jax.vjp(_gelu, _rows(h_AF, r0, block))
            da_bF = _dot_t(dy_bD, w2_FD).astype(dtype)
            (dh_bF,) = gelu_vjp(da_bF)
            x_bD = _rows(x_AD, r0, block)
            dx_bD = _dot_t(dh_bF, w1_DF)
            return (
                _put(dx_AD, dx_bD, r0),  # zero on the rows past the expert (dy masked)
                dw1_DF + jnp.dot(x_bD.T, dh_bF, preferred_element_type=f32),
                db1_F + jnp.sum(dh_bF, axis=0, dtype=f32),
                dw2_FD + jnp.dot(a_bF.T, dy_bD, preferred_element_type=f32),
                db2_D + jnp.sum(dy_bD, axis=0, dtype=f32),
            )

        zeros = (jnp.zeros((D, F), f32), jnp.zeros(F, f32), jnp.zeros((F, D), f32))
        n_blocks = (size + block - 1) // block
        dx_AD, *grads = lax.fori_loop(0, n_blocks, one_block, (dx_AD, *zeros, jnp.zeros(D, f32)))
        return dx_AD, tuple(grads)

    w = (w1_EDF.astype(dtype), w2_EFD.astype(dtype))
    dx_AD, (dw1, db1, dw2, db2) = lax.scan(
        expert, jnp.zeros(x_AD.shape, f32), (starts_E, sizes_E, *w)
    )
    return (
        dx_AD.astype(dtype),
        None,
        None,
        *(g.astype(w1_EDF.dtype) for g in (dw1, db1, dw2, db2)),  # one param_dtype
    )


grouped_mlp.defvjp(_fwd, _bwd)
