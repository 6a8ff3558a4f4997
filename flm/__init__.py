"""flm: a small, fast, functional library for training language models in PyTorch.

Model components are pure functions over nested parameter dicts (pytrees), differentiated with
``torch.func`` and optimised with functional transformations. See README.md.
"""

import importlib
from typing import Any

from flm import checkpoint, loss, model, nn, optim, train, tree
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.tree import flatten, unflatten

__version__ = "0.1.0"

__all__ = [
    "nn",
    "model",
    "loss",
    "tree",
    "optim",
    "train",
    "checkpoint",
    "data",
    "generate",
    "flatten",
    "unflatten",
    "TransformerConfig",
    "init_params",
    "transformer_lm",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Import ``flm.data`` and ``flm.generate`` on first use (both also run as ``python -m``)."""
    if name in ("data", "generate", "pipeline", "distributed", "tokenizer"):
        return importlib.import_module(f"flm.{name}")
    raise AttributeError(f"module 'flm' has no attribute {name!r}")
