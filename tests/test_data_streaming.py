"""Streaming through `datasets`: same tokens as prepare, resumable state, shuffle, processes,
and `hf:` sources (a local dataset; the hub only for its offline error)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2_jax.config import DataConfig
from gpt2_jax.data import StreamingLoader, make_train_loader, prepare_source, read_meta, tokenizer
from gpt2_jax.errors import UserError

EOT = tokenizer.EOT
DOCS = [f"Story {i}. " + "la " * (4 + (i * 5) % 17) + f"end {i}.\n" for i in range(24)]
T = 16


def split_docs(tokens: np.ndarray) -> list[str]:
    ends = np.flatnonzero(tokens == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def stream_inputs(loader, n_batches: int) -> np.ndarray:
    return np.concatenate([loader.next_batch()[0].ravel() for _ in range(n_batches)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl corpus prepared without streaming: (config, prepared dir, train tokens)."""
    root = tmp_path_factory.mktemp("stream")
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    cfg = DataConfig(source=str(path), val_fraction=0.25, streaming=True)
    prepare_source(
        DataConfig(source=str(path), val_fraction=0.25), root / "out", show_progress=False
    )
    train = np.fromfile(root / "out" / "train.bin", np.uint16).astype(np.int32)
    return cfg, root / "out", train


def loader_for(corpus, **kw):
    cfg, out, _ = corpus
    if "shuffle_buffer" in kw:
        cfg = dataclasses.replace(cfg, shuffle_buffer=kw.pop("shuffle_buffer"))
    args = dict(seed=0, batch_size=2, seq_len=T) | kw
    return make_train_loader(cfg, out, **args)


def test_stream_without_shuffle_is_the_prepared_token_stream(corpus):
    _, _, train = corpus
    loader = loader_for(corpus)
    assert isinstance(loader, StreamingLoader)
    n = 2 * len(train) // (2 * T) + 3  # past the end: epoch 2 starts the same stream again
    x, y = loader.next_batch()
    rest = stream_inputs(loader, n - 1)
    flat = np.concatenate([x.ravel(), rest])
    np.testing.assert_array_equal(flat, np.tile(train, 3)[: len(flat)])
    np.testing.assert_array_equal(y.ravel(), np.tile(train, 3)[1 : 2 * T + 1])
    assert loader.last_batch_seconds > 0


def test_resume_without_shuffle_is_exact(corpus):
    _, _, train = corpus
    steps = 2 * len(train) // (2 * T) + 2  # crosses an epoch boundary
    full = loader_for(corpus)
    ref = [full.next_batch() for _ in range(steps)]
    for cut in (1, steps // 2, steps - 2):
        first = loader_for(corpus)
        for _ in range(cut):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = loader_for(corpus)
        resumed.load_state_dict(state)
        for s in range(cut, steps):
            x, y = resumed.batch(s)
            np.testing.assert_array_equal(x, ref[s][0])
            np.testing.assert_array_equal(y, ref[s][1])


def test_batch_fast_forwards_but_never_goes_back(corpus):
    a, b = loader_for(corpus), loader_for(corpus)
    for _ in range(3):
        a.next_batch()
    np.testing.assert_array_equal(b.batch(3)[0], a.next_batch()[0])
    with pytest.raises(UserError, match="cannot go back"):
        b.batch(1)


def test_shuffle_is_deterministic_and_covers_each_document_once_per_epoch(corpus):
    _, out, train = corpus
    n = len(train) // (2 * T) + 1
    a = stream_inputs(loader_for(corpus, shuffle_buffer=4), n)[: len(train)]
    b = stream_inputs(loader_for(corpus, shuffle_buffer=4), n)[: len(train)]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, train)
    assert sorted(split_docs(a)) == sorted(split_docs(train.astype(np.uint16)))
    c = stream_inputs(loader_for(corpus, shuffle_buffer=4, seed=1), n)[: len(train)]
    assert not np.array_equal(a, c)


def test_shuffle_resume_drops_the_buffer_but_is_reproducible(corpus):
    _, _, train = corpus
    train_docs = split_docs(train.astype(np.uint16))
    first = loader_for(corpus, shuffle_buffer=4)
    before = stream_inputs(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    dropped = state["dropped_from_buffer"]
    assert 1 <= dropped <= 4
    runs = []
    for _ in range(2):
        loader = loader_for(corpus, shuffle_buffer=4)
        loader.load_state_dict(state)
        runs.append(stream_inputs(loader, len(train) // (2 * T) + 2))
    np.testing.assert_array_equal(runs[0], runs[1])
    # the rest of the epoch is every document not yet seen, minus the dropped buffer
    epoch = split_docs(np.concatenate([before, runs[0]]).astype(np.uint16))
    epoch = epoch[: len(train_docs) - dropped]
    assert len(set(epoch)) == len(epoch) and set(epoch) < set(train_docs)


def test_process_streams_split_the_documents(corpus):
    _, _, train = corpus
    train_docs = split_docs(train.astype(np.uint16))
    for p in range(2):
        loader = loader_for(corpus, process_index=p, process_count=2)
        own = train_docs[p::2]  # every second train document, in source order
        n_tokens = sum(len(tokenizer.encode(d)) + 1 for d in own)
        x, _ = loader.next_batch()
        assert x.shape == (1, T)
        stream = np.concatenate([x.ravel(), stream_inputs(loader, n_tokens // T)])
        assert split_docs(stream[:n_tokens].astype(np.uint16)) == own


def test_state_from_other_settings_is_refused(corpus):
    state = loader_for(corpus).state_dict()
    with pytest.raises(UserError, match="batch_size=2"):
        loader_for(corpus, batch_size=4).load_state_dict(state)
    with pytest.raises(UserError, match="streaming"):
        loader_for(corpus).load_state_dict({})


def test_stream_smaller_than_one_sequence(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("just a few words")
    loader = StreamingLoader(
        DataConfig(source=str(path), val_fraction=0.0, streaming=True),
        seed=0,
        batch_size=1,
        seq_len=64,
    )
    with pytest.raises(UserError, match="smaller than one sequence"):
        loader.next_batch()


def test_streaming_prepare_writes_val_only_and_loader_skips_it(corpus, tmp_path):
    cfg, out, _ = corpus
    meta = prepare_source(cfg, tmp_path / "s", show_progress=False)
    assert meta["streaming"] and meta["tokens"]["train"] is None
    assert not (tmp_path / "s" / "train.bin").exists()
    val = np.fromfile(tmp_path / "s" / "val.bin", np.uint16)
    np.testing.assert_array_equal(val, np.fromfile(out / "val.bin", np.uint16))
    assert prepare_source(cfg, tmp_path / "s", show_progress=False) == meta  # no-op
    assert prepare_source(cfg, out, show_progress=False) == read_meta(out)  # full data serves
    with pytest.raises(UserError, match="prepared for streaming"):
        make_train_loader(
            dataclasses.replace(cfg, streaming=False),
            tmp_path / "s",
            seed=0,
            batch_size=2,
            seq_len=T,
        )


def test_hf_local_dataset_prepares_and_streams_like_files(corpus, tmp_path):
    import datasets

    cfg, out, train = corpus
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(saved)
    hf_cfg = DataConfig(source=f"hf:{saved}", val_fraction=0.25)
    prepare_source(hf_cfg, tmp_path / "hf", show_progress=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "hf" / name).read_bytes() == (out / name).read_bytes()
    loader = make_train_loader(
        dataclasses.replace(hf_cfg, streaming=True),
        tmp_path / "hf",
        seed=0,
        batch_size=2,
        seq_len=T,
    )
    flat = stream_inputs(loader, 3)
    np.testing.assert_array_equal(flat, train[: len(flat)])
    with pytest.raises(UserError, match="no column 'body'"):
        prepare_source(
            DataConfig(source=f"hf:{saved}", text_field="body"), tmp_path / "x", show_progress=False
        )
    assert not (tmp_path / "x").exists()


def test_hf_hub_without_network_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2_jax.data", "prepare", "--source", "hf:nobody/no-such-set"]
        + ["--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hf:nobody/no-such-set"), proc.stderr
    assert "cannot reach the Hugging Face hub" in lines[0]
    assert not out.exists()


def test_bad_document_in_stream_is_a_user_error(tmp_path):
    for i, doc in enumerate(DOCS[:6]):
        (tmp_path / f"{i}.txt").write_text(doc * 20)
    (tmp_path / "9.txt").write_bytes(b"good start \x80 bad")
    cfg = DataConfig(source=str(tmp_path / "*.txt"), val_fraction=0.0, streaming=True)
    loader = StreamingLoader(cfg, seed=0, batch_size=2, seq_len=T)
    with pytest.raises(UserError, match=r"9\.txt is not UTF-8: byte 0x80 at byte offset 11"):
        for _ in range(200):
            loader.next_batch()
    assert loader._ahead is None  # the read-ahead thread was stopped
