"""The MFU peak table: which entry each accelerator's `device_kind` string picks."""

from __future__ import annotations

import pytest

from gpt2_jax.training.metrics import PEAK_FLOPS, table_peak_flops

# device_kind as JAX reports it → dense bf16 peak FLOP/s per device.
KINDS = [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA B200", 2.25e15),
    ("NVIDIA GB200", 2.5e15),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU7x", 2307e12),
]


@pytest.mark.parametrize("kind, peak", KINDS, ids=[k for k, _ in KINDS])
def test_device_kind_picks_its_own_peak(kind, peak):
    assert table_peak_flops(kind) == peak


def test_unknown_device_has_no_peak():
    assert table_peak_flops("cpu") is None


def test_no_entry_is_shadowed_by_an_earlier_one():
    # First match wins, so an entry containing an earlier one ("H100 PCIe" after "H100")
    # would never be picked.
    names = [n.lower() for n in PEAK_FLOPS]
    for i, later in enumerate(names):
        assert not [n for n in names[:i] if n in later], later
