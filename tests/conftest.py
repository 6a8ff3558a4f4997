"""Shared test configuration: hypothesis profiles, the location of ../shared/data, and one tiny
end-to-end ``flm train`` run (on a slice of the shared TinyStories text) that CLI tests copy."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci": bounded examples, no deadline (CI machines are slow and shared); "dev": the default;
# "long": a thorough local run (HYPOTHESIS_PROFILE=long pytest).
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# One intra-op thread for the whole suite: the tensors are tiny, so thread-pool overhead dominates
# (up to ~40× per op when pytest-xdist workers oversubscribe a 2-core machine).
torch.set_num_threads(1)


def shared_data_dir() -> Path | None:
    """Return ../shared/data (or $FLM_SHARED_DATA) if it exists, else None."""
    env = os.environ.get("FLM_SHARED_DATA")
    candidates = [Path(env)] if env else []
    root = Path(__file__).resolve().parent.parent
    candidates += [root.parent / "shared" / "data", root / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; tests that need it are skipped when it is absent."""
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared data not found (set FLM_SHARED_DATA or place it at ../shared/data)")
    return d


@pytest.fixture(scope="session")
def texts(shared_data, tmp_path_factory):
    """(train, valid): 60 KB and 10 KB slices of the shared TinyStories excerpt."""
    d = tmp_path_factory.mktemp("texts")
    src = shared_data / "tinystories"
    train, valid = d / "train.txt", d / "valid.txt"
    train.write_text((src / "train.txt").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    valid.write_text((src / "valid.txt").read_text(encoding="utf-8")[:10_000], encoding="utf-8")
    return train, valid


def train_argv(texts, out, *extra):
    """``flm train`` arguments for the tiny preset on ``texts`` into ``out``."""
    train, valid = texts
    return [
        "train",
        "--preset",
        "tiny",
        "--train-text",
        str(train),
        "--valid-text",
        str(valid),
        "--out-dir",
        str(out),
        "--device",
        "cpu",
        "--num-workers",
        "1",
        "--max-new-tokens",
        "12",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_run(texts, tmp_path_factory):
    """A finished tiny run (40 steps); tests copy it before changing anything."""
    from flm.cli import main

    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(train_argv(texts, out)) == 0
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with ``FLM_SLOW=1`` (their bounded forms always run)."""
    if os.environ.get("FLM_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set FLM_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_WORDS = {
    "name": ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna"],
    "animal": ["dog", "cat", "bird", "fish", "frog", "bunny"],
    "verb": ["saw", "found", "liked", "helped", "hugged", "followed"],
    "thing": ["ball", "tree", "box", "kite", "cake", "boat"],
    "adj": ["big", "red", "happy", "little", "shiny", "soft"],
}


def generate_stories(n: int, seed: int = 0) -> str:
    """``n`` short stories of simple sentences, separated by ``<|endoftext|>``: English-like text
    made here (seeded), for tests that need "some text" rather than the shared fixtures."""
    import random

    rng = random.Random(seed)
    w = {k: (lambda v=v: rng.choice(v)) for k, v in _WORDS.items()}
    stories = []
    for _ in range(n):
        name = w["name"]()
        lines = [f"Once upon a time, there was a {w['adj']()} {w['animal']()} named {name}."]
        for _ in range(rng.randint(2, 5)):
            lines.append(f"{name} {w['verb']()} a {w['adj']()} {w['thing']()} near the {w['thing']()}.")
        lines.append(f"{name} was very {w['adj']()}. The end.")
        stories.append(" ".join(lines))
    return "\n<|endoftext|>\n".join(stories) + "\n"


@pytest.fixture(scope="session")
def generated_texts(tmp_path_factory):
    """(train, valid) files of generated stories (~60 KB and ~10 KB); needs no shared data."""
    d = tmp_path_factory.mktemp("generated")
    train, valid = d / "train.txt", d / "valid.txt"
    train.write_text(generate_stories(300, seed=1), encoding="utf-8")
    valid.write_text(generate_stories(50, seed=2), encoding="utf-8")
    return train, valid
