"""The train step compiled for a TPU slice and for 8 H100s from this CPU host (`benchmarks scale
--target`), by XLA's TPU and GPU compilers. Each compiler is installed into a folder of this
test session and put on the children's path only, so that no other test process loads it:
libtpu, the version jax pins for its `[tpu]` extra (213 MB); the CUDA plugin jax pins for
`[cuda13-local]` with the cuDNN its metadata asks for (0.4 + 0.9 GB installed; cuDNN is
loaded to trace and compile cuDNN attention). Compiled, not run: nothing needs a TPU or a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pip_target(folder: Path, *requirements: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder),
           *requirements]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]


def _jax_pin(extra: str, name: str) -> str:
    """The requirement on `name` jax's own `extra` makes (so it matches this jax)."""
    return next(
        r.split(";")[0].strip().replace(f"{name}[with-cuda]", name)
        for r in metadata.requires("jax") or []
        if r.startswith(name) and f'extra == "{extra}"' in r
    )


@pytest.fixture(scope="module")
def libtpu(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("libtpu")
    _pip_target(target, _jax_pin("tpu", "libtpu"))
    return target


@pytest.fixture(scope="module")
def cuda_plugin(tmp_path_factory) -> tuple[Path, Path]:
    """(the CUDA plugin's folder, cuDNN's folder): apart, so a test can leave cuDNN out."""
    plugin_dir, cudnn_dir = tmp_path_factory.mktemp("cuda"), tmp_path_factory.mktemp("cudnn")
    plugin = _jax_pin("cuda13-local", "jax-cuda13-plugin")
    _pip_target(plugin_dir, plugin, plugin.replace("plugin", "pjrt"))
    (dist,) = metadata.distributions(path=[str(plugin_dir)], name="jax-cuda13-plugin")
    cudnn = next(r.split(";")[0] for r in dist.requires if r.startswith("nvidia-cudnn"))
    _pip_target(cudnn_dir, cudnn)
    return plugin_dir, cudnn_dir


def _run_scale(compilers, tmp_path: Path, target: str, *argv: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([*map(str, compilers), str(REPO)])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "benchmarks", "scale", "--layouts", "scanned", "--loss-impls",
           "chunked", "--batch-size", "4", "--seq-len", "64", "--target", target,
           "--json", "--out", str(tmp_path / "scale.json"), *argv]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _scale(compilers, tmp_path: Path, target: str, *argv: str) -> dict:
    out = _run_scale(compilers, tmp_path, target, *argv)
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return record


def test_tiny_step_compiles_for_a_v5e_slice_with_splash_attention(libtpu, tmp_path):
    # T 128, a multiple of the kernel's 128-wide blocks: auto takes the Pallas splash kernel,
    # inside a shard_map over data x fsdp, and XLA's TPU compiler builds it (head dim 16).
    r = _scale([libtpu], tmp_path, "tpu:v5e:2x2", "--configs", "tiny", "--mesh", "data=2,fsdp=2",
               "--seq-len", "128")  # fmt: skip
    assert r["device"] == "TPU v5 lite" and r["hbm_bytes"] == 16 * 2**30 and r["fits"] is True
    assert r["mesh"] == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 1}
    assert r["attention_impl"] == "splash" and "tpu_custom_call" in r["custom_calls"]
    assert 0 < r["peak_bytes"] < 2**30 and r["compile_s"] > 0
    assert r["flops_analytic"] > 0


def test_moe_step_compiles_with_an_expert_axis(libtpu, tmp_path):
    config = tmp_path / "tiny-moe.yaml"
    config.write_text("base: tiny\nmodel:\n  moe_experts: 4\n  moe_top_k: 2\n")
    r = _scale([libtpu], tmp_path, "tpu:v5e:2x2", "--configs", str(config), "--mesh",
               "data=2,expert=2")  # fmt: skip
    assert r["device"] == "TPU v5 lite" and r["fits"] is True
    assert r["moe_impl"] == "ragged"  # auto resolves for the TPU (this CPU host: "grouped")
    assert r["target"] == "tpu:v5e:2x2"


def test_tiny_step_compiles_for_8_h100s_with_cudnn_attention(cuda_plugin, tmp_path):
    r = _scale(cuda_plugin, tmp_path, "gpu:h100x8", "--configs", "tiny", "--mesh",
               "data=2,fsdp=4", "--dtype", "bfloat16", "--batch-size", "8")  # fmt: skip
    assert r["device"] == "NVIDIA H100 80GB HBM3" and r["hbm_bytes"] == 80 * 2**30
    assert r["usable_bytes"] == 60 * 2**30 and r["fits"] is True
    assert r["mesh"] == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    # auto resolved for the H100, and the compiled program calls cuDNN's fused attention,
    # forward and backward
    assert r["attention_impl"] == "cudnn"
    assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= set(r["custom_calls"])
    assert 0 < r["peak_bytes"] < 2**30 and r["flops_compiler"] is None  # XLA:GPU counts none


def test_an_h100_compile_without_cudnn_is_a_one_line_error(cuda_plugin, tmp_path):
    plugin_dir, _ = cuda_plugin  # bf16: auto takes cuDNN attention, which loads cuDNN
    out = _run_scale([plugin_dir], tmp_path, "gpu:h100x8", "--configs", "tiny", "--dtype",
                     "bfloat16", "--batch-size", "8")  # fmt: skip
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(errors) == 1 and "pip install 'gpt2-jax[compile]'" in errors[0]
    assert not (tmp_path / "scale.json").exists()
