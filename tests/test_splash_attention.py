"""`attention_impl=splash`, jax's Pallas splash kernel for TPU, without a TPU: its numerics and
gradients in Pallas's interpreter on CPU (one device, and under data × fsdp × tensor meshes of 8
forced CPU devices in a child process), the `auto` rule, the refusals, and the splash kernels
in a train gradient lowered for TPU.

Run as a script (`python tests/test_splash_attention.py`) it is that child: it prints one JSON
line per mesh with the shard_map specs and the largest differences from `xla_attention`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from gpt2_jax.config import MeshConfig, ModelConfig
from gpt2_jax.errors import UserError
from gpt2_jax.model import attention
from gpt2_jax.model.attention import Target, dot_product_attention, resolve_impl, xla_attention
from gpt2_jax.ops import splash_attention as splash
from gpt2_jax.parallel import sharding
from tests.hlo_helpers import CUDNN_CALL, lowered_loss_grad, splash_kernels

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # max abs difference from xla_attention in fp32 (measured up to about 5e-6)


def _inputs(B: int, T: int, N: int, K: int, H: int = 64) -> tuple[jax.Array, ...]:
    """q [B,T,N,H], k and v [B,T,K,H] and an output cotangent, fp32 standard normal."""
    kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
    return (
        jax.random.normal(kq, (B, T, N, H)),
        jax.random.normal(kk, (B, T, K, H)),
        jax.random.normal(kv, (B, T, K, H)),
        jax.random.normal(kc, (B, T, N, H)),
    )


def _vjp(fn):
    """jit of (q, k, v, ct) → (fn(q, k, v), its (dq, dk, dv) for output cotangent ct)."""

    def both(q, k, v, ct):
        y, vjp = jax.vjp(fn, q, k, v)
        return y, vjp(ct)

    return jax.jit(both)


def _max_diffs(got, want) -> list[float]:
    """Max abs difference of each array of `got` (output, dq, dk, dv) from `want`'s."""
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    return [float(jnp.abs(a - b).max()) for a, b in pairs]


@pytest.mark.parametrize(
    "B, T, N, K, window",
    [(2, 256, 2, 2, None), (1, 384, 2, 2, 100), (1, 256, 4, 2, 200), (1, 256, 4, 1, None)],
    ids=["causal", "window", "gqa-window", "mqa"],
)
def test_interpreted_kernel_matches_xla_outputs_and_grads(monkeypatch, B, T, N, K, window):
    # 128-wide blocks, so the online softmax crosses blocks and the window (100 keys at
    # T 384) hides whole key blocks, which the kernel skips.
    monkeypatch.setattr(splash, "BLOCKS", (128,))
    args = _inputs(B, T, N, K)
    got = _vjp(lambda q, k, v: splash.splash_attention(q, k, v, window=window, interpret=True))
    want = _vjp(lambda q, k, v: xla_attention(q, k, v, window=window))
    diffs = _max_diffs(got(*args), want(*args))
    assert max(diffs) <= TOL, diffs


def test_blocks_and_supported_shapes():
    assert splash.block_size(1024) == 512 and splash.block_size(768) == 256
    assert splash.block_size(384) == 128 and splash.block_size(100) is None
    assert splash.supported(128) and splash.supported(1024) and splash.supported(8192)
    assert not splash.supported(64) and not splash.supported(1000) and not splash.supported(0)


def test_auto_picks_splash_on_tpu_where_it_applies():
    tpu = Target("tpu")
    for dtype in (jnp.bfloat16, jnp.float32):
        for window in (None, 256):
            got = resolve_impl("auto", dtype, seq_len=1024, window=window, head_dim=64, target=tpu)
            assert got == "splash"  # a GPT-2 layer, full or windowed
    assert resolve_impl("auto", jnp.bfloat16, seq_len=1000, head_dim=64, target=tpu) == "xla"
    assert resolve_impl("auto", jnp.bfloat16, seq_len=4000, window=256, target=tpu) == "blocked"
    assert resolve_impl("auto", jnp.bfloat16, target=tpu) == "xla"  # no length: not checkable
    shape = {"seq_len": 1024, "window": None, "head_dim": 64}
    for target in (Target("cpu"), Target("rocm"), Target("cuda", (9, 0)), Target("cuda", (7, 5))):
        assert resolve_impl("auto", jnp.bfloat16, **shape, target=target) != "splash"


@pytest.mark.parametrize(
    "target", [Target("cpu"), Target("cuda", (9, 0)), Target("rocm")], ids=["cpu", "cuda", "rocm"]
)
def test_explicit_splash_refused_off_tpu_in_one_line(target):
    q, k, v, _ = _inputs(1, 128, 2, 2)
    with pytest.raises(UserError) as err:
        dot_product_attention(q, k, v, window=None, impl="splash", target=target)
    msg = str(err.value)
    assert "\n" not in msg and f"got {target.platform}" in msg and "use attention_impl=" in msg
    assert ("9.0" in msg) == (target.compute_capability == (9, 0))


def test_explicit_splash_refuses_a_length_the_kernel_cannot_tile():
    q, k, v, _ = _inputs(1, 100, 2, 2)
    with pytest.raises(UserError, match=r"multiple of 128, got 100; use attention_impl=auto"):
        dot_product_attention(q, k, v, window=None, impl="splash", target=Target("tpu"))


def _lowered_train_grad(window: int | None) -> str:
    """StableHLO of a tiny bf16 GQA GPT's loss gradient (T 128), lowered for TPU."""
    cfg = ModelConfig(
        vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=128,
        dtype="bfloat16", attention_impl="auto", attention_window=window,
    )  # fmt: skip
    return lowered_loss_grad(cfg, "tpu")


@pytest.mark.parametrize("window", [None, 32], ids=["causal", "window"])
def test_train_grad_lowers_to_the_splash_kernels_for_tpu(monkeypatch, window):
    # `auto` decides for the step's device; this host is a CPU, so the model is told it is
    # being traced for a TPU, as it is under a compile-only TPU mesh (benchmarks scale).
    monkeypatch.setattr(attention, "device_target", lambda device=None: Target("tpu"))
    hlo = _lowered_train_grad(window)
    assert splash_kernels(hlo) == ["splash_mha_dkv_no_residuals", "splash_mha_dq_no_residuals",
                       "splash_mha_fwd_residuals"]  # fmt: skip
    assert CUDNN_CALL not in hlo


MESHES = {  # name: (mesh, N, K); 8 devices each
    "data2-fsdp4": (MeshConfig(data=2, fsdp=4, tensor=1), 4, 2),
    "data2-fsdp2-tensor2": (MeshConfig(data=2, fsdp=2, tensor=2), 4, 2),
    "tensor2-mqa": (MeshConfig(data=2, fsdp=2, tensor=2), 4, 1),  # K = 1: heads kept whole
}


def _mesh_child(name: str) -> dict:
    """Splash (interpreted) under mesh `name` against xla_attention, both in one jit."""
    mesh_cfg, N, K = MESHES[name]
    mesh = sharding.make_mesh(mesh_cfg)
    rules = sharding.rules_for(K, mesh)
    args = _inputs(8, 128, N, K)
    q_spec, kv_spec = splash._specs(args[0], args[1], mesh, rules)

    def under_mesh(fn):
        def run(q, k, v):
            with sharding.activation_sharding(mesh, rules):
                return fn(q, k, v)

        return run

    fn = under_mesh(lambda q, k, v: splash.splash_attention(q, k, v, window=48, interpret=True))
    lowered = _vjp(fn).lower(*args)
    want = _vjp(lambda q, k, v: xla_attention(q, k, v, window=48))(*args)
    return {
        "name": name,
        "q": [sharding.mesh_axes(e) for e in q_spec],
        "kv": [sharding.mesh_axes(e) for e in kv_spec],
        "manual": "sdy.manual_computation" in lowered.as_text(),  # the shard_map
        "diffs": _max_diffs(lowered.compile()(*args), want),
    }


def test_under_data_fsdp_tensor_meshes_splash_runs_per_shard_and_matches_xla():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    cmd = [sys.executable, str(Path(__file__).resolve())]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["name"]: r for r in map(json.loads, out.stdout.splitlines())}
    batch = ["data", "fsdp"]
    assert rows["data2-fsdp4"]["q"] == [batch, [], [], []]
    assert rows["data2-fsdp2-tensor2"]["q"] == [batch, [], ["tensor"], []]
    assert rows["data2-fsdp2-tensor2"]["kv"] == rows["data2-fsdp2-tensor2"]["q"]
    assert rows["tensor2-mqa"]["q"] == rows["tensor2-mqa"]["kv"] == rows["data2-fsdp4"]["q"]
    for r in rows.values():
        assert r["manual"] and max(r["diffs"]) <= TOL, r


if __name__ == "__main__":
    for mesh_name in MESHES:
        print(json.dumps(_mesh_child(mesh_name)), flush=True)
