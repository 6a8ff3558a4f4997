"""Tests for flm.data.download (resumable, size-checked, gzip) against a loopback HTTP server, and flm.progress."""

from __future__ import annotations

import gzip
import io
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import flm.data as data
from flm.data import DATASETS, download
import flm.download as download_mod
from flm.progress import ProgressBar, format_count, format_duration

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
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _RangeHandler(BaseHTTPRequestHandler):
    """GET with single open-ended/closed byte ranges (``bytes=a-`` / ``bytes=a-b``); HTTP/1.0, one request per connection."""

    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        with srv.lock:
            srv.requests.append({"path": self.path, "range": rng})
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
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload) + srv.extra_length))
        self.end_headers()
        if cut is not None:
            payload = payload[:cut]
        self.wfile.write(payload)
        self.wfile.flush()


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    srv = _Server(root)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=TIMEOUT)


def _text(n_lines: int, seed: int) -> bytes:
    return "".join(f"Once upon a time {seed} there was line {i}.\n<|endoftext|>\n" for i in range(n_lines)).encode()


@pytest.fixture()
def tinystories(server):
    files = {
        "train": _text(4000, 1),  # ~200 KB
        "valid": _text(300, 2),
    }
    for split, blob in files.items():
        (server.root / DATASETS["tinystories"].files[split]).write_bytes(blob)
    return files


def _get(server, dest, name="tinystories", **kw):
    return download(name, dest, base_url=server.url, progress=False, timeout=TIMEOUT, **kw)


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


def test_plain_download(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    paths = _get(server, dest)
    assert set(paths) == {"train", "valid"}
    assert paths["train"] == dest / "TinyStoriesV2-GPT4-train.txt"
    for split, blob in tinystories.items():
        assert paths[split].read_bytes() == blob
    assert not list(dest.glob("*.part"))
    assert [r["range"] for r in server.requests] == [None, None]


def test_resume_after_interruption(server, tinystories, tmp_path):
    dest = tmp_path / "dest"
    name = DATASETS["tinystories"].files["train"]
    server.cut_after = 1000
    with pytest.raises(OSError, match=re.escape(name)):
        _get(server, dest)
    part = dest / f"{name}.part"
    assert part.stat().st_size == 1000
    assert not (dest / name).exists()
    paths = _get(server, dest)
    assert server.requests[1]["path"] == f"/{name}" and server.requests[1]["range"] == "bytes=1000-"
    assert paths["train"].read_bytes() == tinystories["train"]
    assert paths["valid"].read_bytes() == tinystories["valid"]
    assert not part.exists()


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
    with pytest.raises(OSError, match=re.escape(name) + ".*incomplete"):
        _get(server, dest)
    part = dest / f"{name}.part"
    assert part.stat().st_size == len(tinystories["train"])
    assert not (dest / name).exists()
    # The server is fixed: the resumed request is past the end (416 with the true total), which completes it.
    server.extra_length = 0
    paths = _get(server, dest)
    assert server.requests[1]["range"] == f"bytes={len(tinystories['train'])}-"
    assert paths["train"].read_bytes() == tinystories["train"]


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
    assert sorted(p.name for p in dest.iterdir()) == ["owt_train.txt", "owt_valid.txt"]


def test_corrupt_gzip_raises_and_removes_part(server, tmp_path):
    for split in ("train", "valid"):
        (server.root / DATASETS["owt"].files[split]).write_bytes(b"this is not gzip data" * 10)
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match=r"owt_train\.txt\.gz.*gzip"):
        _get(server, dest, name="owt")
    assert not list(dest.iterdir())


def test_http_error_names_the_file(server, tmp_path):
    with pytest.raises(OSError, match=r"TinyStoriesV2-GPT4-train\.txt.*404"):
        _get(server, tmp_path / "dest")


def test_env_base_url_and_unknown_name(server, tinystories, tmp_path, monkeypatch):
    monkeypatch.setenv("FLM_DATA_BASE_URL", server.url + "/")
    paths = download("tinystories", tmp_path / "dest", progress=False, timeout=TIMEOUT)
    assert paths["valid"].read_bytes() == tinystories["valid"]
    with pytest.raises(ValueError, match="'nope'"):
        download("nope", tmp_path / "dest")
    with pytest.raises(ValueError, match="'test'"):
        download("tinystories", tmp_path / "dest", splits=["test"])


def test_progress_bar_on_stderr(server, tinystories, tmp_path, capsys):
    download("tinystories", tmp_path / "dest", base_url=server.url, progress=True, timeout=TIMEOUT)
    err = capsys.readouterr().err
    assert "TinyStoriesV2-GPT4-train.txt" in err and "100%" in err


def test_cli(server, tinystories, tmp_path, capsys):
    dest = tmp_path / "dest"
    rc = download_mod._main(["download", "tinystories", str(dest), "--base-url", server.url, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"train\t{dest / 'TinyStoriesV2-GPT4-train.txt'}" in out
    assert (dest / "TinyStoriesV2-GPT4-valid.txt").read_bytes() == tinystories["valid"]
    rc = download_mod._main(["download", "owt", str(tmp_path / "d2"), "--base-url", server.url, "--no-progress"])
    assert rc == 1 and "owt_train.txt.gz" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# flm.progress
# ------------------------------------------------------------------------------------------------
def test_format_helpers():
    assert format_count(512) == "512 B"
    assert format_count(1536) == "1.5 KiB"
    assert format_count(3 * 2**30) == "3.0 GiB"
    assert format_count(12_000, "tok") == "12.0k tok"
    assert format_duration(59) == "0:59" and format_duration(3725) == "1:02:05"
    assert format_duration(float("inf")) == "?"


def test_progress_bar_render_and_close():
    f = io.StringIO()
    with ProgressBar(200, "file.bin", file=f, log_interval=0) as bar:
        bar.update(50)
        assert "25%" in bar.render() and "50 B/200 B" in bar.render()
        bar.update(150)
    text = f.getvalue()
    assert text.splitlines()[-1].startswith("file.bin  100%")
    bar.close()  # idempotent
    assert f.getvalue() == text
    assert ProgressBar(None, "n", unit="it").render().startswith("n  0 it [")  # unknown total: no percentage


def test_progress_bar_throttles_and_can_be_disabled():
    f = io.StringIO()
    bar = ProgressBar(10**6, "x", file=f, log_interval=3600)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert len(f.getvalue().splitlines()) == 2  # the first update and the final state
    g = io.StringIO()
    with ProgressBar(10, "y", enabled=False, file=g) as quiet:
        quiet.update(10)
    assert g.getvalue() == "" and quiet.n == 10
    with pytest.raises(ValueError):
        ProgressBar(-1)


def test_progress_bar_resumed_initial_is_shown_but_not_in_rate():
    bar = ProgressBar(100, "r", initial=40, file=io.StringIO())
    assert "40 B/100 B" in bar.render() and "0 B/s" in bar.render()
