"""The library API of `import gpt2_jax` (docs/library.md), and that page's example run as written
(≈15 s: two training steps of a tiny model on the built-in plays)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

import gpt2_jax

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "library.md"


def _example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.M | re.S)
    assert len(blocks) == 1, "docs/library.md should hold one python example"
    return blocks[0]


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its mkdtemp() lands here
    ns: dict = {}
    exec(compile(_example(), str(PAGE), "exec"), ns)
    assert Path(ns["out"]).parent == tmp_path
    assert ns["summary"]["steps"] == 2 and (Path(ns["out"]) / "checkpoints" / "2").is_dir()
    assert ns["model"].cfg.n_embd == 32  # the trained run's weights, not a default model
    assert ns["ids"].shape == (1, 16) and ns["ids"].dtype == np.int32
    result = ns["result"]
    assert result["tokens"] == len(ns["tokens"]) - 1
    assert result["perplexity"] == pytest.approx(np.exp(result["nll"]))
    # two steps from random init: near-uniform over the 50257 ids, far from a trained model's
    assert 1e4 < result["perplexity"] < 2e5
    assert f"perplexity {result['perplexity']:.0f}" in capsys.readouterr().out


def test_public_names():
    from gpt2_jax.data.tokenizer import decode, encode
    from gpt2_jax.decode.generation import generate
    from gpt2_jax.evaluate import evaluate
    from gpt2_jax.formats.loading import load_model
    from gpt2_jax.train import train
    from gpt2_jax.training.init_from import load_config

    assert set(gpt2_jax.__all__) <= set(dir(gpt2_jax))
    assert (gpt2_jax.train_model, gpt2_jax.score_tokens, gpt2_jax.generate_tokens) == (
        train,
        evaluate,
        generate,
    )
    assert (gpt2_jax.load_model, gpt2_jax.load_config) == (load_model, load_config)
    assert (gpt2_jax.tokenize, gpt2_jax.detokenize) == (encode, decode)
    # The CLI modules and sub-packages keep their names (tests and tools import them so).
    from gpt2_jax import decode as decode_pkg
    from gpt2_jax import evaluate as evaluate_cli
    from gpt2_jax import generate as generate_cli
    from gpt2_jax import train as train_cli

    for m in (decode_pkg, evaluate_cli, generate_cli, train_cli):
        assert isinstance(m, types.ModuleType)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = gpt2_jax.no_such_name


def test_version(monkeypatch):
    assert gpt2_jax.__version__ == importlib.metadata.version("gpt2-jax")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    # A source checkout that was never installed: the package still imports.
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    spec = importlib.util.spec_from_file_location("_gpt2_jax_uninstalled", gpt2_jax.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.__version__ == "0+unknown"


def test_cli_module_not_imported_by_the_package():
    """runpy warns (and runs the module twice) when importing the package imported it."""
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2_jax.evaluate", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "found in sys.modules" not in proc.stderr
