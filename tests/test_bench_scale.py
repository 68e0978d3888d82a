"""`python -m benchmarks scale`: abstract compile figures per config, layout and loss."""

from __future__ import annotations

import json

import pytest

from benchmarks import scale


def test_each_layout_and_loss_asked_for_is_compiled_and_measured(tmp_path, capsys):
    out = tmp_path / "scale.json"
    argv = ["--configs", "tiny", "--batch-size", "2", "--seq-len", "16", "--out", str(out)]
    assert scale.main([*argv, "--json", "--loss-impls", "chunked"]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert json.loads(out.read_text()) == records
    assert "compiling tiny unrolled chunked for cpu ..." in captured.err  # before each compile
    assert [(r["layout"], r["loss_impl"]) for r in records] == [
        ("unrolled", "chunked"), ("scanned", "chunked")
    ]  # fmt: skip
    for r in records:
        assert r["config"] == "tiny"
        assert r["mesh"] == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
        assert r["compile_s"] > 0 and r["trace_s"] > 0 and r["temp_bytes"] > 0
        assert r["peak_bytes"] == (
            r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
        )
    # the state is donated: its buffers are the outputs' (aliased)
    assert all(r["alias_bytes"] > 0.9 * r["output_bytes"] for r in records)
    assert scale.main([*argv, "--layouts", "scanned", "--loss-impls", "full"]) == 0
    text = capsys.readouterr().out
    assert "B 2 × T 16" in text and text.count("\ntiny ") == 1
    for r in records:  # a CPU host: auto resolves as on CPU; the analytic FLOPs of B·T tokens
        assert r["target"] == "cpu" and r["hbm_bytes"] is None and r["fits"] is None
        assert r["attention_impl"] == "chunked" and r["moe_impl"] is None
        assert r["flops_analytic"] > 6 * 2 * 16 * 1e5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mesh", "fsdp=0"], "--mesh takes axis=size pairs"),
        (["--mesh", "pipe=2"], "--mesh takes axis=size pairs"),
        (["--layouts", "rolled"], "--layouts takes a comma-separated subset"),
        (["--loss-impls", "fused"], "--loss-impls takes a comma-separated subset"),
        (["--configs", "nope"], "no config 'nope'"),
        (["--remat", "all"], "--remat takes one of"),
        (["--out", "."], "is a directory"),
        (["--configs", "tiny", "--mesh", "fsdp=64"], "--mesh needs 64 devices"),
        (["--target", "gpu"], "--target takes cpu, tpu:TOPOLOGY (e.g. tpu:v5e:2x4) or gpu:"),
        (["--target", "tpu"], "--target takes cpu, tpu:TOPOLOGY"),
        (["--target", "gpu:b300x8"], "--target gpu:b300x8: name one of a100, h100, h200"),
        (["--target", "gpu:h100x12"], "a count that fills hosts of 8"),
        (["--target", "gpu:h100x0"], "a count that fills hosts of 8"),
    ],
)
def test_bad_flags_are_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # --mesh asks XLA for host devices: undone afterwards
    with pytest.raises(SystemExit) as exc:
        scale.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.parametrize(
    ("target", "extra"), [(("tpu", "v5e:2x4"), "tpu"), (("gpu", "h100x8"), "compile")]
)
def test_a_target_no_compiler_can_describe_is_one_line(monkeypatch, target, extra):
    from jax.experimental import topologies

    from benchmarks import _targets
    from gpt2_jax.errors import UserError

    def no_plugin(**_):
        raise RuntimeError(f"Unable to initialize backend '{target[0]}'\nmore detail")

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    with pytest.raises(UserError) as exc:
        _targets.devices(*target)
    message = str(exc.value)
    assert "\n" not in message and f"Unable to initialize backend '{target[0]}'" in message
    assert f"pip install 'gpt2-jax[{extra}]'" in message


def test_gpu_targets_describe_their_gpus_to_the_compiler():
    from benchmarks import _targets

    text = _targets.target_config(_targets.GPUS["h100"])
    assert "core_count: 132 " in text and "major: 9 minor: 0" in text
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
    assert _targets.hbm_bytes("NVIDIA H100 80GB HBM3") == 80 * 2**30
    assert _targets.usable_bytes("NVIDIA H100 80GB HBM3") == 60 * 2**30  # JAX's default 75%
    assert _targets.usable_bytes("TPU v5 lite") == _targets.hbm_bytes("TPU v5 lite")
    assert _targets.usable_bytes("cpu") is None


def test_building_a_trainer_compiles_and_runs_nothing():
    """So it can be built for compile-only devices (`--target`), which run nothing."""
    import jax

    from gpt2_jax.config import MeshConfig, load_config, resolve_config_path
    from gpt2_jax.parallel.sharding import make_mesh
    from gpt2_jax.training.step import Trainer

    cfg = load_config(resolve_config_path("tiny"), ["model.dropout=0.1"])
    compiles = []

    def listen(event, duration, **_):
        if event.endswith("backend_compile_duration"):  # XLA compiles (tracing is free)
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        trainer = Trainer(cfg.model, cfg.train, make_mesh(MeshConfig(), jax.devices()[:1]))
        assert compiles == []
        assert trainer.rest is not None  # the RNG state for `model()`: made at first use
        assert compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
