"""Training refuses float16 (no loss scaling) in one line, before anything is built."""

from __future__ import annotations

import pytest

from gpt2_jax.config import ConfigError, load_config
from gpt2_jax.train import main, validate


@pytest.mark.parametrize(
    ("override", "fix"),
    [("model.dtype=float16", "use model.dtype=bfloat16"),
     ("model.param_dtype=float16", "use model.param_dtype=float32 (or bfloat16)")],
)  # fmt: skip
def test_float16_training_is_refused_naming_bfloat16(override, fix):
    with pytest.raises(ConfigError, match="bfloat16") as info:
        validate(load_config(None, [override]))
    assert fix in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.dtype=bfloat16"], ["model.dtype=float32"], ["model.param_dtype=bfloat16"]],
)
def test_bfloat16_and_float32_pass(overrides):
    validate(load_config(None, overrides))


def test_train_cli_refuses_float16_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["model.dtype=float16", f"train.out_dir={out}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: model.dtype=float16 trains without loss scaling")
    assert not out.exists()
