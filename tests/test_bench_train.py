"""The training-throughput benchmark runs every contender on the same shapes and reports."""

from __future__ import annotations

import json

import pytest

from gpt2_jax.bench import train as bench


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


@pytest.mark.parametrize(
    "argv, message",
    [(["--peers", "hf,flash"], "unknown peer 'flash'"), (["--n-embd", "30"], "divisible"),
     (["--steps", "0"], "--steps must be positive"), (["--n-layer", "x"], "invalid int")],
)  # fmt: skip
def test_bench_train_bad_flags_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
