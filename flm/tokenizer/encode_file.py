"""Encode a whole text file to a flat token array on disk, in parallel, with bounded memory.

The file is cut into byte ranges that start at a special token (so no pre-token or special
token is split); each worker streams its range through ``Tokenizer.encode_iterable`` and writes
ids to a part file; the parts are concatenated in order. The output is raw little-endian
``uint16`` (vocabularies up to 65,536 ids) or ``uint32``, readable with
``np.memmap(path, dtype=..., mode="r")``, plus a JSON sidecar ``<output>.json``::

    {"format": "flm-tokens", "version": 1, "dtype": "uint16", "count": N, "vocab_size": V,
     "tokenizer_fingerprint": "<sha256>", "tokenizer_files": [...] or null, "source": "<input>"}

Both files are written atomically (temp file + rename), the sidecar last.
"""

from __future__ import annotations

import codecs
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from flm._io import TEMP_SUFFIX, atomic_write_json, fsync_dir
from flm.progress import progress_bar, want_progress
from flm.tokenizer.pretokenize import chunk_boundaries, prefix_end, safe_split_token
from flm.tokenizer.tokenizer import Tokenizer
from flm.tokens import sidecar_dict, token_dtype

__all__ = ["encode_file", "token_dtype"]

_READ_BLOCK = 1 << 20  # bytes read at a time by a worker
_RANGE_BYTES = 16 << 20  # target size of one range (bounds a part file, not memory)

_worker_tokenizer: Tokenizer | None = None  # set once per worker process by _init_worker


def _read_text_blocks(path: str, start: int, end: int) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            data = f.read(min(_READ_BLOCK, left))
            if not data:
                break
            left -= len(data)
            try:
                yield decoder.decode(data, final=left <= 0)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not valid UTF-8 near byte {end - left - len(data) + e.start}") from e


def _encode_range(tok: Tokenizer, path: str, start: int, end: int, part_path: str, dtype: str) -> int:
    count = 0
    with open(part_path, "wb") as f:
        for ids in tok.encode_batches(_read_text_blocks(path, start, end), buffer_chars=_READ_BLOCK):
            f.write(np.asarray(ids, dtype=dtype).data)  # not tofile: its short-write error has no errno
            count += len(ids)
    return count


def _init_worker(tok: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tok


def _worker(args: tuple[str, int, int, str, str]) -> int:
    assert _worker_tokenizer is not None
    return _encode_range(_worker_tokenizer, *args)


def encode_file(
    tokenizer: Tokenizer,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    num_workers: int | None = None,
    progress: bool | None = True,
    tokenizer_files: Sequence[str] | None = None,
    max_bytes: int | None = None,
) -> int:
    """Encode a UTF-8 text file to a flat token file plus a JSON sidecar (see module doc).

    Args:
        tokenizer: the tokenizer.
        input_path: the text file.
        output_path: the token file; the sidecar goes to ``output_path + ".json"``.
        num_workers: processes; None uses 1 for inputs under 1 MB, else ``os.cpu_count()``.
            Ranges are cut only before a special token, so a file without one is encoded
            by a single process.
        progress: a progress bar on stderr (None: only for inputs over 4 MB).
        tokenizer_files: paths recorded in the sidecar; default the files the tokenizer was
            loaded from (``tokenizer.source_files``), else null.
        max_bytes: encode only the file's first ``max_bytes``, cut at the last boundary of the
            tokenizer's split token before them (as ``train_bpe(max_bytes=...)``); ``None``: all.

    Returns:
        the number of tokens written.

    Raises:
        ValueError: the input cannot be read or is not UTF-8 (the message names it).
    """
    input_path, output_path = str(input_path), str(output_path)
    split = safe_split_token(tokenizer.special_tokens).encode("utf-8")
    try:
        size = prefix_end(input_path, max_bytes, split)
        with open(input_path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read {input_path}: {e}") from e
    if num_workers is None:
        num_workers = 1 if size < (1 << 20) else (os.cpu_count() or 1)
    dtype = token_dtype(tokenizer.vocab_size)
    n_ranges = max(num_workers * 4 if num_workers > 1 else 1, size // _RANGE_BYTES)
    cuts = chunk_boundaries(input_path, n_ranges, split, end=size)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A hidden ``….tmp`` directory: ``remove_orphan_temps`` cleans it up if this process is killed.
    workdir = tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.parts.", suffix=TEMP_SUFFIX)
    tasks = [
        (input_path, a, b, os.path.join(workdir, f"{k:06d}.bin"), dtype.str)
        for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))
    ]
    bar = progress_bar(size, f"encode {Path(input_path).name}", enabled=want_progress(progress, size))
    tmp_out = os.path.join(workdir, "all.bin")
    total = 0
    try:
        with open(tmp_out, "wb") as dst:

            def collect(task: tuple, count: int) -> None:
                nonlocal total
                with open(task[3], "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
                os.unlink(task[3])
                total += count
                bar.update(task[2] - task[1])

            if num_workers <= 1 or len(tasks) <= 1:
                for t in tasks:
                    collect(t, _encode_range(tokenizer, *t))
            else:
                from flm.tokenizer._mp import pool_context

                with pool_context().Pool(min(num_workers, len(tasks)), _init_worker, (tokenizer,)) as pool:
                    for t, count in zip(tasks, pool.imap(_worker, tasks)):
                        collect(t, count)
            dst.flush()
            os.fsync(dst.fileno())
        bar.close()
        os.replace(tmp_out, output_path)
        fsync_dir(out.parent)
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), output_path) from err  # a full disk: say where
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    files = tokenizer_files if tokenizer_files is not None else getattr(tokenizer, "source_files", None)
    meta = sidecar_dict(
        total,
        tokenizer.vocab_size,
        tokenizer_fingerprint=tokenizer.fingerprint(),
        tokenizer_files=[str(p) for p in files] if files else None,
        source=input_path,
    )
    atomic_write_json(output_path + ".json", meta)
    return total
