"""traduire: train and use Transformer translation models from the command line."""

import os

# bf16 matrix products on CPU go through oneDNN, which compiles a kernel per tensor shape and
# keeps 1024 of them by default. Token-budget batches come in hundreds of shapes, so the default
# cache thrashes and recompiles every step; a larger one keeps them all (the user's value wins).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

__version__ = "0.1.0"
