"""What the train step, an MoE step, prefill and decode get on CUDA and TPU, read from the
StableHLO lowered for each platform on this CPU host (no device, no accelerator compiler):
the kernels `auto` picks for the platform, and matmuls that keep bf16 operands in a bf16 step.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gpt2_jax.config import MeshConfig, load_config, resolve_config_path
from gpt2_jax.decode import kv_cache
from gpt2_jax.model.gpt import GPT
from gpt2_jax.parallel import sharding
from gpt2_jax.training.step import Trainer
from tests.hlo_helpers import CUDNN_CALL, float_types, matmuls, splash_kernels

H100 = types.SimpleNamespace(
    platform="gpu", client=types.SimpleNamespace(platform_version="cuda 13000"),
    compute_capability="9.0",
)  # fmt: skip
TPU = types.SimpleNamespace(platform="tpu", client=types.SimpleNamespace(platform_version="tpu"))
DEVICES = {"cuda": H100, "tpu": TPU}


@pytest.fixture
def on(monkeypatch):
    """Trace as if the step's device were `platform`'s (what `auto` reads); cuDNN attention
    checks the installed cuDNN while tracing, so report a recent one."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)

    def use(platform: str) -> str:
        monkeypatch.setattr(sharding, "step_device", lambda: DEVICES[platform])
        return platform

    return use


def _config(*overrides: str):
    base = ["model.dtype=bfloat16", "model.dropout=0.0", "train.batch_size=2",
            "train.seq_len=128", *overrides]  # fmt: skip
    return load_config(resolve_config_path("tiny"), base)


def _lowered_step(platform: str, *overrides: str) -> str:
    cfg = _config(*overrides)
    trainer = Trainer(cfg.model, cfg.train, sharding.make_mesh(MeshConfig(), jax.devices()[:1]))
    state = jax.eval_shape(trainer.init_state)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len), jnp.int32)
    traced = trainer.step.trace(state, batch, batch)
    return traced.lower(lowering_platforms=(platform,)).as_text()


def _fp32_matmuls(hlo: str) -> list:
    return [(op, x) for op, x in matmuls(hlo) if "f32" in float_types(x)]


STEPS = [
    ("cuda", ["model.scan_layers=true", "train.loss_impl=chunked", "train.remat=block"]),
    ("cuda", ["model.scan_layers=false", "train.loss_impl=full", "train.remat=none"]),
    ("tpu", ["model.scan_layers=true", "train.loss_impl=full", "train.remat=dots"]),
    ("tpu", ["model.scan_layers=false", "train.loss_impl=chunked", "train.remat=block"]),
]


@pytest.mark.parametrize(("platform", "overrides"), STEPS, ids=lambda v: str(v)[:40])
def test_train_step_kernels_and_bf16_matmuls(on, platform, overrides):
    hlo = _lowered_step(on(platform), *overrides)
    splash = sorted(set(splash_kernels(hlo)))
    if platform == "cuda":  # fused flash attention, forward and backward
        assert f"{CUDNN_CALL}Softmax(" in hlo and f"{CUDNN_CALL}SoftmaxBackward(" in hlo
        assert splash == []
    else:  # the Pallas splash kernels: forward, dq and dk/dv
        assert CUDNN_CALL not in hlo
        assert splash == ["splash_mha_dkv_no_residuals", "splash_mha_dq_no_residuals",
                          "splash_mha_fwd_residuals"]  # fmt: skip
    found = matmuls(hlo)
    assert len(found) >= 8, found  # the model's matmuls are there to check
    assert _fp32_matmuls(hlo) == []


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_moe_step_takes_the_platforms_expert_path(on, platform):
    hlo = _lowered_step(on(platform), "model.moe_experts=4", "model.moe_top_k=2")
    ragged = [op for op, _ in matmuls(hlo) if op == "chlo.ragged_dot"]
    # TPU: ragged_dot, a grouped-matmul kernel there. CUDA: XLA:GPU makes ragged_dot a dense
    # dot over every expert, so auto takes the grouped loops (no ragged_dot at all).
    assert (len(ragged) > 0) == (platform == "tpu")
    # The expert matmuls (an F = 4·64 wide operand), forward and backward, take bf16; the
    # fp32 ones are the router's logits and the fp32 sum over the k choices, by design.
    F = 4 * 64
    experts = [x for _, x in matmuls(hlo) if F in sum((s for s, _ in x), ())]
    assert len(experts) >= 6 and all(float_types(x) == {"bf16"} for x in experts), experts


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_prefill_and_decode_lower_with_the_platforms_attention(on, platform):
    on(platform)
    cfg = _config().model
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    size = 128

    def prefill(state, tokens_BP):
        return kv_cache.prefill(nnx.merge(graphdef, state), tokens_BP, size)

    def decode(state, cache, tok_B1, pos_B1):
        return kv_cache.forward_cached(nnx.merge(graphdef, state), cache, tok_B1, pos_B1)

    tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    lowered = jax.jit(prefill).trace(state, tokens).lower(lowering_platforms=(platform,))
    hlo = lowered.as_text()
    assert (f"{CUDNN_CALL}Softmax(" in hlo) == (platform == "cuda")
    assert (splash_kernels(hlo) != []) == (platform == "tpu")
    assert _fp32_matmuls(hlo) == []
    cache = jax.eval_shape(prefill, state, tokens)[1]
    one = jax.ShapeDtypeStruct((2, 1), jnp.int32)
    hlo = jax.jit(decode).trace(state, cache, one, one).lower(lowering_platforms=(platform,))
    hlo = hlo.as_text()
    assert CUDNN_CALL not in hlo  # one query over a masked cache: the xla path on every platform
    assert _fp32_matmuls(hlo) == []
