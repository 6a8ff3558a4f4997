"""Tests for flm.download (resumable, size-checked, SHA-256-verified, gzip) against a loopback HTTP server
(flm.progress has tests/test_progress.py)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flm.download as download_mod
from flm.cli import main as flm_cli_main
from flm.data import DATASETS, download
from flm.download import FilePin

TIMEOUT = 5  # seconds; everything is on loopback


class _Server(ThreadingHTTPServer):
    """Serves files from ``root``; test knobs are plain attributes, read by the handler per request."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.root = root
        self.requests: list[dict[str, str | None]] = []
        self.cut_after: int | None = None  # the next response sends only this many body bytes
        self.ignore_range = False  # answer 200 with the whole file even when Range is asked
        self.extra_length = 0  # claim this many more bytes in Content-Length than are sent
        self.content_type = "application/octet-stream"
        self.headers: dict[str, str] = {}  # extra headers on every file reply
        self.hop_headers: dict[str, str] = {}  # headers on the 302 that "/hop/<name>" answers (as the hub does)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _RangeHandler(BaseHTTPRequestHandler):
    """GET with single open-ended/closed byte ranges (``bytes=a-`` / ``bytes=a-b``); HTTP/1.0, one request per
    connection. ``/hop/<name>`` answers 302 to ``/<name>``, like the hub's redirect to its storage."""

    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        with srv.lock:
            srv.requests.append({"path": self.path, "range": rng})
        if self.path.startswith("/hop/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/hop") :])
            for k, v in srv.hop_headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with srv.lock:
            cut, srv.cut_after = srv.cut_after, None
        path = srv.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404, "not found")
            return
        body = path.read_bytes()
        total = len(body)
        status, start, end = 200, 0, total - 1
        if rng and not srv.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m:
                self.send_error(400, "bad range")
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start : end + 1]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.send_header("Content-Type", srv.content_type)
        self.send_header("Content-Length", str(len(payload) + srv.extra_length))
        for k, v in srv.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if cut is not None:
            payload = payload[:cut]
        self.wfile.write(payload)
        self.wfile.flush()


def _start(root: Path):
    srv = _Server(root)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return srv, t


def _stop(srv: _Server, t: threading.Thread) -> None:
    srv.shutdown()
    srv.server_close()
    t.join(timeout=TIMEOUT)


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    srv, t = _start(root)
    try:
        yield srv
    finally:
        _stop(srv, t)


def _text(n_lines: int, seed: int) -> bytes:
    return "".join(f"Once upon a time {seed} there was line {i}.\n<|endoftext|>\n" for i in range(n_lines)).encode()


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _pin(blob: bytes, text: bytes | None = None) -> FilePin:
    """The pin of a served file (and, for a .gz, of its decompressed ``text``)."""
    if text is None:
        return FilePin(size=len(blob), sha256=_sha(blob))
    return FilePin(size=len(blob), sha256=_sha(blob), local_size=len(text), local_sha256=_sha(text))


@pytest.fixture()
def tinystories(server):
    files = {
        "train": _text(4000, 1),  # ~200 KB
        "valid": _text(300, 2),
    }
    for split, blob in files.items():
        (server.root / DATASETS["tinystories"].files[split]).write_bytes(blob)
    return files


def _get(server, dest, name="tinystories", *, pins=None, base_url=None, **kw):
    """download() from the loopback server; ``pins`` defaults to the true pins of the files it serves right now."""
    if pins is None:
        info, pins = DATASETS[name], {}
        for split, remote in info.files.items():
            blob = (server.root / remote).read_bytes() if (server.root / remote).is_file() else None
            if blob is not None:
                pins[split] = _pin(blob, gzip.decompress(blob) if info.gzip else None)
    return download(name, dest, base_url=base_url or server.url, progress=False, timeout=TIMEOUT, pins=pins, **kw)


def _ts_pins(files: dict[str, bytes]) -> dict[str, FilePin]:
    return {split: _pin(blob) for split, blob in files.items()}


# ------------------------------------------------------------------------------------------------
# download
# ------------------------------------------------------------------------------------------------
def test_datasets_table():
    ts, owt = DATASETS["tinystories"], DATASETS["owt"]
    assert ts.base_url == "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
    assert dict(ts.files) == {"train": "TinyStoriesV2-GPT4-train.txt", "valid": "TinyStoriesV2-GPT4-valid.txt"}
    assert not ts.gzip
    assert owt.base_url == "https://huggingface.co/datasets/stanford-cs336/owt-sample/resolve/main"
    assert dict(owt.files) == {"train": "owt_train.txt.gz", "valid": "owt_valid.txt.gz"} and owt.gzip
    assert owt.local_name("train") == "owt_train.txt"
    with pytest.raises(TypeError):
        DATASETS["x"] = ts  # read-only table
    with pytest.raises(TypeError):
        ts.pins["train"] = FilePin()  # type: ignore[index]
    # every split is pinned; sizes as published (sha256 values are validated by FilePin itself)
    assert ts.pins["train"].size == 2_227_753_162 and ts.pins["valid"].size == 22_502_601
    assert owt.pins["train"].local_size == 11_920_511_059 and owt.pins["valid"].local_size == 289_998_753
    for info in (ts, owt):
        assert set(info.pins) == set(info.files)
        for pin in info.pins.values():
            assert pin.size is not None and pin.sha256 is not None
            assert (pin.local_sha256 is not None) == info.gzip


def test_filepin_and_pins_argument_validation(server, tinystories, tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        FilePin(sha256="ABC")
    with pytest.raises(ValueError, match="sha256"):
        FilePin(sha256="A" * 64)  # upper case is not accepted: the table is compared as written
    with pytest.raises(ValueError, match="size"):
        FilePin(size=-1)
    with pytest.raises(ValueError, match="local_size"):
        FilePin(local_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'test'"):
        _get(server, tmp_path / "d", pins={"test": FilePin()})
    with pytest.raises(TypeError, match="FilePin"):
        _get(server, tmp_path / "d", pins={"train": ("x", 1)})
    assert not server.requests  # rejected before any network traffic


def test_plain_download(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    paths = _get(server, dest)
    assert set(paths) == {"train", "valid"}
    assert paths["train"] == dest / "TinyStoriesV2-GPT4-train.txt"
    for split, blob in tinystories.items():
        assert paths[split].read_bytes() == blob
    assert not list(dest.glob("*.part"))
    assert [r["range"] for r in server.requests] == [None, None]


def test_default_pins_apply_to_a_mirror(server, tinystories, tmp_path):
    # --base-url / FLM_DATA_BASE_URL mirrors are held to the table's pins: these small files are refused
    # as soon as the server announces their size, before any body is written.
    dest = tmp_path / "dest"
    with pytest.raises(OSError, match=r"TinyStoriesV2-GPT4-train\.txt.*offers \d+ bytes.*pinned size is 2227753162"):
        download("tinystories", dest, base_url=server.url, progress=False, timeout=TIMEOUT)
    assert not dest.exists()  # the directory download() made is removed again, being empty


def test_wrong_body_of_right_size_fails_sha256(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    name = DATASETS["tinystories"].files["train"]
    good = tinystories["train"]
    bad = good[:5000] + bytes([good[5000] ^ 1]) + good[5001:]  # one bit flipped, same length
    (server.root / name).write_bytes(bad)
    with pytest.raises(OSError) as ei:
        _get(server, dest, pins=_ts_pins(tinystories))
    msg = str(ei.value)
    assert name in msg and f"got sha256 {_sha(bad)}, expected {_sha(good)}" in msg and "pinned" in msg
    assert "\n" not in msg
    assert not (dest / name).exists() and not (dest / f"{name}.part").exists()


def test_pinned_size_mismatch_is_refused_before_download(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    pins = _ts_pins(tinystories)
    pins["train"] = dataclasses.replace(pins["train"], size=len(tinystories["train"]) + 1)
    with pytest.raises(OSError, match=rf"offers {len(tinystories['train'])} bytes, the pinned size is"):
        _get(server, dest, pins=pins)
    assert not dest.exists()


def test_html_page_is_refused(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    page = b"<!DOCTYPE html>\n<html><body>Please log in to the Wi-Fi</body></html>\n"
    for split in ("train", "valid"):
        (server.root / DATASETS["tinystories"].files[split]).write_bytes(page)
    server.content_type = "text/html; charset=utf-8"
    url = f"{server.url}/TinyStoriesV2-GPT4-train.txt"
    with pytest.raises(OSError) as ei:
        _get(server, dest, pins={})  # even with pin checks off
    msg = str(ei.value)
    assert url in msg and "server returned an HTML page, not the data file" in msg and "--base-url" in msg
    assert "\n" not in msg
    assert not dest.exists()  # nothing written


def test_text_html_content_type_is_refused_even_without_markup(server, tinystories, tmp_path):
    server.content_type = "Text/HTML"  # e.g. a portal's plain-worded error page: the header alone decides
    (server.root / DATASETS["tinystories"].files["train"]).write_bytes(b"Access denied. Sign in first.\n")
    with pytest.raises(OSError, match="server returned an HTML page"):
        _get(server, tmp_path / "dest", pins={})
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("body", [b"<!doctype html><p>hi</p>", b" \r\n\t<HTML lang=en><body>x</body></HTML>"])
def test_html_body_is_refused_whatever_the_content_type(server, tinystories, tmp_path, body):
    (server.root / DATASETS["tinystories"].files["train"]).write_bytes(body)
    with pytest.raises(OSError, match="server returned an HTML page"):
        _get(server, tmp_path / "dest", pins={})
    assert not (tmp_path / "dest").exists()


def test_server_checksum_mismatch_fails(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    wrong = "0" * 64
    server.headers = {"X-Linked-Etag": f'"{wrong}"'}
    with pytest.raises(OSError) as ei:
        _get(server, dest, pins={})  # independent of the pins
    msg = str(ei.value)
    assert "TinyStoriesV2-GPT4-train.txt" in msg and "server's checksum" in msg
    assert f"got sha256 {_sha(tinystories['train'])}, expected {wrong}" in msg
    assert not dest.exists()
    server.headers = {"X-Linked-Size": str(len(tinystories["train"]) - 1)}
    with pytest.raises(OSError, match=r"server's checksum.*got \d+ bytes, expected \d+"):
        _get(server, dest, pins={})


def test_server_checksum_on_the_redirect_is_used(server, tinystories, tmp_path):
    # The hub sends X-Linked-Etag / X-Linked-Size on its 302 to the storage, not on the final reply.
    good = tinystories["train"]
    server.hop_headers = {"X-Linked-Etag": f'"{_sha(good)}"', "X-Linked-Size": str(len(good))}
    paths = _get(server, tmp_path / "ok", pins={}, base_url=server.url + "/hop", splits=["train"])
    assert paths["train"].read_bytes() == good
    assert [r["path"] for r in server.requests] == [
        "/hop/TinyStoriesV2-GPT4-train.txt",
        "/TinyStoriesV2-GPT4-train.txt",
    ]
    server.hop_headers = {"X-Linked-Etag": '"' + "ab" * 32 + '"'}
    with pytest.raises(OSError, match="server's checksum.*expected " + "ab" * 32):
        _get(server, tmp_path / "bad", pins={}, base_url=server.url + "/hop", splits=["train"])
    assert not (tmp_path / "bad").exists()


def test_etag_only_counts_on_a_hub_reply(server, tinystories, tmp_path):
    # A plain server's ETag is opaque (even when it happens to be 64 hex digits); a git blob SHA-1 is ignored.
    server.headers = {"ETag": '"' + "0" * 64 + '"'}
    _get(server, tmp_path / "a", pins={}, splits=["valid"])
    server.headers = {"ETag": '"' + "1" * 40 + '"', "X-Repo-Commit": "f" * 40}
    _get(server, tmp_path / "b", pins={}, splits=["valid"])
    server.headers = {"ETag": 'W/"' + "0" * 64 + '"', "X-Repo-Commit": "f" * 40}
    with pytest.raises(OSError, match="server's checksum"):
        _get(server, tmp_path / "c", pins={}, splits=["valid"])


def test_resume_after_interruption(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    name = DATASETS["tinystories"].files["train"]
    server.cut_after = 1000
    with pytest.raises(OSError, match=re.escape(name)):
        _get(server, dest)
    part = dest / f"{name}.part"
    assert part.stat().st_size == 1000
    assert not (dest / name).exists()
    paths = _get(server, dest)  # the pins are the whole file's: the digest spans the resumed prefix
    assert server.requests[1]["path"] == f"/{name}" and server.requests[1]["range"] == "bytes=1000-"
    assert paths["train"].read_bytes() == tinystories["train"]
    assert paths["valid"].read_bytes() == tinystories["valid"]
    assert not part.exists()


def test_resume_verifies_the_bytes_already_on_disk(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    name = DATASETS["tinystories"].files["train"]
    server.cut_after = 1000
    with pytest.raises(OSError, match="incomplete"):
        _get(server, dest)
    part = dest / f"{name}.part"
    prefix = bytearray(part.read_bytes())
    prefix[10] ^= 0xFF  # the partial file was corrupted on disk between the runs
    part.write_bytes(bytes(prefix))
    with pytest.raises(
        OSError, match=rf"{re.escape(name)}.*got sha256 [0-9a-f]{{64}}, expected {_sha(tinystories['train'])}"
    ):
        _get(server, dest)
    assert server.requests[1]["range"] == "bytes=1000-"  # only the tail was fetched, the prefix was re-read
    assert not part.exists() and not (dest / name).exists()
    assert _get(server, dest)["train"].read_bytes() == tinystories["train"]  # a fresh start then succeeds


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=30_000), interruptions=st.integers(min_value=1, max_value=3))
def test_property_interrupted_downloads_verify_like_whole_ones(server, cut, interruptions):
    blob = _text(600, 7)  # ~30 KB
    name = DATASETS["tinystories"].files["valid"]
    (server.root / name).write_bytes(blob)
    pins = {"valid": _pin(blob)}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(interruptions):
            server.cut_after = cut
            try:
                _get(server, d, pins=pins, splits=["valid"])
            except OSError as e:  # a cut before any byte: nothing to resume, and no .part is left
                assert "incomplete" in str(e) or (cut == 0 and "closed before any data" in str(e))
        server.cut_after = None
        assert _get(server, d, pins=pins, splits=["valid"])["valid"].read_bytes() == blob


def test_server_ignoring_range_restarts_cleanly(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    server.cut_after = 777
    with pytest.raises(OSError):
        _get(server, dest)
    server.ignore_range = True
    paths = _get(server, dest)
    assert server.requests[1]["range"] == "bytes=777-"  # asked, but got a 200 with everything
    assert paths["train"].read_bytes() == tinystories["train"]
    assert not list(dest.glob("*.part"))


def test_size_mismatch_raises_and_keeps_part(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    name = DATASETS["tinystories"].files["train"]
    server.extra_length = 10  # Content-Length promises 10 bytes more than are sent
    # pins={}: with a pinned size the false promise would be refused up front (see the test above)
    with pytest.raises(OSError, match=re.escape(name) + ".*incomplete"):
        _get(server, dest, pins={})
    part = dest / f"{name}.part"
    assert part.stat().st_size == len(tinystories["train"])
    assert not (dest / name).exists()
    # The server is fixed: the resumed request is past the end (416 with the true total), which completes it
    # and the pinned digest of the bytes on disk is checked.
    server.extra_length = 0
    paths = _get(server, dest)
    assert server.requests[1]["range"] == f"bytes={len(tinystories['train'])}-"
    assert paths["train"].read_bytes() == tinystories["train"]


def test_complete_but_wrong_part_is_removed(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    name = DATASETS["tinystories"].files["valid"]
    (dest / f"{name}.part").write_bytes(b"y" * len(tinystories["valid"]))  # right size, wrong bytes: 416 path
    with pytest.raises(OSError, match="got sha256"):
        _get(server, dest, splits=["valid"])
    assert not list(dest.iterdir())


def test_stale_part_longer_than_remote_restarts(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    name = DATASETS["tinystories"].files["valid"]
    (dest / f"{name}.part").write_bytes(b"x" * (len(tinystories["valid"]) + 50))
    paths = _get(server, dest, splits=["valid"])
    assert set(paths) == {"valid"}
    assert paths["valid"].read_bytes() == tinystories["valid"]


def test_skip_if_complete(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    first = _get(server, dest)
    n = len(server.requests)
    second = _get(server, dest)
    assert second == first and len(server.requests) == n  # no network at all


def test_gzip_dataset_is_decompressed(server, tmp_path):
    texts = {"train": _text(3000, 3), "valid": _text(100, 4)}
    for split, blob in texts.items():
        (server.root / DATASETS["owt"].files[split]).write_bytes(gzip.compress(blob))
    dest = tmp_path / "dest"
    server.cut_after = 500  # interrupt the compressed transfer: it resumes on the .gz.part
    with pytest.raises(OSError, match=r"owt_train\.txt\.gz"):
        _get(server, dest, name="owt")
    assert (dest / "owt_train.txt.gz.part").stat().st_size == 500
    paths = _get(server, dest, name="owt")
    assert paths == {"train": dest / "owt_train.txt", "valid": dest / "owt_valid.txt"}
    assert server.requests[1]["range"] == "bytes=500-"
    for split, blob in texts.items():
        assert paths[split].read_bytes() == blob
    stamps = ["owt_train.txt.stamp.json", "owt_valid.txt.stamp.json"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(["owt_train.txt", "owt_valid.txt", *stamps])


def test_gzip_decompressed_pin_mismatch(server, tmp_path):
    text = _text(200, 5)
    gz = gzip.compress(text)
    (server.root / "owt_valid.txt.gz").write_bytes(gz)
    dest = tmp_path / "dest"
    pins = {"valid": dataclasses.replace(_pin(gz, text), local_sha256="c" * 64)}  # the .gz is right, the text not
    with pytest.raises(
        OSError, match=rf"owt_valid\.txt .*pinned, decompressed.*got sha256 {_sha(text)}, expected c{{64}}"
    ):
        _get(server, dest, name="owt", splits=["valid"], pins=pins)
    assert not dest.exists()  # neither the text (atomic write) nor the .gz.part is left


def test_corrupt_gzip_raises_and_removes_part(server, tmp_path):
    for split in ("train", "valid"):
        (server.root / DATASETS["owt"].files[split]).write_bytes(b"this is not gzip data" * 10)
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match=r"owt_train\.txt\.gz.*gzip"):
        _get(server, dest, name="owt", pins={})
    assert not dest.exists()


def test_http_error_names_the_file(server, tmp_path):
    with pytest.raises(OSError, match=r"TinyStoriesV2-GPT4-train\.txt.*404"):
        _get(server, tmp_path / "dest", pins={})


def test_env_base_url_and_unknown_name(server, tinystories, tmp_path, monkeypatch):
    monkeypatch.setenv("FLM_DATA_BASE_URL", server.url + "/")
    paths = download("tinystories", tmp_path / "dest", progress=False, timeout=TIMEOUT, pins=_ts_pins(tinystories))
    assert paths["valid"].read_bytes() == tinystories["valid"]
    with pytest.raises(ValueError, match="'nope'"):
        download("nope", tmp_path / "dest")
    with pytest.raises(ValueError, match="'test'"):
        download("tinystories", tmp_path / "dest", splits=["test"])


def test_progress_bar_on_stderr(server, tinystories, tmp_path, capsys):
    download(
        "tinystories",
        tmp_path / "dest",
        base_url=server.url,
        progress=True,
        timeout=TIMEOUT,
        pins=_ts_pins(tinystories),
    )
    err = capsys.readouterr().err
    assert "TinyStoriesV2-GPT4-train.txt" in err and "100%" in err


def test_cli(server, tinystories, tmp_path, capsys, monkeypatch):
    argv = ["download", "tinystories", "", "--base-url", server.url, "--no-progress"]
    # The real pins refuse the test files; --no-pins accepts them.
    argv[2] = str(tmp_path / "d0")
    assert flm_cli_main(argv) == 1 and "pinned size is 2227753162" in capsys.readouterr().err
    argv[2] = str(tmp_path / "d1")
    assert flm_cli_main([*argv, "--no-pins"]) == 0
    assert (tmp_path / "d1" / "TinyStoriesV2-GPT4-valid.txt").read_bytes() == tinystories["valid"]
    capsys.readouterr()
    # With a table whose pins match, the CLI verifies by default.
    ts = dataclasses.replace(DATASETS["tinystories"], pins=MappingProxyType(_ts_pins(tinystories)))
    monkeypatch.setattr(download_mod, "DATASETS", MappingProxyType({**DATASETS, "tinystories": ts}))
    dest = tmp_path / "dest"
    argv[2] = str(dest)
    rc = flm_cli_main(argv)
    out = capsys.readouterr().out
    assert rc == 0
    assert f"train\t{dest / 'TinyStoriesV2-GPT4-train.txt'}" in out
    assert (dest / "TinyStoriesV2-GPT4-valid.txt").read_bytes() == tinystories["valid"]
    rc = flm_cli_main(["download", "owt", str(tmp_path / "d2"), "--base-url", server.url, "--no-progress"])
    assert rc == 1 and "owt_train.txt.gz" in capsys.readouterr().err


def test_a_wrong_size_file_already_on_disk_is_refused_not_used(tmp_path, capsys):
    """Regression: an HTML page saved as the data set by an older version was used as-is forever;
    a file on disk is now checked against the pinned size (a stat) by download and by flm train."""
    info = DATASETS["tinystories"]
    page = tmp_path / info.local_name("train")
    page.write_bytes(b"<!doctype html><html>login</html>")
    pin = info.pins["train"]
    with pytest.raises(ValueError, match=r"is 33 bytes, not the expected 2,227,753,162"):
        download("tinystories", tmp_path, splits=("train",), base_url="http://127.0.0.1:9/")
    assert page.read_bytes().startswith(b"<!doctype")  # never deleted: the user decides
    assert download("tinystories", tmp_path, splits=("train",), pins={"train": FilePin()}) == {"train": page}
    assert pin.size == 2_227_753_162
    argv = ["train", "--preset", "tiny", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run")]
    assert flm_cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not the expected 2,227,753,162" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# files already on disk: the pinned digest is verified once, recorded in a stamp
# ------------------------------------------------------------------------------------------------
def _count_hashing(monkeypatch) -> list[str]:
    """Record every file check_local_size hashes (it reads the file in full only to hash it)."""
    seen: list[str] = []
    real_open = open

    def spy(file, mode="r", *a, **k):
        if "b" in mode and "r" in mode and not str(file).endswith(".json"):
            seen.append(Path(file).name)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(download_mod, "open", spy, raising=False)
    return seen


def test_a_cached_file_of_the_pinned_size_but_other_bytes_is_refused(tmp_path):
    """Regression (issue 18, item 7): a file of the pinned size but all zero bytes passed the
    size-only check, download exited 0 and flm train used it. Its digest is now checked."""
    info = DATASETS["tinystories"]
    zeros = tmp_path / info.local_name("valid")
    with open(zeros, "wb") as f:
        f.truncate(info.pins["valid"].size)  # 22,502,601 zero bytes: the real pinned size
    with pytest.raises(ValueError) as ei:
        download("tinystories", tmp_path, splits=("valid",), base_url="http://127.0.0.1:9/", progress=False)
    msg = str(ei.value)
    assert str(zeros) in msg and f"not the pinned {info.pins['valid'].sha256}" in msg and "\n" not in msg
    assert zeros.stat().st_size == info.pins["valid"].size  # kept: the user decides
    assert not download_mod.stamp_path(zeros).exists()  # a failed check records nothing


def test_a_verified_file_is_hashed_once_and_again_when_it_changes(server, tinystories, tmp_path, monkeypatch):
    dest = tmp_path / "dest"
    pins = _ts_pins(tinystories)
    paths = _get(server, dest, pins=pins)
    train = paths["train"]
    stamp = json.loads(download_mod.stamp_path(train).read_text())
    st = train.stat()
    assert stamp == {"file": train.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": pins["train"].sha256}
    hashed = _count_hashing(monkeypatch)
    n = len(server.requests)
    assert _get(server, dest, pins=pins) == paths and len(server.requests) == n
    assert hashed == []  # the stamps written while downloading vouch for both files

    # A file placed by hand (no stamp) is hashed once, then trusted through its new stamp.
    download_mod.stamp_path(train).unlink()
    _get(server, dest, pins=pins)
    assert hashed == [train.name] and download_mod.stamp_path(train).exists()
    _get(server, dest, pins=pins)
    assert hashed == [train.name]

    # The same size with other bytes (a new mtime): verified again, and refused.
    blob = bytearray(tinystories["train"])
    blob[100] ^= 1
    train.write_bytes(bytes(blob))
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(ValueError, match=rf"has sha256 {_sha(bytes(blob))}, not the pinned {pins['train'].sha256}"):
        _get(server, dest, pins=pins)
    assert hashed == [train.name, train.name] and len(server.requests) == n

    # A garbled stamp is not trusted: the file is hashed again.
    train.write_bytes(tinystories["train"])
    download_mod.stamp_path(train).write_text("{not json")
    _get(server, dest, pins=pins)
    assert (
        hashed[-1] == train.name and json.loads(download_mod.stamp_path(train).read_text())["sha256"] == stamp["sha256"]
    )


def test_download_and_train_refuse_zeros_of_the_pinned_size(texts, tmp_path, monkeypatch, capsys):
    """The command-line view of item 7: ``flm download`` fails (it exited 0) and ``flm train
    --data-dir`` refuses the files before writing anything (it trained on them)."""
    import flm.cli.train
    import flm.cli.train_data

    train, valid = (p.read_bytes() for p in texts)
    ts = dataclasses.replace(
        DATASETS["tinystories"], pins=MappingProxyType({"train": _pin(train), "valid": _pin(valid)})
    )
    table = MappingProxyType({**DATASETS, "tinystories": ts})
    monkeypatch.setattr(download_mod, "DATASETS", table)
    monkeypatch.setattr(flm.cli.train, "DATASETS", table)
    monkeypatch.setattr(flm.cli.train_data, "DATASETS", table)
    data = tmp_path / "data"
    data.mkdir()
    (data / ts.local_name("train")).write_bytes(train)
    (data / ts.local_name("valid")).write_bytes(bytes(len(valid)))  # the pinned size, all zeros
    capsys.readouterr()
    assert (
        flm_cli_main(["download", "tinystories", str(data), "--base-url", "http://127.0.0.1:9/", "--no-progress"]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and f"{ts.local_name('valid')} has sha256" in err
    argv = ["train", "--preset", "tiny", "--data-dir", str(data), "--out-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert flm_cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "not the pinned" in err
    assert not (tmp_path / "run").exists()
