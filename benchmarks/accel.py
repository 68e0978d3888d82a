"""The accelerator check: one command that measures what a GPU / TPU user gets, in minutes.

    python -m benchmarks accel [--batch-size 16] [--seq-len 1024] [--steps 20]
        [--new-tokens 256] [--out FILE] [--smoke]

Prints, in bf16 on the first device:
1. attention: the platform's flash kernel (cuDNN on a GPU, Pallas splash on a TPU) against
   xla, outputs and gradients, full and windowed (w 256), GQA (12 query heads, 4 K/V heads,
   head dim 64): max relative difference and fwd+bwd time each;
2. GPT-2 124M training at T = seq_len: tok/s, MFU, the compiled step's peak memory, its
   compile time and the attention / MoE paths `auto` chose and the kernels (custom calls) the
   program makes, for unrolled vs scanned layers and full vs chunked loss (4 rows, one
   compile each: the timed steps run the compiled program);
3. decode: tok/s of cached greedy generation, batch 1, `--new-tokens` tokens.

On CPU it refuses. `--smoke` runs the same code on a tiny model and short shapes, on any
backend (with the chunked attention standing in for cuDNN off GPU): a check of the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

from benchmarks import scale
from benchmarks._out import check_json_path, write_json
from gpt2_jax.errors import ArgParser, UserError, cli_main

LAYOUTS = (("unrolled", False), ("scanned", True))
LOSSES = ("full", "chunked")


def _time(fn, *args, repeats: int) -> float:
    """Median seconds of fn(*args) (synchronised), after one warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def attention_check(impl: str, B: int, T: int, repeats: int) -> list[dict]:
    """`impl` against xla in bf16: relative output / gradient differences and fwd+bwd ms."""
    import jax
    import jax.numpy as jnp

    from gpt2_jax.model.attention import dot_product_attention

    N, K, H = 12, 4, 64
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, K, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, K, H), jnp.bfloat16)
    g = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)
    rows = []
    for window in (None, min(256, T // 2)):

        def fwd_bwd(q, k, v, impl=impl, window=window):
            out, vjp = jax.vjp(
                lambda q, k, v: dot_product_attention(q, k, v, window=window, impl=impl), q, k, v
            )
            return out, *vjp(g)

        ours, ref = jax.jit(fwd_bwd), jax.jit(functools.partial(fwd_bwd, impl="xla"))
        got, want = ours(q, k, v), ref(q, k, v)
        rel = [
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                  / jnp.max(jnp.abs(b.astype(jnp.float32))))
            for a, b in zip(got, want, strict=True)
        ]  # fmt: skip
        rows.append({
            "impl": impl, "window": window, "B": B, "T": T, "heads": f"{N}q/{K}kv x {H}",
            "rel_diff_out": rel[0], "rel_diff_grads": max(rel[1:]),
            "ms": 1e3 * _time(ours, q, k, v, repeats=repeats),
            "xla_ms": 1e3 * _time(ref, q, k, v, repeats=repeats),
        })  # fmt: skip
    return rows


def training(cfg, steps: int) -> list[dict]:
    """Train-step tok/s, MFU and compiled peak memory per layout × loss impl."""
    import jax
    import numpy as np

    from gpt2_jax.parallel.sharding import make_mesh
    from gpt2_jax.training.metrics import peak_flops_per_device
    from gpt2_jax.training.step import Trainer

    t = cfg.train
    peak, peak_source = peak_flops_per_device(t.peak_flops)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1)).astype(np.int32)
    rows = []
    for layout, scan in LAYOUTS:
        for loss in LOSSES:
            model_cfg = dataclasses.replace(cfg.model, scan_layers=scan)
            train_cfg = dataclasses.replace(t, loss_impl=loss)
            mesh = make_mesh(cfg.mesh, jax.devices()[:1])
            trainer = Trainer(model_cfg, train_cfg, mesh)
            state = trainer.init_state()
            x, y = trainer.shard_batch(ids[:, :-1], ids[:, 1:])
            t0 = time.perf_counter()
            step = trainer.step.lower(state, x, y).compile()  # the one compile, also timed
            compile_s = time.perf_counter() - t0
            mem = step.memory_analysis()
            # paths auto chose, kernels, analytic FLOPs per step: as bench scale reports them
            paths = scale.paths_and_flops(
                dataclasses.replace(cfg, model=model_cfg, train=train_cfg), mesh, step
            )
            state, m = step(state, x, y)  # warm-up
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for _ in range(steps):
                state, m = step(state, x, y)
            jax.block_until_ready(m)
            sec = (time.perf_counter() - t0) / steps
            rows.append({
                "layout": layout, "loss_impl": loss, "compile_s": compile_s,
                "attention_impl": paths["attention_impl"], "moe_impl": paths["moe_impl"],
                "custom_calls": paths["custom_calls"], "step_ms": 1e3 * sec,
                "tokens_per_sec": t.batch_size * t.seq_len / sec,
                "mfu": paths["flops_analytic"] / sec / peak, "peak_flops": peak,
                "peak_source": peak_source,
                "compiled_peak_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes,
                "loss": float(m["loss"]),
            })  # fmt: skip
            del state
    return rows


def decode(cfg, new_tokens: int) -> dict:
    """Cached greedy decoding of batch 1: tokens per second after a warm-up run."""
    from flax import nnx

    from gpt2_jax.generate import generate
    from gpt2_jax.model.gpt import GPT

    model = GPT(cfg.model, rngs=nnx.Rngs(0))
    model.eval()
    prompt = list(range(1, 17))
    generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0)  # compile
    t0 = time.perf_counter()
    generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0)
    sec = time.perf_counter() - t0
    return {"new_tokens": new_tokens, "tokens_per_sec": new_tokens / sec}


def run(args) -> dict:
    import jax

    from gpt2_jax.config import load_config, resolve_config_path

    backend = jax.default_backend()
    if backend == "cpu" and not args.smoke:
        raise UserError("bench accel measures a GPU or TPU, and JAX sees only CPU devices; run "
                        "it on an accelerator host (jax[cuda12] or jax[tpu] installed), or pass "
                        "--smoke to check the script on a tiny model")  # fmt: skip
    name = "tiny" if args.smoke else "gpt2-124m"
    cfg = load_config(resolve_config_path(name))
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dtype="bfloat16", max_seq_len=max(
            cfg.model.max_seq_len, args.seq_len), dropout=0.0),
        train=dataclasses.replace(cfg.train, batch_size=args.batch_size, seq_len=args.seq_len,
                                  grad_accum=1),
    )  # fmt: skip
    from gpt2_jax.model.attention import resolve_impl

    # The platform's flash kernel where `auto` takes one (cuDNN on CUDA, splash on TPU) for
    # the checked shape (head dim 64, T = seq_len).
    impl = resolve_impl("auto", "bfloat16", seq_len=args.seq_len, head_dim=64)
    impl = impl if impl in ("cudnn", "splash") else "chunked" if args.smoke else None
    device = jax.devices()[0].device_kind
    print(f"bench accel on {device} ({backend}), {name}, bf16", file=sys.stderr, flush=True)
    report = {"device": device, "backend": backend, "config": name, "smoke": args.smoke}
    report["attention"] = (
        attention_check(impl, 4 if not args.smoke else 1, args.seq_len, 5) if impl else []
    )
    report["training"] = training(cfg, args.steps)
    report["decode"] = decode(cfg, args.new_tokens)
    return report


def table(report: dict) -> str:
    lines = [f"device: {report['device']} ({report['backend']}), {report['config']}, bf16"]
    if report["attention"]:
        lines.append(
            "attention vs xla (bf16, fwd+bwd): impl, window, rel diff out / grads, ms, xla ms"
        )
        for r in report["attention"]:
            diffs = f"{r['rel_diff_out']:8.1e} {r['rel_diff_grads']:9.1e}"
            lines.append(f"  {r['impl']:<8} {str(r['window']):>6} {diffs} {r['ms']:7.2f} "
                         f"{r['xla_ms']:7.2f}")  # fmt: skip
    else:
        lines.append("attention: no flash kernel (cuDNN, splash) on this backend")
    lines.append("training: layout   loss      tok/s     MFU   compiled peak GB  compile s  "
                 "attention")  # fmt: skip
    for r in report["training"]:
        lines.append(f"  {r['layout']:<9} {r['loss_impl']:<8} {r['tokens_per_sec']:9.0f} "
                     f"{100 * r['mfu']:6.1f}% {r['compiled_peak_bytes'] / 1e9:10.2f} "
                     f"{r['compile_s']:10.1f}  {r['attention_impl']}")  # fmt: skip
    d = report["decode"]
    lines.append(f"decode: {d['tokens_per_sec']:.1f} tok/s (batch 1, {d['new_tokens']} tokens)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m benchmarks accel", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    p.add_argument("--new-tokens", type=int, default=256, help="decoded tokens")
    p.add_argument("--out", default=None, help="JSON file (default: bench_out/accel-*/)")
    p.add_argument("--smoke", action="store_true", help="tiny model, any backend")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "seq_len", "steps", "new_tokens"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    check_json_path(args.out)
    report = run(args)
    write_json(args.out, "accel", report)
    print(table(report))
    return 0
