"""One torch peer of `bench train`, in a process of its own with its own allocator settings.

The parent writes one JSON line: {"kind", "args", "tokens", "tuned_malloc"}. The worker
builds and warms up the peer, answers "ready", then for every line holding a step count n
answers the median seconds per step over n timed steps; for "profile n top", one JSON line
of `benchmarks.profile`'s figures over n steps. It exits when its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    if spec["tuned_malloc"]:
        from gpt2_jax import host_malloc

        host_malloc.tune()
    import numpy as np

    from benchmarks.train import _set_torch_threads, _timed, _torch

    _set_torch_threads()
    tokens_BT = np.asarray(spec["tokens"], np.int32)
    step, sync = _torch(spec["kind"], argparse.Namespace(**spec["args"]), tokens_BT)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.startswith("profile"):
            n, top = map(int, line.split()[1:])
            print(json.dumps(_profile(step, sync, n, top)), flush=True)
        else:
            print(_timed(step, sync, int(line)), flush=True)
    return 0


def _profile(step, sync, n: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.profile import TORCH_MATMULS, usage_per_step

    record = usage_per_step(step, sync, n + 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    ops = {e.key: e.self_cpu_time_total / 1e3 / n for e in events}
    matmuls = sum(ms for key, ms in ops.items() if key in TORCH_MATMULS)
    top_ops = dict(list(ops.items())[:top])
    rest = sum(ops.values()) - matmuls
    record["ops_ms"] = {**top_ops, "all matmuls": matmuls, "all other ops": rest}
    return record


if __name__ == "__main__":
    raise SystemExit(main())
