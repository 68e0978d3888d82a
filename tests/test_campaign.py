"""A careless user against a good run: every bad command ends in one line, exit 2, and leaves
every byte of the run as it was (issue 17's campaign)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax.train import train
from tests.train_helpers import TINY_OVERRIDES, lock_held_elsewhere

REPO = Path(__file__).resolve().parents[1]
RUN_ARGS = [*TINY_OVERRIDES, "train.max_steps=6", "train.eval_every=3", "checkpoint.every=3"]


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under `root` (directories by their files)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished run that prepares its own data into out_dir/data, as by default."""
    from gpt2_jax.config import load_config

    out = tmp_path_factory.mktemp("campaign") / "run"
    train(load_config("gpt2_jax/configs/default.yaml", [*RUN_ARGS, f"train.out_dir={out}"]))
    return out


def _train(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpt2_jax.train", *RUN_ARGS, f"train.out_dir={out}", *extra]


def _cases(run: Path, other_text: Path) -> dict[str, tuple[list[str], str]]:
    """name → (argv, a phrase the one error line must hold)."""
    py, ckpt = sys.executable, str(run / "checkpoints")
    return {
        "architecture": (_train(run, "model.n_layer=2"), "different model config (n_layer: 1 → 2"),
        "optimizer": (_train(run, "train.grad_clip=0"), "train.grad_clip: 1.0 → 0.0"),
        "learning rate": (_train(run, "train.lr=1e-2"), "train.lr: 0.003 → 0.01"),
        "data source": (_train(run, f"data.source={other_text}"), "data.source: 'shakespeare' →"),
        "sequence length": (_train(run, "train.seq_len=16"), "train.seq_len: 32 → 16"),
        "resume=false": (_train(run, "train.resume=false"), "already has checkpoints"),
        "no val data": (_train(run, "data.val_fraction=0"), "leaves no validation data"),
        "convert onto run": ([py, "-m", "gpt2_jax.convert", "to-hf", "--checkpoint", ckpt,
                              "--out", str(run), "--overwrite"], "--out"),
        "convert onto parent": ([py, "-m", "gpt2_jax.convert", "to-hf", "--checkpoint", str(run),
                                 "--out", str(run.parent), "--overwrite"], "--out"),
        "convert into run": ([py, "-m", "gpt2_jax.convert", "to-hf", "--checkpoint", str(run),
                              "--out", str(run / "hf"), "--overwrite"], "--out"),
        "from-hf of a run": ([py, "-m", "gpt2_jax.convert", "from-hf", "--hf-dir", str(run),
                              "--out", str(run / "x")], "not a GPT-2 folder"),
        "evaluate stride": ([py, "-m", "gpt2_jax.evaluate", "--checkpoint", str(run), "--data",
                             str(run / "data"), "--seq-len", "16", "--stride", "32"], "--stride"),
        "evaluate length": ([py, "-m", "gpt2_jax.evaluate", "--checkpoint", str(run), "--data",
                             str(run / "data"), "--seq-len", "128"], "max_seq_len"),
        "generate flag": ([py, "-m", "gpt2_jax.generate", "--checkpoint", str(run), "--prompt",
                           "x", "--top-p", "2"], "top-p must be in"),
        "generate missing": ([py, "-m", "gpt2_jax.generate", "--checkpoint", str(run / "nope"),
                              "--prompt", "x"], "does not exist"),
    }  # fmt: skip


def _assert_one_line_refusal(name: str, proc: subprocess.CompletedProcess, phrase: str) -> None:
    err = proc.stderr
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{err[-2000:]}"
    assert "Traceback" not in err, f"{name}:\n{err[-2000:]}"
    assert len(errors) == 1 and phrase in errors[0], f"{name}: {errors or err[-2000:]}"


def test_bad_commands_leave_the_run_untouched(good_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Another corpus entirely. " * 400)
    before = tree_hash(good_run.parent)
    for name, (argv, phrase) in _cases(good_run, other).items():
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
        _assert_one_line_refusal(name, proc, phrase)
        assert tree_hash(good_run.parent) == before, f"{name} changed the run"


def test_a_second_concurrent_run_is_refused_and_changes_nothing(good_run):
    with lock_held_elsewhere(good_run) as holder:
        before = tree_hash(good_run.parent)
        proc = subprocess.run(_train(good_run, "train.max_steps=9"), cwd=REPO,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        _assert_one_line_refusal("concurrent", proc, f"pid {holder.pid}")
        assert tree_hash(good_run.parent) == before


def _bench(*argv: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks", *argv]


MOE = _bench("moe", "--smoke", "--impls", "none", "--train", "--train-steps", "1",
             "--dense-layers", "1", "--moe-layers", "1")  # fmt: skip
VARIANTS = _bench("variants", "--preset", "tiny", "--seeds", "1", "--rows", "standard",
                  "--peers", "none")  # fmt: skip
BENCH_CASES = {  # name → (where the good run goes under --work-dir W, the bench's argv less W)
    "moe run": ("runs/moe", MOE),
    "moe data": ("data", MOE),
    "variants run": ("runs/tiny/standard-seed0", VARIANTS),
}  # fmt: skip


@pytest.mark.parametrize("name", BENCH_CASES)
def test_benchmarks_refuse_a_used_work_dir(good_run, tmp_path, name):
    """A bench --work-dir whose run (or data) folder holds anything: refused before any work."""
    where, argv = BENCH_CASES[name]
    work = tmp_path / "work"
    src = good_run / "data" if where == "data" else good_run
    shutil.copytree(src, work / where)
    before = tree_hash(work)
    out = tmp_path / ("moe.json" if "moe" in name else "out")
    proc = subprocess.run([*argv, "--work-dir", str(work), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    _assert_one_line_refusal(name, proc, f"{work / where} already exists and is not empty")
    assert "pick an empty or new --work-dir" in proc.stderr
    assert tree_hash(work) == before, f"{name} changed the work dir"
