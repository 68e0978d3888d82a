"""One row of `python -m benchmarks variants`, in its own process.

    python -m benchmarks._variants_rows SPEC.json

A row is a spec dict (`kind` jax | hf | ref, the full `config`, measurement settings). The
process trains and measures the row, sends `{"ready": record}` as one JSON line on stdout, then
answers commands read from stdin, one JSON line each: `{"cmd": "train", "steps": n}` → the
seconds n more training steps take, `{"cmd": "decode"}` → the seconds of one decode run,
`{"cmd": "quit"}` → `{"final": fields}`. The parent can so time every row in alternating rounds
while all of them wait in memory, and load from other processes falls on the rows alike.

Memory methods:
- `xla-memory-analysis`: XLA's compiled memory analysis of the jitted train step (arguments +
  outputs + temporaries − donated aliases), the JAX rows' `peak_train_bytes` on CPU;
- `device-peak`: the accelerator allocator's peak (JAX `peak_bytes_in_use`, torch
  `max_memory_allocated`) on GPU;
- `rss-peak-growth`: the process's peak resident set while training minus its resident set
  just before (Linux VmHWM, reset through /proc/self/clear_refs), for every row on CPU: the
  one figure measured the same way for JAX and torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._variants_presets import MULTIPLES
from gpt2_jax import host_malloc
from gpt2_jax.config import Config, config_from_dict
from gpt2_jax.errors import UserError, cli_main

MULTIPLES_KEYS = tuple(f"{k}x" for k in MULTIPLES)
HEAD_CHUNK = 2048  # evaluation logits alive: [windows, 2048, vocab] at most

# ------------------------------------------------------------------------------ measurements


def _status_bytes(field: str) -> int | None:
    """A `kB` line of /proc/self/status in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def start_rss_peak() -> int | None:
    """Reset the peak-RSS mark to the current RSS; the current RSS, or None if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def rss_peak_growth(start: int | None) -> int | None:
    peak = _status_bytes("VmHWM")
    return None if start is None or peak is None else peak - start


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _cpu_device() -> str:
    return f"cpu: {cpu_name()} ({os.cpu_count()} cores)"


def mfu(cfg: Config, n_params_no_pos: int, tok_s: float | None, device: str) -> float | None:
    """PaLM MFU of `tok_s` against gpt2_jax.training.metrics' peak table (or
    train.peak_flops); None on CPU, which has no fixed peak, and on a device the table lacks."""
    from gpt2_jax.training.metrics import flops_per_token, table_peak_flops

    if device.startswith("cpu") or tok_s is None:
        return None
    peak = cfg.train.peak_flops or table_peak_flops(device)
    if not peak:
        return None
    return flops_per_token(cfg.model, n_params_no_pos, cfg.train.seq_len) * tok_s / peak


def xla_train_step_bytes(cfg: Config) -> int:
    """Compiled memory analysis of the train step `train()` runs (same Trainer, same shapes)."""
    import jax

    from gpt2_jax.parallel import sharding
    from gpt2_jax.training.step import Trainer

    t = cfg.train
    trainer = Trainer(cfg.model, t, sharding.make_mesh(cfg.mesh))
    batch = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), np.int32)
    compiled = trainer.step.lower(jax.eval_shape(trainer.init_state), batch, batch).compile()
    ma = compiled.memory_analysis()
    # XLA:CPU's peak_memory_in_bytes leaves out temporaries; add the buffers up instead.
    total = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
    return int(total - ma.alias_size_in_bytes)


def model_summary(m) -> dict:
    """The model fields a row's table line needs."""
    keys = ("n_layer", "n_head", "n_kv_head", "n_embd", "pos_embedding", "attention_window",
            "attention_impl", "moe_experts", "moe_top_k", "moe_every", "dtype")  # fmt: skip
    return {k: getattr(m, k) for k in keys}


def val_ppl_at(model, val: np.ndarray, seq_len: int, eval_tokens: int | None, batch: int) -> dict:
    """Validation perplexity with windows of k·seq_len for k in MULTIPLES, all over the same
    tokens (the first `eval_tokens`, or all, cut to a multiple of the longest window); None
    beyond max_seq_len for learned positions, which have no table there."""
    from gpt2_jax.evaluate import evaluate

    longest = MULTIPLES[-1] * seq_len
    n = (len(val) if eval_tokens is None else min(eval_tokens, len(val))) // longest * longest
    if n == 0:
        raise UserError(f"the val split holds {len(val):,} tokens, fewer than one "
                        f"{longest:,}-token window ({MULTIPLES[-1]}× seq_len)")  # fmt: skip
    out = {}
    for k in MULTIPLES:
        if model.cfg.pos_embedding == "learned" and k * seq_len > model.cfg.max_seq_len:
            out[f"{k}x"] = None
            continue
        res = evaluate(model, val[:n], seq_len=k * seq_len, batch_size=max(1, batch // k),
                       show_progress=False, head_chunk=HEAD_CHUNK)  # fmt: skip
        out[f"{k}x"] = res["perplexity"]
    return out


# --------------------------------------------------------------------------------- JAX rows


class JaxRow:
    """Train with `gpt2_jax.train.train`, then evaluate, and keep a timing copy of the step."""

    def __init__(self, spec: dict, say):
        import jax

        from gpt2_jax.data import TokenDataset
        from gpt2_jax.decode.kv_cache import bytes_per_token, cache_size
        from gpt2_jax.formats.checkpoint import load_model_weights
        from gpt2_jax.model.gpt import count_params
        from gpt2_jax.train import train

        self.cfg = cfg = config_from_dict(spec["config"])
        t, m = cfg.train, cfg.model
        on_gpu = jax.default_backend() != "cpu"
        if spec["gpu"] != on_gpu:
            want = "a GPU" if spec["gpu"] else "the CPU"
            raise UserError(f"the preset is for {want} but jax runs on "
                            f"{jax.default_backend()}; pick the matching --preset")  # fmt: skip
        if jax.device_count() > 1:
            raise UserError(f"jax sees {jax.device_count()} devices; the table is per device: "
                            "set CUDA_VISIBLE_DEVICES to one")  # fmt: skip
        # On CPU the analysis compiles first: its compiler memory stays out of the RSS peak and
        # train() loads the step from the compile cache. On GPU it comes after training, as
        # compiling (autotuning) allocates device memory and the device peak cannot be reset.
        xla_bytes = None if on_gpu else xla_train_step_bytes(cfg)
        rss0 = None if on_gpu else start_rss_peak()
        summary = train(cfg)
        rss_growth = rss_peak_growth(rss0)
        device_peak = None
        if on_gpu:
            device_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
            xla_bytes = xla_train_step_bytes(cfg)
        out = Path(t.out_dir)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]

        say("evaluating perplexity")
        self.model = model = load_model_weights(out)
        val = np.asarray(TokenDataset(Path(cfg.data.prepared_dir) / "val.bin").tokens, np.int32)
        ppl_at = val_ppl_at(model, val, t.seq_len, spec["eval_tokens"], spec["eval_batch"])
        context, self.new, batch = spec["decode_context"], spec["decode_new"], spec["decode_batch"]
        plen = context - self.new
        self.prompt_BT = np.stack([val[i * plen : (i + 1) * plen] for i in range(batch)])
        say("compiling the decode and timing steps")
        self.time_decode()  # compile
        self._timing_setup(out)
        n_no_pos = count_params(model, matmul_only=True)
        head = model.wte.embedding.size  # the LM head's matmul, tied or not: [V_pad, D]
        d = jax.devices()[0]
        device = _cpu_device() if d.platform == "cpu" else f"{d.platform}: {d.device_kind}"
        self.record = {
            "peak_train_bytes": device_peak if on_gpu else xla_bytes,
            "memory_method": "device-peak" if on_gpu else "xla-memory-analysis",
            "xla_train_step_bytes": xla_bytes,
            "peak_rss_growth_bytes": rss_growth,
            "params": summary["params"],
            "params_no_pos": n_no_pos,
            "active_params": n_no_pos,
            "active_params_blocks": n_no_pos - head,
            "model": model_summary(m),
            "train_tokens_per_sec_in_run": summary.get("tokens_per_sec"),
            "train_time_s": summary.get("train_time_s"),
            "kv_cache_bytes_per_token": bytes_per_token(m),
            "kv_cache_bytes_at_context": bytes_per_token(m) * cache_size(m, context),
            "val_ppl": ppl_at["1x"],
            "val_ppl_at": ppl_at,
            "val_curve": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r],
            "unigram_baseline_loss": summary.get("unigram_baseline_loss"),
            "steps": summary["steps"],
            "device": device,
            "framework": f"jax {jax.__version__}",
        }

    def _timing_setup(self, out: Path) -> None:
        """The trained state and the same compiled step, continuing the batch order."""
        import jax

        from gpt2_jax.data import make_train_loader
        from gpt2_jax.formats.checkpoint import Checkpointer
        from gpt2_jax.parallel import sharding
        from gpt2_jax.training.step import Trainer

        cfg, t = self.cfg, self.cfg.train
        self.trainer = Trainer(cfg.model, t, sharding.make_mesh(cfg.mesh))
        ckpt = Checkpointer(out, keep=1, async_save=False)
        try:
            self.state, _, self.next_step = ckpt.restore_latest(
                jax.eval_shape(self.trainer.init_state)
            )
        finally:
            ckpt.close()
        self.loader = make_train_loader(cfg.data, cfg.data.prepared_dir, seed=t.seed,
                                        batch_size=t.batch_size, seq_len=t.seq_len)  # fmt: skip
        self.time_train(1)  # the step comes from the compile cache: load it now

    def time_train(self, steps: int) -> float:
        """Seconds for `steps` more training steps (data loading included, as in train())."""
        import jax

        jax.block_until_ready(self.state)
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = self.loader.batch(self.next_step)
            self.state, _ = self.trainer.step(self.state, *self.trainer.shard_batch(x, y))
            self.next_step += 1
        jax.block_until_ready(self.state)
        return time.perf_counter() - t0

    def time_decode(self) -> float:
        """Seconds of greedy decoding from the end of the prompt to the fixed context, prefill
        excluded: the decode_new − 1 steps after the first new token."""
        from gpt2_jax.decode.sampling import Sampling
        from gpt2_jax.generate import decode_steps, sample_keys

        keys_B = sample_keys(0, self.prompt_BT.shape[0])
        steps = decode_steps(self.model, self.prompt_BT, max_new_tokens=self.new,
                             sampling=Sampling(0.0), keys_B=keys_B)  # fmt: skip
        last, _ = next(steps)
        last.block_until_ready()  # the prefill is done
        t0 = time.perf_counter()
        for tok_B, _ in steps:
            last = tok_B
        last.block_until_ready()
        return time.perf_counter() - t0

    def finish(self) -> dict:
        return {}


# ------------------------------------------------------------------------------- torch peers


def _torch_model(kind: str, cfg: Config):
    mc = cfg.model
    if kind == "hf":
        import transformers

        from gpt2_jax.formats.hf_format import EXTRA_KEYS, hf_config_dict

        transformers.logging.set_verbosity_error()
        drop = (*EXTRA_KEYS, "model_type", "architectures")
        hf = {k: v for k, v in hf_config_dict(mc).items() if k not in drop}
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf))
    from gpt2_torch_ref.model import GPT, RefConfig

    return GPT(RefConfig(**{k: getattr(mc, k) for k in RefConfig.__dataclass_fields__}))


class TorchRow:
    """The Standard config in torch (transformers GPT2LMHeadModel, or gpt2_torch_ref) with the
    same batches in the same order, the same AdamW settings, schedule and clipping."""

    def __init__(self, spec: dict, say):
        import torch

        from gpt2_jax.data import make_train_loader
        from gpt2_jax.training.optim import lr_schedule

        self.cfg = cfg = config_from_dict(spec["config"])
        t = cfg.train
        self.cuda = spec["gpu"]
        if self.cuda and not torch.cuda.is_available():
            raise UserError("the gpu preset's torch peer needs CUDA, and torch sees none")
        self.dev = "cuda" if self.cuda else "cpu"
        torch.manual_seed(t.seed)
        self.loader = make_train_loader(cfg.data, cfg.data.prepared_dir, seed=t.seed,
                                        batch_size=t.batch_size, seq_len=t.seq_len)  # fmt: skip
        self.schedule = lr_schedule(t)
        self.step_count, self.losses = 0, []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.rss0 = None if self.cuda else start_rss_peak()

        self.model = _torch_model(spec["kind"], cfg).to(self.dev).train()
        self.params = list(self.model.parameters())  # tied weights appear once
        groups = [
            {"params": [p for p in self.params if p.ndim >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
        self.bf16 = self.cuda and cfg.model.dtype != "float32"  # "auto" is bf16 on a GPU
        say("warming up")
        self.time_train(2)
        n_params = sum(p.numel() for p in self.params)
        version = f"torch {torch.__version__}"
        if spec["kind"] == "hf":
            import transformers

            version += f", transformers {transformers.__version__}"
        device = f"cuda: {torch.cuda.get_device_name()}" if self.cuda else _cpu_device()
        self.record = {
            "params": n_params,
            "params_no_pos": n_params - cfg.model.max_seq_len * cfg.model.n_embd,
            "memory_method": "device-peak" if self.cuda else "rss-peak-growth",
            "xla_train_step_bytes": None,
            "train_tokens_per_sec_in_run": None,
            "kv_cache_bytes_per_token": None,
            "kv_cache_bytes_at_context": None,
            "active_params": n_params - cfg.model.max_seq_len * cfg.model.n_embd,
            "active_params_blocks": None,
            "model": model_summary(cfg.model),
            "val_ppl": None,
            "val_ppl_at": dict.fromkeys(MULTIPLES_KEYS),
            "val_curve": [],
            "unigram_baseline_loss": None,
            "device": device,
            "framework": version,
        }

    def time_train(self, steps: int) -> float:
        import torch
        import torch.nn.functional as F

        t = self.cfg.train
        lrs = np.asarray(self.schedule(np.arange(self.step_count, self.step_count + steps)))
        t0 = time.perf_counter()
        for lr in lrs.tolist():
            batch = self.loader.batch(self.step_count)
            x, y = (torch.from_numpy(a.astype(np.int64)).to(self.dev) for a in batch)
            for g in self.opt.param_groups:
                g["lr"] = lr
            with torch.autocast(self.dev, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.model(x)
            logits = (out.logits if hasattr(out, "logits") else out).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
            self.opt.step()
            self.losses.append(loss.item())  # waits for the step on a GPU
            self.step_count += 1
        return time.perf_counter() - t0

    def time_decode(self) -> float:
        raise UserError("torch peers are timed for training only")

    def finish(self) -> dict:
        import torch

        growth = rss_peak_growth(self.rss0)
        peak = torch.cuda.max_memory_allocated() if self.cuda else growth
        return {"peak_train_bytes": peak, "peak_rss_growth_bytes": growth,
                "steps": self.step_count, "train_loss_last": self.losses[-1]}  # fmt: skip


# ------------------------------------------------------------------------------ entry point


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise UserError("usage: python -m benchmarks._variants_rows SPEC.json")
    spec = json.loads(Path(argv[0]).read_text())
    # Replies go to a private copy of stdout; anything else printed lands on stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def send(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    def say(msg: str) -> None:
        print(f"  {spec['name']}: {msg}", file=sys.stderr, flush=True)

    if spec["kind"] == "jax":
        import jax

        # The memory-analysis compile fills this cache, so train()'s compile is a cache load.
        jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    row = (JaxRow if spec["kind"] == "jax" else TorchRow)(spec, say)
    send({"ready": row.record})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "train":
            send({"seconds": row.time_train(cmd["steps"])})
        elif cmd["cmd"] == "decode":
            send({"seconds": row.time_decode()})
        else:
            break
    send({"final": row.finish()})
    return 0


if __name__ == "__main__":
    host_malloc.tune()  # before jax starts its threads
    raise SystemExit(main())
