"""The fused, chunked LM-head loss against the full one: values, gradients, training, memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt2_jax.config import ConfigError, MeshConfig, ModelConfig, TrainConfig
from gpt2_jax.model.gpt import GPT
from gpt2_jax.ops.chunked_loss import chunked_cross_entropy
from gpt2_jax.parallel.sharding import make_mesh
from gpt2_jax.training.step import Trainer

LOSS_TOL = 1e-6  # absolute, fp32
GRAD_TOL = 1e-5  # ‖Δg‖ / ‖g‖ per parameter, fp32


def _model(tie: bool, dtype: str = "float32") -> GPT:
    # vocab 500 padded to 512: the padded columns must stay out of loss and gradients.
    cfg = ModelConfig(vocab_size=500, vocab_pad_multiple=64, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=64, max_seq_len=64, pos_embedding="rope", tie_embeddings=tie,
                      dtype=dtype)  # fmt: skip
    return GPT(cfg, rngs=nnx.Rngs(0))


def _loss_and_grads(model: GPT, impl: str, chunk: int, x_BT, y_BT):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p):
        return nnx.merge(graphdef, p, rest).loss(x_BT, y_BT, impl=impl, chunk=chunk)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    return float(loss), jax.tree.leaves(grads)


def _tokens(B: int, T: int, seed: int = 1):
    ids = np.random.default_rng(seed).integers(0, 500, (B, T + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [8, 100], ids=["chunk8", "chunk>T"])
def test_chunked_loss_and_every_gradient_equal_full(tie, chunk):
    model = _model(tie)
    x, y = _tokens(3, 37)  # 37 = 4·8 + 5: a chunk of 8 leaves a shorter last chunk
    full_loss, full_grads = _loss_and_grads(model, "full", chunk, x, y)
    loss, grads = _loss_and_grads(model, "chunked", chunk, x, y)
    assert abs(loss - full_loss) <= LOSS_TOL
    assert len(grads) == len(full_grads)
    for g, ref in zip(grads, full_grads, strict=True):
        assert g.shape == ref.shape and g.dtype == ref.dtype
        assert np.linalg.norm(g - ref) <= GRAD_TOL * np.linalg.norm(ref)


def test_padded_vocab_rows_get_no_gradient():
    model = _model(tie=True)
    _, grads = _loss_and_grads(model, "chunked", 8, *_tokens(2, 16))
    wte_grad = next(g for g in grads if g.shape == (512, 64))
    assert np.all(wte_grad[500:] == 0) and np.any(wte_grad[:500] != 0)


def test_bfloat16_compute_stays_close_to_full():
    model = _model(tie=True, dtype="bfloat16")
    x, y = _tokens(2, 32)
    full_loss, full_grads = _loss_and_grads(model, "full", 8, x, y)
    loss, grads = _loss_and_grads(model, "chunked", 8, x, y)
    # bf16 operands (8 mantissa bits), fp32 accumulation in both: rounding-level differences
    assert abs(loss - full_loss) <= 1e-2 * full_loss
    for g, ref in zip(grads, full_grads, strict=True):
        assert np.linalg.norm(g - ref) <= 3e-2 * np.linalg.norm(ref)


def test_forward_only_matches_and_cotangent_scales():
    w_VD = jax.random.normal(jax.random.key(0), (40, 16)) * 0.3
    x_BTD = jax.random.normal(jax.random.key(1), (2, 11, 16))
    y_BT = jax.random.randint(jax.random.key(2), (2, 11), 0, 30)

    def full(x, w):
        logits = jnp.where(jnp.arange(40) < 30, x @ w.T, -jnp.inf)
        lse = jax.nn.logsumexp(logits, -1)
        return jnp.mean(lse - jnp.take_along_axis(logits, y_BT[..., None], -1)[..., 0])

    def chunked(x, w):
        return chunked_cross_entropy(x, w, y_BT, n_valid=30, chunk=4)

    assert abs(float(chunked(x_BTD, w_VD)) - float(full(x_BTD, w_VD))) <= LOSS_TOL
    # 3·loss: the backward pass must scale the saved gradients by the incoming cotangent
    g = jax.grad(lambda x, w: 3 * chunked(x, w), argnums=(0, 1))(x_BTD, w_VD)
    ref = jax.grad(lambda x, w: 3 * full(x, w), argnums=(0, 1))(x_BTD, w_VD)
    for a, b in zip(g, ref, strict=True):
        assert np.linalg.norm(a - b) <= GRAD_TOL * np.linalg.norm(b)
    with pytest.raises(ValueError, match="layout"):
        chunked_cross_entropy(x_BTD, w_VD, y_BT, n_valid=30, chunk=4, layout="XY")


def _train(loss_impl: str, steps: int = 3):
    cfg = ModelConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=32, max_seq_len=32,
                      tie_embeddings=False)  # fmt: skip
    tc = TrainConfig(batch_size=8, seq_len=24, grad_accum=2, lr=1e-3, warmup_steps=1,
                     loss_impl=loss_impl, loss_chunk=7)  # fmt: skip
    trainer = Trainer(cfg, tc, make_mesh(MeshConfig()))
    state, losses = trainer.init_state(), []
    rng = np.random.default_rng(0)
    for _ in range(steps):
        ids = rng.integers(0, 300, (8, 25)).astype(np.int32)
        state, metrics = trainer.step(state, *trainer.shard_batch(ids[:, :-1], ids[:, 1:]))
        losses.append(float(metrics["loss"]))
    eval_loss = trainer.eval_loss(state.params, *trainer.shard_batch(ids[:, :-1], ids[:, 1:]))
    return losses, jax.tree.leaves(jax.device_get(state.params)), float(eval_loss)


def test_training_with_grad_accum_matches_full():
    full_losses, full_params, full_eval = _train("full")
    losses, params, eval_loss = _train("chunked")
    assert np.max(np.abs(np.subtract(losses, full_losses))) <= 1e-5
    assert abs(eval_loss - full_eval) <= 1e-5
    for a, b in zip(params, full_params, strict=True):
        assert np.max(np.abs(a - b)) <= 1e-5


def _compiled_temp_bytes(loss_impl: str, cfg: ModelConfig, B: int, T: int) -> int:
    tc = TrainConfig(batch_size=B, seq_len=T, loss_impl=loss_impl, loss_chunk=64)
    trainer = Trainer(cfg, tc, make_mesh(MeshConfig(), jax.devices()[:1]))
    state = jax.eval_shape(trainer.init_state)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        state, trainer.state_shardings,
    )  # fmt: skip
    batch = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=trainer.batch_sharding)
    compiled = trainer.step.lower(state, batch, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_step_holds_no_full_logits_buffer():
    # GPT-2's vocab on a tiny body: the [tokens, vocab] fp32 logits (4096 × 50304 × 4 B =
    # 824 MB) dominate the full loss's step; the chunked one holds 64 positions of them.
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=64, max_seq_len=512)
    B, T = 8, 512
    logits_bytes = B * T * cfg.padded_vocab * 4
    full = _compiled_temp_bytes("full", cfg, B, T)
    chunked = _compiled_temp_bytes("chunked", cfg, B, T)
    print(f"\ncompiled temporaries: full {full / 2**20:.0f} MiB, chunked {chunked / 2**20:.0f} "
          f"MiB, one logits buffer {logits_bytes / 2**20:.0f} MiB")  # fmt: skip
    assert full >= logits_bytes
    assert chunked < logits_bytes / 2


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("loss_impl", "fused", "unknown train.loss_impl='fused'; use one of ('full', 'chunked')"),
        ("loss_chunk", 0, "train.loss_chunk must be a positive number of positions, got 0"),
    ],
)
def test_bad_loss_settings_are_config_errors(key, value, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{key: value})
    assert str(info.value) == message
