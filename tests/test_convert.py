"""convert from-hf / to-hf: transformers interop, bitwise round trips, one-line errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from gpt2_jax.config import ModelConfig
from gpt2_jax.convert import main as convert_main
from gpt2_jax.formats.hf_format import load_hf_folder, save_hf_folder
from gpt2_jax.formats.weights import load_hf_state_dict, to_hf_state_dict
from gpt2_jax.model.gpt import GPT
from tests import cli_helpers

LOGIT_ATOL = 1e-5  # fp32 forwards of the same weights


def run_cli(argv, capsys) -> tuple[int, str, str]:
    return cli_helpers.run_cli(convert_main, argv, capsys)


def assert_user_error(code: int, out: str, err: str, fragment: str | tuple) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert all(f in lines[0] for f in fragments), err


def randomized_gpt(cfg: ModelConfig, seed: int) -> GPT:
    """A model with weights large enough that greedy argmaxes are far from ties."""
    model = GPT(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    state = {}
    for name, arr in to_hf_state_dict(model).items():
        noise = rng.standard_normal(arr.shape).astype(np.float32)
        state[name] = (
            1.0 + 0.1 * noise if ".ln_" in name and name.endswith("weight") else 0.3 * noise
        )
    load_hf_state_dict(model, state)
    return model


forward = nnx.jit(lambda model, tokens_BT: model(tokens_BT))


def greedy_ours(model: GPT, prompt_BT: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding by repeated full forwards (no cache). The buffer keeps one shape so the
    forward compiles once; causal attention makes the zero tail invisible to earlier rows."""
    B, P = prompt_BT.shape
    tokens_BT = np.zeros((B, P + steps), np.int32)
    tokens_BT[:, :P] = prompt_BT
    for i in range(steps):
        logits_BTV = forward(model, jnp.asarray(tokens_BT))
        tokens_BT[:, P + i] = np.argmax(np.asarray(logits_BTV[:, P + i - 1]), axis=-1)
    return tokens_BT


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_loads_in_transformers_and_generates_same_tokens(tmp_path, capsys, tie):
    from transformers import GPT2LMHeadModel

    cfg = ModelConfig(
        vocab_size=80, n_layer=2, n_head=4, n_embd=32, max_seq_len=32, tie_embeddings=tie
    )
    model = randomized_gpt(cfg, seed=1)
    model.eval()
    save_hf_folder(model, tmp_path / "ck")
    code, _, err = run_cli(
        ["to-hf", "--checkpoint", tmp_path / "ck", "--out", tmp_path / "hf"], capsys
    )
    assert code == 0, err
    assert "GPT2LMHeadModel.from_pretrained" in err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5))
    steps = 20
    ours = greedy_ours(model, prompt, steps)
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor(prompt),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(theirs, ours)
    assert len(set(ours[0, 5:].tolist())) > 1  # not a degenerate constant continuation

    # The full-sequence logits agree too, not only their argmaxes.
    with torch.no_grad():
        hf_logits = hf(torch.tensor(ours)).logits.numpy()
    np.testing.assert_allclose(
        np.asarray(forward(model, jnp.asarray(ours))), hf_logits, atol=LOGIT_ATOL, rtol=0
    )


def test_round_trip_is_bitwise_identical(tmp_path, capsys):
    cfg = ModelConfig(
        vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=16,
        pos_embedding="rope", attention_window=4, tie_embeddings=False,
    )  # fmt: skip
    model = randomized_gpt(cfg, seed=2)
    save_hf_folder(model, tmp_path / "ck")
    steps = [
        ["to-hf", "--checkpoint", tmp_path / "ck", "--out", tmp_path / "a"],
        ["from-hf", "--hf-dir", tmp_path / "a", "--out", tmp_path / "b"],
        ["to-hf", "--checkpoint", tmp_path / "b", "--out", tmp_path / "c"],
    ]
    for argv in steps:
        code, _, err = run_cli(argv, capsys)
        assert code == 0, err
    assert "cannot represent" in err  # to-hf says transformers cannot hold this variant
    a, b, c = (files_of(tmp_path / d) for d in "abc")
    assert a == b == c
    want = to_hf_state_dict(model)
    got = to_hf_state_dict(load_hf_folder(tmp_path / "c"))
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert load_hf_folder(tmp_path / "c").cfg == cfg


def test_from_hf_accepts_transformers_folder_and_drops_nothing(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=70, n_positions=24, n_embd=24, n_layer=1, n_head=2)
    ).eval()
    hf.save_pretrained(tmp_path / "hf")
    code, _, err = run_cli(
        ["from-hf", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ck"], capsys
    )
    assert code == 0, err
    ours = load_hf_folder(tmp_path / "ck")
    ours.eval()
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    for name, arr in to_hf_state_dict(ours).items():
        np.testing.assert_array_equal(arr, sd[name])
    tokens = np.arange(24)[None] % 70
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(
        np.asarray(forward(ours, jnp.asarray(tokens))), want, atol=LOGIT_ATOL, rtol=0
    )


def test_training_run_evaluates_and_exports(tmp_path, capsys):
    """A real (2-step) training run: its out_dir, its step directory and its to-hf export
    evaluate identically, and the export runs in the torch reference with the same loss."""
    from gpt2_jax import evaluate
    from gpt2_jax.config import config_from_dict
    from gpt2_jax.train import train
    from gpt2_torch_ref import load_folder

    words = " ".join(f"w{i % 97} x{i % 13}" for i in range(2500))
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"Document {i}. {words}")
    run = tmp_path / "run"
    cfg = config_from_dict({
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "max_seq_len": 32,
                  "pos_embedding": "rope", "n_kv_head": 1},
        "data": {"source": str(tmp_path / "*.txt"), "val_fraction": 0.34},
        "train": {"batch_size": 2, "seq_len": 16, "max_steps": 2, "warmup_steps": 1,
                  "eval_every": 100, "log_every": 1, "out_dir": str(run)},
        "checkpoint": {"every": 2, "async_save": False},
    })  # fmt: skip
    train(cfg)
    capsys.readouterr()
    code, _, err = run_cli(["to-hf", "--checkpoint", run, "--out", tmp_path / "hf"], capsys)
    assert code == 0, err
    assert "rope positions" in err

    results = []
    for ckpt in (run, run / "checkpoints" / "2", tmp_path / "hf"):
        code = evaluate.main(
            ["--checkpoint", str(ckpt), "--data", str(run / "data"), "--seq-len", "16"]
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0] == results[1] == results[2]

    tokens = np.fromfile(run / "data" / "val.bin", np.uint16).astype(np.int64)
    ref = load_folder(tmp_path / "hf")
    nll_sum, count = 0.0, 0
    for begin in range(0, len(tokens), 16):  # stride = seq_len: windows score from begin + 1
        window = torch.tensor(tokens[begin : begin + 16])[None]
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = ref(window)[0, :-1].double()
        nll_sum += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
        count += window.shape[1] - 1
    assert results[0]["tokens"] == count
    assert results[0]["nll"] == pytest.approx(nll_sum / count, rel=1e-5)


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    save_hf_folder(GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32,
                                   max_seq_len=16), rngs=nnx.Rngs(0)), tmp_path / "hf")  # fmt: skip
    return tmp_path / "hf"


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, hf_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    for f in hf_folder.iterdir():
        (mismatch / f.name).write_bytes(f.read_bytes())
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "vocab_size": 65}))
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    for f in hf_folder.iterdir():
        (unsupported / f.name).write_bytes(f.read_bytes())
    (unsupported / "config.json").write_text(
        json.dumps({**config, "scale_attn_by_inverse_layer_idx": True})
    )
    out = tmp_path / "out"
    cases = [
        (["from-hf", "--hf-dir", tmp_path / "missing", "--out", out], "does not exist"),
        (["from-hf", "--hf-dir", empty, "--out", out], "is not a GPT-2 folder"),
        (["from-hf", "--hf-dir", mismatch, "--out", out], "shape mismatch"),
        (["from-hf", "--hf-dir", unsupported, "--out", out], "scale_attn_by_inverse_layer_idx"),
        (["to-hf", "--checkpoint", tmp_path / "missing", "--out", out], "does not exist"),
        (["to-hf", "--checkpoint", empty, "--out", out], (str(empty), "checkpoint")),
        (["to-hf", "--checkpoint", hf_folder, "--out", hf_folder], "is the input folder"),
    ]
    for argv, fragment in cases:
        assert_user_error(*run_cli(argv, capsys), fragment)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["empty", "mismatch", "unsupported", "hf"]
    )  # no temporary folders left behind

    # A non-empty --out is refused and left as it was; --overwrite replaces it.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["to-hf", "--checkpoint", hf_folder, "--out", out]
    assert_user_error(*run_cli(argv, capsys), "--overwrite")
    assert files_of(out) == {"keep.txt": b"mine"}
    code, _, err = run_cli([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert files_of(out) == files_of(hf_folder)


def test_cli_entry_point(tmp_path, hf_folder):
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2_jax.convert", "from-hf", "--hf-dir", tmp_path / "nope",
         "--out", tmp_path / "out"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --hf-dir {str(tmp_path / 'nope')!r} does not exist"
    ]
    assert proc.stdout == ""


# ----------------------------------------------------------------------------- --out safety


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under `root` ("dir" for directories)."""

    def digest(p: Path) -> str:
        return "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()

    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, prepared_shakespeare) -> Path:
    """A 2-step training run with one checkpoint, alone in its parent directory."""
    from gpt2_jax.train import train
    from tests.train_helpers import tiny_config

    run = tmp_path_factory.mktemp("convert_run") / "run"
    overrides = ("train.max_steps=2", "checkpoint.every=2", "train.eval_every=100")
    train(tiny_config(run, prepared_shakespeare, *overrides))
    assert (run / "checkpoints" / "2" / "params").is_dir()
    return run


def test_out_holding_the_run_is_refused_even_with_overwrite(tiny_run):
    """The issue #17 command and its relatives, as a user types them: nothing is deleted."""
    before = tree_hash(tiny_run.parent)
    for out in (tiny_run, tiny_run.parent, tiny_run / "checkpoints" / "2" / "params"):
        proc = subprocess.run(
            [sys.executable, "-m", "gpt2_jax.convert", "to-hf", "--checkpoint",
             tiny_run / "checkpoints", "--out", out, "--overwrite"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2, (out, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --out "), proc.stderr
        assert tree_hash(tiny_run.parent) == before, out


def test_out_near_a_run_or_checkpoint_is_refused(tmp_path, capsys, tiny_run, hf_folder):
    """Symlinks, other runs, checkpoint steps and from-hf: each refused with --overwrite."""
    (tmp_path / "link").symlink_to(tiny_run)
    other = tmp_path / "other_run"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    step = tiny_run / "checkpoints" / "2"
    cases = [
        (["to-hf", "--checkpoint", tiny_run / "checkpoints", "--out", tmp_path / "link"],
         "contains --checkpoint"),
        (["to-hf", "--checkpoint", tiny_run, "--out", step], "lies inside --checkpoint"),
        (["to-hf", "--checkpoint", hf_folder, "--out", tiny_run], "a training run"),
        (["to-hf", "--checkpoint", hf_folder, "--out", tiny_run / "checkpoints"],
         "orbax checkpoints"),
        (["to-hf", "--checkpoint", hf_folder, "--out", step], "an orbax checkpoint"),
        (["to-hf", "--checkpoint", hf_folder, "--out", step / "params" / "d"],
         "lies inside the checkpoint"),
        (["to-hf", "--checkpoint", hf_folder, "--out", other], "a training run (metrics.jsonl)"),
        (["from-hf", "--hf-dir", hf_folder, "--out", tmp_path], "contains --hf-dir"),
        (["from-hf", "--hf-dir", hf_folder, "--out", hf_folder / "sub"], "lies inside --hf-dir"),
        (["from-hf", "--hf-dir", hf_folder, "--out", tiny_run], "a training run"),
    ]  # fmt: skip
    before = {d: tree_hash(d) for d in (tiny_run.parent, tmp_path)}
    for argv, fragment in cases:
        assert_user_error(*run_cli([*argv, "--overwrite"], capsys), fragment)
        assert {d: tree_hash(d) for d in before} == before, argv


def test_overwrite_replaces_a_previous_export(tmp_path, capsys, tiny_run):
    out = tmp_path / "export"
    argv = ["to-hf", "--checkpoint", tiny_run, "--out", out]
    assert run_cli(argv, capsys)[0] == 0
    first = files_of(out)
    assert_user_error(*run_cli(argv, capsys), "--overwrite")  # a plain re-run still asks
    code, _, err = run_cli([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert files_of(out) == first
    (tmp_path / "link").symlink_to(out)  # through a symlink: the folder it names is replaced
    code, _, err = run_cli([*argv[:-1], tmp_path / "link", "--overwrite"], capsys)
    assert code == 0, err
    assert (tmp_path / "link").is_symlink() and files_of(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "link"]
