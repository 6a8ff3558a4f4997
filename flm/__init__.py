"""flm: a small, fast, functional library for training language models in PyTorch.

Model components are pure functions over nested parameter dicts (pytrees), differentiated with
``torch.func`` and optimised with functional transformations. See README.md.
"""

import importlib as _importlib
from typing import Any as _Any

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


def __getattr__(name: str) -> _Any:  # Any: type checkers accept flm.load_run(...)
    """Import the upper modules on first use (some also run as ``python -m``), and ``load_run``."""
    if name in _LAZY:
        return _importlib.import_module(f"flm.{name}")
    if name == "load_run":
        from flm.runs import load_run

        return load_run
    raise AttributeError(f"module 'flm' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazily imported ones included (what tab completion offers): the
    module's own names without the private ones, plus :data:`__all__`, ``load_run`` and the lazy modules."""
    public = {n for n in globals() if not n.startswith("_")}
    return sorted(public | set(__all__) | set(_LAZY) | {"load_run", "__version__"})
