"""flm: a small, fast, functional library for training language models in PyTorch.

Model components are pure functions over nested parameter dicts (pytrees), differentiated with
``torch.func`` and optimised with functional transformations. See README.md.
"""

import importlib
from typing import Any

from flm import checkpoint, loss, model, nn, optim, tree
from flm._version import __version__
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.tree import flatten, unflatten

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
    "load_run",
    "__version__",
]


_LAZY = (
    "data",
    "train",
    "generate",
    "distributed",
    "tokenizer",
    "tokens",
    "download",
    "interop",
    "runs",
    "config",
    "sampling",
    "experiments",
    "cli",
)


def __getattr__(name: str) -> Any:
    """Import the upper modules on first use (some also run as ``python -m``), and ``load_run``."""
    if name in _LAZY:
        return importlib.import_module(f"flm.{name}")
    if name == "load_run":
        from flm.runs import load_run

        return load_run
    raise AttributeError(f"module 'flm' has no attribute {name!r}")
