"""Text generation: prefill, then one jitted decode step reused for every token.

A `Decoder` holds a model's jitted steps (built once per model structure, so a step passes
only arrays) and its weights in the compute dtype (cast once per model). Prompts are padded
and caches sized to multiples of `kv_cache.CACHE_BUCKET` (capped at a learned table's end), so
every length within a bucket reuses one compiled prefill and decode step.

Library: `generate(model, prompt_tokens, ...)` returns token ids; `decode_steps` yields them one
step at a time. CLI: `python -m gpt2_jax.generate --checkpoint DIR --prompt TEXT` streams text.

Sample i draws with key fold_in(seed_key(seed), i), and the token at position p with that key
folded with p, so a sample does not depend on the batch it is generated in. Seeds lie in
[0, 2**64); below 2**32, seed_key(seed) is PRNGKey(seed).

Learned-position models cannot go past `max_seq_len`: generation stops there (a warning says
so) and a longer prompt is an error. RoPE models have no such limit; with a sliding window the
cache stays w slots however long the output.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import functools
import json
import re
import sys
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import host_malloc
from gpt2_jax.config import ModelConfig
from gpt2_jax.errors import ArgParser, UserError, cli_main
from gpt2_jax.kv_cache import (
    bucket_len,
    cache_size,
    decode_state,
    decoding_model,
    forward_cached,
    prefill,
)
from gpt2_jax.model import GPT
from gpt2_jax.sampling import Sampling, sample, step_keys

TRACES: collections.Counter = collections.Counter()  # how often each jitted step was traced


@functools.lru_cache(maxsize=16)
def _steps(graph: tuple) -> tuple:
    """Jitted prefill and decode steps closing over one model structure, so a call hashes no
    graph: only arrays (and the static sampling filters) cross the jit boundary."""

    # Temperature is traced (greedy and sampled share one compilation); top-k / top-p static.
    @functools.partial(jax.jit, static_argnames=("size", "top_k", "top_p"))
    def prefill_step(leaves, prompt_BP, length, keys_B, temperature, size, top_k, top_p):
        TRACES["prefill"] += 1
        logits_BV, cache = prefill(decoding_model(graph, leaves), prompt_BP, size, length=length)
        pos_B = jnp.full(keys_B.shape[:1], length, jnp.int32)
        tok_B = sample(logits_BV, step_keys(keys_B, pos_B), temperature, top_k=top_k, top_p=top_p)
        return tok_B, logits_BV, cache

    @functools.partial(jax.jit, static_argnames=("top_k", "top_p"), donate_argnames=("cache",))
    def decode_step(leaves, cache, tok_B, pos_B, keys_B, temperature, top_k, top_p):
        """Feed the token at `pos_B`, draw the one at `pos_B + 1`."""
        TRACES["decode"] += 1
        model = decoding_model(graph, leaves)
        logits_B1V, cache = forward_cached(model, cache, tok_B[:, None], pos_B[:, None])
        logits_BV, pos_B = logits_B1V[:, 0], pos_B + 1
        tok_B = sample(logits_BV, step_keys(keys_B, pos_B), temperature, top_k=top_k, top_p=top_p)
        return tok_B, logits_BV, cache, pos_B

    return prefill_step, decode_step


class Decoder:
    """One model's jitted prefill and decode steps and its decoding weights
    (`kv_cache.decode_state`): compiled once per model structure, cast once per model."""

    def __init__(self, model: GPT) -> None:
        self.state = decode_state(model)
        self._prefill, self._decode = _steps(self.state.graph)

    def prefill(self, prompt_BP, length: int, keys_B, temperature, size: int, sampling):
        """(token_B drawn at position `length`, its logits_BV, cache of `size` slots) after
        the first `length` tokens of `prompt_BP` (the rest is padding)."""
        return self._prefill(self.state.leaves, prompt_BP, jnp.int32(length), keys_B,
                             temperature, size, **sampling.filters)  # fmt: skip

    def decode(self, cache, tok_B, pos_B, keys_B, temperature, sampling):
        """(next token_B, its logits_BV, cache, pos_B + 1) after feeding `tok_B` at `pos_B`."""
        return self._decode(self.state.leaves, cache, tok_B, pos_B, keys_B, temperature,
                            **sampling.filters)  # fmt: skip


def padded_prompt(cfg: ModelConfig, prompt_BT) -> np.ndarray:
    """int32 [B, bucket_len(T)]: the prompt, then zeros (a compile serves a whole bucket)."""
    prompt_BT = np.asarray(prompt_BT)
    B, T = prompt_BT.shape
    out_BP = np.zeros((B, bucket_len(cfg, T)), np.int32)
    out_BP[:, :T] = prompt_BT
    return out_BP


SEED_LIMIT = 2**64


def seed_key(seed: int) -> jax.Array:
    """PRNGKey of the seed's low 32 bits, with its high 32 bits folded in when nonzero."""
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"seed must be in [0, 2**64), got {seed}")
    # PRNGKey keeps only 32 bits (without jax_enable_x64), so 2**32 would silently equal 0.
    key = jax.random.PRNGKey(seed & 0xFFFFFFFF)
    return jax.random.fold_in(key, np.uint32(seed >> 32)) if seed >> 32 else key


def sample_keys(seed: int | jax.Array, num_samples: int, first: int = 0) -> jax.Array:
    """Keys of samples first..first+num_samples-1 for a seed (or a PRNG key)."""
    key = seed_key(int(seed)) if isinstance(seed, int | np.integer) else seed
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(first, first + num_samples))


def new_token_budget(model: GPT, prompt_len: int, max_new_tokens: int) -> int:
    """How many tokens may follow a prompt: `max_new_tokens`, cut at a learned table's end."""
    cfg = model.cfg
    if prompt_len < 1:
        raise UserError("the prompt is empty; give at least one token")
    if cfg.pos_embedding != "learned":
        return max_new_tokens
    if prompt_len > cfg.max_seq_len:
        raise UserError(
            f"the prompt is {prompt_len} tokens but the model has learned positions up to "
            f"max_seq_len={cfg.max_seq_len}; shorten the prompt"
        )
    return min(max_new_tokens, cfg.max_seq_len - prompt_len)


def decode_steps(
    model: GPT,
    prompt_BT,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    keys_B: jax.Array,
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Yield (tokens_B, logits_BV) for each new token, on device; the logits are the model's
    raw output the token was drawn from. The caller enforces length limits.

    The prompt is padded and the cache sized to buckets (`kv_cache.bucket_len`), so prompts
    and budgets within one bucket reuse the compiled steps."""
    B, T = np.shape(prompt_BT)
    if max_new_tokens <= 0:
        return
    dec = Decoder(model)
    size = cache_size(model.cfg, bucket_len(model.cfg, T + max_new_tokens))
    temperature = jnp.float32(sampling.temperature)
    tok_B, logits_BV, cache = dec.prefill(
        padded_prompt(model.cfg, prompt_BT), T, keys_B, temperature, size, sampling
    )
    pos_B = jnp.full((B,), T, jnp.int32)
    for i in range(max_new_tokens):
        if i + 1 < max_new_tokens:  # dispatch the next step before the caller reads this one
            nxt_B, nxt_logits_BV, cache, pos_B = dec.decode(
                cache, tok_B, pos_B, keys_B, temperature, sampling
            )
        yield tok_B, logits_BV
        if i + 1 < max_new_tokens:
            tok_B, logits_BV = nxt_B, nxt_logits_BV


def _prompt_batch(prompt_tokens, num_samples: int) -> np.ndarray:
    prompt = np.asarray(prompt_tokens, np.int64)
    if prompt.ndim == 1:
        prompt = np.broadcast_to(prompt, (num_samples, prompt.shape[0]))
    elif prompt.ndim != 2 or (num_samples != 1 and num_samples != prompt.shape[0]):
        raise UserError(
            f"prompt_tokens must be a 1-D list or a [num_samples, T] array, got shape "
            f"{prompt.shape} with num_samples={num_samples}"
        )
    return prompt


def check_prompt(model: GPT, prompt_BT: np.ndarray) -> None:
    if prompt_BT.size and (prompt_BT.min() < 0 or prompt_BT.max() >= model.cfg.vocab_size):
        raise UserError(
            f"prompt token ids must lie in [0, {model.cfg.vocab_size}) for this model, got "
            f"[{prompt_BT.min()}, {prompt_BT.max()}]"
        )


def token_stream(
    model: GPT,
    prompt_tokens,
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    seed: int | jax.Array = 0,
    num_samples: int = 1,
    first_sample: int = 0,
    draft: GPT | None = None,
    speculative_k: int = 4,
    stats=None,
) -> Iterator[list[np.ndarray]]:
    """Yield each row's new token ids as they are decided (a list of B int arrays per step).

    With a `draft` model, tokens come from speculative decoding (`gpt2_jax.speculative`) and
    a step may yield several tokens per row; `stats` (a `SpecStats`) collects acceptance.
    """
    sampling = Sampling() if sampling is None else sampling
    prompt_BT = _prompt_batch(prompt_tokens, num_samples)
    check_prompt(model, prompt_BT)
    budget = new_token_budget(model, prompt_BT.shape[1], max_new_tokens)
    if budget < max_new_tokens:
        warnings.warn(
            f"stopping after {budget} new tokens: the model's learned positions end at "
            f"max_seq_len={model.cfg.max_seq_len}",
            stacklevel=2,
        )
    keys_B = sample_keys(seed, prompt_BT.shape[0], first_sample)
    if draft is not None:
        from gpt2_jax.speculative import speculative_steps

        yield from speculative_steps(
            model, draft, prompt_BT, max_new_tokens=budget, k=speculative_k,
            sampling=sampling, keys_B=keys_B, stats=stats,
        )  # fmt: skip
        return
    for tok_B, _ in decode_steps(
        model, prompt_BT, max_new_tokens=budget, sampling=sampling, keys_B=keys_B
    ):
        yield list(np.asarray(tok_B)[:, None])


def generate(
    model: GPT,
    prompt_tokens,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | jax.Array = 0,
    num_samples: int = 1,
    draft: GPT | None = None,
    speculative_k: int = 4,
) -> np.ndarray:
    """New token ids [num_samples, n] after `prompt_tokens` (a list of ids, or [B, T]).

    n = max_new_tokens unless a learned position table ends first (then a warning).
    """
    sampling = Sampling(temperature, top_k, top_p)
    rows: list[list[np.ndarray]] | None = None
    for step in token_stream(
        model, prompt_tokens, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
        num_samples=num_samples, draft=draft, speculative_k=speculative_k,
    ):  # fmt: skip
        rows = rows or [[] for _ in step]
        for row, part in zip(rows, step, strict=True):
            row.append(part)
    if rows is None:
        return np.zeros((_prompt_batch(prompt_tokens, num_samples).shape[0], 0), np.int32)
    return np.stack([np.concatenate(r) for r in rows]).astype(np.int32)


# ----------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="python -m gpt2_jax.generate",
        description="Sample text from a GPT-2 checkpoint, streaming it to stdout.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a converted HF folder, a training run's out_dir or a checkpoint dir",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (GPT-2 BPE)")
    src.add_argument(
        "--prompt-tokens",
        help="prompt as token ids separated by commas and/or spaces, e.g. 1,2,3 or '1 2 3'",
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus: keep mass p")
    p.add_argument(
        "--seed", type=int, default=0, help="0 <= seed < 2**64; sample i uses fold_in(seed, i)"
    )
    p.add_argument("--num-samples", type=int, default=1, help="samples, one after another")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line per sample instead of streaming text",
    )
    p.add_argument(
        "--draft-checkpoint",
        default=None,
        help="small model for speculative decoding (same vocabulary)",
    )
    p.add_argument(
        "--speculative-k", type=int, default=None, help="draft tokens per round (default 4)"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="compute dtype (default: the checkpoint's); float16 needs a GPU",
    )
    return p  # fmt: skip


def parse_token_ids(text: str) -> list[int]:
    """Non-negative ids separated by commas and/or whitespace: "1,2,3", "1 2 3", "1, 2, 3"."""
    items = re.split(r"\s*,\s*|\s+", text.strip())
    if items == [""]:
        raise UserError("--prompt-tokens is empty; give at least one token id, e.g. 1,2,3")
    for item in items:
        # [0-9], not isdigit(): int() would also take "1_0", "+1" and non-ASCII digits.
        if not re.fullmatch(r"[0-9]+", item):
            what = "an empty item" if item == "" else f"{item!r}, not a token id"
            raise UserError(
                f"--prompt-tokens {text!r} has {what}; give non-negative integers separated by "
                "commas and/or spaces, e.g. 1,2,3 or '1 2 3'"
            )
        if len(item) > 18:  # no vocabulary is that large, and int() refuses > 4300 digits
            raise UserError(
                f"--prompt-tokens has a {len(item)}-digit id, beyond any vocabulary; give ids "
                "below the model's vocab_size"
            )
    return [int(t) for t in items]


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Refuse --prompt-tokens ids outside the model's vocabulary."""
    if max(ids) >= vocab_size:
        raise UserError(
            f"--prompt-tokens has id {max(ids)}, but token ids must lie in [0, {vocab_size}) "
            "for this model"
        )


def check_compute_dtype(dtype: str, source: str = "--dtype float16") -> None:
    """Refuse float16 on CPU, where XLA has no float16 attention matmul."""
    if dtype == "float16" and jax.default_backend() == "cpu":
        raise UserError(
            f"{source} is not supported by XLA:CPU matmuls (no F16 x F16 -> F32 dot_general); "
            "use --dtype float32 or bfloat16, or run on a GPU"
        )


def _token_bytes(token: int) -> bytes:
    from gpt2_jax import tokenizer

    if 0 <= token < tokenizer.VOCAB_SIZE:
        return tokenizer.encoding().decode_single_token_bytes(token)
    return "\ufffd".encode()  # ids past GPT-2's 50257 (padded vocabularies) have no text


class TextStream:
    """Turns token ids into text as they arrive, holding back split UTF-8 characters."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tokens: Sequence[int]) -> str:
        return "".join(self._decoder.decode(_token_bytes(int(t))) for t in tokens)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.speculative_k is not None and args.draft_checkpoint is None:
        raise UserError("--speculative-k needs --draft-checkpoint")
    args.speculative_k = 4 if args.speculative_k is None else args.speculative_k
    if args.speculative_k < 1:
        raise UserError(f"--speculative-k must be >= 1, got {args.speculative_k}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise UserError(f"--seed must be in [0, 2**64), got {args.seed}")
    if args.prompt_tokens is not None:
        args.prompt_ids = parse_token_ids(args.prompt_tokens)
    if args.dtype is not None:
        check_compute_dtype(args.dtype)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    from gpt2_jax import tokenizer
    from gpt2_jax.loading import load_model
    from gpt2_jax.speculative import SpecStats, check_compatible

    overrides = {} if args.dtype is None else {"dtype": args.dtype}
    model = load_model(args.checkpoint, **overrides)
    check_compute_dtype(model.cfg.compute_dtype, "this checkpoint's dtype float16")
    draft = None
    if args.draft_checkpoint is not None:
        draft = load_model(args.draft_checkpoint, **overrides)
        check_compute_dtype(draft.cfg.compute_dtype, "the draft checkpoint's dtype float16")
        check_compatible(model, draft, args.speculative_k)
    if args.prompt_tokens is not None:
        prompt = args.prompt_ids
        check_token_ids(prompt, model.cfg.vocab_size)
    else:
        prompt = tokenizer.encode(args.prompt) or [tokenizer.EOT]  # empty text: start a document
    check_prompt(model, np.asarray([prompt]))
    budget = new_token_budget(model, len(prompt), args.max_new_tokens)
    if budget < args.max_new_tokens:
        print(
            f"note: stopping after {budget} new tokens: learned positions end at "
            f"max_seq_len={model.cfg.max_seq_len}",
            file=sys.stderr,
        )
    stats = SpecStats()
    for i in range(args.num_samples):
        tokens: list[int] = []
        text = TextStream()
        if not args.json:
            if i:
                print("\n" + "-" * 40, flush=True)
            sys.stdout.write(text.feed(prompt))
            sys.stdout.flush()
        progress = None
        if args.json:
            from tqdm import tqdm

            progress = tqdm(total=budget, desc=f"sample {i}", unit="tok", file=sys.stderr)
        for step in token_stream(
            model, prompt, max_new_tokens=budget, sampling=sampling, seed=args.seed,
            num_samples=1, first_sample=i, draft=draft, speculative_k=args.speculative_k,
            stats=stats,
        ):  # fmt: skip
            new = [int(t) for t in step[0]]
            tokens += new
            if progress is not None:
                progress.update(len(new))
            else:
                sys.stdout.write(text.feed(new))
                sys.stdout.flush()
        if progress is not None:
            progress.close()
            full = TextStream()
            line = {
                "prompt_tokens": prompt,
                "tokens": tokens,
                "text": full.feed(tokens) + full.flush(),
            }
            print(json.dumps(line), flush=True)
        else:
            sys.stdout.write(text.flush() + "\n")
            sys.stdout.flush()
    if draft is not None:
        print(
            f"speculative: accepted {stats.accepted}/{stats.proposed} draft tokens "
            f"({100 * stats.acceptance:.1f}%) in {stats.rounds} rounds",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    host_malloc.tune()  # before jax starts its threads
    raise SystemExit(main())
