"""Documentation that runs: docs/tutorial.md executed as a doctest (every output it shows is what
a reader gets), and the names ``dir(flm)`` offers (what tab completion shows a new user)."""

from __future__ import annotations

import doctest
import re
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"


def test_tutorial_runs_as_shown_in_seconds(tmp_path, monkeypatch):
    """The tutorial, from a tokenizer and ``init_params`` to per-example gradients, training, a
    checkpoint and generation, in a fresh directory (it writes its files there) on one thread."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the outputs shown were made so (and the suite runs so: tests/conftest.py)
    text = TUTORIAL.read_text(encoding="utf-8")
    test = doctest.DocTestParser().get_doctest(text, {"__name__": "tutorial"}, "tutorial.md", str(TUTORIAL), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    start = time.perf_counter()
    try:
        result = runner.run(test, out=report.append)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start
    assert result.failed == 0, "".join(report)
    assert result.attempted >= 40  # the whole page ran, not a fragment
    assert elapsed < 90, f"the tutorial took {elapsed:.0f} s; it should take seconds"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "stories.txt"]


def test_readme_links_the_tutorial():
    assert "(docs/tutorial.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def _setup_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("## Set-up\n", 1)[1].split("\n## ", 1)[0]


def test_readme_setup_says_what_ci_runs():
    """README's set-up section said "CI runs the same two commands": it now describes .ci/run's
    steps, and this keeps it true when .ci/run changes: its test command is README's, and every
    venv, torch pin, lint command, environment variable, marker and test file it uses is named."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_lines = {line.strip() for line in ci.splitlines()}
    setup = _setup_section()
    words = " ".join(setup.split())
    first_block = setup.split("```bash\n", 1)[1].split("```", 1)[0]
    readme_tests = [line.split("#")[0].strip() for line in first_block.splitlines() if "pytest" in line]
    assert readme_tests and all(cmd in ci_lines for cmd in readme_tests), readme_tests
    named = [
        *re.findall(r"python3 -m venv (\S+)", ci),
        *re.findall(r"torch==[\d.]+", ci),
        *re.findall(r"^(ruff [^\n]+)$", ci, re.MULTILINE),
        *re.findall(r"^export (\w+)=", ci, re.MULTILINE),
        *re.findall(r"-m (compile)\b", ci),
        *re.findall(r"tests/test_\w+\.py", ci),
    ]
    assert len(named) >= 12
    for thing in named:
        assert thing in words, f"README's set-up section does not mention {thing!r}, which .ci/run uses"


def test_readme_gives_a_cpu_only_install_within_the_supported_torch():
    """A plain ``pip install -e ".[dev]"`` brings torch's CUDA build (3.2 GB of NVIDIA wheels) to a
    CPU-only machine: the CPU line is there, pins pyproject's torch range, and says it is untested."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (torch_range,) = re.findall(r'"(torch[<>=][^"]+)"', pyproject)
    (line,) = [ln for ln in _setup_section().splitlines() if "download.pytorch.org/whl/cpu" in ln]
    assert line.startswith(f'pip install "{torch_range}" --index-url https://download.pytorch.org/whl/cpu')
    assert "not tested here" in line


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
