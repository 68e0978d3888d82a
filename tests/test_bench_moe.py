"""`python -m benchmarks moe`: the layer timings and the dense-vs-MoE training, on --smoke."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import moe

LAYER_FIELDS = ("impl", "experts", "top_k", "batch_size", "seq_len", "n_embd", "width",
                "ms_best", "ms_median", "ms_rounds", "vs_mlp", "vs_first_experts", "compile_s",
                "cpu", "jax", "device")  # fmt: skip


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_layer_and_training_records(tmp_path, capsys, prepared_shakespeare):
    out = tmp_path / "moe.json"
    argv = ["--smoke", "--experts", "4,8", "--impls", "grouped,ragged", "--train",
            "--train-steps", "2", "--dense-layers", "1", "--moe-layers", "1", "--json",
            "--out", str(out), f"data.prepared_dir={prepared_shakespeare}",
            "train.peak_flops=1e12"]  # fmt: skip
    # (a set peak_flops skips train()'s CPU matmul probe)
    assert moe.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert json.loads(out.read_text()) == records
    layer = [r for r in records if r["section"] == "layer"]
    assert [(r["impl"], r["experts"]) for r in layer] == [
        ("mlp", None), ("grouped", 4), ("grouped", 8), ("ragged", 4), ("ragged", 8)
    ]  # fmt: skip
    for r in layer:
        assert set(LAYER_FIELDS) <= set(r)
        assert (r["batch_size"], r["seq_len"], r["n_embd"], r["top_k"]) == (2, 32, 32, 2)
        assert len(r["ms_rounds"]) == 2 and min(r["ms_rounds"]) == r["ms_best"]
        assert all(_positive(r[k]) for k in ("ms_best", "ms_median", "vs_mlp", "compile_s"))
        assert r["ms_best"] <= r["ms_median"]
    mlp, grouped4 = layer[0], layer[1]
    assert mlp["width"] == 2 * 4 * 32 and mlp["vs_mlp"] == 1.0 and _positive(mlp["gflop_per_s"])
    assert grouped4["width"] == 4 * 32 and grouped4["vs_first_experts"] == 1.0
    assert grouped4["ms_best"] / mlp["ms_best"] == pytest.approx(grouped4["vs_mlp"], rel=0.02)

    dense, routed = (r for r in records if r["section"] == "train")
    assert (dense["model"], dense["n_layer"], dense["experts"]) == ("dense", 1, None)
    assert (routed["model"], routed["n_layer"], routed["experts"]) == ("moe", 1, 8)
    for r in (dense, routed):
        assert r["steps"] == 2 and r["tokens"] == 2 * 4 * 32
        assert all(_positive(r[k]) for k in ("val_loss", "train_tokens_per_sec", "params"))
        assert r["active_params_blocks"] < r["active_params"] <= r["params"]
    # a block: 12·D² dense, 4·D² + k of E experts' 8·D² routed (+ router, biases, norms)
    assert routed["params"] > routed["active_params"]
    assert dense["params"] == dense["active_params"] + 32 * 32  # the learned positions
    assert "moe_lb_loss" not in dense
    assert _positive(routed["moe_lb_loss"]) and _positive(routed["moe_z_loss"])
    assert 0 <= routed["moe_idlest"] <= 1 / 8 <= routed["moe_busiest"] <= 1


def test_tables(tmp_path, capsys):
    argv = ["--smoke", "--experts", "4", "--impls", "grouped", "--repeats", "1",
            "--out", str(tmp_path / "moe.json")]  # fmt: skip
    assert moe.main(argv) == 0
    text = capsys.readouterr().out
    assert "B 2 × T 32 = 64 tokens, D 32, top-2" in text and "jax " in text
    assert "dense-equal MLP (D → 256 → D" in text and "\ngrouped\n" in text
    assert "targets, grouped: E=4 / E=4 = 1.00×" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experts", "0"], "--experts takes positive integers"),
        (["--experts", "4", "--top-k", "9"], "--top-k 9 must lie in [1, 4]"),
        (["--impls", "grouped,magic"], "--impls takes a comma-separated subset"),
        (["--impls", "none"], "nothing to run"),
        (["--train", "--impls", "none", "--train-impl", "fast"], "--train-impl takes one of"),
        (["--train", "--impls", "none", "--train-experts", "2", "--top-k", "3"], "[1, --train-"),
        (["--seq-len", "0"], "--seq-len must be positive"),
        (["model.n_layer=2"], "apply to --train only"),
        (["--train", "--impls", "none", "model.n_head=3"], "n_head"),
        (["--out", "."], "is a directory"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        moe.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
