"""The train/val split: a pure function of each document's text, so streams can apply it too."""

from __future__ import annotations

import hashlib

RULE = (
    "a document is val iff int(sha256(utf-8 text)[:8], big-endian) / 2**64 < val_fraction, "
    "unless `moved` (sha256 hex -> split) says otherwise"
)


def doc_digest(text: str) -> bytes:
    """sha256 of the document's UTF-8 bytes (lone surrogates kept, so no text can fail)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def doc_score(digest: bytes) -> float:
    """A uniform number in [0, 1) fixed by the digest."""
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(digest: bytes, val_fraction: float, moved: dict[str, str]) -> str:
    """ "train" or "val" for a document with this digest. Identical documents always land
    together, so the splits never share a document."""
    if moved:
        forced = moved.get(digest.hex())
        if forced is not None:
            return forced
    return "val" if doc_score(digest) < val_fraction else "train"
