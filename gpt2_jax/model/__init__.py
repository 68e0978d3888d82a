"""The GPT model: the NNX modules (`gpt`), attention dispatch, RoPE, mixture-of-experts and
the scanned layer stack."""
