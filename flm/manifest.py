"""What flm wrote in a directory, so that it replaces or deletes only its own files.

Every directory flm writes a run into (a training run, an experiment and its sub-runs, a sweep and
its models, a tokenizer directory) holds ``flm-manifest.json``: for each file flm wrote there, its
name, size and ``mtime_ns``, the SHA-256 of files up to 1 MiB, and for checkpoints the CRC-32 their
header carries. The rules (also in ``docs/design.md``):

- **Only its own files.** flm replaces or deletes a file only when the manifest shows it wrote it:
  the size and ``mtime_ns`` match, or (a copy that did not keep times) the size and the digest or
  checkpoint CRC match. A file that only grows (``metrics.jsonl``) matches while it is at least as
  long as recorded and its first 4 KiB are unchanged; a large token file, while its size is the
  recorded one and flm's sidecar describes it. Anything else is refused, with or without
  ``--overwrite``: the command names the files and says to move them; nothing is guessed.
- **Never through a link.** A symbolic link inside a directory is refused by name; it is never
  followed, replaced or removed through. (The directory itself may be a link: the commands resolve
  it once.)
- **Recorded before it appears.** An atomic write (:func:`flm._io.atomic_path`) records the new
  file's entry (keeping the previous entry as ``prev``) and only then renames it into place, so a
  kill at any moment leaves the manifest describing what is on disk. A checkpoint left unrecorded
  counts as flm's when its header is flm's.
- **Adopted once.** A directory an older flm wrote has no manifest: the first command that writes
  there records the files flm's own stamps and headers identify (checkpoint headers, token-file
  sidecars, tokenizer and token stamps; ``config.json``, results, plots and reports only beside
  such a file), says so, and treats everything else as the user's.

Only directories that hold a manifest are tracked; writes elsewhere (a download directory, an
export) are not recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flm._fs import LOCK_NAME, is_temp_name, replacing, safetensors_metadata

__all__ = [
    "MANIFEST_NAME",
    "ForeignFilesError",
    "claim",
    "record",
    "owned",
    "refused",
    "tree_refusals",
    "refusal_message",
    "remove",
    "check_replace",
    "has_manifest",
    "expect",
    "before_replace",
]

MANIFEST_NAME = "flm-manifest.json"
_FORMAT = "flm-manifest"
_VERSION = 1
_DIGEST_MAX = 1 << 20  # files up to this size also get a SHA-256
_HEAD = 4096  # an append-only file must keep its first bytes


class ForeignFilesError(ValueError):
    """flm was asked to replace or delete files it cannot show it wrote (the message names them)."""


def has_manifest(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a manifest (is tracked)."""
    return os.path.lexists(os.path.join(directory, MANIFEST_NAME))


# ----------------------------------------------------------------------------------- the file


def _load(d: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's ``{name: record}`` (``None`` without a manifest).

    Raises:
        ForeignFilesError: the manifest is a link or not a valid manifest.
    """
    p = d / MANIFEST_NAME
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise ForeignFilesError(f"{p} is not a regular file (a link?); move it away")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        if not (isinstance(data, dict) and data.get("format") == _FORMAT and isinstance(data.get("files"), dict)):
            raise ValueError("not an flm manifest")
    except (OSError, ValueError) as err:
        raise ForeignFilesError(
            f"{p} is not a valid flm manifest ({err}); move it away (flm then adopts the files it can identify)"
        ) from None
    return data["files"]


def _save(d: Path, files: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"format": _FORMAT, "version": _VERSION, "files": files}, indent=1) + "\n"
    with replacing(d / MANIFEST_NAME) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if limit is not None:
            h.update(f.read(limit))
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _safetensors_meta(path: Path) -> dict[str, Any] | None:
    """flm's checkpoint header (the ``flm`` entry of the safetensors metadata), or ``None`` for any
    other file, an unreadable one, or a header over 64 MiB (never read whole)."""
    try:
        with open(path, "rb") as f:
            meta = safetensors_metadata(f, os.fstat(f.fileno()).st_size, max_header=1 << 26).get("flm")
        header = json.loads(meta) if isinstance(meta, str) else None
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _crc(path: Path) -> str | None:
    header = _safetensors_meta(path)
    checksum = (header or {}).get("checksum")
    return str(checksum.get("value")) if isinstance(checksum, dict) else None


def _describe(path: Path, name: str, *, append: bool = False) -> dict[str, Any]:
    """The record of the file at ``path`` as it is now (``name``: the name it has or will have)."""
    st = os.lstat(path)
    rec: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if append:
        rec["append"] = True
        rec["head"] = _sha256(path, min(st.st_size, _HEAD))
    elif st.st_size <= _DIGEST_MAX:
        rec["sha256"] = _sha256(path)
    if name.endswith(".safetensors") and (crc := _crc(path)) is not None:
        rec["crc"] = crc
    return rec


def _matches(path: Path, rec: dict[str, Any], st: os.stat_result) -> bool:
    size = rec.get("size")
    if st.st_size == size and st.st_mtime_ns == rec.get("mtime_ns"):
        return True
    if rec.get("append"):
        return isinstance(size, int) and st.st_size >= size and _sha256(path, min(size, _HEAD)) == rec.get("head")
    if st.st_size != size:
        return False
    if "crc" in rec and _crc(path) == rec["crc"]:
        return True
    if path.name.endswith(".tokens") and "sha256" not in rec:  # large: its flm sidecar describes it
        return _is_token_file(path)
    return "sha256" in rec and _sha256(path) == rec["sha256"]


# ---------------------------------------------------------------------------- identification


def _json(path: Path) -> Any:
    try:
        if os.lstat(path).st_size > _DIGEST_MAX * 16:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_metrics(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(_HEAD * 4).splitlines()
    except (OSError, ValueError):
        return False
    complete = [ln for ln in lines[:-1] if ln.strip()] or lines[:1]
    for line in complete:
        try:
            row = json.loads(line)
        except ValueError:
            return False
        if not (isinstance(row, dict) and "step" in row):
            return False
    return bool(complete)


def _is_token_file(path: Path) -> bool:
    side = _json(Path(f"{path}.json"))
    if not (isinstance(side, dict) and side.get("format") == "flm-tokens"):
        return False
    width = {"uint16": 2, "uint32": 4}.get(str(side.get("dtype")))
    try:
        return width is not None and os.lstat(path).st_size == int(side.get("count", -1)) * width
    except (OSError, TypeError, ValueError):
        return False


def _strong(path: Path) -> bool:
    """Whether flm's own header or stamp identifies the file (no context needed)."""
    name = path.name
    if name.endswith(".safetensors"):
        return _safetensors_meta(path) is not None
    if name == "metrics.jsonl":
        return _is_metrics(path)
    if name.endswith(".tokens"):
        return _is_token_file(path)
    if name.endswith(".tokens.json"):
        side = _json(path)
        return isinstance(side, dict) and side.get("format") == "flm-tokens"
    if name == "tokenizer.stamp.json":
        s = _json(path)
        return isinstance(s, dict) and {"train_text", "vocab_size", "special_tokens"} <= s.keys()
    if name.endswith(".stamp.json"):
        s = _json(path)
        return isinstance(s, dict) and {"text", "max_bytes", "tokenizer"} <= s.keys()
    if name in ("vocab.json", "merges.txt"):
        return _strong(path.parent / "tokenizer.stamp.json")
    return False


def _has_evidence(d: Path) -> bool:
    """Whether a strongly identified flm file lies in ``d``, its parent or its subdirectories."""
    dirs = [d, d.parent]
    try:
        dirs += [p for p in d.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        pass
    for x in dirs:
        try:
            entries = list(x.iterdir())
        except OSError:
            continue
        for p in entries:
            if p.name in ("tokenizer.stamp.json", "metrics.jsonl") or p.name.endswith((".safetensors", ".tokens")):
                if not p.is_symlink() and p.is_file() and _strong(p):
                    return True
    return False


def _weak(path: Path) -> bool:
    """Whether the file has the form of one flm writes (checked only beside identified files)."""
    name = path.name
    if name.endswith(".png"):
        try:
            with open(path, "rb") as f:
                return f.read(8) == b"\x89PNG\r\n\x1a\n"
        except OSError:
            return False
    if name == "config.json":
        c = _json(path)
        return isinstance(c, dict) and {"model", "train"} <= c.keys()
    if name in ("results.json", "summary.json", "sweep.json"):
        return isinstance(_json(path), dict)
    if name in ("samples.txt", "report.md"):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read(2) == "# "
        except (OSError, ValueError):
            return False
    return name.startswith("events.out.tfevents.") and path.parent.name == "tensorboard"


def _identify(path: Path) -> bool:
    """Whether an unrecorded file in a directory without a manifest is one an older flm wrote."""
    return _strong(path) or (_weak(path) and _has_evidence(path.parent))


# ----------------------------------------------------------------------------- ownership


def owned(path: str | os.PathLike) -> bool:
    """Whether flm may replace or delete ``path``: a file it recorded (or can identify), or a
    directory whose every entry is. A link is never owned; a missing path is trivially free.

    Raises:
        ForeignFilesError: the directory's manifest is not valid.
    """
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return True
    if stat.S_ISLNK(st.st_mode):
        return False
    if stat.S_ISDIR(st.st_mode):
        return not tree_refusals(p)
    if not stat.S_ISREG(st.st_mode):
        return False
    files = _load(p.parent)
    if files is None:
        return _identify(p)
    rec = files.get(p.name)
    if rec is None:  # written, then killed before it was recorded: only flm's own header tells
        return p.name.endswith(".safetensors") and _strong(p)
    if rec.get("pending"):  # killed while a writer that renames its own temporary wrote it
        return True
    return _matches(p, rec, st) or (isinstance(rec.get("prev"), dict) and _matches(p, rec["prev"], st))


def tree_refusals(directory: str | os.PathLike) -> list[Path]:
    """The entries under ``directory`` (itself included if it is a link) that flm may not delete."""
    d = Path(directory)
    if d.is_symlink():
        return [d]
    if not d.is_dir():
        return [] if owned(d) else [d]
    out: list[Path] = []
    for p in sorted(d.iterdir()):
        if p.name in (MANIFEST_NAME, LOCK_NAME) or (is_temp_name(p.name) and not p.is_symlink()):
            continue
        if p.is_symlink():
            out.append(p)
        elif p.is_dir():
            out += tree_refusals(p)
        elif not owned(p):
            out.append(p)
    return out


def refused(directory: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Those of ``names`` in ``directory`` that exist and that flm may not replace or delete
    (links, files it did not write, directories holding such files), as paths."""
    d = Path(directory)
    out: list[Path] = []
    for name in names:
        p = d / name
        if os.path.lexists(p):
            out += [p] if p.is_symlink() or not p.is_dir() else tree_refusals(p)
    return [p for p in out if p.is_symlink() or not owned(p)]


def refusal_message(paths: list[Path], where: str | os.PathLike, *, flag: str = "--out-dir") -> str:
    """One line naming the files flm will not touch and saying what to do."""
    base = Path(where)

    def show(p: Path) -> str:
        try:
            rel = str(p.relative_to(base))
        except ValueError:
            rel = str(p)
        return rel + (" (a symbolic link)" if p.is_symlink() else "")

    names = ", ".join(show(p) for p in paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
    return (
        f"{flag} {base} holds {names}, which flm did not write (or which changed since): flm never replaces or "
        f"deletes such files, with or without --overwrite; move them out of {base}, or use another {flag}"
    )


def check_replace(paths: Iterable[str | os.PathLike], *, where: str | os.PathLike | None = None) -> None:
    """Raise unless flm may replace every existing one of ``paths``.

    Raises:
        ForeignFilesError: naming the files flm will not touch.
    """
    bad = [Path(p) for p in paths if os.path.lexists(p) and (Path(p).is_symlink() or not owned(p))]
    if bad:
        raise ForeignFilesError(refusal_message(bad, where or bad[0].parent, flag="directory"))


# ------------------------------------------------------------------------------ recording


def claim(directory: str | os.PathLike, *, log: Callable[[str], None] | None = None) -> list[str]:
    """Make ``directory`` tracked: create it and its manifest. A directory an older flm wrote
    (files, no manifest) has the files flm's stamps and headers identify recorded, once, with a
    message; the rest stay the user's.

    Returns:
        The adopted file names.

    Raises:
        ForeignFilesError: an invalid manifest, or ``directory`` is a link inside a tracked directory.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if _load(d) is not None:
        return []
    adopted: dict[str, dict[str, Any]] = {}
    for p in sorted(d.iterdir()):
        if p.name in (MANIFEST_NAME, LOCK_NAME) or is_temp_name(p.name) or p.is_symlink() or not p.is_file():
            continue
        if _identify(p):
            adopted[p.name] = _describe(p, p.name, append=p.name == "metrics.jsonl")
    _save(d, adopted)
    if adopted and log is not None:
        names = sorted(adopted)
        log(
            f"{d}: adopted {len(names)} file(s) an earlier flm wrote ({', '.join(names[:8])}"
            f"{' …' if len(names) > 8 else ''}); recorded in {MANIFEST_NAME}"
        )
    return sorted(adopted)


def _update(d: Path, name: str, rec: dict[str, Any] | None) -> None:
    files = _load(d)
    if files is None:
        return
    old = files.get(name)
    if rec is None:
        files.pop(name, None)
    else:
        if isinstance(old, dict) and not old.get("append"):
            rec = {**rec, "prev": {k: v for k, v in old.items() if k != "prev"}}
        files[name] = rec
    _save(d, files)


def expect(path: str | os.PathLike) -> None:
    """Record that flm is about to write ``path`` by a writer that renames its own temporary into
    place (``encode_file``): a file there counts as flm's until :func:`record` describes it."""
    p = Path(path)
    if has_manifest(p.parent):
        _update(p.parent, p.name, {"pending": True})


def record(path: str | os.PathLike, *, append: bool = False) -> None:
    """Record the file at ``path`` (as it is now) in its directory's manifest; a no-op in an
    untracked directory. ``append``: a file flm only appends to (``metrics.jsonl``)."""
    p = Path(path)
    if has_manifest(p.parent) and p.name != MANIFEST_NAME and os.path.isfile(p) and not p.is_symlink():
        _update(p.parent, p.name, _describe(p, p.name, append=append))


def before_replace(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Called by :func:`flm._io.atomic_path` just before ``tmp`` is renamed over ``target``: in a
    tracked directory, refuse a ``target`` flm did not write, else record ``tmp``'s entry for it.

    Raises:
        ForeignFilesError: ``target`` is a link or a file flm cannot show it wrote.
    """
    t = Path(target)
    if t.name == MANIFEST_NAME or not has_manifest(t.parent):
        return
    if os.path.lexists(t) and (t.is_symlink() or t.is_dir() or not owned(t)):
        raise ForeignFilesError(refusal_message([t], t.parent, flag="directory"))
    _update(t.parent, t.name, _describe(Path(tmp), t.name))


def remove(path: str | os.PathLike, *, missing_ok: bool = True) -> None:
    """Delete a file or a directory tree flm wrote (and its manifest entries).

    Raises:
        ForeignFilesError: ``path`` is a link, or it (or something under it) is not flm's; then
            nothing is deleted.
        FileNotFoundError: ``path`` is missing and not ``missing_ok``.
    """
    p = Path(path)
    if not os.path.lexists(p):
        if missing_ok:
            return
        raise FileNotFoundError(2, "No such file or directory", str(p))
    bad = [p] if p.is_symlink() else (tree_refusals(p) if p.is_dir() else ([] if owned(p) else [p]))
    if bad:
        raise ForeignFilesError(refusal_message(bad, p.parent, flag="directory"))
    if p.is_dir():
        _remove_tree(p)
    else:
        p.unlink()
    _update(p.parent, p.name, None)


def _remove_tree(d: Path) -> None:
    for q in list(d.iterdir()):
        if q.is_dir() and not q.is_symlink():
            _remove_tree(q)
        elif q.name != MANIFEST_NAME:
            q.unlink()
    (d / MANIFEST_NAME).unlink(missing_ok=True)
    d.rmdir()
