"""Benchmark flm's BPE tokenizer against Hugging Face ``tokenizers`` (training) and ``tiktoken`` (encoding).

Usage::

    python bench/tokenizer.py [--json out.json] [--quick] [--repeats N] [--encode-only] [--crossover]

Rows (each the median over ``--repeats`` runs after one warm-up run, with min/max):

* ``train``: ``train_bpe`` on ``bpe/corpus.en`` (vocab 500) and ``tinystories/train.txt`` (vocab
  10,000) vs. ``tokenizers``' ``BpeTrainer`` with the ByteLevel pre-tokenizer; the split between
  pre-tokenization (``count_file``) and merging (``train_bpe_from_counts``); the TinyStories excerpt
  repeated 1x, 4x, 16x (how time grows with corpus size).
* ``construct``: ``Tokenizer(vocab, merges)`` from GPT-2's parsed files vs. tiktoken's ``Encoding``
  from the same ranks (flm checks there which tokens the merges rebuild whole; see tokenizer.py).
* ``encode``: single-process ``Tokenizer.encode`` with GPT-2's vocab on the TinyStories excerpt vs.
  tiktoken's single-thread ``encode`` (same vocab, built offline), timed in turn (flm, tiktoken,
  flm, ...) so background load hits both alike. ``cold`` uses a fresh tokenizer (empty pre-token
  cache) each run; ``warm`` re-uses one (the steady state of a long encode).
* ``1 MB line``: one line without whitespace (random letters: one pre-token; random punctuation:
  one pre-token; a random mix of letters, digits, punctuation and non-ASCII letters), fresh
  tokenizers, vs. tiktoken.
* ``encode_file``: the excerpt x16 to a token file with 1, 2, ... workers.

``--encode-only`` skips the training and ``encode_file`` rows. ``--crossover`` also times the two
merge algorithms of ``flm.tokenizer.merge`` on pre-tokens of growing length (where ``LONG_PIECE``
comes from).

``ratio`` is flm's time / the peer's time (lower is better; 3.0 means three times slower); ``load``
is the 1-minute load average after the row's runs.
``cpu s`` is flm's CPU time (this process plus its worker processes): with free cores, a pool
that scales shows wall time well under CPU time. ``cpu ratio`` compares CPU seconds (fairer
when other jobs share the machine; HF ``tokenizers`` may use several threads).
A peer that is not installed is skipped with a line saying so. Shared data is found through
``$FLM_SHARED_DATA`` or ``../shared/data`` relative to the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flm.tokenizer import GPT2_PATTERN, Tokenizer, encode_file, train_bpe, train_bpe_from_counts
from flm.tokenizer.gpt2_format import read_merges, read_vocab
from flm.tokenizer.merge import merge_long, merge_short
from flm.tokenizer.pretokenize import count_file

EOT = "<|endoftext|>"


def shared_data_dir() -> Path:
    """Return ``$FLM_SHARED_DATA`` or ``../shared/data`` (relative to the repo root).

    Raises:
        SystemExit: neither exists.
    """
    env = os.environ.get("FLM_SHARED_DATA")
    for c in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data", ROOT / "shared" / "data"]:
        if c.is_dir():
            return c
    raise SystemExit("shared data not found: set FLM_SHARED_DATA or place it at ../shared/data")


def _cpu_seconds() -> float:
    try:
        import resource

        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        children = ch.ru_utime + ch.ru_stime
    except ImportError:  # not POSIX
        children = 0.0
    return time.process_time() + children


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Time ``fn`` ``repeats`` times after ``warmup`` untimed calls.

    Returns:
        ``{"median": s, "min": s, "max": s, "cpu": s, "n": repeats}``: wall-clock seconds, and the
        median CPU seconds of this process and its finished children (for worker pools it sums
        the workers; on a busy machine it shows the work apart from the waiting).
    """
    return measure_interleaved({"fn": fn}, repeats, warmup)["fn"]


def _load_1m() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def measure_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time several functions in turn (a, b, a, b, ...), so background load hits all of them alike.

    Returns:
        ``{name: stats}`` with :func:`measure`'s keys plus ``load`` (1-minute load average after the runs).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, t0 = _cpu_seconds(), time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
            cpu[k].append(_cpu_seconds() - c0)
    load = _load_1m()
    return {k: {"median": statistics.median(ts[k]), "min": min(ts[k]), "max": max(ts[k]), "cpu": statistics.median(cpu[k]),
                "n": repeats, "load": load} for k in fns}


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
    return tiktoken.Encoding(name="gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: eot})


def row(task: str, size: int, flm: dict, peer: str | None, peer_t: dict | None, **extra) -> dict:
    """One result row; ``ratio`` = flm median / peer median."""
    r = {
        "task": task,
        "size_bytes": size,
        "flm_s": flm["median"],
        "flm_min_s": flm["min"],
        "flm_max_s": flm["max"],
        "flm_cpu_s": flm["cpu"],
        "flm_MBps": size / flm["median"] / 1e6 if size and flm["median"] else None,
        "peer": peer,
        "peer_s": peer_t["median"] if peer_t else None,
        "ratio": flm["median"] / peer_t["median"] if peer_t else None,
        "peer_cpu_s": peer_t["cpu"] if peer_t else None,
        "ratio_cpu": flm["cpu"] / peer_t["cpu"] if peer_t and peer_t["cpu"] > 0 else None,
        "peer_MBps": size / peer_t["median"] / 1e6 if peer_t and size and peer_t["median"] else None,
        "load": flm.get("load"),
    }
    r.update(extra)
    return r


def print_table(rows: list[dict]) -> None:
    """Print the rows as a fixed-width table."""
    head = (f"{'task':40} {'size MB':>8} {'flm s (min-max)':>24} {'cpu s':>6} {'MB/s':>6} {'peer':>10} {'peer s':>7}"
            f" {'peer MB/s':>9} {'ratio':>6} {'cpu ratio':>9} {'load':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        spread = f"{r['flm_s']:.3f} ({r['flm_min_s']:.3f}-{r['flm_max_s']:.3f})"
        mbps = f"{r['flm_MBps']:.1f}" if r["flm_MBps"] else "-"
        peer_s = f"{r['peer_s']:.3f}" if r["peer_s"] is not None else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        ratio_cpu = f"{r['ratio_cpu']:.2f}" if r["ratio_cpu"] is not None else "-"
        peer_mbps = f"{r['peer_MBps']:.1f}" if r["peer_MBps"] else "-"
        load = f"{r['load']:.2f}" if r["load"] is not None else "-"
        print(
            f"{r['task']:40} {r['size_bytes'] / 1e6:8.3f} {spread:>24} {r['flm_cpu_s']:6.3f} {mbps:>6}"
            f" {(r['peer'] or '-'):>10} {peer_s:>7} {peer_mbps:>9} {ratio:>6} {ratio_cpu:>9} {load:>5}"
        )


def bench_train(name: str, path: Path, vocab_size: int, repeats: int, rows: list, notes: list) -> None:
    """Rows for training on ``path``: flm total vs HF, and flm's pre-tokenization / merge split."""
    size = path.stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small corpora may run out of pairs before vocab_size
        flm = measure(lambda: train_bpe(path, vocab_size, [EOT]), repeats)
        pre = measure(lambda: count_file(path, [EOT]), repeats)
        counts = count_file(path, [EOT])
        merge = measure(lambda: train_bpe_from_counts(counts, vocab_size, [EOT]), repeats)
    hf = hf_train_fn(path, vocab_size)
    if hf is None:
        notes.append("tokenizers not installed: HF BpeTrainer comparison skipped")
    hf_t = measure(hf, repeats) if hf else None
    rows.append(row(f"train {name} vocab={vocab_size}", size, flm, "tokenizers" if hf else None, hf_t))
    rows.append(row("  pre-tokenization (count_file)", size, pre, None, None))
    rows.append(row("  merging (train_bpe_from_counts)", size, merge, None, None))


def scaling_summary(rows: list[dict]) -> dict:
    """Training time at 4x / 16x the excerpt relative to 1x, for flm (total, pre-tokenization, merging) and the peer."""
    out: dict[str, dict[str, float]] = {}
    base = {}
    for i, r in enumerate(rows):
        if r["task"].startswith("train tinystories x"):
            k = r["task"].split()[2]
            parts = {"flm total": r["flm_s"], "flm pre-tokenization": rows[i + 1]["flm_s"], "flm merging": rows[i + 2]["flm_s"]}
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
    alphabet = {"letters": string.ascii_letters, "punctuation": string.punctuation,
                "mixed": string.ascii_letters + string.digits + string.punctuation + "éß世"}[kind]
    return "".join(random.Random(kind).choices(alphabet, k=n))


def bench_encode(data: Path, excerpt: Path, repeats: int, quick: bool, rows: list, notes: list) -> Tokenizer:
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
    st = measure_interleaved(fns, min(repeats, 3), warmup=0)
    rows.append(row("construct gpt2 (parsed vocab + merges)", 0, st["flm"], peer, st.get("tiktoken")))

    text = excerpt.read_text(encoding="utf-8")
    size = len(text.encode("utf-8"))
    if enc:
        assert enc.encode(text, allowed_special="all") == tok.encode(text), "flm and tiktoken disagree"
    cold_toks = [_cold_copy(tok) for _ in range(repeats + 1)]  # made ahead: not timed
    fns = {"cold": lambda: cold_toks.pop().encode(text), "warm": lambda: tok.encode(text)}
    if enc:
        fns["tiktoken"] = lambda: enc.encode(text, allowed_special="all")
    st = measure_interleaved(fns, repeats)
    rows.append(row("encode gpt2 (cold cache, 1 process)", size, st["cold"], peer, st.get("tiktoken")))
    rows.append(row("encode gpt2 (warm cache, 1 process)", size, st["warm"], peer, st.get("tiktoken")))

    n = 100_000 if quick else 1_000_000
    for kind in ("letters", "punctuation", "mixed"):
        line = whitespace_free_line(kind, n)
        if enc:
            assert enc.encode(line) == tok.encode(line), f"flm and tiktoken disagree on the {kind} line"
        line_toks = [_cold_copy(tok) for _ in range(repeats + 1)]
        fns = {"flm": lambda toks=line_toks, line=line: toks.pop().encode(line)}
        if enc:
            fns["tiktoken"] = lambda line=line: enc.encode(line)
        st = measure_interleaved(fns, repeats)
        nbytes = len(line.encode("utf-8"))
        rows.append(row(f"{nbytes / 1e6:.1f} MB line, no whitespace: {kind}", nbytes, st["flm"], peer, st.get("tiktoken")))
    return tok


def bench_crossover(tok: Tokenizer, excerpt: Path, repeats: int) -> list[dict]:
    """Time ``merge_short`` and ``merge_long`` on pre-tokens of growing length (the excerpt without whitespace)."""
    letters = "".join(excerpt.read_text(encoding="utf-8").split()).encode("utf-8")
    rng = random.Random(0)
    out = []
    for length in (4, 8, 16, 32, 48, 64, 96, 128, 256, 512):
        starts = [rng.randrange(len(letters) - length) for _ in range(max(20, 4000 // length))]
        pieces = [[tok._byte_ids[b] for b in letters[s : s + length]] for s in starts]
        st = measure_interleaved({
            "short": lambda pieces=pieces: [merge_short(list(p), tok._ranks, tok._merged) for p in pieces],
            "long": lambda pieces=pieces: [merge_long(p, tok._ranks, tok._merged) for p in pieces],
        }, repeats)
        # CPU seconds: less disturbed than wall time by other jobs on a shared machine.
        short_us, long_us = (st[k]["cpu"] / len(pieces) * 1e6 for k in ("short", "long"))
        out.append({"bytes": length, "short_us": short_us, "long_us": long_us, "ratio": short_us / long_us})
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a table, optionally write JSON.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        ``{"rows": [...], "notes": [...], "machine": {...}, "quick": bool}``.
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--quick", action="store_true", help="tiny inputs, one iteration (smoke test)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row (after one warm-up)")
    ap.add_argument("--encode-only", action="store_true", help="only the construct / encode / 1 MB line rows")
    ap.add_argument("--crossover", action="store_true", help="also time merge_short vs merge_long by length")
    args = ap.parse_args(argv)
    data = shared_data_dir()
    repeats = 1 if args.quick else args.repeats
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
                bench_train("quick sample", excerpt, 300, repeats, rows, notes)
        elif not args.encode_only:
            bench_train("corpus.en", data / "bpe" / "corpus.en", 500, repeats, rows, notes)
            bench_train("tinystories x1", excerpt, 10_000, repeats, rows, notes)
            text = excerpt.read_bytes()
            for k in (4, 16):
                p = tmp / f"ts_x{k}.txt"
                p.write_bytes(text * k)
                bench_train(f"tinystories x{k}", p, 10_000, max(1, repeats // 2), rows, notes)

        # Encoding with GPT-2's vocabulary.
        tok = bench_encode(data, excerpt, repeats, args.quick, rows, notes)
        if args.crossover:
            crossover = bench_crossover(tok, excerpt, repeats)
        if args.encode_only:
            return finish(rows, notes, args, crossover)

        # encode_file scaling with workers.
        big = tmp / "encode_input.txt"
        big.write_bytes(excerpt.read_bytes() * (1 if args.quick else 16))
        workers = [1] if args.quick else sorted({1, 2, os.cpu_count() or 1})
        for w in workers:
            out = tmp / f"tokens_{w}.bin"
            t = measure(lambda out=out, w=w: encode_file(tok, big, out, num_workers=w, progress=False), repeats if args.quick else 3)
            rows.append(row(f"encode_file gpt2 workers={w}", big.stat().st_size, t, None, None))

    return finish(rows, notes, args, crossover)


def finish(rows: list[dict], notes: list[str], args: argparse.Namespace, crossover: list[dict] | None) -> dict:
    """Print the table (and the crossover table), write ``--json``, return the result dict."""
    scaling = scaling_summary(rows)
    result = {
        "rows": rows,
        "scaling": scaling,
        "notes": notes,
        "quick": args.quick,
        "crossover": crossover,
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": sys.platform,
            "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
    }
    print_table(rows)
    if result["machine"]["loadavg_after"]:
        print(f"load average after the run (1/5/15 min): {result['machine']['loadavg_after']} on {os.cpu_count()} CPUs")
    for k, v in scaling.items():
        print(f"scaling {k}: " + ", ".join(f"{x}: {t:.2f}x" for x, t in v.items()))
    for n in notes:
        print(n)
    if crossover:
        print("merge_short vs merge_long, CPU microseconds per pre-token of that length (median of --repeats):")
        for c in crossover:
            print(f"  {c['bytes']:5d} bytes  short {c['short_us']:9.1f}  long {c['long_us']:9.1f}  short/long {c['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
