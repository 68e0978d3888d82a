"""Scanned layers (model.scan_layers) against unrolled ones: forward, training, checkpoints,
generation and export, with the same weights moved between layouts."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt2_jax.config import MeshConfig, ModelConfig, TrainConfig
from gpt2_jax.formats.weights import load_hf_state_dict, to_hf_state_dict
from gpt2_jax.generate import generate
from gpt2_jax.model.gpt import GPT, with_layout
from gpt2_jax.model.layer_stack import relayout
from gpt2_jax.parallel.sharding import make_mesh
from gpt2_jax.train import train
from gpt2_jax.training.optim import decay_mask
from gpt2_jax.training.step import Trainer
from tests.train_helpers import tiny_config, train_losses

MODELS = {
    "learned": ModelConfig(vocab_size=96, n_layer=3, n_head=4, n_embd=32, max_seq_len=32),
    "rope_gqa_window": ModelConfig(
        vocab_size=96, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=32,
        pos_embedding="rope", attention_window=5, tie_embeddings=False,
    ),
}  # fmt: skip
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 24)).astype(np.int32)
_forward = nnx.jit(lambda model, tokens: model(tokens))


def _scanned(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, scan_layers=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_same_weights_give_the_same_logits_and_layouts_round_trip(name):
    model = GPT(MODELS[name], rngs=nnx.Rngs(0))
    scanned = with_layout(model, True)
    kernel = nnx.state(scanned, nnx.Param)["h"]["attn"]["c_attn"]["kernel"]
    assert kernel.shape == (3, 32, model.h[0].attn.c_attn.kernel.shape[1])
    assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "qkv")
    want = np.asarray(_forward(model, TOKENS))
    assert np.max(np.abs(np.asarray(_forward(scanned, TOKENS)) - want)) <= 1e-6
    back = with_layout(scanned, False)
    for a, b in zip(jax.tree.leaves(nnx.state(back, nnx.Param)),
                    jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    # HF names: the same flat dict from either layout, and loading it fills a scanned model.
    flat = to_hf_state_dict(model)
    assert {k: v.tolist() for k, v in to_hf_state_dict(scanned).items()} == {
        k: v.tolist() for k, v in flat.items()
    }
    fresh = GPT(_scanned(MODELS[name]), rngs=nnx.Rngs(7))
    load_hf_state_dict(fresh, flat)
    assert np.max(np.abs(np.asarray(_forward(fresh, TOKENS)) - want)) <= 1e-6


def test_weight_decay_skips_stacked_biases_and_norms():
    params = nnx.state(GPT(_scanned(MODELS["learned"]), rngs=nnx.Rngs(0)), nnx.Param)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(decay_mask(params))}
    decayed = sorted(k for k, v in flat.items() if v.get_value())
    assert decayed == ["h/attn/c_attn/kernel", "h/attn/c_proj/kernel", "h/mlp/c_fc/kernel",
                       "h/mlp/c_proj/kernel", "wpe/embedding", "wte/embedding"]  # fmt: skip


def _train_both(cfg: ModelConfig, tc: TrainConfig, steps: int):
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    unrolled, scanned = Trainer(cfg, tc, mesh), Trainer(_scanned(cfg), tc, mesh)
    state0 = unrolled.init_state()
    # The same initial weights and optimizer state, moved to the stacked layout (copies: the
    # steps donate their input state).
    state1 = jax.tree.map(jnp.copy, relayout(state0, jax.eval_shape(scanned.init_state)))
    rng, losses = np.random.default_rng(0), {"unrolled": [], "scanned": []}
    for _ in range(steps):
        ids = rng.integers(0, cfg.vocab_size, (tc.batch_size, tc.seq_len + 1)).astype(np.int32)
        x, y = ids[:, :-1], ids[:, 1:]
        state0, m0 = unrolled.step(state0, *unrolled.shard_batch(x, y))
        state1, m1 = scanned.step(state1, *scanned.shard_batch(x, y))
        losses["unrolled"].append(float(m0["loss"]))
        losses["scanned"].append(float(m1["loss"]))
    back = relayout(state1.params, jax.eval_shape(unrolled.init_state).params)
    return losses, jax.tree.leaves(back), jax.tree.leaves(state0.params)


@pytest.mark.parametrize("name", list(MODELS))
def test_ten_adamw_steps_match_with_remat(name):
    tc = TrainConfig(batch_size=4, seq_len=16, grad_accum=2, lr=1e-3, warmup_steps=2,
                     remat="block")  # fmt: skip
    losses, scanned, unrolled = _train_both(MODELS[name], tc, 10)
    diff = np.max(np.abs(np.subtract(losses["scanned"], losses["unrolled"])))
    print(f"\n{name}: 10 steps, max |Δloss| {diff:.2e}")
    assert diff <= 1e-5
    for a, b in zip(scanned, unrolled, strict=True):
        assert np.max(np.abs(a - b)) <= 1e-5


def test_dropout_differs_per_layer_and_per_step_inside_the_scan():
    cfg = _scanned(dataclasses.replace(MODELS["learned"], dropout=0.5))
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    trainer = Trainer(cfg, TrainConfig(batch_size=2, seq_len=16), mesh)
    params = trainer.init_state().params
    x, y = TOKENS[:, :16], TOKENS[:, 1:17]
    loss = jax.jit(lambda *args: trainer._loss(*args)[0])
    a, b = (float(loss(params, jax.random.key(k), x, y)) for k in (1, 2))
    assert a != b and float(loss(params, jax.random.key(1), x, y)) == a  # keyed, reproducible
    model = trainer.model(params, train=True)
    nnx.reseed(model, default=jax.random.key(0), policy="match_shape")
    keys = jax.random.key_data(model.h.mlp.dropout.rngs.key[...])
    assert keys.shape[0] == 3 and len({tuple(np.asarray(k).tolist()) for k in keys}) == 3


def test_cached_generation_of_a_scanned_model_equals_recomputation():
    cfg = MODELS["rope_gqa_window"]
    model = with_layout(GPT(cfg, rngs=nnx.Rngs(0)), True)
    prompt = TOKENS[:, :4]
    got = np.asarray(generate(model, prompt, max_new_tokens=12, temperature=0.0))
    # By causality, greedy recomputation from scratch picks the argmax of one full forward.
    seq = np.concatenate([prompt, got], 1)
    full = np.asarray(_forward(model, jnp.asarray(seq[:, :-1])))[:, 3:]
    np.testing.assert_array_equal(got, np.argmax(full, -1))


@pytest.mark.parametrize("saved_scanned", [True, False], ids=["scanned→unrolled",
                                                               "unrolled→scanned"])  # fmt: skip
def test_checkpoint_of_one_layout_resumes_in_the_other(tmp_path, prepared_shakespeare,
                                                       saved_scanned, capsys):  # fmt: skip
    common = ["train.max_steps=6", "train.eval_every=0", "checkpoint.every=3", "model.n_layer=2"]
    layout = f"model.scan_layers={str(saved_scanned).lower()}"
    ref = tmp_path / "straight"
    train(tiny_config(ref, prepared_shakespeare, *common, layout))
    # The same run cut at step 3: its step-3 checkpoint, resumed in the other layout.
    run = tmp_path / "switched"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "6")
    other = f"model.scan_layers={str(not saved_scanned).lower()}"
    summary = train(tiny_config(run, prepared_shakespeare, *common, other))
    assert summary["steps"] == 6
    assert "holds the other layer layout; converted" in capsys.readouterr().err
    want, got = train_losses(ref), train_losses(run)
    assert sorted(got) == list(range(1, 7))
    diff = max(abs(got[s] - want[s]) for s in (4, 5, 6))
    print(f"\nresumed in the other layout: steps 4-6 max |Δloss| {diff:.2e}")
    assert diff <= 1e-5


def test_scanned_run_exports_to_transformers_and_evaluates(tmp_path, prepared_shakespeare):
    import torch
    from transformers import GPT2LMHeadModel

    from gpt2_jax.convert import main as convert_main
    from gpt2_jax.formats.checkpoint import load_model_weights

    out = tmp_path / "run"
    train(tiny_config(out, prepared_shakespeare, "train.max_steps=2", "train.eval_every=2",
                      "model.n_layer=2", "model.scan_layers=true"))  # fmt: skip
    model = load_model_weights(out)  # the saved layout: scanned
    assert model.cfg.scan_layers and nnx.state(model, nnx.Param)["h"]["ln_1"]["scale"].ndim == 2
    assert convert_main(["to-hf", "--checkpoint", str(out), "--out", str(tmp_path / "hf")]) == 0
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = TOKENS % model.cfg.vocab_size
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(_forward(model, tokens))[..., : model.cfg.vocab_size]
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(ours).max()
