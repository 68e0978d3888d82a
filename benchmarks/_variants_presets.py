"""Rows, presets and their CPU time estimates for `python -m benchmarks variants`.

Rows change the preset's Standard GPT-2 in one or more ways: RoPE; GQA with n_kv_head =
n_head / 4; a sliding window (the preset's `window`, else w = seq_len / 4); and `moe`, 8 experts
top-2 at the same active parameters. Same active parameters means the same active matmul
weights in the blocks: a dense block holds 12·D² (attention 4·D², MLP 8·D²), a top-2 block
20·D² (attention 4·D², two of the eight 8·D² experts), so the MoE model has L' layers of which
m = L' // moe_every are routed, with 12·L' + 8·m = 12·L: the deepest such L' (then the smallest
moe_every). 5 dense layers → 3 layers, all routed; 8 → 6, every second; 12 → 10, every third.
n_layer 4 (the cpu preset) has no such depth and is refused. Biases, LayerNorms and the router
(D·8) are O(D) and not matched; the table prints both active counts
(`count_params(matmul_only=True)`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from gpt2_jax.config import Config, load_config
from gpt2_jax.errors import UserError

ROWS = {  # key → (name, model changes; "kv" = n_head / 4, "w" = the preset's window)
    "standard": ("Standard GPT-2", {}),
    "rope": ("+ RoPE", {"pos_embedding": "rope"}),
    "rope_gqa": ("+ RoPE + GQA", {"pos_embedding": "rope", "n_kv_head": "kv"}),
    "rope_gqa_swa": ("+ RoPE + GQA + window",
                     {"pos_embedding": "rope", "n_kv_head": "kv", "attention_window": "w"}),
    "gqa": ("GQA alone", {"n_kv_head": "kv"}),
    "swa": ("window alone", {"attention_window": "w"}),
    "moe": ("+ MoE (8 experts, top-2, same active parameters)", {"moe_experts": 8, "moe_top_k": 2}),
}  # fmt: skip
DEFAULT_ROWS = ("standard", "rope", "rope_gqa", "rope_gqa_swa")
PEERS = {"hf": "Standard (torch, transformers)", "ref": "Standard (torch, gpt2_torch_ref)"}
MULTIPLES = (1, 2, 4, 8)  # extrapolation: validation windows of k · seq_len


@dataclass(frozen=True)
class Preset:
    overrides: tuple[str, ...]  # section.key=value for every row
    eval_tokens: int | None  # val tokens scored at every length (None = all; a multiple of 8T)
    eval_batch: int  # windows per forward at 1×; k× uses eval_batch // k
    decode_new: int  # tokens decoded, ending at position seq_len
    decode_batch: int
    peers: tuple[str, ...]
    rounds: int  # timing rounds
    round_steps: int  # training steps per row per round
    what: str  # one line for --help and the results
    config_files: dict[str, str] = field(default_factory=dict)  # row → gpt2_jax/configs/ file
    seeds: int = 1  # default --seeds
    rows: tuple[str, ...] = DEFAULT_ROWS  # default --rows
    window: int | None = None  # the window rows' w (None = seq_len / 4)
    budget_min: float | None = None  # the stated wall-time budget on its machine
    gpu: bool = False  # needs a GPU; rows run one at a time
    sequential: bool = False  # rows one at a time, each timed right after its training
    parallel: bool = False  # train all rows at once (tests only: timings are then meaningless)
    then: str | None = None  # a preset run next, its rows in the same results


def _overrides(text: str) -> tuple[str, ...]:
    common = (
        "data.source=shakespeare train.seed=0 train.sample_every=0 train.grad_accum=1 "
        "model.dropout=0.0 checkpoint.every=0 checkpoint.keep=1 wandb.mode=disabled "
    )
    return tuple((common + text).split())


_SMALL = "model.n_head=8 model.n_embd=128 model.dtype=float32 "  # the CPU presets' model
_GPU_FILES = {"standard": "gpt2-124m", "rope": "gpt2-124m-rope", "rope_gqa": "gpt2-124m-gqa",
              "rope_gqa_swa": "gpt2-124m-swa", "gqa": "gpt2-124m", "swa": "gpt2-124m",
              "moe": "gpt2-124m"}  # fmt: skip

PRESETS = {
    # ≈ 10 min on an idle 2-core CPU (9.0 measured). The 50257-way softmax dominates a model
    # this small, so width and depth cost little next to it; 50 steps are ≈ 6% of an epoch.
    "cpu": Preset(
        overrides=_overrides(
            _SMALL + "model.n_layer=4 model.max_seq_len=256 train.seq_len=256 "
            "train.batch_size=8 train.max_steps=50 train.warmup_steps=5 train.lr=3e-3 "
            "train.min_lr=3e-4 train.eval_every=10 train.eval_steps=2 train.log_every=5"
        ),
        eval_tokens=16384,
        eval_batch=8,
        decode_new=64,
        decode_batch=1,
        peers=("hf", "ref"),
        rounds=3,
        round_steps=5,
        what="quick: 4 × 128, T 256, 50 steps (2-core CPU)",
        budget_min=15,
    ),
    # Past early learning: 200 steps × 2048 tokens = 410k tokens per row (the default run is at
    # val loss ≈ 4.9 there, 1.2 nats under the unigram baseline;
    # it ends at 4.66 after 819k tokens, which 18 runs cannot afford in 75 min). Every row
    # but the window alone (in `long`, where the window's claim lies; with it, 3 seeds took
    # ≈ 77 min); 5 layers so that the moe row has an equal-active depth (3).
    "quality": Preset(
        overrides=_overrides(
            _SMALL + "model.n_layer=5 model.max_seq_len=256 train.seq_len=256 "
            "train.batch_size=8 train.max_steps=200 train.warmup_steps=20 train.lr=3e-3 "
            "train.min_lr=3e-4 train.eval_every=20 train.eval_steps=4 train.log_every=10"
        ),
        eval_tokens=16384,
        eval_batch=8,
        decode_new=64,
        decode_batch=1,
        peers=(),
        rounds=3,
        round_steps=3,
        seeds=3,
        budget_min=75,
        rows=("standard", "rope", "rope_gqa", "rope_gqa_swa", "gqa", "moe"),
        what="5 × 128, T 256, 200 steps = 410k tokens (2-core CPU)",
    ),
    # Attention a large share of the step: T 4096, window 256, the blocked backend (by the cost
    # model below ≈ 50% of a full-attention step, 11% of a windowed one; T 2048 would give 34%).
    # 20 steps: throughput, memory and decode at long context; the perplexities are of early
    # learning. Rows one at a time (memory).
    "long": Preset(
        overrides=_overrides(
            _SMALL + "model.n_layer=5 model.max_seq_len=4096 model.attention_impl=blocked "
            "train.seq_len=4096 train.batch_size=1 train.max_steps=20 train.warmup_steps=2 "
            "train.lr=3e-3 train.min_lr=3e-4 train.eval_every=10 train.eval_steps=1 "
            "train.log_every=5"
        ),
        eval_tokens=32768,
        eval_batch=1,
        decode_new=64,
        decode_batch=1,
        peers=(),
        rounds=3,
        round_steps=2,
        seeds=2,
        window=256,
        budget_min=45,
        sequential=True,
        rows=("standard", "swa", "gqa", "rope", "rope_gqa", "rope_gqa_swa"),
        what="5 × 128, T 4096, window 256, blocked attention, 20 steps (2-core CPU)",
    ),
    # The 124M configs at seq_len 1024 in bf16 on one GPU (≈ 20 min per seed on an H100,
    # estimated: not yet run), then the gpu-long rows. Shakespeare has 1.65M training tokens:
    # 120 steps of 32k tokens ≈ 2.4 epochs.
    "gpu": Preset(
        overrides=_overrides(
            "model.dtype=bfloat16 train.seq_len=1024 train.batch_size=32 train.remat=none "
            "train.max_steps=120 train.warmup_steps=12 train.eval_every=20 train.eval_steps=10 "
            "train.log_every=10"
        ),
        config_files=_GPU_FILES,
        eval_tokens=None,
        eval_batch=8,
        decode_new=256,
        decode_batch=8,
        peers=("hf",),
        rounds=3,
        round_steps=10,
        seeds=3,
        gpu=True,
        then="gpu-long",
        what="124M, T 1024, bf16, 120 steps, then gpu-long (GPU)",
    ),
    # The long-context rows of the gpu preset: 124M at T 4096, window 256, 40 steps.
    "gpu-long": Preset(
        overrides=_overrides(
            "model.dtype=bfloat16 model.max_seq_len=4096 train.seq_len=4096 train.batch_size=8 "
            "train.remat=block train.max_steps=40 train.warmup_steps=4 train.eval_every=20 "
            "train.eval_steps=2 train.log_every=10"
        ),
        config_files=_GPU_FILES,
        eval_tokens=None,
        eval_batch=8,
        decode_new=256,
        decode_batch=8,
        peers=(),
        rounds=3,
        round_steps=5,
        seeds=3,
        window=256,
        gpu=True,
        rows=("standard", "swa", "rope", "rope_gqa", "rope_gqa_swa"),
        what="124M, T 4096, window 256, bf16, 40 steps (GPU)",
    ),
    # Seconds of training, for the tests and CI.
    "tiny": Preset(
        overrides=_overrides(
            "model.n_layer=1 model.n_head=4 model.n_embd=32 model.max_seq_len=32 "
            "model.dtype=float32 train.seq_len=32 train.batch_size=4 train.max_steps=6 "
            "train.warmup_steps=1 train.eval_every=3 train.eval_steps=1 train.log_every=2 "
            "checkpoint.async_save=false"
        ),
        eval_tokens=512,
        eval_batch=4,
        decode_new=4,
        decode_batch=1,
        peers=("ref",),
        rounds=2,
        round_steps=1,
        seeds=2,
        parallel=True,
        what="1 × 32, T 32, 6 steps (tests; timings meaningless)",
    ),
}


def moe_depth(n_layer: int) -> tuple[int, int] | None:
    """(layers, moe_every) of the top-2 MoE model whose blocks hold the active matmul weights of
    `n_layer` dense blocks (see the module doc), or None when no depth fits."""
    for layers in range(n_layer - 1, 0, -1):
        for every in range(1, layers + 1):
            if 3 * (n_layer - layers) == 2 * (layers // every):
                return layers, every
    return None


def _moe_change(n_layer: int) -> list[str]:
    depth = moe_depth(n_layer)
    if depth is None:
        fits = [n for n in range(2, 16) if moe_depth(n)]
        raise UserError(f"the moe row needs a depth with an equal-active MoE model; n_layer="
                        f"{n_layer} has none: pass model.n_layer= one of {fits}")  # fmt: skip
    layers, every = depth
    change = [f"model.n_layer={layers}", f"model.moe_every={every}"]
    return change + (["model.scan_layers=false"] if every > 1 else [])


def row_config(name: str, key: str, extra: list[str], work: Path, seed: int = 0) -> Config:
    """The config row `key` of preset `name` trains with train.seed = the preset's + `seed`:
    preset (and its gpt2_jax/configs/ file), overrides, the change."""
    from gpt2_jax.config import resolve_config_path

    preset = PRESETS[name]
    file = preset.config_files.get(key)
    path = resolve_config_path(file) if file else None
    base = load_config(path, [*preset.overrides, *extra])
    m, t = base.model, base.train
    if m.n_head % 4 or t.seq_len % 4:
        raise UserError(f"GQA and window rows need n_head and seq_len divisible by 4, got "
                        f"n_head={m.n_head}, seq_len={t.seq_len}")  # fmt: skip
    sizes = {"kv": m.n_head // 4, "w": preset.window or t.seq_len // 4}
    change = [f"model.{k}={sizes.get(v, v)}" for k, v in ROWS.get(key, ("", {}))[1].items()]
    if key == "moe":
        change += _moe_change(m.n_layer)
    change.append(f"train.seed={t.seed + seed}")
    change.append("train.resume=false")  # a study's runs are its own (bench._out.check_work_dir)
    change.append(f"train.out_dir={work / 'runs' / name / f'{key}-seed{seed}'}")
    if base.data.prepared_dir is None:  # one tokenisation for all rows
        change.append(f"data.prepared_dir={work / 'data'}")
    return load_config(path, [*preset.overrides, *extra, *change])


def preset_chain(name: str) -> list[str]:
    """The preset and the ones it runs next (`then`)."""
    names = [name]
    while PRESETS[names[-1]].then:
        names.append(PRESETS[names[-1]].then)
    return names


# CPU cost model (fp32, 2 cores), fitted on the 2-core Intel Xeon (Sapphire Rapids) of
# 2026-12-02, where the quality and long presets were run (BENCHMARKS.md):
# - a training token costs CPU_PARAM_S per active matmul weight outside attention: the quality
#   preset's Standard row trained at 2,800 tok/s (0.73 s per 2048-token step) at 7.42M
#   weights, of which ≈ 0.05 s attention; the 2-core AMD EPYC of 2026-12-01 took 1.20 s per
#   step for 7.22M, ≈ 1.7× as long, so there every estimate grows by that factor;
# - and CPU_KEY_S per layer per attended key (T/2 keys full-causal, w windowed): the AMD's
#   blocked-backend steps at T 2048 and 4096 (full against window 256) gave 55–85 ns, scaled
#   by the same factor;
# - an evaluated token costs a third of a training token (forward only);
# - ROW_FIXED_S per row and seed (process start, compilation, memory analysis, decode): the
#   quality rows' wall time less their training (25–45 s); EVAL_COMPILE_S per evaluated length.
CPU_PARAM_S = 0.72 / 2048 / 7.42e6
CPU_KEY_S = 35e-9
ROW_FIXED_S = 35.0
EVAL_COMPILE_S = 3.0


def _token_s(cfg: Config, seq_len: int) -> float:
    """Estimated CPU seconds of one training token of `cfg` at `seq_len` positions."""
    m = cfg.model
    d, layers = m.n_embd, m.n_layer
    kv = m.n_kv_head / m.n_head
    routed = m.n_moe_layers * (m.moe_top_k - 1) * 8 * d * d
    weights = m.vocab_size * d + layers * (2 + 2 * kv + 8) * d * d + routed
    keys = min(m.attention_window or seq_len, seq_len // 2)
    return CPU_PARAM_S * weights + CPU_KEY_S * layers * keys


def estimate_s(
    preset: Preset, cfgs: list[Config], std: Config, seeds: int, peers: int
) -> float | None:
    """Estimated wall seconds of one preset on the 2-core CPU: rows `cfgs`, `peers` torch
    peers of `std`, `seeds` times (None for GPU and parallel presets)."""
    if preset.gpu or preset.parallel:
        return None
    total = 0.0
    for cfg in cfgs:
        t = cfg.train
        step = t.batch_size * t.seq_len * _token_s(cfg, t.seq_len)
        evals = (t.max_steps // max(t.eval_every, 1)) * t.eval_steps * step / 3
        n_eval = preset.eval_tokens or 0
        lengths = MULTIPLES if cfg.model.pos_embedding == "rope" else (1,)
        evals += sum(n_eval * _token_s(cfg, k * t.seq_len) / 3 + EVAL_COMPILE_S for k in lengths)
        timing = preset.rounds * preset.round_steps * step
        total += t.max_steps * step + evals + timing + ROW_FIXED_S
    if peers:  # torch trains the Standard config only in its warm-up and the timing rounds
        t = std.train
        steps = preset.rounds * preset.round_steps + 2
        total += peers * (ROW_FIXED_S + steps * t.batch_size * t.seq_len * _token_s(std, t.seq_len))
    return seeds * total


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
