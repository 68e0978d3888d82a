"""Mixture-of-Experts around the model: config errors from the training CLI, cached generation,
HF folders (and the torch reference reading them), active-parameter count, weight decay mask.

The numerics of the layer itself (vs the torch reference, the dense path, NumPy) are in
parity_tests/test_moe_parity.py.
"""

import dataclasses
import json
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from gen_helpers import random_model

from gpt2_jax import generate as G
from gpt2_jax import train as T
from gpt2_jax.config import ModelConfig
from gpt2_jax.decode.sampling import Sampling
from gpt2_jax.errors import UserError
from gpt2_jax.formats.hf_format import load_hf_folder, save_hf_folder
from gpt2_jax.model.gpt import GPT, count_params, with_layout
from gpt2_jax.model.moe import MoE
from gpt2_jax.parallel import sharding
from gpt2_jax.training.optim import decay_mask
from gpt2_torch_ref import load_folder
from tests.cli_helpers import run_cli

MOE = ["model.moe_experts=4"]  # gpt2_jax/configs/default.yaml: n_layer 4, unrolled layers

# ------------------------------------------------------------------------- config errors (CLI)

CONFIG_ERRORS = [
    ([*MOE, "model.moe_top_k=0"], "model.moe_top_k=0 must lie in [1, moe_experts=4]"),
    ([*MOE, "model.moe_top_k=5"], "model.moe_top_k=5 must lie in [1, moe_experts=4]"),
    ([*MOE, "model.moe_aux_loss_coef=-0.01"], "model.moe_aux_loss_coef must be >= 0"),
    ([*MOE, "model.moe_z_loss_coef=-1"], "model.moe_z_loss_coef must be >= 0"),
    ([*MOE, "model.moe_capacity_factor=0"], "model.moe_capacity_factor must be positive or null"),
    ([*MOE, "model.moe_capacity_factor=-1.5"], "must be positive or null (dropless), got -1.5"),
    ([*MOE, "model.moe_every=0"], "model.moe_every=0 must lie in [1, n_layer=4]"),
    ([*MOE, "model.moe_every=5"], "model.moe_every=5 must lie in [1, n_layer=4]"),
    ([*MOE, "model.moe_every=2", "model.scan_layers=true"], "set model.scan_layers=false"),
    (["model.moe_experts=-1"], "model.moe_experts must be >= 0 (0 = dense MLP), got -1"),
    ([*MOE, "model.moe_impl=sparse"], "unknown model.moe_impl='sparse'"),
    (["model.moe_impl=sparse"], "unknown model.moe_impl='sparse'"),  # checked without experts
    ([*MOE, "model.moe_capacity_factor=big"], "model.moe_capacity_factor expects"),
]


def _assert_one_line(code, out, err, fragment):
    assert (code, out) == (2, ""), err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize(
    "overrides, fragment", CONFIG_ERRORS, ids=[o[-1] for o, _ in CONFIG_ERRORS]
)
def test_moe_config_errors_are_one_line_exit_2(overrides, fragment, capsys):
    # --print-config: were a bad value accepted, the CLI would print, not train.
    _assert_one_line(*run_cli(T.main, ["--print-config", *overrides], capsys), fragment)


def test_moe_config_errors_in_a_subprocess_have_no_traceback(tmp_path):
    cases = [CONFIG_ERRORS[1], CONFIG_ERRORS[8]]  # started together: each pays JAX's import
    pipe = subprocess.PIPE
    procs = [  # (--print-config and a scratch cwd: a missed error trains nothing, writes nothing)
        subprocess.Popen(
            [sys.executable, "-m", "gpt2_jax.train", "--print-config", *overrides],
            cwd=tmp_path,
            stdout=pipe,
            stderr=pipe,
            text=True,
        )
        for overrides, _ in cases
    ]
    for (overrides, fragment), proc in zip(cases, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        assert "Traceback" not in err, (overrides, err)
        _assert_one_line(proc.returncode, out, err, fragment)


def test_valid_moe_overrides_resolve(capsys):
    argv = ["--print-config", *MOE, "model.moe_top_k=1", "model.moe_every=2",
            "model.moe_capacity_factor=1.25", "model.moe_impl=dense"]  # fmt: skip
    code, out, err = run_cli(T.main, argv, capsys)
    assert code == 0, err
    for line in ("moe_experts: 4", "moe_top_k: 1", "moe_every: 2", "moe_capacity_factor: 1.25"):
        assert line in out


def test_experts_must_divide_the_expert_axis():
    mesh = types.SimpleNamespace(shape={"expert": 2})  # only .shape is read
    sharding.check_experts(4, mesh)
    for n in (3, 0):
        with pytest.raises(UserError, match=f"model.moe_experts={n} is not divisible by mesh"):
            sharding.check_experts(n, mesh)
    sharding.check_experts(0, types.SimpleNamespace(shape={"expert": 1}))


# ------------------------------------------------------------------------ cached generation

GEN_BASE = dict(vocab_size=64, n_layer=2, n_head=4, n_embd=32, max_seq_len=32, moe_experts=4)
GEN_VARIANTS = {
    "learned-every1-top2": ModelConfig(**GEN_BASE),
    "rope-gqa-every2-top1": ModelConfig(
        **GEN_BASE, pos_embedding="rope", n_kv_head=2, moe_every=2, moe_top_k=1
    ),
}
GEN_SEEDS = {"learned-every1-top2": 2, "rope-gqa-every2-top1": 1}
PROMPT = np.array([[3, 9, 27, 17, 51, 25], [1, 2, 3, 4, 5, 6]])


def moe_model(cfg: ModelConfig, seed: int, scale: float = 1.0) -> GPT:
    """`random_model`, with the expert kernels [E, in, out] also scaled by 1/sqrt(in) (the
    helper takes fan-in from 2-D shapes only, which would make MoE outputs ~sqrt(4D) large)."""
    model = random_model(cfg, seed=seed, scale=scale)
    for block in model.blocks():
        if isinstance(block.mlp, MoE):
            for linear in (block.mlp.experts.c_fc, block.mlp.experts.c_proj):
                linear.kernel[...] = linear.kernel[...] / np.sqrt(linear.kernel.shape[1])
    return model


def rel_max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("name", list(GEN_VARIANTS))
def test_cached_greedy_decoding_matches_full_recomputation(name):
    cfg = GEN_VARIANTS[name]
    # Twice the helper's scale: greedy text from these weights takes several tokens before it
    # cycles (at scale 1 it repeats one or two), with logits up to ~15.
    model = moe_model(cfg, seed=GEN_SEEDS[name], scale=2.0)
    n_new = cfg.max_seq_len - PROMPT.shape[1]
    greedy, keys = Sampling(temperature=0.0), G.sample_keys(0, 2)
    steps = list(G.decode_steps(model, PROMPT, max_new_tokens=n_new, sampling=greedy, keys_B=keys))
    tokens = np.stack([np.asarray(t) for t, _ in steps], 1)
    logits = np.stack([np.asarray(lg) for _, lg in steps], 1)
    seq = np.concatenate([PROMPT, tokens], 1)
    # By causality, and dropless routing (a token's experts depend on it alone), position t's
    # logits in one full forward are what recomputation after t + 1 tokens gives.
    full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(seq[:, :-1])))
    full = full[:, PROMPT.shape[1] - 1 :]
    assert rel_max_err(logits, full) <= 1e-5
    np.testing.assert_array_equal(tokens, full.argmax(-1))
    assert len(np.unique(tokens)) >= 5


# ------------------------------------------------------------------------------- HF folders


def test_hf_folder_round_trip_and_torch_reference(tmp_path):
    cfg = ModelConfig(**{**GEN_BASE, "n_layer": 3}, moe_every=2, moe_top_k=1,
                      moe_capacity_factor=1.25, tie_embeddings=False)  # fmt: skip
    model = moe_model(cfg, seed=3)
    save_hf_folder(model, tmp_path)

    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "gpt2_jax"
    assert {k: d[k] for k in ("moe_experts", "moe_top_k", "moe_every", "moe_capacity_factor")} == {
        "moe_experts": 4, "moe_top_k": 1, "moe_every": 2, "moe_capacity_factor": 1.25
    }  # fmt: skip

    loaded = load_hf_folder(tmp_path)
    for field in ("moe_experts", "moe_top_k", "moe_every", "moe_capacity_factor", "n_layer"):
        assert getattr(loaded.cfg, field) == getattr(cfg, field), field
    assert [b.mlp.__class__.__name__ for b in loaded.blocks()] == ["MLP", "MoE", "MLP"]

    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    forward = nnx.jit(lambda m, x: m(x))
    want = np.asarray(forward(model, jnp.asarray(x)))
    np.testing.assert_array_equal(np.asarray(forward(loaded, jnp.asarray(x))), want)

    ref = load_folder(tmp_path)
    assert ref.cfg.moe_experts == 4 and ref.cfg.moe_capacity_factor == 1.25
    with torch.no_grad():
        got = ref(torch.from_numpy(x).long()).numpy()
    assert ref.moe_aux()["dropped"].item() > 0  # the capacity is exercised
    assert rel_max_err(got, want) <= 1e-5


# ----------------------------------------------------------------------- counts, decay mask

COUNT_CFG = ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, max_seq_len=16,
                        moe_experts=4, moe_top_k=1, moe_every=2)  # fmt: skip


def test_matmul_only_count_takes_k_of_e_experts():
    V, D, S, E, k = 64, 16, 16, 4, 1  # 2 layers: dense, MoE
    wte, wpe, ln = V * D, S * D, 2 * D
    attn = (D * 3 * D + 3 * D) + (D * D + D)  # c_attn + c_proj (MHA)
    mlp = (D * 4 * D + 4 * D) + (4 * D * D + D)  # c_fc + c_proj: 2128
    router, experts = D * E, E * mlp
    dense_block, moe_block = 2 * ln + attn + mlp, 2 * ln + attn + router + experts
    total = wte + wpe + dense_block + moe_block + ln
    assert total == 14320
    model = nnx.eval_shape(lambda: GPT(COUNT_CFG, rngs=nnx.Rngs(0)))
    assert count_params(model) == total
    # No lookup table (wpe; wte is the tied head) and 1 of the 4 experts: 8512 → 2128.
    active = total - wpe - experts + experts * k // E
    assert active == 7680
    assert count_params(model, matmul_only=True) == active

    # Every layer MoE, scanned: the stacked layout counts the same.
    cfg = dataclasses.replace(COUNT_CFG, moe_every=1, moe_top_k=2)
    scanned = with_layout(random_model(cfg), scan_layers=True)  # concrete, without an init
    unrolled = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    per_layer = 2 * ln + attn + router + experts * 2 // E
    assert count_params(scanned, matmul_only=True) == wte + 2 * per_layer + ln == 12000
    assert count_params(unrolled, matmul_only=True) == 12000
    assert count_params(scanned) == count_params(unrolled) == wte + wpe + 2 * moe_block + ln


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_decay_mask_decays_router_and_expert_kernels_not_biases(scan):
    cfg = dataclasses.replace(COUNT_CFG, moe_every=1, scan_layers=scan)
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    flat = {
        ".".join(map(str, path)): v.get_value()
        for path, v in nnx.to_flat_state(decay_mask(nnx.state(model, nnx.Param)))
    }
    moe = {k: v for k, v in flat.items() if ".mlp." in k}
    prefixes = ["h.mlp."] if scan else ["h.0.mlp.", "h.1.mlp."]
    want = {
        f"{p}{name}": name.endswith(("router", "kernel"))
        for p in prefixes
        for name in ("router", "experts.c_fc.kernel", "experts.c_fc.bias",
                     "experts.c_proj.kernel", "experts.c_proj.bias")
    }  # fmt: skip
    assert moe == want
