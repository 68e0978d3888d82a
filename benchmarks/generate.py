"""Generation: KV-cached decoding against full recomputation, cache bytes, speculative decoding.

    python -m benchmarks generate [--parts decode,memory,speculative]
        [--contexts 128,256,512,1024] [--new-tokens 24] [--repeats 3] [--model 12x768x12]
        [--variants mha,gqa,swa] [--window 128] [--vocab-size 50257] [--lengths 256,512,1024]
        [--target 6x384x8] [--draft 2x64x2] [--train-steps 200] [--speculative-k 2,4]
        [--spec-prompts 3] [--spec-new-tokens 48] [--train-dir DIR]
        [--host-model 48x64x4] [--host-tokens 200] [--json]

decode: randomly initialised RoPE variants of one model (`--model` LAYERSxEMBDxHEADS): `mha`,
`gqa` (n_kv_head = n_head/4) and `swa` (MHA heads, window `--window`). At context T,
`recompute` is one new token without a cache: a jitted forward over all T tokens (LM head on
the last position only, greedy argmax); `cached` is gpt2_jax.generate's own jitted prefill of a
T-token prompt and decode step, timed over `--new-tokens` steps after two warm-up steps (so its
context runs T..T+new-tokens), with a cache of exactly the slots that needs (generate would
round it up to a bucket). Times are medians per token, compilation excluded; both modes of a
point run back to back. Cache bytes are those of the cache arrays the decode step returns.

memory: `swa` decodes max(`--lengths`) tokens and reports its live cache arrays after each
length; `mha` and `gqa` report the cache gpt2_jax.decode.kv_cache allocates for that length.

speculative: a target and a small draft (RoPE, GPT-2 vocabulary) trained for `--train-steps`
steps each on the built-in Shakespeare text with gpt2_jax.train (0 = random weights) continue
`--spec-prompts` validation prompts, greedy and sampled (temperature 1): target-only,
draft-only and speculative, all in the same run. Speed-up = target-only / speculative time.

host (only when asked for): the host overhead of gpt2_jax.generate's decode loop, on a model
(`--host-model`, vocabulary 64, RoPE) so narrow that the device work is small. After a
compiling run, `--repeats` greedy runs of an 8-token prompt each time `--host-tokens` decode
steps of `decode_steps` without reading the tokens back: host ms/token is the CPU time of the
Python thread over those steps (time.thread_time; XLA runs the steps on its own threads, so
this is dispatch and bookkeeping only), wall ms/token the elapsed time until the last token is
ready. Call setup is the thread's CPU time up to the first token (model split, weights, prompt
padding, prefill dispatch). Medians over the runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks._flags import int_list, name_list
from benchmarks._generate_host import host_lines, host_targets, run_host
from benchmarks._models import random_model, random_tokens
from gpt2_jax.config import ModelConfig
from gpt2_jax.errors import ArgParser, UserError, cli_main

PARTS = ("decode", "memory", "speculative", "host")
DEFAULT_PARTS = PARTS[:3]
VARIANTS = ("mha", "gqa", "swa")
WARMUP_STEPS = 2  # decode steps run before timing: the first one compiles
SPEC_PROMPT_LEN = 32
DECODE_FIELDS = ("kind", "variant", "mode", "context", "ms_per_token", "tokens_per_s",
                 "cache_slots", "cache_bytes", "kv_bytes_per_token")  # fmt: skip
MEMORY_FIELDS = ("kind", "variant", "generated", "cache_slots", "cache_bytes", "source")


def _shape(text: str, flag: str) -> tuple[int, int, int]:
    """'LAYERSxEMBDxHEADS' → (n_layer, n_embd, n_head)."""
    try:
        n_layer, n_embd, n_head = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise UserError(f"{flag} takes LAYERSxEMBDxHEADS, e.g. 6x384x8, got {text!r}") from None
    if min(n_layer, n_embd, n_head) <= 0 or n_embd % n_head:
        raise UserError(f"{flag} {text!r}: positive sizes with HEADS dividing EMBD")
    return n_layer, n_embd, n_head


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgParser(
        prog="python -m benchmarks generate",
        description="Cached vs recomputed decoding, KV-cache bytes and speculative decoding.",
    )
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help="subset of decode,memory,speculative,host")  # fmt: skip
    p.add_argument("--contexts", default="128,256,512,1024", help="context lengths T (decode)")
    p.add_argument("--new-tokens", type=int, default=24, help="timed decode steps per context")
    p.add_argument("--repeats", type=int, default=3, help="timed recompute forwards per context")
    p.add_argument("--model", default="12x768x12", help="decode/memory model LAYERSxEMBDxHEADS")
    p.add_argument("--variants", default="mha,gqa,swa", help="subset of mha,gqa,swa")
    p.add_argument("--window", type=int, default=128, help="sliding window of the swa variant")
    p.add_argument("--vocab-size", type=int, default=50257, help="vocabulary (decode/memory)")
    p.add_argument("--lengths", default="256,512,1024", help="generated lengths (memory)")
    p.add_argument("--target", default="6x384x8", help="speculative target LAYERSxEMBDxHEADS")
    p.add_argument("--draft", default="2x64x2", help="speculative draft LAYERSxEMBDxHEADS")
    p.add_argument("--train-steps", type=int, default=200,
                   help="training steps of target and draft each (0 = random weights)")  # fmt: skip
    p.add_argument("--speculative-k", default="2,4", help="draft tokens per round (a list)")
    p.add_argument("--spec-prompts", type=int, default=3, help="validation-text prompts per point")
    p.add_argument("--spec-new-tokens", type=int, default=48, help="tokens per prompt")
    p.add_argument("--train-dir", default=None,
                   help="keep (and reuse) prepared data and trained models here; its data/ "
                   "must be this bench's own (default: a temporary directory)")  # fmt: skip
    p.add_argument("--host-model", default="48x64x4", help="host part model LAYERSxEMBDxHEADS")
    p.add_argument("--host-tokens", type=int, default=200, help="timed decode steps per host run")
    p.add_argument("--seed", type=int, default=0, help="weights and token seed, 0 <= seed < 2**32")
    p.add_argument("--json", action="store_true", help="print one JSON object per measurement")
    a = p.parse_args(argv)
    a.parts = name_list(a.parts, PARTS, "--parts")
    a.variants = name_list(a.variants, VARIANTS, "--variants")
    if not a.parts or not a.variants:
        raise UserError("--parts and --variants need at least one name each")
    a.contexts = sorted(int_list(a.contexts, "--contexts"))
    a.lengths = sorted(int_list(a.lengths, "--lengths"))
    a.model = _shape(a.model, "--model")
    a.target, a.draft = _shape(a.target, "--target"), _shape(a.draft, "--draft")
    a.host_model = _shape(a.host_model, "--host-model")
    a.speculative_k = int_list(a.speculative_k, "--speculative-k")
    for name in ("new_tokens", "repeats", "window", "vocab_size", "spec_prompts",
                 "spec_new_tokens", "host_tokens"):  # fmt: skip
        if getattr(a, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if a.train_steps < 0:
        raise UserError("--train-steps must be >= 0")
    if not 0 <= a.seed < 2**32:  # numpy generators and nnx.Rngs both take it
        raise UserError(f"--seed must be in [0, 2**32), got {a.seed}")
    if a.model[2] % 4:
        raise UserError(f"--model heads must be a multiple of 4 (gqa uses n_head/4), got {a.model}")
    return a


def variants(a: argparse.Namespace) -> dict[str, ModelConfig]:
    """The selected mha / gqa (n_kv_head = n_head/4) / swa (window) versions of one RoPE model
    (max_seq_len does not bound RoPE; it is set past every length measured anyway)."""
    n_layer, n_embd, n_head = a.model
    base = dict(vocab_size=a.vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                max_seq_len=max(a.contexts + a.lengths) + a.new_tokens + WARMUP_STEPS + 16,
                pos_embedding="rope", dtype="float32")  # fmt: skip
    every = {
        "mha": ModelConfig(**base),
        "gqa": ModelConfig(**base, n_kv_head=n_head // 4),
        "swa": ModelConfig(**base, attention_window=a.window),
    }
    return {name: every[name] for name in a.variants}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _recompute_step(graphdef, state, tokens_BT):
    """The next greedy token without a cache: the model's blocks over all T tokens."""
    model = nnx.merge(graphdef, state)
    model.eval()
    logits_BV = model.logits(model.hidden(tokens_BT)[:, -1:])[:, 0]  # the last position only
    return jnp.argmax(logits_BV, axis=-1)


def _median_ms(times_s: list[float]) -> float:
    return 1e3 * statistics.median(times_s)


def cached_steps(model, prompt_BT: jax.Array, steps: int) -> Iterator[tuple[float, object]]:
    """Greedy prefill, then `steps` decode steps of gpt2_jax.generate's Decoder, each waited
    for, with a cache of exactly T + steps + 1 slots. Yields each step's seconds and the live
    cache it returned."""
    from gpt2_jax import generate as G
    from gpt2_jax.decode.kv_cache import cache_size
    from gpt2_jax.decode.sampling import Sampling

    dec = G.Decoder(model)
    B, T = prompt_BT.shape
    keys_B, temp, greedy = G.sample_keys(0, B), jnp.float32(0.0), Sampling(0.0)
    size = cache_size(model.cfg, T + steps + 1)
    tok_B, _, cache = dec.prefill(prompt_BT, T, keys_B, temp, size, greedy)
    pos_B = jnp.full((B,), T, jnp.int32)
    for _ in range(steps):
        t0 = time.perf_counter()
        tok_B, _, cache, pos_B = dec.decode(cache, tok_B, pos_B, keys_B, temp, greedy)
        tok_B.block_until_ready()
        yield time.perf_counter() - t0, cache


def measure_point(model, tokens_1T: jax.Array, repeats: int, new_tokens: int) -> list[dict]:
    """[recompute, cached] results at context T. After compiling both, each of `repeats`
    rounds times one recompute step and then its share of the decode steps, so both modes
    see the same machine load; times are medians."""
    graphdef, state = nnx.split(model)
    per_round = -(-new_tokens // repeats)
    decode = cached_steps(model, tokens_1T, WARMUP_STEPS + per_round * repeats)
    for _ in range(WARMUP_STEPS):
        next(decode)
    _recompute_step(graphdef, state, tokens_1T).block_until_ready()
    recompute_s, cached_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _recompute_step(graphdef, state, tokens_1T).block_until_ready()
        recompute_s.append(time.perf_counter() - t0)
        for _ in range(per_round):
            seconds, cache = next(decode)
            cached_s.append(seconds)
    out = []
    for mode, times in (("recompute", recompute_s), ("cached", cached_s)):
        ms = _median_ms(times)
        out.append({"mode": mode, "ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                    "min_ms_per_token": 1e3 * min(times), "timed_tokens": len(times)})  # fmt: skip
    out[1] |= {"cache_slots": cache.size, "cache_bytes": cache.nbytes,
               "kv_bytes_per_token": cache.nbytes // (cache.size * tokens_1T.shape[0])}  # fmt: skip
    return out


def run_decode(a: argparse.Namespace, emit) -> list[dict]:
    """Recompute and cached decoding at every context, for every variant."""
    records = []
    for name, cfg in variants(a).items():
        model = random_model(cfg, a.seed)
        for T in a.contexts:
            common = {"kind": "decode", "variant": name, "context": T, "n_head": cfg.n_head,
                      "n_kv_head": cfg.n_kv_head, "window": cfg.attention_window}  # fmt: skip
            for result in measure_point(model, random_tokens(cfg.vocab_size, T, a.seed), a.repeats,
                                        a.new_tokens):  # fmt: skip
                records.append(emit(common | result))
    return records


def run_memory(a: argparse.Namespace, emit) -> list[dict]:
    """Cache bytes after `--lengths` new tokens: swa's live arrays while it decodes the longest
    length; the cache gpt2_jax.decode.kv_cache allocates for the full-attention variants."""
    from gpt2_jax.decode.kv_cache import cache_size, init_cache

    records = []
    prompt_len = min(a.contexts)  # the swa prefill and decode step then reuse decode's compiles
    for name, cfg in variants(a).items():
        if cfg.attention_window is None:
            for L in a.lengths:
                cache = init_cache(cfg, 1, cache_size(cfg, prompt_len + L))
                records.append(emit({"kind": "memory", "variant": name, "generated": L,
                                     "cache_slots": cache.size, "cache_bytes": cache.nbytes,
                                     "source": "allocated"}))  # fmt: skip
            continue
        model = random_model(cfg, a.seed)
        times = []
        for L, (seconds, cache) in enumerate(
            cached_steps(model, random_tokens(cfg.vocab_size, prompt_len, a.seed), max(a.lengths)),
            1,
        ):
            times.append(seconds)
            if L in a.lengths:
                recent = times[max(WARMUP_STEPS, L - 32) :]  # the last 32 steps, warm
                ms = _median_ms(recent) if recent else None
                records.append(emit({"kind": "memory", "variant": name, "generated": L,
                                     "cache_slots": cache.size, "cache_bytes": cache.nbytes,
                                     "source": "decoded", "ms_per_token": ms}))  # fmt: skip
    return records


# ----------------------------------------------------------------------------- speculative


def _train_overrides(shape: tuple[int, int, int], steps: int, out: Path, data: Path) -> list[str]:
    n_layer, n_embd, n_head = shape
    return [
        f"model.n_layer={n_layer}", f"model.n_embd={n_embd}", f"model.n_head={n_head}",
        "model.pos_embedding=rope", "model.max_seq_len=1024", "model.dtype=float32",
        "train.batch_size=4", "train.seq_len=128", f"train.max_steps={steps}",
        f"train.warmup_steps={max(1, steps // 10)}", "train.lr=6e-3", "train.min_lr=6e-4",
        f"train.eval_every={steps}", "train.eval_steps=8", f"train.log_every={max(1, steps // 4)}",
        "checkpoint.every=0", f"train.out_dir={out}", f"data.prepared_dir={data}",
    ]  # fmt: skip


def _check_own_data(data: Path, cfg) -> None:
    """--train-dir/data is reused only when it holds what this bench prepares there (the same
    source and settings); anything else there is the user's and is never prepared over."""
    from gpt2_jax.data import read_meta

    if not data.exists() or (data.is_dir() and not any(data.iterdir())):
        return
    meta = read_meta(data) or {}
    keys = ("source", "val_fraction", "text_field", "decode_errors")
    if any(meta.get(k) != getattr(cfg, k) for k in keys):
        raise UserError(
            f"--train-dir: {data} holds something other than this benchmark's prepared "
            f"{cfg.source} data; pick a new --train-dir, or move {data} away"
        )


def speculative_models(a: argparse.Namespace, work: Path) -> tuple:
    """(target, draft, info): trained with gpt2_jax.train, or random with --train-steps 0."""
    from gpt2_jax.config import DataConfig, load_config
    from gpt2_jax.data import prepare_source
    from gpt2_jax.formats.loading import load_model

    data = work / "data"
    _check_own_data(data, DataConfig())
    prepare_source(DataConfig(), data, show_progress=False)
    models, info = [], {}
    for role, shape in (("target", a.target), ("draft", a.draft)):
        if a.train_steps == 0:
            n_layer, n_embd, n_head = shape
            cfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                              pos_embedding="rope", dtype="float32")  # fmt: skip
            models.append(random_model(cfg, a.seed))
            info |= {f"{role}_val_loss": None, "unigram_val_loss": None}
            continue
        from gpt2_jax.train import train

        out = work / f"{role}-{'x'.join(map(str, shape))}-{a.train_steps}"
        cfg = load_config(None, _train_overrides(shape, a.train_steps, out, data))
        t0 = time.perf_counter()
        summary = train(cfg)  # resumes (a no-op) when --train-dir already holds this run
        lines = (out / "metrics.jsonl").read_text().splitlines()
        val = [r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r][-1]
        print(f"{role} {shape}: {a.train_steps} steps, {time.perf_counter() - t0:.0f} s, "
              f"val loss {val:.3f}", file=sys.stderr)  # fmt: skip
        info[f"{role}_val_loss"] = val
        info["unigram_val_loss"] = summary["unigram_baseline_loss"]
        models.append(load_model(out))
    return models[0], models[1], info


def _prompts(work: Path, n: int) -> list[list[int]]:
    from gpt2_jax.data import TokenDataset

    val = np.asarray(TokenDataset(work / "data" / "val.bin").tokens)
    starts = np.linspace(0, len(val) - SPEC_PROMPT_LEN - 1, n).astype(int)
    return [val[s : s + SPEC_PROMPT_LEN].astype(int).tolist() for s in starts]


def run_speculative(a: argparse.Namespace, emit) -> list[dict]:
    """Acceptance and speed-up for each sampling mode and k, on one trained pair."""
    from gpt2_jax.decode.sampling import Sampling

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.train_dir) if a.train_dir else Path(tmp)
        target, draft, info = speculative_models(a, work)
        prompts = _prompts(work, a.spec_prompts)
    n, records = a.spec_new_tokens, []
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        for k in a.speculative_k:
            rec = {"kind": "speculative", "sampling": mode, "temperature": temperature, "k": k}
            rec |= _speculative_point(target, draft, prompts, n, k, Sampling(temperature))
            rec |= {"target": "x".join(map(str, a.target)), "draft": "x".join(map(str, a.draft)),
                    "train_steps": a.train_steps}  # fmt: skip
            records.append(emit(rec | info))
    return records


def _speculative_point(target, draft, prompts, n: int, k: int, sampling) -> dict:
    """Target-only, draft-only and speculative generation of `n` tokens after each prompt,
    one prompt after another (after a compiling round of each); sample i uses seed i."""
    from gpt2_jax import generate as G
    from gpt2_jax.decode.speculative import SpecStats, speculative_generate

    def plain(model, prompt, seed):
        return G.generate(model, prompt, max_new_tokens=n, temperature=sampling.temperature,
                          seed=seed)  # fmt: skip

    def spec(prompt, seed, stats):
        return speculative_generate(target, draft, np.asarray([prompt]), max_new_tokens=n, k=k,
                                    sampling=sampling, keys_B=G.sample_keys(seed, 1),
                                    stats=stats)  # fmt: skip

    plain(target, prompts[0], 0), plain(draft, prompts[0], 0), spec(prompts[0], 0, None)
    stats, same, t_target, t_draft, t_spec = SpecStats(), True, 0.0, 0.0, 0.0
    for seed, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        want = plain(target, prompt, seed)
        t1 = time.perf_counter()
        plain(draft, prompt, seed)
        t2 = time.perf_counter()
        got = spec(prompt, seed, stats)
        t3 = time.perf_counter()
        t_target, t_draft, t_spec = t_target + t1 - t0, t_draft + t2 - t1, t_spec + t3 - t2
        same &= bool(np.array_equal(want, got))
    per_tok = 1e3 / (n * len(prompts))
    rec = {
        "acceptance": stats.acceptance,
        "tokens_per_round": (stats.accepted + stats.rounds) / max(stats.rounds, 1),
        "target_ms_per_token": t_target * per_tok, "draft_ms_per_token": t_draft * per_tok,
        "speculative_ms_per_token": t_spec * per_tok, "speedup": t_target / t_spec,
        "prompts": len(prompts), "new_tokens": n,
    }  # fmt: skip
    if sampling.temperature == 0:
        rec["greedy_matches_target"] = same  # the rejection rule keeps greedy output exact
    return rec


# ------------------------------------------------------------------------------------ report


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def report(records: list[dict]) -> str:
    """Human-readable tables of every part, then the targets of issues #8 and #19."""
    out = []
    dec = {(r["variant"], r["context"], r["mode"]): r for r in records if r["kind"] == "decode"}
    if dec:
        out.append("variant context  recompute ms/tok  cached ms/tok  cached tok/s  speed-up  "
                   "cache slots  cache MiB  KV B/token")  # fmt: skip
    for (name, T, mode), c in dec.items():
        if mode == "cached":
            r = dec[(name, T, "recompute")]
            out.append(
                f"{name:7s} {T:7d} {r['ms_per_token']:17.2f} {c['ms_per_token']:14.2f} "
                f"{c['tokens_per_s']:13.1f} {r['ms_per_token'] / c['ms_per_token']:8.1f}x "
                f"{c['cache_slots']:12d} {_mib(c['cache_bytes']):>10s} "
                f"{c['kv_bytes_per_token']:11d}"
            )
    mem = [r for r in records if r["kind"] == "memory"]
    if mem:
        out.append("\nvariant generated  cache slots  cache MiB  decode ms/tok  source")
    for r in mem:
        ms = "-" if r.get("ms_per_token") is None else f"{r['ms_per_token']:.2f}"
        out.append(f"{r['variant']:7s} {r['generated']:9d} {r['cache_slots']:12d} "
                   f"{_mib(r['cache_bytes']):>10s} {ms:>14s}  {r['source']}")  # fmt: skip
    spec = [r for r in records if r["kind"] == "speculative"]
    if spec:
        r = spec[0]
        loss = {key: "-" if r[key] is None else f"{r[key]:.3f}" for key in
                ("target_val_loss", "draft_val_loss", "unigram_val_loss")}  # fmt: skip
        out.append(f"\nspeculative: target {r['target']} (val loss {loss['target_val_loss']}), "
                   f"draft {r['draft']} ({loss['draft_val_loss']}), unigram "
                   f"{loss['unigram_val_loss']}; {r['prompts']} prompts x {r['new_tokens']} "
                   "tokens each")  # fmt: skip
        out.append("sampling  k  acceptance  tok/round  target ms/tok  draft ms/tok  "
                   "spec ms/tok  speed-up")  # fmt: skip
    for r in spec:
        out.append(
            f"{r['sampling']:8s} {r['k']:2d} {r['acceptance']:11.3f} "
            f"{r['tokens_per_round']:10.2f} {r['target_ms_per_token']:14.2f} "
            f"{r['draft_ms_per_token']:13.2f} {r['speculative_ms_per_token']:12.2f} "
            f"{r['speedup']:8.2f}x"
        )
    return "\n".join(out + host_lines(records) + targets(records))


def targets(records: list[dict]) -> list[str]:
    """Issue #8 and #19 targets the records cover, each 'met' or 'NOT met' with its figure."""
    verdict = {True: "met", False: "NOT met"}
    dec = {(r["variant"], r["context"], r["mode"]): r for r in records if r["kind"] == "decode"}
    lines = []
    for name in VARIANTS:
        if (name, 512, "cached") in dec:
            ratio = (
                dec[(name, 512, "recompute")]["ms_per_token"]
                / dec[(name, 512, "cached")]["ms_per_token"]
            )
            lines.append(f"  {name}: cached >= 10x faster than recompute at context 512: "
                         f"{ratio:.1f}x ({verdict[ratio >= 10]})")  # fmt: skip
    per_tok = {v: r["kv_bytes_per_token"] for (v, _, m), r in dec.items() if m == "cached"}
    if "mha" in per_tok and "gqa" in per_tok:
        lines.append(f"  gqa KV cache exactly 1/4 of mha: {per_tok['gqa']} vs {per_tok['mha']} "
                     f"B/token ({verdict[4 * per_tok['gqa'] == per_tok['mha']]})")  # fmt: skip
    swa = [r for r in records if r["kind"] == "memory" and r["source"] == "decoded"]
    if swa:
        sizes = sorted({r["cache_bytes"] for r in swa})
        lengths = ",".join(str(r["generated"]) for r in swa)
        lines.append(f"  swa decode memory flat: {' / '.join(_mib(b) for b in sizes)} MiB after "
                     f"{lengths} tokens ({verdict[len(sizes) == 1]})")  # fmt: skip
    lines += host_targets(records)
    return ["\ntargets:", *lines] if lines else []


@cli_main
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    records: list[dict] = []

    def emit(record: dict) -> dict:  # JSON lines on stdout, or as progress on stderr
        print(json.dumps(record), file=sys.stdout if a.json else sys.stderr, flush=True)
        return record

    run = {"decode": run_decode, "memory": run_memory, "speculative": run_speculative,
           "host": run_host}  # fmt: skip
    for part in PARTS:
        if part in a.parts:
            records += run[part](a, emit)
    n_layer, n_embd, n_head = a.model
    head = (
        f"generation on {jax.devices()[0].device_kind}, batch 1, fp32; decode/memory model "
        f"{n_layer} layers x {n_embd} dims x {n_head} heads, vocab {a.vocab_size}, RoPE"
    )
    text = head + "\n" + report(records)
    print(text, file=sys.stderr if a.json else sys.stdout)
    return 0
