"""What a resumed run may change, and every process's data-loader position in a checkpoint.

A checkpoint records the model, train and data config it was saved with, and the content hash
of the prepared data it trained on. On resume:

- `model.*`: only `dtype`, `attention_impl` and `dropout` may change (`check_same_architecture`);
- `train.*` / `data.*` in `FREE` may change silently: they shape logging, evaluation, output
  and how a step is computed, not the optimisation trajectory;
- those in `NOTICE` may change with a warning naming them (`max_steps` stretches the cosine
  schedule, so the learning rate jumps; `grad_accum` gives the same update up to rounding,
  except with MoE and a non-zero `model.moe_aux_loss_coef`, where it is refused: the
  load-balance loss is computed per micro-batch);
- with `train.allow_data_change=true`, the keys in `DATA_CONTENT` join `NOTICE` and changed
  data is taken with a warning (`check_data_hash`);
- any other change (seed, lr, schedule, optimizer, batch, sequence length, data source, …) is
  refused naming the keys; `checkpoint.*`, `mesh.*` and `wandb.*` may always change.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from gpt2_jax.config import Config, TrainConfig, to_dict
from gpt2_jax.errors import UserError, notice
from gpt2_jax.formats.checkpoint import check_same_architecture, config_diff, warn
from gpt2_jax.training.optim import lr_schedule

FREE = {
    "train": {
        "eval_every", "eval_steps", "log_every", "sample_every", "out_dir", "resume",
        "overwrite", "peak_flops", "remat", "skip_nonfinite", "init_from", "loss_impl",
        "loss_chunk", "profile_steps", "allow_data_change",
    },
    "data": {"prepared_dir", "num_threads"},
}  # fmt: skip
NOTICE = {"train": {"max_steps", "grad_accum"}, "data": set()}
# What the prepared data is made of: may change only with train.allow_data_change=true.
DATA_CONTENT = {"source", "text_field", "decode_errors", "val_fraction"}


def check_resume_config(saved: dict, step: int, cfg: Config, *, notify: bool = True) -> None:
    """Refuse a resume whose config differs from the checkpoint's where it must not; warn
    (when `notify`) where it may. `saved` is the checkpoint's meta, `step` its step."""
    check_same_architecture(saved["model"], cfg.model)
    notice_keys = {
        "train": NOTICE["train"],
        "data": NOTICE["data"] | (DATA_CONTENT if cfg.train.allow_data_change else set()),
    }
    refused, noticed, refused_data = [], [], True
    for section in ("train", "data"):
        if saved.get(section) is None:  # checkpoints from before data configs were recorded
            continue
        now = to_dict(getattr(cfg, section))
        for key in config_diff(saved[section], now):
            change = f"{section}.{key}: {saved[section].get(key)!r} → {now.get(key)!r}"
            if key in notice_keys[section]:
                noticed.append(change)
            elif key not in FREE[section]:
                refused.append(change)
                refused_data &= section == "data" and key in DATA_CONTENT
    if refused:
        also = ", or set train.allow_data_change=true to go on with other data"
        raise UserError(
            f"the run in {cfg.train.out_dir} was saved with other settings "
            f"({', '.join(refused)}); resume with the saved values (its config.yaml) or use a "
            f"new train.out_dir{also if refused_data else ''}"
        )
    _check_moe_grad_accum(saved.get("train"), cfg)
    for change in noticed if notify else ():
        warn(f"resuming with {change}{_lr_note(saved['train'], cfg.train, step, change)}")


def _check_moe_grad_accum(saved_train: dict | None, cfg: Config) -> None:
    """Refuse a grad_accum change where it changes the update: MoE with a load-balance loss,
    whose f·P statistics are taken per micro-batch (docs/moe.md)."""
    m, now = cfg.model, cfg.train.grad_accum
    old = (saved_train or {}).get("grad_accum", now)
    if old == now or not (m.moe_experts and m.moe_aux_loss_coef):
        return
    raise UserError(
        f"train.grad_accum: {old} → {now} would change the updates of this MoE model: its "
        f"load-balance loss (model.moe_aux_loss_coef={m.moe_aux_loss_coef}) is computed per "
        f"micro-batch; keep train.grad_accum={old} or use a new train.out_dir"
    )


def check_data_hash(
    saved: dict, step: int, data_hash: str, cfg: Config, *, notify: bool = True
) -> None:
    """Refuse a resume whose prepared data (`data_hash`, prepare's content hash) is not the
    data checkpoint `step` (meta `saved`) trained on, unless `train.allow_data_change`; warn
    (when `notify`) when it goes on with changed data or the checkpoint recorded no hash."""
    old = saved.get("data_hash")
    if old is None:
        if notify:
            notice(
                f"checkpoint step {step} records no data hash (saved by an older version), so "
                "the data cannot be checked against it; the next checkpoint records it"
            )
        return
    if old == data_hash:
        return
    change = f"content hash {old[:12]} → {data_hash[:12]}"
    if not cfg.train.allow_data_change:
        raise UserError(
            f"the data of data.source={cfg.data.source!r} changed since checkpoint step {step} "
            f"was saved ({change}); restore that data, use a new train.out_dir, or set "
            "train.allow_data_change=true to go on with the new data"
        )
    if notify:
        warn(f"resuming on changed data ({change}), as train.allow_data_change=true; "
             "metrics.jsonl records it")  # fmt: skip


def data_change_record(saved: dict, step: int, data_hash: str) -> dict | None:
    """The metrics.jsonl record of a resume on other data than checkpoint `step`'s (None when
    the data is the same or the checkpoint recorded no hash)."""
    old = saved.get("data_hash")
    if old is None or old == data_hash:
        return None
    return {"step": step, "event": "data_changed", "data_hash_before": old,
            "data_hash_after": data_hash}  # fmt: skip


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
