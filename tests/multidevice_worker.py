"""Subprocess side of tests/test_multidevice.py; needs XLA_FLAGS forcing 8 (or 4) CPU devices.

python tests/multidevice_worker.py meshes MODEL WORK_DIR
    one model on 1 device and on every mesh: losses, parameters, shardings, FSDP bytes and the
    checkpoint round trip, in one process (compiles dominate); prints one JSON object.
python tests/multidevice_worker.py train ROWS_JSON [train CLI args ...]
    `python -m gpt2_jax.train` that also writes the batch rows this process fed to ROWS_JSON
    (to check that each process loads only its slice).
python tests/multidevice_worker.py variants
    both models trained with the chunked loss, and with scanned layers, on 8-device meshes
    against the plain one-device run: the largest loss and parameter differences, as JSON.
python tests/multidevice_worker.py moe
    a MoE model on expert-parallel meshes against one device: loss and parameter differences
    and each device's expert-weight bytes, as JSON.
python tests/multidevice_worker.py cli-errors JSON_LIST_OF_ARGV
    the training CLI's `main` once per argv; prints the exit codes and stderr as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gpt2_jax.config import MeshConfig, ModelConfig, TrainConfig  # noqa: E402
from gpt2_jax.formats.checkpoint import Checkpointer  # noqa: E402
from gpt2_jax.model.layer_stack import relayout  # noqa: E402
from gpt2_jax.parallel.sharding import make_mesh  # noqa: E402
from gpt2_jax.training.step import Trainer  # noqa: E402

STEPS = 5
VOCAB = 128
ODD_VOCAB = 127  # divided by no mesh axis
MODELS = {
    "learned_mha": ModelConfig(
        vocab_size=VOCAB, n_layer=1, n_head=4, n_embd=32, max_seq_len=16, dropout=0.1
    ),
    "rope_gqa_window": ModelConfig(
        vocab_size=VOCAB, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=16,
        pos_embedding="rope", attention_window=6, tie_embeddings=False, bias=False,
    ),
}  # fmt: skip
# The K part of c_attn's bias has a zero true gradient (softmax ignores a per-query constant), so
# Adam turns its summation-order noise (~1e-10) into updates of ~lr·noise/eps: at lr 1e-3 that
# stays near 1e-6 after 5 steps, well inside the 1e-5 tolerance.
TRAIN = {
    "learned_mha": TrainConfig(batch_size=8, seq_len=16, lr=1e-3, warmup_steps=2, max_steps=10),
    "rope_gqa_window": TrainConfig(
        batch_size=16, seq_len=16, grad_accum=2, lr=1e-3, warmup_steps=2, max_steps=10
    ),
}
MESHES = {
    "dp8": MeshConfig(data=8),
    "fsdp8": MeshConfig(data=1, fsdp=8),
    "dp4_tp2": MeshConfig(data=4, tensor=2),
    "dp2_fsdp2_tp2": MeshConfig(data=2, fsdp=2, tensor=2),
}
# K/V heads (1) that tensor=2 cannot split: the fused q|k|v projection must be replicated.
MQA = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=4, n_kv_head=1, n_embd=32, max_seq_len=16)
# The cluster run of test_multidevice.py (and its one-process twin): FSDP spans both processes;
# evaluation and sampling at the last step exercise every collective the loop makes.
MULTIHOST_OVERRIDES = [
    "train.max_steps=3",
    "train.eval_every=3",
    "train.sample_every=3",
    "train.batch_size=8",
    "train.seq_len=16",
    "train.peak_flops=1e12",  # skips the CPU matmul probe
    "checkpoint.every=0",
    "mesh.data=1",
    "mesh.fsdp=4",
    "mesh.tensor=2",
]


def _name(path) -> str:
    """A key path as "h/0/attn/c_attn/kernel" (the Variable's `.value` step dropped)."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def _leaves(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    return {_name(p): np.asarray(v) for p, v in flat}


def _max_diff(a: dict, b: dict) -> tuple[float, str]:
    """The largest absolute difference between two same-keyed trees, and where it is."""
    assert a.keys() == b.keys()
    return max((float(np.max(np.abs(a[k] - b[k]))), k) for k in a)


def _batches(cfg: TrainConfig, n: int, vocab: int = VOCAB) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (cfg.batch_size, cfg.seq_len + 1)).astype(np.int32)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _train(trainer: Trainer, init, batches) -> tuple[object, list[float]]:
    # One initial state for every mesh: compiling init_state per mesh would double the time.
    state, losses = jax.device_put(init, trainer.state_shardings), []
    for x, y in batches:
        state, metrics = trainer.step(state, *trainer.shard_batch(x, y))
        losses.append(metrics["loss"])
    return state, [float(v) for v in jax.device_get(losses)]


def _layout(trainer: Trainer) -> dict:
    """Per parameter: its shape, the mesh axes (of size > 1) splitting each dimension, and the
    shape of one device's shard."""
    shape = jax.eval_shape(trainer.init_state).params
    out = {}
    flat = jax.tree_util.tree_leaves_with_path(trainer.state_shardings.params)
    for (path, sh), leaf in zip(flat, jax.tree.leaves(shape), strict=True):
        axes = []
        for entry in sh.spec + (None,) * (leaf.ndim - len(sh.spec)):
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            axes.append([a for a in names if trainer.mesh.shape[a] > 1])
        out[_name(path)] = {
            "shape": list(leaf.shape),
            "axes": axes,
            "shard": list(sh.shard_shape(leaf.shape)),
        }
    return out


def _device_bytes(state) -> dict:
    """Bytes of parameters + optimizer state held by each device, from the actual shards, and
    the total and rank of the leaves that every device holds whole."""
    per_device: dict[int, int] = {}
    total = replicated = replicated_max_ndim = 0
    for x in jax.tree.leaves((state.params, state.opt_state)):
        total += x.nbytes
        for shard in x.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
        if x.addressable_shards[0].data.shape == x.shape:
            replicated += x.nbytes
            replicated_max_ndim = max(replicated_max_ndim, x.ndim)
    return {
        "per_device": [per_device[k] for k in sorted(per_device)],
        "total": total,
        "replicated": replicated,
        "replicated_max_ndim": replicated_max_ndim,
    }


def _checkpoint_roundtrip(trainers: dict, state, batch, ckpt_dir: Path) -> dict:
    """Save the FSDP-8 state; restore it on 1 device and on DP 4 × TP 2."""
    saved_params, saved_opt = _leaves(state.params), _leaves(state.opt_state)
    ckpt = Checkpointer(ckpt_dir, keep=1, async_save=False)
    ckpt.save(state, {"note": "multidevice"})
    ckpt.wait()
    _, m = trainers["fsdp8"].step(state, *trainers["fsdp8"].shard_batch(*batch))  # donates state
    out = {"fsdp8_next_loss": float(m["loss"])}
    for name in ("one", "dp4_tp2"):
        tr = trainers[name]
        restored, _, step = ckpt.restore_latest(jax.eval_shape(tr.init_state))
        same_shardings = all(
            a.sharding.is_equivalent_to(b, a.ndim)
            for a, b in zip(
                jax.tree.leaves(restored), jax.tree.leaves(tr.state_shardings), strict=True
            )
        )
        params, opt = _leaves(restored.params), _leaves(restored.opt_state)
        # The same values put on this mesh straight from host memory: the next step must agree
        # bit for bit with the restored state's.
        direct = jax.device_put(jax.device_get(restored), tr.state_shardings)
        _, m_restored = tr.step(restored, *tr.shard_batch(*batch))
        _, m_direct = tr.step(direct, *tr.shard_batch(*batch))
        out[name] = {
            "step": int(step),
            "params_equal": all(np.array_equal(params[k], saved_params[k]) for k in params),
            "opt_equal": all(np.array_equal(opt[k], saved_opt[k]) for k in opt),
            "same_keys": params.keys() == saved_params.keys() and opt.keys() == saved_opt.keys(),
            "target_shardings": same_shardings,
            "next_loss": float(m_restored["loss"]),
            "next_loss_direct": float(m_direct["loss"]),
        }
    ckpt.close()
    return out


def meshes(model_name: str, work: Path) -> dict:
    """One model on one device and on every mesh: losses, parameters, layout, FSDP bytes and
    the checkpoint round trip."""
    devices = jax.devices()
    if len(devices) != 8:
        raise SystemExit(f"need 8 devices, got {len(devices)}; set XLA_FLAGS")
    t0, c0 = time.perf_counter(), time.process_time()
    model_cfg, train_cfg = MODELS[model_name], TRAIN[model_name]
    batches = _batches(train_cfg, STEPS + 1)
    trainers = {"one": Trainer(model_cfg, train_cfg, make_mesh(MeshConfig(), devices[:1]))}
    init = jax.device_get(trainers["one"].init_state())
    ref_state, ref_losses = _train(trainers["one"], init, batches[:STEPS])
    ref_params = _leaves(ref_state.params)
    report: dict = {"one_device_losses": ref_losses, "meshes": {}}
    for mesh_name, mesh_cfg in MESHES.items():
        tr = trainers[mesh_name] = Trainer(model_cfg, train_cfg, make_mesh(mesh_cfg))
        state, losses = _train(tr, init, batches[:STEPS])
        param_diff, worst = _max_diff(_leaves(state.params), ref_params)
        report["meshes"][mesh_name] = {
            "mesh": dict(tr.mesh.shape),
            "losses": losses,
            "max_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
            "max_param_diff": param_diff,
            "worst_param": worst,
        }
        if mesh_name == "fsdp8":
            report["fsdp8_bytes"] = _device_bytes(state)
            fsdp_state = state
    report["layout"] = {m: _layout(trainers[m]) for m in ("fsdp8", "dp4_tp2")}
    if model_cfg.n_kv_head < model_cfg.n_head:
        mqa = Trainer(MQA, train_cfg, make_mesh(MESHES["dp4_tp2"]))
        report["layout"]["mqa_dp4_tp2"] = _layout(mqa)
    report["checkpoint"] = _checkpoint_roundtrip(
        trainers, fsdp_state, batches[STEPS], work / f"ckpt_{model_name}"
    )
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["cpu_seconds"] = round(time.process_time() - c0, 1)
    return report


def variants() -> dict:
    """Against the plain run on one device, for both models (tied and untied heads, with and
    without grad_accum): the chunked loss (chunk 5, not dividing seq_len 16) on FSDP and mixed
    meshes over 5 steps, scanned layers (the same initial weights, restacked; remat=block)
    on FSDP 8 over 10 steps, and a vocabulary of 127 that no mesh divides (stored split along
    features, relaid to vocabulary rows padded to a multiple of the devices inside the step),
    with either loss."""
    report = {}
    for model_name, model_cfg in MODELS.items():
        full_cfg = dataclasses.replace(TRAIN[model_name], loss_impl="full")
        chunked_cfg = dataclasses.replace(full_cfg, loss_impl="chunked", loss_chunk=5)
        # (no dropout: the stacked layers draw their masks from other keys)
        scanned_cfg = dataclasses.replace(model_cfg, n_layer=2, scan_layers=True, dropout=0.0)
        remat_cfg = dataclasses.replace(full_cfg, remat="block")
        odd_cfg = dataclasses.replace(model_cfg, vocab_size=ODD_VOCAB)
        runs = {  # name → (model config, train config, mesh, steps)
            "chunked/fsdp8": (model_cfg, chunked_cfg, "fsdp8", STEPS),
            "chunked/dp2_fsdp2_tp2": (model_cfg, chunked_cfg, "dp2_fsdp2_tp2", STEPS),
            "scanned/fsdp8": (scanned_cfg, remat_cfg, "fsdp8", 2 * STEPS),
            "vocab127/chunked/dp2_fsdp2_tp2": (odd_cfg, chunked_cfg, "dp2_fsdp2_tp2", STEPS),
            "vocab127/full/fsdp8": (odd_cfg, full_cfg, "fsdp8", STEPS),
        }
        refs = {}
        for name, (m_cfg, t_cfg, mesh_name, steps) in runs.items():
            plain = dataclasses.replace(m_cfg, scan_layers=False)
            batches = _batches(full_cfg, steps, m_cfg.vocab_size)
            if (plain, steps) not in refs:  # the plain one-device run, once per config
                one = Trainer(plain, full_cfg, make_mesh(MeshConfig(), jax.devices()[:1]))
                init = jax.device_get(one.init_state())
                refs[plain, steps] = (init, *_train(one, init, batches))
            init, ref_state, ref_losses = refs[plain, steps]
            tr = Trainer(m_cfg, t_cfg, make_mesh(MESHES[mesh_name]))
            state, losses = _train(tr, relayout(init, jax.eval_shape(tr.init_state)), batches)
            params = relayout(state.params, ref_state.params)
            report[f"{model_name}/{name}"] = {
                "max_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
                "max_param_diff": _max_diff(_leaves(params), _leaves(ref_state.params))[0],
            }
    return report


MOE_MODEL = ModelConfig(
    vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, max_seq_len=16, moe_experts=8,
    moe_top_k=2,
)  # fmt: skip
MOE_TRAIN = TrainConfig(batch_size=16, seq_len=16, grad_accum=2, lr=1e-3, warmup_steps=2,
                        max_steps=10)  # fmt: skip
MOE_MESHES = {
    "expert8": MeshConfig(data=1, expert=8),
    "dp2_expert4": MeshConfig(data=2, expert=4),
    "fsdp2_expert4": MeshConfig(data=1, fsdp=2, expert=4),
}


def _expert_bytes(params) -> dict:
    """Bytes of the expert weights (mlp/experts/...) in all, and held by each device."""
    per_device: dict[int, int] = {}
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if "experts" not in _name(path):
            continue
        total += x.nbytes
        for shard in x.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    return {"total": total, "per_device": [per_device[k] for k in sorted(per_device)]}


def moe() -> dict:
    """A MoE model (8 experts, top-2, grad_accum 2) on one device and on expert-parallel
    meshes over 5 steps: the largest loss and parameter differences and the expert bytes each
    device holds; plus the same with a capacity factor on data 2 × expert 4."""
    report = {}
    runs = {name: (MOE_MODEL, mesh) for name, mesh in MOE_MESHES.items()}
    capacity = dataclasses.replace(MOE_MODEL, moe_capacity_factor=0.5)
    runs["capacity/dp2_expert4"] = (capacity, MOE_MESHES["dp2_expert4"])
    batches = _batches(MOE_TRAIN, STEPS)
    refs = {}
    for name, (model_cfg, mesh_cfg) in runs.items():
        if model_cfg not in refs:
            one = Trainer(model_cfg, MOE_TRAIN, make_mesh(MeshConfig(), jax.devices()[:1]))
            init = jax.device_get(one.init_state())
            refs[model_cfg] = (init, *_train(one, init, batches))
        init, ref_state, ref_losses = refs[model_cfg]
        tr = Trainer(model_cfg, MOE_TRAIN, make_mesh(mesh_cfg))
        state, losses = _train(tr, init, batches)
        report[name] = {
            "mesh": {k: v for k, v in tr.mesh.shape.items() if v > 1},
            "losses": losses,
            "max_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
            "max_param_diff": _max_diff(_leaves(state.params), _leaves(ref_state.params))[0],
            "expert_bytes": _expert_bytes(state.params),
        }
    return report


def cli_errors(cases: list[list[str]]) -> list[dict]:
    """`python -m gpt2_jax.train ARGS` for each case in this process: exit code and stderr."""
    from gpt2_jax import train

    out = []
    for argv in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = train.main(argv)
            except SystemExit as e:
                code = e.code
            except Exception:  # a traceback is exactly what the test must catch
                traceback.print_exc()
                code = "traceback"
        out.append({"code": code, "stderr": err.getvalue()})
    return out


def train_recording_rows(rows_path: Path, argv: list[str]) -> int:
    """The training CLI, recording the local rows of every batch this process feeds."""
    from gpt2_jax import train

    fed: list[list[list[int]]] = []
    shard_batch = Trainer.shard_batch

    def recording(self, x_BT, y_BT):
        fed.append(np.asarray(x_BT).tolist())
        return shard_batch(self, x_BT, y_BT)

    Trainer.shard_batch = recording
    try:
        code = train.main(argv)
    finally:
        Trainer.shard_batch = shard_batch
    rows_path.write_text(json.dumps({"process_index": jax.process_index(), "batches": fed}))
    return code


def main(argv: list[str]) -> int:
    mode, *rest = argv
    if mode == "meshes":
        print(json.dumps(meshes(rest[0], Path(rest[1]))))
        return 0
    if mode == "variants":
        print(json.dumps(variants()))
        return 0
    if mode == "moe":
        print(json.dumps(moe()))
        return 0
    if mode == "cli-errors":
        print(json.dumps(cli_errors(json.loads(rest[0]))))
        return 0
    if mode == "train":
        return train_recording_rows(Path(rest[0]), rest[1:])
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
