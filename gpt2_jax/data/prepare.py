"""`prepare_source`: tokenise a source into train.bin, val.bin and meta.json, atomically."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gpt2_jax.config import DataConfig
from gpt2_jax.data import tokenizer
from gpt2_jax.data.dir_lock import locked
from gpt2_jax.data.integrity import CHECKS, expected_files, file_record, mismatch
from gpt2_jax.data.sources import Source, resolve_source
from gpt2_jax.data.split import RULE, doc_digest, doc_score, split_of
from gpt2_jax.data.tokens import TOKEN_DTYPE, check_vocab_fits, encode_documents, resolve_threads
from gpt2_jax.errors import UserError, notice

FORMAT = "gpt2_jax.data/1"
META, TRAIN, VAL = "meta.json", "train.bin", "val.bin"
BATCH_CHARS = 1 << 22  # text per tokenisation call: enough work for every thread
STREAM_VAL_MAX_TOKENS = 1 << 21  # streaming mode stops collecting val text here


def prepare_source(
    cfg: DataConfig,
    out_dir: str | Path,
    *,
    show_progress: bool = True,
    seq_len: int | None = None,
    force: bool = False,
    stream_val_max_tokens: int = STREAM_VAL_MAX_TOKENS,
    check_hash: Callable[[str], None] | None = None,
) -> dict:
    """Write `train.bin`/`val.bin` (uint16 tokens) and `meta.json` for `cfg.source` into
    `out_dir` and return the meta. A no-op returning the old meta when the directory already
    holds this input's tokens (same content hash). With `cfg.streaming` only `val.bin` is
    written (from the first `stream_val_max_tokens` val tokens of the stream). `seq_len`, when
    given, makes a split shorter than one sequence an error. Nothing is written on error.
    The meta records each file's size and fast hash (`integrity`); when those no longer match,
    a notice goes to stderr and the directory is prepared again. `check_hash`, when given, is
    called with the content hash of the data the directory is to hold before it is reused or
    anything is written, and may raise to refuse."""
    out = Path(out_dir)
    fraction = _check_fraction(cfg.val_fraction)
    threads = resolve_threads(cfg.num_threads)
    if seq_len is not None and seq_len <= 0:
        raise UserError(f"seq_len must be positive, got {seq_len}")
    source = resolve_source(cfg)
    _check_writable(out)
    check_vocab_fits(tokenizer.encoding().n_vocab)
    settings = {
        "format": FORMAT,
        "tokenizer": "tiktoken:gpt2",
        "source": cfg.source,
        "text_field": cfg.text_field,
        "decode_errors": cfg.decode_errors,
        "val_fraction": fraction,
    }
    if cfg.streaming:
        with locked(out, exclusive=False):
            old = read_meta(out)
            reuse = (
                not force and old is not None and _reusable_for_stream(out, old, settings, source)
            )
        if reuse:
            if check_hash is not None:
                check_hash(old["content_hash"])
            _check_min_tokens(old, seq_len, fraction)
            _say_up_to_date(out, show_progress)
            return old
        return _prepare_stream_val(
            source, settings, out, threads, seq_len, stream_val_max_tokens, show_progress,
            check_hash,
        )  # fmt: skip
    scan = _scan(source, settings, show_progress)
    if check_hash is not None:
        check_hash(scan.content_hash)
    with locked(out, exclusive=False):  # meta and files as one writer left them
        old = read_meta(out)
        reuse = (
            not force
            and old is not None
            and not old["streaming"]
            and old["content_hash"] == scan.content_hash
            and _files_match(out, old)
        )
    if reuse:
        _check_min_tokens(old, seq_len, fraction)
        _say_up_to_date(out, show_progress)
        return old
    moved = _moves(scan, fraction)
    with _Staging(out) as stage:
        counts = _tokenise(source, settings, scan, moved, stage, threads, show_progress)
        meta = _meta(settings, source, scan.content_hash, moved, counts, streaming=False)
        meta["documents"]["empty_skipped"] = scan.n_empty
        meta["text_chars"] = scan.n_chars
        _check_min_tokens(meta, seq_len, fraction)
        stage.commit(meta)
    return meta


def read_meta(out_dir: str | Path) -> dict | None:
    """The meta.json of a prepared directory, or None when absent or of another format."""
    try:
        meta = json.loads((Path(out_dir) / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


@dataclass
class _Scan:
    content_hash: str
    n_docs: int
    n_empty: int
    n_chars: int
    n_val_by_rule: int
    distinct: bool  # at least two different documents
    min_digest: bytes
    max_digest: bytes


def _scan(source: Source, settings: dict, show_progress: bool) -> _Scan:
    """Read every document once (no tokenising): content hash, counts, split extremes; every
    input error surfaces here, before anything is written."""
    h = hashlib.sha256(_settings_bytes(settings))
    n_docs = n_empty = n_chars = n_val = 0
    first = lo = hi = None
    distinct = False
    fraction = settings["val_fraction"]
    texts = source.texts()
    with tqdm(texts, desc="reading", unit="doc", leave=False, disable=not show_progress) as bar:
        for text in bar:
            if not text:
                n_empty += 1
                continue
            digest = doc_digest(text)
            h.update(digest)
            n_docs += 1
            n_chars += len(text)
            n_val += doc_score(digest) < fraction
            if first is None:
                first = lo = hi = digest
            distinct = distinct or digest != first
            lo, hi = min(lo, digest), max(hi, digest)
    if n_docs == 0:
        raise UserError(
            f"empty corpus: source {settings['source']!r} has no non-empty documents "
            f"({n_empty} empty); point data.source at some text"
        )
    return _Scan(h.hexdigest(), n_docs, n_empty, n_chars, n_val, distinct, lo, hi)


def _moves(scan: _Scan, fraction: float) -> dict[str, str]:
    """Documents moved against the hash rule so neither split is empty (small corpora)."""
    if fraction == 0:
        return {}
    if not scan.distinct:
        raise UserError(
            f"the source has {scan.n_docs} document(s) but not two different ones, and the "
            "train/val split is by document; add documents or set val_fraction to 0"
        )
    if scan.n_val_by_rule == 0:  # the lowest score is the closest to the val side
        return {scan.min_digest.hex(): "val"}
    if scan.n_val_by_rule == scan.n_docs:
        return {scan.max_digest.hex(): "train"}
    return {}


def _tokenise(source, settings, scan, moved, stage, threads, show_progress) -> dict:
    """Second pass: tokenise in batches of documents and append each to its split's file.
    Returns {split: [documents, tokens]}."""
    fraction = settings["val_fraction"]
    h = hashlib.sha256(_settings_bytes(settings))
    counts = {"train": [0, 0], "val": [0, 0]}
    texts: list[str] = []
    digests: list[bytes] = []
    with tqdm(
        total=scan.n_chars, unit="char", unit_scale=True, desc="tokenising",
        disable=not show_progress,
    ) as bar:  # fmt: skip

        def flush() -> None:
            for digest, arr in zip(digests, encode_documents(texts, threads), strict=True):
                split = split_of(digest, fraction, moved)
                stage.write(split, arr)
                counts[split][0] += 1
                counts[split][1] += len(arr)
            bar.update(sum(map(len, texts)))
            texts.clear()
            digests.clear()

        chars = 0
        for text in source.texts():
            if not text:
                continue
            digest = doc_digest(text)
            h.update(digest)
            texts.append(text)
            digests.append(digest)
            chars += len(text)
            if chars >= BATCH_CHARS:
                flush()
                chars = 0
        flush()
    if h.hexdigest() != scan.content_hash:
        raise UserError(
            f"source {settings['source']!r} changed while it was prepared; re-run prepare"
        )
    return counts


def _prepare_stream_val(
    source: Source,
    settings: dict,
    out: Path,
    threads: int,
    seq_len: int | None,
    max_tokens: int,
    show_progress: bool,
    check_hash: Callable[[str], None] | None = None,
) -> dict:
    """Streaming mode: collect only val documents (by the hash rule) from the stream."""
    fraction = settings["val_fraction"]
    h = hashlib.sha256(_settings_bytes(settings))
    counts = {"train": [0, None], "val": [0, 0]}
    with _Staging(out, train=False) as stage:
        if fraction > 0:
            ds, field = source.iterable_dataset()
            with tqdm(
                total=max_tokens, unit="tok", unit_scale=True, desc="val tokens",
                disable=not show_progress,
            ) as bar:  # fmt: skip
                for row, example in enumerate(ds):
                    text = stream_text(example, field, row, source.spec)
                    if not text:
                        continue
                    digest = doc_digest(text)
                    h.update(digest)
                    if split_of(digest, fraction, {}) == "train":
                        counts["train"][0] += 1
                        continue
                    (arr,) = encode_documents([text], threads)
                    stage.write("val", arr)
                    counts["val"][0] += 1
                    counts["val"][1] += len(arr)
                    bar.update(len(arr))
                    if counts["val"][1] >= max_tokens:
                        break
            if counts["val"][0] == 0:
                raise UserError(
                    f"no document of {source.spec!r} fell into the val split "
                    f"(val_fraction={fraction}, {counts['train'][0]} documents read); raise "
                    "data.val_fraction, or prepare without streaming to pick one"
                )
        meta = _meta(settings, source, h.hexdigest(), {}, counts, streaming=True)
        meta["documents"]["train"] = None  # not counted: training streams them
        _check_min_tokens(meta, seq_len, fraction)
        if check_hash is not None:
            check_hash(meta["content_hash"])
        stage.commit(meta)
    return meta


def stream_text(example: dict, field: str, row: int, spec: str) -> str:
    """The text of one streamed example, or a one-line error."""
    if field not in example:
        raise UserError(
            f"{spec} row {row} has no field {field!r} (fields: {', '.join(example)}); "
            "set data.text_field (--text-field) to the text field"
        )
    text = example[field]
    if not isinstance(text, str):
        raise UserError(f"{spec} row {row}: {field!r} is {type(text).__name__}, not a string")
    return text


def _reusable_for_stream(out: Path, old: dict, settings: dict, source: Source) -> bool:
    same = all(old.get(k) == v for k, v in settings.items())
    return same and old.get("fingerprint") == source.fingerprint() and _files_match(out, old)


def _meta(settings, source, content_hash, moved, counts, *, streaming) -> dict:
    return {
        **settings,
        "sources": source.describe(),
        "fingerprint": source.fingerprint(),
        "vocab_size": tokenizer.encoding().n_vocab,
        "eot": tokenizer.EOT,
        "dtype": TOKEN_DTYPE.__name__,
        "streaming": streaming,
        "content_hash": content_hash,
        "split": {"rule": RULE, "moved": moved},
        "documents": {"train": counts["train"][0], "val": counts["val"][0]},
        "tokens": {"train": counts["train"][1], "val": counts["val"][1]},
        "files": {"train": None if streaming else TRAIN, "val": VAL},
    }


def _say_up_to_date(out: Path, show_progress: bool) -> None:
    if show_progress:
        print(f"{out} is up to date (same content hash); nothing to do", file=sys.stderr)


def _settings_bytes(settings: dict) -> bytes:
    return json.dumps(settings, sort_keys=True).encode() + b"\0"


def _check_fraction(fraction: float) -> float:
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {fraction}")
    return float(fraction)


def _check_min_tokens(meta: dict, seq_len: int | None, fraction: float) -> None:
    if seq_len is None:
        return
    for split in ("train", "val"):
        n = meta["tokens"][split]
        if n is None or (split == "val" and fraction == 0):
            continue
        if n < seq_len + 1:
            raise UserError(
                f"corpus smaller than one sequence: the {split} split has {n} tokens but a "
                f"sequence needs seq_len+1={seq_len + 1}; use more text or a smaller seq_len"
            )


def _files_match(out: Path, meta: dict) -> bool:
    """Whether the token files are what `meta` records; if not, says so on stderr, because the
    caller then prepares them again and a damaged directory should never be repaired silently."""
    for name, want in expected_files(meta).items():
        why = mismatch(out / name, want)
        if why:
            notice(f"{out / name} does not match {META} ({why}); preparing it again")
            return False
    return True


def _check_writable(out: Path) -> None:
    """Fail before any work when `out` cannot be created or written."""
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out} exists and is not a directory; pick another")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create output directory {out}: {probe} is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UserError(
            f"output directory {out} is not writable ({e.strerror or e} in {probe}); "
            "pick another output directory or fix its permissions"
        ) from None


class _Staging:
    """Token files written under temporary names, renamed into place only by `commit`; on any
    error (or interrupt) the temporaries and any directories created for them are removed."""

    def __init__(self, out: Path, *, train: bool = True):
        self.out = out
        self.splits = {"train": TRAIN, "val": VAL} if train else {"val": VAL}
        self.files: dict[str, Any] = {}
        self.created: list[Path] = []
        self.done = False

    def _tmp(self, name: str) -> Path:
        # host and pid: several hosts may prepare into one shared directory at once
        return self.out / f".{name}.{socket.gethostname()}.{os.getpid()}.tmp"

    def __enter__(self) -> _Staging:
        missing = []
        p = self.out.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.out.mkdir(parents=True, exist_ok=True)
        self.created = missing  # deepest first
        for split, name in self.splits.items():
            self.files[split] = self._tmp(name).open("wb")
        return self

    def write(self, split: str, arr) -> None:
        self.files[split].write(memoryview(arr))

    def commit(self, meta: dict) -> None:
        """Record each file's size and fast hash in `meta`, then move everything into place."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        # hashed from the finished temporaries: the meta describes exactly the bytes renamed in
        meta[CHECKS] = {name: file_record(self._tmp(name)) for name in self.splits.values()}
        meta_tmp = self._tmp(META)
        meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        # Readers hold the shared lock while they read meta.json and open the files, so none
        # sees the swap half done; meta.json is replaced, never removed, and goes last (a crash
        # between the renames leaves files that do not match it, which the next start sees).
        with locked(self.out, exclusive=True):
            if "train" not in self.splits:
                (self.out / TRAIN).unlink(missing_ok=True)
            for name in self.splits.values():
                os.replace(self._tmp(name), self.out / name)
            os.replace(meta_tmp, self.out / META)
        self.done = True

    def __exit__(self, *exc) -> None:
        if self.done:
            return
        for f in self.files.values():
            f.close()
        for name in (*self.splits.values(), META):
            self._tmp(name).unlink(missing_ok=True)
        for d in self.created:
            try:
                d.rmdir()
            except OSError:
                break
