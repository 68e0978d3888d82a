"""`python -m benchmarks variants` end to end on the tiny preset with 2 seeds (≈40 s on 2
cores: a seed's three row processes train at once, then two timing rounds), and its
statistics, verdict rules, MoE depth rule and budgets without training."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from benchmarks import variants
from benchmarks._variants_findings import CLAIMS, findings, judge
from benchmarks._variants_presets import PRESETS, estimate_s, moe_depth, row_config
from benchmarks._variants_report import SEED_SOURCE
from benchmarks._variants_stats import (
    betainc,
    paired_test,
    summary,
    t_cdf,
    t_quantile,
    t_two_sided_p,
)
from gpt2_jax.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = ("val_ppl", "train_tokens_per_sec", "decode_tokens_per_sec", "peak_train_bytes")
T_975_1 = 12.7062047361747  # t_{0.975, 1}: the 95% interval of two seeds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, prepared_shakespeare):
    out = tmp_path_factory.mktemp("variants")
    argv = ["--preset", "tiny", "--seeds", "2", "--out", str(out), "--rows",
            "standard,rope_gqa_swa", "--peers", "ref",
            f"data.prepared_dir={prepared_shakespeare}"]  # fmt: skip
    assert variants.main(argv) == 0
    return out, json.loads((out / "variants.json").read_text())


# ------------------------------------------------------------------------ the tiny run


def test_rows_and_fields(tiny):
    out, res = tiny
    assert not (out / "variants.partial.json").exists()  # removed once variants.json is written
    assert res["seeds"] == 2 and "Student-t" in res["interval"] and "paired" in res["test"]
    assert [s["preset"] for s in res["settings"]] == ["tiny"]
    names = [r["name"] for r in res["rows"]]
    assert names == ["Standard GPT-2", "+ RoPE + GQA + window", "Standard (torch, gpt2_torch_ref)"]
    for r in res["rows"]:
        assert (r["preset"], r["seq_len"], r["n_seeds"], r["train_seeds"]) == (
            "tiny",
            32,
            2,
            [0, 1],
        )
        assert [run["seed"] for run in r["runs"]] == [0, 1]
        assert r["device"].startswith("cpu: ") and r["mfu"] is None  # no fixed peak on CPU
        assert len(r["train_tokens_per_sec_seeds"]) == 2 and r["train_tokens_per_sec"] > 0
        assert [len(x) for x in r["train_tokens_per_sec_rounds"]] == [2, 2]  # 2 rounds a seed
    std, swa, ref = res["rows"]
    for r in (std, swa):
        for m in METRICS:
            assert len(r[f"{m}_seeds"]) == 2 and r[f"{m}_std"] is not None
            lo, hi = r[f"{m}_ci95"]
            assert lo <= r[m] <= hi
        assert r["memory_method"] == "xla-memory-analysis" and r["peak_train_bytes"] > 0
        assert 1.0 < r["val_ppl"] < 60000.0  # six steps: still near the 50257-way uniform
        assert [step for step, _ in r["val_curve"]] == [3, 6] and len(r["val_curve_band"]) == 2
        assert r["val_ppl_seeds"][0] != r["val_ppl_seeds"][1]  # the seed changes init and data
    assert swa["active_params"] == swa["params"]  # no position table, every weight active
    assert ref["params"] == std["params"] and ref["val_ppl"] is None
    assert ref["peak_train_bytes"] == ref["peak_rss_growth_bytes"]


def test_interval_is_the_t_interval_of_the_seeds(tiny):
    """mean ± t_{0.975,1} · s / √2 over the two per-seed values, by hand."""
    _, res = tiny
    for r in res["rows"][:2]:
        for m in METRICS:
            a, b = r[f"{m}_seeds"]
            mean, std = (a + b) / 2, abs(a - b) / math.sqrt(2)
            half = T_975_1 * std / math.sqrt(2)
            assert r[m] == pytest.approx(mean) and r[f"{m}_std"] == pytest.approx(std)
            assert r[f"{m}_ci95"] == pytest.approx([mean - half, mean + half])


def test_extrapolation_fields(tiny):
    _, res = tiny
    std, swa, ref = res["rows"]
    # Learned positions end at max_seq_len: only 1× exists.
    assert std["val_ppl_at"] == {"1x": std["val_ppl"], "2x": None, "4x": None, "8x": None}
    assert std["val_ppl_at_seeds"]["8x"] == [None, None]
    assert list(swa["val_ppl_at"]) == ["1x", "2x", "4x", "8x"]
    assert swa["val_ppl_at"]["1x"] == swa["val_ppl"]
    for k, v in swa["val_ppl_at"].items():
        assert v > 1.0 and len(swa["val_ppl_at_seeds"][k]) == 2
    assert set(ref["val_ppl_at"].values()) == {None}


def test_rows_against_standard(tiny):
    _, res = tiny
    std, swa, ref = res["rows"]
    assert std["vs_standard"] is None and set(ref["vs_standard"]) == {"train_tokens_per_sec"}
    for m in METRICS:
        test = swa["vs_standard"][m]
        assert test["dof"] == 1 and 0.0 <= test["p"] <= 1.0
        assert test["beyond_seed_noise"] == ("yes" if test["p"] < 0.05 else "no")
        ratios = [a / b for a, b in zip(swa[f"{m}_seeds"], std[f"{m}_seeds"], strict=True)]
        assert test["ratio"]["values"] == pytest.approx(ratios)
    # 1 layer, 4 heads of 8 dims, fp32: K and V = 2 · 4 · 8 · 4 bytes; GQA keeps a quarter.
    assert std["kv_cache_bytes_per_token"] == 256 and swa["kv_cache_bytes_per_token"] == 64


def test_outputs_written(tiny, tmp_path):
    out, res = tiny
    for name in ("val_loss", "extrapolation", "throughput", "memory"):
        data = (out / f"variants_{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    table = (out / "variants.md").read_text()
    assert "| Row | Params | Active params" in table and SEED_SOURCE in table
    assert all(f"| {r['name']} |" in table for r in res["rows"])
    assert "n/a (learned)" in table and "p " in table  # a learned row's 2×, a paired test
    text = (out / "findings.md").read_text()
    for claim, _ in CLAIMS:
        assert claim in text
    assert text.count("**not visible at this scale**") == 3  # the tiny run can test nothing
    # --combine rewrites the findings from saved results, training nothing.
    assert variants.main(["--combine", str(out), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "findings.md").read_text() == text


# -------------------------------------------------------------------------- statistics


def test_interval_by_hand():
    s = summary([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["std"] == pytest.approx(1.29099, abs=1e-5)
    assert t_quantile(0.975, 3) == pytest.approx(3.18245, abs=1e-5)
    assert s["half_width"] == pytest.approx(2.05426, abs=1e-5)
    assert s["ci95"] == pytest.approx([2.5 - 2.05426, 2.5 + 2.05426], abs=1e-5)
    one = summary([7.0])
    assert (one["mean"], one["std"], one["ci95"]) == (7.0, None, None)


@pytest.mark.parametrize(
    "dof, t",  # two-sided 95% critical values of Student's t (printed tables)
    [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423), (1000, 1.9623)],
)
def test_t_quantile_table(dof, t):
    assert t_quantile(0.975, dof) == pytest.approx(t, abs=1e-4)
    assert t_cdf(t_quantile(0.975, dof), dof) == pytest.approx(0.975, abs=1e-12)
    assert t_quantile(0.025, dof) == pytest.approx(-t, abs=1e-4)


def test_t_distribution_known_values():
    assert t_two_sided_p(2.0, 5) == pytest.approx(0.1019395, abs=1e-7)
    assert t_cdf(-1.5, 7) == pytest.approx(0.0886492, abs=1e-7)
    assert t_cdf(0.0, 3) == 0.5
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 − Σ binomial terms
    assert betainc(0.5, 0.5, 0.5) == pytest.approx(0.5, abs=1e-12)


def test_paired_test_known_case():
    """Differences [2, 3, 1, 2]: t = 2 / (0.8165 / 2) = 4.899 on 3 dof, p = 0.01628."""
    res = paired_test([3.0, 5.0, 4.0, 6.0], [1.0, 2.0, 3.0, 4.0])
    assert res["t"] == pytest.approx(4.898979, abs=1e-6) and res["dof"] == 3
    assert res["p"] == pytest.approx(0.0162766, abs=1e-7) and res["beyond_seed_noise"] == "yes"
    assert res["ratio"]["values"] == pytest.approx([3.0, 2.5, 4 / 3, 1.5])
    near = paired_test([10.5, 11.0, 12.2], [10.0, 10.1, 11.0])
    assert near["p"] == pytest.approx(0.0506142, abs=1e-7) and near["beyond_seed_noise"] == "no"
    assert paired_test([1.0], [2.0])["beyond_seed_noise"] == "n/a"
    exact = paired_test([5.0, 5.0], [4.0, 4.0])  # a deterministic metric: no noise at all
    assert (exact["t"], exact["p"], exact["beyond_seed_noise"]) == (None, 0.0, "yes")
    assert paired_test([4.0, 4.0], [4.0, 4.0])["p"] == 1.0


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_stats_agree_with_scipy(n):
    """The interval is scipy's t interval and the test is `scipy.stats.ttest_rel`."""
    rng = np.random.default_rng(n)
    base = rng.normal(100.0, 5.0, n).tolist()
    row = (np.asarray(base) * 1.02 + rng.normal(0.0, 1.0, n)).tolist()
    s = summary(row)
    lo, hi = stats.t.interval(0.95, n - 1, loc=np.mean(row), scale=stats.sem(row))
    assert s["ci95"] == pytest.approx([lo, hi], rel=1e-12)
    ref = stats.ttest_rel(row, base)
    res = paired_test(row, base)
    assert res["t"] == pytest.approx(ref.statistic, rel=1e-9)
    assert res["p"] == pytest.approx(ref.pvalue, rel=1e-9) and res["dof"] == ref.df


# ------------------------------------------------------------------------ verdict rules


@pytest.mark.parametrize(
    "kind, value, ci, verdict",
    [
        ("change", 0.75, [0.70, 0.80], "confirmed"),  # ≥ half of the 25% cut (≤ 0.875)
        ("change", 0.75, [0.98, 1.00], "refuted"),
        ("change", 0.75, [0.80, 0.95], "not visible"),
        ("change", 1.5, [1.30, 1.90], "confirmed"),
        ("change", 1.5, [0.95, 1.10], "refuted"),
        ("at_most", 1.02, [0.97, 1.01], "confirmed"),
        ("at_most", 1.02, [1.05, 1.10], "refuted"),
        ("at_most", 1.02, [1.00, 1.04], "not visible"),
        ("at_most", 1.02, None, "not visible"),  # one seed
    ],
)
def test_judge(kind, value, ci, verdict):
    assert judge(kind, value, ci)[0] == verdict


def _row(key, preset, **seeds):
    row = {"key": key, "name": key, "kind": "jax", "preset": preset, "device": "cpu: test",
           "unigram_baseline_loss": 6.14, "val_ppl": math.exp(4.9)}  # fmt: skip
    row.update({f"{m}_seeds": v for m, v in seeds.items()})
    return row


def _run(preset, seq_len, rows, seeds=3):
    s = {"preset": preset, "seeds": seeds, "rows": [r["key"] for r in rows],
         "seq_len": seq_len, "steps": 10}  # fmt: skip
    return {"interval": "95% t", "settings": [s], "rows": rows}


def test_findings_from_two_runs():
    """Quality at T 256 (past early learning) and a long run: each claim from the run that
    can test it; the window claim is not visible in the short run alone."""
    mem, ppl = [100.0] * 3, [134.0, 135.0, 136.0]
    quality = _run("quality", 256, [
        _row("standard", "quality", peak_train_bytes=mem, val_ppl=ppl),
        _row("rope", "quality", peak_train_bytes=mem, val_ppl=[133.0, 134.0, 136.0]),
        _row("rope_gqa", "quality", peak_train_bytes=[99.0] * 3, val_ppl=[133.5, 134.0, 136.0]),
    ])  # fmt: skip
    quality["rows"][1]["val_ppl_at_seeds"] = {"1x": [133.0, 134.0, 136.0],
                                              "2x": [134.0, 135.0, 137.0]}  # fmt: skip
    long = _run("long", 4096, [
        _row("standard", "long", train_tokens_per_sec=[800.0, 820.0]),
        _row("swa", "long", train_tokens_per_sec=[1450.0, 1500.0]),
        _row("rope", "long", peak_train_bytes=[200.0] * 2),
        _row("rope_gqa", "long", peak_train_bytes=[148.0] * 2),
    ], seeds=2)  # fmt: skip
    verdicts = [f["verdict"] for f in findings([quality])]
    assert verdicts == ["refuted", "not visible", "confirmed"]  # memory cut 1%, no long run
    # Memory and throughput from the longest context; quality from the most seeds.
    both = findings([quality, long])
    assert [f["verdict"] for f in both] == ["confirmed", "confirmed", "confirmed"]
    gqa_memory, gqa_quality = both[0]["parts"]
    assert "preset long" in gqa_memory["experiment"] and gqa_memory["ratio"]["mean"] == 0.74
    assert "preset quality" in gqa_quality["experiment"]
    assert "preset long" in both[1]["parts"][0]["experiment"]
    # 0.14 nats under the unigram baseline: still in early learning.
    early = _run(
        "cpu", 256, [dict(r, preset="cpu", val_ppl=math.exp(6.0)) for r in quality["rows"]]
    )
    part = findings([early])[0]["parts"][1]
    assert part["verdict"] == "not visible" and "early learning" in part["rule"]


# ------------------------------------------------------------------ presets and the MoE row


def test_moe_depth_matches_active_parameters(tmp_path):
    assert moe_depth(5) == (3, 1) and moe_depth(8) == (6, 2) and moe_depth(12) == (10, 3)
    assert moe_depth(4) is None
    for n, (layers, every) in ((5, (3, 1)), (12, (10, 3))):
        moe_layers = layers // every
        assert 12 * layers + 20 * moe_layers - 12 * moe_layers == 12 * n  # D² terms equal
    from benchmarks.moe import param_counts

    std = row_config("tiny", "standard", ["model.n_layer=5"], tmp_path)
    moe = row_config("tiny", "moe", ["model.n_layer=5"], tmp_path, seed=1)
    m = moe.model
    assert (m.n_layer, m.moe_experts, m.moe_top_k, m.moe_every) == (3, 8, 2, 1)
    assert moe.train.seed == std.train.seed + 1
    a, b = param_counts(std)["active_params_blocks"], param_counts(moe)["active_params_blocks"]
    assert abs(a - b) < 0.01 * a  # only biases, LayerNorms and the router differ (O(D))
    with pytest.raises(UserError, match="n_layer=4 has none"):
        row_config("cpu", "moe", [], tmp_path)


def test_gpu_chain_adds_long_context_rows(tmp_path):
    """--preset gpu runs gpu, then gpu-long: T 4096, window 256, every row; checked up front."""
    from benchmarks._variants_presets import preset_chain

    assert preset_chain("gpu") == ["gpu", "gpu-long"]
    a = variants.parse_args(["--preset", "gpu", "--seeds", "2", "--peers", "none"])
    s = variants._settings("gpu-long", ["standard", "swa", "moe"], [], a, tmp_path)
    assert (s["seq_len"], s["window"], s["seeds"], s["budget"]["estimate_min"]) == (
        4096,
        256,
        2,
        None,
    )
    swa = row_config("gpu-long", "swa", [], tmp_path).model
    assert (swa.max_seq_len, swa.attention_window, swa.n_layer) == (4096, 256, 12)
    moe = row_config("gpu", "moe", [], tmp_path, seed=2)
    assert (moe.model.n_layer, moe.model.moe_every, moe.model.scan_layers) == (10, 3, False)
    assert moe.train.out_dir.endswith("gpu/moe-seed2")


def test_budgets_fit_the_cost_model(tmp_path):
    """The quality and long presets' estimates (default rows and seeds) stay in budget."""
    for name, limit in (("quality", 75), ("long", 45)):
        p = PRESETS[name]
        cfgs = [row_config(name, k, [], tmp_path) for k in p.rows]
        est = estimate_s(p, cfgs, cfgs[0], p.seeds, len(p.peers)) / 60
        assert p.budget_min == limit and 0.5 * limit < est <= limit


def test_sequential_rows_alternate_order(monkeypatch, tmp_path):
    """Rows timed one at a time run in reverse order on odd seeds; records keep spec order."""
    started = []

    class Fake:
        def __init__(self, spec, work, index):
            self.spec, self.name, self.train_s = spec, spec["name"], [1.0]
            started.append(spec["key"])

        def wait_ready(self):
            pass

        def time_round(self, steps):
            pass

        def finish(self, steps):
            return {"key": self.spec["key"]}

        def kill(self):
            pass

    monkeypatch.setattr(variants, "RowProcess", Fake)
    a = variants.parse_args(["--preset", "long"])
    specs = [{"key": k, "name": k, "seed": 1} for k in ("standard", "swa", "rope")]
    got = variants.run_seed(specs, "long", a, Path(tmp_path))
    assert started == ["rope", "swa", "standard"]
    assert [r["key"] for r in got] == ["standard", "swa", "rope"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "tpu"], "invalid choice"),
        (["--preset", "tiny", "--seeds", "0"], "--seeds must be at least 1"),
        (["--seeds", "2"], "--preset is required"),
        (["--preset", "tiny", "--combine", "x"], "no --preset"),
        (["--preset", "tiny", "--rows", "standard,alibi"], "--rows takes"),
        (["--preset", "tiny", "--peers", "jax"], "--peers takes"),
        (["--preset", "gpu", "--peers", "ref"], "CPU only"),
        (["--preset", "tiny", "--rounds", "0"], "at least 1"),
        (["--preset", "tiny", "model.n_head=6", "model.n_embd=36"], "divisible by 4"),
        (["--preset", "cpu", "--rows", "moe", "--peers", "none"], "n_layer=4 has none"),
    ],
)
def test_bad_flags_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        variants.main([*argv, "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_interrupted_study_keeps_finished_seeds(monkeypatch, tmp_path, prepared_shakespeare):
    """A crash in seed 1 leaves seed 0's raw records in variants.partial.json, no variants.json."""
    calls = []

    def fake_run_seed(specs, name, a, work):
        calls.append(specs[0]["seed"])
        if specs[0]["seed"] == 1:
            raise KeyboardInterrupt
        return [{"key": s["key"], "seed": s["seed"], "val_ppl": 100.0} for s in specs]

    monkeypatch.setattr(variants, "run_seed", fake_run_seed)
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--seeds", "3", "--rows", "standard,rope", "--peers", "none",
            "--out", str(out), f"data.prepared_dir={prepared_shakespeare}"]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        variants.main(argv)
    assert calls == [0, 1] and not (out / "variants.json").exists()
    kept = json.loads((out / "variants.partial.json").read_text())["tiny"]
    assert kept["settings"]["rows"] == ["standard", "rope"]
    assert [[r["key"] for r in seed] for seed in kept["seeds"]] == [["standard", "rope"]]
    # Running again into the same --out refuses in one line and keeps those seeds.
    before = (out / "variants.partial.json").read_text()
    with pytest.raises(SystemExit) as e:
        variants.main(argv)
    assert e.value.code == 2 and calls == [0, 1]
    assert (out / "variants.partial.json").read_text() == before
