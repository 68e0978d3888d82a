"""Training data: sources → GPT-2 tokens on disk (`prepare`), and batches from them.

`python -m gpt2_jax.data prepare --source SRC --out DIR` writes train.bin / val.bin / meta.json.
"""

from gpt2_jax.data.factory import make_train_loader
from gpt2_jax.data.integrity import verify_prepared
from gpt2_jax.data.loader import RandomAccessLoader, TokenDataset, get_batch
from gpt2_jax.data.prepare import prepare_source, read_meta
from gpt2_jax.data.sources import Source, resolve_source
from gpt2_jax.data.streaming import StreamingLoader

__all__ = [
    "RandomAccessLoader",
    "Source",
    "StreamingLoader",
    "TokenDataset",
    "get_batch",
    "make_train_loader",
    "prepare_source",
    "read_meta",
    "resolve_source",
    "verify_prepared",
]
