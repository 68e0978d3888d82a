"""Compile-only devices of an accelerator this host does not have, for ahead-of-time compiles.

- `--target tpu:TOPOLOGY` (e.g. `tpu:v5e:2x4`, `tpu:v5p:2x4x4`) asks libtpu for the topology's
  devices (`jax.experimental.topologies.get_topology_desc`); XLA's TPU compiler then compiles
  for them here, with no TPU. libtpu comes with `pip install "gpt2-jax[tpu]"`.
- `--target gpu:GPU[xN]` (e.g. `gpu:h100x8`: one host of 8 H100 SXM; `gpu:h100x16`: two) asks
  the CUDA plugin for N compile-only GPUs described by a target config (`GPUS`: the published
  facts XLA:GPU's compiler reads, written here as a `GpuTargetConfigProto` text). XLA:GPU then
  compiles for them, PTX through `ptxas`, with no GPU and no CUDA libraries. The plugin comes
  with `pip install "gpt2-jax[compile]"`; `ptxas` from a CUDA toolkit on PATH or the
  `nvidia-cuda-nvcc` wheel.

Where either is installed, `JAX_PLATFORMS=cpu` keeps jax itself from looking for the device.
"""

from __future__ import annotations

import os
import re

from gpt2_jax.errors import UserError

GIB = 2**30

# High-bandwidth memory per device as JAX counts devices (one per chip from v5e on; v4 and
# v5p chips are one megacore device), from Google Cloud's TPU pages.
HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GIB,  # v5p
    "TPU v6 lite": 32 * GIB,  # v6e (Trillium)
    "TPU7x": 192 * GIB,  # Ironwood
}

# NVIDIA GPUs from their datasheets and architecture whitepapers: compute capability, SMs,
# shared memory per SM and the most one block may opt into, L2, boost clock, memory and its
# bandwidth. Registers (64 K per SM and block), 2048 threads per SM and 1024 per block are the
# same on all three.
_H100 = dict(name="NVIDIA H100 80GB HBM3", cc=(9, 0), sms=132, smem_sm=228 * 1024,
             smem_optin=227 * 1024, l2=50 * 2**20, clock_ghz=1.98, memory=80 * GIB,
             bandwidth=3.35e12)  # fmt: skip
GPUS = {
    "a100": dict(
        name="NVIDIA A100-SXM4-80GB",
        cc=(8, 0),
        sms=108,
        smem_sm=164 * 1024,
        smem_optin=163 * 1024,
        l2=40 * 2**20,
        clock_ghz=1.41,
        memory=80 * GIB,
        bandwidth=2.039e12,
    ),  # fmt: skip
    "h100": _H100,
    "h200": dict(_H100, name="NVIDIA H200", memory=141 * 10**9, bandwidth=4.8e12),  # same die
}
GPUS_PER_HOST = 8
# JAX's GPU allocator takes 75% of device memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise: a step whose peak is above that fails to allocate on a default setup.
GPU_MEM_FRACTION = 0.75
_USAGE = "--target takes cpu, tpu:TOPOLOGY (e.g. tpu:v5e:2x4) or gpu:GPUxN (e.g. gpu:h100x8)"


def parse(text: str) -> tuple[str, str]:
    """'cpu' → ("cpu", ""); 'tpu:v5e:2x4' → ("tpu", "v5e:2x4"); 'gpu:h100x8' → ("gpu",
    "h100x8")."""
    platform, _, name = text.partition(":")
    if platform == "cpu" and not name:
        return "cpu", ""
    if platform == "tpu" and name:
        return "tpu", name
    if platform == "gpu" and name:
        _gpu(name)
        return "gpu", name
    raise UserError(f"{_USAGE}, got {text!r}")


def _gpu(name: str) -> tuple[dict, int]:
    """'h100x8' → (GPUS["h100"], 8); a count above a host's must fill whole hosts."""
    m = re.fullmatch(r"([a-z0-9]+?)(?:x(\d+))?", name)
    spec = GPUS.get(m.group(1)) if m else None
    count = int(m.group(2) or 1) if m else 0
    if spec is None or count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise UserError(
            f"--target gpu:{name}: name one of {', '.join(GPUS)} and a count that fills hosts "
            f"of {GPUS_PER_HOST} (e.g. gpu:h100x8, gpu:h100x16)"
        )
    return spec, count


def target_config(spec: dict) -> str:
    """`spec` as the `GpuTargetConfigProto` text XLA:GPU compiles for."""
    major, minor = spec["cc"]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 threads_per_core_limit: 2048
  shared_memory_per_block: 49152 shared_memory_per_core: {spec["smem_sm"]}
  shared_memory_per_block_optin: {spec["smem_optin"]}
  core_count: {spec["sms"]} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  memory_bandwidth: {int(spec["bandwidth"])} l2_cache_size: {spec["l2"]}
  clock_rate_ghz: {spec["clock_ghz"]} device_memory_size: {spec["memory"]}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
device_description_str: "{spec["name"]}"
"""


def devices(platform: str, name: str) -> list:
    """The compile-only devices of target `platform`:`name`."""
    from jax.experimental import topologies

    try:
        if platform == "gpu":
            spec, count = _gpu(name)
            hosts, per_host = max(1, count // GPUS_PER_HOST), min(count, GPUS_PER_HOST)
            topology = topologies.get_topology_desc(
                platform="cuda", topology=f"1x{hosts}x{per_host}", target_config=target_config(spec)
            )
        else:
            # libtpu takes a machine-wide lock on load, so a second process (another compile,
            # a TPU job) would stop this one; compiling opens no chip, so share the library.
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            try:
                topology = topologies.get_topology_desc(topology_name=name, platform=platform)
            except Exception:  # a slice smaller than a host (v5e:1x1): it is all one host's
                topology = topologies.get_topology_desc(
                    topology_name=name, platform=platform, chips_per_host_bounds=_dims(name)
                )
    except UserError:
        raise
    except Exception as e:  # the compiler missing, or a topology it does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fix = {
            "tpu": "install the TPU compiler with pip install 'gpt2-jax[tpu]' and name a "
            "topology such as v5e:2x4 or v5p:2x4x4",
            "gpu": "install the CUDA compiler with pip install 'gpt2-jax[compile]' and start "
            "with JAX_PLATFORMS=cpu",
        }[platform]
        raise UserError(
            f"--target {platform}:{name}: no compile-only devices ({first[:200]}); {fix}"
        ) from None
    return list(topology.devices)


def _dims(name: str) -> tuple[int, int, int]:
    """'v5e:1x1' → (1, 1, 1): the chip grid of a topology name, padded to three axes."""
    sizes = name.rpartition(":")[2].split("x")
    if not all(x.isdigit() for x in sizes) or not 1 <= len(sizes) <= 3:
        raise ValueError(f"no chip grid in topology {name!r}")
    return tuple(int(x) for x in sizes) + (1,) * (3 - len(sizes))


def hbm_bytes(device_kind: str) -> int | None:
    """Device memory of `device_kind` (None where unknown)."""
    gpu = next((g["memory"] for g in GPUS.values() if g["name"] == device_kind), None)
    return HBM_BYTES.get(device_kind, gpu)


def usable_bytes(device_kind: str) -> int | None:
    """What a step may hold on `device_kind` under JAX's defaults: all HBM on a TPU, the
    allocator's 75% on a GPU (None where unknown)."""
    hbm = hbm_bytes(device_kind)
    if hbm is None or device_kind in HBM_BYTES:
        return hbm
    return int(hbm * GPU_MEM_FRACTION)
