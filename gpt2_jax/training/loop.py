"""The loop of one training run: a step, then each phase that is due after it.

`TrainLoop.run` reads top to bottom: `train_step`, then `evaluate`, `sample`, `checkpoint`,
`profile` and the stop check, each a method below. A step's metrics are fetched one step
late (`check`), so the host never waits on the device while the next step can be queued.
"""

from __future__ import annotations

import dataclasses
import math
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

from gpt2_jax.config import Config, to_dict
from gpt2_jax.data import get_batch
from gpt2_jax.data.tokenizer import VOCAB_SIZE, decode, encode
from gpt2_jax.decode.generation import generate
from gpt2_jax.errors import UserError
from gpt2_jax.formats.checkpoint import Checkpointer, warn
from gpt2_jax.training.metrics import (
    MetricsWriter,
    TensorBoard,
    Wandb,
    plot_loss_curve,
    unigram_baseline,
)
from gpt2_jax.training.resume import gather_data_states
from gpt2_jax.training.step import Trainer

SAMPLE_PROMPT = "\n"
EVAL_SEED_OFFSET = 1_000_003  # val batches never share the training seed


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


def evaluate(trainer: Trainer, params, val, cfg: Config, batch_size: int) -> float:
    """Mean loss over `train.eval_steps` fixed validation batches."""
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


@dataclasses.dataclass
class StepClock:
    """Step time = wall time from the end of step `synced` to the end of a logged step (its
    metrics were fetched, so it has finished), minus the time paused for eval, sampling and
    checkpoints, over the steps in between."""

    synced: int
    start: float = dataclasses.field(default_factory=time.perf_counter)
    data_time: float = 0.0
    paused: float = 0.0
    steady_tok_s: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.run_start = self.start

    def lap(self, step: int, now: float) -> tuple[float, float]:
        """(step time, data time) per step since the last lap; starts the next interval."""
        n = step - self.synced
        times = ((now - self.start - self.paused) / n, self.data_time / n)
        self.start, self.synced, self.data_time, self.paused = now, step, 0.0, 0.0
        return times

    def pause_since(self, t0: float) -> None:
        self.paused += time.perf_counter() - max(t0, self.start)


@dataclasses.dataclass
class RunInfo:
    """What the loop needs to know about the run beyond its config."""

    out: Path
    prepared_dir: Path
    n_params: int
    flops_per_step: float
    peak_flops_total: float
    eval_batch_size: int
    data_hash: str  # content hash of the prepared data (prepare's meta), saved in checkpoints
    data_change: dict | None = None  # the metrics.jsonl record of a resume on changed data


class TrainLoop:
    """Runs steps start+1 … max_steps of one run; `run` returns the summary dict."""

    def __init__(
        self, cfg: Config, info: RunInfo, trainer: Trainer, ckpt: Checkpointer, loader, val,
        state, start: int, *, preempt_at_step: int | None = None,
    ):  # fmt: skip
        self.cfg, self.t, self.info = cfg, cfg.train, info
        self.trainer, self.ckpt, self.loader, self.val = trainer, ckpt, loader, val
        self.state, self.step = state, start
        self.preempt_at_step = preempt_at_step
        self.is_main = jax.process_index() == 0
        self.writer = MetricsWriter(info.out / "metrics.jsonl", enabled=self.is_main,
                                    resume_step=start)  # fmt: skip
        if info.data_change:
            self.writer.write(info.data_change)
        self.tb = TensorBoard(info.out / "tb", enabled=self.is_main, resume_step=start)
        self.wandb = Wandb(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.name, info.out,
                           to_dict(cfg))  # fmt: skip
        self.clock = StepClock(synced=start)
        self.pending = None  # (step, metrics) not yet fetched
        self.last_val: float | None = None
        self.profiling = False
        self.stop = StopRequest()
        self.bar = tqdm(total=self.t.max_steps, initial=start, disable=not self.is_main,
                        dynamic_ncols=True, desc="train", file=sys.stderr)  # fmt: skip

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> dict:
        t = self.t
        try:
            with self.stop:
                while self.step < t.max_steps:
                    self.train_step()
                    paused_at = time.perf_counter()
                    if self.due(t.eval_every) or (t.eval_every and self.at_end):
                        paused_at = self.evaluate()
                    if self.due(t.sample_every):
                        self.sample()
                    if self.due(self.cfg.checkpoint.every):
                        self.checkpoint()
                    self.clock.pause_since(paused_at)
                    self.profile()
                    if self.stop_agreed() and not self.at_end:
                        return self.stopped()
                self.flush()
                self.save()
                self.ckpt.wait()
        finally:
            self.end_profile()
            self.tb.close()
            self.bar.close()
        return self.summary()

    @property
    def at_end(self) -> bool:
        return self.step == self.t.max_steps

    def due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0

    def logs(self, step: int) -> bool:
        return bool(self.t.log_every) and (step % self.t.log_every == 0 or step == self.t.max_steps)

    # -- phases -----------------------------------------------------------------------------

    def train_step(self) -> None:
        """Queue one step; fetch (check) the previous one's metrics meanwhile. A logged step
        is fetched before the next is queued: XLA may run a small step inline as it is
        queued, which would put its time in the logged step's interval."""
        if self.pending is not None and self.logs(self.pending[0]):
            self.flush()
        if self.t.profile_steps and self.step + 1 == self.t.profile_steps[0]:
            self.begin_profile()
        t0 = time.perf_counter()
        x, y = self.loader.batch(self.step)
        self.clock.data_time += time.perf_counter() - t0
        self.state, metrics = self.trainer.step(self.state, *self.trainer.shard_batch(x, y))
        self.step += 1
        self.flush()
        self.pending = (self.step, metrics)
        self.bar.update(1)

    def evaluate(self) -> float:
        """Validation loss; returns when the pause began (after the step itself finished)."""
        self.flush()
        paused_at = time.perf_counter()
        self.last_val = evaluate(self.trainer, self.state.params, self.val, self.cfg,
                                 self.info.eval_batch_size)  # fmt: skip
        record = {"step": self.step, "val_loss": self.last_val,
                  "val_ppl": math.exp(self.last_val)}  # fmt: skip
        self.log(record)
        self.bar.write(f"step {self.step}: val loss {self.last_val:.4f}, ppl "
                       f"{math.exp(self.last_val):.2f}", file=sys.stderr)  # fmt: skip
        return paused_at

    def sample(self) -> None:
        params = self.state.params
        if not all(a.is_fully_addressable for a in jax.tree.leaves(params)):
            # FSDP params span hosts: every process joins the gather, process 0 samples.
            params = multihost_utils.process_allgather(params, tiled=True)
        if self.is_main:
            text = sample_text(self.trainer, params, self.cfg)
            self.bar.write(f"--- sample at step {self.step} ---\n{text}", file=sys.stderr)

    def checkpoint(self) -> None:
        self.flush()  # never checkpoint a run that just went non-finite
        self.save()

    def profile(self) -> None:
        """End the `train.profile_steps` trace once its last step has finished."""
        if self.profiling and self.step == self.t.profile_steps[1]:
            self.flush()
            self.end_profile()
            print(f"profile of steps {self.t.profile_steps[0]}–{self.step} in "
                  f"{self.info.out / 'profile'}/", file=sys.stderr)  # fmt: skip

    def stop_agreed(self) -> bool:
        """Stop after this step? Alone: as soon as signalled. In a cluster every process must
        save the same step, so they agree at logging steps: any one signalled stops them all."""
        if self.step == self.preempt_at_step:
            self.stop.requested, self.stop.signal_name = True, "preempted"
        if jax.process_count() == 1:
            return self.stop.requested
        if self.step % (self.t.log_every or 1):
            return False
        flags = multihost_utils.process_allgather(np.asarray([self.stop.requested], np.int32))
        if flags.any() and not self.stop.requested:
            self.stop.requested, self.stop.signal_name = True, "stop requested by another process"
        return bool(flags.any())

    def stopped(self) -> dict:
        """Save the step reached and report it (a signal or a preemption)."""
        self.flush()
        self.save()
        self.ckpt.wait()  # raises unless the checkpoint committed
        self.bar.close()
        where = self.ckpt.directory / str(self.step)
        print(f"{self.stop.signal_name}: saved step {self.step} to {where}; run the same "
              "command to resume", file=sys.stderr)  # fmt: skip
        return {"stopped_at": self.step, "checkpoint": str(where)}

    # -- helpers ----------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        """One record to metrics.jsonl, TensorBoard and wandb."""
        self.writer.write(record)
        self.tb.log(record)
        self.wandb.log(record)

    def flush(self) -> None:
        """Fetch and check the pending step's metrics (waiting for that step), if any."""
        if self.pending is not None:
            self.check(*self.pending)
            self.pending = None

    def check(self, step: int, metrics) -> None:
        """Refuse (or skip) a non-finite step; log the metrics at logging steps."""
        t = self.t
        m = jax.device_get(metrics)  # waits for the step to finish
        now = time.perf_counter()
        if not m["finite"]:
            if not t.skip_nonfinite:
                good = self.ckpt.steps()
                raise UserError(
                    f"non-finite loss or gradient at step {step} (the update was not "
                    f"applied); last good checkpoint: "
                    f"{self.ckpt.directory / str(good[-1]) if good else 'none'}; lower train.lr "
                    "or set train.skip_nonfinite=true"
                )
            warn(f"step {step}: non-finite loss or gradient, update skipped")
        if self.logs(step):
            first_interval = self.clock.start == self.clock.run_start
            step_time, data_time = self.clock.lap(step, now)
            tok_s = t.batch_size * t.seq_len / step_time
            record = {
                "step": step,
                "loss": float(m["loss"]),
                "lr": float(m["lr"]),
                "grad_norm": float(m["grad_norm"]),
                "tokens_per_sec": tok_s,
                "mfu": self.info.flops_per_step / step_time / self.info.peak_flops_total,
                "step_time": step_time,
                "data_time": data_time,
                "skipped": int(m["skipped"]),
                **self.moe_record(m),
            }
            self.log(record)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:,.0f}",
                                 mfu=f"{record['mfu']:.1%}")  # fmt: skip
            if not first_interval:  # the first interval includes compilation
                self.clock.steady_tok_s.append(tok_s)

    def moe_record(self, m: dict) -> dict[str, float]:
        """The MoE stats of a logged step (means over MoE layers); `moe_dropped` only with a
        capacity factor."""
        keep = [k for k in m if k.startswith("moe_")]
        if self.cfg.model.moe_capacity_factor is None:
            keep = [k for k in keep if k != "moe_dropped"]
        return {k: float(m[k]) for k in keep}

    def save(self) -> None:
        meta = {
            "model": to_dict(self.cfg.model),
            "train": to_dict(self.t),
            "data": to_dict(self.cfg.data),
            "data_hash": self.info.data_hash,
            "data_states": gather_data_states(self.loader.state_dict()),
        }
        self.ckpt.save(self.state, meta)
        self.tb.flush()  # a crash then loses no event before this checkpoint

    def begin_profile(self) -> None:
        jax.profiler.start_trace(str(self.info.out / "profile"))
        self.profiling = True

    def end_profile(self) -> None:
        if self.profiling:
            jax.block_until_ready(self.state)
            jax.profiler.stop_trace()
            self.profiling = False

    def summary(self) -> dict:
        out = self.info.out
        png = None
        if self.is_main:
            png = plot_loss_curve(out / "metrics.jsonl", out / "loss.png", out.name)
        self.wandb.finish()
        steady = self.clock.steady_tok_s
        summary = {
            "steps": self.step,
            "params": self.info.n_params,
            "val_loss": self.last_val,
            "val_ppl": math.exp(self.last_val) if self.last_val is not None else None,
            "unigram_baseline_loss": unigram_baseline(self.info.prepared_dir),
            "loss_png": str(png) if png else None,
            "tensorboard": str(self.tb.logdir) if self.tb.logdir else None,
            "checkpoint": str(self.ckpt.directory / str(self.step)),
            "skipped_nonfinite": int(jax.device_get(self.state.skipped)),
            "tokens_per_sec": statistics.median(steady) if steady else None,
            "train_time_s": round(time.perf_counter() - self.clock.run_start, 1),
        }
        if self.is_main:
            print("summary: " + yaml.safe_dump(summary, sort_keys=False, width=200).strip()
                  .replace("\n", " | "), file=sys.stderr)  # fmt: skip
        return summary
