"""Download the handout's data sets (TinyStoriesV2-GPT4, the CS336 OpenWebText sample), resumably.

Each file is fetched into ``<file>.part`` with HTTP Range resumption and renamed to its final
name only once it is complete, so a final file is always whole; ``python -m flm download
tinystories DEST`` (or ``flm download``) does the same from the command line.

Source: CS336 assignment 1 handout §1 (data set links), §5.1.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from flm.progress import progress_bar

__all__ = ["DatasetInfo", "DATASETS", "download"]

@dataclass(frozen=True)
class DatasetInfo:
    """Where a data set lives and how its files are stored.

    Attributes:
        base_url: the default base URL; a file's URL is ``base_url + "/" + remote file name``.
        files: split (``"train"``, ``"valid"``) → remote file name.
        gzip: whether the remote files are gzip-compressed (they are decompressed to the name
            without ``.gz``).
        description: a short human description.
    """

    base_url: str
    files: Mapping[str, str]
    gzip: bool = False
    description: str = ""

    def local_name(self, split: str) -> str:
        """The file name the split is saved under (the remote name without ``.gz`` when compressed)."""
        name = self.files[split]
        return name[: -len(".gz")] if self.gzip and name.endswith(".gz") else name


DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "tinystories": DatasetInfo(
            base_url="https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main",
            files=MappingProxyType(
                {"train": "TinyStoriesV2-GPT4-train.txt", "valid": "TinyStoriesV2-GPT4-valid.txt"}
            ),
            gzip=False,
            description="TinyStoriesV2-GPT4 (Eldan & Li 2023), the handout's small data set",
        ),
        "owt": DatasetInfo(
            base_url="https://huggingface.co/datasets/stanford-cs336/owt-sample/resolve/main",
            files=MappingProxyType({"train": "owt_train.txt.gz", "valid": "owt_valid.txt.gz"}),
            gzip=True,
            description="the CS336 OpenWebText sample (gzip-compressed on the hub)",
        ),
    }
)

_CHUNK_BYTES = 1 << 20
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)


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


def _fetch(url: str, part: Path, *, timeout: float, progress: bool, desc: str, _allow_restart: bool = True) -> int:
    """Download ``url`` into ``part``, resuming from its current size with a Range request.

    A 206 reply whose range starts at the current size is appended; a 200 reply (server ignores
    Range) restarts the file from zero. Returns the final size; raises IOError (``.part`` kept) when
    the bytes received disagree with Content-Length or the total from Content-Range.
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "flm-data/1", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # Range not satisfiable: the .part may already hold the whole file.
            _, total = _parse_content_range(e.headers.get("Content-Range"))
            e.close()
            if total == have:
                return have
            if _allow_restart:  # the .part is longer than the remote file: it is stale, start over
                part.unlink()
                return _fetch(url, part, timeout=timeout, progress=progress, desc=desc, _allow_restart=False)
        raise OSError(f"download of {desc} from {url} failed: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise OSError(f"download of {desc} from {url} failed: {e.reason}") from e

    with resp:
        status = resp.status
        length = _int_header(resp.headers.get("Content-Length"))
        if status == 206 and have:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != have:
                if not _allow_restart:
                    raise OSError(f"download of {desc}: server sent range start {start}, expected {have}")
                resp.close()
                part.unlink()
                return _fetch(url, part, timeout=timeout, progress=progress, desc=desc, _allow_restart=False)
            mode = "ab"
        elif status == 200:
            have = 0  # the server ignored Range (or there was none): start from zero
            total = length
            mode = "wb"
        else:
            raise OSError(f"download of {desc} from {url} failed: unexpected HTTP status {status}")

        received = 0
        error: BaseException | None = None
        with open(part, mode) as f, progress_bar(total, desc, unit="B", enabled=progress, initial=have) as bar:
            try:
                while True:
                    chunk = resp.read(_CHUNK_BYTES)
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, EOFError, ValueError) as e:  # includes IncompleteRead, resets, timeouts
                error = e
    size = part.stat().st_size
    if error is not None or (length is not None and received != length) or (total is not None and size != total):
        expected = total if total is not None else (have + length if length is not None else "?")
        why = f" ({type(error).__name__}: {error})" if error is not None else ""
        raise OSError(
            f"download of {desc} from {url} is incomplete: got {size} of {expected} bytes{why}; "
            f"the partial file {part} is kept, run again to resume"
        )
    return size


def _gunzip(src: Path, dest: Path, *, progress: bool) -> None:
    """Decompress ``src`` (gzip) to ``dest`` atomically, streaming in 1 MiB chunks."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with open(src, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz, os.fdopen(fd, "wb") as out:
            with progress_bar(src.stat().st_size, f"{dest.name} (gunzip)", unit="B", enabled=progress) as bar:
                pos = 0
                while True:
                    block = gz.read(_CHUNK_BYTES)
                    if not block:
                        break
                    out.write(block)
                    new_pos = raw.tell()
                    bar.update(new_pos - pos)
                    pos = new_pos
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except (OSError, EOFError, zlib.error) as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        # A size-checked download that fails to decompress is corrupt; resuming it cannot help.
        src.unlink(missing_ok=True)
        raise ValueError(f"{src.name} is not a valid gzip file ({e}); it was removed, run again to re-download") from e
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def download(
    name: str,
    dest_dir: str | os.PathLike[str],
    *,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    splits: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Download a data set's train and valid files into ``dest_dir``, resuming partial downloads.

    Each file is fetched into ``<file>.part`` and renamed to its final name only once its size has been
    checked against Content-Length / Content-Range, so a final file is always complete and is skipped
    (no network request) when present. If a ``.part`` exists, the next call sends
    ``Range: bytes=<size>-`` and appends on a 206 reply, or restarts from zero on a 200.

    Gzip data sets (``owt``): the *compressed* bytes are downloaded (resumably) to ``<name>.gz.part``;
    once complete they are decompressed streaming to ``<name>`` (atomically) and the ``.gz.part`` removed.
    This needs the compressed size in extra disk space for a while, but keeps resumption exact.

    Args:
        name: a key of ``DATASETS`` (``"tinystories"`` or ``"owt"``).
        dest_dir: the directory to save into (created if needed).
        base_url: overrides the data set's base URL (the file name is appended); default: the
            ``FLM_DATA_BASE_URL`` environment variable, else ``DATASETS[name].base_url``.
        progress: show a progress bar on stderr.
        timeout: socket timeout in seconds for connecting and for each read.
        splits: which splits to fetch (default: all, i.e. ``("train", "valid")``).

    Returns:
        ``{"train": path, "valid": path}``: the local (decompressed) files.

    Raises:
        ValueError: an unknown ``name`` or split; a downloaded gzip file that does not decompress.
        OSError: a network or HTTP error, or a size mismatch (naming the file; the ``.part`` is kept).

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
    base = base_url or os.environ.get("FLM_DATA_BASE_URL") or info.base_url
    base = base.rstrip("/")
    dest = Path(os.fspath(dest_dir))
    dest.mkdir(parents=True, exist_ok=True)

    out: dict[str, Path] = {}
    for split in splits:
        remote = info.files[split]
        final = dest / info.local_name(split)
        out[split] = final
        if final.is_file():  # only ever created by an atomic rename of a complete file
            continue
        url = f"{base}/{remote}"
        part = dest / f"{remote}.part"
        _fetch(url, part, timeout=timeout, progress=progress, desc=remote)
        if info.gzip:
            _gunzip(part, final, progress=progress)
            part.unlink(missing_ok=True)
        else:
            os.replace(part, final)
    return out



# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flm.data", description="flm data utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download a data set (resumes partial downloads)")
    dl.add_argument("name", choices=sorted(DATASETS), help="which data set")
    dl.add_argument("dest", help="directory to save into")
    dl.add_argument("--base-url", default=None, help="override the base URL (the file name is appended)")
    dl.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        paths = download(args.name, args.dest, base_url=args.base_url, progress=not args.no_progress, timeout=args.timeout)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, p in paths.items():
        print(f"{split}\t{p}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
