"""Statistics over seeds for `python -m benchmarks variants`.

Interval: the 95% Student-t interval of the mean, mean ± t_{0.975, n−1} · s / √n, with s the
sample standard deviation (n − 1 in the denominator); none with one seed.

Test: a row against Standard is a paired t-test across seeds on the per-seed differences
(row − Standard), n − 1 degrees of freedom, two-sided, α = 0.05. Paired rather than Welch's
because seed s gives every row the same batches in the same order and (interleaved timing) the
same timing window, so what the rows share in a seed cancels in the difference instead of
counting as noise. When every difference is equal (a deterministic metric such as XLA's
memory analysis) the test degenerates: p = 0 if the difference is non-zero, else 1.

The t distribution is scipy's (`scipy.stats.t`); t and p equal `scipy.stats.ttest_rel`'s
wherever the differences vary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import special, stats

ALPHA = 0.05
LEVEL = 0.95
INTERVAL = "95% Student-t interval of the mean over seeds: mean ± t(0.975, n−1)·s/√n"
TEST = ("paired t-test across seeds on per-seed differences (row − Standard), n−1 dof, "
        "two-sided, α = 0.05")  # fmt: skip


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (`scipy.special.betainc`)."""
    return float(special.betainc(a, b, x))


def t_cdf(t: float, dof: float) -> float:
    """P(T ≤ t) for Student's t with `dof` degrees of freedom."""
    return float(stats.t.cdf(t, dof))


def t_two_sided_p(t: float, dof: float) -> float:
    """P(|T| ≥ |t|) for Student's t with `dof` degrees of freedom."""
    return float(2.0 * stats.t.sf(abs(t), dof))  # the survival function keeps small p exact


def t_quantile(p: float, dof: float) -> float:
    """The t with P(T ≤ t) = p."""
    return float(stats.t.ppf(p, dof))


def summary(values: Sequence[float | None]) -> dict:
    """mean, sample std, the 95% t interval and its half-width, n and the raw values; std and
    interval None for one value, everything but `values` None when a value is missing."""
    vals = list(values)
    out = {"mean": None, "std": None, "ci95": None, "half_width": None, "n": len(vals),
           "values": vals}  # fmt: skip
    if not vals or any(v is None for v in vals):
        return out
    n = len(vals)
    mean = math.fsum(vals) / n
    out["mean"] = mean
    if n >= 2:
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
        half = t_quantile(0.5 + LEVEL / 2, n - 1) * std / math.sqrt(n)
        out.update(std=std, half_width=half, ci95=[mean - half, mean + half])
    return out


def paired_test(row: Sequence[float | None], base: Sequence[float | None]) -> dict:
    """`TEST` of `row` against `base` (same seeds, same order), with the per-seed ratio
    row / base summarised as `summary` does (`ratio`) and the verdict at α = 0.05."""
    if len(row) != len(base):
        raise ValueError(f"paired values need the same seeds, got {len(row)} and {len(base)}")
    out = {"diff": summary([]), "ratio": summary([]), "t": None, "dof": None, "p": None,
           "beyond_seed_noise": "n/a"}  # fmt: skip
    if not row or any(v is None for v in [*row, *base]):
        return out
    diffs = [r - b for r, b in zip(row, base, strict=True)]
    ratios = [r / b if b else None for r, b in zip(row, base, strict=True)]
    out.update(diff=summary(diffs), ratio=summary(ratios))
    n = len(diffs)
    if n < 2:
        return out
    mean, std = out["diff"]["mean"], out["diff"]["std"]
    if std == 0.0:  # every seed differs alike: no noise to test against (t is left None)
        t, p = None, 0.0 if mean else 1.0
    else:
        t = mean / (std / math.sqrt(n))
        p = t_two_sided_p(t, n - 1)
    out.update(t=t, dof=n - 1, p=p, beyond_seed_noise="yes" if p < ALPHA else "no")
    return out


# ------------------------------------------------------------------------- rows over seeds

# Measured per seed, summarised over seeds (a field missing from a record counts as None).
METRICS = ("val_ppl", "train_tokens_per_sec", "decode_tokens_per_sec", "peak_train_bytes",
           "peak_rss_growth_bytes", "mfu")  # fmt: skip
COMPARED = ("val_ppl", "train_tokens_per_sec", "decode_tokens_per_sec", "peak_train_bytes")
_PER_SEED = ("train_tokens_per_sec_rounds", "decode_tokens_per_sec_rounds", "load_avg_1m",
             "train_time_s", "train_tokens_per_sec_in_run", "steps", "train_loss_last")  # fmt: skip


def _curve(records: list[dict]) -> dict:
    """The validation curve's mean and min–max band over seeds, at the steps all share."""
    curves = [dict(map(tuple, r.get("val_curve") or [])) for r in records]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return {
        "val_curve": [[s, math.fsum(c[s] for c in curves) / len(curves)] for s in steps],
        "val_curve_band": [
            [s, min(c[s] for c in curves), max(c[s] for c in curves)] for s in steps
        ],
        "val_curve_seeds": [r.get("val_curve") or [] for r in records],
    }


def aggregate(records: list[dict]) -> dict:
    """One row from its per-seed records (same row, seeds in order): the first record's
    fixed fields; per metric M: M (the mean), M_std, M_ci95 and M_seeds (raw); `val_ppl_at`
    likewise per length; the curve's mean and band; the raw records as `runs`."""
    first = records[0]
    row = {k: v for k, v in first.items() if k not in (*METRICS, *_PER_SEED, "val_ppl_at",
                                                      "val_curve", "seed")}  # fmt: skip
    row["n_seeds"] = len(records)
    row["train_seeds"] = [r.get("train_seed") for r in records]
    row.pop("train_seed", None)
    for m in METRICS:
        s = summary([r.get(m) for r in records])
        row.update({m: s["mean"], f"{m}_std": s["std"], f"{m}_ci95": s["ci95"],
                    f"{m}_seeds": s["values"]})  # fmt: skip
    at = [r.get("val_ppl_at") or {} for r in records]
    keys = list(at[0])
    per_k = {k: summary([a.get(k) for a in at]) for k in keys}
    row["val_ppl_at"] = {k: s["mean"] for k, s in per_k.items()}
    row["val_ppl_at_ci95"] = {k: s["ci95"] for k, s in per_k.items()}
    row["val_ppl_at_seeds"] = {k: s["values"] for k, s in per_k.items()}
    row.update(_curve(records))
    for k in ("train_tokens_per_sec_rounds", "decode_tokens_per_sec_rounds"):
        row[k] = [r.get(k) or [] for r in records]
    row["runs"] = records
    return row


def compare_to_standard(rows: list[dict]) -> None:
    """Add `vs_standard` (per COMPARED metric, `paired_test` against the Standard JAX row of
    the same preset; torch peers: training tokens/s only; None for that row itself or
    without one) to every row."""
    for row in rows:
        std = next((r for r in rows if r["key"] == "standard" and r["preset"] == row["preset"]),
                   None)  # fmt: skip
        if std is None or row is std:
            row["vs_standard"] = None
            continue
        # A torch peer's memory is measured another way (RSS) and it is not evaluated.
        metrics = COMPARED if row["kind"] == "jax" else ("train_tokens_per_sec",)
        row["vs_standard"] = {m: paired_test(row[f"{m}_seeds"], std[f"{m}_seeds"])
                              for m in metrics}  # fmt: skip
