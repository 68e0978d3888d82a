"""TensorBoard scalars: out_dir/tb holds what metrics.jsonl holds, across a crash and resume."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

from gpt2_jax.train import train
from gpt2_jax.training.metrics import TensorBoard, tb_tag
from tests.train_helpers import tiny_config


def read_events(path: Path) -> list:
    """The events of one TFRecord file: 8-byte length, its CRC, the data, the data's CRC."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        body = data[pos + 12 : pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert (header_crc, body_crc) == (masked_crc32c(header), masked_crc32c(body))
        events.append(Event.FromString(body))
        pos += 16 + length
    return events


def shown_scalars(files: list[Path]) -> dict[str, list[tuple[int, float]]]:
    """tag → [(step, value)] as TensorBoard shows them: files in name order, and every
    SessionLog.START after the first hides the events read so far at or past its step."""
    from tensorboardX.proto.event_pb2 import SessionLog

    shown: dict[str, list[tuple[int, float]]] = {}
    starts = 0
    for path in files:
        for event in read_events(path):
            if event.session_log.status == SessionLog.START:
                if starts:
                    for series in shown.values():
                        series[:] = [(s, v) for s, v in series if s < event.step]
                starts += 1
            for value in event.summary.value:
                shown.setdefault(value.tag, []).append((event.step, value.simple_value))
    return shown


def jsonl_scalars(out: Path) -> dict[str, dict[int, float]]:
    """tag → {step: value} of every numeric field in metrics.jsonl."""
    want: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                want.setdefault(tb_tag(key), {})[record["step"]] = value
    return want


def test_event_files_match_metrics_jsonl_after_crash_and_resume(tmp_path, prepared_shakespeare):
    from tensorboardX.proto.event_pb2 import SessionLog

    out = tmp_path / "run"
    common = ["train.max_steps=4", "train.eval_every=2", "checkpoint.every=2"]
    train(tiny_config(out, prepared_shakespeare, *common))
    # A crash after step 4 but before its checkpoint: the resumed run redoes steps 3 and 4.
    shutil.rmtree(out / "checkpoints" / "4")
    summary = train(tiny_config(out, prepared_shakespeare, *common))
    assert summary["tensorboard"] == str(out / "tb")

    files = sorted((out / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 2
    first, second = read_events(files[0]), read_events(files[1])
    assert max(e.step for e in first if e.summary.value) == 4  # the crashed run's steps 3, 4
    # The resumed run hides them: its SessionLog.START at the first step it redoes.
    assert [e.step for e in second if e.session_log.status == SessionLog.START] == [3]

    got, want = shown_scalars(files), jsonl_scalars(out)
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/mfu",
            "val/loss", "val/ppl"} <= set(want)  # fmt: skip
    assert set(got) == set(want)
    for tag, series in want.items():
        # Steps 3 and 4 are in both files: shown once, from the resumed run (its timings
        # differ from the crashed run's), as metrics.jsonl kept them.
        assert [s for s, _ in got[tag]] == sorted(series), tag
        assert dict(got[tag]) == pytest.approx(series, rel=1e-6, nan_ok=True), tag
    assert sorted(want["train/loss"]) == [1, 2, 3, 4] and sorted(want["val/loss"]) == [2, 4]


def test_flush_leaves_no_event_behind(tmp_path):
    """What a crash right after a checkpoint's flush leaves: every event logged before it."""
    tb = TensorBoard(tmp_path / "tb", enabled=True)
    for step in range(1, 11):
        tb.log({"step": step, "loss": 1 / step, "event": "not a scalar"})
    tb.flush()
    (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    logged = [(e.step, v.tag, v.simple_value) for e in read_events(path) for v in e.summary.value]
    tb.close()
    assert logged == [(s, "train/loss", pytest.approx(1 / s, rel=1e-6)) for s in range(1, 11)]


def test_tags_group_the_fields():
    assert [tb_tag(k) for k in ("loss", "val_loss", "moe_z_loss", "mfu", "skipped")] == [
        "train/loss", "val/loss", "moe/z_loss", "perf/mfu", "train/skipped"
    ]  # fmt: skip


@pytest.mark.parametrize("has_tensorboard", [False, True])
def test_without_tensorboardx_nothing_is_written(tmp_path, monkeypatch, capsys, has_tensorboard):
    for name in ["tensorboardX", *[m for m in sys.modules if m.startswith("tensorboardX.")]]:
        monkeypatch.setitem(sys.modules, name, None)  # its import now fails, as if absent
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if has_tensorboard else None) if name == "tensorboard" else find_spec(name, *a)
    ))  # fmt: skip
    tb = TensorBoard(tmp_path / "tb", enabled=True)
    tb.log({"step": 1, "loss": 2.0})
    tb.flush()
    tb.close()
    assert tb.logdir is None and not (tmp_path / "tb").exists()
    err = capsys.readouterr().err
    # Silent, but for whoever has TensorBoard itself: one line saying what to install.
    if has_tensorboard:
        assert err.count("\n") == 1 and "pip install 'gpt2-jax[tensorboard]'" in err
    else:
        assert err == ""
