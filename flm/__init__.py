"""flm: a small, fast, functional library for training language models in PyTorch."""

from flm.tree import flatten, unflatten

__version__ = "0.1.0"
