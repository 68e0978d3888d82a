"""`host_malloc.tune`: jitted calls with large temporaries stop faulting in fresh pages.

Each probe runs in its own process (the settings are process-wide) and reports the minor
page faults per call of a jitted function whose temporaries are 36 MiB each, beyond glibc's
largest mmap threshold (32 MiB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, resource, sys
from gpt2_jax import host_malloc
tuned = host_malloc.tune()
assert host_malloc.tune() is tuned  # once per process: the second call only reports
import jax, jax.numpy as jnp

@jax.jit
def f(x_NN):
    y_NN = jnp.sin(x_NN)
    z_NN = jnp.cos(y_NN) * y_NN
    return jnp.sum(z_NN @ y_NN)

x = jnp.ones((3072, 3072), jnp.float32)
for _ in range(2):
    f(x).block_until_ready()
calls = 4
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(calls):
    f(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults_per_call": faults / calls}))
"""


def _probe(setting: str) -> dict:
    env = dict(os.environ, GPT2_JAX_HOST_MALLOC=setting)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_allocator_reuses_pages_across_calls():
    default, tuned = _probe("default"), _probe("tuned")
    assert default["tuned"] is False and tuned["tuned"] is True
    # 3072² fp32 temporaries are 36 MiB each: glibc's default maps them afresh every call
    assert default["faults_per_call"] > 10_000, default
    assert tuned["faults_per_call"] < 0.05 * default["faults_per_call"], (default, tuned)
