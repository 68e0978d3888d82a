"""The training-throughput benchmark runs every contender on the same shapes and reports."""

from __future__ import annotations

import json

import pytest

from benchmarks import train as bench


def test_bench_train_json_records(capsys):
    argv = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "2"]
    argv += ["--seq-len", "16", "--steps", "1", "--rounds", "1", "--json"]
    assert bench.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in records] == ["gpt2_jax", "hf", "torch_ref"]
    for r in records:
        assert (r["n_layer"], r["n_embd"], r["batch_size"], r["seq_len"]) == (1, 32, 2, 16)
        assert r["tokens_per_sec"] == pytest.approx(32 / (r["step_ms"] / 1e3))
        assert r["frac_of_peak"] == pytest.approx(r["achieved_flops"] / r["matmul_peak_flops"])
    ours = records[0]["tokens_per_sec"]
    assert [r["ours_over_this"] for r in records] == [
        pytest.approx(ours / r["tokens_per_sec"]) for r in records
    ]


def test_bench_train_peers_run_in_workers_with_each_malloc(capsys):
    argv = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "2"]
    argv += ["--seq-len", "16", "--steps", "1", "--rounds", "1", "--peers", "hf"]
    assert bench.main([*argv, "--peer-malloc", "default,tuned", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in records] == ["gpt2_jax", "hf", "hf+tuned-malloc"]
    # ours runs in this (pytest) process, which never called host_malloc.tune()
    assert [r["host_malloc"] for r in records] == ["default", "default", "tuned"]
    assert all(r["step_ms"] > 0 for r in records)


@pytest.mark.parametrize(
    "argv, message",
    [(["--peers", "hf,flash"], "unknown peer 'flash'"), (["--n-embd", "30"], "divisible"),
     (["--steps", "0"], "--steps must be positive"),
     (["--n-layer", "x"], "--n-layer takes comma-separated integers"),
     (["--n-layer", "2,0"], "--n-layer takes positive integers"),
     (["--profile", "pyproject.toml"], "is a file; pass a directory"),
     (["--loss-impl", "full,fused"], "unknown loss impl 'fused'"),
     (["--loss-chunk", "0"], "--loss-chunk must be positive"),
     (["--layouts", "rolled"], "--layouts takes a comma-separated subset"),
     (["--peer-malloc", "fast"], "--peer-malloc takes a comma-separated subset"),
     (["--peer-malloc", "none"], "--peer-malloc takes default, tuned or both")],
)  # fmt: skip
def test_bench_train_bad_flags_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_bench_train_depth_list_one_row_each_and_summary(capsys, monkeypatch, tmp_path):
    """`--n-layer 1,2` measures each depth with every contender and ends with ours / peer
    per shape; `--profile` leaves a trace per shape; `--shapes` swaps in the fixed SHAPES."""
    argv = ["--n-layer", "1,2", "--n-head", "2", "--n-embd", "32", "--batch-size", "2"]
    argv += ["--seq-len", "16", "--steps", "1", "--rounds", "1", "--peers", "hf"]
    assert bench.main([*argv, "--json", "--profile", str(tmp_path)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["n_layer"]) for r in records] == [
        ("gpt2_jax", 1), ("hf", 1), ("gpt2_jax", 2), ("hf", 2)
    ]  # fmt: skip
    for shape in ("L1-d32-h2", "L2-d32-h2"):
        assert list((tmp_path / shape).rglob("*.xplane.pb")), shape
    summary = bench._summary([records[:2], records[2:]]).splitlines()[1:]
    assert [line.split()[:1] for line in summary] == [["L=1"], ["L=2"]]
    for line, rec in zip(summary, records[1::2], strict=True):
        assert "vs hf" in line and line.endswith(f"{rec['ours_over_this']:.2f}x")
    small = dict(bench.SHAPES[-1], n_layer=3, n_embd=32, n_head=2, batch_size=2, seq_len=16)
    monkeypatch.setattr(bench, "SHAPES", [small])
    assert bench.main(["--shapes", "--steps", "1", "--rounds", "1", "--peers", "hf"]) == 0
    out = capsys.readouterr().out
    assert "GPT-2 L=3 H=2 d=32 B=2 T=16" in out and "ours / peer" not in out  # one shape
    # Each loss impl is a contender of its own; the first is "ours" in the summary.
    argv = ["--shapes", "--steps", "1", "--rounds", "1", "--peers", "", "--loss-impl",
            "chunked,full", "--loss-chunk", "5", "--layouts", "unrolled,scanned"]  # fmt: skip
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    names = ["unrolled,chunked", "unrolled,full", "scanned,chunked", "scanned,full"]
    assert all(f"gpt2_jax:{n} " in out for n in names)
    summary = out.split("ours / peer")[1].splitlines()[1:]
    assert [line.split()[-2] for line in summary] == [f"gpt2_jax:{n}" for n in names[1:]]


def test_bench_pieces_times_every_piece_for_both(capsys):
    from benchmarks import pieces

    argv = ["--n-embd", "32", "--n-head", "2", "--batch-size", "2", "--seq-len", "16"]
    assert pieces.main([*argv, "--repeats", "1", "--rounds", "1", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["piece"] for r in records] == list(pieces.PIECES)
    for r in records:
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0
        assert r["ours_over_torch_time"] == pytest.approx(r["ours_ms"] / r["torch_ms"])
    with pytest.raises(SystemExit):
        pieces.main(["--attention-impl", "flash"])
    assert capsys.readouterr().err.strip().startswith("error: unknown attention impl 'flash'")
