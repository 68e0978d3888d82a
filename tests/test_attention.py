"""Attention backends: chunked, blocked and auto equal the xla reference; cudnn refuses
off-GPU."""

from __future__ import annotations

import functools
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from benchmarks import attention as bench
from gpt2_jax.config import ModelConfig
from gpt2_jax.errors import UserError
from gpt2_jax.model import attention
from gpt2_jax.model.attention import Target, dot_product_attention, resolve_impl, xla_attention
from gpt2_jax.model.gpt import GPT, cross_entropy
from gpt2_jax.ops.blocked_attention import blocked_attention, num_offsets, schedule
from gpt2_jax.ops.chunked_attention import chunked_attention, spans

TOL = 1e-5  # fp32 parity, absolute, on O(1) values
HEADS = {"MHA": (4, 4), "GQA": (4, 2), "MQA": (4, 1)}
# T = 45 with block 8: six blocks, the last one padded. The windows cover no window, w = 1
# (diagonal block only), w < block, w not a multiple of the block and w >= T. No window,
# w = 21 and w >= T run the triangle schedule (with window masking), w = 1 and w = 5 the band.
T, BLOCK = 45, 8
WINDOWS = {"full": None, "w1": 1, "w5": 5, "w21": 21, "w64": 64}


def _qkv_ct(n_head, n_kv_head, t, seed=0, batch=2, head_dim=16):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    q = normal(batch, t, n_head, head_dim)
    k, v = normal(batch, t, n_kv_head, head_dim), normal(batch, t, n_kv_head, head_dim)
    return q, k, v, normal(batch, t, n_head, head_dim)


TILED = {"blocked": blocked_attention, "chunked": chunked_attention}


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _pair(q, k, v, ct, window, block, impl="blocked"):
    """Output and (dq, dk, dv) for cotangent `ct` of `impl` (tile or chunk size `block`)
    and of xla, in one compile."""

    def run(fn):
        y, vjp = jax.vjp(fn, q, k, v)
        return y, vjp(ct)

    size = {"blocked": "block", "chunked": "chunk"}[impl]
    tiled = run(lambda q, k, v: TILED[impl](q, k, v, window=window, **{size: block}))
    return tiled, run(lambda q, k, v: xla_attention(q, k, v, window=window))


def _assert_close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=TOL)


@pytest.mark.parametrize("impl", TILED)
@pytest.mark.parametrize("window", WINDOWS.values(), ids=WINDOWS.keys())
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_tiled_paths_match_xla_outputs_and_grads(heads, window, impl):
    q, k, v, ct = _qkv_ct(*heads, T)
    (y, grads), (y_ref, grads_ref) = _pair(q, k, v, ct, window, BLOCK, impl)
    nonzero = (y_ref, *grads_ref[2 if window == 1 else 0 :])  # w = 1: dq = dk = 0
    assert all(float(jnp.abs(x).max()) > 0.1 for x in nonzero)
    _assert_close((y, grads), (y_ref, grads_ref))


@pytest.mark.parametrize("impl", TILED)
def test_tiled_paths_with_sequence_shorter_than_block(impl):
    q, k, v, ct = _qkv_ct(4, 2, 7, seed=1)
    _assert_close(*_pair(q, k, v, ct, 3, 128, impl))


def test_chunked_spans_cover_exactly_the_visible_keys():
    """Each query chunk's key range starts at the first key its first row can see, so no
    visible key is left out and, with a window, the work stays linear in T."""
    assert spans(45, 8, None)[-1] == (40, 45, 0)  # the last chunk is short
    assert spans(45, 8, 5) == tuple((q0, min(45, q0 + 8), max(0, q0 - 4)) for q0 in range(0, 45, 8))
    keys = sum(q1 - k0 for _, q1, k0 in spans(8192, 128, 256))
    assert keys == sum(min(q0 + 128, 8192) - max(0, q0 - 255) for q0 in range(0, 8192, 128))
    assert keys <= 8192 * (128 + 256)  # O(T·(chunk + w)), not O(T²)


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _equations(sub)


@pytest.mark.parametrize("impl", ["blocked", "chunked", "xla"])
def test_mqa_scores_are_grouped_not_repeated(impl):
    """With N = 8 query heads on one K/V head, no matmul of the forward or backward pairs
    8 heads of q with 8 heads of k/v: a head batch axis of size N would mean K/V repeated."""
    N, t = 8, 64  # 4 blocks of 16, so no other batch axis has size 8
    q, kv = jnp.ones((1, t, N, 16)), jnp.ones((1, t, 1, 16))

    def loss(q, k, v):
        return dot_product_attention(q, k, v, window=40, impl=impl, block=16).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv).jaxpr
    dots = [e for e in _equations(jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) >= 5  # scores, p·v and the backward products
    for eqn in dots:
        (_, _), (batch_lhs, _) = eqn.params["dimension_numbers"]
        sizes = [eqn.invars[0].aval.shape[d] for d in batch_lhs]
        assert N not in sizes, (impl, [v.aval.shape for v in eqn.invars])


def test_schedule_picks_the_cheaper_tiling():
    assert num_offsets(100, 128, 256) == 3  # query block i needs key blocks i-2 .. i
    assert num_offsets(100, 128, 129) == 2 and num_offsets(100, 128, 1) == 1
    assert num_offsets(4, 128, 10_000) == 4 and num_offsets(4, 128, None) == 4
    # A narrow window computes n * n_off tiles on the band; no window, the n(n+1)/2 triangle.
    assert schedule(128, 128, 256) == "band" and schedule(128, 128, None) == "triangle"
    assert schedule(6, 8, 64) == "triangle" and schedule(6, 8, 5) == "band"
    assert schedule(1, 128, None) == "band"  # one block: a single tile either way


def test_auto_rule_and_auto_matches_xla():
    t_min, t_long = attention.AUTO_BLOCKED_MIN_T, attention.AUTO_LONG_T
    f32, bf16 = jnp.float32, jnp.bfloat16
    for target in (Target("cuda", (9, 0)), Target("rocm"), Target("tpu")):
        rule = functools.partial(resolve_impl, "auto", f32, target=target)
        assert rule(seq_len=t_min - 1, window=None) == "xla"
        assert rule(seq_len=t_min - 1, window=8) == "xla"
        assert rule(seq_len=4000, window=256) == "blocked"
        assert rule(seq_len=t_long + 1, window=None) == "blocked"
        long = "splash" if target.platform == "tpu" else "blocked"  # T a multiple of 128
        assert rule(seq_len=4096, window=256) == rule(seq_len=t_long, window=None) == long
    # CPU (measured): chunked while a query sees at most the span limit of keys, then blocked.
    span = attention.AUTO_CHUNKED_MAX_SPAN
    cpu = functools.partial(resolve_impl, "auto", f32, target=Target("cpu"))
    assert cpu(seq_len=64, window=None) == cpu(seq_len=span, window=None) == "chunked"
    assert cpu(seq_len=span + 1, window=None) == "blocked"
    assert cpu(seq_len=16384, window=256) == cpu(seq_len=16384, window=span) == "chunked"
    assert cpu(seq_len=4096, window=span + 1) == "blocked"
    assert cpu(seq_len=span, window=span + 1) == "chunked"  # the window is wider than T
    h100 = Target("cuda", (9, 0))
    assert resolve_impl("auto", f32, seq_len=4096, window=4096, target=h100) == "xla"
    assert resolve_impl("auto", f32, seq_len=4096, window=2048, target=h100) == "xla"
    assert resolve_impl("auto", bf16, seq_len=4096, window=None, target=h100) == "cudnn"
    assert resolve_impl("auto", bf16, head_dim=160, target=h100) == "xla"
    assert resolve_impl("auto", bf16) == "chunked"  # no GPU here, so never cudnn
    for impl in ("xla", "chunked", "blocked", "cudnn", "splash"):
        assert resolve_impl(impl, jnp.float32) == impl
    t, w = attention.AUTO_BLOCKED_MIN_T, 16
    assert resolve_impl("auto", jnp.float32, seq_len=t, window=w) == "chunked"
    q, k, v, _ = _qkv_ct(2, 1, t, batch=1, head_dim=8)
    got = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, window=w, impl="auto"))(q, k, v)
    _assert_close(got, xla_attention(q, k, v, window=w))


def test_explicit_mask_runs_on_xla_for_every_impl():
    q, k, v, _ = _qkv_ct(4, 2, 12)
    i = jnp.arange(12)
    mask_BTS = jnp.broadcast_to(
        (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 4), (2, 12, 12)
    )
    want = xla_attention(q, k, v, window=4)
    for impl in ("xla", "chunked", "blocked", "cudnn", "splash", "auto"):
        got = dot_product_attention(q, k, v, window=None, impl=impl, mask_BTS=mask_BTS)
        _assert_close(got, want)


def test_cudnn_refused_on_cpu_with_the_fix():
    q, k, v, _ = _qkv_ct(4, 2, 8)
    for x in (q, q.astype(jnp.bfloat16)):
        with pytest.raises(UserError, match="use attention_impl=blocked or xla"):
            dot_product_attention(x, x[:, :, :2], x[:, :, :2], window=None, impl="cudnn")
    with pytest.raises(UserError, match="unknown attention impl"):
        dot_product_attention(q, k, v, window=None, impl="flash")
    with pytest.raises(UserError, match="positive"):
        dot_product_attention(q, k, v, window=0, impl="xla")
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, attention_impl="cudnn")
    with pytest.raises(UserError, match="cudnn needs a CUDA GPU"):
        GPT(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 4), jnp.int32))


def test_bench_cli_refuses_cudnn_and_bad_flags(capsys):
    for argv in (
        ["--impls", "cudnn"],
        ["--impls", "splash"],
        ["--impls", "flash"],
        ["--windows", "0"],
        ["--seq-lens", "1k"],
        ["--n-head", "4", "--n-kv-head", "3"],
    ):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv + ["--plot", "none"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


def test_bench_json_records_and_exponent(capsys, tmp_path):
    png = tmp_path / "scaling.png"
    argv = ["--seq-lens", "64,128", "--windows", "none,16", "--impls", "xla,blocked"]
    argv += ["--n-head", "2", "--n-kv-head", "1", "--head-dim", "8", "--block", "32"]
    assert bench.main(argv + ["--repeats", "1", "--json", "--plot", str(png)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in out]
    assert len(records) == 8
    assert {(r["impl"], r["T"], r["window"]) for r in records} == {
        (i, t, w) for i in ("xla", "blocked") for t in (64, 128) for w in (None, 16)
    }
    for r in records:
        assert set(r) == set(bench.FIELDS)
        assert (r["n_head"], r["n_kv_head"], r["head_dim"], r["batch"]) == (2, 1, 8, 1)
        assert r["fwd_bwd_ms"] > 0 and r["peak_bytes"] > 0
    xla_full = {r["T"]: r["peak_bytes"] for r in records if r["impl"] == "xla" and not r["window"]}
    assert xla_full[128] > 3 * xla_full[64]  # the T×T scores dominate: about 4x
    assert png.stat().st_size > 10_000
    assert bench.fit_exponent([1, 2, 4], [3.0, 12.0, 48.0]) == pytest.approx(2.0)


def test_bench_skips_points_that_do_not_fit_and_ratios_at_largest_timed_t(capsys, monkeypatch):
    monkeypatch.setattr(bench, "_available_bytes", lambda: 1)  # nothing fits
    argv = ["--seq-lens", "32", "--impls", "xla", "--windows", "none", "--n-head", "1"]
    assert bench.main(argv + ["--head-dim", "8", "--repeats", "1", "--plot", "none"]) == 0
    out = capsys.readouterr().out
    assert "xla        full     32     skipped" in out  # compiled memory shown, not run
    rec = lambda impl, t, ms: dict(impl=impl, T=t, window=None, fwd_bwd_ms=ms, peak_bytes=t)  # noqa: E731
    records = [rec("xla", 2, 40.0), rec("xla", 4, None), rec("blocked", 2, 10.0)]
    records.append(rec("blocked", 4, 20.0))
    rows = {line[:18].strip(): line.split() for line in bench.summarise(records).splitlines()}
    assert rows["blocked full"][2:] == ["1.00", "1.00", "4", "20.0", "4.0x", "at", "2"]
    assert rows["xla full"][2:] == ["-", "1.00", "4", "-", "1.0x", "at", "2"]


def _train(cfg: ModelConfig, state, tokens_BT, steps: int):
    """Losses, gradients and parameters after each SGD step, starting from `state`."""
    model = GPT(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, state)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # SGD, not Adam: Adam divides by |g|, so a 1e-8 difference in a near-zero gradient
    # becomes an lr-sized step difference; SGD keeps parameter differences lr × Σ|Δg|.
    opt = optax.sgd(0.5, momentum=0.9)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(tokens_BT[:, :-1])
            return cross_entropy(logits, tokens_BT[:, 1:])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state, history = opt.init(params), []
    for _ in range(steps):
        params, opt_state, loss, grads = step(params, opt_state)
        history.append((loss, grads, params))
    return history


@pytest.mark.parametrize("impl", TILED)
def test_training_with_tiled_paths_matches_xla_step_by_step(impl):
    # T = 150 > default block 128: two blocks, the second padded; window 40 spans both.
    kw = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=256)
    kw |= dict(pos_embedding="rope", attention_window=40)
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 151)), jnp.int32)
    state = nnx.state(GPT(ModelConfig(**kw, attention_impl="xla"), rngs=nnx.Rngs(0)))
    runs = [
        _train(ModelConfig(**kw, attention_impl=name), state, tokens_BT, steps=3)
        for name in ("xla", impl)
    ]
    losses = [float(h[0]) for h in runs[0]]
    assert losses[-1] < losses[0] - 0.01  # the steps really train
    for (loss_x, grads_x, params_x), (loss_b, grads_b, params_b) in zip(*runs, strict=True):
        assert abs(float(loss_b) - float(loss_x)) <= TOL
        _assert_close(grads_b, grads_x)
        _assert_close(params_b, params_x)


@pytest.mark.parametrize("impl", TILED)
def test_tiled_paths_refuse_bad_shapes_and_sizes(impl):
    q, k, v, _ = _qkv_ct(4, 3, 8)  # 3 K/V heads do not divide 4 query heads
    with pytest.raises(ValueError, match="K dividing N"):
        TILED[impl](q, k, v, window=None)
    q, k, v, _ = _qkv_ct(4, 2, 8)
    with pytest.raises(ValueError, match="window must be positive"):
        TILED[impl](q, k, v, window=0)
