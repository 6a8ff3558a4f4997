"""A new user's first commands without a network (issue 21 items 1, 2 and 5): the offline error
names what works, a failed download leaves nothing behind, ``--dry-run`` writes nothing, the plan
warns about many epochs, and a run reading a prefix downloads only that prefix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, train_argv
from test_download import TIMEOUT, _start, _stop

import flm.download as download_mod
from flm.cli import main as flm_cli_main
from flm.data import DATASETS, download
from flm.download import DownloadUnavailable

OFFLINE = "http://flm-offline.invalid"  # .invalid never resolves (RFC 2606)
TS = DATASETS["tinystories"]


def _tree(path: Path) -> dict[str, bytes] | None:
    """Every file under ``path`` with its bytes (``None``: no such directory)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _assert_offline_line(err: str, data: Path) -> None:
    line = err.strip()
    assert line.startswith("error: cannot download TinyStoriesV2-GPT4-train.txt") and "\n" not in line
    assert "Traceback" not in err
    assert "--train-text FILE --valid-text FILE" in line and "documents separated by <|endoftext|>" in line
    assert f"{data / TS.local_name('train')} and {data / TS.local_name('valid')}" in line


# ------------------------------------------------------------------------------------------------
# item 1: offline, the first command fails with a way forward and leaves nothing behind
# ------------------------------------------------------------------------------------------------
def test_offline_flm_train_says_what_works_and_leaves_no_directory(tmp_path):
    """Regression: offline, ``flm train`` failed with ``[Errno -2] Name or service not known`` and an
    empty ``data/``. Run as a user runs it (a subprocess, the base URL on a host that never resolves)."""
    env = {**os.environ, "FLM_DATA_BASE_URL": OFFLINE, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "flm", "train", "--preset", "tiny", "--device", "cpu"]
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "plan: preset tiny" in r.stdout
    _assert_offline_line(r.stderr, Path("data"))
    assert list(tmp_path.iterdir()) == []  # no data/, no runs/, no .part


def test_offline_flm_sweep_says_the_same(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLM_DATA_BASE_URL", OFFLINE)
    data, out = tmp_path / "d" / "data", tmp_path / "sweep"
    argv = ["sweep", "--preset", "tiny", "--lrs", "1e-3", "3e-3", "--device", "cpu"]
    assert flm_cli_main([*argv, "--data-dir", str(data), "--out-dir", str(out)]) == 1
    _assert_offline_line(capsys.readouterr().err, data)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_removes_only_what_it_created(tmp_path):
    # Directories this call made are removed again; a directory that was there is kept, with its files.
    with pytest.raises(DownloadUnavailable, match=r"Name or service not known|name resolution") as ei:
        download("tinystories", tmp_path / "a" / "b" / "data", base_url=OFFLINE, progress=False, timeout=TIMEOUT)
    assert ei.value.file == TS.files["train"] and ei.value.url.startswith(OFFLINE)
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "mine"
    kept.mkdir()
    with pytest.raises(DownloadUnavailable):
        download("tinystories", kept / "data", base_url=OFFLINE, progress=False, timeout=TIMEOUT)
    assert list(tmp_path.iterdir()) == [kept] and list(kept.iterdir()) == []
    with pytest.raises(DownloadUnavailable):
        download("tinystories", kept, base_url=OFFLINE, progress=False, timeout=TIMEOUT)
    assert kept.is_dir() and list(kept.iterdir()) == []  # empty, but not made by this call


def test_a_connection_that_drops_before_any_byte_leaves_no_part(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    (root / TS.files["train"]).write_bytes(b"Once upon a time.\n<|endoftext|>\n" * 100)
    srv, t = _start(root)
    try:
        srv.cut_after = 0  # headers announce the file, then the connection closes
        with pytest.raises(DownloadUnavailable, match="closed before any data"):
            download("tinystories", tmp_path / "data", base_url=srv.url, progress=False, timeout=TIMEOUT, pins={})
    finally:
        _stop(srv, t)
    assert not (tmp_path / "data").exists()


def test_http_errors_are_unavailable_too(tmp_path):
    srv, t = _start(tmp_path)  # serves nothing: 404
    try:
        with pytest.raises(DownloadUnavailable, match="HTTP 404"):
            download("tinystories", tmp_path / "data", base_url=srv.url, progress=False, timeout=TIMEOUT, pins={})
    finally:
        _stop(srv, t)
    assert not (tmp_path / "data").exists()
    assert issubclass(DownloadUnavailable, OSError)  # callers catching OSError keep working


# ------------------------------------------------------------------------------------------------
# item 5: --dry-run prints the plan, runs the checks, writes nothing; the plan warns about epochs
# ------------------------------------------------------------------------------------------------
def test_dry_run_offline_reports_the_download_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLM_DATA_BASE_URL", OFFLINE)
    data, out = tmp_path / "data", tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--device", "cpu", "--data-dir", str(data), "--out-dir", str(out)]
    assert flm_cli_main([*argv, "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    total = sum(TS.pins[s].size for s in ("train", "valid"))
    assert f"would download {total:,} bytes" in stdout and "nothing was written" in stdout
    assert list(tmp_path.iterdir()) == []


def test_dry_run_runs_the_checks_and_writes_nothing(texts, tmp_path, capsys):
    out = tmp_path / "run"
    assert flm_cli_main([*train_argv(texts, out), "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    assert "plan: preset tiny" in stdout and "tokenizer: trained" in stdout
    assert "dry run: every check passed; nothing was written" in stdout
    assert not out.exists()
    # A check that fails still fails under --dry-run, with nothing written.
    assert flm_cli_main([*train_argv(texts, out), "--dry-run", "--context-length", "100000"]) == 2
    assert "error: " in capsys.readouterr().err and not out.exists()
    # An existing run directory is left exactly as it was: no .lock, no manifest, no stamp.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    assert flm_cli_main([*train_argv(texts, out), "--dry-run", "--overwrite"]) == 0
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_dry_run_does_not_stamp_data_files(tmp_path, monkeypatch, capsys):
    """A data set file on disk is verified by the plan; a dry run records nothing (no ``.stamp.json``)."""
    import dataclasses
    import hashlib
    from types import MappingProxyType

    import flm.cli.train
    import flm.cli.train_data

    data = tmp_path / "data"
    data.mkdir()
    pins = {}
    for split, n in (("train", 400), ("valid", 80)):
        blob = "".join(f"Once upon a time there was a {split} story {i}.\n<|endoftext|>\n" for i in range(n)).encode()
        (data / TS.local_name(split)).write_bytes(blob)
        pins[split] = download_mod.FilePin(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    table = MappingProxyType({**DATASETS, "tinystories": dataclasses.replace(TS, pins=MappingProxyType(pins))})
    monkeypatch.setattr(flm.cli.train, "DATASETS", table)
    monkeypatch.setattr(flm.cli.train_data, "DATASETS", table)
    before = _tree(data)
    argv = ["train", "--preset", "tiny", "--device", "cpu", "--data-dir", str(data), "--out-dir", str(tmp_path / "r")]
    assert flm_cli_main([*argv, "--dry-run"]) == 0
    assert "every check passed" in capsys.readouterr().out
    assert _tree(data) == before and not (tmp_path / "r").exists()


def test_the_plan_warns_when_training_for_many_epochs(texts, tmp_path, capsys):
    """Regression: ``--preset handout`` on a 213K-token excerpt planned ~1,500 epochs without a word."""
    out = tmp_path / "run"
    train_bytes = texts[0].stat().st_size
    assert flm_cli_main([*train_argv(texts, out), "--dry-run"]) == 0
    assert "epochs" not in capsys.readouterr().out  # tiny: 10,240 tokens of a ~17K-token text
    tokens = 40 * train_bytes  # tokens planned: 40 × the bytes, so well over 20 × the tokens
    assert flm_cli_main([*train_argv(texts, out), "--dry-run", "--tokens", str(tokens)]) == 0
    stdout = capsys.readouterr().out
    assert "warning: training for ~" in stdout and "epochs of the training text" in stdout
    assert not out.exists()


def test_exact_epochs_warning_after_encoding(tmp_path):
    """Once the training text is encoded, the warning uses its exact token count."""
    from flm.cli.train import Plan, epochs_warning, resolve_settings
    from flm.config import RunConfig

    cfg = RunConfig.resolve("tiny")  # 40 × 8 × 32 = 10,240 tokens
    plan = Plan(resolve_settings(cfg)[0], tmp_path, False, train_text_bytes=None)
    assert epochs_warning(plan) is None  # the text's size unknown: no guess
    assert epochs_warning(plan, 10_240 // 20) is None  # exactly 20 epochs: fine
    assert "~21 epochs" in epochs_warning(plan, 10_240 // 21)
    assert "~1,500 epochs" in epochs_warning(plan, 7)


def test_sweep_dry_run_writes_nothing(texts, tmp_path, capsys):
    out = tmp_path / "sweep"
    train, valid = texts
    argv = ["sweep", "--preset", "tiny", "--lrs", "1e-3", "3e-3", "--device", "cpu", "--num-workers", "1"]
    argv += ["--train-text", str(train), "--valid-text", str(valid), "--out-dir", str(out), "--dry-run"]
    assert flm_cli_main(argv) == 0
    stdout = capsys.readouterr().out
    assert "sweep: 2 models" in stdout and "dry run: every check passed; nothing was written" in stdout
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# item 2: a run that reads a prefix downloads only that prefix (HTTP Range), stamped unverified
# ------------------------------------------------------------------------------------------------
EOS = b"<|endoftext|>"


@pytest.fixture()
def remote(tmp_path):
    """A loopback server holding TinyStories-named files (~200 KB train, some multi-byte UTF-8)."""
    root = tmp_path / "remote"
    root.mkdir()
    files = {
        "train": "".join(f"Once upon a time {i} — a café story, naïve {i % 7}.\n<|endoftext|>\n" for i in range(3000)),
        "valid": "".join(f"One day {i} the dog ran.\n<|endoftext|>\n" for i in range(300)),
    }
    blobs = {s: t.encode() for s, t in files.items()}
    for split, blob in blobs.items():
        (root / TS.files[split]).write_bytes(blob)
    srv, t = _start(root)
    try:
        yield srv, blobs
    finally:
        _stop(srv, t)


def _pins(blobs):
    import hashlib

    return {s: download_mod.FilePin(size=len(b), sha256=hashlib.sha256(b).hexdigest()) for s, b in blobs.items()}


def _cut(blob: bytes, n: int) -> bytes:
    """What --train-bytes n reads of the whole file: up to the start of the last separator at or before n."""
    return blob[: blob.rfind(EOS, 0, n + len(EOS))]


@pytest.mark.parametrize("ignore_range", [False, True])
def test_a_prefix_is_fetched_by_range_cut_at_a_document_and_stamped_unverified(
    remote, tmp_path, monkeypatch, ignore_range
):
    import http.client
    import json

    srv, blobs = remote
    srv.ignore_range = ignore_range  # a server that ignores Range: the stream is read only that far
    n = 10_000
    dest = tmp_path / "data"
    read, real_read = [], http.client.HTTPResponse.read

    def counting_read(self, amt=None):
        data = real_read(self, amt)
        read.append(len(data))
        return data

    monkeypatch.setattr(http.client.HTTPResponse, "read", counting_read)
    path = download_mod.download_prefix(
        "tinystories", dest, "train", n, base_url=srv.url, progress=False, timeout=TIMEOUT, pins=_pins(blobs)
    )
    monkeypatch.undo()
    assert sum(read) == n + len(EOS) < len(blobs["train"])  # of a ~200 KB body, only what is needed
    assert (
        path
        == dest / "TinyStoriesV2-GPT4-train.first-10000-bytes.txt"
        == download_mod.prefix_path("tinystories", dest, "train", n)
    )
    assert path.read_bytes() == _cut(blobs["train"], n) and len(path.read_bytes()) <= n
    assert blobs["train"][len(path.read_bytes()) :].startswith(EOS)  # cut at a document boundary
    path.read_bytes().decode("utf-8")
    assert [r["range"] for r in srv.requests] == [f"bytes=0-{n + len(EOS) - 1}"]
    stamp = json.loads(download_mod.stamp_path(path).read_text())
    assert stamp["verified"] is False and "sha256" not in stamp  # no digest is invented
    assert stamp["prefix_of"] == TS.files["train"] and stamp["prefix_bytes"] == n
    assert "prefix of 10000 bytes" in stamp["note"] and "not digest-verified" in stamp["note"]
    assert download_mod.prefix_stamp(path) == stamp
    assert sorted(p.name for p in dest.iterdir()) == [path.name, path.name + ".stamp.json"]
    # Reused without a request; the whole file, when a run needs it, is downloaded and verified as always.
    assert download_mod.download_prefix("tinystories", dest, "train", n, base_url=srv.url, progress=False) == path
    assert len(srv.requests) == 1
    srv.ignore_range = False
    whole = download("tinystories", dest, base_url=srv.url, progress=False, timeout=TIMEOUT, pins=_pins(blobs))
    assert whole["train"].read_bytes() == blobs["train"] and path.read_bytes() == _cut(blobs["train"], n)
    assert json.loads(download_mod.stamp_path(whole["train"]).read_text())["sha256"] == _pins(blobs)["train"].sha256


def test_a_prefix_is_refused_for_another_file_html_or_non_utf8(remote, tmp_path):
    srv, blobs = remote
    get = dict(base_url=srv.url, progress=False, timeout=TIMEOUT)
    wrong = {"train": download_mod.FilePin(size=len(blobs["train"]) + 1)}
    with pytest.raises(OSError, match="offers .* the pinned size is"):
        download_mod.download_prefix("tinystories", tmp_path / "a", "train", 1000, pins=wrong, **get)
    assert not (tmp_path / "a").exists()
    (srv.root / TS.files["train"]).write_bytes(b"caf\xe9 story\n<|endoftext|>\n" * 100)  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match="not UTF-8"):
        download_mod.download_prefix("tinystories", tmp_path / "a", "train", 1000, pins={}, **get)
    assert not (tmp_path / "a").exists()
    (srv.root / TS.files["train"]).write_bytes(b"<!DOCTYPE html><html>sign in</html>" + b" " * 5000)
    with pytest.raises(OSError, match="HTML page"):
        download_mod.download_prefix("tinystories", tmp_path / "a", "train", 1000, pins={}, **get)
    assert not (tmp_path / "a").exists()
    # A file of the user's at the prefix's name (no flm stamp) is never replaced.
    mine = download_mod.prefix_path("tinystories", tmp_path, "train", 1000)
    mine.write_text("my notes")
    with pytest.raises(ValueError, match="does not describe it; it is kept"):
        download_mod.download_prefix("tinystories", tmp_path, "train", 1000, pins={}, **get)
    assert mine.read_text() == "my notes"


def test_flm_train_with_train_bytes_downloads_only_the_prefix(remote, tmp_path, monkeypatch, capsys):
    """Regression: cpu-small reads 32 MiB but downloaded the whole 2.1 GiB training file."""
    import dataclasses
    from types import MappingProxyType

    import flm.cli.train
    import flm.cli.train_data

    srv, blobs = remote
    ts = dataclasses.replace(TS, pins=MappingProxyType(_pins(blobs)))
    table = MappingProxyType({**DATASETS, "tinystories": ts})
    monkeypatch.setattr(download_mod, "DATASETS", table)
    monkeypatch.setattr(flm.cli.train, "DATASETS", table)
    monkeypatch.setattr(flm.cli.train_data, "DATASETS", table)
    monkeypatch.setenv("FLM_DATA_BASE_URL", srv.url)
    data, out = tmp_path / "data", tmp_path / "run"
    n = 40_000
    argv = ["train", "--preset", "tiny", "--device", "cpu", "--num-workers", "1", "--max-new-tokens", "4"]
    argv += ["--data-dir", str(data), "--out-dir", str(out), "--train-bytes", str(n)]
    assert flm_cli_main([*argv, "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    want = n + len(EOS) + len(blobs["valid"])
    assert f"would download {want:,} bytes" in stdout and f"the first {n:,} bytes of {TS.files['train']}" in stdout
    assert "is an unverified prefix" in stdout and not srv.requests and not data.exists()
    assert flm_cli_main(argv) == 0
    stdout = capsys.readouterr().out
    assert "is an unverified prefix" in stdout
    prefix = download_mod.prefix_path("tinystories", data, "train", n)
    assert prefix.read_bytes() == _cut(blobs["train"], n)
    assert not (data / TS.local_name("train")).exists()  # the whole training file was not fetched
    assert (data / TS.local_name("valid")).read_bytes() == blobs["valid"]
    assert sorted(r["range"] or "" for r in srv.requests) == ["", f"bytes=0-{n + len(EOS) - 1}"]
    # A second run reuses the prefix (no request), and still says what it is.
    assert flm_cli_main([*argv, "--overwrite"]) == 0
    assert "is an unverified prefix" in capsys.readouterr().out and len(srv.requests) == 2
    # Once the whole file is there (downloaded and verified), a new run reads it; resuming the run
    # made from the prefix keeps reading the prefix (its tokenizer was trained on that file).
    download("tinystories", data, progress=False, timeout=TIMEOUT)
    assert (data / TS.local_name("train")).read_bytes() == blobs["train"]
    assert flm_cli_main([*argv, "--resume", "--max-iters", "45"]) == 0
    stdout = capsys.readouterr().out
    assert "is an unverified prefix" in stdout and "tokenizer: cached" in stdout
    assert flm_cli_main([*argv, "--overwrite", "--dry-run"]) == 0
    assert "unverified prefix" not in capsys.readouterr().out


def test_a_prefix_of_a_gzip_data_set_reads_only_enough_of_the_stream(tmp_path, monkeypatch):
    """owt is served gzipped: no Range is asked; the stream is decompressed until the prefix is
    complete, then closed (a corrupt stream is refused, nothing written)."""
    import gzip
    import http.client
    import random

    rng = random.Random(0)
    words = ["once", "upon", "a", "time", "dog", "cat", "ran", "saw", "big", "small", "naïve", "café"]
    text = "".join(" ".join(rng.choice(words) for _ in range(40)) + ".\n<|endoftext|>\n" for _ in range(6000)).encode()
    blob = gzip.compress(text)
    owt = DATASETS["owt"]
    root = tmp_path / "remote"
    root.mkdir()
    (root / owt.files["train"]).write_bytes(blob)
    srv, t = _start(root)
    read, real_read = [], http.client.HTTPResponse.read

    def counting_read(self, amt=None):
        data = real_read(self, amt)
        read.append(len(data))
        return data

    n = 50_000
    pins = {"train": download_mod.FilePin(size=len(blob))}
    try:
        monkeypatch.setattr(http.client.HTTPResponse, "read", counting_read)
        path = download_mod.download_prefix(
            "owt", tmp_path / "data", "train", n, base_url=srv.url, progress=False, timeout=TIMEOUT, pins=pins
        )
        monkeypatch.undo()
        assert [r["range"] for r in srv.requests] == [None]
        assert sum(read) < len(blob) // 2  # the stream was closed once the prefix was complete
        assert path.name == "owt_train.first-50000-bytes.txt" and path.read_bytes() == _cut(text, n)
        (root / owt.files["train"]).write_bytes(blob[:20] + bytes(len(blob) - 20))  # a corrupt stream
        with pytest.raises(ValueError, match="not a valid gzip stream"):
            download_mod.download_prefix(
                "owt", tmp_path / "other", "train", n, base_url=srv.url, progress=False, timeout=TIMEOUT, pins=pins
            )
        assert not (tmp_path / "other").exists()
    finally:
        _stop(srv, t)
