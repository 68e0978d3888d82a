"""Data-pipeline speed: tokenisation MB/s, `prepare` wall time, and batch latency.

`python -m benchmarks data [--source shakespeare] [--threads 1 2] [--repeats 3]`
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from gpt2_jax.config import DataConfig
from gpt2_jax.data import StreamingLoader, TokenDataset, get_batch, prepare_source, resolve_source
from gpt2_jax.data.tokens import encode_documents
from gpt2_jax.errors import ArgParser, cli_main


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _latency_ms(fn, n: int) -> tuple[float, float, float]:
    """(median, mean, p99) milliseconds per call."""
    fn()  # page in the memory map / warm caches
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    ms = 1e3 * np.asarray(times)
    return float(np.median(ms)), float(ms.mean()), float(np.percentile(ms, 99))


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = ArgParser(prog="python -m benchmarks data", description=__doc__)
    parser.add_argument("--source", default="shakespeare", help="data.source to measure")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="tokeniser thread counts"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is kept)")
    parser.add_argument("--batches", type=int, default=200, help="batches per latency figure")
    parser.add_argument(
        "--step-ms", type=float, default=50.0, help="simulated training step for streaming waits"
    )
    args = parser.parse_args(argv)

    texts = list(resolve_source(DataConfig(source=args.source)).texts())
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    n_tok = sum(len(a) for a in encode_documents(texts, 1))
    print(f"source {args.source}: {len(texts)} documents, {mb:.2f} MB UTF-8, {n_tok:,} tokens")
    print(f"cpu cores: {os.cpu_count()}")
    for threads in args.threads:
        dt = _best(lambda threads=threads: encode_documents(texts, threads), args.repeats)
        print(f"tokenise (in memory), {threads} thread(s): {mb / dt:6.2f} MB/s  ({dt:.2f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DataConfig(source=args.source)
        t0 = time.perf_counter()
        prepare_source(cfg, tmp, show_progress=False)
        dt = time.perf_counter() - t0
        print(f"prepare end to end (read, hash, tokenise, write): {mb / dt:6.2f} MB/s ({dt:.2f} s)")
        t0 = time.perf_counter()
        prepare_source(cfg, tmp, show_progress=False)
        print(f"prepare again, unchanged input (no-op): {time.perf_counter() - t0:.3f} s")

        ds = TokenDataset(Path(tmp) / "train.bin")
        for b, t in ((16, 256), (32, 1024), (8, 1024)):
            med, mean, p99 = _latency_ms(
                lambda s=0, b=b, t=t: get_batch(ds, seed=0, step=s, batch_size=b, seq_len=t),
                args.batches,
            )
            print(
                f"get_batch B={b:3d} T={t:5d}: median {med:.3f} ms, mean {mean:.3f} ms, "
                f"p99 {p99:.3f} ms"
            )

        for b, t in ((16, 256), (8, 1024)):
            cfg = DataConfig(source=args.source, streaming=True)
            loader = StreamingLoader(cfg, seed=0, batch_size=b, seq_len=t)
            loader.next_batch()  # start-up: open the source, first read-ahead chunk
            t0 = time.perf_counter()
            for _ in range(args.batches):
                loader.next_batch()
            rate = args.batches * b * t / (time.perf_counter() - t0)
            print(f"streaming B={b:3d} T={t:5d}, flat out: {rate / 1e6:.2f} M tokens/s")
            # a training step takes time; the read-ahead thread fills the queue meanwhile
            loader = StreamingLoader(cfg, seed=0, batch_size=b, seq_len=t)
            med, mean, p99 = _latency_ms(
                lambda s=0, loader=loader: (loader.next_batch(), time.sleep(args.step_ms / 1e3)),
                args.batches,
            )
            med, mean, p99 = (v - args.step_ms for v in (med, mean, p99))
            print(
                f"streaming B={b:3d} T={t:5d}, between {args.step_ms:.0f} ms steps: wait median "
                f"{med:.3f} ms, mean {mean:.3f} ms, p99 {p99:.3f} ms"
            )
    return 0
