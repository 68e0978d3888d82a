"""Checkpoints: bit-identical resume, preemption (SIGKILL / SIGTERM), damaged checkpoints,
NaN guard, architecture changes, weights-only loading."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from gpt2_jax.errors import UserError
from gpt2_jax.formats.checkpoint import load_model_weights
from gpt2_jax.formats.loading import load_model
from gpt2_jax.train import train
from tests.train_helpers import TINY_OVERRIDES, tiny_config, train_losses

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
# Kill points tried per CI run (GPT2_JAX_KILL_POINTS raises it for a longer local sweep).
KILL_POINTS = int(os.environ.get("GPT2_JAX_KILL_POINTS", "2"))


def _final_params(out: Path) -> list[np.ndarray]:
    model = load_model_weights(out)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, prepared_shakespeare):
    """20 uninterrupted steps: the curve every resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference")
    train(tiny_config(out, prepared_shakespeare, f"train.max_steps={STEPS}", "train.eval_every=0"))
    return out


def test_resume_is_bitwise_identical(tmp_path, prepared_shakespeare, reference_run):
    out = tmp_path / "run"
    cfg = tiny_config(out, prepared_shakespeare, f"train.max_steps={STEPS}", "train.eval_every=0")
    first = train(cfg, preempt_at_step=10)
    assert first["stopped_at"] == 10 and (out / "checkpoints" / "10").is_dir()
    train(cfg)
    ref, got = train_losses(reference_run), train_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == ref[s] for s in ref), "losses differ after resume"
    for a, b in zip(_final_params(reference_run), _final_params(out), strict=True):
        np.testing.assert_array_equal(a, b)


def _cli(out: Path, prepared: Path, *extra: str) -> list[str]:
    args = [*TINY_OVERRIDES, f"train.out_dir={out}", f"data.prepared_dir={prepared}"]
    return [sys.executable, "-m", "gpt2_jax.train", *args, f"train.max_steps={STEPS}",
            "train.eval_every=0", *extra]  # fmt: skip


def _wait_for_step(
    out: Path, proc: subprocess.Popen, step: int, timeout: float = 240, checkpoint: int = 0
) -> None:
    """Until `step` is logged and, if `checkpoint`, that step's checkpoint is committed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        logged = (out / "metrics.jsonl").exists() and max(train_losses(out), default=0) >= step
        if logged and (not checkpoint or (out / "checkpoints" / str(checkpoint)).is_dir()):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError(f"step {step} (checkpoint {checkpoint}) never reached")


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, prepared_shakespeare, reference_run):
    rng = random.Random(1234)
    ref = train_losses(reference_run)
    for i in range(KILL_POINTS):
        out = tmp_path / f"kill{i}"
        kill_after = rng.randint(6, STEPS - 2)
        proc = subprocess.Popen(_cli(out, prepared_shakespeare), cwd=REPO, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        # After the first checkpoint (step 5) is committed: saves are asynchronous, and a kill
        # before the commit leaves nothing to resume (the rerun then starts afresh).
        _wait_for_step(out, proc, kill_after, checkpoint=5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed = subprocess.run(_cli(out, prepared_shakespeare), cwd=REPO, text=True,
                                 capture_output=True, timeout=600)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming from" in resumed.stderr
        got = train_losses(out)
        assert sorted(got) == list(range(1, STEPS + 1)), f"kill after step {kill_after}"
        assert all(got[s] == ref[s] for s in ref), f"kill after step {kill_after}: curve differs"


def test_sigterm_saves_and_exits_zero(tmp_path, prepared_shakespeare, reference_run):
    out = tmp_path / "term"
    cmd = _cli(out, prepared_shakespeare, "checkpoint.every=0")
    proc = subprocess.Popen(
        cmd, cwd=REPO, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _wait_for_step(out, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    saved = [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and f"saved step {saved[0]}" in err
    assert int(saved[0]) < STEPS
    resumed = subprocess.run(_cli(out, prepared_shakespeare, "checkpoint.every=0"), cwd=REPO,
                             text=True, capture_output=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    ref, got = train_losses(reference_run), train_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(got[s] == ref[s] for s in ref)


def test_truncated_newest_checkpoint_falls_back(tmp_path, prepared_shakespeare, capsys):
    out = tmp_path / "trunc"
    train(tiny_config(out, prepared_shakespeare, "train.max_steps=10", "train.eval_every=0"))
    newest = out / "checkpoints" / "10"
    victims = [p for p in (newest / "params").rglob("*") if p.is_file() and p.stat().st_size > 64]
    assert victims
    for p in victims:
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size // 3)
    capsys.readouterr()
    summary = train(tiny_config(out, prepared_shakespeare, "train.max_steps=12",
                                "train.eval_every=0"))  # fmt: skip
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is unreadable" in err
    assert "resuming from" in err and str(out / "checkpoints" / "5") in err
    assert summary["steps"] == 12


def test_nan_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path, prepared_shakespeare):
    out = tmp_path / "nan"
    cfg = tiny_config(out, prepared_shakespeare, "train.max_steps=12", "train.eval_every=0")
    with pytest.raises(UserError, match="non-finite loss or gradient at step 8") as info:
        train(cfg, inject_nan_step=7)  # the 8th update
    assert str(out / "checkpoints" / "5") in str(info.value)
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5]
    load_model_weights(out)  # the good checkpoint is intact and readable


def test_skip_nonfinite_continues_and_counts(tmp_path, prepared_shakespeare):
    out = tmp_path / "skip"
    cfg = tiny_config(out, prepared_shakespeare, "train.max_steps=10", "train.eval_every=0",
                      "train.skip_nonfinite=true")  # fmt: skip
    summary = train(cfg, inject_nan_step=3)
    assert summary["steps"] == 10 and summary["skipped_nonfinite"] == 1
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if "skipped" in r][-1] == 1
    assert all(np.isfinite(x).all() for x in _final_params(out))


def test_changed_architecture_is_refused(tmp_path, prepared_shakespeare):
    out = tmp_path / "arch"
    train(tiny_config(out, prepared_shakespeare, "train.max_steps=5", "train.eval_every=0"))
    changed = tiny_config(out, prepared_shakespeare, "train.max_steps=8", "model.n_layer=2",
                          "model.pos_embedding=rope")  # fmt: skip
    with pytest.raises(UserError, match=r"different model config \(n_layer: 1 → 2, pos_embedding"):
        train(changed)


def test_fresh_start_needs_overwrite(tmp_path, prepared_shakespeare):
    out = tmp_path / "fresh"
    train(tiny_config(out, prepared_shakespeare, "train.max_steps=5", "train.eval_every=0"))
    with pytest.raises(UserError, match="already has checkpoints"):
        train(tiny_config(out, prepared_shakespeare, "train.max_steps=5", "train.resume=false"))
    summary = train(tiny_config(out, prepared_shakespeare, "train.max_steps=5",
                                "train.resume=false", "train.overwrite=true"))  # fmt: skip
    assert summary["steps"] == 5


def test_weights_only_loading_from_each_kind_of_path(tmp_path, prepared_shakespeare):
    out = tmp_path / "weights"
    train(tiny_config(out, prepared_shakespeare, "train.max_steps=5", "train.eval_every=0"))
    expected = _final_params(out)
    for path in (out, out / "checkpoints", out / "checkpoints" / "5"):
        model = load_model(path, dtype="bfloat16")
        assert model.cfg.dtype == "bfloat16"
        got = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
        for a, b in zip(expected, got, strict=True):
            np.testing.assert_array_equal(a, b)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_model(empty)
    shutil.rmtree(empty)
