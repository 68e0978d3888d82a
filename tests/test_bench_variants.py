"""`python -m gpt2_jax.bench variants` end to end on the smoke preset (≈45 s on 2 idle cores:
three row processes train at once, then two timing rounds)."""

import json

import pytest

from gpt2_jax.bench import variants
from gpt2_jax.bench._variants_report import SEED_SOURCE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIELDS = ("name", "params", "peak_train_bytes", "train_tokens_per_sec", "kv_cache_bytes_per_token",
          "decode_tokens_per_sec", "val_ppl", "val_ppl_2x", "mfu", "device")  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, prepared_shakespeare):
    out = tmp_path_factory.mktemp("variants")
    argv = ["--preset", "smoke", "--out", str(out), "--rows", "standard,rope_gqa",
            "--peers", "ref", f"data.prepared_dir={prepared_shakespeare}"]  # fmt: skip
    assert variants.main(argv) == 0
    return out, json.loads((out / "variants.json").read_text())


def test_rows_and_fields(smoke):
    _, rows = smoke
    names = [r["name"] for r in rows]
    assert names == ["Standard GPT-2", "+ RoPE + GQA", "Standard (torch, gpt2_torch_ref)"]
    for r in rows:
        assert set(FIELDS) <= set(r)
        assert r["device"].startswith("cpu: ")
        assert r["mfu"] is None  # no fixed peak on CPU
        assert len(r["train_tokens_per_sec_rounds"]) == 2  # the smoke preset's two rounds
        assert r["train_tokens_per_sec"] > 0 and r["peak_rss_growth_bytes"] > 0
    std, gqa, ref = rows
    for r in (std, gqa):
        assert r["memory_method"] == "xla-memory-analysis" and r["peak_train_bytes"] > 0
        assert len(r["decode_tokens_per_sec_rounds"]) == 2 and r["decode_tokens_per_sec"] > 0
        assert 1.0 < r["val_ppl"] < 60000.0  # six steps: still near the 50257-way uniform
        assert [step for step, _ in r["val_curve"]] == [3, 6]
    # The same Standard config in torch: exactly the JAX parameter count, memory by RSS.
    assert ref["params"] == std["params"]
    assert ref["peak_train_bytes"] == ref["peak_rss_growth_bytes"]
    assert ref["decode_tokens_per_sec"] is None and ref["val_ppl"] is None
    assert ref["steps"] == 2 + 2  # warm-up, then one step in each timing round


def test_positions_and_kv_cache(smoke):
    _, rows = smoke
    std, gqa = rows[0], rows[1]
    assert std["val_ppl_2x"] is None  # learned positions end at seq_len
    assert isinstance(gqa["val_ppl_2x"], float) and gqa["val_ppl_2x"] > 1.0
    # n_kv_head = n_head / 4: a quarter of the K/V bytes per position.
    assert gqa["kv_cache_bytes_per_token"] * 4 == std["kv_cache_bytes_per_token"]
    # 1 layer, 4 heads of 8 dims, fp32: K and V = 2 · 4 · 8 · 4 bytes.
    assert std["kv_cache_bytes_per_token"] == 256
    assert std["kv_cache_bytes_at_context"] == 256 * 32  # full cache at the 32-token context


def test_outputs_written(smoke):
    out, rows = smoke
    for name in ("val_loss", "throughput", "memory"):
        data = (out / f"variants_{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    table = (out / "variants.md").read_text()
    assert "| Row | Params |" in table and SEED_SOURCE in table
    for r in rows:
        assert f"| {r['name']} |" in table
    assert "n/a (learned)" in table  # the learned row's 2× column


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "tpu"], "invalid choice"),
        (["--preset", "smoke", "--rows", "standard,alibi"], "--rows takes"),
        (["--preset", "smoke", "--peers", "jax"], "--peers takes"),
        (["--preset", "gpu", "--peers", "ref"], "CPU only"),
        (["--preset", "smoke", "--rounds", "0"], "at least 1"),
        (["--preset", "smoke", "model.n_head=6", "model.n_embd=36"], "divisible by 4"),
    ],
)
def test_bad_flags_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        variants.main([*argv, "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
