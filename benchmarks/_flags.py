"""Comma-separated list flags shared by the benchmark CLIs; bad values are one-line UserErrors."""

from __future__ import annotations

from collections.abc import Iterable

from gpt2_jax.errors import UserError


def int_list(text: str, flag: str) -> list[int]:
    """'128,256' → [128, 256]; every value a positive integer."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise UserError(f"{flag} takes positive integers, got {text!r}")
    return values


def name_list(text: str, allowed: Iterable[str], flag: str) -> list[str]:
    """'a,b' → ['a', 'b'], each one of `allowed`; 'none' → []."""
    allowed = list(allowed)
    if text.strip() == "none":
        return []
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(x not in allowed for x in names):
        raise UserError(f"{flag} takes a comma-separated subset of {','.join(allowed)}, "
                        f"got {text!r}")  # fmt: skip
    return names
