"""Generation: the KV cache, sampling, the Decoder and its token streams, speculative
decoding."""
