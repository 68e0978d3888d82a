"""The Markdown table and the PNG plots of `python -m gpt2_jax.bench variants`."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

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


def _spread(value, rounds: list[float] | None) -> str:
    """The median with the range over timing rounds."""
    if value is None:
        return "–"
    if not rounds or len(rounds) < 2:
        return _num(value)
    return f"{value:,.0f} ({min(rounds):,.0f}–{max(rounds):,.0f})"


def _seed(key: str) -> str:
    if key not in SEED_CLAIMS:
        return "–"
    name, gb, tok_s, ppl = SEED_CLAIMS[key]
    return f"{name}: {gb} GB, {tok_s / 1e3:.1f}K tok/s, ppl {ppl}"


def _standard(rows: list[dict]) -> dict:
    return next((r for r in rows if r["key"] == "standard"), {})


def _table(rows: list[dict]) -> list[str]:
    std = _standard(rows)
    lines = [
        "| Row | Params | Peak train memory | RSS peak growth | Train tok/s | × Std | KV bytes "
        "/ token | KV cache @ctx | Decode tok/s | × Std | Val ppl | Val ppl @2×T | MFU | Seed's "
        "claim |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ppl_2x = _num(r["val_ppl_2x"], ".1f")
        if r["kind"] == "jax" and r["val_ppl_2x"] is None:
            ppl_2x = "n/a (learned)"
        cells = [
            r["name"], f"{r['params'] / 1e6:.2f}M",
            f"{_bytes(r['peak_train_bytes'])} ({r['memory_method']})",
            _bytes(r["peak_rss_growth_bytes"]),
            _spread(r["train_tokens_per_sec"], r["train_tokens_per_sec_rounds"]),
            _ratio(r["train_tokens_per_sec"], std.get("train_tokens_per_sec")),
            _num(r["kv_cache_bytes_per_token"]), _bytes(r["kv_cache_bytes_at_context"]),
            _spread(r["decode_tokens_per_sec"], r["decode_tokens_per_sec_rounds"]),
            _ratio(r["decode_tokens_per_sec"], std.get("decode_tokens_per_sec")),
            _num(r["val_ppl"], ".1f"), ppl_2x,
            "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", _seed(r["key"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _seed_comparison(rows: list[dict]) -> list[str]:
    """Each claimed change as a ratio to the seed's Standard row, beside this run's."""
    std = _standard(rows)
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


def markdown(rows: list[dict], settings: dict, elapsed_s: float) -> str:
    """The results table, the seed's claims as ratios beside ours, and the settings."""
    s, m = settings, settings["model"]
    timing = (
        f"in {s['rounds']} alternating rounds of {s['round_steps']} steps (and one decode run) "
        "per row, all rows waiting in memory; median (range) over rounds"
        if s["interleaved"]
        else f"in {s['rounds']} rounds of {s['round_steps']} steps right after each row's "
        "training; median (range) over rounds"
    )
    intro = (
        f"Device: {rows[0]['device']}. Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
        f" in {elapsed_s / 60:.1f} min. Model: {m['n_layer']} layers, d={m['n_embd']}, "
        f"{m['n_head']} heads, {m['dtype']}; seq_len {s['seq_len']}, batch {s['batch_size']}, "
        f"{s['steps']} training steps = {s['tokens_per_row']:,} tokens per row. Throughput is "
        f"timed {timing}; torch peers train only in those rounds (same batches, same AdamW). "
        f"Decode: greedy, batch {s['decode_batch']}, positions "
        f"{s['decode_context'] - s['decode_new']}–{s['decode_context']}. × Std: ratio to the "
        "Standard row of this run."
    )
    if s["parallel"]:
        intro += " Rows trained all at once and the timings are not comparable (smoke preset)."
    return "\n".join([
        f"# GPT-2 variants, preset `{s['preset']}`", "", intro, "", *_table(rows), "",
        f"The seed's claims (source: {SEED_SOURCE}; the seed's own README is not available "
        "offline) as ratios to its Standard row, beside this run's:", "",
        *_seed_comparison(rows), "", "Settings: `" + json.dumps(s) + "`", "",
    ])  # fmt: skip


def _bars(ax, rows: list[dict], field: str, scale: float, label: str) -> None:
    pts = [r for r in rows if r.get(field) is not None]
    if not pts:
        ax.set_visible(False)
        return
    vals = [r[field] * scale for r in pts]
    spread = [r.get(field + "_rounds") or [r[field]] for r in pts]
    err = [[v - min(s) * scale for v, s in zip(vals, spread, strict=True)],
           [max(s) * scale - v for v, s in zip(vals, spread, strict=True)]]  # fmt: skip
    bars = ax.barh(range(len(vals)), vals, xerr=err, color="tab:blue", ecolor="gray")
    ax.set_yticks(range(len(vals)), [r["name"] for r in pts], fontsize=8)
    ax.invert_yaxis()
    ax.bar_label(bars, [f"{v:,.1f}" if v < 100 else f"{v:,.0f}" for v in vals], fontsize=7,
                 padding=3)  # fmt: skip
    ax.set_xlabel(label)
    ax.grid(axis="x", alpha=0.3)


def plots(rows: list[dict], settings: dict, out: Path) -> list[Path]:
    """Validation loss of every trained row; throughput bars (range over the timing rounds);
    memory bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = settings["batch_size"] * settings["seq_len"]
    paths = [out / f"variants_{n}.png" for n in ("val_loss", "throughput", "memory")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["val_curve"]:
            steps, losses = zip(*r["val_curve"], strict=True)
            ax.plot([s * tokens_per_step / 1e3 for s in steps], losses, "o-", ms=3, label=r["name"])
    base = next((r["unigram_baseline_loss"] for r in rows if r.get("unigram_baseline_loss")), None)
    if base:
        ax.axhline(base, color="gray", ls=":", label="unigram baseline (train counts)")
    ax.set(xlabel="training tokens (thousands)", ylabel="validation loss (nats/token)",
           title=f"validation loss, preset {settings['preset']}")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    for path, panels in (
        (paths[1], [("train_tokens_per_sec", 1.0, "training tokens/s"),
                    ("decode_tokens_per_sec", 1.0, "decode tokens/s")]),
        (paths[2], [("peak_train_bytes", 2.0**-20, "peak training memory (MiB; method per row)"),
                    ("peak_rss_growth_bytes", 2.0**-20, "RSS peak growth (MiB)"),
                    ("kv_cache_bytes_at_context", 2.0**-20, "KV cache at context (MiB)")]),
    ):  # fmt: skip
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6))
        for ax, (field, scale, label) in zip(axes, panels, strict=True):
            _bars(ax, rows, field, scale, label)
        fig.suptitle(f"{rows[0]['device']}, preset {settings['preset']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return paths
