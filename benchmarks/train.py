"""Training throughput: our jitted train step against HF transformers and the torch reference.

    python -m benchmarks train [--n-layer 4[,8,...]] [--n-head 4] [--n-embd 256]
        [--batch-size 8] [--seq-len 256] [--steps 10] [--rounds 3] [--peers hf,torch_ref]
        [--shapes] [--attention-impl auto] [--loss-impl full[,chunked]] [--loss-chunk 128]
        [--layouts unrolled[,scanned]] [--peer-malloc default[,tuned]] [--profile DIR] [--json]

`--n-layer` takes a comma list: one row per depth, so the per-layer cost shows as the
difference between rows. `--shapes` runs the fixed set SHAPES instead (BENCHMARKS.md's table:
d 256, 8 heads, B 8, T 256 at 1, 4 and 8 layers; then GPT-2 small's block shape, d 768 and
12 heads, at 4 layers and B 4) and ends with one line per shape: ours / each peer.
`--loss-impl` and `--layouts` (`model.scan_layers`) take comma lists too: each combination is
a contender of its own (`gpt2_jax:<layout>,<impl>` naming what varies), all in the same
rounds; the first is "ours".

Each torch peer runs in a worker process of its own, with glibc's allocator as torch users
get it (`--peer-malloc default`) or with the settings our entry points apply
(`gpt2_jax.host_malloc`, `--peer-malloc tuned`); a comma list runs each peer both ways. Ours
runs in this process, with whatever `python -m benchmarks` set (tuned unless
GPT2_JAX_HOST_MALLOC=default); the header says which.

Every contender trains the same GPT-2 shape (fp32, no dropout, AdamW with the same
hyper-parameters, global-norm clipping 1.0) on the same random tokens. Time per step is the
median over `--steps` timed steps after warm-up (compilation excluded), and the contenders
take turns for `--rounds` rounds so that load from other processes hits them alike; each
figure is the median over rounds. Achieved FLOP/s use the PaLM count (6N + 12·L·d·T per
token, see gpt2_jax.training.metrics) and are compared with a jitted fp32 matmul measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import child_env
from benchmarks._flags import int_list, name_list
from gpt2_jax.errors import ArgParser, UserError, cli_main

PEERS = ("hf", "torch_ref")
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "batch_size", "seq_len")
SHAPES = tuple(
    dict(zip(SHAPE_KEYS, values, strict=True))
    for values in ((1, 8, 256, 8, 256), (4, 8, 256, 8, 256), (8, 8, 256, 8, 256),
                   (4, 12, 768, 4, 256))
)  # fmt: skip


MALLOCS = ("default", "tuned")


def _set_torch_threads() -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)


class _PeerWorker:
    """A torch peer built and timed in a child process (`benchmarks._peer_worker`)."""

    def __init__(self, kind: str, args, tokens_BT: np.ndarray, malloc: str):
        shape = {k: getattr(args, k) for k in SHAPE_KEYS}
        spec = {"kind": kind, "args": shape, "tokens": tokens_BT.tolist(),
                "tuned_malloc": malloc == "tuned"}  # fmt: skip
        env = child_env(dict(os.environ, GPT2_JAX_HOST_MALLOC=malloc))
        cmd = [sys.executable, "-m", "benchmarks._peer_worker"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip
        self._send(json.dumps(spec))
        if self._receive() != "ready":
            raise UserError(f"the {kind} peer's worker process failed (its error is above)")

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _receive(self) -> str:
        return self.proc.stdout.readline().strip()

    def timed(self, n: int) -> float:
        self._send(str(n))
        return float(self._receive())

    def profile(self, n: int, top: int) -> dict:
        """getrusage figures and the top ops (`benchmarks.profile`) over n steps."""
        self._send(f"profile {n} {top}")
        return json.loads(self._receive())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _timed(step: Callable[[], None], sync: Callable[[], None], n: int) -> float:
    """Median seconds per step over n steps (each synchronised)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ours(args, tokens_BT: np.ndarray, loss_impl: str, scan_layers: bool):
    import jax

    from gpt2_jax.config import MeshConfig, ModelConfig, TrainConfig
    from gpt2_jax.parallel.sharding import make_mesh
    from gpt2_jax.training.step import Trainer

    model_cfg = ModelConfig(
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
        max_seq_len=args.seq_len, attention_impl=args.attention_impl, scan_layers=scan_layers,
    )  # fmt: skip
    train_cfg = TrainConfig(
        batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=0,
        loss_impl=loss_impl, loss_chunk=args.loss_chunk,
    )  # fmt: skip
    trainer = Trainer(model_cfg, train_cfg, make_mesh(MeshConfig(), jax.devices()[:1]))
    holder = {"state": trainer.init_state()}
    x, y = trainer.shard_batch(tokens_BT[:, :-1], tokens_BT[:, 1:])

    def step():
        holder["state"], holder["metrics"] = trainer.step(holder["state"], x, y)

    def sync():
        jax.block_until_ready(holder["metrics"])

    def hlo_text():
        return trainer.step.lower(holder["state"], x, y).compile().as_text()

    for _ in range(2):  # compile, then one more to settle
        step()
        sync()
    return step, sync, hlo_text


def _torch(kind: str, args, tokens_BT: np.ndarray):
    import torch

    torch.manual_seed(0)
    if kind == "hf":
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()

        hf_cfg = GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                            n_positions=args.seq_len, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)  # fmt: skip
        model = GPT2LMHeadModel(hf_cfg)

        def loss_fn(x, y):  # HF shifts the labels itself; the forward sees T tokens, as ours
            return model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
    else:
        from gpt2_torch_ref.model import GPT, RefConfig

        model = GPT(RefConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                              max_seq_len=args.seq_len))  # fmt: skip

        def loss_fn(x, y):
            logits = model(x[:, :-1])
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, 1:].flatten())

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.from_numpy(tokens_BT.astype(np.int64))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        step()
    return step, lambda: None


def run(args) -> list[dict]:
    import jax

    from gpt2_jax import host_malloc
    from gpt2_jax.config import ModelConfig
    from gpt2_jax.training.metrics import flops_per_token, measure_cpu_matmul_flops

    cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                      max_seq_len=args.seq_len)  # fmt: skip
    d, v, t = cfg.n_embd, cfg.vocab_size, args.seq_len
    n_no_pos = v * d + cfg.n_layer * (12 * d * d + 13 * d) + 2 * d  # tied head, biases, LNs
    flops_tok = flops_per_token(cfg, n_no_pos, t)
    tokens_BT = np.random.default_rng(0).integers(0, v, (args.batch_size, t + 1), np.int32)
    ours = {}  # name → (layout, loss impl); the name says what varies between them
    for layout in args.layouts:
        for impl in args.loss_impl:
            lists = ((layout, args.layouts), (impl, args.loss_impl))
            varied = ",".join(x for x, xs in lists if len(xs) > 1)
            ours[f"gpt2_jax:{varied}" if varied else "gpt2_jax"] = (layout, impl)
    ours_malloc = "tuned" if host_malloc.tuned() else "default"
    peers = {p if m == args.peer_malloc[0] else f"{p}+{m}-malloc": (p, m)
             for p in args.peers for m in args.peer_malloc}  # fmt: skip
    names = [*ours, *peers]
    print(f"building {', '.join(names)} (compiling / warming up)", file=sys.stderr)
    runners = {}
    for n, (layout, impl) in ours.items():
        step, sync, _ = _ours(args, tokens_BT, impl, layout == "scanned")
        runners[n] = lambda k, step=step, sync=sync: _timed(step, sync, k)
    workers = []
    try:
        for n, (kind, malloc) in peers.items():
            workers.append(_PeerWorker(kind, args, tokens_BT, malloc))
            runners[n] = workers[-1].timed
        step_s: dict[str, list[float]] = {n: [] for n in names}
        peaks = []
        for r in range(args.rounds):
            peaks.append(measure_cpu_matmul_flops())
            for name in names:
                step_s[name].append(runners[name](args.steps))
            done = ", ".join(f"{n} {1e3 * step_s[n][-1]:.0f} ms" for n in names)
            print(f"round {r + 1}/{args.rounds}: {done}", file=sys.stderr)
    finally:
        for worker in workers:
            worker.close()
    peak = statistics.median(peaks)
    if args.profile:  # after the timed rounds, so tracing never slows a timed step
        trace_dir = Path(args.profile) / f"L{args.n_layer}-d{args.n_embd}-h{args.n_head}"
        with jax.profiler.trace(str(trace_dir)):
            runners[names[0]](args.steps)
        print(f"jax.profiler trace of {args.steps} steps in {trace_dir}/", file=sys.stderr)
    records = []
    for name in names:
        sec = statistics.median(step_s[name])
        tok_s = args.batch_size * t / sec
        layout, impl = ours.get(name, (None, None))
        records.append({
            "name": name, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": d,
            "batch_size": args.batch_size, "seq_len": t, "step_ms": 1e3 * sec,
            "tokens_per_sec": tok_s, "achieved_flops": tok_s * flops_tok,
            "matmul_peak_flops": peak, "frac_of_peak": tok_s * flops_tok / peak,
            "device": jax.devices()[0].device_kind, "threads": os.cpu_count() or 1,
            "layout": layout, "loss_impl": impl,
            "host_malloc": peers[name][1] if name in peers else ours_malloc,
        })  # fmt: skip
    ours = records[0]["tokens_per_sec"]
    for rec in records:
        rec["ours_over_this"] = ours / rec["tokens_per_sec"]
    return records


def _summary(per_shape: list[list[dict]]) -> str:
    """One line per shape and contender: ours (the first) / that one, in tok/s."""
    lines = ["ours / peer (tok/s), per shape:"]
    for records in per_shape:
        for r in records[1:]:
            shape = (f"L={r['n_layer']} H={r['n_head']} d={r['n_embd']} B={r['batch_size']} "
                     f"T={r['seq_len']}")  # fmt: skip
            lines.append(f"  {shape:<32} vs {r['name']:<22} {r['ours_over_this']:5.2f}x")
    return "\n".join(lines)


def _table(records: list[dict]) -> str:
    r0 = records[0]
    lines = [
        f"GPT-2 L={r0['n_layer']} H={r0['n_head']} d={r0['n_embd']} B={r0['batch_size']} "
        f"T={r0['seq_len']}, fp32, AdamW; CPU matmul peak {r0['matmul_peak_flops'] / 1e9:.1f} "
        "GFLOP/s",
        f"{'contender':<22} {'malloc':>7} {'step ms':>9} {'tok/s':>9} {'GFLOP/s':>8} "
        f"{'% peak':>7} {'ours/x':>7}",
    ]
    for r in records:
        lines.append(
            f"{r['name']:<22} {r['host_malloc']:>7} {r['step_ms']:9.1f} "
            f"{r['tokens_per_sec']:9.0f} {r['achieved_flops'] / 1e9:8.1f} "
            f"{100 * r['frac_of_peak']:6.1f}% {r['ours_over_this']:7.2f}"
        )
    return "\n".join(lines)


def _peers(text: str) -> list[str]:
    peers = [p for p in text.split(",") if p]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown peer {bad[0]!r}; use a comma list from {','.join(PEERS)}"
        )
    return peers


def _loss_impls(text: str) -> list[str]:
    from gpt2_jax.config import LOSS_IMPLS

    impls = [i for i in text.split(",") if i]
    bad = [i for i in impls if i not in LOSS_IMPLS]
    if bad or not impls:
        raise argparse.ArgumentTypeError(
            f"unknown loss impl {(bad or [text])[0]!r}; use a comma list from "
            f"{','.join(LOSS_IMPLS)}"
        )
    return list(dict.fromkeys(impls))


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m benchmarks train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--n-layer", default="4", help="comma list of depths, one row each")
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="turns each contender takes")
    p.add_argument("--peers", type=_peers, default=list(PEERS), help="comma list: hf,torch_ref")
    p.add_argument("--attention-impl", default="auto", help="model.attention_impl for ours")
    p.add_argument("--loss-impl", type=_loss_impls, default=["full"],
                   help="comma list of train.loss_impl for ours: full,chunked")  # fmt: skip
    p.add_argument("--loss-chunk", type=int, default=128, help="train.loss_chunk for chunked")
    p.add_argument("--layouts", default="unrolled", help="comma list: unrolled,scanned")
    p.add_argument("--peer-malloc", default="default", help="comma list: default,tuned; the "
                   "C allocator settings of each peer's process (module doc)")  # fmt: skip
    p.add_argument("--shapes", action="store_true", help="run the fixed SHAPES (module doc) "
                   "instead of --n-layer/--n-head/--n-embd/--batch-size/--seq-len")  # fmt: skip
    p.add_argument("--profile", default=None, metavar="DIR", help="after timing, trace --steps "
                   "more steps of ours with jax.profiler into DIR/<shape>/")  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object per contender")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    depths = int_list(args.n_layer, "--n-layer")
    args.layouts = name_list(args.layouts, ("unrolled", "scanned"), "--layouts")
    args.peer_malloc = list(dict.fromkeys(name_list(args.peer_malloc, MALLOCS, "--peer-malloc")))
    if not args.peer_malloc:
        raise UserError("--peer-malloc takes default, tuned or both")
    for name in ("n_head", "n_embd", "batch_size", "seq_len", "steps", "rounds", "loss_chunk"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.n_embd % args.n_head:
        raise UserError("--n-embd must be divisible by --n-head")
    if args.profile and Path(args.profile).exists() and not Path(args.profile).is_dir():
        raise UserError(f"--profile {args.profile} is a file; pass a directory for the traces")
    shapes = SHAPES if args.shapes else [
        {**{k: getattr(args, k) for k in SHAPE_KEYS}, "n_layer": n} for n in depths
    ]  # fmt: skip
    per_shape = []
    for shape in shapes:
        shape_records = run(argparse.Namespace(**{**vars(args), **shape}))
        per_shape.append(shape_records)
        if args.json:
            for rec in shape_records:
                print(json.dumps(rec), flush=True)
        else:
            print(_table(shape_records), flush=True)
    n_ours = len(args.layouts) * len(args.loss_impl)
    if not args.json and len(per_shape[0]) > 1 and (len(shapes) > 1 or n_ours > 1):
        print(_summary(per_shape))
    return 0
