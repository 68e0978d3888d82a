"""Multi-host start-up: `jax.distributed.initialize()` when configured or detected.

`mesh.distributed`: `off` never initialises; `on` always does; `auto` does when a launcher
says there are several processes: JAX_COORDINATOR_ADDRESS, SLURM with more than one task, or
a multi-host TPU slice. On SLURM and Cloud TPU, JAX finds the coordinator, process count and
id itself. Elsewhere every process sets JAX_COORDINATOR_ADDRESS=host:port (process 0's host,
a free port), JAX_NUM_PROCESSES and JAX_PROCESS_ID: JAX reads only the address, so the other
two are passed on from here.

JAX aborts the whole process (from C++, no Python exception) when the coordinator does not
answer, so a process other than 0 first waits for the address to accept TCP connections, for
at most GPT2_JAX_COORDINATOR_TIMEOUT seconds (default 120), and fails with one line if it
never does.
"""

from __future__ import annotations

import os
import socket
import time

import jax

from gpt2_jax.config import MeshConfig
from gpt2_jax.errors import UserError


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not an integer; unset it or fix it") from None


def coordinator_timeout_s() -> int:
    """Seconds to wait for the coordinator (env GPT2_JAX_COORDINATOR_TIMEOUT, default 120)."""
    t = _env_int("GPT2_JAX_COORDINATOR_TIMEOUT")
    if t is not None and t <= 0:
        raise UserError(f"GPT2_JAX_COORDINATOR_TIMEOUT={t}; use a positive number of seconds")
    return 120 if t is None else t


def launcher_detected() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once `address` (host:port) accepts a TCP connection; UserError after timeout_s."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"JAX_COORDINATOR_ADDRESS={address!r}; use host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(left, 0.1)):
                return
        except OSError as e:
            if left <= 0:
                raise UserError(
                    f"cannot reach the coordinator at {address} within {timeout_s}s "
                    f"({e.strerror or type(e).__name__}); check JAX_COORDINATOR_ADDRESS and "
                    "that process 0 is running (GPT2_JAX_COORDINATOR_TIMEOUT sets the wait)"
                ) from None
        time.sleep(min(0.2, max(left, 0.0)))


def initialize(cfg: MeshConfig) -> None:
    """Join the cluster once per process; a coordinator that never answers is an error."""
    if cfg.distributed not in ("auto", "on", "off"):
        raise UserError(f"mesh.distributed={cfg.distributed!r}; use auto, on or off")
    if cfg.distributed == "off" or jax.distributed.is_initialized():
        return
    if cfg.distributed == "auto" and not launcher_detected():
        return
    timeout = coordinator_timeout_s()
    address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _env_int("JAX_NUM_PROCESSES")
    process_id = _env_int("JAX_PROCESS_ID")
    rank = process_id if process_id is not None else _env_int("SLURM_PROCID")
    if address and rank:  # process 0 starts the coordinator inside initialize()
        wait_for_coordinator(address, timeout)
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout,
        )
    except Exception as e:  # missing settings and bad addresses surface as ValueError / XLA errors
        where = address or "the detected coordinator"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot join the cluster at {where} ({first}); set JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID (or launch under SLURM / on a TPU slice)"
        ) from None
