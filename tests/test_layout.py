"""The package's shape: only CLIs and leaves at the top of gpt2_jax/, and importing every module
of the library loads neither torch, transformers, the benchmarks nor the torch reference (the
import-linter contracts in pyproject.toml check the layering itself: `lint-imports`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = {"__init__", "__main__", "config", "errors", "host_malloc", "compile_cache", "train",
       "evaluate", "generate", "convert"}  # fmt: skip
PACKAGES = {"data", "decode", "formats", "model", "ops", "parallel", "training"}

PROBE = """
import importlib, pkgutil, sys
import gpt2_jax
for m in pkgutil.walk_packages(gpt2_jax.__path__, "gpt2_jax."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
print(" ".join(sorted({n.split(".")[0] for n in sys.modules}
                      & {"torch", "transformers", "benchmarks", "gpt2_torch_ref"})))
"""


def test_top_of_the_package_holds_only_clis_leaves_and_subpackages():
    pkg = ROOT / "gpt2_jax"
    modules = {p.stem for p in pkg.glob("*.py")}
    folders = {p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    assert modules == TOP and folders == PACKAGES


def test_importing_the_whole_library_loads_no_torch_transformers_or_benchmarks():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""
