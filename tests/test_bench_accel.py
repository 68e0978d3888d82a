"""`python -m benchmarks accel`: refuses on CPU; `--smoke` runs every part on a tiny model."""

from __future__ import annotations

import json

import pytest

from benchmarks import accel


def test_refuses_on_cpu_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        accel.main([])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "measures a GPU or TPU" in err[0] and "--smoke" in err[0]


def test_smoke_runs_every_part(tmp_path, capsys):
    out = tmp_path / "accel.json"
    argv = ["--smoke", "--batch-size", "2", "--seq-len", "32", "--steps", "1",
            "--new-tokens", "4", "--out", str(out)]  # fmt: skip
    assert accel.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] and report["backend"] == "cpu"
    # chunked stands in for cuDNN off GPU: a bf16 kernel against xla, full and windowed
    assert [r["window"] for r in report["attention"]] == [None, 16]
    for r in report["attention"]:
        assert r["rel_diff_out"] <= 2e-2 and r["rel_diff_grads"] <= 5e-2 and r["ms"] > 0
    rows = [(r["layout"], r["loss_impl"]) for r in report["training"]]
    assert rows == [(a, b) for a in ("unrolled", "scanned") for b in ("full", "chunked")]
    for r in report["training"]:
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 and r["compiled_peak_bytes"] > 0
        assert r["attention_impl"] == "chunked" and r["moe_impl"] is None and r["compile_s"] > 0
        assert isinstance(r["custom_calls"], list)
    assert report["decode"]["tokens_per_sec"] > 0
    assert "decode:" in capsys.readouterr().out
