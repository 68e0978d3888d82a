"""CLI input checks of evaluate and generate (issue #18): what is accepted, and bad input
refused with one `error:` line and exit code 2."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from gen_helpers import random_model

from gpt2_jax import evaluate as E
from gpt2_jax import generate as G
from gpt2_jax.config import ModelConfig
from gpt2_jax.errors import UserError
from gpt2_jax.formats import loading
from gpt2_jax.formats.hf_format import save_hf_folder
from tests.cli_helpers import run_cli

CFG = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, max_seq_len=16)
ON_CPU = jax.default_backend() == "cpu"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint `ck` and 40 tokens `val.bin`."""
    path = tmp_path_factory.mktemp("cli_inputs")
    save_hf_folder(random_model(CFG, seed=3), path / "ck")
    np.arange(40, dtype=np.uint16).tofile(path / "val.bin")
    return path


def _assert_one_line(code, out, err, fragment):
    assert (code, out) == (2, ""), err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err


def test_bad_input_in_a_subprocess_is_one_line_exit_2(files):
    ev = ["-m", "gpt2_jax.evaluate", "--checkpoint", "ck", "--data", "val.bin"]
    gen = ["-m", "gpt2_jax.generate", "--checkpoint", "ck", "--max-new-tokens", "2"]
    cases = [  # each was a traceback
        ([*ev, "--seq-len", "1"], "--seq-len must be at least 2"),
        ([*gen, "--prompt-tokens", "1", "--seed", str(10**20)], "--seed must be in [0, 2**64)"),
    ]
    if ON_CPU:
        cases += [
            ([*ev, "--dtype", "float16"], "use --dtype float32 or bfloat16"),
            ([*gen, "--prompt-tokens", "1", "--dtype", "float16"], "use --dtype float32"),
        ]
    pipe = subprocess.PIPE  # started together: each pays JAX's import time
    procs = [
        subprocess.Popen([sys.executable, *argv], cwd=files, stdout=pipe, stderr=pipe, text=True)
        for argv, _ in cases
    ]
    for (argv, fragment), proc in zip(cases, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        assert "Traceback" not in err, (argv, err)
        _assert_one_line(proc.returncode, out, err, fragment)


def test_seq_lens_below_2_refused(files, capsys):
    argv = ["--checkpoint", files / "ck", "--data", files / "val.bin", "--seq-lens", "4,1"]
    _assert_one_line(*run_cli(E.main, argv, capsys), "--seq-lens must be at least 2, got 1")
    with pytest.raises(UserError, match="at least 2"):
        E.windows(10, 1, 1)


# ----------------------------------------------------------------------------- --prompt-tokens


@pytest.mark.parametrize("text", ["1,2,3", "1 2 3", "1, 2, 3", " 1 ,2\t3\n", "1 2,3"])
def test_prompt_tokens_commas_and_or_spaces(text):
    assert G.parse_token_ids(text) == [1, 2, 3]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("1;2", "'1;2', not a token id"),
        ("12a", "'12a', not a token id"),
        ("1,,2", "an empty item"),
        ("1, ,2", "an empty item"),
        ("1,2,", "an empty item"),
        (",1", "an empty item"),
        ("1 -2", "'-2', not a token id"),
        ("+1", "not a token id"),
        ("1_0", "not a token id"),
        ("1.0", "not a token id"),
        ("\u0661", "not a token id"),  # an Arabic-Indic digit, which int() would take
        ("  ", "is empty"),
        ("9" * 30, "30-digit id"),
    ],
)
def test_prompt_tokens_refuses_anything_else(text, fragment):
    with pytest.raises(UserError, match="--prompt-tokens") as exc:
        G.parse_token_ids(text)
    assert fragment in str(exc.value)


def test_prompt_tokens_with_spaces_are_the_ids(files, capsys):
    base = ["--checkpoint", files / "ck", "--max-new-tokens", 4, "--json"]
    code, out, err = run_cli(G.main, [*base, "--prompt-tokens", "1 2 3"], capsys)
    assert code == 0, err
    line = json.loads(out)
    assert line["prompt_tokens"] == [1, 2, 3]  # was [123]
    assert out == run_cli(G.main, [*base, "--prompt-tokens", "1,2,3"], capsys)[1]
    _assert_one_line(*run_cli(G.main, [*base, "--prompt-tokens", "1 64"], capsys), "[0, 64)")


# ----------------------------------------------------------------------------- --seed


def test_seed_keys_are_64_bit_and_unchanged_below_2_32():
    for seed in (0, 5, 2**31, 2**32 - 1):  # samples drawn before the change stay the same
        np.testing.assert_array_equal(G.seed_key(seed), jax.random.PRNGKey(seed))
    keys = {tuple(np.asarray(G.seed_key(s)).tolist()) for s in (0, 2**32, 2**33, 2**64 - 1)}
    assert len(keys) == 4
    for bad in (-1, 2**64):
        with pytest.raises(UserError, match=r"\[0, 2\*\*64\)"):
            G.seed_key(bad)


def test_seed_2_32_samples_differ_from_seed_0(files, capsys):
    base = ["--checkpoint", files / "ck", "--prompt-tokens", "1,2,3", "--max-new-tokens", 8,
            "--json"]  # fmt: skip
    tokens = {}
    for seed in (0, 2**32, 2**64 - 1):
        code, out, err = run_cli(G.main, [*base, "--seed", seed], capsys)
        assert code == 0, err
        tokens[seed] = json.loads(out)["tokens"]
    assert tokens[0] != tokens[2**32] and tokens[0] != tokens[2**64 - 1]
    _assert_one_line(
        *run_cli(G.main, [*base, "--seed", -1], capsys), "--seed must be in [0, 2**64)"
    )


# ----------------------------------------------------------------------------- --dtype


def test_bfloat16_runs_on_both_clis(files, capsys):
    ev = ["--checkpoint", files / "ck", "--data", files / "val.bin"]
    code, out, err = run_cli(E.main, [*ev, "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    bf16 = json.loads(out)
    fp32 = json.loads(run_cli(E.main, ev, capsys)[1])
    assert bf16["tokens"] == fp32["tokens"] == 37
    assert bf16["nll"] == pytest.approx(fp32["nll"], rel=0.05)
    gen = ["--checkpoint", files / "ck", "--prompt-tokens", "1,2", "--max-new-tokens", 3, "--json"]
    code, out, err = run_cli(G.main, [*gen, "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) == 3


def test_float16_checkpoint_refused_on_cpu(files, capsys, monkeypatch):
    # The refusal is for the CPU backend; pin it so the test means the same on any machine.
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda p, **kw: real(p, **{"dtype": "float16"} | kw))
    argv = ["--checkpoint", files / "ck", "--prompt-tokens", "1", "--max-new-tokens", 2]
    _assert_one_line(*run_cli(G.main, argv, capsys), "this checkpoint's dtype float16")
    # An explicit --dtype overrides the checkpoint's.
    assert run_cli(G.main, [*argv, "--dtype", "float32"], capsys)[0] == 0
