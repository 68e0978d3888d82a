"""A prepared directory's reader/writer lock, so nobody sees meta.json and the token files
half swapped.

Several processes (hosts of a cluster, or train processes that each prepare and then read) may
prepare into one directory at once. `prepare` renames its finished files and meta.json into
place holding an exclusive `flock` of `DIR/.prepare.lock`; a reader holds a shared one while it
reads meta.json and opens the token files (an open file keeps its bytes after a later rename).
A filesystem without `flock`, or a read-only directory without the lock file, gets no lock:
files are still checked against meta.json (`integrity`), so a torn read fails in one line
instead of training on mismatched data.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".prepare.lock"


@contextlib.contextmanager
def locked(out_dir: str | Path, *, exclusive: bool) -> Iterator[None]:
    """Hold `out_dir`'s lock (exclusive for a writer, shared for readers) for the block."""
    fd = _open(Path(out_dir) / LOCK_NAME)
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # no flock on this filesystem: go on unlocked
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        pass
    try:  # a read-only directory that a writer prepared: the lock file is there to share
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None
