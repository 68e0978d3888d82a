"""Multi-device and multi-host training on forced CPU devices: mesh equivalence, sharding
rules, FSDP memory, checkpoint resharding, a two-process cluster and its error messages.

This pytest process already runs JAX with one device, so everything runs in children with
XLA_FLAGS forcing 8 (or 4) CPU devices: tests/multidevice_worker.py does the single-process
mesh work of each model in one child (compilation dominates the time); two children form a
cluster over 127.0.0.1 next to a one-process twin; the bad mesh settings go through the CLI's
`main` in one child, and an unreachable coordinator and a tensor group spanning processes are
real `python -m gpt2_jax.train` runs. One fixture starts them all at once so they share the
cores; the tests then read their results.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from gpt2_jax.data import TokenDataset, get_batch
from gpt2_jax.formats.checkpoint import load_model_weights
from gpt2_jax.training.loop import EVAL_SEED_OFFSET
from tests.multidevice_worker import MESHES, MODELS, MULTIHOST_OVERRIDES
from tests.train_helpers import TINY_OVERRIDES, tiny_config, train_losses

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "multidevice_worker.py")
TOL = 1e-5  # fp32: different meshes only reorder the sums
# Compilation dominates these runs; without LLVM optimisation and with XLA's older elemental
# fusion emitters a train step compiles about 4× faster on CPU. Every run compared to another
# is compiled the same way. XLA aborts on a flag it does not know, so the second, newer flag is
# probed once and dropped if this jaxlib lacks it.
XLA_FLAGS = "--xla_force_host_platform_device_count={} --xla_backend_optimization_level=0"
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
CHILD_TIMEOUT_S = 600
ABSL_LOG = re.compile(r"[IWE]\d{4} ")  # XLA's own log lines ("W1125 10:03:57.428 ...")

# CLI argv overrides → the one-line error they must give, with 8 devices.
MESH_ERRORS = {
    "mesh_product": (["mesh.data=3", "mesh.fsdp=1", "mesh.tensor=1"],
                     "mesh data×fsdp×expert×tensor = 3 but there are 8 devices"),
    "batch_divisibility": (["train.batch_size=4", "mesh.data=-1", "mesh.fsdp=2"],
                           "train.batch_size=4 is not divisible by mesh data×fsdp×expert=8"),
    "heads_divisibility": (["mesh.tensor=4"], "model.n_head=2 is not divisible by mesh.tensor=4"),
    "micro_batch_divisibility": (["train.batch_size=16", "train.grad_accum=4", "mesh.data=-1"],
                                 "the micro-batch train.batch_size/train.grad_accum = 16/4 = 4 "
                                 "is not divisible by mesh data×fsdp×expert=8"),
}  # fmt: skip


def _free_ports(n: int) -> list[int]:
    """n distinct ports nobody listens on (all held open until all are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@functools.cache
def _xla_flags() -> str:
    flags = f"{XLA_FLAGS} {FAST_COMPILE_FLAG}".format(1)
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                           env={**os.environ, "XLA_FLAGS": flags}, capture_output=True)  # fmt: skip
    return f"{XLA_FLAGS} {FAST_COMPILE_FLAG}" if probe.returncode == 0 else XLA_FLAGS


def _env(devices: int, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
    env.update(XLA_FLAGS=_xla_flags().format(devices), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return {**env, **extra}


def _cluster_env(devices: int, port: int, rank: int, timeout_s: int = 300) -> dict:
    """Process `rank` of 2 with its coordinator at 127.0.0.1:port."""
    return _env(devices, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(rank), GPT2_JAX_COORDINATOR_TIMEOUT=str(timeout_s))  # fmt: skip


class Child:
    """A started subprocess whose output goes to files (a full pipe would stall it while the
    test waits on another child); a thread records when it exits and its CPU time."""

    def __init__(self, name: str, cmd: list[str], env: dict, logs: Path):
        self.name, self.started = name, time.perf_counter()
        self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        self.seconds = self.cpu_seconds = None
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
        self.proc.returncode = os.waitstatus_to_exitcode(status)

    def result(self) -> tuple[int, str, str, float]:
        """(return code, stdout, stderr, seconds from start to exit)."""
        self._waiter.join(CHILD_TIMEOUT_S)
        if self._waiter.is_alive():
            self.proc.kill()
            self._waiter.join()
        return self.proc.returncode, self.out.read_text(), self.err.read_text(), self.seconds

    def ok(self) -> str:
        code, out, err, _ = self.result()
        assert code == 0, f"{self.name} failed ({code}):\n{err[-3000:]}"
        return out


@pytest.fixture(scope="module")
def children(tmp_path_factory, prepared_shakespeare):
    """Every subprocess of this file, started together; name → Child."""
    work = tmp_path_factory.mktemp("multidevice")
    cli = [*TINY_OVERRIDES, f"data.prepared_dir={prepared_shakespeare}"]
    train_cli = [sys.executable, "-m", "gpt2_jax.train"]
    kids: dict[str, Child] = {}
    for model in MODELS:
        kids[model] = Child(
            model, [sys.executable, WORKER, "meshes", model, str(work)], _env(8), work
        )
    cmd = [sys.executable, WORKER, "variants"]
    kids["variants"] = Child("variants", cmd, _env(8), work)
    kids["moe"] = Child("moe", [sys.executable, WORKER, "moe"], _env(8), work)
    # The same 3 steps on one process with 8 devices and on two processes with 4 each.
    run = [*cli, *MULTIHOST_OVERRIDES]
    kids["one_process"] = Child(
        "one_process", [*train_cli, *run, f"train.out_dir={work / 'one_process'}"], _env(8), work
    )
    cluster_port, lonely_port, spanning_port = _free_ports(3)
    for rank in (0, 1):
        args = [*run, f"train.out_dir={work / 'two_processes'}", "mesh.distributed=on"]
        cmd = [sys.executable, WORKER, "train", str(work / f"rows{rank}.json"), *args]
        kids[f"rank{rank}"] = Child(f"rank{rank}", cmd, _cluster_env(4, cluster_port, rank), work)
    cases = [[*cli, f"train.out_dir={work / n}", *o] for n, (o, _) in MESH_ERRORS.items()]
    cmd = [sys.executable, WORKER, "cli-errors", json.dumps(cases)]
    kids["mesh_errors"] = Child("mesh_errors", cmd, _env(8), work)
    # Process 1 of 2 whose coordinator (process 0) never comes up.
    cmd = [*train_cli, *cli, f"train.out_dir={work / 'lonely'}", "mesh.distributed=on"]
    env = _cluster_env(8, lonely_port, 1, timeout_s=2)
    kids["coordinator"] = Child("coordinator", cmd, env, work)
    # Two processes whose tensor groups (8 devices) span both: each would need every row.
    for rank in (0, 1):
        args = [*cli, f"train.out_dir={work / 'spanning'}", "mesh.distributed=on", "mesh.data=1",
                "mesh.tensor=8", "model.n_head=8"]  # fmt: skip
        env = _cluster_env(4, spanning_port, rank)
        kids[f"spanning{rank}"] = Child(f"spanning{rank}", [*train_cli, *args], env, work)
    yield work, kids
    for kid in kids.values():
        if kid.seconds is None:
            kid.proc.kill()
        kid.result()
    print("\nchildren (wall s / CPU s): " + ", ".join(
        f"{k.name} {k.seconds:.1f}/{k.cpu_seconds:.1f}" for k in kids.values()))  # fmt: skip


def _json(child: Child):
    return json.loads(child.ok().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def meshes(children) -> dict:
    """model name → the worker's report."""
    return {model: _json(children[1][model]) for model in MODELS}


@pytest.mark.parametrize("model", list(MODELS))
def test_every_mesh_trains_like_one_device(meshes, model):
    report = meshes[model]
    print(f"\n{model}: 5 steps vs 1 device (fp32), one-device losses "
          f"{[round(x, 4) for x in report['one_device_losses']]}")  # fmt: skip
    print(f"{'mesh':<16} {'data×fsdp×tensor':<18} {'max |Δloss|':>12} {'max |Δparam|':>13}")
    for name, r in report["meshes"].items():
        shape = "×".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
        print(f"{name:<16} {shape:<18} {r['max_loss_diff']:>12.2e} {r['max_param_diff']:>13.2e}")
    assert list(report["meshes"]) == list(MESHES)
    for name, r in report["meshes"].items():
        want = {a: getattr(MESHES[name], a) for a in ("data", "fsdp", "expert", "tensor")}
        assert r["mesh"] == want
        assert len(r["losses"]) == 5 and all(np.isfinite(r["losses"]))
        assert r["max_loss_diff"] <= TOL, name
        assert r["max_param_diff"] <= TOL, (name, r["worst_param"])


def test_chunked_loss_and_scanned_layers_on_meshes_train_like_one_device(children):
    report = _json(children[1]["variants"])
    print("\nchunked loss (5 steps) / scanned layers (10 steps) on 8 devices vs the plain run on "
          "1 device (fp32):")  # fmt: skip
    for name, r in report.items():
        print(f"  {name:<40} max |Δloss| {r['max_loss_diff']:.2e}  "
              f"max |Δparam| {r['max_param_diff']:.2e}")  # fmt: skip
    runs = ("chunked/fsdp8", "chunked/dp2_fsdp2_tp2", "scanned/fsdp8",
            "vocab127/chunked/dp2_fsdp2_tp2", "vocab127/full/fsdp8")  # fmt: skip
    assert sorted(report) == sorted(f"{m}/{r}" for m in MODELS for r in runs)
    for name, r in report.items():
        assert r["max_loss_diff"] <= TOL and r["max_param_diff"] <= TOL, name


def test_moe_on_expert_meshes_trains_like_one_device(children):
    report = _json(children[1]["moe"])
    print("\nMoE (8 experts, top-2, grad_accum 2), 5 steps on 8 devices vs 1 device (fp32):")
    for name, r in report.items():
        mine = r["expert_bytes"]["per_device"][0] / r["expert_bytes"]["total"]
        diffs = f"max |Δloss| {r['max_loss_diff']:.2e}  max |Δparam| {r['max_param_diff']:.2e}"
        print(f"  {name:<22} {r['mesh']}  {diffs}  expert bytes per device {mine:.4f}")
    assert sorted(report) == sorted(
        ["expert8", "dp2_expert4", "fsdp2_expert4", "capacity/dp2_expert4"]
    )
    for name, r in report.items():
        assert r["max_loss_diff"] <= TOL and r["max_param_diff"] <= TOL, name
        assert len(r["losses"]) == 5 and all(np.isfinite(r["losses"]))
        total, per_device = r["expert_bytes"]["total"], r["expert_bytes"]["per_device"]
        expert = r["mesh"]["expert"]
        assert len(per_device) == 8 and len(set(per_device)) == 1
        if "fsdp" in r["mesh"]:  # fsdp splits the experts' embed axis further
            assert total / (expert * r["mesh"]["fsdp"]) <= per_device[0] < total / expert, name
        else:
            assert per_device[0] == total / expert, name
    assert report["capacity/dp2_expert4"]["losses"] != report["dp2_expert4"]["losses"]


# (mesh axes splitting each dimension, one device's shard shape) per parameter, from the rules:
# fsdp splits "embed", except in the embedding and head, which fsdp and tensor split by
# vocabulary row; tensor splits "vocab", "qkv", "heads" and "mlp"; norms are replicated.
# n_embd 32, 4 heads of 8, vocab 128, MLP 128.
LAYOUT = {
    ("learned_mha", "fsdp8"): {
        "wte/embedding": ([["fsdp"], []], [16, 32]),  # vocabulary rows
        "wpe/embedding": ([[], ["fsdp"]], [16, 4]),
        "h/0/attn/c_attn/kernel": ([["fsdp"], []], [4, 96]),
        "h/0/attn/c_proj/kernel": ([[], ["fsdp"]], [32, 4]),
        "h/0/mlp/c_fc/kernel": ([["fsdp"], []], [4, 128]),
        "h/0/mlp/c_proj/kernel": ([[], ["fsdp"]], [128, 4]),
        "h/0/mlp/c_proj/bias": ([["fsdp"]], [4]),
        "h/0/ln_1/scale": ([[]], [32]),
    },
    ("learned_mha", "dp4_tp2"): {
        "wte/embedding": ([["tensor"], []], [64, 32]),  # vocab-parallel
        "wpe/embedding": ([[], []], [16, 32]),
        "h/0/attn/c_attn/kernel": ([[], ["tensor"]], [32, 48]),  # column parallel
        "h/0/attn/c_attn/bias": ([["tensor"]], [48]),
        "h/0/attn/c_proj/kernel": ([["tensor"], []], [16, 32]),  # row parallel
        "h/0/attn/c_proj/bias": ([[]], [32]),
        "h/0/mlp/c_fc/kernel": ([[], ["tensor"]], [32, 64]),
        "h/0/mlp/c_proj/kernel": ([["tensor"], []], [64, 32]),
        "h/0/ln_2/bias": ([[]], [32]),
    },
    ("rope_gqa_window", "fsdp8"): {
        "lm_head/kernel": ([[], ["fsdp"]], [32, 16]),  # vocabulary columns
        "h/0/attn/c_attn/kernel": ([["fsdp"], []], [4, 64]),
    },
    ("rope_gqa_window", "dp4_tp2"): {
        "lm_head/kernel": ([[], ["tensor"]], [32, 64]),
        "h/0/attn/c_attn/kernel": ([[], ["tensor"]], [32, 32]),  # 2 K/V heads split by 2
    },
    (
        "rope_gqa_window",
        "mqa_dp4_tp2",
    ): {  # 1 K/V head cannot be split: the fused q|k|v is replicated
        "h/0/attn/c_attn/kernel": ([[], []], [32, 48]),
        "h/0/attn/c_attn/bias": ([[]], [48]),
        "h/0/attn/c_proj/kernel": ([["tensor"], []], [16, 32]),
        "h/0/mlp/c_fc/kernel": ([[], ["tensor"]], [32, 64]),
    },
}


def test_parameter_shardings_follow_the_rules(meshes):
    for (model, mesh), expected in LAYOUT.items():
        layout = meshes[model]["layout"][mesh]
        for name, (axes, shard) in expected.items():
            got = layout[name]
            assert (got["axes"], got["shard"]) == (axes, shard), (model, mesh, name, got)


@pytest.mark.parametrize("model", list(MODELS))
def test_fsdp8_holds_an_eighth_per_device(meshes, model):
    b = meshes[model]["fsdp8_bytes"]
    eighth = b["total"] / 8
    print(f"\n{model} FSDP 8: params + optimizer state {b['total']} B in total, "
          f"{b['per_device'][0]} B per device = {b['per_device'][0] / eighth:.3f} × total/8 "
          f"({b['replicated']} B of 1-D leaves held whole by every device)")  # fmt: skip
    assert len(b["per_device"]) == 8 and len(set(b["per_device"])) == 1
    # Every matrix is split 8 ways; only vectors (norms, tensor-split biases) and scalar
    # counters stay whole, and they are a few percent of the bytes.
    assert b["per_device"][0] == (b["total"] - b["replicated"]) / 8 + b["replicated"]
    assert b["replicated_max_ndim"] <= 1
    assert b["per_device"][0] <= 1.2 * eighth


@pytest.mark.parametrize("model", list(MODELS))
def test_fsdp8_checkpoint_restores_onto_other_meshes(meshes, model):
    c = meshes[model]["checkpoint"]
    for target in ("one", "dp4_tp2"):
        r = c[target]
        print(f"\n{model}: FSDP 8 → {target}: next-step loss {r['next_loss']:.7f} "
              f"(FSDP 8: {c['fsdp8_next_loss']:.7f})")  # fmt: skip
        assert r["step"] == 5 and r["same_keys"]
        assert r["params_equal"] and r["opt_equal"]  # bit for bit
        assert r["target_shardings"]  # laid out for the current mesh, not the saved one
        # The restored state steps exactly like the same values placed directly on this mesh,
        # and like the FSDP 8 run up to summation order.
        assert r["next_loss"] == r["next_loss_direct"]
        assert abs(r["next_loss"] - c["fsdp8_next_loss"]) <= TOL


def _val_loss(out: Path) -> float:
    records = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    return next(r["val_loss"] for r in records if "val_loss" in r)


def test_two_processes_train_like_one_process_with_eight_devices(children, prepared_shakespeare):
    work, kids = children
    for name in ("one_process", "rank0", "rank1"):
        kids[name].ok()
    one, two = train_losses(work / "one_process"), train_losses(work / "two_processes")
    records = [json.loads(x) for x in (work / "two_processes" / "metrics.jsonl").open()]
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert len(records) == 4  # 3 steps + 1 eval: only process 0 writes metrics
    loss_diff = max(abs(one[s] - two[s]) for s in one)
    val = [_val_loss(work / d) for d in ("one_process", "two_processes")]
    assert abs(val[0] - val[1]) <= TOL
    # Sampling gathers the FSDP-sharded params from both processes; only process 0 prints.
    assert "--- sample at step 3 ---" in kids["rank0"].result()[2]
    assert "--- sample at step" not in kids["rank1"].result()[2]

    # Each process fed only its own half of every global batch: 3 training batches, then the
    # evaluation batch (8 rows of val.bin under the eval seed).
    t = tiny_config(work / "two_processes", prepared_shakespeare, *MULTIHOST_OVERRIDES).train
    train_bin = TokenDataset(prepared_shakespeare / "train.bin")
    val_bin = TokenDataset(prepared_shakespeare / "val.bin")
    want = [get_batch(train_bin, seed=t.seed, step=s, batch_size=t.batch_size,
                      seq_len=t.seq_len)[0] for s in range(3)]  # fmt: skip
    want.append(get_batch(val_bin, seed=t.seed + EVAL_SEED_OFFSET, step=0, batch_size=8,
                          seq_len=t.seq_len)[0])  # fmt: skip
    for rank in (0, 1):
        fed = json.loads((work / f"rows{rank}.json").read_text())
        assert fed["process_index"] == rank and len(fed["batches"]) == len(want)
        for rows, x in zip(fed["batches"], want, strict=True):
            half = len(x) // 2
            np.testing.assert_array_equal(np.asarray(rows), x[rank * half : (rank + 1) * half])

    # The checkpoint the cluster wrote (sharded over both processes) reads back whole.
    def params(out: Path):
        return jax.tree.leaves(nnx.state(load_model_weights(out), nnx.Param))

    param_diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(params(work / "one_process"), params(work / "two_processes"), strict=True)
    )
    print(f"\n2 processes × 4 devices vs 1 process × 8 devices, mesh fsdp 4 × tensor 2, 3 steps: "
          f"max |Δloss| {loss_diff:.2e}, |Δval loss| {abs(val[0] - val[1]):.2e}, "
          f"max |Δparam| {param_diff:.2e}")  # fmt: skip
    assert loss_diff <= TOL and param_diff <= TOL


def _one_error_line(code, err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip() and not ABSL_LOG.match(x)]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


def test_bad_mesh_settings_are_one_line_errors(children):
    results = _json(children[1]["mesh_errors"])
    for (name, (_, message)), r in zip(MESH_ERRORS.items(), results, strict=True):
        assert message in _one_error_line(r["code"], r["stderr"]), name


def test_unreachable_coordinator_is_a_one_line_error_not_a_hang(children):
    code, _, err, seconds = children[1]["coordinator"].result()
    line = _one_error_line(code, err)
    print(f"\nunreachable coordinator: exit {code} after {seconds:.1f} s: {line}")
    assert "cannot reach the coordinator at 127.0.0.1:" in line and "within 2s" in line
    assert seconds < 60  # start-up plus the 2 s wait, nowhere near the 120 s default


def test_tensor_group_spanning_processes_is_a_one_line_error(children):
    for rank in (0, 1):
        code, _, err, _ = children[1][f"spanning{rank}"].result()
        assert "spans processes [0, 1]" in _one_error_line(code, err)


def test_sigterm_to_one_process_stops_the_cluster_at_one_step(tmp_path, prepared_shakespeare):
    # SIGTERM reaches one process only; both must save the same step (a save is collective)
    # and exit 0, the other one saying why it stopped.
    (port,) = _free_ports(1)
    out = tmp_path / "term"
    args = [*TINY_OVERRIDES, f"data.prepared_dir={prepared_shakespeare}", f"train.out_dir={out}",
            *MULTIHOST_OVERRIDES, "train.max_steps=100000", "train.eval_every=0",
            "train.sample_every=0", "train.log_every=2", "mesh.distributed=on"]  # fmt: skip
    kids = [Child(f"term{rank}", [sys.executable, "-m", "gpt2_jax.train", *args],
                  _cluster_env(4, port, rank), tmp_path) for rank in (0, 1)]  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() or max(train_losses(out), default=0) < 4:
            running = all(k.seconds is None for k in kids)
            assert running and time.time() < deadline, [k.err.read_text()[-2000:] for k in kids]
            time.sleep(0.1)
        kids[1].proc.send_signal(signal.SIGTERM)
        for kid in kids:
            kid._waiter.join(120)  # a process left waiting in a collective would hang here
        assert all(k.seconds is not None for k in kids), "the cluster did not stop together"
    finally:
        for kid in kids:
            if kid.seconds is None:
                kid.proc.kill()
    (code0, _, err0, _), (code1, _, err1, _) = (k.result() for k in kids)
    assert (code0, code1) == (0, 0), (err0[-2000:], err1[-2000:])
    saved = [re.findall(r"saved step (\d+)", err) for err in (err0, err1)]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved
    step = int(saved[0][0])
    assert step % 2 == 0 and step >= 4  # processes agree at logging steps
    assert "SIGTERM" in err1 and "stop requested by another process" in err0
    assert (out / "checkpoints" / str(step)).is_dir()


def test_two_process_streaming_run_resumes_like_an_uninterrupted_one(tmp_path):
    """Each process streams its own documents; a checkpoint must carry every process's stream
    position (the JSON meta item is written by process 0 alone)."""
    ports = _free_ports(3)
    args = [*TINY_OVERRIDES, *MULTIHOST_OVERRIDES, "train.max_steps=6", "train.eval_every=0",
            "train.sample_every=0", "checkpoint.every=3", "data.streaming=true",
            "mesh.distributed=on"]  # fmt: skip
    train_cli = [sys.executable, "-m", "gpt2_jax.train", *args]

    def cluster(name: str, port: int, **env: str) -> list[Child]:
        out = f"train.out_dir={tmp_path / name.split('_')[0]}"
        return [Child(f"{name}{r}", [*train_cli, out], _cluster_env(4, port, r) | env, tmp_path)
                for r in (0, 1)]  # fmt: skip

    straight = cluster("straight", ports[0])
    first = cluster("stopped", ports[1], GPT2_JAX_PREEMPT_AT_STEP="3")
    for kid in (*straight, *first):
        kid.ok()
    assert "saved step 3" in first[0].err.read_text()
    for kid in cluster("stopped_resumed", ports[2]):
        kid.ok()
        assert "resuming from" in kid.err.read_text()
    ref, got = train_losses(tmp_path / "straight"), train_losses(tmp_path / "stopped")
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    assert all(got[s] == ref[s] for s in ref), (ref, got)
