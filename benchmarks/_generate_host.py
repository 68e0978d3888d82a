"""The `host` part of `python -m benchmarks generate`: host time per decode step."""

from __future__ import annotations

import argparse
import collections
import statistics
import time

from benchmarks._models import random_model, random_tokens
from gpt2_jax.config import ModelConfig

HOST_VOCAB, HOST_PROMPT_LEN = 64, 8
HOST_FIELDS = ("kind", "model", "tokens", "host_ms_per_token", "wall_ms_per_token",
               "setup_host_ms")  # fmt: skip
TARGET_MS = 1.0  # the target: at most 1 ms of host time per token


def _run_once(model, keys_B, tokens: int) -> tuple[float, float, float]:
    """(host s/step, wall s/step, setup host s) of one greedy decode_steps run."""
    from gpt2_jax.decode.sampling import Sampling
    from gpt2_jax.generate import decode_steps

    prompt_BT = random_tokens(HOST_VOCAB, HOST_PROMPT_LEN, 0)
    c0 = time.thread_time()
    # The first next() prefills and dispatches step 1; the loop then dispatches `tokens` more.
    steps = decode_steps(model, prompt_BT, max_new_tokens=tokens + 2, sampling=Sampling(0.0),
                         keys_B=keys_B)  # fmt: skip
    first_B, _ = next(steps)
    setup = time.thread_time() - c0
    first_B.block_until_ready()
    t0, c0 = time.perf_counter(), time.thread_time()
    last_B = collections.deque(steps, maxlen=1)[0][0]  # nothing read back: dispatch only
    host = time.thread_time() - c0
    last_B.block_until_ready()
    return host / tokens, (time.perf_counter() - t0) / tokens, setup


def run_host(a: argparse.Namespace, emit) -> list[dict]:
    """Host time per decode step of gpt2_jax.generate on the narrow `--host-model`."""
    from gpt2_jax.generate import sample_keys

    n_layer, n_embd, n_head = a.host_model
    cfg = ModelConfig(vocab_size=HOST_VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      pos_embedding="rope", dtype="float32")  # fmt: skip
    model, keys_B = random_model(cfg, a.seed), sample_keys(0, 1)
    _run_once(model, keys_B, a.host_tokens)  # compiles
    runs = [_run_once(model, keys_B, a.host_tokens) for _ in range(a.repeats)]
    host, wall, setup = (1e3 * statistics.median(r[i] for r in runs) for i in range(3))
    rec = {"kind": "host", "model": "x".join(map(str, a.host_model)), "n_layer": n_layer,
           "tokens": a.host_tokens, "repeats": a.repeats, "host_ms_per_token": host,
           "wall_ms_per_token": wall, "setup_host_ms": setup}  # fmt: skip
    return [emit(rec)]


def host_lines(records: list[dict]) -> list[str]:
    """The report's line for each host record."""
    return [
        f"\nhost overhead, model {r['model']} (vocab {HOST_VOCAB}), {r['tokens']} decode steps "
        f"x {r['repeats']} runs: {r['host_ms_per_token']:.3f} ms/token host CPU, "
        f"{r['wall_ms_per_token']:.3f} ms/token wall, call setup {r['setup_host_ms']:.1f} ms"
        for r in records
        if r["kind"] == "host"
    ]


def host_targets(records: list[dict]) -> list[str]:
    """Issue #19's target for each host record, 'met' or 'NOT met' with its figure."""
    lines = []
    for r in (r for r in records if r["kind"] == "host"):
        ms = r["host_ms_per_token"]
        verdict = "met" if ms <= TARGET_MS else "NOT met"
        lines.append(f"  decode host overhead <= {TARGET_MS:g} ms/token at {r['n_layer']} "
                     f"layers: {ms:.3f} ms ({verdict})")  # fmt: skip
    return lines
