"""Tests for flm.tokenizer.Tokenizer and encode_file: tiktoken parity with GPT-2's vocab, round
trips, streaming encode, special tokens, GPT-2 file format (save/load, bad files), token files."""

from __future__ import annotations

import importlib.util
import json
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import generate_text
from hypothesis import given
from hypothesis import strategies as st

from flm.tokenizer import GPT2_PATTERN, Tokenizer, encode_file, token_dtype, train_bpe
from flm.tokenizer.gpt2_format import read_merges, read_vocab
from flm.tokenizer.pretokenize import PRETOKEN_RE

EOT = "<|endoftext|>"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpt2(shared_data) -> Tokenizer:
    bpe = shared_data / "bpe"
    return Tokenizer.from_files(bpe / "gpt2_vocab.json", bpe / "gpt2_merges.txt", [EOT])


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2):
    """tiktoken's GPT-2 encoding built offline from the shared vocab (ranks = ids)."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {b: i for i, b in gpt2.vocab.items() if i != 50256}
    return tiktoken.Encoding(
        name="gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~80 KB of generated English-like text (no shared data needed)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(generate_text(300, seed=0), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """A few KB of generated text the small tokenizer was not trained on."""
    path = tmp_path_factory.mktemp("sample") / "sample.txt"
    path.write_text(generate_text(12, seed=1), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small(corpus) -> Tokenizer:
    vocab, merges = train_bpe(corpus, 500, [EOT])
    return Tokenizer(vocab, merges, [EOT])


# ----- parity with tiktoken -----


@pytest.mark.parametrize(
    "name",
    [
        "bpe/address.txt",
        "bpe/german.txt",
        "bpe/tinystories_sample.txt",
        "tinystories/valid.txt",
        "tinystories/train.txt",
    ],
)
def test_matches_tiktoken_on_files(gpt2, tiktoken_gpt2, shared_data, name):
    text = (shared_data / name).read_text(encoding="utf-8")
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\n\n",
        "Héllo 🙃 wörld<|endoftext|>世界 it's   fine\t\n",
        EOT,
        EOT + EOT + " x",
        "<|endoftext",
        "s'll've 123 4567",
    ],
)
def test_matches_tiktoken_edge_cases(gpt2, tiktoken_gpt2, text):
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(gpt2.encode(text)) == text


def test_overlapping_special_tokens_match_longest_first(gpt2):
    double = EOT + EOT
    tok = Tokenizer(dict(gpt2.vocab), gpt2.merges, [EOT, double])
    d = tok.token_to_id(double)
    assert d == 50257 and tok.vocab_size == 50258
    assert tok.special_tokens == [EOT, double]
    ids = tok.encode("a" + EOT + EOT + EOT + "b")
    assert ids == tok.encode("a") + [d, 50256] + tok.encode("b")
    assert tok.decode(ids) == "a" + EOT * 3 + "b"
    assert list(tok.encode_iterable(["a<|endoftext|><|endo", "ftext|><|endoftext|>b"], buffer_chars=1)) == ids


def test_without_special_tokens_the_text_is_ordinary(gpt2, shared_data):
    bpe = shared_data / "bpe"
    plain = Tokenizer.from_files(bpe / "gpt2_vocab.json", bpe / "gpt2_merges.txt")
    assert 50256 not in plain.encode(EOT)
    assert plain.decode(plain.encode(EOT)) == EOT
    assert plain.eos_id == 50256 and plain.special_tokens == []


# ----- decode -----


def test_decode_invalid_utf8_and_bad_ids(gpt2):
    e_bytes = "é".encode()  # two bytes, each a GPT-2 token of its own
    ids = [gpt2.token_to_id(bytes([b])) for b in e_bytes]
    assert gpt2.decode(ids) == "é"
    assert gpt2.decode(ids[:1]) == b"\xc3".decode("utf-8", errors="replace") == "\ufffd"
    assert gpt2.decode(ids[:1] + gpt2.encode("ok")) == "\ufffdok"
    assert gpt2.decode(np.array(gpt2.encode("hi there"))) == "hi there"
    with pytest.raises(ValueError, match="123456"):
        gpt2.decode([0, 123456])
    with pytest.raises(ValueError, match="-1"):
        gpt2.decode([-1])


# ----- properties -----

specials_text = st.lists(st.one_of(st.text(max_size=20), st.sampled_from([EOT, "<|endo", "ftext|>"])), max_size=8).map(
    "".join
)


@given(text=st.text())
def test_roundtrip_arbitrary_text(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


@given(text=specials_text)
def test_roundtrip_with_special_tokens(gpt2, text):
    ids = gpt2.encode(text)
    assert gpt2.decode(ids) == text
    assert ids.count(50256) == text.count(EOT)


@given(text=st.text())
def test_gpt2_pattern_tiles_any_text(text):
    # encode_iterable relies on the pre-tokens covering every character, with no gaps.
    assert "".join(PRETOKEN_RE.findall(text)) == text


fragment = st.sampled_from(
    [
        "a",
        "bc",
        " ",
        "  ",
        "\n",
        "\t",
        "\r\n",
        "'",
        "s",
        "ll",
        "ve",
        "1",
        "23",
        ".",
        "!?",
        "é",
        "世界",
        "🙃",
        EOT,
        "<|",
        "endoftext",
        "|>",
    ]
)


@given(parts=st.lists(st.one_of(fragment, st.text(max_size=5)), max_size=40), data=st.data())
def test_encode_iterable_equals_encode_for_any_split(gpt2, parts, data):
    text = "".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    expected = gpt2.encode(text)
    assert list(gpt2.encode_iterable(chunks, buffer_chars=1)) == expected
    assert list(gpt2.encode_iterable(chunks, buffer_chars=7)) == expected
    assert list(gpt2.encode_iterable(iter(chunks))) == expected


def test_encode_iterable_on_file_lines(gpt2, shared_data):
    path = shared_data / "tinystories" / "valid.txt"
    with open(path, encoding="utf-8") as f:
        assert list(gpt2.encode_iterable(f, buffer_chars=4096)) == gpt2.encode(path.read_text(encoding="utf-8"))


def test_encode_iterable_memory_is_bounded(gpt2, shared_data):
    text = (shared_data / "tinystories" / "valid.txt").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    reps = 30  # ~2.8 MB of text, ~650k ids (a list of them alone would take > 5 MB)
    gpt2.encode(text)  # warm the pre-token cache so it does not count

    def stream():
        for _ in range(reps):
            yield from lines

    tracemalloc.start()
    try:
        n = sum(1 for _ in gpt2.encode_iterable(stream()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == reps * len(gpt2.encode(text))
    assert peak < 2_000_000, peak


# ----- files: save / load / errors -----


def test_save_then_load_gives_same_tokenizer(small, sample, tmp_path):
    v, m = tmp_path / "vocab.json", tmp_path / "merges.txt"
    small.save(v, m)
    again = Tokenizer.from_files(v, m, [EOT])
    assert dict(again.vocab) == dict(small.vocab) and again.merges == small.merges
    assert again.fingerprint() == small.fingerprint()
    text = sample.read_text(encoding="utf-8")
    assert again.encode(text) == small.encode(text)
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes left no temp files
    assert m.read_text(encoding="utf-8").startswith("#version")


def test_gpt2_files_read_back_identically(gpt2, shared_data, tmp_path):
    bpe = shared_data / "bpe"
    gpt2.save(tmp_path / "v.json", tmp_path / "m.txt")
    assert read_vocab(tmp_path / "v.json") == read_vocab(bpe / "gpt2_vocab.json")
    assert read_merges(tmp_path / "m.txt") == read_merges(bpe / "gpt2_merges.txt")


def test_saved_files_load_in_hf_tokenizers(small, sample, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    v, m = tmp_path / "vocab.json", tmp_path / "merges.txt"
    small.save(v, m)
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(v), str(m)))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    text = sample.read_text(encoding="utf-8")
    assert hf.encode(text).ids == small.encode(text)


def test_helpers_and_fingerprint(gpt2, small):
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256 and gpt2.special_tokens == [EOT]
    assert gpt2.token_to_id(" the") == gpt2.token_to_id(b" the") == 262
    assert gpt2.id_to_token(262) == b" the"
    with pytest.raises(KeyError):
        gpt2.token_to_id("not a token at all")
    assert small.eos_id == 0 and small.vocab_size == 500
    fp = gpt2.fingerprint()
    assert len(fp) == 64 and fp != small.fingerprint()
    more = Tokenizer(dict(gpt2.vocab), gpt2.merges, [EOT, "<|pad|>"])
    assert more.token_to_id("<|pad|>") == 50257 and more.fingerprint() != fp
    clone = pickle.loads(pickle.dumps(gpt2))
    assert clone.fingerprint() == fp and clone.encode("a " + EOT) == gpt2.encode("a " + EOT)


def test_bad_files_name_file_and_line(small, tmp_path):
    good_v, good_m = tmp_path / "good_vocab.json", tmp_path / "good_merges.txt"
    small.save(good_v, good_m)
    bad_m = tmp_path / "bad_merges.txt"
    bad_m.write_text("#version: 0.2\nĠ t\nĠ a b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_merges\.txt:3"):
        Tokenizer.from_files(good_v, bad_m)
    bad_v = tmp_path / "bad_vocab.json"
    bad_v.write_text('{"a": 0,\n "b": 1,\n "c" 2}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_vocab\.json:3"):
        Tokenizer.from_files(bad_v, good_m)
    neg = tmp_path / "neg_vocab.json"
    neg.write_text('{"a": -1}', encoding="utf-8")
    with pytest.raises(ValueError, match="neg_vocab.json"):
        Tokenizer.from_files(neg, good_m)
    with pytest.raises(ValueError, match="nope.json"):
        Tokenizer.from_files(tmp_path / "nope.json", good_m)
    unknown = tmp_path / "unknown_merges.txt"
    unknown.write_text("Ġ t\nzzzzqqq xxxyyy\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer.from_files(good_v, unknown)
    with pytest.raises(ValueError, match="single-byte"):
        Tokenizer({0: b"a"}, [])


# ----- encode_file -----


def test_encode_file_parallel_equals_encode(gpt2, shared_data, tmp_path):
    text = (shared_data / "tinystories" / "valid.txt").read_text(encoding="utf-8") * 3
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8", newline="")
    expected = gpt2.encode(text)
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.bin"
        n = encode_file(gpt2, src, out, num_workers=workers, progress=False)
        assert n == len(expected)
        arr = np.memmap(out, dtype=np.uint16, mode="r")
        assert arr.tolist() == expected
        meta = json.loads(Path(str(out) + ".json").read_text())
        assert meta == {
            "format": "flm-tokens",
            "version": 1,
            "dtype": "uint16",
            "count": n,
            "vocab_size": 50257,
            "tokenizer_fingerprint": gpt2.fingerprint(),
            "tokenizer_files": gpt2.source_files,
            "source": str(src),
        }
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.txt",
        "out1.bin",
        "out1.bin.json",
        "out2.bin",
        "out2.bin.json",
    ]


def test_encode_file_without_special_tokens_and_errors(small, tmp_path, capsys):
    src = tmp_path / "plain.txt"
    src.write_text("no special tokens here, just text. " * 200, encoding="utf-8")
    out = tmp_path / "plain.bin"
    n = encode_file(small, src, out, num_workers=2, progress=True)
    assert np.fromfile(out, dtype=np.uint16).tolist() == small.encode(src.read_text(encoding="utf-8"))[:n]
    assert "encode plain.txt" in capsys.readouterr().err
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["tokenizer_files"] is None and meta["count"] == n
    with pytest.raises(ValueError, match="missing.txt"):
        encode_file(small, tmp_path / "missing.txt", tmp_path / "x.bin", progress=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 " * 10)
    with pytest.raises(ValueError, match="latin1.txt"):
        encode_file(small, bad, tmp_path / "y.bin", progress=False)
    assert not (tmp_path / "y.bin").exists() and not (tmp_path / "y.bin.json").exists()
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# ----- bench smoke test -----


def test_bench_quick_runs(tmp_path, shared_data):
    spec = importlib.util.spec_from_file_location("flm_bench_tokenizer", ROOT / "bench" / "tokenizer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["rows"]


def test_cli_train_then_encode(corpus, sample, tmp_path):
    from flm.cli import main

    def cli(argv):
        return main(["tokenize", *argv])

    assert cli(["train", str(corpus), "--vocab-size", "300", "--out-dir", str(tmp_path / "tok")]) == 0
    v, m = tmp_path / "tok" / "vocab.json", tmp_path / "tok" / "merges.txt"
    assert cli(["encode", str(sample), str(tmp_path / "s.bin"), "--vocab", str(v), "--merges", str(m)]) == 0
    tok = Tokenizer.from_files(v, m, [EOT])
    assert tok.vocab_size == 300
    assert np.fromfile(tmp_path / "s.bin", dtype=np.uint16).tolist() == tok.encode(sample.read_text(encoding="utf-8"))
    assert json.loads((tmp_path / "s.bin.json").read_text())["tokenizer_files"] == [str(v), str(m)]
