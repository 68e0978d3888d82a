"""Orbax checkpoints of a training run: save, resume from the newest good one, load weights.

A checkpoint `out_dir/checkpoints/<step>/` holds three items: `params` (the model), `opt`
(optimizer state, step, skip count) and `meta` (JSON: configs and the data-loader state).
Orbax writes into a temporary directory and renames it when the save commits, so an
interrupted save never looks complete. On resume, a committed checkpoint that cannot be read
(truncated or corrupted files) is moved to `out_dir/damaged_checkpoints/` with a warning in
favour of the one before; one that reads but holds other arrays than the run builds (another
optimizer setting) is refused, never taken for damage.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from gpt2_jax.config import ConfigError, ModelConfig, model_config_from_dict, to_dict
from gpt2_jax.errors import UserError
from gpt2_jax.model.gpt import GPT

ITEMS = ("params", "opt", "meta")

# Orbax logs every save at INFO through absl; keep the training progress bar readable.
logging.getLogger("absl").setLevel(logging.WARNING)


class TrainState(NamedTuple):
    """What a checkpoint holds: the training state the jitted step carries."""

    step: jax.Array  # int32 scalar: updates applied or skipped so far
    params: Any  # nnx.State of Params, fp32
    opt_state: Any
    skipped: jax.Array  # int32 scalar: non-finite updates skipped


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir).absolute() / "checkpoints"


def _abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class CheckpointError(UserError):
    """A save that did not happen, or a checkpoint that cannot be restored into this run."""


def _leaf_shapes(tree) -> dict[str, tuple]:
    """Dotted leaf name → shape, named as Orbax names the arrays it stores."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): tuple(x.shape) for p, x in flat}


def _layout_diff(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str:
    """'' when the stored arrays are the wanted ones, else a short description."""
    missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    reshaped = sorted(k for k in wanted.keys() & saved.keys() if wanted[k] != saved[k])
    parts = [
        f"{what} {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        for what, names in (("missing", missing), ("unexpected", extra), ("reshaped", reshaped))
        if names
    ]
    return "; ".join(parts)


class Checkpointer:
    """A CheckpointManager that is always waited on and closed, and never swallows errors.

    A save either commits or raises `CheckpointError`; a damaged checkpoint found on restore
    is moved aside to `out_dir/damaged_checkpoints/` (never deleted) so later saves of lower
    steps are not refused.
    """

    def __init__(self, out_dir: str | Path, *, keep: int, async_save: bool):
        self.directory = checkpoint_dir(out_dir)
        self.damaged_dir = self.directory.parent / "damaged_checkpoints"
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._open()
        self.pending: int | None = None  # step of a save started but not yet confirmed

    def _open(self) -> None:
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=self._options, item_handlers=handlers
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state, meta: dict) -> None:
        """Start saving `state` (a TrainState) at its step; errors of the previous save surface."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        self.wait()  # a failed earlier save is reported as itself, before this one starts
        opt = {"step": state.step, "opt_state": state.opt_state, "skipped": state.skipped}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt=ocp.args.StandardSave(opt),
            meta=ocp.args.JsonSave(meta),
        )
        try:
            started = self.manager.save(step, args=args)
        except Exception as e:  # any failure to write is reported, never hidden
            raise self._save_error(step, e) from e
        if not started:
            raise CheckpointError(
                f"Orbax declined to save step {step} (newest on disk: "
                f"{self.manager.latest_step()}); nothing was written"
            )
        self.pending = step

    def wait(self) -> int | None:
        """Block until the running save commits; returns its step (None if none was running)."""
        step, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(step, e) from e
        if step is not None and not (self.directory / str(step)).is_dir():
            raise self._save_error(step, RuntimeError("the step directory was not committed"))
        return step

    def _save_error(self, step: int | None, e: Exception) -> CheckpointError:
        good = [s for s in self.steps() if s != step]
        last = str(self.directory / str(good[-1])) if good else "none"
        return CheckpointError(
            f"saving checkpoint step {step} failed ({type(e).__name__}: {e}); the newest "
            f"complete checkpoint is {last}; fix the cause (disk space, permissions) and run "
            "the same command to resume"
        )

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()

    def newest_meta(self) -> tuple[dict, int] | None:
        """(meta, step) of the newest checkpoint whose metadata reads, or None."""
        for step in reversed(self.steps()):
            try:
                return self._read(step, meta=ocp.args.JsonRestore()).meta, step
            except Exception:  # damaged: restore_latest deals with it
                continue
        return None

    def restore_latest(
        self, target_state, check_meta: Callable[[dict, int], None] | None = None
    ) -> tuple[Any, dict, int] | None:
        """(state, meta, step) from the newest readable checkpoint, or None if there is none.

        `target_state` is a TrainState whose leaves carry the shardings to restore onto (the
        current mesh), so a run saved on one layout resumes on another. `check_meta(meta, step)`
        sees the saved metadata before any array is read and may refuse it by raising. A checkpoint
        whose arrays are not the ones this run holds is refused (`CheckpointError`); only an
        unreadable one is moved aside in favour of the one before. When every checkpoint is
        unreadable nothing is moved and the run is refused.
        """
        abstract = _abstract(target_state)
        opt_target = {
            "step": abstract.step,
            "opt_state": abstract.opt_state,
            "skipped": abstract.skipped,
        }
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                meta = self._read(step, meta=ocp.args.JsonRestore()).meta
                stored = self.manager.item_metadata(step)
                layouts = {k: _leaf_shapes(stored[k]) for k in ("params", "opt")}
            except Exception as e:  # unreadable = damaged
                damaged.append((step, type(e).__name__))
                continue
            if check_meta is not None:
                check_meta(meta, step)  # a refusal is the user's to see, not a damaged checkpoint
            self._check_layout(step, layouts, abstract.params, opt_target)
            try:
                restored = self._read(
                    step,
                    params=ocp.args.StandardRestore(abstract.params),
                    opt=ocp.args.StandardRestore(opt_target),
                    meta=ocp.args.JsonRestore(),
                )
            except Exception as e:  # the layout matched, so the data is damaged
                damaged.append((step, type(e).__name__))
                continue
            self._move_aside(damaged)
            opt = restored.opt
            state = TrainState(opt["step"], restored.params, opt["opt_state"], opt["skipped"])
            return state, restored.meta, step
        if damaged:
            listed = ", ".join(f"{s} ({why})" for s, why in damaged)
            raise CheckpointError(
                f"no checkpoint under {self.directory} can be read (damaged: {listed}); nothing "
                "was moved or deleted. Start over with train.resume=false train.overwrite=true, "
                "or use another train.out_dir"
            )
        return None

    def _read(self, step: int, **items):
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def _check_layout(self, step: int, layouts: dict, params, opt) -> None:
        for item, wanted in (("params", params), ("opt", opt)):
            diff = _layout_diff(layouts[item], _leaf_shapes(wanted))
            if diff:
                what = "model parameters" if item == "params" else "optimizer state"
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} holds other {what} than this run "
                    f"builds ({diff}); resume with the settings it was saved with "
                    f"({self.directory.parent / 'config.yaml'}) or use another train.out_dir"
                )

    def _move_aside(self, damaged: list[tuple[int, str]]) -> None:
        """Rename damaged steps into damaged_checkpoints/ (process 0), then forget them."""
        if not damaged:
            return
        if jax.process_index() == 0:
            self.damaged_dir.mkdir(exist_ok=True)
            for step, why in damaged:
                dest = self.damaged_dir / str(step)
                n = 1
                while dest.exists():
                    dest, n = self.damaged_dir / f"{step}.{n}", n + 1
                (self.directory / str(step)).rename(dest)
                warn(f"checkpoint {self.directory / str(step)} is unreadable ({why}); moved "
                     f"to {dest}")  # fmt: skip
        if jax.process_count() > 1:  # the others must not list a step process 0 just moved
            multihost_utils.sync_global_devices("gpt2_jax: damaged checkpoints moved")
        self.manager.close()
        self._open()


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def config_diff(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between two model-config dicts."""
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k)]


# Fields that change how the model computes or lays its weights out, not what they are.
# The MoE loss weights, capacity and path change the computation, not the weights.
COMPUTE_ONLY = (
    "dtype", "attention_impl", "dropout", "scan_layers",
    "moe_capacity_factor", "moe_aux_loss_coef", "moe_z_loss_coef", "moe_impl",
)  # fmt: skip


def check_same_architecture(saved: dict, current: ModelConfig) -> None:
    """Refuse a model config that differs from the checkpoint's outside COMPUTE_ONLY."""
    # A key newer than the checkpoint (vocab_pad_multiple) held its default when it was saved.
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    saved = {**defaults, **saved}
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


def newest_meta_of(path: str | Path) -> dict:
    """The meta item (configs) of the newest readable checkpoint under `path`."""
    directory, steps = _find_step_dir(Path(path))
    for step in reversed(steps):
        try:
            return ocp.JsonCheckpointHandler().restore(directory / str(step) / "meta")
        except Exception:  # damaged: try the previous one
            continue
    raise UserError(f"no readable checkpoint under {directory}")


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
