"""The training loader for a config: random access over a prepared train.bin, or streaming.

Above both loaders (`loader`, `streaming`), so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from gpt2_jax.config import DataConfig
from gpt2_jax.data.dir_lock import locked
from gpt2_jax.data.integrity import verify_prepared
from gpt2_jax.data.loader import RandomAccessLoader, TokenDataset
from gpt2_jax.data.prepare import META, TRAIN, VAL, read_meta
from gpt2_jax.data.streaming import StreamingLoader
from gpt2_jax.errors import UserError


def make_train_loader(
    cfg: DataConfig,
    prepared_dir: str | Path | None,
    *,
    seed: int,
    batch_size: int,
    seq_len: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """The training loader for `cfg`: random access over `prepared_dir/train.bin`, or (with
    `data.streaming`) a `StreamingLoader` that skips the val documents recorded in
    `prepared_dir/meta.json`. Both have `batch(step)`, `state_dict()`, `load_state_dict(d)`
    and `last_batch_seconds`. The token files it uses (val.bin too) are checked against
    meta.json first: a truncated or changed file is a `UserError`."""
    args = dict(
        seed=seed,
        batch_size=batch_size,
        seq_len=seq_len,
        process_index=process_index,
        process_count=process_count,
    )
    if cfg.streaming:
        moved: dict[str, str] = {}
        if prepared_dir is not None:
            with locked(prepared_dir, exclusive=False):
                meta = read_meta(prepared_dir)
                if meta is not None:
                    _check_meta_matches(meta, cfg, prepared_dir)
                    verify_prepared(prepared_dir, meta, [VAL])  # train.bin, if any, goes unread
                    moved = meta["split"]["moved"]
        return StreamingLoader(cfg, moved=moved, **args)
    if prepared_dir is None:
        raise UserError("no prepared data directory; set data.prepared_dir or run prepare")
    with locked(prepared_dir, exclusive=False):  # meta and files from one prepare
        train = _verified_train(cfg, Path(prepared_dir))
    return RandomAccessLoader(train, **args)


def _verified_train(cfg: DataConfig, prepared_dir: Path) -> TokenDataset:
    """train.bin of `prepared_dir`, opened after its files were checked against meta.json."""
    meta = read_meta(prepared_dir)
    if meta is None:
        raise UserError(
            f"{Path(prepared_dir) / META} is missing; run `python -m gpt2_jax.data prepare "
            f"--source {cfg.source} --out {prepared_dir}` first"
        )
    _check_meta_matches(meta, cfg, prepared_dir)
    if meta["streaming"]:
        raise UserError(
            f"{prepared_dir} was prepared for streaming (no {TRAIN}); prepare it again with "
            "data.streaming=false"
        )
    verify_prepared(prepared_dir, meta)
    return TokenDataset(prepared_dir / TRAIN, verify=False)


def _check_meta_matches(meta: dict, cfg: DataConfig, prepared_dir) -> None:
    for key in ("source", "val_fraction", "text_field", "decode_errors"):
        if meta.get(key) != getattr(cfg, key):
            raise UserError(
                f"{prepared_dir} was prepared with data.{key}={meta.get(key)!r} but the config "
                f"says {getattr(cfg, key)!r}; prepare again or fix the config"
            )
