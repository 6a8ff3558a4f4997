"""Tests for BPE training (flm.tokenizer.train_bpe): CS336 reference fixture, tie-breaks, special
tokens, parallel pre-tokenization, bad input, and a brute-force oracle on arbitrary text."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
from helpers import generate_text
from hypothesis import given, settings
from hypothesis import strategies as st

from flm.tokenizer import count_pretokens, train_bpe, train_bpe_from_counts
from flm.tokenizer.gpt2_format import read_merges, read_vocab
from flm.tokenizer.pretokenize import chunk_boundaries, count_file, safe_split_token

EOT = "<|endoftext|>"


def naive_bpe(counts: Counter, vocab_size: int, specials: list[str]) -> list[tuple[bytes, bytes]]:
    """Oracle: recount every pair after every merge; ties go to the greater (bytes, bytes) pair."""
    words = {tuple(bytes([b]) for b in w.encode()): c for w, c in counts.items()}
    merges = []
    while 256 + len(specials) + len(merges) < vocab_size:
        pairs: Counter = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new_words: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


def check_consistent(vocab: dict[int, bytes], merges: list, vocab_size: int, specials: list[str]) -> None:
    k = len(specials)
    assert sorted(vocab) == list(range(len(vocab)))
    assert len(vocab) == 256 + k + len(merges) <= vocab_size
    assert [vocab[i] for i in range(k)] == [s.encode() for s in specials]
    assert [vocab[k + b] for b in range(256)] == [bytes([b]) for b in range(256)]
    seen = set(vocab[i] for i in range(256 + k))
    for j, (a, b) in enumerate(merges):
        assert a in seen and b in seen
        assert vocab[256 + k + j] == a + b
        seen.add(a + b)


def test_matches_cs336_reference(shared_data):
    bpe = shared_data / "bpe"
    vocab, merges = train_bpe(bpe / "corpus.en", 500, [EOT])
    ref_merges = read_merges(bpe / "train-bpe-reference-merges.txt")
    ref_vocab = read_vocab(bpe / "train-bpe-reference-vocab.json")
    assert merges == ref_merges
    assert set(vocab.values()) == set(ref_vocab.values())
    assert len(vocab) == 500
    # Same layout as the fixture: special token at 0, then the 256 bytes, then one id per merge.
    assert vocab[0] == ref_vocab[0] == EOT.encode()
    assert {vocab[i] for i in range(1, 257)} == {ref_vocab[i] for i in range(1, 257)}
    assert [vocab[i] for i in range(257, 500)] == [ref_vocab[i] for i in range(257, 500)]
    check_consistent(vocab, merges, 500, [EOT])


def test_parallel_pretokenization_equals_serial(tmp_path):
    path = tmp_path / "text.txt"  # ~100 KB of generated documents separated by <|endoftext|>
    path.write_text(generate_text(400, seed=3), encoding="utf-8")
    serial = count_file(path, [EOT], num_workers=1)
    assert count_file(path, [EOT], num_workers=2) == serial
    assert serial == count_pretokens(path.read_text(encoding="utf-8"), [EOT])
    v1, m1 = train_bpe(path, 400, [EOT], num_workers=1)
    v2, m2 = train_bpe(path, 400, [EOT], num_workers=2)
    assert (v1, m1) == (v2, m2)


def test_tie_goes_to_lexicographically_greater_pair(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("ab\ncd\nab\ncd\nba", encoding="utf-8")
    _, merges = train_bpe(p, 258, [])
    # (a,b) and (c,d) both occur twice; (c,d) > (a,b). Then (a,b) wins over (b,a) by count.
    assert merges == [(b"c", b"d"), (b"a", b"b")]
    # Pairs compare as (left, right) tuples, not as concatenations: ("x","yz") vs ("xy","z").
    counts = Counter({"xy": 5, "yz": 5, "xyz": 3})
    v, m = train_bpe_from_counts(counts, 256 + 3, [])
    assert m == naive_bpe(counts, 259, [])


def test_special_tokens_are_split_out_and_never_merged(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(("the cat" + EOT + "<pad>") * 40 + "the dog", encoding="utf-8")
    vocab, merges = train_bpe(p, 262, [EOT, "<pad>"])
    assert vocab[0] == EOT.encode() and vocab[1] == b"<pad>"
    for a, b in merges:
        assert b"<" not in a + b and b">" not in a + b and b"|" not in a + b
    check_consistent(vocab, merges, 262, [EOT, "<pad>"])


def test_stops_early_with_warning(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abab", encoding="utf-8")
    with pytest.warns(UserWarning, match="no pair left"):
        vocab, merges = train_bpe(p, 300, [EOT])
    assert merges == [(b"a", b"b"), (b"ab", b"ab")]
    check_consistent(vocab, merges, 300, [EOT])


def test_bad_input(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(p, 256, [EOT])
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(p, 257, [EOT, "<pad>"])
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match="missing.txt"):
        train_bpe(missing, 300, [EOT])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(ValueError, match="latin1.txt"):
        train_bpe(bad, 300, [EOT])
    with pytest.raises(ValueError, match=str(tmp_path.name)):
        train_bpe(tmp_path, 300, [EOT])  # a folder
    with pytest.raises(ValueError):
        train_bpe(p, 300, EOT)  # a string, not a list


def test_progress_bar_on_stderr(tmp_path, capsys):
    p = tmp_path / "t.txt"
    p.write_text("low lower lowest " * 20, encoding="utf-8")
    train_bpe(p, 262, [EOT], progress=True)
    err = capsys.readouterr().err
    assert "pre-tokenize" in err and "bpe merges" in err


def test_chunk_boundaries_start_at_special_token(tmp_path):
    p = tmp_path / "t.txt"
    text = ("story one" + EOT) * 50 + "tail"
    p.write_text(text, encoding="utf-8")
    data = text.encode()
    cuts = chunk_boundaries(p, 8, EOT.encode(), block=7)
    assert cuts[0] == 0 and cuts[-1] == len(data) and cuts == sorted(set(cuts))
    assert all(data[c:].startswith(EOT.encode()) for c in cuts[1:-1])
    assert chunk_boundaries(p, 8, b"") == [0, len(data)]


def test_safe_split_token():
    assert safe_split_token([EOT]) == EOT
    assert safe_split_token([]) == ""
    # A token that overlaps itself ("aa" in "aaa") or another token is never used for cutting.
    assert safe_split_token(["aa"]) == ""
    assert safe_split_token([EOT, EOT + EOT]) == ""
    assert safe_split_token(["ab", "bcd"]) == "ab"


fragments = st.sampled_from(["a", "b", "ab", " ", "  ", "\n", "'s", "1", "é", "世", "🙃", ".", EOT, "<|end"])


@settings(max_examples=15)
@given(parts=st.lists(fragments, max_size=30), extra=st.integers(0, 30), free_text=st.text(max_size=40))
def test_training_on_arbitrary_text_matches_bruteforce(parts, extra, free_text):
    text = "".join(parts) + free_text
    specials = [EOT]
    counts = count_pretokens(text, specials)
    vocab_size = 257 + extra
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vocab, merges = train_bpe_from_counts(counts, vocab_size, specials)
    check_consistent(vocab, merges, vocab_size, specials)
    assert merges == naive_bpe(counts, vocab_size, specials)


@settings(max_examples=5)
@given(text=st.text(max_size=200))
def test_train_bpe_on_arbitrary_file(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("bpe") / "t.txt"
    p.write_text(text, encoding="utf-8", newline="")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vocab, merges = train_bpe(p, 270, [EOT])
    check_consistent(vocab, merges, 270, [EOT])
