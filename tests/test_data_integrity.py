"""meta.json's size + fast hash of each token file: recorded by prepare, checked at start."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import TINY_OVERRIDES

from gpt2_jax.config import DataConfig
from gpt2_jax.data import TokenDataset, integrity, make_train_loader, prepare_source, read_meta
from gpt2_jax.data.integrity import fast_hash, verify_prepared
from gpt2_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]
ARGS = dict(seed=0, batch_size=2, seq_len=8)


@pytest.fixture
def copy(prepared_shakespeare, tmp_path):
    """A private copy of the session's prepared Shakespeare (the shared one stays intact)."""
    return Path(shutil.copytree(prepared_shakespeare, tmp_path / "data"))


def overwrite_middle(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\x00\x01\x02\x03")


def one_line_error(fn) -> str:
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_meta_records_each_files_size_and_hash(copy, tmp_path):
    meta = read_meta(copy)
    assert set(meta["file_checks"]) == {"train.bin", "val.bin"}
    for name, record in meta["file_checks"].items():
        assert record["bytes"] == (copy / name).stat().st_size
        assert record["blake2b_fast"] == fast_hash(copy / name)
    assert meta["file_checks"]["train.bin"]["bytes"] == 2 * meta["tokens"]["train"]
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"{i}.txt").write_text(f"Story {i}. " * (5 + i))
    cfg = DataConfig(source=str(src), val_fraction=0.25, streaming=True)
    streamed = prepare_source(cfg, tmp_path / "s", show_progress=False)
    assert list(streamed["file_checks"]) == ["val.bin"]  # no train.bin: nothing claimed for it


def test_check_takes_milliseconds(copy):
    meta = read_meta(copy)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        verify_prepared(copy, meta)
        best = min(best, time.perf_counter() - t0)
    assert best < 0.25, best  # ≈4 ms for 3.6 MB on one core


def test_truncated_train_bin_is_a_user_error_naming_the_file(copy):
    want = (copy / "train.bin").stat().st_size
    os.truncate(copy / "train.bin", 100_000)
    msg = one_line_error(lambda: make_train_loader(DataConfig(), copy, **ARGS))
    assert f"{copy / 'train.bin'} does not match" in msg
    assert f"(100,000 bytes, expected {want:,})" in msg
    assert f"python -m gpt2_jax.data prepare --source shakespeare --out {copy}" in msg
    assert f"delete {copy}" in msg
    assert "100,000 bytes" in one_line_error(lambda: TokenDataset(copy / "train.bin"))


def test_truncated_val_bin_is_caught_by_the_loader_and_the_dataset(copy):
    os.truncate(copy / "val.bin", 1000)
    for fn in (
        lambda: make_train_loader(DataConfig(), copy, **ARGS),
        lambda: make_train_loader(DataConfig(streaming=True), copy, **ARGS),
        lambda: TokenDataset(copy / "val.bin"),  # how training opens val.bin
    ):
        assert f"{copy / 'val.bin'} does not match" in one_line_error(fn)
    TokenDataset(copy / "train.bin")  # the intact file still opens


def test_same_size_overwrite_is_caught_when_hashed_whole(copy):
    size = (copy / "train.bin").stat().st_size
    assert size <= integrity.WHOLE_MAX
    overwrite_middle(copy / "train.bin")
    assert (copy / "train.bin").stat().st_size == size
    msg = one_line_error(lambda: make_train_loader(DataConfig(), copy, **ARGS))
    assert "train.bin does not match" in msg and "same size but content hash" in msg


def test_large_files_hash_size_and_sampled_blocks_only(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "WHOLE_MAX", 10_000)
    monkeypatch.setattr(integrity, "BLOCK", 1000)
    monkeypatch.setattr(integrity, "N_BLOCKS", 4)  # blocks at 0, 33000, 66000, 99000
    path = tmp_path / "big.bin"
    data = bytearray(os.urandom(100_000))
    path.write_bytes(data)
    base = fast_hash(path)

    def hash_with(offset: int) -> str:
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        path.write_bytes(changed)
        return fast_hash(path)

    for offset in (0, 500, 33_500, 66_999, 99_999):
        assert hash_with(offset) != base, offset
    assert hash_with(50_000) == base  # between blocks: the documented blind spot
    path.write_bytes(data + b"\0\0")
    assert fast_hash(path) != base


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_prepare_notices_damage_and_restores_identical_bytes(
    copy, prepared_shakespeare, capsys, damage
):
    meta = read_meta(copy)
    want = meta["file_checks"]["train.bin"]["bytes"]
    if damage == "truncate":
        os.truncate(copy / "train.bin", 100_000)
        why = f"100,000 bytes, expected {want:,}"
    else:
        overwrite_middle(copy / "train.bin")
        why = "same size but content hash "
    capsys.readouterr()
    assert prepare_source(DataConfig(), copy, show_progress=False) == meta
    err = capsys.readouterr().err
    assert err.startswith(f"notice: {copy / 'train.bin'} does not match meta.json ({why}")
    assert err.endswith("); preparing it again\n") and err.count("\n") == 1
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (copy / name).read_bytes() == (prepared_shakespeare / name).read_bytes(), name
    prepare_source(DataConfig(), copy, show_progress=False)
    assert capsys.readouterr().err == ""  # repaired: a silent no-op again


def test_meta_without_file_checks_still_works(copy, capsys):
    old = read_meta(copy)
    del old["file_checks"]
    (copy / "meta.json").write_text(json.dumps(old, indent=2) + "\n")
    make_train_loader(DataConfig(), copy, **ARGS)
    TokenDataset(copy / "val.bin")
    assert prepare_source(DataConfig(), copy, show_progress=False) == old  # still up to date
    assert capsys.readouterr().err == ""
    os.truncate(copy / "train.bin", 100_000)  # the size its token counts imply still counts
    msg = one_line_error(lambda: make_train_loader(DataConfig(), copy, **ARGS))
    assert f"(100,000 bytes, expected {2 * old['tokens']['train']:,})" in msg
    repaired = prepare_source(DataConfig(), copy, show_progress=False)
    assert "notice: " in capsys.readouterr().err and "file_checks" in repaired


def test_training_on_a_truncated_train_bin_prepares_it_again(copy, tmp_path):
    meta = read_meta(copy)
    n = meta["tokens"]["train"]
    os.truncate(copy / "train.bin", 100_000)
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2_jax.train", *TINY_OVERRIDES, "train.max_steps=2"]
        + ["train.eval_every=0", f"train.out_dir={tmp_path / 'run'}", f"data.prepared_dir={copy}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    notice = f"notice: {copy / 'train.bin'} does not match meta.json (100,000 bytes, expected "
    assert notice + f"{2 * n:,}); preparing it again" in proc.stderr
    assert f"| {n} train tokens |" in proc.stderr
    assert (copy / "train.bin").stat().st_size == 2 * n and read_meta(copy) == meta
