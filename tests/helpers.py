"""Helpers the tests import (``from helpers import …``): where the shared fixtures are, the
``flm train`` command line of the tiny runs, and generated English-like text.

``tests/`` is on ``sys.path`` for every way of running the suite (``pytest`` or ``python -m pytest``,
from the repository root or from ``tests/``): pytest puts the folder of a test module that is not
in a package first on the path, and ``pythonpath`` in pyproject.toml adds it too.

The shared fixtures (GPT-2's vocabulary and merges, the CS336 reference merges, the TinyStories
excerpt) live outside the repository, at ``../shared/data`` or ``$FLM_SHARED_DATA``; they are never
copied in. ``FLM_SHARED_DATA=none`` turns the lookup off (what a fresh clone runs), and
``FLM_REQUIRE_SHARED=1`` (set by ``.ci/run``) makes a test that needs them fail instead of skip.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MISSING_SHARED = "shared data not found (set FLM_SHARED_DATA or place it at ../shared/data)"


def shared_data_dir() -> Path | None:
    """The shared data folder, or None: ``$FLM_SHARED_DATA`` when it is set (``none`` turns the
    lookup off), else ``../shared/data`` or ``shared/data`` next to the repository."""
    env = os.environ.get("FLM_SHARED_DATA", "")
    if env.lower() == "none":
        return None
    candidates = [Path(env)] if env else [ROOT.parent / "shared" / "data", ROOT / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def shared_required() -> bool:
    """True when ``FLM_REQUIRE_SHARED=1``: a missing shared fixture fails the test (CI) instead of
    skipping it."""
    return os.environ.get("FLM_REQUIRE_SHARED") == "1"


def require_shared_data() -> Path:
    """The shared data folder; skips the calling test when it is absent, or fails it under
    ``FLM_REQUIRE_SHARED=1``."""
    d = shared_data_dir()
    if d is None:
        env = os.environ.get("FLM_SHARED_DATA", "")
        if env.lower() == "none":
            why = "shared data turned off (FLM_SHARED_DATA=none)"
        elif env:
            why = f"shared data not found: FLM_SHARED_DATA={env} is not a directory"
        else:
            why = MISSING_SHARED
        if shared_required():
            pytest.fail(f"FLM_REQUIRE_SHARED=1 and the shared data is missing: {why}", pytrace=False)
        pytest.skip(why)
    return d


def train_argv(texts, out, *extra) -> list[str]:
    """``flm train`` arguments for the tiny preset on ``texts`` (train, valid) into ``out``."""
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


# About 200 common English words (and a few with accents), for text richer than the stories:
# enough distinct words that a byte-level BPE of 500+ tokens finds pairs to merge.
_VOCAB = """
the a an and or but so because if when then than that this these those there here where what who
which how why all any some many much more most few each every other another such no not only also
very just still even again always never often now today soon later before after while during into
onto from with without about above below under over between through across along around near far
is was are were be been being have has had do does did will would can could should may might must
go went gone come came see saw look looked find found give gave take took make made think thought
know knew want wanted like liked say said tell told ask asked help helped play played run ran walk
walked jump jumped open opened close closed read write wrote sing sang eat ate drink drank sleep
day night morning evening year week time place home house school garden park river sea sky sun
moon star tree flower grass rain snow wind stone road town city friend mother father sister brother
child children teacher doctor farmer king queen dog cat bird fish horse cow mouse rabbit bear fox
ball book box cup hat kite cake bread apple milk water door window table chair bed toy boat car
big small little old new young good bad happy sad kind brave quiet loud warm cold bright dark soft
red blue green yellow white black brown first last long short high low quick slow early late
café naïve façade jalapeño über résumé
""".split()


def generate_text(n_docs: int, seed: int = 0) -> str:
    """``n_docs`` documents of English-like sentences over ~200 words, with numbers, contractions,
    quotes and a few accented words, separated by ``<|endoftext|>``: varied enough to train a
    byte-level BPE of a few hundred tokens (the stories of :func:`generate_stories` run out of pairs
    at ~385)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(3, 8)):
            words = [rng.choice(_VOCAB) for _ in range(rng.randint(4, 12))]
            if rng.random() < 0.2:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
            if rng.random() < 0.15:
                words.insert(rng.randrange(len(words)), rng.choice(["I'm", "it's", "we'll", "they've", "don't"]))
            if len(words) > 5 and rng.random() < 0.3:
                words[2] += ","
            sentence = " ".join(words)
            sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "!", "?"])
            if rng.random() < 0.1:
                sentence = f'"{sentence}" said {rng.choice(["Lily", "Tom", "Mia", "Ben"])}.'
            sentences.append(sentence)
        docs.append(" ".join(sentences))
    return "\n<|endoftext|>\n".join(docs) + "\n"
