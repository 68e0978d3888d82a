"""AdamW with GPT-2's decay mask, linear warmup + cosine schedule, global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gpt2_jax.config import TrainConfig
from gpt2_jax.model.layer_stack import LAYERS
from gpt2_jax.model.moe import EXPERT


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """0 → lr linearly over warmup_steps, then cosine to min_lr at max_steps, then flat."""
    warmup = max(cfg.warmup_steps, 0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.max_steps, warmup + 1),
        end_value=cfg.min_lr,
    )


def decay_mask(params):
    """Weight decay on matrices and embeddings, not on biases and LayerNorm: on parameters of
    rank ≥ 2 per layer and expert (the stacked layer axis of scanned layers and the expert axis
    of MoE weights do not count)."""

    def matrix(v):
        if not isinstance(v, nnx.Variable):
            return v.ndim >= 2
        axes = v.get_metadata().get("logical_axes", (None,) * v.ndim)
        return v.replace(sum(a not in (LAYERS, EXPERT) for a in axes) >= 2)

    return jax.tree.map(matrix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (the same state), scaling by one factor per step.

    optax divides every element by the norm. XLA:CPU does not repeat a divide in each of its
    consumers, so the clipped gradients were written out and read back by both Adam moments:
    one more pass over every parameter (35 ms per step at d 768). It does repeat a multiply.
    """

    def update(updates, state, params=None):
        del params
        g_norm = optax.tree.norm(updates)
        scale = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm)
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lr_schedule(cfg),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=1e-8,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.grad_clip > 0:
        return optax.chain(clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
