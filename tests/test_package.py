"""The installed package: a wheel that trains from an empty folder, the `gpt2-jax` command, help
that lists every config key, and configs that inherit with `base:`."""

from __future__ import annotations

import dataclasses
import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from gpt2_jax import __main__ as cli
from gpt2_jax.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    config_names,
    dump_yaml,
    load_config,
    resolve_config_path,
)
from gpt2_jax.train import build_parser

REPO = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).parent / "data" / "resolved_configs"  # before the files used base:


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv outside the checkout holding our wheel; its dependencies are this test
    environment's (a .pth line), so nothing but the wheel is installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", REPO],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("gpt2_jax-*.whl")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    (lib,) = (env_dir / "lib").glob("python3*/site-packages")
    (lib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", env_dir / "bin" / "python"]
    install = subprocess.run([*pip, "install", "--no-deps", "-q", wheel], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return env_dir


def _in_empty_folder(env_dir: Path, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([env_dir / "bin" / "gpt2-jax", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_wheel_trains_from_an_empty_folder(wheel_venv, tmp_path):
    shown = _in_empty_folder(wheel_venv, tmp_path, "train", "--config", "tiny", "--print-config")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "n_embd: 64" in shown.stdout
    overrides = [
        "train.max_steps=2",
        "train.eval_every=2",
        "checkpoint.every=2",
        "train.out_dir=run",
    ]
    run = _in_empty_folder(wheel_venv, tmp_path, "train", "--config", "tiny", *overrides)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]  # fmt: skip
    assert max(r.get("step", 0) for r in steps) == 2
    imported = subprocess.run(
        [wheel_venv / "bin" / "python", "-c", "import gpt2_jax; print(gpt2_jax.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert str(wheel_venv) in imported.stdout  # the wheel's copy, not the checkout


def test_gpt2_jax_command_and_each_subcommand_help(capsys):
    assert cli.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in cli.COMMANDS)
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as done:
            cli.main([name, "--help"])
        assert done.value.code == 0 and "usage:" in capsys.readouterr().out, name
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_train_help_lists_every_config_key_and_named_config():
    text = build_parser().format_help()
    for section in dataclasses.fields(Config):
        block = text.split(f"\n  {section.name}:\n", 1)[1]
        for f in dataclasses.fields(section.default_factory()):
            assert f"\n    {f.name}: " in "\n" + block, f"{section.name}.{f.name}"
            assert f"\n        {f.metadata['help']}\n" in block, f"{section.name}.{f.name}"
    assert "one of learned, rope" in text  # the pos_embedding values, from POS_EMBEDDINGS
    assert all(name in text for name in config_names()) and "sweep" not in config_names()


@pytest.mark.parametrize("name", sorted(p.stem for p in SNAPSHOTS.glob("*.yaml")))
def test_slimmed_configs_resolve_as_before(name):
    assert (
        dump_yaml(load_config(resolve_config_path(name)))
        == (SNAPSHOTS / f"{name}.yaml").read_text()
    )


def test_base_merges_key_by_key_and_refuses_a_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: gpt2-124m\nmodel:\n  n_layer: 2\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(tmp_path / "b.yaml", ["model.n_head=4"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (2, 4, 768)
    assert (cfg.train.lr, cfg.train.batch_size) == (1e-3, 512)
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("base: no-such-config\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "e.yaml")
    assert CONFIG_DIR.is_dir() and (CONFIG_DIR / "gpt2-124m-rope.yaml").read_text().count("\n") < 8
