"""What the compiled train step moves between devices, against the analytic ideal per mesh.

    python -m benchmarks comms [--mesh DATA,FSDP,TENSOR ...] [--config YAML]
        [section.key=value ...] [--json]

The step is compiled abstractly (no weights are allocated, nothing runs) on each mesh; on a
CPU without enough devices the command reruns itself with XLA forcing that many host
devices. Collectives are read from the optimised HLO (gpt2_jax.parallel.hlo_collectives) and counted
per step, loops included. Without --config the shape is GPT-2 small's width with 2 layers,
T 1024, global batch 64, grad_accum 2, bf16.

The ideal, per device and step, is what this design must move and nothing else (A micro-
batches, mesh data d × fsdp f × tensor t, r rows per device per micro-batch):
- where fsdp splits parameters (Trainer.accumulate), per micro-batch: each fsdp-split weight
  all-gathered over fsdp in the forward and again in the backward (fp32, the stored dtype;
  XLA may keep the forward's gather for the backward and move less), and its gradient
  reduce-scattered over fsdp, then all-reduced over data as a shard; the other gradients
  all-reduced over data × fsdp; the vocabulary-split embedding / head (fsdp splits them by
  vocabulary: gpt2_jax.ops.vocab_lookup, chunked_loss) moves activations instead of its
  weight: the lookup's output reduce-scattered and its gradient gathered, the head's input
  gathered and its gradient (fp32) reduce-scattered, each (f - 1) r T D; a table stored split
  along features (a vocabulary fsdp does not divide) is moved to vocabulary rows and its
  gradient back, an all-to-all of its shard each way;
- where no parameter is split over a batch axis (a pure data axis), gradients reduced once
  per step, an all-reduce over data; with dropout or MoE every micro-batch;
- with tensor parallelism, the Megatron activation all-reduces of each micro-batch: two per
  layer forward and two backward, plus the embedding lookup and the head's input gradient,
  each of [r, T, D] in the compute dtype (XLA:CPU widens bf16 matmuls to fp32, so on CPU
  those move twice the ideal's bytes); a vocabulary stored whole but split for the head has
  its gradient all-gathered over tensor once per step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

from benchmarks import child_env
from benchmarks._flags import int_list
from gpt2_jax.errors import ArgParser, UserError, cli_main

DEFAULT_MESHES = ("1,8,1", "2,4,1", "4,1,2")
DEFAULT_SHAPE = [
    "model.n_layer=2",
    "model.dtype=bfloat16",
    "train.batch_size=64",
    "train.seq_len=1024",
    "train.grad_accum=2",
]
_CHILD = "GPT2_JAX_COMMS_CHILD"  # set in the rerun with forced host devices


def _parser() -> ArgParser:
    p = ArgParser(prog="python -m benchmarks comms", description=__doc__.split("\n")[0])
    p.add_argument(
        "--mesh",
        action="append",
        metavar="DATA,FSDP,TENSOR",
        help=f"a mesh to compile for (repeatable; default {' '.join(DEFAULT_MESHES)})",
    )
    p.add_argument("--config", help="YAML config (default: the shape described above)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--hlo-dir", help="also write each mesh's optimised HLO into this folder")
    return p  # fmt: skip


def _meshes(texts: list[str]) -> list[tuple[int, int, int]]:
    meshes = []
    for text in texts:
        sizes = int_list(text, "--mesh")
        if len(sizes) != 3:
            raise UserError(f"--mesh takes DATA,FSDP,TENSOR (three sizes), got {text!r}")
        meshes.append(tuple(sizes))
    return meshes


def _rerun_with_devices(n: int, argv: list[str]) -> int | None:
    """Rerun in a child with n forced CPU devices when this process has fewer; None = go on."""
    import jax

    if jax.device_count() >= n or os.environ.get(_CHILD):
        if jax.device_count() < n:
            raise UserError(f"the meshes need {n} devices but there are {jax.device_count()}")
        return None
    if jax.default_backend() != "cpu":
        raise UserError(f"the meshes need {n} devices but there are {jax.device_count()}")
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    env = child_env(dict(os.environ, XLA_FLAGS=flags.strip(), **{_CHILD: "1"}))
    return subprocess.run([sys.executable, "-m", "benchmarks", "comms", *argv], env=env).returncode


def compile_step(cfg, sizes: tuple[int, int, int]):
    """(compiled train step, its Trainer) for `cfg` on a (data, fsdp, tensor) mesh."""
    import jax
    import jax.numpy as jnp

    from gpt2_jax.config import MeshConfig
    from gpt2_jax.parallel.sharding import make_mesh
    from gpt2_jax.training.step import Trainer

    data, fsdp, tensor = sizes
    mesh_cfg = MeshConfig(data=data, fsdp=fsdp, tensor=tensor)
    mesh = make_mesh(mesh_cfg, jax.devices()[: data * fsdp * tensor])
    trainer = Trainer(cfg.model, cfg.train, mesh)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(trainer.init_state), trainer.state_shardings,
    )  # fmt: skip
    batch = jax.ShapeDtypeStruct(
        (cfg.train.batch_size, cfg.train.seq_len), jnp.int32, sharding=trainer.batch_sharding
    )
    return trainer.step.lower(state, batch, batch).compile(), trainer


def _ring(n: int) -> float:
    """Bytes an all-reduce sends per byte of its buffer, per device (ring algorithm)."""
    return 2 * (n - 1) / n


def ideal_bytes(trainer) -> dict[str, float]:
    """The analytic ideal of the module docstring: bytes one device sends per step."""
    import jax
    from jax.sharding import PartitionSpec

    from gpt2_jax.parallel.sharding import mesh_axes

    mesh, cfg, mcfg = trainer.mesh, trainer.cfg, trainer.model_cfg
    d, f, t = (mesh.shape[a] for a in ("data", "fsdp", "tensor"))
    A = cfg.grad_accum
    # gradients are reduced each micro-batch unless each batch shard accumulates its own
    reductions = 1 if trainer.replicas > 1 else A
    parts = {"weights": 0.0, "gradients": 0.0, "vocabulary": 0.0, "activations": 0.0}
    specs = jax.tree_util.tree_leaves_with_path(
        trainer.param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    params = jax.tree.leaves(jax.eval_shape(trainer.init_state).params)
    compute = jax.numpy.dtype(mcfg.compute_dtype).itemsize
    for p, (path, spec) in zip(params, specs, strict=True):
        axes = {a for e in spec for a in mesh_axes(e)}
        nbytes = math.prod(p.shape) * p.dtype.itemsize
        split = math.prod(mesh.shape[a] for a in axes)
        vocabulary = path[0].key in ("wte", "lm_head")  # split by vocabulary: no weight moves
        if "fsdp" in axes and not vocabulary:
            parts["weights"] += 2 * A * (f - 1) / f * nbytes / (split / f)
            parts["gradients"] += A * ((f - 1) / f + _ring(d) / f) * nbytes / (split / f)
        else:
            shared = f if "fsdp" not in axes else 1  # replicated over fsdp: reduced there too
            parts["gradients"] += reductions * _ring(d * shared) * nbytes / split
    rows = cfg.batch_size // (A * d * f)
    act = rows * cfg.seq_len * mcfg.n_embd
    table = mcfg.padded_vocab * mcfg.n_embd  # elements
    relaid = trainer.param_specs["wte"]["embedding"].value[0] is None  # not stored by rows
    if f > 1 and trainer.replicas == 1:
        parts["vocabulary"] += A * (f - 1) * act * (3 * compute + 4)
        if relaid:  # stored along features: relaid to vocabulary rows and back
            parts["vocabulary"] += 2 * A * (f - 1) / f * table * compute / f
    if t > 1:
        parts["activations"] = A * (4 * mcfg.n_layer + 2) * _ring(t) * act * compute
        if relaid:  # stored whole, split for the head: its gradient gathered
            parts["vocabulary"] += (t - 1) / t * table * 4
    parts["total"] = sum(parts.values())
    return parts


def report(cfg, sizes: tuple[int, int, int], hlo_dir: str | None = None) -> dict:
    """Collectives of the compiled step by kind, the largest one, the ideal, and memory."""
    from pathlib import Path

    import jax

    from gpt2_jax.parallel.hlo_collectives import collectives, summary

    compiled, trainer = compile_step(cfg, sizes)
    hlo = compiled.as_text()
    if hlo_dir is not None:
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(hlo_dir) / ("train_step_mesh_" + "x".join(map(str, sizes)) + ".hlo")).write_text(hlo)
    ops = collectives(hlo)
    largest = max(ops, key=lambda c: c.elements, default=None)
    params = jax.tree.leaves(jax.eval_shape(trainer.init_state).params)
    ideal = ideal_bytes(trainer)
    total = sum(c.bytes_sent * c.count for c in ops)
    return {
        "mesh": dict(zip(("data", "fsdp", "tensor"), sizes, strict=True)),
        "by_kind": summary(ops),
        "total_bytes_per_device": total,
        "largest_collective": None if largest is None else {
            "kind": largest.kind, "elements": largest.elements, "op": largest.name,
        },
        "largest_parameter_elements": max(math.prod(p.shape) for p in params),
        "parameter_bytes": sum(math.prod(p.shape) * p.dtype.itemsize for p in params),
        "largest_all_reduce_array": max(
            (math.prod(shape) for c in ops if c.kind == "all-reduce" for _, shape in c.arrays),
            default=0,
        ),
        "ideal_bytes_per_device": ideal,
        "ratio_to_ideal": total / ideal["total"] if ideal["total"] else None,
        "temp_bytes_per_device": compiled.memory_analysis().temp_size_in_bytes,
    }  # fmt: skip


def _print_table(cfg, reports: list[dict]) -> None:
    m, t = cfg.model, cfg.train
    print(f"train step: d {m.n_embd}, {m.n_head} heads, {m.n_layer} layers, vocab {m.vocab_size}"
          f" (padded {m.padded_vocab}), T {t.seq_len}, batch {t.batch_size}, grad_accum "
          f"{t.grad_accum}, {m.compute_dtype}; MB sent per device per step")  # fmt: skip
    for r in reports:
        mesh = " × ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
        print(f"\n{mesh}")
        print(f"  {'kind':<20} {'ops':>4} {'runs':>5} {'MB':>9} {'largest (M elems)':>18}")
        for kind, s in r["by_kind"].items():
            mb, big_m = s["bytes_per_device"] / 1e6, s["largest_elements"] / 1e6
            print(f"  {kind:<20} {s['ops']:>4} {s['executions']:>5} {mb:>9.1f} {big_m:>18.2f}")
        ideal = r["ideal_bytes_per_device"]
        parts = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in ideal.items() if k != "total")
        total, ratio = r["total_bytes_per_device"] / 1e6, r["ratio_to_ideal"] or 0
        print(f"  total {total:.1f} MB; ideal {ideal['total'] / 1e6:.1f} MB ({parts}); "
              f"ratio {ratio:.2f}")  # fmt: skip
        big = r["largest_collective"]
        if big:
            top = r["largest_parameter_elements"] / 1e6
            print(f"  largest collective {big['kind']} of {big['elements'] / 1e6:.2f} M elements"
                  f" (largest parameter {top:.2f} M)")  # fmt: skip
        print(f"  temp memory per device {r['temp_bytes_per_device'] / 1e9:.2f} GB")


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    meshes = _meshes(args.mesh or list(DEFAULT_MESHES))
    from gpt2_jax.config import load_config

    overrides = args.overrides if args.config else [*DEFAULT_SHAPE, *args.overrides]
    cfg = load_config(args.config, overrides)
    rc = _rerun_with_devices(max(math.prod(s) for s in meshes), argv)
    if rc is not None:
        return rc
    reports = [report(cfg, sizes, args.hlo_dir) for sizes in meshes]
    if args.json:
        print(json.dumps({"model": asdict(cfg.model), "train": asdict(cfg.train),
                          "meshes": reports}))  # fmt: skip
    else:
        _print_table(cfg, reports)
    return 0
