"""grad_accum with MoE: one large batch's update except for the load-balance loss, whose f·P
statistics are per micro-batch; so a resume that changes grad_accum is refused there."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from gpt2_jax.config import MeshConfig, ModelConfig, TrainConfig
from gpt2_jax.parallel.sharding import make_mesh
from gpt2_jax.train import main, train
from gpt2_jax.training.step import Trainer
from tests.cli_helpers import run_cli
from tests.test_campaign import tree_hash
from tests.train_helpers import TINY_OVERRIDES, tiny_config

# Capacity drops and the z-loss on: neither depends on how the batch is split.
MOE = dict(vocab_size=64, n_layer=1, n_head=2, n_embd=16, max_seq_len=16, moe_experts=4,
           moe_top_k=2, moe_capacity_factor=1.0, moe_z_loss_coef=1e-3)  # fmt: skip


def _grads_fn(cfg: ModelConfig, batch: int, accum: int, params=None):
    """x, y → (means, gradients) of `Trainer.accumulate` at `params` (default: the trainer's
    step-0 parameters), and those parameters."""
    tc = TrainConfig(batch_size=batch, seq_len=16, grad_accum=accum)
    trainer = Trainer(cfg, tc, make_mesh(MeshConfig()))
    params = trainer.init_state().params if params is None else params
    fn = jax.jit(trainer.accumulate)
    step = np.int32(0)
    return lambda x, y: jax.device_get(fn(params, step, *trainer.shard_batch(x, y))), params


def _rel_diff(g1, g2) -> float:
    """The largest relative difference (Frobenius norm) over the gradient leaves."""
    pairs = zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True)
    return max(float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)) for a, b in pairs)


def test_moe_grad_accum_is_one_large_batch_but_for_the_load_balance_loss():
    """With the load-balance weight 0, 2 micro-batches give one large batch's loss and
    gradients; the load-balance loss itself (computed whatever its weight) is the mean over the
    micro-batches of E·Σ f·P on each one's own tokens (micro-batch a holds rows a, a+2, …), not
    the large batch's. The objective's gradient with weight c is the weight-0 one plus c times
    that loss's gradient, so this difference is all that separates them."""
    ids = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
    x, y = ids[:, :-1], ids[:, 1:]
    cfg = ModelConfig(**MOE, moe_aux_loss_coef=0.0)
    one, params = _grads_fn(cfg, 8, 1)  # the trainers below share these parameters
    (m1, g1), (m2, g2) = one(x, y), _grads_fn(cfg, 8, 2, params)[0](x, y)
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-6
    assert _rel_diff(g1, g2) <= 1e-5
    half = _grads_fn(cfg, 4, 1, params)[0]
    lb_a, lb_b = (float(half(x[a::2], y[a::2])[0]["lb_loss"]) for a in (0, 1))
    assert abs(float(m2["lb_loss"]) - (lb_a + lb_b) / 2) <= 1e-6
    assert abs(float(m1["lb_loss"]) - float(m2["lb_loss"])) > 1e-5  # docs/moe.md's exception


MOE_RUN = ["model.moe_experts=2", "model.moe_top_k=1", "train.eval_every=0"]


def _resume(out: Path, capsys, *extra: str) -> tuple[int, str]:
    argv = [*TINY_OVERRIDES, *MOE_RUN[2:], f"train.out_dir={out}", "train.max_steps=3", *extra]
    code, _, err = run_cli(main, argv, capsys)
    return code, err


def test_moe_resume_changing_grad_accum_is_refused_and_changes_nothing(
    tmp_path, prepared_shakespeare, capsys
):
    out = tmp_path / "run"
    train(tiny_config(out, prepared_shakespeare, *MOE_RUN, "train.max_steps=2"))
    before = tree_hash(tmp_path)
    data = f"data.prepared_dir={prepared_shakespeare}"
    code, err = _resume(out, capsys, data, *MOE_RUN[:2], "train.grad_accum=2")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "train.grad_accum: 1 → 2" in errors[0] and "moe_aux_loss_coef=0.01" in errors[0]
    assert "keep train.grad_accum=1" in errors[0] and "new train.out_dir" in errors[0]
    assert tree_hash(tmp_path) == before
    # Without the load-balance loss the update is the same: a notice, as for a dense model.
    code, err = _resume(out, capsys, data, *MOE_RUN[:2], "train.grad_accum=2",
                        "model.moe_aux_loss_coef=0")  # fmt: skip
    assert code == 0 and "resuming with train.grad_accum: 1 → 2" in err, err


def test_dense_resume_changing_grad_accum_is_a_notice(tmp_path, prepared_shakespeare, capsys):
    out = tmp_path / "run"
    train(tiny_config(out, prepared_shakespeare, "train.eval_every=0", "train.max_steps=2"))
    code, err = _resume(out, capsys, f"data.prepared_dir={prepared_shakespeare}",
                        "train.grad_accum=2")  # fmt: skip
    assert code == 0 and "resuming with train.grad_accum: 1 → 2" in err, err
