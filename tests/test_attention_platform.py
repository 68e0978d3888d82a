"""Which attention path `auto` and `cudnn` take per platform: cuDNN only on CUDA with compute
capability >= 8.0, checked in the StableHLO lowered for CUDA and ROCm without a device."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest

from gpt2_jax.config import ModelConfig
from gpt2_jax.errors import UserError
from gpt2_jax.model import attention
from gpt2_jax.model.attention import Target, require_cudnn, resolve_impl
from tests.hlo_helpers import CUDNN_CALL, lowered_loss_grad

SHAPE = {"seq_len": 1024, "window": None, "head_dim": 64}  # a GPT-2 layer


def test_auto_picks_cudnn_only_on_cuda_ampere_or_newer():
    bf16, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
    rocm = resolve_impl("auto", bf16, **SHAPE, target=Target("rocm"))
    assert rocm == "xla" and resolve_impl("auto", bf16, **SHAPE, target=Target("tpu")) == "splash"
    for cc in ((8, 0), (8, 6), (9, 0), (10, 0)):
        for dtype in (bf16, f16):
            assert resolve_impl("auto", dtype, **SHAPE, target=Target("cuda", cc)) == "cudnn"
        assert resolve_impl("auto", f32, **SHAPE, target=Target("cuda", cc)) == rocm
    for old in (Target("cuda", (7, 5)), Target("cuda", (7, 0)), Target("cuda")):  # T4, V100
        assert resolve_impl("auto", bf16, **SHAPE, target=old) == rocm
    assert resolve_impl("auto", bf16, **SHAPE, target=Target("cpu")) == "chunked"  # unchanged


def _device(platform: str, version: str, cc: str | None = None):
    client = types.SimpleNamespace(platform_version=version)
    fields = {} if cc is None else {"compute_capability": cc}
    return types.SimpleNamespace(platform=platform, client=client, **fields)


H100 = _device("gpu", "cuda 12080", "9.0")
V100 = _device("gpu", "cuda 12080", "7.0")
MI300 = _device("gpu", "rocm 60342")


def test_device_target_reads_platform_and_compute_capability():
    assert attention.device_target(H100) == Target("cuda", (9, 0))
    assert attention.device_target(V100) == Target("cuda", (7, 0))
    assert attention.device_target(_device("cuda", "PJRT C API\ncuda 12.8", "12.0")) == (
        Target("cuda", (12, 0))
    )
    assert attention.device_target(MI300) == Target("rocm")
    # A compile-only H100 (benchmarks scale --target gpu:h100x8) names no platform in its
    # version; its compute capability is CUDA's.
    aot = _device("gpu", "PJRT C API\nNVIDIA H100 80GB HBM3", "9.0")
    assert attention.device_target(aot) == Target("cuda", (9, 0))
    assert attention.device_target(_device("gpu", "PJRT C API", "gfx942")) == Target("gpu")
    assert attention.device_target() == Target("cpu")  # this host


@pytest.mark.parametrize(
    "target",
    [Target("rocm"), Target("cuda", (7, 5)), Target("cuda"), Target("cpu"), Target("tpu")],
    ids=["rocm", "cuda-7.5", "cuda-unknown", "cpu", "tpu"],
)
def test_explicit_cudnn_refused_in_one_line_naming_platform_and_fix(target):
    with pytest.raises(UserError) as err:
        require_cudnn(jnp.bfloat16, target)
    msg = str(err.value)
    assert "\n" not in msg and target.platform in msg and "use attention_impl=" in msg
    assert ("7.5" in msg) == (target.compute_capability == (7, 5))
    with pytest.raises(UserError, match="float32"):
        require_cudnn(jnp.float32, Target("cuda", (9, 0)))
    require_cudnn(jnp.bfloat16, Target("cuda", (8, 0)))  # Ampere: allowed


@pytest.fixture
def on_device(monkeypatch):
    """Make this host look like `device` (as a real GPU host reports it) to the model code, and
    let cuDNN attention trace here: JAX checks the installed cuDNN version while tracing."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 90800)

    def use(device):
        monkeypatch.setattr(jax, "devices", lambda *a, **k: [device])
        monkeypatch.setattr(jax, "default_backend", lambda: device.platform)

    return use


def _lowered_train_grad(platform: str, impl: str = "auto") -> str:
    """StableHLO of a tiny bf16 GPT's loss gradient, lowered for `platform`."""
    cfg = ModelConfig(
        vocab_size=64, n_layer=1, n_head=2, n_embd=32, max_seq_len=16, dtype="bfloat16",
        attention_impl=impl,
    )  # fmt: skip
    return lowered_loss_grad(cfg, platform)


def test_train_step_lowers_with_cudnn_on_h100_and_without_on_rocm_and_v100(on_device):
    on_device(H100)
    hlo = _lowered_train_grad("cuda")
    assert f"{CUDNN_CALL}Softmax(" in hlo and f"{CUDNN_CALL}SoftmaxBackward(" in hlo
    on_device(MI300)
    assert CUDNN_CALL not in _lowered_train_grad("rocm")  # and it lowers at all
    on_device(V100)
    assert CUDNN_CALL not in _lowered_train_grad("cuda")


def test_explicit_cudnn_on_rocm_is_a_one_line_error(on_device):
    on_device(MI300)
    with pytest.raises(UserError, match=r"got rocm and bfloat16; use attention_impl="):
        _lowered_train_grad("rocm", impl="cudnn")
