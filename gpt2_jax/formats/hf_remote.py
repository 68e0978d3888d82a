"""Modeling code shipped in `model_type: gpt2_jax` folders, for `trust_remote_code=True`.

Hugging Face's way to load an architecture transformers lacks is Python files next to
config.json, named by its `auto_map`. A `gpt2_jax` folder gets:

- `configuration_gpt2_jax.py` and `modeling_gpt2_jax.py`, a transformers config and a causal-LM
  wrapper (`remote_code/`, data files this library never imports);
- gpt2_torch_ref's modules as `ref_<name>.py`, read from the installed package's source with
  `from gpt2_torch_ref.<name> import` rewritten to `from .ref_<name> import`: transformers
  copies a remote module's relatively imported siblings into its module cache, so the network
  is the torch reference itself, not a third copy of the model.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from gpt2_jax.errors import UserError

REMOTE_DIR = Path(__file__).with_name("remote_code")
ARCHITECTURE = "Gpt2JaxForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_gpt2_jax.Gpt2JaxConfig",
    "AutoModelForCausalLM": f"modeling_gpt2_jax.{ARCHITECTURE}",
}
_REF_IMPORT = re.compile(r"^(\s*)from gpt2_torch_ref\.(\w+) import ", re.MULTILINE)
_ANY_REF_IMPORT = re.compile(r"^\s*(from|import)\s+gpt2_torch_ref\b", re.MULTILINE)


def _reference_sources() -> Path:
    """gpt2_torch_ref's folder, found without importing it (importing it loads torch)."""
    spec = importlib.util.find_spec("gpt2_torch_ref")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "gpt2_torch_ref (installed with gpt2_jax) is missing; a model_type gpt2_jax export "
            "ships its modules as the folder's modeling code"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def remote_code_files() -> dict[str, str]:
    """File name → text of the modeling code a `gpt2_jax` folder carries."""
    files = {p.name: p.read_text() for p in sorted(REMOTE_DIR.glob("*.py"))}
    for p in sorted(_reference_sources().glob("*.py")):
        if p.name == "__init__.py":
            continue
        text = _REF_IMPORT.sub(r"\1from .ref_\2 import ", p.read_text())
        if _ANY_REF_IMPORT.search(text):  # an import form the rewrite does not cover
            raise RuntimeError(f"{p} imports gpt2_torch_ref in a way remote code cannot")
        files[f"ref_{p.name}"] = text
    return files


def write_remote_code(path: str | Path) -> list[str]:
    """Write `remote_code_files()` into the folder `path`; returns the names written."""
    files = remote_code_files()
    for name, text in files.items():
        (Path(path) / name).write_text(text)
    return sorted(files)
