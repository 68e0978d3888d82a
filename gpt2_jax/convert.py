"""Convert between Hugging Face folders and gpt2_jax checkpoints.

    python -m gpt2_jax.convert from-hf --hf-dir DIR --out DIR
    python -m gpt2_jax.convert to-hf --checkpoint DIR --out DIR [--dtype bfloat16]

Both write config.json + model.safetensors (fp32; to-hf `--dtype bfloat16` halves it) +
generation_config.json, in the first format that computes the model exactly
(`gpt2_jax.formats.hf_format`), plus GPT-2's tokenizer files when the vocabulary is GPT-2's:

- standard (learned positions, MHA, no window, biases): GPT-2, for GPT2LMHeadModel;
- every RoPE variant (any n_kv_head, any window, with or without biases): Starcoder2;
- learned positions with MQA (no window, biases): GPTBigCode with multi_query;
- the rest (learned positions with GQA, a window or no biases; every MoE model): gpt2_jax's
  extended GPT-2, model_type `gpt2_jax`, with its modeling code in the folder
  (`gpt2_jax.formats.hf_remote`).

`transformers.AutoModelForCausalLM.from_pretrained(out)` loads the first three, and with
`trust_remote_code=True` the fourth; `AutoTokenizer` / `pipeline("text-generation", model=out)`
work offline. One stderr line says
which format was written and why. That folder is also the converted checkpoint format
`evaluate`, `generate` and `train.init_from` accept; from-hf reads the four formats (and older
gpt2_jax exports), and `gpt2_torch_ref.load_folder` reads them in torch.

A non-empty `--out` is replaced only with `--overwrite`, and never when it is, contains or lies
inside the input, or holds a training run, an orbax checkpoint or prepared data.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from gpt2_jax.errors import ArgParser, UserError, cli_main, notice
from gpt2_jax.formats.hf_format import (
    DTYPES,
    FORMATS,
    export_format,
    is_hf_folder,
    load_hf_folder,
    read_hf_config,
    save_hf_folder,
)
from gpt2_jax.formats.hf_tokenizer import tokenizer_problem
from gpt2_jax.formats.loading import load_model
from gpt2_jax.formats.weights import to_hf_state_dict
from gpt2_jax.model.gpt import GPT

# What a training run, an orbax checkpoint or prepared data keeps in a directory: --overwrite
# deletes --out, so a directory holding any of these is refused even with it.
RUN_FILES = {
    "checkpoints": "a training run (checkpoints/)",
    "metrics.jsonl": "a training run (metrics.jsonl)",
    "config.yaml": "a training run (config.yaml)",
    "train.bin": "prepared training data (train.bin)",
    "val.bin": "prepared training data (val.bin)",
}
ORBAX_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "commit_success.txt")


def _is_checkpoint(d: Path) -> bool:
    """An orbax checkpoint step directory or one of its items."""
    return any((d / name).exists() for name in ORBAX_FILES)


def _protected(d: Path) -> str | None:
    """What the directory `d` holds that must never be deleted, or None."""
    held = [what for name, what in RUN_FILES.items() if (d / name).exists()]
    if held:
        return held[0]
    if _is_checkpoint(d):
        return "an orbax checkpoint"
    if any(p.name.isdigit() and _is_checkpoint(p) for p in d.iterdir()):
        return "orbax checkpoints"
    return None


def _check_apart(src: Path, out: Path, flag: str) -> None:
    """Refuse an --out that is, contains or lies inside the input (symlinks resolved) or lies
    inside a checkpoint: replacing it would delete what is being read."""
    source, target = src.resolve(), out.resolve()
    if target == source:
        raise UserError(f"--out {out} is the input folder; pick another directory")
    if target in source.parents:
        raise UserError(
            f"--out {out} contains {flag} {src}, which writing --out would delete; pick a "
            "directory outside it"
        )
    if source in target.parents:
        raise UserError(f"--out {out} lies inside {flag} {src}; pick a directory outside it")
    inside = next((p for p in target.parents if _is_checkpoint(p)), None)
    if inside is not None:
        raise UserError(f"--out {out} lies inside the checkpoint {inside}; pick another directory")


def _check_out(src: Path, out: Path, overwrite: bool, flag: str) -> None:
    _check_apart(src, out, flag)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    held = _protected(out.resolve()) if out.is_dir() else None
    if held is not None:
        raise UserError(
            f"--out {out} holds {held}, which --overwrite never replaces (it replaces only a "
            "previous export); pick a new directory"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace it")


def _as_written(arr: np.ndarray, dtype: str) -> np.ndarray:
    """`arr` in fp32 after the rounding to `dtype` that writing it does."""
    arr = np.asarray(arr, np.float32)
    return arr if dtype == "float32" else arr.astype(ml_dtypes.bfloat16).astype(np.float32)


def write_folder(model: GPT, out: str | Path, dtype: str = "float32") -> Path:
    """Save `model` as an HF-format folder at `out` with weights in `dtype`, via a temporary
    sibling and a rename, after checking the written folder reloads to identical weights (after
    that dtype's rounding). An existing `out` is replaced unless it holds a training run or
    checkpoint (a UserError)."""
    out = Path(out).resolve()  # a symlinked --out: replace the folder it points to
    held = _protected(out) if out.is_dir() else None
    if held is not None:
        raise UserError(f"{out} holds {held}; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_hf_folder(model, tmp, dtype)
        want, got = to_hf_state_dict(model), to_hf_state_dict(load_hf_folder(tmp))
        for name, arr in want.items():
            if not np.array_equal(_as_written(arr, dtype), np.asarray(got[name], np.float32)):
                raise RuntimeError(f"{name} did not survive the write to {tmp}")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _describe_extras(model: GPT) -> str:
    cfg = model.cfg
    parts = []
    if cfg.pos_embedding != "learned":
        parts.append(f"{cfg.pos_embedding} positions")
    if cfg.n_kv_head != cfg.n_head:
        kv = "1 kv head" if cfg.n_kv_head == 1 else f"{cfg.n_kv_head} kv heads"
        parts.append(f"{kv} for {cfg.n_head} query heads")
    if cfg.attention_window is not None:
        parts.append(f"attention window {cfg.attention_window}")
    if not cfg.bias:
        parts.append("no biases")
    return ", ".join(parts)


def describe_format(model: GPT, out: str | Path) -> str:
    """One line: which format `save_hf_folder` wrote for `model`, why, and who reads it."""
    fmt = export_format(model.cfg)
    name, out = FORMATS[fmt], str(out)
    if fmt == "gpt2":
        return (
            f"format: {name}; transformers.GPT2LMHeadModel.from_pretrained({out!r}) (or "
            "AutoModelForCausalLM) loads it"
        )
    why = f"this model has {_describe_extras(model)}, which transformers' GPT2LMHeadModel cannot "
    if fmt == "gpt2_jax":
        if model.cfg.moe_experts:
            why = "this model has Mixture-of-Experts layers, which no transformers architecture "
        else:
            why += "represent and no other transformers architecture "
        return (
            f"format: {name} (model_type gpt2_jax): {why}computes exactly; the folder carries "
            f"its modeling code: transformers.AutoModelForCausalLM.from_pretrained({out!r}, "
            "trust_remote_code=True) loads it, as do gpt2_jax and gpt2_torch_ref.load_folder"
        )
    cls = "Starcoder2ForCausalLM" if fmt == "starcoder2" else "GPTBigCodeForCausalLM"
    return (
        f"format: {name}, as {why}represent; transformers.AutoModelForCausalLM.from_pretrained("
        f"{out!r}) loads it as {cls}"
    )


def from_hf(hf_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> GPT:
    """Validate a transformers `save_pretrained` folder (GPT-2, Starcoder2, GPTBigCode or ours)
    and write it as a checkpoint; returns the model written."""
    src, out = Path(hf_dir), Path(out)
    if not src.exists():
        raise UserError(f"--hf-dir {str(src)!r} does not exist")
    if not is_hf_folder(src):
        raise UserError(
            f"{src} is not a GPT-2 folder: it needs config.json and model.safetensors (or "
            "pytorch_model.bin), as transformers' save_pretrained writes"
        )
    _check_out(src, out, overwrite, "--hf-dir")
    model = load_hf_folder(src)
    write_folder(model, out)
    return model


def to_hf(
    checkpoint: str | Path, out: str | Path, *, overwrite: bool = False, dtype: str = "float32"
) -> GPT:
    """Write any checkpoint `evaluate` accepts as an HF folder with weights in `dtype`; returns
    the model written."""
    src, out = Path(checkpoint), Path(out)
    if src.exists():
        _check_out(src, out, overwrite, "--checkpoint")
    model = load_model(src)
    write_folder(model, out, dtype)
    return model


def build_parser() -> argparse.ArgumentParser:
    ap = ArgParser(
        prog="python -m gpt2_jax.convert",
        description="Convert between Hugging Face folders (GPT-2, Starcoder2, GPTBigCode) and "
        "gpt2_jax checkpoints.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser(
        "from-hf",
        help="a transformers save_pretrained folder (GPT-2, Starcoder2, GPTBigCode) → a "
        "gpt2_jax checkpoint",
    )
    f.add_argument(
        "--hf-dir",
        required=True,
        help="folder with config.json and model.safetensors or pytorch_model.bin",
    )
    t = sub.add_parser(
        "to-hf", help="a gpt2_jax checkpoint → an HF folder transformers loads, where it can"
    )
    t.add_argument(
        "--checkpoint",
        required=True,
        help="a training run's out_dir (newest checkpoint), a checkpoint directory, or a "
        "converted folder",
    )
    t.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="the weights' dtype in model.safetensors (config.json's torch_dtype); default float32",
    )
    for p in (f, t):
        p.add_argument(
            "--out",
            required=True,
            help="output directory (empty or new), apart from the input; never a training run, "
            "checkpoint or prepared data",
        )
        p.add_argument(
            "--overwrite", action="store_true", help="replace a non-empty --out (a previous export)"
        )
    return ap


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "from-hf":
        model = from_hf(args.hf_dir, args.out, overwrite=args.overwrite)
        source = FORMATS[read_hf_config(args.hf_dir).get("model_type", "gpt2")]
        what = f"from the {source} folder {args.hf_dir}"
    else:
        model = to_hf(args.checkpoint, args.out, overwrite=args.overwrite, dtype=args.dtype)
        what = f"from {args.checkpoint}"
    tokenizer = (Path(args.out) / "vocab.json").is_file()
    n_params = sum(a.size for a in to_hf_state_dict(model).values())  # as written: pads trimmed
    dtype = getattr(args, "dtype", "float32")
    in_dtype = f" in {dtype}" if dtype != "float32" else ""
    print(
        f"wrote {args.out} ({n_params:,} parameters{in_dtype}{', GPT-2 tokenizer' * tokenizer}) "
        f"{what}",
        file=sys.stderr,
    )
    print(describe_format(model, args.out), file=sys.stderr)
    problem = tokenizer_problem(model.cfg.vocab_size)
    if problem is not None:
        notice(f"{problem}; {args.out} has no tokenizer files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
