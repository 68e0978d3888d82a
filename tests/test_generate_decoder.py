"""The decoder's host-side costs (issue #19): bucketed lengths share compiled steps, and the
compute-dtype weight copy is made once per model, not per token."""

import jax
import jax.extend
import numpy as np
from flax import nnx
from gen_helpers import random_model

from gpt2_jax import generate as G
from gpt2_jax.config import ModelConfig
from gpt2_jax.decode import kv_cache
from gpt2_jax.decode.kv_cache import bucket_len, cache_size

TINY = dict(n_layer=1, n_head=4, n_embd=32, tie_embeddings=False)


def test_prompt_lengths_in_one_bucket_compile_prefill_and_decode_once():
    cfg = ModelConfig(**TINY, vocab_size=40, pos_embedding="rope")  # compiled nowhere else
    model = random_model(cfg, seed=3)
    before = G.TRACES.copy()  # a Counter: 0 for steps not traced yet
    outs = [G.generate(model, list(range(1, T + 1)), max_new_tokens=2) for T in (17, 23, 30)]
    assert [o.shape for o in outs] == [(1, 2)] * 3
    assert G.TRACES["prefill"] == before["prefill"] + 1
    assert G.TRACES["decode"] == before["decode"] + 1
    G.generate(model, list(range(40)), max_new_tokens=2)  # the next bucket: 64 positions
    assert G.TRACES["prefill"] == before["prefill"] + 2


def test_bucket_lengths_and_cache_sizes():
    rope = ModelConfig(**TINY, pos_embedding="rope")
    assert [bucket_len(rope, n) for n in (1, 16, 17, 256, 257, 600)] == [16, 16, 32, 256, 512, 768]
    learned = ModelConfig(**TINY, max_seq_len=300)
    assert [bucket_len(learned, n) for n in (100, 257, 300, 305)] == [128, 300, 300, 305]
    window = ModelConfig(**TINY, pos_embedding="rope", attention_window=100)
    # A rolling cache never needs more than w + ahead slots; below that the bucket rules.
    assert cache_size(window, bucket_len(window, 5000), ahead=3) == 103
    assert cache_size(window, bucket_len(window, 20), ahead=3) == 32
    padded = G.padded_prompt(rope, [[5, 6, 7]])
    assert padded.dtype == np.int32 and padded.tolist() == [[5, 6, 7] + [0] * 13]


def _decode_converts(dec: G.Decoder, cache, sampling) -> list:
    """Shapes of the weight-shaped fp32 matrices the jitted decode step converts."""
    weights = {x.shape for x in dec.state.leaves if x.ndim == 2}
    B = cache.pos_BS.shape[0]
    tok_B, pos_B = np.zeros(B, np.int32), np.full(B, 3, np.int32)
    keys_B, temp = G.sample_keys(0, B), np.float32(0)
    jaxpr = jax.make_jaxpr(lambda *a: dec._decode(*a, **sampling.filters))(
        dec.state.leaves, cache, tok_B, pos_B, keys_B, temp
    )

    def walk(jx):
        for eqn in jx.eqns:
            aval = eqn.invars[0].aval if eqn.invars else None
            if eqn.primitive.name == "convert_element_type" and aval.dtype == np.float32:
                if aval.shape in weights:
                    yield aval.shape
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from walk(sub)

    return list(walk(jaxpr.jaxpr))


def test_compute_dtype_weights_are_cast_once_per_model():
    cfg = ModelConfig(**TINY, vocab_size=48, max_seq_len=32, dtype="bfloat16")
    model = random_model(cfg, seed=4)
    before = kv_cache.CASTS["copies"]
    first = G.generate(model, [1, 2, 3], max_new_tokens=4, temperature=0.0)
    state = kv_cache.decode_state(model)
    np.testing.assert_array_equal(G.generate(model, [1, 2, 3], max_new_tokens=4, temperature=0.0),
                                  first)  # fmt: skip
    assert kv_cache.CASTS["copies"] == before + 1 and kv_cache.decode_state(model) is state

    # Matmul and embedding weights are stored in bf16, LayerNorm parameters as they are.
    params = {k: v[...] for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    as_decoded = kv_cache.decoding_model(state.graph, state.leaves)
    decoded = {k: v[...] for k, v in nnx.to_flat_state(nnx.state(as_decoded, nnx.Param))}
    assert decoded.keys() == params.keys()
    assert all(decoded[k].shape == v.shape for k, v in params.items())
    assert decoded[("h", 0, "mlp", "c_fc", "kernel")].dtype == jax.numpy.bfloat16
    assert decoded[("wte", "embedding")].dtype == jax.numpy.bfloat16
    assert decoded[("h", 0, "ln_1", "scale")].dtype == np.float32
    np.testing.assert_array_equal(
        np.asarray(decoded[("lm_head", "kernel")], np.float32),
        np.asarray(params[("lm_head", "kernel")].astype(jax.numpy.bfloat16), np.float32),
    )
    # So the jitted decode step converts no weight matrix.
    dec, cache = G.Decoder(model), kv_cache.init_cache(cfg, 1, 16)
    assert _decode_converts(dec, cache, G.Sampling(0.0)) == []

    # Weights replaced in place: a new copy of the new weights.
    nnx.update(model, jax.tree.map(lambda x: -x if x.dtype == np.float32 else x, nnx.state(model)))
    fresh = kv_cache.decode_state(model)
    assert fresh is not state and kv_cache.CASTS["copies"] == before + 2
    assert float(fresh.leaves[0].ravel()[0]) == -float(state.leaves[0].ravel()[0])
