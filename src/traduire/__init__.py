"""traduire: train and use Transformer translation models from the command line."""

from traduire import runtime

runtime.apply()

__version__ = "0.1.0"
