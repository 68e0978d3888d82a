"""`model.vocab_pad_multiple`: a padded model computes the unpadded one over the real vocab.

The unpadded twin holds the padded model's weights trimmed to vocab_size rows; the padded rows
are made large, so any path that forgot the -inf mask would pick them. fp32; tolerance 1e-6 of
the largest magnitude (XLA:CPU may tile a 128-wide matmul differently from a 101-wide one:
measured 1 ulp).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from gpt2_jax import convert
from gpt2_jax import train as train_cli
from gpt2_jax.config import Config, ConfigError, ModelConfig, config_from_dict, to_dict
from gpt2_jax.data import tokenizer
from gpt2_jax.decode.sampling import categorical, probs, sample
from gpt2_jax.errors import UserError
from gpt2_jax.formats.checkpoint import Checkpointer, TrainState
from gpt2_jax.formats.hf_format import load_hf_folder, model_config_from_hf, save_hf_folder
from gpt2_jax.formats.weights import load_hf_state_dict, to_hf_state_dict
from gpt2_jax.generate import generate
from gpt2_jax.model.gpt import count_params, cross_entropy
from gpt2_jax.ops.vocab_mask import mask_vocab
from gpt2_jax.training import loop as train_loop
from gpt2_jax.training.init_from import initial_model, plan
from gpt2_jax.training.resume import check_resume_config
from tests.cli_helpers import run_cli
from tests.gen_helpers import random_model

V, PAD, D = 101, 128, 32
BASE = dict(vocab_size=V, n_layer=1, n_head=2, n_embd=D, max_seq_len=32, dtype="float32")
TOL = 1e-6
TOKENS = np.random.default_rng(0).integers(0, V, (2, 16)).astype(np.int32)
X_BT, Y_BT = jnp.asarray(TOKENS[:, :-1]), jnp.asarray(TOKENS[:, 1:])
PROMPT = np.random.default_rng(1).integers(0, V, (16, 4))  # greedy and sampled: one compile


def assert_close(got, want) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL * np.abs(want).max()


@nnx.jit
def forward(model, x_BT, y_BT):
    """Logits, the head's logits without the padding mask, and the loss."""
    logits_BTV = model(x_BT)
    h_BTD = model.ln_f(model.hidden(x_BT))
    if model.cfg.tie_embeddings:
        raw_BTV = jnp.einsum("btd,vd->btv", h_BTD, model.wte.embedding[...])
    else:
        raw_BTV = h_BTD @ model.lm_head.kernel[...]
    return logits_BTV, raw_BTV, cross_entropy(logits_BTV, y_BT)


def _trimmed(padded):
    """An unpadded model holding `padded`'s weights, vocab rows cut to vocab_size."""
    plain = random_model(dataclasses.replace(padded.cfg, vocab_pad_multiple=1), seed=1)
    src, dst = nnx.state(padded, nnx.Param), nnx.state(plain, nnx.Param)
    nnx.update(plain, jax.tree.map(lambda d, s: s[tuple(slice(n) for n in d.shape)], dst, src))
    plain.eval()
    return plain


@functools.cache
def pair(tied: bool = True):
    """(padded, unpadded) models with equal real weights far from init (LayerNorm scales
    1 ± 0.1, the rest N(0, 0.3²), so greedy text varies); the padded rows x30."""
    cfg = ModelConfig(**BASE, vocab_pad_multiple=PAD, tie_embeddings=tied)
    padded = random_model(cfg, seed=0)
    rng = np.random.default_rng(0)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        name = jax.tree_util.keystr(path)
        return 1.0 + 0.1 * noise if "ln_" in name and "scale" in name else 0.3 * noise

    nnx.update(padded, jax.tree_util.tree_map_with_path(draw, nnx.state(padded, nnx.Param)))
    wte = padded.wte.embedding
    wte.set_value(jnp.asarray(wte[...]).at[V:].multiply(30.0))
    if not tied:
        kernel = padded.lm_head.kernel
        kernel.set_value(jnp.asarray(kernel[...]).at[:, V:].multiply(30.0))
    padded.eval()
    return padded, _trimmed(padded)


def test_config_padded_vocab_and_one_line_refusals():
    assert ModelConfig(vocab_size=50257, vocab_pad_multiple=128).padded_vocab == 50304
    assert ModelConfig(vocab_size=50304, vocab_pad_multiple=128).padded_vocab == 50304
    assert ModelConfig().padded_vocab == 50257
    assert ModelConfig(**BASE, vocab_pad_multiple=PAD).padded_vocab == PAD
    for bad in (0, -128, True, 1.5):
        with pytest.raises(ConfigError, match=r"^model\.vocab_pad_multiple must be a positive"):
            ModelConfig(vocab_pad_multiple=bad)
    with pytest.raises(ConfigError, match=r"^model\.vocab_pad_multiple expects int"):
        config_from_dict({"model": {"vocab_pad_multiple": "128"}})


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_and_loss_equal_the_unpadded_model(tied):
    padded, plain = pair(tied)
    assert padded.wte.embedding.shape == (PAD, D) and plain.wte.embedding.shape == (V, D)
    (got, raw, loss_pad), (want, _, loss_plain) = (forward(m, X_BT, Y_BT) for m in pair(tied))
    # Unmasked, the padded ids would win most argmaxes: the mask is what keeps them out.
    assert float(jnp.mean(jnp.argmax(raw, -1) >= V)) > 0.5
    got = np.asarray(got)
    assert got.shape[-1] == PAD and np.all(got[..., V:] == -np.inf)
    assert_close(got[..., :V], want)
    assert np.isfinite(float(loss_pad))
    assert_close(loss_pad, loss_plain)
    with pytest.raises(ConfigError, match=rf"token ids must lie in \[0, {V}\)"):
        padded(jnp.asarray([[1, V + 3]]))  # a padded id is no input: the vocab stays 101


def test_greedy_and_sampled_tokens_equal_the_unpadded_model():
    padded, plain = pair()
    got = {}
    for temperature in (0.0, 1.0):
        want = generate(plain, PROMPT, max_new_tokens=12, temperature=temperature, seed=3)
        got[temperature] = generate(padded, PROMPT, max_new_tokens=12, temperature=temperature,
                                    seed=3)  # fmt: skip
        np.testing.assert_array_equal(got[temperature], want)
        assert len(np.unique(want)) > 5  # not a degenerate constant continuation
    assert got[1.0].max() < V and len(np.unique(got[1.0])) > 40  # draws spread over the vocab


def test_sampling_never_draws_a_masked_id(monkeypatch):
    """-inf logits (a padded model's, or mask_vocab's for a model.vocab_size=50304 padded by
    hand) are never drawn: plain, top-k past the real vocab, top-p, greedy, and the CDF's
    rounding fallback."""
    logits_BV = jnp.asarray(np.random.default_rng(0).standard_normal((256, PAD)), jnp.float32)
    logits_BV = logits_BV.at[:, V:].add(20.0)  # the padded ids would win every draw
    assert mask_vocab(logits_BV, PAD) is logits_BV  # no padding: untouched
    masked_BV = mask_vocab(logits_BV, V)
    np.testing.assert_array_equal(masked_BV[:, :V], logits_BV[:, :V])
    assert np.all(np.asarray(masked_BV[:, V:]) == -np.inf)
    keys_B = jax.random.split(jax.random.PRNGKey(0), 256)
    draw = jax.jit(sample, static_argnames=("top_k", "top_p"))
    # Unfiltered draws from a padded model: test_greedy_and_sampled_tokens_equal_...
    filters = {"top_k": 120, "top_p": 0.99}  # top-k keeps 19 masked ids
    drawn_B = np.asarray(draw(masked_BV, keys_B, 1.0, **filters))
    assert drawn_B.max() < V and len(np.unique(drawn_B)) > 60
    assert int(draw(masked_BV, keys_B, 0.0, **filters).max()) < V  # greedy
    # The rounding fallback (u at the CDF's total) takes the last real id, not a padded one.
    monkeypatch.setattr(jax.random, "uniform", lambda key, *a, **k: jnp.float32(1.0))
    np.testing.assert_array_equal(categorical(keys_B[:4], probs(masked_BV[:4], 1.0)), V - 1)


def test_hf_export_is_trimmed_and_loads_in_transformers(tmp_path):
    import torch
    from transformers import GPT2LMHeadModel

    padded, plain = pair()
    save_hf_folder(padded, tmp_path / "pad")
    save_hf_folder(plain, tmp_path / "plain")
    config = json.loads((tmp_path / "pad" / "config.json").read_text())
    assert config["vocab_size"] == V and "vocab_pad_multiple" not in config
    assert config == json.loads((tmp_path / "plain" / "config.json").read_text())
    assert model_config_from_hf(config, dtype="float32") == plain.cfg
    got, want = (load_file(tmp_path / p / "model.safetensors") for p in ("pad", "plain"))
    assert got["transformer.wte.weight"].shape == (V, D) and sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "pad").eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(np.asarray(X_BT), dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward(padded, X_BT, Y_BT)[0])[..., :V]
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() / np.abs(ours).max() <= 1e-5  # torch vs XLA sum order

    # Reading pads again, with zero rows, only when asked; the same logits.
    again = load_hf_folder(tmp_path / "pad", vocab_pad_multiple=PAD, dtype="float32")
    assert again.cfg == padded.cfg
    assert np.all(np.asarray(again.wte.embedding[...])[V:] == 0)
    again.eval()
    assert_close(np.asarray(forward(again, X_BT, Y_BT)[0])[..., :V], ours)


def test_flat_weights_trim_and_pad_an_untied_head():
    padded, plain = pair(tied=False)
    flat = to_hf_state_dict(padded)
    assert flat["lm_head.weight"].shape == (V, D) and flat["transformer.wte.weight"].shape == (V, D)
    np.testing.assert_array_equal(
        flat["lm_head.weight"], np.asarray(padded.lm_head.kernel[...]).T[:V]
    )
    fresh = random_model(padded.cfg, seed=2)
    load_hf_state_dict(fresh, flat)
    kernel = np.asarray(fresh.lm_head.kernel[...])
    np.testing.assert_array_equal(kernel[:, :V], np.asarray(plain.lm_head.kernel[...]))
    assert kernel.shape == (D, PAD) and np.all(kernel[:, V:] == 0)
    bad = {**flat, "lm_head.weight": np.zeros((PAD, D), np.float32)}  # padded rows are refused
    with pytest.raises(
        UserError, match=rf"lm_head.weight: checkpoint \({D}, {PAD}\) vs model \({D}, {V}\)"
    ):
        load_hf_state_dict(fresh, bad)


def test_init_from_and_to_hf_between_padded_and_unpadded(tmp_path, capsys):
    padded, plain = pair()
    # A padded run's checkpoint (only params and meta are read by init_from and to-hf).
    run = tmp_path / "run"
    state = TrainState(jnp.int32(1), nnx.state(padded, nnx.Param), {}, jnp.int32(0))
    ckpt = Checkpointer(run, keep=1, async_save=False)
    ckpt.save(state, {"model": to_dict(padded.cfg)})
    ckpt.close()

    assert plan(padded.cfg, plain.cfg) == [
        f"vocab_pad_multiple {PAD} → 1: the same weights over the {V} ids, no padded rows"
    ]
    assert plan(plain.cfg, padded.cfg) == [
        f"vocab_pad_multiple 1 → {PAD}: the same weights over the {V} ids, {PAD - V} padded "
        "rows of zeros"
    ]
    down = initial_model(plain.cfg, run, seed=0)
    for a, b in zip(*(jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (down, plain)),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    save_hf_folder(plain, tmp_path / "plain_hf")
    up = initial_model(padded.cfg, tmp_path / "plain_hf", seed=0)
    wte = np.asarray(up.wte.embedding[...])
    np.testing.assert_array_equal(wte[:V], np.asarray(plain.wte.embedding[...]))
    assert np.all(wte[V:] == 0)
    assert "vocab_pad_multiple" in capsys.readouterr().err  # the surgery notices

    # to-hf of the padded run: the folder is the unpadded model's; the count is what it holds.
    code, _, err = run_cli(convert.main, ["to-hf", "--checkpoint", run, "--out",
                                          tmp_path / "hf"], capsys)  # fmt: skip
    assert code == 0, err
    assert f"({count_params(plain):,} parameters)" in err
    got = load_file(tmp_path / "hf" / "model.safetensors")
    want = load_file(tmp_path / "plain_hf" / "model.safetensors")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_resume_refuses_a_pad_change_and_reads_older_checkpoints():
    padded, plain = pair()
    with pytest.raises(UserError, match=rf"vocab_pad_multiple: 1 → {PAD}"):
        check_resume_config({"model": to_dict(plain.cfg)}, 10, Config(model=padded.cfg))
    with pytest.raises(UserError, match=rf"vocab_pad_multiple: {PAD} → 1"):
        check_resume_config({"model": to_dict(padded.cfg)}, 10, Config(model=plain.cfg))
    older = {k: v for k, v in to_dict(plain.cfg).items() if k != "vocab_pad_multiple"}
    check_resume_config({"model": older}, 10, Config(model=plain.cfg))  # saved before the key
    with pytest.raises(UserError, match=rf"vocab_pad_multiple: 1 → {PAD}"):
        check_resume_config({"model": older}, 10, Config(model=padded.cfg))


def test_count_params_includes_the_padded_rows():
    for tied in (True, False):
        padded, plain = pair(tied)
        extra = (PAD - V) * D * (1 if tied else 2)  # wte, and the untied head's columns
        assert count_params(padded) - count_params(plain) == extra
        # matmul_only: the head multiplies at the padded width; an untied wte is a lookup.
        diff = count_params(padded, matmul_only=True) - count_params(plain, matmul_only=True)
        assert diff == (PAD - V) * D


def test_decode_refuses_ids_outside_the_vocabulary_in_one_line():
    assert tokenizer.decode([15496, 11]) == "Hello,"
    for bad in (50300, 50257, -1):
        with pytest.raises(UserError) as e:
            tokenizer.decode([15496, bad])
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith(f"token id {bad} is outside the GPT-2 vocabulary [0, 50257)")


def test_cli_bad_pad_multiple_is_one_line(capsys):
    code, out, err = run_cli(train_cli.main, ["--print-config", "model.vocab_pad_multiple=0"],
                             capsys)  # fmt: skip
    assert (code, out) == (2, ""), err
    assert err.startswith("error: model.vocab_pad_multiple must be a positive int, got 0")
    assert err.count("\n") == 1
    code, out, err = run_cli(train_cli.main, ["--print-config", "model.vocab_pad_multiple=128"],
                             capsys)  # fmt: skip
    assert code == 0 and "vocab_pad_multiple: 128" in out, err


def test_training_samples_never_decode_ids_past_the_tokenizer():
    # A vocabulary padded by hand (model.vocab_size=50304): rows past GPT-2's 50257 made huge,
    # so an unmasked sampler would draw them and decode would refuse them.
    from gpt2_jax.config import MeshConfig, TrainConfig
    from gpt2_jax.parallel.sharding import make_mesh
    from gpt2_jax.training.step import Trainer

    cfg = Config(
        model=ModelConfig(vocab_size=50304, n_layer=1, n_head=2, n_embd=16, max_seq_len=64),
        train=TrainConfig(batch_size=1, seq_len=16, seed=0),
    )
    trainer = Trainer(cfg.model, cfg.train, make_mesh(MeshConfig(), jax.devices()[:1]))
    params = trainer.init_state().params
    wte = params["wte"]["embedding"]
    wte.set_value(wte[...].at[tokenizer.VOCAB_SIZE :].set(10.0))
    bias = params["ln_f"]["bias"]  # a mean-free LayerNorm output would hide constant rows
    bias.set_value(bias[...] + 1.0)
    text = train_loop.sample_text(trainer, params, cfg, max_new_tokens=8)
    prompt = train_loop.SAMPLE_PROMPT
    assert text.startswith(prompt) and len(text) > len(prompt)
