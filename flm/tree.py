"""Pytree helpers over parameter trees (nested dicts and lists of tensors), built on optree.

A parameter tree is a nested structure of ``dict`` (string keys), ``list``/``tuple`` and
NamedTuples whose leaves are tensors. ``flatten`` turns it into the flat ``{dotted.path: tensor}``
mapping of the handout's reference state dict, and ``unflatten`` inverts it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch

__all__ = [
    "flatten",
    "unflatten",
    "tree_map",
    "tree_leaves",
    "tree_structure",
    "zeros_like",
    "path_names",
    "leaf_paths",
    "stack",
    "unstack",
    "num_elements",
    "all_finite",
]

PyTree = Any

# optree keeps ``None`` as an empty subtree by default; we never use None as a leaf.
_NS = ""


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Apply ``fn`` to every leaf of ``tree`` (and the matching leaves of ``rest``).

    Args:
        fn: function of as many leaves as trees are given.
        tree: the tree whose structure the result has.
        *rest: trees of the same structure as ``tree``.

    Returns:
        A tree of the same structure with ``fn``'s results as leaves.

    Raises:
        ValueError: when the structures of ``tree`` and ``rest`` differ.
    """
    try:
        return optree.tree_map(fn, tree, *rest, namespace=_NS)
    except (ValueError, TypeError) as err:
        raise ValueError(f"tree_map: trees do not have the same structure: {err}") from None


def tree_leaves(tree: PyTree) -> list[Any]:
    """Return the leaves of ``tree`` in optree's canonical order (dict keys sorted)."""
    return optree.tree_leaves(tree, namespace=_NS)


def tree_structure(tree: PyTree) -> Any:
    """Return the optree ``PyTreeSpec`` of ``tree``."""
    return optree.tree_structure(tree, namespace=_NS)


def zeros_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """Return a tree of zero tensors shaped like ``tree`` (optionally of another ``dtype``)."""
    return tree_map(lambda t: torch.zeros_like(t, dtype=dtype), tree)


def num_elements(tree: PyTree) -> int:
    """Return the total number of tensor elements in ``tree``."""
    return sum(int(t.numel()) for t in tree_leaves(tree))


def _entry_name(entry: Any) -> str:
    if isinstance(entry, optree.NamedTupleEntry):
        return str(entry.field)  # NamedTuple fields by name: "m", "v", "step"
    return str(entry.entry)


def leaf_paths(tree: PyTree) -> list[str]:
    """Return the dotted path of every leaf of ``tree``, in optree's canonical leaf order.

    Dict keys and list indices appear as they are; NamedTuple fields by name
    (``ScaleByAdamState(step, m, v)`` gives ``step``, ``m.…``, ``v.…``).
    """
    accessors, _, _ = optree.tree_flatten_with_accessor(tree, namespace=_NS)
    return [".".join(_entry_name(e) for e in acc) for acc in accessors]


def path_names(tree: PyTree) -> PyTree:
    """Return a tree of the same structure whose leaves are the leaves' dotted path names.

    Example: ``path_names({"layers": [{"ln1": {"weight": w}}]})`` is
    ``{"layers": [{"ln1": {"weight": "layers.0.ln1.weight"}}]}``.
    """
    return optree.tree_unflatten(tree_structure(tree), leaf_paths(tree))


def flatten(params: PyTree) -> dict[str, torch.Tensor]:
    """Flatten a parameter tree into ``{dotted path: tensor}``.

    The keys match the handout's reference state dict (§3.6), e.g. ``token_embeddings.weight``,
    ``layers.0.attn.q_proj.weight``, ``layers.0.ffn.w1.weight``, ``ln_final.weight``,
    ``lm_head.weight``. NamedTuple fields flatten by name (``m.layers.0...``), list items by index.

    Args:
        params: a nested dict/list/tuple/NamedTuple tree with tensor leaves.

    Returns:
        A ``dict`` from dotted path to tensor, in optree's canonical leaf order
        (dict keys sorted; list items in order).

    Raises:
        ValueError: if a dict key contains a ``.`` (the path would be ambiguous).
    """
    paths, leaves, _ = optree.tree_flatten_with_path(params, namespace=_NS)
    for path in paths:
        for part in path:
            if isinstance(part, str) and "." in part:
                raise ValueError(f"flatten: key {part!r} contains '.', so its dotted path is ambiguous")
    return dict(zip(leaf_paths(params), leaves))


def unflatten(flat: Mapping[str, Any], *, fill_missing: bool = False) -> PyTree:
    """Rebuild a nested tree from ``{dotted path: leaf}``; the inverse of :func:`flatten`.

    Integer path parts become list indices (sorted numerically, so ``layers.10`` comes after
    ``layers.9``); all other parts become dict keys. NamedTuples come back as dicts: to restore
    them, unflatten into a template with ``optree.tree_unflatten``.

    Args:
        flat: mapping from dotted path (``"layers.0.attn.q_proj.weight"``) to leaf.
        fill_missing: put ``None`` at list indices that have no leaves (e.g. the stateless parts
            of a ``chain`` optimiser state, which flatten to nothing) instead of raising.

    Returns:
        Nested dicts and lists with the given leaves.

    Raises:
        ValueError: if the list indices under a path are not exactly ``0 … n-1`` (unless
            ``fill_missing``), or if a path is
            both a leaf and a subtree (``"a"`` and ``"a.b"``).
    """
    root: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = root
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"unflatten: {'.'.join(parts[: i + 1])!r} is both a leaf and a subtree")
            node = child
        if parts[-1] in node:
            raise ValueError(f"unflatten: {key!r} is both a leaf and a subtree")
        node[parts[-1]] = value

    def convert(node: Any, prefix: str) -> Any:
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node):
            odd = sorted(k for k in node if k != str(int(k)))  # "01", "00": not a list index flatten writes
            if odd:
                raise ValueError(
                    f"unflatten: list indices under {prefix or '<root>'!r} must be plain integers, got {odd}"
                )
            idx = sorted(int(k) for k in node)
            if fill_missing:
                return [
                    convert(node[str(i)], f"{prefix}.{i}" if prefix else str(i)) if str(i) in node else None
                    for i in range(idx[-1] + 1)
                ]
            if idx != list(range(len(idx))):
                raise ValueError(
                    f"unflatten: list indices under {prefix or '<root>'!r} are {idx}, not 0..{len(idx) - 1}"
                )
            return [convert(node[str(i)], f"{prefix}.{i}" if prefix else str(i)) for i in idx]
        return {k: convert(v, f"{prefix}.{k}" if prefix else k) for k, v in node.items()}

    return convert(root, "")


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack trees of the same structure along a new leading axis (for ``torch.func.vmap``).

    Args:
        trees: K trees with identical structure and leaf shapes ``s``.

    Returns:
        One tree whose leaves have shape ``(K, *s)``.

    Raises:
        ValueError: if ``trees`` is empty or the structures differ.
    """
    if len(trees) == 0:
        raise ValueError("stack: need at least one tree")
    return tree_map(lambda *xs: torch.stack(xs), trees[0], *trees[1:])


def unstack(tree: PyTree) -> list[PyTree]:
    """Split a tree with a leading axis of size K into K trees; the inverse of :func:`stack`.

    Raises:
        ValueError: if the leaves disagree on the leading size or the tree has no leaves.
    """
    leaves, spec = optree.tree_flatten(tree, namespace=_NS)
    if not leaves:
        raise ValueError("unstack: the tree has no leaves")
    sizes = {int(x.shape[0]) if x.dim() > 0 else -1 for x in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"unstack: leaves have different leading sizes {sorted(sizes)}")
    (k,) = sizes
    return [optree.tree_unflatten(spec, [x[i] for x in leaves]) for i in range(k)]


def all_finite(tree: PyTree) -> bool:
    """Whether every floating-point leaf of ``tree`` is free of NaN and ±inf (one host sync).

    Args:
        tree: a tree of tensors (integer leaves are finite by definition).

    Returns:
        ``True`` when all float/complex leaves are finite.
    """
    checks = [
        torch.isfinite(t).all()
        for t in tree_leaves(tree)
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
    ]
    return bool(torch.stack(checks).all()) if checks else True
