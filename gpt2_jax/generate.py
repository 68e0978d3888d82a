"""`python -m gpt2_jax.generate --checkpoint DIR --prompt TEXT`: stream sampled text to stdout.

The library side lives in `gpt2_jax.decode` (`generation.generate`, `decoder.Decoder`); the
names a caller of this module used before are imported here too.
"""

from __future__ import annotations

import argparse
import codecs
import json
import re
import sys
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from gpt2_jax import compile_cache, host_malloc
from gpt2_jax.data import tokenizer
from gpt2_jax.decode.decoder import (
    SEED_LIMIT,
    TRACES,
    Decoder,
    check_prompt,
    decode_steps,
    new_token_budget,
    padded_prompt,
    sample_keys,
    seed_key,
)
from gpt2_jax.decode.generation import generate, token_stream
from gpt2_jax.decode.sampling import Sampling
from gpt2_jax.decode.speculative import SpecStats, check_compatible
from gpt2_jax.errors import ArgParser, UserError, cli_main
from gpt2_jax.formats import loading
from gpt2_jax.model.gpt import check_compute_dtype

# The library names callers imported from this module before they moved to gpt2_jax.decode.
__all__ = [
    "SEED_LIMIT", "TRACES", "Decoder", "TextStream", "build_parser", "check_prompt",
    "check_token_ids", "decode_steps", "generate", "main", "new_token_budget", "padded_prompt",
    "parse_token_ids", "sample_keys", "seed_key", "token_stream",
]  # fmt: skip


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


def _token_bytes(token: int) -> bytes:
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
    overrides = {} if args.dtype is None else {"dtype": args.dtype}
    model = loading.load_model(args.checkpoint, **overrides)
    check_compute_dtype(model.cfg.compute_dtype, "this checkpoint's dtype float16")
    draft = None
    if args.draft_checkpoint is not None:
        draft = loading.load_model(args.draft_checkpoint, **overrides)
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
    compile_cache.enable()
    raise SystemExit(main())
