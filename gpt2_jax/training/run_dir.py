"""A run's directory: created and probed, locked for one run, and its checkpoints opened for
resuming or, on request, cleared to start over."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from gpt2_jax.config import Config
from gpt2_jax.errors import UserError
from gpt2_jax.formats.checkpoint import Checkpointer
from gpt2_jax.training.run_lock import RunLock


def prepare_out_dir(cfg: Config) -> Path:
    """Create train.out_dir and check this process can write into it."""
    out = Path(cfg.train.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # One probe per process: hosts sharing out_dir must not delete each other's.
        probe = out / f".write_test.{socket.gethostname()}.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"train.out_dir {str(out)!r} is not writable ({e.strerror}); choose another"
        ) from None
    return out


def lock_out_dir(out: Path) -> RunLock:
    """Process 0 takes the run lock of `out`; in a cluster every process learns the outcome,
    so a refusal stops them all instead of leaving the others waiting in a collective."""
    lock, refusal = RunLock(out), ""
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except UserError as e:
            refusal = str(e)
    if jax.process_count() > 1:
        flag = multihost_utils.broadcast_one_to_all(np.int32(bool(refusal)))
        if flag and not refusal:
            refusal = f"process 0 could not lock {out} (see its error); nothing was changed"
    if refusal:
        raise UserError(refusal)
    return lock


@contextlib.contextmanager
def open_run(cfg: Config, out: Path) -> Iterator[Checkpointer]:
    """The run's checkpoints, with `out` locked until the block ends. Existing checkpoints are
    kept for resuming; `train.resume=false` deletes them only with `train.overwrite=true`."""
    t = cfg.train
    lock = lock_out_dir(out)
    try:
        ckpt = Checkpointer(out, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        try:
            existing = ckpt.steps()
            if existing and not t.resume:
                if not t.overwrite:
                    raise UserError(
                        f"{out} already has checkpoints (steps {existing}); resume with "
                        "train.resume=true, or start over with train.resume=false "
                        "train.overwrite=true, or pick another train.out_dir"
                    )
                ckpt.close()
                if jax.process_index() == 0:
                    shutil.rmtree(ckpt.directory)
                    (out / "metrics.jsonl").unlink(missing_ok=True)
                ckpt = Checkpointer(
                    out, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
                )
            yield ckpt
        finally:
            ckpt.close()
    finally:
        lock.release()
