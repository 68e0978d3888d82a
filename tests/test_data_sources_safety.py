"""Sources read each document once and never our own outputs; BOMs; concurrent prepares."""

import json
import os
import threading
from pathlib import Path

import pytest

from gpt2_jax.config import DataConfig
from gpt2_jax.data import make_train_loader, prepare_source, resolve_source
from tests.test_data_prepare import DOCS, assert_user_error, write_txt


def nested_corpus(root: Path) -> Path:
    write_txt(root, DOCS[:20])
    write_txt(root / "sub", [DOCS[20]])
    return root


def test_recursive_glob_reads_each_file_once(tmp_path):
    c = nested_corpus(tmp_path / "c")
    plain = resolve_source(DataConfig(source=str(c))).paths
    assert len(plain) == 21
    for pattern in ("**", "**/*", "**/*.txt", "*"):
        paths = resolve_source(DataConfig(source=f"{c}/{pattern}")).paths
        assert sorted(paths) == sorted(plain), pattern
    meta = prepare_source(DataConfig(source=f"{c}/**"), tmp_path / "out", show_progress=False)
    assert sum(meta["documents"].values()) == 21


def test_out_inside_the_source_is_not_read_back(tmp_path):
    c = write_txt(tmp_path / "corpus", DOCS)
    cfg = DataConfig(source=str(c))
    first = prepare_source(cfg, c / "tokens", show_progress=False)
    assert sum(first["documents"].values()) == len(DOCS)
    # again, as every train start does: the prepared folder is skipped, so it is up to date
    assert prepare_source(cfg, c / "tokens", show_progress=False) == first
    again = prepare_source(DataConfig(source=f"{c}/**"), tmp_path / "glob", show_progress=False)
    assert again["documents"] == first["documents"]


def test_a_run_inside_the_source_is_not_read_back(tmp_path):
    c = write_txt(tmp_path / "corpus", DOCS[:5])
    run = c / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (run / ".run.lock").write_text("")
    assert len(resolve_source(DataConfig(source=str(c))).paths) == 5
    assert len(resolve_source(DataConfig(source=f"{c}/**")).paths) == 5


def test_a_source_holding_only_our_outputs_says_so(tmp_path):
    c = write_txt(tmp_path / "corpus", DOCS[:5])
    prepare_source(DataConfig(source=str(c)), c / "tokens", show_progress=False)
    msg = assert_user_error(
        ["prepare", "--source", str(c / "tokens"), "--out", str(tmp_path / "o")],
        "empty corpus",
        "skipped our own outputs",
    )
    assert str(c / "tokens") in msg


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_sources_with_a_utf8_bom(tmp_path, suffix):
    records = [{"text": d} for d in DOCS[:6]]
    body = "\n".join(json.dumps(r) for r in records) if suffix == ".jsonl" else json.dumps(records)
    (tmp_path / f"bom{suffix}").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / f"plain{suffix}").write_bytes(body.encode())
    texts = {
        name: list(resolve_source(DataConfig(source=str(tmp_path / f"{name}{suffix}"))).texts())
        for name in ("bom", "plain")
    }
    assert texts["bom"] == texts["plain"] == DOCS[:6]


def test_a_reader_never_sees_a_prepare_half_swapped(tmp_path, monkeypatch):
    """A forced re-prepare pauses in the middle of its renames while another train process
    opens the data: the reader waits for the swap and gets one consistent meta + files."""
    c = write_txt(tmp_path / "c", DOCS)
    out = tmp_path / "data"
    cfg = DataConfig(source=str(c))
    prepare_source(cfg, out, show_progress=False)
    (c / "new.txt").write_text("A new document that changes the train split. " * 20)
    mid_swap, read_done = threading.Event(), threading.Event()
    real_replace = os.replace
    result: dict = {}

    def slow_replace(src, dst):
        real_replace(src, dst)
        if not mid_swap.is_set():
            mid_swap.set()  # one file is in place, the others and meta.json are not yet
            read_done.wait(timeout=0.5)

    def reader():
        mid_swap.wait(timeout=30)
        try:
            loader = make_train_loader(cfg, out, seed=0, batch_size=2, seq_len=8)
            result["train_tokens"] = len(loader.dataset)
        except Exception as e:  # the failure itself is what this test reports
            result["error"] = str(e)
        read_done.set()

    monkeypatch.setattr(os, "replace", slow_replace)
    thread = threading.Thread(target=reader)
    thread.start()
    meta = prepare_source(cfg, out, show_progress=False, force=True)
    thread.join()
    assert "error" not in result, result["error"]
    assert result["train_tokens"] == meta["tokens"]["train"]
