"""Kernels the model calls: blocked and chunked attention, the chunked LM-head loss, the
grouped expert matmul and the padded-vocabulary mask. Pure functions of arrays."""
