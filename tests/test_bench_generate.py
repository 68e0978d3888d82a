"""`python -m benchmarks generate` on a tiny grid: its records and what they must show."""

import json

import pytest

from benchmarks import generate as bench
from benchmarks._generate_host import HOST_FIELDS

TINY = ["--contexts", "12", "--new-tokens", "3", "--repeats", "1", "--model", "1x32x4",
        "--window", "8", "--vocab-size", "64", "--lengths", "4,20"]  # fmt: skip


def test_json_records_gqa_quarter_and_flat_window_cache(capsys):
    code = bench.main(["--parts", "decode,memory", *TINY, "--json"])
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 0

    decode = {(r["variant"], r["mode"]): r for r in records if r["kind"] == "decode"}
    assert set(decode) == {(v, m) for v in bench.VARIANTS for m in ("recompute", "cached")}
    for (_, mode), r in decode.items():
        fields = bench.DECODE_FIELDS if mode == "cached" else bench.DECODE_FIELDS[:6]
        assert set(fields) <= set(r) and r["context"] == 12
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] * r["ms_per_token"] == pytest.approx(1e3)
    mha, gqa, swa = (decode[(v, "cached")] for v in bench.VARIANTS)
    assert (mha["n_kv_head"], gqa["n_kv_head"]) == (4, 1)
    # K and V of 1 layer, 4 heads of dim 8, fp32; the cache holds prompt + every new token.
    assert mha["kv_bytes_per_token"] == 2 * 4 * 8 * 4
    assert gqa["cache_bytes"] * 4 == mha["cache_bytes"] and gqa["cache_slots"] == 12 + 2 + 3 + 1
    assert swa["cache_slots"] == 8 and swa["kv_bytes_per_token"] == mha["kv_bytes_per_token"]

    memory = {(r["variant"], r["generated"]): r for r in records if r["kind"] == "memory"}
    assert set(memory) == {(v, n) for v in bench.VARIANTS for n in (4, 20)}
    for r in memory.values():
        assert set(bench.MEMORY_FIELDS) <= set(r)
    assert memory[("mha", 20)]["cache_slots"] == 12 + 20
    assert memory[("mha", 20)]["cache_bytes"] == 4 * memory[("gqa", 20)]["cache_bytes"]
    assert memory[("swa", 4)]["source"] == "decoded"
    assert memory[("swa", 4)]["cache_bytes"] == memory[("swa", 20)]["cache_bytes"] == 8 * 256
    assert "gqa KV cache exactly 1/4 of mha: 64 vs 256 B/token (met)" in captured.err
    assert "swa decode memory flat" in captured.err and "(met)" in captured.err


def test_host_part_reports_dispatch_cost_per_token(capsys):
    code = bench.main(["--parts", "host", "--host-model", "2x32x4", "--host-tokens", "4",
                       "--repeats", "1", "--json"])  # fmt: skip
    captured = capsys.readouterr()
    (record,) = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 0 and set(HOST_FIELDS) <= set(record)
    assert record["model"] == "2x32x4" and record["tokens"] == 4
    assert 0 < record["host_ms_per_token"] and 0 < record["wall_ms_per_token"]
    assert "decode host overhead <= 1 ms/token at 2 layers" in captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "mha,xyz"], "--variants"),
        (["--model", "2x30x4"], "HEADS dividing EMBD"),
        (["--model", "2x24x6"], "multiple of 4"),
        (["--contexts", "0"], "positive"),
        (["--host-tokens", "0"], "--host-tokens must be positive"),
        (["--seed", "-1"], "--seed must be in [0, 2**32)"),
        (["--seed", str(2**32)], "--seed must be in [0, 2**32)"),
    ],
)
def test_bad_flags_are_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert message in err


def test_train_dir_holding_other_data_is_refused_and_left_alone(tmp_path, capsys):
    from gpt2_jax.config import DataConfig
    from gpt2_jax.data import prepare_source
    from tests.test_campaign import tree_hash
    from tests.test_data_prepare import DOCS, write_txt

    work = tmp_path / "work"
    prepare_source(DataConfig(source=str(write_txt(tmp_path / "c", DOCS))), work / "data",
                   show_progress=False)  # fmt: skip
    before = tree_hash(work)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--parts", "speculative", "--train-dir", str(work), "--train-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "pick a new --train-dir" in err[0]
    assert tree_hash(work) == before
