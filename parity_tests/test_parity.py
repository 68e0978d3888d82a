"""JAX model vs the torch reference for all 12 variants: logits, loss, gradients, AdamW steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from gpt2_jax.formats.weights import to_hf_state_dict
from gpt2_jax.model.gpt import GPT, cross_entropy
from parity_tests.common import SEQ_LEN, VARIANTS, record, rel_max_err, tokens, twin_models

BATCH = 2
LR, BETAS, EPS, WD = 3e-3, (0.9, 0.95), 1e-8, 0.1


def _loss_and_grads(model: GPT, x, y):
    def loss_fn(m):
        return cross_entropy(m(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    grad_model = nnx.merge(graphdef, grads, rest)  # a GPT whose "weights" are the gradients
    return float(loss), to_hf_state_dict(grad_model)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_loss_and_gradients(name):
    cfg = VARIANTS[name]
    model, ref = twin_models(cfg)
    ids = tokens(BATCH, SEQ_LEN + 1, cfg.vocab_size)
    x, y = ids[:, :-1], ids[:, 1:]

    logits_jax = np.asarray(model(jnp.asarray(x)))
    tx, ty = torch.from_numpy(x).long(), torch.from_numpy(y).long()
    logits_ref_t = ref(tx)
    logits_ref = logits_ref_t.detach().numpy()
    assert record("logits rel max |jax-torch|", rel_max_err(logits_jax, logits_ref)) <= 1e-5

    loss_ref = F.cross_entropy(logits_ref_t.reshape(-1, cfg.vocab_size), ty.reshape(-1))
    loss_ref.backward()
    loss_jax, grads_jax = _loss_and_grads(model, jnp.asarray(x), jnp.asarray(y))
    assert record("loss |jax-torch|", abs(loss_jax - loss_ref.item())) <= 1e-6

    grads_ref = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    assert set(grads_jax) <= set(grads_ref)
    for key, g_jax in grads_jax.items():
        g_ref = grads_ref[key]
        rel = np.linalg.norm(g_jax - g_ref) / max(np.linalg.norm(g_ref), 1e-30)
        assert record("grad ||dg||/||g|| (worst param)", rel) <= 1e-5, key


def _jax_adamw_losses(model: GPT, batches) -> list[float]:
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return cross_entropy(nnx.merge(graphdef, p, rest)(x), y)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for x, y in batches:
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
        losses.append(float(loss))
    return losses


def _torch_adamw_losses(ref: torch.nn.Module, batches) -> list[float]:
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        logits = ref(torch.from_numpy(x).long())
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).long().reshape(-1)
        )
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ten_adamw_steps(name):
    cfg = VARIANTS[name]
    model, ref = twin_models(cfg, seed=1)
    pool = [tokens(BATCH, SEQ_LEN + 1, cfg.vocab_size, seed=100 + s) for s in range(2)]
    batches = [(pool[s % 2][:, :-1], pool[s % 2][:, 1:]) for s in range(10)]
    losses_jax = _jax_adamw_losses(model, batches)
    losses_ref = _torch_adamw_losses(ref, batches)
    diffs = np.abs(np.array(losses_jax) - np.array(losses_ref))
    assert record("AdamW 10-step loss |jax-torch| (worst step)", float(diffs.max())) <= 1e-5
    # the steps really train: each of the two alternating batches got easier
    assert losses_jax[8] < losses_jax[0] and losses_jax[9] < losses_jax[1]
