"""Multi-host start-up: `jax.distributed.initialize()` when configured or detected.

`mesh.distributed`: `off` never initialises; `on` always does; `auto` does when a launcher
says there are several processes: JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and
JAX_PROCESS_ID), SLURM with more than one task, or a multi-host TPU slice. JAX then finds
the coordinator, process count and id itself (SLURM and TPU) or from those variables.
"""

from __future__ import annotations

import os

import jax

from gpt2_jax.config import MeshConfig
from gpt2_jax.errors import UserError

TIMEOUT_S = int(os.environ.get("GPT2_JAX_COORDINATOR_TIMEOUT", "120"))


def launcher_detected() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize(cfg: MeshConfig) -> None:
    """Join the cluster once per process; a coordinator that never answers is an error."""
    if cfg.distributed not in ("auto", "on", "off"):
        raise UserError(f"mesh.distributed={cfg.distributed!r}; use auto, on or off")
    if cfg.distributed == "off" or jax.distributed.is_initialized():
        return
    if cfg.distributed == "auto" and not launcher_detected():
        return
    try:
        jax.distributed.initialize(initialization_timeout=TIMEOUT_S)
    except Exception as e:  # timeouts and bad addresses surface as RuntimeError / XlaRuntimeError
        where = os.environ.get("JAX_COORDINATOR_ADDRESS", "the detected coordinator")
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot join the cluster at {where} within {TIMEOUT_S}s ({first}); check the "
            "coordinator address and that process 0 is running"
        ) from None
