"""Orbax checkpoints of a training run: save, resume from the newest good one, load weights.

A checkpoint `out_dir/checkpoints/<step>/` holds three items: `params` (the model), `opt`
(optimizer state, step, skip count) and `meta` (JSON: configs and the data-loader state).
Orbax writes into a temporary directory and renames it when the save commits, so an
interrupted save never looks complete; a committed one that cannot be read (truncated or
corrupted files) is skipped with a warning in favour of the one before.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from gpt2_jax.config import ConfigError, ModelConfig, model_config_from_dict, to_dict
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT

ITEMS = ("params", "opt", "meta")

# Orbax logs every save at INFO through absl; keep the training progress bar readable.
logging.getLogger("absl").setLevel(logging.WARNING)


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir).absolute() / "checkpoints"


def _abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """A CheckpointManager that is always waited on and closed, and never swallows errors."""

    def __init__(self, out_dir: str | Path, *, keep: int, async_save: bool):
        self.directory = checkpoint_dir(out_dir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state, meta: dict) -> None:
        """Start saving `state` (a TrainState) at its step; errors of the previous save surface."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        opt = {"step": state.step, "opt_state": state.opt_state, "skipped": state.skipped}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt=ocp.args.StandardSave(opt),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore_latest(
        self, target_state, check_meta: Callable[[dict], None] | None = None
    ) -> tuple[Any, dict, int] | None:
        """(state, meta, step) from the newest readable checkpoint, or None if there is none.

        `target_state` is a TrainState whose leaves carry the shardings to restore onto (the
        current mesh), so a run saved on one layout resumes on another. `check_meta` sees the
        saved metadata before any array is read and may refuse it by raising.
        """
        from gpt2_jax.train_step import TrainState

        abstract = _abstract(target_state)
        opt_target = {
            "step": abstract.step,
            "opt_state": abstract.opt_state,
            "skipped": abstract.skipped,
        }
        for step in reversed(self.steps()):
            try:
                meta = self.manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )
            except Exception as e:  # a damaged checkpoint: warn and fall back to the previous
                warn(f"checkpoint {self.directory / str(step)} is unreadable "
                     f"({type(e).__name__}); trying the previous one")  # fmt: skip
                continue
            if check_meta is not None:
                check_meta(meta.meta)  # a refusal is the user's to see, not a damaged checkpoint
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(abstract.params),
                        opt=ocp.args.StandardRestore(opt_target),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # a damaged checkpoint: warn and fall back to the previous
                warn(f"checkpoint {self.directory / str(step)} is unreadable "
                     f"({type(e).__name__}); trying the previous one")  # fmt: skip
                continue
            opt = restored.opt
            state = TrainState(opt["step"], restored.params, opt["opt_state"], opt["skipped"])
            return state, restored.meta, step
        return None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def config_diff(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between two model-config dicts."""
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k)]


# Fields that change how the model computes, not what its weights are.
COMPUTE_ONLY = ("dtype", "attention_impl", "dropout")


def check_same_architecture(saved: dict, current: ModelConfig) -> None:
    now = to_dict(current)
    diff = [k for k in config_diff(saved, now) if k not in COMPUTE_ONLY]
    if diff:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in diff)
        raise UserError(
            f"the checkpoint was trained with a different model config ({pairs}); use a new "
            "train.out_dir or the same model settings"
        )


def _find_step_dir(path: Path) -> tuple[Path, list[int]]:
    """The checkpoints directory and its committed steps, for an out_dir / checkpoints dir /
    single step dir."""
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir():
            steps = sorted(
                int(p.name)
                for p in candidate.iterdir()
                if p.name.isdigit() and (p / "meta").exists() and (p / "params").exists()
            )
            if steps:
                return candidate, steps
    if path.name.isdigit() and (path / "params").exists():
        return path.parent, [int(path.name)]
    raise UserError(
        f"{path} holds no checkpoint (expected a run's out_dir, its checkpoints/ directory, "
        "one checkpoint step, or a folder written by `gpt2_jax.convert`)"
    )


def load_model_weights(path: str | Path, **overrides) -> GPT:
    """Weights only (no optimizer state read) of the newest readable checkpoint under `path`."""
    directory, steps = _find_step_dir(Path(path))
    errors = []
    for step in reversed(steps):
        item_dir = directory / str(step)
        try:
            meta = ocp.JsonCheckpointHandler().restore(item_dir / "meta")
            cfg_dict = dict(meta["model"])
            cfg = model_config_from_dict(cfg_dict)
            cfg = dataclasses.replace(cfg, **overrides)
            model = GPT(cfg, rngs=nnx.Rngs(0))
            params = nnx.state(model, nnx.Param)
            with ocp.StandardCheckpointer() as ckptr:
                restored = ckptr.restore(item_dir / "params", _abstract(params))
            nnx.update(model, restored)
            return model
        except ConfigError:
            raise
        except Exception as e:  # damaged newest checkpoint: fall back to the previous one
            warn(f"checkpoint {item_dir} is unreadable ({type(e).__name__}); trying the previous")
            errors.append(e)
    raise UserError(f"no readable checkpoint under {directory} ({len(errors)} damaged)")
