"""Wall time of whole CLI commands, with and without the persistent compilation cache.

`python -m benchmarks startup [--layers 4] [--repeats 3] [--new-tokens 50] [--json]`

A random GPT-2 (vocab 50257, `--layers` × 256, 4 heads, RoPE) is saved as an HF folder in a
temporary directory, and `python -m gpt2_jax.generate` (`--new-tokens` tokens) and
`python -m gpt2_jax.evaluate` (a 20 kB text, windows of 128) are each run `--repeats` times:
with `GPT2_JAX_COMPILATION_CACHE=off` (every run compiles) and with a fresh cache folder (the
first run compiles and fills it, the rest load from it). Times are whole processes, python
start-up and imports included. Everything written goes to the temporary directory.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import child_env
from gpt2_jax.errors import ArgParser, UserError, cli_main

TEXT = "ROMEO: But soft, what light through yonder window breaks? " * 350  # ≈ 20 kB


def _parser() -> ArgParser:
    p = ArgParser(prog="python -m benchmarks startup", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="layers of the random model")
    p.add_argument("--repeats", type=int, default=3, help="runs of each command per setting")
    p.add_argument("--new-tokens", type=int, default=50, help="tokens generate samples")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _commands(work: Path, new_tokens: int) -> dict[str, list[str]]:
    ck = str(work / "model")
    return {
        "generate": ["-m", "gpt2_jax.generate", "--checkpoint", ck, "--prompt", "ROMEO:",
                     "--max-new-tokens", str(new_tokens), "--seed", "0"],
        "evaluate": ["-m", "gpt2_jax.evaluate", "--checkpoint", ck, "--data",
                     str(work / "text.txt"), "--seq-len", "128"],
    }  # fmt: skip


def _timed(argv: list[str], cache: str) -> float:
    env = child_env()
    env["GPT2_JAX_COMPILATION_CACHE"] = cache
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise UserError(f"{' '.join(argv[:2])} failed: {proc.stderr.strip().splitlines()[-1]}")
    return seconds


def measure(layers: int, repeats: int, new_tokens: int) -> list[dict]:
    """One record per (command, cache setting): every run's wall seconds."""
    from flax import nnx

    from gpt2_jax.config import ModelConfig
    from gpt2_jax.formats.hf_format import save_hf_folder
    from gpt2_jax.model.gpt import GPT

    records = []
    with tempfile.TemporaryDirectory(prefix="gpt2_jax_startup_") as tmp:
        work = Path(tmp)
        cfg = ModelConfig(n_layer=layers, n_embd=256, n_head=4, pos_embedding="rope")
        save_hf_folder(GPT(cfg, rngs=nnx.Rngs(0)), work / "model")
        (work / "text.txt").write_text(TEXT)
        for name, argv in _commands(work, new_tokens).items():
            for setting, cache in (("off", "off"), ("on", str(work / "cache" / name))):
                runs = [_timed(argv, cache) for _ in range(repeats)]
                records.append({"command": name, "cache": setting, "seconds": runs})
    return records


@cli_main
def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if min(a.layers, a.repeats, a.new_tokens) <= 0:
        raise UserError("--layers, --repeats and --new-tokens must be positive")
    records = measure(a.layers, a.repeats, a.new_tokens)
    if a.json:
        print(json.dumps({"layers": a.layers, "new_tokens": a.new_tokens, "runs": records}))
        return 0
    print(f"{'command':<9} {'cache':<5} {'first s':>8} {'repeat s (median)':>18}")
    for r in records:
        first, rest = r["seconds"][0], r["seconds"][1:] or r["seconds"]
        print(f"{r['command']:<9} {r['cache']:<5} {first:>8.2f} {statistics.median(rest):>18.2f}")
    return 0
