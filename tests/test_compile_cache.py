"""The CLIs' persistent compilation cache: where it goes, how it is turned off, and that a
command fills it (so the same command later loads instead of compiling)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flax import nnx

from gpt2_jax import compile_cache
from gpt2_jax.config import ModelConfig
from gpt2_jax.formats.hf_format import save_hf_folder
from gpt2_jax.model.gpt import GPT

REPO = Path(__file__).resolve().parents[1]


def test_folder_follows_the_environment(monkeypatch, tmp_path):
    for name in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.folder() == tmp_path / ".cache" / "gpt2_jax" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.folder() == tmp_path / "xdg" / "gpt2_jax" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jaxdir"))
    assert compile_cache.folder() == tmp_path / "jaxdir"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.folder() == tmp_path / "mine"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.folder() is None and compile_cache.enable() is None


def test_generate_fills_the_cache(tmp_path):
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, max_seq_len=32)
    save_hf_folder(GPT(cfg, rngs=nnx.Rngs(0)), tmp_path / "ck")
    argv = [sys.executable, "-m", "gpt2_jax.generate", "--checkpoint", tmp_path / "ck",
            "--prompt-tokens", "1,2", "--max-new-tokens", "3", "--json"]  # fmt: skip
    env = dict(os.environ, **{compile_cache.ENV: str(tmp_path / "cache")})
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "cache").rglob("*"))) >= 2  # prefill and decode steps


def test_startup_benchmark_refuses_bad_flags(capsys):
    from benchmarks import startup

    try:
        code = startup.main(["--repeats", "0"])
    except SystemExit as e:
        code = e.code
    assert code == 2 and "must be positive" in capsys.readouterr().err
