"""The training CLI and its pieces: end to end, accumulation, optimizer, compilation, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt2_jax.config import ConfigError, MeshConfig, ModelConfig, TrainConfig, load_config
from gpt2_jax.parallel.sharding import make_mesh
from gpt2_jax.train import main, train
from gpt2_jax.training.optim import decay_mask, lr_schedule
from gpt2_jax.training.step import Trainer
from tests.train_helpers import tiny_config, train_losses

REPO = Path(__file__).resolve().parents[1]


def test_default_command_path_end_to_end(tmp_path, prepared_shakespeare, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(out, prepared_shakespeare, "train.max_steps=12", "train.eval_every=6",
                      "train.sample_every=12")  # fmt: skip
    summary = train(cfg)
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 13))
    assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.5  # it learns
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert set(logged[0]) >= {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "mfu",
        "step_time",
    }
    # Step times are measured between full synchronisations, so no record can beat the peak.
    assert all(0 < r["mfu"] < 1.5 and r["tokens_per_sec"] > 0 for r in logged)
    assert summary["tokens_per_sec"] > 0
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [6, 12]
    assert vals[0]["val_ppl"] == pytest.approx(np.exp(vals[0]["val_loss"]), rel=1e-6)
    assert (out / "loss.png").stat().st_size > 1000
    assert load_config(out / "config.yaml") == cfg  # the resolved config round-trips
    assert (out / "checkpoints" / "12").is_dir()
    assert summary["val_loss"] == vals[-1]["val_loss"]
    assert summary["unigram_baseline_loss"] > 0
    assert "--- sample at step 12 ---" in capsys.readouterr().err


def test_no_arguments_trains_default_yaml(monkeypatch):
    """`python -m gpt2_jax.train` with no arguments resolves gpt2_jax/configs/default.yaml."""
    seen = {}
    monkeypatch.setattr("gpt2_jax.train.train", lambda cfg, **_: seen.setdefault("cfg", cfg))
    monkeypatch.chdir("/")
    assert main([]) == 0
    assert seen["cfg"] == load_config(REPO / "gpt2_jax" / "configs" / "default.yaml")


def test_sweep_parameters_are_valid_overrides():
    import yaml

    sweep = yaml.safe_load((REPO / "gpt2_jax" / "configs" / "sweep.yaml").read_text())
    assert sweep["command"][-1] == "${args_no_hyphens}"
    overrides = []
    for key, spec in sweep["parameters"].items():
        values = [spec["value"]] if "value" in spec else spec.get("values", [spec.get("min")])
        overrides += [f"{key}={yaml.safe_dump(v).splitlines()[0]}" for v in values[:1]]
    cfg = load_config(REPO / "gpt2_jax" / "configs" / "default.yaml", overrides)
    assert cfg.wandb.mode == "online" and cfg.train.lr == sweep["parameters"]["train.lr"]["min"]


def _loss_and_grads(model_cfg, accum, x, y):
    tc = TrainConfig(batch_size=x.shape[0], seq_len=x.shape[1], grad_accum=accum)
    trainer = Trainer(model_cfg, tc, make_mesh(MeshConfig()))
    state = trainer.init_state()
    fn = jax.jit(trainer.accumulate)
    return jax.device_get(fn(state.params, state.step, *trainer.shard_batch(x, y)))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_accumulation_equals_one_large_batch(dropout):
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, max_seq_len=16)
    ids = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
    x, y = ids[:, :-1], ids[:, 1:]
    means1, g1 = _loss_and_grads(cfg, 1, x, y)
    means4, g4 = _loss_and_grads(cfg, 4, x, y)
    assert abs(float(means1["loss"]) - float(means4["loss"])) <= 1e-6
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(a), 1e-12)


def test_decay_mask_covers_matrices_and_embeddings_only():
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, max_seq_len=16)
    trainer = Trainer(cfg, TrainConfig(batch_size=2, seq_len=8), make_mesh(MeshConfig()))
    params = jax.eval_shape(trainer.init_state).params
    mask = decay_mask(params)
    flat = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, v in flat.items() if v}
    assert any("wte" in k for k in decayed) and any("wpe" in k for k in decayed)
    assert any("c_attn" in k and "kernel" in k for k in decayed)
    assert not any("bias" in k or "ln_" in k or "scale" in k for k in decayed)
    assert len(decayed) == 2 + 4  # wte, wpe and the four kernels of the one block


def test_schedule_values():
    tc = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lr = lr_schedule(tc)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)  # cosine midpoint
    assert float(lr(110)) == pytest.approx(1e-4)
    assert float(lr(500)) == pytest.approx(1e-4)


def test_train_step_compiles_once():
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, max_seq_len=16)
    tc = TrainConfig(batch_size=4, seq_len=8, grad_accum=2)
    trainer = Trainer(cfg, tc, make_mesh(MeshConfig()))
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    for _ in range(4):
        ids = rng.integers(0, 64, (4, 9)).astype(np.int32)
        state, _ = trainer.step(state, *trainer.shard_batch(ids[:, :-1], ids[:, 1:]))
    assert trainer.trace_count == 1
    assert trainer.step._cache_size() == 1


def test_overrides_parse_yaml_scalars():
    overrides = ["train.lr=3e-4", "model.attention_window=null", "train.remat=block"]
    cfg = load_config(None, [*overrides, "model.bias=false", "train.peak_flops=1e12"])
    assert cfg.train.lr == 3e-4 and cfg.model.attention_window is None
    assert cfg.model.bias is False and cfg.train.remat == "block" and cfg.train.peak_flops == 1e12


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.nope=1"], "unknown config key 'train.nope'"),
        (["nosection.x=1"], "unknown config key 'nosection'"),
        (["train.batch_size=abc"], "train.batch_size expects int"),
        (["model.bias=3"], "model.bias expects bool"),
        (["train.lr"], "is not section.key=value"),
        (["--config", "does/not/exist.yaml"], "config file 'does/not/exist.yaml' not found"),
        (["train.batch_size=6", "train.grad_accum=4"], "not divisible by train.grad_accum"),
        (["train.seq_len=2048"], "exceeds model.max_seq_len"),
        (["train.out_dir=/etc/hostname/sub"], "is not writable"),
        (["model.n_head=5"], "not divisible by model.n_head"),
        (["train.profile_steps=[3,2]"], "train.profile_steps=[3, 2] must be [START, STOP]"),
        (["train.profile_steps=[1]"], "must be [START, STOP] with 1 <= START <= STOP"),
        (["train.profile_steps=[1,2000]"], "STOP <= train.max_steps=400"),
        (["train.profile_steps=x"], "train.profile_steps expects list[int]"),
        (["train.loss_impl=fused"], "unknown train.loss_impl='fused'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_input_from_the_shell_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2_jax.train", "train.batch_size=6", "train.grad_accum=4"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: train.batch_size=6 is not divisible")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_print_config(capsys):
    assert main(["--print-config", "train.lr=1e-3"]) == 0
    assert "lr: 0.001" in capsys.readouterr().out


def test_wandb_offline_writes_its_files(tmp_path, prepared_shakespeare, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = tiny_config(out, prepared_shakespeare, "train.max_steps=2", "wandb.mode=offline",
                      "train.eval_every=0", "checkpoint.every=0")  # fmt: skip
    train(cfg)
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_config_error_type():
    with pytest.raises(ConfigError):
        load_config(None, ["train.max_steps=1.5"])


def test_profile_steps_write_a_trace_of_those_steps(tmp_path, prepared_shakespeare, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(out, prepared_shakespeare, "train.max_steps=4", "train.eval_every=0",
                      "train.profile_steps=[2,3]")  # fmt: skip
    assert train(cfg)["steps"] == 4
    traces = list((out / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert f"profile of steps 2–3 in {out / 'profile'}/" in capsys.readouterr().err
    assert sorted(train_losses(out)) == [1, 2, 3, 4]  # the run itself is unchanged


def test_moe_run_logs_router_stats_resumes_and_exports(tmp_path, prepared_shakespeare, capsys):
    from gpt2_jax.convert import main as convert_main
    from gpt2_jax.formats.hf_format import load_hf_folder

    out = tmp_path / "moe"
    moe = ["model.n_layer=2", "model.moe_experts=4", "model.moe_every=2",
           "model.moe_capacity_factor=1.0", "train.eval_every=3", "checkpoint.every=3"]  # fmt: skip
    train(tiny_config(out, prepared_shakespeare, *moe, "train.max_steps=6",
                      "train.sample_every=6"))  # fmt: skip
    assert "--- sample at step 6 ---" in capsys.readouterr().err
    train(tiny_config(out, prepared_shakespeare, *moe, "train.max_steps=8"))  # resumes at 6
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 9))
    for r in logged:
        # one MoE layer of 4 experts, top-2: the busiest expert takes at least 1/4 of the
        # assignments, the idlest at most 1/4; lb = 4·Σ f·P lies in (0, 4], 1 when balanced
        assert 0.25 <= r["moe_busiest"] <= 0.5 and 0 <= r["moe_idlest"] <= 0.25
        assert 0 < r["moe_lb_loss"] <= 4 and r["moe_z_loss"] > 0 and 0 <= r["moe_dropped"] < 1
    assert logged[-1]["loss"] < logged[0]["loss"]
    code = convert_main(["to-hf", "--checkpoint", str(out), "--out", str(tmp_path / "hf")])
    assert code == 0
    folder = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert folder["model_type"] == "gpt2_jax" and folder["moe_experts"] == 4
    assert load_hf_folder(tmp_path / "hf").cfg.moe_capacity_factor == 1.0
