"""Compile time and compiled memory of the train step at every GPT-2 size, without allocating.

    python -m benchmarks scale [--configs gpt2-124m,gpt2-350m,gpt2-774m,gpt2-1.5b]
        [--layouts unrolled,scanned] [--loss-impls full,chunked] [--batch-size 16]
        [--seq-len 1024] [--mesh data=1,fsdp=1,expert=1,tensor=1] [--remat config] [--dtype float32]
        [--target cpu | tpu:TOPOLOGY | gpu:GPUxN] [--out FILE] [--json]

For each config × layer layout (`model.scan_layers`) × `train.loss_impl`, the train step is
traced and compiled from abstract shapes (`jit(...).lower(...).compile()`: no weights exist)
and XLA's memory analysis of the compiled program is read: per device, the arguments (state
and batch), outputs, the donated part of both (aliased), temporaries, and peak = arguments +
outputs − aliased + temporaries. `--mesh` shards the step as training would (on CPU the
benchmark asks XLA for that many host devices when JAX is not yet started).

`--target tpu:v5e:2x4` (any topology libtpu knows: v5p:2x4x4, v6e:2x4, ...) compiles for that
TPU slice instead, from this host, with XLA's TPU compiler; `--target gpu:h100x8` (a100, h100,
h200; x8 per host) for that many NVIDIA GPUs with XLA:GPU (benchmarks/_targets.py; the
`[tpu]` / `[compile]` extras). `--mesh` must use all its devices (default: fsdp over all of
them), `auto` choices resolve as on the target, and each row says which attention and MoE
paths it got, the device's memory, what a step may use of it (all of a TPU's HBM; JAX's
default 75% of a GPU's) and whether the step fits. FLOPs per step are counted analytically (6 ×
matmul parameters + 12 × layers × d × attended keys, per token: `training.metrics.flops_per_token`)
beside the compiler's own count, which counts a loop body once (scanned layers, the chunked
loss) and so under-counts.

On XLA:CPU `jax.checkpoint` in an unrolled graph changes neither the compiled temporaries nor
the real peak (XLA:CPU undoes the remat), so the unrolled figures say nothing about remat
savings; inside the scan of scanned layers it holds. The chunked loss removes buffers from the
graph itself, so its saving shows here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

from benchmarks import _targets
from benchmarks._flags import name_list
from benchmarks._out import check_json_path, write_json
from gpt2_jax.errors import ArgParser, UserError, cli_main

CONFIGS = ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b")
LAYOUTS = {"unrolled": False, "scanned": True}
AXES = ("data", "fsdp", "expert", "tensor")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=8' or 'data=2,fsdp=4' → sizes of data, fsdp, expert and tensor (1 where not
    given)."""
    sizes = dict.fromkeys(AXES, 1)
    for part in (p.strip() for p in text.split(",") if p.strip()):
        axis, _, value = part.partition("=")
        if axis not in AXES or not value.isdigit() or int(value) < 1:
            raise UserError(f"--mesh takes axis=size pairs from {','.join(AXES)} (e.g. fsdp=8), "
                            f"got {part!r}")  # fmt: skip
        sizes[axis] = int(value)
    return sizes


def _ask_for_cpu_devices(n: int) -> None:
    """Ask XLA:CPU for n host devices (ignored on GPU / TPU); it takes effect only if JAX's
    backends have not started yet, which `run` then checks."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def measure(cfg, mesh) -> dict:
    """Trace and compile `cfg`'s train step abstractly on `mesh`; times and memory figures."""
    import jax
    import jax.numpy as jnp

    from gpt2_jax.training.step import Trainer

    t = cfg.train
    t0 = time.perf_counter()
    trainer = Trainer(cfg.model, t, mesh)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(trainer.init_state), trainer.state_shardings,
    )  # fmt: skip
    batch = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32,
                                 sharding=trainer.batch_sharding)  # fmt: skip
    try:
        lowered = trainer.step.lower(state, batch, batch)
    except RuntimeError as e:  # cuDNN attention loads cuDNN's library to trace
        if "cuDNN not found" not in str(e):
            raise
        raise UserError(
            "cuDNN attention needs cuDNN's library to compile, and it is not installed; pip "
            "install 'gpt2-jax[compile]' (nvidia-cudnn-cu13), or pass --dtype float32 (no cuDNN)"
        ) from None
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    return {
        "trace_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
        "argument_bytes": args, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
        "peak_bytes": args + out - alias + temp, **paths_and_flops(cfg, mesh, compiled),
    }  # fmt: skip


def paths_and_flops(cfg, mesh, compiled) -> dict:
    """The attention / MoE paths `auto` resolves to on `mesh`'s devices, the custom calls
    (kernels: cuDNN attention, Pallas, ...) the compiled program makes, and FLOPs per step:
    analytic, and the compiler's count (None where it gives none)."""
    import jax.numpy as jnp
    from flax import nnx

    from gpt2_jax.model import attention, moe
    from gpt2_jax.model.gpt import GPT, count_params
    from gpt2_jax.parallel import sharding
    from gpt2_jax.training.metrics import flops_per_token

    m, t = cfg.model, cfg.train
    target = attention.device_target(mesh.devices.flat[0])
    attn = attention.resolve_impl(
        m.attention_impl, jnp.dtype(m.compute_dtype), seq_len=t.seq_len,
        window=m.attention_window, head_dim=m.head_dim, target=target,
    )  # fmt: skip
    with sharding.activation_sharding(mesh):  # the step's device: the target's
        moe_impl = moe.resolve_impl(m.moe_impl) if m.moe_experts else None
    abstract = nnx.eval_shape(lambda: GPT(m, rngs=nnx.Rngs(0)))
    per_token = flops_per_token(m, count_params(abstract, matmul_only=True), t.seq_len)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) and cost else cost
    compiler = (cost or {}).get("flops")
    return {
        "attention_impl": attn, "moe_impl": moe_impl,
        "custom_calls": sorted(set(_CUSTOM_CALL.findall(compiled.as_text()))),
        "flops_analytic": per_token * t.batch_size * t.seq_len,
        "flops_compiler": None if compiler is None else float(compiler) * mesh.size,
    }  # fmt: skip


def run(args) -> list[dict]:
    import jax

    from gpt2_jax.config import MeshConfig, load_config, resolve_config_path
    from gpt2_jax.parallel.sharding import make_mesh

    n = math.prod(args.mesh.values())
    if args.target[0] != "cpu":
        devices = _targets.devices(*args.target)
        if n != len(devices):
            raise UserError(f"--mesh has {n} devices but --target {':'.join(args.target)} has "
                            f"{len(devices)}; make the mesh use them all")  # fmt: skip
    elif len(jax.devices()) < n:
        raise UserError(f"--mesh needs {n} devices, JAX sees {len(jax.devices())}; on CPU start "
                        f"with XLA_FLAGS=--xla_force_host_platform_device_count={n}")  # fmt: skip
    else:
        devices = jax.devices()[:n]
    mesh = make_mesh(MeshConfig(**args.mesh), devices)
    device = devices[0].device_kind
    hbm, usable = _targets.hbm_bytes(device), _targets.usable_bytes(device)
    records = []
    remat = None if args.remat == "config" else args.remat
    for name in args.configs:
        base = load_config(resolve_config_path(name))
        for layout in args.layouts:
            for impl in args.loss_impls:
                model = dataclasses.replace(base.model, scan_layers=LAYOUTS[layout],
                                            dtype=args.dtype)  # fmt: skip
                train = dataclasses.replace(
                    base.train, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=1,
                    loss_impl=impl, remat=remat or base.train.remat,
                )  # fmt: skip
                cfg = dataclasses.replace(base, model=model, train=train)
                # A TPU compile of a GPT-2 size takes about 40 s on 2 cores: say what runs.
                print(f"compiling {name} {layout} {impl} for {device} ...", file=sys.stderr,
                      flush=True)  # fmt: skip
                rec = {"config": name, "layout": layout, "loss_impl": impl,
                       "batch_size": args.batch_size, "seq_len": args.seq_len,
                       "mesh": args.mesh, "remat": train.remat, "dtype": args.dtype,
                       "device": device, **measure(cfg, mesh)}  # fmt: skip
                rec["target"] = ":".join(a for a in args.target if a)
                rec["hbm_bytes"], rec["usable_bytes"] = hbm, usable
                rec["fits"] = None if usable is None else rec["peak_bytes"] <= usable
                records.append(rec)
                print(_row(rec), file=sys.stderr, flush=True)
    return records


def _row(r: dict) -> str:
    sizes = " ".join(f"{r[k] / 1e9:8.2f}" for k in ("argument_bytes", "temp_bytes", "peak_bytes"))
    fits = {None: "-", True: "yes", False: "NO"}[r["fits"]]
    compiler = "-" if r["flops_compiler"] is None else f"{r['flops_compiler'] / 1e12:.1f}"
    return (f"{r['config']:<11} {r['layout']:<9} {r['loss_impl']:<8} {r['trace_s']:7.1f} "
            f"{r['compile_s']:8.1f} {sizes} {fits:>4} {r['attention_impl']:<8} "
            f"{r['moe_impl'] or '-':<7} {r['flops_analytic'] / 1e12:9.1f} "
            f"{compiler:>9}")  # fmt: skip


def table(records: list[dict]) -> str:
    r0 = records[0]
    mesh = "×".join(f"{a} {r0['mesh'][a]}" for a in AXES)
    lines = [
        f"train step, B {r0['batch_size']} × T {r0['seq_len']}, {r0['dtype']}, remat "
        f"{r0['remat']}, mesh {mesh}, {r0['device']} (target {r0['target']}"
        + (
            ""
            if r0["hbm_bytes"] is None
            else f", {r0['hbm_bytes'] / 2**30:.0f} GiB memory, "
            f"{r0['usable_bytes'] / 2**30:.0f} GiB usable"
        )
        + "); memory per device (GB), TFLOP per step (analytic; the compiler's)",
        f"{'config':<11} {'layout':<9} {'loss':<8} {'trace s':>7} {'compile s':>8} "
        f"{'args':>8} {'temp':>8} {'peak':>8} {'fits':>4} {'attn':<8} {'moe':<7} "
        f"{'TFLOP':>9} {'compiler':>9}",
    ]
    return "\n".join(lines + [_row(r) for r in records])


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="python -m benchmarks scale", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma list of config names or paths"
    )
    p.add_argument("--layouts", default="unrolled,scanned", help="comma list: unrolled,scanned")
    p.add_argument("--loss-impls", default="full,chunked", help="comma list: full,chunked")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--mesh", default="", help="axis=size pairs, e.g. fsdp=8 (default: 1 device)")
    p.add_argument("--remat", default="config", help="none | block | dots | config (its own)")
    p.add_argument("--dtype", default="float32", help="model.dtype (compute)")
    p.add_argument(
        "--target", default="cpu",
        help="cpu (this host), tpu:TOPOLOGY (e.g. tpu:v5e:2x4) or gpu:GPUxN (e.g. gpu:h100x8)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="JSON file (default: bench_out/scale-*/)")
    p.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.target = _targets.parse(args.target)
    mesh_given = bool(args.mesh.strip())
    args.mesh = parse_mesh(args.mesh)
    if args.target[0] == "cpu":
        _ask_for_cpu_devices(math.prod(args.mesh.values()))
    elif not mesh_given:  # FSDP over the whole slice
        args.mesh["fsdp"] = len(_targets.devices(*args.target))

    from gpt2_jax.config import DTYPES, LOSS_IMPLS, resolve_config_path
    from gpt2_jax.model.gpt import REMAT_POLICIES

    args.layouts = name_list(args.layouts, LAYOUTS, "--layouts")
    args.loss_impls = name_list(args.loss_impls, LOSS_IMPLS, "--loss-impls")
    args.configs = [c for c in args.configs.split(",") if c]
    for name in args.configs:
        if not resolve_config_path(name).is_file():
            raise UserError(f"--configs: no config {name!r}; use config names or paths")
    if args.batch_size <= 0 or args.seq_len <= 0:
        raise UserError("--batch-size and --seq-len must be positive")
    if args.remat not in (*REMAT_POLICIES, "config"):
        raise UserError(f"--remat takes one of {', '.join(REMAT_POLICIES)} or config")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype takes one of {', '.join(DTYPES)}")
    check_json_path(args.out)
    records = run(args)
    write_json(args.out, "scale", records)
    if args.json:
        for rec in records:
            print(json.dumps(rec))
    else:
        print(table(records))
    return 0
