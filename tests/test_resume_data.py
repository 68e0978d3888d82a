"""A resume on data other than the checkpoint's: refused before anything is written, naming
both content hashes, unless `train.allow_data_change=true`, which metrics.jsonl records."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpt2_jax.config import Config, DataConfig, load_config, to_dict
from gpt2_jax.data import prepare_source
from gpt2_jax.errors import UserError
from gpt2_jax.train import main, train
from gpt2_jax.training.resume import check_resume_config
from tests.cli_helpers import run_cli
from tests.test_campaign import tree_hash
from tests.train_helpers import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
WORDS = "the king crown sword night day love death rose queen field storm sea ship".split()
# Relative paths, run from a copy of the fixture's directory: the recorded data.source stays
# "corpus" in every copy.
ARGS = ["--config", REPO / "gpt2_jax/configs/default.yaml", *TINY_OVERRIDES, "train.out_dir=run",
        "data.source=corpus", "train.max_steps=6", "train.eval_every=3",
        "checkpoint.every=3"]  # fmt: skip


def _write_doc(path: Path, seed: int) -> None:
    words = np.random.default_rng(seed).choice(WORDS, 400)
    path.write_text(" ".join(words) + ".\n")


def _content_hash(source: str, scratch: Path, **kw) -> str:
    return prepare_source(DataConfig(source=source, **kw), scratch, show_progress=False)[
        "content_hash"
    ]


def _ckpt_meta(step_dir: Path) -> Path:
    """The JSON file of a checkpoint's meta item (as Orbax's JsonCheckpointHandler writes it)."""
    return step_dir / "meta" / "metadata"


STREAMING = ["data.streaming=true", "data.val_fraction=0.3"]  # 1 of the 4 documents in val


def _preempted(base: Path, *extra: str) -> Path:
    """A run over a 4-file directory source in `base`, stopped (as by a preemption) at step 3."""
    (base / "corpus").mkdir()
    for i in range(4):
        _write_doc(base / "corpus" / f"doc{i}.txt", i)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        cfg = load_config(ARGS[1], [str(a) for a in [*ARGS[2:], *extra]])
        assert train(cfg, preempt_at_step=3)["stopped_at"] == 3
    return base


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    return _preempted(tmp_path_factory.mktemp("resume_data"))


@pytest.fixture(scope="module")
def preempted_streaming(tmp_path_factory):
    return _preempted(tmp_path_factory.mktemp("resume_data_streaming"), *STREAMING)


def _work_copy(base: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of a preempted run and its corpus, as the working directory."""
    shutil.copytree(base, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    return tmp_path / "w"


@pytest.fixture
def run_copy(tmp_path, preempted, monkeypatch):
    return _work_copy(preempted, tmp_path, monkeypatch)


@pytest.mark.parametrize("streaming", [False, True], ids=["prepared", "streaming"])
def test_changed_corpus_is_refused_naming_both_hashes_and_changes_nothing(
    streaming, request, tmp_path, monkeypatch, capsys
):
    """Streaming: only val.bin is prepared, and its hash covers the documents read to collect
    it (all of them, on a corpus this small)."""
    base = request.getfixturevalue("preempted_streaming" if streaming else "preempted")
    run_copy = _work_copy(base, tmp_path, monkeypatch)
    extra = STREAMING if streaming else []
    old = json.loads((run_copy / "run/data/meta.json").read_text())["content_hash"]
    _write_doc(run_copy / "corpus/doc4.txt", 4)
    kw = {"streaming": True, "val_fraction": 0.3} if streaming else {}
    new = _content_hash("corpus", tmp_path / "scratch", **kw)
    assert new != old
    before = tree_hash(run_copy / "run")
    code, _, err = run_cli(main, [*ARGS, *extra], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and old[:12] in errors[0] and new[:12] in errors[0], err
    assert "train.allow_data_change=true" in errors[0] and "train.out_dir" in errors[0]
    assert tree_hash(run_copy / "run") == before


def test_allow_data_change_resumes_on_the_new_data_and_records_it(run_copy, tmp_path, capsys):
    old = json.loads((run_copy / "run/data/meta.json").read_text())["content_hash"]
    _write_doc(run_copy / "corpus/doc4.txt", 4)
    code, _, err = run_cli(main, [*ARGS, "train.allow_data_change=true"], capsys)
    assert code == 0, err
    assert "resuming from" in err and "changed data" in err
    new = json.loads((run_copy / "run/data/meta.json").read_text())["content_hash"]
    records = [json.loads(x) for x in (run_copy / "run/metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in records if r.get("event") == "data_changed"]
    assert event == {"step": 3, "event": "data_changed", "data_hash_before": old,
                     "data_hash_after": new}  # fmt: skip
    assert max(r["step"] for r in records) == 6
    saved = json.loads(_ckpt_meta(run_copy / "run/checkpoints/6").read_text())
    assert saved["data_hash"] == new  # the next resume compares against the new data


def test_unchanged_corpus_resumes_and_an_old_checkpoint_gets_a_notice(run_copy, capsys):
    meta_file = _ckpt_meta(run_copy / "run/checkpoints/3")
    saved = json.loads(meta_file.read_text())
    assert (
        saved["data_hash"]
        == json.loads((run_copy / "run/data/meta.json").read_text())["content_hash"]
    )
    del saved["data_hash"]  # as written before the hash was recorded
    meta_file.write_text(json.dumps(saved))
    code, _, err = run_cli(main, ARGS, capsys)
    assert code == 0, err
    assert "records no data hash" in err and "resuming from" in err


def test_allow_data_change_also_frees_the_keys_that_pick_the_data():
    cfg = Config()
    saved = {"model": to_dict(cfg.model), "train": to_dict(cfg.train), "data": to_dict(cfg.data)}
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="other.txt"))
    with pytest.raises(UserError, match=r"data\.source: 'shakespeare' → 'other\.txt'.*"
                       r"or set train\.allow_data_change=true"):  # fmt: skip
        check_resume_config(saved, 3, other)
    allow = dataclasses.replace(cfg.train, allow_data_change=True)
    check_resume_config(saved, 3, dataclasses.replace(other, train=allow))
    streaming = dataclasses.replace(cfg.data, streaming=True)  # another loader: still refused
    with pytest.raises(UserError, match=r"data\.streaming: False → True\); resume with"):
        check_resume_config(saved, 3, dataclasses.replace(cfg, data=streaming, train=allow))
