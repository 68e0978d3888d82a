"""`bench profile`: getrusage figures and op groups for ours, top torch ops for a peer."""

from __future__ import annotations

import json

import pytest

from benchmarks import profile


def test_profile_groups_ours_and_lists_a_peers_ops(capsys):
    argv = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "2"]
    argv += ["--seq-len", "64", "--steps", "2", "--top", "3", "--peers", "hf", "--json"]
    assert profile.main(argv) == 0
    ours, hf = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (ours["name"], hf["name"], hf["host_malloc"]) == ("gpt2_jax", "hf", "tuned")
    groups = ours["groups_ms"]
    for name in ("LM head + loss: GEMMs", "LM head + loss: other ops", "optimizer",
                 "rest of the step: GEMMs", "rest of the step: other ops"):  # fmt: skip
        assert groups[name] > 0, groups
    for r in (ours, hf):
        assert r["step_ms"] > 0 and r["page_faults"] >= 0 and r["kernel_ms"] >= 0
    ops = hf["ops_ms"]
    assert len(ops) == 3 + 2 and ops["all matmuls"] > 0 and ops["all other ops"] > 0


@pytest.mark.parametrize(
    "thunk, op_name, group",
    [("ynn_fusion.3", "jit(_train_step)/jvp(lm_head_loss)/nd,vd->nv/dot_general",
      "LM head + loss: GEMMs"),
     ("subtract_exponential_fusion", "jit(_train_step)/jvp(lm_head_loss)/while/body/exp",
      "LM head + loss: other ops"),
     ("multiply_add_fusion", "jit(_train_step)/optimizer/cond/branch_1_fun/add", "optimizer"),
     ("dot.2", "jit(_train_step)/transpose(jvp())/transpose", "rest of the step: GEMMs"),
     ("ynn_fusion.40", "jit(_train_step)/jvp()/reduce_sum", "rest of the step: other ops")],
)  # fmt: skip
def test_group_of(thunk, op_name, group):
    assert profile.group_of(thunk, op_name) == group


def test_profile_bad_flag_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        profile.main(["--peer-malloc", "fast"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--peer-malloc takes a comma-separated subset" in err[0]
