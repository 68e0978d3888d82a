"""Shared pieces of the training and checkpoint tests: a tiny config on prepared Shakespeare."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

from gpt2_jax.config import Config, load_config

TINY_OVERRIDES = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.max_seq_len=64",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.min_lr=3e-4",
    "train.eval_steps=1",
    "train.log_every=1",
    "checkpoint.every=5",
    "checkpoint.keep=5",
]


def tiny_config(out_dir: Path, prepared: Path, *extra: str) -> Config:
    return load_config(
        "gpt2_jax/configs/default.yaml",
        [*TINY_OVERRIDES, f"train.out_dir={out_dir}", f"data.prepared_dir={prepared}", *extra],
    )


def train_losses(out_dir: Path) -> dict[int, float]:
    """step → training loss, from metrics.jsonl."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@contextlib.contextmanager
def lock_held_elsewhere(out_dir: Path):
    """Another process holds `out_dir`'s run lock for the duration; yields that process."""
    code = (
        "import time; from gpt2_jax.training.run_lock import RunLock; "
        f"RunLock({str(out_dir)!r}).acquire(); print('held', flush=True); time.sleep(300)"
    )
    repo = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
