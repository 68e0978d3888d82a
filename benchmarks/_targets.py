"""Compile-only devices of an accelerator this host does not have, for ahead-of-time compiles.

`--target tpu:TOPOLOGY` (e.g. `tpu:v5e:2x4`, `tpu:v5p:2x4x4`) asks libtpu for the topology's
devices (`jax.experimental.topologies.get_topology_desc`): XLA's TPU compiler then compiles for
them on this CPU host, with no TPU and no environment variables. libtpu comes with
`pip install "gpt2-jax[tpu]"`; where it is installed, `JAX_PLATFORMS=cpu` keeps jax itself from
looking for a TPU.
"""

from __future__ import annotations

from gpt2_jax.errors import UserError

# High-bandwidth memory per device as JAX counts devices (one per chip from v5e on; v4 and
# v5p chips are one megacore device), from Google Cloud's TPU pages.
HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,  # v5e
    "TPU v5": 95 * 2**30,  # v5p
    "TPU v6 lite": 32 * 2**30,  # v6e (Trillium)
    "TPU7x": 192 * 2**30,  # Ironwood
}


def parse(text: str) -> tuple[str, str]:
    """'cpu' → ("cpu", ""); 'tpu:v5e:2x4' → ("tpu", "v5e:2x4")."""
    platform, _, name = text.partition(":")
    if platform == "cpu" and not name:
        return "cpu", ""
    if platform == "tpu" and name:
        return "tpu", name
    raise UserError(f"--target takes cpu or tpu:TOPOLOGY (e.g. tpu:v5e:2x4), got {text!r}")


def devices(platform: str, name: str) -> list:
    """The compile-only devices of target `platform`:`name`."""
    try:
        from jax.experimental import topologies

        try:
            topology = topologies.get_topology_desc(topology_name=name, platform=platform)
        except Exception:  # a slice smaller than a host (v5e:1x1): it is all one host's
            topology = topologies.get_topology_desc(
                topology_name=name, platform=platform, chips_per_host_bounds=_dims(name)
            )
    except Exception as e:  # libtpu missing, or a topology it does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--target {platform}:{name}: no compile-only devices ({first[:200]}); install "
            "the TPU compiler with pip install 'gpt2-jax[tpu]' and name a topology such as "
            "v5e:2x4 or v5p:2x4x4"
        ) from None
    return list(topology.devices)


def _dims(name: str) -> tuple[int, int, int]:
    """'v5e:1x1' → (1, 1, 1): the chip grid of a topology name, padded to three axes."""
    sizes = name.rpartition(":")[2].split("x")
    if not all(x.isdigit() for x in sizes) or not 1 <= len(sizes) <= 3:
        raise ValueError(f"no chip grid in topology {name!r}")
    return tuple(int(x) for x in sizes) + (1,) * (3 - len(sizes))


def hbm_bytes(device_kind: str) -> int | None:
    """HBM per device of `device_kind` (None where unknown)."""
    return HBM_BYTES.get(device_kind)
