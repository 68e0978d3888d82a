"""Byte size and a fast content hash of each prepared token file, kept in meta.json.

`meta["file_checks"]` maps each file name to `{"bytes": size, "blake2b_fast": hex}`: BLAKE2b
(16-byte digest) of the size as 8 little-endian bytes followed by the whole file when it is at
most 64 MiB, else by 64 blocks of 64 KiB at evenly spaced offsets (the first at 0, the last
ending at the end of the file). So any change of size, and any change at all to a file of up to
64 MiB, is caught; in a larger file a same-size change that touches none of the sampled blocks
is not. The cost is one read of at most 64 MiB, or 4 MiB, per file.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path

import numpy as np

from gpt2_jax.config import DataConfig
from gpt2_jax.errors import UserError

CHECKS = "file_checks"
HASH = "blake2b_fast"
WHOLE_MAX = 64 << 20  # hashed whole up to this size
BLOCK = 64 << 10
N_BLOCKS = 64


def file_record(path: str | Path) -> dict:
    """`{"bytes": size, "blake2b_fast": hex}` of the file at `path`."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return {"bytes": size, HASH: _digest(f, size)}


def fast_hash(path: str | Path) -> str:
    """The `blake2b_fast` hex digest of `path` (see the module docstring for what it covers)."""
    return file_record(path)[HASH]


def expected_files(meta: dict) -> dict[str, dict]:
    """File name → the record `meta` holds for it. A meta from before `file_checks` gives only
    the size its token counts imply."""
    if CHECKS in meta:
        return meta[CHECKS]
    itemsize = np.dtype(meta["dtype"]).itemsize
    return {
        name: {"bytes": meta["tokens"][split] * itemsize}
        for split, name in meta["files"].items()
        if name is not None
    }


def mismatch(path: Path, want: dict) -> str | None:
    """How the file at `path` differs from its record `want` (size first, then hash), or None."""
    if not path.is_file():
        return f"missing, expected {want['bytes']:,} bytes"
    size = path.stat().st_size
    if size != want["bytes"]:
        return f"{size:,} bytes, expected {want['bytes']:,}"
    if HASH in want and (got := fast_hash(path)) != want[HASH]:
        return f"same size but content hash {got[:12]}, expected {want[HASH][:12]}"
    return None


def verify_prepared(out_dir: str | Path, meta: dict, names: list[str] | None = None) -> None:
    """Raise a one-line `UserError` when a token file of `out_dir` (only `names`, when given)
    differs from what `meta` records: size, then the fast hash."""
    out = Path(out_dir)
    for name, want in expected_files(meta).items():
        if names is not None and name not in names:
            continue
        why = mismatch(out / name, want)
        if why:
            raise UserError(
                f"{out / name} does not match {out / 'meta.json'} ({why}): it was truncated or "
                f"changed after prepare; re-run `{prepare_command(meta, out)}`, or delete {out} "
                "so training prepares it again"
            )


def prepare_command(meta: dict, out_dir: Path) -> str:
    """The `prepare` command line that rewrites `out_dir` with the settings `meta` records."""
    cmd = f"python -m gpt2_jax.data prepare --source {shlex.quote(meta['source'])}"
    cmd += f" --out {shlex.quote(str(out_dir))}"
    default = DataConfig()
    for key in ("val_fraction", "text_field", "decode_errors"):
        if meta.get(key) != getattr(default, key):
            cmd += f" --{key.replace('_', '-')} {shlex.quote(str(meta.get(key)))}"
    return cmd + (" --streaming" if meta.get("streaming") else "")


def _digest(f, size: int) -> str:
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    if size <= WHOLE_MAX:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    else:
        last = size - BLOCK
        for i in range(N_BLOCKS):
            f.seek(i * last // (N_BLOCKS - 1))
            h.update(f.read(BLOCK))
    return h.hexdigest()
