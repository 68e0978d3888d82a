"""Mixture-of-Experts cost: one MoE layer against the dense MLP of the same active FLOPs, and a
dense model against a MoE model of the same active parameters, trained alike.

    python -m benchmarks moe [--batch-size 8] [--seq-len 1024] [--n-embd 256]
        [--experts 4,8,16,32] [--top-k 2] [--impls grouped,ragged] [--repeats 5]
        [--train [--train-steps 200] [--dense-layers 5] [--moe-layers 3] [--train-experts 8]
         [--train-impl auto] [--work-dir DIR] [section.key=value ...]]
        [--smoke] [--json] [--out FILE]

Layer section (skipped with `--impls none`): one `gpt2_jax.model.moe.MoE` layer (fp32, dropless, no
dropout) per impl × E, forward and backward (the gradients of the input and of every
parameter, with the load-balance and z-losses at their default weights, as in training), jit
compiled, on the same random tokens. The yardstick is a dense GELU MLP D → k·4·D → D: the
matmul FLOPs of the k experts each token runs. Every contender is compiled and run once more
before timing; then `--repeats` rounds time each contender once in turn (in alternating
order), so that load from other processes falls on them alike; the tables give the best and the
median round, the ratios are of the best (the least disturbed by other processes). `dense`
(every expert on every token, the reference) does E/k times the work: leave it out of large E.
On XLA:CPU `ragged` (jax.lax.ragged_dot) computes every expert on every row too.

Training section (`--train`): the built-in Shakespeare plays, the same seed, batches, schedule
and token budget for a dense GPT-2 of `--dense-layers` layers and a MoE GPT-2 of
`--moe-layers` layers whose every MLP is routed over `--train-experts` experts, top-k. A
block's active parameters are 12·D² dense and (4 + 8k)·D² with top-k experts (20·D² at k 2),
so 5 dense layers match 3 MoE layers. Each row: active (`count_params(matmul_only=True)`) and
total parameters, final validation loss (cross-entropy alone, `train.eval_steps` batches),
training tokens/s (`gpt2_jax.train`'s median over logged intervals, compilation excluded; the
rows run one after the other, so load from other processes may favour either) and, for MoE,
the last logged moe_lb_loss / moe_busiest / moe_idlest (means over the MoE layers).
Positional `section.key=value` overrides apply to both rows after the bench's own settings.
The rows train into DIR/runs/{dense,moe} and tokenise into DIR/data, DIR being `--work-dir` or
else a temporary directory; a `--work-dir` where any of them already holds files is refused
before any work (the bench never resumes, mixes with or overwrites a run it did not create).

`--smoke` shrinks every default (B 2 × T 32, D 32, E 4,8; 4 training steps at D 32) so CI
runs both sections in seconds; flags given explicitly still apply. `--json` prints one JSON
object per measurement instead of the tables; the list goes to `--out` (default: a new
bench_out/moe-<time>/moe.json, named on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks._flags import int_list, name_list
from benchmarks._out import check_json_path, check_work_dir, write_json
from gpt2_jax.errors import ArgParser, UserError, cli_main

IMPLS = ("grouped", "ragged", "dense")
TRAIN_IMPLS = ("auto", *IMPLS)
# Layer shape and training length: the default run, and --smoke (tests / CI).
SHAPES = {
    "default": dict(batch_size=8, seq_len=1024, n_embd=256, experts="4,8,16,32", repeats=5,
                    train_steps=200),
    "smoke": dict(batch_size=2, seq_len=32, n_embd=32, experts="4,8", repeats=2, train_steps=4),
}  # fmt: skip
# Both training rows: Shakespeare, no dropout, no sampling, checkpoints only at the end.
TRAIN_COMMON = (
    "data.source=shakespeare train.seed=0 train.sample_every=0 train.grad_accum=1 "
    "model.dropout=0.0 model.dtype=float32 checkpoint.every=0 checkpoint.keep=1 "
    "checkpoint.async_save=false wandb.mode=disabled train.resume=false"
)
TRAIN_SHAPES = {  # ≈ a few minutes on 2 cores / seconds
    "default": "model.n_head=4 model.n_embd=128 model.max_seq_len=128 train.seq_len=128 "
    "train.batch_size=16 train.lr=3e-3 train.min_lr=3e-4 train.eval_steps=8 train.log_every=10",
    "smoke": "model.n_head=2 model.n_embd=32 model.max_seq_len=32 train.seq_len=32 "
    "train.batch_size=4 train.eval_steps=1 train.log_every=1",
}
TARGET_GROWTH, TARGET_VS_MLP = 1.3, 1.6  # grouped: largest E / smallest E, and / dense MLP


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- environment


def cpu_model() -> str:
    """`lscpu`'s "Model name", else platform.processor()."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name" and value.strip():
            return value.strip()
    return platform.processor() or "unknown CPU"


def machine() -> dict:
    """Where the numbers come from: CPU model and cores, jax version, the device JAX runs on."""
    import jax

    d = jax.devices()[0]
    device = "cpu" if d.platform == "cpu" else f"{d.platform}: {d.device_kind}"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__,
            "device": device}  # fmt: skip


# --------------------------------------------------------------------------- layer section


@dataclass
class Contender:
    """One jitted forward + backward and its arguments; `times` holds the timed rounds (s)."""

    record: dict
    fn: Callable
    args: tuple
    times: list[float]

    def run(self) -> float:
        import jax

        t0 = time.perf_counter()
        jax.block_until_ready(self.fn(*self.args))
        return time.perf_counter() - t0


def _wide_mlp(cfg, width: int, rngs):
    """The dense yardstick: GELU MLP D → width → D built like `gpt2_jax.model.MLP`."""
    import jax
    from flax import nnx

    from gpt2_jax.model.gpt import _dense

    class WideMLP(nnx.Module):
        def __init__(self):
            std2 = 0.02 / math.sqrt(2 * cfg.n_layer)
            self.c_fc = _dense(cfg, cfg.n_embd, width, 0.02, ("embed", "mlp"), rngs=rngs)
            self.c_proj = _dense(cfg, width, cfg.n_embd, std2, ("mlp", "embed"), rngs=rngs)

        def routed(self, x_BTD):
            return self.c_proj(jax.nn.gelu(self.c_fc(x_BTD), approximate=True)), {}

    return WideMLP()


def _grad_fn(module, cfg) -> Callable:
    """jit of (params, x, ct) → gradients of ⟨y, ct⟩ (+ the aux losses) w.r.t. params and x."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, _, rest = nnx.split(module, nnx.Param, ...)

    def objective(params, x_BTD, ct_BTD):
        y_BTD, stats = nnx.merge(graphdef, params, rest).routed(x_BTD)
        loss = jnp.vdot(y_BTD, ct_BTD)
        if stats:
            loss += cfg.moe_aux_loss_coef * stats["lb_loss"] + cfg.moe_z_loss_coef * stats["z_loss"]
        return loss

    return jax.jit(jax.grad(objective, argnums=(0, 1)))


def _contender(record: dict, module, cfg, x_BTD, ct_BTD) -> Contender:
    from flax import nnx

    params = nnx.state(module, nnx.Param)
    return Contender(record, _grad_fn(module, cfg), (params, x_BTD, ct_BTD), [])


def layer_contenders(args, base: dict) -> list[Contender]:
    """The dense-equal MLP first, then every impl × E; all on the same tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gpt2_jax.config import ModelConfig
    from gpt2_jax.model.moe import MoE

    B, T, D, k = args.batch_size, args.seq_len, args.n_embd, args.top_k
    kx, kc = jax.random.split(jax.random.key(0))
    x_BTD = jax.random.normal(kx, (B, T, D), jnp.float32)
    ct_BTD = jax.random.normal(kc, (B, T, D), jnp.float32)
    shape = dict(n_layer=1, n_head=1, n_embd=D, max_seq_len=T, dropout=0.0, dtype="float32")
    width = k * 4 * D
    dense_cfg = ModelConfig(**shape)
    # forward 2 matmuls of 2·N·D·W FLOPs; the backward twice that
    flops = 3 * 2 * 2 * B * T * D * width
    mlp = _wide_mlp(dense_cfg, width, nnx.Rngs(0))
    out = [_contender({**base, "impl": "mlp", "experts": None, "width": width,
                       "gflop": flops / 1e9}, mlp, dense_cfg, x_BTD, ct_BTD)]  # fmt: skip
    for impl in args.impls:
        for E in args.experts:
            cfg = ModelConfig(**shape, moe_experts=E, moe_top_k=k, moe_impl=impl)
            rec = {**base, "impl": impl, "experts": E, "width": 4 * D, "gflop": flops / 1e9}
            out.append(_contender(rec, MoE(cfg, rngs=nnx.Rngs(0)), cfg, x_BTD, ct_BTD))
    return out


def time_rounds(contenders: list[Contender], repeats: int) -> None:
    """Compile and run each once more, then `repeats` rounds of one timed run each, in turn
    first to last, then last to first: each run follows its neighbour's or its own, not the
    largest contender's (whose freed buffers would cost the next one page faults)."""
    for c in contenders:
        t0 = time.perf_counter()
        c.run()  # compile
        c.record["compile_s"] = round(time.perf_counter() - t0, 2)
        c.run()
        _say(f"warmed up {_label(c.record)} (compile + first run {c.record['compile_s']:.1f} s)")
    for r in range(repeats):
        for c in contenders[:: -1 if r % 2 else 1]:
            c.times.append(c.run())
        _say(f"round {r + 1}/{repeats}: " + ", ".join(
            f"{_label(c.record)} {c.times[-1] * 1e3:.0f} ms" for c in contenders))  # fmt: skip


def _label(rec: dict) -> str:
    return "mlp" if rec["impl"] == "mlp" else f"{rec['impl']} E={rec['experts']}"


def layer_records(contenders: list[Contender]) -> list[dict]:
    """Each contender's record with best / median ms and the ratios (of best times)."""
    best = {id(c): min(c.times) for c in contenders}
    mlp_best = best[id(contenders[0])]
    first: dict[str, float] = {}
    records = []
    for c in contenders:
        b, rec = best[id(c)], c.record
        first.setdefault(rec["impl"], b)
        records.append({
            **rec, "ms_best": round(b * 1e3, 3),
            "ms_median": round(statistics.median(c.times) * 1e3, 3),
            "ms_rounds": [round(t * 1e3, 3) for t in c.times],
            "gflop_per_s": rec["gflop"] / b if rec["impl"] == "mlp" else None,
            "vs_mlp": b / mlp_best, "vs_first_experts": b / first[rec["impl"]],
        })  # fmt: skip
    return records


def layer_table(records: list[dict]) -> str:
    r0 = records[0]
    lines = [
        f"one MoE layer, forward + backward (grads of the input and all params), B "
        f"{r0['batch_size']} × T {r0['seq_len']} = {r0['batch_size'] * r0['seq_len']} tokens, "
        f"D {r0['n_embd']}, top-{r0['top_k']}, fp32; best / median ms of "
        f"{len(r0['ms_rounds'])} rounds",
        f"{r0['cpu']} ({r0['cores']} cores), {r0['device']}, jax {r0['jax']}",
        f"dense-equal MLP (D → {r0['width']} → D, k·4·D): {r0['ms_best']:.1f} / "
        f"{r0['ms_median']:.1f} ms, {r0['gflop_per_s']:.1f} GFLOP/s",
    ]  # fmt: skip
    for impl in dict.fromkeys(r["impl"] for r in records[1:]):
        rows = [r for r in records if r["impl"] == impl]
        e0 = rows[0]["experts"]
        lines += ["", impl, f"{'E':>4} {'best ms':>9} {'median ms':>9} {'× MLP':>7} "
                  f"{f'× E={e0}':>7}"]  # fmt: skip
        lines += [f"{r['experts']:>4} {r['ms_best']:>9.1f} {r['ms_median']:>9.1f} "
                  f"{r['vs_mlp']:>7.2f} {r['vs_first_experts']:>7.2f}" for r in rows]  # fmt: skip
    if target := targets(records):
        lines += ["", target]
    return "\n".join(lines)


def targets(records: list[dict]) -> str:
    """Where `grouped` stands against the acceptance targets ('' without grouped rows)."""
    rows = [r for r in records if r["impl"] == "grouped"]
    if not rows:
        return ""
    growth = rows[-1]["vs_first_experts"]
    worst = max(rows, key=lambda r: r["vs_mlp"])

    def ok(value: float, target: float) -> str:
        return "met" if value <= target else "NOT met"

    return (f"targets, grouped: E={rows[-1]['experts']} / E={rows[0]['experts']} = {growth:.2f}× "
            f"(≤ {TARGET_GROWTH}×: {ok(growth, TARGET_GROWTH)}); worst / dense-equal MLP = "
            f"{worst['vs_mlp']:.2f}× at E={worst['experts']} (≤ {TARGET_VS_MLP}×: "
            f"{ok(worst['vs_mlp'], TARGET_VS_MLP)})")  # fmt: skip


def run_layers(args, env: dict) -> list[dict]:
    base = {"section": "layer", "batch_size": args.batch_size, "seq_len": args.seq_len,
            "n_embd": args.n_embd, "top_k": args.top_k, **env}  # fmt: skip
    contenders = layer_contenders(args, base)
    time_rounds(contenders, args.repeats)
    return layer_records(contenders)


# ------------------------------------------------------------------------ training section


def train_configs(args, work: Path) -> dict:
    """name → Config of the two rows: same data, steps and schedule; dense vs MoE depth."""
    from gpt2_jax.config import load_config

    steps = args.train_steps
    schedule = (f"train.max_steps={steps} train.warmup_steps={max(1, steps // 10)} "
                f"train.eval_every={max(steps // 4, min(steps, 10))}")  # fmt: skip
    common = [*f"{TRAIN_COMMON} {TRAIN_SHAPES[args.shape]} {schedule}".split()]
    base = load_config(None, [*common, *args.overrides])
    if base.data.prepared_dir is None:  # one tokenisation for both rows
        common.append(f"data.prepared_dir={work / 'data'}")
    rows = {
        "dense": [f"model.n_layer={args.dense_layers}", "model.moe_experts=0"],
        "moe": [f"model.n_layer={args.moe_layers}", f"model.moe_experts={args.train_experts}",
                f"model.moe_top_k={args.top_k}", f"model.moe_impl={args.train_impl}",
                "model.moe_every=1"],
    }  # fmt: skip
    return {name: load_config(None, [*common, *change, *args.overrides,
                                     f"train.out_dir={work / 'runs' / name}"])
            for name, change in rows.items()}  # fmt: skip


def param_counts(cfg) -> dict:
    """Total and active parameters, and the active ones outside the tied embedding / head."""
    from flax import nnx

    from gpt2_jax.model.gpt import GPT, count_params

    model = nnx.eval_shape(lambda: GPT(cfg.model, rngs=nnx.Rngs(0)))
    active = count_params(model, matmul_only=True)
    head = model.wte.embedding.size if cfg.model.tie_embeddings else 0
    return {"params": count_params(model), "active_params": active,
            "active_params_blocks": active - head}  # fmt: skip


def _last_moe_stats(out: Path) -> dict:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    logged = [r for r in map(json.loads, filter(None, lines)) if "moe_lb_loss" in r]
    if not logged:
        return {}
    return {k: v for k, v in logged[-1].items() if k.startswith("moe_")}


def train_row(name: str, cfg, env: dict) -> dict:
    from gpt2_jax.train import train

    m, t = cfg.model, cfg.train
    _say(f"training {name}: {m.n_layer} layers"
         + (f", {m.moe_experts} experts top-{m.moe_top_k}" if m.moe_experts else ""))  # fmt: skip
    summary = train(cfg)
    return {"section": "train", "model": name, "n_layer": m.n_layer, "n_embd": m.n_embd,
            "n_head": m.n_head, "experts": m.moe_experts or None,
            "top_k": m.moe_top_k if m.moe_experts else None,
            "moe_impl": m.moe_impl if m.moe_experts else None, "steps": summary["steps"],
            "batch_size": t.batch_size, "seq_len": t.seq_len,
            "tokens": summary["steps"] * t.batch_size * t.seq_len, **param_counts(cfg),
            "val_loss": summary["val_loss"], "train_tokens_per_sec": summary["tokens_per_sec"],
            "train_time_s": summary["train_time_s"],
            "unigram_baseline_loss": summary.get("unigram_baseline_loss"),
            **_last_moe_stats(Path(t.out_dir)), **env}  # fmt: skip


def run_train(cfgs: dict, env: dict) -> list[dict]:
    return [train_row(name, cfg, env) for name, cfg in cfgs.items()]


def train_table(records: list[dict]) -> str:
    r0 = records[0]
    lines = [
        f"training on Shakespeare: {r0['steps']} steps × {r0['batch_size']} × {r0['seq_len']} = "
        f"{r0['tokens']:,} tokens per row, D {r0['n_embd']}, {r0['n_head']} heads, fp32",
        f"{r0['cpu']} ({r0['cores']} cores), {r0['device']}, jax {r0['jax']}",
        f"{'model':<22} {'layers':>6} {'active':>10} {'act.blocks':>10} {'total':>10} "
        f"{'val loss':>8} {'tok/s':>8} {'lb loss':>7} {'busiest':>7} {'idlest':>7}",
    ]
    for r in records:
        name = f"MoE {r['experts']} experts top-{r['top_k']}" if r["experts"] else "dense"
        moe = " ".join(f"{r[k]:>7.3f}" if k in r else f"{'–':>7}"
                       for k in ("moe_lb_loss", "moe_busiest", "moe_idlest"))  # fmt: skip
        tok_s = f"{r['train_tokens_per_sec']:>8,.0f}" if r["train_tokens_per_sec"] else f"{'–':>8}"
        lines.append(f"{name:<22} {r['n_layer']:>6} {r['active_params']:>10,} "
                     f"{r['active_params_blocks']:>10,} {r['params']:>10,} {r['val_loss']:>8.4f} "
                     f"{tok_s} {moe}")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------ entry point


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m benchmarks moe", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None, help="layer: sequences (8)")
    p.add_argument("--seq-len", type=int, default=None, help="layer: tokens per sequence (1024)")
    p.add_argument("--n-embd", type=int, default=None, help="layer: model width D (256)")
    p.add_argument("--experts", default=None, help="layer: comma list of E (4,8,16,32)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (layer and --train)")
    p.add_argument("--impls", default="grouped,ragged",
                   help=f"layer: comma subset of {','.join(IMPLS)}, or none")  # fmt: skip
    p.add_argument("--repeats", type=int, default=None, help="layer: timed rounds (5)")
    p.add_argument("--train", action="store_true", help="also train dense vs MoE")
    p.add_argument("--train-steps", type=int, default=None, help="steps per row (200)")
    p.add_argument("--dense-layers", type=int, default=5, help="layers of the dense model")
    p.add_argument("--moe-layers", type=int, default=3, help="layers of the MoE model")
    p.add_argument("--train-experts", type=int, default=8, help="experts of the MoE model")
    p.add_argument("--train-impl", default="auto", help=f"one of {', '.join(TRAIN_IMPLS)}")
    p.add_argument("--work-dir", default=None,
                   help="keep the runs here; new or empty (default: a temp dir)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny shapes and steps (CI)")
    p.add_argument("--out", default=None, help="JSON file (default: bench_out/moe-*/moe.json)")
    p.add_argument("--json", action="store_true", help="one JSON object per measurement")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="--train: config overrides for both rows")  # fmt: skip
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    a.shape = "smoke" if a.smoke else "default"
    for key, value in SHAPES[a.shape].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.experts = int_list(a.experts, "--experts")
    a.impls = name_list(a.impls, IMPLS, "--impls")
    sizes = ("batch_size", "seq_len", "n_embd", "repeats", "train_steps", "dense_layers",
             "moe_layers", "top_k")  # fmt: skip
    for key in sizes:
        if getattr(a, key) <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be positive, got {getattr(a, key)}")
    if a.impls and a.top_k > min(a.experts):
        raise UserError(f"--top-k {a.top_k} must lie in [1, {min(a.experts)}] (the smallest of "
                        f"--experts)")  # fmt: skip
    if a.train and not 1 <= a.top_k <= a.train_experts:
        raise UserError(f"--top-k {a.top_k} must lie in [1, --train-experts {a.train_experts}]")
    if a.train_impl not in TRAIN_IMPLS:
        raise UserError(f"--train-impl takes one of {', '.join(TRAIN_IMPLS)}, got {a.train_impl!r}")
    if a.overrides and not a.train:
        raise UserError(f"config overrides ({a.overrides[0]} ...) apply to --train only")
    if not a.impls and not a.train:
        raise UserError("nothing to run: --impls none without --train")
    check_json_path(a.out)
    return a


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        cfgs = {}
        if args.train:  # bad overrides fail now, not after the layer section
            from gpt2_jax.train import validate

            cfgs = train_configs(args, Path(args.work_dir or tmp))
            for cfg in cfgs.values():
                validate(cfg)
            if args.work_dir:
                check_work_dir(Path(args.work_dir), cfgs.values())
        env = machine()
        layers = run_layers(args, env) if args.impls else []
        trained = run_train(cfgs, env)
    write_json(args.out, "moe", layers + trained)
    if args.json:
        for rec in layers + trained:
            print(json.dumps(rec))
        return 0
    tables = [layer_table(layers)] if layers else []
    tables += [train_table(trained)] if trained else []
    print("\n\n".join(tables))
    return 0
