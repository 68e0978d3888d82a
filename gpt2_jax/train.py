"""`python -m gpt2_jax.train [--config FILE] [section.key=value ...]`: train a GPT-2 variant.

With no arguments it trains configs/default.yaml on the built-in Shakespeare plays. Starting
in an out_dir that has checkpoints resumes from the newest good one. SIGTERM / SIGINT finish
the current step, save and exit 0; a second SIGINT aborts at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils
from tqdm import tqdm

from gpt2_jax import distributed, sharding
from gpt2_jax.checkpoint import Checkpointer, warn
from gpt2_jax.config import Config, ConfigError, dump_yaml, load_config, to_dict
from gpt2_jax.errors import ArgParser, UserError, cli_main, notice
from gpt2_jax.metrics import (
    MetricsWriter,
    Wandb,
    flops_per_token,
    peak_flops_per_device,
    plot_loss_curve,
    write_atomic,
)
from gpt2_jax.model import count_params
from gpt2_jax.resume import check_resume_config, gather_data_states, own_data_state
from gpt2_jax.run_dir import open_run, prepare_out_dir
from gpt2_jax.train_step import Trainer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SAMPLE_PROMPT = "\n"
EVAL_SEED_OFFSET = 1_000_003  # val batches never share the training seed


def resolve_config_path(name: str) -> Path:
    """A path as given, else a name under configs/ (with or without .yaml)."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return Path(name)


def validate(cfg: Config) -> None:
    """Refuse settings that cannot train, before anything is built or written."""
    t, m = cfg.train, cfg.model
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
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    if t.init_from:
        from gpt2_jax.init_from import plan, source_config

        plan(source_config(t.init_from), m)  # a change that cannot map fails here, not later
    if cfg.wandb.mode not in ("disabled", "offline", "online"):
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r}; use disabled, offline or online")


class StopRequest:
    """SIGTERM / first SIGINT: finish the step, save, exit 0. Second SIGINT: abort now."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        when = "this step" if jax.process_count() == 1 else "the next logging step (cluster)"
        print(f"\n{self.signal_name}: stopping after {when}, then saving…", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def make_loaders(cfg: Config, prepared_dir: Path):
    from gpt2_jax import data

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


def evaluate(trainer: Trainer, params, val, cfg: Config, batch_size: int) -> float:
    from gpt2_jax.data import get_batch

    losses = []
    for i in range(cfg.train.eval_steps):
        x, y = get_batch(
            val,
            seed=cfg.train.seed + EVAL_SEED_OFFSET,
            step=i,
            batch_size=batch_size,
            seq_len=cfg.train.seq_len,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        losses.append(trainer.eval_loss(params, *trainer.shard_batch(x, y)))
    return float(np.mean(jax.device_get(losses)))


def sample_text(trainer: Trainer, params, cfg: Config, max_new_tokens: int = 64) -> str:
    """A sample from `params`: device arrays are decoded in place, host arrays uploaded once."""
    from gpt2_jax.generate import generate
    from gpt2_jax.tokenizer import VOCAB_SIZE, decode, encode

    model = trainer.model(params)
    if cfg.model.vocab_size > VOCAB_SIZE:
        # A vocabulary padded by hand (model.vocab_size=50304): the ids past the tokenizer's
        # are padding for sampling, so GPT.logits masks them and decode never sees one.
        model.cfg = dataclasses.replace(
            model.cfg, vocab_size=VOCAB_SIZE, vocab_pad_multiple=model.cfg.padded_vocab
        )
    prompt = encode(SAMPLE_PROMPT)
    if cfg.model.pos_embedding == "learned":
        max_new_tokens = min(max_new_tokens, cfg.model.max_seq_len - len(prompt))
    tokens = generate(
        model, prompt, max_new_tokens=max_new_tokens, temperature=0.8, top_k=200,
        seed=cfg.train.seed,
    )  # fmt: skip
    return SAMPLE_PROMPT + decode(tokens[0].tolist())


def check_vocab(cfg: Config, meta: dict, prepared_dir: Path) -> None:
    """The model must have a row for every id the tokenizer can emit."""
    n_ids = meta.get("vocab_size")
    if n_ids is not None and n_ids > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {n_ids} token ids of "
            f"the data in {prepared_dir} ({meta.get('tokenizer')}); set model.vocab_size >= "
            f"{n_ids}"
        )


def unigram_baseline(prepared_dir: Path) -> float | None:
    """Val cross-entropy (nats/token) of the add-one-smoothed train unigram distribution."""
    try:
        train = np.memmap(prepared_dir / "train.bin", dtype=np.uint16, mode="r")
        val = np.memmap(prepared_dir / "val.bin", dtype=np.uint16, mode="r")
    except (OSError, ValueError):
        return None
    counts = np.bincount(train, minlength=65536).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean()) if len(val) else None


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


def restore_or_init(trainer: Trainer, ckpt: Checkpointer, loader, cfg: Config):
    """(state, step): the newest good checkpoint (and the loader's position), else step 0."""
    if ckpt.steps():
        target = jax.eval_shape(trainer.init_state)
        check = functools.partial(check_resume_config, cfg=cfg, notify=False)
        if (restored := ckpt.restore_latest(target, check)) is not None:
            state, saved_meta, start = restored
            if (data_state := own_data_state(saved_meta)) is not None:
                loader.load_state_dict(data_state)
            print(f"resuming from {ckpt.directory / str(start)} (step {start})", file=sys.stderr)
            if cfg.train.init_from:
                notice(f"train.init_from={cfg.train.init_from} only starts a run; its weights "
                       "are not read on resume")  # fmt: skip
            return state, start
    if cfg.train.init_from:
        from gpt2_jax.init_from import initial_model

        model = initial_model(cfg.model, cfg.train.init_from, cfg.train.seed)
        print(f"starting from the weights of {cfg.train.init_from}", file=sys.stderr)
        return trainer.state_from(model), 0
    return trainer.init_state(), 0


def _run(cfg: Config, out: Path, ckpt: Checkpointer, inject_nan_step, preempt_at_step) -> dict:
    from gpt2_jax.data import prepare_source

    t, is_main = cfg.train, jax.process_index() == 0
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer(cfg.model, t, mesh, inject_nan_step=inject_nan_step)

    # A resume is checked against the newest checkpoint's config before any data is prepared
    # or anything written: a refused command leaves the run as it was.
    if (newest := ckpt.newest_meta()) is not None:
        check_resume_config(*newest, cfg)
    prepared_dir = Path(cfg.data.prepared_dir or out / "data")
    meta = prepare_source(cfg.data, prepared_dir, show_progress=is_main, seq_len=t.seq_len)
    check_vocab(cfg, meta, prepared_dir)
    loader, val = make_loaders(cfg, prepared_dir)
    state, start = restore_or_init(trainer, ckpt, loader, cfg)
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

    writer = MetricsWriter(out / "metrics.jsonl", enabled=is_main, resume_step=start)
    wandb_run = Wandb(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name, out, to_dict(cfg))
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    eval_bs = max(n_shards, (t.batch_size // t.grad_accum) // n_shards * n_shards)

    def save() -> None:
        meta = {
            "model": to_dict(cfg.model),
            "train": to_dict(t),
            "data": to_dict(cfg.data),
            "data_states": gather_data_states(loader.state_dict()),
        }
        ckpt.save(state, meta)

    def stop_agreed(step: int) -> bool:
        """Stop after `step`? Alone: as soon as signalled. In a cluster every process must save
        the same step, so they agree at logging steps: any one signalled stops them all."""
        if jax.process_count() == 1:
            return stop.requested
        if step % (t.log_every or 1):
            return False
        flags = multihost_utils.process_allgather(np.asarray([stop.requested], np.int32))
        if flags.any() and not stop.requested:
            stop.requested, stop.signal_name = True, "stop requested by another process"
        return bool(flags.any())

    last_val = None
    pending = None  # (step, metrics) of the step before: checked one behind, keeps the queue full
    # Step time = wall time from the end of step `synced` to the end of the logged step (its
    # metrics are fetched, so it has finished), minus eval / sample / checkpoint time, over
    # the steps in between.
    interval_start, synced, data_time, paused = time.perf_counter(), start, 0.0, 0.0
    steady_tok_s: list[float] = []  # every interval but the first (which includes compilation)
    bar = tqdm(total=t.max_steps, initial=start, disable=not is_main, dynamic_ncols=True,
               desc="train", file=sys.stderr)  # fmt: skip
    step = start

    def check(prev) -> None:
        nonlocal interval_start, synced, data_time, paused
        prev_step, metrics = prev
        m = jax.device_get(metrics)  # waits for step prev_step to finish
        now = time.perf_counter()
        if not m["finite"]:
            if not t.skip_nonfinite:
                good = ckpt.steps()
                raise UserError(
                    f"non-finite loss or gradient at step {prev_step} (the update was not "
                    f"applied); last good checkpoint: "
                    f"{ckpt.directory / str(good[-1]) if good else 'none'}; lower train.lr or "
                    "set train.skip_nonfinite=true"
                )
            warn(f"step {prev_step}: non-finite loss or gradient, update skipped")
        if t.log_every and (prev_step % t.log_every == 0 or prev_step == t.max_steps):
            elapsed = now - interval_start - paused
            step_time = elapsed / (prev_step - synced)
            tok_s = tokens_per_step / step_time
            record = {
                "step": prev_step,
                "loss": float(m["loss"]),
                "lr": float(m["lr"]),
                "grad_norm": float(m["grad_norm"]),
                "tokens_per_sec": tok_s,
                "mfu": flops_per_step / step_time / peak_total,
                "step_time": step_time,
                "data_time": data_time / (prev_step - synced),
                "skipped": int(m["skipped"]),
            }
            writer.write(record)
            wandb_run.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:,.0f}",
                            mfu=f"{record['mfu']:.1%}")  # fmt: skip
            if interval_start > run_start:
                steady_tok_s.append(tok_s)
            interval_start, synced, data_time, paused = now, prev_step, 0.0, 0.0

    run_start = interval_start
    with StopRequest() as stop:
        while step < t.max_steps:
            t0 = time.perf_counter()
            x, y = loader.batch(step)
            data_time += time.perf_counter() - t0
            state, metrics = trainer.step(state, *trainer.shard_batch(x, y))
            step += 1
            if pending is not None:
                check(pending)
            pending = (step, metrics)
            bar.update(1)
            at_end = step == t.max_steps
            t_pause = time.perf_counter()
            if t.eval_every and (step % t.eval_every == 0 or at_end):
                check(pending)
                pending = None
                t_pause = time.perf_counter()
                last_val = evaluate(trainer, state.params, val, cfg, eval_bs)
                record = {"step": step, "val_loss": last_val, "val_ppl": math.exp(last_val)}
                writer.write(record)
                wandb_run.log(record)
                bar.write(
                    f"step {step}: val loss {last_val:.4f}, ppl {math.exp(last_val):.2f}",
                    file=sys.stderr,
                )
            if t.sample_every and step % t.sample_every == 0:
                params = state.params
                if not all(a.is_fully_addressable for a in jax.tree.leaves(params)):
                    # FSDP params span hosts: every process joins the gather, process 0 samples.
                    params = multihost_utils.process_allgather(params, tiled=True)
                if is_main:
                    text = sample_text(trainer, params, cfg)
                    bar.write(f"--- sample at step {step} ---\n{text}", file=sys.stderr)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                if pending is not None:
                    check(pending)  # never checkpoint a run that just went non-finite
                    pending = None
                save()
            paused += time.perf_counter() - max(t_pause, interval_start)
            if step == preempt_at_step:
                stop.requested, stop.signal_name = True, "preempted"
            if stop_agreed(step) and not at_end:
                if pending is not None:
                    check(pending)
                save()
                ckpt.wait()  # raises unless the checkpoint committed
                bar.close()
                print(f"{stop.signal_name}: saved step {step} to {ckpt.directory / str(step)}; "
                      "run the same command to resume", file=sys.stderr)  # fmt: skip
                return {"stopped_at": step, "checkpoint": str(ckpt.directory / str(step))}
        if pending is not None:
            check(pending)
        save()
        ckpt.wait()
    bar.close()

    png = plot_loss_curve(out / "metrics.jsonl", out / "loss.png", out.name) if is_main else None
    wandb_run.finish()
    summary = {
        "steps": step,
        "params": n_params,
        "val_loss": last_val,
        "val_ppl": math.exp(last_val) if last_val is not None else None,
        "unigram_baseline_loss": unigram_baseline(prepared_dir),
        "loss_png": str(png) if png else None,
        "checkpoint": str(ckpt.directory / str(step)),
        "skipped_nonfinite": int(jax.device_get(state.skipped)),
        "tokens_per_sec": statistics.median(steady_tok_s) if steady_tok_s else None,
        "train_time_s": round(time.perf_counter() - run_start, 1),
    }
    if is_main:
        print("summary: " + yaml.safe_dump(summary, sort_keys=False, width=200).strip()
              .replace("\n", " | "), file=sys.stderr)  # fmt: skip
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="python -m gpt2_jax.train",
        description="Train a GPT-2 variant. Overrides are section.key=value, values parsed as "
        "YAML scalars (null, true, 3e-4, [1, 2]).",
    )
    p.add_argument("--config", default="default", help="YAML file or a name in configs/")
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
    raise SystemExit(main())
