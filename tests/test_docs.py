"""Documentation that runs: what ``dir(flm)`` offers (what tab completion shows a new user)."""

from __future__ import annotations

import pytest


def test_dir_flm_lists_the_lazy_names_and_no_helper_imports():
    """``dir(flm)`` omitted ``load_run``, ``train``, ``generate`` and ``data`` (imported on first
    use) and showed ``Any`` and ``importlib``."""
    import flm

    names = dir(flm)
    for name in ("load_run", "train", "generate", "data", *flm.__all__):
        assert name in names, name
    assert "Any" not in names and "importlib" not in names
    assert [n for n in names if n.startswith("_")] == ["__version__"]
    for name in names:
        assert getattr(flm, name) is not None, name  # each one resolves
    star: dict[str, object] = {}
    exec("from flm import *", star)
    assert set(flm.__all__) <= set(star)


@pytest.mark.parametrize("name", ["Any", "importlib", "no_such_thing"])
def test_flm_has_no_helper_attribute(name):
    import flm

    with pytest.raises(AttributeError, match=name):
        getattr(flm, name)
