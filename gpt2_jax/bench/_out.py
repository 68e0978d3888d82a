"""Where a benchmark writes when not told: a fresh folder under ./bench_out, never the docs."""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

from gpt2_jax.errors import UserError

OUT_ROOT = Path("bench_out")  # relative to the current directory; git-ignored


def fresh_out_dir(name: str) -> Path:
    """Create `bench_out/<name>-<YYYYmmdd-HHMMSS>/` (a -2, -3, ... suffix when that second's is
    taken) and name it on stderr."""
    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in itertools.count(1):
        path = OUT_ROOT / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot create {path} ({e.strerror}); pass an output path") from None
        print(f"writing into {path}/", file=sys.stderr, flush=True)
        return path
    raise AssertionError("unreachable")
