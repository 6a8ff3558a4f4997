"""Tests for the fast paths of BPE encoding: the merge algorithms (flm.tokenizer.merge) against a
plain reference, the ASCII pre-tokenizer against the ``regex`` GPT-2 pattern, whole-token lookup
against merging, and 1 MB lines without whitespace (time, and ids equal to tiktoken's)."""

from __future__ import annotations

import random
import string
import time
from contextlib import contextmanager
from unittest import mock

import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from flm.tokenizer import GPT2_PATTERN, Tokenizer, merge
from flm.tokenizer.merge import LONG_PIECE, bpe_merge, merge_long, merge_short
from flm.tokenizer.pretokenize import ASCII_RE, PRETOKEN_RE, pretokenize

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def gpt2(shared_data) -> Tokenizer:
    bpe = shared_data / "bpe"
    return Tokenizer.from_files(bpe / "gpt2_vocab.json", bpe / "gpt2_merges.txt", [EOT])


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {b: i for i, b in gpt2.vocab.items() if i != 50256}
    return tiktoken.Encoding(
        name="gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


# ----- merge algorithms vs. a plain reference -----


def reference_merge(ids: list[int], ranks: dict[tuple[int, int], int], merged: list[int]) -> list[int]:
    """Scan all adjacent pairs, merge the one of lowest rank (the leftmost among equals), repeat."""
    ids = list(ids)
    while True:
        best = None  # (rank, position)
        for i in range(len(ids) - 1):
            r = ranks.get((ids[i], ids[i + 1]))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return ids
        r, i = best
        ids[i : i + 2] = [merged[r]]


@contextmanager
def compact_merge_state():
    """Make ``merge_long`` take its long-pre-token path (arrays, numpy grouping and sorts) at any length."""
    with mock.patch.object(merge, "COMPACT_PIECE", 0), mock.patch.object(merge, "_SMALL", 0):
        with mock.patch.object(merge, "_CHUNK", 7):  # several chunks of pairs
            yield


@st.composite
def merge_lists(draw):
    """A small vocabulary over the bytes a, b, c and random merges of its tokens, as the Tokenizer
    accepts them: both parts and the result are tokens, but the order is arbitrary (a merge may use
    a token that a later merge makes) and two merges may make the same token."""
    strings = draw(st.lists(st.text("abc", min_size=2, max_size=4), min_size=1, max_size=12, unique=True))
    vocab = {i: bytes([i]) for i in range(256)} | {256 + k: s.encode() for k, s in enumerate(strings)}
    splits = [(t[:k], t[k:]) for t in vocab.values() if len(t) > 1 for k in range(1, len(t))]
    known = set(vocab.values())
    candidates = [(a, b) for a, b in splits if a in known and b in known]
    merges = draw(st.lists(st.sampled_from(candidates), max_size=16, unique=True)) if candidates else []
    return vocab, merges


@given(spec=merge_lists(), data=st.data())
def test_merge_algorithms_equal_reference(spec, data):
    vocab, merges = spec
    tok = Tokenizer(vocab, merges)
    ranks, merged = tok._ranks, tok._merged
    text = data.draw(st.one_of(st.text("abc", max_size=40), st.text("abc", min_size=LONG_PIECE, max_size=300)))
    ids = [ord(c) for c in text]  # byte ids are the bytes here
    expected = reference_merge(ids, ranks, merged)
    assert merge_short(list(ids), ranks, merged) == expected
    assert merge_long(list(ids), ranks, merged) == expected
    with compact_merge_state():  # the arrays and numpy sorts of pre-tokens over COMPACT_PIECE bytes
        assert merge_long(iter(ids), ranks, merged) == expected
    assert bpe_merge(list(ids), ranks, merged) == expected
    # Through the tokenizer (whole-token lookup and cache included), one pre-token per letter run.
    assert tok.encode(text) == expected


@given(spec=merge_lists(), words=st.lists(st.text("abc", min_size=1, max_size=6), max_size=8))
def test_encode_equals_reference_merge_per_pretoken(spec, words):
    vocab, merges = spec
    tok = Tokenizer(vocab, merges)
    text = " ".join(words)
    expected = [
        i for piece in PRETOKEN_RE.findall(text) for i in reference_merge(list(piece.encode()), tok._ranks, tok._merged)
    ]
    assert tok.encode(text) == expected
    assert list(tok.encode_iterable([text[:3], text[3:]], buffer_chars=1)) == expected


def test_whole_token_lookup_only_when_the_merges_rebuild_the_token():
    # "abc" is a token, but these merges turn b"abc" into [a, bc]: (b, c) ranks before (a, b).
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"bc", 257: b"ab", 258: b"abc"}
    tok = Tokenizer(vocab, [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")])
    assert tok.encode("abc") == [ord("a"), 256]
    assert tok.encode("ab") == [257]  # here the lookup applies


def test_merge_long_on_a_long_run_equals_merge_short(gpt2):
    ranks, merged = gpt2._ranks, gpt2._merged
    rng = random.Random(0)
    for text in ["a" * 1000, "".join(rng.choices(string.ascii_lowercase, k=1000)), "ab" * 500 + "!?" * 100]:
        ids = [gpt2._byte_ids[b] for b in text.encode()]
        assert merge_long(ids, ranks, merged) == merge_short(list(ids), ranks, merged)
        with compact_merge_state():
            assert merge_long(ids, ranks, merged) == merge_short(list(ids), ranks, merged)


# ----- the ASCII pre-tokenizer -----


def test_ascii_classes_match_the_unicode_ones():
    # Exhaustive over ASCII: what \p{L}, \p{N} and \s match in the regex module is what the ASCII
    # pattern spells out ([A-Za-z], [0-9], [\t\n\x0b\x0c\r ]; not \x1c-\x1f, unlike re's \s).
    chars = [chr(c) for c in range(128)]
    assert [c for c in chars if regex.fullmatch(r"\p{L}", c)] == list(string.ascii_uppercase + string.ascii_lowercase)
    assert [c for c in chars if regex.fullmatch(r"\p{N}", c)] == list(string.digits)
    assert [c for c in chars if regex.fullmatch(r"\s", c)] == list("\t\n\x0b\x0c\r ")


ascii_fragment = st.sampled_from(
    [
        "a",
        "Zq",
        "7",
        "'s",
        "'ll",
        "'",
        "  ",
        " ",
        "\t",
        "\n",
        "\r\n",
        "\x0b",
        "\x0c",
        "\x1c",
        "\x1d",
        "\x1e",
        "\x1f",
        "\x00",
        "\x7f",
        "!?",
        "-",
        ".",
    ]
)
ascii_text = st.one_of(st.text(st.characters(max_codepoint=127)), st.lists(ascii_fragment, max_size=40).map("".join))


@given(text=ascii_text)
def test_ascii_pattern_equals_gpt2_pattern_on_ascii(text):
    assert ASCII_RE.findall(text) == PRETOKEN_RE.findall(text)
    assert pretokenize(text) == PRETOKEN_RE.findall(text)


mixed_fragment = st.one_of(
    ascii_fragment,
    st.sampled_from(["é", "ß", "世界", "🙃", "٣", "\x85", "\xa0", "\u2028", "\u3000", " é", "é ", "x" * 70]),
)


@given(text=st.one_of(st.text(), st.lists(mixed_fragment, max_size=60).map("".join)))
def test_pretokenize_equals_gpt2_pattern_on_any_text(text):
    assert pretokenize(text) == PRETOKEN_RE.findall(text)


def test_pretokenize_on_mixed_files(shared_data):
    for name in ["bpe/german.txt", "bpe/address.txt", "tinystories/valid.txt"]:
        text = (shared_data / name).read_text(encoding="utf-8")
        assert pretokenize(text) == PRETOKEN_RE.findall(text)


# ----- 1 MB without whitespace -----


def _line(kind: str, n: int) -> str:
    rng = random.Random(kind)
    alphabet = {
        "letters": string.ascii_letters,
        "punctuation": string.punctuation,
        "mixed": string.ascii_letters + string.digits + string.punctuation + "éß世",
    }[kind]
    return "".join(rng.choices(alphabet, k=n))


@pytest.mark.parametrize("kind", ["letters", "punctuation", "mixed"])
def test_one_megabyte_line_without_whitespace(gpt2, tiktoken_gpt2, kind):
    # A run of letters (or of punctuation) is one pre-token: quadratic merging took hours here.
    assert tiktoken_gpt2.encode(_line(kind, 100_000)) == gpt2.encode(_line(kind, 100_000))
    line = _line(kind, 1_000_000)
    t0 = time.process_time()  # CPU seconds: other jobs on a busy machine do not count
    ids = gpt2.encode(line)
    seconds = time.process_time() - t0
    assert gpt2.decode(ids) == line
    assert seconds < 5.0, f"{kind}: {seconds:.1f} s of CPU for 1 MB"
