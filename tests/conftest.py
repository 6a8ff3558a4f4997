"""Shared test configuration: hypothesis profiles, the fixtures for the shared data (found by
``helpers.shared_data_dir``), generated text, and one tiny end-to-end ``flm train`` run that CLI
tests copy. Plain functions the tests import live in ``helpers.py``."""

import os
from pathlib import Path

import pytest
import torch
from helpers import generate_stories, require_shared_data, train_argv
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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (GPT-2's vocabulary and merges, the CS336 reference merges, the
    TinyStories excerpt): skipped when absent, a failure under ``FLM_REQUIRE_SHARED=1``."""
    return require_shared_data()


@pytest.fixture(scope="session")
def tinystories_texts(shared_data, tmp_path_factory):
    """(train, valid): 60 KB and 10 KB slices of the shared TinyStories excerpt, for tests whose
    numbers come from the real text."""
    d = tmp_path_factory.mktemp("tinystories")
    src = shared_data / "tinystories"
    train, valid = d / "train.txt", d / "valid.txt"
    train.write_text((src / "train.txt").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    valid.write_text((src / "valid.txt").read_text(encoding="utf-8")[:10_000], encoding="utf-8")
    return train, valid


@pytest.fixture(scope="session")
def generated_texts(tmp_path_factory):
    """(train, valid) files of generated stories (~68 KB and ~11 KB); needs no shared data."""
    d = tmp_path_factory.mktemp("generated")
    train, valid = d / "train.txt", d / "valid.txt"
    train.write_text(generate_stories(300, seed=1), encoding="utf-8")
    valid.write_text(generate_stories(50, seed=2), encoding="utf-8")
    return train, valid


@pytest.fixture(scope="session")
def texts(generated_texts):
    """(train, valid): the text of the tiny CLI runs — generated stories, so these tests run the
    same with or without the shared data (the real excerpt is ``tinystories_texts``)."""
    return generated_texts


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
