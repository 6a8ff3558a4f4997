"""Download the handout's data sets (TinyStoriesV2-GPT4, the CS336 OpenWebText sample), resumably and verified.

Each file is fetched into ``<file>.part`` with HTTP Range resumption, hashed (SHA-256) while it
streams in, checked against the pinned size and digest in :data:`DATASETS` (and against the
checksum the Hugging Face hub sends, ``X-Linked-Etag`` / ``X-Linked-Size``), and renamed to its
final name only then, so a final file is always whole and the expected one. A reply that is an
HTML page (a login portal, an error page, a wrong URL) is refused before anything is written.
A file already on disk is trusted only once its SHA-256 has been checked against the pin: the
check is recorded in ``<file>.stamp.json`` (its size, ``mtime_ns`` and digest), so it is hashed
once, and again whenever it changes. A run that reads only the first N bytes of a file
(``--train-bytes``) fetches only those, by HTTP Range (:func:`download_prefix`): a prefix is kept
under its own name, cut at a document boundary and stamped as not digest-verified (the pins cover
whole files). A file that cannot be fetched at all raises :class:`DownloadUnavailable`.
``python -m flm download tinystories DEST`` (or ``flm download``) does the same from the command line.

Source: CS336 assignment 1 handout §1 (data set links), §5.1.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from flm._io import atomic_path, atomic_write_json, atomic_writer
from flm.progress import progress_bar

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DownloadUnavailable",
    "FilePin",
    "check_local_size",
    "download",
    "download_prefix",
    "prefix_path",
    "prefix_stamp",
    "stamp_path",
]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FilePin:
    """The expected size and SHA-256 of one data set file; ``None`` means unknown (that check is skipped).

    Attributes:
        size: bytes of the file as served (for a gzip data set: the ``.gz``).
        sha256: lowercase hex SHA-256 of the file as served.
        local_size: bytes of the decompressed file (gzip data sets only; ignored otherwise).
        local_sha256: lowercase hex SHA-256 of the decompressed file (gzip data sets only).

    Raises:
        ValueError: a negative or non-integer size, or a digest that is not 64 lowercase hex digits.
    """

    size: int | None = None
    sha256: str | None = None
    local_size: int | None = None
    local_sha256: str | None = None

    def __post_init__(self) -> None:
        for name in ("size", "local_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"FilePin.{name} must be a non-negative int or None, got {v!r}")
        for name in ("sha256", "local_sha256"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and _SHA256_HEX.fullmatch(v)):
                raise ValueError(f"FilePin.{name} must be 64 lowercase hex digits or None, got {v!r}")


_NO_PIN = FilePin()


@dataclass(frozen=True)
class DatasetInfo:
    """Where a data set lives, how its files are stored, and what they must hash to.

    Attributes:
        base_url: the default base URL; a file's URL is ``base_url + "/" + remote file name``.
        files: split (``"train"``, ``"valid"``) → remote file name.
        gzip: whether the remote files are gzip-compressed (they are decompressed to the name
            without ``.gz``).
        description: a short human description.
        pins: split → :class:`FilePin`, the expected size and SHA-256 (a split without one is unchecked).
    """

    base_url: str
    files: Mapping[str, str]
    gzip: bool = False
    description: str = ""
    pins: Mapping[str, FilePin] = field(default_factory=lambda: MappingProxyType({}))

    def local_name(self, split: str) -> str:
        """The file name the split is saved under (the remote name without ``.gz`` when compressed)."""
        name = self.files[split]
        return name[: -len(".gz")] if self.gzip and name.endswith(".gz") else name


# Pins: size and SHA-256 of each file as published (hub revision "main" at the time of writing). Every value is
# copied from public material that states it; none was computed here (the files were not downloaded):
# - TinyStoriesV2-GPT4 train/valid: sizes and digests agree across many independent public scripts and logs;
#   e.g. profrodai/profrodai-resources articles/train-a-tiny-gpt-on-colab/tinygpt_run_v1.py gives the valid
#   digest as "the one the Hub publishes for it (Git LFS oid)", i.e. what X-Linked-Etag carries.
# - owt-sample: .gz sizes and digests (what is downloaded) and decompressed sizes and digests (what is kept)
#   from public CS336 write-ups; the decompressed sizes and digests are stated in several, the .gz values in
#   fewer (the train .gz digest in full in one). The decompressed pins are checked while gunzipping, so the
#   kept text is verified by independently attested values even if a .gz pin were wrong.
# An unknown value is stored as None: that check is skipped and the others (the other pin, Content-Length,
# the hub's X-Linked-Etag/X-Linked-Size) still apply. If upstream replaces a file, downloads fail loudly:
# update the pin, or pass pins={} (CLI: --no-pins) knowingly.
DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "tinystories": DatasetInfo(
            base_url="https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main",
            files=MappingProxyType({"train": "TinyStoriesV2-GPT4-train.txt", "valid": "TinyStoriesV2-GPT4-valid.txt"}),
            gzip=False,
            description="TinyStoriesV2-GPT4 (Eldan & Li 2023), the handout's small data set",
            pins=MappingProxyType(
                {
                    "train": FilePin(
                        size=2_227_753_162,
                        sha256="6418d412de72888f52b5142c761ac21a582f7d1166f0bfbdb5f03ccfdec90443",
                    ),
                    "valid": FilePin(
                        size=22_502_601,
                        sha256="6874bae9a4c1a4e7edcf0e53b86c17817e9cf881fc75ff2368da457b80c0585d",
                    ),
                }
            ),
        ),
        "owt": DatasetInfo(
            base_url="https://huggingface.co/datasets/stanford-cs336/owt-sample/resolve/main",
            files=MappingProxyType({"train": "owt_train.txt.gz", "valid": "owt_valid.txt.gz"}),
            gzip=True,
            description="the CS336 OpenWebText sample (gzip-compressed on the hub)",
            pins=MappingProxyType(
                {
                    "train": FilePin(
                        size=4_591_240_837,
                        sha256="b19ae88cfbc4016b304c348522455fe38ebac48fffed955adcc7191a89e38ccf",
                        local_size=11_920_511_059,
                        local_sha256="bbeb7f291a981ecfd5cf44b84d0f654b9e96c53dff99f2556b7d2cccaf8c1918",
                    ),
                    "valid": FilePin(
                        size=111_785_382,
                        sha256="bc73db5da2f19c360836b9c8a88094e13346ec83798c2f40060be39135768c80",
                        local_size=289_998_753,
                        local_sha256="2406f278e71829d273b315e9b403285baea7022b26a96d2728dd8b776ea40660",
                    ),
                }
            ),
        ),
    }
)

_CHUNK_BYTES = 1 << 20
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)
_HTML_STARTS = (b"<!doctype html", b"<html")
_HTML_HINT = "server returned an HTML page, not the data file — check the URL/--base-url or your network's login page"
_OVERRIDE_HINT = "if upstream really changed the file, update the pin or pass pins={} (CLI: --no-pins)"


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``"bytes 100-199/1000"`` → ``(100, 1000)``; ``"bytes */1000"`` → ``(None, 1000)``; unknown parts → None."""
    if not value:
        return None, None
    m = _CONTENT_RANGE.match(value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _hub_checksum(headers: Message) -> tuple[str | None, int | None]:
    """The SHA-256 and size the Hugging Face hub states for a file in one reply's headers (None when absent).

    ``X-Linked-Etag`` (sent on the hub's redirect to its storage) is the SHA-256 of an LFS file and
    ``X-Linked-Size`` its size. A plain ``ETag`` is only read on a hub reply (one with ``X-Repo-Commit``):
    other servers' ETags are opaque. A tag that is not 64 hex digits (a git blob's SHA-1) is ignored.
    """
    tag = headers.get("X-Linked-Etag")
    if tag is None and headers.get("X-Repo-Commit") is not None:
        tag = headers.get("ETag")
    sha = None
    if tag:
        tag = tag.strip()
        tag = tag.removeprefix("W/").strip('"').lower()
        sha = tag if _SHA256_HEX.fullmatch(tag) else None
    return sha, _int_header(headers.get("X-Linked-Size"))


class DownloadUnavailable(OSError):
    """A data set file could not be fetched at all: the server was not reached (no network, a name
    that does not resolve, a refused connection, a timeout) or answered with an HTTP error.

    Nothing of that file was written. The message is one line naming the file, the URL and the
    reason; a command line adds what works without the download (see ``flm train``).

    Attributes:
        file: the remote file name, e.g. ``"TinyStoriesV2-GPT4-train.txt"``.
        url: the URL that was tried.
        reason: what went wrong, e.g. ``"[Errno -2] Name or service not known"``.
    """

    def __init__(self, file: str, url: str, reason: str) -> None:
        super().__init__(f"cannot download {file} from {url}: {reason}")
        self.file, self.url, self.reason = file, url, reason


class _HubRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does (the Range header is kept) and remembers the hub's checksum headers."""

    def __init__(self) -> None:
        self.sha256: str | None = None
        self.size: int | None = None

    def note(self, headers: Message) -> None:
        sha, size = _hub_checksum(headers)
        self.sha256 = sha or self.sha256
        self.size = size if size is not None else self.size

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        self.note(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Fetched(NamedTuple):
    size: int  # bytes in the complete .part
    sha256: str  # of the whole .part (a resumed prefix included)
    server_sha256: str | None  # what the hub says the file hashes to, if it said
    server_size: int | None


def _looks_like_html(first: bytes) -> bool:
    """Whether a body starts like an HTML document (``<!doctype html`` / ``<html``, any case, after whitespace)."""
    return first[:1024].lstrip().lower().startswith(_HTML_STARTS)


def _hash_file(path: Path, hasher: hashlib._Hash) -> None:
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, _CHUNK_BYTES), b""):
            hasher.update(block)


def _fetch(
    url: str,
    part: Path,
    *,
    timeout: float,
    progress: bool,
    desc: str,
    expected_size: int | None = None,
    _allow_restart: bool = True,
) -> _Fetched:
    """Download ``url`` into ``part``, resuming from its current size with a Range request, hashing as it goes.

    A 206 reply whose range starts at the current size is appended (the existing bytes are read once
    to resume the SHA-256); a 200 reply (server ignores Range) restarts the file from zero. Raises
    OSError (``.part`` kept) when the bytes received disagree with Content-Length or the total from
    Content-Range; OSError with nothing written when the reply is HTML (Content-Type or first bytes);
    OSError with the ``.part`` removed when the server's announced total differs from ``expected_size``.
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "flm-data/1", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    hub = _HubRedirects()
    again = functools.partial(
        _fetch,
        url,
        part,
        timeout=timeout,
        progress=progress,
        desc=desc,
        expected_size=expected_size,
        _allow_restart=False,
    )
    html_error = OSError(f"download of {desc} from {url}: {_HTML_HINT}")
    try:
        resp = urllib.request.build_opener(hub).open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # Range not satisfiable: the .part may already hold the whole file.
            hub.note(e.headers)
            _, total = _parse_content_range(e.headers.get("Content-Range"))
            e.close()
            if total == have:
                digest = hashlib.sha256()
                _hash_file(part, digest)
                return _Fetched(have, digest.hexdigest(), hub.sha256, hub.size)
            if _allow_restart:  # the .part is longer than the remote file: it is stale, start over
                part.unlink()
                return again()
        raise DownloadUnavailable(desc, url, f"HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DownloadUnavailable(desc, url, str(e.reason)) from e
    except (TimeoutError, ConnectionError) as e:  # while waiting for the reply's headers
        raise DownloadUnavailable(desc, url, f"{type(e).__name__}: {e}") from e

    with resp:
        hub.note(resp.headers)
        if resp.headers.get_content_type() == "text/html":
            raise html_error
        status = resp.status
        length = _int_header(resp.headers.get("Content-Length"))
        if status == 206 and have:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != have:
                if not _allow_restart:
                    raise OSError(f"download of {desc}: server sent range start {start}, expected {have}")
                resp.close()
                part.unlink()
                return again()
            mode = "ab"
        elif status == 200:
            have = 0  # the server ignored Range (or there was none): start from zero
            total = length
            mode = "wb"
        else:
            raise OSError(f"download of {desc} from {url} failed: unexpected HTTP status {status}")
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise OSError(
                f"download of {desc} from {url} refused: the server offers {total} bytes, the pinned size is "
                f"{expected_size}; {_OVERRIDE_HINT}"
            )

        error: BaseException | None = None
        try:
            chunk = resp.read(_CHUNK_BYTES)
        except (OSError, EOFError, ValueError) as e:  # includes IncompleteRead, resets, timeouts
            chunk, error = b"", e
        if have == 0 and _looks_like_html(chunk):
            raise html_error
        hasher = hashlib.sha256()
        if mode == "ab":
            _hash_file(part, hasher)  # resume the digest over the bytes already there
        received = 0
        with open(part, mode) as f, progress_bar(total, desc, unit="B", enabled=progress, initial=have) as bar:
            try:
                while chunk:
                    f.write(chunk)
                    hasher.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    chunk = resp.read(_CHUNK_BYTES)
            except (OSError, EOFError, ValueError) as e:
                error = e
    size = part.stat().st_size
    short = error is not None or (length is not None and received != length) or (total is not None and size != total)
    if short and size == 0:
        part.unlink(missing_ok=True)  # created empty by this call: there is nothing to resume
        why = f" ({type(error).__name__}: {error})" if error is not None else ""
        raise DownloadUnavailable(desc, url, f"the connection closed before any data{why}")
    if short:
        expected = total if total is not None else (have + length if length is not None else "?")
        why = f" ({type(error).__name__}: {error})" if error is not None else ""
        raise OSError(
            f"download of {desc} from {url} is incomplete: got {size} of {expected} bytes{why}; "
            f"the partial file {part} is kept, run again to resume"
        )
    return _Fetched(size, hasher.hexdigest(), hub.sha256, hub.size)


def _verify(
    path: Path, shown: str, size: int, sha256: str, checks: Sequence[tuple[int | None, str | None, str]]
) -> None:
    """Raise OSError (and delete ``path``) unless ``size``/``sha256`` match every ``(size, sha256, source)``."""
    for want_size, want_sha, source in checks:
        if want_size is not None and size != want_size:
            what = f"got {size} bytes, expected {want_size}"
        elif want_sha is not None and sha256 != want_sha:
            what = f"got sha256 {sha256}, expected {want_sha}"
        else:
            continue
        path.unlink(missing_ok=True)
        raise OSError(
            f"{shown} is not the expected file ({source}): {what}; {path.name} was removed "
            f"(a corrupt or substituted download; {_OVERRIDE_HINT})"
        )


def _gunzip(src: Path, dest: Path, *, progress: bool, pin: FilePin) -> str:
    """Decompress ``src`` (gzip) to ``dest`` atomically, streaming in 1 MiB chunks and checking ``pin.local_*``.

    Returns the SHA-256 of the decompressed bytes."""
    hasher = hashlib.sha256()
    n = 0
    try:
        with (
            open(src, "rb") as raw,
            gzip.GzipFile(fileobj=raw, mode="rb") as gz,
            atomic_writer(dest, "wb") as out,
            progress_bar(src.stat().st_size, f"{dest.name} (gunzip)", unit="B", enabled=progress) as bar,
        ):
            pos = 0
            for block in iter(functools.partial(gz.read, _CHUNK_BYTES), b""):
                out.write(block)
                hasher.update(block)
                n += len(block)
                new_pos = raw.tell()
                bar.update(new_pos - pos)
                pos = new_pos
            # Inside the block: a mismatch raises before the atomic rename, so ``dest`` never appears.
            _verify(src, dest.name, n, hasher.hexdigest(), [(pin.local_size, pin.local_sha256, "pinned, decompressed")])
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        # A verified or size-checked download that fails to decompress is corrupt; resuming it cannot help.
        src.unlink(missing_ok=True)
        raise ValueError(f"{src.name} is not a valid gzip file ({e}); it was removed, run again to re-download") from e
    return hasher.hexdigest()


def stamp_path(path: str | os.PathLike) -> Path:
    """Where the verification stamp of a data file lives: ``<file>.stamp.json`` beside it."""
    p = Path(path)
    return p.with_name(f"{p.name}.stamp.json")


def _stamped_sha256(path: Path, st: os.stat_result) -> str | None:
    """The digest a stamp records for ``path``, if the stamp describes the file as it is now (same size, mtime_ns)."""
    try:
        stamp = json.loads(stamp_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("size") != st.st_size or stamp.get("mtime_ns") != st.st_mtime_ns:
        return None
    sha = stamp.get("sha256")
    return sha if isinstance(sha, str) and _SHA256_HEX.fullmatch(sha) else None


def _write_stamp(path: Path, sha256: str) -> None:
    """Record that ``path``, at its current size and mtime_ns, hashes to ``sha256`` (best effort: a
    read-only directory only means the file is hashed again next time)."""
    st = path.stat()
    stamp = {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    try:
        atomic_write_json(stamp_path(path), stamp)
    except OSError:
        pass


def check_local_size(
    path: str | os.PathLike, pin: FilePin, *, gzip: bool = False, progress: bool = False, record: bool = True
) -> None:
    """Check a data file already on disk against its pin: the size (a ``stat``), then the SHA-256 once.

    Catches a file left by older versions or other tools: an HTML error page, a partial copy, or
    a file of the right size with the wrong bytes (e.g. all zeros) saved under the data set's
    name. The digest is computed only when no stamp (``<file>.stamp.json``: size, ``mtime_ns``,
    SHA-256) describes the file as it is now; a match is recorded in a new stamp, so an unchanged
    file is hashed once, and a changed one (another size or mtime) again.

    Args:
        path: the local (decompressed, for gzip data sets) file.
        pin: its pin; a pin without a size or digest skips that check.
        gzip: whether the data set is served gzipped (then ``pin.local_size``/``local_sha256`` apply).
        progress: show a progress bar on stderr while hashing.
        record: write the stamp after a successful hash (``False``: write nothing, e.g. for
            ``flm train --dry-run``).

    Raises:
        ValueError: naming the file, its size or digest and the expected one (the file is kept:
            the user decides).
    """
    p = Path(path)
    want = pin.local_size if gzip else pin.size
    want_sha = pin.local_sha256 if gzip else pin.sha256
    st = p.stat()
    if want is not None and st.st_size != want:
        raise ValueError(
            f"{path} is {st.st_size:,} bytes, not the expected {want:,}: a partial or wrong file (an HTML page?); "
            "delete it to download again"
        )
    if want_sha is None:
        return
    have_sha = _stamped_sha256(p, st)
    if have_sha is None:
        hasher = hashlib.sha256()
        with open(p, "rb") as f, progress_bar(st.st_size, f"{p.name} (verify)", unit="B", enabled=progress) as bar:
            for block in iter(functools.partial(f.read, _CHUNK_BYTES), b""):
                hasher.update(block)
                bar.update(len(block))
        have_sha = hasher.hexdigest()
        if record and have_sha == want_sha and p.stat().st_mtime_ns == st.st_mtime_ns:  # unchanged while read
            _write_stamp(p, have_sha)
    if have_sha != want_sha:
        raise ValueError(
            f"{path} has sha256 {have_sha}, not the pinned {want_sha}: a corrupt or different file of the "
            "expected size; delete it to download again"
        )


def _resolve_pins(name: str, info: DatasetInfo, pins: Mapping[str, FilePin] | None) -> Mapping[str, FilePin]:
    if pins is None:
        return info.pins
    if not isinstance(pins, Mapping):
        raise TypeError(f"pins must be a mapping split -> FilePin or None, got {type(pins).__name__}")
    for split, pin in pins.items():
        if split not in info.files:
            raise ValueError(f"pins for data set {name!r} name an unknown split {split!r}; it has {sorted(info.files)}")
        if not isinstance(pin, FilePin):
            raise TypeError(f"pins[{split!r}] must be a FilePin, got {type(pin).__name__}")
    return pins


def download(
    name: str,
    dest_dir: str | os.PathLike[str],
    *,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    splits: Sequence[str] | None = None,
    pins: Mapping[str, FilePin] | None = None,
) -> dict[str, Path]:
    """Download a data set's train and valid files into ``dest_dir``, resuming partial downloads, verified.

    Each file is fetched into ``<file>.part`` and renamed to its final name only once (1) its size
    agrees with Content-Length / Content-Range, (2) its size and SHA-256 (computed while streaming;
    a resumed ``.part`` is read once to continue the digest) equal the pins, and (3) they equal the
    checksum the Hugging Face hub sends (``X-Linked-Etag`` = SHA-256, ``X-Linked-Size``), when it
    sends one. A final file is therefore complete and verified, and is skipped (no network request)
    when present (its SHA-256 is checked once, see :func:`check_local_size`). If a ``.part`` exists, the next call sends ``Range: bytes=<size>-`` and appends on
    a 206 reply, or restarts from zero on a 200. A reply whose Content-Type is ``text/html`` or whose
    body starts like an HTML document is refused before anything is written.

    Gzip data sets (``owt``): the *compressed* bytes are downloaded (resumably) to ``<name>.gz.part``
    and checked against ``FilePin.size``/``sha256`` (the ``.gz`` as served); they are then decompressed
    streaming to ``<name>`` (atomically, via :func:`flm._io.atomic_writer`), checked against
    ``FilePin.local_size``/``local_sha256``, and the ``.gz.part`` removed.

    Args:
        name: a key of ``DATASETS`` (``"tinystories"`` or ``"owt"``).
        dest_dir: the directory to save into (created if needed; removed again on failure when
            this call created it and it is still empty).
        base_url: overrides the data set's base URL (the file name is appended); default: the
            ``FLM_DATA_BASE_URL`` environment variable, else ``DATASETS[name].base_url``. A mirror is
            held to the same pins.
        progress: show a progress bar on stderr.
        timeout: socket timeout in seconds for connecting and for each read.
        splits: which splits to fetch (default: all, i.e. ``("train", "valid")``).
        pins: split → :class:`FilePin` replacing ``DATASETS[name].pins`` (a split left out is not
            pin-checked; ``{}`` turns pin checks off, e.g. for a mirror of other files). ``None``
            (default): the table's pins. The HTML and hub-checksum checks stay on either way.

    Returns:
        ``{"train": path, "valid": path}``: the local (decompressed) files.

    Raises:
        ValueError: an unknown ``name`` or split, or a ``pins`` key that is not a split; a downloaded
            gzip file that does not decompress (it is removed); a file already in ``dest_dir`` whose
            size or SHA-256 differs from its pin (it is kept).
        TypeError: ``pins`` is not a mapping of :class:`FilePin`.
        DownloadUnavailable: (an OSError) the server could not be reached or answered an HTTP error:
            nothing of that file was written, and directories this call created are removed again
            when they are empty.
        OSError: a short transfer (naming the file; the ``.part`` is kept to resume);
            an HTML reply (naming the URL); a size or SHA-256 that differs from a pin or from the hub's
            checksum (naming the file, the expected and the received value; the ``.part`` is removed).

    Source: CS336 assignment 1 handout §5.1 and its data set links.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    info = DATASETS[name]
    if splits is None:
        splits = tuple(info.files)
    for s in splits:
        if s not in info.files:
            raise ValueError(f"data set {name!r} has no split {s!r}; it has {sorted(info.files)}")
    table = _resolve_pins(name, info, pins)
    base = base_url or os.environ.get("FLM_DATA_BASE_URL") or info.base_url
    base = base.rstrip("/")
    dest = Path(os.fspath(dest_dir))
    created = _make_dirs(dest)
    try:
        return _download_splits(info, dest, splits, table, base, timeout=timeout, progress=progress)
    except BaseException:
        for d in reversed(created):  # only the directories this call made, and only while empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _make_dirs(dest: Path) -> list[Path]:
    """``mkdir -p dest``; returns the directories it created, outermost first."""
    missing = []
    d = dest
    while not d.exists() and not d.is_symlink() and d != d.parent:
        missing.append(d)
        d = d.parent
    dest.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _download_splits(
    info: DatasetInfo,
    dest: Path,
    splits: Sequence[str],
    table: Mapping[str, FilePin],
    base: str,
    *,
    timeout: float,
    progress: bool,
) -> dict[str, Path]:
    """The loop of :func:`download` over the splits (``dest`` exists)."""
    out: dict[str, Path] = {}
    for split in splits:
        remote = info.files[split]
        final = dest / info.local_name(split)
        out[split] = final
        pin = table.get(split, _NO_PIN)
        if final.is_file():  # verified against the pin once (a stamp records it), so a bad file is never used
            check_local_size(final, pin, gzip=info.gzip, progress=progress)
            continue
        url = f"{base}/{remote}"
        part = dest / f"{remote}.part"
        got = _fetch(url, part, timeout=timeout, progress=progress, desc=remote, expected_size=pin.size)
        checks = [(pin.size, pin.sha256, "pinned"), (got.server_size, got.server_sha256, "the server's checksum")]
        _verify(part, f"{remote} from {url}", got.size, got.sha256, checks)
        if info.gzip:
            digest = _gunzip(part, final, progress=progress, pin=pin)
            part.unlink(missing_ok=True)
        else:
            os.replace(part, final)
            digest = got.sha256
        _write_stamp(final, digest)  # verified as it streamed in: never hashed again while unchanged
    return out


# ------------------------------------------------------------------------------------------------
# Prefixes: the first bytes of a file, for a run that reads only those (--train-bytes)
# ------------------------------------------------------------------------------------------------
_EOS = b"<|endoftext|>"  # the document separator (flm.tokenizer.EOS_TOKEN)


def prefix_path(name: str, dest_dir: str | os.PathLike[str], split: str, nbytes: int) -> Path:
    """Where :func:`download_prefix` keeps the first ``nbytes`` of a split: its own name beside the
    whole file, e.g. ``TinyStoriesV2-GPT4-train.first-33554432-bytes.txt``.

    Raises:
        ValueError: an unknown data set or split.
    """
    info = _dataset(name, [split])
    local = Path(info.local_name(split))
    return Path(os.fspath(dest_dir)) / f"{local.stem}.first-{nbytes}-bytes{local.suffix}"


def prefix_stamp(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """The stamp of a prefix :func:`download_prefix` wrote, if it describes ``path`` as it is now
    (same size and ``mtime_ns``); ``None`` otherwise (no stamp, a changed file, a whole-file stamp)."""
    p = Path(path)
    try:
        stamp = json.loads(stamp_path(p).read_text(encoding="utf-8"))
        st = p.stat()
    except (OSError, ValueError):
        return None
    if (
        not isinstance(stamp, dict)
        or stamp.get("verified") is not False
        or not isinstance(stamp.get("prefix_of"), str)
        or stamp.get("size") != st.st_size
        or stamp.get("mtime_ns") != st.st_mtime_ns
    ):
        return None
    return stamp


def _dataset(name: str, splits: Sequence[str]) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    info = DATASETS[name]
    for s in splits:
        if s not in info.files:
            raise ValueError(f"data set {name!r} has no split {s!r}; it has {sorted(info.files)}")
    return info


def download_prefix(
    name: str,
    dest_dir: str | os.PathLike[str],
    split: str,
    nbytes: int,
    *,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    pins: Mapping[str, FilePin] | None = None,
) -> Path:
    """Download only the first ``nbytes`` of a split (cut at a document boundary), not the whole file.

    One HTTP request asks for ``Range: bytes=0-<nbytes + len(<|endoftext|>) - 1>``; a server that
    ignores Range (a 200 reply) is read only that far and closed. The bytes are cut where
    ``--train-bytes nbytes`` cuts the whole file (at the start of the last ``<|endoftext|>`` at or
    before ``nbytes``: :func:`flm.tokenizer.pretokenize.prefix_end`), checked to be UTF-8, and
    saved atomically under their own name (:func:`prefix_path`), so a run on the prefix reads the
    same text as a run on the whole file with that byte limit.

    The pins cover whole files only, and no digest of a prefix can be known in advance, so the
    prefix is **not digest-verified**: only the size the server announces for the whole file is
    checked against the pin (a different file is refused before anything is written), and the reply
    must not be an HTML page. Its stamp (``<prefix>.stamp.json``) says so: ``"verified": false``,
    the whole file's name, ``nbytes``, the URL, and no digest. An existing prefix whose stamp
    describes it is reused without a request. A run that needs the whole file calls
    :func:`download`, which fetches and verifies it as always.

    Args:
        name: a key of ``DATASETS``. For a gzip data set (``"owt"``) no Range is asked: the
            compressed stream is read and decompressed only until the prefix of the *text* is
            complete, then closed (``nbytes`` counts decompressed bytes).
        dest_dir: the directory to save into (created if needed; removed again on failure when this
            call created it and it is still empty).
        split: ``"train"`` or ``"valid"``.
        nbytes: the byte budget (> 0).
        base_url: as for :func:`download` (default: ``FLM_DATA_BASE_URL``, else the table's).
        progress: show a progress bar on stderr.
        timeout: socket timeout in seconds.
        pins: as for :func:`download` (only the whole file's ``size`` is used).

    Returns:
        The prefix file's path.

    Raises:
        ValueError: an unknown data set or split, a non-positive ``nbytes``, a corrupt gzip stream; a file
            already at the prefix's name that flm's stamp does not describe (it is kept); bytes that
            are not UTF-8 or hold no text before the cut (nothing is written).
        DownloadUnavailable: the server could not be reached or answered an HTTP error.
        OSError: an HTML reply, a whole-file size that differs from the pin, a short transfer
            (nothing is written).
    """
    info = _dataset(name, [split])
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
    pin = _resolve_pins(name, info, pins).get(split, _NO_PIN)
    dest = Path(os.fspath(dest_dir))
    final = prefix_path(name, dest, split, nbytes)
    if final.exists() or final.is_symlink():
        if final.is_file() and not final.is_symlink() and prefix_stamp(final) is not None:
            return final
        raise ValueError(
            f"{final} exists but flm's stamp ({stamp_path(final).name}) does not describe it; it is kept: "
            "move it away to download the prefix again"
        )
    base = (base_url or os.environ.get("FLM_DATA_BASE_URL") or info.base_url).rstrip("/")
    remote = info.files[split]
    url = f"{base}/{remote}"
    created = _make_dirs(dest)
    try:
        _fetch_prefix(
            url, final, nbytes, timeout=timeout, progress=progress, desc=remote, expected_size=pin.size, gzip=info.gzip
        )
    except BaseException:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    st = final.stat()
    stamp = {
        "file": final.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "prefix_of": remote,
        "prefix_bytes": nbytes,
        "url": url,
        "verified": False,
        "note": f"prefix of {nbytes} bytes of {remote}, cut at a document boundary, not digest-verified",
    }
    atomic_write_json(stamp_path(final), stamp)
    return final


def _fetch_prefix(
    url: str,
    final: Path,
    nbytes: int,
    *,
    timeout: float,
    progress: bool,
    desc: str,
    expected_size: int | None,
    gzip: bool = False,
) -> None:
    """Fetch the first ``nbytes + len(<|endoftext|>)`` bytes of ``url`` (of its decompressed text,
    for a gzip file) and save them, cut at a document boundary and checked to be UTF-8, atomically
    as ``final`` (see :func:`download_prefix`)."""
    from flm.tokenizer.pretokenize import prefix_end

    want = nbytes + len(_EOS)  # a separator starting at nbytes still counts as a boundary
    headers = {"User-Agent": "flm-data/1", "Accept-Encoding": "identity"}
    if not gzip:  # a gzip stream's compressed length of a text prefix is unknown: read it until enough
        headers["Range"] = f"bytes=0-{want - 1}"
    try:
        resp = urllib.request.build_opener(_HubRedirects()).open(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as e:
        raise DownloadUnavailable(desc, url, f"HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DownloadUnavailable(desc, url, str(e.reason)) from e
    except (TimeoutError, ConnectionError) as e:
        raise DownloadUnavailable(desc, url, f"{type(e).__name__}: {e}") from e
    html_error = OSError(f"download of {desc} from {url}: {_HTML_HINT}")
    with resp, atomic_path(final) as tmp:
        if resp.headers.get_content_type() == "text/html":
            raise html_error
        if resp.status == 206 and not gzip:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != 0:
                raise OSError(f"download of {desc} from {url}: the server sent a range starting at {start}, not 0")
        elif resp.status == 200:  # the whole file follows (Range ignored, or none asked): read only what is needed
            total = _int_header(resp.headers.get("Content-Length"))
        else:
            raise OSError(f"download of {desc} from {url} failed: unexpected HTTP status {resp.status}")
        if expected_size is not None and total is not None and total != expected_size:
            raise OSError(
                f"download of {desc} from {url} refused: the server offers {total} bytes, the pinned size is "
                f"{expected_size}; {_OVERRIDE_HINT}"
            )
        need = want if total is None or gzip else min(want, total)
        got = 0  # bytes of text written
        received = 0  # bytes read from the network
        unzip = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        with (
            open(tmp, "wb") as f,
            progress_bar(need, f"{desc} (first {nbytes:,} bytes)", unit="B", enabled=progress) as bar,
        ):
            while got < need:
                try:
                    chunk = resp.read(min(_PREFIX_GZIP_CHUNK if gzip else _CHUNK_BYTES, need - got))
                except (OSError, EOFError, ValueError) as e:
                    raise OSError(
                        f"download of {desc} from {url} failed after {received} bytes ({type(e).__name__}: {e})"
                    ) from e
                if not chunk:
                    break
                if received == 0 and _looks_like_html(chunk):
                    raise html_error
                received += len(chunk)
                if unzip is not None:
                    chunk = _gunzip_chunk(unzip, chunk, desc)
                    if unzip.eof and unzip.unused_data:  # the next gzip member
                        rest, unzip = unzip.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS)
                        chunk += _gunzip_chunk(unzip, rest, desc)
                chunk = chunk[: need - got]
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        truncated = not unzip.eof if unzip is not None else total is not None  # else: the whole file was shorter
        if got < need and truncated:
            raise OSError(f"download of {desc} from {url} is incomplete: got {got} of {need} bytes; run again")
        if received == 0:
            raise DownloadUnavailable(desc, url, "the connection closed before any data")
        cut = prefix_end(tmp, nbytes, _EOS)
        os.truncate(tmp, cut)
        if cut == 0:
            raise ValueError(f"the first {nbytes:,} bytes of {desc} hold no text before the first {_EOS.decode()}")
        _check_utf8(tmp, f"the first {cut:,} bytes of {desc} from {url}")


_PREFIX_GZIP_CHUNK = 64 << 10  # compressed bytes per read: a gzip prefix stops within this of enough text


def _gunzip_chunk(unzip: Any, chunk: bytes, desc: str) -> bytes:
    """Decompress one chunk of a gzip stream (``unzip``: a ``zlib.decompressobj``); ValueError if corrupt."""
    try:
        return unzip.decompress(chunk)
    except zlib.error as e:
        raise ValueError(f"{desc} is not a valid gzip stream ({e})") from None


def _check_utf8(path: Path, shown: str) -> None:
    """Raise ValueError unless the file is valid UTF-8 (read in blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    with open(path, "rb") as f:
        try:
            for block in iter(functools.partial(f.read, _CHUNK_BYTES), b""):
                decoder.decode(block)
                pos += len(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise ValueError(f"{shown} are not UTF-8 text (byte {pos + e.start:,}: {e.reason})") from None


if __name__ == "__main__":  # the old entry point; the one command line is ``flm`` (issue 20)
    print(
        "error: python -m flm.download is no longer a command; run: flm download … (or python -m flm download …)",
        file=sys.stderr,
    )
    sys.exit(2)
