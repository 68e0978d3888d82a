"""The variant study: Standard GPT-2, + RoPE, + GQA, + sliding window, + MoE, trained over
seeds and measured, with each claim of the write-up tested where the preset can test it.

    python -m benchmarks variants --preset tiny|cpu|quality|long|gpu|gpu-long [--seeds N]
        [--out DIR] [--rows ...] [--peers ...] [--rounds N] [--round-steps N]
        [--work-dir DIR] [--json] [section.key=value ...]
    python -m benchmarks variants --combine DIR[,DIR...] [--out DIR]

Every row trains with `gpt2_jax.train.train` on the built-in Shakespeare plays for the same
number of tokens; `--seeds N` trains each row N times, seed s with train.seed = the preset's
+ s, which changes the initialisation and the batch order alike for every row (in a seed, all
rows see the same batches in the same order). The rows (`_variants_presets`) add, in turn,
RoPE; GQA with n_kv_head = n_head / 4; a sliding window (w = seq_len / 4, or the preset's);
`gqa`, `swa` and `moe` change one thing alone. Per row and seed: parameters (total and
active), peak training memory, training tokens/s, KV-cache bytes per token, greedy decode
tokens/s over positions [seq_len − n, seq_len), validation perplexity (`gpt2_jax.evaluate`)
with windows of 1, 2, 4 and 8 × seq_len over the same tokens (`val_ppl_at`; learned positions
end at max_seq_len, so their 2–8× are null).

Each row runs in its own process (`_variants_rows`, which also documents the memory methods).
Throughput is timed after training, in alternating rounds over a seed's rows while they all
wait in memory, so that load from other processes falls on the rows alike; `sequential`
presets (long, GPU) time each row right after its training and free it, alternating the row
order between seeds. Peers timed in the same rounds: the Standard config trained on the same
batches by `transformers.GPT2LMHeadModel` (`hf`) and `gpt2_torch_ref.model.GPT` (`ref`, CPU).

Over seeds (`_variants_stats`): mean, sample std, 95% Student-t interval and the raw values
per metric; each row against Standard by a paired t-test across seeds. `--combine` reads
earlier results' variants.json and writes only the findings.

Writes DIR/variants.json, DIR/variants.md (the tables), DIR/findings.md (each claim, its
experiment, our result and a verdict: `_variants_findings`) and DIR/variants_{val_loss,
extrapolation,throughput,memory}.png, where DIR is `--out` or else a new folder
bench_out/variants-<YYYYmmdd-HHMMSS>/ named on stderr. While it runs, DIR/variants.partial.json
holds the raw records of every finished seed (removed once variants.json is written), so an
interrupted study keeps them; a new study refuses an --out that still holds one.

Training runs go to WORK/runs/<preset>/<row>-seed<s> and the tokenised data to WORK/data,
WORK being `--work-dir` or else a temporary directory. A `--work-dir` where any of those
folders already holds files is refused before any work: a study never resumes, mixes with or
overwrites runs it did not create.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import child_env
from benchmarks._flags import name_list
from benchmarks._out import check_work_dir, fresh_out_dir
from benchmarks._variants_findings import write_findings
from benchmarks._variants_plots import plots
from benchmarks._variants_presets import (
    MULTIPLES,
    PEERS,
    PRESETS,
    ROWS,
    estimate_s,
    preset_chain,
    row_config,
    say,
)
from benchmarks._variants_report import markdown
from benchmarks._variants_stats import INTERVAL, TEST, aggregate, compare_to_standard
from gpt2_jax.config import config_from_dict, to_dict
from gpt2_jax.errors import ArgParser, UserError, cli_main


def _build_parser() -> ArgParser:
    p = ArgParser(
        prog="python -m benchmarks variants",
        description="Train and measure the GPT-2 variants side by side, over seeds.",
    )
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="; ".join(f"{k}: {v.what}, {v.seeds} seed(s)" for k, v in PRESETS.items()),
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="train every row this many times, seeds 0..N-1 (default: preset's)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="where the results go (default: a new folder bench_out/variants-<time>/)",
    )
    p.add_argument(
        "--rows",
        default=None,
        help=f"comma-separated subset of {','.join(ROWS)} (default: preset's)",
    )
    p.add_argument("--peers", default=None, help="torch peers: hf,ref or none (default: preset's)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default: preset's)")
    p.add_argument(
        "--round-steps",
        type=int,
        default=None,
        help="training steps per row per timing round (default: preset's)",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="keep the training runs here: a new or empty folder (default: a temporary dir)",
    )
    p.add_argument("--json", action="store_true", help="print variants.json instead of the table")
    p.add_argument(
        "--combine",
        default=None,
        metavar="DIR[,DIR...]",
        help="write findings.md from earlier results' variants.json; trains nothing",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides applied to every row after the preset",
    )
    p.set_defaults(partial=None)  # main: where finished seeds are kept while a study runs
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    a = _build_parser().parse_args(argv)
    if a.combine is not None:
        a.combine = [Path(x) for x in a.combine.split(",") if x.strip()]
        if not a.combine or a.preset:
            raise UserError("--combine takes result folders, e.g. --combine DIR1,DIR2, and no "
                            "--preset")  # fmt: skip
        return a
    if a.preset is None:
        raise UserError("--preset is required (or --combine DIR,...); e.g. --preset cpu")
    pre = PRESETS[a.preset]
    if a.seeds is not None and a.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {a.seeds}")
    a.rows = name_list(a.rows, ROWS, "--rows") if a.rows is not None else None
    if a.rows == []:
        raise UserError("--rows is empty; name at least one row, e.g. --rows standard,rope")
    a.peers = name_list(a.peers, PEERS, "--peers") if a.peers else list(pre.peers)
    if pre.gpu and "ref" in a.peers:
        raise UserError("the ref peer (gpt2_torch_ref) runs on CPU only; use --peers hf or none")
    for flag in ("rounds", "round_steps"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            raise UserError("--rounds and --round-steps must be at least 1")
    return a


class RowProcess:
    """A row's own process: trains and measures on start, then answers timing commands."""

    def __init__(self, spec: dict, work: Path, index: str):
        self.spec, self.name = spec, spec["name"]
        steps = spec["config"]["train"]["max_steps"]
        doing = f"training {steps} steps" if spec["kind"] == "jax" else "warming up"
        say(f"[{index}] {self.name}: {doing}")
        path = work / f"{spec['preset']}-{spec['key']}-seed{spec['seed']}.spec.json"
        path.write_text(json.dumps(spec))
        env = child_env()
        if spec["kind"] != "jax":  # torch may own the GPU; jax (the lr schedule) stays on CPU
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, "-m", "benchmarks._variants_rows", str(path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip
        self.record: dict = {}
        self.train_s: list[float] = []
        self.decode_s: list[float] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise UserError(f"row {self.name!r} failed (exit {self.proc.wait()}); its output "
                            "is above")  # fmt: skip
        return json.loads(line)

    def _ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def wait_ready(self) -> None:
        """Wait for the row's first reply (once: later calls return at once)."""
        if not self.record:
            self.record = self._read()["ready"]

    def time_round(self, steps: int) -> None:
        self.train_s.append(self._ask(cmd="train", steps=steps)["seconds"])
        if self.spec["kind"] == "jax":
            self.decode_s.append(self._ask(cmd="decode")["seconds"])

    def finish(self, round_steps: int) -> dict:
        """This seed's record of the row, with the timings over rounds; the process exits."""
        from benchmarks._variants_rows import mfu

        final = self._ask(cmd="quit")["final"]
        self.proc.wait()
        s, t = self.spec, self.spec["config"]["train"]
        train = [round_steps * t["batch_size"] * t["seq_len"] / x for x in self.train_s]
        decode = [s["decode_batch"] * (s["decode_new"] - 1) / x for x in self.decode_s]
        rec = {"name": s["name"], "key": s["key"], "kind": s["kind"], "preset": s["preset"],
               "seq_len": t["seq_len"], "seed": s["seed"], "train_seed": t["seed"],
               **self.record, **final}  # fmt: skip
        rec["train_tokens_per_sec"] = statistics.median(train)
        rec["train_tokens_per_sec_rounds"] = train
        rec["decode_tokens_per_sec"] = statistics.median(decode) if decode else None
        rec["decode_tokens_per_sec_rounds"] = decode
        cfg = config_from_dict(s["config"])
        rec["mfu"] = mfu(cfg, rec["params_no_pos"], rec["train_tokens_per_sec"], rec["device"])
        try:
            rec["load_avg_1m"] = round(os.getloadavg()[0], 2)
        except OSError:
            rec["load_avg_1m"] = None
        return rec

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _timing_rounds(procs: list[RowProcess], rounds: int, steps: int) -> None:
    for r in range(rounds):
        for proc in procs:
            proc.time_round(steps)
        say(f"timing round {r + 1}/{rounds}: " + ", ".join(
            f"{p.name} {p.train_s[-1] / steps:.2f} s/step" for p in procs))  # fmt: skip


def run_seed(specs: list[dict], name: str, a: argparse.Namespace, work: Path) -> list[dict]:
    """Train, time and finish every spec of one seed; records in the order of `specs`."""
    p = PRESETS[name]
    rounds = a.rounds or p.rounds
    steps = a.round_steps or p.round_steps
    alone = p.sequential or p.gpu
    order = specs if specs[0]["seed"] % 2 == 0 or not alone else specs[::-1]
    procs: list[RowProcess] = []
    done: dict[int, dict] = {}
    try:
        for i, spec in enumerate(order):
            procs.append(RowProcess(spec, work, f"{name} seed {spec['seed']}: {i + 1}/"
                                    f"{len(order)}"))  # fmt: skip
            if alone:  # alone on the machine: time it now, then free the memory
                procs[-1].wait_ready()
                _timing_rounds(procs[-1:], rounds, steps)
                done[id(spec)] = procs[-1].finish(steps)
            elif not p.parallel:
                procs[-1].wait_ready()
        if not alone:
            for proc in procs:
                proc.wait_ready()
            _timing_rounds(procs, rounds, steps)
            done = {id(proc.spec): proc.finish(steps) for proc in procs}
    finally:
        for proc in procs:
            proc.kill()
    return [done[id(spec)] for spec in specs]


def _check_device(name: str) -> None:
    if not PRESETS[name].gpu:
        return
    # Asked in a throwaway process: a GPU backend here would hold device memory.
    probe = [sys.executable, "-c", "import jax; print(jax.default_backend())"]
    backend = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
    if backend != "gpu":
        raise UserError(f"--preset {name} needs a GPU; jax sees {backend or 'nothing'}; use "
                        "--preset cpu")  # fmt: skip


def _specs(name: str, keys: list[str], peers: list[str], a, work: Path, seed: int) -> list:
    """The process specs of preset `name` for one seed: its rows, then the torch peers."""
    p = PRESETS[name]
    std = row_config(name, "standard", a.overrides, work, seed)  # what the peers train
    shared = dict(eval_tokens=p.eval_tokens, eval_batch=p.eval_batch, decode_new=p.decode_new,
                  decode_context=std.train.seq_len, decode_batch=p.decode_batch, gpu=p.gpu,
                  cache_dir=str(work / "jax_cache"), preset=name, seed=seed)  # fmt: skip
    specs = [
        dict(
            shared,
            kind="jax",
            key=k,
            name=ROWS[k][0],
            config=to_dict(row_config(name, k, a.overrides, work, seed)),
        )
        for k in keys
    ]
    specs += [dict(shared, kind=k, key=k, name=PEERS[k], config=to_dict(std)) for k in peers]
    return specs


def _settings(name: str, keys: list[str], peers: list[str], a, work: Path) -> dict:
    """The preset's settings as recorded, with its budget and this run's estimate."""
    p = PRESETS[name]
    cfgs = [row_config(name, k, a.overrides, work) for k in keys]
    std = row_config(name, "standard", a.overrides, work)
    t, seeds = std.train, a.seeds or p.seeds
    if p.decode_new >= t.seq_len:
        raise UserError(f"train.seq_len={t.seq_len} must exceed the {p.decode_new} decoded tokens")
    est = estimate_s(p, cfgs, std, seeds, len(peers))
    return {
        "preset": name, "what": p.what, "seeds": seeds, "rows": keys, "peers": peers,
        "model": {k: getattr(std.model, k) for k in ("n_layer", "n_head", "n_embd", "dtype")},
        "seq_len": t.seq_len, "batch_size": t.batch_size, "steps": t.max_steps,
        "tokens_per_row": t.max_steps * t.batch_size * t.seq_len, "lr": t.lr,
        "window": p.window or t.seq_len // 4, "eval_tokens": p.eval_tokens,
        "extrapolation": [f"{k}x" for k in MULTIPLES], "decode_context": t.seq_len,
        "decode_new": p.decode_new, "decode_batch": p.decode_batch,
        "rounds": a.rounds or p.rounds, "round_steps": a.round_steps or p.round_steps,
        "interleaved": not (p.sequential or p.gpu), "parallel": p.parallel,
        "budget": {"stated_min": p.budget_min,
                   "estimate_min": None if est is None else round(est / 60, 1)},
        "overrides": list(a.overrides),
    }  # fmt: skip


def run_preset(settings: dict, a, work: Path) -> list[dict]:
    """Every seed of one preset (`_settings`): the aggregated rows; adds the elapsed time."""
    from gpt2_jax.data import prepare_source

    name, keys, peers = settings["preset"], settings["rows"], settings["peers"]
    b = settings["budget"]
    say(f"{name}: {settings['seeds']} seed(s) × {len(keys)} rows; budget "
        f"{b['stated_min'] or '–'} min, estimate {b['estimate_min'] or '–'} min")  # fmt: skip
    std = row_config(name, "standard", a.overrides, work)
    if "moe" in keys:
        moe = row_config(name, "moe", a.overrides, work).model
        say(f"moe row: {moe.n_layer} layers, {moe.n_moe_layers} routed (8 experts, top-2): "
            f"{12 * moe.n_layer + 8 * moe.n_moe_layers}·D² active block weights, as Standard's "
            f"{std.model.n_layer} dense layers ({12 * std.model.n_layer}·D²)")  # fmt: skip
    say(f"preparing {std.data.source} in {std.data.prepared_dir}")
    prepare_source(std.data, Path(std.data.prepared_dir), show_progress=False,
                   seq_len=MULTIPLES[-1] * std.train.seq_len + 1)  # fmt: skip
    t0 = time.perf_counter()
    per_seed = []
    for s in range(settings["seeds"]):
        per_seed.append(run_seed(_specs(name, keys, peers, a, work, s), name, a, work))
        _save_partial(a, settings, per_seed)
    settings["budget"]["elapsed_min"] = round((time.perf_counter() - t0) / 60, 1)
    return [aggregate([records[i] for records in per_seed]) for i in range(len(per_seed[0]))]


def _save_partial(a: argparse.Namespace, settings: dict, per_seed: list[list[dict]]) -> None:
    """Keep every finished seed's raw records in `a.partial` (if set), so that a crash or an
    interrupt hours into a study loses only the seed in progress."""
    path = a.partial
    if path is None:
        return
    done = json.loads(path.read_text()) if path.exists() else {}
    done[settings["preset"]] = {"settings": settings, "seeds": per_seed}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(done, indent=1) + "\n")
    tmp.replace(path)


def _work_configs(a: argparse.Namespace, work: Path) -> list:
    """Every row config the study trains into `work`: each preset of the chain, row and seed."""
    return [row_config(name, k, a.overrides, work, s) for name in preset_chain(a.preset)
            for k in a.rows or PRESETS[name].rows
            for s in range(a.seeds or PRESETS[name].seeds)]  # fmt: skip


def run_all(a: argparse.Namespace, work: Path) -> dict:
    """The results object: every preset of the chain (all checked before any trains), rows
    compared within their preset."""
    settings = []
    for i, name in enumerate(preset_chain(a.preset)):
        _check_device(name)
        keys = a.rows or list(PRESETS[name].rows)
        settings.append(_settings(name, keys, a.peers if i == 0 else [], a, work))
    rows = [row for s in settings for row in run_preset(s, a, work)]
    compare_to_standard(rows)
    return {"preset": a.preset, "seeds": settings[0]["seeds"], "interval": INTERVAL,
            "test": TEST, "settings": settings, "rows": rows}  # fmt: skip


def _combine(a: argparse.Namespace) -> int:
    results = []
    for d in a.combine:
        try:
            results.append(json.loads((d / "variants.json").read_text()))
        except (OSError, ValueError) as e:
            raise UserError(f"--combine {d}: no readable variants.json ({e})") from None
        if not isinstance(results[-1], dict) or "rows" not in results[-1]:
            raise UserError(f"--combine {d}: variants.json predates seeds (no 'rows')")
    out = Path(a.out) if a.out else fresh_out_dir("variants")
    out.mkdir(parents=True, exist_ok=True)
    path = write_findings(results, out)
    say(f"wrote {path}")
    print(path.read_text())
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.combine is not None:
        return _combine(a)
    if a.work_dir:
        check_work_dir(Path(a.work_dir), _work_configs(a, Path(a.work_dir)))
    out = Path(a.out) if a.out else fresh_out_dir("variants")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {str(out)!r} cannot be created ({e.strerror})") from None
    t0 = time.perf_counter()
    a.partial = out / "variants.partial.json"
    if a.partial.exists():  # an interrupted study's seeds: never overwrite them
        raise UserError(f"{a.partial} holds the seeds of an interrupted study; move it away "
                        "or pass another --out")  # fmt: skip
    if a.work_dir:
        Path(a.work_dir).mkdir(parents=True, exist_ok=True)
        results = run_all(a, Path(a.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="gpt2_jax_variants_") as tmp:
            results = run_all(a, Path(tmp))
    results["elapsed_min"] = round((time.perf_counter() - t0) / 60, 1)
    (out / "variants.json").write_text(json.dumps(results, indent=1) + "\n")
    a.partial.unlink()
    table = markdown(results)
    (out / "variants.md").write_text(table)
    for path in [*plots(results, out), write_findings([results], out)]:
        say(f"wrote {path}")
    say(f"wrote {out / 'variants.json'} and {out / 'variants.md'}; {results['elapsed_min']} min")
    print(json.dumps(results, indent=1) if a.json else table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
