"""Where one train step's time goes, ours against HF's: kernel time, page faults, op groups.

    python -m benchmarks profile [--n-layer 4] [--n-head 12] [--n-embd 768]
        [--batch-size 4] [--seq-len 256] [--steps 3] [--peers hf] [--peer-malloc tuned]
        [--top 12] [--json]

Ours (in this process, chunked loss, as `bench train`): the median step time, the minor page
faults and the kernel (system) CPU time per step from `getrusage`, then a `jax.profiler`
trace of `--steps` steps whose thunks are matched to their instructions in the compiled
step's HLO and summed per group, by the named scopes in their op names: the LM head + loss
(`gpt2_jax.ops.chunked_loss`), the optimizer update, and the rest of the step, the first and the
last split into GEMM thunks and everything else. Thunks run on two threads at once and
XLA's Eigen dots report only their launch, so the groups overlap and undercount: they show
proportions; the step time is the wall time.

Each torch peer (in a worker process, `bench train`'s) reports the same getrusage figures and
its `--top` ops by self CPU time under `torch.profiler`, plus all its matmuls together.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import resource
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks._flags import name_list
from benchmarks.train import MALLOCS, PEERS, _PeerWorker, _timed
from gpt2_jax.errors import ArgParser, UserError, cli_main

TORCH_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
_RUNTIME_EVENTS = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool", "Threadpool",
                   "Wait ", "ParseArguments", "CommonPjRt", "Handle ", "Allocate", "Python",
                   "end: ")  # fmt: skip


def usage_per_step(step, sync, n: int) -> dict[str, float]:
    """Median wall ms, minor page faults and kernel ms per step over n synced steps."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    step_s = _timed(step, sync, n)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"step_ms": 1e3 * step_s,
            "page_faults": (after.ru_minflt - before.ru_minflt) / n,
            "kernel_ms": 1e3 * (after.ru_stime - before.ru_stime) / n}  # fmt: skip


def group_of(thunk: str, op_name: str) -> str:
    """The group a thunk's time is summed into (module doc), by the named scopes in its
    HLO instruction's op_name."""
    from gpt2_jax.ops.chunked_loss import SCOPE as LOSS
    from gpt2_jax.training.step import OPTIMIZER_SCOPE

    scopes = set(re.split(r"[/()]", op_name))  # a scope under jvp reads "jvp(name)"
    if OPTIMIZER_SCOPE in scopes:
        return "optimizer"
    part = "LM head + loss" if LOSS in scopes else "rest of the step"
    gemm = thunk.startswith("dot") or (thunk.startswith("ynn") and "dot_general" in op_name)
    return f"{part}: {'GEMMs' if gemm else 'other ops'}"


def thunk_groups(trace_file: Path, hlo_text: str, n_steps: int) -> dict[str, float]:
    """ms per step per group, from a perfetto trace and the compiled HLO."""
    ops = dict(re.findall(r'\n\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text))
    events = json.loads(gzip.open(trace_file).read())["traceEvents"]
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name in ops and not name.startswith(_RUNTIME_EVENTS):
            groups[group_of(name, ops[name])] += e.get("dur", 0) / 1e3 / n_steps
    return dict(sorted(groups.items()))


def _ours(args, tokens_BT: np.ndarray) -> dict:
    import jax

    from benchmarks.train import _ours as build
    from gpt2_jax import host_malloc

    step, sync, hlo_text = build(args, tokens_BT, "chunked", False)
    record = {"name": "gpt2_jax", "host_malloc": "tuned" if host_malloc.tuned() else "default"}
    record |= usage_per_step(step, sync, args.steps + 2)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            _timed(step, sync, args.steps)
        trace_file = next(Path(tmp).rglob("*.trace.json.gz"))
        record["groups_ms"] = thunk_groups(trace_file, hlo_text(), args.steps)
    return record


def run(args) -> list[dict]:
    shape = (args.batch_size, args.seq_len + 1)
    tokens_BT = np.random.default_rng(0).integers(0, 50257, shape).astype(np.int32)
    records = [_ours(args, tokens_BT)]
    for peer in args.peers:
        for malloc in args.peer_malloc:
            worker = _PeerWorker(peer, args, tokens_BT, malloc)
            try:
                record = worker.profile(args.steps, args.top)
            finally:
                worker.close()
            records.append({"name": peer, "host_malloc": malloc, **record})
    return records


def _report(records: list[dict], args) -> str:
    lines = [f"GPT-2 L={args.n_layer} H={args.n_head} d={args.n_embd} B={args.batch_size} "
             f"T={args.seq_len}, fp32, AdamW; per step"]  # fmt: skip
    for r in records:
        lines.append(f"{r['name']} (malloc {r['host_malloc']}): {r['step_ms']:.1f} ms, "
                     f"{r['page_faults']:,.0f} minor page faults, {r['kernel_ms']:.1f} ms in "
                     "the kernel")  # fmt: skip
        items = r.get("groups_ms") or r.get("ops_ms") or {}
        for key, ms in items.items():
            lines.append(f"  {ms:9.1f} ms  {key}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m benchmarks profile", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="steps timed and traced")
    p.add_argument("--peers", default="hf", help="comma list: hf,torch_ref, or none")
    p.add_argument("--peer-malloc", default="tuned", help="comma list: default,tuned")
    p.add_argument("--top", type=int, default=12, help="torch ops listed per peer")
    p.add_argument("--json", action="store_true", help="one JSON object per contender")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("n_layer", "n_head", "n_embd", "batch_size", "seq_len", "steps", "top"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.n_embd % args.n_head:
        raise UserError("--n-embd must be divisible by --n-head")
    args.peers = name_list(args.peers, PEERS, "--peers")
    args.peer_malloc = list(dict.fromkeys(name_list(args.peer_malloc, MALLOCS, "--peer-malloc")))
    if args.peers and not args.peer_malloc:
        raise UserError("--peer-malloc takes default, tuned or both")
    args.attention_impl, args.loss_chunk = "auto", 128
    records = run(args)
    if args.json:
        for r in records:
            print(json.dumps(r))
    else:
        print(_report(records, args))
    return 0
