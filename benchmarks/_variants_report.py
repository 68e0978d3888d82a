"""The Markdown tables of `python -m benchmarks variants` (plots: `_variants_plots`)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

# The seed project's headline table (memory GB, training tok/s, perplexity). Its README is not
# in this repository; the only table with these rows and columns found offline is at
# SEED_SOURCE (a PyTorch project page), which states no model size, data, hardware or budget.
SEED_SOURCE = "https://sid-betalol.github.io/projects/6_project"
SEED_CLAIMS = {
    "standard": ("Standard GPT-2", 12.4, 8.2e3, 24.3),
    "rope": ("+ RoPE", 12.4, 8.1e3, 23.8),
    "rope_gqa": ("+ GQA", 9.2, 10.5e3, 24.1),
    "rope_gqa_swa": ("+ Sliding Window", 7.8, 12.3e3, 24.5),
}


def _bytes(x) -> str:
    if x is None:
        return "–"
    return f"{x / 2**20:,.1f} MiB" if x >= 2**20 else f"{x / 2**10:,.1f} KiB"


def _num(x, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


def _ratio(x, ref) -> str:
    return "–" if x is None or not ref else f"{x / ref:.2f}×"


def _mean_ci(row: dict, metric: str, fmt=_num) -> str:
    """The mean over seeds ± the 95% half-width; with one seed, the range over the timing
    rounds where there are rounds."""
    mean, ci = row.get(metric), row.get(f"{metric}_ci95")
    if mean is None:
        return "–"
    if ci is not None:
        half = (ci[1] - ci[0]) / 2
        return f"{fmt(mean)} ± {fmt(half)}" if half else f"{fmt(mean)} ± 0"
    rounds = [x for seed in row.get(f"{metric}_rounds") or [] for x in seed]
    if len(rounds) >= 2:
        return f"{fmt(mean)} ({fmt(min(rounds))}–{fmt(max(rounds))})"
    return fmt(mean)


def _vs(row: dict, metric: str) -> str:
    """Ratio to Standard (mean of per-seed ratios) and the paired test's p and verdict."""
    if row.get("key") == "standard" and row.get("kind") == "jax":
        return "1.00×"
    test = (row.get("vs_standard") or {}).get(metric)
    if not test or test["ratio"]["mean"] is None:
        return "–"
    if test["p"] is None:
        return f"{test['ratio']['mean']:.2f}× (n/a)"
    return f"{test['ratio']['mean']:.2f}× (p {test['p']:.2g}, {test['beyond_seed_noise']})"


def _extrapolation(row: dict, k: str) -> str:
    at = row.get("val_ppl_at") or {}
    if row["kind"] == "jax" and at.get(k) is None:
        return "n/a (learned)"
    ci = (row.get("val_ppl_at_ci95") or {}).get(k)
    v = at.get(k)
    if v is None:
        return "–"
    return f"{v:.1f} ± {(ci[1] - ci[0]) / 2:.1f}" if ci else f"{v:.1f}"


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| Row | Params | Active params: all / blocks | Peak train memory | × Std | Train tok/s "
        "| × Std | KV bytes / token | Decode tok/s | × Std | Val ppl | × Std | ppl @2×T | @4×T "
        "| @8×T | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        active = f"{r['active_params']:,} / {_num(r['active_params_blocks'])}"
        cells = [
            r["name"], f"{r['params'] / 1e6:.2f}M", active,
            f"{_mean_ci(r, 'peak_train_bytes', _bytes)} ({r['memory_method']})",
            _vs(r, "peak_train_bytes"),
            _mean_ci(r, "train_tokens_per_sec"), _vs(r, "train_tokens_per_sec"),
            _num(r["kv_cache_bytes_per_token"]),
            _mean_ci(r, "decode_tokens_per_sec"), _vs(r, "decode_tokens_per_sec"),
            _mean_ci(r, "val_ppl", lambda x: _num(x, ".1f")), _vs(r, "val_ppl"),
            *(_extrapolation(r, k) for k in ("2x", "4x", "8x")),
            "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _seed_comparison(rows: list[dict]) -> list[str]:
    """Each claimed change as a ratio to the seed's Standard row, beside this run's."""
    std = next((r for r in rows if r["key"] == "standard" and r["kind"] == "jax"), {})
    _, gb0, tok0, ppl0 = SEED_CLAIMS["standard"]
    lines = [
        "| Row | Memory: seed | ours | Train tok/s: seed | ours | Val ppl: seed | ours |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["kind"] != "jax" or r["key"] not in SEED_CLAIMS:
            continue
        _, gb, tok, ppl = SEED_CLAIMS[r["key"]]
        cells = [
            r["name"], f"{gb / gb0:.2f}×",
            _ratio(r["peak_train_bytes"], std.get("peak_train_bytes")), f"{tok / tok0:.2f}×",
            _ratio(r["train_tokens_per_sec"], std.get("train_tokens_per_sec")),
            f"{ppl / ppl0:.2f}×", _ratio(r["val_ppl"], std.get("val_ppl")),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _intro(s: dict, rows: list[dict]) -> str:
    m, b = s["model"], s["budget"]
    timing = (
        f"in {s['rounds']} alternating rounds of {s['round_steps']} steps (and one decode run) "
        "per row, a seed's rows all waiting in memory"
        if s["interleaved"]
        else f"in {s['rounds']} rounds of {s['round_steps']} steps right after each row's "
        "training (rows one at a time, their order reversed on odd seeds)"
    )
    budget = (f"Budget: {b['stated_min'] or '–'} min stated, {b['estimate_min'] or '–'} min "
              f"estimated (`_variants_presets` cost model), {b.get('elapsed_min', '–')} min "
              "taken.")  # fmt: skip
    text = (
        f"Device: {rows[0]['device']}. Model: {m['n_layer']} layers, "
        f"d={m['n_embd']}, {m['n_head']} heads, {m['dtype']}; seq_len {s['seq_len']}, batch "
        f"{s['batch_size']}, {s['steps']} steps = {s['tokens_per_row']:,} tokens per row and "
        f"seed; {s['seeds']} seed(s); window w = {s['window']}. Per-seed throughput is the "
        f"median over rounds timed {timing}. Decode: greedy, batch {s['decode_batch']}, "
        f"positions {s['decode_context'] - s['decode_new']}–{s['decode_context']}. {budget}"
    )
    if s["parallel"]:
        text += " Rows trained all at once and the timings are not comparable (tiny preset)."
    return text


def markdown(results: dict) -> str:
    """Per preset: the results table and the settings; then the seed's claims beside ours."""
    lines = [f"# GPT-2 variants, preset `{results['preset']}`", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in "
             f"{results.get('elapsed_min', '–')} min. Cells: mean ± 95% half-width over seeds "
             f"({results['interval']}); with one seed, throughput shows the range over timing "
             f"rounds. × Std: mean per-seed ratio to the Standard row of the same preset, with "
             f"the p-value of the {results['test']}, and whether the difference is beyond "
             "seed noise.", ""]  # fmt: skip
    for s in results["settings"]:
        rows = [r for r in results["rows"] if r["preset"] == s["preset"]]
        lines += [f"## Preset `{s['preset']}`", "", _intro(s, rows), "", *_table(rows), "",
                  "Settings: `" + json.dumps(s) + "`", ""]  # fmt: skip
    first = [r for r in results["rows"] if r["preset"] == results["settings"][0]["preset"]]
    lines += [f"The seed's claims (source: {SEED_SOURCE}; the seed's own README is not "
              "available offline) as ratios to its Standard row, beside this run's first "
              "preset:", "", *_seed_comparison(first), ""]  # fmt: skip
    return "\n".join(lines)
