"""Mixture-of-Experts: the JAX model vs the torch reference (logits, loss with the aux terms,
gradients, AdamW steps), the grouped / ragged paths vs the dense one, ties and capacity drops
against a NumPy transcription of the rule (`gpt2_jax.model.moe` docstring)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from gpt2_jax.config import ModelConfig
from gpt2_jax.formats.weights import to_hf_state_dict
from gpt2_jax.model.gpt import GPT
from gpt2_jax.model.moe import MoE, apply_experts, route_tokens
from gpt2_jax.training.step import training_loss
from gpt2_torch_ref import moe as ref_moe
from parity_tests.common import (
    BASE,
    SEQ_LEN,
    WINDOW,
    record,
    ref_config,
    rel_max_err,
    tokens,
    twin_models,
)

BATCH = 2
E = 4
LR, BETAS, EPS, WD = 3e-3, (0.9, 0.95), 1e-8, 0.1
MOE = dict(BASE, moe_experts=E)
VARIANTS = {
    "learned-top2": ModelConfig(**MOE),
    "rope-gqa-win-top2": ModelConfig(
        **MOE, pos_embedding="rope", n_kv_head=2, attention_window=WINDOW
    ),
    "learned-every2": ModelConfig(**MOE, moe_every=2),
    "learned-top1": ModelConfig(**MOE, moe_top_k=1),
    "learned-capacity0.75": ModelConfig(**MOE, moe_capacity_factor=0.75),
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The reference's per-expert loop is many tiny ops: threads only contend with XLA's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------ JAX model vs torch


def _jax_run(model: GPT, batches):
    """AdamW on the training loss (ce + aux·lb + z·z); returns the step-0 logits, stats and
    gradients (HF names) and every step's total loss. Gradient and update are two compiled
    functions: one fused step compiles about twice as long."""
    cfg = model.cfg
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        m = nnx.merge(graphdef, p, rest)
        ce, stats = m.loss_and_stats(x, y, impl="full")
        return training_loss(ce, stats, cfg), (m(x), stats)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    losses, first = [], None
    for x, y in batches:
        (loss, (logits, stats)), grads = grad_fn(params, jnp.asarray(x), jnp.asarray(y))
        params, opt_state = update(params, opt_state, grads)
        losses.append(float(loss))
        if first is None:
            grad_model = nnx.merge(graphdef, grads, rest)  # a GPT whose "weights" are grads
            stats = {k: float(v) for k, v in stats.items()}
            first = np.asarray(logits), stats, to_hf_state_dict(grad_model)
    return (*first, losses)


def _torch_run(ref: torch.nn.Module, cfg: ModelConfig, batches):
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    losses, first = [], None
    for x, y in batches:
        opt.zero_grad()
        logits = ref(torch.from_numpy(x).long())
        aux = ref.moe_aux()
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).long().reshape(-1)
        )
        loss = ce + cfg.moe_aux_loss_coef * aux["lb_loss"] + cfg.moe_z_loss_coef * aux["z_loss"]
        loss.backward()
        if first is None:
            grads = {k: p.grad.numpy().copy() for k, p in ref.named_parameters()}
            stats = {k: v.item() for k, v in aux.items()}
            first = logits.detach().numpy(), stats, grads
        opt.step()
        losses.append(loss.item())
    return (*first, losses)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_loss_gradients_and_ten_adamw_steps(name):
    cfg = VARIANTS[name]
    model, ref = twin_models(cfg, seed=1)
    pool = [tokens(BATCH, SEQ_LEN + 1, cfg.vocab_size, seed=100 + s) for s in range(2)]
    batches = [(pool[s % 2][:, :-1], pool[s % 2][:, 1:]) for s in range(10)]
    logits_jax, stats_jax, grads_jax, losses_jax = _jax_run(model, batches)
    logits_ref, stats_ref, grads_ref, losses_ref = _torch_run(ref, cfg, batches)

    assert record("moe logits rel max |jax-torch|", rel_max_err(logits_jax, logits_ref)) <= 1e-5
    assert stats_jax.keys() == stats_ref.keys()
    for key in ("busiest", "idlest", "dropped"):  # counts: the same routing decisions
        assert stats_jax[key] == pytest.approx(stats_ref[key], abs=1e-7), key
    assert (stats_ref["dropped"] > 0) == (cfg.moe_capacity_factor is not None)
    assert record("moe loss (ce+aux) |jax-torch|", abs(losses_jax[0] - losses_ref[0])) <= 1e-6

    assert set(grads_jax) <= set(grads_ref)
    assert any(".mlp.router." in k for k in grads_jax)
    for key, g_jax in grads_jax.items():
        g_ref = grads_ref[key]
        rel = np.linalg.norm(g_jax - g_ref) / max(np.linalg.norm(g_ref), 1e-30)
        assert record("moe grad ||dg||/||g|| (worst param)", rel) <= 1e-5, key

    diffs = np.abs(np.array(losses_jax) - np.array(losses_ref))
    assert record("moe AdamW 10-step loss |jax-torch| (worst)", float(diffs.max())) <= 1e-5
    # the steps really train: each of the two alternating batches got easier
    assert losses_jax[8] < losses_jax[0] and losses_jax[9] < losses_jax[1]


# ------------------------------------------------------------------ NumPy transcription (fp64)


def np_top_k(z_BTE: np.ndarray, k: int) -> np.ndarray:
    """The k largest logits' experts, largest first, ties to the lower expert index."""
    return np.argsort(-z_BTE, axis=-1, kind="stable")[..., :k]


def np_keep(idx_BTK: np.ndarray, n_experts: int, cf: float | None) -> np.ndarray:
    """The capacity rule, literally: per sequence, walk the assignments position-major (token 0
    choice 0, token 0 choice 1, token 1 choice 0, ...); C = ceil(cf·T·k/E); an assignment is
    kept iff fewer than C earlier assignments of the sequence went to its expert."""
    B, T, k = idx_BTK.shape
    keep = np.ones((B, T, k), bool)
    if cf is None:
        return keep
    capacity = math.ceil(cf * T * k / n_experts)
    for b in range(B):
        earlier = [0] * n_experts
        for t in range(T):
            for j in range(k):
                e = idx_BTK[b, t, j]
                keep[b, t, j] = earlier[e] < capacity
                earlier[e] += 1
    return keep


def np_gelu(h):
    return 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3)))


def np_moe(x_BTD, router_DE, w1, b1, w2, b2, k, cf):
    """The layer in fp64: (output [B, T, D], chosen experts, kept mask)."""
    x = x_BTD.astype(np.float64)
    z_BTE = x @ router_DE.astype(np.float64)
    idx_BTK = np_top_k(z_BTE, k)
    top_BTK = np.take_along_axis(z_BTE, idx_BTK, axis=-1)
    w_BTK = np.exp(top_BTK - top_BTK.max(-1, keepdims=True))
    w_BTK /= w_BTK.sum(-1, keepdims=True)
    keep_BTK = np_keep(idx_BTK, router_DE.shape[1], cf)
    y = np.zeros_like(x)
    B, T, _ = x.shape
    for b in range(B):
        for t in range(T):
            for j in range(k):
                if keep_BTK[b, t, j]:
                    e = idx_BTK[b, t, j]
                    h = np_gelu(x[b, t] @ w1[e] + b1[e])
                    y[b, t] += w_BTK[b, t, j] * (h @ w2[e] + b2[e])
    return y, idx_BTK, keep_BTK


# --------------------------------------------------------------------- one MoE layer, by path

LAYER = ModelConfig(**dict(MOE, n_embd=16), dropout=0.0)
LAYER_T = 24  # 2·24·2 = 96 assignments: the grouped blocks (16 rows) spill past experts


def _layer_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """O(1)-output weights with non-zero biases (the init's are zero)."""
    rng = np.random.default_rng(seed)
    D, F_ = LAYER.n_embd, 4 * LAYER.n_embd

    def normal(*shape: int, std: float) -> np.ndarray:
        return (std * rng.standard_normal(shape)).astype(np.float32)

    return dict(
        router=normal(D, E, std=0.5),
        w1=normal(E, D, F_, std=D**-0.5),
        b1=normal(E, F_, std=0.1),
        w2=normal(E, F_, D, std=F_**-0.5),
        b2=normal(E, D, std=0.1),
    )


def _layer(impl: str, cf: float | None, w: dict[str, np.ndarray]) -> MoE:
    cfg = dataclasses.replace(LAYER, moe_impl=impl, moe_capacity_factor=cf)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    layer.router[...] = jnp.asarray(w["router"])
    ex = layer.experts
    ex.c_fc.kernel[...], ex.c_fc.bias[...] = jnp.asarray(w["w1"]), jnp.asarray(w["b1"])
    ex.c_proj.kernel[...], ex.c_proj.bias[...] = jnp.asarray(w["w2"]), jnp.asarray(w["b2"])
    return layer


def _layer_output_and_grads(layer: MoE, x_BTD: np.ndarray, r_BTD: np.ndarray):
    """The layer's output, and the gradients of Σ r·y w.r.t. x and every parameter."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def f(params, x):
        def objective(p, x):
            y = nnx.merge(graphdef, p, rest)(x)
            return jnp.sum(y * r_BTD), y

        return jax.grad(objective, argnums=(0, 1), has_aux=True)(params, x)

    (g_params, g_x), y = f(params, jnp.asarray(x_BTD))
    flat = {".".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(g_params)}
    return np.asarray(y), {"x": np.asarray(g_x), **flat}


@pytest.mark.parametrize("cf", [None, 0.75], ids=["dropless", "capacity0.75"])
def test_grouped_and_ragged_equal_dense(cf):
    w = _layer_weights()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((BATCH, LAYER_T, LAYER.n_embd)).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    y_ref, g_ref = _layer_output_and_grads(_layer("dense", cf, w), x, r)
    y_np, _, keep = np_moe(x, w["router"], w["w1"], w["b1"], w["w2"], w["b2"], LAYER.moe_top_k, cf)
    assert (~keep).any() == (cf is not None)
    assert record("moe layer dense vs numpy fp64 (rel max)", rel_max_err(y_ref, y_np)) <= 1e-5
    for impl in ("grouped", "ragged"):
        y, grads = _layer_output_and_grads(_layer(impl, cf, w), x, r)
        assert record(f"moe layer {impl} vs dense (rel max)", rel_max_err(y, y_ref)) <= 1e-6
        assert grads.keys() == g_ref.keys()
        for key, g in grads.items():
            rel = np.linalg.norm(g - g_ref[key]) / max(np.linalg.norm(g_ref[key]), 1e-30)
            assert record(f"moe layer {impl} grad vs dense (worst)", rel) <= 1e-6, (impl, key)


def test_experts_without_tokens_on_every_path():
    """Routing that leaves experts 1 and 3 empty (and expert 0 with all N rows)."""
    w = _layer_weights(seed=2)
    weights = tuple(jnp.asarray(w[n]) for n in ("w1", "b1", "w2", "b2"))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((BATCH, LAYER_T, LAYER.n_embd)), jnp.float32)
    idx = jnp.broadcast_to(jnp.array([0, 2], jnp.int32), (BATCH, LAYER_T, 2))
    gate = jnp.asarray(rng.uniform(0, 1, (BATCH, LAYER_T, 2)), jnp.float32)
    slot = jnp.broadcast_to(jnp.arange(LAYER_T, dtype=jnp.int32)[:, None], idx.shape)
    ys = {
        impl: np.asarray(jax.jit(
            lambda x, g, impl=impl: apply_experts(
                x, idx, g, slot, weights, impl=impl, capacity=None
            )
        )(x, gate))
        for impl in ("dense", "grouped", "ragged")
    }  # fmt: skip
    for impl in ("grouped", "ragged"):
        err = rel_max_err(ys[impl], ys["dense"])
        assert record(f"moe layer {impl} vs dense (rel max)", err) <= 1e-6, impl


# ----------------------------------------------------------------------------- ties, capacity


def test_tied_router_logits_pick_the_lower_expert_in_jax_and_torch():
    """Router columns 1, 2, 3 equal (and 0 different): exact ties in fp32, since x and the
    router hold small integers and quarters. Where logit 0 is at least logit 1 the choice is
    (0, 1), else (1, 2): never expert 3. Zero router weights tie all four: (0, 1)."""
    D, k = LAYER.n_embd, 2
    rng = np.random.default_rng(4)
    x = rng.integers(-2, 3, (BATCH, LAYER_T, D)).astype(np.float32)
    a, b = (rng.integers(-4, 5, D) / 4.0 for _ in range(2))
    tied = np.stack([a, b, b, b], axis=1).astype(np.float32)
    w = _layer_weights(seed=5)
    ref_cfg = ref_config(dataclasses.replace(LAYER, moe_top_k=k))

    for router in (tied, np.zeros_like(tied)):
        z = x @ router  # exact: integers times quarters
        zero_in = z[..., :1] >= z[..., 1:2]  # expert 0 chosen (first) iff it ties or wins
        if router.any():
            assert (z[..., 0] > z[..., 1]).any() and (z[..., 0] < z[..., 1]).any()
        want = np.where(zero_in, [0, 1], [1, 2])
        np.testing.assert_array_equal(np_top_k(z, k), want)  # the transcription agrees

        route = route_tokens(jnp.asarray(x), jnp.asarray(router), k, None)
        np.testing.assert_array_equal(np.asarray(route.idx_BTK), want)

        layer = ref_moe.MoE(ref_cfg)
        with torch.no_grad():
            layer.router.weight.copy_(torch.from_numpy(router))
            for name, p in (("c_fc", "w1"), ("c_proj", "w2")):
                getattr(layer.experts, name).weight.copy_(torch.from_numpy(w[p]))
            layer.experts.c_fc.bias.copy_(torch.from_numpy(w["b1"]))
            layer.experts.c_proj.bias.copy_(torch.from_numpy(w["b2"]))
            y_ref = layer(torch.from_numpy(x)).numpy()
        y_np, idx_np, _ = np_moe(x, router, w["w1"], w["b1"], w["w2"], w["b2"], k, None)
        np.testing.assert_array_equal(idx_np, want)
        assert rel_max_err(y_ref, y_np) <= 1e-5  # torch chose the same experts
        share = np.bincount(want.reshape(-1), minlength=E) / want.size
        assert layer.aux["busiest"].item() == pytest.approx(share.max())
        assert layer.aux["idlest"].item() == 0.0  # expert 3 is never chosen
        assert float(route.stats["idlest"]) == 0.0


@pytest.mark.parametrize("cf", [0.5, 0.75, 1.25])
def test_capacity_drops_what_the_rule_says(cf):
    w = _layer_weights(seed=6)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((BATCH, LAYER_T, LAYER.n_embd)).astype(np.float32)
    k = LAYER.moe_top_k
    y_np, idx_np, keep_np = np_moe(x, w["router"], w["w1"], w["b1"], w["w2"], w["b2"], k, cf)
    assert (~keep_np).any() and keep_np.any()

    route = route_tokens(jnp.asarray(x), jnp.asarray(w["router"]), k, cf)
    assert route.capacity == math.ceil(cf * LAYER_T * k / E)
    np.testing.assert_array_equal(np.asarray(route.idx_BTK), idx_np)
    np.testing.assert_array_equal(np.asarray(route.slot_BTK) >= 0, keep_np)
    assert float(route.stats["dropped"]) == pytest.approx((~keep_np).mean())
    y = np.asarray(_layer("grouped", cf, w)(jnp.asarray(x)))
    assert record("moe capacity layer vs numpy fp64 (rel max)", rel_max_err(y, y_np)) <= 1e-5

    # The torch reference's rule gives the same mask.
    keep_ref = ref_moe.capacity_keep(
        torch.from_numpy(idx_np), E, ref_moe.expert_capacity(cf, LAYER_T, k, E)
    )
    np.testing.assert_array_equal(keep_ref.numpy(), keep_np)
