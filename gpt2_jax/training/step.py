"""The jitted train and eval steps: pure functions of (state, batch) with explicit shardings."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2_jax.config import ModelConfig, TrainConfig
from gpt2_jax.formats.checkpoint import TrainState
from gpt2_jax.model.gpt import GPT
from gpt2_jax.model.moe import STATS
from gpt2_jax.parallel import sharding
from gpt2_jax.training.optim import lr_schedule, make_optimizer

OPTIMIZER_SCOPE = "optimizer"


class Trainer:
    """Builds the model's graph, shardings, optimizer and the compiled step functions.

    The dropout key of micro-batch m at step s is fold_in(fold_in(seed, s), m), so the whole
    random state of a run is (seed, step): nothing else needs checkpointing.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        mesh: Mesh,
        *,
        inject_nan_step: int | None = None,
    ):
        sharding.check_heads(model_cfg.n_head, mesh)
        sharding.check_experts(model_cfg.moe_experts, mesh)
        sharding.check_batch(train_cfg.batch_size, mesh, train_cfg.grad_accum)
        sharding.check_process_batch(mesh)
        self.model_cfg, self.cfg, self.mesh = model_cfg, train_cfg, mesh
        self.tx = make_optimizer(train_cfg)
        self.schedule = lr_schedule(train_cfg)
        self.trace_count = 0  # how many times the train step was traced (compiled)
        self.stat_names = STATS if model_cfg.moe_experts else ()  # MoE stats in the metrics
        self.inject_nan_step = inject_nan_step  # test hook: that step's loss becomes NaN

        def build(cfg: ModelConfig = model_cfg) -> GPT:
            return GPT(cfg, rngs=nnx.Rngs(train_cfg.seed), remat=train_cfg.remat)

        self._build = build
        abstract = nnx.eval_shape(build)
        self.graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
        abstract.eval()  # dropout off for evaluation
        self.eval_graphdef = nnx.split(abstract, nnx.Param, ...)[0]

        self.rules = sharding.rules_for(model_cfg.n_kv_head, mesh)
        self.param_specs = sharding.param_specs(abstract_params, mesh, self.rules)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        opt_specs = sharding.opt_state_specs(self.tx, abstract_opt, self.param_specs)
        scalar = PartitionSpec()
        self.state_specs = TrainState(scalar, self.param_specs, opt_specs, scalar)
        self.state_shardings = sharding.named(mesh, self.state_specs)
        self.batch_sharding = NamedSharding(mesh, sharding.batch_spec())
        self.metric_sharding = NamedSharding(mesh, scalar)
        # Batch shards that accumulate their own gradients (see `accumulate`): only where each
        # holds whole parameters anyway (no fsdp split), so a whole gradient per device costs
        # nothing more. MoE layers gather tokens across devices, which a per-replica vmap
        # cannot express.
        n_batch = math.prod(mesh.shape[a] for a in sharding.RULES["batch"])
        per_replica = (
            model_cfg.dropout == 0
            and model_cfg.moe_experts == 0
            and not sharding.splits_params(self.param_specs, sharding.RULES["batch"], mesh)
        )
        self.replicas = n_batch if per_replica else 1

        self.init_state = jax.jit(self._init, out_shardings=self.state_shardings)
        self._state_from = jax.jit(
            self._fresh,
            in_shardings=(self.state_shardings.params,),
            out_shardings=self.state_shardings,
        )
        self.step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_sharding, self.batch_sharding),
            out_shardings=(self.state_shardings, self.metric_sharding),
            donate_argnums=(0,),
        )
        self.eval_loss = jax.jit(
            self._eval_loss,
            in_shardings=(self.state_shardings.params, self.batch_sharding, self.batch_sharding),
            out_shardings=self.metric_sharding,
        )

    # -- pure functions -------------------------------------------------------------------

    def _init(self) -> TrainState:
        params = nnx.split(self._build(), nnx.Param, ...)[1]
        return self._fresh(jax.lax.with_sharding_constraint(params, self.state_shardings.params))

    def _fresh(self, params) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, params, self.tx.init(params), zero)

    def _rest(self):
        """The non-parameter state (dropout RNG streams), built inside the trace that uses it:
        it is tiny, reseeded every step, and the unused parameter initialisers are dead code.
        So building a Trainer runs nothing, and it can compile for devices it cannot run on
        (`benchmarks/scale.py --target`)."""
        return nnx.split(self._build(), nnx.Param, ...)[2]

    @functools.cached_property
    def rest(self):
        """`_rest()` as arrays on the mesh, for `model` (computed at its first use)."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(self._rest, out_shardings=replicated)()

    def _loss(self, params, key, x_BT, y_BT, rules=None):
        """The training objective (cross-entropy + the MoE aux losses) and, as aux output,
        the pure cross-entropy and the MoE stats."""
        # A fresh RNG state of this trace, so reseeding mutates Variables of this trace.
        model = nnx.merge(self.graphdef, params, self._rest())
        if self.model_cfg.dropout > 0:
            nnx.reseed(model, default=key, policy="match_shape")  # stacked layers: a key each
        with sharding.activation_sharding(self.mesh, self.rules if rules is None else rules):
            ce, stats = model.loss_and_stats(
                x_BT, y_BT, impl=self.cfg.loss_impl, chunk=self.cfg.loss_chunk
            )
        return training_loss(ce, stats, self.model_cfg), (ce, stats)

    def accumulate(self, params, step, x_BT, y_BT):
        """Mean cross-entropy ("loss"), MoE stats and training-objective gradients over the
        grad_accum micro-batches of one global batch.

        Where the parameters are split over fsdp, each micro-batch's gradients are reduced
        onto the parameters' layout as the backward pass produces them (a reduce-scatter per
        layer), and the accumulator is that sharded gradient: no device ever holds more than
        its shard of any gradient, at one reduction per micro-batch. Where every batch shard
        holds whole parameters (a pure data axis), without dropout or MoE, each shard sums the
        gradients of its own rows over all micro-batches and the shards are reduced once per
        step. With dropout the masks are drawn over the whole micro-batch, so a run's random
        state stays (seed, step) on every mesh.
        """
        A, R = self.cfg.grad_accum, self.replicas
        B, T = x_BT.shape
        batch_axes = sharding.RULES["batch"]
        # Micro-batch a takes rows a, a+A, a+2A, …, replica r the r-th block of those: every
        # device keeps its own rows, nothing is shuffled.
        spec = (
            PartitionSpec(None, batch_axes, None, None)
            if R > 1
            else PartitionSpec(None, None, batch_axes, None)
        )

        def split(a_BT):
            a_ARbT = a_BT.reshape(R, B // (A * R), A, T).transpose(2, 0, 1, 3)
            return jax.lax.with_sharding_constraint(a_ARbT, NamedSharding(self.mesh, spec))

        step_key = jax.random.fold_in(jax.random.key(self.cfg.seed), step)
        if R > 1:
            rules = dict(self.rules, batch=None)  # inside the vmap, the batch is one replica's
            loss_fn = functools.partial(self._loss, rules=rules)
            grad_fn = jax.vmap(
                jax.value_and_grad(loss_fn, has_aux=True),
                in_axes=(None, None, 0, 0),
                spmd_axis_name=batch_axes,
            )
            zeros = sharding.replica_zeros(params, self.param_specs, R, self.mesh)
        else:

            def grad_fn(p, k, x_1bT, y_1bT):  # one replica: drop its axis
                out, grads = jax.value_and_grad(self._loss, has_aux=True)(p, k, x_1bT[0], y_1bT[0])
                return out, jax.lax.with_sharding_constraint(grads, self.state_shardings.params)

            zeros = jax.lax.with_sharding_constraint(
                jax.tree.map(jnp.zeros_like, params), self.state_shardings.params
            )

        def micro(carry, inputs):
            sums, grad_sum = carry
            m, x, y = inputs
            (_, (ce, stats)), grads = grad_fn(params, jax.random.fold_in(step_key, m), x, y)
            sums = jax.tree.map(lambda s, v: s + jnp.sum(v), sums, {"loss": ce, **stats})
            return (sums, jax.tree.map(jnp.add, grad_sum, grads)), None

        zero = jnp.zeros((), jnp.float32)
        sums = {"loss": zero, **{k: zero for k in self.stat_names}}
        inputs = (jnp.arange(A), split(x_BT), split(y_BT))
        if A == 1:  # no loop, so XLA folds the zero sums away: no zero fill, no gradient add
            (sums, grad_sum), _ = micro((sums, zeros), jax.tree.map(lambda a: a[0], inputs))
        else:
            (sums, grad_sum), _ = jax.lax.scan(micro, (sums, zeros), inputs)
        if R > 1:
            grad_sum = sharding.sum_replicas(grad_sum, self.param_specs, self.mesh)
        means = {k: v / (A * R) for k, v in sums.items()}
        grads = jax.tree.map(lambda g: g / (A * R), grad_sum)
        if self.inject_nan_step is not None:
            poison = jnp.where(step == self.inject_nan_step, jnp.nan, 0.0)
            means["loss"] = means["loss"] + poison
            grads = jax.tree.map(lambda g: g + poison, grads)
        return means, grads

    def _train_step(self, state: TrainState, x_BT, y_BT):
        self.trace_count += 1
        means, grads = self.accumulate(state.params, state.step, x_BT, y_BT)
        loss = means["loss"]
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(_):
            updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), new_opt

        # A non-finite update is never applied; the host stops or counts it (skip_nonfinite).
        # A cond, not a select of new against old: the select read and wrote every parameter
        # and moment once more, which doubled the optimizer's time on CPU (BENCHMARKS.md).
        with jax.named_scope(OPTIMIZER_SCOPE):  # names its ops in the HLO (`bench profile`)
            params, opt_state = jax.lax.cond(
                finite, apply, lambda _: (state.params, state.opt_state), None
            )
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            # optax counts applied updates only: skipped steps do not advance its schedule
            "lr": self.schedule(state.step - state.skipped),
            "finite": finite,
            "skipped": new_state.skipped,
            **{f"moe_{k}": v for k, v in means.items() if k != "loss"},
        }
        return new_state, metrics

    def _eval_loss(self, params, x_BT, y_BT):
        with sharding.activation_sharding(self.mesh, self.rules):
            model = nnx.merge(self.eval_graphdef, params, self._rest())
            return model.loss(x_BT, y_BT, impl=self.cfg.loss_impl, chunk=self.cfg.loss_chunk)

    # -- helpers --------------------------------------------------------------------------

    def state_from(self, model: GPT) -> TrainState:
        """Step 0 with `model`'s parameters (its config must be this trainer's) and a fresh
        optimizer state, laid out on the mesh."""
        return self._state_from(nnx.state(model, nnx.Param))

    def model(self, params, *, train: bool = False) -> GPT:
        """An nnx model viewing `params` (for sampling or export)."""
        graphdef = self.graphdef if train else self.eval_graphdef
        return nnx.merge(graphdef, params, self.rest)

    def shard_batch(self, x_BT, y_BT):
        """Global arrays from this process's rows of the batch."""
        to_global = lambda a: jax.make_array_from_process_local_data(self.batch_sharding, a)  # noqa: E731
        return to_global(x_BT), to_global(y_BT)


def training_loss(ce: jax.Array, stats: dict, cfg: ModelConfig) -> jax.Array:
    """Cross-entropy plus the MoE load-balance and z-losses at their config weights."""
    if not stats:
        return ce
    return ce + cfg.moe_aux_loss_coef * stats["lb_loss"] + cfg.moe_z_loss_coef * stats["z_loss"]
