"""User-facing errors and the CLI wrapper that prints them as one line."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(ValueError):
    """Bad input from the user: printed as one line, no traceback, exit code 2."""


def notice(message: str) -> None:
    """A one-line notice on stderr: something the user should know, nothing wrong."""
    print(f"notice: {message}", file=sys.stderr, flush=True)


def cli_main(fn: F) -> F:
    """Wrap a CLI entry point so a `UserError` becomes `error: ...` on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]


class ArgParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are UserErrors: one line, exit 2, via cli_main."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")
