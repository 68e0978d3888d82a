"""Where a benchmark writes: when not told, a fresh folder under ./bench_out, never the docs;
when told a --work-dir, only into folders that are new or empty."""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterable
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


def check_json_path(out: str | None) -> None:
    """Refuse an --out that names a directory, before any measuring."""
    if out and Path(out).is_dir():
        raise UserError(f"--out {out} is a directory; pass a JSON file path")


def write_json(out: str | None, name: str, data) -> Path:
    """`data` as JSON into `out`, or `bench_out/<name>-*/<name>.json` when not given."""
    path = Path(out) if out else fresh_out_dir(name) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def check_work_dir(work: Path, cfgs: Iterable) -> None:
    """Refuse, before any work, a --work-dir in which a run folder (train.out_dir) of `cfgs` or
    their prepared data (when inside `work`) already holds anything: a benchmark neither resumes
    nor overwrites a run, nor prepares data, it did not create in this call."""
    root, cfgs = work.resolve(), list(cfgs)
    runs = [Path(c.train.out_dir) for c in cfgs]
    data = [Path(c.data.prepared_dir) for c in cfgs if c.data.prepared_dir]
    # a data.prepared_dir outside `work` is the user's own, shared on purpose
    for path in dict.fromkeys(runs + [d for d in data if d.resolve().is_relative_to(root)]):
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"--work-dir {work}: {path} already exists and is not empty (this "
                            "benchmark would mix with or overwrite it); pick an empty or new "
                            "--work-dir")  # fmt: skip
