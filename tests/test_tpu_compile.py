"""The train step compiled for a TPU slice from this CPU host (`benchmarks scale --target`), with
XLA's TPU compiler: libtpu, the version jax pins for its `[tpu]` extra, is installed into a
folder of this test session (a few seconds from PyPI) and put on the children's path only, so
that no other test process loads it. Compiled, not run: nothing needs a TPU.
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


@pytest.fixture(scope="module")
def libtpu(tmp_path_factory) -> Path:
    pin = next(
        r.split(";")[0].strip()
        for r in metadata.requires("jax") or []
        if r.startswith("libtpu") and 'extra == "tpu"' in r
    )
    target = tmp_path_factory.mktemp("libtpu")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), pin]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return target


def _scale(libtpu: Path, tmp_path: Path, *argv: str) -> dict:
    path = os.pathsep.join([str(libtpu), str(REPO)])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "benchmarks", "scale", "--layouts", "scanned", "--loss-impls",
           "chunked", "--batch-size", "4", "--seq-len", "64", "--target", "tpu:v5e:2x2",
           "--json", "--out", str(tmp_path / "scale.json"), *argv]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return record


def test_tiny_step_compiles_for_a_v5e_slice_on_a_data_fsdp_mesh(libtpu, tmp_path):
    r = _scale(libtpu, tmp_path, "--configs", "tiny", "--mesh", "data=2,fsdp=2")
    assert r["device"] == "TPU v5 lite" and r["hbm_bytes"] == 16 * 2**30 and r["fits"] is True
    assert r["mesh"] == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 1}
    assert r["attention_impl"] == "xla"  # auto on a TPU at T 64: not cuDNN, splash or the CPU paths
    assert 0 < r["peak_bytes"] < 2**30 and r["compile_s"] > 0
    assert r["flops_analytic"] > 0


def test_step_with_splash_attention_compiles_on_a_data_fsdp_mesh(libtpu, tmp_path):
    # T 128, a multiple of the kernel's 128-wide blocks: auto takes the Pallas splash kernel,
    # inside a shard_map over data x fsdp, and XLA's TPU compiler builds it (head dim 16).
    r = _scale(libtpu, tmp_path, "--configs", "tiny", "--mesh", "data=2,fsdp=2", "--seq-len", "128")
    assert r["device"] == "TPU v5 lite" and r["fits"] is True
    assert r["attention_impl"] == "splash" and r["target"] == "tpu:v5e:2x2"
    assert 0 < r["peak_bytes"] < 2**30 and r["compile_s"] > 0


def test_moe_step_compiles_with_an_expert_axis(libtpu, tmp_path):
    config = tmp_path / "tiny-moe.yaml"
    config.write_text("base: tiny\nmodel:\n  moe_experts: 4\n  moe_top_k: 2\n")
    r = _scale(libtpu, tmp_path, "--configs", str(config), "--mesh", "data=2,expert=2")
    assert r["device"] == "TPU v5 lite" and r["fits"] is True
    assert r["moe_impl"] == "ragged"  # auto resolves for the TPU (this CPU host: "grouped")
    assert r["target"] == "tpu:v5e:2x2"
