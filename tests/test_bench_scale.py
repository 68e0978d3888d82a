"""`python -m benchmarks scale`: abstract compile figures per config, layout and loss."""

from __future__ import annotations

import json

import pytest

from benchmarks import scale


def test_each_layout_and_loss_asked_for_is_compiled_and_measured(tmp_path, capsys):
    out = tmp_path / "scale.json"
    argv = ["--configs", "tiny", "--batch-size", "2", "--seq-len", "16", "--out", str(out)]
    assert scale.main([*argv, "--json", "--loss-impls", "chunked"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert json.loads(out.read_text()) == records
    assert [(r["layout"], r["loss_impl"]) for r in records] == [
        ("unrolled", "chunked"), ("scanned", "chunked")
    ]  # fmt: skip
    for r in records:
        assert r["config"] == "tiny" and r["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
        assert r["compile_s"] > 0 and r["trace_s"] > 0 and r["temp_bytes"] > 0
        assert r["peak_bytes"] == (
            r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
        )
    # the state is donated: its buffers are the outputs' (aliased)
    assert all(r["alias_bytes"] > 0.9 * r["output_bytes"] for r in records)
    assert scale.main([*argv, "--layouts", "scanned", "--loss-impls", "full"]) == 0
    text = capsys.readouterr().out
    assert "B 2 × T 16" in text and text.count("\ntiny ") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mesh", "fsdp=0"], "--mesh takes axis=size pairs"),
        (["--mesh", "pipe=2"], "--mesh takes axis=size pairs"),
        (["--layouts", "rolled"], "--layouts takes a comma-separated subset"),
        (["--loss-impls", "fused"], "--loss-impls takes a comma-separated subset"),
        (["--configs", "nope"], "no config 'nope'"),
        (["--remat", "all"], "--remat takes one of"),
        (["--out", "."], "is a directory"),
        (["--configs", "tiny", "--mesh", "fsdp=64"], "--mesh needs 64 devices"),
    ],
)
def test_bad_flags_are_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # --mesh asks XLA for host devices: undone afterwards
    with pytest.raises(SystemExit) as exc:
        scale.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
