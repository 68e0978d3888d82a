"""Attention backends: forward+backward time and peak memory against sequence length.

    python -m benchmarks attention [--seq-lens 1024,...] [--windows none,256]
        [--impls xla,chunked,blocked] [--n-head 4] [--n-kv-head 4] [--head-dim 64] [--batch 1]
        [--dtype float32] [--block 128] [--repeats 3] [--json] [--plot PNG|none]

Each point times `jax.value_and_grad` of sum(attention(q, k, v)) over q, k, v (best of
`--repeats` after one warm-up call). Peak memory is XLA's compiled memory analysis on CPU
and the device's `peak_bytes_in_use` on GPU, where every point then runs in its own process
so the peak starts from zero. On CPU a point whose compiled peak is over 90% of the
available memory is compiled but not run: its time is `skipped` (None in JSON). `torch` is
`torch.nn.functional.scaled_dot_product_attention` on the same shapes (peak memory only on
CUDA). A line of points gets a fitted exponent p in time ∝ T^p (and memory ∝ T^p) by least
squares on log-log axes, over its timed points for time.

The plot goes to `--plot`, or else to attention_scaling.png in a new folder
bench_out/attention-<YYYYmmdd-HHMMSS>/ named on stderr; the committed
docs/bench/attention_scaling.png changes only when passed as `--plot`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks import child_env
from benchmarks._flags import int_list
from benchmarks._out import fresh_out_dir
from gpt2_jax.config import ATTENTION_IMPLS
from gpt2_jax.errors import UserError, cli_main

IMPLS = (*ATTENTION_IMPLS, "torch")
FIELDS = (
    "impl",
    "T",
    "window",
    "n_head",
    "n_kv_head",
    "head_dim",
    "batch",
    "fwd_bwd_ms",
    "peak_bytes",
)
PLOT_NAME = "attention_scaling.png"
SLOW_WARMUP_S = 20.0  # a warm-up slower than this is timed once more instead of --repeats


def _windows(text: str) -> list[int | None]:
    out: list[int | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("none", "full"):
            out.append(None)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise UserError(f"--windows takes 'none' or positive integers, got {item!r}")
    return out


def _impls(text: str) -> list[str]:
    impls = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in impls if x not in IMPLS]
    if bad or not impls:
        raise UserError(
            f"--impls takes a comma-separated subset of {','.join(IMPLS)}, got {text!r}"
        )
    return impls


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks attention",
        description="Forward+backward time and peak memory of the attention backends.",
    )
    p.add_argument("--seq-lens", default="1024,2048,4096,8192,16384", help="comma-separated T")
    p.add_argument("--windows", default="none,256", help="'none' (full causal) and/or window sizes")
    p.add_argument("--impls", default=None, help="subset of auto,xla,chunked,blocked,cudnn,"
                   "splash,torch (default xla,chunked,blocked; plus cudnn,torch on a GPU, "
                   "splash on a TPU)")  # fmt: skip
    p.add_argument("--n-head", type=int, default=4, help="query heads N")
    p.add_argument("--n-kv-head", type=int, default=None, help="K/V heads K (default N)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim H")
    p.add_argument("--batch", type=int, default=1, help="batch size B")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--block", type=int, default=None, help="tile size of `blocked` (default: "
                   "gpt2_jax.ops.blocked_attention.DEFAULT_BLOCK)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed calls per point (best is kept)")
    p.add_argument("--json", action="store_true", help="print one JSON object per measurement")
    p.add_argument("--plot", default=None, help="log-log PNG to write, or 'none' (default: "
                   f"{PLOT_NAME} in a new bench_out/attention-<time>/)")  # fmt: skip
    p.add_argument("--isolate", choices=("auto", "on", "off"), default="auto",
                   help="run each point in its own process (auto: on a GPU)")  # fmt: skip
    args = p.parse_args(argv)
    args.seq_lens = int_list(args.seq_lens, "--seq-lens")
    args.windows = _windows(args.windows)
    args.n_kv_head = args.n_head if args.n_kv_head is None else args.n_kv_head
    for name in ("n_head", "n_kv_head", "head_dim", "batch", "repeats"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.block is not None and args.block <= 0:
        raise UserError("--block must be positive")
    if args.n_head % args.n_kv_head:
        raise UserError(
            f"--n-head {args.n_head} is not a multiple of --n-kv-head {args.n_kv_head}; "
            "pick K dividing N"
        )
    return args


def _jax_point(impl: str, T: int, window: int | None, a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from gpt2_jax.model.attention import dot_product_attention
    from gpt2_jax.ops.blocked_attention import DEFAULT_BLOCK

    dtype = jnp.dtype(a.dtype)
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (a.batch, T, a.n_head, a.head_dim), dtype)
    k = jax.random.normal(kk, (a.batch, T, a.n_kv_head, a.head_dim), dtype)
    v = jax.random.normal(kv, (a.batch, T, a.n_kv_head, a.head_dim), dtype)
    block = DEFAULT_BLOCK if a.block is None else a.block

    def loss(q, k, v):
        y = dot_product_attention(q, k, v, window=window, impl=impl, block=block)
        return jnp.sum(y.astype(jnp.float32))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    device = jax.devices()[0]
    peak = None
    if device.platform == "cpu":
        # XLA:CPU's peak_memory_in_bytes leaves out temporaries; add the buffers up instead.
        ma = compiled.memory_analysis()
        peak = (
            ma.temp_size_in_bytes
            + ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            - ma.alias_size_in_bytes
        )
    available = _available_bytes()
    if device.platform == "cpu" and available is not None and peak > 0.9 * available:
        print(f"skipping {impl} T={T} window={window}: needs {peak / 2**30:.1f} GiB, "
              f"{available / 2**30:.1f} GiB available", file=sys.stderr)  # fmt: skip
        return {"fwd_bwd_ms": None, "peak_bytes": peak}
    ms = _time(lambda: jax.block_until_ready(compiled(q, k, v)), a.repeats)
    if device.platform != "cpu":
        peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    return {"fwd_bwd_ms": ms, "peak_bytes": peak}


def _torch_point(T: int, window: int | None, a: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from gpt2_torch_ref.model import attention_mask

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(heads):
        x = torch.randn(a.batch, heads, T, a.head_dim, device=dev, dtype=dtype, generator=g)
        return x.requires_grad_(True)

    q, k, v = rand(a.n_head), rand(a.n_kv_head), rand(a.n_kv_head)
    mask = None if window is None else attention_mask(T, window).to(dev)

    def step():
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=a.n_head != a.n_kv_head
        )
        y.float().sum().backward()
        if dev == "cuda":
            torch.cuda.synchronize()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = _time(step, a.repeats)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return {"fwd_bwd_ms": ms, "peak_bytes": peak}


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _time(fn, repeats: int) -> float:
    """Best wall time in ms of `repeats` calls after one warm-up call."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > SLOW_WARMUP_S:
        repeats = 1
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def measure(impl: str, T: int, window: int | None, a: argparse.Namespace) -> dict:
    """One point: the JSON record of the grid (see FIELDS)."""
    if impl == "torch":
        result = _torch_point(T, window, a)
    else:
        result = _jax_point(impl, T, window, a)
    record = {"impl": impl, "T": T, "window": window, "n_head": a.n_head}
    record |= {"n_kv_head": a.n_kv_head, "head_dim": a.head_dim, "batch": a.batch}
    return record | result


def _measure_isolated(impl: str, T: int, window: int | None, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks", "attention", "--json", "--plot", "none"]
    cmd += ["--isolate", "off", "--impls", impl, "--seq-lens", str(T)]
    cmd += ["--windows", "none" if window is None else str(window)]
    cmd += ["--n-head", str(a.n_head), "--n-kv-head", str(a.n_kv_head)]
    cmd += ["--head-dim", str(a.head_dim), "--batch", str(a.batch), "--dtype", a.dtype]
    cmd += ["--repeats", str(a.repeats)] + ([] if a.block is None else ["--block", str(a.block)])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"measuring {impl} T={T} window={window} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_exponent(ts: list[int], ys: list[float | None]) -> float | None:
    """Least-squares slope of log y against log T; None with fewer than two points."""
    pts = [(t, y) for t, y in zip(ts, ys, strict=True) if y]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def _label(impl: str, window: int | None) -> str:
    return f"{impl} {'full' if window is None else f'w={window}'}"


def summarise(records: list[dict]) -> str:
    """Exponents per line, and each line's speed-up over full-causal xla at the largest T
    where both were timed (a point too big to run has no time and is left out of the fit)."""
    lines = {}
    for r in records:
        lines.setdefault((r["impl"], r["window"]), []).append(r)
    ref = {r["T"]: r["fwd_bwd_ms"] for r in records if r["impl"] == "xla" and r["window"] is None}
    out = ["line               time exp  mem exp  T_max  ms@T_max   xla-full/this at T"]
    for (impl, window), rs in lines.items():
        rs = sorted(rs, key=lambda r: r["T"])
        te = fit_exponent([r["T"] for r in rs], [r["fwd_bwd_ms"] for r in rs])
        me = fit_exponent([r["T"] for r in rs], [r["peak_bytes"] for r in rs])
        last = rs[-1]
        both = [r for r in rs if r["fwd_bwd_ms"] and ref.get(r["T"])]
        ratio = "-"
        if both:
            r = both[-1]
            ratio = f"{ref[r['T']] / r['fwd_bwd_ms']:.1f}x at {r['T']}"
        ms = f"{last['fwd_bwd_ms']:.1f}" if last["fwd_bwd_ms"] else "-"
        out.append(
            f"{_label(impl, window):18s} {_fmt(te):>8s} {_fmt(me):>8s} {last['T']:6d} "
            f"{ms:>9s} {ratio:>19s}"
        )
    return "\n".join(out)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def plot(records: list[dict], path: str, title: str) -> None:
    """Log-log time and peak memory against T, one line per (impl, window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = {}
    for r in records:
        lines.setdefault((r["impl"], r["window"]), []).append(r)
    for (impl, window), rs in lines.items():
        rs = sorted(rs, key=lambda r: r["T"])
        style = "-" if window is None else "--"
        for ax, key, scale in ((axes[0], "fwd_bwd_ms", 1.0), (axes[1], "peak_bytes", 2.0**-20)):
            pts = [(r["T"], r[key] * scale) for r in rs if r[key]]
            if pts:
                exp = fit_exponent([p[0] for p in pts], [p[1] for p in pts])
                (line,) = ax.plot(*zip(*pts, strict=True), style, marker="o",
                                  label=f"{_label(impl, window)} (T^{_fmt(exp)})")  # fmt: skip
                # Too big to run: its memory comes from the compiled program only; hollow.
                untimed = [(r["T"], r[key] * scale) for r in rs if r[key] and not r["fwd_bwd_ms"]]
                if untimed:
                    ax.plot(*zip(*untimed, strict=True), "o", markersize=9, color="white",
                            markeredgecolor=line.get_color())  # fmt: skip
    for ax, ylabel in zip(axes, ("fwd+bwd time (ms)", "peak memory (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cli_main
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import jax

    from gpt2_jax.model.attention import (
        cudnn_supported,
        device_target,
        require_cudnn,
        require_splash,
    )

    backend = jax.default_backend()
    cudnn = ["cudnn"] if cudnn_supported(device_target(), a.dtype) else []
    impls = _impls(a.impls) if a.impls else (
        ["xla", "chunked", "blocked"] + (cudnn + ["torch"] if backend == "gpu" else [])
        + (["splash"] if backend == "tpu" else [])
    )  # fmt: skip
    if "cudnn" in impls:  # refuse before measuring anything
        require_cudnn(a.dtype)
    if "splash" in impls:
        require_splash()
    isolate = a.isolate == "on" or (a.isolate == "auto" and backend == "gpu")
    grid = [(i, t, w) for w in a.windows for i in impls for t in sorted(a.seq_lens)]
    records = []
    for impl, T, window in tqdm(
        grid, desc="attention bench", file=sys.stderr, disable=len(grid) < 2
    ):
        record = (_measure_isolated if isolate else measure)(impl, T, window, a)
        records.append(record)
        if a.json:
            print(json.dumps(record), flush=True)
    device = jax.devices()[0].device_kind
    title = (
        f"attention fwd+bwd, {device}, B={a.batch} N={a.n_head} K={a.n_kv_head} "
        f"H={a.head_dim} {a.dtype}"
    )
    if not a.json:
        print(title)
        print(f"{'impl':8s} {'window':>6s} {'T':>6s} {'fwd+bwd ms':>11s} {'peak MiB':>9s}")
        for r in records:
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
            w = "full" if r["window"] is None else str(r["window"])
            ms = "skipped" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.1f}"
            print(f"{r['impl']:8s} {w:>6s} {r['T']:6d} {ms:>11s} {peak:>9s}")
        print(summarise(records))
    else:
        print(summarise(records), file=sys.stderr)
    if a.plot != "none" and len(records) > 1:
        path = a.plot or str(fresh_out_dir("attention") / PLOT_NAME)
        plot(records, path, title)
        print(f"wrote {path}", file=sys.stderr)
    return 0
