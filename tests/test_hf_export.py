"""HF interop beyond GPT-2: to-hf folders transformers loads exactly (GPT-2, Starcoder2,
GPTBigCode), from-hf of transformers' own folders, tokenizer files, and one-line errors.

Logit tolerance: max |ours - theirs| / max |ours| <= REL_TOL over a [2, 32] batch, fp32 on CPU
(measured 0.5-2.3e-6: only the order of fp32 sums differs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gpt2_jax.config import ModelConfig
from gpt2_jax.formats.hf_format import load_hf_folder, save_hf_folder
from gpt2_jax.formats.weights import load_hf_state_dict, to_hf_state_dict
from gpt2_jax.generate import generate
from gpt2_torch_ref import load_folder
from tests.gen_helpers import random_model
from tests.test_convert import assert_user_error, forward, run_cli

REL_TOL = 1e-5
BASE = dict(vocab_size=96, n_layer=2, n_head=4, n_embd=64, max_seq_len=32)
TOKENS = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 32))
VARIANTS = {  # name → (config changes, transformers class to_hf targets)
    "standard": ({}, "GPT2LMHeadModel"),
    "rope_nobias_untied": (
        dict(pos_embedding="rope", bias=False, tie_embeddings=False),
        "Starcoder2ForCausalLM",
    ),
    "rope_gqa": (dict(pos_embedding="rope", n_kv_head=2), "Starcoder2ForCausalLM"),
    "rope_gqa_window": (
        dict(pos_embedding="rope", n_kv_head=2, attention_window=5),
        "Starcoder2ForCausalLM",
    ),
    "learned_mqa": (dict(n_kv_head=1), "GPTBigCodeForCausalLM"),
}


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def random_gpt(cfg: ModelConfig, seed: int):
    """Weights far from init: LayerNorm scales 1 ± 0.1, everything else (biases and LayerNorm
    shifts included) N(0, 0.3²), so greedy argmaxes are far from ties. Built from abstract
    shapes (`random_model`): an eager init would compile once per parameter shape."""
    model = random_model(cfg, seed)
    rng = np.random.default_rng(seed)
    state = {}
    for name, arr in to_hf_state_dict(model).items():
        noise = rng.standard_normal(arr.shape).astype(np.float32)
        ln_scale = ".ln_" in name and name.endswith("weight")
        state[name] = 1.0 + 0.1 * noise if ln_scale else 0.3 * noise
    load_hf_state_dict(model, state)
    model.eval()
    return model


def rel_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(tokens))
    return (out.logits if hasattr(out, "logits") else out).numpy()


def load_eval(path: Path):
    """Our model from a folder, dropout off (transformers' configs default to 0.1)."""
    model = load_hf_folder(path)
    model.eval()
    return model


def assert_same_weights(got, model) -> None:
    want, have = to_hf_state_dict(model), to_hf_state_dict(got)
    assert sorted(want) == sorted(have)
    for name in want:
        np.testing.assert_array_equal(have[name], want[name], err_msg=name)
    assert got.cfg == model.cfg


def export(model, tmp_path: Path, capsys) -> tuple[Path, str]:
    save_hf_folder(model, tmp_path / "ck")
    code, _, err = run_cli(
        ["to-hf", "--checkpoint", tmp_path / "ck", "--out", tmp_path / "hf"], capsys
    )
    assert code == 0, err
    return tmp_path / "hf", err


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_loads_in_transformers_exactly(tmp_path, capsys, name):
    from transformers import AutoModelForCausalLM

    changes, cls = VARIANTS[name]
    model = random_gpt(ModelConfig(**BASE, **changes), seed=5)
    out, err = export(model, tmp_path, capsys)
    assert cls in err.splitlines()[1] and err.splitlines()[1].startswith("format: ")
    ours = np.asarray(forward(model, jnp.asarray(TOKENS)))
    for impl in ("eager", "sdpa"):
        hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation=impl).eval()
        assert type(hf).__name__ == cls
        assert rel_diff(ours, torch_logits(hf, TOKENS)) <= REL_TOL, impl
    assert rel_diff(ours, torch_logits(load_folder(out), TOKENS)) <= REL_TOL

    # Greedy decoding past the window (w = 5 < 28 positions), with each side's KV cache.
    prompt, steps = TOKENS[:, :4], 24
    want = generate(model, prompt, max_new_tokens=steps, temperature=0.0)
    with torch.no_grad():
        got = hf.generate(
            torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    np.testing.assert_array_equal(got[:, 4:].numpy(), want)
    assert len(set(want[0].tolist())) > 3  # not a degenerate constant continuation

    code, _, err = run_cli(["from-hf", "--hf-dir", out, "--out", tmp_path / "back"], capsys)
    assert code == 0, err
    assert_same_weights(load_hf_folder(tmp_path / "back"), model)


def _perturb(model, keep_zero: tuple[str, ...] = ()) -> None:
    """Random transformers init → weights far from init (LayerNorms included)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(keep_zero):
                continue
            norm = "norm" in name or ".ln_" in name
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if norm and "weight" in name else
                    0.3 * torch.randn_like(p))  # fmt: skip


def _starcoder2(**kw):
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
               rope_theta=500.0, sliding_window=6, eos_token_id=None)  # fmt: skip
    cfg["bos_token_id"] = None
    return Starcoder2ForCausalLM(Starcoder2Config(**{**cfg, **kw}))


def _bigcode(**kw):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    cfg = dict(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32,
               bos_token_id=None, eos_token_id=None)  # fmt: skip
    return GPTBigCodeForCausalLM(GPTBigCodeConfig(**{**cfg, **kw}))


TRANSFORMERS_MODELS = {
    "starcoder2_gqa_window": lambda: _starcoder2(),
    "starcoder2_nobias_untied": lambda: _starcoder2(
        use_bias=False, tie_word_embeddings=False, sliding_window=None
    ),
    "bigcode_mqa": lambda: _bigcode(multi_query=True),
    "bigcode_mha_untied": lambda: _bigcode(multi_query=False, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", list(TRANSFORMERS_MODELS))
def test_from_hf_reads_transformers_folders_exactly(tmp_path, capsys, name):
    hf = TRANSFORMERS_MODELS[name]().eval()
    nobias = name.endswith("nobias_untied")
    _perturb(hf, keep_zero=("norm.bias",) if nobias else ())
    # As large checkpoints are saved: shards (model.safetensors.index.json) for one case,
    # bfloat16 (which numpy lacks) for another; the reference is the bf16 weights in fp32.
    bf16 = name == "bigcode_mqa"
    hf.to(torch.bfloat16 if bf16 else torch.float32)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB" if nobias else "5GB")
    hf.float()
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == nobias
    code, _, err = run_cli(
        ["from-hf", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ck"], capsys
    )
    assert code == 0, err
    ours = load_eval(tmp_path / "ck")
    assert ours.cfg.bias == (not nobias)
    want = torch_logits(hf, TOKENS)
    assert rel_diff(np.asarray(forward(ours, jnp.asarray(TOKENS))), want) <= REL_TOL
    assert rel_diff(torch_logits(load_folder(tmp_path / "hf"), TOKENS), want) <= REL_TOL


def test_prefix_less_gpt2_weights_are_read(tmp_path, capsys):
    """GPT2LMHeadModel.from_pretrained loads GPT2Model-style names (no `transformer.`)."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=None, eos_token_id=None)  # fmt: skip
    hf = GPT2LMHeadModel(config).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    sd = load_file(weights)
    save_file({k.removeprefix("transformer."): v for k, v in sd.items()}, weights, {"format": "pt"})
    assert "wte.weight" in load_file(weights) and "h.0.attn.c_attn.weight" in load_file(weights)
    want = torch_logits(hf, TOKENS)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert rel_diff(want, torch_logits(reloaded, TOKENS)) <= REL_TOL  # transformers accepts it

    code, _, err = run_cli(
        ["from-hf", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ck"], capsys
    )
    assert code == 0, err
    ours = np.asarray(forward(load_eval(tmp_path / "ck"), jnp.asarray(TOKENS)))
    assert rel_diff(ours, want) <= REL_TOL
    assert rel_diff(torch_logits(load_folder(tmp_path / "hf"), TOKENS), want) <= REL_TOL


def test_unrepresentable_variant_needs_trust_remote_code(tmp_path, capsys):
    """Its folder carries modeling code (tests/test_hf_remote.py), which transformers runs only
    when told to."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(**BASE, n_kv_head=2, attention_window=4)  # learned positions + GQA + window
    model = random_gpt(cfg, seed=6)
    out, err = export(model, tmp_path, capsys)
    line = err.splitlines()[1]
    assert line.startswith("format: gpt2_jax's extended GPT-2 (model_type gpt2_jax)")
    assert "2 kv heads for 4 query heads, attention window 4" in line
    assert "trust_remote_code=True" in line
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2_jax"
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out)
    ours = np.asarray(forward(model, jnp.asarray(TOKENS)))
    assert rel_diff(ours, torch_logits(load_folder(out), TOKENS)) <= REL_TOL
    assert_same_weights(load_hf_folder(out), model)


def test_older_extended_files_still_load(tmp_path):
    """Before Starcoder2 export, RoPE models were GPT-2 names under model_type gpt2 + our keys."""
    from safetensors.numpy import save_file

    cfg = ModelConfig(**BASE, pos_embedding="rope", n_kv_head=2, attention_window=5, bias=False)
    model = random_gpt(cfg, seed=7)
    old = tmp_path / "old"
    old.mkdir()
    save_file(to_hf_state_dict(model), old / "model.safetensors", {"format": "pt"})
    config = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=96,
                  n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                  n_kv_head=2, pos_embedding="rope", rope_theta=10000.0, attention_window=5,
                  bias=False)  # fmt: skip
    (old / "config.json").write_text(json.dumps(config))
    assert_same_weights(load_hf_folder(old), model)
    ours = np.asarray(forward(model, jnp.asarray(TOKENS)))
    assert rel_diff(ours, torch_logits(load_folder(old), TOKENS)) <= REL_TOL


def test_tokenizer_files_work_offline(tmp_path, capsys):
    from transformers import AutoTokenizer, pipeline

    from gpt2_jax.data.tokenizer import encode

    cfg = ModelConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=32, max_seq_len=64,
                      pos_embedding="rope", n_kv_head=1)  # fmt: skip
    out, err = export(random_gpt(cfg, seed=8), tmp_path, capsys)
    assert "GPT-2 tokenizer" in err.splitlines()[0] and "notice" not in err
    text = "Hello, world! It's 2024: naïve café, 東京 tabs\tand  spaces\n\nnew lines 12345."
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(text)["input_ids"] == encode(text)
    assert tok.decode(encode(text)) == text
    assert tok.eos_token_id == 50256
    pipe = pipeline("text-generation", model=str(out), device="cpu")
    result = pipe("The king", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert result.startswith("The king") and len(tok(result)["input_ids"]) == 2 + 5


# ----------------------------------------------------------------------------- bad folders


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, Path]:
    """Folders whose defects once gave tracebacks: name → folder."""
    root = tmp_path_factory.mktemp("damaged")
    good = root / "good"
    save_hf_folder(random_gpt(ModelConfig(**BASE), seed=9), good)
    truncated = _copy(good, root / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    listed = _copy(good, root / "listed")
    (listed / "config.json").write_text("[1, 2]")
    return {
        "truncated": truncated,
        "listed": listed,
        "string_window": _edit_config(_copy(good, root / "string_window"), attention_window="16"),
    }


def test_damaged_folders_are_one_line_in_every_cli(tmp_path, damaged):
    """convert from-hf, evaluate and generate, as a user runs them (all at once: each process
    spends its time starting up)."""
    fragments = {
        "truncated": "model.safetensors",
        "listed": "not a JSON object",
        "string_window": "attention_window expects int, got '16'",
    }
    data = tmp_path / "val.bin"
    np.arange(40, dtype=np.uint16).tofile(data)
    runs = []
    for name, folder in damaged.items():
        for command in (
            ["gpt2_jax.convert", "from-hf", "--hf-dir", folder, "--out", tmp_path / "out"],
            ["gpt2_jax.evaluate", "--checkpoint", folder, "--data", data],
            ["gpt2_jax.generate", "--checkpoint", folder, "--prompt-tokens", "1,2"],
        ):
            argv = [sys.executable, "-m", *map(str, command)]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            runs.append((name, command[0], proc))
    for name, cli, proc in runs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, cli, err)
        assert "Traceback" not in err and out == "", (name, cli, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, cli, err)
        assert fragments[name] in lines[0], (name, cli, err)
    assert not (tmp_path / "out").exists()


def test_unsupported_options_are_refused_in_one_line(tmp_path, capsys):
    sc2, bigcode = tmp_path / "sc2", tmp_path / "bigcode"
    _starcoder2().save_pretrained(sc2)
    _bigcode().save_pretrained(bigcode)
    nobias = tmp_path / "nobias"
    _starcoder2(use_bias=False).save_pretrained(nobias)  # LayerNorm biases: torch's init, zero
    cases = [
        (_edit_config(_copy(sc2, tmp_path / "relu"), hidden_act="relu"), "hidden_act='relu'"),
        (
            _edit_config(
                _copy(sc2, tmp_path / "scaled"),
                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
            ),
            "plain RoPE",
        ),  # fmt: skip
        (_edit_config(_copy(sc2, tmp_path / "wide"), intermediate_size=100), "intermediate_size"),
        (
            _edit_config(_copy(sc2, tmp_path / "edited"), sliding_window=4, attention_window=6),
            "disagrees",
        ),  # fmt: skip
        (_edit_config(_copy(bigcode, tmp_path / "inner"), n_inner=100), "n_inner=100"),
        (_edit_config(_copy(bigcode, tmp_path / "bert"), model_type="bert"), "model_type='bert'"),
    ]
    from safetensors.torch import load_file, save_file

    sd = load_file(nobias / "model.safetensors")
    sd["model.norm.bias"] = torch.ones_like(sd["model.norm.bias"])
    save_file(sd, nobias / "model.safetensors", {"format": "pt"})
    cases.append((nobias, "model.norm.bias is not zero"))
    for folder, fragment in cases:
        argv = ["from-hf", "--hf-dir", folder, "--out", tmp_path / "out"]
        assert_user_error(*run_cli(argv, capsys), fragment)
        assert not (tmp_path / "out").exists()


def test_vocab_that_does_not_fit_gpt2_is_a_notice(tmp_path, capsys):
    hf = _starcoder2().eval()  # vocab 96: not GPT-2's
    hf.save_pretrained(tmp_path / "hf")
    code, _, err = run_cli(
        ["from-hf", "--hf-dir", tmp_path / "hf", "--out", tmp_path / "ck"], capsys
    )
    assert code == 0, err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'ck'} (") and "Starcoder2" in lines[0]
    assert lines[-1] == (
        "notice: vocab_size 96 is not GPT-2's 50257 (or a padded one); the tiktoken GPT-2 "
        f"tokenizer does not fit it; {tmp_path / 'ck'} has no tokenizer files"
    )
    assert not (tmp_path / "ck" / "vocab.json").exists()
