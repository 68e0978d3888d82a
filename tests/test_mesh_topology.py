"""make_mesh places devices by the physical topology (mesh_utils.create_device_mesh), checked on
fake TPU v5e chips, keeps tensor groups inside one process, and keeps CPU device lists in
their order, as before."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from gpt2_jax.config import MeshConfig
from gpt2_jax.errors import UserError
from gpt2_jax.parallel import sharding
from gpt2_jax.parallel.sharding import MESH_AXES, make_mesh


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """The fields mesh_utils reads from a device (hashable, as Mesh needs)."""

    id: int
    coords: tuple[int, int, int] = (0, 0, 0)
    process_index: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v5 lite"
    core_on_chip: int = 0


def v5e_4x4(host_w: int, host_h: int) -> list[FakeDevice]:
    """A v5e 4x4 slice as jax.devices() lists it: process-tiled, each host a host_w × host_h
    block of chips."""
    hosts = [(hx, hy) for hy in range(4 // host_h) for hx in range(4 // host_w)]
    chips = [((hx * host_w + x, hy * host_h + y, 0), host)
             for host, (hx, hy) in enumerate(hosts)
             for y in range(host_h) for x in range(host_w)]  # fmt: skip
    return [FakeDevice(i, coords, host) for i, (coords, host) in enumerate(chips)]


def test_an_eight_chip_axis_is_a_ring_of_ici_neighbours_on_a_v5e_4x2():
    tray = [FakeDevice(i, (i % 4, i // 4, 0)) for i in range(8)]  # one host, ids row-major
    for cfg in (MeshConfig(data=1, fsdp=8), MeshConfig(data=1, tensor=8)):
        ring = [d.coords for d in make_mesh(cfg, tray).devices.flat]
        nxt = ring[1:] + ring[:1]
        hops = [abs(p[0] - q[0]) + abs(p[1] - q[1]) for p, q in zip(ring, nxt, strict=True)]
        assert hops == [1] * 8 and len(set(ring)) == 8  # the row-major list jumps (3,0)→(0,1)


def _tensor_groups(mesh) -> list[list[FakeDevice]]:
    return mesh.devices.reshape(-1, mesh.shape["tensor"]).tolist()


@pytest.mark.parametrize("hosts", [(4, 4), (4, 2)], ids=["one_host", "hosts_of_4x2"])
def test_tensor_axis_lies_along_one_row_of_a_v5e_4x4(hosts):
    for cfg in (MeshConfig(data=4, tensor=4), MeshConfig(data=-1, fsdp=1, tensor=4)):
        mesh = make_mesh(cfg, v5e_4x4(*hosts))
        assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 4}
        for group in _tensor_groups(mesh):
            assert len({d.coords[1] for d in group}) == 1  # one row: the same y
            assert sorted(d.coords[0] for d in group) == [0, 1, 2, 3]
        assert len(set(mesh.devices.flat)) == 16
        sharding.check_process_batch(mesh)


def test_tensor_groups_stay_inside_a_process_when_a_row_spans_two():
    mesh = make_mesh(MeshConfig(data=4, tensor=4), v5e_4x4(2, 2))  # 4 hosts of 2x2 chips
    for group in _tensor_groups(mesh):
        assert len({d.process_index for d in group}) == 1
    assert list(mesh.devices.flat) == v5e_4x4(2, 2)  # the list order, process by process
    sharding.check_process_batch(mesh)


def test_make_mesh_uses_the_topology_aware_placement(monkeypatch):
    calls = []

    def create_device_mesh(shape, devices, **kwargs):
        calls.append((shape, list(devices), kwargs))
        return np.asarray(devices[::-1]).reshape(shape)

    monkeypatch.setattr(sharding.mesh_utils, "create_device_mesh", create_device_mesh)
    devices = [FakeDevice(i) for i in range(8)]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=-1), devices)
    assert calls == [((2, 2, 1, 2), devices, {"allow_split_physical_axes": True})]
    assert mesh.axis_names == MESH_AXES
    assert [d.id for d in mesh.devices.flat] == list(range(7, -1, -1))


@pytest.mark.parametrize(
    "cfg",
    [MeshConfig(), MeshConfig(data=4, tensor=2), MeshConfig(data=2, fsdp=2, expert=1, tensor=2),
     MeshConfig(data=1, fsdp=-1, expert=2)],
    ids=["dp8", "dp4_tp2", "dp2_fsdp2_tp2", "fsdp4_ep2"],
)  # fmt: skip
def test_cpu_devices_keep_their_list_order(cfg):
    devices = [FakeDevice(i, platform="cpu", device_kind="cpu") for i in (3, 1, 0, 2, 7, 5, 4, 6)]
    mesh = make_mesh(cfg, devices)
    assert mesh.devices.tolist() == np.asarray(devices).reshape(mesh.devices.shape).tolist()
    assert make_mesh(MeshConfig(), jax.devices()[:1]).devices.flat[0] == jax.devices()[0]


def test_tpu_subset_without_a_physical_block_falls_back_to_list_order():
    chips = [d for d in v5e_4x4(4, 4) if d.coords[:2] in ((0, 0), (1, 0), (0, 1))]  # a hole
    mesh = make_mesh(MeshConfig(), chips)
    assert list(mesh.devices.flat) == chips
    with pytest.raises(UserError, match="does not divide the 3 devices"):
        make_mesh(MeshConfig(tensor=2), chips)
