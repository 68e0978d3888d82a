"""`python -m gpt2_jax.data prepare --source SRC --out DIR`: tokenise a corpus for training."""

from __future__ import annotations

import argparse
import sys

from gpt2_jax.config import DataConfig
from gpt2_jax.data.prepare import prepare_source
from gpt2_jax.errors import ArgParser, cli_main

_DEFAULTS = DataConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgParser(prog="python -m gpt2_jax.data", description="Training-data tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare",
        help="tokenise a source into DIR/train.bin, DIR/val.bin (uint16) and DIR/meta.json",
        description="Tokenise SRC with GPT-2 BPE (EOT after each document), split it by "
        "document into train/val, and write DIR/train.bin, DIR/val.bin and DIR/meta.json. "
        "A no-op when DIR already holds the same input's tokens.",
    )
    p.add_argument(
        "--source",
        default=_DEFAULTS.source,
        help="shakespeare (built in), a path/glob of .txt/.md/.jsonl/.json/.parquet files, "
        "or hf:<name>[:<config>] (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=_DEFAULTS.val_fraction,
        help="share of documents held out for validation, in [0, 1) (default: %(default)s)",
    )
    p.add_argument(
        "--text-field",
        default=_DEFAULTS.text_field,
        help="JSON field / parquet or dataset column with the text (default: %(default)s)",
    )
    p.add_argument(
        "--decode-errors",
        choices=("strict", "replace"),
        default=_DEFAULTS.decode_errors,
        help="strict: a non-UTF-8 file is an error; replace: bad bytes become U+FFFD",
    )
    p.add_argument(
        "--num-threads", type=int, default=_DEFAULTS.num_threads,
        help="tokeniser threads, 0 = all cores (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--seq-len", type=int, default=None,
        help="also fail when a split is shorter than one sequence of this length",
    )  # fmt: skip
    p.add_argument(
        "--streaming",
        action="store_true",
        help="write only val.bin, taken from the start of the stream (for data.streaming runs)",
    )
    p.add_argument("--force", action="store_true", help="re-tokenise even when up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = DataConfig(
        source=args.source,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        decode_errors=args.decode_errors,
        num_threads=args.num_threads,
        streaming=args.streaming,
    )
    meta = prepare_source(
        cfg, args.out, show_progress=not args.quiet, seq_len=args.seq_len, force=args.force
    )
    docs, tokens = meta["documents"], meta["tokens"]

    def fmt(n: int | None) -> str:
        return "streamed" if n is None else f"{n:,}"

    print(
        f"{args.out}: train {fmt(tokens['train'])} tokens ({fmt(docs['train'])} documents), "
        f"val {fmt(tokens['val'])} tokens ({fmt(docs['val'])} documents); "
        f"content hash {meta['content_hash'][:12]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
