"""KV-cache generation against full recomputation, for every attention variant, and the CLI."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gen_helpers import random_model

from gpt2_jax import generate as G
from gpt2_jax.config import ModelConfig
from gpt2_jax.data import tokenizer
from gpt2_jax.decode.kv_cache import bytes_per_token, cache_size, init_cache
from gpt2_jax.decode.sampling import Sampling, sample, step_keys
from gpt2_jax.errors import UserError
from gpt2_jax.formats.hf_format import save_hf_folder
from gpt2_jax.formats.loading import load_model

BASE = dict(vocab_size=64, n_layer=2, n_head=4, n_embd=32, max_seq_len=32, tie_embeddings=False)
ONE = dict(BASE, n_layer=1)  # fewer layers compile faster; two variants keep two
VARIANTS = {
    "learned-mha": ModelConfig(**BASE),
    "rope-gqa": ModelConfig(**ONE, pos_embedding="rope", n_kv_head=2),
    "rope-mqa-tied": ModelConfig(**{**ONE, "tie_embeddings": True}, pos_embedding="rope",
                                 n_kv_head=1),
    "learned-gqa-window": ModelConfig(**ONE, n_kv_head=2, attention_window=5),
    "rope-mha-window": ModelConfig(**BASE, pos_embedding="rope", attention_window=5),
}  # fmt: skip
PROMPT_LEN = 6


_full_forward = nnx.jit(lambda model, tokens: model(tokens))


def _new_tokens(cfg: ModelConfig) -> int:
    # Learned tables stop at max_seq_len; RoPE + window runs past it (and far past w).
    return cfg.max_seq_len - PROMPT_LEN if cfg.pos_embedding == "learned" else 40


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_decoding_matches_full_recomputation(name, temperature):
    cfg = VARIANTS[name]
    model = random_model(cfg)
    n_new = _new_tokens(cfg)
    prompt = np.array([[3, 9, 27, 17, 51, 25], [1, 2, 3, 4, 5, 6]])
    sampling = Sampling(temperature=temperature)
    keys = G.sample_keys(5, 2)
    steps = list(G.decode_steps(model, prompt, max_new_tokens=n_new, sampling=sampling,
                                keys_B=keys))  # fmt: skip
    tokens = np.stack([np.asarray(t) for t, _ in steps], 1)
    logits = np.stack([np.asarray(lg) for _, lg in steps], 1)
    seq = np.concatenate([prompt, tokens], 1)
    assert seq.shape[1] > cfg.max_seq_len or cfg.pos_embedding == "learned"

    # Full forward over the whole sequence; by causality position t's logits are what
    # recomputation from scratch would produce after t + 1 tokens.
    full = np.asarray(_full_forward(model, jnp.asarray(seq[:, :-1])))[:, PROMPT_LEN - 1 :]
    np.testing.assert_allclose(logits, full, atol=1e-5, rtol=0)
    positions = np.arange(PROMPT_LEN, seq.shape[1])

    @jax.jit  # one compile for every position (eagerly, each position's constants compiled)
    def redraw(logits_BV, position):
        return sample(logits_BV, step_keys(keys, jnp.full(2, position)), temperature)

    redrawn = [np.asarray(redraw(full[:, i], p)) for i, p in enumerate(positions)]
    np.testing.assert_array_equal(tokens, np.stack(redrawn, 1))
    if temperature > 0:  # (greedy text from random weights settles on one token)
        assert len(np.unique(tokens)) > 10


def test_window_cache_is_rolling_and_gqa_cache_is_smaller():
    cfg = VARIANTS["rope-mha-window"]
    assert {cache_size(cfg, n) for n in (6, 50, 10_000)} == {5}
    assert cache_size(cfg, 3) == 3
    assert cache_size(VARIANTS["rope-gqa"], 500) == 500
    mha = dataclasses.replace(VARIANTS["rope-gqa"], n_kv_head=4)
    gqa = dataclasses.replace(mha, n_kv_head=1)
    assert init_cache(gqa, 2, 40).nbytes * 4 == init_cache(mha, 2, 40).nbytes
    assert bytes_per_token(mha) == 2 * 1 * 4 * 8 * 4  # K and V, 1 layer, 4 heads of 8, fp32
    assert init_cache(mha, 2, 40).nbytes == 2 * 40 * bytes_per_token(mha)


def test_decode_step_compiles_once():
    cfg = dataclasses.replace(VARIANTS["rope-gqa"], vocab_size=48)  # not compiled elsewhere
    model = random_model(cfg, seed=1)
    before = G.TRACES["decode"]
    a = G.generate(model, [1, 2, 3], max_new_tokens=12, seed=0, num_samples=2)
    assert G.TRACES["decode"] == before + 1
    b = G.generate(model, [4, 5, 6], max_new_tokens=12, seed=1, num_samples=2)
    c = G.generate(model, [1, 2, 3], max_new_tokens=12, seed=0, num_samples=2)
    assert G.TRACES["decode"] == before + 1
    assert a.shape == (2, 12) and (a != b).any()
    np.testing.assert_array_equal(a, c)  # a fixed seed reproduces
    # Sample i does not depend on the batch it was drawn in.
    np.testing.assert_array_equal(G.generate(model, [[1, 2, 3]], max_new_tokens=12, seed=0), a[:1])


def test_learned_positions_stop_at_max_seq_len():
    model = random_model(VARIANTS["learned-mha"])
    with pytest.warns(UserWarning, match="max_seq_len=32"):
        out = G.generate(model, list(range(30)), max_new_tokens=10, temperature=0.0)
    assert out.shape == (1, 2)
    with pytest.raises(UserError, match="shorten the prompt"):
        G.generate(model, [1] * 33, max_new_tokens=1)
    with pytest.raises(UserError, match="must lie in"):
        G.generate(model, [1, 64], max_new_tokens=1)


# --------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def gpt2_vocab_dir(tmp_path_factory):
    """A 1-layer model with GPT-2's vocabulary, so text prompts and output work."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    cfg = ModelConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=32, max_seq_len=64,
                      pos_embedding="rope", n_kv_head=1)  # fmt: skip
    save_hf_folder(random_model(cfg, seed=2), path)
    return path


def _run(capsys, argv):
    code = G.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_matches_library(gpt2_vocab_dir, capsys):
    argv = ["--checkpoint", str(gpt2_vocab_dir), "--prompt-tokens", "1,2,3", "--max-new-tokens",
            "7", "--seed", "4", "--num-samples", "2", "--json", "--top-k", "20"]  # fmt: skip
    code, out, _ = _run(capsys, argv)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 2
    model = load_model(gpt2_vocab_dir)
    sampling = Sampling(top_k=20)
    for i, line in enumerate(lines):
        want = np.concatenate(list(G.token_stream(
            model, [1, 2, 3], max_new_tokens=7, sampling=sampling, seed=4, first_sample=i
        )))[:, 0]  # fmt: skip
        assert line["prompt_tokens"] == [1, 2, 3]
        assert line["tokens"] == want.tolist()
        assert line["text"] == tokenizer.decode(want.tolist())
    assert lines[0]["tokens"] != lines[1]["tokens"]


def test_cli_streams_text(gpt2_vocab_dir, capsys):
    common = ["--checkpoint", str(gpt2_vocab_dir), "--prompt", "Hello world", "--max-new-tokens",
              "6", "--temperature", "0.8", "--top-k", "20", "--seed", "1"]  # fmt: skip
    code, out, _ = _run(capsys, common)
    assert code == 0
    code, js, _ = _run(capsys, [*common, "--json"])
    line = json.loads(js)
    assert line["prompt_tokens"] == tokenizer.encode("Hello world") and len(line["tokens"]) == 6
    assert out == "Hello world" + line["text"] + "\n"


def test_text_stream_holds_back_split_characters():
    text = G.TextStream()
    ids = tokenizer.encode("naïve café ☃")
    pieces = [text.feed([t]) for t in ids] + [text.flush()]
    assert "".join(pieces) == "naïve café ☃"
    assert "\ufffd" not in "".join(pieces)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-tokens", "1,x"], "not a token id"),
        (["--prompt-tokens", "1,50257"], "must lie in"),
        (["--prompt-tokens", "1", "--top-p", "1.5"], "top-p"),
        (["--prompt-tokens", "1", "--speculative-k", "2"], "needs --draft-checkpoint"),
        (["--prompt-tokens", "1", "--prompt", "hi"], "not allowed with"),
        (["--prompt-tokens", "1", "--max-new-tokens", "-1"], "max-new-tokens"),
        (["--prompt-tokens", "1", "--num-samples", "0"], "num-samples"),
    ],
)
def test_cli_bad_input_is_one_line_error(gpt2_vocab_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        G.main(["--checkpoint", str(gpt2_vocab_dir), *extra])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_cli_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        G.main(["--checkpoint", str(tmp_path / "nope"), "--prompt-tokens", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
