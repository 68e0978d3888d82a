"""Random-access batches: determinism, restarts, process slices, shifts, and the factory."""

import numpy as np
import pytest

from gpt2_jax.config import DataConfig
from gpt2_jax.data import (
    TokenDataset,
    get_batch,
    make_train_loader,
    prepare_source,
)
from gpt2_jax.data.loader import window_starts
from gpt2_jax.errors import UserError


@pytest.fixture(scope="module")
def bin_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bin") / "train.bin"
    tokens = np.random.default_rng(0).integers(0, 50257, size=5000).astype(np.uint16)
    tokens.tofile(path)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    src = root / "src"
    src.mkdir()
    for i in range(20):
        (src / f"{i:02d}.txt").write_text(f"Text number {i}. " * (3 + i))
    cfg = DataConfig(source=str(src), val_fraction=0.2)
    prepare_source(cfg, root / "out", show_progress=False)
    return cfg, root / "out"


def test_batches_are_reproducible_across_runs_and_restarts(bin_path):
    args = dict(seed=3, batch_size=8, seq_len=32)
    first = [get_batch(TokenDataset(bin_path), step=s, **args) for s in range(6)]
    restarted = TokenDataset(bin_path)  # a fresh process resuming at step 4
    for s in (4, 5):
        x, y = get_batch(restarted, step=s, **args)
        np.testing.assert_array_equal(x, first[s][0])
        np.testing.assert_array_equal(y, first[s][1])
    assert not np.array_equal(first[0][0], first[1][0])
    other_seed = get_batch(restarted, step=0, **{**args, "seed": 4})
    assert not np.array_equal(other_seed[0], first[0][0])


def test_targets_are_inputs_shifted_by_one(bin_path):
    ds = TokenDataset(bin_path)
    x, y = get_batch(ds, seed=0, step=7, batch_size=4, seq_len=16)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int32
    starts = window_starts(0, 7, np.arange(4, dtype=np.uint64), len(ds) - 16)
    tokens = np.asarray(ds.tokens, np.int32)
    for row, s in enumerate(starts):
        np.testing.assert_array_equal(x[row], tokens[s : s + 16])
        np.testing.assert_array_equal(y[row], tokens[s + 1 : s + 17])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_partition_the_global_batch(bin_path, process_count):
    ds = TokenDataset(bin_path)
    for step in (0, 1, 9):
        gx, gy = get_batch(ds, seed=1, step=step, batch_size=8, seq_len=16)
        parts = [
            get_batch(
                ds,
                seed=1,
                step=step,
                batch_size=8,
                seq_len=16,
                process_index=p,
                process_count=process_count,
            )
            for p in range(process_count)
        ]
        assert all(px.shape == (8 // process_count, 16) for px, _ in parts)
        np.testing.assert_array_equal(np.concatenate([px for px, _ in parts]), gx)
        np.testing.assert_array_equal(np.concatenate([py for _, py in parts]), gy)


def test_every_window_start_is_reachable():
    n_starts = 16
    seen = np.concatenate(
        [window_starts(5, s, np.arange(8, dtype=np.uint64), n_starts) for s in range(100)]
    )
    assert seen.min() >= 0 and seen.max() < n_starts
    counts = np.bincount(seen, minlength=n_starts)
    assert (counts > 0).all() and counts.max() < 3 * counts.mean()
    x, y = get_batch(np.arange(20, dtype=np.uint16), seed=0, step=0, batch_size=4, seq_len=19)
    np.testing.assert_array_equal(x, np.tile(np.arange(19), (4, 1)))  # one possible window


def test_bad_batch_arguments(bin_path):
    ds = TokenDataset(bin_path)
    with pytest.raises(UserError, match="not divisible by process_count=3"):
        get_batch(ds, seed=0, step=0, batch_size=8, seq_len=4, process_count=3)
    with pytest.raises(UserError, match="process_index=2"):
        get_batch(ds, seed=0, step=0, batch_size=8, seq_len=4, process_index=2, process_count=2)
    with pytest.raises(UserError, match="smaller than one sequence"):
        get_batch(ds, seed=0, step=0, batch_size=8, seq_len=5000)


def test_token_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="not found; run `python -m gpt2_jax.data prepare"):
        TokenDataset(tmp_path / "train.bin")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(UserError, match="odd size"):
        TokenDataset(tmp_path / "odd.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    assert len(TokenDataset(tmp_path / "empty.bin")) == 0


def test_train_loader_is_get_batch_on_train_bin(prepared):
    cfg, out = prepared
    loader = make_train_loader(
        cfg, out, seed=2, batch_size=4, seq_len=8, process_index=1, process_count=2
    )
    ds = TokenDataset(out / "train.bin")
    for step in (0, 3):
        got = loader.batch(step)
        want = get_batch(
            ds, seed=2, step=step, batch_size=4, seq_len=8, process_index=1, process_count=2
        )
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert loader.state_dict() == {} and loader.last_batch_seconds > 0
    loader.load_state_dict({})
    with pytest.raises(UserError, match="streaming"):
        loader.load_state_dict({"kind": "streaming"})


def test_train_loader_checks_prepared_data(prepared, tmp_path):
    cfg, out = prepared
    args = dict(seed=0, batch_size=2, seq_len=8)
    with pytest.raises(UserError, match="meta.json is missing"):
        make_train_loader(cfg, tmp_path, **args)
    with pytest.raises(UserError, match="val_fraction=0.2"):
        make_train_loader(DataConfig(source=cfg.source, val_fraction=0.1), out, **args)
    with pytest.raises(UserError, match="smaller than one sequence"):
        make_train_loader(cfg, out, seed=0, batch_size=2, seq_len=100_000)
