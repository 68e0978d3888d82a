"""One torch peer of `bench train`, in a process of its own with its own allocator settings.

The parent writes one JSON line: {"kind", "args", "tokens", "tuned_malloc"}. The worker
builds and warms up the peer, answers "ready", then for every line holding a step count n
answers the median seconds per step over n timed steps. It exits when its stdin closes.
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

    from gpt2_jax.bench.train import _set_torch_threads, _timed, _torch

    _set_torch_threads()
    tokens_BT = np.asarray(spec["tokens"], np.int32)
    step, sync = _torch(spec["kind"], argparse.Namespace(**spec["args"]), tokens_BT)
    print("ready", flush=True)
    for line in sys.stdin:
        print(_timed(step, sync, int(line)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
