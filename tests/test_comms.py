"""What the sharded train step moves between devices: the HLO collective reader on a written
module, and `bench comms` on 8 forced CPU devices at GPT-2 small's width (compiled, not run).

The compiled check runs in fp32: XLA:CPU widens bf16 matmuls to fp32, so in bf16 the tensor
mesh's activation all-reduces would carry twice the bytes the (bf16) ideal counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax.parallel.hlo_collectives import collectives, summary

REPO = Path(__file__).resolve().parents[1]
MESHES = {"fsdp8": (1, 8, 1), "dp2_fsdp4": (2, 4, 1), "dp4_tp2": (4, 1, 2)}
RATIO_LIMIT = 1.5  # the bound on total bytes per device over the analytic ideal

HLO = """\
HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %g = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %ar = f32[8,16]{1,0} all-reduce(%g), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %ag = f32[32,16]{1,0} all-gather(%g), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %t = (s32[], f32[8,16]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8,16]) -> f32[2,16] {
  %w = (s32[], f32[8,16]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %rs = f32[2,16]{1,0} reduce-scatter(%x), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, to_apply=%add
  %cp = (f32[4]{0}, bf16[2,2]{1,0}) collective-permute(%y), channel_id=4, source_target_pairs={{0,1},{1,0}}
  ROOT %r = f32[2,16]{1,0} copy(%rs)
}
"""  # noqa: E501


def test_collectives_are_counted_per_run_with_ring_bytes():
    ops = {c.kind: c for c in collectives(HLO)}
    assert set(ops) == {"all-reduce", "all-gather", "reduce-scatter", "collective-permute"}
    ar, ag, rs, cp = (ops[k] for k in ("all-reduce", "all-gather", "reduce-scatter",
                                       "collective-permute"))  # fmt: skip
    assert (ar.count, ag.count, rs.count, cp.count) == (3, 3, 1, 1)  # the loop runs 3 times
    assert (ar.group, ag.group, rs.group) == (4, 4, 4)
    assert ar.bytes_sent == 2 * 3 / 4 * 8 * 16 * 4
    assert ag.bytes_sent == 3 / 4 * 32 * 16 * 4
    assert rs.bytes_sent == 3 * 2 * 16 * 4 and rs.elements == 4 * 2 * 16
    assert cp.bytes_sent == 4 * 4 + 4 * 2 and cp.elements == 4
    kinds = summary(list(ops.values()))
    assert kinds["all-reduce"]["executions"] == 3
    assert kinds["all-reduce"]["bytes_per_device"] == 3 * ar.bytes_sent


@pytest.fixture(scope="module")
def comms_report():
    argv = [sys.executable, "-m", "benchmarks", "comms", "--json", "model.dtype=float32"]
    for sizes in MESHES.values():
        argv += ["--mesh", ",".join(map(str, sizes))]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return {name: r for name, r in zip(MESHES, json.loads(out.stdout)["meshes"], strict=True)}


@pytest.mark.parametrize("mesh", MESHES)
def test_no_collective_moves_more_than_the_largest_parameter(comms_report, mesh):
    r = comms_report[mesh]
    # 1%: a vocabulary the mesh does not divide is padded to split it (GPT.table)
    assert r["largest_collective"]["elements"] <= 1.01 * r["largest_parameter_elements"], r
    assert r["total_bytes_per_device"] <= RATIO_LIMIT * r["ideal_bytes_per_device"]["total"], r


@pytest.mark.parametrize("mesh", ["fsdp8", "dp2_fsdp4"])
def test_fsdp_reduce_scatters_gradients_onto_shards(comms_report, mesh):
    # Gradients are reduced where the backward makes them: reduce-scatters over fsdp, and over
    # data only all-reduces of shards. A whole-gradient all-reduce (the SPMD partitioner's
    # all-reduce and slice, or a sum over data before the scatter) is over a shard's size.
    r = comms_report[mesh]
    fsdp = r["mesh"]["fsdp"]
    kinds = r["by_kind"]
    assert kinds["reduce-scatter"]["ops"] > 0, kinds
    shard = 1.01 * r["largest_parameter_elements"] / fsdp  # 1%: the vocabulary's padding
    assert r["largest_all_reduce_array"] <= shard, (r["largest_all_reduce_array"], shard)
    assert r["ratio_to_ideal"] <= 1.05
