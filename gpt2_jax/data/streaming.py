"""Training batches streamed from any source through `datasets` (`streaming=True`),
tokenised and packed on the fly, with a checkpointable JSON state.

Stream: the source's documents in order → drop empty ones and val documents (the same
hash rule as `prepare`, plus the `moved` documents from meta.json) → keep every
`process_count`-th remaining document, starting at `process_index` → (optional) a
document shuffle buffer → GPT-2 tokens + EOT → packed rows: a batch takes the next
`rows*seq_len + 1` tokens, inputs = all but the last, targets = all but the first, and
the next batch starts at that last token. So with no shuffle and one process the inputs
of successive batches concatenate to exactly the token stream that `prepare` writes to
train.bin. At the end of the source a new epoch starts from the beginning.

A background thread reads and tokenises ahead (chunks of documents, `data.num_threads`
tokeniser threads), so a training step rarely waits for a long document.

Resume guarantees (`state_dict()` → `load_state_dict()`):
- shuffle_buffer == 0: exact — the batches after a resume are the batches an uninterrupted
  run would have produced. The state holds the `datasets` iterator position after the
  last document used, the unused tokens of that document and counters, so its size grows
  with document length; documents read ahead but not yet used are read again.
- shuffle_buffer > 0 (the caveat): the documents sitting in the shuffle buffer are not
  saved. After a resume they are skipped for the rest of that epoch (at most
  `shuffle_buffer` documents per resume, `dropped_from_buffer` in the state), the buffer
  refills from the saved source position, and batches differ from an uninterrupted run.
  Resuming twice from one state still gives the same batches (the generator is saved).
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import queue
import threading
import time
import weakref

import numpy as np

from gpt2_jax.config import DataConfig
from gpt2_jax.data.loader import _local_rows
from gpt2_jax.data.prepare import stream_text
from gpt2_jax.data.sources import resolve_source
from gpt2_jax.data.split import doc_digest, split_of
from gpt2_jax.data.tokens import TOKEN_DTYPE, encode_documents, resolve_threads
from gpt2_jax.errors import UserError

log = logging.getLogger(__name__)

STATE_VERSION = 1
CHUNK_CHARS = 1 << 20  # text tokenised per read-ahead chunk
CHUNK_DOCS = 256
AHEAD_CHUNKS = 4  # read-ahead depth


class StreamingLoader:
    """Packed (inputs_BT, targets_BT) int32 batches from a streamed source; see module doc."""

    kind = "streaming"

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seed: int,
        batch_size: int,
        seq_len: int,
        process_index: int = 0,
        process_count: int = 1,
        moved: dict[str, str] | None = None,
    ):
        self.rows = _local_rows(batch_size, seq_len, process_index, process_count)
        if cfg.shuffle_buffer < 0:
            raise UserError(f"data.shuffle_buffer must be >= 0, got {cfg.shuffle_buffer}")
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
        self.seq_len = seq_len
        self._config = {
            "source": cfg.source,
            "val_fraction": cfg.val_fraction,
            "text_field": cfg.text_field,
            "shuffle_buffer": cfg.shuffle_buffer,
            "seed": seed,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "process_index": process_index,
            "process_count": process_count,
        }
        source = resolve_source(cfg)
        ds, field = source.iterable_dataset()
        self._reader = _Reader(
            ds=ds,
            field=field,
            spec=source.spec,
            val_fraction=cfg.val_fraction,
            moved=dict(moved or {}),
            process=(process_index, process_count),
            shuffle_buffer=cfg.shuffle_buffer,
            seq_len=seq_len,
            threads=resolve_threads(cfg.num_threads),
        )
        rng = np.random.default_rng([seed, process_index]) if cfg.shuffle_buffer else None
        self._pos = {  # the reader's position after the last document handed to a batch
            "source_state": _copy(ds.state_dict()),
            "epoch": 0,
            "row": 0,
            "train_docs": 0,
            "epoch_tokens": 0,
            "rng": rng.bit_generator.state if rng is not None else None,
            "buffered": 0,
        }
        self.step = 0
        self.last_batch_seconds = 0.0
        self._pending = np.zeros(0, TOKEN_DTYPE)
        self._items: collections.deque = collections.deque()
        self._ahead: _ReadAhead | None = None

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The batch for step `self.step`; advances the stream."""
        t0 = time.perf_counter()
        need = self.rows * self.seq_len + 1
        chunks = [self._pending]
        have = len(self._pending)
        while have < need:
            arr = self._next_doc_tokens()
            chunks.append(arr)
            have += len(arr)
        w = np.concatenate(chunks) if len(chunks) > 1 else self._pending
        self._pending = w[need - 1 :]  # the last token is also the next batch's first input
        w = w[:need].astype(np.int32)
        x_BT = w[:-1].reshape(self.rows, self.seq_len)
        y_BT = w[1:].reshape(self.rows, self.seq_len)
        self.step += 1
        self.last_batch_seconds = time.perf_counter() - t0
        log.debug("stream batch %d in %.2f ms", self.step - 1, 1e3 * self.last_batch_seconds)
        return x_BT, y_BT

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch for `step`: steps must come in order; later steps fast-forward."""
        if step < self.step:
            raise UserError(
                f"the streaming loader is at step {self.step} and cannot go back to step {step}; "
                "restore its state_dict from the checkpoint of that step"
            )
        while self.step < step:
            self.next_batch()
        return self.next_batch()

    def state_dict(self) -> dict:
        """JSON-serialisable position of the stream (see the module doc for guarantees)."""
        pos = _copy(self._pos)
        pos["dropped_from_buffer"] = pos.pop("buffered")
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "config": dict(self._config),
            "step": self.step,
            "pending": base64.b64encode(self._pending.astype("<u2").tobytes()).decode(),
            **pos,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind or state.get("version") != STATE_VERSION:
            raise UserError(
                f"the checkpoint's data state is not a version-{STATE_VERSION} streaming state "
                f"(kind={state.get('kind')!r}); set data.streaming to what the run started with"
            )
        for key, value in self._config.items():
            if state["config"].get(key) != value:
                raise UserError(
                    f"the streaming state was saved with {key}={state['config'].get(key)!r} "
                    f"but this run uses {value!r}; resume with the same data settings"
                )
        self.close()
        self.step = state["step"]
        self._pending = np.frombuffer(base64.b64decode(state["pending"]), "<u2").astype(TOKEN_DTYPE)
        keys = ("source_state", "epoch", "row", "train_docs", "epoch_tokens", "rng")
        self._pos = {k: _copy(state[k]) for k in keys} | {"buffered": 0}

    def close(self) -> None:
        """Stop reading ahead (documents read but not used are dropped)."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
        self._items.clear()

    def _next_doc_tokens(self) -> np.ndarray:
        while not self._items:
            if self._ahead is None:
                self._ahead = _ReadAhead(self._reader, self._pos)
                weakref.finalize(self, self._ahead.stop.set)
            item = self._ahead.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            self._items.extend(item)
        arr, self._pos = self._items.popleft()
        return arr


class _Reader:
    """Documents of one process, in order, from a given position; run by one thread."""

    def __init__(self, *, ds, field, spec, val_fraction, moved, process, shuffle_buffer,
                 seq_len, threads):  # fmt: skip
        self.ds, self.field, self.spec = ds, field, spec
        self.val_fraction, self.moved = val_fraction, moved
        self.p, self.n = process
        self.shuffle_buffer, self.seq_len, self.threads = shuffle_buffer, seq_len, threads
        self.start_state = _copy(ds.state_dict())

    def restore(self, pos: dict) -> None:
        self.epoch, self.row = pos["epoch"], pos["row"]
        self.train_docs, self.epoch_tokens = pos["train_docs"], pos["epoch_tokens"]
        self.rng = None
        if self.shuffle_buffer:
            self.rng = np.random.default_rng()
            self.rng.bit_generator.state = pos["rng"]
        self.buffer: list[str] = []
        self.ds.load_state_dict(_copy(pos["source_state"]))
        self.it = None

    def chunk(self) -> list[tuple[np.ndarray, dict]]:
        """The next documents' tokens, each with the position just after it."""
        texts, positions = [], []
        chars = 0
        ended = False
        while chars < CHUNK_CHARS and len(texts) < CHUNK_DOCS:
            text = self._next_text()
            if text is None:
                ended = True
                break
            texts.append(text)
            positions.append(self._position())
            chars += len(text)
        out = []
        for arr, pos in zip(encode_documents(texts, self.threads), positions, strict=True):
            self.epoch_tokens += len(arr)
            pos["epoch_tokens"] = self.epoch_tokens
            out.append((arr, pos))
        if ended:
            self._end_epoch()
        return out

    def _position(self) -> dict:
        return {
            "source_state": _copy(self.ds.state_dict()),
            "epoch": self.epoch,
            "row": self.row,
            "train_docs": self.train_docs,
            "epoch_tokens": None,  # filled in once tokenised
            "rng": _copy(self.rng.bit_generator.state) if self.rng is not None else None,
            "buffered": len(self.buffer),
        }

    def _end_epoch(self) -> None:
        if self.epoch_tokens < self.seq_len + 1:
            who = f" for process {self.p} of {self.n}" if self.n > 1 else ""
            raise UserError(
                f"corpus smaller than one sequence: a pass over {self.spec!r} gives "
                f"{self.epoch_tokens} training tokens{who} but a sequence needs "
                f"seq_len+1={self.seq_len + 1}; use more text or a smaller seq_len"
            )
        self.epoch += 1
        self.row = self.train_docs = self.epoch_tokens = 0
        self.ds.load_state_dict(_copy(self.start_state))
        self.it = None

    def _next_text(self) -> str | None:
        """The next document (through the shuffle buffer), None at the end of the epoch."""
        if not self.shuffle_buffer:
            return self._pull()
        while len(self.buffer) < self.shuffle_buffer:
            text = self._pull()
            if text is None:
                break
            self.buffer.append(text)
        if not self.buffer:
            return None
        j = int(self.rng.integers(len(self.buffer)))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def _pull(self) -> str | None:
        """The next train document of this process straight from the source."""
        if self.it is None:
            self.it = iter(self.ds)
        for example in self.it:
            text = stream_text(example, self.field, self.row, self.spec)
            self.row += 1
            if not text or split_of(doc_digest(text), self.val_fraction, self.moved) != "train":
                continue
            k = self.train_docs
            self.train_docs += 1
            if k % self.n == self.p:
                return text
        return None


class _ReadAhead:
    """A daemon thread filling a bounded queue with `_Reader` chunks (or the error it hit)."""

    def __init__(self, reader: _Reader, pos: dict):
        self.queue: queue.Queue = queue.Queue(maxsize=AHEAD_CHUNKS)
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(reader, _copy(pos)), daemon=True, name="gpt2_jax-stream"
        )
        self.thread.start()

    def _run(self, reader: _Reader, pos: dict) -> None:
        try:
            reader.restore(pos)
            while not self.stop.is_set():
                items = reader.chunk()
                if items:
                    self._put(items)
        except BaseException as e:  # handed to the training thread, which raises it
            self._put(e)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self):
        return self.queue.get()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def _copy(state):
    """A deep, JSON-checked copy (`datasets` keeps mutating the state it hands out)."""
    return json.loads(json.dumps(state))
