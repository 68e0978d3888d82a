"""One training run per out_dir: an advisory lock file that names its holder.

The lock is `out_dir/.run.lock`, held with `flock` for the life of the run and filled with the
holder's host, pid and start time. The kernel drops the lock when its process dies, so a lock
left by a killed run is taken over (with a notice naming it) rather than blocking forever. The
file is emptied, never removed, on release: removing it would let two runs lock different
files of the same name. flock is per host; on a network filesystem it may not exclude runs
on other hosts.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from gpt2_jax.errors import UserError, notice

LOCK_NAME = ".run.lock"


def _describe(holder: dict) -> str:
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
        f"{holder.get('started', '?')}"
    )


class RunLock:
    """`with RunLock(out_dir):` holds the run lock, or raises a one-line UserError."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            who = _describe(holder) if holder else "a process that is starting up"
            raise UserError(
                f"{self.path.parent} is in use by another training run ({who}); wait for it, "
                "stop it, or use another train.out_dir"
            ) from None
        stale = self._read(fd)
        if stale:
            notice(f"taking over the lock of a run that is gone ({_describe(stale)})")
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @staticmethod
    def _read(fd: int) -> dict | None:
        raw = os.pread(fd, 4096, 0)
        try:
            holder = json.loads(raw) if raw.strip() else None
        except ValueError:
            return {"host": "?", "pid": "?", "started": f"unreadable lock ({raw[:40]!r})"}
        return holder if isinstance(holder, dict) else None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
