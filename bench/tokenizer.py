"""Benchmark flm's BPE tokenizer against Hugging Face ``tokenizers`` (training) and ``tiktoken`` (encoding).

Usage::

    python bench/tokenizer.py [--json out.json] [--quick] [--repeats N] [--warmup N] [--encode-only] [--crossover]

Rows (each the median over ``--repeats`` runs after ``--warmup`` warm-up runs (default 1), with
min/max; timed with ``bench/common.py``):

* ``train``: ``train_bpe`` on ``bpe/corpus.en`` (vocab 500) and ``tinystories/train.txt`` (vocab
  10,000) vs. ``tokenizers``' ``BpeTrainer`` with the ByteLevel pre-tokenizer (the two timed in
  turn; the x4 and x16 rows with half the repeats); the split between
  pre-tokenization (``count_file``) and merging (``train_bpe_from_counts``); the TinyStories excerpt
  repeated 1x, 4x, 16x (how time grows with corpus size).
* ``construct``: ``Tokenizer(vocab, merges)`` from GPT-2's parsed files vs. tiktoken's ``Encoding``
  from the same ranks (flm checks there which tokens the merges rebuild whole; see tokenizer.py);
  at most 3 runs, no warm-up.
* ``encode``: single-process ``Tokenizer.encode`` with GPT-2's vocab on the TinyStories excerpt vs.
  tiktoken's single-thread ``encode`` (same vocab, built offline), timed in turn (flm, tiktoken,
  flm, ...) so background load hits both alike. ``cold`` uses a fresh tokenizer (empty pre-token
  cache) each run; ``warm`` re-uses one (the steady state of a long encode).
* ``1 MB line``: one line without whitespace (random letters: one pre-token; random punctuation:
  one pre-token; a random mix of letters, digits, punctuation and non-ASCII letters), fresh
  tokenizers, vs. tiktoken.
* ``one character``: 24 MB of one character (one pre-token): NUL bytes (no GPT-2 merge applies: the
  case of issue 18) and ``a`` (merged into ``aaaa``), each encoded once in a fresh subprocess by flm
  and by tiktoken, with ``RSS B/B``: the subprocess's peak RSS during encoding (``VmHWM``, which
  ``ru_maxrss`` reports, reset before encoding) less its RSS before, per input byte (flm's budget:
  32). ``--quick``: 4 MB of NUL bytes.
* ``encode_file``: the excerpt x16 to a token file with 1, 2, ... workers (at most 3 runs).

``--encode-only`` skips the training and ``encode_file`` rows. ``--crossover`` also times the two
merge algorithms of ``flm.tokenizer.merge`` on pre-tokens of growing length (where ``LONG_PIECE``
comes from).

``ratio`` is flm's time / the peer's time (lower is better; 3.0 means three times slower); ``load``
is the 1-minute load average after the row's runs.
``cpu s`` is flm's CPU time (this process plus its worker processes): with free cores, a pool
that scales shows wall time well under CPU time. ``cpu ratio`` compares CPU seconds (fairer
when other jobs share the machine; HF ``tokenizers`` may use several threads).
A peer that is not installed is skipped with a line saying so. Shared data is found through
``$FLM_SHARED_DATA`` or ``../shared/data`` relative to the repository root
(:func:`common.shared_data_dir`). ``--quick`` trains on ``bpe/tinystories_sample.txt`` (vocab 300),
encodes it and 0.1 MB lines, one run each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from flm.tokenizer import GPT2_PATTERN, Tokenizer, encode_file, train_bpe, train_bpe_from_counts
from flm.tokenizer.gpt2_format import read_merges, read_vocab
from flm.tokenizer.merge import merge_long, merge_short
from flm.tokenizer.pretokenize import count_file

EOT = "<|endoftext|>"
COLUMNS = [
    ("task", "task"),
    ("size_MB", "size MB"),
    ("flm_s", "flm s"),
    ("flm_min_s", "min"),
    ("flm_max_s", "max"),
    ("flm_cpu_s", "cpu s"),
    ("flm_MBps", "MB/s"),
    ("peer", "peer"),
    ("peer_s", "peer s"),
    ("peer_MBps", "peer MB/s"),
    ("ratio", "ratio"),
    ("ratio_cpu", "cpu ratio"),
    ("load", "load"),
    ("flm_rss_per_byte", "RSS B/B"),
    ("peer_rss_per_byte", "peer RSS B/B"),
]


def hf_train_fn(path: Path, vocab_size: int) -> Callable[[], object] | None:
    """A closure training HF ``tokenizers`` byte-level BPE on ``path``, or None if not installed."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers
    except ImportError:
        return None

    def run():
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train([str(path)], trainer)
        return tok

    return run


def tiktoken_encoding(tok: Tokenizer):
    """tiktoken's GPT-2 encoding built offline from ``tok``'s vocabulary, or None if not installed."""
    try:
        import tiktoken
    except ImportError:
        return None
    eot = tok.eos_id
    ranks = {b: i for i, b in tok.vocab.items() if i != eot}
    return tiktoken.Encoding(
        name="gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: eot}
    )


def row(task: str, size: int, flm: dict, peer: str | None, peer_t: dict | None, **extra) -> dict:
    """One result row; ``ratio`` = flm median / peer median."""
    r = {
        "task": task,
        "size_bytes": size,
        "size_MB": size / 1e6,
        "flm_s": flm["median"],
        "flm_min_s": flm["min"],
        "flm_max_s": flm["max"],
        "flm_iqr_s": flm["iqr"],
        "n": flm["n"],
        "flm_cpu_s": flm["cpu"],
        "flm_MBps": size / flm["median"] / 1e6 if size and flm["median"] else None,
        "peer": peer,
        "peer_s": peer_t["median"] if peer_t else None,
        "ratio": flm["median"] / peer_t["median"] if peer_t else None,
        "peer_cpu_s": peer_t["cpu"] if peer_t else None,
        "ratio_cpu": flm["cpu"] / peer_t["cpu"] if peer_t and peer_t["cpu"] > 0 else None,
        "peer_MBps": size / peer_t["median"] / 1e6 if peer_t and size and peer_t["median"] else None,
        "load": flm["load_avg_1m"],
    }
    r.update(extra)
    return r


def bench_train(name: str, path: Path, vocab_size: int, repeats: int, warmup: int, rows: list, notes: list) -> None:
    """Rows for training on ``path``: flm total vs HF (timed in turn), and flm's pre-tokenization / merge split."""
    size = path.stat().st_size
    hf = hf_train_fn(path, vocab_size)
    if hf is None:
        notes.append("tokenizers not installed: HF BpeTrainer comparison skipped")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small corpora may run out of pairs before vocab_size
        fns = {"flm": lambda: train_bpe(path, vocab_size, [EOT])}
        if hf:
            fns["tokenizers"] = hf
        st = common.measure_interleaved(fns, repeats=repeats, warmup=warmup, cpu=True)
        pre = common.measure(lambda: count_file(path, [EOT]), repeats=repeats, warmup=warmup, cpu=True)
        counts = count_file(path, [EOT])
        merge = common.measure(
            lambda: train_bpe_from_counts(counts, vocab_size, [EOT]), repeats=repeats, warmup=warmup, cpu=True
        )
    rows.append(
        row(f"train {name} vocab={vocab_size}", size, st["flm"], "tokenizers" if hf else None, st.get("tokenizers"))
    )
    rows.append(row("  pre-tokenization (count_file)", size, pre, None, None))
    rows.append(row("  merging (train_bpe_from_counts)", size, merge, None, None))


def scaling_summary(rows: list[dict]) -> dict:
    """Training time at 4x / 16x the excerpt relative to 1x, for flm (total, pre-tokenization, merging) and the peer."""
    out: dict[str, dict[str, float]] = {}
    base = {}
    for i, r in enumerate(rows):
        if r["task"].startswith("train tinystories x"):
            k = r["task"].split()[2]
            parts = {
                "flm total": r["flm_s"],
                "flm pre-tokenization": rows[i + 1]["flm_s"],
                "flm merging": rows[i + 2]["flm_s"],
            }
            if r["peer_s"] is not None:
                parts["tokenizers"] = r["peer_s"]
            if k == "x1":
                base = parts
            elif base:
                for name, t in parts.items():
                    out.setdefault(name, {})[k] = t / base[name]
    return out


def _cold_copy(tok: Tokenizer) -> Tokenizer:
    """A copy of ``tok`` with an empty pre-token cache (everything built at construction is shared)."""
    t = Tokenizer.__new__(Tokenizer)
    t.__setstate__(tok.__getstate__())
    return t


def whitespace_free_line(kind: str, n: int) -> str:
    """``n`` random characters without whitespace: ``letters``, ``punctuation`` or ``mixed``."""
    alphabet = {
        "letters": string.ascii_letters,
        "punctuation": string.punctuation,
        "mixed": string.ascii_letters + string.digits + string.punctuation + "éß世",
    }[kind]
    return "".join(random.Random(kind).choices(alphabet, k=n))


def bench_encode(
    data: Path, excerpt: Path, repeats: int, warmup: int, quick: bool, rows: list, notes: list
) -> Tokenizer:
    """Rows for GPT-2 encoding: construction, encode cold / warm, 1 MB lines; returns the tokenizer."""
    bpe = data / "bpe"
    vocab, merges = read_vocab(bpe / "gpt2_vocab.json"), read_merges(bpe / "gpt2_merges.txt")
    tok = Tokenizer(vocab, merges, [EOT])
    enc = tiktoken_encoding(tok)
    if enc is None:
        notes.append("tiktoken not installed: encode comparison skipped")
    peer = "tiktoken" if enc else None
    fns = {"flm": lambda: Tokenizer(vocab, merges, [EOT])}
    if enc:
        fns["tiktoken"] = lambda: tiktoken_encoding(tok)
    st = common.measure_interleaved(fns, repeats=min(repeats, 3), warmup=0, cpu=True)
    rows.append(row("construct gpt2 (parsed vocab + merges)", 0, st["flm"], peer, st.get("tiktoken")))

    text = excerpt.read_text(encoding="utf-8")
    size = len(text.encode("utf-8"))
    if enc:
        assert enc.encode(text, allowed_special="all") == tok.encode(text), "flm and tiktoken disagree"
    cold_toks = [_cold_copy(tok) for _ in range(repeats + warmup)]  # made ahead: not timed
    fns = {"cold": lambda: cold_toks.pop().encode(text), "warm": lambda: tok.encode(text)}
    if enc:
        fns["tiktoken"] = lambda: enc.encode(text, allowed_special="all")
    st = common.measure_interleaved(fns, repeats=repeats, warmup=warmup, cpu=True)
    rows.append(row("encode gpt2 (cold cache, 1 process)", size, st["cold"], peer, st.get("tiktoken")))
    rows.append(row("encode gpt2 (warm cache, 1 process)", size, st["warm"], peer, st.get("tiktoken")))

    n = 100_000 if quick else 1_000_000
    for kind in ("letters", "punctuation", "mixed"):
        line = whitespace_free_line(kind, n)
        if enc:
            assert enc.encode(line) == tok.encode(line), f"flm and tiktoken disagree on the {kind} line"
        line_toks = [_cold_copy(tok) for _ in range(repeats + warmup)]
        fns = {"flm": lambda toks=line_toks, line=line: toks.pop().encode(line)}
        if enc:
            fns["tiktoken"] = lambda line=line: enc.encode(line)
        st = common.measure_interleaved(fns, repeats=repeats, warmup=warmup, cpu=True)
        nbytes = len(line.encode("utf-8"))
        rows.append(
            row(f"{nbytes / 1e6:.1f} MB line, no whitespace: {kind}", nbytes, st["flm"], peer, st.get("tiktoken"))
        )
    return tok


# Encode ``CHAR * N`` once in this fresh process (flm or tiktoken with GPT-2's ranks); print seconds,
# CPU seconds, the peak RSS growth, and a digest of the ids.
_ONE_CHAR_SCRIPT = r"""
import hashlib, json, os, sys, time
from array import array
sys.path.insert(0, sys.argv[1])
import common
from tokenizer import EOT, tiktoken_encoding
from flm.tokenizer import Tokenizer
from flm.tokenizer.gpt2_format import read_merges, read_vocab

bpe, who, char, n = sys.argv[2], sys.argv[3], chr(int(sys.argv[4])), int(sys.argv[5])
tok = Tokenizer(read_vocab(os.path.join(bpe, "gpt2_vocab.json")), read_merges(os.path.join(bpe, "gpt2_merges.txt")), [EOT])
encode = tok.encode if who == "flm" else tiktoken_encoding(tok).encode
text = char * n

def status(key):  # a kB field of /proc/self/status, in bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM = ru_maxrss) to the RSS now
    f.write("5")
before = status("VmRSS")
t0, c0 = time.perf_counter(), time.process_time()
ids = encode(text)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = status("VmHWM")
digest = hashlib.sha256(array("I", ids).tobytes()).hexdigest()
print(json.dumps({"s": seconds, "cpu": cpu, "rss_per_byte": (peak - before) / n, "count": len(ids), "digest": digest}))
"""


def encode_one_char(who: str, char: str, n: int, bpe: Path) -> dict:
    """Encode ``char * n`` with GPT-2's vocabulary in a fresh subprocess (its own peak RSS).

    Args:
        who: ``"flm"`` or ``"tiktoken"``.
        char: the character.
        n: how many.
        bpe: the folder with ``gpt2_vocab.json`` and ``gpt2_merges.txt``.

    Returns:
        ``{"s", "cpu", "rss_per_byte", "count", "digest"}``: seconds, CPU seconds, the peak RSS
        less the RSS before encoding per input byte, the number of ids and their SHA-256.

    Raises:
        RuntimeError: the subprocess failed (its stderr's last line).
    """
    script_dir = str(Path(__file__).resolve().parent)
    argv = [sys.executable, "-c", _ONE_CHAR_SCRIPT, script_dir, str(bpe), who, str(ord(char)), str(n)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{who} on {char!r} * {n}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_one_char(data: Path, quick: bool, rows: list, notes: list) -> None:
    """Rows for 24 MB of one character (``--quick``: 4 MB of NUL): time and peak RSS per byte, flm vs tiktoken.

    One run each (a run takes seconds to a minute); flm's ids are checked equal to tiktoken's.
    """
    n = 4_000_000 if quick else 24_000_000
    if not sys.platform.startswith("linux"):
        notes.append("one-character rows skipped: they read /proc/self/statm (Linux)")
        return
    have_tiktoken = _has_tiktoken()
    if not have_tiktoken:
        notes.append("tiktoken not installed: one-character rows without a peer")
    for char, what in (("\x00", "NUL"),) if quick else (("\x00", "NUL"), ("a", "'a'")):
        flm = encode_one_char("flm", char, n, data / "bpe")
        peer = encode_one_char("tiktoken", char, n, data / "bpe") if have_tiktoken else None
        if peer is not None:
            assert (flm["count"], flm["digest"]) == (peer["count"], peer["digest"]), (
                f"flm and tiktoken disagree on {what}"
            )
        load = (common.load_average() or [None])[0]
        t = {
            "median": flm["s"],
            "min": flm["s"],
            "max": flm["s"],
            "iqr": 0.0,
            "n": 1,
            "cpu": flm["cpu"],
            "load_avg_1m": load,
        }
        pt = {"median": peer["s"], "cpu": peer["cpu"]} if peer else None
        rows.append(
            row(
                f"{n / 1e6:.1f} MB of one character: {what}",
                n,
                t,
                "tiktoken" if peer else None,
                pt,
                flm_rss_per_byte=flm["rss_per_byte"],
                peer_rss_per_byte=peer["rss_per_byte"] if peer else None,
            )
        )


def _has_tiktoken() -> bool:
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return False
    return True


def bench_crossover(tok: Tokenizer, excerpt: Path, repeats: int, warmup: int) -> list[dict]:
    """Time ``merge_short`` and ``merge_long`` on pre-tokens of growing length (the excerpt without whitespace)."""
    letters = "".join(excerpt.read_text(encoding="utf-8").split()).encode("utf-8")
    rng = random.Random(0)
    out = []
    for length in (4, 8, 16, 32, 48, 64, 96, 128, 256, 512):
        starts = [rng.randrange(len(letters) - length) for _ in range(max(20, 4000 // length))]
        pieces = [[tok._byte_ids[b] for b in letters[s : s + length]] for s in starts]
        st = common.measure_interleaved(
            {
                "short": lambda pieces=pieces: [merge_short(list(p), tok._ranks, tok._merged) for p in pieces],
                "long": lambda pieces=pieces: [merge_long(p, tok._ranks, tok._merged) for p in pieces],
            },
            repeats=repeats,
            warmup=warmup,
            cpu=True,
        )
        # CPU seconds: less disturbed than wall time by other jobs on a shared machine.
        short_us, long_us = (st[k]["cpu"] / len(pieces) * 1e6 for k in ("short", "long"))
        out.append({"bytes": length, "short_us": short_us, "long_us": long_us, "ratio": short_us / long_us})
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a table, optionally write JSON.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        :func:`common.make_result`'s dict (``bench``, ``machine``, ``args``, ``rows``, ``notes``) plus
        ``scaling`` (training time at 4x / 16x relative to 1x), ``crossover`` (or ``None``) and ``quick``.

    Raises:
        SystemExit: the shared data is not found.
    """
    ap = common.make_parser(__doc__.split("\n")[0], dtype=False, device=False, repeats=5)
    ap.add_argument("--encode-only", action="store_true", help="only the construct / encode / 1 MB line rows")
    ap.add_argument("--crossover", action="store_true", help="also time merge_short vs merge_long by length")
    args = ap.parse_args(argv)
    data = common.shared_data_dir()
    repeats = 1 if args.quick else args.repeats
    warmup = args.warmup
    rows: list[dict] = []
    notes: list[str] = []
    crossover = None

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        excerpt = data / "tinystories" / "train.txt"
        if args.quick:
            excerpt = tmp / "quick.txt"
            excerpt.write_bytes((data / "bpe" / "tinystories_sample.txt").read_bytes())
            if not args.encode_only:
                bench_train("quick sample", excerpt, 300, repeats, warmup, rows, notes)
        elif not args.encode_only:
            bench_train("corpus.en", data / "bpe" / "corpus.en", 500, repeats, warmup, rows, notes)
            bench_train("tinystories x1", excerpt, 10_000, repeats, warmup, rows, notes)
            text = excerpt.read_bytes()
            for k in (4, 16):
                p = tmp / f"ts_x{k}.txt"
                p.write_bytes(text * k)
                bench_train(f"tinystories x{k}", p, 10_000, max(1, repeats // 2), warmup, rows, notes)

        # Encoding with GPT-2's vocabulary.
        tok = bench_encode(data, excerpt, repeats, warmup, args.quick, rows, notes)
        if args.crossover:
            crossover = bench_crossover(tok, excerpt, repeats, warmup)
        bench_one_char(data, args.quick, rows, notes)

        # encode_file scaling with workers.
        if not args.encode_only:
            big = tmp / "encode_input.txt"
            big.write_bytes(excerpt.read_bytes() * (1 if args.quick else 16))
            workers = [1] if args.quick else sorted({1, 2, os.cpu_count() or 1})
            for w in workers:
                out = tmp / f"tokens_{w}.bin"
                t = common.measure(
                    lambda out=out, w=w: encode_file(tok, big, out, num_workers=w, progress=False),
                    repeats=repeats if args.quick else min(repeats, 3),
                    warmup=warmup,
                    cpu=True,
                )
                rows.append(row(f"encode_file gpt2 workers={w}", big.stat().st_size, t, None, None))

    return report(rows, notes, args, crossover)


def report(rows: list[dict], notes: list[str], args: argparse.Namespace, crossover: list[dict] | None) -> dict:
    """Print the table, the scaling and crossover summaries; then :func:`common.finish` (notes, machine, ``--json``)."""
    scaling = scaling_summary(rows)
    common.print_table(rows, COLUMNS)
    for k, v in scaling.items():
        print(f"scaling {k}: " + ", ".join(f"{x}: {t:.2f}x" for x, t in v.items()))
    if crossover:
        print("merge_short vs merge_long, CPU microseconds per pre-token of that length (median of --repeats):")
        for c in crossover:
            print(
                f"  {c['bytes']:5d} bytes  short {c['short_us']:9.1f}  long {c['long_us']:9.1f}  short/long {c['ratio']:.2f}"
            )
    result = common.make_result("tokenizer", args, rows, notes, scaling=scaling, crossover=crossover, quick=args.quick)
    return common.finish(result, args)


if __name__ == "__main__":
    main()
