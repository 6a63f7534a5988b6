"""traduire: train Transformer translation models and translate with them.

The Python API (importing traduire loads nothing else and changes nothing in the process;
each name loads its module when first used):

    import traduire
    traduire.train("configs/multi30k-en-fr.yaml", "runs/m30k", overrides=["train.max_time=30m"])
    t = traduire.Translator.load("runs/m30k")
    t.translate(["A dog runs on the beach."])
    traduire.import_model("opus-mt-en-fr", "runs/opus")     # a transformers Marian model
    traduire.export_transformers("runs/m30k", "m30k-hf")    # and the other way

`traduire.configure_runtime()` applies the process-wide settings the command line uses for
speed (glibc allocator, oneDNN cache; see runtime.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Translator", "configure_runtime", "export_transformers", "import_model",
           "load_config", "prepare", "train"]

if TYPE_CHECKING:
    from traduire.config import load_config
    from traduire.huggingface import export_transformers, import_model
    from traduire.pipeline import prepare, train
    from traduire.runtime import configure_runtime
    from traduire.translate import Translator

# traduire.train is the pipeline's function; the training loop's module is traduire.training.
_WHERE = {"Translator": "traduire.translate", "train": "traduire.pipeline",
          "prepare": "traduire.pipeline", "load_config": "traduire.config",
          "configure_runtime": "traduire.runtime", "import_model": "traduire.huggingface",
          "export_transformers": "traduire.huggingface"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'traduire' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
