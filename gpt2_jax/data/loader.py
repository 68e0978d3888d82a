"""Random-access batches from prepared token files."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from gpt2_jax.data.dir_lock import locked
from gpt2_jax.data.integrity import expected_files, verify_prepared
from gpt2_jax.data.prepare import read_meta
from gpt2_jax.data.tokens import TOKEN_DTYPE
from gpt2_jax.errors import UserError

log = logging.getLogger(__name__)

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


class TokenDataset:
    """A prepared token file (`train.bin` / `val.bin`), memory-mapped read-only. When the
    meta.json beside it describes it, its size and fast hash are checked first (`verify`)."""

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(
                f"token file {self.path} not found; run `python -m gpt2_jax.data prepare "
                f"--source SRC --out {self.path.parent}` first"
            )
        if verify:
            with locked(self.path.parent, exclusive=False):  # meta and file from one prepare
                meta = read_meta(self.path.parent)
                if meta is not None and self.path.name in expected_files(meta):
                    verify_prepared(self.path.parent, meta, [self.path.name])
                self.tokens = self._open()
        else:
            self.tokens = self._open()

    def _open(self) -> np.ndarray:
        size = self.path.stat().st_size
        if size % TOKEN_DTYPE().itemsize:
            raise UserError(f"{self.path} has an odd size ({size} bytes); re-run prepare")
        return (
            np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r") if size else np.zeros(0, TOKEN_DTYPE)
        )

    def __len__(self) -> int:
        return len(self.tokens)


def window_starts(seed: int, step: int, rows: np.ndarray, n_starts: int) -> np.ndarray:
    """Start offset in [0, n_starts) of each global row of step `step`: a counter-based hash
    (splitmix64) of (seed, step, row), so any row is computable alone and the result never
    depends on numpy's generator streams."""
    with np.errstate(over="ignore"):
        key = _mix(_mix(np.array([seed & _MASK64], _U64)) ^ _U64(step & _MASK64))
        return (_mix(key ^ rows.astype(_U64)) % _U64(n_starts)).astype(np.int64)


def get_batch(
    dataset: TokenDataset | np.ndarray,
    *,
    seed: int,
    step: int,
    batch_size: int,
    seq_len: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of the global batch for `step`: (inputs_BT, targets_BT) int32 with
    targets = inputs shifted by one. A pure function of (seed, step, process, shape); the
    global batch is the process slices concatenated in process order."""
    tokens = dataset.tokens if isinstance(dataset, TokenDataset) else dataset
    name = str(dataset.path) if isinstance(dataset, TokenDataset) else "the token array"
    local = _local_rows(batch_size, seq_len, process_index, process_count)
    if step < 0:
        raise UserError(f"step must be >= 0, got {step}")
    n = len(tokens)
    if n < seq_len + 1:
        raise UserError(
            f"corpus smaller than one sequence: {name} has {n} tokens but a sequence needs "
            f"seq_len+1={seq_len + 1}; use more text or a smaller train.seq_len"
        )
    rows = np.arange(process_index * local, (process_index + 1) * local, dtype=np.uint64)
    starts_B = window_starts(seed, step, rows, n - seq_len)
    w_BT = np.asarray(tokens[starts_B[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
    return np.ascontiguousarray(w_BT[:, :-1]), np.ascontiguousarray(w_BT[:, 1:])


class RandomAccessLoader:
    """Training batches by step from a token file; it has no state to checkpoint."""

    kind = "random_access"

    def __init__(
        self,
        dataset: TokenDataset,
        *,
        seed: int,
        batch_size: int,
        seq_len: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.dataset = dataset
        self._args = dict(
            seed=seed,
            batch_size=batch_size,
            seq_len=seq_len,
            process_index=process_index,
            process_count=process_count,
        )
        self.last_batch_seconds = 0.0
        self.batch(0)  # fail now, not at step 0 of training, on a too-small corpus

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        out = get_batch(self.dataset, step=step, **self._args)
        self.last_batch_seconds = time.perf_counter() - t0
        log.debug("batch %d loaded in %.2f ms", step, 1e3 * self.last_batch_seconds)
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state and state.get("kind") != self.kind:
            raise UserError(
                f"the checkpoint's data state is for a {state.get('kind')!r} loader; set "
                "data.streaming to what the run was started with"
            )


def _local_rows(batch_size: int, seq_len: int, process_index: int, process_count: int) -> int:
    if batch_size <= 0 or seq_len <= 0:
        raise UserError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise UserError(f"process_index={process_index} not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise UserError(
            f"global batch_size={batch_size} is not divisible by process_count={process_count}; "
            "pick a batch size that every process can share equally"
        )
    return batch_size // process_count


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (wrapping uint64 arithmetic)."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))
