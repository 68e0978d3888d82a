"""`python -m gpt2_jax.train [--config FILE] [section.key=value ...]`: train a GPT-2 variant.

With no arguments it trains the `default` config on the built-in Shakespeare plays. Starting
in an out_dir that has checkpoints resumes from the newest good one. SIGTERM / SIGINT finish
the current step, save and exit 0; a second SIGINT aborts at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import typing
from pathlib import Path
from typing import Any

import jax

from gpt2_jax import compile_cache, data, host_malloc
from gpt2_jax.config import (
    ATTENTION_IMPLS,
    DTYPES,
    LOSS_IMPLS,
    MOE_IMPLS,
    POS_EMBEDDINGS,
    Config,
    ConfigError,
    config_names,
    dump_yaml,
    resolve_config_path,
)
from gpt2_jax.data import prepare_source
from gpt2_jax.errors import ArgParser, cli_main, notice
from gpt2_jax.formats.checkpoint import Checkpointer
from gpt2_jax.model.gpt import count_params
from gpt2_jax.model.layer_stack import relayout
from gpt2_jax.parallel import distributed, sharding
from gpt2_jax.training.init_from import initial_model, load_config, plan, source_config
from gpt2_jax.training.loop import RunInfo, TrainLoop
from gpt2_jax.training.metrics import (
    flops_per_token,
    peak_flops_per_device,
    write_atomic,
)
from gpt2_jax.training.resume import (
    check_data_hash,
    check_resume_config,
    data_change_record,
    own_data_state,
)
from gpt2_jax.training.run_dir import open_run, prepare_out_dir
from gpt2_jax.training.step import Trainer

# The enumerated keys and their values (the tuples validation checks against).
CHOICES: dict[str, tuple] = {
    "model.pos_embedding": POS_EMBEDDINGS,
    "model.dtype": ("auto", *DTYPES),
    "model.param_dtype": DTYPES,
    "model.attention_impl": ATTENTION_IMPLS,
    "model.moe_impl": MOE_IMPLS,
    "train.loss_impl": LOSS_IMPLS,
}


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def config_reference() -> str:
    """Every section and key of `Config` with its type, default, values (where enumerated) and
    one-line meaning, for `--help`; docs/config.md says more."""
    lines = ["config keys (section.key=value; more in docs/config.md):"]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        lines.append(f"  {section.name}:")
        types = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = f"{section.name}.{f.name}"
            values = f"  one of {', '.join(CHOICES[key])}" if key in CHOICES else ""
            lines.append(f"    {f.name}: {_type_name(types[f.name])} = {default!r}{values}")
            lines.append(f"        {f.metadata['help']}")
    lines.append(f"named configs (--config NAME): {', '.join(config_names())}")
    return "\n".join(lines)


def validate(cfg: Config) -> None:
    """Refuse settings that cannot train, before anything is built or written."""
    t, m = cfg.train, cfg.model
    # No loss scaling: float16 gradients underflow (and Adam's g² in float16 parameters), so
    # training would silently stall. Evaluation and generation may still run in float16.
    if m.dtype == "float16":
        raise ConfigError(
            "model.dtype=float16 trains without loss scaling (small gradients underflow); use "
            "model.dtype=bfloat16 (or float32)"
        )
    if m.param_dtype == "float16":
        raise ConfigError(
            "model.param_dtype=float16 cannot hold the optimizer state (Adam's g² underflows); "
            "use model.param_dtype=float32 (or bfloat16)"
        )
    if t.batch_size <= 0 or t.grad_accum <= 0 or t.seq_len <= 0 or t.max_steps <= 0:
        raise ConfigError("train.batch_size, grad_accum, seq_len and max_steps must be positive")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum="
            f"{t.grad_accum}; the batch is split into grad_accum equal micro-batches"
        )
    if m.pos_embedding == "learned" and t.seq_len > m.max_seq_len:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len} with learned "
            "positions; lower train.seq_len or raise model.max_seq_len"
        )
    for key in ("eval_every", "log_every", "sample_every", "eval_steps"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0")
    if t.eval_every and cfg.data.val_fraction == 0:
        raise ConfigError(
            f"data.val_fraction=0 leaves no validation data, but train.eval_every="
            f"{t.eval_every}; set train.eval_every=0 or a data.val_fraction > 0"
        )
    if t.profile_steps is not None:
        first, last = (t.profile_steps + [0, 0])[:2]
        if len(t.profile_steps) != 2 or not 1 <= first <= last <= t.max_steps:
            raise ConfigError(
                f"train.profile_steps={t.profile_steps} must be [START, STOP] with 1 <= START <= "
                f"STOP <= train.max_steps={t.max_steps}, e.g. train.profile_steps=[10,12]"
            )
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    if t.init_from:
        plan(source_config(t.init_from), m)  # a change that cannot map fails here, not later
    if cfg.wandb.mode not in ("disabled", "offline", "online"):
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r}; use disabled, offline or online")


def make_loaders(cfg: Config, prepared_dir: Path):
    t = cfg.train
    train_loader = data.make_train_loader(
        cfg.data,
        prepared_dir,
        seed=t.seed,
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    val = data.TokenDataset(prepared_dir / "val.bin")
    return train_loader, val


def check_vocab(cfg: Config, meta: dict, prepared_dir: Path) -> None:
    """The model must have a row for every id the tokenizer can emit."""
    n_ids = meta.get("vocab_size")
    if n_ids is not None and n_ids > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {n_ids} token ids of "
            f"the data in {prepared_dir} ({meta.get('tokenizer')}); set model.vocab_size >= "
            f"{n_ids}"
        )


def train(
    cfg: Config, *, inject_nan_step: int | None = None, preempt_at_step: int | None = None
) -> dict:
    """Run (or resume) training as configured; returns a summary dict.

    Test hooks: `inject_nan_step` poisons that step's loss; `preempt_at_step` behaves as if
    SIGTERM arrived during that step.
    """
    validate(cfg)
    distributed.initialize(cfg.mesh)
    out = prepare_out_dir(cfg)
    with open_run(cfg, out) as ckpt:
        return _run(cfg, out, ckpt, inject_nan_step, preempt_at_step)


def _saved_layout_target(trainer: Trainer, ckpt: Checkpointer, cfg: Config):
    """The restore target in the layer layout of the newest checkpoint (scanned or unrolled),
    laid out on this run's mesh; this run's own target when the layouts agree."""
    newest = ckpt.newest_meta()
    saved_scan = bool(newest and newest[0]["model"].get("scan_layers", False))
    if saved_scan == cfg.model.scan_layers:
        return jax.eval_shape(trainer.init_state)
    model_cfg = dataclasses.replace(cfg.model, scan_layers=saved_scan)
    return jax.eval_shape(Trainer(model_cfg, cfg.train, trainer.mesh).init_state)


def restore_or_init(trainer: Trainer, ckpt: Checkpointer, loader, cfg: Config, data_hash: str):
    """(state, step, saved meta): the newest good checkpoint (and the loader's position), else
    step 0 (meta None). A checkpoint of the other layer layout is restored in its own, then
    relaid out. `data_hash` is the prepared data's content hash, checked against the one the
    checkpoint recorded."""
    if ckpt.steps():
        target = _saved_layout_target(trainer, ckpt, cfg)

        def check(meta: dict, step: int) -> None:
            check_resume_config(meta, step, cfg, notify=False)
            check_data_hash(meta, step, data_hash, cfg, notify=False)

        if (restored := ckpt.restore_latest(target, check)) is not None:
            state, saved_meta, start = restored
            if saved_meta["model"].get("scan_layers", False) != cfg.model.scan_layers:
                own = jax.eval_shape(trainer.init_state)
                to_own = jax.jit(lambda s: relayout(s, own), out_shardings=trainer.state_shardings)
                state = to_own(state)
                notice(f"checkpoint step {start} holds the other layer layout; converted to "
                       f"model.scan_layers={cfg.model.scan_layers}")  # fmt: skip
            if (data_state := own_data_state(saved_meta)) is not None:
                loader.load_state_dict(data_state)
            print(f"resuming from {ckpt.directory / str(start)} (step {start})", file=sys.stderr)
            if cfg.train.init_from:
                notice(f"train.init_from={cfg.train.init_from} only starts a run; its weights "
                       "are not read on resume")  # fmt: skip
            return state, start, saved_meta
    if cfg.train.init_from:
        model = initial_model(cfg.model, cfg.train.init_from, cfg.train.seed)
        print(f"starting from the weights of {cfg.train.init_from}", file=sys.stderr)
        return trainer.state_from(model), 0, None
    return trainer.init_state(), 0, None


def _run(cfg: Config, out: Path, ckpt: Checkpointer, inject_nan_step, preempt_at_step) -> dict:
    t, is_main = cfg.train, jax.process_index() == 0
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer(cfg.model, t, mesh, inject_nan_step=inject_nan_step)

    # A resume is checked against the newest checkpoint's config before any data is prepared,
    # and its data hash before prepare writes or reuses anything: a refused command leaves the
    # run as it was.
    check_hash = None
    if (newest := ckpt.newest_meta()) is not None:
        check_resume_config(*newest, cfg)
        check_hash = functools.partial(check_data_hash, *newest, cfg=cfg)  # called by prepare
    prepared_dir = Path(cfg.data.prepared_dir or out / "data")
    meta = prepare_source(cfg.data, prepared_dir, show_progress=is_main, seq_len=t.seq_len,
                          check_hash=check_hash)  # fmt: skip
    check_vocab(cfg, meta, prepared_dir)
    loader, val = make_loaders(cfg, prepared_dir)
    state, start, saved = restore_or_init(trainer, ckpt, loader, cfg, meta["content_hash"])
    if is_main:  # only once the run is accepted: a refused resume leaves the run untouched
        write_atomic(out / "config.yaml", dump_yaml(cfg))

    n_params = count_params(trainer.model(state.params))
    n_flop_params = count_params(trainer.model(state.params), matmul_only=True)
    tokens_per_step = t.batch_size * t.seq_len
    flops_per_step = flops_per_token(cfg.model, n_flop_params, t.seq_len) * tokens_per_step
    peak, peak_source = peak_flops_per_device(t.peak_flops)
    peak_total = peak * jax.device_count()
    if is_main:
        print(
            f"model: {n_params / 1e6:.2f}M parameters | mesh {dict(mesh.shape)} | "
            f"{meta.get('tokens', {}).get('train', '?')} train tokens | peak "
            f"{peak / 1e9:.1f} GFLOP/s per device ({peak_source})",
            file=sys.stderr,
        )

    n_shards = math.prod(mesh.shape[a] for a in sharding.RULES["batch"])
    info = RunInfo(
        out=out,
        prepared_dir=prepared_dir,
        n_params=n_params,
        flops_per_step=flops_per_step,
        peak_flops_total=peak_total,
        eval_batch_size=max(n_shards, (t.batch_size // t.grad_accum) // n_shards * n_shards),
        data_hash=meta["content_hash"],
        data_change=data_change_record(saved, start, meta["content_hash"]) if saved else None,
    )
    loop = TrainLoop(cfg, info, trainer, ckpt, loader, val, state, start,
                     preempt_at_step=preempt_at_step)  # fmt: skip
    return loop.run()


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="python -m gpt2_jax.train",
        description="Train a GPT-2 variant. Overrides are section.key=value, values parsed as "
        "YAML scalars (null, true, 3e-4, [1, 2]). A config file may start from another with "
        "`base: NAME`.",
        epilog=config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="default", help="a YAML file, or a named config below")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    # Test hooks: poison one step's loss; behave as if SIGTERM arrived during a step.
    nan_step = os.environ.get("GPT2_JAX_INJECT_NAN_AT_STEP")
    preempt = os.environ.get("GPT2_JAX_PREEMPT_AT_STEP")
    train(
        cfg,
        inject_nan_step=int(nan_step) if nan_step else None,
        preempt_at_step=int(preempt) if preempt else None,
    )
    return 0


if __name__ == "__main__":
    host_malloc.tune()  # before jax starts its threads
    compile_cache.enable()
    raise SystemExit(main())
