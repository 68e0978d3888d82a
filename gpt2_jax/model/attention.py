"""Causal (optionally sliding-window) grouped-query attention: the one dispatch point.

Shapes: q is [B, T, N, H]; k and v are [B, S, K, H] with N a multiple of K. K/V heads are
shared by N/K query heads through a group axis in every path, never repeated in memory.
Window w: query i sees keys j with i - w < j <= i (w keys including itself); scale 1/sqrt(H).

Implementations (`model.attention_impl`):
- `xla`: `jax.nn.dot_product_attention`, masking the full T×T scores (the reference).
- `chunked`: `gpt2_jax.ops.chunked_attention`, exact softmax per query chunk over only the keys
  it can see, probabilities saved for a recompute-free custom VJP; O(T·min(T, w)) memory.
- `blocked`: `gpt2_jax.ops.blocked_attention`, tiled with an online softmax and a custom VJP
  that recomputes; O(T·w) time and memory with a window, O(T) memory without one.
- `cudnn`: cuDNN flash attention via `jax.nn.dot_product_attention(implementation="cudnn")`
  with `local_window_size`; CUDA with compute capability >= 8.0 (Ampere or newer) and bf16/fp16
  only, refused elsewhere (ROCm and TPU have no lowering for it; older NVIDIA cards no kernel).
- `splash`: `gpt2_jax.ops.splash_attention`, jax's Pallas splash (flash) kernel for TPU, with
  T a multiple of 128; refused on other platforms (tests run its kernel in interpret mode).
- `auto`: `cudnn` where it can run, with head dim a multiple of 8 up to 128; `splash` on a
  TPU where it applies (`splash_attention.supported`: T a multiple of 128). On CPU,
  `chunked` when each query sees at most AUTO_CHUNKED_MAX_SPAN keys (min(T, w)), else
  `blocked`. Measured on a 2-core CPU (BENCHMARKS.md), fwd+bwd: `chunked` is 3-4x
  faster than `xla` at T = 256 to 1024 and within 1.4x of torch SDPA; with w = 256 it is
  1.4-1.8x faster than `blocked` at T = 8192 and linear in T. Past the span limit its saved
  probabilities (B·N·span fp32 per query) outgrow what a training step should hold, so the
  recomputing `blocked` path takes over. Elsewhere (not measured; a TPU too where T is no
  multiple of 128) `blocked` only when T >= AUTO_BLOCKED_MIN_T and either there is a window
  with w <= T / AUTO_WINDOW_RATIO (the masked T×T work is mostly wasted) or T >= AUTO_LONG_T
  (the T×T scores stop fitting comfortably in memory); `xla` otherwise.

An explicit boolean `mask_BTS` (KV-cache decoding, queries and keys at different positions)
always runs on the `xla` path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gpt2_jax.config import ATTENTION_IMPLS as IMPLS
from gpt2_jax.errors import UserError
from gpt2_jax.ops.blocked_attention import DEFAULT_BLOCK, blocked_attention
from gpt2_jax.ops.chunked_attention import chunked_attention
from gpt2_jax.ops.splash_attention import splash_attention
from gpt2_jax.ops.splash_attention import supported as splash_supported
from gpt2_jax.parallel import sharding

AUTO_CHUNKED_MAX_SPAN = 1024
AUTO_BLOCKED_MIN_T = 512
AUTO_WINDOW_RATIO = 4
AUTO_LONG_T = 8192
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MIN_CC = (8, 0)  # cuDNN's fused flash attention: Ampere or newer


class Target(NamedTuple):
    """The device facts the attention choice depends on.

    `platform` is "cpu", "cuda", "rocm", "tpu", ...; `compute_capability` is CUDA's
    (major, minor), e.g. (9, 0), and None elsewhere.
    """

    platform: str
    compute_capability: tuple[int, int] | None = None


def device_target(device: jax.Device | None = None) -> Target:
    """The Target of `device` (default: `sharding.step_device()`, the device a step is traced
    for, so `auto` resolves for a compile-only accelerator as it would on one).

    CUDA and ROCm devices both report platform "gpu"; the client's platform version names which.
    """
    device = sharding.step_device() if device is None else device
    platform = device.platform
    major, _, minor = str(getattr(device, "compute_capability", "")).partition(".")
    cc = (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None
    if platform == "gpu":
        version = str(getattr(device.client, "platform_version", "")).lower()
        # A compile-only CUDA device's version names no platform ("PJRT C API\nNVIDIA
        # H100 ..."); its compute capability is CUDA's "9.0", where ROCm's is "gfx942".
        default = "cuda" if cc is not None else platform
        platform = next((p for p in ("rocm", "cuda") if p in version), default)
    return Target(platform, cc) if platform == "cuda" else Target(platform)


def _describe(target: Target) -> str:
    cc = target.compute_capability
    return target.platform + ("" if cc is None else f" (compute capability {cc[0]}.{cc[1]})")


def cudnn_supported(target: Target, dtype: jnp.dtype) -> bool:
    """Whether cuDNN flash attention runs on `target` with `dtype` inputs."""
    cc = target.compute_capability
    return (
        target.platform == "cuda"
        and cc is not None
        and tuple(cc) >= CUDNN_MIN_CC
        and jnp.dtype(dtype) in _CUDNN_DTYPES
    )


def resolve_impl(
    impl: str,
    dtype: jnp.dtype,
    *,
    seq_len: int | None = None,
    window: int | None = None,
    head_dim: int | None = None,
    target: Target | None = None,
) -> str:
    """The implementation `auto` picks for this target, dtype and shape (see module doc).

    `target` defaults to `device_target()`; pass one to ask what another device would get.
    """
    if impl not in IMPLS:
        raise UserError(f"unknown attention impl {impl!r}; use one of {IMPLS}")
    if impl != "auto":
        return impl
    target = device_target() if target is None else Target(*target)
    head_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)
    if cudnn_supported(target, dtype) and head_ok:
        return "cudnn"
    if target.platform == "tpu" and seq_len is not None and splash_supported(seq_len):
        return "splash"
    if target.platform == "cpu":
        span = seq_len if window is None or seq_len is None else min(seq_len, window)
        return "chunked" if span is None or span <= AUTO_CHUNKED_MAX_SPAN else "blocked"
    if seq_len is None or seq_len < AUTO_BLOCKED_MIN_T:
        return "xla"
    if window is not None and window * AUTO_WINDOW_RATIO <= seq_len:
        return "blocked"
    return "blocked" if seq_len >= AUTO_LONG_T else "xla"


def xla_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    window: int | None,
    mask_BTS: jax.Array | None = None,
) -> jax.Array:
    """Reference path: `jax.nn.dot_product_attention`, materialising the T×S scores.

    Without `mask_BTS` queries and keys are the same positions (causal, T == S). With it, the
    boolean mask says which keys each query may see and `window` is ignored.
    """
    if mask_BTS is not None:
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], implementation="xla"
        )
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, is_causal=True, local_window_size=local, implementation="xla"
    )


def require_cudnn(dtype: jnp.dtype, target: Target | None = None) -> None:
    """Raise a UserError unless cuDNN attention runs on `target` (default: this device).

    It needs CUDA with compute capability >= 8.0 and bfloat16/float16 inputs.
    """
    target = device_target() if target is None else Target(*target)
    if not cudnn_supported(target, dtype):
        raise UserError(
            f"attention_impl=cudnn needs a CUDA GPU with compute capability >= 8.0 and "
            f"bfloat16/float16 inputs, got {_describe(target)} and {jnp.dtype(dtype).name}; "
            f"use attention_impl=blocked or xla"
        )


def require_splash(target: Target | None = None) -> None:
    """Raise a UserError unless `target` (default: this device) is a TPU, where the splash
    kernel compiles (elsewhere only Pallas's interpreter runs it: tests call it directly)."""
    target = device_target() if target is None else Target(*target)
    if target.platform != "tpu":
        raise UserError(
            f"attention_impl=splash needs a TPU (a Pallas TPU kernel), got {_describe(target)}; "
            f"use attention_impl=auto"
        )


def cudnn_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    *,
    window: int | None,
    target: Target | None = None,
) -> jax.Array:
    """cuDNN flash attention; refuses (UserError) where `require_cudnn` does."""
    require_cudnn(q_BTNH.dtype, target)
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, is_causal=True, local_window_size=local, implementation="cudnn"
    )


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    window: int | None,
    impl: str = "auto",
    mask_BTS: jax.Array | None = None,
    block: int = DEFAULT_BLOCK,
    target: Target | None = None,
) -> jax.Array:
    """Causal attention over the same positions for q and k (or an explicit mask).

    `block` is the tile size of the `blocked` path and is ignored by the others. `target` is
    the device `auto`, `cudnn` and `splash` decide for (default: `device_target()`).
    """
    B, T, N, H = q_BTNH.shape
    if window is not None and window <= 0:
        raise UserError(f"attention window must be a positive int or None, got {window}")
    target = device_target() if target is None else Target(*target)
    impl = resolve_impl(impl, q_BTNH.dtype, seq_len=T, window=window, head_dim=H, target=target)
    if mask_BTS is not None or impl == "xla":
        return xla_attention(q_BTNH, k_BSKH, v_BSKH, window=window, mask_BTS=mask_BTS)
    if impl == "cudnn":
        return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, window=window, target=target)
    if impl == "splash":
        require_splash(target)
        return splash_attention(q_BTNH, k_BSKH, v_BSKH, window=window)
    if impl == "chunked":
        return chunked_attention(q_BTNH, k_BSKH, v_BSKH, window=window)
    return blocked_attention(q_BTNH, k_BSKH, v_BSKH, window=window, block=block)
