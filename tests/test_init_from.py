"""`train.init_from`: start from a Hugging Face GPT-2 or a gpt2_jax run, with weight surgery."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2_jax.config import ConfigError
from gpt2_jax.data import TokenDataset, get_batch
from gpt2_jax.errors import UserError
from gpt2_jax.formats.loading import load_model
from gpt2_jax.formats.weights import to_hf_state_dict
from gpt2_jax.train import train
from gpt2_jax.training.init_from import initial_model, load_config, plan, source_config
from tests.train_helpers import train_losses

REPO = Path(__file__).resolve().parents[1]
HEADS, D, HD = 4, 32, 8
STEPS = 20


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory) -> Path:
    """A random transformers GPT-2 (4 heads of 8, no dropout) saved with save_pretrained."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=HEADS, n_embd=D, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # non-trivial biases and LayerNorms, so every tensor is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(out)
    return out


def _finetune_args(out: Path, init: Path, prepared: Path, *extra: str) -> list[str]:
    return [f"train.init_from={init}", f"train.out_dir={out}", f"data.prepared_dir={prepared}",
            "train.batch_size=4", "train.seq_len=32", "train.lr=2e-3", "train.warmup_steps=2",
            "train.eval_every=0", "train.sample_every=0", "train.log_every=1",
            "checkpoint.every=10", *extra]  # fmt: skip


def _cfg(*args: str):
    return load_config(REPO / "gpt2_jax" / "configs" / "finetune-shakespeare.yaml", list(args))


def test_finetune_from_hf_starts_at_transformers_loss_and_learns(
    tmp_path, hf_gpt2, prepared_shakespeare
):
    out = tmp_path / "ft"
    cfg = _cfg(*_finetune_args(out, hf_gpt2, prepared_shakespeare, f"train.max_steps={STEPS}",
                               "model.dropout=0"))  # fmt: skip
    assert (cfg.model.n_embd, cfg.model.n_head, cfg.model.max_seq_len) == (D, HEADS, 64)
    train(cfg)
    x, y = get_batch(TokenDataset(prepared_shakespeare / "train.bin"), seed=cfg.train.seed,
                     step=0, batch_size=4, seq_len=32)  # fmt: skip
    hf = GPT2LMHeadModel.from_pretrained(hf_gpt2).eval()
    with torch.no_grad():
        logits = hf(torch.from_numpy(x).long()).logits
        want = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), torch.from_numpy(y).long().flatten()
        )
    losses = train_losses(out)
    assert abs(losses[1] - float(want)) <= 1e-5  # step 1's loss is the untouched weights'
    assert np.mean([losses[s] for s in range(STEPS - 2, STEPS + 1)]) < losses[1] - 0.3


def test_gqa_mean_pool_is_the_papers_rule(hf_gpt2):
    source = load_model(hf_gpt2)
    for n_kv in (2, 1):
        target = dataclasses.replace(source.cfg, n_kv_head=n_kv)
        got = to_hf_state_dict(initial_model(target, hf_gpt2, seed=0))
        want = to_hf_state_dict(source)
        group = HEADS // n_kv
        for i in range(2):
            for kind in ("weight", "bias"):
                w = want[f"transformer.h.{i}.attn.c_attn.{kind}"]
                g = got[f"transformer.h.{i}.attn.c_attn.{kind}"]
                np.testing.assert_array_equal(g[..., :D], w[..., :D])  # queries untouched
                for part in (0, 1):  # k, then v
                    for j in range(n_kv):  # new head j: mean of old heads j·g … j·g+g−1
                        old = [w[..., D + part * D + h * HD : D + part * D + (h + 1) * HD]
                               for h in range(j * group, (j + 1) * group)]  # fmt: skip
                        new = g[..., D + part * n_kv * HD + j * HD :][..., :HD]
                        np.testing.assert_allclose(new, np.mean(old, axis=0), rtol=0, atol=1e-7)
            for name in ("transformer.wte.weight", f"transformer.h.{i}.mlp.c_fc.weight"):
                np.testing.assert_array_equal(got[name], want[name])


def test_surgery_notices_and_refusals(hf_gpt2, capsys):
    source = source_config(hf_gpt2)
    change = functools.partial(dataclasses.replace, source)
    assert plan(source, change(attention_window=16)) == ["attention_window None → 16: the same "
                                                         "weights"]  # fmt: skip
    longer = initial_model(change(max_seq_len=96), hf_gpt2, seed=0).wpe.embedding[...]
    base = load_model(hf_gpt2).wpe.embedding[...]
    np.testing.assert_array_equal(np.asarray(longer[:64]), np.asarray(base))
    assert 0.01 < float(np.std(np.asarray(longer[64:]))) < 0.03  # as at init: normal(0.02)
    roped = initial_model(change(pos_embedding="rope"), hf_gpt2, seed=0)
    assert not hasattr(roped, "wpe")
    err = capsys.readouterr().err
    assert "position rows 64..95 start from random init" in err
    assert "warning: train.init_from" in err and "the position table is dropped" in err
    for key, value in (("n_embd", 64), ("n_layer", 3), ("vocab_size", 50304),
                       ("max_seq_len", 32), ("bias", False)):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"cannot map model\.{key}: "):
            plan(source, change(**{key: value}))
    with pytest.raises(ConfigError, match=r"cannot map model\.n_kv_head: 2 → 4"):
        plan(change(n_kv_head=2), source)  # more K/V heads than the source has


def test_init_from_a_gpt2_jax_run_and_resume(tmp_path, hf_gpt2, prepared_shakespeare, capsys):
    first = tmp_path / "first"
    train(_cfg(*_finetune_args(first, hf_gpt2, prepared_shakespeare, "train.max_steps=3")))
    second = tmp_path / "second"
    args = _finetune_args(second, first, prepared_shakespeare, "train.max_steps=4")
    start = initial_model(_cfg(*args).model, first, seed=0)
    for a, b in zip(*(jax.tree.leaves(nnx.state(m, nnx.Param))
                      for m in (start, load_model(first))), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    train(_cfg(*args))
    capsys.readouterr()
    train(_cfg(*_finetune_args(second, first, prepared_shakespeare, "train.max_steps=6")))
    err = capsys.readouterr().err
    assert "resuming from" in err and "its weights are not read on resume" in err
    assert sorted(train_losses(second)) == list(range(1, 7))


@pytest.mark.parametrize("arch", ["starcoder2", "gpt_bigcode"])
def test_init_from_reads_the_other_architectures(tmp_path, arch):
    """A random transformers Starcoder2 (RoPE + GQA) or GPTBigCode (MQA) folder starts a run
    with its exact weights, and takes surgery like GPT-2 does."""
    from transformers import (
        GPTBigCodeConfig,
        GPTBigCodeForCausalLM,
        Starcoder2Config,
        Starcoder2ForCausalLM,
    )

    torch.manual_seed(0)
    if arch == "starcoder2":
        hf = Starcoder2ForCausalLM(
            Starcoder2Config(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=32,
            )
        )
    else:
        hf = GPTBigCodeForCausalLM(
            GPTBigCodeConfig(
                vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, multi_query=True
            )
        )
    hf.save_pretrained(tmp_path / arch)  # fmt: skip
    source = source_config(tmp_path / arch)
    assert (source.n_kv_head, source.pos_embedding) == (
        (2, "rope") if arch == "starcoder2" else (1, "learned")
    )
    want = to_hf_state_dict(load_model(tmp_path / arch))
    got = to_hf_state_dict(initial_model(source, tmp_path / arch, seed=1))
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    windowed = dataclasses.replace(source, attention_window=8)
    assert plan(source, windowed) == ["attention_window None → 8: the same weights"]


@pytest.mark.parametrize(
    "init, extra, message",
    [
        ("missing", [], "train.init_from='{p}' does not exist"),
        ("empty", [], "holds no checkpoint"),
        ("hf", ["model.n_embd=64"], "cannot map model.n_embd: 32 → 64"),
    ],
)
def test_bad_init_from_is_one_line(tmp_path, hf_gpt2, prepared_shakespeare, init, extra, message):
    path = {"missing": tmp_path / "nope", "empty": tmp_path, "hf": hf_gpt2}[init]
    args = _finetune_args(tmp_path / "out", path, prepared_shakespeare, *extra)
    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.train", "--config",
                           "finetune-shakespeare", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and message.format(p=path) in errors[0], errors
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError):
        train(_cfg(*args))
