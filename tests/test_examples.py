"""Tests for the scripts in examples/: each runs in-process through its ``main(argv)``, on the
shared TinyStories excerpt when it is there and on generated text otherwise (never skipped).

``examples/train_tinystories.py`` is ``flm train`` itself; it is tested in ``tests/test_cli.py``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = ["--batch-size", "4", "--d-model", "32", "--context-length", "16", "--max-chars", "6000"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"flm_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def per_example_grads():
    return _load("per_example_grads")


def test_per_example_grads_on_generated_text(per_example_grads, monkeypatch, tmp_path, capsys):
    """Without shared data (FLM_SHARED_DATA points at an empty folder) it falls back to generated
    stories; its own check (vmap(grad) == a loop over the examples) passes."""
    monkeypatch.setenv("FLM_SHARED_DATA", str(tmp_path))
    assert per_example_grads.main([*SMALL, "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "chars of generated stories" in out
    assert "max |vmap − loop|" in out and "batch (4, 16)" in out
    assert len(re.findall(r"^ +\d+ +\d+\.\d+ +\d+\.\d+$", out, re.M)) == 4  # one row per example


def test_per_example_grads_on_shared_tinystories(per_example_grads, shared_data, monkeypatch, capsys):
    monkeypatch.setenv("FLM_SHARED_DATA", str(shared_data))
    assert per_example_grads.main(SMALL) == 0
    out = capsys.readouterr().out
    assert str(Path("tinystories") / "train.txt") in out
    assert "max |vmap − loop|" in out


def test_per_example_grads_help(per_example_grads, capsys):
    with pytest.raises(SystemExit) as e:
        per_example_grads.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--device", "--batch-size", "--seed"):
        assert flag in out
