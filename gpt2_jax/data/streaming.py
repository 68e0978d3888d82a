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

Resume guarantees (`state_dict()` → `load_state_dict()`):
- shuffle_buffer == 0: exact — the batches after a resume are the batches an uninterrupted
  run would have produced. The state holds the `datasets` iterator position, the unused
  tokens of the current document and counters, so its size grows with document length.
- shuffle_buffer > 0 (the caveat): the documents sitting in the shuffle buffer are not
  saved. After a resume they are skipped for the rest of that epoch (at most
  `shuffle_buffer` documents per resume), the buffer refills from the saved source
  position, and batches differ from an uninterrupted run. Resuming twice from one state
  still gives the same batches (the generator's state is saved).
"""

from __future__ import annotations

import base64
import json
import logging
import time

import numpy as np

from gpt2_jax.config import DataConfig
from gpt2_jax.data.loader import _local_rows
from gpt2_jax.data.prepare import stream_text
from gpt2_jax.data.sources import resolve_source
from gpt2_jax.data.split import doc_digest, split_of
from gpt2_jax.data.tokens import TOKEN_DTYPE, encode_documents
from gpt2_jax.errors import UserError

log = logging.getLogger(__name__)

STATE_VERSION = 1


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
        self.cfg = cfg
        self.seq_len = seq_len
        self.moved = dict(moved or {})
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
        self._source = resolve_source(cfg)
        self._ds, self._field = self._source.iterable_dataset()
        self._start_state = _copy(self._ds.state_dict())
        self.last_batch_seconds = 0.0
        self._reset(seed)

    def _reset(self, seed: int) -> None:
        self.step = 0
        self._epoch = 0
        self._row = 0  # source rows read this epoch (for error messages)
        self._train_docs = 0  # train documents seen this epoch, all processes
        self._epoch_tokens = 0  # tokens this process produced this epoch
        self._pending = np.zeros(0, TOKEN_DTYPE)
        self._buffer: list[str] = []
        self._iter = None
        self._resume_state = self._start_state  # where `iter()` will start the source
        p = self._config["process_index"]
        self._rng = np.random.default_rng([seed, p]) if self.cfg.shuffle_buffer else None

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
        source_state = self._ds.state_dict() if self._iter is not None else self._resume_state
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "config": dict(self._config),
            "step": self.step,
            "epoch": self._epoch,
            "row": self._row,
            "train_docs": self._train_docs,
            "epoch_tokens": self._epoch_tokens,
            "source_state": _copy(source_state),
            "pending": base64.b64encode(self._pending.astype("<u2").tobytes()).decode(),
            "rng": self._rng.bit_generator.state if self._rng is not None else None,
            "dropped_from_buffer": len(self._buffer),
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
        self.step = state["step"]
        self._epoch = state["epoch"]
        self._row = state["row"]
        self._train_docs = state["train_docs"]
        self._epoch_tokens = state["epoch_tokens"]
        raw = base64.b64decode(state["pending"])
        self._pending = np.frombuffer(raw, "<u2").astype(TOKEN_DTYPE)
        if self._rng is not None and state["rng"] is not None:
            self._rng.bit_generator.state = state["rng"]
        self._buffer = []  # not saved: the shuffle-buffer caveat
        self._resume_state = _copy(state["source_state"])
        self._ds.load_state_dict(_copy(self._resume_state))
        self._iter = None

    def _next_doc_tokens(self) -> np.ndarray:
        while True:
            text = self._next_text()
            if text is not None:
                (arr,) = encode_documents([text])
                self._epoch_tokens += len(arr)
                return arr
            self._end_epoch()

    def _end_epoch(self) -> None:
        p, n = self._config["process_index"], self._config["process_count"]
        if self._epoch_tokens < self.seq_len + 1:
            who = f" for process {p} of {n}" if n > 1 else ""
            raise UserError(
                f"corpus smaller than one sequence: a pass over {self.cfg.source!r} gives "
                f"{self._epoch_tokens} training tokens{who} but a sequence needs "
                f"seq_len+1={self.seq_len + 1}; use more text or a smaller seq_len"
            )
        self._epoch += 1
        self._row = self._train_docs = self._epoch_tokens = 0
        self._resume_state = self._start_state
        self._ds.load_state_dict(_copy(self._start_state))
        self._iter = None

    def _next_text(self) -> str | None:
        """The next document for this process (through the shuffle buffer), None at epoch end."""
        size = self.cfg.shuffle_buffer
        if not size:
            return self._pull()
        while len(self._buffer) < size:
            text = self._pull()
            if text is None:
                break
            self._buffer.append(text)
        if not self._buffer:
            return None
        j = int(self._rng.integers(len(self._buffer)))
        self._buffer[j], self._buffer[-1] = self._buffer[-1], self._buffer[j]
        return self._buffer.pop()

    def _pull(self) -> str | None:
        """The next train document of this process straight from the source."""
        if self._iter is None:
            self._iter = iter(self._ds)
        p, n = self._config["process_index"], self._config["process_count"]
        for example in self._iter:
            text = stream_text(example, self._field, self._row, self._source.spec)
            self._row += 1
            if not text or split_of(doc_digest(text), self.cfg.val_fraction, self.moved) != "train":
                continue
            k = self._train_docs
            self._train_docs += 1
            if k % n == p:
                return text
        return None


def _copy(state: dict) -> dict:
    """A deep, JSON-checked copy (`datasets` keeps mutating the state it hands out)."""
    return json.loads(json.dumps(state))
