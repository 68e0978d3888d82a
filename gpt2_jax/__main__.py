"""`gpt2-jax COMMAND ...` (or `python -m gpt2_jax COMMAND ...`): one entry point for the CLIs.

Each command is the module `python -m gpt2_jax.COMMAND` runs, with the same flags.
"""

from __future__ import annotations

import importlib
import sys

from gpt2_jax import compile_cache, host_malloc

COMMANDS = {
    "train": "train a GPT-2 variant from a config (python -m gpt2_jax.train)",
    "evaluate": "perplexity of a checkpoint on a data source (python -m gpt2_jax.evaluate)",
    "generate": "sample text from a checkpoint (python -m gpt2_jax.generate)",
    "convert": "Hugging Face import / export (python -m gpt2_jax.convert)",
    "data": "prepare training data (python -m gpt2_jax.data)",
}
MODULES = {"data": "gpt2_jax.data.__main__"}


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {what}" for name, what in COMMANDS.items())
    return (
        "usage: gpt2-jax COMMAND [flags]   (gpt2-jax COMMAND --help for its flags)\n\n"
        f"commands:\n{rows}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; use one of {', '.join(COMMANDS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    module = importlib.import_module(MODULES.get(argv[0], f"gpt2_jax.{argv[0]}"))
    return module.main(argv[1:]) or 0


def console() -> None:
    """The `gpt2-jax` console script."""
    host_malloc.tune()  # before jax starts its threads
    compile_cache.enable()
    raise SystemExit(main())


if __name__ == "__main__":
    console()
