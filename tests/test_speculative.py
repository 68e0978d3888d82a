"""Speculative decoding: greedy equals target-only greedy; sampled tokens follow the target."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gen_helpers import perturbed, random_model

from gpt2_jax import generate as G
from gpt2_jax.config import ModelConfig
from gpt2_jax.decode.sampling import Sampling, probs
from gpt2_jax.decode.speculative import SpecStats, speculative_generate
from gpt2_jax.errors import UserError

TINY = dict(vocab_size=64, n_head=4, n_embd=32, max_seq_len=32, tie_embeddings=False)
PROMPTS = np.array([[3, 9, 27, 17, 51, 25], [1, 2, 3, 4, 5, 6], [60, 0, 60, 0, 60, 0]])


def test_greedy_speculative_equals_target_greedy_with_rolling_cache():
    # Window target and draft: rolling caches must survive rejected drafts; past max_seq_len.
    target = random_model(
        ModelConfig(**TINY, n_layer=2, pos_embedding="rope", n_kv_head=2, attention_window=5)
    )
    draft = perturbed(target, seed=1, noise=0.03)
    want = G.generate(target, PROMPTS, max_new_tokens=36, temperature=0.0)
    stats = SpecStats()
    got = speculative_generate(
        target, draft, PROMPTS, max_new_tokens=36, k=3, sampling=Sampling(0.0),
        keys_B=G.sample_keys(0, 3), stats=stats,
    )  # fmt: skip
    np.testing.assert_array_equal(got, want)
    assert 0.05 < stats.acceptance < 0.95  # acceptance and rejection paths both taken


def test_greedy_speculative_with_itself_as_draft_accepts_all():
    target = random_model(ModelConfig(**TINY, n_layer=1, n_kv_head=1), seed=2)
    want = G.generate(target, PROMPTS, max_new_tokens=26, temperature=0.0)  # to max_seq_len
    stats = SpecStats()
    got = G.token_stream(target, PROMPTS, max_new_tokens=26, sampling=Sampling(0.0),
                         draft=target, speculative_k=4, stats=stats)  # fmt: skip
    got = np.stack([np.concatenate(r) for r in zip(*got, strict=True)])
    np.testing.assert_array_equal(got, want)
    assert stats.accepted == stats.proposed > 0


def test_draft_must_share_the_vocabulary():
    target = random_model(ModelConfig(**TINY, n_layer=1))
    draft = random_model(ModelConfig(**{**TINY, "vocab_size": 65}, n_layer=1))
    with pytest.raises(UserError, match="share one tokenizer"):
        G.generate(target, [1, 2], max_new_tokens=3, draft=draft)


def test_target_and_draft_may_pad_the_vocabulary_differently():
    # 64 ids padded to 96 in the target only: p and q are compared over the 64 real ids.
    target = random_model(ModelConfig(**TINY, n_layer=1, vocab_pad_multiple=48), seed=5)
    draft = random_model(ModelConfig(**TINY, n_layer=1), seed=6)
    want = G.generate(target, PROMPTS, max_new_tokens=10, temperature=0.0)
    got = G.generate(target, PROMPTS, max_new_tokens=10, temperature=0.0, draft=draft)
    np.testing.assert_array_equal(got, want)
    sampled = G.generate(target, PROMPTS, max_new_tokens=10, temperature=1.0, draft=draft)
    assert sampled.max() < 64


def _chi2_pvalue(counts: np.ndarray, expected_p: np.ndarray) -> tuple[float, int]:
    """Pearson chi-square p-value; cells with expected count < 5 are pooled into one."""
    n = counts.sum()
    exp = expected_p * n
    small = exp < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(exp[~small], exp[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return float(jax.scipy.special.gammaincc(df / 2, stat / 2)), df


@pytest.mark.parametrize(
    "sampling", [Sampling(temperature=1.0), Sampling(temperature=0.8, top_k=5, top_p=0.9)]
)
def test_speculative_samples_follow_the_target_distribution(sampling):
    """Tokens 3 and 4 of 20 000 sequences (k = 2: they come from accepted drafts, residual
    draws at either draft position, the all-accepted bonus and second rounds) against the
    exact target marginal from enumerating all 8^4 continuations. Fixed seed; pass if the
    chi-square p-value > 1e-3, while the draft's own marginal must be rejected (p < 1e-6)."""
    V, n, prompt = 8, 20_000, [1, 5, 2]
    tiny = dict(vocab_size=V, n_head=2, n_embd=16, max_seq_len=16, tie_embeddings=False)
    target = random_model(ModelConfig(**tiny, n_layer=2, pos_embedding="rope"), seed=3)
    draft = random_model(ModelConfig(**tiny, n_layer=1), seed=4)
    stats = SpecStats()
    out = speculative_generate(
        target, draft, np.tile(prompt, (n, 1)), max_new_tokens=4, k=2, sampling=sampling,
        keys_B=G.sample_keys(11, n), stats=stats,
    )  # fmt: skip
    assert 0.2 < stats.acceptance < 0.9  # rejections and acceptances both common
    counts = np.bincount(out[:, 2] * V + out[:, 3], minlength=V * V)

    def marginal_34(model) -> np.ndarray:
        conts = np.array(list(itertools.product(range(V), repeat=4)))
        seqs = np.concatenate([np.tile(prompt, (len(conts), 1)), conts], 1)
        logits = model(jnp.asarray(seqs[:, :-1]))[:, len(prompt) - 1 :]
        p = np.asarray(probs(logits.reshape(-1, V), sampling.temperature, **sampling.filters))
        p = p.reshape(len(conts), 4, V)
        joint = np.prod(np.take_along_axis(p, conts[:, :, None], -1)[..., 0], axis=1)
        return joint.reshape(V, V, V * V).sum((0, 1))  # over tokens 1 and 2

    want = marginal_34(target)
    assert counts[want == 0].sum() == 0  # filtered-out pairs never appear
    pvalue, df = _chi2_pvalue(counts[want > 0], want[want > 0])
    assert df >= 10 and pvalue > 1e-3, (pvalue, df)
    draft_p = marginal_34(draft)
    assert _chi2_pvalue(counts, np.maximum(draft_p, 1e-12) / draft_p.sum())[0] < 1e-6
