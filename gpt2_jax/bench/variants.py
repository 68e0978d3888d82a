"""The variant table: Standard GPT-2, + RoPE, + GQA, + sliding window, trained and measured.

    python -m gpt2_jax.bench variants --preset cpu|gpu [--out DIR] [--rows ...] [--peers ...]
        [--rounds N] [--round-steps N] [--work-dir DIR] [--json] [section.key=value ...]

Every row trains with `gpt2_jax.train.train` on the built-in Shakespeare plays, from the same
seed, on the same batches in the same order, for the same number of tokens. The rows add, in
turn, RoPE; GQA with n_kv_head = n_head / 4; a sliding window w = seq_len / 4 (`gqa` and `swa`
change one thing alone). Per row: parameters, peak training memory, training tokens/s, KV-cache
bytes per token, greedy decode tokens/s over positions [seq_len − n, seq_len), validation
perplexity (`gpt2_jax.evaluate`, windows of seq_len) and, for RoPE rows, with windows of
2·seq_len.

Each row runs in its own process (`_variants_rows`, which also documents the memory methods).
Throughput is timed after training, in alternating rounds over all rows while every row's
process waits in memory, so that load from other processes falls on the rows alike (on a GPU,
which is not shared, each row is timed right after its training and exits, freeing the device).
Peers timed in the same rounds: the Standard config trained on the same batches by
`transformers.GPT2LMHeadModel` (`hf`) and by `gpt2_torch_ref.model.GPT` (`ref`, CPU only).

Writes DIR/variants.json (one object per row), DIR/variants.md and
DIR/variants_{val_loss,throughput,memory}.png, where DIR is `--out` or else a new folder
bench_out/variants-<YYYYmmdd-HHMMSS>/ named on stderr (the committed docs/bench/variants changes
only when passed as `--out`); training runs go to a temporary directory.
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
from dataclasses import dataclass
from pathlib import Path

from gpt2_jax.bench._flags import name_list
from gpt2_jax.bench._out import fresh_out_dir
from gpt2_jax.bench._variants_report import markdown, plots
from gpt2_jax.config import Config, config_from_dict, load_config, to_dict
from gpt2_jax.errors import ArgParser, UserError, cli_main

ROWS = {  # key → (name, model changes; "kv" = n_head / 4, "w" = seq_len / 4)
    "standard": ("Standard GPT-2", {}),
    "rope": ("+ RoPE", {"pos_embedding": "rope"}),
    "rope_gqa": ("+ RoPE + GQA", {"pos_embedding": "rope", "n_kv_head": "kv"}),
    "rope_gqa_swa": ("+ RoPE + GQA + window",
                     {"pos_embedding": "rope", "n_kv_head": "kv", "attention_window": "w"}),
    "gqa": ("GQA alone", {"n_kv_head": "kv"}),
    "swa": ("window alone", {"attention_window": "w"}),
}  # fmt: skip
DEFAULT_ROWS = ("standard", "rope", "rope_gqa", "rope_gqa_swa")
PEERS = {"hf": "Standard (torch, transformers)", "ref": "Standard (torch, gpt2_torch_ref)"}


@dataclass(frozen=True)
class Preset:
    overrides: tuple[str, ...]  # section.key=value for every row
    config_files: dict[str, str]  # row key → configs/ file (absent: built-in defaults)
    eval_tokens: int | None  # val tokens scored (None = all)
    eval_batch: int
    decode_new: int  # tokens decoded, ending at position seq_len
    decode_batch: int
    peers: tuple[str, ...]
    rounds: int  # timing rounds
    round_steps: int  # training steps per row per round
    gpu: bool = False  # rows one at a time, each timed at once and then gone
    parallel: bool = False  # train all rows at once (tests only: timings are then meaningless)


def _overrides(text: str) -> tuple[str, ...]:
    common = (
        "data.source=shakespeare train.seed=0 train.sample_every=0 train.grad_accum=1 "
        "model.dropout=0.0 checkpoint.every=0 checkpoint.keep=1 wandb.mode=disabled "
    )
    return tuple((common + text).split())


PRESETS = {
    # ≈ 15 min on an idle 2-core CPU. The 50257-way softmax dominates a model this small, so
    # width and depth cost little next to it; 50 steps are ≈ 6% of an epoch.
    "cpu": Preset(
        overrides=_overrides(
            "model.n_layer=4 model.n_head=8 model.n_embd=128 model.max_seq_len=256 "
            "model.dtype=float32 train.seq_len=256 train.batch_size=8 train.max_steps=50 "
            "train.warmup_steps=5 train.lr=3e-3 train.min_lr=3e-4 train.eval_every=10 "
            "train.eval_steps=2 train.log_every=5"
        ),
        config_files={},
        eval_tokens=16384,
        eval_batch=8,
        decode_new=64,
        decode_batch=1,
        peers=("hf", "ref"),
        rounds=3,
        round_steps=5,
    ),  # fmt: skip
    # The 124M configs at seq_len 1024 in bf16 on one GPU (≈ 20 min on an H100, estimated: not
    # yet run). Shakespeare has 1.65M training tokens: 120 steps of 32k tokens ≈ 2.4 epochs.
    "gpu": Preset(
        overrides=_overrides(
            "model.dtype=bfloat16 train.seq_len=1024 train.batch_size=32 train.remat=none "
            "train.max_steps=120 train.warmup_steps=12 train.eval_every=20 train.eval_steps=10 "
            "train.log_every=10"
        ),
        config_files={
            "standard": "gpt2-124m",
            "rope": "gpt2-124m-rope",
            "rope_gqa": "gpt2-124m-gqa",
            "rope_gqa_swa": "gpt2-124m-swa",
            "gqa": "gpt2-124m",
            "swa": "gpt2-124m",
        },
        eval_tokens=None,
        eval_batch=8,
        decode_new=256,
        decode_batch=8,
        peers=("hf",),
        rounds=3,
        round_steps=10,
        gpu=True,
    ),  # fmt: skip
    # Seconds of training, for the tests.
    "smoke": Preset(
        overrides=_overrides(
            "model.n_layer=1 model.n_head=4 model.n_embd=32 model.max_seq_len=32 "
            "model.dtype=float32 train.seq_len=32 train.batch_size=4 train.max_steps=6 "
            "train.warmup_steps=1 train.eval_every=3 train.eval_steps=1 train.log_every=2 "
            "checkpoint.async_save=false"
        ),
        config_files={},
        eval_tokens=512,
        eval_batch=4,
        decode_new=4,
        decode_batch=1,
        peers=("ref",),
        rounds=2,
        round_steps=1,
        parallel=True,
    ),  # fmt: skip
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgParser(prog="python -m gpt2_jax.bench variants",
                  description="Train and measure the GPT-2 variants side by side.")  # fmt: skip
    p.add_argument(
        "--preset",
        required=True,
        choices=sorted(PRESETS),
        help="cpu (≈15 min, 2 cores), gpu (124M, bf16, one GPU) or smoke (tests)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="where the results go (default: a new folder bench_out/variants-<time>/)",
    )
    p.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated subset of {','.join(ROWS)}"
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
        help="keep the training runs here (default: a temporary directory, deleted at the end)",
    )
    p.add_argument("--json", action="store_true", help="print variants.json instead of the table")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides applied to every row after the preset")  # fmt: skip
    a = p.parse_args(argv)
    a.preset_cfg = pre = PRESETS[a.preset]
    a.rows = name_list(a.rows, ROWS, "--rows")
    if not a.rows:
        raise UserError("--rows is empty; name at least one row, e.g. --rows standard,rope")
    a.peers = name_list(a.peers, PEERS, "--peers") if a.peers else list(pre.peers)
    if pre.gpu and "ref" in a.peers:
        raise UserError("the ref peer (gpt2_torch_ref) runs on CPU only; use --peers hf or none")
    a.rounds = pre.rounds if a.rounds is None else a.rounds
    a.round_steps = pre.round_steps if a.round_steps is None else a.round_steps
    if a.rounds < 1 or a.round_steps < 1:
        raise UserError("--rounds and --round-steps must be at least 1")
    return a


def row_config(preset: Preset, key: str, extra: list[str], work: Path) -> Config:
    """The config row `key` trains: preset (and its configs/ file), overrides, the change."""
    from gpt2_jax.train import resolve_config_path

    file = preset.config_files.get(key)
    path = resolve_config_path(file) if file else None
    base = load_config(path, [*preset.overrides, *extra])
    m, t = base.model, base.train
    if m.n_head % 4 or t.seq_len % 4:
        raise UserError(f"GQA and window rows need n_head and seq_len divisible by 4, got "
                        f"n_head={m.n_head}, seq_len={t.seq_len}")  # fmt: skip
    sizes = {"kv": m.n_head // 4, "w": t.seq_len // 4}
    change = [f"model.{k}={sizes.get(v, v)}" for k, v in ROWS.get(key, ("", {}))[1].items()]
    change.append(f"train.out_dir={work / 'runs' / key}")
    if base.data.prepared_dir is None:  # one tokenisation for all rows
        change.append(f"data.prepared_dir={work / 'data'}")
    return load_config(path, [*preset.overrides, *extra, *change])


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RowProcess:
    """A row's own process: trains and measures on start, then answers timing commands."""

    def __init__(self, spec: dict, work: Path, index: str):
        self.spec, self.name = spec, spec["name"]
        steps = spec["config"]["train"]["max_steps"]
        doing = f"training {steps} steps" if spec["kind"] == "jax" else "warming up"
        _say(f"[{index}] {self.name}: {doing}")
        path = work / f"{spec['key']}.spec.json"
        path.write_text(json.dumps(spec))
        env = dict(os.environ)
        if spec["kind"] != "jax":  # torch may own the GPU; jax (the lr schedule) stays on CPU
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, "-m", "gpt2_jax.bench._variants_rows", str(path)]
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
        """The row's record, with the timings over rounds; the process exits."""
        from gpt2_jax.bench._variants_rows import mfu

        final = self._ask(cmd="quit")["final"]
        self.proc.wait()
        s, t = self.spec, self.spec["config"]["train"]
        train = [round_steps * t["batch_size"] * t["seq_len"] / x for x in self.train_s]
        decode = [s["decode_batch"] * (s["decode_new"] - 1) / x for x in self.decode_s]
        rec = {"name": self.name, "key": s["key"], "kind": s["kind"], **self.record, **final}
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


def _timing_rounds(procs: list[RowProcess], a: argparse.Namespace) -> None:
    for r in range(a.rounds):
        for proc in procs:
            proc.time_round(a.round_steps)
        _say(f"timing round {r + 1}/{a.rounds}: " + ", ".join(
            f"{p.name} {p.train_s[-1] / a.round_steps:.2f} s/step" for p in procs))  # fmt: skip


def run_all(a: argparse.Namespace, work: Path) -> tuple[list[dict], dict]:
    from gpt2_jax.data import prepare_source

    p = a.preset_cfg
    cfgs = {key: row_config(p, key, a.overrides, work) for key in a.rows}
    std = row_config(p, "standard", a.overrides, work)  # what the peers train
    t = std.train
    if p.decode_new >= t.seq_len:
        raise UserError(f"train.seq_len={t.seq_len} must exceed the {p.decode_new} decoded tokens")
    if p.gpu:  # asked in a throwaway process: a GPU backend here would hold device memory
        probe = [sys.executable, "-c", "import jax; print(jax.default_backend())"]
        backend = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
        if backend != "gpu":
            raise UserError(f"--preset gpu needs a GPU; jax sees {backend or 'nothing'}; use "
                            "--preset cpu")  # fmt: skip
    _say(f"preparing {std.data.source} in {std.data.prepared_dir}")
    prepare_source(std.data, Path(std.data.prepared_dir), show_progress=False,
                   seq_len=2 * t.seq_len)  # fmt: skip
    shared = dict(eval_tokens=p.eval_tokens, eval_batch=p.eval_batch, decode_new=p.decode_new,
                  decode_context=t.seq_len, decode_batch=p.decode_batch, gpu=p.gpu,
                  cache_dir=str(work / "jax_cache"))  # fmt: skip
    specs = [dict(shared, kind="jax", key=k, name=ROWS[k][0], config=to_dict(cfgs[k]))
             for k in a.rows]  # fmt: skip
    specs += [dict(shared, kind=k, key=k, name=PEERS[k], config=to_dict(std)) for k in a.peers]
    procs: list[RowProcess] = []
    rows: list[dict] = []
    try:
        for i, spec in enumerate(specs):
            procs.append(RowProcess(spec, work, f"{i + 1}/{len(specs)}"))
            if p.gpu:  # alone on the device: time it now, then free the memory
                procs[-1].wait_ready()
                _timing_rounds(procs[-1:], a)
                rows.append(procs[-1].finish(a.round_steps))
            elif not p.parallel:
                procs[-1].wait_ready()
        if not p.gpu:
            for proc in procs:
                proc.wait_ready()
            _timing_rounds(procs, a)
            rows = [proc.finish(a.round_steps) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    settings = {
        "preset": a.preset,
        "model": {k: getattr(std.model, k) for k in ("n_layer", "n_head", "n_embd", "dtype")},
        "seq_len": t.seq_len, "batch_size": t.batch_size, "steps": t.max_steps,
        "tokens_per_row": t.max_steps * t.batch_size * t.seq_len, "lr": t.lr,
        "eval_tokens": p.eval_tokens, "decode_context": t.seq_len,
        "decode_new": p.decode_new, "decode_batch": p.decode_batch, "rounds": a.rounds,
        "round_steps": a.round_steps, "interleaved": not p.gpu, "parallel": p.parallel,
        "overrides": list(a.overrides),
    }  # fmt: skip
    return rows, settings


@cli_main
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out) if a.out else fresh_out_dir("variants")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {str(out)!r} cannot be created ({e.strerror})") from None
    t0 = time.perf_counter()
    if a.work_dir:
        Path(a.work_dir).mkdir(parents=True, exist_ok=True)
        rows, settings = run_all(a, Path(a.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="gpt2_jax_variants_") as tmp:
            rows, settings = run_all(a, Path(tmp))
    elapsed = time.perf_counter() - t0
    (out / "variants.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown(rows, settings, elapsed)
    (out / "variants.md").write_text(table)
    for path in plots(rows, settings, out):
        _say(f"wrote {path}")
    _say(f"wrote {out / 'variants.json'} and {out / 'variants.md'}; {elapsed / 60:.1f} min")
    print(json.dumps(rows, indent=1) if a.json else table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
