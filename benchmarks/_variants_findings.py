"""findings.md: each claim of the write-up, the experiment testing it, our result with its
95% interval and a one-word verdict computed from the numbers by the rules below.

A claim has parts; each part compares two rows of one preset (or one row at two lengths) by
the per-seed ratio, summarised by its 95% Student-t interval [lo, hi] over seeds:

- a claimed change by factor c (GQA memory 0.75×, window throughput 1.5×) is *confirmed* when
  the whole interval lies at or beyond half the claimed change, h = 1 + (c − 1) / 2 (0.875,
  1.25): at least half the effect is there; *refuted* when it lies wholly on the near side of
  h: less than half of it is there;
- "no worse" (negligible quality loss, not hurting accuracy: perplexity ratio ≤ 1.02;
  extrapolation: RoPE's perplexity with 2× windows ≤ 1.10 × its own with 1×, since learned
  positions cannot be evaluated past their table at all) is *confirmed* when hi ≤ the bound and
  *refuted* when lo > the bound;
- otherwise, or with one seed (no interval), or when no run can test the part, the part is
  *not visible at this scale*. Quality parts need a run past early learning: Standard's
  validation loss ln(ppl) at least 0.5 nats under the unigram baseline. The window claim is
  about long contexts: it needs seq_len ≥ 2048.

A claim is refuted when a part is refuted, confirmed when every part is, else not visible at
this scale. Where several runs can test a part, a memory or throughput part uses the one with
the longest seq_len (then the most seeds), where attention weighs most; a quality part the one
with the most seeds (then the longest seq_len).
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks._variants_stats import summary

EARLY_MARGIN = 0.5  # nats under the unigram baseline that count as past early learning
LONG_CONTEXT = 2048

# part: (label, row pairs tried in order, metric, kind, value, requirement)
GQA_PAIRS = (("rope_gqa", "rope"), ("gqa", "standard"))
WINDOW_PAIRS = (("swa", "standard"), ("rope_gqa_swa", "rope_gqa"))
CLAIMS = (
    ("GQA cuts memory by 25% with negligible quality loss", (
        ("peak training memory", GQA_PAIRS, "peak_train_bytes", "change", 0.75, None),
        ("validation perplexity", GQA_PAIRS, "val_ppl", "at_most", 1.02, "learned"),
    )),
    ("The sliding window raises throughput by 50% on long contexts", (
        ("training tokens/s", WINDOW_PAIRS, "train_tokens_per_sec", "change", 1.5, "long"),
    )),
    ("RoPE improves length extrapolation without hurting accuracy", (
        ("perplexity at 2× / 1× the training length", (("rope", "rope"),), "2x/1x", "at_most",
         1.10, "learned"),
        ("validation perplexity", (("rope", "standard"),), "val_ppl", "at_most", 1.02,
         "learned"),
    )),
)  # fmt: skip


def _past_early(rows: list[dict]) -> tuple[bool, str]:
    std = next((r for r in rows if r["key"] == "standard"), None)
    if not std or not std.get("val_ppl") or not std.get("unigram_baseline_loss"):
        return False, "no Standard row with a perplexity and a unigram baseline"
    loss, base = math.log(std["val_ppl"]), std["unigram_baseline_loss"]
    ok = loss <= base - EARLY_MARGIN
    word = "past" if ok else "still in"
    return ok, (f"Standard's val loss {loss:.2f} vs unigram baseline {base:.2f}: {word} early "
                f"learning (needs ≤ {base - EARLY_MARGIN:.2f})")  # fmt: skip


def _candidates(results: list[dict], pairs, need: str | None) -> tuple[list, list[str]]:
    """(run settings, rows of its preset, row, base) that can test a part; why others cannot."""
    found, why = [], []
    for res in results:
        for s in res["settings"]:
            rows = [r for r in res["rows"] if r["preset"] == s["preset"] and r["kind"] == "jax"]
            by_key = {r["key"]: r for r in rows}
            pair = next((p for p in pairs if p[0] in by_key and p[1] in by_key), None)
            if pair is None:
                wanted = " or ".join(" & ".join(dict.fromkeys(p)) for p in pairs)
                why.append(f"{s['preset']}: no rows {wanted}")
                continue
            if need == "long" and s["seq_len"] < LONG_CONTEXT:
                why.append(f"{s['preset']}: seq_len {s['seq_len']} < {LONG_CONTEXT}, not a long "
                           "context")  # fmt: skip
                continue
            if need == "learned":
                ok, text = _past_early(rows)
                if not ok:
                    why.append(f"{s['preset']}: {text}")
                    continue
            found.append((s, by_key[pair[0]], by_key[pair[1]]))
    return found, why


def _ratios(metric: str, row: dict, base: dict) -> dict:
    if metric == "2x/1x":
        at = row.get("val_ppl_at_seeds") or {}
        pairs = zip(at.get("2x") or [], at.get("1x") or [], strict=False)
    else:
        pairs = zip(row.get(f"{metric}_seeds") or [], base.get(f"{metric}_seeds") or [],
                    strict=False)  # fmt: skip
    return summary([a / b if a is not None and b else None for a, b in pairs])


def judge(kind: str, value: float, ci: list[float] | None) -> tuple[str, str]:
    """A part's verdict and rule from the ratio's 95% interval (see the module doc)."""
    if ci is None:
        return "not visible", "one seed: no interval"
    lo, hi = ci
    if kind == "at_most":
        if hi <= value:
            return "confirmed", f"the interval lies at or under {value:g}"
        if lo > value:
            return "refuted", f"the interval lies above {value:g}"
        return "not visible", f"the interval straddles {value:g}"
    h = 1 + (value - 1) / 2
    beyond, near = (hi <= h, lo > h) if value < 1 else (lo >= h, hi < h)
    if beyond:
        return "confirmed", f"the interval lies beyond {h:g}, half the claimed {value:g}×"
    if near:
        return "refuted", f"the interval lies short of {h:g}, half the claimed {value:g}×"
    return "not visible", f"the interval straddles {h:g}, half the claimed {value:g}×"


def _fmt(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    if s["ci95"] is None:
        return f"{s['mean']:.3f}× (1 seed)"
    lo, hi = s["ci95"]
    return f"{s['mean']:.3f}× [{lo:.3f}, {hi:.3f}] ({s['n']} seeds)"


def check_part(results: list[dict], part) -> dict:
    """One part's experiment, result and verdict."""
    label, pairs, metric, kind, value, need = part
    found, why = _candidates(results, pairs, need)
    cost = metric in ("peak_train_bytes", "train_tokens_per_sec")
    found.sort(key=lambda c: (c[0]["seq_len"], c[0]["seeds"])[:: 1 if cost else -1], reverse=True)
    if not found:
        return {"label": label, "experiment": "none possible", "result": "–",
                "verdict": "not visible", "rule": "; ".join(why) or "no run"}  # fmt: skip
    s, row, base = found[0]
    ratio = _ratios(metric, row, base)
    verdict, rule = judge(kind, value, ratio["ci95"])
    what = f"{row['name']} at 2× / 1×" if metric == "2x/1x" else f"{row['name']} / {base['name']}"
    exp = (f"{label}, {what}, preset {s['preset']} (T {s['seq_len']}, {s['steps']} steps, "
           f"{s['seeds']} seeds)")  # fmt: skip
    return {"label": label, "experiment": exp, "result": _fmt(ratio), "ratio": ratio,
            "verdict": verdict, "rule": rule}  # fmt: skip


def findings(results: list[dict]) -> list[dict]:
    """Every claim with its parts tested and its verdict."""
    out = []
    for claim, parts in CLAIMS:
        tested = [check_part(results, p) for p in parts]
        words = [t["verdict"] for t in tested]
        verdict = (
            "refuted"
            if "refuted" in words
            else "confirmed"
            if all(w == "confirmed" for w in words)
            else "not visible"
        )
        out.append({"claim": claim, "parts": tested, "verdict": verdict})
    return out


VERDICT_TEXT = {"confirmed": "confirmed", "refuted": "refuted",
                "not visible": "not visible at this scale"}  # fmt: skip


def write_findings(results: list[dict], out: Path) -> Path:
    """Write out/findings.md for the results of one or more runs; returns its path."""
    lines = ["# Findings: the write-up's claims, tested", ""]
    for res in results:
        for s in res["settings"]:
            dev = next((r["device"] for r in res["rows"] if r["preset"] == s["preset"]), "?")
            m = s["model"]
            lines.append(f"- preset `{s['preset']}`: {m['n_layer']} layers × {m['n_embd']}, "
                         f"T {s['seq_len']}, window {s['window']}, {s['steps']} steps, "
                         f"{s['seeds']} seed(s), rows {', '.join(s['rows'])}; {dev}")  # fmt: skip
    lines += ["", f"Interval: {results[0]['interval']}. Ratios are per seed, then summarised.",
              "", "| Claim | Experiment | Our result (ratio, 95% interval) | Part: rule | "
              "Verdict |", "|---|---|---|---|---|"]  # fmt: skip
    for f in findings(results):
        for i, p in enumerate(f["parts"]):
            claim = f["claim"] if i == 0 else "″"
            word = f"**{VERDICT_TEXT[f['verdict']]}**" if i == 0 else ""
            lines.append(f"| {claim} | {p['experiment']} | {p['result']} | {p['verdict']}: "
                         f"{p['rule']} | {word} |")  # fmt: skip
    rules = (__doc__ or "").split("\n\n", 1)[1].strip()
    lines += ["", "## Rules", "", rules, ""]
    path = out / "findings.md"
    path.write_text("\n".join(lines))
    return path
