"""Perplexity of a checkpoint by Hugging Face's "perplexity of fixed-length models" procedure.

Windows [begin, end) start at begin = 0, S, 2S, ... with end = min(begin + N, total) and stop
after the first window that reaches the end of the data. A window scores the tokens at
positions max(prev_end, begin + 1) ... end - 1, each predicted from the tokens before it in
that window (positions restart at 0 in every window). S = N gives non-overlapping windows.

    python -m gpt2_jax.evaluate --checkpoint DIR --data SRC [--split val|train|all]
        [--val-fraction F] [--text-field NAME] [--decode-errors strict|replace]
        [--seq-len N] [--stride S]

What is scored: a data source (shakespeare, a directory, glob, .jsonl/.json/.parquet or
hf:<name>) is split exactly as `gpt2_jax.data.prepare_source` splits it for training (by
document hash, `--val-fraction` of the documents to val, default DataConfig's), and its val
split is scored unless `--split train`, or `--split all` (every document, joined by
<|endoftext|>). A prepared directory scores its val.bin (train.bin with `--split train`). A text
file or a .bin is one explicit file and is scored whole. One stderr line says which.

prints one JSON line `{"tokens", "nll", "perplexity", "seq_len", "stride"}` to stdout (one per
length with `--seq-lens`); progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from gpt2_jax import compile_cache, host_malloc
from gpt2_jax.config import DTYPES, DataConfig
from gpt2_jax.data import prepare_source, read_meta, resolve_source, verify_prepared
from gpt2_jax.data.dir_lock import locked
from gpt2_jax.data.sources import DECODE_ERRORS
from gpt2_jax.data.tokenizer import EOT, encode
from gpt2_jax.errors import ArgParser, UserError, cli_main
from gpt2_jax.formats.loading import load_model
from gpt2_jax.model.gpt import GPT, check_compute_dtype

# Files read as collections of documents through gpt2_jax.data rather than as one text.
DOCUMENT_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLITS = ("val", "train", "all")


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) are fed to the model; positions [first, end) are scored."""

    begin: int
    end: int
    first: int


def check_window_args(seq_len: int, stride: int, flag: str = "--seq-len") -> None:
    """Refuse windows under 2 tokens (they score nothing) and strides outside (0, seq_len]."""
    if seq_len < 2:
        raise UserError(
            f"{flag} must be at least 2, got {seq_len}: a window's first token is context only, "
            "so a shorter window scores nothing"
        )
    if stride <= 0 or stride > seq_len:
        raise UserError(
            f"--stride must satisfy 0 < stride <= seq_len={seq_len}, got {stride}; a larger "
            "stride would leave tokens unscored"
        )


def windows(total: int, seq_len: int, stride: int) -> list[Window]:
    """The evaluation windows over `total` tokens (see the module docstring)."""
    check_window_args(seq_len, stride)
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == total:
            break
    return out


# --------------------------------------------------------------------------- data


def _read_bin(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size % 2:
        raise UserError(f"{path} has an odd byte count ({size}); a .bin must hold uint16 tokens")
    if size == 0:
        return np.zeros(0, np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


def _read_text(path: Path, decode_errors: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8", errors=decode_errors)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (bad byte at offset {e.start}); pass a UTF-8 text file "
            "or a prepared .bin, or --decode-errors replace to replace bad bytes"
        ) from None


def _source_tokens(data: DataConfig, limit: int | None) -> np.ndarray:
    """The documents of a `data.source` (see `gpt2_jax.data`), tokenised and joined by
    <|endoftext|>; stops reading documents once `limit` tokens are collected."""
    spec = data.source
    texts = resolve_source(data).texts()
    parts: list[np.ndarray] = []
    count = 0
    for i, text in enumerate(tqdm(texts, desc=f"tokenising {spec}", unit="doc")):
        if i:
            parts.append(np.array([EOT], np.int32))
        parts.append(np.asarray(encode(text), np.int32))
        count += parts[-1].size + (i > 0)
        if limit is not None and count >= limit:
            break
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def check_val_fraction(fraction: float, split: str | None) -> None:
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction == 0 and split in (None, "val"):
        raise UserError("--val-fraction 0 leaves the val split empty; use --split train or all")


def _split_tokens(
    data: DataConfig, split: str, val_fraction: float | None
) -> tuple[np.ndarray, str]:
    """The train or val split of a source, as `prepare_source` writes it for training (run into
    a temporary directory, so the hash rule and the documents moved are exactly training's)."""
    fraction = data.val_fraction if val_fraction is None else val_fraction
    check_val_fraction(fraction, split)
    with tempfile.TemporaryDirectory(prefix="gpt2_jax_eval_") as tmp:
        prepare_source(replace(data, val_fraction=fraction), tmp)
        tokens = np.fromfile(Path(tmp) / f"{split}.bin", np.uint16)
    return tokens, f"the {split} split of {data.source} (val_fraction {fraction})"


def _prepared_tokens(d: Path, split: str, val_fraction: float | None) -> tuple[np.ndarray, str]:
    """val.bin or train.bin of a prepared directory; its split is fixed by how it was prepared."""
    meta = read_meta(d) or {}
    fixed = f"val_fraction {meta['val_fraction']}" if "val_fraction" in meta else "prepared"
    if val_fraction is not None:
        raise UserError(
            f"--val-fraction applies to a data source, but {d} is already split ({fixed}); "
            "pass the source itself, or drop --val-fraction"
        )
    if split == "all":
        raise UserError(
            f"--split all needs the documents in order, but {d} holds them split in two; pass "
            f"--data {meta.get('source', '<its source>')} --split all"
        )
    path = d / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"{d} has no {split}.bin (a streaming prepare writes val.bin only)")
    with locked(d, exclusive=False):  # the file that meta.json describes, not a newer one
        meta = read_meta(d) or {}
        if meta:
            verify_prepared(d, meta, [path.name])
        return _read_bin(path), f"the {split} split of {d} ({fixed})"


def _file_tokens(
    p: Path, split: str | None, val_fraction: float | None, decode_errors: str
) -> tuple[np.ndarray, str]:
    """A .bin or text file: one explicit file, scored whole, so a split is an error."""
    if split not in (None, "all") or val_fraction is not None:
        flag = f"--split {split}" if split not in (None, "all") else "--val-fraction"
        raise UserError(
            f"{flag} needs documents to split, but {p} is one file and is scored whole; drop "
            "it, or pass the documents as a source (.jsonl, directory, glob)"
        )
    if p.suffix == ".bin":
        return _read_bin(p), f"all of {p}"
    text = _read_text(p, decode_errors)
    return np.asarray(encode(text), np.int32), f"all of {p} (one text, no EOT added)"


def load_data(
    src: str,
    *,
    split: str | None = None,
    val_fraction: float | None = None,
    max_tokens: int | None = None,
    text_field: str | None = None,
    decode_errors: str | None = None,
) -> tuple[np.ndarray, str]:
    """Token ids of `src` and a phrase naming them (see the module docstring): `split` (default
    val, or all for one file) of a source or prepared directory. `max_tokens` keeps the first.
    `text_field` and `decode_errors` read a source as `data.text_field` / `data.decode_errors`
    do in training (decode_errors also applies to one text file)."""
    if split is not None and split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    defaults = DataConfig()
    data = DataConfig(
        source=src,
        text_field=defaults.text_field if text_field is None else text_field,
        decode_errors=defaults.decode_errors if decode_errors is None else decode_errors,
    )
    p = Path(src)
    if p.is_dir() and (p / "val.bin").is_file():
        _check_no_source_flags(p, text_field=text_field, decode_errors=decode_errors)
        tokens, what = _prepared_tokens(p, split or "val", val_fraction)
    elif p.is_file() and p.suffix.lower() not in DOCUMENT_SUFFIXES:
        _check_no_source_flags(p, text_field=text_field)
        tokens, what = _file_tokens(p, split, val_fraction, data.decode_errors)
    elif split == "all":
        if val_fraction is not None:
            raise UserError("--val-fraction has no effect with --split all; drop one of them")
        tokens, what = _source_tokens(data, max_tokens), f"all of {src} (documents joined by EOT)"
    else:
        tokens, what = _split_tokens(data, split or "val", val_fraction)
    if max_tokens is not None and len(tokens) > max_tokens:
        return tokens[:max_tokens], f"the first {max_tokens:,} tokens of {what}"
    return tokens, what


def _check_no_source_flags(p: Path, **flags: str | None) -> None:
    """Refuse reading options given for data that has no documents to read with them."""
    for name, value in flags.items():
        if value is not None:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag} applies to a data source's documents, but {p} is "
                f"{'a prepared directory' if p.is_dir() else 'one file scored whole'}; drop {flag}"
            )


def load_tokens(src: str, **kwargs) -> np.ndarray:
    """The token ids `load_data` returns."""
    return load_data(src, **kwargs)[0]


# --------------------------------------------------------------------------- scoring


def _nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    return lse_BT - jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _next_token_nll(graphdef, state, tokens_BT: jax.Array, head_chunk: int | None) -> jax.Array:
    """nll_BT[b, t] = -log p(tokens[b, t + 1] | tokens[b, :t + 1]) in fp32; shape [B, T - 1].
    With `head_chunk`, the LM head runs that many positions at a time ([B, chunk, V] logits)."""
    model = nnx.merge(graphdef, state)
    B, T = tokens_BT.shape
    if head_chunk is None or T - 1 <= head_chunk:
        return _nll(model(tokens_BT)[:, :-1], tokens_BT[:, 1:])
    n = -(-(T - 1) // head_chunk)
    pad = ((0, 0), (0, n * head_chunk - (T - 1)))
    x_BTD = jnp.pad(model.hidden(tokens_BT)[:, :-1], (*pad, (0, 0)))
    targets_BT = jnp.pad(tokens_BT[:, 1:], pad)
    x_nBCD = x_BTD.reshape(B, n, head_chunk, -1).swapaxes(0, 1)
    t_nBC = targets_BT.reshape(B, n, head_chunk).swapaxes(0, 1)
    nll_nBC = jax.lax.map(lambda xt: _nll(model.logits(xt[0]), xt[1]), (x_nBCD, t_nBC))
    return nll_nBC.swapaxes(0, 1).reshape(B, n * head_chunk)[:, : T - 1]


def check_seq_len(model: GPT, seq_len: int) -> None:
    """Refuse lengths beyond the learned position table; RoPE models may extrapolate."""
    cfg = model.cfg
    if cfg.pos_embedding == "learned" and seq_len > cfg.max_seq_len:
        raise UserError(
            f"--seq-len {seq_len} exceeds this model's max_seq_len={cfg.max_seq_len} with "
            f"learned positions; use --seq-len <= {cfg.max_seq_len} (only RoPE models "
            "extrapolate)"
        )


def check_tokens(tokens: np.ndarray, vocab_size: int) -> None:
    """Refuse data with fewer than two tokens or ids outside the model's vocabulary."""
    if len(tokens) < 2:
        raise UserError(f"the data holds {len(tokens)} token(s); perplexity needs at least two")
    hi = int(np.max(tokens))
    if hi >= vocab_size:
        raise UserError(
            f"the data holds token id {hi} but the model's vocab_size is {vocab_size}; "
            "check the data was tokenised for this model"
        )


def evaluate(
    model: GPT,
    tokens: np.ndarray,
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    head_chunk: int | None = None,
) -> dict:
    """Score `tokens` with `model` (switched to eval mode) by the fixed-length procedure.

    Returns the JSON fields. Windows run through one jitted forward in batches of
    `batch_size`, padded to a fixed shape; the NLL is summed in float64 on the host from
    per-token fp32 values. `head_chunk` bounds the logits alive to [batch, head_chunk, vocab]
    (long windows); the result is the same.
    """
    seq_len = model.cfg.max_seq_len if seq_len is None else seq_len
    stride = seq_len if stride is None else stride
    check_window_args(seq_len, stride)
    check_seq_len(model, seq_len)
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    check_tokens(tokens, model.cfg.vocab_size)
    total = len(tokens)

    model.eval()
    graphdef, state = nnx.split(model)
    wins = windows(total, seq_len, stride)
    T = min(seq_len, total)  # every window but the last has exactly this length
    B = min(batch_size, len(wins))
    nll_sum, count = 0.0, 0
    bar = tqdm(
        total=len(wins), desc=f"eval seq_len={seq_len}", unit="win", disable=not show_progress
    )
    for start in range(0, len(wins), B):
        batch = wins[start : start + B]
        tokens_BT = np.zeros((B, T), np.int32)  # pad rows and tails are never scored
        for row, w in enumerate(batch):
            tokens_BT[row, : w.end - w.begin] = tokens[w.begin : w.end]
        nll_BT = np.asarray(_next_token_nll(graphdef, state, jnp.asarray(tokens_BT), head_chunk))
        for row, w in enumerate(batch):
            # nll_BT[row, j] scores position begin + j + 1.
            scored = nll_BT[row, w.first - w.begin - 1 : w.end - w.begin - 1]
            nll_sum += float(np.sum(scored, dtype=np.float64))
            count += scored.size
        bar.update(len(batch))
    bar.close()
    nll = nll_sum / count
    return {
        "tokens": count,
        "nll": nll,
        "perplexity": math.exp(nll),
        "seq_len": seq_len,
        "stride": stride,
    }


# --------------------------------------------------------------------------- CLI


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seq-lens {text!r} must be comma-separated integers") from None
    if not lengths:
        raise UserError("--seq-lens is empty; e.g. --seq-lens 256,512,1024")
    return lengths


def build_parser() -> argparse.ArgumentParser:
    ap = ArgParser(
        prog="python -m gpt2_jax.evaluate",
        description="Perplexity of a checkpoint by Hugging Face's fixed-length-model procedure.",
    )
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="a training run's out_dir (newest checkpoint), a checkpoint directory, or a "
        "folder written by `python -m gpt2_jax.convert`",
    )
    ap.add_argument(
        "--data",
        required=True,
        help="a data source: shakespeare, a directory, glob, .jsonl/.json/.parquet or "
        "hf:<name> (split as for training, see --split); a prepared directory (its val.bin); or "
        "one file scored whole: a uint16 .bin or a UTF-8 text file (tiktoken gpt2, no EOT added)",
    )
    ap.add_argument(
        "--split",
        choices=SPLITS,
        help="which documents of a source or prepared directory: val (the default: exactly "
        "training's val split), train, or all (a source's documents joined by EOT); a single "
        "file is always scored whole",
    )
    ap.add_argument(
        "--val-fraction",
        type=float,
        help=f"a source's share of documents in val, as data.val_fraction in training "
        f"(default {DataConfig().val_fraction})",
    )
    lengths = ap.add_mutually_exclusive_group()
    lengths.add_argument(
        "--seq-len", type=int, help="window length N >= 2 (default: the model's max_seq_len)"
    )
    lengths.add_argument(
        "--seq-lens",
        help="comma-separated window lengths >= 2, e.g. 256,512,1024: one JSON line per length "
        "and a table on stderr",
    )
    ap.add_argument(
        "--text-field",
        help="JSON field / parquet or dataset column holding a source's text, as "
        f"data.text_field in training (default {DataConfig().text_field})",
    )
    ap.add_argument(
        "--decode-errors",
        choices=DECODE_ERRORS,
        help="strict (the default): a byte that is not UTF-8 is an error; replace: it becomes "
        "U+FFFD, as data.decode_errors in training",
    )
    ap.add_argument("--stride", type=int, help="window step S, 0 < S <= N (default: N, no overlap)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    ap.add_argument(
        "--max-tokens", type=int, help="score only the first this-many tokens of the chosen data"
    )
    ap.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="compute dtype (default float32); float16 needs a GPU",
    )
    return ap


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.val_fraction is not None:
        check_val_fraction(args.val_fraction, args.split)
    lengths = _parse_lengths(args.seq_lens) if args.seq_lens else [args.seq_len]
    flag = "--seq-lens" if args.seq_lens else "--seq-len"
    for n in lengths:
        if n is not None:
            check_window_args(n, n if args.stride is None else args.stride, flag)
    check_compute_dtype(args.dtype)

    model = load_model(args.checkpoint, dtype=args.dtype)
    cfg = model.cfg
    lengths = [cfg.max_seq_len if n is None else n for n in lengths]
    for n in lengths:
        check_window_args(n, n if args.stride is None else args.stride, flag)
        check_seq_len(model, n)
    tokens, what = load_data(
        args.data,
        split=args.split,
        val_fraction=args.val_fraction,
        max_tokens=args.max_tokens,
        text_field=args.text_field,
        decode_errors=args.decode_errors,
    )
    check_tokens(tokens, cfg.vocab_size)
    print(
        f"model: {cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head}/{cfg.n_kv_head} heads, "
        f"{cfg.pos_embedding} positions, trained length {cfg.max_seq_len}",
        file=sys.stderr,
    )
    print(f"scoring {what}: {len(tokens):,} tokens", file=sys.stderr)

    results = []
    for n in lengths:
        if n > cfg.max_seq_len:
            print(
                f"seq_len {n} > trained length {cfg.max_seq_len}: RoPE extrapolation",
                file=sys.stderr,
            )
        res = evaluate(model, tokens, seq_len=n, stride=args.stride, batch_size=args.batch_size)
        print(json.dumps(res), flush=True)
        results.append(res)
    if len(results) > 1:
        print(
            f"{'seq_len':>8} {'stride':>7} {'tokens':>10} {'nll':>9} {'ppl':>10}", file=sys.stderr
        )
        for r in results:
            print(
                f"{r['seq_len']:>8} {r['stride']:>7} {r['tokens']:>10} {r['nll']:>9.4f} "
                f"{r['perplexity']:>10.3f}",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    host_malloc.tune()  # before jax starts its threads
    compile_cache.enable()
    sys.exit(main())
