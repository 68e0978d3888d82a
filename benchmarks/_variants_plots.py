"""The PNG plots of `python -m benchmarks variants`: validation loss over training with a
min–max band over seeds; validation perplexity against the window length (multiples of the
training length), min–max error bars over seeds; throughput and memory bars whose error bars
are the 95% t interval over seeds (with one seed: the range over timing rounds, or none)."""

from __future__ import annotations

from pathlib import Path

NAMES = ("val_loss", "extrapolation", "throughput", "memory")


def _label(row: dict, results: dict) -> str:
    single = len(results["settings"]) == 1
    return row["name"] if single else f"{row['name']} [{row['preset']}]"


def _error(row: dict, field: str, scale: float) -> tuple[float, float]:
    """(below, above) the mean: the 95% interval, else the range over rounds, else none."""
    mean = row[field] * scale
    ci = row.get(f"{field}_ci95")
    if ci is not None:
        return mean - ci[0] * scale, ci[1] * scale - mean
    rounds = [x for seed in row.get(f"{field}_rounds") or [] for x in seed]
    if len(rounds) >= 2:
        return mean - min(rounds) * scale, max(rounds) * scale - mean
    return 0.0, 0.0


def _bars(ax, rows: list[dict], results: dict, field: str, scale: float, label: str) -> None:
    pts = [r for r in rows if r.get(field) is not None]
    if not pts:
        ax.set_visible(False)
        return
    vals = [r[field] * scale for r in pts]
    below, above = zip(*(_error(r, field, scale) for r in pts), strict=True)
    bars = ax.barh(range(len(vals)), vals, xerr=[below, above], color="tab:blue", ecolor="gray",
                   capsize=3)  # fmt: skip
    ax.set_yticks(range(len(vals)), [_label(r, results) for r in pts], fontsize=7)
    ax.invert_yaxis()
    ax.bar_label(bars, [f"{v:,.1f}" if v < 100 else f"{v:,.0f}" for v in vals], fontsize=7,
                 padding=3)  # fmt: skip
    ax.set_xlabel(label)
    ax.grid(axis="x", alpha=0.3)


def _loss(ax, results: dict) -> None:
    tokens = {s["preset"]: s["batch_size"] * s["seq_len"] for s in results["settings"]}
    for r in results["rows"]:
        if not r.get("val_curve"):
            continue
        k = tokens[r["preset"]] / 1e3
        steps, mean = zip(*r["val_curve"], strict=True)
        (line,) = ax.plot([s * k for s in steps], mean, "o-", ms=3, label=_label(r, results))
        if r["n_seeds"] > 1:
            _, lo, hi = zip(*r["val_curve_band"], strict=True)
            ax.fill_between([s * k for s in steps], lo, hi, color=line.get_color(), alpha=0.2)
    base = next((r["unigram_baseline_loss"] for r in results["rows"]
                 if r.get("unigram_baseline_loss")), None)  # fmt: skip
    if base:
        ax.axhline(base, color="gray", ls=":", label="unigram baseline (train counts)")
    ax.set(xlabel="training tokens (thousands)", ylabel="validation loss (nats/token)",
           title="validation loss: mean over seeds, band = min–max over seeds")  # fmt: skip


def _extrapolation(ax, results: dict) -> None:
    for r in results["rows"]:
        at = r.get("val_ppl_at") or {}
        seeds = r.get("val_ppl_at_seeds") or {}
        pts = [(int(k[:-1]), v, seeds[k]) for k, v in at.items() if v is not None]
        if r["kind"] != "jax" or not pts:
            continue
        xs, ys, raw = zip(*pts, strict=True)
        err = [[y - min(s) for y, s in zip(ys, raw, strict=True)],
               [max(s) - y for y, s in zip(ys, raw, strict=True)]]  # fmt: skip
        learned = len(pts) == 1
        ax.errorbar(
            xs,
            ys,
            yerr=err,
            fmt="s" if learned else "o-",
            capsize=3,
            ms=5,
            label=_label(r, results) + (" (learned: 1× only)" if learned else ""),
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([1, 2, 4, 8], ["1×", "2×", "4×", "8×"])
    ax.set(xlabel="evaluation window / training length", ylabel="validation perplexity",
           title="length extrapolation: mean, error bars = min–max over seeds")  # fmt: skip


def plots(results: dict, out: Path) -> list[Path]:
    """Write the four plots into `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out / f"variants_{n}.png" for n in NAMES]
    for path, draw in zip(paths[:2], (_loss, _extrapolation), strict=True):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax, results)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    rows = results["rows"]
    device = rows[0]["device"] if rows else "?"
    for path, panels in (
        (paths[2], [("train_tokens_per_sec", 1.0, "training tokens/s"),
                    ("decode_tokens_per_sec", 1.0, "decode tokens/s")]),
        (paths[3], [("peak_train_bytes", 2.0**-20, "peak training memory (MiB; method per row)"),
                    ("peak_rss_growth_bytes", 2.0**-20, "RSS peak growth (MiB)"),
                    ("kv_cache_bytes_at_context", 2.0**-20, "KV cache at context (MiB)")]),
    ):  # fmt: skip
        size = (5.2 * len(panels), max(3.6, 1 + 0.4 * len(rows)))
        fig, axes = plt.subplots(1, len(panels), figsize=size)
        for ax, (field, scale, label) in zip(axes, panels, strict=True):
            _bars(ax, rows, results, field, scale, label)
        fig.suptitle(f"{device}, preset {results['preset']}; error bars: 95% t interval over "
                     "seeds (1 seed: range over timing rounds)", fontsize=8)  # fmt: skip
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return paths
