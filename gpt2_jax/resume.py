"""What a resumed run may change, and every process's data-loader position in a checkpoint.

A checkpoint records the model, train and data config it was saved with. On resume:

- `model.*`: only `dtype`, `attention_impl` and `dropout` may change (`check_same_architecture`);
- `train.*` / `data.*` in `FREE` may change silently: they shape logging, evaluation, output
  and how a step is computed, not the optimisation trajectory;
- those in `NOTICE` may change with a warning naming them (`max_steps` stretches the cosine
  schedule, so the learning rate jumps; `grad_accum` gives the same update up to rounding);
- any other change (seed, lr, schedule, optimizer, batch, sequence length, data source, …) is
  refused naming the keys; `checkpoint.*`, `mesh.*` and `wandb.*` may always change.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from gpt2_jax.checkpoint import check_same_architecture, config_diff, warn
from gpt2_jax.config import Config, TrainConfig, to_dict
from gpt2_jax.errors import UserError
from gpt2_jax.optim import lr_schedule

FREE = {
    "train": {
        "eval_every", "eval_steps", "log_every", "sample_every", "out_dir", "resume",
        "overwrite", "peak_flops", "remat", "skip_nonfinite", "init_from", "loss_impl",
        "loss_chunk", "profile_steps",
    },
    "data": {"prepared_dir", "num_threads"},
}  # fmt: skip
NOTICE = {"train": {"max_steps", "grad_accum"}, "data": set()}


def check_resume_config(saved: dict, step: int, cfg: Config, *, notify: bool = True) -> None:
    """Refuse a resume whose config differs from the checkpoint's where it must not; warn
    (when `notify`) where it may. `saved` is the checkpoint's meta, `step` its step."""
    check_same_architecture(saved["model"], cfg.model)
    refused, noticed = [], []
    for section in ("train", "data"):
        if saved.get(section) is None:  # checkpoints from before data configs were recorded
            continue
        now = to_dict(getattr(cfg, section))
        for key in config_diff(saved[section], now):
            change = f"{section}.{key}: {saved[section].get(key)!r} → {now.get(key)!r}"
            if key in NOTICE[section]:
                noticed.append(change)
            elif key not in FREE[section]:
                refused.append(change)
    if refused:
        raise UserError(
            f"the run in {cfg.train.out_dir} was saved with other settings "
            f"({', '.join(refused)}); resume with the saved values (its config.yaml) or use a "
            "new train.out_dir"
        )
    for change in noticed if notify else ():
        warn(f"resuming with {change}{_lr_note(saved['train'], cfg.train, step, change)}")


def _lr_note(saved_train: dict, now: TrainConfig, step: int, change: str) -> str:
    if not change.startswith("train.max_steps"):
        return ""
    before = float(lr_schedule(TrainConfig(**saved_train))(step))
    after = float(lr_schedule(now)(step))
    return f" (the cosine schedule is stretched: lr at step {step + 1} {before:.4g} → {after:.4g})"


def gather_data_states(state: dict) -> list[dict]:
    """Every process's loader state, in process order (a collective in a cluster): the JSON
    meta item is written by process 0 alone, so it must carry all of them."""
    if jax.process_count() == 1:
        return [state]
    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size], np.int64)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(blobs[i, : int(n)].tobytes()) for i, n in enumerate(sizes[:, 0])]


def own_data_state(meta: dict) -> dict | None:
    """This process's loader state from a checkpoint's meta (None when it has none)."""
    states = meta.get("data_states")
    if states is None:  # written by a single process before per-process states
        return meta.get("data_state")
    if any(states) and len(states) != jax.process_count():
        raise UserError(
            f"the checkpoint's data stream was saved by {len(states)} process(es) but this run "
            f"has {jax.process_count()}; resume a streaming run with the same process count"
        )
    index = jax.process_index()
    return states[index] if index < len(states) else {}
